//! `--match` selectors of `leaktrace agent`: which processes it traces. A
//! process is traced when any selector matches it.

use crate::identity::Container;

/// One `--match` selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// `comm=NAME`: the command name (`/proc/PID/comm`, at most 15 bytes), exactly.
    Comm(String),
    /// `exe=PATH`: the executable's path; `*` (any run of characters, `/`
    /// included) and `?` (one character) make it a glob.
    Exe(String),
    /// `cgroup=PREFIX`: the cgroup v2 path starts with PREFIX.
    Cgroup(String),
    /// `container=PREFIX`: the container id starts with PREFIX.
    Container(String),
    /// `all`: every process with an executable (not kernel threads, not leaktrace).
    All,
}

/// What a selector looks at, read from /proc when a process is picked up.
#[derive(Clone, Debug, Default)]
pub struct Candidate {
    pub comm: String,
    pub exe: String,
    pub cgroup: String,
}

impl Selector {
    /// Parses `comm=NAME`, `exe=PATH`, `cgroup=PREFIX`, `container=PREFIX`, `all`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(Selector::All);
        }
        let usage = "expected comm=NAME, exe=PATH-or-glob, cgroup=PATH-prefix, container=ID-prefix or all";
        let (key, value) = s.split_once('=').ok_or_else(|| format!("{s:?}: {usage}"))?;
        if value.is_empty() {
            return Err(format!("{s:?}: empty value ({usage})"));
        }
        match key {
            "comm" if value.len() > 15 => Err(format!(
                "{s:?}: a command name has at most 15 bytes (the kernel cuts it there); use exe= for longer names"
            )),
            "comm" => Ok(Selector::Comm(value.into())),
            "exe" => Ok(Selector::Exe(value.into())),
            "cgroup" if !value.starts_with('/') => Err(format!("{s:?}: a cgroup path starts with / (as in /proc/PID/cgroup)")),
            "cgroup" => Ok(Selector::Cgroup(value.into())),
            "container" if !value.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Err(format!("{s:?}: a container id is hex digits"))
            }
            "container" => Ok(Selector::Container(value.to_ascii_lowercase())),
            _ => Err(format!("{s:?}: unknown selector {key:?} ({usage})")),
        }
    }

    /// Whether `c` is selected.
    pub fn matches(&self, c: &Candidate) -> bool {
        match self {
            Selector::Comm(n) => c.comm == *n,
            Selector::Exe(pattern) => glob_match(pattern.as_bytes(), c.exe.as_bytes()),
            Selector::Cgroup(prefix) => {
                c.cgroup.starts_with(prefix.as_str())
                    && (prefix.ends_with('/') || c.cgroup.len() == prefix.len() || c.cgroup.as_bytes()[prefix.len()] == b'/')
            }
            Selector::Container(prefix) => {
                let id = Container::from_cgroup(&c.cgroup).id;
                !id.is_empty() && id.starts_with(prefix.as_str())
            }
            Selector::All => !c.exe.is_empty(),
        }
    }
}

/// A selector as it was written on the command line.
pub fn describe(s: &Selector) -> String {
    match s {
        Selector::Comm(v) => format!("comm={v}"),
        Selector::Exe(v) => format!("exe={v}"),
        Selector::Cgroup(v) => format!("cgroup={v}"),
        Selector::Container(v) => format!("container={v}"),
        Selector::All => "all".into(),
    }
}

/// `*` any run of bytes, `?` one byte, everything else itself.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it has swallowed up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(comm: &str, exe: &str, cgroup: &str) -> Candidate {
        Candidate { comm: comm.into(), exe: exe.into(), cgroup: cgroup.into() }
    }

    #[test]
    fn parses_and_refuses_with_one_line() {
        assert_eq!(Selector::parse("comm=nginx").unwrap(), Selector::Comm("nginx".into()));
        assert_eq!(Selector::parse("all").unwrap(), Selector::All);
        assert_eq!(Selector::parse("container=ABC").unwrap(), Selector::Container("abc".into()));
        for bad in ["nginx", "comm=", "pid=1", "comm=a-very-long-command-name", "cgroup=system.slice", "container=xyz"] {
            let e = Selector::parse(bad).unwrap_err();
            assert!(!e.contains('\n') && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn matches_each_way() {
        let c = cand("conn_leak", "/srv/bin/conn_leak", "/system.slice/api.service");
        assert!(Selector::Comm("conn_leak".into()).matches(&c));
        assert!(!Selector::Comm("conn".into()).matches(&c));
        assert!(Selector::Exe("/srv/bin/conn_leak".into()).matches(&c));
        assert!(Selector::Exe("*/conn_*".into()).matches(&c));
        assert!(Selector::Exe("/srv/*/conn_lea?".into()).matches(&c));
        assert!(!Selector::Exe("*/thread_*".into()).matches(&c));
        assert!(Selector::Cgroup("/system.slice".into()).matches(&c));
        assert!(!Selector::Cgroup("/system.sl".into()).matches(&c));
        assert!(Selector::All.matches(&c));
        assert!(!Selector::All.matches(&cand("kworker/0:1", "", "/")));
        let id = "3f2a5c9d0b1e4f6a8c7d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b";
        let d = cand("x", "/x", &format!("/system.slice/docker-{id}.scope"));
        assert!(Selector::Container("3f2a5c".into()).matches(&d));
        assert!(!Selector::Container("3f2a5d".into()).matches(&d));
        assert!(!Selector::Container("3f2a5c".into()).matches(&c));
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a*b*c", b"aXXbYYc"));
        assert!(!glob_match(b"a*b*c", b"aXXbYY"));
        assert!(glob_match(b"**x", b"yyx"));
        assert!(!glob_match(b"?", b""));
    }
}
