//! Least privilege, found by test: leaktrace as a non-root user (nobody)
//! with only the documented capabilities — CAP_SYS_ADMIN, CAP_SYS_PTRACE,
//! CAP_DAC_READ_SEARCH — finds the planted leak of a root-owned process
//! (`attach` and `agent`); with any one of them removed it stops with one
//! line naming it. (CAP_BPF and CAP_PERFMON are implied by CAP_SYS_ADMIN,
//! which uprobes need; their own message is tested in reliability.rs.)
//! Needs root (to hand capabilities to nobody with `setpriv`).

mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{prom::*, *};
use serde_json::Value;

/// The documented set, as `setpriv` names them.
const CAPS: [(&str, &str); 3] = [("sys_admin", "CAP_SYS_ADMIN"), ("sys_ptrace", "CAP_SYS_PTRACE"), ("dac_read_search", "CAP_DAC_READ_SEARCH")];

/// Copies of leaktrace and the fixture that nobody can run.
fn copies(dir: &Path) -> (PathBuf, PathBuf) {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("leaktrace");
    fs::copy(leaktrace(), &bin).unwrap();
    let fix = dir.join("thread_leak");
    fs::copy(fixture("thread_leak"), &fix).unwrap();
    for p in [&bin, &fix] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    (bin, fix)
}

/// `setpriv` running `bin ARGS` as nobody with exactly `caps` (effective,
/// permitted, inheritable, ambient and bounding).
fn as_nobody(bin: &Path, caps: &[&str], args: &[&str]) -> Command {
    let set = if caps.is_empty() { "-all".to_string() } else { format!("-all,{}", caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(",")) };
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .arg("--")
        .arg(bin)
        .args(args);
    cmd
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Every documented capability but one: one error line naming it.
fn each_missing_capability_is_named(bin: &Path, args: &[&str]) {
    for (i, (_, name)) in CAPS.iter().enumerate() {
        let fewer: Vec<&str> = CAPS.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, c)| c.0).collect();
        let out = as_nobody(bin, &fewer, args).output().expect("setpriv (util-linux) is needed for this test");
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "without {name}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "without {name}, expected one line:\n{stderr}");
        assert!(lines[0].starts_with("leaktrace: error: permission denied") && lines[0].contains(name), "without {name}: {stderr}");
    }
}

#[test]
fn attach_as_nobody_with_the_documented_capabilities() {
    let dir = TempDir::new("privileges-attach");
    let (bin, fix) = copies(&dir.0);
    let target = start_path(&fix, &[]);
    let pid = target.pid().to_string();
    let all: Vec<&str> = CAPS.iter().map(|c| c.0).collect();
    let args = ["attach", "--pid", &pid, "--for", "8s", "--interval", "1s", "--json"];
    let out = as_nobody(&bin, &all, &args).output().expect("setpriv");
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "a warning with the documented capabilities:\n{stderr}");
    let last: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().expect("a report")).unwrap();
    let leaks: Vec<&Value> = last["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").collect();
    assert!(leaks.iter().any(|f| f["kind"] == "thread" && f["site"] == "spawn_detached"), "{}", summarize(&last));
    assert!(!leaks.iter().any(|f| f["site"] == "spawn_joined"), "{}", summarize(&last));
    each_missing_capability_is_named(&bin, &args[..5]);
}

#[test]
fn agent_as_nobody_with_the_documented_capabilities() {
    let dir = TempDir::new("privileges-agent");
    let (bin, fix) = copies(&dir.0);
    let addr = format!("127.0.0.1:{}", free_port());
    let exe = format!("exe={}", fix.display());
    let args = ["agent", "--match", &exe, "--listen", &addr, "--interval", "1s", "--for", "40s", "--track", "threads"];
    let all: Vec<&str> = CAPS.iter().map(|c| c.0).collect();
    let child = as_nobody(&bin, &all, &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("setpriv");
    let mut agent = Proc { name: "leaktrace agent as nobody", child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(http_get_status(&addr, "/metrics"), Ok((200, _))) {
        agent.assert_running(&|| String::new());
        assert!(Instant::now() < deadline, "the agent never served /metrics");
        thread::sleep(Duration::from_millis(100));
    }
    let target = start_path(&fix, &[]);
    let tag = format!("leaktrace_live_objects{{pid=\"{}\",kind=\"thread\",site=\"spawn_detached\",verdict=\"leak\"}}", target.pid());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = http_get_status(&addr, "/metrics").map(|r| r.1).unwrap_or_default();
        if body.contains(&tag) {
            break;
        }
        agent.assert_running(&|| String::new());
        assert!(Instant::now() < deadline, "no leak from the agent as nobody; /metrics:\n{body}");
        thread::sleep(Duration::from_millis(500));
    }
    drop((target, agent));
    each_missing_capability_is_named(&bin, &args[..5]);
}
