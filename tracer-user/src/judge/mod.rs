//! Samples -> findings: which value judges each kind and with which engine,
//! the zero before a series first seen, sorting and the findings bound.
//! Growth is judged by [`growth`]; locks by [`contention`].

pub mod contention;
pub mod exhaustion;
pub mod growth;

use std::collections::{HashMap, HashSet};

use self::growth::{GrowthConfig, GrowthEngine, SeriesKey};
use crate::{
    procfs::MemoryMap,
    report::{Finding, Frame, Kind, Verdict},
    stacks::resolve::StackResolver,
    stacks::symbolize::{site_index, site_of},
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
}

/// A growth finding whose live objects are parked somewhere worth showing
/// (a leaked goroutine's current stack): its index in the findings.
pub type BlockedAt = (usize, Blocked);

impl Judge {
    pub fn new(interval: std::time::Duration) -> Self {
        Self {
            interval_s: interval.as_secs_f64(),
            last_t: None,
            objects: GrowthEngine::new(GrowthConfig::default()),
            bytes_objects: GrowthEngine::new(GrowthConfig::default()),
            bytes: GrowthEngine::new(bytes_config()),
            seen: HashSet::new(),
            now: (0.0, false),
        }
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
            // A map is one series whatever stack last grew it.
            let key = (kind, s.map.as_ref().map_or_else(|| series_id(&s.stack), series_id));
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
            let j = if by_bytes { &self.bytes } else { &self.objects }.judge(key, s.oldest_age_s);
            let (growth_per_min, growth_bytes_per_min) = if by_bytes {
                (self.bytes_objects.judge(key, None).growth_per_min, Some(round1(j.growth_per_min)))
            } else {
                (j.growth_per_min, None)
            };
            if s.live == 0 && j.verdict == Verdict::Steady {
                continue;
            }
            let stack = frames.get(&s.stack).cloned().unwrap_or_default();
            if let (Verdict::Leak, Some(b)) = (j.verdict, &s.blocked) {
                blocked.push((first_index + findings.len(), b.clone()));
            }
            findings.push(Finding {
                site: site_of(&stack),
                site_index: site_index(&stack),
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
                created: s.created,
                ended: s.ended,
                ..Finding::new(kind, j.verdict)
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
                Collected::Growth { samples, .. } => keys.extend(samples.iter().map(|s| s.stack.clone())),
                Collected::Contention(locks) => {
                    for l in locks {
                        keys.push(l.first.clone());
                        keys.extend(l.waiters.iter().map(|w| w.0.clone()));
                        keys.extend(l.holders.iter().map(|h| h.0.clone()));
                    }
                }
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
                let (f, b) = self.growth(*kind, *judging, samples, &frames, findings.len());
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
            if let Collected::Contention(locks) = c {
                findings.extend(contention::lock_findings(locks, &frames, t));
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

/// Sorts findings (worst verdict, fastest growth, most live, longest lock
/// wait first) and keeps the first `max`; returns how many were cut.
pub fn rank(findings: &mut Vec<Finding>, max: usize) -> u64 {
    findings.sort_by(|a, b| {
        a.verdict
            .cmp(&b.verdict)
            .then(b.growth_per_min.total_cmp(&a.growth_per_min))
            .then(b.live.cmp(&a.live))
            .then(lock_wait(b).cmp(&lock_wait(a)))
    });
    let omitted = findings.len().saturating_sub(max) as u64;
    findings.truncate(max);
    omitted
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
