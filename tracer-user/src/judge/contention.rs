//! Locks are judged by the time their waiters lost, not by growth: one
//! finding per lock (locks sharing a global's name, like the futex words of
//! one rwlock, are one lock).

use std::collections::HashMap;

use crate::{
    report::{Finding, Frame, HistBucket, Kind, LockInfo, Verdict},
    stacks::symbolize::OwnCode,
    stacks::SampleStack,
    trackers::locks::LockSample,
};

/// Locks: share of the traced time waiters must have lost on one lock for
/// "contended" (0.05: on average one thread blocked 5 % of the time).
pub const CONTENDED_MIN_WAIT_SHARE: f64 = 0.05;
/// Locks: contended waits needed for "contended" (a few long waits at
/// start-up are not a contended lock).
pub const CONTENDED_MIN_WAITS: u64 = 20;

/// The verdict of a lock (kind "lock"): **contended** when, since attach,
/// its waiters lost at least [`CONTENDED_MIN_WAIT_SHARE`] of the traced time
/// (`wait_share = wait_ns / elapsed_ns`, summed over waiters, so it can
/// exceed 1) over at least [`CONTENDED_MIN_WAITS`] waits; else **steady**.
/// Locks are not judged on growth: what they cost is time, not objects.
pub fn contention_verdict(wait_share: f64, contentions: u64) -> Verdict {
    if wait_share >= CONTENDED_MIN_WAIT_SHARE && contentions >= CONTENDED_MIN_WAITS {
        Verdict::Contended
    } else {
        Verdict::Steady
    }
}

/// One finding per lock, merged by name, judged by [`contention_verdict`].
pub fn lock_findings(locks: &[LockSample], frames: &HashMap<SampleStack, Vec<Frame>>, elapsed_s: f64, own: &OwnCode) -> Vec<Finding> {
    let stack_of = |s: &SampleStack| frames.get(s).cloned().unwrap_or_default();
    // A JVM's waits, by Java wait site and kind.
    let locks = &super::java_waits::regroup(locks, frames, own);
    // Merge by name: (name, samples).
    let mut groups: Vec<(String, Vec<&LockSample>)> = Vec::new();
    for l in locks {
        let name = match &l.symbol {
            Some(sym) => sym.clone(),
            None => {
                let first = stack_of(&l.first);
                format!("{:#x} (first contended in {})", l.addr, own.site(&first).name)
            }
        };
        match groups.iter_mut().find(|g| g.0 == name) {
            Some(g) => g.1.push(l),
            None => groups.push((name, vec![l])),
        }
    }
    let elapsed_ns = (elapsed_s * 1e9).max(1.0);
    let mut out = Vec::new();
    for (name, ls) in groups {
        let contentions: u64 = ls.iter().map(|l| l.contentions).sum();
        let wait_ns: u64 = ls.iter().map(|l| l.wait_ns).sum();
        let max_wait_ns = ls.iter().map(|l| l.max_wait_ns).max().unwrap_or(0);
        let mut hist = [0u64; tracer_common::locks::HIST_BUCKETS];
        for l in &ls {
            for (h, v) in hist.iter_mut().zip(l.hist.iter()) {
                *h += v;
            }
        }
        let mut waiters: Vec<&(SampleStack, u64, u64)> = ls.iter().flat_map(|l| l.waiters.iter()).collect();
        waiters.sort_by_key(|w| std::cmp::Reverse(w.2));
        let mut holders: Vec<&(SampleStack, u64)> = ls.iter().flat_map(|l| l.holders.iter()).collect();
        holders.sort_by_key(|h| std::cmp::Reverse(h.1));
        let stack = waiters.first().map(|w| stack_of(&w.0)).unwrap_or_else(|| stack_of(&ls[0].first));
        let holder_stack = holders.first().map(|h| stack_of(&h.0)).unwrap_or_default();
        let wait_share = wait_ns as f64 / elapsed_ns;
        // Cumulative log2 buckets, from the first non-empty to the last.
        let lo = hist.iter().position(|&c| c > 0).unwrap_or(0);
        let hi = hist.iter().rposition(|&c| c > 0).unwrap_or(0);
        let mut cum = 0;
        let wait_histogram = (lo..=hi)
            .map(|i| {
                cum += hist[i];
                HistBucket { le_ns: if i + 1 >= 64 { u64::MAX } else { (1u64 << (i + 1)) - 1 }, count: cum }
            })
            .collect();
        let site = own.site(&stack);
        let holder = own.site(&holder_stack);
        out.push(Finding {
            site: site.name,
            via: site.via,
            site_index: site.index,
            stack,
            lock: Some(LockInfo {
                lock: name,
                lock_kind: ls[0].kind.to_string(),
                contentions,
                wait_ns,
                max_wait_ns,
                wait_share: (wait_share * 1000.0).round() / 1000.0,
                wait_histogram,
                waiter_stacks: waiters.len() as u64,
                holder_site: if holder_stack.is_empty() { String::new() } else { holder.name },
                holder_site_index: holder.index,
                holder_stack,
                holder_wakes: holders.first().map_or(0, |h| h.1),
            }),
            created: contentions,
            ended: contentions,
            ..Finding::new(
                Kind::Lock,
                if ls[0].kind == super::java_waits::IDLE_KIND { Verdict::Steady } else { contention_verdict(wait_share, contentions) },
            )
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contention_rule() {
        assert_eq!(contention_verdict(0.5, 1000), Verdict::Contended);
        assert_eq!(contention_verdict(0.05, 20), Verdict::Contended);
        assert_eq!(contention_verdict(0.049, 1000), Verdict::Steady);
        assert_eq!(contention_verdict(3.0, 5), Verdict::Steady);
    }
}
