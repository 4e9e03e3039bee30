//! What the map tracker needs from a Go executable, read with `object`:
//! the Go version (`.go.buildinfo`), function entries by name (`.gopclntab`,
//! present even in stripped binaries), the first instructions of a function
//! (to pick a cheap probe address) and the package-level variables of the
//! program's own packages (`.symtab`; none when stripped).
//!
//! The version and the pc table are read by the shared `crate::binary::golang`
//! readers; this adds what only the map tracker needs (code bytes, data
//! symbols of the program's own packages).

use std::{collections::HashMap, path::Path};

use anyhow::{anyhow, Context, Result};
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
        let (version, _) = crate::binary::golang::buildinfo::go_version(&file)?
            .ok_or_else(|| anyhow!("not a Go program (no .go.buildinfo section)"))?;
        let version = (version.major, version.minor);
        let symbols = crate::binary::golang::GoSymbols::from_elf(&file)?.ok_or_else(|| anyhow!("no .gopclntab section"))?;
        let mut functions = HashMap::with_capacity(symbols.pclntab.len());
        for (name, entry, end) in symbols.pclntab.functions() {
            functions.entry(name).or_insert((entry, end));
        }
        let text = file.section_by_name(".text").ok_or_else(|| anyhow!("no .text section"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
