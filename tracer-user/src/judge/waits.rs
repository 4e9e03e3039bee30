//! Waits in progress -> findings: waiters grouped by where they wait in the
//! program's own code, and the queue rule that tells a drained pool (every
//! request stuck at the borrow) from an idle worker pool (every worker
//! waiting for its next job).

use std::collections::HashMap;

use crate::{
    judge::java_waits::{self, JavaWait},
    report::{Finding, Frame, Kind, Verdict, WaitInfo},
    stacks::{jvm, symbolize::OwnCode, SampleStack},
};

/// Waiters at one place at one instant, as a tracker saw them.
#[derive(Clone, Debug)]
pub struct WaitSample {
    /// The waiters' stack, innermost first.
    pub stack: SampleStack,
    /// `futex`, or a goroutine's wait reason.
    pub state: String,
    /// Waiting now with this stack.
    pub waiters: u64,
    /// Longest wait going on, seconds so far.
    pub longest_s: f64,
    /// Waits going on, seconds so far, summed.
    pub total_s: f64,
    /// Some waiter was waiting already at attach (times from attach).
    pub before_attach: bool,
}

/// Waiters at one site, at least, to be a queue: one thread waiting is not.
pub const QUEUE_MIN_WAITERS: u64 = 2;
/// The longest wait of a queue, at least, in seconds: a pool briefly
/// empty under a burst is not drained.
pub const QUEUE_MIN_WAIT_S: f64 = 1.0;
/// Own frames, at most, from the start function to the wait in an idle
/// wait: the start function's loop itself, or one helper it calls
/// (`worker_main -> queue_pop -> pthread_cond_wait`).
pub const IDLE_MAX_OWN_FRAMES: usize = 2;

/// Whether a waiter's stack is a queue (`true`) or an idle wait: an idle
/// wait is a worker waiting for work — the wait is at most
/// [`IDLE_MAX_OWN_FRAMES`] own frames into the thread's or goroutine's own
/// start function (only the runtime's entry frames outside it) — or a
/// library's own thread (no own frame at all). Anything else waits inside
/// work: deeper in the program's calls, or in code a library called (an
/// HTTP server's handler), which is what requests stuck at a pool do.
pub fn is_queue(own: &OwnCode, frames: &[Frame]) -> bool {
    // A Java thread's wait (walked from its frame anchor): a sleep, a pool
    // thread waiting for work or the JVM's own wait is never a queue; the
    // others are when the program's code is in the stack (a Java thread's
    // run loop is no entry frame: a worker's `run -> borrow` is one).
    if frames.first().is_some_and(jvm::is_java_frame) && !java_wait_may_queue(frames) {
        return false;
    }
    match own.own_depth(frames) {
        None => false,
        Some((own_frames, started_here)) => !(started_here && own_frames <= IDLE_MAX_OWN_FRAMES),
    }
}

fn java_wait_may_queue(frames: &[Frame]) -> bool {
    !matches!(java_waits::classify(frames), JavaWait::Sleep | JavaWait::Idle | JavaWait::Internal)
}

/// The wait state a finding is grouped by: a Java wait's kind
/// (`java-condition`, `java-sleep`…: a pool's borrowers and its holders'
/// sleeps at one method are two findings), else the tracker's state.
fn wait_state(sample: &WaitSample, frames: &[Frame]) -> String {
    if frames.first().is_some_and(jvm::is_java_frame) {
        return java_waits::classify(frames).label().to_string();
    }
    sample.state.clone()
}

/// One finding per site (and wait state) with waiters now: the stack shown
/// is the one with the most waiters; `queued` when the waiters are a queue
/// ([`is_queue`]), at least [`QUEUE_MIN_WAITERS`], and the longest has
/// waited [`QUEUE_MIN_WAIT_S`]; otherwise `steady`. `t` is the traced time.
pub fn wait_findings(samples: &[WaitSample], frames: &HashMap<SampleStack, Vec<Frame>>, t: f64, own: &OwnCode) -> Vec<Finding> {
    let mut by_site: HashMap<(String, String), Finding> = HashMap::new();
    // Per site: waiters of the stack shown.
    let mut shown: HashMap<(String, String), u64> = HashMap::new();
    let mut queue: HashMap<(String, String), bool> = HashMap::new();
    for s in samples.iter().filter(|s| s.waiters > 0) {
        let stack = frames.get(&s.stack).cloned().unwrap_or_default();
        let site = own.site(&stack);
        let state = wait_state(s, &stack);
        let key = (site.name.clone(), state.clone());
        *queue.entry(key.clone()).or_default() |= is_queue(own, &stack);
        let f = by_site.entry(key.clone()).or_insert_with(|| Finding {
            site: site.name.clone(),
            wait: Some(WaitInfo {
                wait_state: state.clone(),
                wait_role: "idle",
                longest_wait_s: 0.0,
                total_wait_s: 0.0,
                wait_share: 0.0,
                waiting_before_attach: false,
            }),
            oldest_age_s: Some(0.0),
            ..Finding::new(Kind::Wait, Verdict::Steady)
        });
        if shown.get(&key).is_none_or(|&n| s.waiters > n) {
            shown.insert(key.clone(), s.waiters);
            f.via = site.via;
            f.site_index = site.index;
            f.stack = stack;
        }
        f.live += s.waiters;
        let w = f.wait.as_mut().expect("set above");
        w.longest_wait_s = w.longest_wait_s.max(s.longest_s);
        w.total_wait_s += s.total_s;
        w.waiting_before_attach |= s.before_attach;
    }
    let mut out: Vec<Finding> = by_site
        .into_iter()
        .map(|(key, mut f)| {
            let is_queue = queue.get(&key).copied().unwrap_or(false);
            let w = f.wait.as_mut().expect("every wait finding has its info");
            w.wait_role = if is_queue { "queue" } else { "idle" };
            w.longest_wait_s = round3(w.longest_wait_s);
            w.total_wait_s = round3(w.total_wait_s);
            w.wait_share = if t > 0.0 { round3(w.total_wait_s / t) } else { 0.0 };
            f.oldest_age_s = Some(round3(w.longest_wait_s));
            if is_queue && f.live >= QUEUE_MIN_WAITERS && w.longest_wait_s >= QUEUE_MIN_WAIT_S {
                f.verdict = Verdict::Queued;
            }
            f
        })
        .collect();
    out.sort_by(|a, b| a.site.cmp(&b.site));
    out
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, module: &str) -> Frame {
        Frame { function: function.into(), file: None, line: None, module: Some(module.into()), addr: None, file_offset: None }
    }

    const EXE: &str = "/srv/pool_service";
    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

    fn native() -> OwnCode {
        OwnCode { executable: Some(EXE.into()), ..OwnCode::default() }
    }

    fn stack(own: &[&str]) -> Vec<Frame> {
        let mut v = vec![frame("__futex_abstimed_wait_common", LIBC), frame("pthread_cond_wait", LIBC)];
        v.extend(own.iter().map(|f| frame(f, EXE)));
        v.extend([frame("start_thread", LIBC), frame("clone3", LIBC)]);
        v
    }

    fn sample(id: u64, waiters: u64, longest: f64) -> WaitSample {
        WaitSample {
            stack: SampleStack::Addresses(vec![id]),
            state: "futex".into(),
            waiters,
            longest_s: longest,
            total_s: longest * waiters as f64,
            before_attach: true,
        }
    }

    #[test]
    fn idle_workers_and_queued_requests() {
        let own = native();
        assert!(!is_queue(&own, &stack(&["worker_main"])), "a worker's own loop");
        assert!(!is_queue(&own, &stack(&["queue_pop", "worker_main"])), "one helper into the worker");
        assert!(is_queue(&own, &stack(&["pool_borrow", "handle_request", "request_main"])));
        assert!(!is_queue(&own, &[frame("g_thread_pool_thread_proxy", "/usr/lib/libglib-2.0.so.0")]), "a library's thread");
        // A handler a library (an HTTP server) called: inside work.
        let go = OwnCode { executable: Some(EXE.into()), go: true, ..OwnCode::default() };
        let handler = vec![
            frame("runtime.gopark", EXE),
            frame("runtime.chanrecv1", EXE),
            frame("main.(*DBPool).Acquire", EXE),
            frame("main.queryHandler", EXE),
            frame("net/http.HandlerFunc.ServeHTTP", EXE),
            frame("net/http.(*conn).serve", EXE),
            frame("runtime.goexit", EXE),
        ];
        assert!(is_queue(&go, &handler));
        let worker = vec![frame("runtime.gopark", EXE), frame("runtime.chanrecv2", EXE), frame("main.(*Jobs).worker", EXE), frame("runtime.goexit", EXE)];
        assert!(!is_queue(&go, &worker));
    }

    #[test]
    fn java_waits_queue_only_when_waiting_for_a_resource() {
        let java = |names: &[&str]| names.iter().map(|n| frame(n, jvm::JAVA_MODULE)).collect::<Vec<_>>();
        let own = OwnCode::default();
        let park = ["jdk.internal.misc.Unsafe.park", "java.util.concurrent.locks.LockSupport.park"];
        let borrow = [&park[..], &["java.util.concurrent.locks.AbstractQueuedSynchronizer$ConditionObject.await", "org.apache.commons.pool2.impl.GenericObjectPool.borrowObject", "ReportJob.render", "ReportJob.run", "java.lang.Thread.run"]].concat();
        assert!(is_queue(&own, &java(&borrow)));
        let idle = [&park[..], &["java.util.concurrent.locks.AbstractQueuedSynchronizer$ConditionObject.await", "java.util.concurrent.ThreadPoolExecutor.getTask", "java.util.concurrent.ThreadPoolExecutor.runWorker", "java.lang.Thread.run"]].concat();
        assert!(!is_queue(&own, &java(&idle)));
        assert!(!is_queue(&own, &java(&["java.lang.Thread.sleep", "ReportJob.render", "ReportJob.run", "java.lang.Thread.run"])));
    }

    #[test]
    fn waiters_at_one_site_are_one_finding() {
        let own = native();
        let frames = HashMap::from([
            (SampleStack::Addresses(vec![1]), stack(&["pool_borrow", "handle_request", "request_main"])),
            (SampleStack::Addresses(vec![2]), stack(&["pool_borrow", "handle_report", "request_main"])),
            (SampleStack::Addresses(vec![3]), stack(&["worker_main"])),
        ]);
        let f = wait_findings(&[sample(1, 6, 9.0), sample(2, 2, 3.0), sample(3, 4, 9.0)], &frames, 10.0, &own);
        assert_eq!(f.len(), 2, "{f:?}");
        let borrow = f.iter().find(|f| f.site == "pool_borrow").unwrap();
        assert_eq!((borrow.verdict, borrow.live), (Verdict::Queued, 8));
        assert_eq!(borrow.stack[3].function, "handle_request", "the stack with the most waiters");
        let w = borrow.wait.as_ref().unwrap();
        assert_eq!((w.longest_wait_s, w.total_wait_s, w.wait_share, w.wait_role), (9.0, 60.0, 6.0, "queue"));
        let idle = f.iter().find(|f| f.site == "worker_main").unwrap();
        assert_eq!((idle.verdict, idle.wait.as_ref().unwrap().wait_role), (Verdict::Steady, "idle"));
    }

    #[test]
    fn one_waiter_or_a_short_wait_is_no_queue() {
        let own = native();
        let frames = HashMap::from([(SampleStack::Addresses(vec![1]), stack(&["pool_borrow", "handle_request", "request_main"]))]);
        assert_eq!(wait_findings(&[sample(1, 1, 30.0)], &frames, 30.0, &own)[0].verdict, Verdict::Steady);
        assert_eq!(wait_findings(&[sample(1, 5, 0.5)], &frames, 30.0, &own)[0].verdict, Verdict::Steady);
        assert!(wait_findings(&[sample(1, 0, 0.0)], &frames, 30.0, &own).is_empty());
    }
}
