//! Where reports and diagnostics go: stdout (table or JSON lines), the
//! files of the final report (pprof, flame graphs), the `/metrics` server,
//! and one channel for diagnostics on stderr. Renderers only turn a report
//! into bytes; this module decides where the bytes go.

pub mod metrics;

use std::{
    fmt::Display,
    io::{IsTerminal, Write},
    path::Path,
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
    format: Format,
    is_tty: bool,
    table_opts: TableOptions,
    shared: SharedReport,
    stop: tokio::sync::watch::Sender<bool>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Outlet {
    /// Starts the metrics server when `--listen` asks for one.
    pub async fn open(opts: &TraceOptions) -> Result<Self> {
        let shared = render::prometheus::new_shared_report();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut server = None;
        if let Some(addr) = opts.listen {
            let mut rx = stop_rx;
            let shutdown = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            let (bound, handle) = metrics::serve(addr, shared.clone(), opts.max_sites, shutdown).await?;
            note(format!("serving metrics at http://{bound}/metrics"));
            server = Some(handle);
        }
        let format = opts.effective_format();
        let is_tty = std::io::stdout().is_terminal();
        Ok(Self { format, is_tty, table_opts: TableOptions { fold_steady: !opts.all, ..TableOptions::default() }, shared, stop, server })
    }

    /// Serves `report` on /metrics without printing it (the sample at attach).
    pub fn share(&self, report: Report) {
        *self.shared.write().unwrap_or_else(|e| e.into_inner()) = Some(report);
    }

    /// Prints `report` and serves it on /metrics. On a terminal, live tables
    /// redraw in place and the final one goes below the last.
    pub fn publish(&self, report: Report) {
        if report.is_final && self.format == Format::Table && self.is_tty {
            println!();
        }
        emit(&report, self.format, self.is_tty && !report.is_final, &self.table_opts);
        self.share(report);
    }

    /// Stops the metrics server (waits up to 2 s for it).
    pub async fn close(self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.server {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), h).await;
        }
    }
}

/// A diagnostic for the person running leaktrace: `leaktrace: MSG`.
pub fn note(msg: impl Display) {
    eprintln!("leaktrace: {msg}");
}

/// Something that makes the report less complete than asked:
/// `leaktrace: warning: MSG`.
pub fn warn(msg: impl Display) {
    eprintln!("leaktrace: warning: {msg}");
}

/// Writes one report to stdout: a table (redrawn in place on a terminal
/// until the final one) or one JSON line.
fn emit(report: &Report, format: Format, is_tty: bool, table_opts: &TableOptions) {
    let mut out = std::io::stdout().lock();
    let text = match format {
        Format::Json => render::json::to_json_line(report) + "\n",
        Format::Table => {
            format!("{}{}", render::table::refresh_prefix(is_tty), render::table::render_table(report, table_opts))
        }
    };
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Writes the `--pprof` profile and the `--flamegraph` SVGs of the final
/// report. Each file is tried even if another failed; the first failure is
/// the error.
pub fn write_exports(report: &Report, opts: &TraceOptions, started: SystemTime) -> Result<()> {
    let mut first_error = None;
    if let Some(path) = &opts.pprof {
        let time_nanos = started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let bytes = render::pprof::render_pprof(report, time_nanos);
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
