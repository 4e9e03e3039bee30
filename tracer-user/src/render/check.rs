//! The `check` verdict for CI logs: one verdict line, the failing findings
//! with the code path that created them, and what the exit status means.

use crate::report::{Finding, Report, Verdict};

/// What `check` concluded, with the lines to print on stderr.
pub struct CheckResult {
    /// A leak was found, or a lock's waiters lost more than `--fail-on-wait`.
    pub failed: bool,
    pub text: String,
}

/// Judges the final report for `check` (`fail_on_wait`: a lock's share of
/// the traced time its waiters may lose; `fail_within`: the least time a
/// resource may have left). `omitted` are the findings
/// `--max-findings` cut from the report: they are judged like the rest, a
/// display bound never changes the verdict.
pub fn render_check(report: &Report, omitted: &[Finding], fail_on_wait: Option<f64>, fail_within: Option<std::time::Duration>) -> CheckResult {
    let whole;
    let report = if omitted.is_empty() {
        report
    } else {
        let mut all = report.clone();
        all.findings.extend(omitted.iter().cloned());
        all.findings_omitted = 0;
        whole = all;
        &whole
    };
    // Leaks, and objects the program never closes (Go's finalizers do).
    let leaks: Vec<_> =
        report.findings.iter().filter(|f| matches!(f.verdict, Verdict::Leak | Verdict::Unclosed)).collect();
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
    // Queues (a drained pool) whose waiters lost more than --fail-on-wait.
    let queues: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.verdict == Verdict::Queued && f.wait.as_ref().is_some_and(|w| fail_on_wait.is_some_and(|t| w.wait_share > t)))
        .collect();
    // The resource that runs out first, when sooner than --fail-within.
    let runs_out = report
        .exhaustion
        .as_ref()
        .filter(|e| fail_within.is_some_and(|w| e.seconds < w.as_secs_f64()));
    let mut out = String::new();
    if leaks.is_empty() && waits.is_empty() && queues.is_empty() && runs_out.is_none() {
        out += &format!(
            "leaktrace check: PASS: {summary} in {:.0}s of {} (pid {}){lost}; exit 0 (0 = no leak, 3 = leak found, 1 = error)\n",
            report.elapsed_s, report.comm, report.pid
        );
        return CheckResult { failed: false, text: super::printable(&out, true).into_owned() };
    }
    out += &format!("leaktrace check: FAIL: {summary} in {:.0}s of {} (pid {}){lost}\n", report.elapsed_s, report.comm, report.pid);
    for f in &leaks {
        out += &format!(
            "  {} {} at {}{}: {} live, {:+.1}/min, oldest {}{}{}\n",
            f.verdict.as_str().to_uppercase(),
            f.kind.as_str(),
            f.site,
            f.via.as_deref().map(|v| format!(" via {v}")).unwrap_or_default(),
            f.live,
            f.growth_per_min,
            f.oldest_age_s.map(|a| format!("{a:.0}s")).unwrap_or_else(|| "?".into()),
            f.peer.as_deref().map(|p| format!(", peer {p}")).unwrap_or_default()
                + &f.map.as_deref().map(|m| format!(", map {m}")).unwrap_or_default(),
            match (f.verdict, f.ended_by_finalizer) {
                (Verdict::Unclosed, Some(n)) => format!("; {n} of {} ended were closed by Go's finalizers, not by the program (missing Close)", f.ended),
                _ => String::new(),
            }
        );
        out += &format!("       created by {}\n", path_from_site(f));
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
    for f in &queues {
        let Some(w) = &f.wait else { continue };
        out += &format!(
            "  QUEUED {} waiting at {}{} ({}): {:.1}x the window waited (> {:.1}), longest {}{:.0}s\n",
            f.live,
            f.site,
            f.via.as_deref().map(|v| format!(" via {v}")).unwrap_or_default(),
            w.wait_state,
            w.wait_share,
            fail_on_wait.unwrap_or(0.0),
            if w.waiting_before_attach { ">= " } else { "" },
            w.longest_wait_s
        );
        out += &format!("       waiting in {}\n", path_from_site(f));
    }
    // "leak" covers `unclosed` too (objects the program drops unclosed).
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
    // Names, sites and peers come from the target: no control characters.
    CheckResult { failed: true, text: super::printable(&out, true).into_owned() }
}

/// The stack from the site outwards, four frames: `a <- b <- c <- d`.
fn path_from_site(f: &Finding) -> String {
    let path: Vec<&str> = f.stack.iter().skip(f.site_index).take(4).map(|fr| fr.function.as_str()).collect();
    path.join(" <- ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{judge, render::json::tests::example_report};

    #[test]
    fn a_leak_cut_by_max_findings_still_fails() {
        let mut report = example_report();
        report.is_final = true;
        let omitted = judge::rank(&mut report.findings, 0);
        report.findings_omitted = omitted.len() as u64;
        assert!(report.findings.is_empty());
        let check = render_check(&report, &omitted, None, None);
        assert!(check.failed, "{}", check.text);
        assert!(check.text.contains("FAIL: 1 leak"), "{}", check.text);
        assert!(check.text.contains("LEAK connection at main.badHandler"), "{}", check.text);
        // Nothing cut, nothing leaking: a pass.
        let check = render_check(&report, &[], None, None);
        assert!(!check.failed && check.text.contains("PASS"), "{}", check.text);
    }
}
