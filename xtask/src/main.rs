//! `cargo xtask <command>`: setup, build, demo, test, bench, fixtures, vm-test.
//!
//! Every external command is printed before it runs. The repository root is
//! `CARGO_MANIFEST_DIR/..`.

mod bench;
mod build;
mod cmd;
mod cores;
mod demo;
mod fuzz;
mod safety;
mod setup;
mod soak;
mod test;
mod vm_test;

use std::env;

use anyhow::Result;

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup              install what is missing (apt packages, Rust toolchains,
                     bpf-linker 0.13.0) and mount tracefs; needs root
  build              setup, build leaktrace (release) and the fixtures
  fixtures           build the test fixtures into fixtures/bin
  demo               build, run fixtures/bin/api-server and trace it for 20s
  test [args...]     build, then cargo test --release -p tracer-common -p tracer-user [args...]
                     (e.g. `cargo xtask test -- --nocapture`)
  bench [--iterations N] [--runs N]   (defaults 10000, 7)
                     build, then time conn_bench untraced vs traced by leaktrace
  bench tasks [--runs N] [--goroutines N] [--threads N]   (defaults 5, 2000000, 20000)
                     goroutine churn (Go) and thread churn (C), untraced vs
                     `leaktrace attach --track tasks` (and 2 bare Go uprobes)
  bench maps [--rounds N] [--ms MS]   (defaults 5, 2000)
                     build, then time an insert-heavy Go program (Go 1.22, 1.27)
                     untraced, under `leaktrace --track maps`, and with a
                     uprobe on every map insert
  bench allocations [--rounds N] [--micro N] [--mixed M] [--live K]   (defaults 5, 200000, 2000, 100000)
                     malloc/free cost: untraced, entry floor, bpftrace
                     memleak-style, leaktrace; daemon CPU/RSS at K live blocks
  bench locks [--runs N]            pthread mutex cost: untraced, leaktrace --track locks, pmlock-style bpftrace (default 7 runs)
  vm-test [--kernel 5.10|6.1|6.12|unstable|ci|all]   (default ci = 6.1,unstable)
                     build, fetch Debian cloud kernels (cached in .cache/vm;
                     5.10 from Debian 11, unstable = the newest Debian ships,
                     through private apt lists), boot each in QEMU (TCG) with
                     an initramfs that runs `leaktrace check` on a leaking and
                     a clean fixture per tracker (connections, threads, locks,
                     allocations: 3 and 0); 5.10 must be refused with one
                     `kernel too old` line and exit 1; logs in target/vm/
  fuzz [--seconds N] [--target NAME]   (default 60 s per target)
                     cargo-fuzz every parser of untrusted bytes (ELF, Go
                     build info, pc table, DWARF, x86 analyses) on the
                     pinned nightly, seeded from the fixtures; crashes in
                     tracer-user/fuzz/artifacts/
  cores              core files (gcore) of goroutineleak -hold and mapgrow
                     -fill, every Go build, into target/cores/ (replayed by
                     `cargo test -p tracer-user --test cores`)
  safety [--minutes N | --seconds N]   (default 10 minutes per Go build)
                     every Go build of the workload fixture traced by every
                     tracker that applies (connections,tasks,maps,locks):
                     each round's checksum must equal the untraced one
  soak [--minutes N]  (default 60)
                     build, then trace api-server (default trackers) and
                     alloc_leak (--track allocations,locks) for N minutes
                     while Prometheus scrapes /metrics every second; judge
                     leaktrace's RSS by its slope over the second half;
                     samples and logs in target/soak/

environment:
  XTASK_NO_BUILD=1   skip setup and all builds (use what is already built)";

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let code = match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &[String]) -> Result<i32> {
    let Some(command) = args.first() else {
        eprintln!("{USAGE}");
        return Ok(2);
    };
    let rest = &args[1..];
    let root = cmd::repo_root()?;
    match command.as_str() {
        "setup" => setup::run(&root).map(|_| 0),
        "build" => build::run(&root).map(|_| 0),
        "fixtures" => build::fixtures(&root).map(|_| 0),
        "demo" => demo::run(&root),
        "test" => test::run(&root, rest),
        "bench" => bench::run(&root, rest).map(|_| 0),
        "vm-test" => vm_test::run(&root, rest),
        "soak" => soak::run(&root, rest),
        "fuzz" => fuzz::run(&root, rest),
        "cores" => cores::run(&root),
        "safety" => safety::run(&root, rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => {
            eprintln!("xtask: unknown command `{other}`\n\n{USAGE}");
            Ok(2)
        }
    }
}
