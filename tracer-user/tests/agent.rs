//! `leaktrace agent` end to end (root needed): it finds its targets itself.
//!
//! The agent starts first, with two selectors (`comm=` and an `exe=` glob).
//! Then, from copies of the fixtures under names of this test (so that other
//! tests' fixtures never match): a connection leak matching by comm, a
//! thread leak matching by exe, a connection leak that matches neither, and
//! a matching `--no-leak` look-alike that exits by itself mid-test. One
//! /metrics must show both leaks with verdict leak, each with its
//! `leaktrace_target_info` row; nothing of the non-matching one; the exited
//! one present (marked exited) and then gone after `--keep-exited`. Debian's
//! real Prometheus scrapes it and a PromQL join on `target_info` names both.
//!
//! A second test puts fixtures in child cgroups (v2) named as kubelet with
//! containerd and Docker name them, and checks the container and pod labels.
//!
//! A third gives the agent a budget it cannot meet (`--max-cpu 0.01`): it
//! must shed the idle targets and the busy look-alike, free their loads,
//! and keep tracing the leak.
//!
//! A fourth traces 41 targets at once, beyond the kernel's per-tracepoint
//! program limit of a load per target, through the agent's hub.

mod common;

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use common::{prom::*, *};

/// A running agent on a free loopback port, its stderr collected.
struct Agent {
    proc: Proc,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

fn start_agent(args: &[&str]) -> Agent {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(leaktrace())
        .args(["agent", "--listen", &addr, "--interval", "1s", "--for", "60s"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start leaktrace agent");
    let stderr = child.stderr.take().unwrap();
    let collected = Arc::new(Mutex::new(String::new()));
    {
        let collected = collected.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut c = collected.lock().unwrap();
                c.push_str(&line);
                c.push('\n');
            }
        });
    }
    let mut agent = Agent { proc: Proc { name: "leaktrace agent", child }, addr, stderr: collected };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent.scrape().contains("\nleaktrace_up 1\n") {
        let log = agent.stderr.lock().unwrap().clone();
        agent.proc.assert_running(&|| log.clone());
        assert!(Instant::now() < deadline, "the agent never served /metrics; stderr:\n{log}");
        thread::sleep(Duration::from_millis(100));
    }
    agent
}

impl Agent {
    /// The /metrics body (empty when it does not answer yet).
    fn scrape(&self) -> String {
        match http_get_status(&self.addr, "/metrics") {
            Ok((200, body)) => body,
            _ => String::new(),
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

/// Copies fixture `name` to `dir/as_name` (a name of this test's own).
fn copy_fixture(name: &str, dir: &Path, as_name: &str) -> PathBuf {
    let to = dir.join(as_name);
    fs::copy(fixture(name), &to).unwrap();
    to
}

/// Sample lines of `family` whose labels include `pid="PID"`.
fn lines_of<'a>(text: &'a str, family: &str, pid: u32) -> Vec<&'a str> {
    let tag = format!("pid=\"{pid}\"");
    text.lines().filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(&tag)).collect()
}

#[test]
fn agent_traces_matching_processes_started_after_it() {
    let dir = TempDir::new("agent");
    // comm is the file name cut to 15 bytes.
    let tag = format!("lt{}", std::process::id() % 100_000);
    let conn_name = format!("{tag}_conn");
    let conn = copy_fixture("conn_leak", &dir.0, &conn_name);
    fs::create_dir_all(dir.0.join("sel")).unwrap();
    let thread_leak = copy_fixture("thread_leak", &dir.0.join("sel"), "thread_leak");
    let other = copy_fixture("conn_leak", &dir.0, &format!("{tag}_other"));
    let exe_glob = format!("exe={}/sel/thread*", dir.0.display());
    // The budget is out of the way here (shedding has its own test).
    let agent = start_agent(&["--match", &format!("comm={conn_name}"), "--match", &exe_glob, "--keep-exited", "3s", "--max-cpu", "400"]);

    let leaky_conn = start_path(&conn, &[]);
    let leaky_threads = start_path(&thread_leak, &[]);
    let unmatched = start_path(&other, &[]);
    let exiting = start_path(&conn, &["--no-leak", "--exit-after-ms", "8000"]);
    let (c, t, u, x) = (leaky_conn.pid(), leaky_threads.pid(), unmatched.pid(), exiting.pid());

    let dir_prom = TempDir::new("agent-prometheus");
    let mut prom = start_prometheus(&dir_prom.0, &[&agent.addr]);
    wait_for_scrapes(&mut prom, &[&agent.addr]);

    // Until both leaks are judged (and the exited one is gone), bounded.
    let deadline = Instant::now() + Duration::from_secs(45);
    let (mut exited_seen, mut text);
    exited_seen = false;
    loop {
        text = agent.scrape();
        exited_seen |= text.contains(&format!("leaktrace_target_exited{{pid=\"{x}\"}} 1"));
        let leak = |pid: u32, kind: &str, site: &str| {
            lines_of(&text, "leaktrace_live_objects", pid)
                .iter()
                .any(|l| l.contains(&format!("kind=\"{kind}\",site=\"{site}\",verdict=\"leak\"")))
        };
        let done = leak(c, "connection", "dial_cache") && leak(t, "thread", "spawn_detached");
        if done && exited_seen && lines_of(&text, "leaktrace_target_info", x).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every expectation met in time (exited seen: {exited_seen}); /metrics:\n{text}\nagent stderr:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(500));
    }

    // Identity of both leaks; nothing of the process that does not match.
    let info_c = lines_of(&text, "leaktrace_target_info", c);
    assert_eq!(info_c.len(), 1, "{text}");
    assert!(info_c[0].contains(&format!("comm=\"{conn_name}\"")) && info_c[0].contains(&format!("exe=\"{}\"", conn.display())), "{}", info_c[0]);
    assert!(info_c[0].contains("build_id=\"") && !info_c[0].contains("build_id=\"\""), "{}", info_c[0]);
    let info_t = lines_of(&text, "leaktrace_target_info", t);
    assert!(info_t.len() == 1 && info_t[0].contains("comm=\"thread_leak\""), "{text}");
    assert!(!text.contains(&format!("pid=\"{u}\"")), "the non-matching process is traced:\n{text}");
    // The look-alike that exited was traced (seen exited), never a leak.
    assert!(!text.contains(&format!("pid=\"{x}\"")), "the exited target's series are still there:\n{text}");
    assert!(agent.log().contains(&format!("attached to {x} ")), "{}", agent.log());
    assert!(text.contains("leaktrace_agent_targets{state=\"traced\"} 2"), "{text}");
    assert!(text.contains("leaktrace_build_info{version=\""), "{text}");

    // The PromQL join users write: leaking sites, named by target_info.
    let join = "max by (pid, kind, site) (leaktrace_live_objects{verdict=\"leak\"}) * on (pid) group_left (comm) leaktrace_target_info";
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = prom.query(join);
        if rows.len() >= 2 || Instant::now() > deadline {
            break rows;
        }
        thread::sleep(Duration::from_millis(500));
    };
    let named: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r["metric"]["comm"].as_str().unwrap_or("").to_string(), r["metric"]["site"].as_str().unwrap_or("").to_string()))
        .collect();
    assert!(named.contains(&(conn_name.clone(), "dial_cache".into())), "{join}: {named:?}\n{}", prom.log());
    assert!(named.contains(&("thread_leak".into(), "spawn_detached".into())), "{join}: {named:?}");
    assert!(named.iter().all(|(comm, _)| *comm == conn_name || comm == "thread_leak"), "{named:?}");
    drop((leaky_conn, leaky_threads, unmatched, exiting));
}

/// The cgroup v2 mount point (`/sys/fs/cgroup`, or `.../unified` on a hybrid host).
fn cgroup2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(point))
        })
        .expect("no cgroup2 hierarchy mounted")
}

/// A cgroup made for the test, removed (deepest first) on drop.
struct Cgroup(Vec<PathBuf>);

impl Drop for Cgroup {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            for _ in 0..50 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Makes `root/segments...` (each level kept for removal).
fn make_cgroup(root: &Path, segments: &[String]) -> (Cgroup, PathBuf) {
    let mut made = Vec::new();
    let mut d = root.to_path_buf();
    for s in segments {
        d = d.join(s);
        if !d.exists() {
            fs::create_dir(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            made.push(d.clone());
        }
    }
    (Cgroup(made), d)
}

/// Starts `path` moved into the cgroup `dir` before it execs.
fn start_in_cgroup(path: &Path, dir: &Path) -> Target {
    let procs = dir.join("cgroup.procs");
    let mut cmd = Command::new(path);
    // SAFETY: only a write(2) of a file opened before fork is done between
    // fork and exec.
    let file = fs::OpenOptions::new().write(true).open(&procs).unwrap();
    unsafe {
        cmd.pre_exec(move || {
            use std::io::Write;
            (&file).write_all(b"0").map_err(|e| std::io::Error::new(e.kind(), "cgroup.procs"))
        });
    }
    start_command(cmd)
}

#[test]
fn agent_labels_containers_and_pods_from_the_cgroup_path() {
    let root = cgroup2_root();
    let top = format!("leaktrace-agent-test-{}", std::process::id());
    let k8s_id = format!("{:064x}", 0xfeed_0000_u64 + u64::from(std::process::id()));
    let docker_id = format!("{:064x}", 0xd0c0_0000_u64 + u64::from(std::process::id()));
    let uid = "8d3c6e2a-1b4f-4a5e-9c7d-0e1f2a3b4c5d";
    let pod_slice = format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_"));
    let (_k8s, k8s_dir) = make_cgroup(
        &root,
        &[top.clone(), "kubepods.slice".into(), "kubepods-burstable.slice".into(), pod_slice.clone(), format!("cri-containerd-{k8s_id}.scope")],
    );
    let (_docker, docker_dir) = make_cgroup(&root, &[top.clone(), "docker".into(), docker_id.clone()]);
    let _top = Cgroup(vec![root.join(&top)]);

    let agent = start_agent(&[
        "--match",
        &format!("container={}", &k8s_id[..12]),
        "--match",
        &format!("cgroup=/{top}/docker"),
        "--track",
        "threads",
        "--max-cpu",
        "400",
    ]);
    let in_pod = start_in_cgroup(&fixture("thread_leak"), &k8s_dir);
    let in_docker = start_in_cgroup(&fixture("thread_leak"), &docker_dir);
    let outside = start("thread_leak", &[]);
    let (p, d, o) = (in_pod.pid(), in_docker.pid(), outside.pid());

    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = agent.scrape();
        let leaks = |pid| lines_of(&text, "leaktrace_live_objects", pid).iter().any(|l| l.contains("verdict=\"leak\""));
        if leaks(p) && leaks(d) {
            break text;
        }
        assert!(Instant::now() < deadline, "no leak for both containers in time; /metrics:\n{text}\nstderr:\n{}", agent.log());
        thread::sleep(Duration::from_millis(500));
    };
    let info = |pid| lines_of(&text, "leaktrace_target_info", pid).first().map(|s| s.to_string()).unwrap_or_default();
    let pod = info(p);
    for want in [
        format!("container_id=\"{k8s_id}\""),
        "container_runtime=\"containerd\"".into(),
        format!("pod_uid=\"{uid}\""),
        "qos_class=\"burstable\"".into(),
        format!("cgroup=\"/{top}/kubepods.slice/kubepods-burstable.slice/{pod_slice}/cri-containerd-{k8s_id}.scope\""),
    ] {
        assert!(pod.contains(&want), "{want} missing in {pod}");
    }
    let docker = info(d);
    for want in [format!("container_id=\"{docker_id}\""), "container_runtime=\"docker\"".into(), "pod_uid=\"\"".into()] {
        assert!(docker.contains(&want), "{want} missing in {docker}");
    }
    assert!(!text.contains(&format!("pid=\"{o}\"")), "a process outside the selected cgroups is traced:\n{text}");
    drop((in_pod, in_docker, outside));
}

/// BPF programs and maps the process `pid` holds (its fds on them).
fn bpf_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("anon_inode:bpf-")))
                .count()
        })
        .unwrap_or(0)
}

/// `n` copies of `sleep` (copied to `idle`, a name of the test's own)
/// sleeping long: idle targets.
fn idle_sleepers(idle: &Path, n: usize) -> Vec<Proc> {
    (0..n).map(|_| Proc { name: "idle sleep", child: Command::new(idle).arg("1000").stdout(Stdio::null()).spawn().unwrap() }).collect()
}

#[test]
fn over_budget_the_agent_sheds_idle_targets_and_keeps_the_leak() {
    let dir = TempDir::new("agent-budget");
    let tag = format!("lb{}", std::process::id() % 100_000);
    let idle = dir.0.join(format!("{tag}_idle"));
    fs::copy("/usr/bin/sleep", &idle).unwrap();
    let leak = copy_fixture("conn_leak", &dir.0, &format!("{tag}_leak"));
    let twin = copy_fixture("conn_leak", &dir.0, &format!("{tag}_twin"));
    // A budget no agent meets, measured over 6 s (again after each shed).
    let agent = start_agent(&[
        "--match",
        &format!("exe={}/{tag}_*", dir.0.display()),
        "--track",
        "connections",
        "--max-cpu",
        "0.01",
        "--budget-window",
        "6s",
    ]);
    let sleepers = idle_sleepers(&idle, 2);
    let leaky = start_path(&leak, &[]);
    // Busy (dial-then-close churn, a pool opened before attach), not leaking.
    let busy = start_path(&twin, &["--no-leak", "--pool-delay-ms", "0"]);
    let (l, b) = (leaky.pid(), busy.pid());
    let shed_pids: Vec<u32> = sleepers.iter().map(|p| p.child.id()).chain([b]).collect();

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut bpf_fds_all_traced = 0;
    let text = loop {
        let text = agent.scrape();
        if text.contains("leaktrace_agent_targets{state=\"traced\"} 4") {
            bpf_fds_all_traced = bpf_fds_all_traced.max(bpf_fds(agent.proc.child.id()));
        }
        let shed = |pid: u32| text.contains(&format!("leaktrace_target_untraced{{pid=\"{pid}\",reason=\"shed\"}} 1"));
        let leaking = lines_of(&text, "leaktrace_live_objects", l).iter().any(|line| line.contains("site=\"dial_cache\",verdict=\"leak\""));
        if shed_pids.iter().all(|p| shed(*p)) && leaking {
            break text;
        }
        assert!(!shed(l), "the leaking target was shed while others could go; /metrics:\n{text}\nstderr:\n{}", agent.log());
        assert!(Instant::now() < deadline, "the idle targets were not shed, or the leak not judged, in time; /metrics:\n{text}\nstderr:\n{}", agent.log());
        thread::sleep(Duration::from_millis(300));
    };
    let log = agent.log();
    assert!(text.contains("leaktrace_agent_targets{state=\"traced\"} 1"), "{text}");
    assert!(text.contains("leaktrace_agent_targets{state=\"shed\"} 3"), "{text}");
    assert!(text.contains("leaktrace_agent_shed_targets_total{} 3"), "{text}");
    let pickup = text.lines().find_map(|l| l.strip_prefix("leaktrace_agent_pickup_cpu_seconds_total{} ")).and_then(|v| v.parse::<f64>().ok());
    assert!(pickup.is_some_and(|s| s > 0.0), "picking four targets up took no CPU? {text}");
    for pid in &shed_pids {
        // Its identity stays; its (stale) series are gone.
        assert_eq!(lines_of(&text, "leaktrace_target_info", *pid).len(), 1, "{text}");
        assert!(lines_of(&text, "leaktrace_live_objects", *pid).is_empty(), "{text}");
        assert!(log.contains(&format!(" {pid} ({tag}_")), "shedding pid {pid} not said:\n{log}");
    }
    assert!(log.contains("over budget for 6s"), "{log}");
    for line in log.lines().filter(|line| line.contains("stopped tracing")) {
        assert!(!line.contains(&format!(" {l} (")), "the leak was shed: {line}");
    }
    eprintln!("agent stderr:\n{log}");
    // The shed targets' loads are gone: the agent holds far fewer BPF objects.
    let now = bpf_fds(agent.proc.child.id());
    assert!(bpf_fds_all_traced > 0, "never saw all four traced; stderr:\n{log}");
    assert!(now * 4 < bpf_fds_all_traced * 3, "BPF fds: {bpf_fds_all_traced} with 4 targets, {now} after shedding 3");
    drop((sleepers, leaky, busy));
}

/// Above the old ceiling: with a load per target attached directly, each
/// target put two programs on `sched:sched_process_exit` and the kernel's
/// 64 per tracepoint refused the 33rd target (and any other tracer while
/// the agent ran). Through the hub, 40 idle targets and a leaking one are
/// all traced, the leak's events reach its own programs (judged leak), and
/// a separate `leaktrace attach` works meanwhile.
#[test]
fn forty_targets_share_the_hub_and_other_tracers_still_attach() {
    let dir = TempDir::new("agent-hub");
    let tag = format!("lh{}", std::process::id() % 100_000);
    let idle = dir.0.join(format!("{tag}_idle"));
    fs::copy("/usr/bin/sleep", &idle).unwrap();
    let leak = copy_fixture("conn_leak", &dir.0, &format!("{tag}_leak"));
    // The default trackers (connections, threads, goroutines): the threads'
    // exit program is the second one on sched_process_exit.
    let agent = start_agent(&["--match", &format!("exe={}/{tag}_*", dir.0.display()), "--max-cpu", "1000", "--max-rss", "4096"]);
    let sleepers = idle_sleepers(&idle, 40);
    let leaky = start_path(&leak, &[]);
    let l = leaky.pid();
    let deadline = Instant::now() + Duration::from_secs(120);
    let text = loop {
        let text = agent.scrape();
        let leaking = lines_of(&text, "leaktrace_live_objects", l).iter().any(|line| line.contains("site=\"dial_cache\",verdict=\"leak\""));
        if text.contains("leaktrace_agent_targets{state=\"traced\"} 41") && leaking {
            break text;
        }
        assert!(
            text.is_empty() || text.contains("leaktrace_agent_targets{state=\"refused\"} 0"),
            "a target was refused; /metrics:\n{text}\nstderr:\n{}",
            agent.log()
        );
        assert!(Instant::now() < deadline, "41 targets not traced, or the leak not judged, in time; /metrics:\n{text}\nstderr:\n{}", agent.log());
        thread::sleep(Duration::from_millis(500));
    };
    assert!(text.contains("leaktrace_agent_targets{state=\"shed\"} 0"), "{text}");
    assert!(!agent.log().contains("Argument list too long"), "{}", agent.log());
    for s in &sleepers {
        assert_eq!(lines_of(&text, "leaktrace_target_info", s.child.id()).len(), 1, "pid {} has no target_info row:\n{text}", s.child.id());
    }
    // Another tracer of the machine, while the agent holds 41 targets.
    let other = start("conn_leak", &["--no-leak"]);
    let run = run_leaktrace(&["attach", "--pid", &other.pid().to_string(), "--for", "2s", "--json"]);
    assert_eq!(run.status, 0, "attach beside the agent failed:\n{}", run.stderr);
    assert!(run.final_report()["findings"].is_array(), "{}", run.stdout);
    drop((sleepers, leaky, other));
}
