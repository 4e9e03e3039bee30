//! One collector per tracker: each reads its kernel aggregates and yields
//! per-stack samples; none of them formats output.

pub mod allocations;
pub mod connections;
pub mod goroutines;
pub mod maps;
pub mod locks;
pub mod threads;

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use tracer_common::stacks::{StackCounts, StackKey, WalkedFrames};

/// A stack as a collector has it: an id in the kernel's stack map (probes,
/// tracepoints), or addresses read out of the target's memory (a goroutine's
/// `go` statement, a parked goroutine's frames), innermost first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SampleStack {
    Kernel(StackKey),
    Addresses(Vec<u64>),
}

impl From<StackKey> for SampleStack {
    fn from(key: StackKey) -> Self {
        SampleStack::Kernel(key)
    }
}

/// A stack a BPF program walked itself, by its key in the tracker's
/// walked-stack table (`stacks::walk_user_stack`); "[stack not recorded]"
/// when it is not there.
pub fn walked_stack(frames: &BpfHashMap<MapData, u64, WalkedFrames>, key: u64) -> SampleStack {
    match frames.get(&key, 0) {
        Ok(f) => SampleStack::Addresses(f.ips[..(f.len as usize).min(f.ips.len())].to_vec()),
        Err(_) => SampleStack::Kernel(StackKey { stack_id: -1, caller: 0 }),
    }
}

/// The empty stack (shown as "[stack not recorded]").
impl Default for SampleStack {
    fn default() -> Self {
        SampleStack::Addresses(Vec::new())
    }
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
    pub blocked: Option<goroutines::Blocked>,
    /// Maps: the map's variable (`main.cache`) or address; one series per
    /// map (the stack is the latest growth's and may change).
    pub map: Option<String>,
    /// Allocations: bytes alive now.
    pub live_bytes: Option<u64>,
}

/// Counter totals read from the kernel side.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub events: u64,
    pub lost_events: u64,
    pub lost_stacks: u64,
    pub lost_ring: u64,
    /// Thread tracker events (created, ended).
    pub thread_events: u64,
    /// Map tracker: growth and clear events.
    pub map_events: u64,
    /// Map tracker: maps not tracked (table full).
    pub map_lost: u64,
    /// Allocation tracker events (blocks allocated, freed).
    pub alloc_events: u64,
    /// Frees of blocks allocated before attach (or not sampled).
    pub alloc_untracked_frees: u64,
    /// Blocks not tracked: live-block or pending-call table full.
    pub alloc_lost: u64,
    /// Lock tracker: contended waits recorded.
    pub lock_waits: u64,
    /// Lock tracker: waits or wakes dropped (a full table).
    pub lock_lost: u64,
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
