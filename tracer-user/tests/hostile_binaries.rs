//! Findings 1 and 12 of the reliability probe, replayed against the real
//! `leaktrace` with fixtures patched the way a hostile target's files
//! would be: a compressed `.debug_info` whose header claims 16 TiB (once
//! `memory allocation of 17592186044416 bytes failed` and an abort at
//! attach), and a `.gopclntab` function count whose table size wraps
//! around (once a panic under `--track maps` and a hang past `--for` under
//! `--track locks`). Each must now end on time, exit 0, and say in one
//! warning what it did not read.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use object::{Object, ObjectSection};

/// A copy of fixture `name` in a fresh directory, with the u64 at `at`
/// bytes into section `section` replaced by `value`.
fn patched(name: &str, section: &str, at: u64, value: u64) -> PathBuf {
    let mut data = std::fs::read(common::fixture(name)).unwrap();
    let off = {
        let elf = object::File::parse(&*data).unwrap();
        let sec = elf.section_by_name(section).unwrap_or_else(|| panic!("{name} has no {section}"));
        sec.file_range().unwrap().0 + at
    } as usize;
    data[off..off + 8].copy_from_slice(&value.to_le_bytes());
    let dir = std::env::temp_dir().join(format!("leaktrace-hostile-{}-{name}-{section}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Attaches for `secs` with `track`; checks the run ended on time, cleanly,
/// with `warning` on stderr. Returns the run.
fn attach(path: &Path, track: &str, secs: u64, warning: &str) -> common::Run {
    let target = common::start_path(path, &[]);
    let started = Instant::now();
    let pid = target.pid().to_string();
    let run = common::run_leaktrace(&["attach", "--pid", &pid, "--track", track, "--for", &format!("{secs}s"), "--json"]);
    let took = started.elapsed();
    let what = format!("{} --track {track}: status {}\nstderr:\n{}", path.display(), run.status, run.stderr);
    assert_eq!(run.status, 0, "{what}");
    assert!(!run.stderr.contains("panicked") && !run.stderr.contains("memory allocation"), "{what}");
    assert!(run.stderr.lines().any(|l| l.starts_with("leaktrace: warning: ") && l.contains(warning)), "{what}");
    // --for is obeyed: attach and detach cost seconds, not minutes.
    assert!(took < Duration::from_secs(secs + 30), "{what}: took {took:?}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    run
}

#[test]
fn a_compressed_section_claiming_16_tib_is_refused_not_allocated() {
    // Elf64_Chdr: ch_type, ch_reserved, then ch_size at 8.
    let bin = patched("connleak-go122", ".debug_info", 8, 1 << 44);
    let run = attach(&bin, "connections,tasks", 4, "its compression header claims 17592186044416 bytes");
    // Tracing went on: the leak is still found and named (from the pc table).
    let report = run.final_report();
    assert!(
        report["findings"].as_array().is_some_and(|f| f.iter().any(|f| f["kind"] == "connection")),
        "no connection finding: {}",
        common::summarize(&report)
    );
}

#[test]
fn a_wrapping_pclntab_function_count_is_refused_by_maps_and_locks() {
    // The function count is the word after the 8-byte header.
    let maps = patched("mapgrow-go122", ".gopclntab", 8, 1 << 61);
    attach(&maps, "maps", 3, ".gopclntab claims 2305843009213693952 functions");
    let locks = patched("lockpool-go127-stripped", ".gopclntab", 8, 1 << 61);
    attach(&locks, "locks", 3, ".gopclntab claims 2305843009213693952 functions");
}
