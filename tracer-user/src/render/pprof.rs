//! pprof export (`--pprof FILE`): the final report as a gzipped
//! [profile.proto](https://github.com/google/pprof/blob/main/proto/profile.proto)
//! profile, for `go tool pprof`, pprof's web UI, Pyroscope, Grafana,
//! speedscope and every other tool that reads pprof.
//!
//! One sample per finding: its locations are the finding's stack (innermost
//! first, as pprof wants: `location_id[0]` is the leaf), one location per
//! distinct frame, one function per distinct (name, file), one mapping per
//! module (ELF object). Every sample carries the string labels `kind`,
//! `site`, `verdict`, and `peer` / `thread_name` / `map` / `fd_type` /
//! `path` when the finding has one, so
//! `-tagfocus=verdict=leak` keeps only the leaks.
//!
//! # Sample types
//!
//! Each kind has its own sample types, named as Go's own profiles name them
//! where Go has one (`go tool pprof -sample_index=NAME` selects one). A
//! profile holds the sample types of every kind in the report, in
//! [`Kind::ALL`] order; a sample fills its kind's values and leaves the
//! others 0. The first one is the default sample type.
//!
//! | kind | sample types (`type`/`unit`) | value | as in Go's |
//! |---|---|---|---|
//! | connection | `connections`/`count` | live connections | — (leaktrace's own) |
//! | fd | `fds`/`count` | live file descriptors | — (leaktrace's own) |
//! | thread | `threads`/`count` | live threads | threadcreate profile |
//! | goroutine | `goroutines`/`count` | live goroutines (by `go` statement) | goroutine profile |
//! | map | `map_entries`/`count` | live entries | — |
//! | allocation | `inuse_objects`/`count`, `inuse_space`/`bytes` | live allocations, their bytes | heap profile |
//! | lock | `contentions`/`count`, `delay`/`nanoseconds` | contended waits, time waited (waiter stack) | mutex / block profile |
//!
//! A tracker that adds a [`Kind`] adds its arm to [`sample_types`] and
//! [`sample_values`] (the compiler asks for both).
//!
//! The messages below are the subset of profile.proto leaktrace writes,
//! derived with prost (field numbers as in profile.proto; no protoc, no build
//! script).

use std::{collections::HashMap, io::Write};

use flate2::{write::GzEncoder, Compression};
use prost::Message;

use crate::{
    report::{Finding, Frame, Kind, Report},
    stacks::symbolize::site_name,
};

/// `perftools.profiles` messages: the subset of profile.proto leaktrace writes.
pub mod proto {
    /// `Profile`. `string_table[0]` is always `""`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    /// `ValueType`: indices into the string table.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    /// `Sample`: `location_id[0]` is the leaf (innermost frame).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    /// `Label`: a string label sets `str`, a numeric one `num` (and `num_unit`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    /// `Mapping`: one ELF object of the target.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    /// `Location`: one frame.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    /// `Line`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    /// `Function`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

use proto::{Function, Label, Line, Location, Mapping, Profile, Sample, ValueType};

/// The sample types (`type`, `unit`) of a kind: see the table in the module
/// documentation.
pub fn sample_types(kind: Kind) -> &'static [(&'static str, &'static str)] {
    match kind {
        Kind::Connection => &[("connections", "count")],
        Kind::Fd => &[("fds", "count")],
        Kind::Thread => &[("threads", "count")],
        Kind::Goroutine => &[("goroutines", "count")],
        Kind::Map => &[("map_entries", "count")],
        Kind::Allocation => &[("inuse_objects", "count"), ("inuse_space", "bytes")],
        Kind::Lock => &[("contentions", "count"), ("delay", "nanoseconds")],
        Kind::Wait => &[("waiters", "count")],
    }
}

/// A finding's values, one per entry of [`sample_types`] of its kind.
pub fn sample_values(f: &Finding) -> Vec<i64> {
    match f.kind {
        Kind::Connection | Kind::Fd | Kind::Thread | Kind::Goroutine | Kind::Map | Kind::Wait => vec![clamp(f.live)],
        Kind::Allocation => vec![clamp(f.live), clamp(f.live_bytes.unwrap_or(0))],
        Kind::Lock => {
            let (n, ns) = f.lock.as_ref().map_or((0, 0), |l| (l.contentions, l.wait_ns));
            vec![clamp(n), clamp(ns)]
        }
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Builds the profile; dedupes strings, functions, locations and mappings.
#[derive(Default)]
struct Builder {
    profile: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(String, String), u64>,
    locations: HashMap<(u64, u64, u64, i64), u64>,
    mappings: HashMap<String, u64>,
}

impl Builder {
    fn new() -> Self {
        let mut b = Builder::default();
        b.string("");
        b
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn mapping(&mut self, module: &str) -> u64 {
        if let Some(&id) = self.mappings.get(module) {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let filename = self.string(module);
        // Frames arrive symbolized: has_functions tells pprof not to
        // symbolize them again (it would look up addresses it cannot place).
        self.profile.mapping.push(Mapping { id, filename, has_functions: true, ..Default::default() });
        self.mappings.insert(module.to_string(), id);
        id
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (name.to_string(), file.to_string());
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let name = self.string(name);
        let filename = self.string(file);
        self.profile.function.push(Function { id, name, system_name: name, filename, start_line: 0 });
        self.functions.insert(key, id);
        id
    }

    fn location(&mut self, frame: &Frame) -> u64 {
        let mapping_id = frame.module.as_deref().map(|m| self.mapping(m)).unwrap_or(0);
        let function_id = self.function(&site_name(frame), frame.file.as_deref().unwrap_or(""));
        let line = frame.line.map(i64::from).unwrap_or(0);
        let address = frame
            .addr
            .as_deref()
            .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        let key = (mapping_id, address, function_id, line);
        if let Some(&id) = self.locations.get(&key) {
            return id;
        }
        if mapping_id != 0 {
            let m = &mut self.profile.mapping[mapping_id as usize - 1];
            m.has_filenames |= frame.file.is_some();
            m.has_line_numbers |= frame.line.is_some();
        }
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(Location {
            id,
            mapping_id,
            address,
            line: vec![Line { function_id, line }],
            is_folded: false,
        });
        self.locations.insert(key, id);
        id
    }

    fn label(&mut self, key: &str, value: &str) -> Label {
        Label { key: self.string(key), str: self.string(value), ..Default::default() }
    }
}

/// The report as a pprof profile. `time_nanos`: when the trace started
/// (wall clock, ns since the epoch); the duration is the report's elapsed time.
/// `build_ids`: module path -> GNU build id (hex), each mapping's `build_id`
/// (read by the caller from the files the target mapped).
pub fn build_profile(report: &Report, time_nanos: i64, build_ids: &HashMap<String, String>) -> Profile {
    let mut b = Builder::new();
    let mut kinds = report.kinds();
    if kinds.is_empty() {
        kinds = Kind::ALL.to_vec();
    }
    // Sample-type columns: each kind's, in order.
    let mut offset = HashMap::new();
    for &k in &kinds {
        offset.insert(k, b.profile.sample_type.len());
        for (ty, unit) in sample_types(k) {
            let vt = ValueType { r#type: b.string(ty), unit: b.string(unit) };
            b.profile.sample_type.push(vt);
        }
    }
    let columns = b.profile.sample_type.len();
    if let Some(first) = b.profile.sample_type.first().cloned() {
        b.profile.default_sample_type = first.r#type;
        b.profile.period_type = Some(first);
        b.profile.period = 1;
    }
    // pprof takes mapping[0] for the main binary: the module of the first
    // finding's site (the application's code) is the best guess.
    if let Some(m) = report.findings.first().and_then(|f| f.stack.get(f.site_index)).and_then(|f| f.module.as_deref()) {
        b.mapping(m);
    }
    for f in &report.findings {
        let mut location_id: Vec<u64> = f.stack.iter().map(|fr| b.location(fr)).collect();
        if location_id.is_empty() {
            let placeholder = Frame {
                function: f.site.clone(),
                file: None,
                line: None,
                module: None,
                addr: None,
                file_offset: None,
            };
            location_id.push(b.location(&placeholder));
        }
        let mut value = vec![0; columns];
        let at = offset.get(&f.kind).copied().unwrap_or(0);
        for (i, v) in sample_values(f).into_iter().enumerate() {
            if let Some(slot) = value.get_mut(at + i) {
                *slot = v;
            }
        }
        let mut label = vec![
            b.label("kind", f.kind.as_str()),
            b.label("site", &f.site),
            b.label("verdict", f.verdict.as_str()),
        ];
        if let Some(via) = &f.via {
            label.push(b.label("via", via));
        }
        if let Some(peer) = &f.peer {
            label.push(b.label("peer", peer));
        }
        if let Some(name) = &f.thread_name {
            label.push(b.label("thread_name", name));
        }
        if let Some(map) = &f.map {
            label.push(b.label("map", map));
        }
        if let Some(t) = &f.fd_type {
            label.push(b.label("fd_type", t));
        }
        if let Some(path) = &f.path {
            label.push(b.label("path", path));
        }
        b.profile.sample.push(Sample { location_id, value, label });
    }
    let mut comments = vec![format!(
        "leaktrace: pid {} ({}), {:.1}s, {} report",
        report.pid,
        report.comm,
        report.elapsed_s,
        if report.is_final { "final" } else { "interval" }
    )];
    comments.push(format!("lost: events {}, stacks {}", report.lost.events, report.lost.stacks));
    if report.findings_omitted > 0 {
        comments.push(format!("findings omitted (--max-findings): {}", report.findings_omitted));
    }
    if report.exited == Some(true) {
        comments.push("the target exited during the trace".into());
    }
    b.profile.comment = comments.iter().map(|c| b.string(c)).collect();
    for i in 0..b.profile.mapping.len() {
        let file = &b.profile.string_table[b.profile.mapping[i].filename as usize];
        if let Some(id) = build_ids.get(file).cloned() {
            b.profile.mapping[i].build_id = b.string(&id);
        }
    }
    b.profile.time_nanos = time_nanos;
    b.profile.duration_nanos = (report.elapsed_s * 1e9) as i64;
    b.profile
}

/// The profile serialized and gzipped, as pprof files are stored on disk.
pub fn encode_gzipped(profile: &Profile) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    // Writing to a Vec cannot fail.
    gz.write_all(&profile.encode_to_vec()).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

/// The report as the bytes of a `.pb.gz` pprof file.
pub fn render_pprof(report: &Report, time_nanos: i64, build_ids: &HashMap<String, String>) -> Vec<u8> {
    encode_gzipped(&build_profile(report, time_nanos, build_ids))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::{
        render::json::tests::example_report,
        report::{Frame, Verdict},
    };

    pub(crate) fn frame(function: &str, file: Option<&str>, line: Option<u32>, module: Option<&str>) -> Frame {
        Frame {
            function: function.into(),
            file: file.map(Into::into),
            line,
            module: module.map(Into::into),
            addr: None,
            file_offset: None,
        }
    }

    /// Two findings sharing their outer frames, one without a peer, one
    /// frame unresolved in a stripped library.
    fn two_findings() -> Report {
        let mut r = example_report();
        r.is_final = true;
        let app = Some("/srv/app");
        let libc = Some("/usr/lib/x86_64-linux-gnu/libc.so.6");
        let leak = &mut r.findings[0];
        leak.site = "dial_cache".into();
        leak.site_index = 1;
        leak.stack = vec![
            frame("__socket", None, None, libc),
            frame("dial_cache", Some("/src/app.c"), Some(40), app),
            frame("bad_handler", Some("/src/app.c"), Some(80), app),
            frame("main", Some("/src/app.c"), Some(120), app),
        ];
        let mut steady = leak.clone();
        steady.verdict = Verdict::Steady;
        steady.site = "pool_init".into();
        steady.via = Some("redisConnect".into());
        steady.live = 4;
        steady.peer = None;
        steady.stack = vec![
            Frame { addr: Some("0x7f0000001234".into()), ..frame("[unknown]", None, None, Some("/opt/libstripped.so")) },
            frame("pool_init", Some("/src/app.c"), Some(60), app),
            frame("main", Some("/src/app.c"), Some(121), app),
        ];
        r.findings.push(steady);
        r
    }

    fn decode(bytes: &[u8]) -> Profile {
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "not gzip");
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut raw).unwrap();
        Profile::decode(raw.as_slice()).expect("decodes as profile.proto")
    }

    fn s(p: &Profile, i: i64) -> &str {
        &p.string_table[i as usize]
    }

    /// Function names of a sample's locations, leaf first.
    fn names(p: &Profile, sample: &Sample) -> Vec<String> {
        sample
            .location_id
            .iter()
            .map(|id| {
                let loc = p.location.iter().find(|l| l.id == *id).expect("location exists");
                let f = p.function.iter().find(|f| f.id == loc.line[0].function_id).expect("function exists");
                s(p, f.name).to_string()
            })
            .collect()
    }

    fn labels(p: &Profile, sample: &Sample) -> Vec<(String, String)> {
        sample.label.iter().map(|l| (s(p, l.key).to_string(), s(p, l.str).to_string())).collect()
    }

    #[test]
    fn profile_decodes_with_sample_types_stacks_and_labels() {
        let ids = HashMap::from([("/srv/app".to_string(), "0a1b2c3d".to_string())]);
        let p = decode(&render_pprof(&two_findings(), 1_700_000_000_000_000_000, &ids));
        assert_eq!(p.string_table[0], "");
        let types: Vec<_> = p.sample_type.iter().map(|t| (s(&p, t.r#type), s(&p, t.unit))).collect();
        assert_eq!(types, vec![("connections", "count")]);
        assert_eq!(s(&p, p.default_sample_type), "connections");
        assert_eq!(p.time_nanos, 1_700_000_000_000_000_000);
        assert_eq!(p.duration_nanos, 20_000_000_000);

        assert_eq!(p.sample.len(), 2, "one sample per finding");
        let (leak, steady) = (&p.sample[0], &p.sample[1]);
        assert_eq!(leak.value, vec![120]);
        assert_eq!(steady.value, vec![4]);
        assert_eq!(names(&p, leak), ["__socket", "dial_cache", "bad_handler", "main"], "leaf first");
        assert_eq!(names(&p, steady), ["[unknown]", "pool_init", "main"]);
        assert_eq!(
            labels(&p, leak),
            [("kind", "connection"), ("site", "dial_cache"), ("verdict", "leak"), ("peer", "127.0.0.1:6379")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(
            labels(&p, steady),
            [("kind", "connection"), ("site", "pool_init"), ("verdict", "steady"), ("via", "redisConnect")].map(|(k, v)| (k.to_string(), v.to_string()))
        );

        // Lines and files; `main` is one function at two lines (two locations).
        let main_fn: Vec<_> = p.function.iter().filter(|f| s(&p, f.name) == "main").collect();
        assert_eq!(main_fn.len(), 1);
        assert_eq!(s(&p, main_fn[0].filename), "/src/app.c");
        let main_lines: Vec<i64> = p
            .location
            .iter()
            .filter(|l| l.line[0].function_id == main_fn[0].id)
            .map(|l| l.line[0].line)
            .collect();
        assert_eq!(main_lines, [120, 121]);
        // The unresolved frame keeps its address.
        assert!(p.location.iter().any(|l| l.address == 0x7f0000001234));

        // Mappings: the site's module first, all marked symbolized.
        let files: Vec<_> = p.mapping.iter().map(|m| s(&p, m.filename)).collect();
        assert_eq!(files, ["/srv/app", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/opt/libstripped.so"]);
        assert!(p.mapping.iter().all(|m| m.has_functions));
        assert!(p.mapping[0].has_line_numbers && !p.mapping[2].has_line_numbers);
        let build_ids: Vec<_> = p.mapping.iter().map(|m| s(&p, m.build_id)).collect();
        assert_eq!(build_ids, ["0a1b2c3d", "", ""], "a build id where one was read, none elsewhere");
        for l in &p.location {
            assert!(l.mapping_id as usize <= p.mapping.len() && l.id != 0);
        }
        let comments: Vec<_> = p.comment.iter().map(|c| s(&p, *c)).collect();
        assert!(comments[0].starts_with("leaktrace: pid 1234 (api-server)"), "{comments:?}");
    }

    #[test]
    fn ids_are_unique_and_strings_deduplicated() {
        let mut r = two_findings();
        r.findings.push(r.findings[0].clone());
        let p = build_profile(&r, 0, &HashMap::new());
        let mut seen = std::collections::HashSet::new();
        assert!(p.string_table.iter().all(|x| seen.insert(x.clone())), "duplicate strings");
        for (i, l) in p.location.iter().enumerate() {
            assert_eq!(l.id, i as u64 + 1);
        }
        for (i, f) in p.function.iter().enumerate() {
            assert_eq!(f.id, i as u64 + 1);
        }
        // 7 distinct frames; the repeated stack reuses its locations.
        assert_eq!(p.location.len(), 7);
        assert_eq!(p.sample.len(), 3);
        assert_eq!(p.sample[0].location_id, p.sample[2].location_id);
    }

    #[test]
    fn empty_report_still_declares_its_sample_types() {
        let mut r = example_report();
        r.findings.clear();
        let p = decode(&render_pprof(&r, 0, &HashMap::new()));
        assert!(p.sample.is_empty());
        assert_eq!(s(&p, p.sample_type[0].r#type), "connections");
    }

    #[test]
    fn field_numbers_match_profile_proto() {
        // Hand-encoded: Profile{string_table: ["", "connections", "count"],
        // sample_type: [{type: 1, unit: 2}], sample: [{location_id: [1], value: [7]}]}.
        let mut p = Profile { string_table: vec!["".into(), "connections".into(), "count".into()], ..Default::default() };
        p.sample_type.push(ValueType { r#type: 1, unit: 2 });
        p.sample.push(Sample { location_id: vec![1], value: vec![7], label: vec![] });
        let bytes = p.encode_to_vec();
        let expected: &[u8] = &[
            0x0a, 0x04, 0x08, 0x01, 0x10, 0x02, // 1: sample_type {1: 1, 2: 2}
            0x12, 0x06, 0x0a, 0x01, 0x01, 0x12, 0x01, 0x07, // 2: sample {1: packed [1], 2: packed [7]}
            0x32, 0x00, // 6: ""
            0x32, 0x0b, b'c', b'o', b'n', b'n', b'e', b'c', b't', b'i', b'o', b'n', b's', // 6: "connections"
            0x32, 0x05, b'c', b'o', b'u', b'n', b't', // 6: "count"
        ];
        assert_eq!(bytes, expected);
    }
}
