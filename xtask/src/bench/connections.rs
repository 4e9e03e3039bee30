//! `cargo xtask bench [--iterations N] [--runs N]`: what `leaktrace attach`
//! costs conn_bench (socket()+connect()+close() on loopback), against
//! untraced runs and bare uprobes at libc's `socket` and `connect` symbols.
//! `cargo xtask bench fds`: open()+close() of a regular file (fd_bench),
//! traced with `--track fds`, against untraced runs and bare uprobes at libc's
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
    /// Also the frame-pointer-less build (`FIXTURE_nofp`) and `--unwind fp`.
    unwind_matrix: bool,
    /// The BPF program whose run time per event is reported: the one that
    /// walks the stack of each new descriptor.
    program: &'static str,
}

/// conn_bench: socket()+connect()+close() on loopback, default trackers.
pub const SOCKETS: Subject = Subject {
    fixture: "conn_bench",
    track: "connections,tasks",
    symbols: &["socket", "connect"],
    what: "socket()+connect()+close() on loopback",
    unwind_matrix: true,
    program: "conn_socket_exit",
};

/// fd_bench: open()+close() of a regular file, `--track fds`.
pub const FILES: Subject = Subject {
    fixture: "fd_bench",
    track: "fds",
    symbols: &["open", "close"],
    what: "open()+close() of a regular file",
    unwind_matrix: false,
    program: "fds_new_exit",
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
    bail!("conn_bench printed no result line; output was:\n{out}")
}

fn bench_untraced(root: &Path, fixture: &str, iterations: u64) -> Result<BenchResult> {
    let mut cmd = Command::new(fixtures_bin(root).join(fixture));
    cmd.args(["--now", "--iterations", &iterations.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    announce(&cmd);
    let out = cmd.output().context("running conn_bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("conn_bench failed ({}):\n{stdout}", out.status);
    }
    parse_bench_line(&stdout)
}

/// What a traced run measured: the loop, and the socket programs' BPF time
/// per event (`kernel.bpf_stats_enabled`), when bpftool could say.
struct TracedResult {
    ns_per_op: f64,
    bpf_ns_per_event: Option<f64>,
}

/// `run_time_ns / run_cnt` of the first program `name` loaded after program
/// id `after` (this run's leaktrace: bpftool here shows no owning pids, and
/// other tracers may be loaded).
fn program_ns(name: &str, after: u64) -> Option<f64> {
    let out = Command::new("bpftool").args(["prog", "show"]).output().ok()?;
    program_ns_per_run(&String::from_utf8_lossy(&out.stdout), name, after)
}

/// The highest BPF program id loaded now.
pub(super) fn max_program_id() -> u64 {
    let out = Command::new("bpftool").args(["prog", "show"]).output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out).lines().filter_map(program_id).max().unwrap_or(0)
}

/// The id of a `bpftool prog show` block's first line (`ID: type name ...`).
fn program_id(line: &str) -> Option<u64> {
    line.split(':').next()?.parse().ok()
}

/// From `bpftool prog show`'s text: `run_time_ns / run_cnt` of the
/// lowest-numbered program `name` with an id above `after`.
fn program_ns_per_run(text: &str, name: &str, after: u64) -> Option<f64> {
    program_totals(text, name, after).filter(|(_, n)| *n > 0.0).map(|(t, n)| t / n)
}

/// `(run_time_ns, run_cnt)` of the lowest-numbered program `name` with an
/// id above `after`, in `bpftool prog show`'s text.
pub(super) fn program_totals(text: &str, name: &str, after: u64) -> Option<(f64, f64)> {
    text.lines()
        .filter_map(|l| Some((program_id(l)?, l)))
        .filter(|(id, _)| *id > after)
        .find_map(|(_, l)| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let value = |k: &str| words.iter().position(|w| *w == k).and_then(|i| words.get(i + 1));
            if value("name") != Some(&name) {
                return None;
            }
            Some((value("run_time_ns")?.parse().ok()?, value("run_cnt")?.parse().ok()?))
        })
}

fn bench_traced(root: &Path, subject: &Subject, fixture: &str, unwind: &str, iterations: u64, run: usize) -> Result<TracedResult> {
    let track = subject.track;
    let mut cmd = Command::new(fixtures_bin(root).join(fixture));
    cmd.args(["--iterations", &iterations.to_string()]);
    let (mut target, out) = start_ready(&mut cmd, "conn_bench")?;
    let pid = target.id();

    let out_dir = target_dir(root).join("xtask-bench");
    fs::create_dir_all(&out_dir)?;
    let json_path = out_dir.join(format!("traced-{fixture}-{unwind}-{run}.json"));
    let log_path = out_dir.join(format!("traced-{fixture}-{unwind}-{run}.log"));
    let json_file = fs::File::create(&json_path)?;
    let mut lt_cmd = Command::new(leaktrace_bin(root));
    lt_cmd
        .args(["attach", "--pid", &pid.to_string(), "--interval", "1s", "--format", "json", "--track", track, "--unwind", unwind])
        .stdin(Stdio::null())
        .stdout(json_file)
        .stderr(Stdio::piped());
    announce(&lt_cmd);
    let programs_before = max_program_id();
    let mut tracer = match lt_cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            stop_child(&mut target, "conn_bench");
            return Err(e).context("starting leaktrace");
        }
    };

    let (att_rx, logger) = log_until_attached(tracer.stderr.take().unwrap(), log_path.clone());

    let cleanup = |target: &mut Child, tracer: &mut Child| {
        stop_child(target, "conn_bench");
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
            bail!("conn_bench did not finish within 600s");
        }
    };
    let rest = out.all(Duration::from_secs(10));
    let bpf_ns_per_event = program_ns(subject.program, programs_before);
    if bpf_ns_per_event.is_none() {
        eprintln!("bench: no BPF run time for leaktrace's {} program (bpftool, kernel.bpf_stats_enabled)", subject.program);
    }

    let lt_status = interrupt(&mut tracer, "leaktrace", Duration::from_secs(15));
    let _ = logger.join();
    if !st.success() {
        bail!("conn_bench failed under tracing ({st}):\n{rest}");
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
    Ok(TracedResult { ns_per_op: parse_bench_line(&rest)?.ns_per_op, bpf_ns_per_event })
}

/// tracefs uprobes at libc's `socket` and `connect` symbols — where a tool
/// that probes by symbol puts them — while the untraced bench runs.
fn bench_symbol_uprobes(root: &Path, subject: &Subject, iterations: u64) -> Result<BenchResult> {
    let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    let libc_str = libc.to_str().unwrap_or_default();
    let at = subject
        .symbols
        .iter()
        .map(|sym| Ok((sym.to_string(), libc, libc_symbol_offset(libc_str, sym)?)))
        .collect::<Result<Vec<_>>>()?;
    let _probes = TracefsUprobes::install("leaktrace_bench", &at)?;
    bench_untraced(root, subject.fixture, iterations)
}

pub fn run(root: &Path, subject: &Subject, args: &[String]) -> Result<()> {
    let [iterations, runs] =
        parse_options("bench", args, [("--iterations", 10000), ("--runs", 7)], &["--runs", "--iterations"])?;
    let runs = runs as usize;

    build::run(root)?;
    // BPF run times per program, for the unwinder's cost per event.
    let stats_before = fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let mut untraced = Vec::new();
    let mut traced = Vec::new();
    let mut uprobed = Vec::new();
    // Frame-pointer build under --unwind fp; no-FP build untraced, and
    // traced both ways (eh-frame: whole stacks; fp: what it costs to be wrong).
    let mut traced_fp = Vec::new();
    let mut untraced_nofp = Vec::new();
    let mut traced_nofp = Vec::new();
    let mut traced_nofp_fp = Vec::new();
    let mut bpf: [Vec<f64>; 4] = Default::default();
    let mut keep_bpf = |i: usize, r: &TracedResult| {
        if let Some(ns) = r.bpf_ns_per_event {
            bpf[i].push(ns);
        }
    };
    let fixture = subject.fixture;
    let nofp = format!("{fixture}_nofp");
    for run in 0..runs {
        let u = bench_untraced(root, fixture, iterations)?;
        eprintln!("bench: run {}/{runs} untraced: {:.1} ns/op", run + 1, u.ns_per_op);
        untraced.push(u.ns_per_op);
        let t = bench_traced(root, subject, fixture, "eh-frame", iterations, run)?;
        eprintln!("bench: run {}/{runs} traced:   {:.1} ns/op", run + 1, t.ns_per_op);
        traced.push(t.ns_per_op);
        keep_bpf(0, &t);
        let p = bench_symbol_uprobes(root, subject, iterations)?;
        eprintln!("bench: run {}/{runs} uprobes at symbols: {:.1} ns/op", run + 1, p.ns_per_op);
        uprobed.push(p.ns_per_op);
        if !subject.unwind_matrix {
            continue;
        }
        let t = bench_traced(root, subject, fixture, "fp", iterations, run)?;
        traced_fp.push(t.ns_per_op);
        keep_bpf(1, &t);
        let u = bench_untraced(root, &nofp, iterations)?;
        untraced_nofp.push(u.ns_per_op);
        let t = bench_traced(root, subject, &nofp, "eh-frame", iterations, run)?;
        eprintln!("bench: run {}/{runs} no-FP build traced: {:.1} ns/op (untraced {:.1})", run + 1, t.ns_per_op, u.ns_per_op);
        traced_nofp.push(t.ns_per_op);
        keep_bpf(2, &t);
        let t = bench_traced(root, subject, &nofp, "fp", iterations, run)?;
        traced_nofp_fp.push(t.ns_per_op);
        keep_bpf(3, &t);
    }
    let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", if stats_before.trim() == "1" { "1" } else { "0" });
    let (mu, mt, mp) = (median(&untraced), median(&traced), median(&uprobed));
    // These VMs drift by ±20% within a minute: compare each traced run with
    // the untraced run just before it and take the median of those ratios.
    let ratio = paired_ratio(&traced, &untraced);
    let pratio = paired_ratio(&uprobed, &untraced);
    let fratio = paired_ratio(&traced_fp, &untraced);
    let nratio = paired_ratio(&traced_nofp, &untraced_nofp);
    let nfratio = paired_ratio(&traced_nofp_fp, &untraced_nofp);
    let bpf_ns = |i: usize| if bpf[i].is_empty() { "n/a".to_string() } else { format!("{:.0}", median(&bpf[i])) };

    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    let (what, probed) = (subject.what, subject.symbols.join("+"));
    writeln!(out, "{fixture}: {iterations} x {what}, --track {}, {runs} runs each (median)", subject.track)?;
    writeln!(out, "ratio = median over runs of (mode / the untraced run just before it)")?;
    writeln!(out, "bpf ns = run_time_ns / run_cnt of {} (one stack walk + map updates)", subject.program)?;
    writeln!(out, "{:<44} {:>10} {:>7} {:>8}   runs", "mode", "ns/op", "ratio", "bpf ns")?;
    writeln!(out, "{:<44} {:>10.0} {:>6.2}x {:>8}   {}", "untraced", mu, 1.0, "", list(&untraced, 0))?;
    writeln!(out, "{:<44} {:>10.0} {:>6.2}x {:>8}   {}", "leaktrace attach (--unwind eh-frame)", mt, ratio, bpf_ns(0), list(&traced, 0))?;
    writeln!(out, "{:<44} {:>10.0} {:>6.2}x {:>8}   {}", format!("uprobes at {probed} symbols"), mp, pratio, "", list(&uprobed, 0))?;
    if subject.unwind_matrix {
        writeln!(out, "{:<44} {:>10.0} {:>6.2}x {:>8}   {}", "leaktrace attach --unwind fp", median(&traced_fp), fratio, bpf_ns(1), list(&traced_fp, 0))?;
        writeln!(out, "{:<44} {:>10.0} {:>6.2}x {:>8}   {}", "no-FP build (gcc -O2) untraced", median(&untraced_nofp), 1.0, "", list(&untraced_nofp, 0))?;
        writeln!(out, "{:<44} {:>10.0} {:>6.2}x {:>8}   {}", "no-FP build, leaktrace (--unwind eh-frame)", median(&traced_nofp), nratio, bpf_ns(2), list(&traced_nofp, 0))?;
        writeln!(out, "{:<44} {:>10.0} {:>6.2}x {:>8}   {}", "no-FP build, leaktrace --unwind fp", median(&traced_nofp_fp), nfratio, bpf_ns(3), list(&traced_nofp_fp, 0))?;
    }
    writeln!(out)?;
    writeln!(out, "README:")?;
    writeln!(out, "| mode | ns/op (median of {runs}) | ratio to untraced (median of paired runs) |")?;
    writeln!(out, "|---|---|---|")?;
    writeln!(out, "| untraced | {mu:.0} | 1.00x |")?;
    writeln!(out, "| leaktrace attach (tracepoints, stacks unwound from .eh_frame rules) | {mt:.0} | {ratio:.2}x |")?;
    writeln!(out, "| bare uprobes at libc `{probed}` symbols (what symbol-probing tools pay, before any BPF work) | {mp:.0} | {pratio:.2}x |")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_programs_run_time_from_bpftool() {
        let text = "12: tracepoint  name conn_socket_exit  tag 0011  gpl run_time_ns 5000 run_cnt 10
\tloaded_at 2026-12-07T10:00:00+0000  uid 0
13: tracepoint  name conn_connect_exit  tag 0011  gpl run_time_ns 7 run_cnt 1
20: tracepoint  name conn_socket_exit  tag 0011  gpl run_time_ns 9 run_cnt 1
";
        assert_eq!(program_ns_per_run(text, "conn_socket_exit", 0), Some(500.0));
        assert_eq!(program_ns_per_run(text, "conn_socket_exit", 12), Some(9.0));
        assert_eq!(program_ns_per_run(text, "conn_socket_exit", 20), None);
    }
}
