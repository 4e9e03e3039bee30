//! leaktrace as a library: the `leaktrace` binary is a thin CLI over these modules.
//!
//! Data flows one way, and the modules are listed in that order:
//! probes ([`probes`], the kernel side) -> per-stack aggregates in BPF maps
//! -> a collector per tracker ([`trackers`]) that yields samples -> stacks
//! resolved and named ([`stacks`]), with what [`binary`] knows of the executables -> one judge ([`judge`]:
//! growth engine, contention) -> one report model ([`report`]) -> renderers
//! ([`render`]) -> where the output goes ([`output`]). [`session`] runs the
//! loop; [`lifecycle`] follows the target's exec and exit.

pub mod cli;
pub mod session;
pub mod lifecycle;
pub mod child;
pub mod procfs;
pub mod identity;
pub mod probes;
pub mod privileges;
pub mod trackers;
pub mod binary;
pub mod stacks;
pub mod judge;
pub mod report;
pub mod render;
pub mod output;
pub mod agent;

/// The git revision this binary was built from (build.rs), `unknown` outside a checkout.
pub const REVISION: &str = env!("LEAKTRACE_REVISION");
