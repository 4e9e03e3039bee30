//! `cargo xtask bench allocations`: what tracing malloc/free costs a program.
//!
//! Target: fixtures/c/alloc_bench (a malloc+free microbenchmark, then a
//! workload where allocation is a small share of the work). In each round,
//! one after the other, the target runs:
//! - untraced;
//! - "entry floor": bpftrace programs that do nothing, on `malloc` and
//!   `free` at their symbols (where every existing tool puts them);
//! - bpftrace doing memleak-style tracking (size at malloc's entry, address
//!   and stack at its return, delete at free, all at the symbols);
//! - leaktrace `--track allocations`.
//!
//! Added ns per malloc+free pair are taken against the untraced run of the
//! same round, and the medians over rounds are reported (these VMs drift:
//! only ratios taken in one run mean anything). Then the daemon's own CPU
//! and memory while the target holds 100k live blocks.

use std::{
    fs,
    io::Write,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use super::{interrupt, median, paired_ratio, parse_options, start_ready, Lines};
use crate::build;
use crate::cmd::{announce, cpu_seconds, fixtures_bin, leaktrace_bin, send_signal, status_kib, stop_child, target_dir, wait_timeout};

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// Seconds to wait after a tracer exits before the next mode starts.
const SETTLE_S: u64 = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Untraced,
    Floor,
    Memleak,
    Leaktrace,
    /// leaktrace sampling so sparsely that it tracks nothing: its traps
    /// plus ~0.1 µs of BPF, the least its probe placement can cost.
    TrapsOnly,
    /// leaktrace walking frame pointers only (`--unwind fp`).
    LeaktraceFp,
    /// The same workload built without frame pointers (`gcc -O2 -g`).
    UntracedNoFp,
    LeaktraceNoFp,
    LeaktraceNoFpFp,
}

impl Mode {
    const ALL: [Mode; 9] = [
        Mode::Untraced,
        Mode::Floor,
        Mode::Memleak,
        Mode::Leaktrace,
        Mode::TrapsOnly,
        Mode::LeaktraceFp,
        Mode::UntracedNoFp,
        Mode::LeaktraceNoFp,
        Mode::LeaktraceNoFpFp,
    ];

    /// The workload's build: with frame pointers, or as distributions build.
    fn fixture(self) -> &'static str {
        match self {
            Mode::UntracedNoFp | Mode::LeaktraceNoFp | Mode::LeaktraceNoFpFp => "alloc_bench_nofp",
            _ => "alloc_bench",
        }
    }

    /// The untraced mode of the same build (what "added" is measured from).
    fn base(self) -> Mode {
        if self.fixture() == "alloc_bench_nofp" { Mode::UntracedNoFp } else { Mode::Untraced }
    }

    /// How leaktrace walks stacks in this mode.
    fn unwind(self) -> &'static str {
        match self {
            Mode::LeaktraceFp | Mode::LeaktraceNoFpFp => "fp",
            _ => "eh-frame",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::Floor => "entry floor (empty bpftrace probes at malloc, free)",
            Mode::Memleak => "bpftrace memleak-style",
            Mode::Leaktrace => "leaktrace --track allocations",
            Mode::TrapsOnly => "leaktrace, tracking nothing (its traps alone)",
            Mode::LeaktraceFp => "leaktrace --track allocations --unwind fp",
            Mode::UntracedNoFp => "no-FP build (gcc -O2), untraced",
            Mode::LeaktraceNoFp => "no-FP build, leaktrace --track allocations",
            Mode::LeaktraceNoFpFp => "no-FP build, leaktrace --unwind fp (stacks cut short)",
        }
    }
}

/// ns per operation of the two workloads.
#[derive(Clone, Copy, Debug)]
struct Times {
    micro: f64,
    mixed: f64,
}

fn parse_times(out: &str) -> Result<Times> {
    let get = |w: &str| -> Option<f64> {
        out.lines()
            .find(|l| l.starts_with(&format!("workload={w} ")))?
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("ns_per_op="))?
            .parse()
            .ok()
    };
    match (get("micro"), get("mixed")) {
        (Some(micro), Some(mixed)) => Ok(Times { micro, mixed }),
        _ => bail!("alloc_bench printed no result lines; output was:\n{out}"),
    }
}

/// The memleak-style bpftrace script (what memleak does, at the symbols).
fn memleak_script() -> String {
    format!(
        "BEGIN {{ printf(\"attached\\n\"); }}\n\
         uprobe:{LIBC}:malloc {{ @size[tid] = arg0; }}\n\
         uretprobe:{LIBC}:malloc /@size[tid]/ {{ @sz[retval] = @size[tid]; @stk[retval] = ustack; @bytes[ustack] = sum(@size[tid]); delete(@size[tid]); }}\n\
         uprobe:{LIBC}:free {{ delete(@sz[arg0]); delete(@stk[arg0]); }}\n\
         END {{ clear(@sz); clear(@stk); clear(@bytes); clear(@size); }}\n"
    )
}

fn floor_script() -> String {
    format!("BEGIN {{ printf(\"attached\\n\"); }}\nuprobe:{LIBC}:malloc {{ }}\nuprobe:{LIBC}:free {{ }}\n")
}

/// A tracer process and the line that says it has attached.
struct Tracer {
    child: Child,
    lines: Lines,
}

impl Tracer {
    fn stop(mut self, what: &str) -> String {
        interrupt(&mut self.child, what, Duration::from_secs(20));
        self.lines.all(Duration::from_secs(5))
    }
}

fn start_tracer(root: &Path, mode: Mode, pid: u32, json: Option<&Path>) -> Result<Option<Tracer>> {
    let mut cmd = match mode {
        Mode::Untraced | Mode::UntracedNoFp => return Ok(None),
        Mode::Floor | Mode::Memleak => {
            let script = if mode == Mode::Floor { floor_script() } else { memleak_script() };
            let mut c = Command::new("bpftrace");
            c.args(["-p", &pid.to_string(), "-e", &script])
                .env("BPFTRACE_MAP_KEYS_MAX", "1048576")
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            c
        }
        Mode::Leaktrace | Mode::TrapsOnly | Mode::LeaktraceFp | Mode::LeaktraceNoFp | Mode::LeaktraceNoFpFp => {
            let mut c = Command::new(leaktrace_bin(root));
            c.args(["attach", "--pid", &pid.to_string(), "--track", "allocations", "--interval", "1s", "--format", "json"])
                .args(["--unwind", mode.unwind()])
                .stderr(Stdio::piped());
            if mode == Mode::TrapsOnly {
                // A block is kept with probability size / 2^50: never here.
                c.args(["--alloc-sample-bytes", "1125899906842624"]);
            }
            match json {
                Some(p) => c.stdout(fs::File::create(p)?),
                None => c.stdout(Stdio::null()),
            };
            c
        }
    };
    cmd.stdin(Stdio::null());
    announce(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting {}", mode.label()))?;
    let mut lines = match mode {
        Mode::Floor | Mode::Memleak => Lines::new(child.stdout.take().unwrap()),
        _ => Lines::new(child.stderr.take().unwrap()),
    };
    let needle = if matches!(mode, Mode::Floor | Mode::Memleak) { "attached" } else { "attached to" };
    if !lines.wait_line(needle, Duration::from_secs(60)) {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{} did not attach; it printed:\n{}", mode.label(), lines.seen());
    }
    Ok(Some(Tracer { child, lines }))
}

/// Starts alloc_bench (waiting for SIGUSR1), attaches `mode`, lets it run,
/// returns its times (and the tracer's log).
fn run_mode(root: &Path, mode: Mode, bench_args: &[String], json: Option<&Path>) -> Result<(Times, String)> {
    let (mut target, out) = start_ready(Command::new(fixtures_bin(root).join(mode.fixture())).args(bench_args), "alloc_bench")?;
    let tracer = match start_tracer(root, mode, target.id(), json) {
        Ok(t) => t,
        Err(e) => {
            stop_child(&mut target, "alloc_bench");
            return Err(e);
        }
    };
    // Let the tracer settle (its first report, symbolizer start) before the
    // target runs: on 2 cores it would otherwise compete with the target.
    // Half an interval after attach: the first report is made at 1 s.
    thread::sleep(Duration::from_millis(1500));
    send_signal(target.id(), "USR1")?;
    let status = wait_timeout(&mut target, Duration::from_secs(900))?;
    let traced = tracer.is_some();
    let log = tracer.map(|t| t.stop(mode.label())).unwrap_or_default();
    if traced {
        // A tracer's teardown (bpftrace freeing its million-entry maps)
        // keeps the kernel busy for a few seconds: measured here, the mode
        // run right after memleak-style bpftrace paid +40 % for it.
        thread::sleep(Duration::from_secs(SETTLE_S));
    }
    if status.is_none() {
        stop_child(&mut target, "alloc_bench");
        bail!("alloc_bench did not finish under {}", mode.label());
    }
    Ok((parse_times(&out.all(Duration::from_secs(10)))?, log))
}

/// The daemon's CPU and memory while the target holds `live` blocks and
/// keeps allocating (the mixed workload) for `hold_s` seconds.
fn daemon_cost(root: &Path, live: u64, hold_s: u64) -> Result<String> {
    let json = target_dir(root).join("xtask-bench").join("alloc-daemon.json");
    let mut cmd = Command::new(fixtures_bin(root).join("alloc_bench"));
    cmd.args(["--micro", "0", "--mixed", "0", "--live", &live.to_string(), "--hold-s", &hold_s.to_string()]);
    let (mut target, _out) = start_ready(&mut cmd, "alloc_bench")?;
    let tracer = match start_tracer(root, Mode::Leaktrace, target.id(), Some(&json)) {
        Ok(t) => t.ok_or_else(|| anyhow!("no tracer"))?,
        Err(e) => {
            stop_child(&mut target, "alloc_bench");
            return Err(e);
        }
    };
    let tpid = tracer.child.id();
    let cpu0 = cpu_seconds(tpid).unwrap_or(0.0);
    let t0 = Instant::now();
    send_signal(target.id(), "USR1")?;
    let done = wait_timeout(&mut target, Duration::from_secs(hold_s + 300))?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(tpid).unwrap_or(0.0) - cpu0;
    let hwm = status_kib(tpid, "VmHWM:").unwrap_or(0);
    let rss = status_kib(tpid, "VmRSS:").unwrap_or(0);
    tracer.stop("leaktrace");
    if done.is_none() {
        stop_child(&mut target, "alloc_bench");
        bail!("alloc_bench did not finish");
    }
    // The final report must hold the live blocks under keep_live.
    let text = fs::read_to_string(&json).unwrap_or_default();
    let last = text.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
    let seen_live = last
        .split("\"site\":\"keep_live\"")
        .nth(1)
        .and_then(|r| r.split("\"live\":").nth(1))
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(format!(
        "| daemon while {live} blocks are live ({hold_s} s of mixed workload) | CPU {:.1}% of one core ({cpu:.2} s over {wall:.1} s), RSS {} MiB (peak {} MiB); report: keep_live live={seen_live} |",
        100.0 * cpu / wall.max(0.001),
        rss / 1024,
        hwm / 1024
    ))
}

/// `cargo xtask bench allocations [--rounds N] [--micro N] [--mixed M] [--live K]`.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let [rounds, micro, mixed, live] = parse_options(
        "bench allocations",
        args,
        [("--rounds", 5), ("--micro", 200_000), ("--mixed", 2000), ("--live", 100_000)],
        &["--rounds", "--micro", "--mixed"],
    )?;
    let rounds = rounds as usize;
    if Command::new("bpftrace").arg("--version").output().is_err() {
        bail!("bpftrace is not installed: run `cargo xtask setup` (or apt-get install bpftrace)");
    }
    build::run(root)?;
    fs::create_dir_all(target_dir(root).join("xtask-bench"))?;
    let bench_args = vec!["--micro".to_string(), micro.to_string(), "--mixed".to_string(), mixed.to_string()];
    // results[mode][round]
    let mut results: Vec<Vec<Times>> = vec![Vec::new(); Mode::ALL.len()];
    for round in 0..rounds {
        for (i, mode) in Mode::ALL.iter().enumerate() {
            let json = target_dir(root).join("xtask-bench").join(format!("alloc-{round}.json"));
            let (t, _log) = run_mode(root, *mode, &bench_args, (*mode == Mode::Leaktrace).then_some(json.as_path()))?;
            eprintln!(
                "bench: round {}/{rounds} {}: micro {:.0} ns/pair, mixed {:.0} ns/iteration",
                round + 1,
                mode.label(),
                t.micro,
                t.mixed
            );
            results[i].push(t);
        }
    }
    let daemon = daemon_cost(root, live, 10)?;

    let untraced = &results[0];
    let row = |i: usize, pick: fn(&Times) -> f64| -> (f64, f64, f64) {
        let abs: Vec<f64> = results[i].iter().map(pick).collect();
        let base_at = Mode::ALL.iter().position(|m| *m == Mode::ALL[i].base()).unwrap_or(0);
        let base: Vec<f64> = results[base_at].iter().map(pick).collect();
        let added: Vec<f64> = abs.iter().zip(&base).map(|(t, u)| t - u).collect();
        (median(&abs), median(&added), paired_ratio(&abs, &base))
    };
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(
        out,
        "alloc_bench: micro = {micro} x malloc(64)+free; mixed = {mixed} x (~20 µs of hashing + malloc(256)+free); {rounds} paired rounds, medians"
    )?;
    writeln!(out, "added = mode minus the untraced run of the same round; ratio = mode / that untraced run")?;
    writeln!(out)?;
    writeln!(out, "| mode | micro ns/pair | added ns/pair | ratio | mixed ns/iter | added ns/iter | ratio |")?;
    writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    let mut added_micro = Vec::new();
    for (i, mode) in Mode::ALL.iter().enumerate() {
        let (am, dm, rm) = row(i, |t| t.micro);
        let (ax, dx, rx) = row(i, |t| t.mixed);
        added_micro.push(dm);
        writeln!(out, "| {} | {am:.0} | {dm:.0} | {rm:.2}x | {ax:.0} | {dx:.0} | {rx:.2}x |", mode.label())?;
    }
    let share = added_micro[3] / added_micro[1].max(1.0);
    // The same share taken in each round (leaktrace and the floor measured
    // seconds apart), then the median: steadier than a ratio of medians
    // when the machine's speed drifts between rounds.
    let share_per_round = |mode: Mode| -> Vec<f64> {
        let at = |m: Mode| Mode::ALL.iter().position(|x| *x == m).unwrap();
        (0..rounds)
            .map(|r| {
                let added = |m: Mode| results[at(m)][r].micro - untraced[r].micro;
                added(mode) / added(Mode::Floor).max(1.0)
            })
            .collect()
    };
    let paired = share_per_round(Mode::Leaktrace);
    let per_round: Vec<String> = paired.iter().map(|v| format!("{v:.2}")).collect();
    let traps = share_per_round(Mode::TrapsOnly);
    writeln!(out)?;
    writeln!(out, "leaktrace's added cost per malloc+free pair = {:.3} of the entry floor's (target <= 0.2)", share)?;
    writeln!(
        out,
        "same share, paired in each round: median {:.3} (rounds: {})",
        median(&paired),
        per_round.join(", ")
    )?;
    writeln!(
        out,
        "leaktrace's traps alone (tracking nothing), paired share of the entry floor: median {:.3}",
        median(&traps)
    )?;
    writeln!(out)?;
    writeln!(out, "{daemon}")?;
    Ok(())
}
