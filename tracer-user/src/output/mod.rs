//! Where reports and diagnostics go: stdout (table or JSON lines), the
//! files of the final report (pprof, flame graphs), the `/metrics` server,
//! and one channel for diagnostics on stderr. Renderers only turn a report
//! into bytes; this module decides where the bytes go.

pub mod metrics;
pub mod web_config;

use std::{
    fmt::Display,
    io::{IsTerminal, Write},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::SystemTime,
};

use anyhow::{Context, Result};

use crate::{
    cli::{Format, TraceOptions},
    render::{self, prometheus::SharedReport, table::TableOptions},
    report::Report,
};

/// Where each report goes while a session runs: stdout (table or JSON
/// lines) and, with `--listen`, the `/metrics` server.
pub struct Outlet {
    /// `leaktrace agent`: reports only go to the fleet's /metrics.
    quiet: bool,
    format: Format,
    is_tty: bool,
    table_opts: TableOptions,
    shared: SharedReport,
    stop: tokio::sync::watch::Sender<bool>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Outlet {
    /// Starts the metrics server on `endpoint` (bound for `--listen`).
    pub async fn open(opts: &TraceOptions, endpoint: Option<metrics::Endpoint>) -> Result<Self> {
        let shared = render::prometheus::new_shared_report();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut server = None;
        if let Some(listener) = endpoint {
            let mut rx = stop_rx;
            let shutdown = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            let scheme = listener.scheme();
            let (bound, handle) = metrics::serve(listener, shared.clone(), opts.max_sites, shutdown).await?;
            note(format!("serving metrics at {scheme}://{bound}/metrics"));
            server = Some(handle);
        }
        let format = opts.effective_format();
        let is_tty = std::io::stdout().is_terminal();
        Ok(Self { quiet: false, format, is_tty, table_opts: TableOptions { fold_steady: !opts.all, ..TableOptions::default() }, shared, stop, server })
    }

    /// `leaktrace agent`: one target's reports go to `shared`, its slot of
    /// the fleet's /metrics, and nowhere else (nothing on stdout).
    pub fn slot(shared: SharedReport) -> Self {
        let (stop, _) = tokio::sync::watch::channel(false);
        Self { quiet: true, format: Format::Json, is_tty: false, table_opts: TableOptions::default(), shared, stop, server: None }
    }

    /// Serves `report` on /metrics without printing it (the sample at attach).
    pub fn share(&self, report: Report) {
        *self.shared.write().unwrap_or_else(|e| e.into_inner()) = Some(report);
    }

    /// Prints `report` and serves it on /metrics. On a terminal, live tables
    /// redraw in place and the final one goes below the last.
    pub fn publish(&self, report: Report) {
        if self.quiet {
            return self.share(report);
        }
        if report.is_final && self.format == Format::Table && self.is_tty {
            write_stdout("\n");
        }
        emit(&report, self.format, self.is_tty && !report.is_final, &self.table_opts);
        self.share(report);
    }

    /// Whether stdout was closed by its reader (`| head`): nobody reads the
    /// reports any more.
    pub fn stdout_closed(&self) -> bool {
        STDOUT_CLOSED.load(Ordering::Relaxed)
    }

    /// Stops the metrics server (waits up to 2 s for it).
    pub async fn close(self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.server {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), h).await;
        }
    }
}

/// Set once a write to stdout failed (its reader is gone).
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// A diagnostic for the person running leaktrace: `leaktrace: MSG`.
/// Diagnostics quote names and paths from the target: control characters
/// are escaped ([`render::printable`]).
pub fn note(msg: impl Display) {
    write_stderr(&format!("leaktrace: {}\n", render::printable(&msg.to_string(), false)));
}

/// The line that says tracing has begun, and on what.
pub fn note_attached(pid: u32, comm: &str, trackers: &[&str], duration: Option<std::time::Duration>) {
    let how_long = match duration {
        Some(d) => format!("for {}", humantime::format_duration(d)),
        None => "until Ctrl-C or the target exits".into(),
    };
    note(format!("attached to {pid} ({comm}): tracking {}; {how_long}", trackers.join(",")));
}

/// Something that makes the report less complete than asked:
/// `leaktrace: warning: MSG`.
pub fn warn(msg: impl Display) {
    write_stderr(&format!("leaktrace: warning: {}\n", render::printable(&msg.to_string(), false)));
}

/// The error that ends leaktrace: `leaktrace: error: MSG`.
pub fn error(msg: impl Display) {
    write_stderr(&format!("leaktrace: error: {}\n", render::printable(&msg.to_string(), false)));
}

/// Writes text on stderr. A closed stderr loses the text and nothing else:
/// unlike `eprintln!`, never a panic.
pub fn write_stderr(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes()).and_then(|()| err.flush());
}

/// Writes text on stdout; a failure marks stdout closed (see
/// [`Outlet::stdout_closed`]) instead of panicking like `println!`.
fn write_stdout(text: &str) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_err() {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Writes one report to stdout: a table (redrawn in place on a terminal
/// until the final one) or one JSON line.
fn emit(report: &Report, format: Format, is_tty: bool, table_opts: &TableOptions) {
    let text = match format {
        Format::Json => render::json::to_json_line(report) + "\n",
        Format::Table => {
            format!("{}{}", render::table::refresh_prefix(is_tty), render::table::render_table(report, table_opts))
        }
    };
    write_stdout(&text);
}

/// The build ids the `--pprof` profile's mappings name (none without
/// `--pprof`): read from the files the target mapped (checked by inode)
/// while its memory map is at hand.
pub fn export_build_ids(report: &Report, opts: &TraceOptions, pid: u32, memory: &crate::procfs::MemoryMap) -> std::collections::HashMap<String, String> {
    if opts.pprof.is_none() {
        return Default::default();
    }
    let modules = report.findings.iter().flat_map(|f| f.stack.iter().filter_map(|fr| fr.module.as_deref()));
    crate::binary::elf::mapped_build_ids(pid, memory, modules)
}

/// Writes the `--pprof` profile and the `--flamegraph` SVGs of the final
/// report. Each file is tried even if another failed; the first failure is
/// the error.
pub fn write_exports(report: &Report, build_ids: &std::collections::HashMap<String, String>, opts: &TraceOptions, started: SystemTime) -> Result<()> {
    let mut first_error = None;
    if let Some(path) = &opts.pprof {
        let time_nanos = started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let bytes = render::pprof::render_pprof(report, time_nanos, build_ids);
        match write_file(path, &bytes).with_context(|| format!("cannot write pprof profile {}", path.display())) {
            Ok(()) => note(format!("wrote pprof profile {}", path.display())),
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    if let Some(path) = &opts.flamegraph {
        for (kind, path) in render::flamegraph::output_paths(report, path, opts.flamegraph_kind) {
            let written = render::flamegraph::render_svg(report, kind)
                .with_context(|| format!("cannot draw the {} flame graph", kind.as_str()))
                .and_then(|svg| write_file(&path, &svg).with_context(|| format!("cannot write flame graph {}", path.display())));
            match written {
                Ok(()) => note(format!("wrote {} flame graph {}", kind.as_str(), path.display())),
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it: a
/// reader never sees half a file. The temporary name is unpredictable and
/// created exclusively without following symlinks: leaktrace runs as root,
/// often in a world-writable directory, and must not write through a link
/// planted there.
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let (mut file, tmp) = loop {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{:016x}", random_u64()?));
        let tmp = std::path::PathBuf::from(tmp);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o644)
            .open(&tmp)
        {
            Ok(f) => break (f, tmp),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    written.and_then(|()| std::fs::rename(&tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// 64 random bits from the kernel (getrandom).
fn random_u64() -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A symlink planted at the old predictable temporary name (and one at
    /// the final name) is never written through.
    #[test]
    fn write_file_does_not_follow_planted_symlinks() {
        let dir = std::env::temp_dir().join(format!("leaktrace-write-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let out = dir.join("profile.pb.gz");
        std::os::unix::fs::symlink(&victim, format!("{}.tmp{}", out.display(), std::process::id())).unwrap();
        write_file(&out, b"profile").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&out).unwrap(), b"profile");
        // A link at the final name is replaced, its target untouched.
        let linked = dir.join("linked.svg");
        std::os::unix::fs::symlink(&victim, &linked).unwrap();
        write_file(&linked, b"svg").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&linked).unwrap().file_type().is_symlink());
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 4, "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
