//! Renderers over the one report model ([`crate::report::Report`]).
//!
//! Renderers never talk to trackers: everything they show comes from a
//! `Report`, so the table, the JSON lines and the Prometheus exposition can
//! never disagree. The pprof profile and the flame graph are written once,
//! from the final report.

pub mod check;
pub mod flamegraph;
pub mod json;
pub mod pprof;
pub mod prometheus;
pub mod table;

/// Text from the target (its name, thread names, paths, peers, symbols) made
/// safe for a terminal: control characters (C0, DEL, C1) are written as
/// `\xNN` / `\u{NN}` so a crafted name cannot move the cursor, clear the
/// screen or forge rows. With `keep_newlines`, `\n` stays (whole tables).
pub fn printable(s: &str, keep_newlines: bool) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && !(keep_newlines && c == '\n');
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if !unsafe_char(c) => out.push(c),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("api-server", false), "api-server");
        assert_eq!(printable("x\x1b[2J\x1b[31mred", false), "x\\x1b[2J\\x1b[31mred");
        assert_eq!(printable("a\nb\tc\u{9b}d\x7f", false), "a\\x0ab\\x09c\\u{9b}d\\x7f");
        assert_eq!(printable("row\nrow\x07", true), "row\nrow\\x07");
        assert_eq!(printable("héllo ✓", false), "héllo ✓");
    }
}
