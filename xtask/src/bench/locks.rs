//! `cargo xtask bench locks`: what tracing lock contention costs a pthread
//! program, uncontended and contended, in paired rounds within one run:
//! untraced, `leaktrace attach --track locks`, and a pmlock-style bpftrace
//! script (uprobe + uretprobe on `pthread_mutex_lock`, latency histogram by
//! lock and stack: what the tools users know do).

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::{interrupt, list, median, paired_ratio, parse_options, start_ready, Lines};
use crate::build;
use crate::cmd::{announce, fixtures_bin, leaktrace_bin, send_signal, stop_child, wait_timeout};

/// pmlock.bt's idea on today's glibc (the mutex functions live in libc.so.6).
const PMLOCK: &str = r#"
uprobe:/lib/x86_64-linux-gnu/libc.so.6:pthread_mutex_lock { @start[tid] = nsecs; @addr[tid] = arg0; }
uretprobe:/lib/x86_64-linux-gnu/libc.so.6:pthread_mutex_lock /@start[tid]/ {
  @lock_latency_ns[@addr[tid], ustack(5)] = hist(nsecs - @start[tid]);
  delete(@start[tid]); delete(@addr[tid]);
}
"#;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Untraced,
    Leaktrace,
    Bpftrace,
}

struct Case {
    name: &'static str,
    threads: u32,
    /// Busy-loop iterations inside the lock (`--hold`).
    hold: u32,
    /// Iterations per thread: (untraced and leaktrace, bpftrace); per-op
    /// costs are compared, and bpftrace's probes make each op ~100x dearer.
    iterations: (u64, u64),
}

const CASES: &[Case] = &[
    Case { name: "uncontended (1 thread)", threads: 1, hold: 20, iterations: (8_000_000, 200_000) },
    Case { name: "contended (4 threads, 1 mutex held 10x longer than not)", threads: 4, hold: 200, iterations: (200_000, 20_000) },
];

/// Waits for a line containing `needle` on `lines`, up to `limit`.
fn expect_line(lines: &mut Lines, needle: &str, limit: Duration) -> Result<()> {
    if !lines.wait_line(needle, limit) {
        bail!("`{needle}` not seen in {limit:?}");
    }
    Ok(())
}

/// One measurement: ns per lock+unlock, and for leaktrace the contended
/// waits it recorded (its final report's `events.lock`).
fn one(root: &Path, case: &Case, mode: Mode) -> Result<(f64, Option<u64>)> {
    let iters = if mode == Mode::Bpftrace { case.iterations.1 } else { case.iterations.0 };
    let mut cmd = Command::new(fixtures_bin(root).join("lock_bench"));
    cmd.args(["--threads", &case.threads.to_string(), "--iterations", &iters.to_string(), "--hold", &case.hold.to_string()]);
    let (mut target, out) = start_ready(&mut cmd, "lock_bench")?;
    let pid = target.id();
    let mut tracer: Option<Child> = None;
    let mut reports = None;
    let started = match mode {
        Mode::Untraced => Ok(()),
        Mode::Leaktrace => {
            let mut c = Command::new(leaktrace_bin(root));
            c.args(["attach", "--pid", &pid.to_string(), "--track", "locks", "--interval", "1s", "--format", "json"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            announce(&c);
            let mut child = c.spawn().context("starting leaktrace")?;
            // The first report, then the line that says it attached.
            let mut r = Lines::new(child.stdout.take().unwrap());
            reports = r.wait_line("", Duration::from_secs(30)).then_some(r);
            let attached = expect_line(&mut Lines::new(child.stderr.take().unwrap()), "attached to", Duration::from_secs(30));
            tracer = Some(child);
            attached
        }
        Mode::Bpftrace => {
            let mut c = Command::new("bpftrace");
            c.args(["-p", &pid.to_string(), "-e", PMLOCK]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
            announce(&c);
            let mut child = c.spawn().context("starting bpftrace (apt-get install bpftrace)")?;
            let attaching = expect_line(&mut Lines::new(child.stdout.take().unwrap()), "Attaching", Duration::from_secs(60));
            tracer = Some(child);
            // bpftrace prints "Attaching N probes..." just before attaching.
            thread::sleep(Duration::from_millis(1500));
            attaching
        }
    };
    if let Err(e) = started {
        stop_child(&mut target, "lock_bench");
        if let Some(t) = tracer.as_mut() {
            stop_child(t, "tracer");
        }
        return Err(e);
    }
    send_signal(pid, "USR1")?;
    let status = wait_timeout(&mut target, Duration::from_secs(300))?;
    if status.is_none() {
        stop_child(&mut target, "lock_bench");
        bail!("lock_bench did not finish");
    }
    if let Some(mut t) = tracer {
        interrupt(&mut t, "tracer", Duration::from_secs(20));
    }
    let text = out.all(Duration::from_secs(5));
    let ns = text
        .lines()
        .find_map(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix("ns_per_op=")).and_then(|v| v.parse().ok()))
        .ok_or_else(|| anyhow!("lock_bench printed no result:\n{text}"))?;
    // `"events":{"lock":N}` of the final report (the last line).
    let waits = reports.map(|r| r.all(Duration::from_secs(5))).and_then(|all| {
        let last = all.lines().last()?.to_string();
        let at = last.find("\"events\":{")?;
        let rest = &last[at..];
        let v = rest[rest.find("\"lock\":")? + 7..].split(|c: char| !c.is_ascii_digit()).next()?.to_string();
        v.parse().ok()
    });
    Ok((ns, waits))
}

/// Runs the benchmark and prints the table and a README-ready one.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let [runs] = parse_options("bench locks", args, [("--runs", 7)], &["--runs"])?;
    build::run(root)?;
    let modes = [Mode::Untraced, Mode::Leaktrace, Mode::Bpftrace];
    // results[case][mode] = per-run ns/op
    let mut results = vec![vec![Vec::new(); modes.len()]; CASES.len()];
    let mut waits: Vec<Vec<u64>> = vec![Vec::new(); CASES.len()];
    for run in 0..runs {
        for (ci, case) in CASES.iter().enumerate() {
            for (mi, mode) in modes.iter().enumerate() {
                let (ns, w) = one(root, case, *mode)?;
                if let Some(w) = w {
                    waits[ci].push(w);
                }
                eprintln!("bench locks: run {}/{runs} {} {}: {ns:.1} ns/op", run + 1, case.name, mode_name(*mode));
                results[ci][mi].push(ns);
            }
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(out, "lock_bench: lock+unlock pairs on one pthread mutex; {runs} paired rounds; ratio = median over rounds of (mode / untraced in the same round)")?;
    let mut readme = Vec::new();
    for (ci, case) in CASES.iter().enumerate() {
        let untraced = results[ci][0].clone();
        let w = waits[ci].iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ");
        writeln!(out, "{}: contended waits leaktrace recorded per run: {w}", case.name)?;
        for (mi, mode) in modes.iter().enumerate() {
            let v = &results[ci][mi];
            let ratio = paired_ratio(v, &untraced);
            let med = median(v);
            let all = list(v, 0);
            writeln!(out, "  {:<48} {med:>10.1} ns/op {ratio:>8.2}x   {all}", mode_name(*mode))?;
            let recorded = if *mode == Mode::Leaktrace { w.clone() } else { "-".into() };
            readme.push(format!("| {} | {} | {med:.0} | {ratio:.2}x | {recorded} |", case.name, mode_name(*mode)));
        }
    }
    writeln!(out)?;
    writeln!(out, "README (cargo xtask bench locks --runs {runs}):")?;
    writeln!(out, "| case | mode | ns per lock+unlock (median) | ratio to untraced (median of paired rounds) | contended waits recorded per run |")?;
    writeln!(out, "|---|---|---|---|---|")?;
    for l in readme {
        writeln!(out, "{l}")?;
    }
    Ok(())
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Untraced => "untraced",
        Mode::Leaktrace => "leaktrace attach --track locks",
        Mode::Bpftrace => "bpftrace pmlock-style (uprobe+uretprobe on pthread_mutex_lock)",
    }
}
