//! Wait tracker, user side only: the waits going on now, each report, and
//! the ones already going on at attach. A pool that drained before
//! leaktrace attached makes no new event at all (every request thread is
//! already blocked), so waits are read from the target's state, not from
//! probes:
//!
//! - native threads: `/proc/PID/task/TID/syscall` says which threads sit in
//!   a futex wait (condition variables, mutexes, semaphores, joins) and
//!   gives their sp and pc; their user stacks are walked here from a copy of
//!   their stack, by the same unwind rules the kernel side uses
//!   (`stacks::unwind::walk_copy`, `.eh_frame`, frame pointers where there
//!   is none). `schedstat`'s count of times the thread ran tells a wait that
//!   goes on from a new one at the same place.
//! - Go programs: the goroutine scan (`GoroutineCollector::parked_waits`)
//!   gives goroutines parked on a channel, `select`, `sync` or a semaphore,
//!   their saved registers and frame-pointer stacks; `g.trackingSeq` (it
//!   counts the goroutine's parks) tells a wait that goes on from a new one
//!   at the same place. The runtime's own threads park on futexes too: in a
//!   Go program only goroutines count.
//!
//! - JVMs: a Java thread in a futex wait has its frame anchor set, so its
//!   Java frames are walked here from the anchor (`stacks::jvm`, as the
//!   kernel side does at an event) and named by the JVM: a drained pool
//!   shows at the borrowing method. Threads without Java frames (GC,
//!   compiler) get native stacks as above.
//!
//! A wait's stack is walked once, when it is first seen. Judged by
//! `judge::waits` (the queue rule).

use std::collections::HashMap;

use anyhow::Result;

use super::{goroutines::GoroutineCollector, Collected, Counters, Tally, Target, Tracker, TrackerSpec};
use crate::{
    binary::golang::TargetMemory,
    cli::TraceOptions,
    judge::waits::WaitSample,
    output,
    probes::{ktime_ns, Probes},
    procfs::{self, MemoryMap},
    report::Kind,
    stacks::{jvm, unwind, SampleStack},
};
use tracer_common::stacks::RULE_AT_PC;

/// The wait tracker in the registry (opt-in: `--track waits`).
pub const SPEC: TrackerSpec = TrackerSpec { name: "waits", default: false, configure: super::no_settings, new };

fn new(_probes: &mut Probes, _opts: &TraceOptions, target: &Target) -> Result<Box<dyn Tracker>> {
    Ok(Box::new(Waits::new(target.pid)))
}

/// Threads or goroutines read per scan; beyond, counted as lost.
pub const MAX_WAITERS: usize = 100_000;
/// New waits whose stack is walked per scan; beyond, the rest wait for the
/// next scan (their time still counts from when they were first seen).
pub const MAX_WALKS_PER_SCAN: usize = 4096;
/// Bytes of a thread's stack copied to walk it (less when the mapping ends
/// sooner).
const STACK_COPY: [usize; 3] = [32 * 1024, 8 * 1024, 2 * 1024];

/// Scans at which a JVM's walk is tried until it is set up (the JVM still
/// starting).
const JVM_SETUP_TRIES: u32 = 20;

/// futex(2) and futex_waitv(2) on x86-64.
const SYS_FUTEX: u64 = 202;
const SYS_FUTEX_WAITV: u64 = 449;

/// One wait going on: what identifies it (the same wait as at the last
/// scan when equal), since when, and where.
#[derive(Clone, Debug)]
struct Wait {
    id: (u64, u64, u64, u64),
    state: String,
    first_ns: u64,
    before_attach: bool,
    /// Walked stack; `None` until walked.
    stack: Option<SampleStack>,
}

struct Waits {
    pid: u32,
    /// The Go program's goroutine reader; `None` for a native program.
    go: Option<GoroutineCollector>,
    mem: TargetMemory,
    cfi: unwind::CfiObjects,
    /// Waits going on, by tid (native) or goroutine id (Go).
    waits: HashMap<u64, Wait>,
    /// The JVM's walk when the target is one (set up once it is ready),
    /// and the tries left.
    jvm: Option<jvm::Jvm>,
    jvm_tries: u32,
    /// Whether the scan at attach was made.
    attached: bool,
    /// Waits seen start.
    events: u64,
    /// Waiters not read (bound hit), summed over scans.
    lost: u64,
}

impl Waits {
    fn new(pid: u32) -> Self {
        Self {
            pid,
            go: None,
            mem: TargetMemory::new(pid),
            cfi: unwind::CfiObjects::new(pid),
            waits: HashMap::new(),
            jvm: None,
            jvm_tries: JVM_SETUP_TRIES,
            attached: false,
            events: 0,
            lost: 0,
        }
    }

    /// A new image: a Go program's waits come from its goroutines.
    fn open(&mut self, target: &Target) {
        self.go = match GoroutineCollector::open(target.pid) {
            Ok(g) => g,
            Err(e) => {
                output::note(format!("goroutine waits not read: {e:#}"));
                None
            }
        };
        self.cfi = unwind::CfiObjects::new(target.pid);
        self.jvm = None;
        self.jvm_tries = JVM_SETUP_TRIES;
        self.waits.clear();
        self.attached = false;
    }

    /// Reads the waits going on now: new ones start at `now_ns` (or count
    /// from attach at the first scan), ended ones are forgotten.
    fn scan(&mut self, memory: &MemoryMap, now_ns: u64) -> Result<()> {
        let before_attach = !self.attached;
        self.attached = true;
        let mut now: HashMap<u64, Wait> = HashMap::new();
        let mut walks = 0;
        if let Some(go) = self.go.as_mut() {
            let known = &self.waits;
            let parked = go.parked_waits(|goid, p| {
                let same = known.get(&goid).is_some_and(|w| w.id == (p.pc, p.sp, p.parks as u64, 0) && w.state == p.reason);
                let walk = !same && walks < MAX_WALKS_PER_SCAN;
                walks += walk as usize;
                walk
            })?;
            for p in parked.into_iter().take(MAX_WAITERS) {
                let w = Wait {
                    id: (p.pc, p.sp, p.parks as u64, 0),
                    state: p.reason,
                    first_ns: now_ns,
                    before_attach,
                    stack: (!p.stack.is_empty()).then_some(SampleStack::Addresses(p.stack)),
                };
                now.insert(p.goid, w);
            }
        } else {
            let mut tids: Vec<u32> = procfs::task_ids(self.pid)?.into_iter().collect();
            tids.sort_unstable();
            self.lost += tids.len().saturating_sub(MAX_WAITERS) as u64;
            for tid in tids.into_iter().take(MAX_WAITERS) {
                let Some((sp, pc, uaddr)) = futex_wait(self.pid, tid) else { continue };
                let ran = times_ran(self.pid, tid).unwrap_or(0);
                let w = Wait { id: (uaddr, sp, pc, ran), state: "futex".into(), first_ns: now_ns, before_attach, stack: None };
                now.insert(tid as u64, w);
            }
        }
        // A wait that goes on keeps its start and its stack.
        for (id, w) in now.iter_mut() {
            if let Some(old) = self.waits.get(id).filter(|o| o.id == w.id && o.state == w.state) {
                w.first_ns = old.first_ns;
                w.before_attach = old.before_attach;
                w.stack = w.stack.take().or_else(|| old.stack.clone());
            } else {
                self.events += 1;
            }
        }
        if self.go.is_none() {
            let java_threads = if now.values().any(|w| w.stack.is_none()) { self.java_threads(memory) } else { HashMap::new() };
            for (tid, w) in now.iter_mut() {
                if w.stack.is_none() && walks < MAX_WALKS_PER_SCAN {
                    walks += 1;
                    let java = java_threads.get(&(*tid as u32)).and_then(|&jt| self.jvm.as_ref()?.walk_thread(jt, w.id.1));
                    w.stack = Some(match java {
                        Some(ips) => SampleStack::Java(ips),
                        None => SampleStack::Addresses(self.walk_thread(*tid as u32, w.id.1, w.id.2, memory)),
                    });
                }
            }
        }
        self.waits = now;
        Ok(())
    }

    /// A JVM's Java threads by tid; none for another program (its walk set
    /// up at the first scan the JVM is ready for, retried a few scans).
    fn java_threads(&mut self, memory: &MemoryMap) -> HashMap<u32, u64> {
        if self.jvm.is_none() && self.jvm_tries > 0 && crate::binary::hotspot::libjvm_mapping(memory).is_some() {
            self.jvm_tries -= 1;
            match jvm::Jvm::attach(self.pid, memory) {
                Ok(j) => self.jvm = j,
                Err(e) if e.downcast_ref::<jvm::NotReady>().is_some() => {}
                // Said once by the stack setup ("Java frames are off").
                Err(_) => self.jvm_tries = 0,
            }
        }
        self.jvm.as_ref().map(jvm::Jvm::java_threads).unwrap_or_default()
    }

    /// A blocked thread's user stack from its sp and pc, innermost first.
    fn walk_thread(&mut self, _tid: u32, sp: u64, pc: u64, memory: &MemoryMap) -> Vec<u64> {
        let Some(copy) = STACK_COPY.iter().find_map(|&len| self.mem.read_region(sp, len)) else { return vec![pc] };
        let cfi = &mut self.cfi;
        let (beyond, _) = unwind::walk_copy(pc | RULE_AT_PC, sp, 0, sp, &copy, |key| Some(cfi.rule_of_key(key, memory)));
        std::iter::once(pc).chain(beyond).collect()
    }

    /// Waiters per stack and state.
    fn samples(&self, now_ns: u64) -> Vec<WaitSample> {
        let mut by: HashMap<(SampleStack, &str), WaitSample> = HashMap::new();
        for w in self.waits.values() {
            let Some(stack) = &w.stack else { continue };
            let s = by.entry((stack.clone(), w.state.as_str())).or_insert_with(|| WaitSample {
                stack: stack.clone(),
                state: w.state.clone(),
                waiters: 0,
                longest_s: 0.0,
                total_s: 0.0,
                before_attach: false,
            });
            let secs = now_ns.saturating_sub(w.first_ns) as f64 / 1e9;
            s.waiters += 1;
            s.longest_s = s.longest_s.max(secs);
            s.total_s += secs;
            s.before_attach |= w.before_attach;
        }
        by.into_values().collect()
    }
}

impl Tracker for Waits {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    /// The scan at attach: waits already going on count from now.
    fn on_start(&mut self, _probes: &mut Probes, target: &Target) {
        self.open(target);
        if let Err(e) = self.scan(&target.memory, ktime_ns()) {
            output::warn(format!("cannot read the target's waits at attach: {e:#}"));
        }
    }

    fn on_exec(&mut self, _probes: &mut Probes, target: &Target, _at_ns: u64) {
        self.open(target);
    }

    fn collect(&mut self, _probes: &mut Probes, target: &Target, _counters: &super::Counters, now_ns: u64) -> Result<Collected> {
        // After the target's exit: the waits of the last scan, as they were.
        if target.alive {
            if let Err(e) = self.scan(&target.memory, now_ns) {
                if procfs::has_memory(self.pid) {
                    output::warn(format!("cannot read the target's waits ({e:#}): shown as at the last scan"));
                }
            }
        }
        Ok(Collected::Waits(self.samples(now_ns)))
    }

    fn tally(&self, _counters: &Counters) -> Tally {
        Tally { events: vec![(Kind::Wait, self.events)], lost: self.lost, ..Tally::default() }
    }
}

/// A thread blocked in a futex wait: its sp, pc and the futex address, from
/// `/proc/PID/task/TID/syscall` (`NR ARG1..ARG6 SP PC`); `None` when it
/// runs or sits in another call.
fn futex_wait(pid: u32, tid: u32) -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    parse_futex_wait(&text)
}

fn parse_futex_wait(text: &str) -> Option<(u64, u64, u64)> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(|f| f.strip_prefix("0x").map_or_else(|| f.parse().ok(), |h| u64::from_str_radix(h, 16).ok()))
        .collect::<Option<_>>()?;
    let [nr, a1, a2, _, _, _, _, sp, pc] = fields[..] else { return None };
    // FUTEX_WAIT, LOCK_PI, WAIT_BITSET, WAIT_REQUEUE_PI, LOCK_PI2 (the
    // private and clock flags masked off).
    let waits = match nr {
        SYS_FUTEX => matches!(a2 & !(128 | 256), 0 | 6 | 9 | 11 | 13),
        SYS_FUTEX_WAITV => true,
        _ => false,
    };
    waits.then_some((sp, pc, a1))
}

/// How many times the thread has run (`schedstat`'s third field): the
/// same count at two scans means it has not woken in between.
fn times_ran(pid: u32, tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn futex_waits_from_proc_syscall() {
        let cond = "202 0x55d0c8a4a0c8 0x189 0x0 0x0 0x0 0xffffffff 0x7f3b1bffed60 0x7f3b1c491f16\n";
        assert_eq!(parse_futex_wait(cond), Some((0x7f3b1bffed60, 0x7f3b1c491f16, 0x55d0c8a4a0c8)));
        assert_eq!(parse_futex_wait("202 0x1000 0x80 0x2 0x0 0x0 0x0 0x7ffd0 0x7f01\n").map(|w| w.2), Some(0x1000));
        assert_eq!(parse_futex_wait("202 0x1000 0x81 0x1 0x0 0x0 0x0 0x7ffd0 0x7f01\n"), None, "a wake");
        assert_eq!(parse_futex_wait("230 0x0 0x0 0x7fff355677a0 0x7fff355677e0 0x0 0x0 0x7fff35567788 0x7fc72a4e2503\n"), None);
        assert_eq!(parse_futex_wait("running\n"), None);
        assert_eq!(parse_futex_wait("-1 0x7ffd 0x7f01\n"), None, "blocked, not in a system call");
    }
}
