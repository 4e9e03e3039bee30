//! Connection tracker, kernel side: every socket fd of the target, from the
//! syscall that made it to the one that ended it, counted per creation stack.
//!
//! Syscall tracepoints only (no kprobes on these machines, and they see Go's
//! raw syscalls as well as libc's). Exit tracepoints read the call's
//! arguments from the saved user registers, so no enter program and no
//! per-thread pending state is needed: one program per syscall, and only
//! `close` acts at entry. `CONN_FDS` holds one entry per live socket;
//! `CONN_STACKS` holds per-stack opened/closed totals that user space reads
//! each interval.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user_buf},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuHashMap, RingBuf},
    programs::TracePointContext,
};
use tracer_common::{
    connections::{
        flag, origin, ring_kind, ConnInfo, ConnRingEvent, FdKey,
        MAX_CONN_STACKS, MAX_LIVE_SOCKETS, PEER_LEN,
    },
    counter,
    stacks::{StackCounts, StackKey},
};

use crate::{
    bump,
    stacks::{closed_by_go_finalizer, count, count_one, counted_stack, syscall_args, user_stack},
    target_tgid,
};

/// Live sockets of the target.
#[map]
static CONN_FDS: HashMap<FdKey, ConnInfo> = HashMap::with_max_entries(MAX_LIVE_SOCKETS, crate::NO_PREALLOC);

/// Per creation stack: sockets opened and closed (per CPU).
#[map]
static CONN_STACKS: PerCpuHashMap<StackKey, StackCounts> =
    PerCpuHashMap::with_max_entries(MAX_CONN_STACKS, crate::NO_PREALLOC);

/// Per creation stack: sockets closed by the Go runtime's finalizer
/// goroutine (an unreachable connection closed at some GC), per CPU.
#[map]
static CONN_FINALIZED: PerCpuHashMap<StackKey, u64> = PerCpuHashMap::with_max_entries(MAX_CONN_STACKS, crate::NO_PREALLOC);

/// `runtime.runfinq`'s pc range in the target (see `finalizer`), set by
/// user space for a Go target.
#[map]
static CONN_FINALIZER: Array<u64> = Array::with_max_entries(2, 0);

/// Rare events user space must act on (close_range).
#[map]
static CONN_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

const SOCK_TYPE_MASK: u64 = 0xf;
const SOCK_CLOEXEC: u64 = 0o2000000;
const EINPROGRESS: i64 = 115;
/// `CLOSE_RANGE_CLOEXEC`: marks instead of closing.
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;

/// Syscall exit tracepoints: `ret` at offset 16; enter: arguments in 8-byte slots from 16.
#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: reads within the tracepoint record.
    unsafe { ctx.read_at::<u64>(16 + 8 * n).unwrap_or(0) }
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: reads within the tracepoint record.
    unsafe { ctx.read_at::<i64>(16).unwrap_or(-1) }
}

/// Reads a sockaddr from user memory (as much of it as can be read).
#[inline(always)]
fn read_sockaddr(ptr: u64, out: &mut [u8; PEER_LEN]) {
    if ptr == 0 {
        return;
    }
    // SAFETY: bpf_probe_read_user faults safely.
    unsafe {
        if bpf_probe_read_user_buf(ptr as *const u8, &mut out[..]).is_err() {
            let _ = bpf_probe_read_user_buf(ptr as *const u8, &mut out[..16]);
        }
    }
}

/// Records a new live socket. The stack used is the one counted, so that its
/// close decrements the same aggregate.
#[inline(always)]
fn opened(ctx: &TracePointContext, tgid: u32, fd: u32, info: &mut ConnInfo) {
    let stack = counted_stack(&CONN_STACKS, user_stack(ctx));
    info.stack = stack;
    info.created_ns = unsafe { bpf_ktime_get_ns() };
    let key = FdKey { tgid, fd };
    // An entry left for this fd means we missed its close: end it first.
    let _ = closed(tgid, fd);
    if CONN_FDS.insert(&key, info, 0).is_err() {
        bump(counter::LOST_EVENTS);
        return;
    }
    count(&CONN_STACKS, &stack, 1, 0);
    bump(tracer_common::connections::counter::EVENTS);
}

/// Ends a live socket if it is one of ours. Only the side whose delete
/// succeeds counts it, so user-space reconciliation never double counts.
/// Returns the socket's creation stack when this call ended it.
#[inline(always)]
fn closed(tgid: u32, fd: u32) -> Option<StackKey> {
    let key = FdKey { tgid, fd };
    // SAFETY: copied out before removal.
    let stack = unsafe { CONN_FDS.get(&key) }?.stack;
    if CONN_FDS.remove(&key).is_ok() {
        count(&CONN_STACKS, &stack, 0, 1);
        bump(tracer_common::connections::counter::EVENTS);
        return Some(stack);
    }
    None
}

#[tracepoint]
pub fn conn_socket_exit(ctx: TracePointContext) -> u32 {
    let Some(tgid) = target_tgid() else { return 0 };
    let fd = ret(&ctx);
    if fd < 0 {
        return 0;
    }
    let [domain, ty, ..] = syscall_args();
    let mut info = new_info(origin::SOCKET, domain as u16, (ty & SOCK_TYPE_MASK) as u16);
    if ty & SOCK_CLOEXEC != 0 {
        info.flags |= flag::CLOEXEC;
    }
    opened(&ctx, tgid, fd as u32, &mut info);
    0
}

#[inline(always)]
fn new_info(origin: u8, family: u16, sock_type: u16) -> ConnInfo {
    ConnInfo {
        stack: StackKey::default(),
        created_ns: 0,
        family,
        sock_type,
        origin,
        flags: 0,
        _pad: [0; 2],
        peer: [0; PEER_LEN],
    }
}

/// connect(fd, addr, len): the peer is read at exit (the caller's buffer is
/// still there); 0 and EINPROGRESS (non-blocking, Go) both count.
#[tracepoint]
pub fn conn_connect_exit(ctx: TracePointContext) -> u32 {
    let Some(tgid) = target_tgid() else { return 0 };
    let r = ret(&ctx);
    if r != 0 && r != -EINPROGRESS {
        return 0;
    }
    let [fd, addr, ..] = syscall_args();
    let key = FdKey { tgid, fd: fd as u32 };
    let mut peer = [0u8; PEER_LEN];
    read_sockaddr(addr, &mut peer);
    if let Some(info) = CONN_FDS.get_ptr_mut(&key) {
        // SAFETY: map value owned by the map; only this thread owns this fd now.
        unsafe {
            (*info).peer = peer;
            (*info).flags |= flag::CONNECTED;
        }
    } else {
        // A socket made before we attached: track it from its connect.
        let family = u16::from_le_bytes([peer[0], peer[1]]);
        let mut info = new_info(origin::CONNECT, family, 1);
        info.peer = peer;
        info.flags |= flag::CONNECTED;
        opened(&ctx, tgid, fd as u32, &mut info);
    }
    0
}

/// accept(fd, addr, len) and accept4(fd, addr, len, flags).
#[inline(always)]
fn accept_exit(ctx: &TracePointContext, with_flags: bool) {
    let Some(tgid) = target_tgid() else { return };
    let fd = ret(ctx);
    if fd < 0 {
        return;
    }
    let [_, addr, _, flags] = syscall_args();
    let mut info = new_info(origin::ACCEPT, 0, 1);
    read_sockaddr(addr, &mut info.peer);
    info.family = u16::from_le_bytes([info.peer[0], info.peer[1]]);
    info.flags |= flag::CONNECTED;
    if with_flags && flags & SOCK_CLOEXEC != 0 {
        info.flags |= flag::CLOEXEC;
    }
    opened(ctx, tgid, fd as u32, &mut info);
}

#[tracepoint]
pub fn conn_accept_exit(ctx: TracePointContext) -> u32 {
    accept_exit(&ctx, false);
    0
}

#[tracepoint]
pub fn conn_accept4_exit(ctx: TracePointContext) -> u32 {
    accept_exit(&ctx, true);
    0
}

/// close(2) always releases the fd (even on EINTR), so act at entry.
#[tracepoint]
pub fn conn_close_enter(ctx: TracePointContext) -> u32 {
    if let Some(tgid) = target_tgid() {
        if let Some(stack) = closed(tgid, arg(&ctx, 0) as u32) {
            if closed_by_go_finalizer(&CONN_FINALIZER) {
                count_one(&CONN_FINALIZED, &stack);
            }
        }
    }
    0
}

/// dup2(old, new) / dup3(old, new, flags) close `new` when they succeed.
#[tracepoint]
pub fn conn_dup_exit(ctx: TracePointContext) -> u32 {
    let Some(tgid) = target_tgid() else { return 0 };
    let [oldfd, newfd, ..] = syscall_args();
    if ret(&ctx) >= 0 && oldfd != newfd {
        let _ = closed(tgid, newfd as u32);
    }
    0
}

/// close_range(first, last, flags): the range can be large, so user space
/// walks its table instead of us.
#[tracepoint]
pub fn conn_close_range_exit(ctx: TracePointContext) -> u32 {
    let Some(tgid) = target_tgid() else { return 0 };
    let [first, last, flags, _] = syscall_args();
    if ret(&ctx) != 0 || flags & CLOSE_RANGE_CLOEXEC != 0 {
        return 0;
    }
    // SAFETY: no preconditions. The time lets user space spare sockets that
    // reuse these fd numbers before it reads the event.
    let now = unsafe { bpf_ktime_get_ns() };
    send(ConnRingEvent { kind: ring_kind::CLOSE_RANGE, tgid, a: first, b: last, c: now });
    0
}

#[inline(always)]
fn send(ev: ConnRingEvent) {
    if CONN_EVENTS.output::<ConnRingEvent>(&ev, 0).is_err() {
        bump(counter::LOST_RING);
    }
}
