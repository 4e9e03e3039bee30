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
    programs::TracePoint,
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use tracer_common::{connections::ConnStackStats, stacks::StackKey};

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
    /// entries; nothing runs until [`Probes::attach`].
    pub fn load(pid: u32, max_sockets: u32) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .override_global("TARGET_TGID", &pid, true)
            .map_max_entries("CONN_FDS", max_sockets)
            .load(OBJECT)
            .map_err(|e| load_error(&e.to_string()))?;
        // The overflow key: sockets whose stack did not fit are counted here.
        {
            let map = ebpf.map_mut("CONN_STACKS").ok_or_else(|| anyhow!("CONN_STACKS map missing"))?;
            let mut stacks: PerCpuHashMap<_, StackKey, ConnStackStats> = PerCpuHashMap::try_from(map)?;
            let n = nr_cpus().map_err(|(_, e)| e)?;
            let zeros = PerCpuValues::try_from(vec![ConnStackStats::default(); n])?;
            stacks.insert(StackKey { stack_id: -2, caller: 0 }, zeros, 0)?;
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

    /// Tells the kernel side where libc's wrappers keep their return address
    /// (replacing what an earlier image of the process had).
    pub fn set_syscall_sites(&mut self, sites: &[crate::syscall_sites::SyscallSite]) -> Result<usize> {
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
