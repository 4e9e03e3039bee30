//! Goroutine tracker, user side only: no probes at all. Once per interval
//! it reads the Go runtime's own goroutine table (`runtime.allgs`, each g's
//! status, id, `go` statement pc, saved registers) out of the target's
//! memory in a few batched `process_vm_readv` calls, and groups the live
//! goroutines by the `go` statement that created them.
//!
//! Why no probes: a uprobe on goroutine creation and exit costs a trap per
//! goroutine (~0.5 µs on an instruction the kernel emulates, ~17 µs on
//! one it single-steps, as Go's entry `CMPQ SP, 16(R14)`); at 100k goroutines
//! per second that is 5-170% of a core taken from the target, against a few
//! milliseconds per interval of reading, which never stops the target. The
//! price: goroutines that start and end between two scans are never seen
//! (`created`/`ended` count what the scans saw), which is harmless for leaks:
//! a leaked goroutine is by definition still there at the next scan.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context, Result};

mod creators;

use super::{Blocked, Collected, Counters, Judging, StackSample, Tally, Target, Tracker, TrackerSpec};
use crate::{
    stacks::SampleStack,
    cli::TraceOptions,
    binary::{
        elf,
        golang::{GoRuntime, TargetMemory},
    },
    output,
    probes::Probes,
    report::Kind,
};

/// The goroutine tracker in the registry (a default tracker, as part of
/// `tasks`): it applies to Go programs only and loads nothing.
pub const SPEC: TrackerSpec = TrackerSpec { name: "goroutines", default: true, configure, new };

/// The creator probe's tables, minimal when the tracker does not run.
fn configure(load: &mut crate::probes::LoadSettings, _opts: &TraceOptions, active: bool) {
    if !active {
        load.minimal(&["GO_CREATOR_FRAMES", "GO_CREATIONS", "GO_CREATOR_OF"]);
    }
}

fn new(probes: &mut Probes, _opts: &TraceOptions, _target: &Target) -> Result<Box<dyn Tracker>> {
    Ok(Box::new(Goroutines { reader: None, creators: creators::CreatorProbes::new(probes)? }))
}

/// The goroutine tracker: a reader of the target's goroutines once it is
/// known to be a Go program (opened at start and after every exec), and
/// the creator probes on library `go` statements whose goroutines leak.
struct Goroutines {
    reader: Option<GoroutineCollector>,
    creators: creators::CreatorProbes,
}

impl Goroutines {
    /// The goroutine reader for a Go target; `None` (after one line on
    /// stderr saying why, for a Go program we cannot read) otherwise. The
    /// thread tracker runs either way.
    fn open(&mut self, pid: u32) {
        self.reader = match GoroutineCollector::open(pid) {
            Ok(Some(c)) => {
                output::note(format!("Go program, {}: tracking goroutines", c.describe()));
                Some(c)
            }
            Ok(None) => None,
            Err(e) => {
                output::note(format!("goroutines not tracked: {e:#} (threads still are)"));
                None
            }
        };
    }
}

impl Tracker for Goroutines {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn on_start(&mut self, _probes: &mut Probes, target: &Target) {
        self.open(target.pid);
    }

    fn on_exec(&mut self, probes: &mut Probes, target: &Target, _at_ns: u64) {
        self.creators.detach_all(probes);
        self.open(target.pid);
    }

    /// Leaking groups whose `go` statement is a library's get the creator
    /// probe; groups no longer judged leak lose it.
    fn on_findings(&mut self, probes: &mut Probes, target: &Target, findings: &[crate::report::Finding], own: &crate::stacks::symbolize::OwnCode) {
        if let Some(g) = self.reader.as_ref() {
            self.creators.follow(probes, target, g, findings, own);
        }
    }

    fn collect(&mut self, _probes: &mut Probes, target: &Target, _counters: &super::Counters, now_ns: u64) -> Result<Collected> {
        let Some(g) = self.reader.as_mut() else { return Ok(Collected::Nothing) };
        g.watch = self.creators.watched();
        match g.collect(now_ns, target.alive) {
            Ok(mut samples) => {
                self.creators.name_creators(&mut samples, &g.parents);
                Ok(Collected::Growth { kind: Kind::Goroutine, judging: Judging::ObjectsSinceAttach, samples })
            }
            Err(e) => {
                output::warn(format!("cannot read the goroutines any more ({e:#}): goroutine tracking stops"));
                self.reader = None;
                Ok(Collected::Nothing)
            }
        }
    }

    /// Goroutines beyond the per-scan bound were not read: lost events.
    fn tally(&self, _counters: &Counters) -> Tally {
        match &self.reader {
            Some(g) => Tally { events: vec![(Kind::Goroutine, g.events)], lost: g.skipped, ..Tally::default() },
            None => Tally::default(),
        }
    }

    fn closing_note(&self) -> Option<String> {
        self.reader.as_ref().map(|g| g.scan_summary() + &self.creators.summary())
    }
}

/// Goroutine states (runtime2.go), the same in every supported version.
const G_IDLE: u32 = 0;
const G_RUNNABLE: u32 = 1;
const G_RUNNING: u32 = 2;
const G_SYSCALL: u32 = 3;
const G_WAITING: u32 = 4;
const G_DEAD: u32 = 6;
const G_PREEMPTED: u32 = 9;
const G_SCAN: u32 = 0x1000;

/// g's read per batch of system calls (one reused buffer of this many).
const SCAN_CHUNK: usize = 4096;

/// Most frames walked in a parked goroutine's stack.
const MAX_FRAMES: usize = 64;

/// Goroutines by their start function.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    User,
    /// runtime.main: the main goroutine.
    Main,
    /// The runtime's own (GC workers, finalizers, ...), as Go's
    /// isSystemGoroutine says: not reported.
    System,
    /// A start pc outside the binary's code: not a goroutine.
    Invalid,
}

/// One goroutine as read from its `g`.
#[derive(Clone, Copy, Debug)]
struct G {
    status: u32,
    goid: u64,
    gopc: u64,
    startpc: u64,
    waitreason: u8,
    /// Switches out of running, mod 256 (`g.trackingSeq`).
    tracking_seq: u8,
    /// The goroutine that created it (0: unknown, before Go 1.21).
    parent_goid: u64,
    sp: u64,
    pc: u64,
    bp: u64,
    /// Bytes of its stack (`g.stack.hi - g.stack.lo`).
    stack_bytes: u64,
}

/// `g.stack` (`lo`, `hi`) is the first field of `runtime.g` in every Go
/// version (its offset is known to the runtime's assembly).
const G_STACK: u64 = 0;
/// The smallest goroutine stack (`_StackMin`; a stack read as smaller is
/// one being freed).
const MIN_STACK_BYTES: u64 = 2048;

/// What we keep per live goroutine between scans (bounded by the number
/// of goroutines read per scan).
#[derive(Clone, Copy)]
struct Seen {
    first_ns: u64,
    gopc: u64,
}

/// Reads one Go target's goroutines.
pub struct GoroutineCollector {
    mem: TargetMemory,
    bin: GoRuntime,
    /// Load bias: runtime address = link-time address + bias (0 unless PIE).
    bias: u64,
    /// `runtime.waitReasonStrings`, read from the target once.
    wait_reasons: Option<Vec<String>>,
    seen: HashMap<u64, Seen>,
    /// Per `go` statement: goroutines that appeared / disappeared between scans.
    created: HashMap<u64, u64>,
    ended: HashMap<u64, u64>,
    /// startpc -> what kind of goroutine it starts.
    classes: HashMap<u64, Class>,
    scanned_once: bool,
    /// Most goroutines read per scan: a process with more gets the first
    /// ones read and the rest counted in `skipped`.
    pub max_goroutines: usize,
    /// Goroutines not read (bound hit), summed over scans.
    pub skipped: u64,
    /// Goroutines seen appear or disappear since attach.
    pub events: u64,
    /// The last scan: goroutines read and how long it took.
    pub last_scan: (usize, std::time::Duration),
    /// The slowest scan so far.
    pub slowest_scan: (usize, std::time::Duration),
    /// Per `go` statement of the last scan: mean stack bytes of its live
    /// goroutines (kept for the report after the target exited).
    stack_bytes: HashMap<u64, u64>,
    /// `go` statements (gopc) whose live goroutines' creators are wanted...
    pub watch: std::collections::HashSet<u64>,
    /// ...and those creators' goroutine ids, per statement, at the last scan.
    pub parents: HashMap<u64, Vec<u64>>,
}

impl GoroutineCollector {
    /// Inspects the target's executable: `Ok(None)` when it is not a Go
    /// program; an error says why a Go program cannot be read (version).
    pub fn open(pid: u32) -> Result<Option<Self>> {
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let Some(bin) = GoRuntime::open(&exe)? else { return Ok(None) };
        let bias = elf::exe_load_bias(pid, &bin.symbols.segments).unwrap_or(0);
        Self::from_memory(bin, TargetMemory::new(pid), bias).map(Some)
    }

    /// A reader of the goroutines of the Go program `bin` in `mem` (a live
    /// process, or a core file for replay), its code loaded `bias` above
    /// its link-time addresses.
    pub fn from_memory(bin: GoRuntime, mem: TargetMemory, bias: u64) -> Result<Self> {
        let mut c = Self {
            mem,
            bin,
            bias,
            wait_reasons: None,
            seen: HashMap::new(),
            created: HashMap::new(),
            ended: HashMap::new(),
            classes: HashMap::new(),
            scanned_once: false,
            max_goroutines: 100_000,
            skipped: 0,
            events: 0,
            last_scan: (0, Default::default()),
            slowest_scan: (0, Default::default()),
            stack_bytes: HashMap::new(),
            watch: Default::default(),
            parents: HashMap::new(),
        };
        c.wait_reasons = c.read_wait_reasons();
        // One read now: a layout we cannot read is an error at attach,
        // not silence later.
        c.read_allgs_header().context("cannot read runtime.allgs in the target")?;
        Ok(c)
    }

    /// One line for the user: version and where the layout came from.
    pub fn describe(&self) -> String {
        format!(
            "{} (offsets from {}, runtime.allgs from {})",
            self.bin.version_string,
            match self.bin.offsets_source {
                crate::binary::golang::offsets::Source::Dwarf => "DWARF",
                crate::binary::golang::offsets::Source::Table => "the version table",
            },
            match self.bin.allgs_source {
                crate::binary::golang::Found::Symtab => "the symbol table",
                crate::binary::golang::Found::Disassembly => "disassembly",
            }
        )
    }

    fn read_allgs_header(&self) -> Result<(u64, u64)> {
        let mut b = [0u8; 16];
        self.mem.read(self.bin.allgs + self.bias, &mut b)?;
        Ok((u64::from_le_bytes(b[..8].try_into()?), u64::from_le_bytes(b[8..].try_into()?)))
    }

    fn read_wait_reasons(&self) -> Option<Vec<String>> {
        let (addr, n) = self.bin.wait_reasons?;
        let n = n as usize;
        let mut headers = vec![0u8; n * 16];
        self.mem.read(addr + self.bias, &mut headers).ok()?;
        let mut out = Vec::with_capacity(n);
        for h in headers.chunks(16) {
            let ptr = u64::from_le_bytes(h[..8].try_into().ok()?);
            let len = u64::from_le_bytes(h[8..].try_into().ok()?).min(256) as usize;
            let mut s = vec![0u8; len];
            if len > 0 {
                self.mem.read(ptr, &mut s).ok()?;
            }
            out.push(String::from_utf8_lossy(&s).into_owned());
        }
        Some(out)
    }

    /// What a goroutine started at `startpc` is, by its function's name.
    fn class(&mut self, startpc: u64) -> Class {
        let pclntab = &self.bin.symbols.pclntab;
        let bias = self.bias;
        *self.classes.entry(startpc).or_insert_with(|| match pclntab.lookup(startpc.wrapping_sub(bias)) {
            Some(f) if f.function == "runtime.main" => Class::Main,
            Some(f) if f.function.starts_with("runtime.") => Class::System,
            Some(_) => Class::User,
            // Not code of this binary: a g misread while the runtime
            // reused it.
            None => Class::Invalid,
        })
    }

    /// One line on the cost of the scans, for the end of a trace.
    pub fn scan_summary(&self) -> String {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        format!(
            "goroutine scans: last read {} g in {:.1} ms, slowest {} g in {:.1} ms{}",
            self.last_scan.0,
            ms(self.last_scan.1),
            self.slowest_scan.0,
            ms(self.slowest_scan.1),
            if self.skipped > 0 { format!("; {} g not read (more than {} per scan)", self.skipped, self.max_goroutines) } else { String::new() }
        )
    }

    /// Reads every g (up to the bound) of the target.
    fn scan(&mut self) -> Result<Vec<G>> {
        let (ptr, len) = self.read_allgs_header()?;
        let n = (len as usize).min(self.max_goroutines);
        self.skipped += len.saturating_sub(n as u64);
        let mut ptrs = vec![0u8; n * 8];
        if n > 0 {
            self.mem.read(ptr, &mut ptrs)?;
        }
        let gs: Vec<u64> = ptrs.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).filter(|&p| p != 0).collect();
        let o = self.bin.offsets;
        let (lo, hi) = o.span();
        let lo = lo.min(G_STACK);
        let span = (hi - lo) as usize;
        // In chunks through one small buffer: leaktrace's memory stays
        // bounded (and its page faults few) whatever the goroutine count.
        let mut buf = vec![0u8; SCAN_CHUNK.min(gs.len().max(1)) * span];
        let mut out = Vec::with_capacity(gs.len());
        for chunk in gs.chunks(SCAN_CHUNK) {
            let addrs: Vec<u64> = chunk.iter().map(|g| g + lo).collect();
            let ok = self.mem.read_many(&addrs, span, &mut buf[..chunk.len() * span]);
            for (i, good) in ok.iter().enumerate() {
                if !good {
                    continue;
                }
                let rec = &buf[i * span..(i + 1) * span];
                let at = |off: u64, size: usize| -> u64 {
                    let s = (off - lo) as usize;
                    let mut b = [0u8; 8];
                    b[..size].copy_from_slice(&rec[s..s + size]);
                    u64::from_le_bytes(b)
                };
                out.push(G {
                    status: at(o.atomicstatus, 4) as u32 & !G_SCAN,
                    goid: at(o.goid, 8),
                    gopc: at(o.gopc, 8),
                    startpc: at(o.startpc, 8),
                    waitreason: at(o.waitreason, 1) as u8,
                    tracking_seq: at(o.tracking_seq, 1) as u8,
                    parent_goid: o.parent_goid.map_or(0, |off| at(off, 8)),
                    sp: at(o.sched + o.gobuf_sp, 8),
                    pc: at(o.sched + o.gobuf_pc, 8),
                    bp: at(o.sched + o.gobuf_bp, 8),
                    stack_bytes: at(G_STACK + 8, 8).saturating_sub(at(G_STACK, 8)),
                });
            }
        }
        Ok(out)
    }

    /// How a goroutine dump names the state of `g`.
    fn wait_reason(&self, g: &G) -> String {
        match g.status {
            G_WAITING => match self.wait_reasons.as_ref().and_then(|w| w.get(g.waitreason as usize)) {
                Some(s) if !s.is_empty() => s.clone(),
                _ => format!("waiting (reason {})", g.waitreason),
            },
            G_RUNNABLE | G_PREEMPTED => "runnable".into(),
            G_RUNNING => "running".into(),
            G_SYSCALL => "syscall".into(),
            s => format!("status {s}"),
        }
    }

    /// Walks the saved frame pointers of parked goroutines, all of them a
    /// level at a time (one batched read per level). Returns stacks
    /// innermost first.
    fn walk(&self, starts: &[(u64, u64)]) -> Vec<Vec<u64>> {
        let mut stacks: Vec<Vec<u64>> = starts.iter().map(|&(pc, _)| vec![pc.saturating_sub(1)]).collect();
        let mut bps: Vec<u64> = starts.iter().map(|&(_, bp)| bp).collect();
        for _ in 1..MAX_FRAMES {
            let active: Vec<usize> = (0..bps.len()).filter(|&i| bps[i] != 0).collect();
            if active.is_empty() {
                break;
            }
            let addrs: Vec<u64> = active.iter().map(|&i| bps[i]).collect();
            let mut buf = vec![0u8; addrs.len() * 16];
            let ok = self.mem.read_many(&addrs, 16, &mut buf);
            for (k, &i) in active.iter().enumerate() {
                let rec = &buf[k * 16..k * 16 + 16];
                let next_bp = u64::from_le_bytes(rec[..8].try_into().unwrap());
                let ret = u64::from_le_bytes(rec[8..].try_into().unwrap());
                if !ok[k] || ret == 0 {
                    bps[i] = 0;
                    continue;
                }
                stacks[i].push(ret);
                // Frames only go up the stack; anything else is the end
                // (runtime.goexit's frame has no caller).
                bps[i] = if next_bp > bps[i] { next_bp } else { 0 };
            }
        }
        stacks
    }

    /// The program's goroutines (not the runtime's) parked where a queue
    /// can form: a channel, `select`, `sync` (Cond, Mutex, RWMutex,
    /// WaitGroup) or a semaphore. `walk(goid, wait)` says whether this wait
    /// needs its stack walked (a wait already seen keeps its stack);
    /// `walked` is empty for the others.
    pub fn parked_waits(&mut self, mut walk: impl FnMut(u64, &ParkedWait) -> bool) -> Result<Vec<ParkedWait>> {
        let gs = self.scan()?;
        let mut out = Vec::new();
        for g in gs {
            if g.status != G_WAITING || g.goid == 0 || g.pc == 0 || g.sp == 0 {
                continue;
            }
            if !matches!(self.class(g.startpc), Class::User | Class::Main) {
                continue;
            }
            let reason = self.wait_reason(&g);
            if !is_queue_wait(&reason) {
                continue;
            }
            out.push(ParkedWait { goid: g.goid, reason, pc: g.pc, sp: g.sp, bp: g.bp, parks: g.tracking_seq, stack: Vec::new() });
        }
        let to_walk: Vec<usize> = (0..out.len()).filter(|&i| walk(out[i].goid, &out[i])).collect();
        let starts: Vec<(u64, u64)> = to_walk.iter().map(|&i| (out[i].pc, out[i].bp)).collect();
        for (i, stack) in to_walk.into_iter().zip(self.walk(&starts)) {
            out[i].stack = stack;
        }
        Ok(out)
    }

    /// One sample per `go` statement with live goroutines (or that had some
    /// since attach). `now_ns` is CLOCK_MONOTONIC.
    pub fn collect(&mut self, now_ns: u64, target_alive: bool) -> Result<Vec<StackSample>> {
        let started = Instant::now();
        if !target_alive {
            return Ok(self.samples_from_seen(now_ns));
        }
        let gs = match self.scan() {
            Ok(gs) => gs,
            // The target exiting mid-read: report what the last scan saw.
            Err(_) if !crate::procfs::has_memory(self.mem.pid()) => return Ok(self.samples_from_seen(now_ns)),
            Err(e) => return Err(e),
        };
        let mut live_ids = std::collections::HashSet::with_capacity(gs.len());
        self.parents.clear();
        // Per go statement: live count, oldest first-seen, representative.
        let mut groups: HashMap<u64, (u64, u64, Option<G>)> = HashMap::new();
        let mut stacks: HashMap<u64, u64> = HashMap::new();
        for g in &gs {
            if g.status == G_DEAD || g.status == G_IDLE || g.status > G_PREEMPTED || g.goid == 0 {
                continue;
            }
            let g = &match self.class(g.startpc) {
                Class::System | Class::Invalid => continue,
                // The runtime starts the main goroutine from assembly: its
                // gopc names no `go` statement; group it under runtime.main
                // (startpc + 1 steps back to startpc in go_statement).
                Class::Main => G { gopc: g.startpc + 1, ..*g },
                Class::User => *g,
            };
            live_ids.insert(g.goid);
            if self.watch.contains(&g.gopc) {
                self.parents.entry(g.gopc).or_default().push(g.parent_goid);
            }
            let first = match self.seen.get(&g.goid) {
                Some(s) => s.first_ns,
                None => {
                    self.seen.insert(g.goid, Seen { first_ns: now_ns, gopc: g.gopc });
                    if self.scanned_once {
                        *self.created.entry(g.gopc).or_default() += 1;
                        self.events += 1;
                    }
                    now_ns
                }
            };
            *stacks.entry(g.gopc).or_default() += g.stack_bytes.max(MIN_STACK_BYTES);
            let e = groups.entry(g.gopc).or_insert((0, u64::MAX, None));
            e.0 += 1;
            // The representative: the oldest goroutine, preferring parked
            // ones (their saved registers are their current stack).
            let parked = matches!(g.status, G_WAITING | G_RUNNABLE | G_PREEMPTED);
            let better = match &e.2 {
                None => true,
                Some(r) => {
                    let rp = matches!(r.status, G_WAITING | G_RUNNABLE | G_PREEMPTED);
                    (parked && !rp) || (parked == rp && first < e.1)
                }
            };
            if better {
                e.2 = Some(*g);
            }
            e.1 = e.1.min(first);
        }
        // Goroutines gone since the last scan ended.
        let mut gone = Vec::new();
        for (goid, s) in &self.seen {
            if !live_ids.contains(goid) {
                gone.push((*goid, s.gopc));
            }
        }
        for (goid, gopc) in gone {
            self.seen.remove(&goid);
            *self.ended.entry(gopc).or_default() += 1;
            self.events += 1;
        }
        self.scanned_once = true;

        // Current stacks of one goroutine per group.
        let reps: Vec<(u64, G)> =
            groups.iter().filter_map(|(gopc, (_, _, r))| r.filter(|g| g.pc != 0 && g.sp != 0).map(|g| (*gopc, g))).collect();
        let starts: Vec<(u64, u64)> = reps.iter().map(|(_, g)| (g.pc, g.bp)).collect();
        let walked = self.walk(&starts);
        let mut blocked: HashMap<u64, Blocked> = HashMap::new();
        for ((gopc, g), stack) in reps.iter().zip(walked) {
            blocked.insert(*gopc, Blocked { stack: SampleStack::Addresses(stack), wait_reason: self.wait_reason(g) });
        }
        for (gopc, (_, _, r)) in &groups {
            if let (Some(g), false) = (r, blocked.contains_key(gopc)) {
                // Running or in a syscall: its saved registers are stale.
                blocked.insert(*gopc, Blocked { stack: SampleStack::Addresses(Vec::new()), wait_reason: self.wait_reason(g) });
            }
        }

        let live: HashMap<u64, (u64, u64)> = groups.iter().map(|(gopc, (n, oldest, _))| (*gopc, (*n, *oldest))).collect();
        self.stack_bytes = stacks.into_iter().map(|(gopc, sum)| (gopc, sum / live[&gopc].0.max(1))).collect();
        let out = self.samples(&live, now_ns, |gopc| blocked.remove(&gopc));
        self.last_scan = (gs.len(), started.elapsed());
        if self.last_scan.1 > self.slowest_scan.1 {
            self.slowest_scan = self.last_scan;
        }
        Ok(out)
    }

    /// After the target exited: the goroutines of the last scan, as they were.
    fn samples_from_seen(&self, now_ns: u64) -> Vec<StackSample> {
        let mut groups: HashMap<u64, (u64, u64)> = HashMap::new();
        for s in self.seen.values() {
            let e = groups.entry(s.gopc).or_insert((0, u64::MAX));
            e.0 += 1;
            e.1 = e.1.min(s.first_ns);
        }
        self.samples(&groups, now_ns, |_| None)
    }

    /// One sample per `go` statement that has live goroutines (`live`:
    /// count and oldest first-seen time) or created/ended any.
    fn samples(
        &self,
        live: &HashMap<u64, (u64, u64)>,
        now_ns: u64,
        mut blocked: impl FnMut(u64) -> Option<Blocked>,
    ) -> Vec<StackSample> {
        let mut gopcs: Vec<u64> = live.keys().chain(self.created.keys()).chain(self.ended.keys()).copied().collect();
        gopcs.sort_unstable();
        gopcs.dedup();
        gopcs
            .into_iter()
            .map(|gopc| {
                let (n, oldest) = live.get(&gopc).copied().unwrap_or((0, u64::MAX));
                StackSample {
                    stack: go_statement(gopc),
                    live: n,
                    created: self.created.get(&gopc).copied().unwrap_or(0),
                    ended: self.ended.get(&gopc).copied().unwrap_or(0),
                    oldest_age_s: (n > 0).then(|| now_ns.saturating_sub(oldest) as f64 / 1e9),
                    blocked: blocked(gopc),
                    // A goroutine takes at least the smallest stack.
                    bytes_per_object: Some(self.stack_bytes.get(&gopc).copied().unwrap_or(MIN_STACK_BYTES)),
                    ..Default::default()
                }
            })
            .collect()
    }
}

/// A goroutine parked in a wait (`GoroutineCollector::parked_waits`).
#[derive(Clone, Debug)]
pub struct ParkedWait {
    pub goid: u64,
    /// Its wait reason, as a goroutine dump says it.
    pub reason: String,
    /// Saved registers: the same pc and sp mean the same wait.
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
    /// Times it parked, mod 256: unchanged means it has not run since.
    pub parks: u8,
    /// Its current stack, innermost first (when walked).
    pub stack: Vec<u64>,
}

/// Wait reasons where requests can queue for a resource (or workers for
/// work): channels, `select`, the `sync` package, semaphores. Not network
/// or timer waits (an idle connection, a sleep) nor the runtime's own.
fn is_queue_wait(reason: &str) -> bool {
    reason.starts_with("chan ") || reason.starts_with("select") || reason.starts_with("sync.") || reason == "semacquire"
}

/// The stack of a `go` statement: its pc stepped back into the call to
/// `runtime.newproc` (gopc is that call's return address), so the frame
/// names the statement's own line.
fn go_statement(gopc: u64) -> SampleStack {
    SampleStack::Addresses(vec![gopc.saturating_sub(1)])
}
