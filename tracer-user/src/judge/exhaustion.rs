//! When a growing resource runs out: for each growing or leaking finding, the
//! limit its growth runs into, read from the target (/proc, its cgroup), and
//! the seconds left at its slope; for the report, the resource that runs out
//! first at every growing site's slope together, and the site with the
//! largest share of that growth. One place for every tracker's findings.
//!
//! | kinds | resource | limit (the tightest that applies) | in use |
//! |---|---|---|---|
//! | fd, connection | open files | `RLIMIT_NOFILE` (soft, /proc/PID/limits) | fds open now |
//! | thread | threads | the cgroup's `pids.max` (any ancestor), `/proc/sys/kernel/threads-max` | the cgroup's `pids.current`, the system's threads |
//! | allocation | memory | the cgroup's `memory.max` (v2) / `memory.limit_in_bytes` (v1), `GOMEMLIMIT` | the process's RSS |
//! | map, goroutine (with `bytes_per_object`) | memory | the same | the process's RSS |
//! | connection with a peer | ephemeral ports to PEER | `net.ipv4.ip_local_port_range` of its network namespace | the namespace's TCP sockets to PEER, `TIME_WAIT` included |

use std::collections::HashMap;

use crate::{
    procfs,
    report::{Exhaustion, Finding, Kind, Verdict},
};

/// A limit and what uses it now.
#[derive(Clone, Debug, PartialEq)]
pub struct Limit {
    pub resource: String,
    pub source: String,
    pub limit: u64,
    pub in_use: u64,
}

impl Limit {
    fn headroom(&self) -> u64 {
        self.limit.saturating_sub(self.in_use)
    }
}

/// The resources a finding's objects use up whose limits leaktrace knows.
fn resources_of(f: &Finding) -> Vec<String> {
    match f.kind {
        Kind::Fd => vec![OPEN_FILES.into()],
        // An outgoing connection also holds a local port toward its peer.
        Kind::Connection => {
            let mut r = vec![OPEN_FILES.to_string()];
            if let Some(peer) = f.peer.as_deref().filter(|p| p.parse::<std::net::SocketAddr>().is_ok()) {
                r.push(format!("{PORTS_TO}{peer}"));
            }
            r
        }
        Kind::Thread => vec!["threads".into()],
        Kind::Allocation => vec!["memory".into()],
        // Entries and goroutines in bytes: their size is known per finding.
        Kind::Goroutine | Kind::Map if f.bytes_per_object.is_some() => vec!["memory".into()],
        Kind::Goroutine | Kind::Map | Kind::Lock | Kind::Wait => Vec::new(),
    }
}

const OPEN_FILES: &str = "open files";
const PORTS_TO: &str = "ephemeral ports to ";

/// A finding's growth in the resource's unit, per second (bytes for memory).
fn slope_per_s(f: &Finding) -> f64 {
    let per_min = match (f.kind, f.bytes_per_object) {
        (Kind::Allocation, _) => f.growth_bytes_per_min.unwrap_or(0.0),
        (Kind::Goroutine | Kind::Map, Some(bytes)) => f.growth_per_min * bytes as f64,
        _ => f.growth_per_min,
    };
    per_min / 60.0
}

/// Reads the tightest limit of `resource` for `pid` (least headroom).
pub fn read_limit(pid: u32, resource: &str) -> Option<Limit> {
    let mut candidates: Vec<Limit> = Vec::new();
    if let Some(peer) = resource.strip_prefix(PORTS_TO) {
        // Ports are per (local address, peer): sockets of any process of the
        // namespace toward the peer hold them, TIME_WAIT ones too.
        let peer: std::net::SocketAddr = peer.parse().ok()?;
        let (lo, hi) = procfs::local_port_range(pid)?;
        let in_use = procfs::tcp_sockets_to(pid, peer);
        return Some(Limit { resource: resource.into(), source: "net.ipv4.ip_local_port_range".into(), limit: hi - lo + 1, in_use });
    }
    match resource {
        "open files" => {
            let limit = procfs::open_files_limit(pid)?;
            let in_use = procfs::fd_count(pid).ok()?;
            candidates.push(Limit { resource: resource.into(), source: "RLIMIT_NOFILE".into(), limit, in_use });
        }
        "threads" => {
            for dir in procfs::cgroup_dirs(pid, "pids") {
                if let (Some(max), Some(cur)) = (procfs::cgroup_value(&dir, "pids.max"), procfs::cgroup_value(&dir, "pids.current")) {
                    candidates.push(Limit { resource: resource.into(), source: format!("{}/pids.max", dir.display()), limit: max, in_use: cur });
                }
            }
            if let Some((total, max)) = procfs::system_threads() {
                candidates.push(Limit { resource: resource.into(), source: "kernel.threads-max".into(), limit: max, in_use: total });
            }
        }
        "memory" => {
            let rss = procfs::rss_bytes(pid)?;
            for dir in procfs::cgroup_dirs(pid, "memory") {
                for file in ["memory.max", "memory.limit_in_bytes"] {
                    // v1 says "no limit" with a huge number.
                    if let Some(max) = procfs::cgroup_value(&dir, file).filter(|&m| m < 1 << 60) {
                        candidates.push(Limit { resource: resource.into(), source: format!("{}/{file}", dir.display()), limit: max, in_use: rss });
                    }
                }
            }
            if let Some(max) = procfs::environ_var(pid, "GOMEMLIMIT").and_then(|v| parse_go_bytes(&v)) {
                candidates.push(Limit { resource: resource.into(), source: "GOMEMLIMIT".into(), limit: max, in_use: rss });
            }
        }
        _ => {}
    }
    candidates.into_iter().min_by_key(Limit::headroom)
}

/// `GOMEMLIMIT` syntax: a byte count with an optional B/KiB/MiB/GiB/TiB suffix.
pub fn parse_go_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Fills `exhausts` of every growing finding whose resource has a limit
/// (`limits` reads one; [`read_limit`] in a session) and returns the
/// resource that runs out first at all its sites' growth together.
pub fn annotate(findings: &mut [Finding], mut limits: impl FnMut(&str) -> Option<Limit>) -> Option<Exhaustion> {
    let growing = |f: &Finding| matches!(f.verdict, Verdict::Leak | Verdict::Growing) && slope_per_s(f) > 0.0;
    // Total growth per resource.
    let mut total: HashMap<String, f64> = HashMap::new();
    for f in findings.iter().filter(|f| growing(f)) {
        for r in resources_of(f) {
            *total.entry(r).or_default() += slope_per_s(f);
        }
    }
    let read: HashMap<String, Limit> = total.keys().filter_map(|r| Some((r.clone(), limits(r)?))).collect();
    let mut top: HashMap<String, (f64, String)> = HashMap::new();
    for f in findings.iter_mut().filter(|f| growing(f)) {
        // A finding's own: the resource it exhausts first at its slope.
        let mut soonest: Option<Exhaustion> = None;
        for r in resources_of(f) {
            let Some(limit) = read.get(&r) else { continue };
            let share = slope_per_s(f) / total[&r];
            let e = exhaustion(limit, slope_per_s(f), share, None);
            if soonest.as_ref().is_none_or(|s| e.seconds < s.seconds) {
                soonest = Some(e);
            }
            let best = top.entry(r).or_insert((0.0, String::new()));
            if share > best.0 {
                *best = (share, f.site.clone());
            }
        }
        f.exhausts = soonest;
    }
    read.iter()
        .map(|(r, limit)| {
            let (share, site) = top.get(r).cloned().unwrap_or_default();
            exhaustion(limit, total[r], share, Some(site))
        })
        .min_by(|a, b| a.seconds.total_cmp(&b.seconds))
}

fn exhaustion(limit: &Limit, per_s: f64, share: f64, site: Option<String>) -> Exhaustion {
    Exhaustion {
        resource: limit.resource.clone(),
        limit_source: limit.source.clone(),
        limit: limit.limit,
        in_use: limit.in_use,
        seconds: (limit.headroom() as f64 / per_s * 10.0).round() / 10.0,
        share: (share * 1000.0).round() / 1000.0,
        site,
    }
}

/// `~37 min`, `~2.5 h`, `~40 s`: how a person reads a time to exhaustion.
pub fn eta_text(seconds: f64) -> String {
    if seconds < 120.0 {
        format!("~{seconds:.0} s")
    } else if seconds < 7200.0 {
        format!("~{:.0} min", seconds / 60.0)
    } else if seconds < 172_800.0 {
        format!("~{:.1} h", seconds / 3600.0)
    } else {
        format!("~{:.0} days", seconds / 86400.0)
    }
}

/// The report's headline: `api-server runs out of open files in ~37 min
/// (RLIMIT_NOFILE 2048, 1890 in use); 92 % of the growth is main.appendAccessLog`.
pub fn headline(comm: &str, e: &Exhaustion) -> String {
    format!(
        "{comm} runs out of {} in {} ({} {}, {} in use); {:.0} % of the growth is {}",
        e.resource,
        eta_text(e.seconds),
        e.limit_source,
        e.limit,
        e.in_use,
        e.share * 100.0,
        e.site.as_deref().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn growing(kind: Kind, site: &str, per_min: f64) -> Finding {
        Finding { site: site.into(), growth_per_min: per_min, live: 10, ..Finding::new(kind, Verdict::Leak) }
    }

    #[test]
    fn eta_per_site_and_for_the_resource() {
        let mut f = vec![
            growing(Kind::Fd, "appendAccessLog", 540.0),
            growing(Kind::Fd, "notifyWorker", 60.0),
            growing(Kind::Thread, "spawn", 60.0),
            Finding { growth_per_min: 600.0, ..growing(Kind::Fd, "pool", 0.0) }.with_verdict(Verdict::Steady),
        ];
        let top = annotate(&mut f, |r| match r {
            "open files" => Some(Limit { resource: r.into(), source: "RLIMIT_NOFILE".into(), limit: 2048, in_use: 48 }),
            _ => None,
        })
        .unwrap();
        // 2000 fds left at 10/s together: 200 s; the first site has 90 %.
        assert_eq!(top.seconds, 200.0);
        assert_eq!(top.share, 0.9);
        assert_eq!(top.site.as_deref(), Some("appendAccessLog"));
        let e = f[0].exhausts.as_ref().unwrap();
        assert_eq!((e.seconds, e.share, e.limit, e.in_use), (222.2, 0.9, 2048, 48));
        assert_eq!(f[1].exhausts.as_ref().unwrap().seconds, 2000.0);
        assert!(f[2].exhausts.is_none(), "no thread limit given");
        assert!(f[3].exhausts.is_none(), "steady findings do not exhaust");
        assert_eq!(
            headline("api-server", &top),
            "api-server runs out of open files in ~3 min (RLIMIT_NOFILE 2048, 48 in use); 90 % of the growth is appendAccessLog"
        );
    }

    impl Finding {
        fn with_verdict(mut self, v: Verdict) -> Self {
            self.verdict = v;
            self
        }
    }

    #[test]
    fn connections_exhaust_ports_to_their_peer_or_fds_first() {
        let mut f = vec![Finding { peer: Some("127.0.0.1:6379".into()), ..growing(Kind::Connection, "dialRedis", 600.0) }];
        let top = annotate(&mut f, |r| match r {
            "open files" => Some(Limit { resource: r.into(), source: "RLIMIT_NOFILE".into(), limit: 65536, in_use: 536 }),
            "ephemeral ports to 127.0.0.1:6379" => {
                Some(Limit { resource: r.into(), source: "net.ipv4.ip_local_port_range".into(), limit: 28232, in_use: 232 })
            }
            _ => None,
        })
        .unwrap();
        // 28000 ports left at 10/s: sooner than 65000 fds.
        assert_eq!((top.resource.as_str(), top.seconds), ("ephemeral ports to 127.0.0.1:6379", 2800.0));
        assert_eq!(f[0].exhausts.as_ref().unwrap().resource, "ephemeral ports to 127.0.0.1:6379");
    }

    /// Map entries and goroutines use up memory at their count's slope times
    /// the bytes each takes; together with a heap leak against one limit.
    #[test]
    fn go_maps_and_goroutines_exhaust_memory() {
        let mut f = vec![
            Finding { map: Some("main.cache".into()), bytes_per_object: Some(42), ..growing(Kind::Map, "main.cacheResponse", 60_000.0) },
            Finding { bytes_per_object: Some(8192), ..growing(Kind::Goroutine, "main.NewSession", 600.0) },
            // Unknown size (a type not read): no memory figure.
            growing(Kind::Map, "main.unknown", 60_000.0),
        ];
        let top = annotate(&mut f, |r| match r {
            "memory" => Some(Limit { resource: r.into(), source: "GOMEMLIMIT".into(), limit: 1 << 30, in_use: (1 << 30) - 9_112_000 }),
            _ => None,
        })
        .unwrap();
        // 1000 entries/s * 42 B + 10 goroutines/s * 8 KiB = 123 920 B/s.
        assert_eq!((top.resource.as_str(), top.seconds), ("memory", 73.5));
        assert_eq!(top.site.as_deref(), Some("main.NewSession"));
        assert_eq!(f[0].exhausts.as_ref().unwrap().seconds, 217.0);
        assert_eq!(f[1].exhausts.as_ref().unwrap().share, 0.661);
        assert!(f[2].exhausts.is_none());
    }

    #[test]
    fn go_memory_limits_parse() {
        assert_eq!(parse_go_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_go_bytes("1000"), Some(1000));
        assert_eq!(parse_go_bytes("off"), None);
        assert_eq!(eta_text(30.0), "~30 s");
        assert_eq!(eta_text(2220.0), "~37 min");
    }

    #[test]
    fn reads_this_process_limits() {
        let pid = std::process::id();
        let files = read_limit(pid, "open files").unwrap();
        assert!(files.limit > 0 && files.in_use > 0 && files.in_use < files.limit, "{files:?}");
        let threads = read_limit(pid, "threads").unwrap();
        assert!(threads.in_use > 0, "{threads:?}");
        // Our own namespace: the range read directly (another one is read
        // from inside it: tests/exhaustion.rs).
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let r: Vec<u64> = range.split_whitespace().map(|v| v.parse().unwrap()).collect();
        assert_eq!(procfs::local_port_range(pid), Some((r[0], r[1])));
    }
}
