//! The one report model every renderer reads (table, JSON, Prometheus).
//!
//! Its JSON form is the contract documented in `docs/report.md`: field names
//! here are the wire names.

use std::collections::BTreeMap;

use serde::Serialize;

/// One symbolized frame, innermost first in a [`Finding::stack`].
#[derive(Clone, Debug, Serialize, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Function name, demangled; `"[unknown]"` when it cannot be resolved
    /// (then `addr` says where).
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Path of the ELF object the address belongs to.
    pub module: Option<String>,
    /// Absolute address in the target (hex string, e.g. "0x401136").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Offset of the address in `module`'s file: names frames of stripped
    /// objects (`app+0x1234`). Not part of the JSON.
    #[serde(skip)]
    pub file_offset: Option<u64>,
}

/// The growth engine's judgement of one series.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Leak,
    /// Connections mostly closed by Go's finalizers, not by the program: a
    /// forgotten `Close` the garbage collector cleans up at some later GC
    /// (rule: `judge::unclosed_verdict`).
    Unclosed,
    /// Waits: threads or goroutines queued at one place of the program's
    /// own code, not idle workers (rule: `judge::waits`): a drained pool.
    Queued,
    Growing,
    /// Locks: waiters lost a noticeable share of the window on this lock
    /// (rule: `judge::contention::contention_verdict`).
    Contended,
    Steady,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Leak => "leak",
            Verdict::Unclosed => "unclosed",
            Verdict::Queued => "queued",
            Verdict::Growing => "growing",
            Verdict::Contended => "contended",
            Verdict::Steady => "steady",
        }
    }
}

/// What is tracked. Later trackers add variants; the wire name is `as_str`.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Connection,
    Thread,
    Goroutine,
    Map,
    Allocation,
    /// A contended lock (`--track locks`).
    Lock,
    /// A file descriptor other than a socket made by socket/accept (`--track fds`).
    Fd,
    /// Threads or goroutines waiting now, by where they wait (`--track waits`).
    Wait,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: &'static [Kind] =
        &[Kind::Connection, Kind::Fd, Kind::Thread, Kind::Goroutine, Kind::Map, Kind::Allocation, Kind::Lock, Kind::Wait];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connection => "connection",
            Kind::Thread => "thread",
            Kind::Goroutine => "goroutine",
            Kind::Map => "map",
            Kind::Allocation => "allocation",
            Kind::Lock => "lock",
            Kind::Fd => "fd",
            Kind::Wait => "wait",
        }
    }

    /// The kind by its wire name (`connection`) or its tracker's name
    /// (`connections`).
    pub fn from_name(name: &str) -> Option<Kind> {
        let name = name.trim();
        Kind::ALL.iter().copied().find(|k| name == k.as_str() || name.strip_suffix('s') == Some(k.as_str()))
    }
}

/// One per creation stack that has live objects (or had, in the window).
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub verdict: Verdict,
    /// The program's own code that created the objects: the innermost own
    /// frame (rule: `stacks::symbolize::OwnCode`).
    pub site: String,
    /// The outermost library frame the site went through
    /// (`github.com/gomodule/redigo/redis.Dial`); absent when only runtimes
    /// and standard libraries lie below the site.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Innermost first.
    pub stack: Vec<Frame>,
    /// Index in `stack` of the site's frame: renderers show the stack from
    /// there, where the application's code begins. Not part of the JSON.
    #[serde(skip)]
    pub site_index: usize,
    /// Objects alive now.
    pub live: u64,
    /// Least-squares slope of `live` over the judged window, per minute.
    pub growth_per_min: f64,
    /// Age of the oldest live object, seconds (null when unknown).
    pub oldest_age_s: Option<f64>,
    /// Connections: the most common remote address of the live ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Threads: the most common name of the live ones (`/proc/PID/task/TID/comm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_name: Option<String>,
    /// Goroutines judged "leak": the current stack of one of them (the
    /// oldest parked one), innermost first, as a goroutine dump shows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_in: Option<Vec<Frame>>,
    /// Goroutines judged "leak": why that goroutine waits (`select`,
    /// `chan receive`, ...; `runnable`, `running`, `syscall` otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_reason: Option<String>,
    /// Maps: the package-level variable holding the map (`main.cache`), or
    /// its address (`0xc000123000`) when no variable names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map: Option<String>,
    /// Allocations: bytes alive now (`live` counts blocks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_bytes: Option<u64>,
    /// Allocations: least-squares slope of `live_bytes` over the judged
    /// window, bytes per minute (the verdict is judged on bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growth_bytes_per_min: Option<f64>,
    /// fds: what the fds are (`file`, `pipe`, `socketpair`, `epoll`,
    /// `eventfd`, `timerfd`, `signalfd`, `inotify`, `fanotify`, `memfd`,
    /// `userfaultfd`, `pidfd`, `socket`, `other`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd_type: Option<String>,
    /// fds of type `file`: the first path seen for this stack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// fds of type `file`: distinct paths among the live fds seen (at most 1024).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distinct_paths: Option<u64>,
    /// Maps: the memory one more entry takes (slots at the map's fullest
    /// load, from its type); goroutines: their mean stack size. Time to
    /// exhaustion multiplies the growth by it (a lower bound: what the
    /// objects point to is not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_object: Option<u64>,
    /// Growing or leaking findings: the limit this growth runs into first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exhausts: Option<Exhaustion>,
    /// Locks: what the lock cost its waiters (fields flattened into the finding).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockInfo>,
    /// Waits: how long the waiters have waited so far (fields flattened).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitInfo>,
    /// Objects created from this stack since attach.
    pub created: u64,
    /// Objects from this stack that ended since attach.
    pub ended: u64,
    /// Objects that already existed when leaktrace attached, grouped by
    /// `peer` / `thread_name`: their creation stack is unknown (`stack` is
    /// empty, `site` is `"[before attach]"`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub before_attach: bool,
    /// Connections of a Go program: how many of `ended` the Go runtime's
    /// finalizers closed (the program dropped them without `Close`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_by_finalizer: Option<u64>,
    /// The addresses of the stack the finding was judged under, when a
    /// collector read them (not a kernel stack id): trackers that act on a
    /// verdict find their series by it. Not part of the JSON.
    #[serde(skip)]
    pub addresses: Vec<u64>,
}

impl Finding {
    /// A finding of `kind` with `verdict` and nothing else known yet:
    /// trackers and tests fill in the fields they have
    /// (`Finding { live, created, ..Finding::new(kind, verdict) }`).
    pub fn new(kind: Kind, verdict: Verdict) -> Self {
        Finding {
            kind,
            verdict,
            site: String::new(),
            via: None,
            stack: Vec::new(),
            site_index: 0,
            live: 0,
            growth_per_min: 0.0,
            oldest_age_s: None,
            peer: None,
            thread_name: None,
            blocked_in: None,
            wait_reason: None,
            map: None,
            live_bytes: None,
            growth_bytes_per_min: None,
            fd_type: None,
            path: None,
            distinct_paths: None,
            bytes_per_object: None,
            exhausts: None,
            lock: None,
            wait: None,
            created: 0,
            ended: 0,
            ended_by_finalizer: None,
            before_attach: false,
            addresses: Vec::new(),
        }
    }
}

/// When a growing resource runs out, for one finding (its own slope) or for
/// the whole process (every growing finding's slope: [`Report::exhaustion`]).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Exhaustion {
    /// `open files`, `threads`, `memory`, `ephemeral ports to PEER`.
    pub resource: String,
    /// Where the limit comes from (`RLIMIT_NOFILE`, `pids.max`, ...).
    pub limit_source: String,
    pub limit: u64,
    /// In use now (fds open, tasks in the cgroup, bytes resident, sockets to the peer).
    pub in_use: u64,
    /// Seconds until `in_use` reaches `limit` at the current slope.
    pub seconds: f64,
    /// This site's share of the resource's growth (0..1); on the report: the
    /// top site's.
    pub share: f64,
    /// Report only: the site with the largest share.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// A lock finding's own fields (kind "lock"). Totals are since attach; the
/// finding's `stack` is the waiters' stack that lost the most time.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LockInfo {
    /// The lock: the global it is (`hot_lock`, `main.pool`, `cache+0x8`), else
    /// its address and the function where it was first contended
    /// (`0x7f12a0 (first contended in worker)`).
    pub lock: String,
    /// `mutex`, `rwlock`, `futex` (a futex lock outside libc), `go-mutex`, `go-rwmutex`.
    pub lock_kind: String,
    /// Contended waits (a waiter woken that loses the race again counts again).
    pub contentions: u64,
    /// Total time waiters spent blocked on it, ns.
    pub wait_ns: u64,
    /// Longest single wait, ns.
    pub max_wait_ns: u64,
    /// `wait_ns` / the traced time: 0.5 = on average half a thread blocked.
    pub wait_share: f64,
    /// Waits by duration: cumulative counts of waits `<= le_ns` (log2 bounds).
    pub wait_histogram: Vec<HistBucket>,
    /// Waiter stacks seen (the one shown is the costliest).
    pub waiter_stacks: u64,
    /// The holder: the code that released the lock to waiters (its unlock
    /// woke them), innermost first; empty when no wake was seen.
    pub holder_stack: Vec<Frame>,
    /// Site of the holder stack (its own-code frame, as for the finding).
    pub holder_site: String,
    /// Index of that frame in `holder_stack`. Not part of the JSON.
    #[serde(skip)]
    pub holder_site_index: usize,
    /// Wakes by the holder stack shown / by all holder stacks.
    pub holder_wakes: u64,
}

/// A wait finding's own fields (kind "wait"): threads or goroutines
/// waiting now at one site (`live` counts them). Times are since the wait
/// was first seen: for waits already in progress at attach, since attach
/// (lower bounds, `waiting_before_attach`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WaitInfo {
    /// What they wait in: `"futex"` (a native thread: condition variable,
    /// mutex, semaphore, join), or a goroutine's wait reason
    /// (`"chan receive"`, `"select"`, `"sync.Cond.Wait"`, `"semacquire"`...).
    pub wait_state: String,
    /// `"queue"`: waiting inside work (a request waiting for a resource);
    /// `"idle"`: a worker waiting for work, or a library's own thread
    /// (never `queued`). Rule: docs/report.md, "The queue rule".
    pub wait_role: &'static str,
    /// The longest wait going on, seconds so far.
    pub longest_wait_s: f64,
    /// The waits going on, seconds so far, summed over the waiters.
    pub total_wait_s: f64,
    /// `total_wait_s` / the traced time (`elapsed_s`): 8.0 = eight waiters
    /// stuck the whole trace. `check --fail-on-wait` compares it.
    pub wait_share: f64,
    /// Some waiter was already waiting when leaktrace attached: its time
    /// counts from attach.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub waiting_before_attach: bool,
}

/// One cumulative histogram bucket.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistBucket {
    pub le_ns: u64,
    pub count: u64,
}

/// Losses, shown so that nobody trusts numbers silently wrong.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Lost {
    /// Events the kernel side could not record (a full map).
    pub events: u64,
    /// Stacks that could not be stored (objects still counted, stack unknown).
    pub stacks: u64,
    /// Stacks cut short: deeper than the walk's 32 frames, or the first
    /// event of a new call path whose stack copy (4 KiB) ended before the
    /// stack did. The objects are counted under the partial stack.
    #[serde(skip_serializing_if = "is_zero")]
    pub truncated_stacks: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One report: emitted per interval and once at the end.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub pid: u32,
    pub comm: String,
    pub elapsed_s: f64,
    /// True on the last report of a run.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Set when the target exited during the trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exited: Option<bool>,
    /// Sorted: leaks first, then growing, then steady; within a verdict by
    /// growth, then live.
    pub findings: Vec<Finding>,
    pub lost: Lost,
    /// Events seen per kind since attach (for `leaktrace_events_total`),
    /// keyed by the kind's wire name.
    pub events: BTreeMap<&'static str, u64>,
    /// Findings not shown because of `--max-findings` (bounded output).
    pub findings_omitted: u64,
    /// The resource that runs out first at the current growth, and when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exhaustion: Option<Exhaustion>,
    /// Allocations: frees of blocks allocated before attach (or not
    /// sampled), ignored rather than subtracted from any stack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub untracked_frees: Option<u64>,
}

impl Report {
    /// Kinds this report is about: those traced (`events`) or with findings,
    /// in [`Kind::ALL`] order.
    pub fn kinds(&self) -> Vec<Kind> {
        Kind::ALL
            .iter()
            .copied()
            .filter(|k| self.events.contains_key(k.as_str()) || self.findings.iter().any(|f| f.kind == *k))
            .collect()
    }
}
