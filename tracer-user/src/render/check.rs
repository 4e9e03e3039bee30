//! The `check` verdict for CI logs: one verdict line, the failing findings
//! with the code path that created them, and what the exit status means.

use crate::report::{Report, Verdict};

/// What `check` concluded, with the lines to print on stderr.
pub struct CheckResult {
    /// A leak was found, or a lock's waiters lost more than `--fail-on-wait`.
    pub failed: bool,
    pub text: String,
}

/// Judges the final report for `check` (`fail_on_wait`: a lock's share of
/// the traced time its waiters may lose; `fail_within`: the least time a
/// resource may have left).
pub fn render_check(report: &Report, fail_on_wait: Option<f64>, fail_within: Option<std::time::Duration>) -> CheckResult {
    let leaks: Vec<_> = report.findings.iter().filter(|f| f.verdict == Verdict::Leak).collect();
    let summary = super::table::summary(report);
    let lost = if report.lost.events + report.lost.stacks > 0 {
        format!("; lost {} events, {} stacks (numbers are low)", report.lost.events, report.lost.stacks)
    } else {
        String::new()
    };
    // Locks whose waiters lost more than --fail-on-wait of the window.
    let waits: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.lock.as_ref().is_some_and(|l| fail_on_wait.is_some_and(|t| l.wait_share > t)))
        .collect();
    // The resource that runs out first, when sooner than --fail-within.
    let runs_out = report
        .exhaustion
        .as_ref()
        .filter(|e| fail_within.is_some_and(|w| e.seconds < w.as_secs_f64()));
    let mut out = String::new();
    if leaks.is_empty() && waits.is_empty() && runs_out.is_none() {
        out += &format!(
            "leaktrace check: PASS: {summary} in {:.0}s of {} (pid {}){lost}; exit 0 (0 = no leak, 3 = leak found, 1 = error)\n",
            report.elapsed_s, report.comm, report.pid
        );
        return CheckResult { failed: false, text: out };
    }
    out += &format!("leaktrace check: FAIL: {summary} in {:.0}s of {} (pid {}){lost}\n", report.elapsed_s, report.comm, report.pid);
    for f in &leaks {
        out += &format!(
            "  LEAK {} at {}: {} live, {:+.1}/min, oldest {}{}\n",
            f.kind.as_str(),
            f.site,
            f.live,
            f.growth_per_min,
            f.oldest_age_s.map(|a| format!("{a:.0}s")).unwrap_or_else(|| "?".into()),
            f.peer.as_deref().map(|p| format!(", peer {p}")).unwrap_or_default()
                + &f.map.as_deref().map(|m| format!(", map {m}")).unwrap_or_default()
        );
        let path: Vec<&str> = f.stack.iter().skip(f.site_index).take(4).map(|fr| fr.function.as_str()).collect();
        out += &format!("       created by {}\n", path.join(" <- "));
    }
    for f in &waits {
        let Some(l) = &f.lock else { continue };
        out += &format!(
            "  CONTENDED lock {} ({}): waiters lost {:.0}% of the window (> {:.0}%), {} waits, max {:.1} ms, waiting at {}, held by {}\n",
            l.lock,
            l.lock_kind,
            l.wait_share * 100.0,
            fail_on_wait.unwrap_or(0.0) * 100.0,
            l.contentions,
            l.max_wait_ns as f64 / 1e6,
            f.site,
            if l.holder_site.is_empty() { "?" } else { &l.holder_site }
        );
    }
    if let Some(e) = runs_out {
        out += &format!(
            "  EXHAUSTS {} (< --fail-within {})\n",
            crate::judge::exhaustion::headline(&report.comm, e),
            humantime::format_duration(fail_within.unwrap_or_default())
        );
    }
    let what = match (fail_on_wait.is_some(), fail_within.is_some()) {
        (false, false) => "3 = leak found",
        (true, false) => "3 = leak found or --fail-on-wait exceeded",
        (false, true) => "3 = leak found or a resource runs out within --fail-within",
        (true, true) => "3 = leak found, --fail-on-wait exceeded or a resource runs out within --fail-within",
    };
    out += &format!("leaktrace check: exit 3 (0 = no leak, {what}, 1 = error)\n");
    CheckResult { failed: true, text: out }
}
