//! `cargo xtask bench maps`: what the map tracker costs an insert-heavy Go
//! program, against what a probe on every insert would cost.
//!
//! `fixtures/go/mapbench` fills fresh 10 000-key maps through
//! `runtime.mapassign_fast64` for a fixed time and prints its insert rate.
//! Each round runs it, for each Go build (1.22: classic maps; 1.27: Swiss
//! tables), in four modes one after the other:
//! untraced; traced by `leaktrace attach --track maps`; with a do-nothing
//! tracefs uprobe on `mapassign_fast64` at its symbol (where symbol-probing
//! tools put it: a single-stepped `CMPQ`); and with the same uprobe at the
//! function's `PUSHQ BP` (the cheapest instruction a per-insert probe can
//! use). Each mode is compared with the untraced run of the same round; the
//! median ratio over rounds is reported. The measure is the process's CPU
//! time per insert (see mapbench), not wall time.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::{
    elf_file_offset, first_push_rbp, interrupt, list, log_until_attached, median, paired_ratio, parse_options, symbol_address,
    start_ready, wait_attached, Lines, TracefsUprobes,
};
use crate::build;
use crate::cmd::{announce, fixtures_bin, leaktrace_bin, send_signal, stop_child, target_dir, wait_timeout};

/// Go builds measured: (fixture, label).
const BUILDS: &[(&str, &str)] = &[("mapbench-go122", "Go 1.22 (classic maps)"), ("mapbench-go127", "Go 1.27 (Swiss tables)")];
const MODES: &[&str] = &["untraced", "leaktrace", "uprobe+0", "uprobe@push"];
const SIZE: &str = "10000";

/// A started mapbench that printed `ready`, and its stdout.
struct Bench {
    child: Child,
    out: Lines,
}

fn start_bench(bin: &Path, ms: u64) -> Result<Bench> {
    start_bench_with(bin, ms, &[])
}

fn start_bench_with(bin: &Path, ms: u64, extra: &[&str]) -> Result<Bench> {
    let (child, out) = start_ready(Command::new(bin).args(["-ms", &ms.to_string(), "-size", SIZE]).args(extra), "mapbench")?;
    Ok(Bench { child, out })
}

/// Starts the inserts, waits for the result: CPU ns per insert (the
/// machines that run this are often busy: wall time would measure the
/// queue for a CPU as much as the work).
fn finish_bench(b: Bench) -> Result<f64> {
    finish_bench_counted(b).map(|(ns, _)| ns)
}

/// [`finish_bench`] and the number of inserts.
fn finish_bench_counted(mut b: Bench) -> Result<(f64, u64)> {
    send_signal(b.child.id(), "USR1")?;
    let st = match wait_timeout(&mut b.child, Duration::from_secs(120))? {
        Some(st) => st,
        None => {
            stop_child(&mut b.child, "mapbench");
            bail!("mapbench did not finish within 120s");
        }
    };
    let out = b.out.all(Duration::from_secs(10));
    if !st.success() {
        bail!("mapbench failed ({st}): {out}");
    }
    let field = |name: &str| out.split_whitespace().find_map(|kv| kv.strip_prefix(name).map(str::to_string));
    let ns = field("cpu_ns_per_insert=").ok_or_else(|| anyhow!("mapbench printed no result: {out}"))?;
    let inserts = field("inserts=").and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok((ns.parse().context("bad cpu_ns_per_insert")?, inserts))
}

/// `"map":N` in the `events` of leaktrace's last JSON line.
fn map_events(json: &str) -> u64 {
    let Some(last) = json.lines().rev().find(|l| l.contains("\"final\":true")) else { return 0 };
    let Some(ev) = last.find("\"events\":{").map(|i| &last[i..]) else { return 0 };
    ev.find("\"map\":")
        .map(|i| ev[i + 6..].chars().take_while(char::is_ascii_digit).collect::<String>())
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// leaktrace attached with the map tracker while the inserts run: CPU ns
/// per insert, and growth events per insert (from leaktrace's report).
fn run_traced(root: &Path, bin: &Path, ms: u64, tag: &str, extra: &[&str]) -> Result<(f64, f64)> {
    let b = start_bench_with(bin, ms, extra)?;
    let out_dir = target_dir(root).join("xtask-bench");
    fs::create_dir_all(&out_dir)?;
    let json_path = out_dir.join(format!("maps-{tag}.json"));
    let json = fs::File::create(&json_path)?;
    let mut lt = Command::new(leaktrace_bin(root));
    lt.args(["attach", "--pid", &b.child.id().to_string(), "--track", "maps", "--interval", "1s", "--format", "json"])
        .stdin(Stdio::null())
        .stdout(json)
        .stderr(Stdio::piped());
    announce(&lt);
    let mut tracer = lt.spawn().context("starting leaktrace")?;
    let (rx, logger) = log_until_attached(tracer.stderr.take().unwrap(), out_dir.join(format!("maps-{tag}.log")));
    let mut b = b;
    if wait_attached(&rx, &mut tracer, Duration::from_secs(60)).is_err() {
        stop_child(&mut b.child, "mapbench");
        let _ = tracer.kill();
        let _ = tracer.wait();
        bail!("leaktrace did not attach (see target/xtask-bench/maps-{tag}.log)");
    }
    let result = finish_bench_counted(b);
    interrupt(&mut tracer, "leaktrace", Duration::from_secs(15));
    let _ = logger.join();
    let (ns, inserts) = result?;
    let events = map_events(&fs::read_to_string(&json_path).unwrap_or_default());
    Ok((ns, events as f64 / inserts.max(1) as f64))
}

/// File offset of `sym` in a Go executable, and of the first `push %rbp`
/// in its first instructions (from `nm` and `objdump`).
fn symbol_offsets(bin: &Path, sym: &str) -> Result<(u64, u64)> {
    let path = bin.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    let vaddr = symbol_address(path, sym)?;
    let push = first_push_rbp(path, vaddr, sym)?;
    Ok((elf_file_offset(path, vaddr)?, elf_file_offset(path, push)?))
}

fn run_uprobed(bin: &Path, ms: u64, offset: u64) -> Result<f64> {
    let b = start_bench(bin, ms)?;
    let _probe = TracefsUprobes::install("leaktrace_bench_maps", &[("assign".to_string(), bin, offset)])?;
    finish_bench(b)
}

/// `cargo xtask bench maps [--rounds N] [--ms MS]`.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let [rounds, ms] = parse_options("bench maps", args, [("--rounds", 5), ("--ms", 2000)], &["--rounds", "--ms"])?;
    let rounds = rounds as usize;
    build::run(root)?;
    let mut table = Vec::new();
    for (fixture, label) in BUILDS {
        let bin = fixtures_bin(root).join(fixture);
        let (sym_off, push_off) = symbol_offsets(&bin, "runtime.mapassign_fast64")?;
        // ns per insert, per mode, per round.
        let mut ns: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
        let mut events_per_insert = Vec::new();
        for round in 0..rounds {
            for (i, mode) in MODES.iter().enumerate() {
                let v = match *mode {
                    "untraced" => finish_bench(start_bench(&bin, ms)?)?,
                    "leaktrace" => {
                        let (v, e) = run_traced(root, &bin, ms, &format!("{fixture}-{round}"), &[])?;
                        events_per_insert.push(e);
                        v
                    }
                    "uprobe+0" => run_uprobed(&bin, ms, sym_off)?,
                    _ => run_uprobed(&bin, ms, push_off)?,
                };
                eprintln!("bench maps: {fixture} round {}/{rounds} {mode}: {v:.1} CPU ns/insert", round + 1);
                ns[i].push(v);
            }
        }
        let ratios: Vec<f64> = ns.iter().map(|v| paired_ratio(v, &ns[0])).collect();
        let medians: Vec<f64> = ns.iter().map(|v| median(v)).collect();
        // The same cost from counts, steadier than a ratio of two noisy
        // timings: growth probes per insert x what one emulated trap costs
        // (the PUSHQ BP mode minus untraced), over the untraced cost.
        let epi = median(&events_per_insert);
        let trap_ns = (medians[3] - medians[0]).max(0.0);
        let estimate = 1.0 + epi * trap_ns / medians[0];
        table.push((label, medians, ratios, ns, epi, estimate));
    }

    // Go 1.24+ sync.Map: stores of new keys, untraced and traced (its
    // trie's `expand` is probed: the costly case of the tracker).
    let sync_bin = fixtures_bin(root).join("mapbench-go127");
    let (mut su, mut st, mut se) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let u = finish_bench(start_bench_with(&sync_bin, ms, &["-sync"])?)?;
        let (t, e) = run_traced(root, &sync_bin, ms, &format!("sync-{round}"), &["-sync"])?;
        eprintln!("bench maps: sync.Map round {}/{rounds}: untraced {u:.1}, leaktrace {t:.1} CPU ns/store", round + 1);
        su.push(u);
        st.push(t);
        se.push(e);
    }
    let (su_m, st_m, sr_m, se_m) = (median(&su), median(&st), paired_ratio(&st, &su), median(&se));

    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(out, "mapbench: fresh {SIZE}-key maps filled through runtime.mapassign_fast64 for {ms} ms per run, {rounds} rounds")?;
    writeln!(out, "CPU ns/insert = the process's user+system CPU time (all threads, uprobe handling included) / inserts")?;
    writeln!(out, "ratio = median over rounds of (mode / the untraced run of the same round)")?;
    for (label, medians, ratios, ns, epi, estimate) in &table {
        writeln!(out, "{label}: {:.0} inserts per growth probe hit; estimated leaktrace cost from that count: {estimate:.3}x", 1.0 / epi.max(1e-12))?;
        for (i, mode) in MODES.iter().enumerate() {
            writeln!(out, "  {mode:<12} {:>10.1} CPU ns/insert {:>8.2}x   {}", medians[i], ratios[i], list(&ns[i], 0))?;
        }
    }
    writeln!(out)?;
    writeln!(out, "README:")?;
    writeln!(out, "| mode | {} |", table.iter().map(|(l, ..)| format!("{l}: CPU ns/insert (ratio)")).collect::<Vec<_>>().join(" | "))?;
    writeln!(out, "|---|{}", "---|".repeat(table.len()))?;
    let names = [
        "untraced",
        "leaktrace attach --track maps (probes on growth only, counts read from memory)",
        "a do-nothing uprobe on `mapassign_fast64` at its symbol (a trap per insert, single-stepped `CMPQ`)",
        "the same uprobe at its `PUSHQ BP` (the cheapest per-insert probe: emulated)",
    ];
    for (i, name) in names.iter().enumerate() {
        let cells: Vec<String> = table.iter().map(|(_, m, r, ..)| format!("{:.1} ({:.2}x)", m[i], r[i])).collect();
        writeln!(out, "| {name} | {} |", cells.join(" | "))?;
    }
    let cells: Vec<String> =
        table.iter().map(|(.., epi, est)| format!("1 per {:.0} inserts ({est:.3}x)", 1.0 / epi.max(1e-12))).collect();
    writeln!(out, "| growth probe hits under leaktrace (estimated cost: hits x one trap) | {} |", cells.join(" | "))?;
    writeln!(out)?;
    writeln!(out, "| Go 1.27 `sync.Map`, stores of new keys | CPU ns/store | ratio |")?;
    writeln!(out, "|---|---|---|")?;
    writeln!(out, "| untraced | {su_m:.1} | 1.00x |")?;
    writeln!(
        out,
        "| leaktrace attach --track maps, while the trie's `expand` is probed (1 hit per {:.1} stores; the probe is on for leaktrace's first 3 intervals, then 1 in 20: this run is inside the first ones) | {st_m:.1} | {sr_m:.2}x |",
        1.0 / se_m.max(1e-12)
    )?;
    Ok(())
}
