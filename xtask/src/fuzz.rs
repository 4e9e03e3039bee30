//! `cargo xtask fuzz [--seconds N] [--target NAME]`: runs every cargo-fuzz
//! target of tracer-user/fuzz for N seconds (default 60) on the pinned
//! nightly, each from a corpus seeded with real inputs cut from the
//! fixtures (sections, code, whole small binaries) and kept in
//! target/fuzz-corpus/ between runs. A crash, a panic, a run over 2 GiB or
//! an input that takes over 10 s (unbounded work) fails the command; the
//! input is left in tracer-user/fuzz/artifacts/<target>/ (turn it into a
//! unit test next to the parser, then fix the parser).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::bench::parse_options;
use crate::build;
use crate::cmd::{announce, fixtures_bin, probe, target_dir};
use crate::setup::EBPF_TOOLCHAIN;

/// The targets (tracer-user/fuzz/fuzz_targets/<name>.rs), what each parses.
pub const TARGETS: &[(&str, &str)] = &[
    ("elf_analyses", "ELF sections, symbols, segments; syscall, allocator and lock sites of a whole file"),
    ("go_buildinfo", ".go.buildinfo"),
    ("gopclntab", ".gopclntab"),
    ("dwarf_offsets", "the DWARF struct-offset reader and the zlib section inflater"),
    ("x86_code", "syscall-site, allocator result/probe-place and Go prologue/RET analyses of raw x86-64"),
    ("go_runtime", "a whole Go executable as the goroutine, map and lock trackers read it"),
    ("eh_frame", ".eh_frame / .eh_frame_hdr (and as .debug_frame) as the unwinder reads rules from them"),
];

/// Programs built without frame pointers: their CFI seeds the unwinder's target.
const CFI_SEEDS: &[&str] = &["nofp_service", "nofp_threads", "nofp_alloc", "nofp_signal", "mixed_stacks"];

/// The address of section `name` of an ELF file (objdump's VMA column).
fn section_address(file: &Path, name: &str) -> Option<u64> {
    let h = probe("objdump", &["-h", file.to_str()?])?;
    h.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .and_then(|l| u64::from_str_radix(l.split_whitespace().nth(3)?, 16).ok())
}

/// Small C fixtures: whole-file seeds for the ELF target.
const SMALL_ELF_SEEDS: &[&str] = &["conn_leak", "thread_leak", "lock_contention", "alloc_leak", "alloc_new"];
/// Go fixtures whose sections seed the Go targets: every toolchain's layout.
const GO_SEEDS: &[&str] = &["gochurn", "gochurn122", "gochurn124", "gochurn125", "gochurn127", "gochurn127-stripped"];

fn fuzz_dir(root: &Path) -> PathBuf {
    root.join("tracer-user").join("fuzz")
}

/// One section of an ELF file as objcopy writes it (decompressed).
fn section(file: &Path, name: &str, scratch: &Path) -> Option<Vec<u8>> {
    let out = scratch.join("section.bin");
    let _ = fs::remove_file(&out);
    let ok = Command::new("objcopy")
        .args(["--decompress-debug-sections", "-O", "binary", "--only-section", name])
        .arg(file)
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| fs::read(&out).ok()).flatten().filter(|b| !b.is_empty())
}

/// Seeds every target's corpus directory that is still empty.
fn seed(root: &Path, corpus: &Path) -> Result<()> {
    let bin = fixtures_bin(root);
    let scratch = target_dir(root).join("fuzz-scratch");
    fs::create_dir_all(&scratch)?;
    let put = |target: &str, name: &str, bytes: &[u8]| -> Result<()> {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes).with_context(|| format!("writing seed {name}"))
    };
    let empty = |target: &str| fs::read_dir(corpus.join(target)).map_or(true, |mut d| d.next().is_none());
    if empty("elf_analyses") {
        for name in SMALL_ELF_SEEDS {
            if let Ok(b) = fs::read(bin.join(name)) {
                put("elf_analyses", name, &b)?;
            }
        }
    }
    for go in GO_SEEDS {
        let file = bin.join(go);
        if !file.exists() {
            continue;
        }
        if empty("go_runtime") || *go == "gochurn127-stripped" {
            put("go_runtime", go, &fs::read(&file)?)?;
        }
        if let Some(b) = section(&file, ".go.buildinfo", &scratch) {
            put("go_buildinfo", go, &b)?;
        }
        if let Some(b) = section(&file, ".gopclntab", &scratch) {
            put("gopclntab", go, &b)?;
        }
        if let (Some(abbrev), Some(info)) = (section(&file, ".debug_abbrev", &scratch), section(&file, ".debug_info", &scratch)) {
            // The runtime's units come first: 256 KiB of .debug_info hold runtime.g.
            let mut b = (abbrev.len() as u32).to_le_bytes().to_vec();
            b.extend(&abbrev);
            b.extend(&info[..info.len().min(256 << 10)]);
            put("dwarf_offsets", go, &b)?;
        }
        if let Some(text) = section(&file, ".text", &scratch) {
            // Code from a few places, each at its real address.
            let base = probe("objdump", &["-h", file.to_str().unwrap_or_default()])
                .and_then(|h| {
                    h.lines()
                        .find(|l| l.split_whitespace().nth(1) == Some(".text"))
                        .and_then(|l| u64::from_str_radix(l.split_whitespace().nth(3)?, 16).ok())
                })
                .unwrap_or(0x401000);
            for (i, at) in [0usize, text.len() / 3, text.len() / 2].into_iter().enumerate() {
                let chunk = &text[at..(at + 2048).min(text.len())];
                let mut b = (base + at as u64).to_le_bytes().to_vec();
                b.extend(chunk);
                put("x86_code", &format!("{go}-{i}"), &b)?;
            }
        }
    }
    if empty("eh_frame") {
        for name in CFI_SEEDS {
            let file = bin.join(name);
            let (Some(eh), Some(hdr)) = (section(&file, ".eh_frame", &scratch), section(&file, ".eh_frame_hdr", &scratch)) else {
                continue;
            };
            let addresses = [".eh_frame", ".eh_frame_hdr", ".text"].map(|s| section_address(&file, s));
            let [Some(eh_at), Some(hdr_at), Some(text_at)] = addresses else { continue };
            let mut b = eh_at.to_le_bytes().to_vec();
            b.extend(hdr_at.to_le_bytes());
            b.extend(text_at.to_le_bytes());
            b.extend((hdr.len() as u32).to_le_bytes());
            b.extend(&hdr);
            b.extend(&eh);
            put("eh_frame", name, &b)?;
        }
    }
    for t in TARGETS {
        if empty(t.0) {
            put(t.0, "empty", b"")?;
        }
    }
    Ok(())
}

/// `cargo xtask fuzz [--seconds N] [--target NAME]`.
pub fn run(root: &Path, args: &[String]) -> Result<i32> {
    let mut only = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.split_once('=') {
            Some(("--target", v)) => only = Some(v.to_string()),
            _ if a == "--target" => only = Some(it.next().cloned().ok_or_else(|| anyhow!("--target needs a value"))?),
            _ => rest.push(a.clone()),
        }
    }
    let [seconds] = parse_options("fuzz", &rest, [("--seconds", 60)], &["--seconds"])?;
    let targets: Vec<&(&str, &str)> = TARGETS.iter().filter(|t| only.as_deref().is_none_or(|o| o == t.0)).collect();
    if targets.is_empty() {
        let names: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
        bail!("fuzz: no target `{}` (targets: {})", only.unwrap_or_default(), names.join(", "));
    }
    if !fixtures_bin(root).join("gochurn127-stripped").exists() {
        build::fixtures(root)?;
    }
    let corpus = target_dir(root).join("fuzz-corpus");
    seed(root, &corpus)?;

    let nightly = format!("+{EBPF_TOOLCHAIN}");
    let fuzz_cmd = |sub: &str| {
        let mut c = Command::new("cargo");
        c.current_dir(root.join("tracer-user"))
            .env("LEAKTRACE_SKIP_EBPF", "1")
            // The fuzz workspace has its own target dir; a CARGO_TARGET_DIR
            // meant for the main one would mix toolchains.
            .env_remove("CARGO_TARGET_DIR")
            .args([nightly.as_str(), "fuzz", sub, "--sanitizer", "none"]);
        c
    };
    // One build of every target first: the time limits are fuzzing time.
    let mut b = fuzz_cmd("build");
    announce(&b);
    if !b.status().context("running cargo fuzz (cargo xtask setup installs cargo-fuzz)")?.success() {
        bail!("fuzz: cargo fuzz build failed");
    }
    let mut results = Vec::new();
    for (name, what) in &targets {
        let artifacts = fuzz_dir(root).join("artifacts").join(name);
        fs::create_dir_all(&artifacts)?;
        let mut c = fuzz_cmd("run");
        c.arg(name)
            .arg(corpus.join(name))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        announce(&c);
        let out = c.output().context("running cargo fuzz")?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        fs::write(target_dir(root).join(format!("fuzz-{name}.log")), &log)?;
        let runs = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into());
        let ok = out.status.success();
        if !ok {
            // The crash report and the input it left.
            for l in log.lines().filter(|l| l.contains("panicked") || l.contains("ERROR:") || l.contains("Test unit written")) {
                eprintln!("fuzz: {name}: {l}");
            }
        }
        eprintln!("fuzz: {name}: {runs} inputs in {seconds} s: {}", if ok { "no crash" } else { "FAILED" });
        results.push((*name, *what, runs, ok));
    }
    eprintln!("\nfuzz summary ({seconds} s each; corpora in {}):", corpus.display());
    for (name, what, runs, ok) in &results {
        eprintln!("  {:<14} {:>10} inputs  {}  ({what})", name, runs, if *ok { "ok" } else { "CRASH" });
    }
    Ok(if results.iter().all(|r| r.3) { 0 } else { 1 })
}
