//! `cargo xtask build` (setup, leaktrace in release, the fixtures) and
//! `cargo xtask fixtures` (the C, C++ and Go test programs into
//! fixtures/bin, each rebuilt when its sources are newer).

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

use crate::cmd::{cargo, fixtures_bin, leaktrace_bin, run_cmd};
use crate::setup::{self, extra_go, go_short, EXTRA_GO};

/// Go programs built in GOPATH mode against Debian's Go library packages:
/// `fixtures/gopath/<dir>` -> `fixtures/bin/<out>`, with Debian's Go or an
/// [`EXTRA_GO`] toolchain (etcd-session needs Go 1.21+: `g.parentGoid`).
const GOPATH_PROGRAMS: &[(&str, &str, Option<&str>)] =
    &[("ginredis", "gin-redis", None), ("etcdsession", "etcd-session", Some("1.22.10"))];

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
    // Deterministic work with a checksum per round: `cargo xtask safety`.
    GoProgram { dir: "workload", out: "workload-go", every_version: true },
    // os.Open leaks for the fd tracker (one Go version: the path is the runtime's raw syscall).
    GoProgram { dir: "fdleak", out: "fdleak-go", every_version: false },
    // A drained pool beside an idle worker pool (waits in progress; one Go version).
    GoProgram { dir: "pooldrain", out: "pooldrain-go", every_version: false },
];
/// C workloads the benchmarks also run built without frame pointers
/// (`gcc -O2 -g`, as distributions build), as `<name>_nofp`.
pub const NOFP_BUILDS: &[&str] = &["conn_bench", "alloc_bench"];

/// fixtures/nofp programs also built with their unwind information only in
/// a separate debug file (`<name>_debuglink` + `.debug/<name>_debuglink.debug`).
const DEBUGLINK_BUILDS: &[&str] = &["nofp_service"];

const C_FLAGS: &[&str] = &[
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-fno-optimize-sibling-calls",
    "-pthread",
    "-Wall",
];

pub fn run(root: &Path) -> Result<()> {
    if env::var_os("XTASK_NO_BUILD").is_some_and(|v| v == "1") {
        eprintln!("xtask: XTASK_NO_BUILD=1: skipping setup and builds");
        return Ok(());
    }
    setup::run(root)?;
    run_cmd(
        cargo()
            .current_dir(root)
            .args(["build", "--release", "-p", "tracer-user"]),
    )?;
    let bin = leaktrace_bin(root);
    if !bin.exists() {
        bail!("{} was not produced", bin.display());
    }
    fixtures(root)
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

/// Debian's commons-pool2 (`libcommons-pool2-java`), the pool the Java
/// fixture drains.
pub const COMMONS_POOL2_JAR: &str = "/usr/share/java/commons-pool2.jar";

pub fn fixtures(root: &Path) -> Result<()> {
    let bin = fixtures_bin(root);
    fs::create_dir_all(&bin)?;
    let mut built = 0;

    // C fixtures: fixtures/c/<name>.c + fixtures/c/common/*.c -> fixtures/bin/<name>
    // (rebuilt when the fixture's own file or any common .c/.h changes).
    let c_dir = root.join("fixtures/c");
    let common_dir = c_dir.join("common");
    let sources = |dir: &Path, ext: &str| -> Result<Vec<PathBuf>> {
        let mut v = Vec::new();
        for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_file() && path.extension().and_then(OsStr::to_str) == Some(ext) {
                v.push(path);
            }
        }
        v.sort();
        Ok(v)
    };
    let c_files = |dir: &Path| sources(dir, "c");
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
    // A 32-bit build of conn_leak (gcc-multilib): leaktrace must refuse it
    // with one line rather than trace it as 0 events.
    // And a static one (glibc's socket/connect wrappers inside the program).
    let conn_leak = c_dir.join("conn_leak.c");
    for (out, flag) in [("conn_leak32", "-m32"), ("conn_leak_static", "-static")] {
        let out = bin.join(out);
        if !up_to_date(&out, mtime(&conn_leak).max(common_newest)) {
            run_cmd(Command::new("gcc").args(C_FLAGS).arg(flag).arg("-o").arg(&out).arg(&conn_leak).args(&common_srcs))?;
            built += 1;
        }
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

    // Fixtures built the way distributions and cargo build them, without
    // frame pointers (the unwinder's tests): fixtures/nofp/<name>.c ->
    // fixtures/bin/<name> with `gcc -O2 -g` against Debian's libhiredis,
    // fixtures/nofp/<name>.cc with `g++ -O2 -g` (libstdc++),
    // and the Rust packages in fixtures/rust/<name> with `cargo build
    // --release` (default profile) of the pinned stable toolchain.
    // Benchmark workloads again with distribution flags (`<name>_nofp`).
    for name in NOFP_BUILDS {
        let src = c_dir.join(format!("{name}.c"));
        let out = bin.join(format!("{name}_nofp"));
        if up_to_date(&out, mtime(&src).max(common_newest)) {
            continue;
        }
        run_cmd(Command::new("gcc").args(["-O2", "-g", "-pthread", "-o"]).arg(&out).arg(&src).args(&common_srcs))?;
        built += 1;
    }
    let nofp_dir = root.join("fixtures/nofp");
    if nofp_dir.is_dir() {
        for src in c_files(&nofp_dir)? {
            let name = src.file_stem().and_then(OsStr::to_str).unwrap_or_default();
            let out = bin.join(name);
            if up_to_date(&out, mtime(&src)) {
                continue;
            }
            run_cmd(Command::new("gcc").args(["-O2", "-g", "-o"]).arg(&out).arg(&src).args(["-lhiredis", "-pthread"]))?;
            built += 1;
        }
        // A plugin built twice with different stack frames (same code
        // offsets), loaded and unloaded in turn by dlopen_plugins.
        let plugin = nofp_dir.join("plugin/dial_plugin.c");
        for (name, bytes) in [("dial_plugin_large.so", 2000), ("dial_plugin_small.so", 200)] {
            let out = bin.join(name);
            if up_to_date(&out, mtime(&plugin)) {
                continue;
            }
            run_cmd(
                Command::new("gcc")
                    .args(["-O2", "-g", "-shared", "-fPIC"])
                    .arg(format!("-DREQUEST_BYTES={bytes}"))
                    .arg("-o")
                    .arg(&out)
                    .arg(&plugin),
            )?;
            built += 1;
        }
        // A program whose CFI is only in a separate debug file, as packages
        // ship it: built with .debug_frame instead of .eh_frame, its debug
        // sections moved to bin/.debug/<name>.debug (found through its
        // .gnu_debuglink), the binary stripped of them.
        for name in DEBUGLINK_BUILDS {
            let src = nofp_dir.join(format!("{name}.c"));
            let out_name = format!("{name}_debuglink");
            let out = bin.join(&out_name);
            if up_to_date(&out, mtime(&src)) {
                continue;
            }
            let debug_dir = bin.join(".debug");
            fs::create_dir_all(&debug_dir)?;
            let debug = debug_dir.join(format!("{out_name}.debug"));
            run_cmd(
                Command::new("gcc")
                    .args(["-O2", "-g", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-o"])
                    .arg(&out)
                    .arg(&src)
                    .args(["-lhiredis", "-pthread"]),
            )?;
            run_cmd(Command::new("objcopy").arg("--only-keep-debug").arg(&out).arg(&debug))?;
            run_cmd(Command::new("strip").arg("--strip-debug").arg(&out))?;
            run_cmd(Command::new("objcopy").arg(format!("--add-gnu-debuglink={}", debug.display())).arg(&out))?;
            built += 1;
        }
        // C++ with distribution flags through libstdc++ (no frame pointers).
        for src in sources(&nofp_dir, "cc")? {
            let name = src.file_stem().and_then(OsStr::to_str).unwrap_or_default();
            let out = bin.join(name);
            if up_to_date(&out, mtime(&src)) {
                continue;
            }
            run_cmd(Command::new("g++").args(["-O2", "-g", "-pthread", "-o"]).arg(&out).arg(&src))?;
            built += 1;
        }
    }
    let rust_dir = root.join("fixtures/rust");
    if rust_dir.is_dir() {
        for entry in fs::read_dir(&rust_dir).with_context(|| format!("reading {}", rust_dir.display()))? {
            let pkg = entry?.path();
            let name = pkg.file_name().and_then(OsStr::to_str).unwrap_or_default().to_string();
            let out = bin.join(&name);
            if !pkg.join("Cargo.toml").is_file() || up_to_date(&out, newest_source(&pkg, &["rs", "toml"])?) {
                continue;
            }
            let target_dir = root.join(".cache/rust-fixtures");
            run_cmd(
                Command::new("cargo")
                    .current_dir(root)
                    .args(["build", "--release", "--manifest-path"])
                    .arg(pkg.join("Cargo.toml"))
                    .arg("--target-dir")
                    .arg(&target_dir)
                    // The fixture's own default profile, whatever the caller's environment says.
                    .env_remove("RUSTFLAGS")
                    .env_remove("CARGO_PROFILE_RELEASE_DEBUG"),
            )?;
            fs::copy(target_dir.join("release").join(&name), &out)?;
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
    // GOPATH fixtures: programs against Debian's packaged Go libraries
    // (gin, redigo, etcd's client), built the way Debian builds them:
    // GO111MODULE=off, GOPATH=/usr/share/gocode, Debian's Go (or a newer
    // toolchain where the program needs one).
    let gopath_dir = root.join("fixtures/gopath");
    for (dir, out_name, toolchain) in GOPATH_PROGRAMS {
        let src = gopath_dir.join(dir);
        let out = bin.join(out_name);
        if up_to_date(&out, newest_source(&src, &["go"])?) {
            continue;
        }
        let mut cmd = Command::new(toolchain.map_or_else(|| PathBuf::from("go"), |v| extra_go(root, v)));
        cmd.current_dir(&src)
            .env("GOTOOLCHAIN", "local")
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", cache.join("go-build"))
            .env("CGO_ENABLED", "0")
            .args(["build", "-o"])
            .arg(&out)
            .arg(".");
        run_cmd(&mut cmd)?;
        built += 1;
    }
    // Java fixtures: fixtures/java/*.java -> class files in fixtures/bin/java
    // with Debian's javac, for Java 11 and later (run with plain `java -cp`;
    // Pools against Debian's commons-pool2).
    let java_dir = root.join("fixtures/java");
    if java_dir.is_dir() {
        let out_dir = bin.join("java");
        let stamp = out_dir.join("Pools.class");
        if !up_to_date(&stamp, newest_source(&java_dir, &["java"])?) {
            fs::create_dir_all(&out_dir)?;
            let srcs = sources(&java_dir, "java")?;
            run_cmd(Command::new("javac").args(["--release", "11", "-cp", COMMONS_POOL2_JAR, "-d"]).arg(&out_dir).args(&srcs))?;
            built += 1;
        }
    }
    if built == 0 {
        eprintln!("fixtures: up to date in {}", bin.display());
    } else {
        eprintln!("fixtures: built {built} into {}", bin.display());
    }
    Ok(())
}
