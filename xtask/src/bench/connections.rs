//! `cargo xtask bench [--iterations N] [--runs N]`: what `leaktrace attach`
//! costs conn_bench (socket()+connect()+close() on loopback), against
//! untraced runs and bare uprobes at libc's `socket` and `connect` symbols;
//! and `cargo xtask bench fds`: the same three modes for fd_bench
//! (open()+close() of a regular file), traced with `--track fds`, uprobes at
//! `open` and `close`. One syscall loop, two subjects.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{
    interrupt, libc_symbol_offset, list, log_until_attached, median, paired_ratio, parse_options, start_ready,
    wait_attached, TracefsUprobes,
};
use crate::build;
use crate::cmd::{announce, fixtures_bin, leaktrace_bin, send_signal, stop_child, target_dir, wait_timeout};

/// A syscall loop to measure: its fixture, what leaktrace tracks, the libc
/// symbols a symbol-probing tool would probe, how the results are titled.
pub struct Subject {
    fixture: &'static str,
    track: &'static str,
    symbols: &'static [&'static str],
    what: &'static str,
}

/// conn_bench: socket()+connect()+close() on loopback, default trackers.
pub const SOCKETS: Subject = Subject {
    fixture: "conn_bench",
    track: "connections,tasks",
    symbols: &["socket", "connect"],
    what: "socket()+connect()+close() on loopback",
};

/// fd_bench: open()+close() of a regular file, `--track fds`.
pub const FILES: Subject = Subject {
    fixture: "fd_bench",
    track: "fds",
    symbols: &["open", "close"],
    what: "open()+close() of a regular file",
};

struct BenchResult {
    ns_per_op: f64,
}

fn parse_bench_line(out: &str) -> Result<BenchResult> {
    for line in out.lines() {
        if !line.starts_with("iterations=") {
            continue;
        }
        for kv in line.split_whitespace() {
            if let Some(v) = kv.strip_prefix("ns_per_op=") {
                return Ok(BenchResult {
                    ns_per_op: v.parse().with_context(|| format!("bad ns_per_op in `{line}`"))?,
                });
            }
        }
    }
    bail!("the bench printed no result line; output was:\n{out}")
}

fn bench_untraced(root: &Path, subject: &Subject, iterations: u64) -> Result<BenchResult> {
    let fixture = subject.fixture;
    let mut cmd = Command::new(fixtures_bin(root).join(fixture));
    cmd.args(["--now", "--iterations", &iterations.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    announce(&cmd);
    let out = cmd.output().with_context(|| format!("running {fixture}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{fixture} failed ({}):\n{stdout}", out.status);
    }
    parse_bench_line(&stdout)
}

fn bench_traced(root: &Path, subject: &Subject, iterations: u64, run: usize) -> Result<BenchResult> {
    let fixture = subject.fixture;
    let mut cmd = Command::new(fixtures_bin(root).join(fixture));
    cmd.args(["--iterations", &iterations.to_string()]);
    let (mut target, out) = start_ready(&mut cmd, fixture)?;
    let pid = target.id();

    let out_dir = target_dir(root).join("xtask-bench");
    fs::create_dir_all(&out_dir)?;
    let json_path = out_dir.join(format!("traced-{run}.json"));
    let log_path = out_dir.join(format!("traced-{run}.log"));
    let json_file = fs::File::create(&json_path)?;
    let mut lt_cmd = Command::new(leaktrace_bin(root));
    lt_cmd
        .args(["attach", "--pid", &pid.to_string(), "--interval", "1s", "--format", "json", "--track", subject.track])
        .stdin(Stdio::null())
        .stdout(json_file)
        .stderr(Stdio::piped());
    announce(&lt_cmd);
    let mut tracer = match lt_cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            stop_child(&mut target, fixture);
            return Err(e).context("starting leaktrace");
        }
    };

    let (att_rx, logger) = log_until_attached(tracer.stderr.take().unwrap(), log_path.clone());

    let cleanup = |target: &mut Child, tracer: &mut Child| {
        stop_child(target, fixture);
        interrupt(tracer, "leaktrace", Duration::from_secs(10));
    };

    match wait_attached(&att_rx, &mut tracer, Duration::from_secs(60)) {
        Ok(()) => {}
        Err(Some(st)) => {
            cleanup(&mut target, &mut tracer);
            let _ = logger.join();
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            bail!("leaktrace exited before attaching ({st}); its stderr:\n{log}");
        }
        Err(None) => {
            cleanup(&mut target, &mut tracer);
            bail!("leaktrace did not print `attached` within 60s (log: {})", log_path.display());
        }
    }

    send_signal(pid, "USR1")?;
    let st = match wait_timeout(&mut target, Duration::from_secs(600))? {
        Some(st) => st,
        None => {
            cleanup(&mut target, &mut tracer);
            bail!("{fixture} did not finish within 600s");
        }
    };
    let rest = out.all(Duration::from_secs(10));

    let lt_status = interrupt(&mut tracer, "leaktrace", Duration::from_secs(15));
    let _ = logger.join();
    if !st.success() {
        bail!("{fixture} failed under tracing ({st}):\n{rest}");
    }
    if let Some(s) = lt_status {
        if !s.success() {
            eprintln!(
                "xtask: warning: leaktrace exited with {s} after SIGINT (log: {})",
                log_path.display()
            );
        }
    }
    let json_len = fs::metadata(&json_path).map(|m| m.len()).unwrap_or(0);
    eprintln!("bench: leaktrace wrote {json_len} bytes of JSON to {}", json_path.display());
    parse_bench_line(&rest)
}

/// tracefs uprobes at the subject's libc symbols — where a tool that probes
/// by symbol puts them — while the untraced bench runs.
fn bench_symbol_uprobes(root: &Path, subject: &Subject, iterations: u64) -> Result<BenchResult> {
    let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    let libc_str = libc.to_str().unwrap_or_default();
    let at = subject
        .symbols
        .iter()
        .map(|sym| Ok((sym.to_string(), libc, libc_symbol_offset(libc_str, sym)?)))
        .collect::<Result<Vec<_>>>()?;
    let _probes = TracefsUprobes::install("leaktrace_bench", &at)?;
    bench_untraced(root, subject, iterations)
}

pub fn run(root: &Path, subject: &Subject, args: &[String]) -> Result<()> {
    let [iterations, runs] =
        parse_options("bench", args, [("--iterations", 10000), ("--runs", 7)], &["--runs", "--iterations"])?;
    let runs = runs as usize;

    build::run(root)?;
    let mut untraced = Vec::new();
    let mut traced = Vec::new();
    let mut uprobed = Vec::new();
    for run in 0..runs {
        let u = bench_untraced(root, subject, iterations)?;
        eprintln!("bench: run {}/{runs} untraced: {:.1} ns/op", run + 1, u.ns_per_op);
        untraced.push(u.ns_per_op);
        let t = bench_traced(root, subject, iterations, run)?;
        eprintln!("bench: run {}/{runs} traced:   {:.1} ns/op", run + 1, t.ns_per_op);
        traced.push(t.ns_per_op);
        let p = bench_symbol_uprobes(root, subject, iterations)?;
        eprintln!("bench: run {}/{runs} uprobes at symbols: {:.1} ns/op", run + 1, p.ns_per_op);
        uprobed.push(p.ns_per_op);
    }
    let (mu, mt, mp) = (median(&untraced), median(&traced), median(&uprobed));
    // These VMs drift by ±20% within a minute: compare each traced run with
    // the untraced run just before it and take the median of those ratios.
    let ratio = paired_ratio(&traced, &untraced);
    let pratio = paired_ratio(&uprobed, &untraced);

    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    let (fixture, what, probed) = (subject.fixture, subject.what, subject.symbols.join("+"));
    writeln!(out, "{fixture}: {iterations} x {what}, --track {}, {runs} runs each (median)", subject.track)?;
    writeln!(out, "ratio = median over runs of (mode / the untraced run just before it)")?;
    writeln!(out, "{:<34} {:>10} {:>7}   runs", "mode", "ns/op", "ratio")?;
    writeln!(out, "{:<34} {:>10.0} {:>6.2}x   {}", "untraced", mu, 1.0, list(&untraced, 0))?;
    writeln!(out, "{:<34} {:>10.0} {:>6.2}x   {}", "leaktrace attach", mt, ratio, list(&traced, 0))?;
    writeln!(out, "{:<34} {:>10.0} {:>6.2}x   {}", format!("uprobes at {probed} symbols"), mp, pratio, list(&uprobed, 0))?;
    writeln!(out)?;
    writeln!(out, "README:")?;
    writeln!(out, "| mode | ns/op (median of {runs}) | ratio to untraced (median of paired runs) |")?;
    writeln!(out, "|---|---|---|")?;
    writeln!(out, "| untraced | {mu:.0} | 1.00x |")?;
    writeln!(out, "| leaktrace attach (tracepoints, caller from disassembly) | {mt:.0} | {ratio:.2}x |")?;
    writeln!(out, "| bare uprobes at libc `{probed}` symbols (what symbol-probing tools pay, before any BPF work) | {mp:.0} | {pratio:.2}x |")?;
    Ok(())
}
