//! Which frame names a finding: the program's own code, with the library it
//! went through (`via`). Real libraries and servers from Debian: a gin
//! service (GOPATH build against Debian's gin and redigo) talking to a
//! redis-server the test starts on a free loopback port (needs root).

mod common;

use common::*;

/// Connection findings whose site is `site`.
fn at_site<'a>(report: &'a serde_json::Value, site: &str) -> Vec<&'a serde_json::Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "connection" && f["site"] == site)
        .collect()
}

/// The handler that never closes its redigo connection is the site, via
/// redigo, and `unclosed` (Go's finalizers close them at some GC, so they
/// never pile up into a leak); `check` fails on it and names the handler.
/// The pooled look-alike, also dialled through redigo, closes its own.
#[test]
fn gin_handler_dialing_redigo_is_the_site_via_redigo_unclosed_and_the_pool_is_not() {
    let redis = start_redis();
    let t = start("gin-redis", &["-redis", &redis.addr]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["check", "--pid", &pid, "--for", "8s", "--interval", "1s", "--format", "json"]);
    assert_eq!(run.status, 3, "check must fail on unclosed; stderr: {}", run.stderr);
    assert!(
        run.stderr.contains("UNCLOSED connection at main.getProfile via github.com/gomodule/redigo/redis.Dial"),
        "{}",
        run.stderr
    );
    let report = run.final_report();
    let all = summarize(&report);
    // The handler that forgot Close, not redigo's DialContext, names the finding.
    let handler = at_site(&report, "main.getProfile");
    assert_eq!(handler.len(), 1, "one finding at the handler expected:{all}");
    let h = handler[0];
    assert_eq!(h["via"], "github.com/gomodule/redigo/redis.Dial", "{all}");
    assert_eq!(h["peer"], redis.addr.as_str(), "{all}");
    assert!(h["created"].as_u64().unwrap() >= 50, "too few dials seen:{all}");
    assert_eq!(h["verdict"], "unclosed", "{all}");
    let (ended, by_gc) = (h["ended"].as_u64().unwrap(), h["ended_by_finalizer"].as_u64().unwrap());
    assert!(by_gc * 2 > ended && by_gc >= 5, "finalizer closes not told apart: {by_gc} of {ended}:{all}");
    let funcs = functions(h);
    let site_at = funcs.iter().position(|f| f == "main.getProfile").unwrap();
    assert!(funcs[..site_at].iter().any(|f| f == "github.com/gomodule/redigo/redis.DialContext"), "{all}");
    // No finding is named by redigo itself.
    assert!(
        report["findings"].as_array().unwrap().iter().all(|f| !f["site"].as_str().unwrap().contains("redigo")),
        "a redigo frame names a finding:{all}"
    );
    // The pooled look-alike: its Dial func is the site (the innermost own
    // frame), via redigo too; it is seen and not a leak.
    let pooled = at_site(&report, "main.newPool.func1");
    assert!(!pooled.is_empty(), "pool connections not seen:{all}");
    assert!(pooled.iter().map(|p| p["ended"].as_u64().unwrap()).sum::<u64>() >= 20, "the pool closes too little to compare:{all}");
    for p in &pooled {
        assert_eq!(p["via"], "github.com/gomodule/redigo/redis.Dial", "{all}");
        assert!(functions(p).iter().any(|f| f == "main.getCached"), "{all}");
        assert_ne!(p["verdict"], "leak", "the pool is judged a leak:{all}");
        assert_ne!(p["verdict"], "unclosed", "the pool closes its connections:{all}");
        assert_eq!(p["ended_by_finalizer"], 0, "{all}");
    }
    // Standard-library-only paths have no via: the load generator's HTTP client.
    for f in report["findings"].as_array().unwrap() {
        if f["site"] == "main.load" {
            assert!(f.get("via").is_none(), "{all}");
        }
    }
}

/// `--own PREFIX` replaces the rule: with redigo declared own code, its
/// innermost frame names the findings, the handler's and the pool's.
#[test]
fn own_prefix_overrides_what_counts_as_own_code() {
    let redis = start_redis();
    let t = start("gin-redis", &["-redis", &redis.addr, "-cached-ms", "20"]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&[
        "attach", "--pid", &pid, "--for", "4s", "--interval", "1s", "--format", "json", "--own", "github.com/gomodule/",
    ]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let report = run.final_report();
    let all = summarize(&report);
    for func in ["main.getProfile", "main.getCached"] {
        let f = findings_with(&report, func);
        assert!(!f.is_empty(), "no finding through {func}:{all}");
        assert_eq!(f[0]["site"], "github.com/gomodule/redigo/redis.DialContext", "{all}");
    }
}
