//! The `leaktrace` binary: parses the command line and hands over to
//! [`leaktrace::session`]. Exit status: 0 ok, 3 `check` found a leak, 1 error
//! (2 for bad flags, from clap).

use std::process::ExitCode;

use clap::Parser;
use leaktrace::{
    child::Held,
    cli::{Cli, Command, TraceOptions},
    report::Verdict,
    session::{self, HeldChild},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("leaktrace: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// Errors are printed on one line: the outermost context and its causes.
fn one_line(e: &anyhow::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut fail_on_wait = None;
    let (pid, opts, cmd, is_check): (Option<u32>, TraceOptions, Vec<String>, bool) = match cli.command {
        Command::Attach { pid, opts } => (Some(pid), opts, Vec::new(), false),
        Command::Run { opts, cmd } => (None, opts, cmd, false),
        Command::Check { pid, opts, cmd, fail_on_wait: f } => {
            if pid.is_none() && cmd.is_empty() {
                anyhow::bail!("check needs --pid PID or -- CMD [ARGS...]");
            }
            fail_on_wait = f;
            (pid, opts, cmd, true)
        }
    };
    // Validate flags before starting anything.
    leaktrace::cli::trackers(&opts.track).map_err(anyhow::Error::msg)?;
    leaktrace::probes::preflight()?;

    let (pid, child): (u32, Option<Box<dyn HeldChild>>) = match pid {
        Some(pid) => (pid, None),
        None => {
            let json = opts.effective_format() == leaktrace::cli::Format::Json;
            let held = Held::spawn(&cmd, json)?;
            (held.pid(), Some(Box::new(held)))
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let outcome = rt.block_on(session::trace(pid, &opts, child))?;
    if is_check {
        let report = &outcome.report;
        let leaks: Vec<_> = report.findings.iter().filter(|f| f.verdict == Verdict::Leak).collect();
        let summary = leaktrace::render::table::summary(report);
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
        // Made for CI logs: one verdict line, the failing findings with the
        // code path that created them, and what the exit status means.
        if !leaks.is_empty() || !waits.is_empty() {
            eprintln!(
                "leaktrace check: FAIL: {summary} in {:.0}s of {} (pid {}){lost}",
                report.elapsed_s, report.comm, report.pid
            );
            for f in &leaks {
                eprintln!(
                    "  LEAK {} at {}: {} live, {:+.1}/min, oldest {}{}",
                    f.kind.as_str(),
                    f.site,
                    f.live,
                    f.growth_per_min,
                    f.oldest_age_s.map(|a| format!("{a:.0}s")).unwrap_or_else(|| "?".into()),
                    f.peer.as_deref().map(|p| format!(", peer {p}")).unwrap_or_default()
                        + &f.map.as_deref().map(|m| format!(", map {m}")).unwrap_or_default()
                );
                let path: Vec<&str> =
                    f.stack.iter().skip(f.site_index).take(4).map(|fr| fr.function.as_str()).collect();
                eprintln!("       created by {}", path.join(" <- "));
            }
            for f in &waits {
                let Some(l) = &f.lock else { continue };
                eprintln!(
                    "  CONTENDED lock {} ({}): waiters lost {:.0}% of the window (> {:.0}%), {} waits, max {:.1} ms, waiting at {}, held by {}",
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
            let what = if fail_on_wait.is_some() { "3 = leak found or --fail-on-wait exceeded" } else { "3 = leak found" };
            eprintln!("leaktrace check: exit 3 (0 = no leak, {what}, 1 = error)");
            return Ok(ExitCode::from(3));
        }
        eprintln!(
            "leaktrace check: PASS: {summary} in {:.0}s of {} (pid {}){lost}; exit 0 (0 = no leak, 3 = leak found, 1 = error)",
            report.elapsed_s, report.comm, report.pid
        );
    }
    Ok(ExitCode::SUCCESS)
}
