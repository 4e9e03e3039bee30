//! `cargo xtask bench [tasks|maps|allocations|locks|fds|java|unwind]` (no name: the
//! connection bench) and what the benches share: option parsing, medians
//! and paired ratios, reading a child's lines, starting and stopping bench
//! programs and tracers, bare tracefs uprobes, binutils lookups.

pub mod allocations;
pub mod connections;
pub mod java;
pub mod locks;
pub mod maps;
pub mod tasks;
pub mod unwind;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::cmd::{announce, probe, send_signal, stop_child, wait_timeout};

/// `bench <name> [args]`, or the connection bench when no name is given.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("tasks") => tasks::run(root, rest),
        Some("maps") => maps::run(root, rest),
        Some("allocations") => allocations::run(root, rest),
        Some("locks") => locks::run(root, rest),
        Some("java") => java::run(root, rest),
        Some("fds") => connections::run(root, &connections::FILES, rest),
        Some("unwind") => unwind::run(root, rest),
        _ => connections::run(root, &connections::SOCKETS, args),
    }
}

/// A bench's numeric options, `--name N` or `--name=N` (`--` is skipped),
/// from the defaults in `flags`, returned in the order of `flags`; those
/// named in `positive` must not be 0. `what` prefixes the errors.
pub fn parse_options<const N: usize>(
    what: &str,
    args: &[String],
    flags: [(&str, u64); N],
    positive: &[&str],
) -> Result<[u64; N]> {
    let mut values = flags.map(|(_, default)| default);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            continue;
        }
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (a.as_str(), None),
        };
        let Some(i) = flags.iter().position(|(name, _)| *name == key) else {
            let usage = flags.iter().map(|(name, _)| format!("{name} N")).collect::<Vec<_>>().join(", ");
            bail!("{what}: unknown argument `{key}` ({usage})");
        };
        let value = inline
            .or_else(|| it.next().map(String::as_str))
            .ok_or_else(|| anyhow!("{key} needs a value"))?;
        values[i] = value.parse().with_context(|| key.to_string())?;
    }
    let zero = |p: &&str| flags.iter().zip(&values).any(|((name, _), v)| name == p && *v == 0);
    if positive.iter().any(zero) {
        let list = match positive {
            [one] => one.to_string(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
            [] => String::new(),
        };
        bail!("{what}: {list} must be positive");
    }
    Ok(values)
}

/// The median of `v` (NaN-free).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median over runs of `v[i] / base[i]`: each mode against the
/// untraced run of the same round (these machines drift by tens of percent
/// within a minute; only ratios taken close together mean anything).
pub fn paired_ratio(v: &[f64], base: &[f64]) -> f64 {
    median(&v.iter().zip(base).map(|(x, u)| x / u).collect::<Vec<_>>())
}

/// Per-run values, `decimals` after the point, comma-separated.
pub fn list(v: &[f64], decimals: usize) -> String {
    v.iter().map(|x| format!("{x:.decimals$}")).collect::<Vec<_>>().join(", ")
}

/// A child's output stream, read line by line on a thread, to its end (a
/// child must never stall on a full pipe because nobody reads it).
pub struct Lines {
    rx: mpsc::Receiver<String>,
    seen: String,
}

impl Lines {
    pub fn new(r: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(std::io::Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { rx, seen: String::new() }
    }

    /// Waits up to `timeout` for a line that contains `needle` (any line
    /// for ""); false when none came in time or the stream ended. The lines
    /// read are kept ([`Lines::seen`]).
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let Ok(line) = self.rx.recv_timeout(left) else { return false };
            let hit = line.contains(needle);
            self.keep(line);
            if hit {
                return true;
            }
        }
        false
    }

    /// The lines read so far.
    pub fn seen(&self) -> &str {
        &self.seen
    }

    /// Every line: those read so far, then the rest up to the end of the
    /// stream or, at the most, `timeout`.
    pub fn all(mut self, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let Ok(line) = self.rx.recv_timeout(left) else { break };
            self.keep(line);
        }
        self.seen
    }

    fn keep(&mut self, line: String) {
        self.seen.push_str(&line);
        self.seen.push('\n');
    }
}

/// Starts a bench program (stdout piped, stdin and stderr null) and waits
/// up to 10 s for its `ready` line (it then waits for a signal or its
/// stdin); stopped again when none comes. `name` is for messages.
pub fn start_ready(cmd: &mut Command, name: &str) -> Result<(Child, Lines)> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    announce(cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
    let mut out = Lines::new(child.stdout.take().unwrap());
    if !out.wait_line("ready", Duration::from_secs(10)) {
        stop_child(&mut child, name);
        bail!("{name} did not print `ready`");
    }
    Ok((child, out))
}

/// Stops a tracer the way a user does, SIGINT (its final report, its probes
/// detached), and kills it when it has not exited after `grace`. Its exit
/// status; None when it had to be killed.
pub fn interrupt(tracer: &mut Child, what: &str, grace: Duration) -> Option<ExitStatus> {
    let _ = send_signal(tracer.id(), "INT");
    match wait_timeout(tracer, grace) {
        Ok(Some(st)) => Some(st),
        _ => {
            eprintln!("xtask: {what} did not exit on SIGINT; killing it");
            let _ = tracer.kill();
            let _ = tracer.wait();
            None
        }
    }
}

/// Copies a tracer's stderr into `log_path` on a thread; the receiver gets
/// one message when a line says it "attached".
pub fn log_until_attached(
    stderr: std::process::ChildStderr,
    log_path: PathBuf,
) -> (mpsc::Receiver<()>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<()>();
    let logger = thread::spawn(move || {
        let mut log = fs::File::create(&log_path).ok();
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if !sent && line.contains("attached") {
                sent = true;
                let _ = tx.send(());
            }
        }
    });
    (rx, logger)
}

/// Waits up to `limit` for the message of [`log_until_attached`]. Err when
/// the tracer exited first (with its status) or the time ran out (None).
pub fn wait_attached(rx: &mpsc::Receiver<()>, tracer: &mut Child, limit: Duration) -> Result<(), Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = tracer.try_wait() {
            return Err(Some(st));
        }
        if Instant::now() >= deadline {
            return Err(None);
        }
    }
}

/// Bare tracefs uprobes (no BPF program, no reader: the trap alone, what
/// the benches compare against), one group per bench, removed on drop.
pub struct TracefsUprobes {
    group: &'static str,
    names: Vec<String>,
}

impl TracefsUprobes {
    const TRACEFS: &'static str = "/sys/kernel/tracing";

    /// One uprobe per `(name, file, file offset)`, all enabled.
    pub fn install(group: &'static str, at: &[(String, &Path, u64)]) -> Result<Self> {
        let tracefs = Path::new(Self::TRACEFS);
        let mut me = Self { group, names: Vec::new() };
        for (name, file, off) in at {
            let name = name.replace(['.', '/'], "_");
            let def = format!("p:{group}/{name} {}:{off:#x}", file.display());
            fs::OpenOptions::new()
                .append(true)
                .open(tracefs.join("uprobe_events"))?
                .write_all(format!("{def}\n").as_bytes())
                .with_context(|| format!("adding uprobe `{def}`"))?;
            eprintln!("+ echo '{def}' >> uprobe_events");
            me.names.push(name);
        }
        fs::write(tracefs.join("events").join(group).join("enable"), "1")?;
        Ok(me)
    }
}

impl Drop for TracefsUprobes {
    fn drop(&mut self) {
        let tracefs = Path::new(Self::TRACEFS);
        let _ = fs::write(tracefs.join("events").join(self.group).join("enable"), "0");
        for n in &self.names {
            // Removal can fail with EBUSY for a moment after disabling: retry.
            for _ in 0..50 {
                let removed = fs::OpenOptions::new()
                    .append(true)
                    .open(tracefs.join("uprobe_events"))
                    .and_then(|mut f| f.write_all(format!("-:{}/{n}\n", self.group).as_bytes()));
                match removed {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(2) => break, // already gone
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        let _ = fs::write(tracefs.join("trace"), "");
    }
}


// Benches find their probe addresses with binutils (nm, objdump, readelf),
// not with leaktrace's own ELF and disassembly code, so that they do not
// share code with what they measure.

/// Address of `sym` in libc as a file offset (what tracefs uprobes take).
pub fn libc_symbol_offset(libc: &str, sym: &str) -> Result<u64> {
    let nm = probe("nm", &["-D", "--defined-only", libc]).ok_or_else(|| anyhow!("nm -D {libc} failed"))?;
    let vaddr = nm
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (a, t, n) = (it.next()?, it.next()?, it.next()?);
            (matches!(t, "T" | "W" | "i") && n.split('@').next() == Some(sym)).then(|| u64::from_str_radix(a, 16).ok())?
        })
        .next()
        .ok_or_else(|| anyhow!("{sym} not found in {libc}"))?;
    elf_file_offset(libc, vaddr)
}

/// File offset of the link-time address `vaddr` in the ELF file at `path`,
/// through its PT_LOAD headers (what tracefs uprobes take).
pub fn elf_file_offset(path: &str, vaddr: u64) -> Result<u64> {
    let readelf = probe("readelf", &["-lW", path]).ok_or_else(|| anyhow!("readelf -l {path} failed"))?;
    for l in readelf.lines().filter(|l| l.trim_start().starts_with("LOAD")) {
        let f: Vec<u64> = l
            .split_whitespace()
            .skip(1)
            .take(5)
            .filter_map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok())
            .collect();
        if let [off, va, _pa, filesz, _] = f[..] {
            if vaddr >= va && vaddr < va + filesz {
                return Ok(vaddr - va + off);
            }
        }
    }
    bail!("{vaddr:#x} is in no LOAD segment of {path}")
}

/// Link-time address of `sym` in the symbol table of the ELF at `path` (nm).
pub fn symbol_address(path: &str, sym: &str) -> Result<u64> {
    let nm = probe("nm", &[path]).ok_or_else(|| anyhow!("nm {path} failed"))?;
    nm.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            let (a, _t, n) = (it.next()?, it.next()?, it.next()?);
            (n == sym).then(|| u64::from_str_radix(a, 16).ok())?
        })
        .ok_or_else(|| anyhow!("{sym} not in {path}"))
}

/// Address of the first `push %rbp` in the 32 bytes from `entry` (objdump):
/// a Go function's emulated prologue instruction.
pub fn first_push_rbp(path: &str, entry: u64, what: &str) -> Result<u64> {
    let start = format!("--start-address={entry:#x}");
    let stop = format!("--stop-address={:#x}", entry + 32);
    let dis = probe("objdump", &["-d", "--no-show-raw-insn", &start, &stop, path]).ok_or_else(|| anyhow!("objdump failed"))?;
    dis.lines()
        .find(|l| l.contains("push") && l.contains("%rbp"))
        .and_then(|l| u64::from_str_radix(l.trim().split(':').next()?.trim(), 16).ok())
        .ok_or_else(|| anyhow!("no push %rbp at the start of {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_options_both_ways() {
        let flags = [("--runs", 7), ("--ms", 2000)];
        assert_eq!(parse_options("b", &args(""), flags, &["--runs"]).unwrap(), [7, 2000]);
        assert_eq!(parse_options("b", &args("-- --ms 5 --runs=3"), flags, &["--runs"]).unwrap(), [3, 5]);
        let err = |a: &str, positive: &[&str]| parse_options("b", &args(a), flags, positive).unwrap_err().to_string();
        assert_eq!(err("--bogus", &[]), "b: unknown argument `--bogus` (--runs N, --ms N)");
        assert_eq!(err("--runs", &[]), "--runs needs a value");
        assert_eq!(err("--runs 0", &["--runs", "--ms"]), "b: --runs and --ms must be positive");
        assert_eq!(format!("{:#}", parse_options("b", &args("--ms=x"), flags, &[]).unwrap_err()), "--ms: invalid digit found in string");
    }

    #[test]
    fn medians_and_paired_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(paired_ratio(&[2.0, 9.0, 3.0], &[1.0, 3.0, 1.0]), 3.0);
        assert_eq!(list(&[1.234, 5.0], 1), "1.2, 5.0");
    }

    #[test]
    fn lines_wait_and_collect() {
        let mut l = Lines::new(&b"a\nready\nresult=1\n"[..]);
        assert!(l.wait_line("ready", Duration::from_secs(5)));
        assert_eq!(l.seen(), "a\nready\n");
        assert_eq!(l.all(Duration::from_secs(5)), "a\nready\nresult=1\n");
        let mut l = Lines::new(&b"a\n"[..]);
        assert!(!l.wait_line("ready", Duration::from_secs(5)));
    }
}
