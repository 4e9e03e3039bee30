//! What the map tracker needs from a Go executable, read with `object`:
//! the Go version (`.go.buildinfo`), function entries by name (`.gopclntab`,
//! present even in stripped binaries), the first instructions of a function
//! (to pick a cheap probe address) and the package-level variables of the
//! program's own packages (`.symtab`; none when stripped).
//!
//! Kept small and private to the tracker; a shared Go-binary module can
//! replace it.

use std::{collections::HashMap, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

/// A package-level variable: `main.cache` at `addr`, `size` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSymbol {
    pub name: String,
    pub addr: u64,
    pub size: u64,
}

/// The parts of a Go executable the map tracker uses.
pub struct GoBinary {
    /// `(1, 22)` for go1.22.10.
    pub version: (u32, u32),
    /// Function name -> (entry address, end address), from `.gopclntab`.
    functions: HashMap<String, (u64, u64)>,
    /// `.text`: (address, file offset, bytes).
    text: (u64, u64, Vec<u8>),
    /// Variables of the program's own packages (`main.`, `github.com/...`).
    pub data: Vec<DataSymbol>,
    /// Whether the binary has a symbol table (names for maps).
    pub has_symtab: bool,
}

impl GoBinary {
    /// Reads the executable at `path`; an error when it is not a Go program.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let file = object::File::parse(&*bytes).with_context(|| format!("{} is not an ELF file", path.display()))?;
        let buildinfo = file
            .section_by_name(".go.buildinfo")
            .ok_or_else(|| anyhow!("not a Go program (no .go.buildinfo section)"))?;
        let version = parse_buildinfo(buildinfo.data()?)?;
        let pclntab = file.section_by_name(".gopclntab").ok_or_else(|| anyhow!("no .gopclntab section"))?;
        let text = file.section_by_name(".text").ok_or_else(|| anyhow!("no .text section"))?;
        let functions = parse_pclntab(pclntab.data()?, text.address())?;
        let (text_off, _) = text.file_range().ok_or_else(|| anyhow!(".text has no file data"))?;
        let text = (text.address(), text_off, text.data()?.to_vec());
        let mut data = Vec::new();
        let mut has_symtab = false;
        for sym in file.symbols() {
            has_symtab = true;
            if sym.kind() != SymbolKind::Data || sym.size() == 0 {
                continue;
            }
            let Ok(name) = sym.name() else { continue };
            let in_data = sym
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
                .is_some_and(|s| matches!(s.kind(), SectionKind::Data | SectionKind::UninitializedData));
            if in_data && is_user_package(name) {
                data.push(DataSymbol { name: name.to_string(), addr: sym.address(), size: sym.size() });
            }
        }
        Ok(Self { version, functions, text, data, has_symtab })
    }

    /// Entry and end address of a function.
    pub fn function(&self, name: &str) -> Option<(u64, u64)> {
        self.functions.get(name).copied()
    }

    /// Up to `n` bytes of code from `addr`.
    pub fn code(&self, addr: u64, n: usize) -> Option<&[u8]> {
        let (base, _, bytes) = &self.text;
        let start = addr.checked_sub(*base)? as usize;
        bytes.get(start..(start + n).min(bytes.len()))
    }

    /// File offset of a code address (what a uprobe is attached at).
    pub fn file_offset(&self, addr: u64) -> Option<u64> {
        let (base, off, bytes) = &self.text;
        (addr >= *base && addr < base + bytes.len() as u64).then(|| addr - base + off)
    }
}

/// `main.x` or `github.com/a/b.x`: a variable of the program itself, not of
/// the runtime or the standard library (whose first path element has no dot).
fn is_user_package(name: &str) -> bool {
    if name.starts_with("main.") {
        return true;
    }
    let head = name.split('/').next().unwrap_or(name);
    name.contains('/') && head.contains('.') && !name.starts_with("go:") && !name.starts_with("type:")
}

/// The Go version from `.go.buildinfo` (Go 1.18+ inline-string format).
fn parse_buildinfo(b: &[u8]) -> Result<(u32, u32)> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if b.len() < 33 || &b[..14] != MAGIC {
        bail!("unrecognised .go.buildinfo");
    }
    if b[15] & 2 == 0 {
        bail!("Go before 1.18 (pointer-format buildinfo) is not supported");
    }
    let (len, n) = uvarint(&b[32..]).ok_or_else(|| anyhow!("bad .go.buildinfo"))?;
    let s = b.get(32 + n..32 + n + len as usize).ok_or_else(|| anyhow!("bad .go.buildinfo"))?;
    parse_go_version(std::str::from_utf8(s)?)
}

/// `go1.22.10` -> (1, 22); `go1.24rc1` -> (1, 24).
fn parse_go_version(s: &str) -> Result<(u32, u32)> {
    let v = s.strip_prefix("go").ok_or_else(|| anyhow!("bad Go version {s:?}"))?;
    let mut it = v.split(|c: char| !c.is_ascii_digit());
    let major = it.next().and_then(|x| x.parse().ok()).ok_or_else(|| anyhow!("bad Go version {s:?}"))?;
    let minor = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    Ok((major, minor))
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut x = 0u64;
    for (i, &c) in b.iter().enumerate().take(10) {
        x |= u64::from(c & 0x7f) << (7 * i);
        if c & 0x80 == 0 {
            return Some((x, i + 1));
        }
    }
    None
}

/// Function entries by name from a Go 1.18+ pclntab (magics 0xfffffff0,
/// 0xfffffff1): header, then `nfunc + 1` (entry offset, func offset) pairs;
/// each `_func` starts with its entry offset and its name offset. Entry
/// offsets count from the header's `textStart`, which Go 1.26+ leaves 0
/// (the runtime fills it in): then from the start of `.text`.
fn parse_pclntab(b: &[u8], text_addr: u64) -> Result<HashMap<String, (u64, u64)>> {
    let u32_at = |o: usize| b.get(o..o + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap()));
    let u64_at = |o: usize| b.get(o..o + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap()));
    let magic = u32_at(0).ok_or_else(|| anyhow!("short pclntab"))?;
    if magic != 0xffff_fff0 && magic != 0xffff_fff1 {
        bail!("unsupported pclntab (magic {magic:#x}: Go before 1.18?)");
    }
    if b[7] != 8 {
        bail!("only 64-bit Go binaries are supported");
    }
    let field = |i: usize| u64_at(8 + 8 * i).map(|v| v as usize).ok_or_else(|| anyhow!("short pclntab"));
    let nfunc = field(0)?;
    let text_start = match field(2)? as u64 {
        0 => text_addr,
        t => t,
    };
    let funcnames = field(3)?;
    let pcln = field(7)?;
    let mut out = HashMap::with_capacity(nfunc);
    for i in 0..nfunc {
        let at = pcln + 8 * i;
        let (Some(entry), Some(funcoff), Some(next)) = (u32_at(at), u32_at(at + 4), u32_at(at + 8)) else { break };
        let func = pcln + funcoff as usize;
        let Some(name_off) = u32_at(func + 4) else { continue };
        let start = funcnames + name_off as usize;
        let Some(rest) = b.get(start..) else { continue };
        let end = rest.iter().position(|&c| c == 0).unwrap_or(0);
        let Ok(name) = std::str::from_utf8(&rest[..end]) else { continue };
        out.entry(name.to_string()).or_insert((text_start + u64::from(entry), text_start + u64::from(next)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_go_version("go1.22.10").unwrap(), (1, 22));
        assert_eq!(parse_go_version("go1.24rc1").unwrap(), (1, 24));
        assert_eq!(parse_go_version("go1.19").unwrap(), (1, 19));
        assert!(parse_go_version("devel").is_err());
    }

    #[test]
    fn user_packages() {
        assert!(is_user_package("main.cache"));
        assert!(is_user_package("github.com/acme/api.sessions"));
        assert!(!is_user_package("runtime.allgs"));
        assert!(!is_user_package("net/http.DefaultClient"));
        assert!(!is_user_package("sync.expunged"));
    }

    /// leaktrace's own test binary is not a Go program.
    #[test]
    fn non_go_binary_is_refused() {
        let err = GoBinary::read(&std::env::current_exe().unwrap()).err().unwrap();
        assert!(err.to_string().contains("not a Go program"), "{err}");
    }
}
