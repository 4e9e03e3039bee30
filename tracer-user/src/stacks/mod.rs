//! User-side stack code: stacks as collectors have them ([`SampleStack`]:
//! a kernel stack id or addresses walked by a BPF program or read from
//! memory), where a libc wrapper keeps its caller's return address
//! (`syscall_sites`), addresses to frames (`symbolize`), and stack keys to
//! symbolized frames, cached (`resolve`), and the unwind rules the kernel
//! side walks code without frame pointers with (`unwind`). The kernel-side
//! walkers are `tracer-ebpf/src/stacks.rs`.

pub mod resolve;
pub mod symbolize;
pub mod syscall_sites;
pub mod unwind;

use aya::maps::{HashMap as BpfHashMap, MapData};
use tracer_common::stacks::{StackKey, WalkedFrames, MAX_WALKED_FRAMES};

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
/// walked-stack table (`stacks::walk_user_stack`, `unwind_user_stack`);
/// "[stack not recorded]" when it is not there.
pub fn walked_stack(frames: &BpfHashMap<MapData, u64, WalkedFrames>, key: u64) -> SampleStack {
    match frames.get(&key, 0) {
        Ok(f) => {
            let mut ips = f.ips[..(f.len as usize).min(f.ips.len())].to_vec();
            // A walk cut at a pc without a rule, finished from its snapshot.
            if let Some(more) = unwind::completed_frames(key) {
                ips.extend(more);
                ips.truncate(MAX_WALKED_FRAMES);
            }
            SampleStack::Addresses(ips)
        }
        Err(_) => SampleStack::Kernel(StackKey { stack_id: -1, caller: 0 }),
    }
}

/// The empty stack (shown as "[stack not recorded]").
impl Default for SampleStack {
    fn default() -> Self {
        SampleStack::Addresses(Vec::new())
    }
}

