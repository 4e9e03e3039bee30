//! Prometheus (OpenMetrics text) exposition of the latest report.
//!
//! A [`ReportCollector`] encodes whatever report is current at scrape time,
//! so a site that vanished from the latest report vanishes from the scrape
//! instead of being frozen at its last value (which registered gauges would
//! do).
//!
//! Cardinality is bounded: per kind, the top `max_sites` sites (by live, then
//! growth) get their own series and the rest are summed into `site="other"`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, RwLock},
};

use prometheus_client::{
    collector::Collector,
    encoding::{text, DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use crate::{
    identity::Identity,
    report::{Report, Verdict},
};

/// The latest report, written by the reporting loop and read by each scrape.
/// `None` until the first report exists.
pub type SharedReport = Arc<RwLock<Option<Report>>>;

/// An empty [`SharedReport`] (no report yet).
pub fn new_shared_report() -> SharedReport {
    Arc::new(RwLock::new(None))
}

/// Content type of what [`encode_text`] and [`encode_registry_text`] produce.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Default per-kind bound on distinct `site` label values.
pub const DEFAULT_MAX_SITES: usize = 20;

/// The `site` label value that sums the sites beyond the per-kind bound.
pub const OTHER_SITE: &str = "other";

/// A prometheus-client collector that encodes the latest shared report on
/// every scrape.
#[derive(Debug, Clone)]
pub struct ReportCollector {
    shared: SharedReport,
    max_sites: usize,
    /// The target's identity, read at the first scrape (again when the
    /// target's pid or command changes: an exec).
    identity: Arc<std::sync::Mutex<Option<Identity>>>,
}

impl ReportCollector {
    /// A collector over `shared`, keeping at most `max_sites` sites per kind.
    pub fn new(shared: SharedReport, max_sites: usize) -> Self {
        ReportCollector { shared, max_sites, identity: Arc::default() }
    }
}

impl Collector for ReportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A writer that panicked cannot leave a half-written report (it is
        // replaced whole), so a poisoned lock is still safe to read.
        let guard = self.shared.read().unwrap_or_else(|e| e.into_inner());
        let reports: Vec<&Report> = guard.iter().collect();
        encode_reports(&mut encoder, &reports, guard.is_some(), self.max_sites)?;
        let Some(report) = guard.as_ref() else { return Ok(()) };
        let mut cached = self.identity.lock().unwrap_or_else(|e| e.into_inner());
        if cached.as_ref().is_none_or(|i| i.pid != report.pid || (i.comm != report.comm && report.comm != "?")) {
            *cached = Some(Identity::read(report.pid));
        }
        encode_target_info(&mut encoder, cached.iter())
    }
}

/// `leaktrace_target_info`: one row per target, always 1 (join on `pid`).
pub fn encode_target_info<'a>(e: &mut DescriptorEncoder, targets: impl Iterator<Item = &'a Identity>) -> Result<(), std::fmt::Error> {
    family(
        e,
        "leaktrace_target_info",
        "Always 1 per traced process: its identity (join on pid). container_id, pod_uid and friends come from its cgroup path; empty when it has none.",
        MetricType::Gauge,
        targets.map(|i| {
            let c = &i.container;
            let labels: Labels = [
                ("pid", i.pid.to_string()),
                ("comm", i.comm.clone()),
                ("exe", i.exe.clone()),
                ("build_id", i.build_id.clone()),
                ("cgroup", i.cgroup.clone()),
                ("container_id", c.id.clone()),
                ("container_runtime", c.runtime.clone()),
                ("pod_uid", c.pod_uid.clone()),
                ("qos_class", c.qos_class.clone()),
                ("systemd_unit", c.systemd_unit.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k, escape_label(&v)))
            .collect();
            (labels, ConstGauge::new(1))
        }),
    )
}

/// A registry holding one [`ReportCollector`] over `shared`: what the
/// metrics server encodes on each scrape.
pub fn registry(shared: SharedReport, max_sites: usize) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReportCollector::new(shared, max_sites)));
    registry
}

/// The OpenMetrics text exposition of `registry`, `# EOF` included.
pub fn encode_registry_text(registry: &Registry) -> String {
    let mut out = String::new();
    text::encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}

/// The OpenMetrics text exposition of one report (what a scrape returns
/// while `report` is the latest one).
pub fn encode_text(report: &Report, max_sites: usize) -> String {
    let shared = Arc::new(RwLock::new(Some(report.clone())));
    encode_registry_text(&registry(shared, max_sites))
}

/// The per-(kind, site) numbers exposed: findings sharing a site are summed.
#[derive(Clone, Debug, PartialEq)]
struct SiteAgg {
    live: u64,
    growth_per_min: f64,
    /// Worst verdict of the findings summed (leak > growing > steady).
    verdict: Verdict,
    /// Oldest of the known ages.
    oldest_age_s: Option<f64>,
    /// Allocations: bytes alive now (summed).
    live_bytes: Option<u64>,
}

impl SiteAgg {
    fn merge(&mut self, other: &SiteAgg) {
        self.live += other.live;
        self.growth_per_min += other.growth_per_min;
        // Verdict's order is Leak < Growing < Steady: the minimum is the worst.
        self.verdict = self.verdict.min(other.verdict);
        self.oldest_age_s = match (self.oldest_age_s, other.oldest_age_s) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.live_bytes = match (self.live_bytes, other.live_bytes) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
    }
}

/// Per kind wire name: the sites kept (at most `max_sites` plus `other`) and
/// how many sites were folded into `other`.
fn aggregate_sites(
    report: &Report,
    max_sites: usize,
) -> BTreeMap<&'static str, (BTreeMap<String, SiteAgg>, usize)> {
    let mut by_kind: BTreeMap<&'static str, BTreeMap<&str, SiteAgg>> = BTreeMap::new();
    for f in &report.findings {
        let agg = SiteAgg {
            live: f.live,
            growth_per_min: finite(f.growth_per_min),
            verdict: f.verdict,
            oldest_age_s: f.oldest_age_s.filter(|a| a.is_finite()),
            live_bytes: f.live_bytes,
        };
        by_kind
            .entry(f.kind.as_str())
            .or_default()
            .entry(f.site.as_str())
            .and_modify(|a| a.merge(&agg))
            .or_insert(agg);
    }
    by_kind
        .into_iter()
        .map(|(kind, sites)| {
            let mut ranked: Vec<(&str, SiteAgg)> = sites.into_iter().collect();
            ranked.sort_by(|(sa, a), (sb, b)| {
                b.live
                    .cmp(&a.live)
                    .then(b.growth_per_min.total_cmp(&a.growth_per_min))
                    .then(sa.cmp(sb))
            });
            let folded = ranked.len().saturating_sub(max_sites);
            let mut kept: BTreeMap<String, SiteAgg> = BTreeMap::new();
            for (i, (site, agg)) in ranked.into_iter().enumerate() {
                let label = if i < max_sites { site } else { OTHER_SITE };
                kept.entry(label.to_string())
                    .and_modify(|a| a.merge(&agg))
                    .or_insert(agg);
            }
            (kind, (kept, folded))
        })
        .collect()
}

fn finite(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

/// Escapes a label value for the text format (the encoder writes values
/// verbatim): backslash, double quote and newline.
pub(crate) fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

pub(crate) type Labels = Vec<(&'static str, String)>;

/// Writes one family: HELP/TYPE, then one sample per label set.
pub(crate) fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric_encoder = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in samples {
        metric.encode(metric_encoder.encode_family(&labels)?)?;
    }
    Ok(())
}

/// This build: `leaktrace_build_info{version, revision} 1`.
fn encode_build_info(e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    family(
        e,
        "leaktrace_build_info",
        "Always 1: the leaktrace version and the git revision it was built from.",
        MetricType::Gauge,
        [(
            vec![("version", env!("CARGO_PKG_VERSION").to_string()), ("revision", escape_label(crate::REVISION))],
            ConstGauge::new(1),
        )],
    )
}

/// One report with what its families need: its `pid` label and its sites.
struct PerReport<'a> {
    report: &'a Report,
    pid: String,
    sites: BTreeMap<&'static str, (BTreeMap<String, SiteAgg>, usize)>,
}

/// All families for `reports` (one target each: `leaktrace agent` has many),
/// each family written once with every report's samples, told apart by
/// `pid`. `up`: the value of `leaktrace_up`.
pub fn encode_reports(
    e: &mut DescriptorEncoder,
    reports: &[&Report],
    up: bool,
    max_sites: usize,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(i64::from(up)).encode(e.encode_descriptor(
        "leaktrace_up",
        "1 once leaktrace has produced a report for its target, 0 before.",
        None,
        MetricType::Gauge,
    )?)?;
    encode_build_info(e)?;
    if reports.is_empty() {
        return Ok(());
    }
    let per: Vec<PerReport> = reports
        .iter()
        .map(|r| PerReport { report: r, pid: r.pid.to_string(), sites: aggregate_sites(r, max_sites) })
        .collect();
    let site_labels = |pid: &str, kind: &str, site: &str, verdict: Option<Verdict>| -> Labels {
        let mut l = vec![("pid", pid.to_string()), ("kind", escape_label(kind)), ("site", escape_label(site))];
        if let Some(v) = verdict {
            l.push(("verdict", v.as_str().to_string()));
        }
        l
    };
    let per_site = || {
        per.iter().flat_map(|p| {
            p.sites
                .iter()
                .flat_map(move |(kind, (kept, _))| kept.iter().map(move |(site, agg)| (p.pid.as_str(), *kind, site, agg)))
        })
    };

    family(
        e,
        "leaktrace_live_objects",
        "Objects alive now, by kind and creation site (top sites per kind; the rest summed into site other).",
        MetricType::Gauge,
        per_site().map(|(p, k, s, a)| (site_labels(p, k, s, Some(a.verdict)), ConstGauge::new(a.live as i64))),
    )?;
    family(
        e,
        "leaktrace_live_bytes",
        "Allocations: bytes alive now, by creation site (same sites as leaktrace_live_objects).",
        MetricType::Gauge,
        per_site().filter_map(|(p, k, s, a)| {
            a.live_bytes
                .map(|b| (site_labels(p, k, s, Some(a.verdict)), ConstGauge::new(i64::try_from(b).unwrap_or(i64::MAX))))
        }),
    )?;
    family(
        e,
        "leaktrace_growth_per_minute",
        "Least-squares slope of live objects over the judged window, objects per minute.",
        MetricType::Gauge,
        per_site().map(|(p, k, s, a)| (site_labels(p, k, s, Some(a.verdict)), ConstGauge::new(a.growth_per_min))),
    )?;
    family(
        e,
        "leaktrace_oldest_age_seconds",
        "Age of the oldest live object of the site, seconds (absent when unknown).",
        MetricType::Gauge,
        per_site().filter_map(|(p, k, s, a)| a.oldest_age_s.map(|age| (site_labels(p, k, s, None), ConstGauge::new(age)))),
    )?;

    // Time to exhaustion: each growing site at its own slope (the soonest
    // `max_sites`), and site="all" for the resource at every site's slope.
    family(
        e,
        "leaktrace_exhaustion_seconds",
        "Seconds until the resource (open files, threads, memory) runs out at the site's current growth; site all: at every growing site's growth together.",
        MetricType::Gauge,
        per.iter().flat_map(|p| {
            let mut exhausting: Vec<(&str, &crate::report::Exhaustion)> =
                p.report.findings.iter().filter_map(|f| f.exhausts.as_ref().map(|x| (f.site.as_str(), x))).collect();
            exhausting.sort_by(|a, b| a.1.seconds.total_cmp(&b.1.seconds));
            exhausting.truncate(max_sites);
            p.report.exhaustion.iter().map(|x| ("all", x)).chain(exhausting).map(|(site, x)| {
                (
                    vec![("pid", p.pid.clone()), ("resource", escape_label(&x.resource)), ("site", escape_label(site))],
                    ConstGauge::new(finite(x.seconds)),
                )
            })
        }),
    )?;

    family(
        e,
        "leaktrace_events",
        "Events seen since attach, by kind.",
        MetricType::Counter,
        per.iter().flat_map(|p| {
            p.report
                .events
                .iter()
                .map(|(kind, n)| (vec![("pid", p.pid.clone()), ("kind", escape_label(kind))], ConstCounter::new(*n)))
        }),
    )?;
    family(
        e,
        "leaktrace_events_lost",
        "Records lost since attach: reason events (the kernel side could not record an event), stacks (a stack could not be stored; the object is still counted) or truncated_stacks (a stack cut short: deeper than 32 frames, or a new call path's first stack copy ended first).",
        MetricType::Counter,
        per.iter().flat_map(|p| {
            let lost = &p.report.lost;
            [("events", lost.events), ("stacks", lost.stacks), ("truncated_stacks", lost.truncated_stacks)]
                .map(|(reason, n)| (vec![("pid", p.pid.clone()), ("reason", reason.to_string())], ConstCounter::new(n)))
        }),
    )?;
    if per.iter().any(|p| p.report.untracked_frees.is_some()) {
        family(
            e,
            "leaktrace_untracked_frees",
            "Allocations: frees of blocks allocated before attach (or not sampled), ignored rather than subtracted.",
            MetricType::Counter,
            per.iter().filter_map(|p| p.report.untracked_frees.map(|n| (vec![("pid", p.pid.clone())], ConstCounter::new(n)))),
        )?;
    }
    family(
        e,
        "leaktrace_findings",
        "Findings (creation stacks) in the latest report, by kind and verdict, before any display cut.",
        MetricType::Gauge,
        per.iter().flat_map(|p| {
            let report = p.report;
            let kinds: BTreeSet<&str> =
                report.events.keys().copied().chain(report.findings.iter().map(|f| f.kind.as_str())).collect();
            kinds.into_iter().flat_map(move |kind| {
                let lock_verdict = (kind == "lock").then_some(Verdict::Contended);
                let unclosed = (kind == "connection").then_some(Verdict::Unclosed);
                let queued = (kind == "wait").then_some(Verdict::Queued);
                [Verdict::Leak, Verdict::Growing, Verdict::Steady]
                    .into_iter()
                    .chain(lock_verdict)
                    .chain(unclosed)
                    .chain(queued)
                    .map(move |v| {
                    let n = report.findings.iter().filter(|f| f.kind.as_str() == kind && f.verdict == v).count();
                    (
                        vec![("pid", p.pid.clone()), ("kind", escape_label(kind)), ("verdict", v.as_str().to_string())],
                        ConstGauge::new(n as i64),
                    )
                })
            })
        }),
    )?;
    encode_locks(e, &per, max_sites)?;
    family(
        e,
        "leaktrace_findings_omitted",
        "Findings left out of the latest report by --max-findings (verdict unknown here).",
        MetricType::Gauge,
        per.iter().map(|p| (vec![("pid", p.pid.clone())], ConstGauge::new(p.report.findings_omitted as i64))),
    )?;
    family(
        e,
        "leaktrace_sites_folded",
        "Sites summed into site other by the per-kind cardinality bound in this scrape.",
        MetricType::Gauge,
        per.iter().flat_map(|p| {
            p.sites.iter().map(|(kind, (_, folded))| {
                (vec![("pid", p.pid.clone()), ("kind", escape_label(kind))], ConstGauge::new(*folded as i64))
            })
        }),
    )?;
    Ok(())
}

/// A histogram already counted (cumulative buckets, upper bounds in seconds).
struct ConstHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Lock families: per lock and waiter site, the top `max_sites` locks by
/// wait time; the rest summed into `lock="other", site="other"`. Histogram
/// buckets are fixed (1 µs .. 10 s, decades) so series stay comparable.
fn encode_locks(e: &mut DescriptorEncoder, per: &[PerReport], max_sites: usize) -> Result<(), std::fmt::Error> {
    const BOUNDS: [f64; 8] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0];
    struct Agg {
        contentions: u64,
        wait_ns: u64,
        hist: Vec<(f64, u64)>,
        verdict: Verdict,
    }
    let traced = |r: &Report| r.findings.iter().any(|f| f.lock.is_some()) || r.events.contains_key("lock");
    if !per.iter().any(|p| traced(p.report)) {
        return Ok(());
    }
    // Rows keyed by (pid, lock, site), each report bounded on its own.
    let mut rows: Vec<((String, String, String), Agg)> = Vec::new();
    for p in per {
        let mut locks: Vec<&crate::report::Finding> = p.report.findings.iter().filter(|f| f.lock.is_some()).collect();
        locks.sort_by_key(|f| std::cmp::Reverse(f.lock.as_ref().map_or(0, |l| l.wait_ns)));
        for (i, f) in locks.iter().enumerate() {
            let Some(l) = &f.lock else { continue };
            let key = if i < max_sites {
                (p.pid.clone(), l.lock.clone(), f.site.clone())
            } else {
                (p.pid.clone(), "other".into(), "other".into())
            };
            // Cumulative counts at the fixed bounds, from the log2 buckets
            // (a bucket counts under the first bound at or above its upper edge).
            let cumulative: Vec<(f64, u64)> = BOUNDS
                .iter()
                .map(|b| {
                    let n = l.wait_histogram.iter().filter(|h| (h.le_ns as f64) / 1e9 <= *b).map(|h| h.count).max().unwrap_or(0);
                    (*b, n)
                })
                // f64::MAX is the encoder's +Inf bucket.
                .chain([(f64::MAX, l.contentions)])
                .collect();
            // The encoder wants per-bucket counts (it accumulates them).
            let hist: Vec<(f64, u64)> = cumulative
                .iter()
                .enumerate()
                .map(|(i, &(b, n))| (b, n - if i == 0 { 0 } else { cumulative[i - 1].1.min(n) }))
                .collect();
            match rows.iter_mut().find(|r| r.0 == key) {
                Some((_, a)) => {
                    a.contentions += l.contentions;
                    a.wait_ns += l.wait_ns;
                    for (x, y) in a.hist.iter_mut().zip(&hist) {
                        x.1 += y.1;
                    }
                    a.verdict = a.verdict.min(f.verdict);
                }
                None => rows.push((key, Agg { contentions: l.contentions, wait_ns: l.wait_ns, hist, verdict: f.verdict })),
            }
        }
    }
    let labels = |(pid, lock, site): &(String, String, String)| -> Labels {
        vec![("pid", pid.clone()), ("lock", escape_label(lock)), ("site", escape_label(site))]
    };
    family(
        e,
        "leaktrace_lock_contentions",
        "Contended lock waits since attach, by lock and waiter site (top locks by wait; the rest in lock=other).",
        MetricType::Counter,
        rows.iter().map(|(k, a)| (labels(k), ConstCounter::new(a.contentions))),
    )?;
    family(
        e,
        "leaktrace_lock_wait_seconds",
        "Seconds waiters spent blocked on the lock since attach, by lock and waiter site.",
        MetricType::Counter,
        rows.iter().map(|(k, a)| (labels(k), ConstCounter::new(a.wait_ns as f64 / 1e9))),
    )?;
    family(
        e,
        "leaktrace_lock_wait_duration_seconds",
        "Distribution of single contended waits since attach, by lock and waiter site.",
        MetricType::Histogram,
        rows.iter().map(|(k, a)| {
            (labels(k), ConstHistogram { sum: a.wait_ns as f64 / 1e9, count: a.contentions, buckets: a.hist.clone() })
        }),
    )?;
    family(
        e,
        "leaktrace_lock_contended",
        "1 when the lock's verdict is contended (waiters lost a noticeable share of the window), else 0.",
        MetricType::Gauge,
        rows.iter().map(|(k, a)| (labels(k), ConstGauge::new(i64::from(a.verdict == Verdict::Contended)))),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::json::tests::example_report;
    use crate::report::{Finding, Kind};

    fn finding(site: &str, live: u64, growth: f64, verdict: Verdict) -> Finding {
        Finding {
            site: site.into(),
            live,
            growth_per_min: growth,
            oldest_age_s: Some(live as f64),
            created: live,
            ..Finding::new(Kind::Connection, verdict)
        }
    }

    /// Sample lines (not comments) of `family` in `text`.
    fn samples<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} "))
            })
            .collect()
    }

    #[test]
    fn exhaustion_per_site_and_for_the_report() {
        let mut r = example_report();
        let e = crate::report::Exhaustion {
            resource: "open files".into(),
            limit_source: "RLIMIT_NOFILE".into(),
            limit: 2048,
            in_use: 48,
            seconds: 200.0,
            share: 0.9,
            site: None,
        };
        r.findings[0].exhausts = Some(crate::report::Exhaustion { seconds: 222.2, ..e.clone() });
        r.exhaustion = Some(crate::report::Exhaustion { site: Some("main.badHandler".into()), ..e });
        let text = encode_text(&r, DEFAULT_MAX_SITES);
        let lines = samples(&text, "leaktrace_exhaustion_seconds");
        assert_eq!(
            lines,
            [
                r#"leaktrace_exhaustion_seconds{pid="1234",resource="open files",site="all"} 200.0"#,
                r#"leaktrace_exhaustion_seconds{pid="1234",resource="open files",site="main.badHandler"} 222.2"#,
            ]
        );
    }

    #[test]
    fn families_have_help_type_and_values() {
        let text = encode_text(&example_report(), DEFAULT_MAX_SITES);
        for (name, ty) in [
            ("leaktrace_up", "gauge"),
            ("leaktrace_live_objects", "gauge"),
            ("leaktrace_growth_per_minute", "gauge"),
            ("leaktrace_oldest_age_seconds", "gauge"),
            ("leaktrace_events", "counter"),
            ("leaktrace_events_lost", "counter"),
            ("leaktrace_findings", "gauge"),
            ("leaktrace_findings_omitted", "gauge"),
            ("leaktrace_sites_folded", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} HELP missing:\n{text}"
            );
            assert!(
                text.contains(&format!("# TYPE {name} {ty}\n")),
                "{name} TYPE missing:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("\nleaktrace_up 1\n"));
        for help in text.lines().filter(|l| l.starts_with("# HELP")) {
            // OpenMetrics HELP text may not hold a bare double quote.
            assert!(!help.contains('"'), "{help}");
        }
        assert!(text.contains(
            r#"leaktrace_live_objects{pid="1234",kind="connection",site="main.badHandler",verdict="leak"} 120"#
        ), "{text}");
        assert!(text.contains(
            r#"leaktrace_growth_per_minute{pid="1234",kind="connection",site="main.badHandler",verdict="leak"} 59.8"#
        ));
        assert!(text.contains(
            r#"leaktrace_oldest_age_seconds{pid="1234",kind="connection",site="main.badHandler"} 19.7"#
        ));
        assert!(text.contains(r#"leaktrace_events_total{pid="1234",kind="connection"} 1234"#));
        assert!(text.contains(r#"leaktrace_events_lost_total{pid="1234",reason="stacks"} 0"#));
        assert!(
            text.contains(r#"leaktrace_findings{pid="1234",kind="connection",verdict="leak"} 1"#)
        );
        assert!(
            text.contains(r#"leaktrace_findings{pid="1234",kind="connection",verdict="steady"} 0"#)
        );
    }

    #[test]
    fn no_report_yet_is_only_up_zero_and_the_build() {
        let text = encode_registry_text(&registry(new_shared_report(), DEFAULT_MAX_SITES));
        assert_eq!(
            text,
            format!(
                "# HELP leaktrace_up 1 once leaktrace has produced a report for its target, 0 before.\n\
                 # TYPE leaktrace_up gauge\nleaktrace_up 0\n\
                 # HELP leaktrace_build_info Always 1: the leaktrace version and the git revision it was built from.\n\
                 # TYPE leaktrace_build_info gauge\n\
                 leaktrace_build_info{{version=\"{}\",revision=\"{}\"}} 1\n# EOF\n",
                env!("CARGO_PKG_VERSION"),
                crate::REVISION
            )
        );
        assert_ne!(crate::REVISION, "", "build.rs sets the revision");
    }

    #[test]
    fn sites_beyond_the_bound_are_summed_into_other() {
        let mut report = example_report();
        report.findings = (1..=5)
            .map(|i| finding(&format!("site{i}"), i * 10, i as f64, Verdict::Steady))
            .collect();
        report
            .findings
            .push(finding("site0", 1, 0.5, Verdict::Growing));
        let text = encode_text(&report, 3);
        let live = samples(&text, "leaktrace_live_objects");
        assert_eq!(live.len(), 4, "{live:?}");
        for kept in ["site5", "site4", "site3"] {
            assert!(
                live.iter().any(|l| l.contains(&format!("site=\"{kept}\""))),
                "{kept}: {live:?}"
            );
        }
        // site2 (20) + site1 (10) + site0 (1); worst verdict growing.
        assert!(live.contains(
            &r#"leaktrace_live_objects{pid="1234",kind="connection",site="other",verdict="growing"} 31"#
        ), "{live:?}");
        assert!(text.contains(
            r#"leaktrace_growth_per_minute{pid="1234",kind="connection",site="other",verdict="growing"} 3.5"#
        ));
        assert!(text.contains(r#"leaktrace_sites_folded{pid="1234",kind="connection"} 3"#));
        // Findings counts are over all findings, before the cut.
        assert!(
            text.contains(r#"leaktrace_findings{pid="1234",kind="connection",verdict="steady"} 5"#)
        );
    }

    #[test]
    fn lock_families_are_counters_and_a_histogram_bounded_by_max_sites() {
        use crate::report::{HistBucket, LockInfo};
        let mut report = example_report();
        report.events.insert("lock", 10);
        let lock = |name: &str, n: u64, ns: u64, v: Verdict| Finding {
            kind: Kind::Lock,
            verdict: v,
            lock: Some(LockInfo {
                lock: name.into(),
                lock_kind: "mutex".into(),
                contentions: n,
                wait_ns: ns,
                max_wait_ns: ns / 2,
                wait_share: 0.5,
                // 2^10-1 ns (<= 1.02 us) and 2^20-1 ns (~1 ms) buckets.
                wait_histogram: vec![HistBucket { le_ns: 1023, count: 1 }, HistBucket { le_ns: (1 << 20) - 1, count: n }],
                waiter_stacks: 1,
                holder_stack: vec![],
                holder_site: String::new(),
                holder_site_index: 0,
                holder_wakes: 0,
            }),
            ..finding("worker", 0, 0.0, v)
        };
        report.findings = vec![
            lock("hot_lock", 5, 2_000_000_000, Verdict::Contended),
            lock("quiet_lock", 2, 1_000, Verdict::Steady),
            lock("other_lock", 3, 500, Verdict::Steady),
        ];
        let text = encode_text(&report, 2);
        assert!(text.contains(r#"leaktrace_lock_contentions_total{pid="1234",lock="hot_lock",site="worker"} 5"#), "{text}");
        assert!(text.contains(r#"leaktrace_lock_wait_seconds_total{pid="1234",lock="hot_lock",site="worker"} 2.0"#), "{text}");
        assert!(text.contains(r#"leaktrace_lock_contentions_total{pid="1234",lock="other",site="other"} 3"#), "{text}");
        // Cumulative: 1 wait <= 1.02 us, all 5 <= 1.05 ms (so <= 0.01 s) and +Inf.
        for (le, n) in [("0.000001", 0), ("0.00001", 1), ("0.001", 1), ("0.01", 5), ("+Inf", 5)] {
            let line = format!(r#"leaktrace_lock_wait_duration_seconds_bucket{{le="{le}",pid="1234",lock="hot_lock",site="worker"}} {n}"#);
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        assert!(text.contains(r#"leaktrace_lock_wait_duration_seconds_count{pid="1234",lock="hot_lock",site="worker"} 5"#), "{text}");
        assert!(text.contains(r#"leaktrace_lock_contended{pid="1234",lock="hot_lock",site="worker"} 1"#), "{text}");
        assert!(text.contains(r#"leaktrace_findings{pid="1234",kind="lock",verdict="contended"} 1"#), "{text}");
    }

    #[test]
    fn findings_sharing_a_site_are_summed_with_the_worst_verdict() {
        let mut report = example_report();
        report.findings = vec![
            finding("db.Query", 3, 1.0, Verdict::Steady),
            finding("db.Query", 7, 2.0, Verdict::Leak),
        ];
        let text = encode_text(&report, DEFAULT_MAX_SITES);
        let live = samples(&text, "leaktrace_live_objects");
        assert_eq!(
            live,
            [
                r#"leaktrace_live_objects{pid="1234",kind="connection",site="db.Query",verdict="leak"} 10"#
            ]
        );
        assert!(text.contains(
            r#"leaktrace_oldest_age_seconds{pid="1234",kind="connection",site="db.Query"} 7.0"#
        ));
    }

    #[test]
    fn vanished_sites_are_dropped_from_the_next_scrape() {
        let shared = new_shared_report();
        let registry = registry(shared.clone(), DEFAULT_MAX_SITES);
        let mut report = example_report();
        report
            .findings
            .push(finding("gone.Soon", 5, 0.0, Verdict::Steady));
        *shared.write().unwrap() = Some(report.clone());
        assert!(encode_registry_text(&registry).contains("site=\"gone.Soon\""));
        report.findings.pop();
        *shared.write().unwrap() = Some(report);
        let text = encode_registry_text(&registry);
        assert!(!text.contains("gone.Soon"), "{text}");
        assert!(text.contains("site=\"main.badHandler\""));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut report = example_report();
        report.findings[0].site = "a\"b\\c\nd".into();
        let text = encode_text(&report, DEFAULT_MAX_SITES);
        assert!(text.contains(r#"site="a\"b\\c\nd""#), "{text}");
    }

    #[test]
    fn allocation_bytes_and_untracked_frees_are_exported() {
        let mut r = example_report();
        let mut f = finding("make_record", 10, 5.0, Verdict::Leak);
        f.kind = crate::report::Kind::Allocation;
        f.live_bytes = Some(2560);
        r.findings.push(f);
        r.untracked_frees = Some(7);
        let text = encode_text(&r, DEFAULT_MAX_SITES);
        assert!(
            samples(&text, "leaktrace_live_bytes")
                .contains(&r#"leaktrace_live_bytes{pid="1234",kind="allocation",site="make_record",verdict="leak"} 2560"#),
            "{text}"
        );
        assert_eq!(samples(&text, "leaktrace_live_bytes").len(), 1, "{text}");
        assert!(text.contains("leaktrace_untracked_frees_total{pid=\"1234\"} 7"), "{text}");
    }
}
