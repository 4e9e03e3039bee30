//! `cargo xtask bench java`: what walking Java frames costs a JVM, in
//! paired rounds within one run: a Java socket-open loop (one walked
//! `socket()` per op) and a contended `ReentrantLock` loop (walked futex
//! waits and wakes), each untraced and under `leaktrace attach` (connections,
//! resp. locks). The cost per walked event is the traced run's extra time
//! over the events leaktrace says it walked (its closing note). Also the
//! time from starting `leaktrace attach` on the running JVM to its first
//! report with Java frames set up.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{interrupt, list, median, paired_ratio, parse_options, Lines};
use crate::build;
use crate::cmd::{announce, fixtures_bin, leaktrace_bin, stop_child, wait_timeout};

struct Case {
    name: &'static str,
    args: &'static [&'static str],
    track: &'static str,
    /// Ops per run.
    ops: u64,
}

const CASES: &[Case] = &[
    Case { name: "Java socket open+close loop", args: &["sockets", "100000"], track: "connections", ops: 100_000 },
    Case { name: "Java contended fair ReentrantLock (4 threads)", args: &["locks", "100000", "4"], track: "locks", ops: 100_000 },
];

/// One traced run's figures.
struct Traced {
    ns_per_op: f64,
    /// leaktrace's own account of setting up the Java walk.
    setup_ms: f64,
    walks: u64,
    attach_to_first_report: Duration,
}

fn java_cmd(root: &Path, case: &Case) -> Command {
    let mut c = Command::new("java");
    c.arg("-cp").arg(fixtures_bin(root).join("java")).arg("JavaBench").args(case.args);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    c
}

/// Runs the case once, untraced or under `leaktrace attach`: ns per op,
/// and for a traced run the events walked and the time to the first report.
fn one(root: &Path, case: &Case, traced: bool) -> Result<(f64, Option<Traced>)> {
    let mut cmd = java_cmd(root, case);
    announce(&cmd);
    let mut target = cmd.spawn().context("starting java (openjdk-17-jdk-headless)")?;
    let mut out = Lines::new(target.stdout.take().unwrap());
    if !out.wait_line("ready", Duration::from_secs(120)) {
        stop_child(&mut target, "JavaBench");
        bail!("JavaBench did not print `ready`");
    }
    let pid = target.id();
    let mut tracer: Option<(Child, Lines, Duration)> = None;
    if traced {
        let mut c = Command::new(leaktrace_bin(root));
        c.args(["attach", "--pid", &pid.to_string(), "--track", case.track, "--interval", "1s", "--format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        announce(&c);
        let started = Instant::now();
        let mut child = c.spawn().context("starting leaktrace")?;
        let errors = Lines::new(child.stderr.take().unwrap());
        let mut reports = Lines::new(child.stdout.take().unwrap());
        if !reports.wait_line("\"findings\"", Duration::from_secs(30)) {
            stop_child(&mut child, "leaktrace");
            stop_child(&mut target, "JavaBench");
            bail!("leaktrace printed no report: {}", errors.all(Duration::from_secs(1)));
        }
        tracer = Some((child, errors, started.elapsed()));
    }
    // Go.
    let go = target.stdin.as_mut().ok_or_else(|| anyhow!("no stdin"))?.write_all(b"go\n");
    if let Err(e) = go {
        stop_child(&mut target, "JavaBench");
        bail!("cannot start the run: {e}");
    }
    let status = wait_timeout(&mut target, Duration::from_secs(600))?;
    if status.is_none() {
        stop_child(&mut target, "JavaBench");
        bail!("JavaBench did not finish");
    }
    let text = out.all(Duration::from_secs(5));
    let ns = text
        .lines()
        .find_map(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix("ns_per_op=")).and_then(|v| v.parse().ok()))
        .ok_or_else(|| anyhow!("JavaBench printed no result:\n{text}"))?;
    let Some((mut child, errors, first)) = tracer else { return Ok((ns, None)) };
    interrupt(&mut child, "leaktrace", Duration::from_secs(30));
    let notes = errors.all(Duration::from_secs(5));
    // "... Java frames: JDK 17 (...), N events walked (...)".
    let setup_ms = notes
        .split("set up in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN);
    let walks = notes
        .split("ms), ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("leaktrace's closing note has no Java walk count:\n{notes}"))?;
    Ok((ns, Some(Traced { ns_per_op: ns, setup_ms, walks, attach_to_first_report: first })))
}

/// Runs the benchmark and prints the table and a README-ready one.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let [runs] = parse_options("bench java", args, [("--runs", 3)], &["--runs"])?;
    build::run(root)?;
    let mut out = std::io::stdout().lock();
    let mut readme = Vec::new();
    writeln!(out)?;
    writeln!(out, "JavaBench on {}; {runs} paired rounds; ratio = median over rounds of (traced / untraced in the same round)", java_version())?;
    for case in CASES {
        let (mut plain, mut traced, mut per_walk, mut walks, mut firsts, mut setups) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..runs {
            let (u, _) = one(root, case, false)?;
            let (t, tr) = one(root, case, true)?;
            let tr = tr.ok_or_else(|| anyhow!("no traced figures"))?;
            let extra_ns = (tr.ns_per_op - u) * case.ops as f64;
            let per = if tr.walks > 0 { extra_ns / tr.walks as f64 } else { f64::NAN };
            eprintln!(
                "bench java: round {}/{runs} {}: untraced {u:.1} ns/op, traced {t:.1} ns/op, {} walks, {per:.0} ns per walked event, first report after {:?}",
                round + 1,
                case.name,
                tr.walks,
                tr.attach_to_first_report
            );
            plain.push(u);
            traced.push(t);
            per_walk.push(per);
            walks.push(tr.walks as f64);
            firsts.push(tr.attach_to_first_report.as_secs_f64() * 1000.0);
            setups.push(tr.setup_ms);
        }
        let ratio = paired_ratio(&traced, &plain);
        writeln!(out, "{}: {} ops per run", case.name, case.ops)?;
        writeln!(out, "  untraced                {:>10.1} ns/op   {}", median(&plain), list(&plain, 0))?;
        writeln!(out, "  leaktrace --track {:<6}{:>10.1} ns/op   {} ({ratio:.2}x)", case.track, median(&traced), list(&traced, 0))?;
        writeln!(out, "  events walked per run   {}", list(&walks, 0))?;
        writeln!(out, "  ns per walked event     {:>10.0}        {}", median(&per_walk), list(&per_walk, 0))?;
        writeln!(out, "  attach to first report  {:>10.0} ms     {}", median(&firsts), list(&firsts, 0))?;
        writeln!(out, "  of which Java setup     {:>10.0} ms     {}", median(&setups), list(&setups, 0))?;
        readme.push(format!(
            "| {} | {:.0} | {:.0} | {ratio:.2}x | {:.0} | {:.1} µs | {:.0} ms ({:.0} ms Java setup) |",
            case.name,
            median(&plain),
            median(&traced),
            median(&walks),
            median(&per_walk) / 1000.0,
            median(&firsts),
            median(&setups)
        ));
    }
    writeln!(out)?;
    writeln!(out, "README (cargo xtask bench java --runs {runs}):")?;
    writeln!(out, "| case | untraced ns/op | traced ns/op | ratio | events walked per run | cost per walked event | attach to first report |")?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for l in readme {
        writeln!(out, "{l}")?;
    }
    Ok(())
}

fn java_version() -> String {
    Command::new("java")
        .arg("-version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stderr).lines().next().map(str::to_string))
        .unwrap_or_else(|| "java".into())
}
