//! `/metrics` end to end with a real Prometheus server (Debian's
//! `prometheus` package, installed by `cargo xtask setup`; needs root for
//! leaktrace).
//!
//! Two `conn_leak` fixtures run side by side: one leaks a connection every
//! 50 ms from `bad_handler` through `dial_cache`, the other (`--no-leak`) only
//! has its steady pool (also opened through `dial_cache`) and dial-then-close
//! churn. Each is traced by its own `leaktrace attach --listen 127.0.0.1:0`,
//! and one Prometheus scrapes both every second as two targets of one job.
//! The test then asks Prometheus's HTTP API what it stored: the leaking
//! site's series rises and carries verdict="leak"; the look-alike's, told
//! apart by the `pid` label, stays flat and never does.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::Duration,
};

use common::{prom::*, *};

/// Seconds of scraping the assertions look at (after both targets are up).
const WINDOW: Duration = Duration::from_secs(15);

/// A running `leaktrace attach --listen 127.0.0.1:0` and the address it bound.
struct Tracer {
    proc: Proc,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

/// Starts `leaktrace attach` on `pid` and waits (bounded) for the line that
/// names the metrics address. Its stderr keeps being collected for messages.
fn start_tracer(pid: u32) -> Tracer {
    let pid = pid.to_string();
    let mut child = Command::new(leaktrace())
        .args(["attach", "--pid", &pid, "--interval", "1s", "--listen", "127.0.0.1:0", "--for", "40s"])
        .args(["--format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start leaktrace");
    let stderr = child.stderr.take().unwrap();
    let proc = Proc { name: "leaktrace", child };
    let collected = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    {
        let collected = collected.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("serving metrics at http://").nth(1) {
                    let _ = tx.send(rest.trim_end_matches("/metrics").to_string());
                }
                let mut c = collected.lock().unwrap();
                c.push_str(&line);
                c.push('\n');
            }
        });
    }
    let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
        panic!(
            "leaktrace --pid {pid} never said where it serves metrics; stderr:\n{}",
            collected.lock().unwrap()
        )
    });
    Tracer { proc, addr, stderr: collected }
}

/// `(value at the first point, value at the middle point, value at the last point)`.
fn first_mid_last(points: &[(f64, f64)]) -> (f64, f64, f64) {
    (points[0].1, points[points.len() / 2].1, points[points.len() - 1].1)
}

#[test]
fn prometheus_scrapes_a_rising_leak_and_a_flat_lookalike() {
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is missing: this test needs Debian's `prometheus` package; \
         `cargo xtask setup` installs it (or: apt-get install -y prometheus)"
    );
    // Dropped in reverse order: Prometheus, then the tracers, then the fixtures.
    let leaky = start("conn_leak", &[]);
    let clean = start("conn_leak", &["--no-leak"]);
    let (leak_pid, clean_pid) = (leaky.pid().to_string(), clean.pid().to_string());
    let mut leak_tracer = start_tracer(leaky.pid());
    let mut clean_tracer = start_tracer(clean.pid());
    let dir = TempDir::new("prometheus");
    let addrs = [leak_tracer.addr.as_str(), clean_tracer.addr.as_str()];
    let mut prom = start_prometheus(&dir.0, &addrs);
    wait_for_scrapes(&mut prom, &addrs);

    let start_t = now_unix();
    thread::sleep(WINDOW);
    let end_t = now_unix();
    // Both tracers must have served for the whole window.
    for (t, name) in [(&mut leak_tracer, "leak"), (&mut clean_tracer, "no-leak")] {
        let stderr = t.stderr.clone();
        t.proc.assert_running(&|| format!("(tracing the {name} fixture) stderr:\n{}", stderr.lock().unwrap()));
    }
    let ctx = |pid: &str| {
        let all = prom.query(&format!("{{pid=\"{pid}\",site=\"dial_cache\"}}"));
        format!("\nseries of pid {pid} at dial_cache now: {all:?}")
    };

    // ---- The leaking process: its site rises and is judged a leak.
    let live_q = |pid: &str| {
        format!("sum without (verdict) (leaktrace_live_objects{{kind=\"connection\",site=\"dial_cache\",pid=\"{pid}\"}})")
    };
    let leak_live = prom.query_range(&live_q(&leak_pid), start_t, end_t);
    assert_eq!(leak_live.len(), 1, "one live series for the leaking site expected: {leak_live:?}{}", ctx(&leak_pid));
    let points = &leak_live[0].1;
    eprintln!("leaking site, live objects per second of the window: {:?}", points.iter().map(|p| p.1).collect::<Vec<_>>());
    assert!(points.len() >= 10, "too few points in {WINDOW:?} of 1 s scrapes: {points:?}");
    let (first, mid, last) = first_mid_last(points);
    // 20 leaked connections a second: about 300 over the window.
    assert!(
        mid > first + 30.0 && last > mid + 30.0 && last - first >= 100.0,
        "the leaking site's live objects do not rise over the window: first {first}, mid {mid}, last {last}: {points:?}"
    );
    let leak_now = prom.query(&format!(
        "leaktrace_live_objects{{kind=\"connection\",site=\"dial_cache\",pid=\"{leak_pid}\",verdict=\"leak\"}}"
    ));
    assert_eq!(leak_now.len(), 1, "no verdict=\"leak\" series for the leaking site{}", ctx(&leak_pid));
    assert!(value(&leak_now[0]["value"]) >= last - 50.0, "{leak_now:?} vs last {last}");
    let growth = prom.query_one(&format!(
        "sum without (verdict) (leaktrace_growth_per_minute{{kind=\"connection\",site=\"dial_cache\",pid=\"{leak_pid}\"}})"
    ));
    assert!(growth > 300.0, "growth of the leaking site too small: {growth}/min{}", ctx(&leak_pid));
    let leak_findings = prom.query_one(&format!(
        "max_over_time(leaktrace_findings{{kind=\"connection\",verdict=\"leak\",pid=\"{leak_pid}\"}}[1m])"
    ));
    assert!(leak_findings >= 1.0, "leaktrace_findings never counted the leak{}", ctx(&leak_pid));
    let events = prom.query_one(&format!("increase(leaktrace_events_total{{kind=\"connection\",pid=\"{leak_pid}\"}}[10s])"));
    assert!(events > 0.0, "events counter does not move");
    // attach names its target too: the join the dashboard's selector uses.
    let named = prom.query(&format!(
        "leaktrace_findings{{kind=\"connection\",verdict=\"leak\",pid=\"{leak_pid}\"}} * on (pid) group_left (comm, build_id) leaktrace_target_info"
    ));
    assert_eq!(named.len(), 1, "no leaktrace_target_info to join for pid {leak_pid}: {named:?}");
    assert_eq!(named[0]["metric"]["comm"], "conn_leak", "{named:?}");
    assert_ne!(named[0]["metric"]["build_id"], "", "{named:?}");

    // ---- The look-alike: the same site (its pool), flat, never a leak.
    let clean_live = prom.query_range(&live_q(&clean_pid), start_t, end_t);
    assert_eq!(clean_live.len(), 1, "one live series for the look-alike expected: {clean_live:?}{}", ctx(&clean_pid));
    let points = &clean_live[0].1;
    eprintln!("look-alike, live objects per second of the window: {:?}", points.iter().map(|p| p.1).collect::<Vec<_>>());
    assert!(points.len() >= 10, "too few points: {points:?}");
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let max = values.iter().cloned().fold(f64::MIN, f64::max);
    // The pool may open (0 -> 4) early in the window; after that it is 4 plus 0..2 churn.
    let later_min = values[values.len() / 2..].iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        max <= 8.0 && max - later_min <= 3.0,
        "the look-alike's live objects are not flat (a pool of 4 plus churn): {points:?}"
    );
    let (first, _, last) = first_mid_last(points);
    assert!(last - first <= 5.0, "the look-alike rises: first {first}, last {last}");
    let range = format!("{}s", (end_t - start_t + 30.0).ceil() as u64);
    for family in ["leaktrace_live_objects", "leaktrace_growth_per_minute"] {
        let leaks = prom.query(&format!("count_over_time({family}{{pid=\"{clean_pid}\",verdict=\"leak\"}}[{range}])"));
        assert!(leaks.is_empty(), "the look-alike carried verdict=\"leak\" on {family}: {leaks:?}");
    }
    let clean_findings =
        // Summed over kinds: with connections and tasks tracked, each kind has its series.
        prom.query_one(&format!("sum(max_over_time(leaktrace_findings{{verdict=\"leak\",pid=\"{clean_pid}\"}}[{range}]))"));
    assert_eq!(clean_findings, 0.0, "the look-alike had a leak finding");
}
