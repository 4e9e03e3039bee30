//! Allocation tracker, user side: reads the per-stack totals the kernel
//! keeps (blocks and bytes allocated and freed) and each stack's sentinel
//! age, and yields one sample per creation stack. It never walks the
//! live-block table: the work per interval is bounded by the number of
//! stacks, not of blocks.

pub mod plan;
pub mod results;

use std::collections::HashMap;

use anyhow::{anyhow, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
    Ebpf,
};
use tracer_common::{
    allocations::AllocCounts,
    stacks::{StackKey, WalkedFrames, WALKED_STACK},
};

use super::{SampleStack, StackSample};

/// Reads the allocation tracker's maps for one target.
pub struct AllocationCollector {
    stacks: PerCpuHashMap<MapData, StackKey, AllocCounts>,
    oldest: BpfHashMap<MapData, StackKey, u64>,
    /// Stacks the BPF programs walked themselves (`WALKED_STACK` keys).
    frames: BpfHashMap<MapData, u64, WalkedFrames>,
}

impl AllocationCollector {
    /// Takes the tracker's maps out of the loaded object.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self> {
        let take = |ebpf: &mut Ebpf, name: &str| ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing"));
        Ok(Self {
            stacks: PerCpuHashMap::try_from(take(ebpf, "ALLOC_STACKS")?)?,
            oldest: BpfHashMap::try_from(take(ebpf, "ALLOC_OLDEST")?)?,
            frames: BpfHashMap::try_from(take(ebpf, "ALLOC_FRAMES")?)?,
        })
    }

    /// One sample per creation stack that allocated anything. `now_ns` is
    /// CLOCK_MONOTONIC. `live` counts blocks, `live_bytes` bytes; the age is
    /// the stack's sentinel block's (a lower bound of its oldest live block's).
    pub fn collect(&mut self, now_ns: u64) -> Result<Vec<StackSample>> {
        let oldest: HashMap<StackKey, u64> = self.oldest.iter().filter_map(|r| r.ok()).collect();
        let mut out = Vec::new();
        for entry in self.stacks.iter() {
            let Ok((stack, per_cpu)) = entry else { continue };
            // Wrapping: a CPU's copy can go below zero when a mapping the
            // allocator made for itself is taken back there.
            let t = per_cpu.iter().fold(AllocCounts::default(), |a, v| AllocCounts {
                created: a.created.wrapping_add(v.created),
                ended: a.ended.wrapping_add(v.ended),
                bytes_created: a.bytes_created.wrapping_add(v.bytes_created),
                bytes_ended: a.bytes_ended.wrapping_add(v.bytes_ended),
            });
            if t.created == 0 && t.ended == 0 {
                continue;
            }
            let live = t.created.saturating_sub(t.ended);
            // 0: the sentinel slot is vacant (see the kernel side).
            let age = oldest.get(&stack).filter(|&&c| live > 0 && c != 0).map(|&c| now_ns.saturating_sub(c) as f64 / 1e9);
            out.push(StackSample {
                stack: self.sample_stack(stack),
                live,
                created: t.created,
                ended: t.ended,
                // A stack with live blocks but no sentinel (its sentinel was
                // freed and no block came since) has blocks of unknown age.
                oldest_age_s: if live > 0 { Some(age.unwrap_or(0.0)) } else { None },
                peer: None,
                thread_name: None,
                live_bytes: Some(t.bytes_created.saturating_sub(t.bytes_ended)),
                ..Default::default()
            });
        }
        Ok(out)
    }

    /// A kernel key as a stack the resolver understands.
    fn sample_stack(&self, key: StackKey) -> SampleStack {
        if key.stack_id != WALKED_STACK {
            return SampleStack::Kernel(key);
        }
        super::walked_stack(&self.frames, key.caller)
    }
}
