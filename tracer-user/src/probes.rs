//! Loading the eBPF object and attaching its programs for one target.
//!
//! Every program is attached through perf events owned by the returned
//! [`Probes`]: dropping it (normal exit, Ctrl-C, SIGTERM, an error unwinding
//! out of the session) closes them, which detaches everything. Nothing is
//! pinned and no tracefs event is created, so nothing can be left behind.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, PerCpuHashMap, PerCpuValues},
    programs::{
        uprobe::{UProbeLinkId, UProbeScope},
        TracePoint, UProbe,
    },
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use aya::programs::uprobe::UProbeAttachLocation;
use tracer_common::{
    allocations::AllocCounts,
    stacks::{StackCounts, StackKey, OVERFLOW_STACK},
};

/// The compiled `tracer-ebpf` object (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// Tracepoints of one tracker: (program, category, event).
pub type Attachments = &'static [(&'static str, &'static str, &'static str)];

/// The connection tracker's programs: exits only (arguments come from the
/// saved user registers), except close, which acts at entry.
pub const CONNECTIONS: Attachments = &[
    ("conn_socket_exit", "syscalls", "sys_exit_socket"),
    ("conn_connect_exit", "syscalls", "sys_exit_connect"),
    ("conn_accept_exit", "syscalls", "sys_exit_accept"),
    ("conn_accept4_exit", "syscalls", "sys_exit_accept4"),
    ("conn_close_enter", "syscalls", "sys_enter_close"),
    ("conn_dup_exit", "syscalls", "sys_exit_dup2"),
    ("conn_dup_exit", "syscalls", "sys_exit_dup3"),
    ("conn_close_range_exit", "syscalls", "sys_exit_close_range"),
    ("conn_exec", "sched", "sched_process_exec"),
    ("conn_exit", "sched", "sched_process_exit"),
];

/// The thread tracker's tracepoints (its `pthread_create` uprobe is
/// attached per libc by [`Probes::attach_pthread_create`]).
pub const THREADS: Attachments = &[
    ("thread_fork", "sched", "sched_process_fork"),
    ("thread_exit", "sched", "sched_process_exit"),
];

/// The lock tracker's futex tracepoints (its Go uprobes are attached per
/// executable by [`Probes::attach_uprobe_at`]).
pub const LOCKS: Attachments = &[
    ("lock_futex_enter", "syscalls", "sys_enter_futex"),
    ("lock_futex_exit", "syscalls", "sys_exit_futex"),
];

/// Offset of `child_pid` in the `sched:sched_process_fork` record, from its
/// format (Linux 6.18 has `__data_loc` comms; older kernels inline them).
fn fork_child_pid_offset() -> u32 {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let Ok(format) = std::fs::read_to_string(format!("{dir}/events/sched/sched_process_fork/format")) else {
            continue;
        };
        if let Some(off) = parse_field_offset(&format, "child_pid") {
            return off;
        }
    }
    tracer_common::threads::FORK_CHILD_PID_OFFSET
}

/// `offset:N` of the field named `name` in a tracepoint format.
fn parse_field_offset(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let l = l.trim();
        let decl = l.strip_prefix("field:")?.split(';').next()?;
        if decl.split_whitespace().last()? != name {
            return None;
        }
        l.split(';').find_map(|p| p.trim().strip_prefix("offset:")).and_then(|v| v.trim().parse().ok())
    })
}

/// The allocation tracker's load-time settings.
#[derive(Clone, Copy, Debug)]
pub struct AllocLoad {
    /// Size of the live-block table (entries, preallocated).
    pub max_allocations: u32,
    /// Byte-weighted sampling period (0: every block).
    pub sample_bytes: u64,
    /// Size of the walked-stack table (entries of 264 bytes, preallocated).
    pub max_stacks: u32,
}

/// The allocation tracker's tracepoints (its uprobes are attached per
/// allocator object by [`Probes::attach_allocator`]).
pub const ALLOCATIONS: Attachments = &[
    ("alloc_mmap_exit", "syscalls", "sys_exit_mmap"),
    ("alloc_munmap_enter", "syscalls", "sys_enter_munmap"),
];

/// Loaded and attached programs; detached on drop.
pub struct Probes {
    pub ebpf: Ebpf,
}

/// Checks what loading needs, with one-line answers for what is missing.
pub fn preflight() -> Result<()> {
    if OBJECT.is_empty() {
        bail!("this leaktrace was built without its eBPF programs (LEAKTRACE_SKIP_EBPF=1): rebuild it");
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 && !has_bpf_caps() {
        bail!("permission denied: leaktrace needs root (or CAP_BPF and CAP_PERFMON) to load eBPF programs; try sudo");
    }
    ensure_tracefs()
}

fn has_bpf_caps() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(eff) = status.lines().find_map(|l| l.strip_prefix("CapEff:")) else { return false };
    let Ok(bits) = u64::from_str_radix(eff.trim(), 16) else { return false };
    const CAP_PERFMON: u64 = 38;
    const CAP_BPF: u64 = 39;
    const CAP_SYS_ADMIN: u64 = 21;
    bits & (1 << CAP_SYS_ADMIN) != 0 || (bits & (1 << CAP_BPF) != 0 && bits & (1 << CAP_PERFMON) != 0)
}

/// Tracepoint ids are read from tracefs; mount it when a fresh machine has not.
fn ensure_tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status();
    match status {
        Ok(s) if s.success() && Path::new("/sys/kernel/tracing/events").exists() => Ok(()),
        _ => bail!("tracefs is not mounted and could not be mounted: run `mount -t tracefs nodev /sys/kernel/tracing`"),
    }
}

impl Probes {
    /// Loads the object for `pid` with a live-socket table of `max_sockets`
    /// entries and the allocation tracker's table size and sampling period;
    /// nothing runs until [`Probes::attach`].
    pub fn load(pid: u32, max_sockets: u32, alloc: AllocLoad) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .override_global("TARGET_TGID", &pid, true)
            .override_global("ALLOC_SAMPLE_BYTES", &alloc.sample_bytes, true)
            .map_max_entries("ALLOCS", alloc.max_allocations)
            .map_max_entries("ALLOC_FRAMES", alloc.max_stacks)
            .override_global("FORK_CHILD_PID_AT", &fork_child_pid_offset(), true)
            .map_max_entries("CONN_FDS", max_sockets)
            .load(OBJECT)
            .map_err(|e| load_error(&e.to_string()))?;
        // The overflow key of every per-stack table: objects whose stack did
        // not fit are counted there.
        let n = nr_cpus().map_err(|(_, e)| e)?;
        for name in ["CONN_STACKS", "THREAD_STACKS"] {
            let map = ebpf.map_mut(name).ok_or_else(|| anyhow!("{name} map missing"))?;
            let mut stacks: PerCpuHashMap<_, StackKey, StackCounts> = PerCpuHashMap::try_from(map)?;
            let zeros = PerCpuValues::try_from(vec![StackCounts::default(); n])?;
            stacks.insert(OVERFLOW_STACK, zeros, 0)?;
        }
        {
            let map = ebpf.map_mut("ALLOC_STACKS").ok_or_else(|| anyhow!("ALLOC_STACKS map missing"))?;
            let mut stacks: PerCpuHashMap<_, StackKey, AllocCounts> = PerCpuHashMap::try_from(map)?;
            stacks.insert(OVERFLOW_STACK, PerCpuValues::try_from(vec![AllocCounts::default(); n])?, 0)?;
        }
        Ok(Self { ebpf })
    }

    /// Attaches the given trackers' programs.
    pub fn attach(&mut self, trackers: &[Attachments]) -> Result<()> {
        let ebpf = &mut self.ebpf;
        let mut loaded = std::collections::HashSet::new();
        for attachments in trackers {
            for &(prog, category, event) in attachments.iter() {
                let program: &mut TracePoint = ebpf
                    .program_mut(prog)
                    .ok_or_else(|| anyhow!("program {prog} missing from the eBPF object"))?
                    .try_into()?;
                if loaded.insert(prog) {
                    program.load().map_err(|e| load_error(&format!("{prog}: {e:#}")))?;
                }
                program
                    .attach(category, event)
                    .with_context(|| format!("cannot attach {prog} to tracepoint {category}:{event}"))?;
            }
        }
        Ok(())
    }

    /// The uprobe program `name`, loaded into the kernel the first time it
    /// is asked for (uprobes are attached per object, possibly many times).
    fn loaded_uprobe(&mut self, name: &str) -> Result<&mut UProbe> {
        let program: &mut UProbe = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
            .try_into()?;
        if program.fd().is_err() {
            program.load().map_err(|e| load_error(&format!("{name}: {e:#}")))?;
        }
        Ok(program)
    }

    /// Attaches the thread tracker's uprobe to `pthread_create` in the libc
    /// at `libc` (as the target maps it), for `pid` only.
    pub fn attach_pthread_create(&mut self, pid: u32, libc: &Path) -> Result<()> {
        let program = self.loaded_uprobe("thread_create")?;
        let scope = UProbeScope::OneProcess(std::num::NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?);
        program
            .attach("pthread_create", libc, scope)
            .with_context(|| format!("cannot attach a uprobe to pthread_create in {}", libc.display()))?;
        Ok(())
    }

    /// Attaches the uprobe program `prog` at file offset `offset` of the
    /// object at `path`, for `pid` only (the map tracker's probes, at
    /// offsets chosen by disassembly).
    /// (Also the lock tracker's Go probes: trackers/locks/golang.rs.)
    pub fn attach_uprobe_at(&mut self, prog: &str, path: &Path, offset: u64, pid: u32) -> Result<UProbeLinkId> {
        let program = self.loaded_uprobe(prog)?;
        let scope = UProbeScope::OneProcess(std::num::NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?);
        program
            .attach(offset, path, scope)
            .with_context(|| format!("cannot attach a uprobe at {}+{offset:#x}", path.display()))
    }

    /// Detaches one link of the uprobe program `prog` (a probe that is only
    /// on part of the time).
    pub fn detach_uprobe(&mut self, prog: &str, link: UProbeLinkId) -> Result<()> {
        let program: &mut UProbe = self
            .ebpf
            .program_mut(prog)
            .ok_or_else(|| anyhow!("program {prog} missing from the eBPF object"))?
            .try_into()?;
        program.detach(link)?;
        Ok(())
    }

    /// Attaches the allocation tracker's programs to the allocator in the
    /// ELF file `object` (as the target maps it), for `pid` only, at the
    /// planned offsets; the return program goes with every entry that needs it.
    pub fn attach_allocator(&mut self, pid: u32, object: &Path, plan: &[crate::trackers::allocations::plan::AllocProbe]) -> Result<()> {
        let scope = UProbeScope::OneProcess(std::num::NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?);
        for p in plan {
            let programs: &[&str] = if p.returns { &[p.program, "alloc_return"] } else { &[p.program] };
            for &name in programs {
                let program = self.loaded_uprobe(name)?;
                let location = UProbeAttachLocation::AbsoluteOffset(p.file_offset);
                let point = aya::programs::uprobe::UProbeAttachPoint {
                    location,
                    cookie: p.cookie,
                };
                program
                    .attach(point, object, scope)
                    .with_context(|| format!("cannot attach a uprobe to {}+{} in {}", p.function, p.delta, object.display()))?;
            }
        }
        if plan.iter().any(|p| p.program == "alloc_new") {
            // Tells the return program to look for an `operator new` in progress.
            let map = self.ebpf.map_mut("ALLOC_FLAGS").ok_or_else(|| anyhow!("ALLOC_FLAGS map missing"))?;
            let mut flags: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map)?;
            flags.set(0, 1, 0)?;
        }
        Ok(())
    }

    /// Tells the kernel side where libc's wrappers keep their return address
    /// (replacing what an earlier image of the process had).
    pub fn set_syscall_sites(&mut self, sites: &[crate::stacks::syscall_sites::SyscallSite]) -> Result<usize> {
        let map = self.ebpf.map_mut("SYSCALL_SITES").ok_or_else(|| anyhow!("SYSCALL_SITES map missing"))?;
        let mut table: BpfHashMap<_, u64, tracer_common::stacks::SyscallSite> = BpfHashMap::try_from(map)?;
        let old: Vec<u64> = table.keys().filter_map(|k| k.ok()).collect();
        for k in old {
            let _ = table.remove(&k);
        }
        let mut n = 0;
        for s in sites {
            let v = tracer_common::stacks::SyscallSite { ret_offset: s.ret_offset, _pad: 0 };
            if table.insert(s.ip_after, v, 0).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}

fn load_error(msg: &str) -> anyhow::Error {
    if msg.contains("Operation not permitted") || msg.contains("EPERM") {
        anyhow!("permission denied loading eBPF programs: run as root (or with CAP_BPF and CAP_PERFMON)")
    } else {
        anyhow!("cannot load eBPF programs: {msg}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_format_offsets_parse() {
        let new = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(new, "child_pid"), Some(20));
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(old, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(old, "parent_pid"), None);
    }
}
