//! Replays core files of the Go fixtures at known states through the same
//! goroutine and map readers leaktrace uses on a live process, with a core
//! file as their memory: exact counts, no root, no kernel. The cores come
//! from `cargo xtask cores` (target/cores/, or LEAKTRACE_CORES); every
//! test skips, saying why, when they are absent.
//!
//! States: `goroutineleak -hold 50` (50 leaked keep-alive goroutines parked
//! in select, 50 closed ones gone, 4 pool workers parked in chan receive,
//! main parked in chan receive) and `mapgrow-go -fill 3000` (3000 inserts
//! into each map; `bounded` and `active` keep 2000).

use std::{path::PathBuf, sync::Arc};

use leaktrace::{
    binary::golang::{
        memory::{CoreImage, TargetMemory},
        GoRuntime,
    },
    stacks::SampleStack,
    trackers::{
        goroutines::GoroutineCollector,
        maps::{uses_swiss_maps, variable_count, MapVariable},
    },
};

/// Builds of every Go version (suffixes of the fixture names).
const BUILDS: &[&str] = &["", "122", "124", "125", "127", "127-stripped"];
const HOLD: u64 = 50;
const FILL: u64 = 3000;
const BOUND: u64 = 2000;

fn cores_dir() -> PathBuf {
    std::env::var_os("LEAKTRACE_CORES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/cores"))
}

/// The executable and its core, or `None` (after saying so) when absent.
fn core_of(name: &str) -> Option<(PathBuf, TargetMemory)> {
    let dir = cores_dir();
    let (exe, core) = (dir.join(name), dir.join(format!("{name}.core")));
    if !exe.exists() || !core.exists() {
        eprintln!("skipping {name}: {} absent (make it with `cargo xtask cores`)", core.display());
        return None;
    }
    let image = CoreImage::open(&core).unwrap();
    Some((exe, TargetMemory::core(0, Arc::new(image))))
}

#[test]
fn goroutines_by_go_statement_and_wait_reason() {
    for suffix in BUILDS {
        let name = format!("goroutineleak{suffix}");
        let Some((exe, mem)) = core_of(&name) else { continue };
        let names = GoRuntime::open(&exe).unwrap().unwrap();
        let bin = GoRuntime::open(&exe).unwrap().unwrap();
        let mut reader = GoroutineCollector::from_memory(bin, mem, 0).unwrap();
        let samples = reader.collect(1, true).unwrap();
        let mut by_site = std::collections::BTreeMap::new();
        for s in &samples {
            let SampleStack::Addresses(a) = &s.stack else { panic!("{name}: not addresses") };
            let site = names.symbols.pclntab.lookup(a[0]).map_or_else(|| format!("{:#x}", a[0]), |i| i.function);
            let reason = s.blocked.as_ref().map(|b| b.wait_reason.clone()).unwrap_or_default();
            by_site.insert(site, (s.live, reason));
        }
        let at = |site: &str| by_site.get(site).cloned().unwrap_or_else(|| panic!("{name}: no {site} in {by_site:?}"));
        assert_eq!(at("main.NewSession"), (HOLD, "select".to_string()), "{name}: the leaked keep-alives");
        assert_eq!(at("main.startPool"), (4, "chan receive".to_string()), "{name}: the pool");
        assert_eq!(at("runtime.main"), (1, "chan receive".to_string()), "{name}: main waits for a signal");
        let total: u64 = samples.iter().map(|s| s.live).sum();
        assert_eq!(total, HOLD + 4 + 1 + 1, "{name}: + os/signal's loop; {by_site:?}");
        eprintln!("{name}: {by_site:?}");
    }
}

#[test]
fn map_counts_of_named_maps() {
    for suffix in BUILDS {
        let name = format!("mapgrow-go{suffix}");
        let Some((exe, mem)) = core_of(&name) else { continue };
        let bin = GoRuntime::open(&exe).unwrap().unwrap();
        if suffix.ends_with("stripped") {
            // No symbol table: no variable names (the tracker reports the
            // maps unnamed, by their inserting stacks).
            assert!(bin.data.is_empty(), "{name}");
            continue;
        }
        let version = (bin.version.major, bin.version.minor);
        let swiss = uses_swiss_maps(&bin).unwrap();
        assert_eq!(swiss, version.1 >= 24, "{name}");
        let count = |var: &str, kind| {
            let d = bin.data.iter().find(|d| d.name == var).unwrap_or_else(|| panic!("{name}: no {var}"));
            variable_count(&mem, version, swiss, kind, d.addr).unwrap_or_else(|| panic!("{name}: {var} unreadable"))
        };
        assert_eq!(count("main.cache", MapVariable::Map), FILL, "{name}");
        assert_eq!(count("main.bounded", MapVariable::Map), BOUND, "{name}");
        assert_eq!(count("main.recent", MapVariable::Map), FILL, "{name}");
        assert_eq!(count("main.sessions", MapVariable::SyncMap), FILL, "{name}");
        let active = count("main.active", MapVariable::SyncMap);
        if version.1 >= 24 {
            assert_eq!(active, BOUND, "{name}: the trie drops deleted entries");
        } else {
            // Up to 1.23 a deleted key of the read-only map stays an
            // expunged entry until the dirty map is rebuilt.
            assert!((BOUND..=FILL).contains(&active), "{name}: active {active}");
        }
    }
}
