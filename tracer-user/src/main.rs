//! The `leaktrace` binary: parses the command line and hands over to
//! [`leaktrace::session`]. Exit status: 0 ok, 3 `check` found a leak, 1 error
//! (2 for bad flags, from clap).

use std::process::ExitCode;

use clap::Parser;
use leaktrace::{
    child::{Held, HeldChild},
    cli::{Cli, Command, TraceOptions},
    session,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("leaktrace: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// Errors are printed on one line: the outermost context and its causes.
fn one_line(e: &anyhow::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut fail_on_wait = None;
    let mut fail_within = None;
    let (pid, opts, cmd, is_check): (Option<u32>, TraceOptions, Vec<String>, bool) = match cli.command {
        Command::Attach { pid, opts } => (Some(pid), opts, Vec::new(), false),
        Command::Run { opts, cmd } => (None, opts, cmd, false),
        Command::Check { pid, opts, cmd, fail_on_wait: f, fail_within: w } => {
            fail_within = w;
            if pid.is_none() && cmd.is_empty() {
                anyhow::bail!("check needs --pid PID or -- CMD [ARGS...]");
            }
            fail_on_wait = f;
            (pid, opts, cmd, true)
        }
    };
    // Validate flags before starting anything.
    leaktrace::cli::trackers(&opts.track).map_err(anyhow::Error::msg)?;
    leaktrace::probes::preflight()?;

    let (pid, child): (u32, Option<Box<dyn HeldChild>>) = match pid {
        Some(pid) => (pid, None),
        None => {
            let json = opts.effective_format() == leaktrace::cli::Format::Json;
            let held = Held::spawn(&cmd, json)?;
            (held.pid(), Some(Box::new(held)))
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let outcome = rt.block_on(session::trace(pid, &opts, child))?;
    if is_check {
        let check = leaktrace::render::check::render_check(&outcome.report, fail_on_wait, fail_within);
        eprint!("{}", check.text);
        if check.failed {
            return Ok(ExitCode::from(3));
        }
    }
    Ok(ExitCode::SUCCESS)
}
