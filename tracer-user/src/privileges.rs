//! The capabilities leaktrace needs besides loading eBPF (CAP_BPF and
//! CAP_PERFMON, checked in [`crate::probes::preflight`]), each missing one
//! named in one line. Found by running it as a non-root user with
//! capability sets cut one at a time (tests/privileges.rs, docs/fleet.md):
//!
//! - CAP_SYS_ADMIN: the kernel creates uprobes (`perf_event_open` of the
//!   uprobe PMU) only with it, CAP_PERFMON is not enough;
//! - CAP_SYS_PTRACE: another user's `/proc/PID/{exe,maps,mem,root}`;
//! - CAP_DAC_READ_SEARCH: tracefs (`/sys/kernel/tracing`) is root's, mode 0700.

use std::{io::ErrorKind, path::Path};

use anyhow::{bail, Result};

/// Capability numbers (linux/capability.h).
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;

/// Whether `caps` (a CapEff mask) holds capability `cap`.
pub fn has(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Uprobes need CAP_SYS_ADMIN whatever else is held.
pub fn check_uprobes(caps: u64) -> Result<()> {
    if !has(caps, CAP_SYS_ADMIN) {
        bail!(
            "permission denied: leaktrace needs CAP_SYS_ADMIN: the kernel creates uprobes (perf_event_open of the uprobe PMU) only with it; CAP_BPF and CAP_PERFMON are not enough"
        );
    }
    Ok(())
}

/// tracefs there but not readable: say which capability opens it (rather
/// than trying to mount it again).
pub fn check_tracefs(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir.join("events")) {
        Err(e) if e.kind() == ErrorKind::PermissionDenied => bail!(
            "permission denied: cannot read {} (tracefs, root's alone): leaktrace needs CAP_DAC_READ_SEARCH",
            dir.display()
        ),
        _ => Ok(()),
    }
}

/// `/proc/PID/exe` of `pid` unreadable for lack of rights: another user's
/// process, which needs CAP_SYS_PTRACE.
pub fn check_process_access(pid: u32) -> Result<()> {
    match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Err(e) if e.kind() == ErrorKind::PermissionDenied => bail!(
            "permission denied: cannot read /proc/{pid}/exe ({}, another user's process): leaktrace needs CAP_SYS_PTRACE",
            crate::procfs::comm(pid)
        ),
        _ => Ok(()),
    }
}

/// The agent reads every process's /proc entries to match them: without
/// CAP_SYS_PTRACE (and not running as root) it would skip other users'
/// processes silently.
pub fn check_agent(caps: u64) -> Result<()> {
    if !has(caps, CAP_SYS_PTRACE) {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        bail!(
            "permission denied: leaktrace agent needs CAP_SYS_PTRACE to read other processes' /proc entries{}",
            if root { " (running as root without it: a container or a service with a bounded capability set?)" } else { "" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_missing_capability_is_one_named_line() {
        let e = check_uprobes(0).unwrap_err().to_string();
        assert!(e.contains("CAP_SYS_ADMIN") && !e.contains('\n'), "{e}");
        assert!(check_uprobes(1 << CAP_SYS_ADMIN).is_ok());
        let e = check_agent(1 << CAP_SYS_ADMIN).unwrap_err().to_string();
        assert!(e.contains("CAP_SYS_PTRACE"), "{e}");
        assert!(check_agent(1 << CAP_SYS_PTRACE).is_ok());
        assert!(check_tracefs(Path::new("/nonexistent")).is_ok());
        assert!(check_process_access(std::process::id()).is_ok());
    }
}
