//! Java frames of a HotSpot JVM, walked at the events leaktrace already
//! takes. A Java thread in a syscall always has its frame anchor set
//! (`JavaThread::_anchor`: the last Java sp, pc and fp, written before any
//! call out of Java), and every frame it leads to sits at a call site, so
//! no native unwinding and no prologue heuristics are needed: the current
//! `JavaThread*` comes from libjvm's TLS (`Thread::_thr_current`) through
//! the task's fsbase, then each frame is stepped by the interpreter's fixed
//! layout or by its code blob's frame size (found through the code heap's
//! segment map). Only addresses are recorded (`Method*` + bci, compiled
//! pcs); user space names them. Offsets come from user space
//! (`JVM_CONFIG`, by tgid); a process without an entry costs one lookup.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use tracer_common::{
    counter as shared,
    jvm::{
        compiled_slot, counter, header, interpreted_slot, unknown_pc_slot, JvmConfig, JAVA_STACK, MAX_CODE_HEAPS,
        MAX_JAVA_FRAMES, MAX_JAVA_STACKS, MAX_JVMS,
    },
    stacks::{StackKey, WalkedFrames},
};

use crate::{bump, stacks::{read_user_u64, user_ip_sp_bp}};

/// Non-zero when the target may be a JVM; set by user space at load time.
/// A constant: for any other target the verifier drops the Java walk from
/// every program, which keeps loading fast.
#[no_mangle]
static JAVA_WALK: u32 = 0;

/// Whether the Java walk is compiled in for this load.
#[inline(always)]
fn java_walk() -> bool {
    // SAFETY: a plain read of a global that user space wrote before load.
    unsafe { core::ptr::read_volatile(&JAVA_WALK) != 0 }
}

/// Walk settings of each JVM target, by tgid (set by user space).
#[map]
static JVM_CONFIG: HashMap<u32, JvmConfig> = HashMap::with_max_entries(MAX_JVMS, crate::NO_PREALLOC);

/// Java stacks by the hash of their frames.
#[map]
pub static JAVA_STACKS: HashMap<u64, WalkedFrames> = HashMap::with_max_entries(MAX_JAVA_STACKS, crate::NO_PREALLOC);

/// This CPU's Java stack being built.
#[map]
static JAVA_SCRATCH: PerCpuArray<WalkedFrames> = PerCpuArray::with_max_entries(1, 0);

/// How far above the syscall's sp the anchor's sp may be (a thread's
/// native frames between its last Java frame and the syscall).
const MAX_NATIVE_SPAN: u64 = 8 << 20;
/// Segment-map hops to a blob's start (a hop covers up to 254 segments).
const MAX_SEGMAP_HOPS: usize = 16;
/// Largest frame believed (words).
const MAX_FRAME_WORDS: i32 = 1 << 14;

#[inline(always)]
fn mix(h: u64, x: u64) -> u64 {
    let h = (h ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 31)
}

/// Whether the current process is a JVM whose walk user space set up.
#[inline(always)]
pub fn is_jvm() -> bool {
    if !java_walk() {
        return false;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: lookup only.
    unsafe { JVM_CONFIG.get(&tgid) }.is_some()
}

/// The current thread's Java stack when the current process is a
/// configured JVM and the thread is stopped out of Java code (its anchor
/// set), as a key of `JAVA_STACKS`; `None`: walk the native stack instead.
#[inline(always)]
pub fn java_stack_key() -> Option<StackKey> {
    if !java_walk() {
        return None;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a reference into the map value, only read.
    let cfg = unsafe { JVM_CONFIG.get(&tgid) }?;
    match walk(cfg) {
        Some(hash) => Some(StackKey { stack_id: JAVA_STACK, caller: hash }),
        None => {
            bump(counter::NATIVE);
            None
        }
    }
}

/// The `JavaThread*` of the current thread (0 when none).
#[inline(always)]
fn current_java_thread(cfg: &JvmConfig) -> u64 {
    // The untyped helper: a plain address the offset can be added to.
    // SAFETY: no preconditions; the read faults safely.
    let task = unsafe { bpf_get_current_task() };
    let Ok(fsbase) = (unsafe { bpf_probe_read_kernel(task.wrapping_add(cfg.fsbase_offset) as *const u64) }) else {
        return 0;
    };
    if fsbase < 4096 {
        return 0;
    }
    let dtv = read_user_u64(fsbase + 8);
    if dtv < 4096 {
        return 0;
    }
    let block = read_user_u64(dtv + cfg.dtv_slot);
    // glibc marks a module's block not yet allocated in this thread with -1.
    if block < 4096 || block == u64::MAX {
        return 0;
    }
    read_user_u64(block + cfg.tls_offset)
}

/// The code blob holding `pc`, when `pc` is in one of the code heaps.
#[inline(always)]
fn blob_of(cfg: &JvmConfig, pc: u64) -> Option<u64> {
    let mut heap = None;
    for i in 0..MAX_CODE_HEAPS {
        if i as u64 >= cfg.n_heaps {
            break;
        }
        let h = &cfg.heaps[i];
        if pc >= h.lo && pc < h.hi {
            heap = Some(*h);
            break;
        }
    }
    let h = heap?;
    let shift = h.log2_segment & 63;
    let mut seg = (pc - h.lo) >> shift;
    for _ in 0..MAX_SEGMAP_HOPS {
        // SAFETY: user memory through the helper, which faults safely.
        let tag = unsafe { bpf_probe_read_user((h.segmap + seg) as *const u8) }.ok()? as u64;
        if tag == 0 {
            return Some(h.lo + (seg << shift) + cfg.heap_block);
        }
        if tag == 0xff || tag > seg {
            return None;
        }
        seg -= tag;
    }
    None
}

/// Walks the Java frames from the anchor into `JAVA_STACKS`; returns the key.
#[inline(always)]
fn walk(cfg: &JvmConfig) -> Option<u64> {
    let jt = current_java_thread(cfg);
    if jt < 4096 {
        return None;
    }
    // SAFETY: user memory through the helper, which faults safely.
    let anchor = unsafe { bpf_probe_read_user((jt + cfg.anchor) as *const [u64; 3]) }.ok()?;
    let pick = |off: u64| match off {
        0 => anchor[0],
        8 => anchor[1],
        _ => anchor[2],
    };
    let (mut sp, mut pc, mut fp) = (pick(cfg.anchor_sp), pick(cfg.anchor_pc), pick(cfg.anchor_fp));
    // Java frames are older than the native ones of the same call: the
    // anchor lies above the syscall's sp (this also rejects threads whose
    // "anchor" is some other field: GC workers, a thread in Java code).
    let (_, user_sp, _) = user_ip_sp_bp()?;
    if sp <= user_sp || sp - user_sp > MAX_NATIVE_SPAN || sp & 7 != 0 {
        return None;
    }
    if pc == 0 {
        pc = read_user_u64(sp - 8);
    }
    let f = JAVA_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; no other user while we run.
    let f = unsafe { &mut *f };
    let mut flags = 0;
    if cfg.pending_monitor != 0 && read_user_u64(jt + cfg.pending_monitor) != 0 {
        flags |= header::PENDING_MONITOR;
    }
    let mut len = 1usize;
    for _ in 0..MAX_JAVA_FRAMES {
        let Some(slot) = f.ips.get_mut(len) else { break };
        if pc >= cfg.interp_lo && pc < cfg.interp_hi {
            // fp-64: bcp, fp-24: Method*, fp-8: sender sp, fp: saved fp, fp+8: return pc.
            // SAFETY: user memory through the helper, which faults safely.
            let Ok(w) = (unsafe { bpf_probe_read_user((fp.wrapping_sub(64)) as *const [u64; 10]) }) else {
                flags |= header::CUT;
                break;
            };
            let method = w[5];
            let const_method = read_user_u64(method + cfg.const_method);
            *slot = interpreted_slot(method, const_method, w[0].wrapping_sub(const_method + cfg.const_method_size));
            len += 1;
            if w[7] < sp {
                break;
            }
            sp = w[7];
            fp = w[8];
            pc = w[9];
            continue;
        }
        if pc == cfg.call_stub_return {
            break;
        }
        let (words, compile_id) = match blob_of(cfg, pc) {
            // SAFETY: user memory through the helper, which faults safely.
            Some(blob) => (
                unsafe { bpf_probe_read_user((blob + cfg.frame_size) as *const i32) }.unwrap_or(0),
                if cfg.compile_id == 0 { 0 } else { unsafe { bpf_probe_read_user((blob + cfg.compile_id) as *const i32) }.unwrap_or(0) as u64 },
            ),
            None => (0, 0),
        };
        if words <= 0 || words > MAX_FRAME_WORDS {
            *slot = unknown_pc_slot(pc);
            len += 1;
            flags |= header::CUT;
            break;
        }
        // The compilation's id beside its pc: code flushed and its space
        // reused by another compilation makes another frame.
        *slot = compiled_slot(pc, compile_id);
        len += 1;
        sp += words as u64 * 8;
        // SAFETY: user memory through the helper, which faults safely.
        let Ok(w) = (unsafe { bpf_probe_read_user((sp - 16) as *const [u64; 2]) }) else {
            flags |= header::CUT;
            break;
        };
        fp = w[0];
        pc = w[1];
    }
    if flags & header::CUT != 0 {
        bump(counter::CUT);
    }
    f.ips[0] = flags;
    f.len = len as u64;
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for i in 0..MAX_JAVA_FRAMES + 1 {
        if i >= len {
            break;
        }
        hash = mix(hash, f.ips[i]);
    }
    let hash = mix(hash, len as u64).max(1);
    // SAFETY: lookup only.
    if unsafe { JAVA_STACKS.get(&hash) }.is_none() && JAVA_STACKS.insert(&hash, f, 0).is_err() {
        bump(shared::LOST_STACKS);
        return None;
    }
    bump(counter::WALKS);
    Some(hash)
}
