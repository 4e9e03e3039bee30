//! One tracing session: load, attach every tracker, sample every interval,
//! judge, report, detach. It loops over [`Tracker`]s and names none.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    agent::hub::Hub,
    child::HeldChild,
    cli::TraceOptions,
    judge::{self, Judge},
    lifecycle::Lifecycle,
    output::{self, Outlet},
    probes::{self, LoadSettings, Probes},
    procfs::{self, MemoryMap},
    report::{Finding, Lost, Report},
    stacks::Stacks,
    trackers::{Counters, Target, Trackers, REGISTRY},
};

/// How the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Duration,
    Signal,
    TargetExited,
    /// The reader of stdout went away (`attach ... | head`).
    OutputClosed,
}

/// What a finished session hands back to the CLI.
pub struct Outcome {
    pub report: Report,
    /// Findings of the final report cut by `--max-findings`: `check` judges
    /// them too.
    pub omitted: Vec<Finding>,
    pub end: EndReason,
    /// The command's wait status when leaktrace started it (`run`,
    /// `check -- CMD`) and it exited on its own.
    pub command_status: Option<i32>,
}

/// Everything a session holds while it traces: dropping it detaches.
struct Session {
    probes: Probes,
    trackers: Trackers,
    target: Target,
    lifecycle: Lifecycle,
    stacks: Stacks,
    counters: Counters,
    judge: Judge,
    comm: String,
    max_findings: usize,
    /// The findings the last report cut (`--max-findings`).
    omitted: Vec<Finding>,
    /// How often rings and the target's liveness are looked at.
    poll_every: Duration,
}

/// Traces `pid` until the duration ends, a signal comes, the target exits
/// or (unless `to_the_end`: `check`, whose verdict is its exit status)
/// nobody reads stdout any more.
/// `outlet`: where reports go (opened by the caller: stdout and `--listen`);
/// `hub`: the agent's, which its sessions' tracepoint programs go behind.
pub async fn trace(
    pid: u32,
    opts: &TraceOptions,
    mut child: Option<Box<dyn HeldChild>>,
    outlet: Outlet,
    to_the_end: bool,
    hub: Option<Hub>,
) -> Result<Outcome> {
    let names = crate::cli::trackers(&opts.track).map_err(anyhow::Error::msg)?;
    probes::preflight()?;
    procfs::check_target(pid)?;
    let mut s = Session::load(pid, opts, &names, child.as_ref().map(|c| c.program()), hub)?;
    // Syscall sites and probes into mapped objects before the programs run,
    // so that the first events already get their direct caller (attach);
    // `run` loads them once the command has exec'd.
    if child.is_none() {
        s.target.memory = MemoryMap::read(pid).unwrap_or_default();
        let mappings = s.target.memory.clone();
        s.sync_mappings(&mappings);
    }
    s.trackers.attach_tracepoints(&mut s.probes)?;
    if let Some(c) = child.as_mut() {
        // Probes by file (the libc the command will map) before its first
        // instruction.
        let program = c.program().to_path_buf();
        s.trackers.before_exec(&mut s.probes, &s.target, &program);
        // Returns once the command has exec'd; its libc appears a moment
        // later, mapped by the dynamic loader: watch for it closely so the
        // first events already get their direct caller.
        c.release()?;
        // What it exec'd (a command that already exited is judged as such).
        procfs::check_executable(std::path::Path::new(&format!("/proc/{pid}/exe")), &format!("{pid} ({})", procfs::comm(pid)))?;
        s.wait_for_libc(Duration::from_secs(2)).await;
    }
    let comm_at_start = procfs::comm(pid);
    s.comm = comm_at_start.clone();
    s.trackers.on_start(&mut s.probes, &s.target);

    output::note_attached(pid, &comm_at_start, &names, opts.duration);

    let (start, started_wall) = (Instant::now(), SystemTime::now());
    let deadline = opts.duration.map(|d| start + d);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut report_tick = tokio::time::interval_at(tokio::time::Instant::now() + opts.interval, opts.interval);
    // A slow interval (first symbolization of a large binary, a loaded
    // machine) must not be followed by a burst of samples a few ms apart.
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll_tick = tokio::time::interval(s.poll_every);
    // Rules missing for a new call path: when to learn them (Stacks::learn).
    let mut learn_at = tokio::time::Instant::now();

    // Sample at t=0 so growth is measured from attach.
    outlet.share(s.report(start, false, false).await?);
    let end = loop {
        tokio::select! {
            _ = sigint.recv() => break EndReason::Signal,
            _ = sigterm.recv() => break EndReason::Signal,
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending::<()>().await,
                }
            } => break EndReason::Duration,
            _ = tokio::time::sleep_until(learn_at), if s.stacks.unwinding() => learn_at = tokio::time::Instant::now() + s.stacks.learn(&mut s.target.memory),
            _ = poll_tick.tick() => {
                s.poll().await;
                let gone = child.as_mut().map(|c| c.reap()).unwrap_or(false);
                if gone || s.lifecycle.exited || !s.lifecycle.target_alive(pid) {
                    break EndReason::TargetExited;
                }
                if !to_the_end && outlet.stdout_closed() {
                    break EndReason::OutputClosed;
                }
            }
            _ = report_tick.tick() => {
                if let Ok(m) = MemoryMap::read(pid) {
                    s.target.memory.merge(&m);
                    s.sync_mappings(&m);
                }
                outlet.publish(s.report(start, false, false).await?);
            }
        }
    };

    if end == EndReason::OutputClosed {
        output::note("stdout was closed: ending the trace");
    }
    let alive = end != EndReason::TargetExited && procfs::is_alive(pid);
    let exited = !alive && end == EndReason::TargetExited;
    // After the target exits its objects vanish without end events: the
    // final report is the state when it exited (the kernel tables still hold
    // it), not a reconciliation to zero.
    s.target.alive = alive;
    let final_report = s.report(start, true, exited).await?;
    outlet.publish(final_report.clone());
    let mut command_status = None;
    if let Some(c) = child.as_mut() {
        if end == EndReason::TargetExited {
            command_status = c.wait_exit(Duration::from_secs(1));
        }
        c.terminate();
    }
    outlet.close().await;
    s.trackers.closing_notes().into_iter().chain(s.stacks.closing_note(&s.counters)).for_each(output::note);
    let omitted = std::mem::take(&mut s.omitted);
    let build_ids = output::export_build_ids(&final_report, opts, pid, &s.target.memory);
    drop(s);
    output::note(format!("detached from {pid}"));
    // After the final report is printed: a file that cannot be written is an
    // error (exit 1), but the report is not lost.
    output::write_exports(&final_report, &build_ids, opts, started_wall)?;
    Ok(Outcome { report: final_report, omitted, end, command_status })
}

impl Session {
    /// Loads the eBPF object with every tracker's settings, builds the
    /// trackers asked for and attaches the lifecycle programs.
    /// `program`: what a held child will exec (else `pid` runs already).
    fn load(pid: u32, opts: &TraceOptions, names: &[&'static str], program: Option<&std::path::Path>, hub: Option<Hub>) -> Result<Self> {
        let active = |name: &str| crate::cli::expand(names).contains(&name);
        let mut settings = LoadSettings::default();
        for spec in REGISTRY {
            (spec.configure)(&mut settings, opts, active(spec.name));
        }
        let unwind = opts.unwind == crate::cli::Unwind::EhFrame;
        Stacks::configure(&mut settings, unwind, crate::stacks::jvm::may_be_jvm(pid, program));
        let mut probes = Probes::load(pid, &settings)?;
        // The agent's: tracepoint programs behind its hub, a slower pace.
        let (poll_every, learn_idle) = if let Some(hub) = hub {
            probes.route_through(hub.seat(pid)?);
            (crate::agent::SESSION_PACE, crate::agent::SESSION_PACE)
        } else {
            (Duration::from_millis(100), crate::stacks::LEARN_SOON)
        };
        let target = Target { pid, memory: MemoryMap::default(), libc_loaded: false, alive: true };
        let mut trackers = Trackers::default();
        for spec in REGISTRY.iter().filter(|s| active(s.name)) {
            trackers.0.push((spec.new)(&mut probes, opts, &target)?);
        }
        trackers.preload(&mut probes)?;
        let mut stacks = Stacks::new(&mut probes, pid, unwind)?;
        stacks.learn_idle = learn_idle;
        let counters = Counters(probes.take_map("COUNTERS")?);
        let lifecycle = Lifecycle::attach(&mut probes)?;
        let judge = Judge::new(opts.interval, &opts.own);
        let (comm, max_findings, omitted) = (procfs::comm(pid), opts.max_findings, Vec::new());
        Ok(Self { probes, trackers, target, lifecycle, stacks, counters, judge, comm, max_findings, omitted, poll_every })
    }

    /// Hands newly read mappings to every tracker, and loads libc's syscall
    /// sites until a libc is there (late: `dlopen`, `run` before the loader).
    fn sync_mappings(&mut self, mappings: &MemoryMap) {
        let (pid, loaded) = (self.target.pid, self.target.libc_loaded);
        self.target.libc_loaded = self.stacks.sync_mappings(&mut self.probes, pid, mappings, loaded);
        self.trackers.on_mappings(&mut self.probes, &self.target, mappings);
    }

    /// Polls the target's memory map until its libc is mapped (and its sites
    /// loaded) or `limit` passes.
    async fn wait_for_libc(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        loop {
            if let Ok(m) = MemoryMap::read(self.target.pid) {
                self.target.memory.merge(&m);
                self.sync_mappings(&m);
                if self.target.libc_loaded || m.is_static() {
                    return;
                }
            }
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Rare events: the target's exec and exit, the trackers' rings.
    async fn poll(&mut self) {
        let changes = self.lifecycle.poll();
        self.trackers.poll();
        if let Some(at_ns) = changes.exec_at {
            // A new image: addresses of the old one mean nothing now.
            self.target.libc_loaded = false;
            self.stacks.on_exec();
            self.wait_for_libc(Duration::from_millis(500)).await;
            self.trackers.on_exec(&mut self.probes, &self.target, at_ns);
        }
    }

    /// Collects every tracker, resolves the stacks, judges and builds one report.
    async fn report(&mut self, start: Instant, is_final: bool, exited: bool) -> Result<Report> {
        let name = procfs::comm(self.target.pid);
        if !is_final && name != "?" {
            self.comm = name;
        }
        // An exit seen but not yet acted on: the tables stay as they were.
        self.poll().await;
        if self.lifecycle.exited {
            self.target.alive = false;
        }
        let t = start.elapsed().as_secs_f64();
        let now = probes::ktime_ns();
        let collected = self.trackers.collect(&mut self.probes, &self.target, &self.counters, now)?;
        self.judge.refresh_own_code(self.target.pid);
        let mut findings = self.judge.findings(&collected, &mut self.stacks.resolver, &self.target.memory, t).await;
        self.stacks.stripped.warn_once(&findings);
        let exhaustion = self.judge.exhaustion(&mut findings, self.target.pid, self.target.alive);
        self.trackers.on_findings(&mut self.probes, &self.target, &findings, &self.judge.own);
        self.omitted = judge::rank(&mut findings, self.max_findings);

        let tally = self.trackers.tally(&self.counters);
        use tracer_common::counter as c;
        // What was lost: the shared counters, then each tracker's own bounds.
        let lost = Lost {
            events: self.counters.sum(c::LOST_EVENTS) + self.counters.sum(c::LOST_RING) + tally.lost,
            stacks: self.counters.sum(c::LOST_STACKS),
            truncated_stacks: self.stacks.truncated(&self.counters),
        };
        Ok(Report {
            pid: self.target.pid,
            comm: self.comm.clone(),
            elapsed_s: (t * 10.0).round() / 10.0,
            is_final,
            exited: exited.then_some(true),
            findings,
            lost,
            events: tally.events.iter().map(|(k, n)| (k.as_str(), *n)).collect(),
            findings_omitted: self.omitted.len() as u64,
            exhaustion,
            untracked_frees: tally.untracked_frees,
        })
    }
}
