//! The traced process's lifecycle (exec, exit), reported by the kernel side
//! whatever trackers run: every tracker depends on the image it probes.

/// Kinds of [`ProcessEvent`].
pub mod event {
    /// The target exec'd: a new image; addresses of the old one mean nothing now.
    pub const EXEC: u32 = 1;
    /// The target's main thread exited.
    pub const EXIT: u32 = 2;
}

/// A ring-buffer record of `PROCESS_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEvent {
    /// One of [`event`].
    pub kind: u32,
    pub tgid: u32,
    /// `bpf_ktime_get_ns()` when it happened.
    pub at_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::ProcessEvent {}
}
