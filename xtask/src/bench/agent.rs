//! `cargo xtask bench agent`: what `leaktrace agent` costs while it watches
//! 50 idle processes and 2 churny ones (a connection churner and a thread
//! churner, the `--no-leak` look-alikes) for 60 s with the default
//! trackers: its CPU (from its own `leaktrace_agent_cpu_seconds_total`,
//! cross-checked with /proc), its RSS, and the kernel memory of the BPF
//! maps it holds (`memlock` of its map descriptors). Setup (the per-target
//! loads) is reported apart from the steady window. The agent runs with its
//! budget (`--max-cpu`, default 1 % as the agent's; `--max-cpu 1000` for
//! the cost of tracing every target): how many targets it traced, shed,
//! could not load or skipped is printed beside the cost.
//!
//! Options: `--idle N` (50), `--seconds S` (60), `--max-cpu PERCENT` (1).

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::parse_options;
use crate::build;
use crate::cmd::{announce, fixtures_bin, leaktrace_bin, stop_child, target_dir};

/// `GET /metrics` of the agent (plain HTTP/1.1).
fn scrape(addr: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The value of the first sample line starting with `name`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// utime + stime of `pid` in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // USER_HZ: clock ticks of /proc are 1/100 s on every Linux ABI.
    (field(14) + field(15)) as f64 / 100.0
}

/// Bytes of kernel memory charged to the BPF maps `pid` holds open.
fn bpf_map_bytes(pid: u32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return 0 };
    dir.flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter(|info| info.contains("map_type:"))
        .filter_map(|info| info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse::<u64>().ok()))
        .sum()
}

fn rss_bytes(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0) * 1024
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let [idle, seconds, max_cpu] =
        parse_options("bench agent", args, [("--idle", 50), ("--seconds", 60), ("--max-cpu", 1)], &["--idle", "--seconds", "--max-cpu"])?;
    build::run(root)?;
    let dir = target_dir(root).join("xtask-bench").join("agent");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    // Copies under names of their own, so that only these match.
    fs::copy("/usr/bin/sleep", dir.join("lt_idle")).context("copy /usr/bin/sleep")?;
    fs::copy(fixtures_bin(root).join("conn_leak"), dir.join("lt_churn_conn"))?;
    fs::copy(fixtures_bin(root).join("thread_leak"), dir.join("lt_churn_thr"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let log = fs::File::create(dir.join("agent.log"))?;
    let mut agent_cmd = Command::new(leaktrace_bin(root));
    agent_cmd
        // More than the kernel lets per-target loads attach (64 programs
        // per tracepoint): the bench reports how many were traced.
        .args(["agent", "--listen", &addr, "--max-targets", "64", "--match", "comm=lt_idle"])
        .arg(format!("--max-cpu={max_cpu}"))
        .arg(format!("--match=exe={}/lt_churn_*", dir.display()))
        .stdout(Stdio::null())
        .stderr(log);
    announce(&agent_cmd);
    let mut agent = agent_cmd.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while scrape(&addr).is_err() {
        if Instant::now() > deadline {
            stop_child(&mut agent, "leaktrace agent");
            bail!("the agent never served /metrics (see {})", dir.join("agent.log").display());
        }
        thread::sleep(Duration::from_millis(100));
    }
    let setup_started = Instant::now();
    let cpu_before_setup = cpu_seconds(agent.id());
    let mut children: Vec<Child> = Vec::new();
    // The churny ones first: with one load per target, the last ~20 hit the
    // kernel's 64 programs per tracepoint and are refused.
    for (bin, args) in [("lt_churn_conn", vec!["--no-leak"]), ("lt_churn_thr", vec!["--no-leak"])] {
        children.push(Command::new(dir.join(bin)).args(args).stdout(Stdio::null()).spawn()?);
    }
    thread::sleep(Duration::from_secs(2));
    for _ in 0..idle {
        children.push(Command::new(dir.join("lt_idle")).arg("100000").stdout(Stdio::null()).spawn()?);
    }
    let want = idle as usize + 2;
    // Until every process is accounted for: traced, shed, refused or skipped.
    let accounted = |text: &str| -> usize {
        let n = |name: &str| sample(text, name).unwrap_or(0.0) as usize;
        ["traced", "shed", "refused"].iter().map(|s| n(&format!("leaktrace_agent_targets{{state=\"{s}\"}}"))).sum::<usize>()
            + ["max_targets", "over_budget", "exited_early"].iter().map(|r| n(&format!("leaktrace_agent_targets_skipped_total{{reason=\"{r}\"}}"))).sum::<usize>()
    };
    loop {
        let text = scrape(&addr).unwrap_or_default();
        if accounted(&text) >= want || setup_started.elapsed() > Duration::from_secs(300) {
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    // Let the last loads finish their first intervals.
    thread::sleep(Duration::from_secs(10));
    let setup_s = setup_started.elapsed().as_secs_f64();
    let setup_cpu = cpu_seconds(agent.id()) - cpu_before_setup;
    let after_setup = scrape(&addr)?;
    // Over budget the agent sheds, a step per 30 s window: measure once no
    // step came for 35 s (at most 4 minutes).
    let shed_total = |text: &str| sample(text, "leaktrace_agent_shed_targets_total").unwrap_or(0.0);
    let (mut last, mut since) = (shed_total(&after_setup), Instant::now());
    let settle_started = Instant::now();
    while since.elapsed() < Duration::from_secs(35) && settle_started.elapsed() < Duration::from_secs(240) {
        thread::sleep(Duration::from_secs(1));
        let now = shed_total(&scrape(&addr).unwrap_or_default());
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    let settle_s = settle_started.elapsed().as_secs_f64();
    let before = scrape(&addr)?;
    let states = |text: &str| -> String {
        let n = |name: &str| sample(text, name).unwrap_or(0.0);
        format!(
            "traced {}, shed {}, refused {}, skipped over budget {}, skipped at --max-targets {}",
            n("leaktrace_agent_targets{state=\"traced\"}"),
            n("leaktrace_agent_targets{state=\"shed\"}"),
            n("leaktrace_agent_targets{state=\"refused\"}"),
            n("leaktrace_agent_targets_skipped_total{reason=\"over_budget\"}"),
            n("leaktrace_agent_targets_skipped_total{reason=\"max_targets\"}"),
        )
    };
    let cpu0 = sample(&before, "leaktrace_agent_cpu_seconds_total").unwrap_or(0.0);
    let proc0 = cpu_seconds(agent.id());
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(seconds));
    let after = scrape(&addr)?;
    let window = t0.elapsed().as_secs_f64();
    let pickup = sample(&after, "leaktrace_agent_pickup_cpu_seconds_total").unwrap_or(0.0);
    let traced_after = sample(&after, "leaktrace_agent_targets{state=\"traced\"}").unwrap_or(0.0) as usize;
    let cpu1 = sample(&after, "leaktrace_agent_cpu_seconds_total").unwrap_or(0.0);
    let proc1 = cpu_seconds(agent.id());
    let rss = sample(&after, "leaktrace_agent_resident_bytes").unwrap_or(0.0);
    let maps = bpf_map_bytes(agent.id());
    let proc_rss = rss_bytes(agent.id());
    for c in &mut children {
        stop_child(c, "bench process");
    }
    stop_child(&mut agent, "leaktrace agent");
    let mib = |b: f64| b / (1 << 20) as f64;
    println!("agent bench: {idle} idle + 2 churny processes, default trackers, --interval 5s, --max-cpu {max_cpu}");
    println!("  after setup: {}", states(&after_setup));
    println!("  after shedding settled ({settle_s:.0} s later): {}", states(&before));
    println!("  at the end:  {}", states(&after));
    println!("  setup (loads and first intervals): {setup_s:.1} s wall, {setup_cpu:.2} s CPU; picking targets up: {pickup:.2} s CPU in all");
    println!(
        "  steady {window:.0} s: CPU {:.2} s = {:.2} % of one core (metric), {:.2} % by /proc",
        cpu1 - cpu0,
        100.0 * (cpu1 - cpu0) / window,
        100.0 * (proc1 - proc0) / window
    );
    let per_after = traced_after.max(1) as f64;
    println!("  RSS {:.1} MiB (metric), {:.1} MiB (/proc)", mib(rss), mib(proc_rss as f64));
    println!("  BPF maps held at the end: {:.0} MiB of kernel memory ({:.1} MiB per traced target)", mib(maps as f64), mib(maps as f64) / per_after);
    Ok(())
}
