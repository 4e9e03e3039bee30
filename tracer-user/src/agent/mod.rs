//! `leaktrace agent`: traces every process that matches `--match`
//! selectors, those running when it starts and those that exec later, and
//! serves them all on one /metrics with a `leaktrace_target_info` row each.
//!
//! New processes are seen at exec by the kernel side's exec watcher
//! (`process_exec` with `WATCH_EXECS`), picked up after `--settle` (a
//! process gone by then is skipped and counted) and traced by a session of
//! their own ([`crate::session::trace`]) on this thread. A session ends when
//! its target exits: its final report stays on /metrics for
//! `--keep-exited`, then its series are removed.

pub mod metrics;
pub mod select;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::{
    signal::unix::{signal, SignalKind},
    task::JoinHandle,
};
use tracer_common::process::{event, ProcessEvent};

use crate::{
    cli::TraceOptions,
    output::{self, Outlet},
    probes::{LoadSettings, Probes},
    render::prometheus::new_shared_report,
    session::{self, Outcome},
    trackers::{Counters, REGISTRY},
};
use crate::identity::{self, Identity};
use metrics::{Fleet, SharedFleet, Skip, Traced};
use select::{Candidate, Selector};

/// What `leaktrace agent` adds to the trace options.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub selectors: Vec<Selector>,
    /// How long an exited target's last report stays on /metrics.
    pub keep_exited: Duration,
    /// How long a process must live after its exec before it is traced.
    pub settle: Duration,
    /// Targets traced at once; more are skipped and counted.
    pub max_targets: usize,
}

/// The exec watcher: the eBPF object loaded without a target, only
/// `process_exec` attached, reporting every exec on the machine.
struct ExecWatcher {
    _probes: Probes,
    ring: RingBuf<MapData>,
    counters: Counters,
}

/// Ring size of the watcher's exec records (24 bytes each with the header):
/// ~10 000 execs between two polls 100 ms apart; more are lost and counted.
const WATCH_RING_BYTES: u32 = 256 * 1024;

impl ExecWatcher {
    fn start(opts: &TraceOptions) -> Result<Self> {
        let mut settings = LoadSettings::default();
        // No tracker runs in this load: every table minimal.
        for spec in REGISTRY {
            (spec.configure)(&mut settings, opts, false);
        }
        for map in ["STACKS", "STACK_FRAMES", "UNWIND_RULES", "UNWIND_MISSES", "UNWOUND_STACKS", "SYSCALL_SITES"] {
            settings.max_entries.push((map, 1));
        }
        settings.max_entries.push(("PROCESS_EVENTS", WATCH_RING_BYTES));
        settings.u32_globals.push(("WATCH_EXECS", 1));
        let mut probes = Probes::load(0, &settings)?;
        let ring = probes.take_map("PROCESS_EVENTS")?;
        let counters = Counters(probes.take_map("COUNTERS")?);
        probes.attach_tracepoints(&[("process_exec", "sched", "sched_process_exec")])?;
        Ok(Self { _probes: probes, ring, counters })
    }

    /// The tgids that exec'd since the last call.
    fn poll(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<ProcessEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a ProcessEvent; read unaligned.
            let ev: ProcessEvent = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const ProcessEvent) };
            if ev.kind == event::EXEC {
                out.push(ev.tgid);
            }
        }
        out
    }

    /// Exec records the ring could not hold.
    fn lost(&self) -> u64 {
        self.counters.sum(tracer_common::counter::LOST_RING)
    }
}

/// What /proc says a selector needs of `pid`; `None` when it is gone or a
/// kernel thread.
fn candidate(pid: u32) -> Option<Candidate> {
    let exe = crate::procfs::exe_path(pid)?.display().to_string();
    Some(Candidate { comm: crate::procfs::comm(pid), exe, cgroup: identity::cgroup_path(pid).unwrap_or_default() })
}

/// Every process running now (numeric entries of /proc).
fn running_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Runs the agent until SIGINT/SIGTERM or `--for`; `listener` is the
/// /metrics socket, bound before anything is loaded.
pub async fn run(agent: AgentOptions, opts: TraceOptions, listener: tokio::net::TcpListener) -> Result<()> {
    let names = crate::cli::trackers(&opts.track).map_err(anyhow::Error::msg)?;
    crate::probes::preflight()?;
    crate::privileges::check_agent(crate::probes::effective_caps())?;
    let mut watcher = ExecWatcher::start(&opts)?;
    let fleet = SharedFleet::default();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let _ = stopped.wait_for(|v| *v).await;
    };
    let registry = metrics::registry(fleet.clone(), opts.max_sites);
    let (bound, server) = output::metrics::serve_registry(listener, registry, shutdown).await?;
    output::note(format!(
        "agent: serving metrics at http://{bound}/metrics; tracking {} in processes matching {}",
        names.join(","),
        agent.selectors.iter().map(select::describe).collect::<Vec<_>>().join(" or ")
    ));
    let local = tokio::task::LocalSet::new();
    let result = local.run_until(watch(&agent, &opts, &mut watcher, &fleet)).await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    result
}

/// The agent's loop: picks targets up, reaps ended sessions, drops exited
/// targets' series after `keep_exited`.
async fn watch(agent: &AgentOptions, opts: &TraceOptions, watcher: &mut ExecWatcher, fleet: &SharedFleet) -> Result<()> {
    let start = Instant::now();
    let deadline = opts.duration.map(|d| start + d);
    let me = std::process::id();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sessions: HashMap<u32, JoinHandle<Result<Outcome>>> = HashMap::new();
    // Processes to look at: when, and whether an exec brought them (else
    // the scan at start).
    let mut pending: Vec<(u32, Instant, bool)> = running_pids().into_iter().map(|p| (p, start, false)).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut warned_full = false;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending::<()>().await,
                }
            } => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        for pid in watcher.poll() {
            // Matched as soon as it is seen (within 100 ms of its exec),
            // again when it is due.
            let selected = || candidate(pid).is_some_and(|c| agent.selectors.iter().any(|s| s.matches(&c)));
            if !sessions.contains_key(&pid) && !pending.iter().any(|(p, _, _)| *p == pid) && selected() {
                pending.push((pid, now + agent.settle, true));
            }
        }
        let due: Vec<(u32, bool)> = pending.iter().filter(|(_, at, _)| *at <= now).map(|(p, _, e)| (*p, *e)).collect();
        pending.retain(|(_, at, _)| *at > now);
        for (pid, exec) in due {
            if pid == me || sessions.contains_key(&pid) {
                continue;
            }
            let Some(c) = candidate(pid) else {
                // A match gone before it settled (or, at start, a kernel thread).
                if exec {
                    fleet.write().unwrap_or_else(|e| e.into_inner()).skip(Skip::ExitedEarly);
                }
                continue;
            };
            if !agent.selectors.iter().any(|s| s.matches(&c)) {
                continue;
            }
            if sessions.len() >= agent.max_targets {
                fleet.write().unwrap_or_else(|e| e.into_inner()).skip(Skip::MaxTargets);
                if !warned_full {
                    output::warn(format!("agent: --max-targets {} reached: pid {pid} ({}) and later matches are not traced (counted in leaktrace_agent_targets_skipped_total)", agent.max_targets, c.comm));
                    warned_full = true;
                }
                continue;
            }
            let report = new_shared_report();
            let mut o = opts.clone();
            o.duration = deadline.map(|d| d.saturating_duration_since(now).max(Duration::from_millis(1)));
            let outlet = Outlet::slot(report.clone());
            fleet.write().unwrap_or_else(|e| e.into_inner()).targets.insert(
                pid,
                Traced { identity: Identity::read(pid), report, exited_at: None },
            );
            sessions.insert(pid, tokio::task::spawn_local(async move { session::trace(pid, &o, None, outlet, true).await }));
        }
        reap(&mut sessions, fleet, now).await;
        let mut f = fleet.write().unwrap_or_else(|e| e.into_inner());
        f.targets.retain(|_, t| t.exited_at.is_none_or(|at| now.duration_since(at) < agent.keep_exited));
        f.execs_lost = watcher.lost();
    }
    // Every session saw the same signal (or deadline) and ends on its own.
    for (pid, handle) in sessions {
        if let Ok(Err(e)) = handle.await {
            output::warn(format!("agent: pid {pid}: {e:#}"));
        }
    }
    Ok(())
}

/// Sessions that ended: their targets are marked exited (their last report
/// stays for `keep_exited`); one that failed before its first report is
/// removed at once and counted.
async fn reap(sessions: &mut HashMap<u32, JoinHandle<Result<Outcome>>>, fleet: &SharedFleet, now: Instant) {
    let ended: Vec<u32> = sessions.iter().filter(|(_, h)| h.is_finished()).map(|(p, _)| *p).collect();
    for pid in ended {
        let Some(handle) = sessions.remove(&pid) else { continue };
        let result = handle.await;
        let mut f = fleet.write().unwrap_or_else(|e| e.into_inner());
        let reported = f.targets.get(&pid).is_some_and(|t| t.report.read().unwrap_or_else(|e| e.into_inner()).is_some());
        match result {
            Ok(Ok(_)) if reported => {
                if let Some(t) = f.targets.get_mut(&pid) {
                    t.exited_at = Some(now);
                }
            }
            other => {
                f.targets.remove(&pid);
                f.skip(Skip::AttachFailed);
                if let Ok(Err(e)) = other {
                    drop(f);
                    output::warn(format!("agent: cannot trace pid {pid}: {e:#}"));
                }
            }
        }
    }
}

impl Fleet {
    fn skip(&mut self, why: Skip) {
        *self.skipped.entry(why).or_default() += 1;
    }
}
