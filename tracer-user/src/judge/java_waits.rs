//! Locks of a JVM are Java waits. A Java thread's futex word is its own
//! `Parker` (`LockSupport.park`: j.u.c locks and conditions) or `ParkEvent`
//! (`synchronized`, `Object.wait`, `Thread.sleep`), whatever it waits for:
//! one word per thread, never shared. So the lock tracker's per-word
//! samples of a JVM (kind "java") are regrouped here by what the waiter's
//! Java frames say: the kind of wait and the wait site (the site rule's
//! first frame outside the JDK). A wake lands on the waiter's word, so the
//! holders (the wakers) of a word join the groups of that word's waiters.
//!
//! Not locks, dropped: `Thread.sleep`, waits with no Java wait frame (the
//! JVM's own: safepoints, class initialisation) and wakes from a thread's
//! own park/sleep/wait (the Parker's internal mutex). The JVM's native
//! threads (compiler queue, GC, service threads) have no Java frames: the
//! kernel side does not record their futex calls at all. Idle consumers (a pool thread waiting for work) and waits no
//! other thread ever ended (timeouts: an idle `Object.wait`) are shown but
//! never "contended". A condition wait at a pool's borrow is contention.

use std::collections::HashMap;

use crate::{
    report::Frame,
    stacks::{jvm, symbolize::OwnCode, SampleStack},
    trackers::locks::LockSample,
};

/// What a Java wait is, from its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JavaWait {
    /// `AbstractQueuedSynchronizer.acquire*` (`ReentrantLock.lock`, a
    /// read-write lock, a semaphore).
    Lock,
    /// `ConditionObject.await*`: a queue or a pool waiting for an element.
    Condition,
    /// Another `LockSupport.park` (a future, a latch).
    Park,
    /// A contended `synchronized` (monitor enter).
    MonitorEnter,
    /// `Object.wait`.
    MonitorWait,
    /// A pool thread waiting for work, or a wait nobody ended: never contended.
    Idle,
    /// `Thread.sleep`: not a lock.
    Sleep,
    /// No Java wait frame: the JVM's own wait (safepoint, class init).
    Internal,
}

impl JavaWait {
    /// The lock kind shown in the report.
    pub fn label(self) -> &'static str {
        match self {
            JavaWait::Lock => "java-lock",
            JavaWait::Condition => "java-condition",
            JavaWait::Park => "java-park",
            JavaWait::MonitorEnter => "java-monitor-enter",
            JavaWait::MonitorWait => "java-object-wait",
            JavaWait::Idle => IDLE_KIND,
            JavaWait::Sleep => "java-sleep",
            JavaWait::Internal => "java-internal",
        }
    }
}

/// The kind of waits that are never judged contended.
pub const IDLE_KIND: &str = "java-idle";

/// Frames of a pool thread waiting for work (inside its JDK/container frames).
const IDLE_CONSUMERS: &[&str] = &[
    "java.util.concurrent.ThreadPoolExecutor.getTask",
    "java.util.concurrent.ScheduledThreadPoolExecutor$DelayedWorkQueue.take",
    "java.util.concurrent.ForkJoinPool.awaitWork",
    "org.apache.tomcat.util.threads.TaskQueue.take",
    "org.apache.tomcat.util.threads.TaskQueue.poll",
];

fn is_park(function: &str) -> bool {
    function == "jdk.internal.misc.Unsafe.park" || function == "sun.misc.Unsafe.park"
}

/// The kind of a Java wait from its frames (innermost first).
pub fn classify(frames: &[Frame]) -> JavaWait {
    let Some(top) = frames.first() else { return JavaWait::Internal };
    // A walk cut before any Java method (counted as truncated): no site.
    if frames.iter().all(|f| f.function.starts_with('[')) {
        return JavaWait::Internal;
    }
    if top.function == jvm::MONITOR_ENTER_FRAME {
        return JavaWait::MonitorEnter;
    }
    let jdk: Vec<&str> = frames.iter().map(|f| f.function.as_str()).take_while(|f| jvm::is_jdk(f)).collect();
    // A container's queue (Tomcat's) is the first frame past the JDK's.
    let upto = frames.iter().position(|f| !jvm::is_jdk(&f.function)).map_or(frames.len(), |i| i + 1);
    if frames[..upto].iter().any(|f| IDLE_CONSUMERS.contains(&f.function.as_str())) {
        return JavaWait::Idle;
    }
    match top.function.as_str() {
        "java.lang.Thread.sleep" => JavaWait::Sleep,
        "java.lang.Object.wait" => JavaWait::MonitorWait,
        f if is_park(f) => {
            if jdk.iter().any(|f| f.contains("$ConditionObject.await")) {
                JavaWait::Condition
            } else if jdk.iter().any(|f| f.contains("QueuedSynchronizer.acquire") || f.contains("QueuedLongSynchronizer.acquire")) {
                JavaWait::Lock
            } else {
                JavaWait::Park
            }
        }
        _ => JavaWait::Internal,
    }
}

/// A wake that is no release of a lock: a thread's own park, sleep or wait
/// (the Parker's internal mutex).
fn is_internal_wake(frames: &[Frame]) -> bool {
    frames.first().is_some_and(|f| is_park(&f.function) || f.function == "java.lang.Thread.sleep" || f.function == "java.lang.Object.wait")
}

/// The locks of a trace with a JVM's waits regrouped (see the module);
/// locks of any other process are returned as they are.
pub fn regroup(locks: &[LockSample], frames: &HashMap<SampleStack, Vec<Frame>>, own: &OwnCode) -> Vec<LockSample> {
    if !locks.iter().any(|l| l.kind == "java") {
        return locks.to_vec();
    }
    let stack_of = |s: &SampleStack| frames.get(s).map(Vec::as_slice).unwrap_or_default();
    let mut out: Vec<LockSample> = Vec::new();
    let mut groups: Vec<((JavaWait, String), LockSample)> = Vec::new();
    for l in locks {
        if l.kind != "java" {
            out.push(l.clone());
            continue;
        }
        let holders: Vec<(SampleStack, u64)> = l.holders.iter().filter(|h| !is_internal_wake(stack_of(&h.0))).cloned().collect();
        let mut joined: Vec<usize> = Vec::new();
        for (stack, n, ns) in &l.waiters {
            let fr = stack_of(stack);
            let mut kind = classify(fr);
            if matches!(kind, JavaWait::Sleep | JavaWait::Internal) {
                continue;
            }
            // An Object.wait no other thread ended: timeouts of an idle wait.
            if kind == JavaWait::MonitorWait && holders.is_empty() {
                kind = JavaWait::Idle;
            }
            let site = own.site(fr).name;
            let key = (kind, site.clone());
            let i = match groups.iter().position(|g| g.0 == key) {
                Some(i) => i,
                None => {
                    groups.push((
                        key,
                        LockSample {
                            addr: l.addr,
                            kind: kind.label(),
                            contentions: 0,
                            wait_ns: 0,
                            max_wait_ns: 0,
                            hist: [0; tracer_common::locks::HIST_BUCKETS],
                            symbol: Some(format!("{} at {site}", kind.label())),
                            first: stack.clone(),
                            waiters: Vec::new(),
                            holders: Vec::new(),
                        },
                    ));
                    groups.len() - 1
                }
            };
            let g = &mut groups[i].1;
            g.contentions += n;
            g.wait_ns += ns;
            g.waiters.push((stack.clone(), *n, *ns));
            if !joined.contains(&i) {
                // The word's own figures go to the first (costliest) group
                // of its waiters: per-word, not per-stack, in the kernel.
                if joined.is_empty() {
                    g.max_wait_ns = g.max_wait_ns.max(l.max_wait_ns);
                    for (h, v) in g.hist.iter_mut().zip(l.hist.iter()) {
                        *h += v;
                    }
                }
                g.holders.extend(holders.iter().cloned());
                joined.push(i);
            }
        }
    }
    for (_, mut g) in groups {
        // The same stacks from many threads' words: one entry each.
        g.waiters = merge(g.waiters.into_iter().map(|(s, n, ns)| (s, (n, ns))), |a, b| (a.0 + b.0, a.1 + b.1))
            .into_iter()
            .map(|(s, (n, ns))| (s, n, ns))
            .collect();
        g.waiters.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        g.holders = merge(g.holders.into_iter(), |a, b| a + b);
        g.holders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out.push(g);
    }
    out
}

fn merge<V: Copy>(items: impl Iterator<Item = (SampleStack, V)>, add: impl Fn(V, V) -> V) -> Vec<(SampleStack, V)> {
    let mut m: HashMap<SampleStack, V> = HashMap::new();
    for (s, v) in items {
        m.entry(s).and_modify(|x| *x = add(*x, v)).or_insert(v);
    }
    m.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn java(names: &[&str]) -> Vec<Frame> {
        names
            .iter()
            .map(|n| Frame { function: n.to_string(), file: None, line: None, module: Some(jvm::JAVA_MODULE.into()), addr: None, file_offset: None })
            .collect()
    }

    #[test]
    fn kinds_from_frames() {
        let park = "jdk.internal.misc.Unsafe.park";
        let cond = java(&[park, "java.util.concurrent.locks.LockSupport.park", "java.util.concurrent.locks.AbstractQueuedSynchronizer$ConditionObject.await", "app.Pool.borrow"]);
        assert_eq!(classify(&cond), JavaWait::Condition);
        let lock = java(&[park, "java.util.concurrent.locks.AbstractQueuedSynchronizer.acquire", "java.util.concurrent.locks.ReentrantLock.lock", "app.Pool.borrow"]);
        assert_eq!(classify(&lock), JavaWait::Lock);
        let idle = java(&[park, "java.util.concurrent.locks.AbstractQueuedSynchronizer$ConditionObject.await", "java.util.concurrent.LinkedBlockingQueue.take", "java.util.concurrent.ThreadPoolExecutor.getTask", "java.util.concurrent.ThreadPoolExecutor.runWorker"]);
        assert_eq!(classify(&idle), JavaWait::Idle);
        assert_eq!(classify(&java(&["java.lang.Thread.sleep", "app.Main.tick"])), JavaWait::Sleep);
        assert_eq!(classify(&java(&["java.lang.Object.wait", "app.Main.waitFor"])), JavaWait::MonitorWait);
        assert_eq!(classify(&java(&[jvm::MONITOR_ENTER_FRAME, "app.Counter.add"])), JavaWait::MonitorEnter);
        assert_eq!(classify(&java(&["app.Main.init"])), JavaWait::Internal);
        // An application frame ends the JDK frames: its callers' names do not count.
        let own_then_pool = java(&[park, "java.util.concurrent.locks.LockSupport.park", "app.Custom.getTask", "java.util.concurrent.ThreadPoolExecutor.getTask"]);
        assert_eq!(classify(&own_then_pool), JavaWait::Park);
    }
}
