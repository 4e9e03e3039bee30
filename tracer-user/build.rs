//! Builds the eBPF object (`tracer-ebpf`) with the pinned nightly and puts it
//! in `$OUT_DIR/tracer`, where `src/probes.rs` embeds it.
//!
//! `LEAKTRACE_SKIP_EBPF=1` writes an empty object instead (for working on
//! user-space code without the BPF toolchain); the binary then refuses to attach.

use std::{env, fs, path::PathBuf};

/// The nightly that compiles the eBPF crate, named once in
/// `tracer-ebpf/toolchain` (xtask reads the same file). Must use the same LLVM
/// major (22) as bpf-linker; `cargo xtask setup` installs exactly this one.
const EBPF_TOOLCHAIN: &str = include_str!("../tracer-ebpf/toolchain").trim_ascii();

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LEAKTRACE_SKIP_EBPF");
    revision();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    if env::var("LEAKTRACE_SKIP_EBPF").is_ok_and(|v| v == "1") {
        fs::write(out_dir.join("tracer"), b"")?;
        return Ok(());
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../tracer-ebpf").canonicalize()?;
    let root = ebpf_dir.to_str().expect("utf-8 path");
    // Rebuild when the shared types change too.
    println!("cargo:rerun-if-changed={}", manifest.join("../tracer-common/src").display());
    aya_build::build_ebpf(
        [aya_build::Package { name: "tracer-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}

/// `LEAKTRACE_REVISION` for `leaktrace_build_info`: the commit this is built
/// from (`git rev-parse --short=12 HEAD`; uncommitted changes are not
/// flagged: watching the index would rebuild on every `git status`),
/// `unknown` outside a git checkout. Rebuilt when HEAD or its branch moves.
fn revision() {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        println!("cargo:rustc-env=LEAKTRACE_REVISION=unknown");
        return;
    };
    println!("cargo:rustc-env=LEAKTRACE_REVISION={commit}");
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
    }
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    for path in watched.into_iter().flatten().map(PathBuf::from).filter(|p| p.exists()) {
        let path = if path.is_relative() { std::env::current_dir().map(|d| d.join(&path)).unwrap_or(path) } else { path };
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
