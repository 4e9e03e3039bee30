//! The fleet's /metrics: every target's report families (one family each,
//! samples told apart by `pid`), `leaktrace_target_info` per target, and the
//! agent's own state and cost.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Instant,
};

use prometheus_client::{
    collector::Collector,
    encoding::DescriptorEncoder,
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use crate::identity::Identity;
use crate::render::prometheus::{encode_reports, encode_target_info, family, SharedReport};

/// One target of the agent.
#[derive(Debug)]
pub struct Traced {
    pub identity: Identity,
    /// Its session's latest report (`None` before the first).
    pub report: SharedReport,
    /// When its session ended (the target exited): the series stay until
    /// `--keep-exited` after it.
    pub exited_at: Option<Instant>,
    /// Set when the process matched but is not traced: its identity row
    /// stays while it lives, without per-site series.
    pub untraced: Option<Untraced>,
    /// Time the agent spent in its session after its first report
    /// ([`super::budget::Metered`]): what shedding it saves.
    pub busy_ns: Arc<AtomicU64>,
}

/// Why a matching, living process is not traced (`leaktrace_target_untraced`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Untraced {
    /// Shed to get back under the agent's budget.
    Shed,
    /// Its load or attach failed (e.g. the kernel's E2BIG: too many
    /// programs on one tracepoint).
    Refused,
}

impl Untraced {
    pub fn as_str(self) -> &'static str {
        match self {
            Untraced::Shed => "shed",
            Untraced::Refused => "refused",
        }
    }
}

/// Why a matching process is not traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// `--max-targets` targets were traced already.
    MaxTargets,
    /// It exited (or exec'd away) before `--settle` passed.
    ExitedEarly,
    /// Its session failed before the first report (gone, not permitted...).
    AttachFailed,
    /// It exec'd while the agent was over its budget.
    OverBudget,
}

impl Skip {
    fn as_str(self) -> &'static str {
        match self {
            Skip::MaxTargets => "max_targets",
            Skip::ExitedEarly => "exited_early",
            Skip::AttachFailed => "attach_failed",
            Skip::OverBudget => "over_budget",
        }
    }
}

/// What the agent serves, shared by its loop and the scrapes.
#[derive(Debug, Default)]
pub struct Fleet {
    pub targets: BTreeMap<u32, Traced>,
    pub skipped: BTreeMap<Skip, u64>,
    /// Exec records the watcher's ring could not hold.
    pub execs_lost: u64,
    /// Targets shed over budget, since start.
    pub shed_total: u64,
    /// CPU seconds spent picking targets up (not counted in the budget).
    pub pickup_cpu_s: f64,
}

impl Fleet {
    /// Targets in `state`: traced now, exited (series kept), or untraced.
    pub fn count(&self, state: &str) -> usize {
        self.targets.values().filter(|t| state_of(t) == state).count()
    }
}

fn state_of(t: &Traced) -> &'static str {
    match (t.untraced, t.exited_at) {
        (Some(u), _) => u.as_str(),
        (None, Some(_)) => "exited",
        (None, None) => "traced",
    }
}

pub type SharedFleet = Arc<RwLock<Fleet>>;

/// Encodes the fleet at every scrape.
#[derive(Debug)]
struct FleetCollector {
    fleet: SharedFleet,
    max_sites: usize,
}

/// The registry the agent's /metrics server encodes.
pub fn registry(fleet: SharedFleet, max_sites: usize) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(FleetCollector { fleet, max_sites }));
    registry
}

impl Collector for FleetCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let fleet = self.fleet.read().unwrap_or_else(|e| e.into_inner());
        let guards: Vec<_> = fleet.targets.values().map(|t| t.report.read().unwrap_or_else(|e| e.into_inner())).collect();
        let reports: Vec<&crate::report::Report> = guards.iter().filter_map(|g| g.as_ref()).collect();
        encode_reports(&mut e, &reports, true, self.max_sites)?;
        let e = &mut e;
        encode_target_info(e, fleet.targets.values().map(|t| &t.identity))?;
        family(
            e,
            "leaktrace_target_exited",
            "1 when the target exited: its last report stays until --keep-exited after the exit, then its series are removed.",
            MetricType::Gauge,
            fleet.targets.values().map(|t| (vec![("pid", t.identity.pid.to_string())], ConstGauge::new(i64::from(t.exited_at.is_some())))),
        )?;
        family(
            e,
            "leaktrace_target_untraced",
            "1 for a matching process the agent does not trace (reason shed: over budget; refused: its load or attach failed); its target_info row stays while it lives.",
            MetricType::Gauge,
            fleet.targets.values().filter_map(|t| {
                let reason = t.untraced?.as_str();
                Some((vec![("pid", t.identity.pid.to_string()), ("reason", reason.to_string())], ConstGauge::new(1)))
            }),
        )?;
        family(
            e,
            "leaktrace_target_agent_busy_seconds",
            "Time the agent spent working for this target after picking it up (its session, on the agent's one thread): what shedding it would save.",
            MetricType::Counter,
            fleet.targets.values().filter(|t| t.untraced.is_none()).map(|t| {
                let s = t.busy_ns.load(Ordering::Relaxed) as f64 * 1e-9;
                (vec![("pid", t.identity.pid.to_string())], ConstCounter::new(s))
            }),
        )?;
        family(
            e,
            "leaktrace_agent_targets",
            "Processes the agent traces now (state traced), keeps after their exit (exited), shed over budget (shed) or could not load for (refused).",
            MetricType::Gauge,
            ["traced", "exited", "shed", "refused"]
                .map(|state| (vec![("state", state.to_string())], ConstGauge::new(fleet.count(state) as i64))),
        )?;
        family(
            e,
            "leaktrace_agent_shed_targets",
            "Targets the agent stopped tracing to get back under --max-cpu / --max-rss.",
            MetricType::Counter,
            [(Vec::new(), ConstCounter::new(fleet.shed_total))],
        )?;
        family(
            e,
            "leaktrace_agent_targets_skipped",
            "Matching processes not traced, by reason: max_targets (the bound was reached), exited_early (gone before --settle), attach_failed, over_budget (exec'd while the agent was over budget).",
            MetricType::Counter,
            [Skip::MaxTargets, Skip::ExitedEarly, Skip::AttachFailed, Skip::OverBudget].map(|s| {
                (vec![("reason", s.as_str().to_string())], ConstCounter::new(fleet.skipped.get(&s).copied().unwrap_or(0)))
            }),
        )?;
        family(
            e,
            "leaktrace_agent_execs_lost",
            "Exec events the watcher's ring could not hold: processes that may have been missed.",
            MetricType::Counter,
            [(Vec::new(), ConstCounter::new(fleet.execs_lost))],
        )?;
        let (cpu_s, rss) = own_usage();
        family(
            e,
            "leaktrace_agent_cpu_seconds",
            "CPU time the agent used (user + system), seconds.",
            MetricType::Counter,
            [(Vec::new(), ConstCounter::new(cpu_s))],
        )?;
        family(
            e,
            "leaktrace_agent_pickup_cpu_seconds",
            "The part of leaktrace_agent_cpu_seconds_total spent picking targets up (loading, verifying, attaching, the first report): left out of --max-cpu.",
            MetricType::Counter,
            [(Vec::new(), ConstCounter::new(fleet.pickup_cpu_s))],
        )?;
        family(
            e,
            "leaktrace_agent_resident_bytes",
            "The agent's resident memory (RSS), bytes.",
            MetricType::Gauge,
            [(Vec::new(), ConstGauge::new(rss as i64))],
        )?;
        Ok(())
    }
}

/// The agent's own CPU seconds (utime + stime of /proc/self/stat) and RSS bytes.
pub fn own_usage() -> (f64, u64) {
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces) start at state (3).
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let cpu = (field(14) + field(15)) as f64 / ticks.max(1) as f64;
    let rss = field(24) * page.max(1) as u64;
    (cpu, rss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::{json::tests::example_report, prometheus::encode_registry_text};

    #[test]
    fn two_targets_share_each_family_and_have_info_rows() {
        let fleet = SharedFleet::default();
        for (pid, comm) in [(1234, "api-server"), (77, "worker")] {
            let mut r = example_report();
            r.pid = pid;
            r.comm = comm.into();
            let identity = Identity { pid, comm: comm.into(), exe: format!("/srv/{comm}"), ..Default::default() };
            fleet.write().unwrap().targets.insert(
                pid,
                Traced { identity, report: Arc::new(RwLock::new(Some(r))), exited_at: (pid == 77).then(Instant::now), untraced: None, busy_ns: Default::default() },
            );
        }
        for (pid, why) in [(55, Untraced::Shed), (56, Untraced::Refused)] {
            let identity = Identity { pid, comm: "idle".into(), ..Default::default() };
            fleet.write().unwrap().targets.insert(pid, Traced { identity, report: Default::default(), exited_at: None, untraced: Some(why), busy_ns: Default::default() });
        }
        fleet.write().unwrap().skipped.insert(Skip::MaxTargets, 3);
        fleet.write().unwrap().shed_total = 4;
        let text = encode_registry_text(&registry(fleet, 20));
        assert_eq!(text.matches("# TYPE leaktrace_live_objects gauge").count(), 1, "{text}");
        assert!(text.contains(r#"leaktrace_live_objects{pid="1234",kind="connection",site="main.badHandler",verdict="leak"} 120"#));
        assert!(text.contains(r#"leaktrace_live_objects{pid="77",kind="connection",site="main.badHandler",verdict="leak"} 120"#));
        assert!(text.contains(r#"leaktrace_target_info{pid="77",comm="worker",exe="/srv/worker",build_id="""#), "{text}");
        assert!(text.contains(r#"leaktrace_target_exited{pid="77"} 1"#));
        assert!(text.contains(r#"leaktrace_target_exited{pid="1234"} 0"#));
        assert!(text.contains(r#"leaktrace_agent_targets{state="traced"} 1"#));
        assert!(text.contains(r#"leaktrace_agent_targets{state="shed"} 1"#) && text.contains(r#"leaktrace_agent_targets{state="refused"} 1"#), "{text}");
        assert!(text.contains(r#"leaktrace_target_untraced{pid="55",reason="shed"} 1"#), "{text}");
        assert!(text.contains(r#"leaktrace_target_untraced{pid="56",reason="refused"} 1"#), "{text}");
        assert!(text.contains(r#"leaktrace_target_info{pid="55",comm="idle""#), "an untraced target keeps its identity row: {text}");
        assert!(!text.contains(r#"leaktrace_live_objects{pid="55""#), "{text}");
        assert!(text.contains("leaktrace_agent_shed_targets_total{} 4"), "{text}");
        assert!(text.contains(r#"leaktrace_target_agent_busy_seconds_total{pid="1234"} 0"#), "{text}");
        assert!(!text.contains(r#"leaktrace_target_agent_busy_seconds_total{pid="55"}"#), "{text}");
        assert!(text.contains(r#"leaktrace_agent_targets_skipped_total{reason="max_targets"} 3"#));
        assert!(text.contains("leaktrace_build_info{version=\""));
        assert!(text.contains("\nleaktrace_up 1\n"));
        assert!(text.contains("leaktrace_agent_resident_bytes "));
    }

    #[test]
    fn own_usage_is_plausible() {
        let (cpu, rss) = own_usage();
        assert!(cpu >= 0.0);
        assert!(rss > 1 << 20, "{rss}");
    }
}
