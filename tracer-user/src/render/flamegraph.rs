//! Flame graphs (`--flamegraph FILE.svg`): the final report's live objects
//! by creation stack, drawn by [inferno](https://github.com/jonhoo/inferno).
//!
//! The input is Brendan Gregg's folded format, one line per distinct stack:
//! `outermost;...;innermost COUNT`, weighted by the live objects of the
//! findings with that stack (findings with nothing live draw nothing). One
//! graph per kind: a frame's width is the share of that kind's live objects
//! created under it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use inferno::flamegraph::{self, color::BasicPalette, Options, Palette};

use crate::{
    report::{Kind, Report},
    stacks::symbolize::site_name,
};

/// How a frame is named in a folded line: its function (`object+0xoffset`
/// in a stripped object), with `;` (the separator) replaced by `:`.
fn frame_name(f: &crate::report::Frame) -> String {
    site_name(f).replace(';', ":")
}

/// The folded stacks of `kind`: `outermost;...;innermost live`, one line per
/// distinct stack (findings whose frames name the same functions are summed),
/// sorted; stacks with nothing live are left out.
pub fn folded(report: &Report, kind: Kind) -> Vec<String> {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    for f in report.findings.iter().filter(|f| f.kind == kind && weight(f) > 0) {
        let names: Vec<String> = if f.stack.is_empty() {
            vec![f.site.replace(';', ":")]
        } else {
            f.stack.iter().rev().map(frame_name).collect()
        };
        *stacks.entry(names.join(";")).or_default() += weight(f);
    }
    stacks.into_iter().map(|(stack, n)| format!("{stack} {n}")).collect()
}

/// A finding's width: live objects; for a lock, microseconds its waiters
/// lost (by waiter stack).
fn weight(f: &crate::report::Finding) -> u64 {
    match &f.lock {
        Some(l) => l.wait_ns / 1000,
        None => f.live,
    }
}

/// What a kind's objects are called in a graph's title and tooltips.
fn objects(kind: Kind) -> &'static str {
    match kind {
        Kind::Connection => "connections",
        Kind::Fd => "file descriptors",
        Kind::Thread => "threads",
        Kind::Goroutine => "goroutines",
        Kind::Map => "map entries",
        Kind::Allocation => "heap blocks",
        Kind::Lock => "µs waited on locks",
        Kind::Wait => "waiters",
    }
}

/// The flame graph of `kind` as an SVG document. A kind with nothing live
/// gets a small SVG that says so (inferno draws no empty graph).
pub fn render_svg(report: &Report, kind: Kind) -> std::io::Result<Vec<u8>> {
    let title = format!("leaktrace: live {} by creation stack", objects(kind));
    let subtitle = format!(
        "pid {} ({}), {:.1}s{}",
        report.pid,
        report.comm,
        report.elapsed_s,
        if report.is_final { ", final report" } else { "" }
    );
    let lines = folded(report, kind);
    if lines.is_empty() {
        return Ok(empty_svg(&title, &format!("{subtitle}: no live {}", objects(kind))).into_bytes());
    }
    let mut opts = Options::default();
    opts.title = title;
    opts.subtitle = Some(subtitle);
    opts.count_name = objects(kind).to_string();
    opts.colors = Palette::Basic(BasicPalette::Aqua);
    // Colours from function names: the same function has the same colour in
    // every graph.
    opts.hash = true;
    let mut out = Vec::new();
    flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut out)?;
    Ok(out)
}

fn empty_svg(title: &str, text: &str) -> String {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"1200\" height=\"80\" xmlns=\"http://www.w3.org/2000/svg\">\n\
         <rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"#eeeeee\"/>\n\
         <text x=\"600\" y=\"24\" font-size=\"17\" font-family=\"Verdana\" text-anchor=\"middle\">{}</text>\n\
         <text x=\"600\" y=\"52\" font-size=\"12\" font-family=\"Verdana\" text-anchor=\"middle\">{}</text>\n\
         </svg>\n",
        esc(title),
        esc(text)
    )
}

/// The files to write for `--flamegraph PATH`: with `--flamegraph-kind` (or
/// when one kind has findings, or only one kind is traced) that kind's graph
/// at PATH itself; otherwise one per kind at `PATH-<kind>.svg`
/// (`leaks.svg` → `leaks-connection.svg`).
pub fn output_paths(report: &Report, path: &Path, chosen: Option<Kind>) -> Vec<(Kind, PathBuf)> {
    if let Some(k) = chosen {
        return vec![(k, path.to_path_buf())];
    }
    // Kinds with findings decide: tracking several kinds (the default) must
    // not split the graph of a program where only one kind has anything live.
    let mut kinds: Vec<Kind> = report.kinds().into_iter().filter(|k| report.findings.iter().any(|f| f.kind == *k)).collect();
    if kinds.is_empty() {
        kinds = report.kinds();
    }
    if kinds.is_empty() {
        kinds = Kind::ALL.to_vec();
    }
    if kinds.len() == 1 {
        return vec![(kinds[0], path.to_path_buf())];
    }
    kinds.into_iter().map(|k| (k, kind_path(path, k.as_str()))).collect()
}

/// `PATH` with `-<kind>` before its `.svg` (added when missing).
fn kind_path(path: &Path, kind: &str) -> PathBuf {
    let stem = match path.extension().and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("svg") => path.with_extension(""),
        _ => path.to_path_buf(),
    };
    let mut name = stem.into_os_string();
    name.push(format!("-{kind}.svg"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        render::json::tests::example_report,
        report::{Frame, Verdict},
    };

    fn frame(function: &str) -> Frame {
        Frame { function: function.into(), file: None, line: None, module: Some("/srv/app".into()), addr: None, file_offset: None }
    }

    fn report() -> Report {
        let mut r = example_report();
        r.is_final = true;
        let leak = &mut r.findings[0];
        leak.stack = ["__socket", "dial_cache", "bad_handler", "main", "_start"].map(frame).to_vec();
        leak.live = 120;
        // Another stack that names the same functions (a different call
        // address in bad_handler): summed with the first.
        let mut same = leak.clone();
        same.live = 5;
        let mut pool = leak.clone();
        pool.verdict = Verdict::Steady;
        pool.live = 4;
        pool.stack = ["__socket", "dial_cache", "pool_init", "main", "_start"].map(frame).to_vec();
        // Nothing live: no line.
        let mut churn = pool.clone();
        churn.live = 0;
        churn.stack = ["__socket", "good_handler", "main", "_start"].map(frame).to_vec();
        // A stripped frame is named object+offset; `;` cannot split a frame.
        let mut odd = pool.clone();
        odd.live = 2;
        odd.stack = vec![
            Frame { addr: Some("0x401136".into()), file_offset: Some(0x1136), ..frame("[unknown]") },
            frame("<[u8; 8] as Read>::read"),
            frame("main"),
        ];
        r.findings.extend([same, pool, churn, odd]);
        r
    }

    #[test]
    fn folded_lines_are_outermost_first_weighted_by_live() {
        assert_eq!(
            folded(&report(), Kind::Connection),
            vec![
                "_start;main;bad_handler;dial_cache;__socket 125",
                "_start;main;pool_init;dial_cache;__socket 4",
                "main;<[u8: 8] as Read>::read;app+0x1136 2",
            ]
        );
    }

    #[test]
    fn svg_names_the_frames() {
        let svg = String::from_utf8(render_svg(&report(), Kind::Connection).unwrap()).unwrap();
        assert!(svg.contains("<svg"), "{}", &svg[..200.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for name in ["bad_handler", "pool_init", "dial_cache", "live connections by creation stack", "app+0x1136"] {
            assert!(svg.contains(name), "{name} missing from the SVG");
        }
        // Escaped, so the document stays XML.
        assert!(svg.contains("&lt;[u8: 8] as Read&gt;::read"));
        assert!(svg.contains("125 connections"), "tooltips count connections");
    }

    #[test]
    fn nothing_live_gives_a_small_valid_svg() {
        let mut r = report();
        r.findings.iter_mut().for_each(|f| f.live = 0);
        let svg = String::from_utf8(render_svg(&r, Kind::Connection).unwrap()).unwrap();
        assert!(svg.starts_with("<?xml") && svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("no live connections"));
    }

    #[test]
    fn one_file_per_kind_or_the_chosen_one() {
        let r = report();
        let p = Path::new("/tmp/leaks.svg");
        assert_eq!(output_paths(&r, p, None), vec![(Kind::Connection, p.to_path_buf())]);
        assert_eq!(output_paths(&r, p, Some(Kind::Connection)), vec![(Kind::Connection, p.to_path_buf())]);
        assert_eq!(kind_path(p, "connection"), Path::new("/tmp/leaks-connection.svg"));
        assert_eq!(kind_path(Path::new("out/graph"), "lock"), Path::new("out/graph-lock.svg"));
        assert_eq!(Kind::from_name("connections"), Some(Kind::Connection));
        assert_eq!(Kind::from_name("connection"), Some(Kind::Connection));
        assert_eq!(Kind::from_name("sockets"), None);
        assert_eq!(Kind::from_name("threads"), Some(Kind::Thread));
        // Both kinds traced, only connections found: still one file.
        let mut both = report();
        both.events.insert("thread", 10);
        assert_eq!(output_paths(&both, p, None), vec![(Kind::Connection, p.to_path_buf())]);
        let mut t = both.findings[0].clone();
        t.kind = Kind::Thread;
        both.findings.push(t);
        assert_eq!(
            output_paths(&both, p, None),
            vec![(Kind::Connection, kind_path(p, "connection")), (Kind::Thread, kind_path(p, "thread"))]
        );
    }
}
