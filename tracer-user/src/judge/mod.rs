//! Samples -> findings: which value judges each kind and with which engine,
//! the zero before a series first seen, sorting and the findings bound.
//! Growth is judged by [`growth`]; locks by [`contention`].

pub mod contention;
pub mod exhaustion;
pub mod growth;
pub mod java_waits;
pub mod waits;

use std::collections::{HashMap, HashSet};

use self::growth::{GrowthConfig, GrowthEngine, SeriesKey};
use crate::{
    procfs::MemoryMap,
    report::{Finding, Frame, Kind, Verdict},
    stacks::resolve::{is_placeholder, StackResolver},
    stacks::symbolize::OwnCode,
    stacks::SampleStack,
    trackers::{Blocked, Collected, Judging, StackSample},
};

/// The growth rule for live bytes: the same rule, with a rise below 8 KiB
/// over the window taken as noise. Blocks in flight at the instant of a
/// sample (malloc then free, thousands per second) make live bytes jitter by
/// a few KiB; a leak rises by far more.
pub fn bytes_config() -> GrowthConfig {
    GrowthConfig { min_rise_abs: 8192.0, ..GrowthConfig::default() }
}

/// The growth series of a whole trace, judged at each report.
pub struct Judge {
    /// The report interval: samples closer than half of it are not observed.
    interval_s: f64,
    /// Time of the previous observed sample.
    last_t: Option<f64>,
    /// Kinds judged on live objects (one engine, one bound on series).
    objects: GrowthEngine,
    /// Kinds judged on live bytes: their live objects (for `growth_per_min`)...
    bytes_objects: GrowthEngine,
    /// ...and their live bytes (the verdict), see [`bytes_config`].
    bytes: GrowthEngine,
    /// Series observed at the current report.
    seen: HashSet<SeriesKey>,
    /// The current report's time, and whether its samples are observed.
    now: (f64, bool),
    /// What counts as the program's own code (names every site).
    pub own: OwnCode,
    /// The last limit read per resource (kept for the report after exit).
    limits: HashMap<String, exhaustion::Limit>,
}

/// A growth finding whose live objects are parked somewhere worth showing
/// (a leaked goroutine's current stack): its index in the findings.
pub type BlockedAt = (usize, Blocked);

impl Judge {
    /// `own`: `--own` prefixes, what counts as the program's own code.
    pub fn new(interval: std::time::Duration, own: &[String]) -> Self {
        Self {
            interval_s: interval.as_secs_f64(),
            last_t: None,
            objects: GrowthEngine::new(GrowthConfig::default()),
            bytes_objects: GrowthEngine::new(GrowthConfig::default()),
            bytes: GrowthEngine::new(bytes_config()),
            seen: HashSet::new(),
            now: (0.0, false),
            own: OwnCode { prefixes: own.to_vec(), ..OwnCode::default() },
            limits: HashMap::new(),
        }
    }

    /// Reads what counts as the program's own code again when the target's
    /// executable changed (first report, after an exec); kept once it exited.
    pub fn refresh_own_code(&mut self, pid: u32) {
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else { return };
        let exe = exe.display().to_string();
        if self.own.executable.as_deref() != Some(exe.trim_end_matches(" (deleted)")) {
            let prefixes = std::mem::take(&mut self.own.prefixes);
            self.own = OwnCode::of_process(pid, &prefixes);
        }
    }

    /// Time to exhaustion for the findings and the report. Limits are read
    /// while the target lives; after its exit the last ones read stand (the
    /// final report shows the state at exit).
    pub fn exhaustion(&mut self, findings: &mut [Finding], pid: u32, alive: bool) -> Option<crate::report::Exhaustion> {
        let limits = &mut self.limits;
        // One entry per resource (per peer for ports): bounded.
        if limits.len() > 256 {
            limits.clear();
        }
        exhaustion::annotate(findings, |r| {
            if alive {
                if let Some(l) = exhaustion::read_limit(pid, r) {
                    limits.insert(r.to_string(), l);
                }
            }
            limits.get(r).cloned()
        })
    }

    /// Starts the report at `t` seconds since attach. Samples closer than
    /// half an interval to the previous ones (the final report right after a
    /// tick, a late tick) would only add noise: they are judged, not observed.
    fn begin(&mut self, t: f64) {
        let observe = self.last_t.is_none_or(|prev| t - prev >= self.interval_s / 2.0);
        self.now = (t, observe);
        self.seen.clear();
    }

    /// Observes and judges one kind's samples; findings for every series
    /// that has something live or is not steady, and the leaked ones whose
    /// objects are parked somewhere (indexes counted from `first_index`).
    fn growth(
        &mut self,
        kind: Kind,
        judging: Judging,
        samples: &[StackSample],
        frames: &HashMap<SampleStack, Vec<Frame>>,
        first_index: usize,
    ) -> (Vec<Finding>, Vec<BlockedAt>) {
        let (t, observe) = self.now;
        let mut findings = Vec::new();
        let mut blocked = Vec::new();
        for s in samples {
            // A map is one series whatever stack last grew it; objects from
            // before attach, one per group (they have no stack).
            let key = if s.before_attach {
                (kind, series_id(&("before attach", &s.peer, &s.thread_name)))
            } else if let Some(m) = &s.map {
                (kind, series_id(m))
            } else {
                // A JVM's stacks by their frames (final once named): one
                // method walked interpreted, then compiled, is several keys
                // merged into one sample, and stays one series whichever
                // key stands for them. Native frames may still be finished
                // later (unwinding): those go by their key.
                let java = matches!(&s.stack, SampleStack::Kernel(k) if k.stack_id == tracer_common::jvm::JAVA_STACK);
                match frames.get(&s.stack).filter(|f| java && !f.is_empty() && !is_placeholder(f)) {
                    Some(f) => (kind, series_id(f)),
                    None => (kind, series_id(&s.stack)),
                }
            };
            self.seen.insert(key);
            let by_bytes = judging == Judging::BytesSinceAttach;
            let mut engines = vec![];
            if by_bytes {
                engines.push((&mut self.bytes, s.live_bytes.unwrap_or(0)));
                engines.push((&mut self.bytes_objects, s.live));
            } else {
                engines.push((&mut self.objects, s.live));
            }
            for (engine, value) in engines {
                if !observe {
                    continue;
                }
                if engine.window_stats(key).is_none() && judging != Judging::Objects {
                    // Everything counted was created after attach: a stack
                    // first seen now had nothing live at the previous sample.
                    if let Some(prev) = self.last_t {
                        engine.observe(key, prev, 0);
                    }
                }
                engine.observe(key, t, value);
            }
            let mut j = if by_bytes { &self.bytes } else { &self.objects }.judge(key, s.oldest_age_s);
            if j.verdict != Verdict::Leak && s.ended_by_finalizer.is_some_and(|n| unclosed_verdict(n, s.ended)) {
                j.verdict = Verdict::Unclosed;
            }
            let (growth_per_min, growth_bytes_per_min) = if by_bytes {
                (self.bytes_objects.judge(key, None).growth_per_min, Some(round1(j.growth_per_min)))
            } else {
                (j.growth_per_min, None)
            };
            let mut stack = if s.before_attach { Vec::new() } else { frames.get(&s.stack).cloned().unwrap_or_default() };
            // A library's `go` statement: the code that ran it, above it.
            if let Some(creator) = s.created_by.as_ref().and_then(|c| frames.get(c)) {
                stack.extend(creator.iter().skip(1).cloned());
            }
            // A placeholder bucket ("[stack not recorded]", "[stack table
            // full]") mixes unrelated stacks: shown, counted, never judged.
            let verdict = if is_placeholder(&stack) { Verdict::Steady } else { j.verdict };
            if s.live == 0 && verdict == Verdict::Steady {
                continue;
            }
            if let (Verdict::Leak, Some(b)) = (verdict, &s.blocked) {
                blocked.push((first_index + findings.len(), b.clone()));
            }
            let mut site = self.own.site(&stack);
            if s.before_attach {
                site.name = BEFORE_ATTACH_SITE.into();
            }
            findings.push(Finding {
                site: site.name,
                via: site.via,
                site_index: site.index,
                stack,
                live: s.live,
                growth_per_min: round1(growth_per_min),
                oldest_age_s: s.oldest_age_s.map(round1),
                peer: s.peer.clone(),
                thread_name: s.thread_name.clone(),
                map: s.map.clone(),
                live_bytes: s.live_bytes,
                growth_bytes_per_min,
                fd_type: s.fd_type.clone(),
                path: s.path.clone(),
                distinct_paths: s.distinct_paths,
                bytes_per_object: s.bytes_per_object,
                created: s.created,
                ended: s.ended,
                ended_by_finalizer: s.ended_by_finalizer,
                before_attach: s.before_attach,
                addresses: match &s.stack {
                    SampleStack::Addresses(a) => a.clone(),
                    SampleStack::Kernel(_) | SampleStack::Java(_) => Vec::new(),
                },
                ..Finding::new(kind, verdict)
            });
        }
        (findings, blocked)
    }

    /// Every tracker's samples of one report as findings: stacks resolved,
    /// growth and contention judged, leaked goroutines' current stacks added.
    pub async fn findings(
        &mut self,
        collected: &[Collected],
        resolver: &mut StackResolver,
        memory: &MemoryMap,
        t: f64,
    ) -> Vec<Finding> {
        let mut keys: Vec<SampleStack> = Vec::new();
        for c in collected {
            match c {
                Collected::Growth { samples, .. } => {
                    keys.extend(samples.iter().map(|s| s.stack.clone()));
                    keys.extend(samples.iter().filter_map(|s| s.created_by.clone()));
                }
                Collected::Contention(locks) => {
                    for l in locks {
                        keys.push(l.first.clone());
                        keys.extend(l.waiters.iter().map(|w| w.0.clone()));
                        keys.extend(l.holders.iter().map(|h| h.0.clone()));
                    }
                }
                Collected::Waits(waits) => keys.extend(waits.iter().map(|w| w.stack.clone())),
                Collected::Nothing => {}
            }
        }
        let frames = resolver.resolve(&keys, memory).await;
        self.begin(t);
        let mut findings = Vec::new();
        // Leaked goroutines' current stacks, resolved after judging.
        let mut blocked = Vec::new();
        for c in collected {
            if let Collected::Growth { kind, judging, samples } = c {
                let samples = merge_same_frames(samples, &frames);
                let (f, b) = self.growth(*kind, *judging, &samples, &frames, findings.len());
                findings.extend(f);
                blocked.extend(b);
            }
        }
        self.end();
        if !blocked.is_empty() {
            let keys: Vec<_> = blocked.iter().map(|(_, b)| b.stack.clone()).collect();
            let frames = resolver.resolve(&keys, memory).await;
            for (i, b) in blocked {
                let f = &mut findings[i];
                // No stack for a goroutine running or in a syscall: its saved
                // registers are stale; the state still says where it is.
                f.blocked_in = frames.get(&b.stack).cloned().filter(|_| b.stack != SampleStack::Addresses(Vec::new()));
                f.wait_reason = Some(b.wait_reason);
            }
        }
        for c in collected {
            match c {
                Collected::Contention(locks) => findings.extend(contention::lock_findings(locks, &frames, t, &self.own)),
                Collected::Waits(waits) => findings.extend(waits::wait_findings(waits, &frames, t, &self.own)),
                _ => {}
            }
        }
        findings
    }

    /// Ends the report: series not seen in it are forgotten (bounded memory).
    fn end(&mut self) {
        let (t, observe) = self.now;
        if observe {
            for engine in [&mut self.objects, &mut self.bytes_objects, &mut self.bytes] {
                engine.forget_missing(&self.seen);
            }
            self.last_t = Some(t);
        }
    }
}

/// Samples whose stacks resolve to the same frames, as one sample under
/// the smallest of their keys: a call path's first events, finished in user
/// space from a miss snapshot under keys of their own (`stacks::unwind`),
/// and the same path walked whole in the kernel. Maps and groups from before
/// attach stay one series each.
fn merge_same_frames(samples: &[StackSample], frames: &HashMap<SampleStack, Vec<Frame>>) -> Vec<StackSample> {
    let mut out: Vec<StackSample> = Vec::with_capacity(samples.len());
    let mut by_frames: HashMap<&Vec<Frame>, usize> = HashMap::new();
    let mut order: Vec<&StackSample> = samples.iter().collect();
    order.sort_by(|a, b| a.stack.cmp(&b.stack));
    for s in order {
        // Groups from before attach have no stack: each stays its own.
        let f = frames.get(&s.stack).filter(|f| !f.is_empty() && s.map.is_none() && !s.before_attach);
        let Some(&i) = f.and_then(|f| by_frames.get(f)) else {
            if let Some(f) = f {
                by_frames.insert(f, out.len());
            }
            out.push(s.clone());
            continue;
        };
        let m = &mut out[i];
        if s.live > m.live {
            m.peer = s.peer.clone().or(m.peer.take());
            m.thread_name = s.thread_name.clone().or(m.thread_name.take());
            m.blocked = s.blocked.clone().or(m.blocked.take());
        }
        // What only some of the merged samples know (a path's first events
        // were sampled before their live objects were seen in /proc).
        m.fd_type = m.fd_type.take().or_else(|| s.fd_type.clone());
        m.path = m.path.take().or_else(|| s.path.clone());
        m.distinct_paths = m.distinct_paths.max(s.distinct_paths);
        m.bytes_per_object = m.bytes_per_object.max(s.bytes_per_object);
        m.ended_by_finalizer = match (m.ended_by_finalizer, s.ended_by_finalizer) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        m.live += s.live;
        m.created += s.created;
        m.ended += s.ended;
        m.oldest_age_s = match (m.oldest_age_s, s.oldest_age_s) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        m.live_bytes = match (m.live_bytes, s.live_bytes) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }
    out
}

/// The site of objects that existed before attach (their stack is unknown).
pub const BEFORE_ATTACH_SITE: &str = "[before attach]";

/// Objects ended by Go's finalizers, at least, for "unclosed" (a few
/// stragglers a GC finds are not a habit).
pub const UNCLOSED_MIN_FINALIZED: u64 = 5;

/// **unclosed** when the Go runtime's finalizers, not the program, ended
/// most (more than half) of a finding's objects since attach, and at least
/// [`UNCLOSED_MIN_FINALIZED`] of them: the program drops them without
/// `Close`. A leak stays a leak (it is worse: not even the GC frees them).
pub fn unclosed_verdict(ended_by_finalizer: u64, ended: u64) -> bool {
    ended_by_finalizer >= UNCLOSED_MIN_FINALIZED && ended_by_finalizer * 2 > ended
}

/// Sorts findings (worst verdict, fastest growth, most live, longest lock
/// wait first) and keeps the first `max`; returns the ones cut, in order.
pub fn rank(findings: &mut Vec<Finding>, max: usize) -> Vec<Finding> {
    findings.sort_by(|a, b| {
        a.verdict
            .cmp(&b.verdict)
            .then(b.growth_per_min.total_cmp(&a.growth_per_min))
            .then(b.live.cmp(&a.live))
            .then(lock_wait(b).cmp(&lock_wait(a)))
    });
    // The cut findings are handed back: a display bound must not change
    // what `check` concludes.
    findings.split_off(max.min(findings.len()))
}

fn lock_wait(f: &Finding) -> u64 {
    f.lock.as_ref().map_or(0, |l| l.wait_ns)
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn series_id(key: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str) -> Frame {
        Frame { function: function.into(), file: None, line: None, module: None, addr: None, file_offset: None }
    }

    /// A placeholder bucket rising like a leak is shown but never judged;
    /// a real stack rising the same way is a leak.
    #[test]
    fn placeholder_buckets_are_never_judged() {
        let lost = SampleStack::Addresses(vec![1]);
        let real = SampleStack::Addresses(vec![2]);
        let frames = HashMap::from([
            (lost.clone(), vec![frame("[stack not recorded]")]),
            (real.clone(), vec![frame("dial_cache"), frame("bad_handler")]),
        ]);
        let mut judge = Judge::new(std::time::Duration::from_secs(1), &[]);
        let mut last = Vec::new();
        for i in 0..20u64 {
            let sample = |stack: &SampleStack| StackSample {
                stack: stack.clone(),
                live: 10 * i,
                created: 10 * i,
                ended: 0,
                oldest_age_s: Some(i as f64),
                peer: None,
                thread_name: None,
                blocked: None,
                map: None,
                live_bytes: None,
                ..StackSample::default()
            };
            judge.begin(i as f64);
            let (f, _) = judge.growth(Kind::Connection, Judging::ObjectsSinceAttach, &[sample(&lost), sample(&real)], &frames, 0);
            judge.end();
            last = f;
        }
        let verdict = |site: &str| last.iter().find(|f| f.site == site).map(|f| f.verdict);
        assert_eq!(verdict("dial_cache"), Some(Verdict::Leak), "{last:?}");
        assert_eq!(verdict("[stack not recorded]"), Some(Verdict::Steady), "{last:?}");
    }

    #[test]
    fn unclosed_rule() {
        assert!(unclosed_verdict(184, 184));
        assert!(unclosed_verdict(6, 11));
        assert!(!unclosed_verdict(5, 10), "half is not most");
        assert!(!unclosed_verdict(4, 4), "a few stragglers");
        assert!(!unclosed_verdict(0, 1717), "a pool that closes its own");
    }
}
