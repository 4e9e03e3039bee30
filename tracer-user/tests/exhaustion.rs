//! Time to exhaustion against a cgroup limit, end to end: the real
//! `leaktrace` against `thread_leak` (fixtures/c/thread_leak.c, a detached
//! thread leaked every 50 ms) moved into a cgroup of its own whose
//! `pids.max` the test sets (needs root; the cgroup is removed at the end).
//! (The fd limit's test is in fds.rs.)

mod common;

use std::{fs, path::PathBuf, time::Instant};

use common::*;

/// A child cgroup of one controller's hierarchy (v2 when its root has the
/// controller, else that controller's v1 hierarchy), removed on drop.
struct TestCgroup {
    dir: PathBuf,
    v2: bool,
}

impl TestCgroup {
    fn create(controller: &str) -> Self {
        let root = PathBuf::from("/sys/fs/cgroup");
        let v2 = fs::read_to_string(root.join("cgroup.controllers")).is_ok_and(|c| c.split_whitespace().any(|x| x == controller));
        let root = if v2 {
            let _ = fs::write(root.join("cgroup.subtree_control"), format!("+{controller}"));
            root
        } else {
            root.join(controller)
        };
        let dir = root.join(format!("leaktrace-test-{controller}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TestCgroup { dir, v2 }
    }

    fn add(&self, pid: u32) {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    fn set(&self, file: &str, value: u64) {
        fs::write(self.dir.join(file), value.to_string()).unwrap();
    }

    fn read(&self, file: &str) -> u64 {
        fs::read_to_string(self.dir.join(file)).unwrap().trim().parse().unwrap()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its tasks must be gone first: move any left back to the root.
        let root = self.dir.parent().unwrap().join("cgroup.procs");
        for pid in fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default().lines() {
            let _ = fs::write(&root, pid);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

#[test]
fn thread_leak_runs_out_of_the_cgroup_pids_max() {
    const MAX: u64 = 1000;
    let cg = TestCgroup::create("pids");
    cg.set("pids.max", MAX);
    let t = start("thread_leak", &[]);
    cg.add(t.pid());
    let (before, t0) = (cg.read("pids.current"), Instant::now());
    let run = run_leaktrace(&[
        "check", "--pid", &t.pid().to_string(), "--for", "8s", "--interval", "1s", "--json", "--track", "threads",
        "--fail-within", "10m",
    ]);
    let (after, secs) = (cg.read("pids.current"), t0.elapsed().as_secs_f64());
    drop(t);
    assert_eq!(run.status, 3, "stderr:\n{}", run.stderr);
    let report = run.final_report();
    let e = &report["exhaustion"];
    assert_eq!(e["resource"], "threads", "{e}:{}", summarize(&report));
    assert!(e["limit_source"].as_str().unwrap().ends_with("/pids.max"), "{e}");
    assert_eq!(e["limit"], MAX, "{e}");
    // The leak goes through the same helper as the pool (see thread_leak.c).
    assert_eq!(e["site"], "spawn_detached", "{e}");
    let rate = (after - before) as f64 / secs;
    // Read at the final report, before leaktrace detached and the test read the cgroup.
    let in_use = e["in_use"].as_u64().unwrap();
    assert!(in_use <= after && in_use > before, "in use {in_use}: pids.current was {before} before, {after} after");
    let expected = (MAX - in_use) as f64 / rate;
    let eta = e["seconds"].as_f64().unwrap();
    assert!((eta - expected).abs() <= 0.3 * expected, "ETA {eta} s, expected {expected:.0} s ({rate:.1} threads/s)");
    let leak = findings_with(&report, "start_watcher");
    assert_eq!(leak[0]["exhausts"]["resource"], "threads", "{}", summarize(&report));
}

#[test]
fn heap_leak_runs_out_of_the_cgroup_memory_limit() {
    let cg = TestCgroup::create("memory");
    let (limit_file, usage_file) = if cg.v2 { ("memory.max", "memory.current") } else { ("memory.limit_in_bytes", "memory.usage_in_bytes") };
    let t = start("alloc_leak", &[]);
    cg.add(t.pid());
    // A limit a little above what the fixture uses now.
    let limit = cg.read(usage_file) + (64 << 20);
    cg.set(limit_file, limit);
    let run = run_leaktrace(&[
        "attach", "--pid", &t.pid().to_string(), "--for", "8s", "--interval", "1s", "--json", "--track", "allocations",
    ]);
    drop(t);
    assert_eq!(run.status, 0, "stderr:\n{}", run.stderr);
    let report = run.final_report();
    let leak = findings_with(&report, "handle_request");
    let leak = leak.iter().find(|f| f["verdict"] == "leak").unwrap_or_else(|| panic!("no leak:{}", summarize(&report)));
    let e = &leak["exhausts"];
    assert_eq!(e["resource"], "memory", "{e}");
    assert!(e["limit_source"].as_str().unwrap().ends_with(limit_file), "{e}");
    assert_eq!(e["limit"], limit, "{e}");
    // RSS, below the limit; the site's bytes slope gives the time left.
    let (in_use, secs) = (e["in_use"].as_u64().unwrap(), e["seconds"].as_f64().unwrap());
    assert!(in_use > 0 && in_use < limit, "{e}");
    let per_s = leak["growth_bytes_per_min"].as_f64().unwrap() / 60.0;
    let expected = (limit - in_use) as f64 / per_s;
    assert!((secs - expected).abs() <= 0.01 * expected + 1.0, "{secs} vs {expected}: {e}");
}

/// Connections leaked to one peer use up ephemeral ports toward it: the
/// limit read for that peer while the fixture runs. (Which limit comes
/// first depends on the machine's fd limit: with RLIMIT_NOFILE above the
/// port range, ports; the ordering itself is unit-tested.)
#[test]
fn connection_leak_uses_up_ports_to_its_peer() {
    let t = start("conn_leak", &[]);
    let run = run_leaktrace(&[
        "attach", "--pid", &t.pid().to_string(), "--for", "5s", "--interval", "1s", "--json", "--track", "connections",
    ]);
    assert_eq!(run.status, 0, "stderr:\n{}", run.stderr);
    let report = run.final_report();
    let leak = findings_with(&report, "bad_handler");
    let leak = leak.iter().find(|f| f["verdict"] == "leak").unwrap_or_else(|| panic!("no leak:{}", summarize(&report)));
    // Open files, at least: the finding runs out of something.
    assert!(leak["exhausts"]["seconds"].as_f64().unwrap() > 0.0, "{leak}");
    let peer = leak["peer"].as_str().unwrap();
    let ports = leaktrace::judge::exhaustion::read_limit(t.pid(), &format!("ephemeral ports to {peer}")).unwrap();
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let r: Vec<u64> = range.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(ports.limit, r[1] - r[0] + 1, "{ports:?}");
    assert_eq!(ports.source, "net.ipv4.ip_local_port_range");
    // Every leaked connection holds a port (and the good path's TIME_WAIT ones).
    assert!(ports.in_use >= leak["live"].as_u64().unwrap(), "{ports:?} vs {leak}");
}

/// Ephemeral ports run out before fds: `conn_leak` in a network namespace
/// of its own (`unshare -n`, loopback up) whose port range the test narrows
/// to 500 ports — the range is per namespace, so the machine's is left
/// alone — with the fd limit raised to its hard limit (above the range). The leak (`bad_handler`,
/// 20 connections a second to the fixture's own server) then exhausts ports
/// to that peer first; leaktrace must read the range of the target's
/// namespace, not its own. The good path's closed connections leave no
/// `TIME_WAIT` here (`tcp_max_tw_buckets` 0 in the namespace), so the ports
/// in use are the leaked ones and the ETA can be checked.
#[test]
fn connection_leak_runs_out_of_ports_before_fds_in_its_own_namespace() {
    const PORTS: u64 = 500;
    let mut cmd = std::process::Command::new("unshare");
    cmd.arg("-n").arg("sh").arg("-c").arg(format!(
        "ip link set lo up && echo '40000 {}' > /proc/sys/net/ipv4/ip_local_port_range && \
         echo 0 > /proc/sys/net/ipv4/tcp_max_tw_buckets && ulimit -n \"$(ulimit -Hn)\" && exec \"$0\" \"$@\"",
        40000 + PORTS - 1
    ));
    cmd.arg(fixture("conn_leak")).args(["--leak-ms", "50"]);
    let t = start_command(cmd);
    let fds = |pid: u32| fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    let (fds_before, t0) = (fds(t.pid()), Instant::now());
    let run = run_leaktrace(&[
        "check", "--pid", &t.pid().to_string(), "--for", "8s", "--interval", "1s", "--json", "--track", "connections",
        "--fail-within", "2m",
    ]);
    // Leaked sockets per second, from /proc alone over the same time.
    let rate = (fds(t.pid()) - fds_before) as f64 / t0.elapsed().as_secs_f64();
    drop(t);
    assert_eq!(run.status, 3, "ports run out within 2m: exit 3; stderr:\n{}", run.stderr);
    let report = run.final_report();
    let all = summarize(&report);
    let e = &report["exhaustion"];
    assert!(e["resource"].as_str().unwrap().starts_with("ephemeral ports to 127.0.0.1:"), "{e}:{all}");
    assert_eq!(e["limit_source"], "net.ipv4.ip_local_port_range", "{e}");
    assert_eq!(e["limit"], PORTS, "the namespace's range, not the machine's: {e}");
    let leak = findings_with(&report, "bad_handler");
    let leak = leak.iter().find(|f| f["verdict"] == "leak").unwrap_or_else(|| panic!("no leak:{all}"));
    // All of the growth is the leak's (its site is the helper it dials through).
    assert_eq!((&e["site"], e["share"].as_f64()), (&leak["site"], Some(1.0)), "{e}");
    assert_eq!(leak["exhausts"]["resource"], e["resource"], "ports before open files: {leak}");
    let in_use = e["in_use"].as_u64().unwrap();
    assert!(in_use >= leak["live"].as_u64().unwrap() && in_use < PORTS, "{e} vs {leak}");
    let expected = (PORTS - in_use) as f64 / rate;
    let eta = e["seconds"].as_f64().unwrap();
    assert!((eta - expected).abs() <= 0.3 * expected, "ETA {eta} s, expected {expected:.0} s ({rate:.1} sockets/s)");
    // The look-alike dials the same peer and closes: not a leak.
    for f in findings_with(&report, "good_handler") {
        assert_ne!(f["verdict"], "leak", "{all}");
    }
}
