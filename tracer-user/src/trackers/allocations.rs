//! Allocation tracker, user side: reads the per-stack totals the kernel
//! keeps (blocks and bytes allocated and freed) and each stack's sentinel
//! age, and yields one sample per creation stack. It never walks the
//! live-block table: the work per interval is bounded by the number of
//! stacks, not of blocks.

pub mod plan;
pub mod results;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuHashMap};
use tracer_common::{
    allocations::{counter, AllocCounts},
    stacks::{StackKey, WalkedFrames, MAX_WALKED_STACKS, WALKED_STACK},
};

use super::{Collected, Counters, Judging, StackSample, Tally, Target, Tracker, TrackerSpec};
use crate::{
    stacks::{walked_stack, SampleStack},
    cli::TraceOptions,
    output,
    probes::{LoadSettings, Probes, Tracepoints},
    procfs::{self, MemoryMap},
    report::Kind,
    stacks::syscall_sites,
};

/// The allocation tracker in the registry (asked for by name: it traps on
/// every malloc and free, about 1-2 µs each, too dear for a default).
pub const SPEC: TrackerSpec = TrackerSpec { name: "allocations", default: false, configure, new };

/// The live-block and pending-call tables are preallocated (written at
/// every sampled malloc): only as big as asked when the tracker runs; the
/// others minimal too when it does not.
fn configure(load: &mut LoadSettings, opts: &TraceOptions, active: bool) {
    load.u64_globals.push(("ALLOC_SAMPLE_BYTES", opts.alloc_sample_bytes));
    load.max_entries.push(("ALLOCS", if active { opts.max_allocations } else { 1 }));
    load.max_entries.push(("ALLOC_FRAMES", if active { MAX_WALKED_STACKS } else { 1 }));
    if !active {
        load.minimal(&["ALLOC_PENDING", "ALLOC_OUTER", "ALLOC_STACKS", "ALLOC_OLDEST"]);
    }
}

fn new(probes: &mut Probes, opts: &TraceOptions, _target: &Target) -> Result<Box<dyn Tracker>> {
    if let Some(lib) = &opts.alloc_lib {
        if !lib.exists() {
            anyhow::bail!("--alloc-lib {}: no such file", lib.display());
        }
    }
    Ok(Box::new(Allocations {
        collector: AllocationCollector::new(probes)?,
        flags: probes.take_map("ALLOC_FLAGS")?,
        objects: HashSet::new(),
        attached: false,
        lib: opts.alloc_lib.clone(),
        prefix: opts.alloc_prefix.clone(),
    }))
}

/// The allocation tracker's tracepoints (its uprobes are attached per
/// allocator object).
const TRACEPOINTS: Tracepoints = &[
    ("alloc_mmap_exit", "syscalls", "sys_exit_mmap"),
    ("alloc_munmap_enter", "syscalls", "sys_enter_munmap"),
];

/// The allocation tracker: its collector, and the allocator objects probed.
struct Allocations {
    collector: AllocationCollector,
    /// Tells the return program to look for an `operator new` in progress.
    flags: Array<MapData, u32>,
    /// Objects (by mapped path) whose allocator or `operator new` was
    /// planned, so each gets its probes once.
    objects: HashSet<PathBuf>,
    /// An allocator (`malloc`) is probed.
    attached: bool,
    /// `--alloc-lib`, `--alloc-prefix`.
    lib: Option<PathBuf>,
    prefix: String,
}

impl Allocations {
    /// Attaches the planned uprobes to the object at `path`; the return
    /// program goes with every entry that needs it.
    fn attach(&mut self, probes: &mut Probes, pid: u32, path: &std::path::Path, plan: &[self::plan::AllocProbe]) -> Result<()> {
        for p in plan {
            let programs: &[&str] = if p.returns { &[p.program, "alloc_return"] } else { &[p.program] };
            for &name in programs {
                probes
                    .attach_uprobe_with_cookie(name, path, p.file_offset, p.cookie, pid)
                    .with_context(|| format!("cannot attach a uprobe to {}+{} in {}", p.function, p.delta, path.display()))?;
            }
        }
        if plan.iter().any(|p| p.program == "alloc_new") {
            self.flags.set(0, 1, 0)?;
        }
        Ok(())
    }
}

impl Tracker for Allocations {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn tracepoints(&self) -> Tracepoints {
        TRACEPOINTS
    }

    /// `run`: the allocator probes go on the libc the command will map
    /// (`--alloc-lib` when given) before it runs, so its first allocations
    /// are seen; [`Tracker::on_mappings`] then finds that object done.
    fn before_exec(&mut self, probes: &mut Probes, target: &Target, program: &std::path::Path) {
        let lib = match &self.lib {
            Some(lib) => std::fs::canonicalize(lib).ok(),
            None => crate::binary::elf::libc_it_will_map(program),
        };
        let Some(lib) = lib else { return };
        let Ok(plan) = self::plan::probes_in_file(&lib, &self.prefix, true) else { return };
        if !plan.iter().any(|p| p.function == "malloc") {
            return;
        }
        if self.attach(probes, target.pid, &lib, &plan).is_ok() {
            self.attached = true;
            self.objects.insert(lib);
        }
    }

    /// Probes the allocator the target maps (`--alloc-lib`, else its libc,
    /// else its executable when static) and `operator new` in libstdc++,
    /// once per object.
    fn on_mappings(&mut self, probes: &mut Probes, target: &Target, mappings: &MemoryMap) {
        let pid = target.pid;
        let prefix = self.prefix.clone();
        let prefix = prefix.as_str();
        let wanted = self.lib.as_ref().map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
        let exe = procfs::exe_path(pid);
        let executable = mappings.mappings.iter().filter(|m| m.executable);
        let allocator = match &wanted {
            Some(lib) => executable.clone().find(|m| &m.path == lib || m.path.file_name() == lib.file_name()),
            // The executable only when static: a dynamic program's libc may
            // not be mapped yet (`run`), and comes with a later read.
            None => executable.clone().find(|m| syscall_sites::is_libc(&m.path)).or_else(|| {
                mappings.is_static().then(|| executable.clone().find(|m| Some(&m.path) == exe.as_ref())).flatten()
            }),
        };
        let mut objects: Vec<(&procfs::Mapping, bool)> = allocator.into_iter().map(|m| (m, true)).collect();
        objects.extend(
            executable
                .filter(|m| m.path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libstdc++")))
                .map(|m| (m, false)),
        );
        for (m, is_allocator) in objects {
            if !self.objects.insert(m.path.clone()) {
                continue;
            }
            let path = procfs::object_path(pid, m);
            let plan = if is_allocator {
                self::plan::probes_in_file(&path, prefix, true)
            } else {
                std::fs::read(&path).map_err(anyhow::Error::from).and_then(|d| self::plan::operator_new_probes(&d))
            };
            let plan = match plan {
                Ok(p) => p,
                Err(e) => {
                    output::warn(format!("cannot read {} ({e:#}): its allocations are not tracked", path.display()));
                    continue;
                }
            };
            if is_allocator && !plan.iter().any(|p| p.function == "malloc") {
                output::warn(format!(
                    "no {prefix}malloc in {}: allocations not tracked (see --alloc-lib, --alloc-prefix)",
                    m.path.display()
                ));
                continue;
            }
            let dear: Vec<&str> = plan.iter().filter(|p| !p.cheap).map(|p| p.function.as_str()).collect();
            if !dear.is_empty() {
                output::note(format!(
                    "note: {} in {} start with instructions the kernel must single-step: probed at the symbol (slower)",
                    dear.join(", "),
                    m.path.display()
                ));
            }
            match self.attach(probes, pid, &path, &plan) {
                Ok(()) => self.attached |= is_allocator,
                Err(e) => output::warn(format!("{e:#}; allocations are not tracked")),
            }
        }
    }

    fn on_start(&mut self, _probes: &mut Probes, target: &Target) {
        if !self.attached {
            output::warn(format!(
                "no allocator found in {} yet (no libc with malloc; give --alloc-lib for a static binary or custom allocator)",
                target.pid
            ));
        }
    }

    /// Judged on live bytes: a buffer realloc'd bigger grows in bytes, not
    /// in blocks.
    fn collect(&mut self, _probes: &mut Probes, _target: &Target, _counters: &super::Counters, now_ns: u64) -> Result<Collected> {
        let samples = self.collector.collect(now_ns)?;
        Ok(Collected::Growth { kind: Kind::Allocation, judging: Judging::BytesSinceAttach, samples })
    }

    /// Blocks not tracked (live-block or pending-call table full) are lost.
    fn tally(&self, counters: &Counters) -> Tally {
        Tally {
            events: vec![(Kind::Allocation, counters.sum(counter::EVENTS))],
            lost: counters.sum(counter::LOST) + counters.sum(counter::LOST_CALLS),
            untracked_frees: Some(counters.sum(counter::UNTRACKED_FREES)),
        }
    }
}

/// Reads the allocation tracker's maps for one target.
pub struct AllocationCollector {
    stacks: PerCpuHashMap<MapData, StackKey, AllocCounts>,
    oldest: BpfHashMap<MapData, StackKey, u64>,
    /// Stacks the BPF programs walked themselves (`WALKED_STACK` keys).
    frames: BpfHashMap<MapData, u64, WalkedFrames>,
}

impl AllocationCollector {
    /// Takes the tracker's maps out of the loaded object.
    pub fn new(probes: &mut Probes) -> Result<Self> {
        probes.seed_overflow_stack::<AllocCounts>("ALLOC_STACKS")?;
        Ok(Self {
            stacks: probes.take_map("ALLOC_STACKS")?,
            oldest: probes.take_map("ALLOC_OLDEST")?,
            frames: probes.take_map("ALLOC_FRAMES")?,
        })
    }

    /// One sample per creation stack that allocated anything. `now_ns` is
    /// CLOCK_MONOTONIC. `live` counts blocks, `live_bytes` bytes; the age is
    /// the stack's sentinel block's (a lower bound of its oldest live block's).
    pub fn collect(&mut self, now_ns: u64) -> Result<Vec<StackSample>> {
        let oldest: HashMap<StackKey, u64> = self.oldest.iter().filter_map(|r| r.ok()).collect();
        let mut out = Vec::new();
        for entry in self.stacks.iter() {
            let Ok((stack, per_cpu)) = entry else { continue };
            // Wrapping: a CPU's copy can go below zero when a mapping the
            // allocator made for itself is taken back there.
            let t = per_cpu.iter().fold(AllocCounts::default(), |a, v| AllocCounts {
                created: a.created.wrapping_add(v.created),
                ended: a.ended.wrapping_add(v.ended),
                bytes_created: a.bytes_created.wrapping_add(v.bytes_created),
                bytes_ended: a.bytes_ended.wrapping_add(v.bytes_ended),
            });
            if t.created == 0 && t.ended == 0 {
                continue;
            }
            let live = t.created.saturating_sub(t.ended);
            // 0: the sentinel slot is vacant (see the kernel side).
            let age = oldest.get(&stack).filter(|&&c| live > 0 && c != 0).map(|&c| now_ns.saturating_sub(c) as f64 / 1e9);
            out.push(StackSample {
                stack: self.sample_stack(stack),
                live,
                created: t.created,
                ended: t.ended,
                // A stack with live blocks but no sentinel (its sentinel was
                // freed and no block came since) has blocks of unknown age.
                oldest_age_s: if live > 0 { Some(age.unwrap_or(0.0)) } else { None },
                peer: None,
                thread_name: None,
                live_bytes: Some(t.bytes_created.saturating_sub(t.bytes_ended)),
                ..Default::default()
            });
        }
        Ok(out)
    }

    /// A kernel key as a stack the resolver understands.
    fn sample_stack(&self, key: StackKey) -> SampleStack {
        if key.stack_id != WALKED_STACK {
            return SampleStack::Kernel(key);
        }
        walked_stack(&self.frames, key.caller)
    }
}
