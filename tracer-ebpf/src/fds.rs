//! File-descriptor tracker, kernel side: every non-socket fd of the target
//! (files, pipes, socketpairs, epoll, eventfd, timerfd, signalfd, inotify,
//! fanotify, memfd, userfaultfd, pidfd, dups, SCM_RIGHTS), from the syscall
//! that made it to the one that ended it, counted per creation stack.
//!
//! As the connection tracker: syscall exit tracepoints reading the call's
//! arguments from the saved user registers (no uprobe, no per-thread
//! state), close at entry, close_range through the ring. One program serves
//! every syscall that returns one new fd, telling them apart by the record's
//! syscall number. Stacks go through `stacks::app_stack`, which also finds
//! the application under `fopen`'s chain of libc frames.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TracePointContext,
};
use tracer_common::{
    counter,
    fds::{counter as fd_counter, fd_type, flag, ring_kind, FdInfo, FdKey, FdRingEvent, MAX_FD_STACKS, MAX_LIVE_FDS},
    stacks::{StackCounts, StackKey, WalkedFrames, MAX_WALKED_STACKS},
};

use crate::{
    bump,
    stacks::{app_stack, closed_by_go_finalizer, count, count_one, counted_stack, read_user_u64, syscall_args},
    target_tgid,
};

/// Live fds of the target.
#[map]
static FDS_LIVE: HashMap<FdKey, FdInfo> = HashMap::with_max_entries(MAX_LIVE_FDS, crate::NO_PREALLOC);

/// Per creation stack: fds opened and closed (per CPU).
#[map]
static FDS_STACKS: PerCpuHashMap<StackKey, StackCounts> = PerCpuHashMap::with_max_entries(MAX_FD_STACKS, crate::NO_PREALLOC);

/// Stacks walked by `app_stack` (fds made deep inside libc).
#[map]
static FDS_FRAMES: HashMap<u64, WalkedFrames> = HashMap::with_max_entries(MAX_WALKED_STACKS, crate::NO_PREALLOC);

#[map]
static FDS_SCRATCH: PerCpuArray<WalkedFrames> = PerCpuArray::with_max_entries(1, 0);

/// Per creation stack: fds closed by the Go runtime's finalizer goroutine
/// (an `*os.File` dropped without `Close`), per CPU.
#[map]
static FDS_FINALIZED: PerCpuHashMap<StackKey, u64> = PerCpuHashMap::with_max_entries(MAX_FD_STACKS, crate::NO_PREALLOC);

/// `runtime.runfinq`'s pc range in the target, set by user space for a Go
/// target (`stacks::closed_by_go_finalizer`).
#[map]
static FDS_FINALIZER: Array<u64> = Array::with_max_entries(2, 0);

/// Rare events user space must act on (close_range).
#[map]
static FDS_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// x86-64 syscall numbers (the exit record's `__syscall_nr`).
mod nr {
    pub const OPEN: i32 = 2;
    pub const PIPE: i32 = 22;
    pub const DUP: i32 = 32;
    pub const DUP2: i32 = 33;
    pub const SOCKETPAIR: i32 = 53;
    pub const FCNTL: i32 = 72;
    pub const CREAT: i32 = 85;
    pub const EPOLL_CREATE: i32 = 213;
    pub const INOTIFY_INIT: i32 = 253;
    pub const OPENAT: i32 = 257;
    pub const SIGNALFD: i32 = 282;
    pub const TIMERFD_CREATE: i32 = 283;
    pub const EVENTFD: i32 = 284;
    pub const SIGNALFD4: i32 = 289;
    pub const EVENTFD2: i32 = 290;
    pub const EPOLL_CREATE1: i32 = 291;
    pub const DUP3: i32 = 292;
    pub const PIPE2: i32 = 293;
    pub const INOTIFY_INIT1: i32 = 294;
    pub const FANOTIFY_INIT: i32 = 300;
    pub const MEMFD_CREATE: i32 = 319;
    pub const USERFAULTFD: i32 = 323;
    pub const PIDFD_OPEN: i32 = 434;
    pub const OPENAT2: i32 = 437;
    pub const PIDFD_GETFD: i32 = 438;
}

/// O_CLOEXEC, and the flags that share its value (SOCK_, EPOLL_, EFD_,
/// TFD_, SFD_, IN_CLOEXEC).
const O_CLOEXEC: u64 = 0o2000000;
const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;
const MSG_CMSG_CLOEXEC: u64 = 0x4000_0000;
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;

#[inline(always)]
fn syscall_nr(ctx: &TracePointContext) -> i32 {
    // SAFETY: reads within the tracepoint record.
    unsafe { ctx.read_at::<i32>(8).unwrap_or(-1) }
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: reads within the tracepoint record.
    unsafe { ctx.read_at::<i64>(16).unwrap_or(-1) }
}

#[inline(always)]
fn stack(ctx: &TracePointContext) -> StackKey {
    counted_stack(&FDS_STACKS, app_stack(ctx, &FDS_FRAMES, &FDS_SCRATCH))
}

/// Records a new live fd under `stack` (already counted in the table).
#[inline(always)]
fn opened(tgid: u32, fd: u32, stack: StackKey, ty: u8, flags: u8) {
    let key = FdKey { tgid, fd };
    // An entry left for this fd means we missed its close: end it first.
    closed(tgid, fd);
    // SAFETY: no preconditions.
    let info = FdInfo { stack, created_ns: unsafe { bpf_ktime_get_ns() }, fd_type: ty, flags, _pad: [0; 6] };
    if FDS_LIVE.insert(&key, &info, 0).is_err() {
        bump(counter::LOST_EVENTS);
        return;
    }
    count(&FDS_STACKS, &stack, 1, 0);
    bump(fd_counter::EVENTS);
}

/// Ends a live fd if it is one of ours; only the side whose delete succeeds
/// counts it (user-space reconciliation never double counts). Returns its
/// creation stack when it ended it.
#[inline(always)]
fn closed(tgid: u32, fd: u32) -> Option<StackKey> {
    let key = FdKey { tgid, fd };
    // SAFETY: copied out before removal.
    let stack = unsafe { FDS_LIVE.get(&key) }?.stack;
    if FDS_LIVE.remove(&key).is_ok() {
        count(&FDS_STACKS, &stack, 0, 1);
        bump(fd_counter::EVENTS);
        return Some(stack);
    }
    None
}

#[inline(always)]
fn cloexec_if(set: bool) -> u8 {
    if set {
        flag::CLOEXEC
    } else {
        0
    }
}

/// Every syscall that returns one new fd: its type, and whether it is
/// CLOEXEC, from its number and arguments.
#[tracepoint]
pub fn fds_new_exit(ctx: TracePointContext) -> u32 {
    let Some(tgid) = target_tgid() else { return 0 };
    let fd = ret(&ctx);
    if fd < 0 {
        return 0;
    }
    // The stack first: the verifier then walks its loops once, not once per
    // syscall's (type, flags) below.
    let stack = stack(&ctx);
    let [a0, a1, a2, a3] = syscall_args();
    let (ty, cloexec) = match syscall_nr(&ctx) {
        nr::OPEN => (fd_type::FILE, a1 & O_CLOEXEC != 0),
        nr::OPENAT => (fd_type::FILE, a2 & O_CLOEXEC != 0),
        // openat2(dirfd, path, how, size): how->flags is the first u64.
        nr::OPENAT2 => (fd_type::FILE, read_user_u64(a2) & O_CLOEXEC != 0),
        nr::CREAT => (fd_type::FILE, false),
        nr::EPOLL_CREATE => (fd_type::EPOLL, false),
        nr::EPOLL_CREATE1 => (fd_type::EPOLL, a0 & O_CLOEXEC != 0),
        nr::EVENTFD => (fd_type::EVENTFD, false),
        nr::EVENTFD2 => (fd_type::EVENTFD, a1 & O_CLOEXEC != 0),
        nr::TIMERFD_CREATE => (fd_type::TIMERFD, a1 & O_CLOEXEC != 0),
        // signalfd(fd, ...) with fd != -1 changes an existing signalfd.
        nr::SIGNALFD if a0 as i32 == -1 => (fd_type::SIGNALFD, false),
        nr::SIGNALFD4 if a0 as i32 == -1 => (fd_type::SIGNALFD, a3 & O_CLOEXEC != 0),
        nr::INOTIFY_INIT => (fd_type::INOTIFY, false),
        nr::INOTIFY_INIT1 => (fd_type::INOTIFY, a0 & O_CLOEXEC != 0),
        // FAN_CLOEXEC and MFD_CLOEXEC are 1.
        nr::FANOTIFY_INIT => (fd_type::FANOTIFY, a0 & 1 != 0),
        nr::MEMFD_CREATE => (fd_type::MEMFD, a1 & 1 != 0),
        nr::USERFAULTFD => (fd_type::USERFAULTFD, a0 & O_CLOEXEC != 0),
        // Always CLOEXEC.
        nr::PIDFD_OPEN => (fd_type::PIDFD, true),
        nr::PIDFD_GETFD => (fd_type::UNKNOWN, true),
        _ => return 0,
    };
    opened(tgid, fd as u32, stack, ty, cloexec_if(cloexec));
    0
}

/// pipe(fds), pipe2(fds, flags), socketpair(domain, type, proto, sv): two
/// new fds written to the caller's array; both ends count, under one stack.
#[tracepoint]
pub fn fds_pair_exit(ctx: TracePointContext) -> u32 {
    let Some(tgid) = target_tgid() else { return 0 };
    if ret(&ctx) != 0 {
        return 0;
    }
    let stack = stack(&ctx);
    let [a0, a1, _, a3] = syscall_args();
    let (ty, array, cloexec) = match syscall_nr(&ctx) {
        nr::PIPE => (fd_type::PIPE, a0, false),
        nr::PIPE2 => (fd_type::PIPE, a0, a1 & O_CLOEXEC != 0),
        nr::SOCKETPAIR => (fd_type::SOCKETPAIR, a3, a1 & O_CLOEXEC != 0),
        _ => return 0,
    };
    // SAFETY: user memory through the helper, which faults safely.
    let Ok(pair) = (unsafe { bpf_probe_read_user(array as *const [i32; 2]) }) else { return 0 };
    for fd in pair {
        if fd >= 0 {
            opened(tgid, fd as u32, stack, ty, cloexec_if(cloexec));
        }
    }
    0
}

/// dup(old), dup2(old, new), dup3(old, new, flags), fcntl(old, F_DUPFD*):
/// a new fd of the same object, counted under the dup's caller (the code
/// that now owns one more fd to close), with the original's type. dup2 and
/// dup3 first close `new` if it was open.
#[tracepoint]
pub fn fds_dup_exit(ctx: TracePointContext) -> u32 {
    let Some(tgid) = target_tgid() else { return 0 };
    let fd = ret(&ctx);
    if fd < 0 {
        return 0;
    }
    let [old, a1, a2, _] = syscall_args();
    // Only dups get a stack (fcntl is mostly F_GETFL/F_SETFL).
    let nr = syscall_nr(&ctx);
    if nr == nr::FCNTL && a1 != F_DUPFD && a1 != F_DUPFD_CLOEXEC {
        return 0;
    }
    let stack = stack(&ctx);
    let cloexec = match nr {
        nr::DUP => false,
        nr::DUP2 | nr::DUP3 => {
            if old == a1 {
                return 0;
            }
            nr == nr::DUP3 && a2 & O_CLOEXEC != 0
        }
        nr::FCNTL if a1 == F_DUPFD => false,
        nr::FCNTL if a1 == F_DUPFD_CLOEXEC => true,
        _ => return 0,
    };
    let old_key = FdKey { tgid, fd: old as u32 };
    // SAFETY: copied out of the map value.
    let ty = unsafe { FDS_LIVE.get(&old_key) }.map_or(fd_type::UNKNOWN, |i| i.fd_type);
    opened(tgid, fd as u32, stack, ty, flag::DUP | cloexec_if(cloexec));
    0
}

/// recvmsg(fd, msg, flags): fds received with SCM_RIGHTS (the first two
/// control messages, up to 8 fds each), counted under the recvmsg caller.
#[tracepoint]
pub fn fds_recvmsg_exit(ctx: TracePointContext) -> u32 {
    let Some(tgid) = target_tgid() else { return 0 };
    if ret(&ctx) < 0 {
        return 0;
    }
    let [_, msg, flags, _] = syscall_args();
    // struct msghdr: msg_control at 32, msg_controllen at 40 (set to what
    // was received by the time the syscall returns).
    let control = read_user_u64(msg + 32);
    let len = read_user_u64(msg + 40);
    if control == 0 || len < 16 {
        return 0;
    }
    // Only calls with a control buffer get here (SCM_RIGHTS, credentials).
    let s = stack(&ctx);
    let fl = flag::RECEIVED | cloexec_if(flags & MSG_CMSG_CLOEXEC != 0);
    let mut at = 0u64;
    for _ in 0..2 {
        if at + 16 > len {
            break;
        }
        // struct cmsghdr: cmsg_len (u64), cmsg_level (i32), cmsg_type (i32), data.
        let cmsg_len = read_user_u64(control + at);
        let level_type = read_user_u64(control + at + 8);
        if cmsg_len < 16 {
            break;
        }
        // SOL_SOCKET = 1, SCM_RIGHTS = 1.
        if level_type == (1 | (1 << 32)) {
            // SAFETY: user memory through the helper, which faults safely.
            let fds: [i32; 8] = unsafe { bpf_probe_read_user((control + at + 16) as *const [i32; 8]) }.unwrap_or([-1; 8]);
            let n = ((cmsg_len - 16) / 4).min(8) as usize;
            for (i, fd) in fds.iter().enumerate() {
                if i < n && *fd >= 0 {
                    opened(tgid, *fd as u32, s, fd_type::UNKNOWN, fl);
                }
            }
        }
        at += (cmsg_len + 7) & !7;
    }
    0
}

/// close(2) always releases the fd (even on EINTR), so act at entry.
#[tracepoint]
pub fn fds_close_enter(ctx: TracePointContext) -> u32 {
    if let Some(tgid) = target_tgid() {
        // SAFETY: enter record: arguments in 8-byte slots from 16.
        let fd = unsafe { ctx.read_at::<u64>(16).unwrap_or(u64::MAX) };
        if let Some(stack) = closed(tgid, fd as u32) {
            if closed_by_go_finalizer(&FDS_FINALIZER) {
                count_one(&FDS_FINALIZED, &stack);
            }
        }
    }
    0
}

/// close_range(first, last, flags): user space walks its table.
#[tracepoint]
pub fn fds_close_range_exit(ctx: TracePointContext) -> u32 {
    let Some(tgid) = target_tgid() else { return 0 };
    let [first, last, flags, _] = syscall_args();
    if ret(&ctx) != 0 || flags & CLOSE_RANGE_CLOEXEC != 0 {
        return 0;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let ev = FdRingEvent { kind: ring_kind::CLOSE_RANGE, tgid, a: first, b: last, c: now };
    if FDS_EVENTS.output::<FdRingEvent>(&ev, 0).is_err() {
        bump(counter::LOST_RING);
    }
    0
}
