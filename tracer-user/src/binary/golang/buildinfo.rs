//! The Go version a binary was built with, from its `.go.buildinfo`
//! section: present in every Go binary, stripped or not, and the only
//! reliable source (the runtime's own `runtime.buildVersion` needs symbols).

use anyhow::{bail, Result};

/// A Go release, e.g. 1.22.10 (`go1.22.10`; pre-releases keep their minor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for GoVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "go{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl GoVersion {
    /// Parses `go1.22.10`, `go1.21rc2`, `go1.27.3 X:nocoverageredesign`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().strip_prefix("go")?;
        let s = s.split(|c: char| c.is_whitespace()).next()?;
        let mut nums = s.split('.').map(|p| p.chars().take_while(char::is_ascii_digit).collect::<String>());
        let major = nums.next()?.parse().ok()?;
        let minor = nums.next()?.parse().ok()?;
        let patch = nums.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Self { major, minor, patch })
    }
}

const MAGIC: &[u8] = b"\xff Go buildinf:";

/// The version string (`go1.22.10`) stored in a `.go.buildinfo` section's
/// contents. Go 1.18+ stores it inline (flag bit 2); older binaries point
/// at it, which we do not follow (1.19 is the oldest supported).
pub fn version_string(section: &[u8]) -> Result<String> {
    if section.len() < 32 || !section.starts_with(MAGIC) {
        bail!("no Go build info header");
    }
    let flags = section[15];
    if flags & 2 == 0 {
        bail!("Go build info without inline strings (Go older than 1.18)");
    }
    let (len, n) = uvarint(&section[32..]).ok_or_else(|| anyhow::anyhow!("bad build info varint"))?;
    let start = 32 + n;
    let end = start.checked_add(len as usize).filter(|&e| e <= section.len());
    let Some(end) = end else { bail!("build info version string out of bounds") };
    Ok(String::from_utf8_lossy(&section[start..end]).into_owned())
}

/// The Go version of an ELF file's bytes; `Ok(None)` when it is no Go binary.
pub fn go_version(elf: &object::File) -> Result<Option<(GoVersion, String)>> {
    use object::{Object, ObjectSection};
    let Some(sec) = elf.section_by_name(".go.buildinfo") else { return Ok(None) };
    let s = version_string(sec.data()?)?;
    let v = GoVersion::parse(&s).ok_or_else(|| anyhow::anyhow!("unrecognised Go version string {s:?}"))?;
    Ok(Some((v, s)))
}

/// The main module's path (`example.com/api`) in a `.go.buildinfo`
/// section's contents: the `mod` line of the module info string that
/// follows the version string. `None` for GOPATH builds (no module) and
/// binaries without inline strings.
pub fn main_module_of(section: &[u8]) -> Option<String> {
    if section.len() < 32 || !section.starts_with(MAGIC) || section[15] & 2 == 0 {
        return None;
    }
    let (vlen, n) = uvarint(&section[32..])?;
    let at = 32usize.checked_add(n)?.checked_add(usize::try_from(vlen).ok()?)?;
    let (mlen, n) = uvarint(section.get(at..)?)?;
    let start = at.checked_add(n)?;
    let info = section.get(start..start.checked_add(usize::try_from(mlen).ok()?)?)?;
    let text = String::from_utf8_lossy(info);
    text.lines().find_map(|l| l.strip_prefix("mod\t")).and_then(|l| l.split('\t').next()).map(str::to_string)
}

/// The main module's path of a Go ELF file ([`main_module_of`]).
pub fn main_module(elf: &object::File) -> Option<String> {
    use object::{Object, ObjectSection};
    main_module_of(elf.section_by_name(".go.buildinfo")?.data().ok()?)
}

/// Go's unsigned LEB128 varint: (value, bytes used).
pub(crate) fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(GoVersion::parse("go1.22.10"), Some(GoVersion { major: 1, minor: 22, patch: 10 }));
        assert_eq!(GoVersion::parse("go1.21rc2"), Some(GoVersion { major: 1, minor: 21, patch: 0 }));
        assert_eq!(GoVersion::parse("go1.27.3 X:foo").map(|v| v.minor), Some(27));
        assert_eq!(GoVersion::parse("devel +abc"), None);
    }

    #[test]
    fn inline_version_string() {
        let mut sec = MAGIC.to_vec();
        sec.extend([8, 2]);
        sec.resize(32, 0);
        sec.push(9);
        sec.extend(b"go1.19.8x");
        assert_eq!(version_string(&sec).unwrap(), "go1.19.8x");
        sec.push(42);
        sec.extend(b"0123456789abcdefpath\tx/cmd\nmod\tx\t(devel)\t\n");
        assert_eq!(main_module_of(&sec).as_deref(), Some("x"));
        sec[15] = 0;
        assert!(version_string(&sec).is_err());
    }
}
