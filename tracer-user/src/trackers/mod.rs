//! One collector per tracker: each reads its kernel aggregates and yields
//! per-stack samples; none of them formats output.

pub mod connections;
pub mod threads;

use tracer_common::stacks::StackKey;

/// What a collector says about one creation stack at one instant.
#[derive(Clone, Debug)]
pub struct StackSample {
    pub stack: StackKey,
    /// Objects alive now.
    pub live: u64,
    /// Created since attach.
    pub created: u64,
    /// Ended since attach.
    pub ended: u64,
    /// Age of the oldest live object, seconds.
    pub oldest_age_s: Option<f64>,
    /// Connections: most common peer of the live ones.
    pub peer: Option<String>,
    /// Threads: most common name of the live ones.
    pub thread_name: Option<String>,
}

/// Counter totals read from the kernel side.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub events: u64,
    pub lost_events: u64,
    pub lost_stacks: u64,
    pub lost_ring: u64,
    /// Thread tracker events (created, ended).
    pub thread_events: u64,
}
