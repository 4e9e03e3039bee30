//! One tracing session: attach, sample every interval, judge, report, detach.

use std::{
    collections::{BTreeMap, HashSet},
    hash::{Hash, Hasher},
    io::{IsTerminal, Write},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cli::{Format, TraceOptions},
    growth::{GrowthConfig, GrowthEngine},
    probes::{self, Probes},
    procfs::{self, MemoryMap},
    render::{self, prometheus::SharedReport, table::TableOptions},
    report::{Finding, Kind, Lost, Report, Verdict},
    stacks::{
        resolve::StackResolver,
        symbolize::{site_index, site_of, SymbolizerService},
        syscall_sites,
    },
    trackers::{
        allocations::AllocationCollector, connections::ConnectionCollector, goroutines::GoroutineCollector, locks::LockCollector, maps::MapCollector, threads::ThreadCollector,
        Counters,
    },
};

/// How the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Duration,
    Signal,
    TargetExited,
}

/// What a finished session hands back to the CLI.
pub struct Outcome {
    pub report: Report,
    pub end: EndReason,
}

/// A process leaktrace started and holds before `exec` (run / check -- CMD).
pub trait HeldChild: Send {
    /// Lets the child exec its command.
    fn release(&mut self) -> Result<()>;
    /// Reaps the child if it exited; true when it is gone.
    fn reap(&mut self) -> bool;
    /// Stops the child (we started it, we end it).
    fn terminate(&mut self);
}

/// Everything the loop reads from the kernel side.
struct Kernel {
    probes: Probes,
    connections: ConnectionCollector,
    threads: ThreadCollector,
    locks: LockCollector,
    /// Which trackers run.
    track_connections: bool,
    track_threads: bool,
    /// Goroutines of a Go target (`tasks`): read from its memory, no probes.
    goroutines: Option<GoroutineCollector>,
    /// The map tracker, when asked for and the target is a Go program.
    maps: Option<MapCollector>,
    track_locks: bool,
    /// The libc whose `pthread_create` carries the thread tracker's uprobe.
    pthread_uprobe: Option<std::path::PathBuf>,
    resolver: StackResolver,
    counters: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    allocations: AllocationCollector,
    track_allocations: bool,
    /// Objects (by mapped path) whose allocator or `operator new` was
    /// planned, so each gets its probes once.
    alloc_objects: HashSet<std::path::PathBuf>,
    /// An allocator (`malloc`) is probed.
    alloc_attached: bool,
    /// `--alloc-lib`, `--alloc-prefix`.
    alloc_lib: Option<std::path::PathBuf>,
    alloc_prefix: String,
}

impl Kernel {
    fn counters(&self) -> Counters {
        let sum = |i: u32| self.counters.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
        use tracer_common::counter as c;
        Counters {
            events: sum(c::EVENTS),
            lost_events: sum(c::LOST_EVENTS),
            lost_stacks: sum(c::LOST_STACKS),
            lost_ring: sum(c::LOST_RING),
            thread_events: sum(c::THREAD_EVENTS),
            map_events: sum(c::MAP_EVENTS),
            map_lost: sum(c::MAP_LOST),
            alloc_events: sum(c::ALLOC_EVENTS),
            alloc_untracked_frees: sum(c::ALLOC_UNTRACKED_FREES),
            alloc_lost: sum(c::ALLOC_LOST) + sum(c::ALLOC_LOST_CALLS),
            lock_waits: sum(c::LOCK_WAITS),
            lock_lost: sum(c::LOCK_LOST),
        }
    }
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn series_id(key: &impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Traces `pid` until the duration ends, a signal comes or the target exits.
pub async fn trace(pid: u32, opts: &TraceOptions, mut child: Option<Box<dyn HeldChild>>) -> Result<Outcome> {
    let trackers = crate::cli::trackers(&opts.track).map_err(anyhow::Error::msg)?;
    probes::preflight()?;
    procfs::check_target(pid)?;
    let comm_at_start = procfs::comm(pid);

    let mut attachments = Vec::new();
    if trackers.contains(&"connections") {
        attachments.push(probes::CONNECTIONS);
    }
    if trackers.contains(&"tasks") {
        attachments.push(probes::THREADS);
    }
    if trackers.contains(&"allocations") {
        attachments.push(probes::ALLOCATIONS);
    }
    if let Some(lib) = opts.alloc_lib.as_ref().filter(|_| trackers.contains(&"allocations")) {
        if !lib.exists() {
            anyhow::bail!("--alloc-lib {}: no such file", lib.display());
        }
    }
    if trackers.contains(&"locks") {
        attachments.push(probes::LOCKS);
    }
    // The live-block table is preallocated (~100 bytes an entry): only as
    // big as asked when the allocation tracker runs.
    let max_allocations = if trackers.contains(&"allocations") { opts.max_allocations } else { 1 };
    // The tables of a tracker that does not run are made minimal.
    let max_stacks = if trackers.contains(&"allocations") { tracer_common::stacks::MAX_WALKED_STACKS } else { 1 };
    let alloc_load = probes::AllocLoad { max_allocations, sample_bytes: opts.alloc_sample_bytes, max_stacks };
    let mut probes = Probes::load(pid, opts.max_sockets, alloc_load)?;
    let allocations = AllocationCollector::new(&mut probes.ebpf)?;
    let connections = ConnectionCollector::new(&mut probes.ebpf, pid)?;
    let threads = ThreadCollector::new(&mut probes.ebpf, pid)?;
    let locks = LockCollector::new(&mut probes.ebpf, pid)?;
    let symbolizer = SymbolizerService::start();
    let resolver = StackResolver::new(&mut probes.ebpf, pid, symbolizer)?;
    let counters = aya::maps::PerCpuArray::try_from(
        probes.ebpf.take_map("COUNTERS").ok_or_else(|| anyhow::anyhow!("COUNTERS map missing"))?,
    )?;
    let mut kernel = Kernel {
        probes,
        connections,
        threads,
        locks,
        track_connections: trackers.contains(&"connections"),
        track_threads: trackers.contains(&"tasks"),
        goroutines: None,
        maps: None,
        track_locks: trackers.contains(&"locks"),
        pthread_uprobe: None,
        resolver,
        counters,
        allocations,
        track_allocations: trackers.contains(&"allocations"),
        alloc_objects: HashSet::new(),
        alloc_attached: false,
        alloc_lib: opts.alloc_lib.clone(),
        alloc_prefix: opts.alloc_prefix.clone(),
    };

    let mut memory = MemoryMap::read(pid).unwrap_or_default();
    let mut libc_loaded;
    let mut comm_at_start = comm_at_start;
    // Syscall sites before the programs run, so that the first sockets
    // already get their direct caller (attach); `run` loads them after exec.
    let sites_before_attach = child.is_none() && load_syscall_sites(&mut kernel, pid, &memory);
    kernel.probes.attach(&attachments)?;
    if let Some(c) = child.as_mut() {
        // Returns once the command has exec'd; its libc appears a moment
        // later, mapped by the dynamic loader: watch for it closely so the
        // first connections already get their direct caller.
        c.release()?;
        memory = MemoryMap::default();
        libc_loaded = wait_for_libc(&mut kernel, pid, &mut memory, Duration::from_secs(2)).await;
        comm_at_start = procfs::comm(pid);
    } else {
        libc_loaded = sites_before_attach;
    }
    if kernel.track_threads {
        kernel.goroutines = open_goroutines(pid);
    }
    if !libc_loaded && kernel.track_threads && kernel.goroutines.is_none() {
        eprintln!(
            "leaktrace: {pid} maps no libc (static or Go): no pthread_create probe; threads get the stack seen at clone"
        );
    }
    if trackers.contains(&"maps") {
        start_maps(&mut kernel, pid);
    }
    let mut execs_seen = 0;

    let shared: SharedReport = render::prometheus::new_shared_report();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server = None;
    if let Some(addr) = opts.listen {
        let mut rx = stop_rx.clone();
        let shutdown = async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let (bound, handle) =
            crate::metrics_server::serve(addr, shared.clone(), opts.max_sites, shutdown).await?;
        eprintln!("leaktrace: serving metrics at http://{bound}/metrics");
        server = Some(handle);
    }

    eprintln!(
        "leaktrace: attached to {pid} ({comm_at_start}): tracking {}; {}",
        trackers.join(","),
        match opts.duration {
            Some(d) => format!("for {}", humantime::format_duration(d)),
            None => "until Ctrl-C or the target exits".into(),
        }
    );

    let format = opts.effective_format();
    let is_tty = std::io::stdout().is_terminal();
    let table_opts = TableOptions::default();
    let mut growth = GrowthEngine::new(GrowthConfig::default());
    let start = Instant::now();
    let started_wall = SystemTime::now();
    let deadline = opts.duration.map(|d| start + d);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut report_tick = tokio::time::interval_at(tokio::time::Instant::now() + opts.interval, opts.interval);
    // A slow interval (first symbolization of a large binary, a loaded
    // machine) must not be followed by a burst of samples a few ms apart.
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll_tick = tokio::time::interval(Duration::from_millis(100));
    let mut ctx = ReportContext {
        pid,
        comm: comm_at_start.clone(),
        opts: opts.clone(),
        last_t: None,
        warned_stripped: HashSet::new(),
        alloc_counts: GrowthEngine::new(GrowthConfig::default()),
        alloc_bytes: GrowthEngine::new(alloc_bytes_config()),
    };
    if kernel.track_allocations {
        attach_allocator(&mut kernel, pid, &memory);
        if !kernel.alloc_attached {
            eprintln!("leaktrace: warning: no allocator found in {pid} yet (no libc with malloc; give --alloc-lib for a static binary or custom allocator)");
        }
    }

    // Sample at t=0 so growth is measured from attach.
    let first = build_report(&mut kernel, &mut growth, &mut memory, &mut ctx, start, true, false, false).await?;
    *shared.write().unwrap_or_else(|e| e.into_inner()) = Some(first);
    let end = loop {
        tokio::select! {
            _ = sigint.recv() => break EndReason::Signal,
            _ = sigterm.recv() => break EndReason::Signal,
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending::<()>().await,
                }
            } => break EndReason::Duration,
            _ = poll_tick.tick() => {
                kernel.connections.poll_events();
                if kernel.connections.execs != execs_seen {
                    // A new image: addresses of the old one mean nothing now.
                    execs_seen = kernel.connections.execs;
                    libc_loaded = wait_for_libc(&mut kernel, pid, &mut memory, Duration::from_millis(500)).await;
                    if kernel.track_threads {
                        kernel.goroutines = open_goroutines(pid);
                    }
                }
                let gone = child.as_mut().map(|c| c.reap()).unwrap_or(false);
                if gone || kernel.connections.exited || !procfs::is_alive(pid) {
                    break EndReason::TargetExited;
                }
            }
            _ = report_tick.tick() => {
                if let Ok(m) = MemoryMap::read(pid) {
                    memory.merge(&m);
                    if !libc_loaded {
                        // A libc loaded late (dlopen) or a static binary.
                        libc_loaded = load_syscall_sites(&mut kernel, pid, &m);
                    }
                    if kernel.track_allocations {
                        // An allocator or libstdc++ loaded late (dlopen).
                        attach_allocator(&mut kernel, pid, &m);
                    }
                }
                let name = procfs::comm(pid);
                if name != "?" { ctx.comm = name; }
                let report = build_report(&mut kernel, &mut growth, &mut memory, &mut ctx, start, true, false, false).await?;
                emit(&report, format, is_tty, &table_opts);
                *shared.write().unwrap_or_else(|e| e.into_inner()) = Some(report);
            }
        }
    };

    let alive = end != EndReason::TargetExited && procfs::is_alive(pid);
    let exited = !alive && end == EndReason::TargetExited;
    // After the target exits its sockets vanish without close events: the
    // final report is the state when it exited, not a reconciliation to zero.
    // The kernel tables still hold what was live when the target exited
    // (exit closes fds without close events); collecting without
    // reconciliation reports exactly that.
    let final_report = build_report(&mut kernel, &mut growth, &mut memory, &mut ctx, start, alive, true, exited).await?;
    *shared.write().unwrap_or_else(|e| e.into_inner()) = Some(final_report.clone());
    if format == Format::Table && is_tty {
        // Keep the final report below the last live view.
        println!();
    }
    emit(&final_report, format, false, &table_opts);
    if let Some(c) = child.as_mut() {
        if !c.reap() {
            c.terminate();
        }
    }
    let _ = stop_tx.send(true);
    if let Some(h) = server {
        let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
    }
    if let Some(g) = &kernel.goroutines {
        eprintln!("leaktrace: {}", g.scan_summary());
    }
    drop(kernel);
    eprintln!("leaktrace: detached from {pid}");
    // After the final report is printed: a file that cannot be written is an
    // error (exit 1), but the report is not lost.
    write_exports(&final_report, opts, started_wall)?;
    Ok(Outcome { report: final_report, end })
}

/// Writes the `--pprof` profile and the `--flamegraph` SVGs of the final
/// report. Each file is tried even if another failed; the first failure is
/// the error.
fn write_exports(report: &Report, opts: &TraceOptions, started: SystemTime) -> Result<()> {
    let mut first_error = None;
    if let Some(path) = &opts.pprof {
        let time_nanos = started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let bytes = render::pprof::render_pprof(report, time_nanos);
        match write_file(path, &bytes).with_context(|| format!("cannot write pprof profile {}", path.display())) {
            Ok(()) => eprintln!("leaktrace: wrote pprof profile {}", path.display()),
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    if let Some(path) = &opts.flamegraph {
        for (kind, path) in render::flamegraph::output_paths(report, path, opts.flamegraph_kind) {
            let written = render::flamegraph::render_svg(report, kind)
                .with_context(|| format!("cannot draw the {} flame graph", kind.as_str()))
                .and_then(|svg| write_file(&path, &svg).with_context(|| format!("cannot write flame graph {}", path.display())));
            match written {
                Ok(()) => eprintln!("leaktrace: wrote {} flame graph {}", kind.as_str(), path.display()),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it: a
/// reader never sees half a file.
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Polls the target's memory map until its libc is mapped (then loads the
/// syscall sites) or `limit` passes.
async fn wait_for_libc(kernel: &mut Kernel, pid: u32, memory: &mut MemoryMap, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        if let Ok(m) = MemoryMap::read(pid) {
            memory.merge(&m);
            if load_syscall_sites(kernel, pid, &m) {
                return true;
            }
            // The kernel maps the dynamic loader at exec: without one the
            // program is static (Go, musl) and no libc will come.
            let dynamic = m.mappings.iter().any(|x| {
                x.path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ld-linux") || n.starts_with("ld-musl"))
            });
            if !m.mappings.is_empty() && !dynamic {
                return false;
            }
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Fills `SYSCALL_SITES` from the libc the target maps; false when the
/// target has no libc mapped (yet: `run` before the dynamic loader).
fn load_syscall_sites(kernel: &mut Kernel, pid: u32, memory: &MemoryMap) -> bool {
    if kernel.track_threads {
        attach_pthread_create(kernel, pid, memory);
    }
    if kernel.track_allocations {
        attach_allocator(kernel, pid, memory);
    }
    if kernel.track_locks {
        setup_locks(kernel, pid, memory);
    }
    match syscall_sites::find_in_process(pid, memory) {
        Ok(sites) if !sites.is_empty() => kernel.probes.set_syscall_sites(&sites).is_ok(),
        Ok(_) => false,
        Err(e) => {
            eprintln!("leaktrace: warning: cannot read libc's syscall wrappers ({e:#}); C stacks will miss the direct caller of connect/socket");
            true
        }
    }
}

/// Sets up the map tracker: reads the target's Go executable, attaches the
/// growth and clear probes. A target that is not Go (or a probe that cannot
/// be attached) is a one-line warning and no map tracking.
fn start_maps(kernel: &mut Kernel, pid: u32) {
    let started = MapCollector::new(&mut kernel.probes.ebpf, pid).and_then(|mut m| {
        for p in &m.probes {
            kernel
                .probes
                .attach_uprobe_at(p.program, &m.exe, p.file_offset, pid)
                .with_context(|| format!("maps: {}", p.function))?;
        }
        m.duty_cycle(&mut kernel.probes);
        Ok(m)
    });
    match started {
        Ok(m) => {
            if m.stripped {
                eprintln!("leaktrace: maps: {pid} has no symbol table (stripped): maps are named by address");
            }
            kernel.maps = Some(m);
        }
        Err(e) => eprintln!("leaktrace: warning: {e:#}; map tracking is off"),
    }
}

/// Attaches the allocation tracker's uprobes to the allocator the target
/// maps (`--alloc-lib`, else its libc, else its executable when static) and
/// to `operator new` in libstdc++, once per object.
fn attach_allocator(kernel: &mut Kernel, pid: u32, memory: &MemoryMap) {
    let prefix = kernel.alloc_prefix.clone();
    let prefix = prefix.as_str();
    let wanted = kernel.alloc_lib.as_ref().map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let executable = memory.mappings.iter().filter(|m| m.executable);
    let allocator = match &wanted {
        Some(lib) => executable.clone().find(|m| &m.path == lib || m.path.file_name() == lib.file_name()),
        None => executable
            .clone()
            .find(|m| syscall_sites::is_libc(&m.path))
            .or_else(|| executable.clone().find(|m| Some(&m.path) == exe.as_ref())),
    };
    let mut objects: Vec<(&procfs::Mapping, bool)> = allocator.into_iter().map(|m| (m, true)).collect();
    objects.extend(
        executable
            .filter(|m| m.path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libstdc++")))
            .map(|m| (m, false)),
    );
    for (m, is_allocator) in objects {
        if !kernel.alloc_objects.insert(m.path.clone()) {
            continue;
        }
        let path = procfs::object_path(pid, m);
        let plan = if is_allocator {
            crate::trackers::allocations::plan::probes_in_file(&path, prefix, true)
        } else {
            std::fs::read(&path).map_err(anyhow::Error::from).and_then(|d| crate::trackers::allocations::plan::operator_new_probes(&d))
        };
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                eprintln!("leaktrace: warning: cannot read {} ({e:#}): its allocations are not tracked", path.display());
                continue;
            }
        };
        if is_allocator && !plan.iter().any(|p| p.function == "malloc") {
            eprintln!("leaktrace: warning: no {prefix}malloc in {}: allocations not tracked (see --alloc-lib, --alloc-prefix)", m.path.display());
            continue;
        }
        let dear: Vec<&str> = plan.iter().filter(|p| !p.cheap).map(|p| p.function.as_str()).collect();
        if !dear.is_empty() {
            eprintln!(
                "leaktrace: note: {} in {} start with instructions the kernel must single-step: probed at the symbol (slower)",
                dear.join(", "),
                m.path.display()
            );
        }
        match kernel.probes.attach_allocator(pid, &path, &plan) {
            Ok(()) => kernel.alloc_attached |= is_allocator,
            Err(e) => eprintln!("leaktrace: warning: {e:#}; allocations are not tracked"),
        }
    }
}

/// Lock tracker: libc's lock sites, and for a Go program its semaphore
/// probes (once per libc / executable).
fn setup_locks(kernel: &mut Kernel, pid: u32, memory: &MemoryMap) {
    if let Err(e) = kernel.locks.load_libc_sites(memory) {
        eprintln!("leaktrace: warning: cannot analyse libc's lock functions ({e:#}); C lock stacks will miss frames");
    }
    let Some((exe, probes)) = kernel.locks.go_setup(memory) else { return };
    use crate::trackers::locks::golang::Role;
    for p in &probes {
        let entry_prog = match p.role {
            Role::AcquireMutex => "lock_go_acquire_mutex",
            Role::AcquireRead => "lock_go_acquire_read",
            Role::AcquireWrite => "lock_go_acquire_write",
            Role::Release => "lock_go_release",
        };
        let mut r = kernel.probes.attach_uprobe_at(entry_prog, &exe, p.entry, pid).map(|_| ());
        for &ret in &p.rets {
            r = r.and_then(|_| kernel.probes.attach_uprobe_at("lock_go_acquired", &exe, ret, pid).map(|_| ()));
        }
        if let Err(e) = r {
            eprintln!("leaktrace: warning: {e:#}; Go {} waits are not tracked", p.name);
        }
    }
}

/// Attaches the thread tracker's uprobe to the `pthread_create` of the libc
/// the target maps (once per libc file).
fn attach_pthread_create(kernel: &mut Kernel, pid: u32, memory: &MemoryMap) {
    let Some(m) = memory.mappings.iter().find(|m| m.executable && syscall_sites::is_libc(&m.path)) else { return };
    let path = procfs::object_path(pid, m);
    if kernel.pthread_uprobe.as_ref() == Some(&path) {
        return;
    }
    match kernel.probes.attach_pthread_create(pid, &path) {
        Ok(()) => kernel.pthread_uprobe = Some(path),
        Err(e) => {
            eprintln!("leaktrace: warning: {e:#}; threads get the stack seen at clone (C stacks will be wrong)");
            kernel.pthread_uprobe = Some(path);
        }
    }
}

/// The goroutine reader for a Go target; `None` (after one line on stderr
/// saying why, for a Go program we cannot read) otherwise. The thread
/// tracker runs either way.
fn open_goroutines(pid: u32) -> Option<GoroutineCollector> {
    match GoroutineCollector::open(pid) {
        Ok(Some(c)) => {
            eprintln!("leaktrace: Go program, {}: tracking goroutines", c.describe());
            Some(c)
        }
        Ok(None) => None,
        Err(e) => {
            eprintln!("leaktrace: goroutines not tracked: {e:#} (threads still are)");
            None
        }
    }
}

struct ReportContext {
    pid: u32,
    comm: String,
    opts: TraceOptions,
    /// Time of the previous sample.
    last_t: Option<f64>,
    /// Modules already warned about for having no symbols.
    warned_stripped: HashSet<String>,
    /// Allocations: live blocks per stack, for `growth_per_min`.
    alloc_counts: GrowthEngine,
    /// Allocations: live bytes per stack, judged (see [`alloc_bytes_config`]).
    alloc_bytes: GrowthEngine,
}

/// The growth rule for allocations' live bytes: the same rule, with a rise
/// below 8 KiB over the window taken as noise. Blocks in flight at the
/// instant of a sample (malloc then free, thousands per second) make live
/// bytes jitter by a few KiB; a leak rises by far more.
pub fn alloc_bytes_config() -> GrowthConfig {
    GrowthConfig { min_rise_abs: 8192.0, ..GrowthConfig::default() }
}

fn emit(report: &Report, format: Format, is_tty: bool, table_opts: &TableOptions) {
    let mut out = std::io::stdout().lock();
    let text = match format {
        Format::Json => render::json::to_json_line(report) + "\n",
        Format::Table => {
            format!("{}{}", render::table::refresh_prefix(is_tty && !report.is_final), render::table::render_table(report, table_opts))
        }
    };
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

#[allow(clippy::too_many_arguments)]
async fn build_report(
    kernel: &mut Kernel,
    growth: &mut GrowthEngine,
    memory: &mut MemoryMap,
    ctx: &mut ReportContext,
    start: Instant,
    alive: bool,
    is_final: bool,
    exited: bool,
) -> Result<Report> {
    let t = start.elapsed().as_secs_f64();
    // Samples closer than half an interval (the final report right after a
    // tick, a late tick) would only add noise to the series: judge without.
    let observe = ctx.last_t.is_none_or(|prev| t - prev >= ctx.opts.interval.as_secs_f64() / 2.0);
    let last_t = &mut ctx.last_t;
    let now = monotonic_ns();
    let mut samples: Vec<(Kind, crate::trackers::StackSample)> = Vec::new();
    if kernel.track_connections {
        samples.extend(kernel.connections.collect(now, alive)?.into_iter().map(|s| (Kind::Connection, s)));
    }
    if kernel.track_threads {
        samples.extend(kernel.threads.collect(now, alive)?.into_iter().map(|s| (Kind::Thread, s)));
    }
    if let Some(g) = kernel.goroutines.as_mut() {
        match g.collect(now, alive) {
            Ok(s) => samples.extend(s.into_iter().map(|s| (Kind::Goroutine, s))),
            Err(e) => {
                eprintln!("leaktrace: warning: cannot read the goroutines any more ({e:#}): goroutine tracking stops");
                kernel.goroutines = None;
            }
        }
    }
    if let Some(maps) = kernel.maps.as_mut() {
        samples.extend(maps.collect(now, alive)?.into_iter().map(|s| (Kind::Map, s)));
        maps.duty_cycle(&mut kernel.probes);
    }
    if kernel.track_allocations {
        samples.extend(kernel.allocations.collect(now)?.into_iter().map(|s| (Kind::Allocation, s)));
    }
    let locks = if kernel.track_locks { kernel.locks.collect(memory, LOCK_STACKS_KEPT) } else { Vec::new() };
    let mut keys: Vec<_> = samples.iter().map(|(_, s)| s.stack.clone()).collect();
    for l in &locks {
        keys.push(l.first.clone());
        keys.extend(l.waiters.iter().map(|w| w.0.clone()));
        keys.extend(l.holders.iter().map(|h| h.0.clone()));
    }
    let frames = kernel.resolver.resolve(&keys, memory).await;
    let mut findings = Vec::new();
    // Leaked goroutines' current stacks, resolved after judging.
    let mut blocked = Vec::new();
    let mut seen = HashSet::new();
    for (kind, s) in &samples {
        let kind = *kind;
        // A map is one series whatever stack last grew it.
        let key = (kind, s.map.as_ref().map_or_else(|| series_id(&s.stack), series_id));
        seen.insert(key);
        // Allocations are judged on live bytes: a buffer realloc'd bigger
        // grows in bytes, not in blocks.
        let mut engines = vec![];
        if kind == Kind::Allocation {
            engines.push((&mut ctx.alloc_bytes, s.live_bytes.unwrap_or(0)));
            engines.push((&mut ctx.alloc_counts, s.live));
        } else {
            engines.push((&mut *growth, s.live));
        }
        for (engine, value) in engines {
            if !observe {
                // The final report right after an interval's sample: judge what
                // is there; a sample milliseconds later would only add noise.
            } else if engine.window_stats(key).is_none() && kind != Kind::Map {
                // Everything we count was created after attach: a stack first
                // seen now had nothing live at the previous sample. (Not maps:
                // a map's first count is real, it may predate the attach.)
                if let Some(prev) = *last_t {
                    engine.observe(key, prev, 0);
                }
            }
            if observe {
                engine.observe(key, t, value);
            }
        }
        let j = if kind == Kind::Allocation { &ctx.alloc_bytes } else { &*growth }.judge(key, s.oldest_age_s);
        let (growth_per_min, growth_bytes_per_min) = if kind == Kind::Allocation {
            (ctx.alloc_counts.judge(key, None).growth_per_min, Some((j.growth_per_min * 10.0).round() / 10.0))
        } else {
            (j.growth_per_min, None)
        };
        if s.live == 0 && j.verdict == Verdict::Steady {
            continue;
        }
        let stack = frames.get(&s.stack).cloned().unwrap_or_default();
        for m in crate::stacks::symbolize::stripped_modules(&stack) {
            if ctx.warned_stripped.insert(m.clone()) {
                eprintln!("leaktrace: warning: {m} has no symbols (stripped?): its frames are shown as object+offset");
            }
        }
        if let (Verdict::Leak, Some(b)) = (j.verdict, &s.blocked) {
            blocked.push((findings.len(), b.clone()));
        }
        findings.push(Finding {
            site: site_of(&stack),
            site_index: site_index(&stack),
            stack,
            live: s.live,
            growth_per_min: (growth_per_min * 10.0).round() / 10.0,
            oldest_age_s: s.oldest_age_s.map(|a| (a * 10.0).round() / 10.0),
            peer: s.peer.clone(),
            thread_name: s.thread_name.clone(),
            map: s.map.clone(),
            live_bytes: s.live_bytes,
            growth_bytes_per_min,
            created: s.created,
            ended: s.ended,
            ..Finding::new(kind, j.verdict)
        });
    }
    if !blocked.is_empty() {
        let keys: Vec<_> = blocked.iter().map(|(_, b)| b.stack.clone()).collect();
        let frames = kernel.resolver.resolve(&keys, memory).await;
        for (i, b) in blocked {
            let f = &mut findings[i];
            // No stack for a goroutine running or in a syscall: its saved
            // registers are stale; the state still says where it is.
            f.blocked_in = frames.get(&b.stack).cloned().filter(|_| b.stack != crate::trackers::SampleStack::Addresses(Vec::new()));
            f.wait_reason = Some(b.wait_reason);
        }
    }
    findings.extend(lock_findings(&locks, &frames, t));
    if observe {
        growth.forget_missing(&seen);
        ctx.alloc_counts.forget_missing(&seen);
        ctx.alloc_bytes.forget_missing(&seen);
        *last_t = Some(t);
    }
    findings.sort_by(|a, b| {
        a.verdict
            .cmp(&b.verdict)
            .then(b.growth_per_min.total_cmp(&a.growth_per_min))
            .then(b.live.cmp(&a.live))
            .then(lock_wait(b).cmp(&lock_wait(a)))
    });
    let omitted = findings.len().saturating_sub(ctx.opts.max_findings) as u64;
    findings.truncate(ctx.opts.max_findings);
    let c = kernel.counters();
    let mut events = BTreeMap::new();
    if kernel.track_connections {
        events.insert(Kind::Connection.as_str(), c.events);
    }
    if kernel.track_threads {
        events.insert(Kind::Thread.as_str(), c.thread_events);
    }
    let mut lost_goroutines = 0;
    if let Some(g) = &kernel.goroutines {
        events.insert(Kind::Goroutine.as_str(), g.events);
        lost_goroutines = g.skipped;
    }
    if kernel.maps.is_some() {
        events.insert(Kind::Map.as_str(), c.map_events);
    }
    if kernel.track_allocations {
        events.insert(Kind::Allocation.as_str(), c.alloc_events);
    }
    if kernel.track_locks {
        events.insert(Kind::Lock.as_str(), c.lock_waits);
    }
    Ok(Report {
        pid: ctx.pid,
        comm: ctx.comm.clone(),
        elapsed_s: (t * 10.0).round() / 10.0,
        is_final,
        exited: exited.then_some(true),
        findings,
        // Goroutines beyond the per-scan bound were not read; maps, blocks
        // and lock waits beyond their tables' bounds not tracked: all lost
        // events.
        lost: Lost {
            events: c.lost_events + c.lost_ring + lost_goroutines + c.map_lost + c.alloc_lost + c.lock_lost,
            stacks: c.lost_stacks,
        },
        events,
        findings_omitted: omitted,
        untracked_frees: kernel.track_allocations.then_some(c.alloc_untracked_frees),
    })
}

/// Waiter and holder stacks kept per lock (the costliest).
const LOCK_STACKS_KEPT: usize = 16;

fn lock_wait(f: &Finding) -> u64 {
    f.lock.as_ref().map_or(0, |l| l.wait_ns)
}

/// One finding per lock (locks sharing a global's name, like the futex
/// words of one rwlock, are one lock), judged by the contention rule.
fn lock_findings(
    locks: &[crate::trackers::locks::LockSample],
    frames: &std::collections::HashMap<crate::trackers::SampleStack, Vec<crate::report::Frame>>,
    elapsed_s: f64,
) -> Vec<Finding> {
    use crate::report::{HistBucket, LockInfo};
    use crate::trackers::SampleStack;
    let stack_of = |s: &SampleStack| frames.get(s).cloned().unwrap_or_default();
    // Merge by name: (name, samples).
    let mut groups: Vec<(String, Vec<&crate::trackers::locks::LockSample>)> = Vec::new();
    for l in locks {
        let name = match &l.symbol {
            Some(sym) => sym.clone(),
            None => {
                let first = stack_of(&l.first);
                format!("{:#x} (first contended in {})", l.addr, site_of(&first))
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
        out.push(Finding {
            site: site_of(&stack),
            site_index: site_index(&stack),
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
                holder_site: if holder_stack.is_empty() { String::new() } else { site_of(&holder_stack) },
                holder_stack,
                holder_wakes: holders.first().map_or(0, |h| h.1),
            }),
            created: contentions,
            ended: contentions,
            ..Finding::new(Kind::Lock, crate::growth::contention_verdict(wait_share, contentions))
        });
    }
    out
}
