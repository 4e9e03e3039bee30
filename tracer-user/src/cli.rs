//! Command line: `attach`, `run`, `check` and their shared options.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    report::Kind,
    trackers::{ALIASES, REGISTRY},
};

/// leaktrace: find what grows in a running process — connections, threads,
/// goroutines, Go map entries, heap blocks, by the call stack that created
/// them — judge whether it leaks, and who waits on which lock.
///
/// Examples:
///   sudo leaktrace attach --pid 1234
///   sudo leaktrace attach --pid 1234 --listen 127.0.0.1:9464
///   sudo leaktrace check --for 30s -- ./api-server --port 8080
///   sudo leaktrace agent --match comm=api-server --match container=3f2a
#[derive(Parser, Debug)]
#[command(name = "leaktrace", version, verbatim_doc_comment)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Trace a running process.
    Attach {
        /// Process id to trace.
        #[arg(long)]
        pid: u32,
        #[command(flatten)]
        opts: TraceOptions,
    },
    /// Start CMD and trace it from its first instruction.
    Run {
        #[command(flatten)]
        opts: TraceOptions,
        /// Command and arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Trace, then exit 0 if nothing leaks, 3 if any finding has verdict
    /// "leak" (or a lock's waits exceed --fail-on-wait, or a resource runs
    /// out sooner than --fail-within), 1 on error.
    Check {
        /// Process id to trace (or give `-- CMD ARGS...`).
        #[arg(long, conflicts_with = "cmd")]
        pid: Option<u32>,
        /// Also fail (exit 3) when waiting on one lock took more than this
        /// share of the traced time (e.g. 0.2 = 20 %; summed over waiters;
        /// needs --track with locks).
        #[arg(long, value_name = "SHARE", value_parser = parse_share)]
        fail_on_wait: Option<f64>,
        /// Also fail (exit 3) when a resource (open files, threads, memory)
        /// runs out sooner than DURATION at the current growth (e.g. 10m).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        fail_within: Option<Duration>,
        #[command(flatten)]
        opts: TraceOptions,
        /// Command and arguments to start and trace.
        #[arg(last = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Trace every process matching --match (running ones, and those that
    /// exec later) and serve them all on one /metrics (default listen
    /// address 0.0.0.0:9477), each with a leaktrace_target_info row.
    Agent {
        /// Which processes to trace (repeatable; a process matching any is
        /// traced): comm=NAME, exe=PATH (`*` and `?` glob), cgroup=PREFIX
        /// (cgroup v2 path), container=ID-PREFIX, all.
        #[arg(long = "match", value_name = "SELECTOR", required = true, value_parser = parse_selector)]
        selectors: Vec<crate::agent::select::Selector>,
        /// How long an exited target's last report stays on /metrics before
        /// its series are removed.
        #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
        keep_exited: Duration,
        /// A process that exec'd is traced once it has run this long (short
        /// commands are skipped and counted, not loaded for).
        #[arg(long, default_value = "500ms", value_parser = parse_duration, value_name = "DURATION")]
        settle: Duration,
        /// Processes traced at once; more matches are skipped and counted
        /// (leaktrace_agent_targets_skipped_total{reason="max_targets"}).
        /// Each target has its own tables in the kernel (see
        /// docs/design/fleet.md for their size).
        #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
        max_targets: u32,
        /// CPU budget, percent of one core: over it for a whole
        /// --budget-window, the agent stops tracing targets, those with
        /// nothing above steady first (leaktrace_agent_shed_targets_total).
        #[arg(long, default_value_t = 1.0, value_name = "PERCENT", value_parser = parse_percent)]
        max_cpu: f64,
        /// Memory budget: RSS above this at every reading of a whole
        /// --budget-window sheds targets the same way.
        #[arg(long, default_value_t = 128, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        max_rss: u64,
        /// The window over which the budget is measured (again after each
        /// shed, before the next).
        #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
        budget_window: Duration,
        #[command(flatten)]
        opts: TraceOptions,
    },
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err("must be a number > 0 (percent of one core, e.g. 1 or 0.5)".into()),
    }
}

/// Where `leaktrace agent` serves /metrics without `--listen`: not 9464,
/// the OpenTelemetry SDK's Prometheus exporter default, which a traced
/// program may hold.
pub const AGENT_LISTEN: &str = "0.0.0.0:9477";

fn parse_selector(s: &str) -> Result<crate::agent::select::Selector, String> {
    crate::agent::select::Selector::parse(s)
}

/// Options common to every command.
#[derive(Args, Debug, Clone)]
pub struct TraceOptions {
    /// How long to trace (e.g. 30s, 2m; at most 365d); default: until
    /// Ctrl-C or the target exits.
    #[arg(long = "for", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,
    /// Sampling and report interval (250ms to 365d).
    #[arg(long, value_parser = parse_interval, default_value = "5s", value_name = "DURATION")]
    pub interval: Duration,
    /// Trackers to run: connections,fds,tasks,maps,allocations,locks (default: connections,tasks).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub track: Vec<String>,
    /// Output format: a table for people, or one JSON object per interval.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Shorthand for --format json.
    #[arg(long)]
    pub json: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics while tracing
    /// (HOST:PORT; HOST an address or a name such as localhost).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Option<String>,
    /// TLS and basic authentication for /metrics, from a web configuration
    /// file in the Prometheus exporter-toolkit format (tls_server_config:
    /// cert_file, key_file, min_version; basic_auth_users: user -> bcrypt hash).
    #[arg(long, value_name = "FILE")]
    pub web_config: Option<PathBuf>,
    /// What counts as your own code when naming a finding's site: functions
    /// starting with PREFIX (repeatable; e.g. `github.com/acme/` for a
    /// monorepo, a plugin's package). Default: the main executable's own
    /// code (Go: package main and the main module).
    #[arg(long = "own", value_name = "PREFIX")]
    pub own: Vec<String>,
    /// Table: list every finding; by default steady ones (nothing to act
    /// on) are folded into one line so the table leads with what needs
    /// action. JSON, metrics and files always have every finding.
    #[arg(long)]
    pub all: bool,
    /// Findings kept per report (the rest are counted as omitted).
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub max_findings: usize,
    /// Sites per kind exported on /metrics (the rest are summed as site="other").
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub max_sites: usize,
    /// Live sockets the kernel table holds; sockets beyond it are not
    /// tracked and are counted in `lost.events`.
    #[arg(long, default_value_t = tracer_common::connections::MAX_LIVE_SOCKETS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1 << 22))]
    pub max_sockets: u32,
    /// When the trace ends, write the final report as a gzipped pprof
    /// profile (profile.proto) to FILE: one sample per finding, weighted by
    /// live objects (sample types `connections`, `fds`, `threads`, `goroutines`,
    /// `map_entries`, `inuse_objects`/`inuse_space`, `contentions`/`delay`),
    /// labels `site`, `verdict`, `peer`, `thread_name`, `map`, `fd_type`, `path`. Read it with
    /// `go tool pprof -top FILE`.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,
    /// When the trace ends, write a flame graph SVG of the final report's
    /// live objects by creation stack to FILE (with several kinds tracked:
    /// one per kind, FILE-KIND.svg).
    #[arg(long, value_name = "FILE.svg")]
    pub flamegraph: Option<PathBuf>,
    /// Allocations: the ELF object holding the allocator (default: the libc
    /// the target maps). For static binaries give the executable itself, for
    /// a custom allocator its library (e.g. libjemalloc.so.2).
    #[arg(long, value_name = "PATH")]
    pub alloc_lib: Option<PathBuf>,
    /// Allocations: prefix of the allocator's function names (e.g. `je_` for
    /// jemalloc built with a prefix: je_malloc, je_free...).
    #[arg(long, default_value = "", value_name = "PREFIX")]
    pub alloc_prefix: String,
    /// Allocations: track a block of S bytes with probability min(1, S/N)
    /// and count it as 1/p blocks and S/p bytes (unbiased totals). Saves the
    /// stack walk and map updates of the blocks not sampled; the uprobe trap
    /// is still paid on every allocator call. 0: track every block.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub alloc_sample_bytes: u64,
    /// Allocations: live blocks the kernel table holds (preallocated, about
    /// 104 bytes each); blocks beyond it are not tracked and are counted in
    /// `lost.events`.
    #[arg(long, default_value_t = tracer_common::allocations::MAX_LIVE_ALLOCS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1 << 24))]
    pub max_allocations: u32,
    /// Only this kind's flame graph, written to the --flamegraph FILE itself
    /// (kinds: connection, fd, thread, goroutine, map, allocation, lock).
    #[arg(long, value_name = "KIND", requires = "flamegraph", value_parser = parse_kind)]
    pub flamegraph_kind: Option<Kind>,
    /// How user stacks are walked: `eh-frame` (the compiler's unwind
    /// tables, learned per pc: right in code built without frame pointers,
    /// as most distro libraries, `gcc -O2` and `cargo --release` are) or
    /// `fp` (frame pointers only: cheaper, wrong where they are missing).
    #[arg(long, value_enum, default_value_t = Unwind::EhFrame, value_name = "HOW")]
    pub unwind: Unwind,
}

/// How user stacks are walked (`--unwind`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unwind {
    EhFrame,
    Fp,
}

/// A command-line error found after parsing (an unknown tracker, `check`
/// without a target): exit 2 like clap's own usage errors.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Output format.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

impl TraceOptions {
    /// The format after `--json`.
    pub fn effective_format(&self) -> Format {
        if self.json { Format::Json } else { self.format }
    }
}

/// The longest `--for` and `--interval`: deadlines stay far from the
/// clock's limits.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The shortest `--interval`: each report reads /proc, the kernel tables
/// and symbolizes; below this leaktrace would spend a core on itself.
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    if d > MAX_DURATION {
        return Err("must be at most 365d".into());
    }
    Ok(d)
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_INTERVAL {
        return Err(format!("must be at least {}", humantime::format_duration(MIN_INTERVAL)));
    }
    Ok(d)
}

/// `HOST:PORT`, HOST a literal address or a name that resolves.
fn parse_listen(s: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    match s.to_socket_addrs() {
        Ok(addrs) if addrs.len() > 0 => Ok(s.to_string()),
        Ok(_) => Err("resolves to no address".into()),
        Err(e) => Err(format!("{e} (examples: 127.0.0.1:9464, localhost:9464, [::1]:9464)")),
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err("must be a number >= 0 (e.g. 0.2 for 20 % of the traced time)".into()),
    }
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::from_name(s).ok_or_else(|| {
        format!("unknown kind (kinds: {})", Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "))
    })
}

/// Resolves `--track` into the tracker names to run (as the user calls
/// them: `tasks` stays `tasks`), with a one-line error for unknown names.
/// Without `--track`: the registry's default trackers. The others are asked
/// for by name, each for a reason its registry entry gives.
pub fn trackers(list: &[String]) -> Result<Vec<&'static str>, String> {
    if list.is_empty() {
        return Ok(fold_aliases(REGISTRY.iter().filter(|s| s.default).map(|s| s.name).collect()));
    }
    // Aliases first where they stand for a group (`tasks`), then the
    // group's members, which may also be named alone.
    let all: Vec<&'static str> = REGISTRY.iter().map(|s| s.name).collect();
    let mut known = fold_aliases(all.clone());
    known.extend(all.iter().filter(|n| !known.contains(n)).collect::<Vec<_>>());
    let mut out = Vec::new();
    for name in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match known.iter().find(|t| **t == name) {
            Some(t) if !out.contains(t) => out.push(*t),
            Some(_) => {}
            None => return Err(format!("unknown tracker '{name}' (known: {})", known.join(","))),
        }
    }
    if out.is_empty() {
        return Err("--track names no tracker".into());
    }
    Ok(out)
}

/// The registry names behind tracker names (aliases expanded).
pub fn expand(names: &[&'static str]) -> Vec<&'static str> {
    names
        .iter()
        .flat_map(|n| ALIASES.iter().find(|a| a.0 == *n).map_or_else(|| vec![*n], |a| a.1.to_vec()))
        .collect()
}

/// Registry names with every complete alias group written as its alias.
fn fold_aliases(mut names: Vec<&'static str>) -> Vec<&'static str> {
    for (alias, members) in ALIASES {
        if let Some(first) = names.iter().position(|n| members.contains(n)) {
            if members.iter().all(|m| names.contains(m)) {
                names.retain(|n| !members.contains(n));
                names.insert(first, alias);
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_expand_to_registry_names() {
        assert_eq!(expand(&["connections", "tasks"]), vec!["connections", "threads", "goroutines"]);
        assert_eq!(trackers(&["threads".into()]).unwrap(), vec!["threads"]);
    }

    #[test]
    fn track_list_is_checked() {
        assert_eq!(trackers(&[]).unwrap(), vec!["connections", "tasks"]);
        assert_eq!(trackers(&["tasks".into()]).unwrap(), vec!["tasks"]);
        assert_eq!(trackers(&["locks".into()]).unwrap(), vec!["locks"]);
        assert!(trackers(&["sockets".into()]).unwrap_err().contains("unknown tracker"));
        assert_eq!(trackers(&["maps".into()]).unwrap(), vec!["maps"]);
        assert_eq!(trackers(&["allocations".into()]).unwrap(), vec!["allocations"]);
        assert_eq!(trackers(&["fds".into(), "connections".into()]).unwrap(), vec!["fds", "connections"]);
    }

    #[test]
    fn export_options_parse() {
        let cli = Cli::try_parse_from([
            "leaktrace", "attach", "--pid", "1", "--pprof", "p.pb.gz", "--flamegraph", "f.svg", "--flamegraph-kind", "connections",
        ])
        .unwrap();
        let Command::Attach { opts, .. } = cli.command else { panic!() };
        assert_eq!(opts.pprof.as_deref(), Some(std::path::Path::new("p.pb.gz")));
        assert_eq!(opts.flamegraph_kind, Some(Kind::Connection));
        let err = Cli::try_parse_from(["leaktrace", "attach", "--pid", "1", "--flamegraph-kind", "connection"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(Cli::try_parse_from(["leaktrace", "attach", "--pid", "1", "--flamegraph", "f.svg", "--flamegraph-kind", "heap"]).is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn absurd_durations_and_intervals_are_refused() {
        assert!(parse_duration("300000000000y").is_err());
        assert_eq!(parse_duration("366d").unwrap_err(), "must be at most 365d");
        assert!(parse_duration("365d").is_ok());
        assert_eq!(parse_interval("1ms").unwrap_err(), "must be at least 250ms");
        assert!(parse_interval("250ms").is_ok());
        let err = Cli::try_parse_from(["leaktrace", "attach", "--pid", "1", "--for", "300000000000y"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn listen_accepts_host_names() {
        assert_eq!(parse_listen("localhost:9464").unwrap(), "localhost:9464");
        assert!(parse_listen("127.0.0.1:0").is_ok());
        assert!(parse_listen("[::1]:9464").is_ok());
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen("no-such-host.invalid:80").is_err());
    }
}
