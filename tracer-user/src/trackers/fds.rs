//! File-descriptor tracker, user side: reads per-stack fd totals from the
//! kernel, reconciles the live-fd table with /proc/PID/fd (an fd gone, or
//! now naming another object, was closed behind our back), and yields one
//! sample per creation stack with its fd type, the first path seen and how
//! many distinct paths its live fds name.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use tracer_common::{
    fds::{counter, fd_type, flag, FdInfo, FdKey, MAX_FD_STACKS},
    stacks::{StackCounts, StackKey, WalkedFrames, MAX_WALKED_STACKS, WALKED_STACK},
};

use super::{fd_table::LiveFds, stack_samples, Collected, Counters, Judging, LiveStack, StackSample, Tally, Target, Tracker, TrackerSpec};
use crate::{
    cli::TraceOptions,
    probes::{LoadSettings, Probes, Tracepoints},
    procfs::{self, FdEntry},
    report::Kind,
    stacks::{walked_stack, SampleStack},
};

/// The fd tracker in the registry (opt-in: `--track fds`).
pub const SPEC: TrackerSpec = TrackerSpec { name: "fds", default: false, configure, new };

/// Tables full size only when the tracker runs (their entries are
/// allocated as inserted, but each costs its bucket array).
fn configure(load: &mut LoadSettings, _opts: &TraceOptions, active: bool) {
    load.max_entries.push(("FDS_LIVE", if active { tracer_common::fds::MAX_LIVE_FDS } else { 1 }));
    load.max_entries.push(("FDS_FRAMES", if active { MAX_WALKED_STACKS } else { 1 }));
    load.max_entries.push(("FDS_FINALIZED", if active { tracer_common::fds::MAX_FD_STACKS } else { 1 }));
}

fn new(probes: &mut Probes, _opts: &TraceOptions, target: &Target) -> Result<Box<dyn Tracker>> {
    Ok(Box::new(FdCollector::new(probes, target.pid)?))
}

/// Exit tracepoints (arguments from the saved user registers), close at entry.
const TRACEPOINTS: Tracepoints = &[
    ("fds_new_exit", "syscalls", "sys_exit_open"),
    ("fds_new_exit", "syscalls", "sys_exit_openat"),
    ("fds_new_exit", "syscalls", "sys_exit_openat2"),
    ("fds_new_exit", "syscalls", "sys_exit_creat"),
    ("fds_new_exit", "syscalls", "sys_exit_epoll_create"),
    ("fds_new_exit", "syscalls", "sys_exit_epoll_create1"),
    ("fds_new_exit", "syscalls", "sys_exit_eventfd"),
    ("fds_new_exit", "syscalls", "sys_exit_eventfd2"),
    ("fds_new_exit", "syscalls", "sys_exit_timerfd_create"),
    ("fds_new_exit", "syscalls", "sys_exit_signalfd"),
    ("fds_new_exit", "syscalls", "sys_exit_signalfd4"),
    ("fds_new_exit", "syscalls", "sys_exit_inotify_init"),
    ("fds_new_exit", "syscalls", "sys_exit_inotify_init1"),
    ("fds_new_exit", "syscalls", "sys_exit_fanotify_init"),
    ("fds_new_exit", "syscalls", "sys_exit_memfd_create"),
    ("fds_new_exit", "syscalls", "sys_exit_userfaultfd"),
    ("fds_new_exit", "syscalls", "sys_exit_pidfd_open"),
    ("fds_new_exit", "syscalls", "sys_exit_pidfd_getfd"),
    ("fds_pair_exit", "syscalls", "sys_exit_pipe"),
    ("fds_pair_exit", "syscalls", "sys_exit_pipe2"),
    ("fds_pair_exit", "syscalls", "sys_exit_socketpair"),
    ("fds_dup_exit", "syscalls", "sys_exit_dup"),
    ("fds_dup_exit", "syscalls", "sys_exit_dup2"),
    ("fds_dup_exit", "syscalls", "sys_exit_dup3"),
    ("fds_dup_exit", "syscalls", "sys_exit_fcntl"),
    ("fds_recvmsg_exit", "syscalls", "sys_exit_recvmsg"),
    ("fds_close_enter", "syscalls", "sys_enter_close"),
    ("fds_close_range_exit", "syscalls", "sys_exit_close_range"),
];

/// Distinct paths remembered per stack; beyond it the count stops (shown as
/// a lower bound).
const MAX_PATHS_PER_STACK: usize = 1024;

impl Tracker for FdCollector {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn tracepoints(&self) -> Tracepoints {
        TRACEPOINTS
    }

    fn poll(&mut self) {
        self.live.poll_close_ranges();
    }

    fn on_start(&mut self, _probes: &mut Probes, _target: &Target) {
        self.live.set_finalizer_range();
    }

    /// fds of the old image made CLOEXEC end at exec; the others survive.
    fn on_exec(&mut self, _probes: &mut Probes, _target: &Target, at_ns: u64) {
        self.live.end_where(|_, info| info.flags & flag::CLOEXEC != 0 && info.created_ns < at_ns);
        self.live.set_finalizer_range();
    }

    fn collect(&mut self, _probes: &mut Probes, target: &Target, counters: &super::Counters, now_ns: u64) -> Result<Collected> {
        let samples = self.collect_samples(now_ns, target.alive, counters.sum(tracer_common::fds::counter::EVENTS))?;
        Ok(Collected::Growth { kind: Kind::Fd, judging: Judging::ObjectsSinceAttach, samples })
    }

    fn tally(&self, counters: &Counters) -> Tally {
        Tally { events: vec![(Kind::Fd, counters.sum(counter::EVENTS))], ..Tally::default() }
    }
}

/// What one live fd was when first seen in /proc.
#[derive(Clone)]
struct Seen {
    entry: FdEntry,
}

/// What is known of a stack's fds: their type, the first path seen, the
/// distinct paths (bounded).
#[derive(Default)]
struct StackInfo {
    fd_type: Option<&'static str>,
    first_path: Option<String>,
    paths: HashSet<String>,
}

/// Reads the fd tracker's maps for one target.
pub struct FdCollector {
    pid: u32,
    live: LiveFds<FdInfo>,
    stacks: PerCpuHashMap<MapData, StackKey, StackCounts>,
    frames: BpfHashMap<MapData, u64, WalkedFrames>,
    /// Per stack: fds Go's finalizer goroutine closed (an `*os.File`
    /// dropped without `Close`).
    finalized: PerCpuHashMap<MapData, StackKey, u64>,
    /// Each live entry (keyed with its creation time) as first seen in /proc.
    seen: HashMap<(FdKey, u64), Seen>,
    /// Per stack (bounded by the kernel's per-stack table).
    info: HashMap<StackKey, StackInfo>,
}

impl FdCollector {
    /// Takes the tracker's maps out of the loaded object.
    pub fn new(probes: &mut Probes, pid: u32) -> Result<Self> {
        probes.seed_overflow_stack::<StackCounts>("FDS_STACKS")?;
        Ok(Self {
            pid,
            live: LiveFds::new(probes, pid, "FDS_LIVE", "FDS_EVENTS", "FDS_FINALIZER")?,
            stacks: probes.take_map("FDS_STACKS")?,
            frames: probes.take_map("FDS_FRAMES")?,
            finalized: probes.take_map("FDS_FINALIZED")?,
            seen: HashMap::new(),
            info: HashMap::new(),
        })
    }

    /// One sample per creation stack; when the target is gone the table is
    /// left as it was at exit.
    /// `events`: the tracker's `EVENTS` counter, read before the table.
    pub fn collect_samples(&mut self, now_ns: u64, target_alive: bool, events: u64) -> Result<Vec<StackSample>> {
        self.live.poll_close_ranges();
        let live: Vec<(FdKey, FdInfo)> = self.live.live(events);
        let mut stale = HashSet::new();
        if target_alive {
            // As the connection tracker: an fd in the snapshot that /proc no
            // longer lists, or lists as another object, was closed unseen.
            let table = procfs::fd_table(self.pid).ok().filter(|_| procfs::has_memory(self.pid));
            if let Some(table) = table {
                for (key, info) in &live {
                    let id = (*key, info.created_ns);
                    let gone = match table.get(&key.fd) {
                        None => true,
                        Some(now) => {
                            let first = self.seen.entry(id).or_insert_with(|| Seen { entry: now.clone() });
                            first.entry.identity != now.identity
                        }
                    };
                    if gone {
                        stale.insert(key.fd);
                        self.live.remove_stale(*key, *info);
                    }
                }
                let ids: HashSet<(FdKey, u64)> =
                    live.iter().filter(|(k, _)| !stale.contains(&k.fd)).map(|(k, i)| (*k, i.created_ns)).collect();
                self.seen.retain(|id, _| ids.contains(id));
            }
        }

        let mut per_stack: HashMap<StackKey, LiveStack> = HashMap::new();
        for (key, info) in live.iter().filter(|(k, _)| !stale.contains(&k.fd)) {
            per_stack.entry(info.stack).or_default().add(info.created_ns, None);
            let seen = self.seen.get(&(*key, info.created_ns)).map(|s| &s.entry);
            let si = self.info.entry(info.stack).or_default();
            // The kernel's type when it knew it, else what /proc says.
            let ty = match (info.fd_type, seen) {
                (fd_type::UNKNOWN, Some(e)) => e.kind,
                (t, _) => fd_type::name(t),
            };
            si.fd_type.get_or_insert(ty);
            // Only when /proc shows the object the kernel side recorded (not
            // a newer one on a reused number, before its close is handled).
            if let Some(path) = seen.filter(|e| e.kind == ty).and_then(|e| e.path.clone()) {
                si.first_path.get_or_insert_with(|| path.clone());
                if si.paths.len() < MAX_PATHS_PER_STACK {
                    si.paths.insert(path);
                }
            }
        }
        let samples = stack_samples(&self.stacks, &self.live.reconciled, per_stack, now_ns);
        // Bounded by the kernel's per-stack table.
        if self.info.len() > MAX_FD_STACKS as usize * 2 {
            let keep: HashSet<StackKey> = samples.iter().filter_map(|(s, _)| match s.stack {
                SampleStack::Kernel(k) => Some(k),
                _ => None,
            }).collect();
            self.info.retain(|k, _| keep.contains(k));
        }
        Ok(samples
            .into_iter()
            .map(|(sample, _)| {
                let key = match &sample.stack {
                    SampleStack::Kernel(k) => *k,
                    _ => StackKey::default(),
                };
                let si = self.info.get(&key);
                let by_finalizer = self.live.is_go.then(|| self.finalized.get(&key, 0).map_or(0, |v| v.iter().sum::<u64>()));
                StackSample {
                    ended_by_finalizer: by_finalizer,
                    stack: self.sample_stack(key),
                    fd_type: si.and_then(|s| s.fd_type).map(str::to_string),
                    path: si.and_then(|s| s.first_path.clone()),
                    distinct_paths: si.filter(|s| !s.paths.is_empty()).map(|s| s.paths.len() as u64),
                    ..sample
                }
            })
            .collect())
    }

    /// A kernel key as a stack the resolver understands.
    fn sample_stack(&self, key: StackKey) -> SampleStack {
        if key.stack_id != WALKED_STACK {
            return SampleStack::Kernel(key);
        }
        walked_stack(&self.frames, key.caller)
    }
}
