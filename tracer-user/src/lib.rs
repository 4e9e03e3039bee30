//! leaktrace as a library: the `leaktrace` binary is a thin CLI over these modules.
//!
//! Data flows one way: probes -> per-stack aggregates in BPF maps ->
//! a collector per tracker ([`trackers`]) that yields samples -> one growth
//! engine ([`growth`]) -> one report model ([`report`]) -> renderers ([`render`]).

pub mod report;
pub mod growth;
pub mod metrics_server;
pub mod render;
pub mod child;
pub mod cli;
pub mod binary;
pub mod probes;
pub mod procfs;
pub mod session;
pub mod stacks;
pub mod trackers;
