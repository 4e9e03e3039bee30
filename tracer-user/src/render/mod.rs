//! Renderers over the one report model ([`crate::report::Report`]).
//!
//! Renderers never talk to trackers: everything they show comes from a
//! `Report`, so the table, the JSON lines and the Prometheus exposition can
//! never disagree. The pprof profile and the flame graph are written once,
//! from the final report.

pub mod check;
pub mod flamegraph;
pub mod json;
pub mod pprof;
pub mod prometheus;
pub mod table;
