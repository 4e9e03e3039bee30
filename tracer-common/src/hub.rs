//! The agent's hub: one set of tracepoint programs for every target of
//! `leaktrace agent`, which hands each event to the programs of the target
//! whose tgid raised it (a tail call into that target's own load).
//!
//! Why: a tracepoint takes at most 64 BPF programs, and each program
//! attached to a syscall tracepoint runs on every such syscall on the
//! machine. With a load per target attached directly, the agent could trace
//! about 30 processes, made other tracers fail (`E2BIG`) while it ran, and
//! every target added a program run to every `futex`, `close` and `mmap`
//! of the machine. Through the hub a tracepoint carries at most two of the
//! agent's programs (one per program a target puts there), whatever the
//! number of targets, and an event of an untraced process costs one hash
//! lookup.

/// Routes per target: one per (tracepoint, program) pair a target's load
/// attaches. Program-array index of a target's route: `slot * ROUTES + route`.
pub const ROUTES: u32 = 64;
