//! Process and path helpers every command uses. Every external command is
//! printed before it runs (`announce`); probes run quietly.

use std::env;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub fn repo_root() -> Result<PathBuf> {
    let manifest = env!("CARGO_MANIFEST_DIR");
    let root = Path::new(manifest)
        .parent()
        .ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR has no parent"))?;
    Ok(root.to_path_buf())
}

/// Directory cargo builds into for the workspace (honours CARGO_TARGET_DIR).
pub fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let p = PathBuf::from(d);
            if p.is_absolute() {
                p
            } else {
                root.join(p)
            }
        }
        _ => root.join("target"),
    }
}

pub fn leaktrace_bin(root: &Path) -> PathBuf {
    target_dir(root).join("release").join("leaktrace")
}

pub fn fixtures_bin(root: &Path) -> PathBuf {
    root.join("fixtures").join("bin")
}

fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(' ') {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    if let Some(dir) = cmd.get_current_dir() {
        s.push_str(&format!("   (in {})", dir.display()));
    }
    s
}

pub fn announce(cmd: &Command) {
    eprintln!("+ {}", show(cmd));
}

/// Runs a command with inherited stdio; fails unless it exits 0.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    announce(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", show(cmd));
    }
    Ok(())
}

/// Runs a command quietly (not announced: used for probes) and returns its
/// stdout, or None when it cannot run or fails.
pub fn probe(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // Effective uid from /proc (no libc dependency).
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

pub fn send_signal(pid: u32, sig: &str) -> Result<()> {
    let mut cmd = Command::new("kill");
    cmd.arg(format!("-{sig}")).arg(pid.to_string());
    announce(&cmd);
    let st = cmd.status().context("running kill")?;
    if !st.success() {
        bail!("kill -{sig} {pid} failed: {st}");
    }
    Ok(())
}

/// Waits up to `timeout` for a child; None when it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if start.elapsed() >= timeout {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then SIGKILL after a grace period; reaps the child.
pub fn stop_child(child: &mut Child, what: &str) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = send_signal(child.id(), "TERM");
    match wait_timeout(child, Duration::from_secs(3)) {
        Ok(Some(_)) => {}
        _ => {
            eprintln!("xtask: {what} did not stop on SIGTERM; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads lines from a child's stdout until one starts with "ready"; the rest
/// of the stream is forwarded (prefixed) to our stderr by a thread.
pub fn wait_ready(child: &mut Child, name: &str, timeout: Duration) -> Result<()> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("{name}: stdout not captured"))?;
    let (tx, rx) = mpsc::channel::<()>();
    let prefix = name.to_string();
    thread::spawn(move || {
        let mut ready_sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !ready_sent && line.trim_start().starts_with("ready") {
                ready_sent = true;
                let _ = tx.send(());
            } else {
                eprintln!("[{prefix}] {line}");
            }
        }
    });
    match rx.recv_timeout(timeout) {
        Ok(()) => Ok(()),
        Err(_) => {
            if let Ok(Some(st)) = child.try_wait() {
                bail!("{name} exited before printing `ready`: {st}");
            }
            bail!("{name} did not print `ready` within {timeout:?}")
        }
    }
}

/// The rustup `cargo` proxy, as a user would run it (rust-toolchain.toml applies).
pub fn cargo() -> Command {
    Command::new("cargo")
}

pub fn exit_code(st: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code()
        .unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// utime + stime of a process, seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// A `kB` field of /proc/PID/status (`VmRSS:`, `VmHWM:`), KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
}
