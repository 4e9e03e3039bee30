//! `cargo xtask demo`: builds, runs fixtures/bin/api-server and traces it
//! with `leaktrace attach` for 20 s.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::build;
use crate::cmd::{announce, exit_code, fixtures_bin, leaktrace_bin, stop_child, wait_ready};

pub fn run(root: &Path) -> Result<i32> {
    build::run(root)?;
    let server_path = fixtures_bin(root).join("api-server");
    let mut server_cmd = Command::new(&server_path);
    server_cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    announce(&server_cmd);
    let mut server = server_cmd
        .spawn()
        .with_context(|| format!("starting {}", server_path.display()))?;
    if let Err(e) = wait_ready(&mut server, "api-server", Duration::from_secs(15)) {
        stop_child(&mut server, "api-server");
        return Err(e);
    }
    let pid = server.id();
    eprintln!("demo: api-server is running as pid {pid}; tracing it for 20s");

    let mut lt = Command::new(leaktrace_bin(root));
    lt.args(["attach", "--pid", &pid.to_string(), "--for", "20s", "--interval", "5s"]);
    announce(&lt);
    let status = lt.status();
    stop_child(&mut server, "api-server");
    let status = status.context("running leaktrace")?;
    eprintln!("demo: leaktrace exited with {status}");
    Ok(exit_code(status))
}
