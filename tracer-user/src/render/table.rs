//! The human table printed per interval (and once at the end) on a terminal.
//!
//! Plain text only (no colours), column widths computed from the content, so
//! it reads the same in a terminal, a log file or a CI transcript.

use std::fmt::Write as _;

use crate::report::{Finding, Frame, Report, Verdict};

/// How much of a report the table shows; bounded so a report with thousands
/// of stacks still fits on a screen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableOptions {
    /// Findings shown (default 10); the report is sorted, so the leaks and
    /// growing ones come first.
    pub max_findings: usize,
    /// Frames shown under each finding, innermost first (default 5).
    pub max_frames: usize,
    /// Longest SITE shown, in characters (default 60); longer ones end in `…`.
    pub max_site_width: usize,
    /// Fold steady findings into one line, so that the table leads with what
    /// needs action (the CLI's default; `--all` unfolds them). Off here: a
    /// renderer shows everything unless asked.
    pub fold_steady: bool,
}

impl Default for TableOptions {
    fn default() -> Self {
        TableOptions {
            max_findings: 10,
            max_frames: 5,
            max_site_width: 60,
            fold_steady: false,
        }
    }
}

/// What the caller prints before each interval's table: on a terminal,
/// "cursor home + clear screen" so the table refreshes in place; otherwise
/// nothing, so logs get one table after another.
pub fn refresh_prefix(is_tty: bool) -> &'static str {
    if is_tty {
        "\x1b[H\x1b[2J"
    } else {
        ""
    }
}

/// The report as a table: a header line, one row per finding (top
/// `opts.max_findings`) with its top frames indented under it, and for the
/// final report a `final report` heading and a verdict summary line.
/// Always ends with a newline.
pub fn render_table(report: &Report, opts: &TableOptions) -> String {
    let mut out = String::new();
    if report.is_final {
        out.push_str("final report\n");
    }
    let _ = write!(
        out,
        "leaktrace  pid {} ({})  elapsed {:.1}s  lost: events {}, stacks {}",
        report.pid,
        super::printable(&report.comm, false),
        report.elapsed_s,
        report.lost.events,
        report.lost.stacks
    );
    if report.lost.truncated_stacks > 0 {
        let _ = write!(out, ", truncated stacks {}", report.lost.truncated_stacks);
    }
    if report.exited == Some(true) {
        out.push_str("  EXITED");
    }
    out.push('\n');
    if let Some(e) = &report.exhaustion {
        let _ = writeln!(out, "{}", crate::judge::exhaustion::headline(&report.comm, e));
    }

    let (listed, folded): (Vec<&Finding>, Vec<&Finding>) = report.findings.iter().partition(|f| !opts.fold_steady || !foldable(f));
    let shown = &listed[..listed.len().min(opts.max_findings)];
    if report.findings.is_empty() {
        out.push_str("no tracked objects yet\n");
    } else {
        out.push('\n');
        if !shown.is_empty() {
            write_rows(&mut out, shown, opts);
        }
    }
    if !folded.is_empty() {
        let _ = writeln!(out, "{}", folded_line(&folded));
    }
    let not_shown = (listed.len() - shown.len()) as u64 + report.findings_omitted;
    if not_shown > 0 {
        let _ = writeln!(
            out,
            "… {not_shown} more finding{} not shown",
            plural(not_shown)
        );
    }
    if report.is_final {
        let _ = writeln!(out, "{}", summary(report));
    }
    // Every field was made printable; this keeps it so for any added later.
    super::printable(&out, true).into_owned()
}

/// `2 leaks, 1 growing, 5 steady` over every finding in the report (plus a
/// note on findings omitted before the report was built, whose verdicts are
/// unknown here).
pub fn summary(report: &Report) -> String {
    let count = |v: Verdict| report.findings.iter().filter(|f| f.verdict == v).count();
    let leaks = count(Verdict::Leak);
    let unclosed = count(Verdict::Unclosed);
    let mut s = format!("{leaks} leak{}", plural(leaks as u64));
    if unclosed > 0 {
        let _ = write!(s, ", {unclosed} unclosed");
    }
    let _ = write!(s, ", {} growing, {} steady", count(Verdict::Growing), count(Verdict::Steady));
    let queued = count(Verdict::Queued);
    if queued > 0 {
        let _ = write!(s, ", {queued} queued wait{}", plural(queued as u64));
    }
    let contended = count(Verdict::Contended);
    if contended > 0 {
        let _ = write!(s, ", {contended} contended lock{}", plural(contended as u64));
    }
    if report.findings_omitted > 0 {
        let _ = write!(s, " ({} more omitted)", report.findings_omitted);
    }
    s
}

/// Objects from before attach in one group that get a row even when steady:
/// a pile found at attach (10 000 sockets to one peer) is what the on-call
/// engineer came for, a handful is not.
pub const BEFORE_ATTACH_ROW_MIN: u64 = 100;

/// Whether a finding folds into the steady line: steady, and not a big
/// group of objects from before attach.
fn foldable(f: &Finding) -> bool {
    f.verdict == Verdict::Steady && !(f.before_attach && f.live >= BEFORE_ATTACH_ROW_MIN)
}

/// The one line steady findings fold into:
/// `steady  13 findings (3 connection, 10 goroutine), 25 live: nothing to act on (--all lists them)`.
fn folded_line(folded: &[&Finding]) -> String {
    let mut kinds: Vec<(crate::report::Kind, usize)> = Vec::new();
    for f in folded {
        match kinds.iter_mut().find(|k| k.0 == f.kind) {
            Some(k) => k.1 += 1,
            None => kinds.push((f.kind, 1)),
        }
    }
    kinds.sort();
    let by_kind: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {}", k.as_str())).collect();
    let live: u64 = folded.iter().map(|f| f.live).sum();
    format!(
        "steady   {} finding{} ({}), {live} live: nothing to act on (--all lists them)",
        folded.len(),
        plural(folded.len() as u64),
        by_kind.join(", ")
    )
}

const HEADERS: [&str; 7] = [
    "VERDICT",
    "KIND",
    "SITE",
    "LIVE",
    "GROWTH/MIN",
    "OLDEST",
    // Connections: the remote address; threads: the thread name;
    // leaked goroutines: their wait reason.
    "PEER/NAME",
];
/// Columns right-aligned because they hold numbers.
const NUMERIC: [bool; 7] = [false, false, false, true, true, true, false];

fn write_rows(out: &mut String, findings: &[&Finding], opts: &TableOptions) {
    let rows: Vec<[String; 7]> =
        findings.iter().map(|f| row(f, opts).map(|cell| super::printable(&cell, false).into_owned())).collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    write_line(out, &HEADERS.map(String::from), &widths);
    for (finding, r) in findings.iter().zip(&rows) {
        write_line(out, r, &widths);
        if finding.before_attach {
            let _ = writeln!(out, "    creation stack unknown: open before leaktrace attached");
            continue;
        }
        // Start at the site: the frames below it are the runtime's and libc's.
        let from = finding.site_index.min(finding.stack.len().saturating_sub(1));
        if from > 0 {
            let _ = writeln!(out, "    … {from} frame{} in runtime and libraries", plural(from as u64));
        }
        for frame in finding.stack.iter().skip(from).take(opts.max_frames) {
            let _ = writeln!(out, "    {}", frame_text(frame));
        }
        if let Some(e) = &finding.exhausts {
            let _ = writeln!(
                out,
                "    exhausts {} in {} at this rate ({} {}, {} in use; {:.0} % of the growth)",
                e.resource,
                crate::judge::exhaustion::eta_text(e.seconds),
                e.limit_source,
                e.limit,
                e.in_use,
                e.share * 100.0
            );
        }
        // Leaked goroutines: where they are stuck now.
        if let Some(blocked) = &finding.blocked_in {
            let _ = writeln!(out, "  blocked in ({}):", finding.wait_reason.as_deref().unwrap_or("?"));
            for frame in blocked.iter().take(opts.max_frames) {
                let _ = writeln!(out, "    {}", frame_text(frame));
            }
        }
        if let Some(l) = finding.lock.as_ref().filter(|l| !l.holder_stack.is_empty()) {
            let from = l.holder_site_index.min(l.holder_stack.len().saturating_sub(1));
            let _ = writeln!(out, "    held by (the unlock that woke waiters, {} wakes):", l.holder_wakes);
            for frame in l.holder_stack.iter().skip(from).take(opts.max_frames) {
                let _ = writeln!(out, "      {}", frame_text(frame));
            }
        }
    }
}

fn write_line(out: &mut String, cells: &[String; 7], widths: &[usize; 7]) {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            line.push_str("  ");
        }
        let pad = widths[i].saturating_sub(cell.chars().count());
        if NUMERIC[i] {
            line.extend(std::iter::repeat_n(' ', pad));
            line.push_str(cell);
        } else {
            line.push_str(cell);
            if i + 1 < cells.len() {
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

fn row(f: &Finding, opts: &TableOptions) -> [String; 7] {
    // Locks: contended waits, share of the window lost, longest wait, the lock.
    if let Some(l) = &f.lock {
        return [
            f.verdict.as_str().to_string(),
            f.kind.as_str().to_string(),
            truncate(&site_text(f), opts.max_site_width),
            format!("{} waits", l.contentions),
            format!("{:.1}% wait", l.wait_share * 100.0),
            format!("max {:.1}ms", l.max_wait_ns as f64 / 1e6),
            l.lock.clone(),
        ];
    }
    // Waits: waiters now, their share of the traced time, the longest wait.
    if let Some(w) = &f.wait {
        return [
            f.verdict.as_str().to_string(),
            f.kind.as_str().to_string(),
            truncate(&site_text(f), opts.max_site_width),
            format!("{} waiting", f.live),
            format!("{:.1}x wait", w.wait_share),
            format!("{}{}", if w.waiting_before_attach { ">=" } else { "" }, age_text(w.longest_wait_s)),
            format!("{} ({})", w.wait_state, w.wait_role),
        ];
    }
    [
        f.verdict.as_str().to_string(),
        f.kind.as_str().to_string(),
        truncate(&site_text(f), opts.max_site_width),
        // Allocations: blocks and bytes live; growth in bytes (what is judged).
        match f.live_bytes {
            Some(b) => format!("{} ({})", f.live, bytes_text(b as f64)),
            None => f.live.to_string(),
        },
        match f.growth_bytes_per_min {
            Some(g) => format!("{}{}", if g > 0.0 { "+" } else { "" }, bytes_text(g)),
            None => growth_text(f.growth_per_min),
        },
        f.oldest_age_s.map_or_else(|| "-".to_string(), age_text),
        f.peer
            .clone()
            .or_else(|| fd_text(f))
            .or_else(|| f.thread_name.clone())
            .or_else(|| f.wait_reason.clone())
            .or_else(|| f.map.clone())
            .unwrap_or_else(|| "-".to_string()),
    ]
}

/// The SITE cell: the own-code site, and the library it went through by
/// its short name (`main.getProfile via redis.Dial`).
fn site_text(f: &Finding) -> String {
    match &f.via {
        Some(via) => format!("{} via {}", f.site, short_function(via)),
        None => f.site.clone(),
    }
}

/// A Go function without its import path's directories
/// (`github.com/gomodule/redigo/redis.Dial` → `redis.Dial`); other names as they are.
fn short_function(name: &str) -> &str {
    let head_end = name.find(['(', '[', ' ']).unwrap_or(name.len());
    match name[..head_end].rfind('/') {
        Some(i) if !name.contains("::") => &name[i + 1..],
        _ => name,
    }
}

/// fds: `file /var/log/app.log (+3 paths)`, `pipe`.
fn fd_text(f: &Finding) -> Option<String> {
    let t = f.fd_type.as_deref()?;
    let mut s = t.to_string();
    if let Some(p) = &f.path {
        let _ = write!(s, " {p}");
        if let Some(n) = f.distinct_paths.filter(|&n| n > 1) {
            let _ = write!(s, " (+{} paths)", n - 1);
        }
    }
    Some(s)
}

/// `function (file:line)`, else `function [module]`, with the address when
/// the function is unknown.
fn frame_text(frame: &Frame) -> String {
    let mut s = frame.function.clone();
    match (&frame.module, frame.file_offset) {
        // An object without symbols: its offset is stable across runs, the address is not.
        (Some(m), Some(off)) if frame.file.is_none() => {
            let _ = write!(s, " {}+{off:#x}", m.rsplit('/').next().unwrap_or(m));
        }
        _ => {
            if let (Some(addr), true) = (&frame.addr, frame.file.is_none()) {
                let _ = write!(s, " {addr}");
            }
        }
    }
    match (&frame.file, frame.line, &frame.module) {
        (Some(file), Some(line), _) => {
            let _ = write!(s, " ({file}:{line})");
        }
        (Some(file), None, _) => {
            let _ = write!(s, " ({file})");
        }
        (None, _, Some(module)) => {
            let _ = write!(s, " [{module}]");
        }
        (None, _, None) => {}
    }
    super::printable(&s, false).into_owned()
}

/// `512B`, `1.5KiB`, `12.0MiB`, `-3.0KiB`.
fn bytes_text(b: f64) -> String {
    let a = b.abs();
    if a < 1024.0 {
        format!("{b:.0}B")
    } else if a < 1024.0 * 1024.0 {
        format!("{:.1}KiB", b / 1024.0)
    } else if a < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1}MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1}GiB", b / (1024.0 * 1024.0 * 1024.0))
    }
}

fn growth_text(per_min: f64) -> String {
    if per_min.is_nan() {
        "-".to_string()
    } else if per_min.abs() < 0.05 {
        "0.0".to_string()
    } else {
        format!("{per_min:+.1}")
    }
}

/// Compact age: `19.7s`, `5m03s`, `2h01m`.
fn age_text(age_s: f64) -> String {
    if !age_s.is_finite() || age_s < 0.0 {
        return "-".to_string();
    }
    if age_s < 60.0 {
        return format!("{age_s:.1}s");
    }
    let secs = age_s as u64;
    if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max_chars.saturating_sub(1)).collect();
    t.push('…');
    t
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::json::tests::example_report;
    use crate::report::Kind;

    #[test]
    fn names_from_the_target_cannot_drive_the_terminal() {
        let mut report = example_report();
        report.comm = "x\x1b[2J\x1b[31m".into();
        report.findings[0].peer = Some("evil\x1b]0;title\x07\nleak  forged".into());
        report.findings[0].stack[0].function = "f\x1b[1A".into();
        let text = render_table(&report, &TableOptions::default());
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
        assert!(text.contains("pid 1234 (x\\x1b[2J\\x1b[31m)"), "{text}");
        assert!(text.contains("evil\\x1b]0;title\\x07\\x0aleak  forged"), "{text}");
        assert!(text.contains("f\\x1b[1A"), "{text}");
    }

    #[test]
    fn frames_start_at_the_site() {
        let mut f = steady("dial_cache", 3);
        let frame = |name: &str| Frame { function: name.into(), file: None, line: None, module: None, addr: None, file_offset: None };
        f.stack = vec![frame("__GI_socket"), frame("internal_helper"), frame("dial_cache"), frame("bad_handler")];
        f.site_index = 2;
        let mut r = example_report();
        r.findings = vec![f];
        let text = render_table(&r, &TableOptions::default());
        assert!(text.contains("… 2 frames in runtime and libraries"), "{text}");
        assert!(!text.contains("__GI_socket"), "{text}");
        let site = text.find("    dial_cache").unwrap();
        assert!(text[site..].contains("bad_handler"), "{text}");
    }

    fn steady(site: &str, live: u64) -> Finding {
        Finding {
            site: site.into(),
            stack: vec![Frame {
                function: "pool.get".into(),
                file: None,
                line: None,
                module: Some("/usr/lib/libpq.so.5".into()),
                addr: None, file_offset: None,
            }],
            live,
            created: live,
            ..Finding::new(Kind::Connection, Verdict::Steady)
        }
    }

    #[test]
    fn interval_table_has_header_columns_and_frames() {
        let text = render_table(&example_report(), &TableOptions::default());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "leaktrace  pid 1234 (api-server)  elapsed 20.0s  lost: events 0, stacks 0"
        );
        assert_eq!(lines[1], "");
        assert_eq!(
            lines[2],
            "VERDICT  KIND        SITE             LIVE  GROWTH/MIN  OLDEST  PEER/NAME"
        );
        assert_eq!(
            lines[3],
            "leak     connection  main.badHandler   120       +59.8   19.7s  127.0.0.1:6379"
        );
        assert_eq!(lines[4], "    net.Dial (/usr/lib/go/src/net/dial.go:323)");
        assert_eq!(lines.len(), 5);
        assert!(!text.contains("final report"));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn final_table_has_heading_summary_and_exited() {
        let mut report = example_report();
        report.is_final = true;
        report.exited = Some(true);
        report.findings.push(steady("db.Open", 4));
        report.findings.push(steady("cache.Get", 2));
        let text = render_table(&report, &TableOptions::default());
        assert!(text.starts_with("final report\nleaktrace  pid 1234"));
        assert!(text.lines().nth(1).unwrap().ends_with("  EXITED"));
        assert!(text.contains("    pool.get [/usr/lib/libpq.so.5]\n"));
        assert_eq!(text.lines().last().unwrap(), "1 leak, 0 growing, 2 steady");
    }

    #[test]
    fn top_n_findings_frames_and_long_sites_are_cut() {
        let mut report = example_report();
        report.findings[0].stack = (0..8)
            .map(|i| Frame {
                function: format!("f{i}"),
                file: None,
                line: None,
                module: None,
                addr: None, file_offset: None,
            })
            .collect();
        report.findings[0].site = "x".repeat(100);
        for i in 0..12 {
            report.findings.push(steady(&format!("s{i}"), i));
        }
        report.findings_omitted = 3;
        let opts = TableOptions {
            max_findings: 4,
            max_frames: 5,
            max_site_width: 20,
            fold_steady: false,
        };
        let text = render_table(&report, &opts);
        assert!(text.contains(&format!("{}…", "x".repeat(19))));
        assert!(!text.contains(&"x".repeat(20)));
        assert!(text.contains("    f4\n") && !text.contains("    f5"));
        assert!(text.contains("s2") && !text.contains("s3 "));
        assert!(text.contains("… 12 more findings not shown"), "{text}");
    }

    #[test]
    fn empty_report_and_formats() {
        let mut report = example_report();
        report.findings.clear();
        assert!(render_table(&report, &TableOptions::default()).contains("no tracked objects yet"));
        assert_eq!(age_text(303.4), "5m03s");
        assert_eq!(age_text(7260.0), "2h01m");
        assert_eq!(growth_text(-3.0), "-3.0");
        assert_eq!(growth_text(0.0), "0.0");
        assert_eq!(refresh_prefix(false), "");
        assert_eq!(refresh_prefix(true), "\x1b[H\x1b[2J");
        let unknown = Frame {
            function: "[unknown]".into(),
            file: None,
            line: None,
            module: Some("/lib/x.so".into()),
            addr: Some("0x401136".into()),
            file_offset: None,
        };
        assert_eq!(frame_text(&unknown), "[unknown] 0x401136 [/lib/x.so]");
    }

    #[test]
    fn steady_findings_fold_into_one_line_unless_all() {
        let mut report = example_report();
        report.is_final = true;
        report.findings.push(steady("db.Open", 4));
        let mut g = steady("runtime.main", 1);
        g.kind = Kind::Goroutine;
        report.findings.push(g);
        let opts = TableOptions { fold_steady: true, ..TableOptions::default() };
        let text = render_table(&report, &opts);
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("leak ") || l.starts_with("steady ")).collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert!(rows[0].starts_with("leak     connection  main.badHandler"), "{text}");
        assert_eq!(rows[1], "steady   2 findings (1 connection, 1 goroutine), 5 live: nothing to act on (--all lists them)");
        assert!(!text.contains("db.Open") && !text.contains("pool.get"), "{text}");
        assert_eq!(text.lines().last().unwrap(), "1 leak, 0 growing, 2 steady");
        // Everything steady: the header row is not printed, the folded line is.
        report.findings.remove(0);
        let text = render_table(&report, &opts);
        assert!(!text.contains("VERDICT") && text.contains("steady   2 findings"), "{text}");
        // Unfolded (--all): every row.
        assert!(render_table(&report, &TableOptions::default()).contains("db.Open"));
    }

    #[test]
    fn big_groups_from_before_attach_get_a_row_and_say_their_stack_is_unknown() {
        let mut report = example_report();
        let group = |live| Finding {
            site: "[before attach]".into(),
            peer: Some("127.0.0.1:6379".into()),
            before_attach: true,
            live,
            ..Finding::new(Kind::Connection, Verdict::Steady)
        };
        report.findings = vec![group(10_000)];
        let opts = TableOptions { fold_steady: true, ..TableOptions::default() };
        let text = render_table(&report, &opts);
        assert!(text.contains("steady   connection  [before attach]  10000"), "{text}");
        assert!(text.contains("    creation stack unknown: open before leaktrace attached\n"), "{text}");
        report.findings = vec![group(3)];
        let text = render_table(&report, &opts);
        assert!(text.contains("steady   1 finding (1 connection), 3 live"), "{text}");
    }

    #[test]
    fn site_cell_names_the_library_it_went_through() {
        let mut f = steady("main.getProfile", 3);
        f.via = Some("github.com/gomodule/redigo/redis.Dial".into());
        assert_eq!(row(&f, &TableOptions::default())[2], "main.getProfile via redis.Dial");
        f.via = Some("github.com/a/b.(*Pool).Get".into());
        assert_eq!(site_text(&f), "main.getProfile via b.(*Pool).Get");
        f.via = Some("redisConnect".into());
        assert_eq!(site_text(&f), "main.getProfile via redisConnect");
    }

    #[test]
    fn allocation_rows_show_bytes() {
        let mut f = steady("make_record", 3);
        f.kind = Kind::Allocation;
        f.live_bytes = Some(3 * 1024 * 1024);
        f.growth_bytes_per_min = Some(1536.0);
        let r = row(&f, &TableOptions::default());
        assert_eq!(r[3], "3 (3.0MiB)");
        assert_eq!(r[4], "+1.5KiB");
        assert_eq!(bytes_text(512.0), "512B");
    }
}
