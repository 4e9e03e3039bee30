//! The one growth engine: every tracker feeds it `(series, time, live count)`
//! samples and asks it for a [`Verdict`] per series.
//!
//! Keeping the rule in one place means every kind of object that grows is
//! judged the same way, and `docs/report.md`
//! documents one rule.
//!
//! # The verdict rule
//!
//! Over the judged window — every sample of the series taken within the last
//! [`GrowthConfig::window_s`] seconds of its newest sample — with `n` samples
//! (`n - 1` intervals), `first`/`last` the first and last live counts:
//!
//! - `growth_per_min` = least-squares slope of live over time, per minute
//!   (0 with fewer than 2 samples);
//! - `rise` = `last - first` (signed);
//! - `min_rise` = `max(min_rise_abs, min_rise_frac * first)` (defaults 3 and 10 %);
//! - `new_high_frac` = fraction of the intervals in which live exceeded every
//!   earlier value in the window (set a new high-water mark);
//! - `recent_high` = the last new high-water mark was set in the later part of
//!   the window: its interval index `i` (1-based) satisfies
//!   `i > (1 - recent_high_frac) * (n - 1)` (default: the later half).
//!
//! Then:
//!
//! - fewer than `min_samples` (4) samples → **steady** (too little to say);
//! - **leak** when `growth_per_min > 0`, `rise >= min_rise`,
//!   `new_high_frac >= leak_new_high_frac` (0.75) and, when the age of the
//!   oldest live object is known, `oldest_age_s >= leak_min_oldest_frac (0.5) *
//!   span` where span = time between the first and last sample of the window;
//! - **growing** when `growth_per_min > 0`, `rise >= min_rise` and
//!   `recent_high`, but not leak;
//! - **steady** otherwise.
//!
//! `recent_high` only matters for "growing": a leak has new highs in at least
//! 75 % of the intervals, so its last one is always in the later half.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::report::{Kind, Verdict};

/// Identifies one series: the kind of object and the tracker's id for the
/// creation stack (stack ids are only unique within a tracker).
pub type SeriesKey = (Kind, u64);

/// Thresholds and bounds of the engine; [`Default`] gives the documented
/// values, tests and callers may tune them.
#[derive(Clone, Debug, PartialEq)]
pub struct GrowthConfig {
    /// Length of the judged window, seconds (default 600): old history must
    /// not keep a series "growing" forever.
    pub window_s: f64,
    /// Samples needed before anything but steady is said (default 4, i.e. 3
    /// intervals): two points always make a line.
    pub min_samples: usize,
    /// Smallest rise over the window that counts, objects (default 3): a few
    /// objects more is noise.
    pub min_rise_abs: f64,
    /// Smallest rise as a fraction of the first live count (default 0.10):
    /// large pools fluctuate by more than 3.
    pub min_rise_frac: f64,
    /// Fraction of intervals that must set a new high-water mark for "leak"
    /// (default 0.75): leaks climb nearly every interval.
    pub leak_new_high_frac: f64,
    /// For "leak", the oldest live object must be at least this fraction of
    /// the window span old (default 0.5): otherwise old objects are being
    /// recycled and the growth is a pool growing, not objects lost.
    pub leak_min_oldest_frac: f64,
    /// For "growing", the last new high-water mark must lie in this trailing
    /// fraction of the window's intervals (default 0.5): a pool that ramped
    /// up and stopped is steady once new highs stop.
    pub recent_high_frac: f64,
    /// Samples kept per series (default 720; the oldest is dropped): bounds
    /// memory whatever the interval.
    pub max_samples: usize,
    /// Series kept at most (default 10 000; new series beyond are refused and
    /// counted): bounds memory whatever the number of stacks.
    pub max_series: usize,
}

impl Default for GrowthConfig {
    fn default() -> Self {
        GrowthConfig {
            window_s: 600.0,
            min_samples: 4,
            min_rise_abs: 3.0,
            min_rise_frac: 0.10,
            leak_new_high_frac: 0.75,
            leak_min_oldest_frac: 0.5,
            recent_high_frac: 0.5,
            max_samples: 720,
            max_series: 10_000,
        }
    }
}

/// The engine's answer for one series: what goes into a finding's `verdict`
/// and `growth_per_min`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Judgement {
    /// Leak, growing or steady, by the rule in the module docs.
    pub verdict: Verdict,
    /// Least-squares slope of live over the judged window, objects per minute.
    pub growth_per_min: f64,
}

/// The measurements the verdict is derived from, exposed for tests and
/// debugging output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowStats {
    /// Samples in the judged window.
    pub samples: usize,
    /// Seconds between the first and last sample of the window.
    pub span_s: f64,
    /// Least-squares slope, objects per minute.
    pub growth_per_min: f64,
    /// Live count of the window's first sample.
    pub first_live: u64,
    /// Last minus first live count of the window.
    pub rise: f64,
    /// Fraction of intervals that set a new high-water mark.
    pub new_high_frac: f64,
    /// 1-based interval index of the last new high-water mark (0: none).
    pub last_high_interval: usize,
}

/// One sample: seconds since attach, objects alive.
#[derive(Clone, Copy, Debug)]
struct Sample {
    t_s: f64,
    live: u64,
}

/// Growth history of many series with bounded memory, and the verdict rule.
#[derive(Debug)]
pub struct GrowthEngine {
    config: GrowthConfig,
    series: HashMap<SeriesKey, VecDeque<Sample>>,
    dropped_series: u64,
}

impl GrowthEngine {
    /// An empty engine with the given thresholds and bounds.
    pub fn new(config: GrowthConfig) -> Self {
        GrowthEngine {
            config,
            series: HashMap::new(),
            dropped_series: 0,
        }
    }

    /// The thresholds in use (for documentation output and tests).
    pub fn config(&self) -> &GrowthConfig {
        &self.config
    }

    /// Records that `key` had `live` objects at `t_s` seconds (a monotonic
    /// clock, e.g. seconds since attach).
    ///
    /// Returns false when the sample was not recorded: the series is new and
    /// `max_series` are already kept (counted in [`Self::dropped_series`]),
    /// or `t_s` is older than the series' newest sample. A sample at the same
    /// time as the newest replaces it.
    pub fn observe(&mut self, key: SeriesKey, t_s: f64, live: u64) -> bool {
        let max_samples = self.config.max_samples.max(1);
        let samples = match self.series.get_mut(&key) {
            Some(samples) => samples,
            None => {
                if self.series.len() >= self.config.max_series {
                    self.dropped_series += 1;
                    return false;
                }
                self.series.entry(key).or_default()
            }
        };
        match samples.back_mut() {
            Some(last) if t_s < last.t_s => return false,
            Some(last) if t_s == last.t_s => {
                last.live = live;
                return true;
            }
            _ => {}
        }
        while samples.len() >= max_samples {
            samples.pop_front();
        }
        samples.push_back(Sample { t_s, live });
        true
    }

    /// The verdict and growth rate of `key` (see the module docs for the
    /// rule). `oldest_age_s` is the age of the oldest live object of the
    /// series, when the tracker knows it. Unknown series are steady, 0/min.
    pub fn judge(&self, key: SeriesKey, oldest_age_s: Option<f64>) -> Judgement {
        let Some(stats) = self.window_stats(key) else {
            return Judgement {
                verdict: Verdict::Steady,
                growth_per_min: 0.0,
            };
        };
        let verdict = self.verdict(&stats, oldest_age_s);
        Judgement {
            verdict,
            growth_per_min: stats.growth_per_min,
        }
    }

    /// The measurements of `key`'s judged window; None for unknown series.
    pub fn window_stats(&self, key: SeriesKey) -> Option<WindowStats> {
        let samples = self.series.get(&key)?;
        let window = self.window(samples);
        Some(stats_of(&window))
    }

    /// Number of series refused because `max_series` were already kept.
    pub fn dropped_series(&self) -> u64 {
        self.dropped_series
    }

    /// Number of series kept now.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Drops series whose newest sample is more than `max_idle_s` older than
    /// `now_s` (their stacks stopped appearing), freeing room for new ones.
    /// Returns how many were dropped.
    pub fn forget_idle(&mut self, now_s: f64, max_idle_s: f64) -> usize {
        let before = self.series.len();
        self.series
            .retain(|_, samples| samples.back().is_some_and(|s| now_s - s.t_s <= max_idle_s));
        before - self.series.len()
    }

    /// Drops every series not in `seen` at once (for callers that know
    /// exactly which series still exist). Returns how many were dropped.
    pub fn forget_missing(&mut self, seen: &HashSet<SeriesKey>) -> usize {
        let before = self.series.len();
        self.series.retain(|key, _| seen.contains(key));
        before - self.series.len()
    }

    /// The samples within `window_s` of the newest one, oldest first.
    fn window(&self, samples: &VecDeque<Sample>) -> Vec<Sample> {
        let Some(newest) = samples.back() else {
            return Vec::new();
        };
        let start = newest.t_s - self.config.window_s;
        samples.iter().copied().filter(|s| s.t_s >= start).collect()
    }

    fn verdict(&self, stats: &WindowStats, oldest_age_s: Option<f64>) -> Verdict {
        let c = &self.config;
        if stats.samples < c.min_samples.max(2) {
            return Verdict::Steady;
        }
        let min_rise = c
            .min_rise_abs
            .max(c.min_rise_frac * stats.first_live as f64);
        let rising = stats.growth_per_min > 0.0 && stats.rise >= min_rise;
        if !rising {
            return Verdict::Steady;
        }
        let old_objects_kept =
            oldest_age_s.is_none_or(|age| age >= c.leak_min_oldest_frac * stats.span_s);
        if stats.new_high_frac >= c.leak_new_high_frac && old_objects_kept {
            return Verdict::Leak;
        }
        let intervals = (stats.samples - 1) as f64;
        let recent_high = stats.last_high_interval as f64 > (1.0 - c.recent_high_frac) * intervals;
        if recent_high {
            Verdict::Growing
        } else {
            Verdict::Steady
        }
    }
}

impl Default for GrowthEngine {
    fn default() -> Self {
        GrowthEngine::new(GrowthConfig::default())
    }
}

/// Slope, rise and high-water statistics of a window (oldest first).
fn stats_of(window: &[Sample]) -> WindowStats {
    let n = window.len();
    let (Some(first), Some(last)) = (window.first(), window.last()) else {
        return WindowStats {
            samples: 0,
            span_s: 0.0,
            growth_per_min: 0.0,
            first_live: 0,
            rise: 0.0,
            new_high_frac: 0.0,
            last_high_interval: 0,
        };
    };
    let mut new_highs = 0usize;
    let mut last_high_interval = 0usize;
    let mut high = first.live;
    for (i, s) in window.iter().enumerate().skip(1) {
        if s.live > high {
            high = s.live;
            new_highs += 1;
            last_high_interval = i;
        }
    }
    WindowStats {
        samples: n,
        span_s: last.t_s - first.t_s,
        growth_per_min: slope_per_s(window) * 60.0,
        first_live: first.live,
        rise: last.live as f64 - first.live as f64,
        new_high_frac: if n > 1 {
            new_highs as f64 / (n - 1) as f64
        } else {
            0.0
        },
        last_high_interval,
    }
}

/// Least-squares slope of live over time, objects per second (0 when fewer
/// than 2 samples or all at the same time).
fn slope_per_s(window: &[Sample]) -> f64 {
    let n = window.len() as f64;
    if window.len() < 2 {
        return 0.0;
    }
    let mean_t = window.iter().map(|s| s.t_s).sum::<f64>() / n;
    let mean_v = window.iter().map(|s| s.live as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in window {
        let dt = s.t_s - mean_t;
        num += dt * (s.live as f64 - mean_v);
        den += dt * dt;
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: SeriesKey = (Kind::Connection, 1);

    /// Feeds `(t, live)` samples to a default engine and judges the series.
    fn judge_series(samples: &[(f64, u64)], oldest_age_s: Option<f64>) -> Judgement {
        let mut engine = GrowthEngine::default();
        for &(t, live) in samples {
            assert!(engine.observe(KEY, t, live));
        }
        engine.judge(KEY, oldest_age_s)
    }

    /// A leak of one object per 50 ms sampled every `interval_s` up to `end_s`.
    fn linear_leak(interval_s: f64, end_s: f64) -> Vec<(f64, u64)> {
        let mut out = Vec::new();
        let mut t = 0.0;
        while t <= end_s + 1e-9 {
            out.push((t, (t * 20.0).round() as u64));
            t += interval_s;
        }
        out
    }

    /// Deterministic pseudo-random numbers (xorshift) so tests are repeatable.
    fn pseudo_random(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn linear_leak_at_5s_interval_is_leak_within_20s() {
        let samples = linear_leak(5.0, 20.0);
        assert_eq!(samples.len(), 5);
        let j = judge_series(&samples, Some(20.0));
        assert_eq!(j.verdict, Verdict::Leak);
        assert!(
            (j.growth_per_min - 1200.0).abs() < 1e-6,
            "{}",
            j.growth_per_min
        );
        // Unknown oldest age does not block the verdict.
        assert_eq!(judge_series(&samples, None).verdict, Verdict::Leak);
    }

    #[test]
    fn linear_leak_at_1s_interval_is_leak_within_6s() {
        let j = judge_series(&linear_leak(1.0, 6.0), Some(6.0));
        assert_eq!(j.verdict, Verdict::Leak);
        // Already with 4 samples (t = 0..3).
        assert_eq!(
            judge_series(&linear_leak(1.0, 3.0), Some(3.0)).verdict,
            Verdict::Leak
        );
    }

    #[test]
    fn fewer_than_4_samples_is_steady() {
        let j = judge_series(&[(0.0, 0), (5.0, 100), (10.0, 200)], Some(10.0));
        assert_eq!(j.verdict, Verdict::Steady);
        assert!(j.growth_per_min > 0.0, "slope is still reported");
        let one = judge_series(&[(0.0, 7)], None);
        assert_eq!(
            one,
            Judgement {
                verdict: Verdict::Steady,
                growth_per_min: 0.0
            }
        );
    }

    #[test]
    fn dial_then_close_churn_is_steady() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..50 {
            let samples: Vec<(f64, u64)> = (0..30)
                .map(|i| (i as f64, pseudo_random(&mut seed) % 3))
                .collect();
            assert_eq!(
                judge_series(&samples, Some(0.5)).verdict,
                Verdict::Steady,
                "{samples:?}"
            );
        }
    }

    #[test]
    fn fixed_pool_of_4_is_steady() {
        let samples: Vec<(f64, u64)> = (0..20).map(|i| (i as f64 * 5.0, 4)).collect();
        let j = judge_series(&samples, Some(95.0));
        assert_eq!(j.verdict, Verdict::Steady);
        assert_eq!(j.growth_per_min, 0.0);
        // With a little noise (3..5) too.
        let noisy: Vec<(f64, u64)> = [4, 3, 4, 5, 4, 4, 3, 5, 4, 5]
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as f64, v))
            .collect();
        assert_eq!(judge_series(&noisy, Some(9.0)).verdict, Verdict::Steady);
    }

    #[test]
    fn pool_ramp_then_plateau_is_steady() {
        let mut samples = vec![(0.0, 0), (5.0, 10)];
        samples.extend((2..12).map(|i| (i as f64 * 5.0, 10)));
        assert_eq!(samples.len(), 12);
        let j = judge_series(&samples, Some(55.0));
        assert!(j.growth_per_min > 0.0);
        assert_eq!(j.verdict, Verdict::Steady);
    }

    #[test]
    fn pool_still_ramping_is_not_steady() {
        // Ramps in the later half of the window: a new high is recent.
        let samples = [
            (0.0, 10),
            (5.0, 10),
            (10.0, 10),
            (15.0, 10),
            (20.0, 14),
            (25.0, 16),
        ];
        assert_eq!(judge_series(&samples, Some(25.0)).verdict, Verdict::Growing);
    }

    #[test]
    fn staircase_with_one_dip_is_leak() {
        let samples: Vec<(f64, u64)> = [0, 10, 20, 30, 25, 40, 50, 60, 70]
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as f64 * 5.0, v))
            .collect();
        let engine_stats = {
            let mut e = GrowthEngine::default();
            samples
                .iter()
                .for_each(|&(t, v)| assert!(e.observe(KEY, t, v)));
            e.window_stats(KEY).unwrap()
        };
        assert_eq!(engine_stats.new_high_frac, 7.0 / 8.0);
        assert_eq!(judge_series(&samples, Some(40.0)).verdict, Verdict::Leak);
    }

    #[test]
    fn noisy_staircase_is_growing() {
        // New highs in 5 of 9 intervals (< 0.75).
        let samples: Vec<(f64, u64)> = [0, 10, 5, 15, 12, 20, 18, 25, 22, 30]
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as f64 * 5.0, v))
            .collect();
        assert_eq!(judge_series(&samples, Some(45.0)).verdict, Verdict::Growing);
    }

    #[test]
    fn recycled_objects_are_growing_not_leak() {
        // Live climbs like a leak, but the oldest live object is young: the
        // early objects were closed, so this is growth, not loss.
        let samples = linear_leak(5.0, 20.0);
        assert_eq!(judge_series(&samples, Some(2.0)).verdict, Verdict::Growing);
        // Exactly half the span old is enough for leak.
        assert_eq!(judge_series(&samples, Some(10.0)).verdict, Verdict::Leak);
    }

    #[test]
    fn small_rise_relative_to_pool_is_steady() {
        // 100 -> 108 rises every interval but by less than 10 % of 100.
        let samples: Vec<(f64, u64)> = (0..5).map(|i| (i as f64 * 5.0, 100 + 2 * i)).collect();
        assert_eq!(judge_series(&samples, Some(20.0)).verdict, Verdict::Steady);
    }

    #[test]
    fn decline_is_steady() {
        let samples: Vec<(f64, u64)> = (0..10).map(|i| (i as f64, 100 - 5 * i)).collect();
        let j = judge_series(&samples, Some(9.0));
        assert_eq!(j.verdict, Verdict::Steady);
        assert!(j.growth_per_min < 0.0);
    }

    #[test]
    fn only_the_window_is_judged() {
        // A ramp long ago, then flat for longer than the window: steady, 0/min.
        let config = GrowthConfig {
            window_s: 60.0,
            ..GrowthConfig::default()
        };
        let mut engine = GrowthEngine::new(config);
        for i in 0..10 {
            engine.observe(KEY, i as f64 * 5.0, i * 10);
        }
        assert_eq!(engine.judge(KEY, Some(45.0)).verdict, Verdict::Leak);
        for i in 10..40 {
            engine.observe(KEY, i as f64 * 5.0, 90);
        }
        let j = engine.judge(KEY, Some(195.0));
        assert_eq!(
            j,
            Judgement {
                verdict: Verdict::Steady,
                growth_per_min: 0.0
            }
        );
    }

    #[test]
    fn samples_per_series_are_bounded() {
        let config = GrowthConfig {
            max_samples: 5,
            ..GrowthConfig::default()
        };
        let mut engine = GrowthEngine::new(config);
        for i in 0..100 {
            assert!(engine.observe(KEY, i as f64, i));
        }
        let stats = engine.window_stats(KEY).unwrap();
        assert_eq!(stats.samples, 5);
        assert_eq!(stats.rise, 4.0, "the oldest samples were dropped");
        assert_eq!(stats.span_s, 4.0);
    }

    #[test]
    fn series_count_is_bounded_and_refusals_counted() {
        let config = GrowthConfig {
            max_series: 3,
            ..GrowthConfig::default()
        };
        let mut engine = GrowthEngine::new(config);
        for id in 0..5 {
            let kept = engine.observe((Kind::Connection, id), 0.0, 1);
            assert_eq!(kept, id < 3);
        }
        // Known series still accept samples.
        assert!(engine.observe((Kind::Connection, 0), 1.0, 2));
        assert_eq!(engine.series_count(), 3);
        assert_eq!(engine.dropped_series(), 2);
        // Refused series are judged as unknown.
        let j = engine.judge((Kind::Connection, 4), None);
        assert_eq!(
            j,
            Judgement {
                verdict: Verdict::Steady,
                growth_per_min: 0.0
            }
        );
    }

    #[test]
    fn forgetting_frees_room() {
        let config = GrowthConfig {
            max_series: 2,
            ..GrowthConfig::default()
        };
        let mut engine = GrowthEngine::new(config);
        engine.observe((Kind::Connection, 1), 0.0, 1);
        engine.observe((Kind::Connection, 2), 10.0, 1);
        assert_eq!(engine.forget_idle(30.0, 25.0), 1);
        assert!(engine.observe((Kind::Connection, 3), 30.0, 1));
        let seen: HashSet<SeriesKey> = [(Kind::Connection, 3)].into_iter().collect();
        assert_eq!(engine.forget_missing(&seen), 1);
        assert_eq!(engine.series_count(), 1);
    }

    #[test]
    fn out_of_order_samples_are_ignored_and_same_time_replaces() {
        let mut engine = GrowthEngine::default();
        assert!(engine.observe(KEY, 1.0, 1));
        assert!(!engine.observe(KEY, 0.5, 9));
        assert!(engine.observe(KEY, 1.0, 3));
        let stats = engine.window_stats(KEY).unwrap();
        assert_eq!((stats.samples, stats.rise), (1, 0.0));
    }
}
