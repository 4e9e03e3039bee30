//! The agent's budget (`--max-cpu`, `--max-rss`) and what it sheds when
//! over it.
//!
//! The agent samples its own CPU time and RSS every second. It is over
//! budget when, over the last `--budget-window`, its CPU share of one core
//! was above `--max-cpu`, or its RSS stayed above `--max-rss` at every
//! sample. Then it stops tracing (detaches, frees the eBPF load of)
//! targets, at least one, in this order:
//!
//! 1. targets judged with nothing above steady, the costliest first (all
//!    are equally uninteresting: the fewest go that free the most);
//! 2. then targets with a finding above steady (growing, contended,
//!    queued), least growing first;
//! 3. last, targets with a leak (or unclosed) finding, least growing first.
//!
//! How many: for CPU, until the targets shed cost at least the excess (a
//! target's cost is the time the agent spends in its session, [`Metered`]);
//! for RSS, the excess's share of the targets (memory is not metered per
//! target).
//!
//! The CPU measured is the agent's steady cost: what picking a target up
//! costs (loading, verifying and attaching its programs, its first report:
//! ~0.3-1.6 s of CPU each, once) is metered apart ([`Metered`]) and left
//! out, so that starting many targets at once does not shed them for it.
//!
//! One step sheds from one class only, and never from 2 or 3 while a target
//! is still too young to be judged (it may turn out steady): so a target
//! with a leak or growing verdict goes only when no other can. After a
//! step the window starts again, so the next decision measures what the
//! step saved.

use std::{
    cell::Cell,
    collections::VecDeque,
    future::Future,
    pin::Pin,
    rc::Rc,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use crate::render::prometheus::SharedReport;
use crate::report::{Report, Verdict};

/// CPU seconds of the whole process so far (every thread; ns resolution).
pub fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// A target's session, metered. The agent runs every session on one
/// thread (program loads on scoped threads inside a poll), so the time a
/// poll takes is this target's work. Until its first report exists, the
/// process CPU time of each poll is added to `pickup_cpu` (the one-off cost
/// of picking it up); after, the time of each poll to `busy_ns` (its
/// steady cost; a monotonic clock read is cheaper than a CPU-time syscall
/// at ~100 polls a second per target).
pub struct Metered<F> {
    inner: Pin<Box<F>>,
    report: SharedReport,
    pickup_cpu: Rc<Cell<f64>>,
    busy_ns: Arc<AtomicU64>,
    picked_up: bool,
}

impl<F> Metered<F> {
    pub fn new(inner: F, report: SharedReport, pickup_cpu: Rc<Cell<f64>>, busy_ns: Arc<AtomicU64>) -> Self {
        Self { inner: Box::pin(inner), report, pickup_cpu, busy_ns, picked_up: false }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if self.picked_up {
            let t = Instant::now();
            let out = self.inner.as_mut().poll(cx);
            self.busy_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            return out;
        }
        let before = process_cpu_s();
        let out = self.inner.as_mut().poll(cx);
        self.pickup_cpu.set(self.pickup_cpu.get() + (process_cpu_s() - before).max(0.0));
        let reported = self.report.read().unwrap_or_else(|e| e.into_inner()).is_some();
        self.picked_up = reported;
        out
    }
}

/// `--max-cpu`, `--max-rss`, `--budget-window`.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Percent of one core.
    pub max_cpu_percent: f64,
    pub max_rss_bytes: u64,
    pub window: Duration,
}

/// One reading of the agent's own usage.
#[derive(Clone, Copy, Debug)]
struct Usage {
    at: Instant,
    cpu_s: f64,
    rss: u64,
}

/// The agent's usage over the last window.
#[derive(Debug, Default)]
pub struct Meter {
    samples: VecDeque<Usage>,
}

/// What the agent used over a whole window, and whether that is over budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spent {
    pub cpu_percent: f64,
    /// The lowest RSS of the window (over budget only when even that is).
    pub rss: u64,
    pub cpu_over: bool,
    pub rss_over: bool,
}

impl Spent {
    pub fn over(&self) -> bool {
        self.cpu_over || self.rss_over
    }

    /// What to shed to get back under budget: the CPU excess (share of one
    /// core); for RSS the excess's share of `traced` targets, rounded up;
    /// and, as a cap on the CPU count, the CPU excess's share of them.
    pub fn need(&self, budget: &Budget, traced: usize) -> Need {
        let share = |over: bool, limit: f64, used: f64| if over { (1.0 - limit / used).clamp(0.0, 1.0) } else { 0.0 };
        let count = |share: f64| (traced as f64 * share).ceil() as usize;
        let cpu_share = share(self.cpu_over, budget.max_cpu_percent, self.cpu_percent);
        Need {
            cpu: if self.cpu_over { (self.cpu_percent - budget.max_cpu_percent) / 100.0 } else { 0.0 },
            cpu_targets: count(cpu_share),
            targets: count(share(self.rss_over, budget.max_rss_bytes as f64, self.rss as f64)),
        }
    }
}

/// What a shedding step must free: `cpu` (share of one core) by the
/// targets' metered costs — or, if those fall short (the meter misses the
/// symbolizer's thread and the kernel's work for the agent), `cpu_targets`
/// targets, as if every target cost the same — and at least `targets`
/// targets (RSS).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Need {
    pub cpu: f64,
    pub cpu_targets: usize,
    pub targets: usize,
}

/// Share of one core a target's session took: `busy_ns` over `elapsed_s` of tracing.
pub fn cost(busy_ns: u64, elapsed_s: f64) -> f64 {
    if elapsed_s <= 0.0 {
        return 0.0;
    }
    busy_ns as f64 * 1e-9 / elapsed_s
}

impl Meter {
    /// Adds a reading; readings older than the window are dropped, except
    /// the newest of them (the window's start).
    pub fn push(&mut self, at: Instant, cpu_s: f64, rss: u64, window: Duration) {
        self.samples.push_back(Usage { at, cpu_s, rss });
        while self.samples.len() > 2 && self.samples.get(1).is_some_and(|u| at.duration_since(u.at) >= window) {
            self.samples.pop_front();
        }
    }

    /// Forgets every reading: after a shed, the next decision waits for a
    /// whole window of fresh ones.
    pub fn reset(&mut self) {
        self.samples.clear();
    }

    /// The usage over the last window; `None` until readings span one.
    pub fn spent(&self, budget: &Budget) -> Option<Spent> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let span = last.at.duration_since(first.at);
        if span < budget.window || span.is_zero() {
            return None;
        }
        let cpu_percent = 100.0 * (last.cpu_s - first.cpu_s).max(0.0) / span.as_secs_f64();
        let rss = self.samples.iter().map(|u| u.rss).min().unwrap_or(0);
        Some(Spent { cpu_percent, rss, cpu_over: cpu_percent > budget.max_cpu_percent, rss_over: rss > budget.max_rss_bytes })
    }
}

/// Where a target stands for shedding, from its latest report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Standing {
    /// Traced for fewer than four intervals: not judged yet.
    Young,
    /// `class` 0: nothing above steady; 1: growing, contended or queued;
    /// 2: a leak or unclosed. `growth`: its findings' growth per minute,
    /// summed over those growing; `live`: its live objects; `cost`: share
    /// of one core the agent spends on it.
    Judged { class: u8, growth: f64, live: u64, cost: f64 },
}

/// How the judge needs four samples (three intervals) for a verdict; four
/// intervals of tracing leave room for a late one.
const JUDGED_AFTER_INTERVALS: f64 = 4.0;

/// Where the target with latest report `report` stands; `busy_ns`: the
/// time its session took since its first report.
pub fn standing(report: Option<&Report>, interval: Duration, busy_ns: u64) -> Standing {
    let Some(r) = report else { return Standing::Young };
    if r.elapsed_s < JUDGED_AFTER_INTERVALS * interval.as_secs_f64() {
        return Standing::Young;
    }
    let class = r
        .findings
        .iter()
        .map(|f| match f.verdict {
            Verdict::Steady => 0,
            Verdict::Growing | Verdict::Contended | Verdict::Queued => 1,
            Verdict::Leak | Verdict::Unclosed => 2,
        })
        .max()
        .unwrap_or(0);
    let growth = r.findings.iter().map(|f| f.growth_per_min.max(0.0)).sum();
    let live = r.findings.iter().map(|f| f.live).sum();
    Standing::Judged { class, growth, live, cost: cost(busy_ns, r.elapsed_s) }
}

/// The targets to shed from `targets`, by the order of the module doc,
/// until they free `need` (at least one; all of the class when it cannot);
/// empty when the next ones in line must wait for a young target's verdict.
pub fn choose(targets: &[(u32, Standing)], need: Need) -> Vec<u32> {
    struct Candidate {
        pid: u32,
        growth: f64,
        live: u64,
        cost: f64,
    }
    let judged = |want: u8| -> Vec<Candidate> {
        targets
            .iter()
            .filter_map(|(pid, s)| match *s {
                Standing::Judged { class, growth, live, cost } if class == want => Some(Candidate { pid: *pid, growth, live, cost }),
                _ => None,
            })
            .collect()
    };
    let mut pick = judged(0);
    if pick.is_empty() {
        if targets.iter().any(|(_, s)| *s == Standing::Young) {
            return Vec::new();
        }
        pick = judged(1);
        if pick.is_empty() {
            pick = judged(2);
        }
        pick.sort_by(|a, b| a.growth.total_cmp(&b.growth).then(b.cost.total_cmp(&a.cost)).then(a.pid.cmp(&b.pid)));
    } else {
        pick.sort_by(|a, b| b.cost.total_cmp(&a.cost).then(a.live.cmp(&b.live)).then(a.pid.cmp(&b.pid)));
    }
    let mut freed = 0.0;
    let mut out = Vec::new();
    for c in pick {
        let cpu_done = freed >= need.cpu || out.len() >= need.cpu_targets;
        if !out.is_empty() && cpu_done && out.len() >= need.targets {
            break;
        }
        freed += c.cost;
        out.push(c.pid);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Finding, Kind};

    const BUDGET: Budget = Budget { max_cpu_percent: 1.0, max_rss_bytes: 128 << 20, window: Duration::from_secs(10) };

    fn meter(readings: &[(u64, f64, u64)]) -> Meter {
        let t0 = Instant::now();
        let mut m = Meter::default();
        for &(s, cpu, rss) in readings {
            m.push(t0 + Duration::from_secs(s), cpu, rss, BUDGET.window);
        }
        m
    }

    #[test]
    fn nothing_is_decided_before_a_whole_window() {
        assert_eq!(meter(&[(0, 0.0, 1), (9, 5.0, 1)]).spent(&BUDGET), None);
        let spent = meter(&[(0, 0.0, 1), (5, 0.05, 1), (10, 0.2, 1)]).spent(&BUDGET).unwrap();
        assert!((spent.cpu_percent - 2.0).abs() < 1e-9 && spent.cpu_over && !spent.rss_over, "{spent:?}");
    }

    #[test]
    fn the_window_slides_and_rss_must_stay_over() {
        let need = |spent: Spent, traced| spent.need(&BUDGET, traced);
        // A burst long ago (0 -> 30 s) is outside the last 10 s.
        let m = meter(&[(0, 0.0, 200 << 20), (30, 30.0, 200 << 20), (35, 30.01, 100 << 20), (40, 30.05, 200 << 20)]);
        let spent = m.spent(&BUDGET).unwrap();
        assert!((spent.cpu_percent - 0.5).abs() < 1e-9, "{spent:?}");
        assert!(!spent.over(), "one reading under --max-rss: not sustained: {spent:?}");
        let m = meter(&[(0, 0.0, 256 << 20), (10, 0.0, 256 << 20)]);
        let spent = m.spent(&BUDGET).unwrap();
        assert!(spent.rss_over && !spent.cpu_over);
        assert_eq!(need(spent, 10), Need { cpu: 0.0, cpu_targets: 0, targets: 5 }, "half the RSS is over");
    }

    #[test]
    fn the_excess_decides_what_to_free() {
        let spent = Spent { cpu_percent: 4.0, rss: 0, cpu_over: true, rss_over: false };
        let need = spent.need(&BUDGET, 40);
        assert!((need.cpu - 0.03).abs() < 1e-9 && need.cpu_targets == 30 && need.targets == 0, "{need:?}");
        let tiny = Budget { max_cpu_percent: 0.01, ..BUDGET };
        assert_eq!(spent.need(&tiny, 4).cpu_targets, 4);
        assert_eq!(cost(3_000_000_000, 100.0), 0.03);
        assert_eq!(cost(5, 0.0), 0.0);
    }

    fn report(elapsed_s: f64, findings: &[(Verdict, f64, u64)]) -> Report {
        let mut r = crate::render::json::tests::example_report();
        r.elapsed_s = elapsed_s;
        r.findings = findings
            .iter()
            .map(|&(v, growth, live)| Finding { growth_per_min: growth, live, ..Finding::new(Kind::Connection, v) })
            .collect();
        r
    }

    #[test]
    fn standing_follows_the_worst_verdict_once_judged() {
        let i = Duration::from_secs(1);
        assert_eq!(standing(None, i, 0), Standing::Young);
        assert_eq!(standing(Some(&report(3.0, &[(Verdict::Leak, 600.0, 60)])), i, 0), Standing::Young);
        assert_eq!(standing(Some(&report(4.0, &[])), i, 40_000_000), Standing::Judged { class: 0, growth: 0.0, live: 0, cost: 0.01 });
        let s = standing(Some(&report(9.0, &[(Verdict::Steady, -3.0, 4), (Verdict::Leak, 600.0, 60), (Verdict::Growing, 5.0, 2)])), i, 0);
        assert_eq!(s, Standing::Judged { class: 2, growth: 605.0, live: 66, cost: 0.0 });
        let s = standing(Some(&report(9.0, &[(Verdict::Contended, 0.0, 0)])), i, 0);
        assert!(matches!(s, Standing::Judged { class: 1, .. }));
    }

    #[test]
    fn steady_targets_go_first_and_leaks_last() {
        let j = |class, growth, live, cost| Standing::Judged { class, growth, live, cost };
        let targets = [
            (10, j(2, 600.0, 60, 0.02)),
            (11, j(0, 2.0, 0, 0.001)),
            (12, j(0, 0.0, 9, 0.0)),
            (13, j(0, 0.0, 1, 0.0)),
            (14, j(1, 3.0, 5, 0.001)),
            (15, Standing::Young),
            (16, j(0, 0.0, 40, 0.012)),
        ];
        let cpu = |cpu| Need { cpu, cpu_targets: 99, targets: 0 };
        assert_eq!(choose(&targets, cpu(0.01)), vec![16], "the costliest steady target frees enough");
        assert_eq!(choose(&targets, cpu(0.0125)), vec![16, 11]);
        assert_eq!(choose(&targets, Need { cpu: 0.0, cpu_targets: 0, targets: 3 }), vec![16, 11, 13], "then by fewest live");
        assert_eq!(choose(&targets, Need { cpu: 1.0, cpu_targets: 2, targets: 0 }), vec![16, 11], "metered costs fall short: the equal-share count");
        assert_eq!(choose(&targets, cpu(0.0001)), vec![16], "at least one");
        assert_eq!(choose(&targets, cpu(1.0)), vec![16, 11, 13, 12], "one class per step, never the leak");
        // Only a growing, a leaking and a young target left: wait for the young one's verdict.
        assert_eq!(choose(&[targets[0], targets[4], targets[5]], cpu(1.0)), Vec::<u32>::new());
        assert_eq!(choose(&[targets[0], targets[4]], cpu(1.0)), vec![14]);
        assert_eq!(choose(&[targets[0]], cpu(1.0)), vec![10]);
        assert_eq!(choose(&[], cpu(1.0)), Vec::<u32>::new());
    }
}
