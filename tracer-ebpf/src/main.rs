//! leaktrace's kernel side: one module per tracker, as in `tracer-common` and
//! `tracer-user/src/trackers`. Everything here filters on the target's tgid
//! first, aggregates per creation stack in maps, and sends only rare events
//! through a ring buffer.
#![no_std]
#![no_main]

mod allocations;
mod connections;
mod fds;
mod jvm;
mod goroutines;
mod hub;
mod maps;
mod process;
mod locks;
mod stacks;
mod threads;
mod unmapped;

use aya_ebpf::{macros::map, maps::PerCpuArray};
use tracer_common::counter;

/// Process (tgid) being traced; set by user space at load time.
#[no_mangle]
static TARGET_TGID: u32 = 0;

/// Flags of the hash maps a program inserts into only at rare events (a
/// new stack, object, rule): their entries are allocated when inserted
/// rather than all at load, so a load costs the kernel what it tracks, not
/// its bounds (a target of the agent with the default trackers: ~68 MiB
/// preallocated before). Tables written on hot paths (`ALLOCS`,
/// `ALLOC_PENDING`) and LRU maps stay preallocated.
const NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

/// Event and loss counters, per CPU; see `tracer_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// The tgid of the caller when it is the target, else `None`.
#[inline(always)]
fn target_tgid() -> Option<u32> {
    let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a plain read of a global that user space wrote before load.
    let target = unsafe { core::ptr::read_volatile(&TARGET_TGID) };
    if tgid == target && target != 0 {
        Some(tgid)
    } else {
        None
    }
}

/// Adds one to a per-CPU counter.
#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
