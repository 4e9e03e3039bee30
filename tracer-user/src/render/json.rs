//! JSON lines: one report per line on stdout, the contract documented in
//! `docs/report.md`.

use crate::report::Report;

/// The report as one line of JSON (no trailing newline), so a consumer can
/// read one report per line.
pub fn to_json_line(report: &Report) -> String {
    // Serializing plain structs, strings, numbers and maps cannot fail.
    serde_json::to_string(report).expect("a Report always serializes")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::report::{Finding, Frame, Kind, Lost, Verdict};

    /// The example report of `docs/report.md`.
    pub(crate) fn example_report() -> Report {
        Report {
            pid: 1234,
            comm: "api-server".into(),
            elapsed_s: 20.0,
            is_final: false,
            exited: None,
            findings: vec![Finding {
                site: "main.badHandler".into(),
                stack: vec![Frame {
                    function: "net.Dial".into(),
                    file: Some("/usr/lib/go/src/net/dial.go".into()),
                    line: Some(323),
                    module: Some("/srv/api".into()),
                    addr: None, file_offset: None,
                }],
                live: 120,
                growth_per_min: 59.8,
                oldest_age_s: Some(19.7),
                peer: Some("127.0.0.1:6379".into()),
                created: 400,
                ended: 280,
                ..Finding::new(Kind::Connection, Verdict::Leak)
            }],
            lost: Lost {
                events: 0,
                stacks: 0,
                truncated_stacks: 0,
            },
            events: BTreeMap::from([("connection", 1234)]),
            findings_omitted: 0,
            exhaustion: None,
            untracked_frees: None,
        }
    }

    /// Must stay byte-identical to the example line in `docs/report.md`.
    pub(crate) const EXAMPLE_LINE: &str = r#"{"pid":1234,"comm":"api-server","elapsed_s":20.0,"final":false,"findings":[{"kind":"connection","verdict":"leak","site":"main.badHandler","stack":[{"function":"net.Dial","file":"/usr/lib/go/src/net/dial.go","line":323,"module":"/srv/api"}],"live":120,"growth_per_min":59.8,"oldest_age_s":19.7,"peer":"127.0.0.1:6379","created":400,"ended":280}],"lost":{"events":0,"stacks":0},"events":{"connection":1234},"findings_omitted":0}"#;

    #[test]
    fn example_line_matches_the_documented_contract() {
        let line = to_json_line(&example_report());
        assert_eq!(line, EXAMPLE_LINE);
        assert!(!line.contains('\n'));
        let doc = include_str!("../../../docs/report.md");
        assert!(
            doc.contains(EXAMPLE_LINE),
            "docs/report.md must show the actual serde output"
        );
    }

    #[test]
    fn optional_fields_follow_the_contract() {
        let mut report = example_report();
        report.is_final = true;
        report.exited = Some(true);
        report.findings[0].peer = None;
        report.findings[0].oldest_age_s = None;
        report.findings[0].stack[0].addr = Some("0x401136".into());
        report.findings[0].stack[0].file = None;
        let v: serde_json::Value = serde_json::from_str(&to_json_line(&report)).unwrap();
        assert_eq!(v["final"], true);
        assert_eq!(v["exited"], true);
        let finding = &v["findings"][0];
        assert!(
            finding.get("peer").is_none(),
            "peer is omitted when unknown"
        );
        assert!(
            finding["oldest_age_s"].is_null(),
            "oldest_age_s is null when unknown"
        );
        assert_eq!(finding["stack"][0]["addr"], "0x401136");
        assert!(finding["stack"][0]["file"].is_null());
    }
}
