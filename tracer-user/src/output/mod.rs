//! Where reports and diagnostics go: stdout (table or JSON lines), the
//! files of the final report (pprof, flame graphs), the `/metrics` server,
//! and one channel for diagnostics on stderr. Renderers only turn a report
//! into bytes; this module decides where the bytes go.

pub mod metrics;

use std::{
    fmt::Display,
    io::Write,
    path::Path,
    time::SystemTime,
};

use anyhow::{Context, Result};

use crate::{
    cli::{Format, TraceOptions},
    render::{self, table::TableOptions},
    report::Report,
};

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
pub fn emit(report: &Report, format: Format, is_tty: bool, table_opts: &TableOptions) {
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
