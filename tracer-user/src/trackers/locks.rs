//! Lock-contention tracker, user side: tells the kernel side where libc's
//! lock functions keep their return addresses (`sites`), attaches the Go
//! semaphore probes (`golang`), and each interval reads the per-lock and
//! per-(lock, stack) totals into one [`LockSample`] per lock, named by the
//! global it lives in when there is one.
//!
//! Locks do not go through the growth engine: a lock's cost is the time its
//! waiters lost, judged by `judge::contention`.

pub mod golang;
pub mod sites;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuHashMap};
use tracer_common::{
    locks::{counter, kind, LockSite, LockStack, LockStats, WaitTotals, WalkedFrames, CONFIG_IGNORE_FOREIGN, HIST_BUCKETS},
};

use super::{Collected, Counters, Tally, Target, Tracker, TrackerSpec};
use crate::{
    stacks::{walked_stack, SampleStack},
    binary::elf::{Globals, Segments},
    cli::TraceOptions,
    output,
    probes::{Probes, Tracepoints},
    procfs::{self, MemoryMap},
    report::Kind,
};

/// The lock tracker in the registry (asked for by name: it answers another
/// question than "what leaks").
pub const SPEC: TrackerSpec = TrackerSpec { name: "locks", default: false, configure, new };

/// Every table minimal when the tracker does not run (the pending-wait
/// tables are LRU maps, preallocated: 2 MiB each).
fn configure(load: &mut crate::probes::LoadSettings, _opts: &TraceOptions, active: bool) {
    // Go holders' stacks by bpf_get_stackid.
    load.stack_ids |= active;
    if !active {
        load.minimal(&["FUTEX_PENDING", "GO_PENDING", "GO_WAITED_SEMAS", "LOCKS", "LOCK_WAITERS", "LOCK_HOLDERS", "LOCK_FRAMES", "LOCK_SYSCALL_SITES", "LOCK_CALL_SITES"]);
    }
}

fn new(probes: &mut Probes, _opts: &TraceOptions, target: &Target) -> Result<Box<dyn Tracker>> {
    Ok(Box::new(LockCollector::new(probes, target.pid)?))
}

/// The lock tracker's futex tracepoints (its Go uprobes are attached per
/// executable).
const TRACEPOINTS: Tracepoints = &[
    ("lock_futex_enter", "syscalls", "sys_enter_futex"),
    ("lock_futex_exit", "syscalls", "sys_exit_futex"),
];

/// Waiter and holder stacks kept per lock (the costliest).
const LOCK_STACKS_KEPT: usize = 16;

impl Tracker for LockCollector {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn tracepoints(&self) -> Tracepoints {
        TRACEPOINTS
    }

    /// libc's lock sites, and for a Go program its semaphore probes (once
    /// per libc / executable).
    fn on_mappings(&mut self, probes: &mut Probes, target: &Target, mappings: &MemoryMap) {
        if let Err(e) = self.load_libc_sites(mappings) {
            output::warn(format!("cannot analyse libc's lock functions ({e:#}); C lock stacks will miss frames"));
        }
        let Some((exe, go_probes)) = self.go_setup(mappings) else { return };
        use golang::Role;
        for p in &go_probes {
            let entry_prog = match p.role {
                Role::AcquireMutex => "lock_go_acquire_mutex",
                Role::AcquireRead => "lock_go_acquire_read",
                Role::AcquireWrite => "lock_go_acquire_write",
                Role::Release => "lock_go_release",
            };
            let mut r = probes.attach_uprobe_at(entry_prog, &exe, p.entry, target.pid).map(|_| ());
            for &ret in &p.rets {
                r = r.and_then(|_| probes.attach_uprobe_at("lock_go_acquired", &exe, ret, target.pid).map(|_| ()));
            }
            if let Err(e) = r {
                output::warn(format!("{e:#}; Go {} waits are not tracked", p.name));
            }
        }
    }

    /// Locks do not go through the growth engine: they are judged by the
    /// time their waiters lost.
    fn collect(&mut self, _probes: &mut Probes, target: &Target, _counters: &super::Counters, _now_ns: u64) -> Result<Collected> {
        Ok(Collected::Contention(self.collect_locks(&target.memory, LOCK_STACKS_KEPT)))
    }

    fn tally(&self, counters: &Counters) -> Tally {
        Tally {
            events: vec![(Kind::Lock, counters.sum(counter::WAITS))],
            lost: counters.sum(counter::LOST),
            ..Tally::default()
        }
    }
}

/// Everything known about one lock at one instant (totals since attach).
#[derive(Clone, Debug)]
pub struct LockSample {
    /// Address of the lock (the mutex, not its semaphore, for Go).
    pub addr: u64,
    /// "mutex", "rwlock", "futex", "go-mutex", "go-rwmutex".
    pub kind: &'static str,
    pub contentions: u64,
    pub wait_ns: u64,
    pub max_wait_ns: u64,
    /// Waits per log2 bucket (`hist[i]`: [2^i, 2^(i+1)) ns).
    pub hist: [u64; HIST_BUCKETS],
    /// The global the lock lives in (`hot_lock`, `main.pool+0x8`), if any.
    pub symbol: Option<String>,
    /// Stack of the first contended wait seen.
    pub first: SampleStack,
    /// Waiter stacks: (stack, waits, wait ns), most wait first.
    pub waiters: Vec<(SampleStack, u64, u64)>,
    /// Holder stacks (the unlock that woke waiters): (stack, wakes), most first.
    pub holders: Vec<(SampleStack, u64)>,
}

/// Reads the lock tracker's maps for one target and sets it up per image.
pub struct LockCollector {
    pid: u32,
    locks: PerCpuHashMap<MapData, u64, LockStats>,
    waiters: PerCpuHashMap<MapData, LockStack, WaitTotals>,
    holders: PerCpuHashMap<MapData, LockStack, WaitTotals>,
    frames: BpfHashMap<MapData, u64, WalkedFrames>,
    syscall_sites: BpfHashMap<MapData, u64, LockSite>,
    call_sites: BpfHashMap<MapData, u64, LockSite>,
    config: Array<MapData, u64>,
    /// Holds `lock_futex_enter_java` for `lock_futex_enter`'s tail call (the
    /// kernel empties a program array when its last user fd closes).
    _java: aya::maps::ProgramArray<MapData>,
    /// The libc whose sites are loaded.
    libc: Option<PathBuf>,
    /// The executable set up (Go probes or not).
    exe: Option<PathBuf>,
    /// sync functions of a Go executable (runtime address ranges), to tell
    /// which lock a semaphore belongs to from who waits on it.
    go_funcs: Vec<(u64, u64, String)>,
    namer: Globals,
}

impl LockCollector {
    /// Takes the tracker's maps out of the loaded object.
    pub fn new(probes: &mut Probes, pid: u32) -> Result<Self> {
        Ok(Self {
            pid,
            locks: probes.take_map("LOCKS")?,
            waiters: probes.take_map("LOCK_WAITERS")?,
            holders: probes.take_map("LOCK_HOLDERS")?,
            frames: probes.take_map("LOCK_FRAMES")?,
            syscall_sites: probes.take_map("LOCK_SYSCALL_SITES")?,
            call_sites: probes.take_map("LOCK_CALL_SITES")?,
            config: probes.take_map("LOCK_CONFIG")?,
            _java: java_program(probes)?,
            libc: None,
            exe: None,
            go_funcs: Vec::new(),
            namer: Globals::default(),
        })
    }

    /// Loads libc's lock sites (once per libc file). Returns false when the
    /// target maps no libc.
    pub fn load_libc_sites(&mut self, memory: &MemoryMap) -> Result<bool> {
        let Some(m) = memory.mappings.iter().find(|m| m.executable && crate::stacks::syscall_sites::is_libc(&m.path)) else {
            return Ok(false);
        };
        let path = procfs::object_path(self.pid, m);
        if self.libc.as_ref() == Some(&path) {
            return Ok(true);
        }
        self.libc = Some(path.clone());
        let data = std::fs::read(&path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        let file = object::File::parse(&*data).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let Some(bias) = Segments::of(&file).load_bias(m) else { return Ok(false) };
        let found = sites::lock_sites_in_elf(&data)?;
        for (ip, s) in &found.syscalls {
            self.syscall_sites.insert(ip.wrapping_add(bias), s, 0)?;
        }
        for (ip, s) in &found.calls {
            self.call_sites.insert(ip.wrapping_add(bias), s, 0)?;
        }
        Ok(true)
    }

    /// The executable's Go probes when it is a Go program not set up yet
    /// (`None`: nothing to do). Futex calls from outside libc are then the
    /// Go runtime's own and are ignored from now on.
    pub fn go_setup(&mut self, memory: &MemoryMap) -> Option<(PathBuf, Vec<golang::GoProbe>)> {
        let exe = procfs::exe_path(self.pid)?;
        if self.exe.as_ref() == Some(&exe) {
            return None;
        }
        self.exe = Some(exe.clone());
        let m = memory.mappings.iter().find(|m| m.path == exe)?;
        let path = procfs::object_path(self.pid, m);
        let data = std::fs::read(&path).ok()?;
        if !object::File::parse(&*data).is_ok_and(|f| crate::binary::golang::is_go(&f)) {
            return None;
        }
        let _ = self.config.set(CONFIG_IGNORE_FOREIGN, 1, 0);
        let probes = match golang::go_probes(&data) {
            Ok(p) if !p.is_empty() => p,
            Ok(_) => {
                output::warn(format!("{} has no sync.Mutex slow path: Go locks are not tracked", exe.display()));
                return None;
            }
            Err(e) => {
                output::warn(format!("{}: {e:#}: Go locks are not tracked", exe.display()));
                return None;
            }
        };
        self.go_funcs = go_sync_funcs(&data, memory, &exe);
        Some((path, probes))
    }

    /// One sample per contended lock. Go semaphores are folded into their
    /// mutex; the several futex words of one rwlock stay separate here and
    /// are merged by name in the report.
    pub fn collect_locks(&mut self, memory: &MemoryMap, max_stacks: usize) -> Vec<LockSample> {
        let mut out: HashMap<u64, LockSample> = HashMap::new();
        let mut sema_to_lock: HashMap<u64, u64> = HashMap::new();
        let entries: Vec<(u64, LockStats)> = self
            .locks
            .iter()
            .filter_map(|r| r.ok())
            .map(|(lock, per_cpu)| {
                let mut sum = per_cpu.iter().find(|s| s.kind != 0).copied().unwrap_or(per_cpu[0]);
                sum.contentions = per_cpu.iter().map(|s| s.contentions).sum();
                sum.wait_ns = per_cpu.iter().map(|s| s.wait_ns).sum();
                sum.max_wait_ns = per_cpu.iter().map(|s| s.max_wait_ns).max().unwrap_or(0);
                for i in 0..HIST_BUCKETS {
                    sum.hist[i] = per_cpu.iter().map(|s| s.hist[i]).sum();
                }
                (lock, sum)
            })
            .collect();
        for (word, s) in entries {
            if s.contentions == 0 {
                continue;
            }
            let (addr, kind) = match s.kind {
                kind::MUTEX => (word, "mutex"),
                kind::RWLOCK_READ | kind::RWLOCK_WRITE => (word, "rwlock"),
                kind::FUTEX => (word, "futex"),
                // A JVM thread's own Parker/ParkEvent: regrouped by Java wait
                // site in `judge::java_waits`.
                kind::JAVA => (word, "java"),
                k => {
                    let role = match k {
                        kind::GO_RWMUTEX_READ => golang::Role::AcquireRead,
                        kind::GO_RWMUTEX_WRITE => golang::Role::AcquireWrite,
                        _ => golang::Role::AcquireMutex,
                    };
                    let caller = self.go_func(s.first.stack.caller);
                    let (off, k) = golang::sema_offset(role, caller);
                    (word.wrapping_sub(off), if k == "mutex" { "go-mutex" } else { "go-rwmutex" })
                }
            };
            sema_to_lock.insert(word, addr);
            let first = self.sample_stack(&s.first);
            let e = out.entry(addr).or_insert_with(|| LockSample {
                addr,
                kind,
                contentions: 0,
                wait_ns: 0,
                max_wait_ns: 0,
                hist: [0; HIST_BUCKETS],
                symbol: None,
                first,
                waiters: Vec::new(),
                holders: Vec::new(),
            });
            e.contentions += s.contentions;
            e.wait_ns += s.wait_ns;
            e.max_wait_ns = e.max_wait_ns.max(s.max_wait_ns);
            for i in 0..HIST_BUCKETS {
                e.hist[i] += s.hist[i];
            }
        }
        let mut waiters: HashMap<(u64, SampleStack), (u64, u64)> = HashMap::new();
        for (key, per_cpu) in self.waiters.iter().filter_map(|r| r.ok()) {
            let Some(&addr) = sema_to_lock.get(&key.lock) else { continue };
            let e = waiters.entry((addr, self.sample_stack(&key))).or_default();
            e.0 += per_cpu.iter().map(|t| t.count).sum::<u64>();
            e.1 += per_cpu.iter().map(|t| t.wait_ns).sum::<u64>();
        }
        // Name the locks now: a holder's wake may be on another word of the
        // same lock (an rwlock's), found by the global's name.
        let mut by_name: HashMap<String, u64> = HashMap::new();
        for l in out.values_mut() {
            l.symbol = self.namer.name(self.pid, memory, l.addr, LOCK_OBJECT_MAX);
            if let Some(n) = &l.symbol {
                by_name.insert(n.clone(), l.addr);
            }
        }
        let mut holders: HashMap<(u64, SampleStack), u64> = HashMap::new();
        let rows: Vec<_> = self.holders.iter().filter_map(|r| r.ok()).collect();
        for (key, per_cpu) in rows {
            // A Go release's caller is a sync function (unlockSlow...); a
            // futex wake (also in a cgo program) has none.
            let go_caller = if key.walked == 0 { self.go_func(key.stack.caller) } else { "" };
            let mut addr = if go_caller.is_empty() {
                key.lock
            } else {
                key.lock.wrapping_sub(golang::sema_offset(golang::Role::Release, go_caller).0)
            };
            if !out.contains_key(&addr) {
                match self.namer.name(self.pid, memory, addr, LOCK_OBJECT_MAX).and_then(|n| by_name.get(&n)) {
                    Some(&a) => addr = a,
                    None => continue,
                }
            }
            *holders.entry((addr, self.sample_stack(&key))).or_default() += per_cpu.iter().map(|t| t.count).sum::<u64>();
        }
        for ((addr, stack), (n, ns)) in waiters {
            if let Some(l) = out.get_mut(&addr) {
                l.waiters.push((stack, n, ns));
            }
        }
        for ((addr, stack), n) in holders {
            if let Some(l) = out.get_mut(&addr) {
                l.holders.push((stack, n));
            }
        }
        let mut locks: Vec<LockSample> = out.into_values().collect();
        for l in &mut locks {
            l.waiters.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
            l.waiters.truncate(max_stacks);
            l.holders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            l.holders.truncate(max_stacks);
        }
        locks.sort_by(|a, b| b.wait_ns.cmp(&a.wait_ns).then(a.addr.cmp(&b.addr)));
        locks
    }

    /// A kernel key as a stack the resolver understands.
    fn sample_stack(&self, key: &LockStack) -> SampleStack {
        if key.walked == 0 {
            return SampleStack::Kernel(key.stack);
        }
        walked_stack(&self.frames, key.walked)
    }

    /// Name of the Go sync function containing `addr` ("" when none).
    fn go_func(&self, addr: u64) -> &str {
        let i = self.go_funcs.partition_point(|f| f.0 <= addr);
        match i.checked_sub(1).and_then(|i| self.go_funcs.get(i)) {
            Some((s, e, n)) if addr >= *s && addr < *e => n,
            _ => "",
        }
    }
}

/// The JVM futex program (`lock_futex_enter_java`), loaded and put where
/// `lock_futex_enter` tail-calls it.
fn java_program(probes: &mut Probes) -> Result<aya::maps::ProgramArray<MapData>> {
    let name = "lock_futex_enter_java";
    let mut slots: aya::maps::ProgramArray<MapData> = probes.take_map("LOCK_JAVA")?;
    let program: &mut aya::programs::TracePoint =
        probes.ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?.try_into()?;
    program.load().map_err(|e| crate::probes::load_error(&format!("{name}: {e:#}")))?;
    slots.set(0, program.fd()?, 0)?;
    Ok(slots)
}

/// Runtime address ranges of the executable's sync functions.
fn go_sync_funcs(data: &[u8], memory: &MemoryMap, exe: &Path) -> Vec<(u64, u64, String)> {
    let Ok(file) = object::File::parse(data) else { return Vec::new() };
    let bias = memory
        .mappings
        .iter()
        .find(|m| m.path == exe)
        .and_then(|m| Segments::of(&file).load_bias(m))
        .unwrap_or(0);
    // A pc table that cannot be read was already reported by go_probes.
    let mut out: Vec<(u64, u64, String)> = crate::binary::golang::text_functions(&file)
        .unwrap_or_default()
        .into_iter()
        .filter(|(n, _, _)| n.starts_with("sync.") || n.starts_with("internal/sync."))
        .map(|(n, a, size)| (a.wrapping_add(bias), a.wrapping_add(bias) + size, n))
        .collect();
    out.sort();
    out
}

/// Largest global a lock is named by without an offset (pthread_rwlock_t
/// is 56 bytes, pthread_mutex_t 40, Go's sync.RWMutex 24): a lock object
/// that size is the lock (an rwlock waits on several words of itself); in
/// a larger global, the name says where.
const LOCK_OBJECT_MAX: u64 = 64;
