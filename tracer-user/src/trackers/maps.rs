//! Map tracker, user side: Go maps that keep growing, one series per map.
//!
//! The kernel side only sees growth events (rare: a classic map doubles, a
//! Swiss table splits once per ~1000 inserts) and keeps, per map address, the
//! stack of the latest growth and the map's hash seed. Every interval this
//! collector reads, in one batched `process_vm_readv`, the header of every
//! known map: the entry count (a u64 at offset 0 in every Go version) and
//! the seed. A seed that changed means the address now holds something else
//! (the map died and the GC reused the memory, or a stack map moved): the
//! map is dropped, never reported with a wrong count. `runtime.mapclear`
//! draws a new seed too; the kernel counts clears and one new seed is
//! accepted per clear.
//!
//! Names: each pointer-sized package-level variable of the program's own
//! packages is read every interval; one that points to a tracked map names
//! it (`main.cache`), and from then on the variable itself is followed (a
//! reassigned `cache = make(...)` stays one series). A `sync.Map` (Go <=
//! 1.23) is named the same way through its `dirty` map (or its read-only
//! map while `dirty` is nil). Stripped binaries have no symbol table: maps
//! are named by address.

pub mod entry_bytes;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData},
    Ebpf,
};
use tracer_common::{
    maps::{counter, seed, MapInfo, KIND_TRIE, MAX_TRACKED_MAPS, TRIE_SEED_OFFSET},
    stacks::StackKey,
};

use crate::probes::Probes;
use aya::programs::uprobe::UProbeLinkId;
use crate::binary::{
    elf::{self, DataSymbol},
    golang::{
        memory::{u64_at, TargetMemory},
        GoBinary,
    },
};
use crate::{cli::TraceOptions, output, report::Kind};
use crate::stacks::SampleStack;
use super::{Collected, Counters, Judging, StackSample, Tally, Target, Tracker, TrackerSpec};

/// The map tracker in the registry (asked for by name: it reads the
/// target's memory every interval and only applies to Go).
pub const SPEC: TrackerSpec = TrackerSpec { name: "maps", default: false, configure, new };

/// Growth stacks are taken with bpf_get_stackid (Go keeps frame pointers).
fn configure(load: &mut crate::probes::LoadSettings, _opts: &TraceOptions, active: bool) {
    load.stack_ids |= active;
}

fn new(_probes: &mut Probes, _opts: &TraceOptions, _target: &Target) -> Result<Box<dyn Tracker>> {
    Ok(Box::new(Maps { collector: None }))
}

/// The map tracker: set up once the target runs; nothing when it is not a
/// Go program.
struct Maps {
    collector: Option<MapCollector>,
}

impl Tracker for Maps {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    /// Reads the target's Go executable and attaches the growth and clear
    /// probes. A target that is not Go (or a probe that cannot be attached)
    /// is a one-line warning and no map tracking.
    fn on_start(&mut self, probes: &mut Probes, target: &Target) {
        let pid = target.pid;
        let started = MapCollector::new(&mut probes.ebpf, pid).and_then(|mut m| {
            for p in &m.probes {
                probes.attach_uprobe_at(p.program, &m.exe, p.file_offset, pid).with_context(|| format!("maps: {}", p.function))?;
            }
            m.duty_cycle(probes);
            Ok(m)
        });
        match started {
            Ok(m) => {
                if m.stripped {
                    output::note(format!("maps: {pid} has no symbol table (stripped): maps are named by address"));
                }
                self.collector = Some(m);
            }
            Err(e) => output::warn(format!("{e:#}; map tracking is off")),
        }
    }

    fn collect(&mut self, probes: &mut Probes, target: &Target, _counters: &super::Counters, now_ns: u64) -> Result<Collected> {
        let Some(maps) = self.collector.as_mut() else { return Ok(Collected::Nothing) };
        let samples = maps.collect(now_ns, target.alive)?;
        maps.duty_cycle(probes);
        // A map's first count is real: it may predate the attach.
        Ok(Collected::Growth { kind: Kind::Map, judging: Judging::Objects, samples })
    }

    /// Maps not tracked (the kernel's table full) are lost events.
    fn tally(&self, counters: &Counters) -> Tally {
        Tally {
            events: self.collector.as_ref().map(|_| (Kind::Map, counters.sum(counter::EVENTS))).into_iter().collect(),
            lost: counters.sum(counter::LOST),
            ..Tally::default()
        }
    }
}

/// A probe the tracker wants: program name, function, file offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapProbe {
    pub program: &'static str,
    pub function: String,
    pub file_offset: u64,
}

/// Where things are in the target's Go version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    /// Offset and mask of the seed in the 8 bytes read at `seed_offset`.
    seed_offset: u64,
    seed_mask: u64,
    /// sync.Map (<= 1.23): its size, where the `read` pointer is (1.19: the
    /// data word of an `atomic.Value`), where `dirty` is. `None` on 1.24+.
    sync_map: Option<SyncMapLayout>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SyncMapLayout {
    size: u64,
    read_at: usize,
    dirty_at: usize,
}

impl Layout {
    /// The count and seed (masked) in a map header's first 16 bytes.
    fn header(&self, b: &[u8]) -> Option<(u64, u64)> {
        let count = u64_at(b, 0)?;
        let seed = u64_at(b, self.seed_offset as usize)? & self.seed_mask;
        // No real map holds 2^40 entries: the memory is no map header.
        (count < 1 << 40).then_some((count, seed))
    }

    /// Offsets checked against the DWARF of Go 1.19, 1.22, 1.24, 1.25 and 1.27
    /// builds: `hmap.hash0` is a u32 at 12 (the upper half of the u64 at 8);
    /// `maps.Map.seed` a u64 at 8. `sync.Map`: 1.19 `{mu; read atomic.Value;
    /// dirty; misses}` (40 bytes), 1.20-1.23 `read` is an `atomic.Pointer`
    /// (32 bytes).
    fn for_version(version: (u32, u32), swiss: bool) -> Layout {
        let minor = if version.0 > 1 { u32::MAX } else { version.1 };
        let sync_map = match minor {
            ..=19 => Some(SyncMapLayout { size: 40, read_at: 16, dirty_at: 24 }),
            20..=23 => Some(SyncMapLayout { size: 32, read_at: 8, dirty_at: 16 }),
            _ => None,
        };
        if swiss {
            Layout { seed_offset: 8, seed_mask: u64::MAX, sync_map }
        } else {
            Layout { seed_offset: 8, seed_mask: 0xffff_ffff_0000_0000, sync_map }
        }
    }
}

/// What a package-level variable of a Go program holds, for
/// [`variable_count`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapVariable {
    /// `var m map[K]V`: a pointer to the map header.
    Map,
    /// `var m sync.Map`.
    SyncMap,
}

/// The entries in the map held by the variable at `addr` (runtime address)
/// of a Go `version` program whose maps are Swiss tables or not (`swiss`),
/// read through `mem` as the tracker reads them: the map header's count; a
/// `sync.Map`'s dirty map (its read-only map while nothing is dirty) up to
/// Go 1.23, its trie's entries from 1.24. For replaying core files.
pub fn variable_count(mem: &TargetMemory, version: (u32, u32), swiss: bool, kind: MapVariable, addr: u64) -> Option<u64> {
    let layout = Layout::for_version(version, swiss);
    let header_count = |p: u64| layout.header(&mem.read_region(p, 16)?).map(|h| h.0);
    match (kind, layout.sync_map) {
        (MapVariable::Map, _) => header_count(u64_at(&mem.read_region(addr, 8)?, 0)?),
        (MapVariable::SyncMap, Some(s)) => {
            let v = mem.read_region(addr, s.size as usize)?;
            match u64_at(&v, s.dirty_at)? {
                0 => header_count(u64_at(&mem.read_region(u64_at(&v, s.read_at)?, 8)?, 0)?),
                dirty => header_count(dirty),
            }
        }
        (MapVariable::SyncMap, None) => {
            let v = mem.read_region(addr, TRIE_SIZE as usize)?;
            let mut budget = TRIE_NODE_BUDGET;
            trie_count(mem, u64_at(&v, TRIE_ROOT_AT)?, &mut budget)
        }
    }
}

/// Whether the Go executable's maps are Swiss tables (Go 1.24+'s
/// `internal/runtime/maps`), as the tracker decides it.
pub fn uses_swiss_maps(bin: &GoBinary) -> Result<bool> {
    Ok(plan_probes(bin)?.0)
}

/// The probes the map tracker would attach to the Go executable at `path`
/// (for tests and diagnostics).
pub fn plan(path: &Path) -> Result<Vec<MapProbe>> {
    Ok(plan_probes(&GoBinary::read(path)?)?.1)
}

/// The growth and clear functions of the target and where to probe them.
fn plan_probes(bin: &GoBinary) -> Result<(bool, Vec<MapProbe>)> {
    let mut probes = Vec::new();
    let mut add = |program: &'static str, function: &str| -> bool {
        let Some((entry, end)) = bin.function(function) else { return false };
        let Some(code) = bin.code(entry, end.saturating_sub(entry).min(64) as usize) else { return false };
        let at = cheap_probe_address(code, entry);
        let Some(file_offset) = bin.file_offset(at) else { return false };
        probes.push(MapProbe { program, function: function.to_string(), file_offset });
        true
    };
    let swiss = if add("map_grow_rbx", "runtime.hashGrow") {
        false
    } else {
        // Go 1.24+: a table at its largest (1024 slots) splits in two,
        // once per ~500-900 inserts into a big map; smaller tables `grow`
        // (rehash -> grow), which only maps under ~1000 entries do: not
        // probed, those maps are no leak yet and the probe would trap
        // several times for every new map.
        if !add("map_grow_rcx", "internal/runtime/maps.(*table).split") {
            anyhow::bail!("no map growth function found (runtime.hashGrow or internal/runtime/maps.(*table).split)");
        }
        true
    };
    add("map_clear", "runtime.mapclear");
    // Go 1.24+ sync.Map (a HashTrieMap of any -> any): the trie grows a
    // level when a new key collides with an entry (last in the list: it is
    // the probe that is only on part of the time).
    add("map_trie_expand", TRIE_EXPAND);
    Ok((swiss, probes))
}

/// The growth function of the trie behind Go 1.24+'s `sync.Map`.
const TRIE_EXPAND: &str = "internal/sync.(*HashTrieMap[go.shape.interface {},go.shape.interface {}]).expand";
/// Size of a Go 1.24+ `sync.Map` (a `HashTrieMap` at offset 0; its `root`
/// pointer at 16, `seed` at 40).
const TRIE_SIZE: u64 = 48;
const TRIE_ROOT_AT: usize = 16;
/// Trie nodes read per interval, over all tries (a bound on the work done
/// for tries with millions of entries; beyond it a trie is not counted).
const TRIE_NODE_BUDGET: usize = 2_000_000;
/// Unnamed maps with fewer entries are tracked but not reported (small
/// per-request maps; no leak is that small). Named maps are always reported.
const MIN_UNNAMED_ENTRIES: u64 = 256;
/// An unnamed map whose count has not changed and that has not grown for
/// this long is not reported (most are dead maps whose memory the GC has
/// not reused yet: nothing says they are unreachable, but they cannot leak).
const UNNAMED_IDLE_NS: u64 = 30_000_000_000;
/// ... and after this long its kernel entry is removed, freeing the slot
/// (a growth registers it again).
const UNNAMED_FORGET_NS: u64 = 600_000_000_000;

/// The trie's `expand` fires for about a third of new keys (doubling the
/// cost of a `sync.Map` store): it is on for the first intervals (to find
/// the tries and their inserting stacks) and then for one interval in this
/// many; the tries found are counted from memory every interval.
const TRIE_PROBE_PERIOD: u64 = 20;
const TRIE_PROBE_FIRST: u64 = 3;

/// Entries of the trie whose root indirect node is at `root`, walked level
/// by level with batched reads: an `indirect` node has its 16 children at
/// +24; an `entry` starts with `isEntry` (1) and an `overflow` chain at +8.
/// `None` when the walk would exceed `budget` nodes.
fn trie_count(mem: &TargetMemory, root: u64, budget: &mut usize) -> Option<u64> {
    let mut count = 0u64;
    let mut level = if root == 0 { Vec::new() } else { vec![root] };
    while !level.is_empty() {
        let arrays = mem.read_regions(&level.iter().map(|n| (n + 24, 128)).collect::<Vec<_>>());
        let children: Vec<u64> =
            arrays.iter().flatten().flat_map(|a| (0..16).filter_map(|i| u64_at(a, 8 * i))).filter(|p| *p != 0).collect();
        *budget = budget.checked_sub(children.len())?;
        let heads = mem.read_regions(&children.iter().map(|c| (*c, 16)).collect::<Vec<_>>());
        let mut next = Vec::new();
        for (c, h) in children.iter().zip(heads) {
            let Some(h) = h else { continue };
            if h[0] == 0 {
                next.push(*c);
                continue;
            }
            count += 1;
            // Entries whose full hashes collide hang off `overflow` (rare).
            let mut ov = u64_at(&h, 8).unwrap_or(0);
            while ov != 0 && *budget > 0 {
                *budget -= 1;
                count += 1;
                ov = mem.read_region(ov + 8, 8).and_then(|b| u64_at(&b, 0)).unwrap_or(0);
            }
        }
        level = next;
    }
    Some(count)
}

/// The first emulated instruction of a Go prologue, before the stack
/// pointer moves: `PUSHQ BP` (Go 1.21+: `CMPQ SP, 16(R14); JBE; PUSHQ BP`),
/// else the `JBE` after the stack check (Go 1.19: `CMPQ; JBE; SUBQ $n, SP`;
/// it runs again after a stack growth, harmless here), else the entry.
/// `[sp]` holds the return address at all three, and the argument
/// registers are untouched.
fn cheap_probe_address(code: &[u8], entry: u64) -> u64 {
    crate::binary::x86::go_cheap_entry(code, entry).unwrap_or(entry)
}

/// The map tracker's own state about one kernel entry.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    /// The kernel entry's `first_ns` when we last accepted it.
    first_ns: u64,
    /// The seed we accept for the map at this address.
    seed: u64,
    /// Clears seen when the seed was last accepted.
    clears: u32,
}

/// What a named series follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NamedKind {
    /// A `map` variable: a pointer to the header.
    Map,
    /// A `sync.Map` variable (Go <= 1.23): its `dirty` map, or its
    /// read-only map while `dirty` is nil.
    SyncMap,
    /// A `sync.Map` variable (Go 1.24+): the trie is the variable itself.
    Trie,
}

struct Named {
    kind: NamedKind,
    /// The type descriptor of the map it held last (0: not seen yet).
    map_type: u64,
    stack: StackKey,
    since_ns: u64,
    grows: u64,
    clears: u64,
}

/// Reads the map tracker's kernel table and the target's map headers.
pub struct MapCollector {
    pid: u32,
    mem: TargetMemory,
    maps: BpfHashMap<MapData, u64, MapInfo>,
    layout: Layout,
    /// Load bias of a position-independent executable (0 otherwise).
    bias: u64,
    /// Variables that may hold a map (8 bytes) or a sync.Map.
    candidates: Vec<DataSymbol>,
    tracked: HashMap<u64, Tracked>,
    named: HashMap<String, Named>,
    /// Addresses a named series claimed at the last collection.
    claimed: HashSet<u64>,
    /// When each unnamed map was first seen (ktime), kept across its
    /// re-registrations.
    since: HashMap<u64, u64>,
    /// Each unnamed map's last count and when it last changed (ktime).
    changed: HashMap<u64, (u64, u64)>,
    /// The probes to attach (always on).
    pub probes: Vec<MapProbe>,
    /// The 1.24+ `sync.Map` probe, on part of the time (see [`MapCollector::duty_cycle`]).
    trie_probe: Option<MapProbe>,
    trie_link: Option<UProbeLinkId>,
    intervals: u64,
    /// The executable the probes go into.
    pub exe: PathBuf,
    /// Maps dropped because their address no longer held them.
    pub dropped: u64,
    /// True when the binary has no symbol table (maps named by address).
    pub stripped: bool,
    pub go_version: (u32, u32),
    /// Swiss tables (Go 1.24+) or classic maps.
    swiss: bool,
    entry_bytes: entry_bytes::EntryBytes,
}

impl MapCollector {
    /// Reads the target's executable, plans the probes and configures the
    /// kernel side. An error when the target is not a Go program.
    pub fn new(ebpf: &mut Ebpf, pid: u32) -> Result<Self> {
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let real = std::fs::read_link(&exe).unwrap_or_else(|_| exe.clone());
        let bin = GoBinary::read(&exe).with_context(|| format!("maps: {}", real.display()))?;
        let (swiss, mut probes) = plan_probes(&bin)?;
        let trie_probe = probes.pop_if(|p| p.program == "map_trie_expand");
        let layout = Layout::for_version((bin.version.major, bin.version.minor), swiss);
        let mut config: Array<_, u64> =
            Array::try_from(ebpf.map_mut("MAP_SEED").ok_or_else(|| anyhow!("MAP_SEED map missing"))?)?;
        config.set(seed::OFFSET, layout.seed_offset, 0)?;
        config.set(seed::MASK, layout.seed_mask, 0)?;
        let maps = BpfHashMap::try_from(ebpf.take_map("MAPS").ok_or_else(|| anyhow!("MAPS map missing"))?)?;
        let sync_size = layout.sync_map.map_or(TRIE_SIZE, |s| s.size);
        let candidates =
            bin.data.iter().filter(|d| d.size == 8 || d.size == sync_size).cloned().collect::<Vec<_>>();
        Ok(Self {
            pid,
            mem: TargetMemory::new(pid),
            maps,
            layout,
            bias: elf::exe_load_bias(pid, &bin.symbols.segments).unwrap_or(0),
            candidates,
            tracked: HashMap::new(),
            named: HashMap::new(),
            claimed: HashSet::new(),
            since: HashMap::new(),
            changed: HashMap::new(),
            probes,
            trie_probe,
            trie_link: None,
            intervals: 0,
            exe,
            dropped: 0,
            stripped: !bin.has_symtab,
            go_version: (bin.version.major, bin.version.minor),
            swiss,
            entry_bytes: Default::default(),
        })
    }

    /// Turns the `sync.Map` probe on or off for the coming interval: on for
    /// the first [`TRIE_PROBE_FIRST`], then one in [`TRIE_PROBE_PERIOD`].
    /// A probe that cannot be attached is a warning, once.
    pub fn duty_cycle(&mut self, probes: &mut Probes) {
        let Some(p) = self.trie_probe.clone() else { return };
        let on = self.intervals < TRIE_PROBE_FIRST || self.intervals.is_multiple_of(TRIE_PROBE_PERIOD);
        self.intervals += 1;
        match (on, self.trie_link.take()) {
            (true, None) => match probes.attach_uprobe_at(p.program, &self.exe, p.file_offset, self.pid) {
                Ok(link) => self.trie_link = Some(link),
                Err(e) => {
                    output::warn(format!("{e:#}: Go 1.24+ sync.Maps are not tracked"));
                    self.trie_probe = None;
                }
            },
            (true, Some(link)) => self.trie_link = Some(link),
            (false, Some(link)) => {
                let _ = probes.detach_uprobe(p.program, link);
            }
            (false, None) => {}
        }
    }

    /// Reads the seed (masked) and count from a header's first 16 bytes.
    fn header(&self, b: &[u8]) -> Option<(u64, u64)> {
        self.layout.header(b)
    }

    /// One sample per named map and per unnamed tracked map.
    pub fn collect(&mut self, now_ns: u64, target_alive: bool) -> Result<Vec<StackSample>> {
        let entries: Vec<(u64, MapInfo)> = self.maps.iter().filter_map(|r| r.ok()).collect();
        let headers = self.mem.read_regions(
            &entries.iter().map(|(a, i)| (*a, if i.kind == KIND_TRIE { TRIE_SIZE as usize } else { 16 })).collect::<Vec<_>>(),
        );
        let mut budget = TRIE_NODE_BUDGET;
        // Validate every kernel entry against the header in memory.
        let mut valid: HashMap<u64, (u64, MapInfo)> = HashMap::new();
        for ((addr, info), hdr) in entries.iter().zip(headers) {
            self.tracked.entry(*addr).or_insert(Tracked { first_ns: 0, seed: 0, clears: 0 });
            let parsed = if info.kind == KIND_TRIE {
                // Seed first: the walk is only worth it for a valid trie.
                hdr.as_deref().and_then(|b| Some((u64_at(b, TRIE_ROOT_AT)?, u64_at(b, TRIE_SEED_OFFSET as usize)?)))
            } else {
                hdr.as_deref().and_then(|b| self.header(b))
            };
            let Some((count, seed)) = parsed else {
                if target_alive {
                    self.drop_map(*addr, info);
                }
                continue;
            };
            let t = self.tracked.get_mut(addr).expect("inserted above");
            if !still_the_map(t, info, seed) {
                if target_alive {
                    self.drop_map(*addr, info);
                }
                continue;
            }
            let count = if info.kind == KIND_TRIE {
                // `count` is the root pointer here.
                match trie_count(&self.mem, count, &mut budget) {
                    Some(n) => n,
                    None => continue,
                }
            } else {
                count
            };
            valid.insert(*addr, (count, *info));
        }

        // Names: read every candidate variable; follow the ones that hold
        // (or held) a tracked map.
        let vars = self.mem.read_regions(
            &self.candidates.iter().map(|d| (d.addr + self.bias, d.size as usize)).collect::<Vec<_>>(),
        );
        // (name, kind, map address, sync.Map's read pointer)
        let mut found: Vec<(String, NamedKind, u64, u64)> = Vec::new();
        let mut read_only_ptrs = Vec::new();
        let mut trie_counts: HashMap<u64, u64> = HashMap::new();
        for (d, v) in self.candidates.iter().zip(&vars) {
            let Some(v) = v else { continue };
            let known = self.named.get(&d.name).map(|n| n.kind);
            if d.size == 8 {
                let p = u64_at(v, 0).unwrap_or(0);
                if known == Some(NamedKind::Map) || (known.is_none() && valid.contains_key(&p)) {
                    found.push((d.name.clone(), NamedKind::Map, p, 0));
                }
            } else if self.layout.sync_map.is_none() {
                // Go 1.24+: the sync.Map is the trie.
                let ht = d.addr + self.bias;
                if known == Some(NamedKind::Trie) || (known.is_none() && valid.contains_key(&ht)) {
                    let n = if let Some((n, _)) = valid.get(&ht) {
                        Some(*n)
                    } else {
                        trie_count(&self.mem, u64_at(v, TRIE_ROOT_AT).unwrap_or(0), &mut budget)
                    };
                    if let Some(n) = n {
                        trie_counts.insert(ht, n);
                        found.push((d.name.clone(), NamedKind::Trie, ht, 0));
                    }
                }
            } else if let Some(s) = self.layout.sync_map {
                let dirty = u64_at(v, s.dirty_at).unwrap_or(0);
                let read = u64_at(v, s.read_at).unwrap_or(0);
                if known == Some(NamedKind::SyncMap) || (known.is_none() && valid.contains_key(&dirty)) {
                    found.push((d.name.clone(), NamedKind::SyncMap, dirty, read));
                    if read != 0 {
                        read_only_ptrs.push(read);
                    }
                }
            }
        }
        // sync.Map: `read` points to `readOnly{m, amended}`: its map.
        let read_only: HashMap<u64, u64> = read_only_ptrs
            .iter()
            .zip(self.mem.read_regions(&read_only_ptrs.iter().map(|p| (*p, 8)).collect::<Vec<_>>()))
            .filter_map(|(p, b)| Some((*p, u64_at(b.as_deref()?, 0)?)))
            .collect();
        // Headers of named maps we have not read yet (not tracked, or
        // dropped: the variable still says where the map is).
        let mut want: Vec<u64> = Vec::new();
        for (_, kind, a, r) in &found {
            if *kind == NamedKind::Trie {
                continue;
            }
            want.push(*a);
            if *kind == NamedKind::SyncMap {
                want.extend(read_only.get(r));
            }
        }
        want.retain(|a| *a != 0 && !valid.contains_key(a));
        want.sort_unstable();
        want.dedup();
        let extra: HashMap<u64, u64> = want
            .iter()
            .zip(self.mem.read_regions(&want.iter().map(|a| (*a, 16)).collect::<Vec<_>>()))
            .filter_map(|(a, b)| Some((*a, self.header(b.as_deref()?)?.0)))
            .collect();
        let count_of = |a: u64| {
            valid.get(&a).map(|(c, _)| *c).or_else(|| extra.get(&a).copied()).or_else(|| trie_counts.get(&a).copied())
        };

        let mut out = Vec::new();
        let mut claimed = HashSet::new();
        for (name, kind, a, r) in found {
            // The map whose count and stack this name shows now.
            let (addr, also) = match kind {
                NamedKind::Map | NamedKind::Trie => (a, None),
                NamedKind::SyncMap => {
                    let ro = read_only.get(&r).copied().unwrap_or(0);
                    if a != 0 { (a, Some(ro)) } else { (ro, None) }
                }
            };
            claimed.insert(addr);
            claimed.extend(also.filter(|x| *x != 0));
            let live = if addr == 0 { Some(0) } else { count_of(addr) };
            let Some(live) = live else { continue };
            let entry = valid.get(&addr).map(|(_, i)| *i);
            let n = self.named.entry(name.clone()).or_insert_with(|| Named {
                kind,
                map_type: 0,
                stack: entry.map_or(StackKey { stack_id: -1, caller: 0 }, |i| i.stack),
                since_ns: entry.map_or(now_ns, |i| i.first_ns),
                grows: 0,
                clears: 0,
            });
            if let Some(i) = entry {
                n.stack = i.stack;
                n.map_type = i.map_type;
            }
            let bytes_per_object = if kind == NamedKind::Trie {
                Some(entry_bytes::TRIE_ENTRY_BYTES)
            } else {
                self.entry_bytes.of(&self.mem, self.swiss, n.map_type)
            };
            // Growths and clears of every map this name has held.
            let (grows, clears) = claimed_events(&valid, addr, also);
            n.grows = n.grows.max(grows);
            n.clears = n.clears.max(clears);
            out.push(StackSample {
                stack: SampleStack::Kernel(n.stack),
                live,
                created: n.grows,
                ended: n.clears,
                oldest_age_s: Some(now_ns.saturating_sub(n.since_ns) as f64 / 1e9),
                peer: None,
                thread_name: None,
                map: Some(name),
                bytes_per_object,
                ..Default::default()
            });
        }
        // A map a name held before but not now (the variable was
        // reassigned, sync.Map replaced its dirty map): its series is the
        // name's; forget it.
        if target_alive {
            for a in self.claimed.difference(&claimed).copied().collect::<Vec<_>>() {
                if let Some((_, info)) = valid.remove(&a) {
                    self.forget(a, &info);
                }
            }
        }
        self.claimed = claimed;

        let mut idle = Vec::new();
        for (addr, (count, info)) in &valid {
            if self.claimed.contains(addr) {
                continue;
            }
            let changed = self.changed.entry(*addr).or_insert((*count, now_ns));
            if changed.0 != *count {
                *changed = (*count, now_ns);
            }
            let quiet_ns = now_ns.saturating_sub(changed.1.max(info.last_ns));
            // Many short-lived maps (per-request maps) fill the kernel table
            // with dead ones: when it is three quarters full, small quiet
            // ones go first.
            let crowded = entries.len() as u32 > MAX_TRACKED_MAPS / 4 * 3;
            let small_and_quiet = *count < MIN_UNNAMED_ENTRIES && quiet_ns > 5_000_000_000;
            if quiet_ns > UNNAMED_FORGET_NS || (crowded && (small_and_quiet || quiet_ns > UNNAMED_IDLE_NS)) {
                idle.push((*addr, *info));
            }
            if *count < MIN_UNNAMED_ENTRIES || quiet_ns > UNNAMED_IDLE_NS {
                continue;
            }
            let since = *self.since.entry(*addr).or_insert(info.first_ns);
            let bytes_per_object = if info.kind == KIND_TRIE {
                Some(entry_bytes::TRIE_ENTRY_BYTES)
            } else {
                self.entry_bytes.of(&self.mem, self.swiss, info.map_type)
            };
            out.push(StackSample {
                stack: SampleStack::Kernel(info.stack),
                live: *count,
                created: u64::from(info.grows),
                ended: u64::from(info.clears),
                oldest_age_s: Some(now_ns.saturating_sub(since) as f64 / 1e9),
                peer: None,
                thread_name: None,
                map: Some(format!("{addr:#x}")),
                bytes_per_object,
                ..Default::default()
            });
        }
        if target_alive {
            for (addr, info) in idle {
                self.forget(addr, &info);
            }
        }
        Ok(out)
    }

    /// The address no longer holds the map: stop tracking it.
    fn drop_map(&mut self, addr: u64, seen: &MapInfo) {
        if self.forget(addr, seen) {
            self.dropped += 1;
        }
    }

    /// Removes a kernel entry if it is still the one we saw (a growth may
    /// have re-registered the address meanwhile); true when removed.
    fn forget(&mut self, addr: u64, seen: &MapInfo) -> bool {
        match self.maps.get(&addr, 0) {
            Ok(now) if now.first_ns == seen.first_ns => {}
            _ => return false,
        }
        self.tracked.remove(&addr);
        self.since.remove(&addr);
        self.changed.remove(&addr);
        self.maps.remove(&addr).is_ok()
    }
}

/// Whether the address still holds the map of kernel entry `info`, given
/// the seed now in memory; updates what we accept for it. A growth that
/// (re-)registered the address brings the seed the kernel read then; a
/// `runtime.mapclear` since we last looked allows one new seed (a clear
/// reseeds); any other change of seed means the memory is no longer this
/// map (freed and reused by the GC, a stack map that moved or died).
fn still_the_map(t: &mut Tracked, info: &MapInfo, seed_now: u64) -> bool {
    if t.first_ns != info.first_ns {
        *t = Tracked { first_ns: info.first_ns, seed: info.seed, clears: info.clears };
    }
    if seed_now == t.seed {
        return true;
    }
    if info.clears != t.clears {
        t.seed = seed_now;
        t.clears = info.clears;
        return true;
    }
    false
}

/// Growths and clears of the kernel entries at `addr` (and `also`).
fn claimed_events(valid: &HashMap<u64, (u64, MapInfo)>, addr: u64, also: Option<u64>) -> (u64, u64) {
    [Some(addr), also]
        .into_iter()
        .flatten()
        .filter_map(|a| valid.get(&a))
        .fold((0, 0), |(g, c), (_, i)| (g + u64::from(i.grows), c + u64::from(i.clears)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_address_follows_the_prologue() {
        // Go 1.22: CMPQ SP, 16(R14); JBE +x; PUSHQ BP; MOVQ SP, BP
        let go122 = [0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0xbc, 0x01, 0x00, 0x00, 0x55, 0x48, 0x89, 0xe5];
        assert_eq!(cheap_probe_address(&go122, 0x1000), 0x100a);
        // Go 1.19: CMPQ SP, 16(R14); JBE +x; SUBQ $0x38, SP; MOVQ BP, 0x30(SP)
        let go119 = [0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0xdc, 0x01, 0x00, 0x00, 0x48, 0x83, 0xec, 0x38, 0x48, 0x89, 0x6c, 0x24, 0x30];
        assert_eq!(cheap_probe_address(&go119, 0x1000), 0x1004);
        // No stack check at all: the entry.
        assert_eq!(cheap_probe_address(&[0x48, 0x83, 0xec, 0x38], 0x1000), 0x1000);
    }

    #[test]
    fn a_changed_seed_drops_the_map_unless_it_was_cleared() {
        let info = MapInfo { seed: 7, first_ns: 100, ..Default::default() };
        let mut t = Tracked { first_ns: 0, seed: 0, clears: 0 };
        assert!(still_the_map(&mut t, &info, 7), "registered with seed 7");
        assert!(still_the_map(&mut t, &info, 7));
        // The GC reused the memory: another seed, no clear.
        assert!(!still_the_map(&mut t.clone(), &info, 8));
        // runtime.mapclear ran: the new seed is accepted once...
        let cleared = MapInfo { clears: 1, ..info };
        assert!(still_the_map(&mut t, &cleared, 9));
        assert!(still_the_map(&mut t, &cleared, 9));
        // ...but not a second change without another clear.
        assert!(!still_the_map(&mut t, &cleared, 10));
        // A growth re-registered the address (a new map there): its seed.
        let again = MapInfo { seed: 11, first_ns: 200, ..info };
        assert!(still_the_map(&mut t, &again, 11));
        assert!(!still_the_map(&mut t, &again, 12));
    }

    #[test]
    fn layouts_by_version() {
        assert_eq!(Layout::for_version((1, 19), false).sync_map.unwrap().dirty_at, 24);
        assert_eq!(Layout::for_version((1, 22), false).sync_map.unwrap().dirty_at, 16);
        assert_eq!(Layout::for_version((1, 22), false).seed_mask, 0xffff_ffff_0000_0000);
        assert!(Layout::for_version((1, 24), true).sync_map.is_none());
        assert_eq!(Layout::for_version((1, 27), true).seed_mask, u64::MAX);
    }
}
