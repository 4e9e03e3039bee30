//! `leaktrace agent`: traces every process that matches `--match`
//! selectors, those running when it starts and those that exec later, and
//! serves them all on one /metrics with a `leaktrace_target_info` row each.
//!
//! New processes are seen at exec by the kernel side's exec watcher
//! (`process_exec` with `WATCH_EXECS`), picked up after `--settle` (a
//! process gone by then is skipped and counted) and traced by a session of
//! their own ([`crate::session::trace`]) on this thread. A session ends when
//! its target exits: its final report stays on /metrics for
//! `--keep-exited`, then its series are removed. Over its budget
//! (`--max-cpu`, `--max-rss`) it sheds targets ([`budget`]).

pub mod budget;
pub mod hub;
pub mod metrics;
pub mod select;

use std::{
    cell::Cell,
    collections::{HashMap, HashSet},
    rc::Rc,
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
use budget::{Budget, Meter, Metered};
use hub::Hub;
use metrics::{Fleet, SharedFleet, Skip, Traced, Untraced};
use select::{Candidate, Selector};

/// How often an agent's session looks at its target (rings, liveness) and,
/// while nothing is missed, at its unwind misses: 100 ms and 10 ms for
/// `attach`. With 50 targets, 20 wake-ups a second each were most of the
/// agent's CPU; an exit or exec is now seen within 0.5 s, and a burst of
/// new call paths after a quiet time waits up to 0.5 s for its first
/// learning (the miss queue holds 256; beyond, stacks are cut and counted).
pub const SESSION_PACE: Duration = Duration::from_millis(500);

/// What `leaktrace agent` adds to the trace options.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub selectors: Vec<Selector>,
    /// How long an exited target's last report stays on /metrics.
    pub keep_exited: Duration,
    /// How long a process must live after its exec before it is traced.
    pub settle: Duration,
    /// Targets traced at once; more are skipped and counted. Also the
    /// bound on untraced rows (shed or refused) kept on /metrics.
    pub max_targets: usize,
    pub budget: Budget,
}

/// The exec watcher: the eBPF object loaded without a target, only
/// `process_exec` attached, reporting every exec on the machine. The same
/// load carries the [`hub`] every target's tracepoint programs go behind.
struct ExecWatcher {
    hub: Hub,
    ring: RingBuf<MapData>,
    counters: Counters,
}

/// Ring size of the watcher's exec records (24 bytes each with the header):
/// ~10 000 execs between two polls 100 ms apart; more are lost and counted.
const WATCH_RING_BYTES: u32 = 256 * 1024;

impl ExecWatcher {
    fn start(opts: &TraceOptions, max_targets: u32) -> Result<Self> {
        let mut settings = LoadSettings::default();
        // No tracker runs in this load: every table minimal.
        for spec in REGISTRY {
            (spec.configure)(&mut settings, opts, false);
        }
        settings.minimal(&["STACKS", "STACK_FRAMES", "UNWIND_RULES", "UNWIND_MISSES", "UNWOUND_STACKS", "SYSCALL_SITES"]);
        settings.max_entries.push(("PROCESS_EVENTS", WATCH_RING_BYTES));
        settings.u32_globals.push(("WATCH_EXECS", 1));
        hub::configure(&mut settings, max_targets);
        let mut probes = Probes::load(0, &settings)?;
        let ring = probes.take_map("PROCESS_EVENTS")?;
        let counters = Counters(probes.take_map("COUNTERS")?);
        probes.attach_tracepoints(&[("process_exec", "sched", "sched_process_exec")])?;
        Ok(Self { hub: Hub::new(probes, max_targets)?, ring, counters })
    }

    /// The tgids that exec'd since the last call.
    fn poll(&mut self) -> Vec<u32> {
        crate::probes::drain_ring::<ProcessEvent>(&mut self.ring).into_iter().filter(|ev| ev.kind == event::EXEC).map(|ev| ev.tgid).collect()
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

/// Runs the agent until SIGINT/SIGTERM or `--for`; `endpoint` is the
/// /metrics socket, bound before anything is loaded.
pub async fn run(agent: AgentOptions, opts: TraceOptions, endpoint: output::metrics::Endpoint) -> Result<()> {
    let names = crate::cli::trackers(&opts.track).map_err(anyhow::Error::msg)?;
    crate::probes::preflight()?;
    crate::privileges::check_agent(crate::probes::effective_caps())?;
    let mut watcher = ExecWatcher::start(&opts, agent.max_targets as u32)?;
    let fleet = SharedFleet::default();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let _ = stopped.wait_for(|v| *v).await;
    };
    let registry = metrics::registry(fleet.clone(), opts.max_sites);
    let scheme = endpoint.scheme();
    let (bound, server) = output::metrics::serve_registry(endpoint, registry, shutdown).await?;
    output::note(format!(
        "agent: serving metrics at {scheme}://{bound}/metrics; tracking {} in processes matching {}",
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
    let mut meter = Meter::default();
    let mut next_reading = start;
    // The last whole window's verdict: new matches wait while over
    // (`deferred`, picked up again once under; at most --max-targets).
    let mut over_budget = false;
    let mut deferred: Vec<u32> = Vec::new();
    let mut warned_over = false;
    let mut refusals_said = HashSet::new();
    // CPU seconds spent picking targets up (left out of the budget).
    let pickup_cpu = Rc::new(Cell::new(0.0));
    let mut trim = false;
    let signalled = loop {
        tokio::select! {
            _ = sigint.recv() => break true,
            _ = sigterm.recv() => break true,
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending::<()>().await,
                }
            } => break false,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        for pid in watcher.poll() {
            // Matched as soon as it is seen (within 100 ms of its exec),
            // again when it is due.
            let selected = || candidate(pid).is_some_and(|c| agent.selectors.iter().any(|s| s.matches(&c)));
            // A new image: whatever was said of the old one (shed, refused) is over.
            {
                let mut f = fleet.write().unwrap_or_else(|e| e.into_inner());
                if f.targets.get(&pid).is_some_and(|t| t.untraced.is_some()) {
                    f.targets.remove(&pid);
                }
            }
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
            if over_budget {
                fleet.write().unwrap_or_else(|e| e.into_inner()).skip(Skip::OverBudget);
                if deferred.len() < agent.max_targets && !deferred.contains(&pid) {
                    deferred.push(pid);
                }
                if !warned_over {
                    output::warn(format!("agent: over budget: pid {pid} ({}) and later matches wait until it is under again (each put off is counted in leaktrace_agent_targets_skipped_total{{reason=\"over_budget\"}})", c.comm));
                    warned_over = true;
                }
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
            let busy_ns: std::sync::Arc<std::sync::atomic::AtomicU64> = Default::default();
            let mut o = opts.clone();
            // Whole milliseconds: the session says how long it traces.
            o.duration = deadline.map(|d| Duration::from_millis(d.saturating_duration_since(now).as_millis().max(1) as u64));
            let outlet = Outlet::slot(report.clone());
            fleet.write().unwrap_or_else(|e| e.into_inner()).targets.insert(
                pid,
                Traced { identity: Identity::read(pid), report: report.clone(), exited_at: None, untraced: None, busy_ns: busy_ns.clone() },
            );
            let hub = watcher.hub.clone();
            let traced = async move { session::trace(pid, &o, None, outlet, true, Some(hub)).await };
            sessions.insert(pid, tokio::task::spawn_local(Metered::new(traced, report, pickup_cpu.clone(), busy_ns)));
        }
        reap(&mut sessions, fleet, now, agent.max_targets, &mut refusals_said).await;
        if now >= next_reading {
            next_reading = now + Duration::from_secs(1);
            if std::mem::take(&mut trim) {
                // Shed sessions are torn down: give their freed memory back
                // to the OS, or RSS (and the RSS budget) keeps it.
                // SAFETY: glibc's malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
            }
            let (_, rss) = metrics::own_usage();
            meter.push(now, budget::process_cpu_s() - pickup_cpu.get(), rss, agent.budget.window);
            if let Some(spent) = meter.spent(&agent.budget) {
                over_budget = spent.over();
                if !over_budget {
                    pending.extend(deferred.drain(..).map(|p| (p, now, false)));
                }
                if over_budget && shed(&spent, agent, opts.interval, &mut sessions, fleet) {
                    // The next window starts once the shed sessions are torn
                    // down (their fds closed, maps unmapped): that is not
                    // steady cost either.
                    meter.reset();
                    next_reading = now + Duration::from_secs(2);
                    trim = true;
                }
            }
            fleet.write().unwrap_or_else(|e| e.into_inner()).targets.retain(|pid, t| t.untraced.is_none() || crate::procfs::is_alive(*pid));
        }
        let mut f = fleet.write().unwrap_or_else(|e| e.into_inner());
        f.targets.retain(|_, t| t.exited_at.is_none_or(|at| now.duration_since(at) < agent.keep_exited));
        f.execs_lost = watcher.lost();
        f.pickup_cpu_s = pickup_cpu.get();
    };
    // At the deadline every session ends on its own. On a signal they are
    // dropped (detached) without final reports: /metrics stops with the
    // agent, and 50 sessions making theirs in turn outlast a stop timeout.
    for (pid, handle) in sessions {
        if signalled {
            handle.abort();
        }
        if let Ok(Err(e)) = handle.await {
            output::warn(format!("agent: pid {pid}: {e:#}"));
        }
    }
    Ok(())
}

/// Over budget: stops tracing the targets [`budget::choose`] picks (their
/// sessions dropped: programs detached, the load freed), keeps their
/// identity rows as shed, says so in one line. Whether any was shed.
fn shed(
    spent: &budget::Spent,
    agent: &AgentOptions,
    interval: Duration,
    sessions: &mut HashMap<u32, JoinHandle<Result<Outcome>>>,
    fleet: &SharedFleet,
) -> bool {
    let mut f = fleet.write().unwrap_or_else(|e| e.into_inner());
    let standings: Vec<(u32, budget::Standing)> = sessions
        .keys()
        .filter_map(|pid| {
            let t = f.targets.get(pid)?;
            let report = t.report.read().unwrap_or_else(|e| e.into_inner());
            let busy = t.busy_ns.load(std::sync::atomic::Ordering::Relaxed);
            Some((*pid, budget::standing(report.as_ref(), interval, busy)))
        })
        .collect();
    let chosen = budget::choose(&standings, spent.need(&agent.budget, standings.len()));
    if chosen.is_empty() {
        return false;
    }
    let mut named = Vec::new();
    for pid in &chosen {
        if let Some(handle) = sessions.remove(pid) {
            handle.abort();
        }
        if let Some(t) = f.targets.get_mut(pid) {
            t.report = new_shared_report();
            t.untraced = Some(Untraced::Shed);
            named.push(format!("{pid} ({})", t.identity.comm));
        }
        f.shed_total += 1;
    }
    let more = named.len().saturating_sub(8);
    named.truncate(8);
    let budget = &agent.budget;
    output::warn(format!(
        "agent: over budget for {} (CPU {:.2} % of a core, --max-cpu {}; RSS {} MiB, --max-rss {}): stopped tracing {} target(s): {}{} (leaktrace_agent_shed_targets_total; their leaktrace_target_untraced{{reason=\"shed\"}} rows stay while they live)",
        humantime::format_duration(budget.window),
        spent.cpu_percent,
        budget.max_cpu_percent,
        spent.rss >> 20,
        budget.max_rss_bytes >> 20,
        chosen.len(),
        named.join(", "),
        if more > 0 { format!(" and {more} more") } else { String::new() },
    ));
    true
}

/// The one line that says why a target could not be traced, once per
/// kernel reason (an errno, else the innermost cause): `None` when said
/// already (later ones are only counted).
fn refusal_line(pid: u32, comm: &str, e: &anyhow::Error, said: &mut HashSet<String>) -> Option<String> {
    let errno = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>().and_then(|io| io.raw_os_error()));
    let key = errno.map(|n| n.to_string()).unwrap_or_else(|| e.root_cause().to_string());
    if said.len() >= 32 || !said.insert(key) {
        return None;
    }
    let why = if errno == Some(libc::E2BIG) {
        " (E2BIG: the kernel allows 64 BPF programs per tracepoint, and other tracers hold them: the agent itself puts at most two on each)"
    } else {
        ""
    };
    Some(format!(
        "agent: cannot trace pid {pid} ({comm}): {e:#}{why}; counted in leaktrace_agent_targets{{state=\"refused\"}}, later refusals for this reason are only counted"
    ))
}

/// Sessions that ended: their targets are marked exited (their last report
/// stays for `keep_exited`); one that failed is counted and, while the
/// process lives, kept as refused (at most `max_rows` untraced rows).
async fn reap(
    sessions: &mut HashMap<u32, JoinHandle<Result<Outcome>>>,
    fleet: &SharedFleet,
    now: Instant,
    max_rows: usize,
    refusals_said: &mut HashSet<String>,
) {
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
                f.skip(Skip::AttachFailed);
                let rows = f.targets.values().filter(|t| t.untraced.is_some()).count();
                let comm = match f.targets.get_mut(&pid) {
                    Some(t) if rows < max_rows && crate::procfs::is_alive(pid) => {
                        t.report = new_shared_report();
                        t.untraced = Some(Untraced::Refused);
                        t.identity.comm.clone()
                    }
                    _ => f.targets.remove(&pid).map(|t| t.identity.comm).unwrap_or_default(),
                };
                drop(f);
                if let Ok(Err(e)) = other {
                    if let Some(line) = refusal_line(pid, &comm, &e, refusals_said) {
                        output::warn(line);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_refusal_is_said_once_per_kernel_reason_in_one_line() {
        let e2big = || -> anyhow::Error {
            Err::<(), _>(std::io::Error::from_raw_os_error(libc::E2BIG))
                .context("cannot attach process_exit to tracepoint sched:sched_process_exit")
                .unwrap_err()
        };
        let mut said = HashSet::new();
        let line = refusal_line(42, "lt_idle", &e2big(), &mut said).unwrap();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("agent: cannot trace pid 42 (lt_idle): cannot attach process_exit to tracepoint sched:sched_process_exit: Argument list too long"), "{line}");
        assert!(line.contains("64 BPF programs per tracepoint"), "{line}");
        assert_eq!(refusal_line(43, "lt_idle", &e2big(), &mut said), None, "said once");
        let other = anyhow::anyhow!("no such process");
        assert!(refusal_line(44, "x", &other, &mut said).is_some_and(|l| !l.contains("E2BIG")));
    }
}
