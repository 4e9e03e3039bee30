//! The `leaktrace` binary: parses the command line and hands over to
//! [`leaktrace::session`]. Exit status: 0 ok, 3 `check` found a leak, 1 error,
//! 2 the command line is wrong (clap's errors and [`UsageError`]).

use std::process::ExitCode;

use clap::Parser;
use leaktrace::{
    child::{Held, HeldChild},
    cli::{Cli, Command, TraceOptions, UsageError},
    session,
};

fn main() -> ExitCode {
    leaktrace::child::raise_fd_limit();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            leaktrace::output::error(one_line(&e));
            ExitCode::from(if e.is::<UsageError>() { 2 } else { 1 })
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
        Command::Agent { selectors, keep_exited, settle, max_targets, max_cpu, max_rss, budget_window, opts } => {
            let budget = leaktrace::agent::budget::Budget { max_cpu_percent: max_cpu, max_rss_bytes: max_rss << 20, window: budget_window };
            let agent = leaktrace::agent::AgentOptions { selectors, keep_exited, settle, max_targets: max_targets as usize, budget };
            return run_agent(agent, opts);
        }
        Command::Check { pid, opts, cmd, fail_on_wait: f, fail_within: w } => {
            fail_within = w;
            if pid.is_none() && cmd.is_empty() {
                return Err(UsageError("check needs --pid PID or -- CMD [ARGS...]".into()).into());
            }
            fail_on_wait = f;
            (pid, opts, cmd, true)
        }
    };
    // Validate flags before starting anything.
    leaktrace::cli::trackers(&opts.track).map_err(UsageError)?;
    leaktrace::probes::preflight()?;

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // A busy port fails before a command starts or a probe attaches.
    let listener = match &opts.listen {
        Some(addr) => Some(rt.block_on(leaktrace::output::metrics::endpoint(addr, opts.web_config.as_deref()))?),
        None if opts.web_config.is_some() => return Err(UsageError("--web-config protects /metrics: it needs --listen".into()).into()),
        None => None,
    };
    let (pid, child): (u32, Option<Box<dyn HeldChild>>) = match pid {
        Some(pid) => (pid, None),
        None => {
            let json = opts.effective_format() == leaktrace::cli::Format::Json;
            let held = Held::spawn(&cmd, json)?;
            (held.pid(), Some(Box::new(held)))
        }
    };
    let outcome = rt.block_on(async {
        let outlet = leaktrace::output::Outlet::open(&opts, listener).await?;
        session::trace(pid, &opts, child, outlet, is_check, None).await
    })?;
    if let Some(status) = outcome.command_status.filter(|s| *s != 0) {
        // A command that fails on its own is not a program that passed.
        if is_check {
            anyhow::bail!("the command {} before the trace ended", describe_wait_status(status));
        }
        leaktrace::output::note(format!("the command {}", describe_wait_status(status)));
    }
    if is_check {
        let check = leaktrace::render::check::render_check(&outcome.report, &outcome.omitted, fail_on_wait, fail_within);
        leaktrace::output::write_stderr(&check.text);
        if check.failed {
            return Ok(ExitCode::from(3));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `leaktrace agent`: reports only on /metrics, until a signal or `--for`.
fn run_agent(agent: leaktrace::agent::AgentOptions, mut opts: TraceOptions) -> anyhow::Result<ExitCode> {
    leaktrace::cli::trackers(&opts.track).map_err(UsageError)?;
    if opts.pprof.is_some() || opts.flamegraph.is_some() {
        return Err(UsageError("agent serves /metrics only: --pprof and --flamegraph are for attach, run and check".into()).into());
    }
    leaktrace::probes::preflight()?;
    let addr = opts.listen.take().unwrap_or_else(|| leaktrace::cli::AGENT_LISTEN.to_string());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let endpoint = leaktrace::output::metrics::endpoint(&addr, opts.web_config.as_deref()).await?;
        leaktrace::agent::run(agent, opts, endpoint).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `exited with status 1`, `was killed by signal 11 (SIGSEGV)`.
fn describe_wait_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        return format!("exited with status {}", libc::WEXITSTATUS(status));
    }
    let sig = libc::WTERMSIG(status);
    // SAFETY: strsignal returns a static or thread-local string.
    let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(sig)) }.to_string_lossy().into_owned();
    format!("was killed by signal {sig} ({name})")
}
