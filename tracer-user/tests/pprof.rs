//! `--pprof` and `--flamegraph` end to end: the real `leaktrace` against the
//! C leak fixture, the profile read back by Go's own `go tool pprof` (needs
//! root, and `go` on PATH: Debian's golang-go, installed by `cargo xtask setup`).

mod common;

use std::{path::PathBuf, process::Command};

use common::*;

/// A scratch directory for this test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("leaktrace-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `go` from PATH, or a clear failure.
fn go() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("go"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`go` not found on PATH: `go tool pprof` reads the profile (apt-get install golang-go, or run `cargo xtask setup`)"))
}

/// `go tool pprof ARGS`: its stdout, or a failure with its stderr.
fn pprof(args: &[&str]) -> String {
    let out = Command::new(go()).arg("tool").arg("pprof").args(args).output().expect("run go tool pprof");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Entries of `-top` output: (name, flat, cum), in the order shown.
fn top_entries(out: &str) -> Vec<(String, i64, i64)> {
    out.lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // flat flat% sum% cum cum% name...
            if cols.len() < 6 {
                return None;
            }
            Some((cols[5..].join(" "), cols[0].parse().ok()?, cols[3].parse().ok()?))
        })
        .collect()
}

/// The GNU build id of `path`, as `readelf -n` prints it.
fn readelf_build_id(path: &str) -> String {
    let out = Command::new("readelf").args(["-n", path]).output().expect("run readelf (binutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find_map(|l| l.trim().strip_prefix("Build ID: ")).map(str::to_string).unwrap_or_else(|| panic!("readelf -n {path}: no build id:\n{text}"))
}

#[test]
fn pprof_profile_and_flame_graph_of_the_leak() {
    let dir = Scratch::new("pprof");
    let profile = dir.0.join("P.pb.gz");
    let svg = dir.0.join("F.svg");
    let bin = fixture("conn_leak");
    let run = run_leaktrace(&[
        "check",
        "--for",
        "6s",
        "--interval",
        "1s",
        "--pprof",
        profile.to_str().unwrap(),
        "--flamegraph",
        svg.to_str().unwrap(),
        "--",
        bin.to_str().unwrap(),
    ]);
    assert_eq!(run.status, 3, "the leak must fail check; stderr: {}", run.stderr);
    assert!(run.stdout.contains("final report"), "no final table: {}", run.stdout);
    assert!(run.stderr.contains("wrote pprof profile"), "{}", run.stderr);

    // Go's own pprof reads it. Sorted by cumulative count, the leak's site
    // (dial_cache, under every connection) is at the top, and bad_handler
    // holds nearly all of them; flat goes to the innermost frame (the libc
    // socket wrapper), as for any pprof profile.
    let top = pprof(&["-top", "-cum", "-sample_index=connections", profile.to_str().unwrap()]);
    assert!(top.contains("Type: connections"), "{top}");
    let entries = top_entries(&top);
    assert!(!entries.is_empty(), "no entries in:\n{top}");
    let max_cum = entries.iter().map(|e| e.2).max().unwrap();
    let cum = |name: &str| entries.iter().find(|e| e.0 == name).map(|e| e.2).unwrap_or_else(|| panic!("{name} missing:\n{top}"));
    assert_eq!(cum("dial_cache"), max_cum, "dial_cache must have the largest cum:\n{top}");
    let leak = cum("bad_handler");
    assert!(leak >= 20, "too few live connections under bad_handler:\n{top}");
    assert!(leak * 10 >= max_cum * 8, "bad_handler must hold most connections:\n{top}");
    // bad_handler is the top entry below the frames every connection goes
    // through (main, the loop, dial_cache, libc): only those rank above it,
    // and the pool and the churn rank below.
    let pos = |name: &str| entries.iter().position(|e| e.0 == name);
    let at = pos("bad_handler").unwrap();
    assert!(entries[..at].iter().all(|e| e.2 == max_cum), "bad_handler is not the top entry of its own:\n{top}");
    for other in ["pool_init", "pool_handler", "good_handler"] {
        if let Some(p) = pos(other) {
            assert!(p > at, "{other} ranks above bad_handler:\n{top}");
        }
    }
    // The largest flat count is a leaf frame the leak goes through.
    let max_flat = entries.iter().map(|e| e.1).max().unwrap();
    assert!(max_flat >= leak, "flat counts:\n{top}");

    // Labels: the leak alone, by verdict.
    let leaks = pprof(&["-top", "-cum", "-sample_index=connections", "-tagfocus=verdict=leak", profile.to_str().unwrap()]);
    let leak_entries = top_entries(&leaks);
    assert!(leak_entries.iter().any(|e| e.0 == "bad_handler" && e.2 == leak), "{leaks}");
    assert!(!leak_entries.iter().any(|e| e.0 == "pool_init"), "the steady pool is not a leak:\n{leaks}");
    let tags = pprof(&["-tags", profile.to_str().unwrap()]);
    assert!(tags.contains("site:") && tags.contains("dial_cache") && tags.contains("peer:"), "{tags}");

    // Each mapping carries its object's GNU build id, as readelf reads it.
    let raw = pprof(&["-raw", profile.to_str().unwrap()]);
    let mappings: Vec<&str> = raw.lines().skip_while(|l| l.trim() != "Mappings").skip(1).collect();
    let exe = std::fs::canonicalize(&bin).unwrap();
    let libc = mappings.iter().find_map(|l| l.split_whitespace().find(|w| w.contains("/libc.so"))).unwrap_or_else(|| panic!("no libc mapping:\n{raw}"));
    for object in [exe.to_str().unwrap(), libc] {
        let id = readelf_build_id(object);
        let line = mappings.iter().find(|l| l.split_whitespace().nth(2) == Some(object)).unwrap_or_else(|| panic!("no mapping of {object}:\n{raw}"));
        assert_eq!(line.split_whitespace().nth(3), Some(id.as_str()), "{object}'s mapping in the profile: {line}");
    }

    // The flame graph.
    let text = std::fs::read_to_string(&svg).unwrap_or_else(|e| panic!("no flame graph {}: {e}", svg.display()));
    assert!(text.trim_start().starts_with("<?xml"), "not XML: {}", &text[..text.len().min(200)]);
    assert!(text.contains("<svg") && text.trim_end().ends_with("</svg>"), "not an SVG document");
    assert!(text.contains("bad_handler"), "bad_handler not in the flame graph");
    assert!(text.contains("connections"), "counts are not named");
}

#[test]
fn unwritable_output_is_an_error_after_the_final_report() {
    let bin = fixture("conn_leak");
    let run = run_leaktrace(&[
        "check",
        "--for",
        "2s",
        "--interval",
        "1s",
        "--pprof",
        "/proc/leaktrace-no-such-dir/P.pb.gz",
        "--",
        bin.to_str().unwrap(),
    ]);
    assert_eq!(run.status, 1, "stderr: {}", run.stderr);
    assert!(run.stdout.contains("final report"), "the final report must still be printed: {}", run.stdout);
    let errors: Vec<_> = run.stderr.lines().filter(|l| l.starts_with("leaktrace: error:")).collect();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(errors[0].contains("cannot write pprof profile /proc/leaktrace-no-such-dir/P.pb.gz"), "{}", errors[0]);
}
