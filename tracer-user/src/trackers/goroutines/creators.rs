//! Who runs a library's `go` statement. A goroutine group keeps only its
//! statement's pc (`gopc`): when that statement is in a library
//! (`concurrency.NewSession`) and the group leaks, the finding would name
//! the library, while a service calls it from many places. So while a
//! group is judged a leak, a uprobe sits on its statement's
//! `CALL runtime.newproc` (the 5 bytes before `gopc`, checked by
//! disassembly; a direct near call is emulated by the kernel: no
//! single-step) and records the creating goroutine's stack
//! (`tracer-ebpf/src/goroutines.rs`). The creator named for the group is
//! the stack that created most of its **live** goroutines — each live
//! goroutine's `parentGoid` joined with the last stack its parent ran the
//! statement from (Go 1.21+) — or, before Go 1.21, the stack that ran the
//! statement most while probed. The probe goes when the group has not been
//! a leak for [`DETACH_AFTER`] reports; at most [`MAX_PROBED`] statements
//! are probed at once (the rest counted).

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
    programs::uprobe::UProbeLinkId,
};
use tracer_common::{
    goroutines::{GoCreation, GoCreator, COOKIE_GOID_SHIFT},
    stacks::WalkedFrames,
};

use super::GoroutineCollector;
use crate::{
    output,
    probes::Probes,
    report::{Finding, Kind, Verdict},
    stacks::{symbolize::OwnCode, SampleStack},
    trackers::{StackSample, Target},
};

/// `go` statements probed at once, at most.
pub const MAX_PROBED: usize = 16;

/// Reports in a row a probed group must not be a leak before its probe
/// goes: a verdict that flickers (a burst of short-lived goroutines from the
/// same statement) does not attach and detach every interval.
pub const DETACH_AFTER: u32 = 3;

const PROGRAM: &str = "go_creator";

pub struct CreatorProbes {
    frames: BpfHashMap<MapData, u64, WalkedFrames>,
    creations: PerCpuHashMap<MapData, GoCreation, u64>,
    creator_of: BpfHashMap<MapData, GoCreator, u64>,
    /// Probed statements (gopc), their probe, and the reports in a row
    /// their group was not a leak.
    attached: HashMap<u64, UProbeLinkId>,
    not_leak: HashMap<u64, u32>,
    /// Statements that cannot be probed (no direct call to
    /// `runtime.newproc` before them, an attach error): not tried again.
    refused: HashSet<u64>,
    /// Statements left unprobed because [`MAX_PROBED`] were.
    over_bound: HashSet<u64>,
    /// The creator stack named per statement (kept after the probe goes).
    named: HashMap<u64, Vec<u64>>,
    /// Statements probed since attach.
    probed_ever: usize,
}

impl CreatorProbes {
    pub fn new(probes: &mut Probes) -> Result<Self> {
        Ok(Self {
            frames: probes.take_map("GO_CREATOR_FRAMES")?,
            creations: probes.take_map("GO_CREATIONS")?,
            creator_of: probes.take_map("GO_CREATOR_OF")?,
            attached: HashMap::new(),
            not_leak: HashMap::new(),
            refused: HashSet::new(),
            over_bound: HashSet::new(),
            named: HashMap::new(),
            probed_ever: 0,
        })
    }

    /// The statements whose live goroutines' parents the scan should keep.
    pub fn watched(&self) -> HashSet<u64> {
        self.attached.keys().copied().collect()
    }

    /// A new image: every probe goes, nothing named stays.
    pub fn detach_all(&mut self, probes: &mut Probes) {
        for (_, link) in self.attached.drain() {
            let _ = probes.detach_uprobe(PROGRAM, link);
        }
        self.not_leak.clear();
        self.refused.clear();
        self.over_bound.clear();
        self.named.clear();
    }

    /// Probes the statements of leaking groups that are a library's, and
    /// unprobes those whose group is no longer a leak.
    pub fn follow(&mut self, probes: &mut Probes, target: &Target, g: &GoroutineCollector, findings: &[Finding], own: &OwnCode) {
        let leaking: HashSet<u64> = findings
            .iter()
            .filter(|f| f.kind == Kind::Goroutine && f.verdict == Verdict::Leak)
            .filter(|f| f.stack.first().is_some_and(|s| own.own_depth(std::slice::from_ref(s)).is_none()))
            .filter_map(|f| f.addresses.first().map(|a| a + 1))
            .collect();
        let probed: Vec<u64> = self.attached.keys().copied().collect();
        for gopc in probed {
            let misses = self.not_leak.entry(gopc).or_default();
            *misses = if leaking.contains(&gopc) { 0 } else { *misses + 1 };
            if *misses >= DETACH_AFTER {
                self.not_leak.remove(&gopc);
                if let Some(link) = self.attached.remove(&gopc) {
                    let _ = probes.detach_uprobe(PROGRAM, link);
                }
            }
        }
        let Some(exe) = crate::procfs::exe_path(target.pid) else { return };
        for gopc in leaking {
            if self.attached.contains_key(&gopc) || self.refused.contains(&gopc) {
                continue;
            }
            if self.attached.len() >= MAX_PROBED {
                self.over_bound.insert(gopc);
                continue;
            }
            let Some((offset, goid_at)) = g.creator_call(gopc) else {
                self.refused.insert(gopc);
                continue;
            };
            let cookie = (goid_at << COOKIE_GOID_SHIFT) | (gopc & ((1 << COOKIE_GOID_SHIFT) - 1));
            match probes.attach_uprobe_with_cookie(PROGRAM, &exe, offset, Some(cookie), target.pid) {
                Ok(link) => {
                    self.attached.insert(gopc, link);
                    self.probed_ever += 1;
                }
                Err(e) => {
                    output::warn(format!("cannot probe the go statement at {gopc:#x} for its callers: {e:#}"));
                    self.refused.insert(gopc);
                }
            }
        }
    }

    /// Gives each probed (or once probed) statement's sample the creator
    /// stack that made most of its live goroutines (`parents`: their
    /// creators' goroutine ids per statement, from the scan).
    pub fn name_creators(&mut self, samples: &mut [StackSample], parents: &HashMap<u64, Vec<u64>>) {
        for &gopc in self.attached.keys() {
            let known: Vec<u64> = parents.get(&gopc).map(|p| p.iter().copied().filter(|&p| p != 0).collect()).unwrap_or_default();
            let mut by_stack: HashMap<u64, u64> = HashMap::new();
            if known.is_empty() {
                // No parentGoid (Go 1.19, or none live yet): who ran it most.
                for (k, per_cpu) in self.creations.iter().filter_map(|e| e.ok()) {
                    if k.gopc == gopc {
                        *by_stack.entry(k.stack).or_default() += per_cpu.iter().sum::<u64>();
                    }
                }
            } else {
                for goid in known {
                    if let Ok(stack) = self.creator_of.get(&GoCreator { goid, gopc }, 0) {
                        *by_stack.entry(stack).or_default() += 1;
                    }
                }
            }
            let Some((&stack, _)) = by_stack.iter().max_by_key(|(s, n)| (**n, std::cmp::Reverse(**s))) else { continue };
            if let Ok(f) = self.frames.get(&stack, 0) {
                self.named.insert(gopc, f.ips[..(f.len as usize).min(f.ips.len())].to_vec());
            }
        }
        for s in samples.iter_mut() {
            let SampleStack::Addresses(a) = &s.stack else { continue };
            if let Some(creator) = a.first().and_then(|pc| self.named.get(&(pc + 1))) {
                s.created_by = Some(SampleStack::Addresses(creator.clone()));
            }
        }
    }

    /// What the probes did, for the end of a trace (empty when nothing).
    pub fn summary(&self) -> String {
        if self.probed_ever == 0 && self.refused.is_empty() && self.over_bound.is_empty() {
            return String::new();
        }
        let creations: u64 = self.creations.iter().filter_map(|e| e.ok()).map(|(_, n)| n.iter().sum::<u64>()).sum();
        format!(
            "; creator probes on {} library go statement{} of leaking goroutines ({creations} creations recorded{}{})",
            self.probed_ever,
            if self.probed_ever == 1 { "" } else { "s" },
            if self.refused.is_empty() { String::new() } else { format!(", {} not probeable", self.refused.len()) },
            if self.over_bound.is_empty() { String::new() } else { format!(", {} not probed: more than {MAX_PROBED}", self.over_bound.len()) },
        )
    }
}

impl GoroutineCollector {
    /// Where to probe the `go` statement that returns to `gopc`: the file
    /// offset of its `CALL runtime.newproc` and the offset of `goid` in a
    /// `g`; `None` when the bytes before `gopc` are no such call.
    pub fn creator_call(&self, gopc: u64) -> Option<(u64, u64)> {
        let ret = gopc.checked_sub(self.bias)?;
        let code = self.bin.code(ret.checked_sub(5)?, 5)?;
        let (at, target) = crate::binary::x86::direct_call_before(code, ret)?;
        let callee = self.bin.symbols.pclntab.lookup(target)?;
        (callee.function == "runtime.newproc" && callee.entry == target).then_some(())?;
        Some((self.bin.file_offset(at)?, self.bin.offsets.goid))
    }
}
