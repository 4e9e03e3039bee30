//! The trackers: each one is a [`Tracker`] implementation under its own
//! name (`trackers/X.rs`, beside `tracer-ebpf/src/X.rs` and
//! `tracer-common/src/X.rs`), listed once in [`REGISTRY`]. The session
//! loops over them and never names one; none of them formats output.

pub mod allocations;
pub mod connections;
pub mod fd_table;
pub mod fds;
pub mod goroutines;
pub mod maps;
pub mod locks;
pub mod threads;
pub mod waits;

use std::collections::HashMap;

use anyhow::Result;
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use tracer_common::stacks::{StackCounts, StackKey};

use crate::{
    stacks::SampleStack,
    cli::TraceOptions,
    probes::{LoadSettings, Probes, Tracepoints},
    procfs::MemoryMap,
    report::Kind,
};

/// One tracker: what it loads and attaches, and what it yields each
/// interval. Constructed by its [`TrackerSpec`] once the eBPF object is
/// loaded; every hook but [`Tracker::collect`] and [`Tracker::tally`] has a
/// default that does nothing.
pub trait Tracker {
    /// Its name: the module's, and the `--track` name.
    fn name(&self) -> &'static str;

    /// Tracepoints to attach (program, category, event).
    fn tracepoints(&self) -> Tracepoints {
        &[]
    }

    /// Uprobe programs it attaches at once when the target maps the object
    /// they probe: verified with the tracepoints', in parallel, before
    /// anything is attached (others load when first attached).
    fn uprobe_programs(&self) -> &'static [&'static str] {
        &[]
    }

    /// The target's mappings were read (at attach, every interval, after an
    /// exec): probes go into objects as they appear (libc loaded late,
    /// `dlopen`). Must be cheap when nothing is new.
    fn on_mappings(&mut self, _probes: &mut Probes, _target: &Target, _mappings: &MemoryMap) {}

    /// `run`: the command leaktrace started is about to exec `program`.
    /// Probes by file go in now, before its first instruction (a uprobe on
    /// a file applies to mappings made later).
    fn before_exec(&mut self, _probes: &mut Probes, _target: &Target, _program: &std::path::Path) {}

    /// The target runs and its first mappings were handed to
    /// [`Tracker::on_mappings`]: set up what needs a running image.
    fn on_start(&mut self, _probes: &mut Probes, _target: &Target) {}

    /// The report's findings were judged (before any display cut): probes
    /// that follow a verdict go in or out.
    fn on_findings(&mut self, _probes: &mut Probes, _target: &Target, _findings: &[crate::report::Finding], _own: &crate::stacks::symbolize::OwnCode) {}

    /// Called every 100 ms: handle rare events a ring buffer holds.
    fn poll(&mut self) {}

    /// The target exec'd at `at_ns` (ktime): a new image.
    fn on_exec(&mut self, _probes: &mut Probes, _target: &Target, _at_ns: u64) {}

    /// This interval's samples (`counters`: the kernel side's, e.g. to
    /// tell that a live table cannot have changed, see [`EmptyTable`]).
    fn collect(&mut self, probes: &mut Probes, target: &Target, counters: &Counters, now_ns: u64) -> Result<Collected>;

    /// Events seen and lost, from the shared counters and its own.
    fn tally(&self, counters: &Counters) -> Tally;

    /// A line for stderr when the trace ends (e.g. what the scans cost).
    fn closing_note(&self) -> Option<String> {
        None
    }
}

/// The trackers a session runs, in registry order: each hook called on
/// every one of them.
#[derive(Default)]
pub struct Trackers(pub Vec<Box<dyn Tracker>>);

impl Trackers {
    /// Loads every tracker's tracepoint and early uprobe programs in
    /// parallel (see [`Probes::preload`]), before anything is attached.
    pub fn preload(&self, probes: &mut Probes) -> Result<()> {
        let names: Vec<&'static str> = self
            .0
            .iter()
            .flat_map(|t| t.tracepoints().iter().map(|&(p, _, _)| p).chain(t.uprobe_programs().iter().copied()))
            .collect();
        probes.preload(&names)
    }

    /// Attaches every tracker's tracepoints.
    pub fn attach_tracepoints(&self, probes: &mut Probes) -> Result<()> {
        self.0.iter().try_for_each(|t| probes.attach_tracepoints(t.tracepoints()))
    }

    /// [`Tracker::before_exec`] of each.
    pub fn before_exec(&mut self, probes: &mut Probes, target: &Target, program: &std::path::Path) {
        self.0.iter_mut().for_each(|t| t.before_exec(probes, target, program));
    }

    /// [`Tracker::on_mappings`] of each.
    pub fn on_mappings(&mut self, probes: &mut Probes, target: &Target, mappings: &MemoryMap) {
        self.0.iter_mut().for_each(|t| t.on_mappings(probes, target, mappings));
    }

    /// [`Tracker::on_start`] of each.
    pub fn on_start(&mut self, probes: &mut Probes, target: &Target) {
        self.0.iter_mut().for_each(|t| t.on_start(probes, target));
    }

    /// [`Tracker::on_exec`] of each.
    pub fn on_exec(&mut self, probes: &mut Probes, target: &Target, at_ns: u64) {
        self.0.iter_mut().for_each(|t| t.on_exec(probes, target, at_ns));
    }

    /// [`Tracker::on_findings`] of each.
    pub fn on_findings(&mut self, probes: &mut Probes, target: &Target, findings: &[crate::report::Finding], own: &crate::stacks::symbolize::OwnCode) {
        self.0.iter_mut().for_each(|t| t.on_findings(probes, target, findings, own));
    }

    /// [`Tracker::poll`] of each.
    pub fn poll(&mut self) {
        self.0.iter_mut().for_each(|t| t.poll());
    }

    /// Every tracker's samples of this interval.
    pub fn collect(&mut self, probes: &mut Probes, target: &Target, counters: &Counters, now_ns: u64) -> Result<Vec<Collected>> {
        self.0.iter_mut().map(|t| t.collect(probes, target, counters, now_ns)).collect()
    }

    /// Every tracker's tally in one.
    pub fn tally(&self, counters: &Counters) -> Tally {
        Tally::sum(self.0.iter().map(|t| t.tally(counters)))
    }

    /// Every tracker's closing line.
    pub fn closing_notes(&self) -> Vec<String> {
        self.0.iter().filter_map(|t| t.closing_note()).collect()
    }
}

/// A tracker as the registry knows it before it runs.
pub struct TrackerSpec {
    /// The `--track` name.
    pub name: &'static str,
    /// Run when `--track` is not given.
    pub default: bool,
    /// Sets map sizes and globals before the object is loaded; called for
    /// every tracker, `active` or not (a tracker that does not run makes its
    /// preallocated tables minimal).
    pub configure: fn(&mut LoadSettings, &TraceOptions, active: bool),
    /// Takes its maps out of the loaded object.
    pub new: fn(&mut Probes, &TraceOptions, &Target) -> Result<Box<dyn Tracker>>,
}

/// `TrackerSpec::configure` of a tracker whose tables need no sizing.
pub fn no_settings(_load: &mut LoadSettings, _opts: &TraceOptions, _active: bool) {}

/// Every tracker this build has, in report order. Adding a tracker is one
/// line here (and its three same-named modules).
pub static REGISTRY: &[TrackerSpec] = &[
    connections::SPEC,
    fds::SPEC,
    threads::SPEC,
    goroutines::SPEC,
    maps::SPEC,
    allocations::SPEC,
    locks::SPEC,
    waits::SPEC,
];

/// Names that stand for several trackers on the command line.
pub const ALIASES: &[(&str, &[&str])] = &[
    // Native threads, and goroutines in Go programs.
    ("tasks", &["threads", "goroutines"]),
];

/// The traced process as trackers see it.
pub struct Target {
    pub pid: u32,
    /// Everything the target mapped since attach (or since its last exec).
    pub memory: MemoryMap,
    /// The target's libc is mapped and its syscall sites are known.
    pub libc_loaded: bool,
    /// The target still runs: its tables may be reconciled with /proc (once
    /// it exited they are left as they were at exit).
    pub alive: bool,
}

/// What a tracker yields per interval.
pub enum Collected {
    /// Objects per creation stack, judged by growth.
    Growth { kind: Kind, judging: Judging, samples: Vec<StackSample> },
    /// Contended locks, judged by contention.
    Contention(Vec<locks::LockSample>),
    /// Waits going on now, by waiter stack (`judge::waits`).
    Waits(Vec<crate::judge::waits::WaitSample>),
    /// Nothing this interval (a tracker that does not apply to the target).
    Nothing,
}

/// How a kind's growth series are judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judging {
    /// On live objects; everything counted was created after attach, so a
    /// stack first seen had nothing live at the previous sample.
    ObjectsSinceAttach,
    /// On live objects whose first count is real (may predate the attach).
    Objects,
    /// On live bytes (a rise below a noise floor ignored), with live
    /// objects giving `growth_per_min`; created after attach.
    BytesSinceAttach,
}

/// A tracker's share of the report's event and loss counts.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Events seen, per kind.
    pub events: Vec<(Kind, u64)>,
    /// Events not tracked (its tables full, its bounds hit).
    pub lost: u64,
    /// Frees of blocks never seen allocated (allocations only).
    pub untracked_frees: Option<u64>,
}

/// What a collector says about one creation stack at one instant.
/// Collectors fill what they know and leave the rest `..Default::default()`.
#[derive(Clone, Debug, Default)]
pub struct StackSample {
    pub stack: SampleStack,
    /// Objects alive now.
    pub live: u64,
    /// Created since attach.
    pub created: u64,
    /// Ended since attach.
    pub ended: u64,
    /// Age of the oldest live object, seconds.
    pub oldest_age_s: Option<f64>,
    /// Connections: most common peer of the live ones.
    pub peer: Option<String>,
    /// Threads: most common name of the live ones.
    pub thread_name: Option<String>,
    /// Goroutines: where one of the live ones is parked now, and why.
    pub blocked: Option<Blocked>,
    /// Maps: the map's variable (`main.cache`) or address; one series per
    /// map (the stack is the latest growth's and may change).
    pub map: Option<String>,
    /// Allocations: bytes alive now.
    pub live_bytes: Option<u64>,
    /// Connections of a Go program: how many of `ended` the runtime's
    /// finalizer goroutine closed.
    pub ended_by_finalizer: Option<u64>,
    /// Objects that existed before attach, grouped by what is known of
    /// them (`peer`, `thread_name`): their creation stack is unknown.
    pub before_attach: bool,
    /// fds: their type, first path, distinct paths.
    pub fd_type: Option<String>,
    pub path: Option<String>,
    pub distinct_paths: Option<u64>,
    /// Maps and goroutines: the memory one more object takes (an entry,
    /// a goroutine's stack), for time to exhaustion.
    pub bytes_per_object: Option<u64>,
    /// Goroutines of a library's `go` statement: the stack that ran it
    /// (its first frame the statement itself), shown above the statement.
    pub created_by: Option<SampleStack>,
}

impl Tally {
    /// Every tracker's tally in one.
    pub fn sum(tallies: impl IntoIterator<Item = Tally>) -> Tally {
        tallies.into_iter().fold(Tally::default(), |mut all, t| {
            all.events.extend(t.events);
            all.lost += t.lost;
            all.untracked_frees = all.untracked_frees.or(t.untracked_frees);
            all
        })
    }
}

/// Where a live object is parked now, and why (a goroutine's wait).
#[derive(Clone, Debug)]
pub struct Blocked {
    /// Its current stack (empty when running or in a syscall).
    pub stack: SampleStack,
    /// The runtime's wait reason ("chan receive", "select"...).
    pub wait_reason: String,
}

/// The kernel side's per-CPU event and loss counters
/// (`tracer_common::counter`), summed over CPUs when read.
pub struct Counters(pub PerCpuArray<MapData, u64>);

impl Counters {
    /// The total of counter `index` over every CPU.
    pub fn sum(&self, index: u32) -> u64 {
        self.0.get(&index, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0)
    }
}

/// Whether a kernel live table (sockets, fds, threads) found empty can
/// have changed: the kernel side inserts only with a bump of the tracker's
/// `EVENTS` counter after it, and user space only removes. So an empty
/// table stays empty while that counter stands still, and reading it again
/// is skipped: iterating a hash map walks all its buckets (65 536 for
/// sockets and threads) even when it holds nothing, which was a fifth of
/// what 50 idle targets cost the agent.
#[derive(Default)]
pub struct EmptyTable {
    /// The counter's value when the table was last read empty.
    events_when_empty: Option<u64>,
}

impl EmptyTable {
    /// The table's rows by `read`, or none without reading when it was read
    /// empty at `events` (the counter, read before the table) and the
    /// counter still says so.
    pub fn read<T>(&mut self, events: u64, read: impl FnOnce() -> Vec<T>) -> Vec<T> {
        if self.events_when_empty == Some(events) {
            return Vec::new();
        }
        let rows = read();
        self.events_when_empty = rows.is_empty().then_some(events);
        rows
    }
}

/// An entry of a kernel live-object table (sockets, fds, threads): when
/// it was created and by which stack.
pub trait LiveEntry: aya::Pod {
    fn created_ns(&self) -> u64;
    fn stack(&self) -> StackKey;
}

macro_rules! live_entry {
    ($($t:ty),*) => {$(
        impl LiveEntry for $t {
            fn created_ns(&self) -> u64 {
                self.created_ns
            }
            fn stack(&self) -> StackKey {
                self.stack
            }
        }
    )*};
}
live_entry!(tracer_common::connections::ConnInfo, tracer_common::fds::FdInfo, tracer_common::threads::ThreadInfo);

/// Removes `key` from a live table if it still holds the entry `seen` (same
/// creation time: not a newer object on a reused fd or tid), counting it as
/// ended under its stack in `reconciled`. Only a successful delete counts,
/// so the kernel side and user space never both count one end.
pub fn end_if_unchanged<K: aya::Pod, V: LiveEntry>(
    table: &mut aya::maps::HashMap<MapData, K, V>,
    key: K,
    seen: &V,
    reconciled: &mut HashMap<StackKey, u64>,
) {
    match table.get(&key, 0) {
        Ok(now) if now.created_ns() == seen.created_ns() => {}
        _ => return,
    }
    if table.remove(&key).is_ok() {
        *reconciled.entry(seen.stack()).or_default() += 1;
    }
}

/// The live objects of one creation stack, gathered while a collector walks
/// its live table: the oldest one's creation time and how often each label
/// (a peer, a thread name) occurs.
#[derive(Default)]
pub struct LiveStack {
    oldest_ns: Option<u64>,
    labels: HashMap<String, u64>,
}

impl LiveStack {
    /// Adds one live object created at `created_ns` (ktime).
    pub fn add(&mut self, created_ns: u64, label: Option<String>) {
        self.oldest_ns = Some(self.oldest_ns.map_or(created_ns, |o| o.min(created_ns)));
        if let Some(l) = label {
            *self.labels.entry(l).or_default() += 1;
        }
    }
}

/// One sample per stack of a tracker's per-stack table (per-CPU totals
/// summed, minus what reconciliation ended), with the most common label of
/// the stack's live objects. Stacks that never counted anything are skipped.
pub fn stack_samples(
    table: &PerCpuHashMap<MapData, StackKey, StackCounts>,
    reconciled: &HashMap<StackKey, u64>,
    mut live: HashMap<StackKey, LiveStack>,
    now_ns: u64,
) -> Vec<(StackSample, Option<String>)> {
    let mut out = Vec::new();
    for entry in table.iter() {
        let Ok((stack, per_cpu)) = entry else { continue };
        let (created, ended) = per_cpu.iter().fold((0u64, 0u64), |(c, e), v| (c + v.created, e + v.ended));
        let ended = ended + reconciled.get(&stack).copied().unwrap_or(0);
        if created == 0 && ended == 0 {
            continue;
        }
        let acc = live.remove(&stack).unwrap_or_default();
        let sample = StackSample {
            stack: SampleStack::Kernel(stack),
            live: created.saturating_sub(ended),
            created,
            ended,
            oldest_age_s: acc.oldest_ns.map(|c| now_ns.saturating_sub(c) as f64 / 1e9),
            peer: None,
            thread_name: None,
            blocked: None,
            map: None,
            live_bytes: None,
            ended_by_finalizer: None,
            before_attach: false,
            fd_type: None,
            path: None,
            distinct_paths: None,
            bytes_per_object: None,
            created_by: None,
        };
        out.push((sample, most_common(acc.labels)));
    }
    out
}

/// The most frequent label; ties go to the smallest (stable output).
pub fn most_common(labels: HashMap<String, u64>) -> Option<String> {
    labels.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))).map(|(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_common_label_wins_ties_by_name() {
        let m: HashMap<String, u64> = [("watcher".to_string(), 3), ("job".to_string(), 1)].into();
        assert_eq!(most_common(m).as_deref(), Some("watcher"));
        let m: HashMap<String, u64> = [("b".to_string(), 2), ("a".to_string(), 2)].into();
        assert_eq!(most_common(m).as_deref(), Some("a"));
        assert_eq!(most_common(HashMap::new()), None);
    }

    #[test]
    fn live_stack_keeps_the_oldest_and_counts_labels() {
        let mut l = LiveStack::default();
        l.add(30, Some("a".into()));
        l.add(10, None);
        l.add(20, Some("a".into()));
        assert_eq!(l.oldest_ns, Some(10));
        assert_eq!(l.labels.get("a"), Some(&2));
    }
}
