//! The table leads with what needs action: on the demo program (`cargo
//! xtask demo`'s api-server), only the leak and one folded line of steady
//! findings; `--all` lists them (needs root).

mod common;

use common::*;

/// Table lines that are finding rows (a verdict, then a kind or a count).
fn rows(table: &str) -> Vec<&str> {
    let text = &table[table.rfind("final report").expect("final report printed")..];
    text.lines()
        .filter(|l| ["leak ", "unclosed ", "growing ", "contended ", "steady "].iter().any(|v| l.starts_with(v)))
        .collect()
}

#[test]
fn demo_table_shows_only_the_leak_and_one_folded_line_unless_all() {
    let t = start("api-server", &[]);
    let pid = t.pid().to_string();
    let run = run_leaktrace(&["attach", "--pid", &pid, "--for", "8s", "--interval", "1s"]);
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    let r = rows(&run.stdout);
    assert_eq!(r.len(), 2, "expected the leak and one folded line:\n{}", run.stdout);
    assert!(r[0].starts_with("leak ") && r[0].contains("main.dialRedis"), "{}", run.stdout);
    assert!(r[1].starts_with("steady ") && r[1].contains("nothing to act on (--all lists them)"), "{}", run.stdout);
    // The steady pool, opened by main.newRedisPool through the same dialRedis,
    // is folded, not gone: --all lists it.
    assert!(!run.stdout.contains("main.newRedisPool"), "{}", run.stdout);
    let all = run_leaktrace(&["attach", "--pid", &pid, "--for", "4s", "--interval", "1s", "--all"]);
    assert_eq!(all.status, 0, "stderr: {}", all.stderr);
    let r = rows(&all.stdout);
    assert!(r.len() > 3, "--all lists every finding:\n{}", all.stdout);
    assert!(r.iter().all(|l| !l.contains("nothing to act on")), "{}", all.stdout);
    assert!(r.iter().any(|l| l.starts_with("steady ") && l.contains("runtime.main")), "{}", all.stdout);
}
