//! Loading the eBPF object and attaching its programs for one target.
//!
//! Every program is attached through perf events owned by the returned
//! [`Probes`]: dropping it (normal exit, Ctrl-C, SIGTERM, an error unwinding
//! out of the session) closes them, which detaches everything. Nothing is
//! pinned and no tracefs event is created, so nothing can be left behind.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, Map, PerCpuHashMap, PerCpuValues},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
        Program, TracePoint, UProbe,
    },
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use tracer_common::stacks::{StackKey, OVERFLOW_STACK};

/// The compiled `tracer-ebpf` object (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// Tracepoints of one tracker: (program, category, event).
pub type Tracepoints = &'static [(&'static str, &'static str, &'static str)];

/// What trackers set before the object is loaded: globals and map sizes.
#[derive(Default, Debug)]
pub struct LoadSettings {
    /// `u32` globals (name, value).
    pub u32_globals: Vec<(&'static str, u32)>,
    /// `u64` globals (name, value).
    pub u64_globals: Vec<(&'static str, u64)>,
    /// Map sizes (map name, entries).
    pub max_entries: Vec<(&'static str, u32)>,
    /// A running tracker takes stacks with `bpf_get_stackid` whatever the
    /// unwind mode (Go's maps and locks: Go keeps frame pointers), so
    /// `STACKS` keeps its size.
    pub stack_ids: bool,
}

impl LoadSettings {
    /// Makes the maps `names` minimal (one entry): tables of a part that
    /// does not run in this load.
    pub fn minimal(&mut self, names: &[&'static str]) {
        self.max_entries.extend(names.iter().map(|&name| (name, 1)));
    }
}

/// Every whole record of type `T` the kernel wrote to `ring` since the
/// last read, oldest first (a shorter record is skipped).
pub fn drain_ring<T: aya::Pod>(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<T>() {
            // SAFETY: at least size_of::<T>() bytes, any bit pattern is a T
            // (Pod); read unaligned.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const T) });
        }
    }
    out
}

/// `offset:N` of the field `field` in the record of tracepoint
/// `category:event`, read from its tracefs format (layouts change between
/// kernels).
pub fn tracepoint_field_offset(category: &str, event: &str, field: &str) -> Option<u32> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"].iter().find_map(|dir| {
        let format = std::fs::read_to_string(format!("{dir}/events/{category}/{event}/format")).ok()?;
        parse_field_offset(&format, field)
    })
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

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn ktime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Loaded and attached programs; detached on drop.
pub struct Probes {
    /// In the agent: the target's place in the hub, where its tracepoint
    /// programs go instead of on the tracepoints (dropped first: the hub
    /// stops routing to the programs before they close).
    seat: Option<crate::agent::hub::Seat>,
    pub ebpf: Ebpf,
}

/// Checks what loading needs, with one-line answers for what is missing.
pub fn preflight() -> Result<()> {
    if OBJECT.is_empty() {
        bail!("this leaktrace was built without its eBPF programs (LEAKTRACE_SKIP_EBPF=1): rebuild it");
    }
    check_kernel_release(&std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default())?;
    check_pid_namespace(std::fs::read_link("/proc/self/ns/pid").ok().as_deref())?;
    // Checked for root too: root in a container or a bounded service may
    // lack them, and the loader would only say "failed to create map".
    let missing = missing_bpf_caps(effective_caps());
    if !missing.is_empty() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        bail!(
            "permission denied: leaktrace needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to load eBPF programs; missing: {}{}",
            missing.join(", "),
            if root { " (running as root without them: a container or a service with a bounded capability set?)" } else { "; try sudo" }
        );
    }
    crate::privileges::check_uprobes(effective_caps())?;
    crate::privileges::check_tracefs(Path::new("/sys/kernel/tracing"))?;
    ensure_tracefs()
}

/// The oldest kernel the programs load on: BPF attach cookies (the
/// allocation tracker's probe depths) and `bpf_task_pt_regs` (stack walks
/// from a task's saved registers) arrived in 5.15.
pub const OLDEST_KERNEL: (u32, u32) = (5, 15);

/// One line instead of a verifier dump when the running kernel (its
/// `osrelease`, e.g. `5.10.0-32-cloud-amd64`) predates [`OLDEST_KERNEL`].
/// An unparsable release is let through (the loader will say more).
pub fn check_kernel_release(release: &str) -> Result<()> {
    let release = release.trim();
    let mut nums = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse::<u32>());
    let (Some(Ok(major)), Some(Ok(minor))) = (nums.next(), nums.next()) else { return Ok(()) };
    if (major, minor) < OLDEST_KERNEL {
        bail!(
            "kernel too old: needs Linux {}.{} or newer (BPF attach cookies, bpf_task_pt_regs); this is {release}",
            OLDEST_KERNEL.0,
            OLDEST_KERNEL.1
        );
    }
    Ok(())
}

/// Refuses to run in a PID namespace other than the host's (`ns`: the
/// link `/proc/self/ns/pid`): the kernel side sees host pids, a `--pid`
/// numbered in a container would match nothing and every check would pass.
fn check_pid_namespace(ns: Option<&Path>) -> Result<()> {
    // PROC_PID_INIT_INO: the initial PID namespace's fixed inode number.
    const INIT_PID_NS: &str = "pid:[4026531836]";
    match ns.and_then(|p| p.to_str()) {
        Some(ns) if ns != INIT_PID_NS => bail!(
            "leaktrace runs in a PID namespace other than the host's ({ns}): the kernel reports host pids, so the pid given cannot be matched; run it in the host's PID namespace (e.g. docker run --pid=host)"
        ),
        _ => Ok(()),
    }
}

/// The effective capability bits (CapEff of /proc/self/status).
pub fn effective_caps() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|eff| u64::from_str_radix(eff.trim(), 16).ok())
        .unwrap_or(0)
}

/// The capabilities loading and attaching needs that `caps` lacks, by name.
fn missing_bpf_caps(caps: u64) -> Vec<&'static str> {
    const CAP_SYS_ADMIN: u64 = 21;
    const CAP_PERFMON: u64 = 38;
    const CAP_BPF: u64 = 39;
    if caps & (1 << CAP_SYS_ADMIN) != 0 {
        return Vec::new();
    }
    [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(bit, _)| caps & (1 << bit) == 0)
        .map(|(_, name)| name)
        .collect()
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
    /// Loads the object for `pid` with the trackers' settings; nothing runs
    /// until programs are attached.
    pub fn load(pid: u32, settings: &LoadSettings) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader.override_global("TARGET_TGID", &pid, true);
        for (name, value) in &settings.u32_globals {
            loader.override_global(name, value, true);
        }
        for (name, value) in &settings.u64_globals {
            loader.override_global(name, value, true);
        }
        for &(name, entries) in &settings.max_entries {
            loader.map_max_entries(name, entries);
        }
        let ebpf = loader.load(OBJECT).map_err(|e| load_error(&e.to_string()))?;
        Ok(Self { seat: None, ebpf })
    }

    /// From now on tracepoint programs go behind the agent's hub, in
    /// `seat` (see [`crate::agent::hub`]), instead of on the tracepoints.
    pub fn route_through(&mut self, seat: crate::agent::hub::Seat) {
        self.seat = Some(seat);
    }

    /// Takes the map `name` out of the object, as the typed map `M`.
    pub fn take_map<M: TryFrom<Map>>(&mut self, name: &str) -> Result<M>
    where
        M::Error: std::error::Error + Send + Sync + 'static,
    {
        let map = self.ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
        M::try_from(map).with_context(|| format!("map {name}"))
    }

    /// Puts the overflow key in the per-stack table `name`: objects whose
    /// stack did not fit are counted there.
    pub fn seed_overflow_stack<V: aya::Pod + Default + Clone>(&mut self, name: &str) -> Result<()> {
        let n = nr_cpus().map_err(|(_, e)| e)?;
        let map = self.ebpf.map_mut(name).ok_or_else(|| anyhow!("{name} map missing"))?;
        let mut stacks: PerCpuHashMap<_, StackKey, V> = PerCpuHashMap::try_from(map)?;
        stacks.insert(OVERFLOW_STACK, PerCpuValues::try_from(vec![V::default(); n])?, 0)?;
        Ok(())
    }

    /// Loads (and so has the kernel verify) the tracepoint and uprobe
    /// programs `names` at once, a thread each: verification is most of
    /// attach time (a JVM target's programs carry the Java walk: 0.9 s of
    /// CPU on one thread), and nothing is attached until every program has
    /// passed. Programs already loaded are skipped.
    pub fn preload(&mut self, names: &[&str]) -> Result<()> {
        let mut todo: Vec<(&str, &mut Program)> = Vec::new();
        for (name, program) in self.ebpf.programs_mut() {
            if names.contains(&name) && program.fd().is_err() {
                todo.push((name, program));
            }
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = todo
                .into_iter()
                .map(|(name, program)| {
                    scope.spawn(move || {
                        let loaded = match program {
                            Program::TracePoint(p) => p.load(),
                            Program::UProbe(p) => p.load(),
                            _ => return Err(anyhow!("{name}: not a tracepoint or uprobe program")),
                        };
                        loaded.map_err(|e| load_error(&format!("{name}: {e:#}")))
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| h.join().map_err(|_| anyhow!("a program load panicked"))?)
        })
    }

    /// Attaches tracepoint programs.
    pub fn attach_tracepoints(&mut self, tracepoints: Tracepoints) -> Result<()> {
        tracepoints.iter().try_for_each(|&(prog, category, event)| self.attach_tracepoint(prog, category, event))
    }

    /// Attaches the tracepoint program `prog` to `category:event` (in the
    /// agent: routes it there through the hub).
    pub fn attach_tracepoint(&mut self, prog: &str, category: &str, event: &str) -> Result<()> {
        let program: &mut TracePoint = self
            .ebpf
            .program_mut(prog)
            .ok_or_else(|| anyhow!("program {prog} missing from the eBPF object"))?
            .try_into()?;
        if program.fd().is_err() {
            program.load().map_err(|e| load_error(&format!("{prog}: {e:#}")))?;
        }
        match self.seat.as_mut() {
            Some(seat) => seat.route(program.fd()?, category, event),
            None => program
                .attach(category, event)
                .map(|_| ())
                .with_context(|| format!("cannot attach {prog} to tracepoint {category}:{event}")),
        }
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

    /// Attaches the uprobe program `prog` at the function `symbol` of the
    /// object at `path`, for `pid` only.
    pub fn attach_uprobe_at_symbol(&mut self, prog: &str, symbol: &str, path: &Path, pid: u32) -> Result<UProbeLinkId> {
        let program = self.loaded_uprobe(prog)?;
        program
            .attach(symbol, path, one_process(pid)?)
            .with_context(|| format!("cannot attach a uprobe to {symbol} in {}", path.display()))
    }

    /// Attaches the uprobe program `prog` at file offset `offset` of the
    /// object at `path`, for `pid` only (offsets chosen by disassembly).
    pub fn attach_uprobe_at(&mut self, prog: &str, path: &Path, offset: u64, pid: u32) -> Result<UProbeLinkId> {
        self.attach_uprobe_with_cookie(prog, path, offset, None, pid)
            .with_context(|| format!("cannot attach a uprobe at {}+{offset:#x}", path.display()))
    }

    /// [`Probes::attach_uprobe_at`] with a BPF cookie the program reads
    /// (`bpf_get_attach_cookie`).
    pub fn attach_uprobe_with_cookie(
        &mut self,
        prog: &str,
        path: &Path,
        offset: u64,
        cookie: Option<u64>,
        pid: u32,
    ) -> Result<UProbeLinkId> {
        let scope = one_process(pid)?;
        let program = self.loaded_uprobe(prog)?;
        let point = UProbeAttachPoint { location: UProbeAttachLocation::AbsoluteOffset(offset), cookie };
        Ok(program.attach(point, path, scope)?)
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

    /// Tells the kernel side where the executable's code is (`APP_TEXT`).
    pub fn set_app_text(&mut self, (start, end): (u64, u64)) -> Result<()> {
        let map = self.ebpf.map_mut("APP_TEXT").ok_or_else(|| anyhow!("APP_TEXT map missing"))?;
        let mut table: aya::maps::Array<_, u64> = aya::maps::Array::try_from(map)?;
        table.set(0, 0, 0)?;
        table.set(1, end, 0)?;
        table.set(0, start, 0)?;
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

/// A uprobe scope of one process.
fn one_process(pid: u32) -> Result<UProbeScope> {
    Ok(UProbeScope::OneProcess(std::num::NonZeroU32::new(pid).ok_or_else(|| anyhow!("pid 0"))?))
}

pub fn load_error(msg: &str) -> anyhow::Error {
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

    #[test]
    fn kernels_before_5_15_are_refused_in_one_line() {
        let e = check_kernel_release("5.10.0-32-cloud-amd64\n").unwrap_err().to_string();
        assert_eq!(e, "kernel too old: needs Linux 5.15 or newer (BPF attach cookies, bpf_task_pt_regs); this is 5.10.0-32-cloud-amd64");
        assert!(check_kernel_release("4.19.0-27-amd64").is_err());
        for ok in ["5.15.0-1", "6.1.0-44-cloud-amd64", "6.12.117+deb13-cloud-amd64", "7.2.13+deb14-cloud-amd64", "weird"] {
            assert!(check_kernel_release(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn only_the_host_pid_namespace_is_accepted() {
        assert!(check_pid_namespace(Some(Path::new("pid:[4026531836]"))).is_ok());
        assert!(check_pid_namespace(None).is_ok());
        let err = check_pid_namespace(Some(Path::new("pid:[4026532301]"))).unwrap_err().to_string();
        assert!(err.starts_with("leaktrace runs in a PID namespace other than the host's (pid:[4026532301])"), "{err}");
    }

    #[test]
    fn missing_capabilities_are_named() {
        assert_eq!(missing_bpf_caps(0), vec!["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing_bpf_caps(1 << 39), vec!["CAP_PERFMON"]);
        assert!(missing_bpf_caps((1 << 39) | (1 << 38)).is_empty());
        assert!(missing_bpf_caps(1 << 21).is_empty());
    }
}
