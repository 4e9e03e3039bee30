//! Thread tracker, user side: reads per-stack thread totals from the
//! kernel, reconciles the live-thread table with /proc/PID/task so that a
//! thread gone without an exit event never stays "live", and yields one
//! sample per creation stack with the most common name of its live threads.

use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
    Ebpf,
};
use tracer_common::{
    stacks::{StackCounts, StackKey},
    threads::ThreadInfo,
};

use super::{stack_samples, LiveStack, StackSample};
use crate::procfs;

/// Reads the thread tracker's maps for one target.
pub struct ThreadCollector {
    pid: u32,
    threads: BpfHashMap<MapData, u32, ThreadInfo>,
    stacks: PerCpuHashMap<MapData, StackKey, StackCounts>,
    /// Threads user space found gone without an exit event, per stack.
    reconciled: HashMap<StackKey, u64>,
    /// Name of each live thread (tid, creation time), read once.
    names: HashMap<(u32, u64), String>,
}

impl ThreadCollector {
    /// Takes the tracker's maps out of the loaded object.
    pub fn new(ebpf: &mut Ebpf, pid: u32) -> Result<Self> {
        let take = |ebpf: &mut Ebpf, name: &str| ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing"));
        Ok(Self {
            pid,
            threads: BpfHashMap::try_from(take(ebpf, "THREADS")?)?,
            stacks: PerCpuHashMap::try_from(take(ebpf, "THREAD_STACKS")?)?,
            reconciled: HashMap::new(),
            names: HashMap::new(),
        })
    }

    /// Removes an entry if it is still the one we saw; only a successful
    /// delete counts, so the kernel and we never both count one exit.
    fn remove_stale(&mut self, tid: u32, seen: ThreadInfo) {
        match self.threads.get(&tid, 0) {
            Ok(now) if now.created_ns == seen.created_ns => {}
            _ => return,
        }
        if self.threads.remove(&tid).is_ok() {
            *self.reconciled.entry(seen.stack).or_default() += 1;
        }
    }

    /// One sample per creation stack. `now_ns` is CLOCK_MONOTONIC. When the
    /// target is gone the table is left as it is.
    pub fn collect(&mut self, now_ns: u64, target_alive: bool) -> Result<Vec<StackSample>> {
        // Snapshot the table first, then /proc: a thread in the snapshot
        // that /proc no longer lists ended without us seeing it.
        let live: Vec<(u32, ThreadInfo)> = self.threads.iter().filter_map(|r| r.ok()).collect();
        let mut stale = HashSet::new();
        if target_alive {
            if let Some(tasks) = procfs::task_ids(self.pid).ok().filter(|_| procfs::has_memory(self.pid)) {
                for (tid, info) in &live {
                    if !tasks.contains(tid) {
                        stale.insert(*tid);
                        self.remove_stale(*tid, *info);
                    }
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

        Ok(stack_samples(&self.stacks, &self.reconciled, per_stack, now_ns)
            .into_iter()
            .map(|(sample, thread_name)| StackSample { thread_name, ..sample })
            .collect())
    }
}
