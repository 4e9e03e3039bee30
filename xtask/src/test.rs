//! `cargo xtask test [args...]`: builds, then runs the test suites of
//! tracer-common and tracer-user against the built leaktrace and fixtures.

use std::path::Path;

use anyhow::{Context, Result};

use crate::build;
use crate::cmd::{announce, cargo, exit_code, fixtures_bin, leaktrace_bin};

pub fn run(root: &Path, extra: &[String]) -> Result<i32> {
    build::run(root)?;
    let bin = leaktrace_bin(root);
    let fixtures = fixtures_bin(root);
    let mut cmd = cargo();
    cmd.current_dir(root)
        .env("LEAKTRACE_BIN", &bin)
        .env("LEAKTRACE_FIXTURES", &fixtures)
        .args(["test", "--release", "-p", "tracer-common", "-p", "tracer-user"])
        .args(extra);
    announce(&cmd);
    let status = cmd.status().context("running cargo test")?;
    if !status.success() {
        eprintln!("xtask test: FAILED ({status})");
    }
    Ok(exit_code(status))
}
