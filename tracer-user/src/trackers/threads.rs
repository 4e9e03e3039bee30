//! Thread tracker, user side: reads per-stack thread totals from the
//! kernel, reconciles the live-thread table with /proc/PID/task so that a
//! thread gone without an exit event never stays "live", and yields one
//! sample per creation stack with the most common name of its live threads.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use tracer_common::{
    stacks::{StackCounts, StackKey},
    threads::{counter, ThreadInfo},
};

use super::{stack_samples, Collected, Counters, Judging, LiveStack, StackSample, Tally, Target, Tracker, TrackerSpec};
use crate::{
    cli::TraceOptions,
    probes::{self, LoadSettings, Probes, Tracepoints},
    procfs::{self, MemoryMap},
    report::Kind,
    stacks::syscall_sites,
};

/// The thread tracker in the registry (a default tracker, as part of `tasks`).
pub const SPEC: TrackerSpec = TrackerSpec { name: "threads", default: true, configure, new };

/// Where `sched_process_fork` keeps the child's pid on this kernel; the
/// preallocated pending-create table minimal when the tracker does not run.
fn configure(load: &mut LoadSettings, _opts: &TraceOptions, active: bool) {
    let offset = probes::tracepoint_field_offset("sched", "sched_process_fork", "child_pid")
        .unwrap_or(tracer_common::threads::FORK_CHILD_PID_OFFSET);
    load.u32_globals.push(("FORK_CHILD_PID_AT", offset));
    if !active {
        load.minimal(&["THREAD_PENDING"]);
    }
}

fn new(probes: &mut Probes, _opts: &TraceOptions, target: &Target) -> Result<Box<dyn Tracker>> {
    Ok(Box::new(ThreadCollector::new(probes, target.pid)?))
}

/// The thread tracker's tracepoints (its `pthread_create` uprobe is
/// attached per libc).
const TRACEPOINTS: Tracepoints = &[
    ("thread_fork", "sched", "sched_process_fork"),
    ("thread_exit", "sched", "sched_process_exit"),
];

impl Tracker for ThreadCollector {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn tracepoints(&self) -> Tracepoints {
        TRACEPOINTS
    }

    fn uprobe_programs(&self) -> &'static [&'static str] {
        &["thread_create"]
    }

    /// The uprobe on the `pthread_create` of the libc the target maps (once
    /// per libc file): it gives a new thread its creator's stack.
    fn on_mappings(&mut self, probes: &mut Probes, target: &Target, mappings: &MemoryMap) {
        let Some(m) = mappings.mappings.iter().find(|m| m.executable && syscall_sites::is_libc(&m.path)) else { return };
        let path = procfs::object_path(target.pid, m);
        if self.pthread_uprobe.as_ref() == Some(&path) {
            return;
        }
        if let Err(e) = probes.attach_uprobe_at_symbol("thread_create", "pthread_create", &path, target.pid) {
            crate::output::warn(format!("{e:#}; threads get the stack seen at clone (C stacks will be wrong)"));
        }
        self.pthread_uprobe = Some(path);
    }

    fn on_start(&mut self, _probes: &mut Probes, target: &Target) {
        self.take_inventory();
        // Go programs need no libc: their goroutines are read from memory.
        let is_go = || {
            let data = std::fs::read(format!("/proc/{}/exe", target.pid)).unwrap_or_default();
            object::File::parse(&*data).is_ok_and(|elf| crate::binary::golang::is_go(&elf))
        };
        if !target.libc_loaded && self.pthread_uprobe.is_none() && !is_go() {
            crate::output::note(format!(
                "{} maps no libc (static or Go): no pthread_create probe; threads get the stack seen at clone",
                target.pid
            ));
        }
    }

    fn collect(&mut self, _probes: &mut Probes, target: &Target, counters: &super::Counters, now_ns: u64) -> Result<Collected> {
        let samples = self.collect_samples(now_ns, target.alive, counters.sum(tracer_common::threads::counter::EVENTS))?;
        Ok(Collected::Growth { kind: Kind::Thread, judging: Judging::ObjectsSinceAttach, samples })
    }

    fn tally(&self, counters: &Counters) -> Tally {
        Tally { events: vec![(Kind::Thread, counters.sum(counter::EVENTS))], ..Tally::default() }
    }
}

/// Reads the thread tracker's maps for one target.
pub struct ThreadCollector {
    pid: u32,
    threads: BpfHashMap<MapData, u32, ThreadInfo>,
    stacks: PerCpuHashMap<MapData, StackKey, StackCounts>,
    /// Threads user space found gone without an exit event, per stack.
    reconciled: HashMap<StackKey, u64>,
    /// Name of each live thread (tid, creation time), read once.
    names: HashMap<(u32, u64), String>,
    /// The libc whose `pthread_create` carries the uprobe.
    pthread_uprobe: Option<std::path::PathBuf>,
    /// Threads that existed at attach (tid -> name): reported as "before
    /// attach" groups by name, their creation stacks unknown.
    before_attach: HashMap<u32, String>,
    /// The last inventory samples, kept once the target exited.
    last_inventory: Vec<StackSample>,
    /// Whether the table was empty at the last read (skip reading again).
    empty: super::EmptyTable,
}

/// Threads from before attach remembered.
pub const MAX_INVENTORY: usize = 100_000;

impl ThreadCollector {
    /// Takes the tracker's maps out of the loaded object.
    pub fn new(probes: &mut Probes, pid: u32) -> Result<Self> {
        probes.seed_overflow_stack::<StackCounts>("THREAD_STACKS")?;
        Ok(Self {
            pid,
            threads: probes.take_map("THREADS")?,
            stacks: probes.take_map("THREAD_STACKS")?,
            reconciled: HashMap::new(),
            names: HashMap::new(),
            pthread_uprobe: None,
            before_attach: HashMap::new(),
            last_inventory: Vec::new(),
            empty: Default::default(),
        })
    }

    /// The threads the target already has at attach, with their names. The
    /// main thread is the process itself, not a thread it created: left out
    /// (so a single-threaded program, or one `run` starts, has none).
    fn take_inventory(&mut self) {
        let Ok(tasks) = procfs::task_ids(self.pid) else { return };
        for tid in tasks.into_iter().filter(|&t| t != self.pid).take(MAX_INVENTORY) {
            let name = procfs::thread_comm(self.pid, tid).unwrap_or_else(|| "?".into());
            self.before_attach.insert(tid, name);
        }
    }

    /// Samples of the threads from before attach still running, one per
    /// name (`tasks`: the target's threads now; `tracked`: threads the
    /// kernel side saw made, which may reuse an old thread's id).
    fn inventory_samples(&mut self, tasks: &HashSet<u32>, tracked: &HashSet<u32>) -> Vec<StackSample> {
        self.before_attach.retain(|tid, _| tasks.contains(tid) && !tracked.contains(tid));
        let mut groups: HashMap<&str, u64> = HashMap::new();
        for name in self.before_attach.values() {
            *groups.entry(name.as_str()).or_default() += 1;
        }
        let mut out: Vec<StackSample> = groups
            .into_iter()
            .map(|(name, n)| StackSample { live: n, thread_name: Some(name.to_string()), before_attach: true, ..Default::default() })
            .collect();
        out.sort_by(|a, b| a.thread_name.cmp(&b.thread_name));
        out
    }

    /// Ends the entry `tid` if it is still the one seen.
    fn remove_stale(&mut self, tid: u32, seen: ThreadInfo) {
        super::end_if_unchanged(&mut self.threads, tid, &seen, &mut self.reconciled);
    }

    /// One sample per creation stack. `now_ns` is CLOCK_MONOTONIC. When the
    /// target is gone the table is left as it is.
    /// `events`: the tracker's `EVENTS` counter, read before the table.
    pub fn collect_samples(&mut self, now_ns: u64, target_alive: bool, events: u64) -> Result<Vec<StackSample>> {
        // Snapshot the table first, then /proc: a thread in the snapshot
        // that /proc no longer lists ended without us seeing it.
        let threads = &self.threads;
        let live: Vec<(u32, ThreadInfo)> = self.empty.read(events, || threads.iter().filter_map(|r| r.ok()).collect());
        let mut stale = HashSet::new();
        if target_alive {
            if let Some(tasks) = procfs::task_ids(self.pid).ok().filter(|_| procfs::has_memory(self.pid)) {
                for (tid, info) in &live {
                    if !tasks.contains(tid) {
                        stale.insert(*tid);
                        self.remove_stale(*tid, *info);
                    }
                }
                if !self.before_attach.is_empty() {
                    let tracked: HashSet<u32> = live.iter().map(|(t, _)| *t).collect();
                    self.last_inventory = self.inventory_samples(&tasks, &tracked);
                }
            }
        }
        let mut ids = HashSet::new();
        let mut per_stack: HashMap<StackKey, LiveStack> = HashMap::new();
        for (tid, info) in live.iter().filter(|(t, _)| !stale.contains(t)) {
            let id = (*tid, info.created_ns);
            ids.insert(id);
            // A new thread names itself a moment after it starts: read the
            // name once it is a little older than that.
            let name = match self.names.get(&id) {
                Some(n) => Some(n.clone()),
                None if now_ns.saturating_sub(info.created_ns) > 100_000_000 => {
                    procfs::thread_comm(self.pid, *tid).inspect(|n| {
                        self.names.insert(id, n.clone());
                    })
                }
                None => procfs::thread_comm(self.pid, *tid),
            };
            per_stack.entry(info.stack).or_default().add(info.created_ns, name);
        }
        // Bounded by the live table: forget what is no longer live.
        if target_alive {
            self.names.retain(|id, _| ids.contains(id));
        }

        let mut samples: Vec<StackSample> = stack_samples(&self.stacks, &self.reconciled, per_stack, now_ns)
            .into_iter()
            .map(|(sample, thread_name)| StackSample { thread_name, ..sample })
            .collect();
        samples.extend(self.last_inventory.iter().cloned());
        Ok(samples)
    }
}
