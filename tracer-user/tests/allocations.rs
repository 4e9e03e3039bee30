//! The allocation tracker end to end: the real `leaktrace` against C, C++
//! and statically linked programs with planted heap leaks and busy
//! look-alikes (needs root).

mod common;

use common::*;
use serde_json::Value;

fn trace(fixture: &str, fixture_args: &[&str], extra: &[&str], secs: u32) -> Value {
    let t = start(fixture, fixture_args);
    let pid = t.pid().to_string();
    let dur = format!("{secs}s");
    let mut args = vec![
        "attach", "--pid", &pid, "--for", &dur, "--interval", "1s", "--format", "json", "--track", "allocations",
    ];
    args.extend_from_slice(extra);
    let run = run_leaktrace(&args);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    run.final_report()
}

fn leaks(report: &Value) -> Vec<&Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").collect()
}

/// Sum of `live` and `live_bytes` over the findings whose stack has `func`.
fn live_of(report: &Value, func: &str) -> (u64, u64) {
    findings_with(report, func).iter().fold((0, 0), |(n, b), f| {
        (n + f["live"].as_u64().unwrap(), b + f["live_bytes"].as_u64().unwrap())
    })
}

/// keep_malloc's blocks, seen by malloc's result points (glibc's arena or
/// single-thread path, and a chunk it mmaps for itself): exact, and the
/// allocator's own mmap of the 1 MiB chunk is not counted a second time.
fn assert_malloc_paths_exact(report: &Value, all: &str) {
    assert_eq!(live_of(report, "keep_malloc"), (3, 2 * 2000 + (1 << 20)), "{all}");
    let big: Vec<&Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["live_bytes"].as_u64().unwrap_or(0) >= 1 << 20)
        .collect();
    assert_eq!(big.len(), 1, "the 1 MiB chunk counted twice:{all}");
}

fn app_site(report: &Value, i: usize) -> String {
    report["findings"][i]["site"].as_str().unwrap_or("").to_string()
}

#[test]
fn c_heap_leak_is_named_by_its_helper_and_lookalikes_are_not_leaks() {
    let report = trace("alloc_leak", &[], &[], 12);
    let all = summarize(&report);
    let leaks = leaks(&report);
    assert_eq!(leaks.len(), 1, "exactly one leak expected:{all}");
    // The top finding is the leak, named by the helper that called malloc
    // (the frame an entry probe's walk would skip), then its caller.
    let top = &report["findings"][0];
    assert_eq!(top["verdict"], "leak", "{all}");
    assert_eq!(top["kind"], "allocation", "{all}");
    assert_eq!(app_site(&report, 0), "make_record", "{all}");
    let funcs = functions(top);
    let at = funcs.iter().position(|f| f == "make_record").unwrap();
    assert_eq!(funcs.get(at + 1).map(String::as_str), Some("handle_request"), "{all}");
    // ~50 records a second, 128..383 bytes each.
    assert!(top["live"].as_u64().unwrap() >= 300, "{all}");
    assert!(top["growth_per_min"].as_f64().unwrap() > 1500.0, "{all}");
    assert!(top["growth_bytes_per_min"].as_f64().unwrap() > 200_000.0, "{all}");
    assert!(top["oldest_age_s"].as_f64().unwrap() > 8.0, "{all}");
    // Churn through the same helper: never a leak, nothing much live.
    for f in findings_with(&report, "scratch_work") {
        assert_ne!(f["verdict"], "leak", "churn judged a leak:{all}");
        assert!(f["live"].as_u64().unwrap() <= 8, "{all}");
    }
    // The start-up table: steady, exactly its 256 rows and the index.
    let (n, bytes) = live_of(&report, "load_table");
    assert_eq!(n, 257, "{all}");
    assert!(bytes >= 256 * 48 + 2048, "{all}");
    assert!(findings_with(&report, "load_table").iter().all(|f| f["verdict"] == "steady"), "{all}");
    // The realloc'd buffer: one block of 256 KiB, steady once it stopped.
    let log = findings_with(&report, "log_append");
    assert_eq!(log.len(), 1, "{all}");
    assert_eq!(log[0]["live"], 1, "{all}");
    assert_eq!(log[0]["live_bytes"], 256 * 1024, "{all}");
    assert_eq!(log[0]["verdict"], "steady", "{all}");
    // Exact semantics: calloc (a failed one not counted), posix_memalign,
    // aligned_alloc, memalign, realloc(NULL, n), realloc(p, 0), a move.
    assert_eq!(live_of(&report, "keep_calloc"), (4, 4000), "{all}");
    assert_eq!(live_of(&report, "keep_memalign"), (4, 2 * 4096 + 1024 + 512), "{all}");
    assert_eq!(live_of(&report, "keep_realloc"), (2, 300 + 700), "{all}");
    assert_malloc_paths_exact(&report, &all);
    assert!(findings_with(&report, "keep_freed").is_empty(), "freed blocks still live:{all}");
    assert!(report["events"]["allocation"].as_u64().unwrap() > 20_000, "churn not seen:{all}");
    assert_eq!(report["lost"]["events"], 0, "{all}");
    assert_eq!(report["lost"]["stacks"], 0, "{all}");
    assert!(report["untracked_frees"].is_u64(), "{all}");
}

/// A single-threaded program takes other paths through glibc's malloc (no
/// arena lock; the size is stored by a size point before `_int_malloc`):
/// the leak and the exact blocks are the same.
#[test]
fn single_threaded_malloc_paths_are_exact() {
    let report = trace("alloc_leak", &["--no-churn"], &[], 6);
    let all = summarize(&report);
    let leaks = leaks(&report);
    assert_eq!(leaks.len(), 1, "exactly one leak expected:{all}");
    assert_eq!(app_site(&report, 0), "make_record", "{all}");
    assert_malloc_paths_exact(&report, &all);
    assert_eq!(live_of(&report, "keep_realloc"), (2, 300 + 700), "{all}");
    assert!(findings_with(&report, "keep_freed").is_empty(), "freed blocks still live:{all}");
    assert_eq!(report["lost"]["events"], 0, "{all}");
}

#[test]
fn c_heap_fixture_without_leak_has_no_leak() {
    let report = trace("alloc_leak", &["--no-leak"], &[], 8);
    let all = summarize(&report);
    assert!(leaks(&report).is_empty(), "no leak expected:{all}");
    assert!(findings_with(&report, "handle_request").is_empty(), "{all}");
    assert_eq!(live_of(&report, "load_table").0, 257, "{all}");
}

#[test]
fn cpp_new_without_delete_is_named_by_the_caller_of_new() {
    let report = trace("alloc_new", &[], &[], 10);
    let all = summarize(&report);
    let leaks = leaks(&report);
    assert_eq!(leaks.len(), 1, "exactly one leak expected:{all}");
    assert_eq!(app_site(&report, 0), "Session::open(unsigned long)", "{all}");
    let funcs = functions(&report["findings"][0]);
    let at = funcs.iter().position(|f| f == "Session::open(unsigned long)").unwrap();
    assert_eq!(funcs.get(at + 1).map(String::as_str), Some("run_loop(int, bool)"), "{all}");
    assert!(report["findings"][0]["live_bytes"].as_u64().unwrap() >= 200 * 200, "{all}");
    for f in findings_with(&report, "parse_message(unsigned long)") {
        assert_ne!(f["verdict"], "leak", "new/delete churn judged a leak:{all}");
    }
}

#[test]
fn static_binary_is_traced_with_alloc_lib() {
    let exe = fixture("alloc_static");
    let report = trace("alloc_static", &[], &["--alloc-lib", exe.to_str().unwrap()], 8);
    let all = summarize(&report);
    let mut sites: Vec<String> = leaks(&report).iter().map(|f| f["site"].as_str().unwrap().to_string()).collect();
    sites.sort();
    // Static glibc's malloc: the stash leak, and the xa_ allocator's blocks
    // (made by malloc inside xa_malloc).
    assert_eq!(sites, vec!["stash", "xa_malloc"], "{all}");
    let stash = findings_with(&report, "remember");
    assert_eq!(stash.len(), 1, "{all}");
    assert_eq!(functions(stash[0]).first().map(String::as_str), Some("stash"), "{all}");
    for f in findings_with(&report, "scratch").into_iter().chain(findings_with(&report, "cache_probe")) {
        assert_ne!(f["verdict"], "leak", "churn judged a leak:{all}");
    }
}

#[test]
fn prefixed_allocator_is_traced_with_alloc_prefix() {
    let exe = fixture("alloc_static");
    let report = trace("alloc_static", &[], &["--alloc-lib", exe.to_str().unwrap(), "--alloc-prefix", "xa_"], 8);
    let all = summarize(&report);
    let leaks = leaks(&report);
    assert_eq!(leaks.len(), 1, "exactly one leak expected:{all}");
    assert_eq!(leaks[0]["site"], "xa_block", "{all}");
    assert!(functions(leaks[0]).iter().any(|f| f == "cache_put"), "{all}");
    // Only the xa_ functions are probed: plain malloc's leak is not seen.
    assert!(findings_with(&report, "remember").is_empty(), "{all}");
    for f in findings_with(&report, "cache_probe") {
        assert_ne!(f["verdict"], "leak", "{all}");
    }
}

#[test]
fn sampled_tracking_still_finds_the_leak_with_scaled_totals() {
    let report = trace("alloc_leak", &[], &["--alloc-sample-bytes", "1024"], 10);
    let all = summarize(&report);
    let leaks = leaks(&report);
    assert_eq!(leaks.len(), 1, "exactly one leak expected:{all}");
    assert_eq!(leaks[0]["site"], "make_record", "{all}");
    // ~50 records/s of ~265 bytes: ~13 KB/s; scaled estimates are unbiased
    // but noisy: within a factor of two.
    let bytes = leaks[0]["live_bytes"].as_f64().unwrap();
    let secs = report["elapsed_s"].as_f64().unwrap();
    let expected = 50.0 * 265.0 * secs;
    assert!(bytes > expected / 2.0 && bytes < expected * 2.0, "bytes {bytes} vs ~{expected}:{all}");
    // Blocks of 1 KiB or more are always tracked: the log buffer exactly.
    assert_eq!(live_of(&report, "log_append"), (1, 256 * 1024), "{all}");
}

#[test]
fn run_mode_sees_allocations_from_the_first_instruction() {
    let exe = fixture("alloc_leak");
    let run = run_leaktrace(&[
        "run", "--for", "6s", "--interval", "1s", "--format", "json", "--track", "allocations", "--", exe.to_str().unwrap(),
    ]);
    assert!(run.status == 0, "stderr: {}", run.stderr);
    let report = run.final_report();
    let all = summarize(&report);
    assert!(leaks(&report).iter().any(|f| f["site"] == "make_record"), "{all}");
    // Everything the program allocated was seen: frees never hit unknown blocks.
    assert_eq!(report["untracked_frees"], 0, "{all}");
}

#[test]
fn full_block_table_is_counted_as_lost_and_nothing_beyond_it_is_live() {
    let report = trace("alloc_leak", &[], &["--max-allocations", "200"], 5);
    let all = summarize(&report);
    assert!(report["lost"]["events"].as_u64().unwrap() > 0, "no loss counted:{all}");
    let live: u64 = report["findings"].as_array().unwrap().iter().map(|f| f["live"].as_u64().unwrap()).sum();
    assert!(live <= 200, "more live than the table holds ({live}):{all}");
}

#[test]
fn missing_alloc_lib_is_a_one_line_error() {
    let t = start("alloc_leak", &[]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "2s", "--track", "allocations", "--alloc-lib", "/no/such/lib.so"]);
    assert_eq!(run.status, 1, "stderr: {}", run.stderr);
    assert!(run.stderr.contains("--alloc-lib /no/such/lib.so: no such file"), "stderr: {}", run.stderr);
}
