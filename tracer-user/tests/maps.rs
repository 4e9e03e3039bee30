//! The map tracker end to end: the real `leaktrace --track maps` against the
//! Go fixture `mapgrow` built with Go 1.19, 1.22 (classic maps), 1.24 and
//! 1.27 (Swiss tables), and a stripped 1.27 build (needs root). Versions run
//! in parallel inside one test to keep the suite short.

mod common;

use std::thread;

use common::*;
use serde_json::Value;

/// Traces `fixture` for `secs` seconds with the map tracker; the final report.
fn trace_maps(fixture: &str, args: &[&str], secs: u32) -> (Value, String) {
    let mut fixture_args = vec!["-start-ms", "1500"];
    fixture_args.extend_from_slice(args);
    // A memory limit the leak's time to exhaustion is judged against.
    let mut cmd = std::process::Command::new(common::fixture(fixture));
    cmd.args(&fixture_args).env("GOMEMLIMIT", "4GiB");
    let t = start_command(cmd);
    let pid = t.pid().to_string();
    let dur = format!("{secs}s");
    let run = run_leaktrace(&[
        "attach", "--pid", &pid, "--for", &dur, "--interval", "1s", "--format", "json", "--track", "maps",
    ]);
    assert_eq!(run.status, 0, "{fixture}: stderr: {}", run.stderr);
    (run.final_report(), run.stderr)
}

fn by_map<'a>(report: &'a Value, name: &str) -> Option<&'a Value> {
    report["findings"].as_array()?.iter().find(|f| f["map"] == name)
}

fn summary(report: &Value) -> String {
    let mut s = String::new();
    for f in report["findings"].as_array().into_iter().flatten() {
        s.push_str(&format!("\n  {} {} map={} live={} growth={}", f["verdict"], f["site"], f["map"], f["live"], f["growth_per_min"]));
    }
    s
}

/// The planted leaks are found with their variable, inserting function and
/// count; the bounded, cleared and store-delete look-alikes are seen and
/// are not leaks.
fn check_leaks(fixture: &str, report: &Value, sync_map_counted: bool) {
    let all = format!("{fixture}:{}", summary(report));
    let cache = by_map(report, "main.cache").unwrap_or_else(|| panic!("main.cache not reported:{all}"));
    assert_eq!(cache["kind"], "map", "{all}");
    assert_eq!(cache["verdict"], "leak", "{all}");
    assert_eq!(cache["site"], "main.cacheResponse", "{all}");
    assert!(functions(cache).iter().any(|f| f == "main.fillCache"), "{all}");
    // 2000 inserts a second for 10 s or more.
    assert!(cache["live"].as_u64().unwrap() >= 10_000, "{all}");
    assert!(cache["growth_per_min"].as_f64().unwrap() > 30_000.0, "{all}");
    // map[string]string: 34-byte slots at 6.5/8 load (classic), 33-byte
    // slots at 7/8 (Swiss tables, Go 1.24+); memory is what runs out.
    let per_entry = if matches!(fixture, "mapgrow-go" | "mapgrow-go122") { 42 } else { 38 };
    assert_eq!(cache["bytes_per_object"], per_entry, "{all}: {cache}");
    assert_eq!(cache["exhausts"]["resource"], "memory", "{all}: {cache}");

    let bounded = by_map(report, "main.bounded").unwrap_or_else(|| panic!("main.bounded not reported:{all}"));
    assert_ne!(bounded["verdict"], "leak", "{all}");
    assert_eq!(bounded["site"], "main.boundedPut", "{all}");
    assert!(bounded["live"].as_u64().unwrap() <= 2001, "bounded map counted wrong:{all}");
    let recent = by_map(report, "main.recent").unwrap_or_else(|| panic!("main.recent not reported:{all}"));
    assert_ne!(recent["verdict"], "leak", "{all}");
    // Cleared every 2 s at 2000 inserts a second.
    assert!(recent["live"].as_u64().unwrap() <= 4100, "cleared map counted wrong:{all}");

    let mut expected_leaks = vec!["main.cache"];
    if sync_map_counted {
        let sessions = by_map(report, "main.sessions").unwrap_or_else(|| panic!("main.sessions not reported:{all}"));
        assert_eq!(sessions["verdict"], "leak", "{all}");
        assert_eq!(sessions["site"], "main.storeSession", "{all}");
        assert!(sessions["live"].as_u64().unwrap() >= 10_000, "{all}");
        let active = by_map(report, "main.active").unwrap_or_else(|| panic!("main.active not reported:{all}"));
        assert_ne!(active["verdict"], "leak", "{all}");
        expected_leaks.push("main.sessions");
    }
    let mut leaks: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["verdict"] == "leak")
        .map(|f| f["map"].as_str().unwrap_or("?"))
        .collect();
    leaks.sort();
    expected_leaks.sort();
    assert_eq!(leaks, expected_leaks, "{all}");
    assert!(report["events"]["map"].as_u64().unwrap() > 0, "{all}");
    assert_eq!(report["lost"]["events"], 0, "{all}");
}

#[test]
fn go_map_leaks_are_found_on_every_go_version() {
    // (fixture, sync.Map counted)
    let cases = [("mapgrow-go", true), ("mapgrow-go122", true), ("mapgrow-go124", true), ("mapgrow-go127", true)];
    let handles: Vec<_> = cases
        .iter()
        .map(|&(fixture, sync_map)| thread::spawn(move || (fixture, sync_map, trace_maps(fixture, &[], 14))))
        .collect();
    for h in handles {
        let (fixture, sync_map, (report, _)) = h.join().expect("a version's trace panicked");
        check_leaks(fixture, &report, sync_map);
    }
}

#[test]
fn go_maps_without_leak_have_no_leak() {
    let handles: Vec<_> = ["mapgrow-go122", "mapgrow-go127"]
        .into_iter()
        .map(|fixture| thread::spawn(move || (fixture, trace_maps(fixture, &["-no-leak"], 12))))
        .collect();
    for h in handles {
        let (fixture, (report, _)) = h.join().expect("a version's trace panicked");
        let all = format!("{fixture}:{}", summary(&report));
        assert!(report["findings"].as_array().unwrap().iter().all(|f| f["verdict"] != "leak"), "{all}");
        // The same maps are seen, bounded.
        let cache = by_map(&report, "main.cache").unwrap_or_else(|| panic!("main.cache not reported:{all}"));
        assert!(cache["live"].as_u64().unwrap() <= 2001, "{all}");
    }
}

/// Every probe sits on an emulated instruction chosen by disassembly: the
/// `PUSHQ BP` of the prologue (Go 1.21+) or the `JBE` after the stack check
/// (Go 1.19), never on the single-stepped `CMPQ` at the symbol.
#[test]
fn probes_sit_on_cheap_prologue_instructions() {
    for (name, functions) in [
        ("mapgrow-go", &["runtime.hashGrow", "runtime.mapclear"][..]),
        ("mapgrow-go122", &["runtime.hashGrow", "runtime.mapclear"][..]),
        ("mapgrow-go124", &["internal/runtime/maps.(*table).split", "runtime.mapclear"][..]),
        ("mapgrow-go127-stripped", &["internal/runtime/maps.(*table).split", "runtime.mapclear"][..]),
    ] {
        let path = fixture(name);
        let fixture = name;
        let bytes = std::fs::read(&path).unwrap();
        let probes = leaktrace::trackers::maps::plan(&path).unwrap();
        for f in functions {
            let p = probes.iter().find(|p| p.function == *f).unwrap_or_else(|| panic!("{fixture}: no probe on {f}: {probes:?}"));
            let code = &bytes[p.file_offset as usize..];
            let cheap = if fixture == "mapgrow-go" { code[..2] == [0x0f, 0x86] } else { code[0] == 0x55 };
            assert!(cheap, "{fixture}: {f} probed at {:02x?}", &code[..4]);
        }
        if fixture != "mapgrow-go" && fixture != "mapgrow-go122" {
            assert!(probes.iter().any(|p| p.function.ends_with("]).expand")), "{fixture}: no sync.Map probe: {probes:?}");
        }
    }
}

/// Without a symbol table maps are named by address; the leak is still found.
#[test]
fn stripped_go_map_leak_is_found_by_address() {
    let (report, stderr) = trace_maps("mapgrow-go127-stripped", &[], 10);
    let all = summary(&report);
    assert!(stderr.contains("no symbol table"), "{stderr}");
    let leaks: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["verdict"] == "leak").collect();
    assert!(!leaks.is_empty(), "no leak:{all}");
    for l in &leaks {
        assert!(l["map"].as_str().unwrap().starts_with("0x"), "{all}");
        assert!(l["live"].as_u64().unwrap() >= 8_000, "{all}");
    }
}
