//! `cargo xtask bench tasks`: what `--track tasks` costs a program that
//! churns goroutines or threads, in paired rounds in one run.
//!
//! - goroutine churn: `gochurn127` (Go 1.27) starts and ends short
//!   goroutines as fast as it can (several hundred thousand per second
//!   here, above the issue's 100k/s), untraced, under `leaktrace attach
//!   --track tasks` (no probes: it reads the goroutine table once per
//!   interval), and under two bare uprobes on `runtime.newproc1` and
//!   `runtime.goexit1` at their `PUSHQ BP` (the cheapest, emulated
//!   instruction): the least a probe-per-goroutine design would pay, before
//!   any BPF work.
//! - the creator probe: `gochurn127 -leak-ms 20` (one goroutine of the
//!   churn's own `go` statement blocks forever every 20 ms) under leaktrace
//!   twice: as before (the statement is the program's own: no probe), and
//!   with `--own` set to a prefix nothing has, so the statement counts as a
//!   library's and, once judged a leak, gets the creator probe on its
//!   `CALL runtime.newproc` — the churn then runs with the probe attached.
//!   The paired difference per goroutine is the probe's cost per creation.
//! - thread churn: `thread_churn` (C) creates and joins threads one after
//!   the other, untraced and traced (the `pthread_create` uprobe plus the
//!   sched fork/exit tracepoints): the per-thread difference is the
//!   thread tracker's cost.
//!
//! Each round runs every mode once, back to back; a mode's ratio is the
//! median over rounds of (mode / that round's untraced run).

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    elf_file_offset, first_push_rbp, interrupt, libc_symbol_offset, list, log_until_attached, median, paired_ratio, parse_options,
    symbol_address, wait_attached, TracefsUprobes,
};
use crate::build;
use crate::cmd::{fixtures_bin, leaktrace_bin, stop_child, target_dir, wait_timeout};

struct Options {
    runs: usize,
    goroutines: u64,
    threads: u64,
}

fn parse_args(args: &[String]) -> Result<Options> {
    let [runs, goroutines, threads] = parse_options(
        "bench tasks",
        args,
        [("--runs", 5), ("--goroutines", 2_000_000), ("--threads", 20_000)],
        &["--runs", "--goroutines", "--threads"],
    )?;
    Ok(Options { runs: runs as usize, goroutines, threads })
}

/// Starts `bin args --wait`, optionally attaches leaktrace, then lets it
/// run; returns its own measurement (seconds).
/// How a churn run is traced: not, by [`attach`], or by [`attach_probing`].
type Attach = fn(&Path, u32, &Path) -> Result<Child>;

fn run_churn(root: &Path, bin: &Path, args: &[String], traced: Option<Attach>, log: &Path) -> Result<f64> {
    let mut target = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut out = BufReader::new(target.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "ready" {
        stop_child(&mut target, "churn");
        bail!("{} printed {line:?} instead of ready", bin.display());
    }
    let mut tracer = match traced {
        Some(attach) => Some(attach(root, target.id(), log).inspect_err(|_| stop_child(&mut target, "churn"))?),
        None => None,
    };
    let started = (|| -> Result<f64> {
        let mut stdin = target.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        stdin.write_all(b"go\n")?;
        let st = wait_timeout(&mut target, Duration::from_secs(600))?.ok_or_else(|| anyhow!("churn did not finish in 600 s"))?;
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest)?;
        if !st.success() {
            bail!("{} failed ({st}): {rest}", bin.display());
        }
        let ns: f64 = rest
            .lines()
            .find_map(|l| l.strip_prefix("elapsed_ns "))
            .ok_or_else(|| anyhow!("no elapsed_ns line in {rest:?}"))?
            .trim()
            .parse()?;
        Ok(ns / 1e9)
    })();
    if started.is_err() {
        stop_child(&mut target, "churn");
    }
    if let Some(t) = tracer.as_mut() {
        interrupt(t, "leaktrace", Duration::from_secs(15));
    }
    started
}

/// `leaktrace attach --track tasks` on `pid`, returned once it is attached
/// and has taken its first sample.
fn attach(root: &Path, pid: u32, log: &Path) -> Result<Child> {
    let mut tracer = Command::new(leaktrace_bin(root))
        .args(["attach", "--pid", &pid.to_string(), "--track", "tasks", "--interval", "1s", "--format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting leaktrace")?;
    let stderr = tracer.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (rx, _logger) = log_until_attached(stderr, log.to_path_buf());
    if wait_attached(&rx, &mut tracer, Duration::from_secs(60)).is_err() {
        let _ = tracer.kill();
        let _ = tracer.wait();
        bail!("leaktrace did not attach (log: {})", log.display());
    }
    // The first sample follows "attached" at once; give it time.
    thread::sleep(Duration::from_millis(500));
    Ok(tracer)
}

/// `leaktrace attach --track tasks --own NOTHING` on `pid` (every `go`
/// statement a library's), returned once a report judged a goroutine group
/// a leak: the creator probe is on its statement from that report on.
fn attach_probing(root: &Path, pid: u32, log: &Path) -> Result<Child> {
    let mut tracer = Command::new(leaktrace_bin(root))
        .args(["attach", "--pid", &pid.to_string(), "--track", "tasks", "--interval", "1s", "--format", "json"])
        .args(["--own", "leaktrace.bench.nothing"])
        .stdout(Stdio::piped())
        .stderr(fs::File::create(log)?)
        .spawn()
        .context("starting leaktrace")?;
    let stdout = tracer.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(r#""kind":"goroutine","verdict":"leak""#) {
                sent = tx.send(()).is_ok();
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = tracer.kill();
        let _ = tracer.wait();
        bail!("leaktrace judged no goroutine leak in 60 s (log: {})", log.display());
    }
    thread::sleep(Duration::from_millis(300));
    Ok(tracer)
}

/// File offset of the first `push %rbp` of `func` in a Go binary (via
/// nm, objdump and readelf: the bench must not share code with what it
/// measures).
fn push_rbp_offset(bin: &Path, func: &str) -> Result<u64> {
    let b = bin.to_str().ok_or_else(|| anyhow!("bad path"))?;
    elf_file_offset(b, first_push_rbp(b, symbol_address(b, func)?, func)?)
}

const GROUP: &str = "leaktrace_bench_tasks";

/// tracefs uprobes at the `PUSHQ BP` of each Go function of `bin`.
fn go_uprobes(bin: &Path, funcs: &[&str]) -> Result<TracefsUprobes> {
    let at = funcs.iter().map(|f| Ok((f.to_string(), bin, push_rbp_offset(bin, f)?))).collect::<Result<Vec<_>>>()?;
    TracefsUprobes::install(GROUP, &at)
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let o = parse_args(args)?;
    build::run(root)?;
    let bin = fixtures_bin(root);
    let gochurn = bin.join("gochurn127");
    let thread_churn = bin.join("thread_churn");
    let logs = target_dir(root).join("xtask-bench");
    fs::create_dir_all(&logs)?;
    let go_args: Vec<String> = vec!["-wait".into(), "-goroutines".into(), o.goroutines.to_string()];
    let leak_args: Vec<String> = go_args.iter().cloned().chain(["-leak-ms".into(), "20".into()]).collect();
    let th_args: Vec<String> = vec!["--wait".into(), "--threads".into(), o.threads.to_string()];

    // mode -> seconds per round
    let mut go_u = Vec::new();
    let mut go_t = Vec::new();
    let mut go_p = Vec::new();
    // With a slow leak at the churn's statement: no probe, and the creator probe.
    let mut go_lt = Vec::new();
    let mut go_lc = Vec::new();
    let mut th_u = Vec::new();
    let mut th_t = Vec::new();
    let mut th_p = Vec::new();
    // The thread tracker's uprobe alone: pthread_create's first instruction.
    let libc = PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6");
    let pthread_create = libc_symbol_offset(&libc.to_string_lossy(), "pthread_create")?;
    for r in 0..o.runs {
        let n = r + 1;
        let runs = o.runs;
        go_u.push(run_churn(root, &gochurn, &go_args, None, &logs.join("tasks-go.log"))?);
        go_t.push(run_churn(root, &gochurn, &go_args, Some(attach), &logs.join(format!("tasks-go-{r}.log")))?);
        {
            let _p = go_uprobes(&gochurn, &["runtime.newproc1", "runtime.goexit1"])?;
            go_p.push(run_churn(root, &gochurn, &go_args, None, &logs.join("tasks-go.log"))?);
        }
        go_lt.push(run_churn(root, &gochurn, &leak_args, Some(attach), &logs.join(format!("tasks-go-leak-{r}.log")))?);
        go_lc.push(run_churn(root, &gochurn, &leak_args, Some(attach_probing), &logs.join(format!("tasks-go-creator-{r}.log")))?);
        eprintln!(
            "bench tasks: round {n}/{runs} goroutines: untraced {:.3}s, leaktrace {:.3}s, 2 uprobes {:.3}s; leaking: leaktrace {:.3}s, creator probe {:.3}s",
            go_u[r], go_t[r], go_p[r], go_lt[r], go_lc[r]
        );
        th_u.push(run_churn(root, &thread_churn, &th_args, None, &logs.join("tasks-c.log"))?);
        th_t.push(run_churn(root, &thread_churn, &th_args, Some(attach), &logs.join(format!("tasks-c-{r}.log")))?);
        {
            let _p = TracefsUprobes::install(GROUP, &[("pthread_create".into(), libc.as_path(), pthread_create)])?;
            th_p.push(run_churn(root, &thread_churn, &th_args, None, &logs.join("tasks-c.log"))?);
        }
        eprintln!(
            "bench tasks: round {n}/{runs} threads: untraced {:.3}s, leaktrace {:.3}s, pthread_create uprobe {:.3}s",
            th_u[r], th_t[r], th_p[r]
        );
    }

    let per = |v: &[f64], n: u64| median(v) / n as f64 * 1e9;
    let gn = o.goroutines;
    let tn = o.threads;
    let go_rate = gn as f64 / median(&go_u);
    // Extra µs per task, paired per round.
    let extra = |v: &[f64], base: &[f64], n: u64| median(&v.iter().zip(base).map(|(t, u)| (t - u) / n as f64 * 1e6).collect::<Vec<_>>());
    let th_extra = extra(&th_t, &th_u, tn);
    let th_p_extra = extra(&th_p, &th_u, tn);
    let go_extra = extra(&go_p, &go_u, gn);
    let creator_extra = extra(&go_lc, &go_lt, gn);
    let all = |v: &[f64]| list(v, 2);

    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(out, "goroutine churn: gochurn127, {gn} goroutines ({go_rate:.0}/s untraced); thread churn: thread_churn, {tn} threads; {} rounds", o.runs)?;
    writeln!(out, "ratio = median over rounds of (mode / the round's untraced run); seconds per round in brackets")?;
    writeln!(out, "goroutines untraced:                 {:>8.1} ns/goroutine 1.00x [{}]", per(&go_u, gn), all(&go_u))?;
    writeln!(out, "goroutines leaktrace --track tasks:  {:>8.1} ns/goroutine {:.3}x [{}]", per(&go_t, gn), paired_ratio(&go_t, &go_u), all(&go_t))?;
    writeln!(out, "goroutines 2 bare uprobes:           {:>8.1} ns/goroutine {:.3}x [{}] (+{go_extra:.2} µs/goroutine)", per(&go_p, gn), paired_ratio(&go_p, &go_u), all(&go_p))?;
    writeln!(out, "goroutines leaking, leaktrace:       {:>8.1} ns/goroutine {:.3}x [{}]", per(&go_lt, gn), paired_ratio(&go_lt, &go_u), all(&go_lt))?;
    writeln!(out, "goroutines leaking, creator probe:   {:>8.1} ns/goroutine {:.3}x [{}] (+{creator_extra:.2} µs/creation vs no probe)", per(&go_lc, gn), paired_ratio(&go_lc, &go_u), all(&go_lc))?;
    writeln!(out, "threads untraced:                    {:>8.1} µs/thread 1.00x [{}]", per(&th_u, tn) / 1e3, all(&th_u))?;
    writeln!(out, "threads leaktrace --track tasks:     {:>8.1} µs/thread {:.3}x [{}] (+{th_extra:.2} µs/thread)", per(&th_t, tn) / 1e3, paired_ratio(&th_t, &th_u), all(&th_t))?;
    writeln!(out, "threads bare pthread_create uprobe:  {:>8.1} µs/thread {:.3}x [{}] (+{th_p_extra:.2} µs/thread)", per(&th_p, tn) / 1e3, paired_ratio(&th_p, &th_u), all(&th_p))?;
    writeln!(out)?;
    writeln!(out, "README:")?;
    writeln!(out, "| churn ({} rounds, paired) | untraced | traced | ratio |", o.runs)?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| goroutines: Go 1.27, {gn} short goroutines ({go_rate:.0}/s), `leaktrace attach --track tasks` | {:.0} ns/goroutine | {:.0} ns/goroutine | {:.3}x |",
        per(&go_u, gn),
        per(&go_t, gn),
        paired_ratio(&go_t, &go_u)
    )?;
    writeln!(
        out,
        "| goroutines: the same under 2 bare uprobes (`runtime.newproc1`, `runtime.goexit1` at `PUSHQ BP`), the least a probe-per-goroutine design pays | {:.0} ns/goroutine | {:.0} ns/goroutine | {:.3}x (+{go_extra:.2} µs/goroutine) |",
        per(&go_u, gn),
        per(&go_p, gn),
        paired_ratio(&go_p, &go_u)
    )?;
    writeln!(
        out,
        "| goroutines: the same churn from a `go` statement judged a leak (-leak-ms 20): leaktrace without, then with the creator probe on its `CALL runtime.newproc` | {:.0} ns/goroutine | {:.0} ns/goroutine | {:.3}x (+{creator_extra:.2} µs/creation) |",
        per(&go_lt, gn),
        per(&go_lc, gn),
        paired_ratio(&go_lc, &go_lt)
    )?;
    writeln!(
        out,
        "| threads: C, {tn} x pthread_create+join, `leaktrace attach --track tasks` (pthread_create uprobe + sched fork/exit) | {:.1} µs/thread | {:.1} µs/thread | {:.3}x (+{th_extra:.2} µs/thread) |",
        per(&th_u, tn) / 1e3,
        per(&th_t, tn) / 1e3,
        paired_ratio(&th_t, &th_u)
    )?;
    writeln!(
        out,
        "| threads: the same under a bare uprobe at `pthread_create`+0 (where the thread tracker's sits) | {:.1} µs/thread | {:.1} µs/thread | {:.3}x (+{th_p_extra:.2} µs/thread) |",
        per(&th_u, tn) / 1e3,
        per(&th_p, tn) / 1e3,
        paired_ratio(&th_p, &th_u)
    )?;
    Ok(())
}
