//! User-side stack code: stacks as collectors have them ([`SampleStack`]:
//! a kernel stack id or addresses walked by a BPF program or read from
//! memory), where a libc wrapper keeps its caller's return address
//! (`syscall_sites`), addresses to frames (`symbolize`), and stack keys to
//! symbolized frames, cached (`resolve`), and the unwind rules the kernel
//! side walks code without frame pointers with (`unwind`). The kernel-side
//! walkers are `tracer-ebpf/src/stacks.rs`.

pub mod jvm;
pub mod resolve;
pub mod symbolize;
pub mod syscall_sites;
pub mod unwind;

use std::time::Duration;

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData};
use tracer_common::stacks::{StackKey, WalkedFrames, MAX_WALKED_FRAMES};

use crate::{
    output,
    probes::Probes,
    procfs::{self, MemoryMap},
    trackers::Counters,
};

/// Everything a session keeps about stacks: the resolver (keys to frames),
/// the unwinder that learns rules for the kernel's walks (`None` with
/// `--unwind fp`), and what the kernel side is told about the image (the
/// executable's text, libc's syscall sites).
pub struct Stacks {
    pub resolver: resolve::StackResolver,
    unwinder: Option<unwind::Unwinder>,
    /// The executable's text range given to the kernel side.
    app_text: (u64, u64),
    /// Objects already warned about for having no symbols.
    pub stripped: symbolize::StrippedWarnings,
    /// Java frames: the kernel side's settings per JVM, and whether this
    /// target's were looked for (`JavaSetup`).
    jvm_config: BpfHashMap<MapData, u32, tracer_common::jvm::JvmConfig>,
    java_setup: JavaSetup,
    /// How long learning waits now, and at most while nothing is missed
    /// (see [`Stacks::learn`]).
    learn_every: Duration,
    pub learn_idle: Duration,
}

/// Learning's period while misses come: a new call path's stacks stay cut
/// until its rules are learned (a round per frame), and the miss queue is
/// bounded.
pub const LEARN_SOON: Duration = Duration::from_millis(10);

/// Where setting up Java frames for the target stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JavaSetup {
    /// Not looked at yet, or the JVM was not initialised (tries so far).
    Pending(u32),
    /// Done: walking, or not a JVM / not supported (said once).
    Done,
}

/// Intervals a JVM that is mapped but not initialised is retried.
const JAVA_SETUP_TRIES: u32 = 30;

impl Stacks {
    /// Takes the stack maps out of the loaded object.
    pub fn new(probes: &mut Probes, pid: u32, unwind: bool) -> Result<Self> {
        let resolver = resolve::StackResolver::new(&mut probes.ebpf, pid, symbolize::SymbolizerService::start())?;
        let unwinder = if unwind { Some(unwind::Unwinder::new(probes, pid)?) } else { None };
        let jvm_config = probes.take_map("JVM_CONFIG")?;
        Ok(Self {
            resolver,
            unwinder,
            app_text: (0, 0),
            stripped: Default::default(),
            jvm_config,
            java_setup: JavaSetup::Pending(0),
            learn_every: LEARN_SOON,
            learn_idle: LEARN_SOON,
        })
    }

    /// How the kernel side walks user stacks: unwind rules, or frame pointers.
    /// `java`: whether the target may be a JVM; else the Java walk is left
    /// out of every program at load (a constant the verifier prunes by:
    /// loading is much faster without it).
    pub fn configure(load: &mut crate::probes::LoadSettings, unwind: bool, java: bool) {
        use tracer_common::stacks::unwind_mode;
        load.u32_globals.push(("UNWIND_MODE", if unwind { unwind_mode::RULES } else { unwind_mode::FRAME_POINTERS }));
        if unwind && !load.stack_ids {
            // Else only the frame-pointer walk uses bpf_get_stackid's
            // table, preallocated: 17 MiB at its 16384 stacks.
            load.max_entries.push(("STACKS", 1));
        }
        load.u32_globals.push(("JAVA_WALK", u32::from(java)));
    }

    /// Whether unwind rules are learned (else frame pointers are walked).
    pub fn unwinding(&self) -> bool {
        self.unwinder.is_some()
    }

    /// Tells the kernel side what it needs of newly read mappings: where
    /// the executable's code is (`stacks::app_stack` finds the application's
    /// frames under deep libc calls by it) and, until `libc_loaded`, libc's
    /// syscall sites. Returns whether libc's sites are loaded now.
    pub fn sync_mappings(&mut self, probes: &mut Probes, pid: u32, mappings: &MemoryMap, libc_loaded: bool) -> bool {
        self.setup_java(pid, mappings);
        self.resolver.name_new_java_stacks();
        if let Some(range) = procfs::exe_text(pid, mappings) {
            if range != self.app_text && probes.set_app_text(range).is_ok() {
                self.app_text = range;
            }
        }
        if libc_loaded {
            return true;
        }
        match syscall_sites::find_in_process(pid, mappings) {
            Ok(sites) if !sites.is_empty() => probes.set_syscall_sites(&sites).is_ok(),
            // A static program (Go, musl, static glibc) was read whole: no
            // libc will come.
            Ok(_) => mappings.is_static(),
            Err(e) => {
                output::warn(format!(
                    "cannot read libc's syscall wrappers ({e:#}); C stacks will miss the direct caller of connect/socket"
                ));
                true
            }
        }
    }

    /// A HotSpot JVM's Java frames: its walk set up in the kernel once it
    /// is initialised; an unsupported one is said once (native stacks as
    /// before).
    fn setup_java(&mut self, pid: u32, mappings: &MemoryMap) {
        let JavaSetup::Pending(tries) = self.java_setup else { return };
        if crate::binary::hotspot::libjvm_mapping(mappings).is_none() {
            return;
        }
        let started = std::time::Instant::now();
        match jvm::Jvm::attach(pid, mappings) {
            Ok(Some(mut j)) => {
                j.setup_ms = started.elapsed().as_secs_f64() * 1000.0;
                if let Err(e) = self.jvm_config.insert(pid, j.config, 0) {
                    output::warn(format!("Java frames are off: cannot configure the walk ({e})"));
                } else {
                    self.resolver.java = Some(j);
                }
                self.java_setup = JavaSetup::Done;
            }
            Ok(None) => {}
            Err(e) if e.downcast_ref::<jvm::NotReady>().is_some() && tries + 1 < JAVA_SETUP_TRIES => {
                self.java_setup = JavaSetup::Pending(tries + 1);
            }
            Err(e) => {
                output::warn(format!("Java frames are off, stacks of the JVM are native: {e:#}"));
                self.java_setup = JavaSetup::Done;
            }
        }
    }

    /// Learns the unwind rules the kernel's walks asked for since the last call,
    /// and says when to look again: [`LEARN_SOON`] while misses come, twice
    /// as long after each look that found none, up to `learn_idle` (the
    /// agent's `SESSION_PACE`: an idle target woke it 100 times a second).
    pub fn learn(&mut self, memory: &mut MemoryMap) -> Duration {
        let taken = self.unwinder.as_mut().map_or(0, |u| u.learn(memory));
        self.learn_every = if taken > 0 { LEARN_SOON } else { (self.learn_every * 2).min(self.learn_idle) };
        self.learn_every
    }

    /// A new image: rules of the old one mean nothing now.
    pub fn on_exec(&mut self) {
        self.resolver.java = None;
        let _ = self.jvm_config.remove(&self.resolver.pid());
        self.java_setup = JavaSetup::Pending(0);
        if let Some(u) = self.unwinder.as_mut() {
            u.clear();
        }
    }

    /// Stacks left cut short: at the walk's depth bound, or at a rule
    /// never learned.
    pub fn truncated(&self, counters: &Counters) -> u64 {
        use tracer_common::stacks::unwind_counter as u;
        counters.sum(u::DEPTH_CAP)
            + counters.sum(u::QUEUE_FULL)
            + counters.sum(tracer_common::jvm::counter::CUT)
            + self.unwinder.as_ref().map_or(0, |w| w.stats.unfinished)
    }

    /// What the unwinder did, for the end of a trace.
    pub fn closing_note(&self, counters: &Counters) -> Option<String> {
        use tracer_common::jvm::counter as jc;
        let java = self.resolver.java.as_ref().map(|j| {
            format!(
                "Java frames: JDK {} ({} VMStructs fields read, set up in {:.0} ms), {} events walked ({} cut short), {} with no Java frames (native), {} frames left unnamed",
                j.version,
                j.fields,
                j.setup_ms,
                counters.sum(jc::WALKS),
                counters.sum(jc::CUT),
                counters.sum(jc::NATIVE),
                j.unknown_frames
            )
        });
        let queue_full = counters.sum(tracer_common::stacks::unwind_counter::QUEUE_FULL);
        let native = self.unwinder.as_ref().map(|u| match queue_full {
            0 => u.stats.summary(),
            n => format!("{}; {n} first walks left cut while the miss queue was full", u.stats.summary()),
        });
        match (native, java) {
            (Some(n), Some(j)) => Some(format!("{n}; {j}")),
            (n, j) => n.or(j),
        }
    }
}

/// A stack as a collector has it: an id in the kernel's stack map (probes,
/// tracepoints), or addresses read out of the target's memory (a goroutine's
/// `go` statement, a parked goroutine's frames), innermost first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SampleStack {
    Kernel(StackKey),
    Addresses(Vec<u64>),
    /// A Java thread's frames walked in user space (the wait tracker), in
    /// the kernel Java walk's encoding (`ips[0]` its header): named by the
    /// JVM as the `JAVA_STACK` stacks are.
    Java(Vec<u64>),
}

impl From<StackKey> for SampleStack {
    fn from(key: StackKey) -> Self {
        SampleStack::Kernel(key)
    }
}

/// A stack a BPF program walked itself, by its key in the tracker's
/// walked-stack table (`stacks::walk_user_stack`, `unwind_user_stack`);
/// "[stack not recorded]" when it is not there.
pub fn walked_stack(frames: &BpfHashMap<MapData, u64, WalkedFrames>, key: u64) -> SampleStack {
    match frames.get(&key, 0) {
        Ok(f) => {
            let mut ips = f.ips[..(f.len as usize).min(f.ips.len())].to_vec();
            // A walk cut at a pc without a rule, finished from its snapshot.
            if let Some(more) = unwind::completed_frames(key) {
                ips.extend(more);
                ips.truncate(MAX_WALKED_FRAMES);
            }
            SampleStack::Addresses(ips)
        }
        Err(_) => SampleStack::Kernel(StackKey { stack_id: -1, caller: 0 }),
    }
}

/// The empty stack (shown as "[stack not recorded]").
impl Default for SampleStack {
    fn default() -> Self {
        SampleStack::Addresses(Vec::new())
    }
}

