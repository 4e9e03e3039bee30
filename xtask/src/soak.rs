//! `cargo xtask soak [--minutes N]`: leaktrace traces two long-running
//! fixtures for N minutes while a real Prometheus scrapes both `/metrics`
//! endpoints every second; leaktrace's RSS and CPU are sampled, and each
//! tracer is judged by the slope of its RSS over the second half of the run
//! (flat within the noise of the samples), not by a fixed RSS threshold.
//!
//! - api-server (Go, the demo program) under the default trackers, leaking
//!   one connection a second (`-profile-ms 1000`: an hour makes 3 600);
//! - alloc_leak (C) under `--track allocations,locks`, leaking one record a
//!   second next to its malloc/free churn thread.
//!
//! Samples go to target/soak/samples.csv, the tracers' logs and reports to
//! target/soak/.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::bench::{interrupt, parse_options, start_ready, Lines};
use crate::build;
use crate::cmd::{announce, cpu_seconds, exit_code, fixtures_bin, is_root, leaktrace_bin, status_kib, stop_child, target_dir};

/// How often leaktrace's RSS and CPU are read.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The smallest RSS change the gate calls growth: 64 pages. Below it the
/// allocator's arena and page-cache moves dominate any real trend.
const RSS_FLOOR_KIB: f64 = 256.0;

/// One traced fixture: its name, program, arguments, leaktrace's arguments.
struct Soaked {
    name: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    track: &'static str,
}

const SOAKED: &[Soaked] = &[
    Soaked { name: "api-server", program: "api-server", args: &["-profile-ms", "1000"], track: "connections,tasks" },
    Soaked { name: "alloc_leak", program: "alloc_leak", args: &["--leak-ms", "1000"], track: "allocations,locks" },
];

/// A running fixture and the leaktrace attached to it.
struct Run {
    soaked: &'static Soaked,
    target: Child,
    _target_out: Lines,
    tracer: Child,
    port: u16,
    samples: Vec<(f64, u64, f64)>,
}

/// A free loopback port (bound and released; the race with another
/// program taking it in between is accepted).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A GET on 127.0.0.1:`port` (HTTP/1.0, no keep-alive): the body.
fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header end"))?;
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1).is_none_or(|c| c != "200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// `query` evaluated by Prometheus: (instance label, value) per series.
fn prom_query(port: u16, query: &str) -> Result<Vec<(String, f64)>> {
    let enc: String = query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http_get(port, &format!("/api/v1/query?query={enc}"))?;
    // The result is a list of {"metric":{...,"instance":"X",...},"value":[t,"V"]}:
    // small enough to read by hand (xtask has no JSON dependency).
    let mut out = Vec::new();
    for series in body.split("{\"metric\":").skip(1) {
        let instance = series
            .split("\"instance\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string();
        let value = series
            .split("\"value\":[")
            .nth(1)
            .and_then(|r| r.split('"').nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no value in Prometheus answer to `{query}`: {body}"))?;
        out.push((instance, value));
    }
    Ok(out)
}

/// Least-squares line through (x, y): (slope, standard deviation of the
/// residuals).
pub fn fit_line(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    if points.len() < 3 {
        return (0.0, 0.0);
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let resid: f64 = points.iter().map(|p| (p.1 - my - slope * (p.0 - mx)).powi(2)).sum();
    (slope, (resid / (n - 2.0)).sqrt())
}

/// The gate: the RSS growth the fitted line predicts over the second half
/// must stay within the noise of the samples (three residual standard
/// deviations, at least [`RSS_FLOOR_KIB`]). Returns (slope KiB/min, growth
/// over the half KiB, allowed KiB, pass).
pub fn judge_rss(samples: &[(f64, u64)]) -> (f64, f64, f64, bool) {
    let Some(end) = samples.last().map(|s| s.0) else { return (0.0, 0.0, 0.0, false) };
    let half: Vec<(f64, f64)> = samples.iter().filter(|s| s.0 >= end / 2.0).map(|s| (s.0 / 60.0, s.1 as f64)).collect();
    let span_min = half.last().map(|p| p.0).unwrap_or(0.0) - half.first().map(|p| p.0).unwrap_or(0.0);
    let (slope, sigma) = fit_line(&half);
    let growth = slope * span_min;
    let allowed = (3.0 * sigma).max(RSS_FLOOR_KIB);
    (slope, growth, allowed, half.len() >= 3 && growth <= allowed)
}

fn start(root: &Path, out: &Path, soaked: &'static Soaked) -> Result<Run> {
    let (mut target, target_out) =
        start_ready(Command::new(fixtures_bin(root).join(soaked.program)).args(soaked.args), soaked.name)?;
    let port = free_port()?;
    let mut cmd = Command::new(leaktrace_bin(root));
    cmd.args(["attach", "--pid", &target.id().to_string(), "--track", soaked.track])
        .args(["--interval", "10s", "--format", "json", "--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(fs::File::create(out.join(format!("{}.jsonl", soaked.name)))?)
        .stderr(fs::File::create(out.join(format!("{}.log", soaked.name)))?);
    announce(&cmd);
    let mut tracer = match cmd.spawn() {
        Ok(t) => t,
        Err(e) => {
            stop_child(&mut target, soaked.name);
            return Err(e).context("starting leaktrace");
        }
    };
    // Attached once /metrics answers.
    let t0 = Instant::now();
    while http_get(port, "/metrics").is_err() {
        if let Ok(Some(st)) = tracer.try_wait() {
            stop_child(&mut target, soaked.name);
            bail!("leaktrace on {} exited at start ({st}); see {}/{}.log", soaked.name, out.display(), soaked.name);
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = tracer.kill();
            stop_child(&mut target, soaked.name);
            bail!("leaktrace on {} did not serve /metrics within 120 s", soaked.name);
        }
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("soak: leaktrace (pid {}) attached to {} (pid {}), /metrics on port {port}", tracer.id(), soaked.name, target.id());
    Ok(Run { soaked, target, _target_out: target_out, tracer, port, samples: Vec::new() })
}

fn prometheus_config(ports: &[u16]) -> String {
    let targets = ports.iter().map(|p| format!("'127.0.0.1:{p}'")).collect::<Vec<_>>().join(", ");
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: leaktrace\n    static_configs:\n      - targets: [{targets}]\n"
    )
}

/// `cargo xtask soak [--minutes N]`.
pub fn run(root: &Path, args: &[String]) -> Result<i32> {
    let [minutes] = parse_options("soak", args, [("--minutes", 60)], &["--minutes"])?;
    build::run(root)?;
    if !is_root() {
        bail!("soak: must run as root (leaktrace loads eBPF programs)");
    }
    let out = target_dir(root).join("soak");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;

    let mut runs = Vec::new();
    for s in SOAKED {
        match start(root, &out, s) {
            Ok(r) => runs.push(r),
            Err(e) => {
                for r in &mut runs {
                    interrupt(&mut r.tracer, "leaktrace", Duration::from_secs(20));
                    stop_child(&mut r.target, r.soaked.name);
                }
                return Err(e);
            }
        }
    }
    let prom_port = free_port()?;
    let prom_dir: PathBuf = out.join("prometheus");
    fs::create_dir_all(&prom_dir)?;
    let config = prom_dir.join("prometheus.yml");
    fs::write(&config, prometheus_config(&runs.iter().map(|r| r.port).collect::<Vec<_>>()))?;
    let mut prom_cmd = Command::new("prometheus");
    prom_cmd
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", prom_dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(out.join("prometheus.log"))?);
    announce(&prom_cmd);
    let mut prometheus = prom_cmd.spawn().context("starting prometheus (cargo xtask setup installs it)")?;

    let total = Duration::from_secs(minutes * 60);
    let mut csv = fs::File::create(out.join("samples.csv"))?;
    writeln!(csv, "fixture,seconds,rss_kib,cpu_seconds")?;
    let started = Instant::now();
    let cpu0: Vec<f64> = runs.iter().map(|r| cpu_seconds(r.tracer.id()).unwrap_or(0.0)).collect();
    let mut next_note = Duration::from_secs(60);
    let mut failure = None;
    'soak: while started.elapsed() < total {
        thread::sleep(SAMPLE_EVERY);
        let t = started.elapsed();
        for r in &mut runs {
            if let Ok(Some(st)) = r.tracer.try_wait() {
                failure = Some(format!("leaktrace on {} exited after {:.0} s: {st}", r.soaked.name, t.as_secs_f64()));
                break 'soak;
            }
            if let Ok(Some(st)) = r.target.try_wait() {
                failure = Some(format!("{} exited after {:.0} s: {st}", r.soaked.name, t.as_secs_f64()));
                break 'soak;
            }
            let pid = r.tracer.id();
            if let (Some(rss), Some(cpu)) = (status_kib(pid, "VmRSS:"), cpu_seconds(pid)) {
                writeln!(csv, "{},{:.1},{rss},{cpu:.2}", r.soaked.name, t.as_secs_f64())?;
                r.samples.push((t.as_secs_f64(), rss, cpu));
            }
        }
        if t >= next_note {
            next_note += Duration::from_secs(60);
            let now: Vec<String> = runs
                .iter()
                .map(|r| format!("{} RSS {} KiB", r.soaked.name, r.samples.last().map(|s| s.1).unwrap_or(0)))
                .collect();
            eprintln!("soak: {:.0}/{minutes} min: {}", t.as_secs_f64() / 60.0, now.join(", "));
        }
    }
    let wall = started.elapsed().as_secs_f64();

    // Scrapes as Prometheus saw them, before it stops.
    let range = format!("{}s", wall.ceil() as u64 + 5);
    let scrapes = prom_query(prom_port, &format!("count_over_time(up[{range}])")).unwrap_or_default();
    let scrapes_up = prom_query(prom_port, &format!("sum_over_time(up[{range}])")).unwrap_or_default();
    let scrape_max = prom_query(prom_port, &format!("max_over_time(scrape_duration_seconds[{range}])")).unwrap_or_default();
    let samples_max = prom_query(prom_port, &format!("max_over_time(scrape_samples_scraped[{range}])")).unwrap_or_default();
    stop_child(&mut prometheus, "prometheus");

    let mut lines = Vec::new();
    let mut passed = failure.is_none();
    for (r, c0) in runs.iter_mut().zip(cpu0) {
        let status = interrupt(&mut r.tracer, "leaktrace", Duration::from_secs(30));
        stop_child(&mut r.target, r.soaked.name);
        let inst = format!("127.0.0.1:{}", r.port);
        let find = |v: &[(String, f64)]| v.iter().find(|(i, _)| *i == inst).map(|x| x.1).unwrap_or(0.0);
        let rss: Vec<(f64, u64)> = r.samples.iter().map(|s| (s.0, s.1)).collect();
        let (slope, growth, allowed, flat) = judge_rss(&rss);
        let cpu = r.samples.last().map(|s| s.2).unwrap_or(c0) - c0;
        let first = r.samples.first().map(|s| s.1).unwrap_or(0);
        let last = r.samples.last().map(|s| s.1).unwrap_or(0);
        let peak = r.samples.iter().map(|s| s.1).max().unwrap_or(0);
        let clean_exit = status.map(exit_code) == Some(0);
        let (n, up) = (find(&scrapes), find(&scrapes_up));
        // A scrape that misses the 1 s timeout on a loaded machine is
        // noise; more than 1 in 200 is not.
        let scrapes_ok = n > 0.0 && up >= 0.995 * n;
        passed &= flat && clean_exit && scrapes_ok;
        lines.push(format!(
            "| {} (`--track {}`) | {:.0} min | {} → {} KiB (peak {}) | {:+.1} KiB/min; {:+.0} KiB over the half, noise allows {:.0} | {:.2}% of a core | {:.0}/{:.0} up, slowest {:.0} ms, ≤ {:.0} series | {} |",
            r.soaked.name,
            r.soaked.track,
            wall / 60.0,
            first,
            last,
            peak,
            slope,
            growth,
            allowed,
            100.0 * cpu / wall.max(1.0),
            up,
            n,
            1000.0 * find(&scrape_max),
            find(&samples_max),
            if flat && clean_exit && scrapes_ok {
                "PASS".to_string()
            } else {
                format!(
                    "FAIL{}{}{}",
                    if flat { "" } else { " (RSS grows)" },
                    if clean_exit { "" } else { " (leaktrace did not exit 0 on SIGINT)" },
                    if scrapes_ok { "" } else { " (scrapes failed)" }
                )
            }
        ));
    }
    println!("\nsoak: {minutes} min requested, {:.1} min run; samples in {}", wall / 60.0, out.join("samples.csv").display());
    println!("| fixture | run | leaktrace RSS first → last | RSS slope, second half | leaktrace CPU | Prometheus scrapes (1 s) | verdict |");
    println!("|---|---|---|---|---|---|---|");
    for l in &lines {
        println!("{l}");
    }
    if let Some(f) = &failure {
        println!("soak: FAIL: {f}");
    }
    Ok(if passed { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_noisy_rss_passes_and_a_slow_climb_fails() {
        // 60 min, a sample every 5 s: noise of ±300 KiB around 20 MiB.
        let noisy: Vec<(f64, u64)> =
            (0..720).map(|i| (i as f64 * 5.0, 20_480 + if i % 2 == 0 { 300 } else { 0 })).collect();
        assert!(judge_rss(&noisy).3);
        // 20 KiB a minute: 600 KiB over the second half, with no noise.
        let climbing: Vec<(f64, u64)> = (0..720).map(|i| (i as f64 * 5.0, 20_480 + (i as u64 * 5 * 20) / 60)).collect();
        let (slope, growth, _, pass) = judge_rss(&climbing);
        assert!((slope - 20.0).abs() < 1.0, "{slope}");
        assert!(growth > 500.0 && !pass);
        // Growth in the first half only (start-up) is not judged.
        let settles: Vec<(f64, u64)> = (0..720).map(|i| (i as f64 * 5.0, 10_000 + 10 * (i.min(300) as u64))).collect();
        assert!(judge_rss(&settles).3);
    }

    #[test]
    fn prometheus_config_lists_every_target() {
        let c = prometheus_config(&[9001, 9002]);
        assert!(c.contains("scrape_interval: 1s"));
        assert!(c.contains("targets: ['127.0.0.1:9001', '127.0.0.1:9002']"));
    }
}
