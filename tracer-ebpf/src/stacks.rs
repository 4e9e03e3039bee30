//! User stacks taken in syscall tracepoints, with the caller the
//! frame-pointer walk misses put back.
//!
//! Inside a libc syscall wrapper (no frame of its own) the walk goes from the
//! wrapper straight to its caller's caller. User space disassembles the
//! wrappers and fills `SYSCALL_SITES` with where the return address sits
//! relative to `sp` at each `syscall` instruction; here we read it.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs},
    macros::map,
    maps::{HashMap, StackTrace},
    programs::{tracing::StackIdContext, TracePointContext},
};
use tracer_common::{
    counter,
    stacks::{StackKey, SyscallSite},
};

/// User stacks of every tracker, deduplicated by the kernel.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// Address after a `syscall` instruction in a libc wrapper -> return-address offset.
#[map]
static SYSCALL_SITES: HashMap<u64, SyscallSite> = HashMap::with_max_entries(1024, 0);

/// x86-64 `struct pt_regs`, in 8-byte slots: ip and sp.
const PT_REGS_IP: usize = 16;
const PT_REGS_SP: usize = 19;

/// The current user stack as a [`StackKey`]; counts a lost stack on failure.
#[inline(always)]
pub fn user_stack(ctx: &TracePointContext) -> StackKey {
    let stack_id = match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id,
        Err(_) => {
            crate::bump(counter::LOST_STACKS);
            -1
        }
    };
    StackKey { stack_id, caller: missing_caller() }
}

/// The wrapper's return address when the current syscall site is known.
#[inline(always)]
fn missing_caller() -> u64 {
    // SAFETY: helpers read the current task's saved user registers and the
    // user stack; failures yield 0.
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const u64;
        if regs.is_null() {
            return 0;
        }
        let ip: u64 = match bpf_probe_read_kernel(regs.add(PT_REGS_IP)) {
            Ok(v) => v,
            Err(_) => return 0,
        };
        let site = match SYSCALL_SITES.get(&ip) {
            Some(s) => *s,
            None => return 0,
        };
        let sp: u64 = match bpf_probe_read_kernel(regs.add(PT_REGS_SP)) {
            Ok(v) => v,
            Err(_) => return 0,
        };
        bpf_probe_read_user((sp + site.ret_offset as u64) as *const u64).unwrap_or(0)
    }
}
