//! Go binaries: what leaktrace needs to read a Go program from outside:
//! its version (`buildinfo`), the runtime's struct layout (`offsets`),
//! names for pcs even in stripped builds (`pclntab`), one [`GoBinary`] per
//! executable (code, package-level variables), where the runtime's globals
//! are ([`GoRuntime`]), and a reader of the target's memory (`memory`).
//! Shared by every Go-aware tracker.

pub mod buildinfo;
pub mod memory;
pub mod offsets;
pub mod pclntab;

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use iced_x86::{Mnemonic, OpKind, Register};
use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

pub use buildinfo::GoVersion;
pub use memory::TargetMemory;
pub use offsets::GOffsets;
pub use pclntab::Pclntab;

use super::{
    elf::{DataSymbol, Segments},
    x86::{is_imm, linear},
};

/// Oldest and newest Go minor versions the tables and readers are checked on.
pub const OLDEST_MINOR: u32 = 19;
pub const NEWEST_MINOR: u32 = 27;

/// Names for the pcs of one Go object from its `.gopclntab` (every Go
/// binary has one): the symbolizer's fallback for `-s -w` builds.
pub struct GoSymbols {
    pub pclntab: Pclntab,
    /// The object's PT_LOAD segments (file offsets <-> link-time addresses).
    pub segments: Segments,
}

impl GoSymbols {
    /// `Ok(None)` when the object has no Go pc table.
    pub fn from_elf(elf: &object::File) -> Result<Option<Self>> {
        let Some(sec) = elf.section_by_name(".gopclntab") else { return Ok(None) };
        let text = elf.section_by_name(".text").map_or(0, |t| t.address());
        let pclntab = Pclntab::parse(sec.data()?.to_vec(), text)?;
        Ok(Some(Self { pclntab, segments: Segments::of(elf) }))
    }

    /// Reads `path` and parses its pc table.
    pub fn open(path: &Path) -> Result<Option<Self>> {
        let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let elf = object::File::parse(&*data)?;
        Self::from_elf(&elf)
    }

    /// Name and file:line for a file offset in the object.
    pub fn lookup_offset(&self, off: u64) -> Option<pclntab::PcInfo> {
        self.pclntab.lookup(self.segments.vaddr_of_offset(off)?)
    }
}

/// Whether an ELF file is a Go program: Go's own sections (`.gopclntab`,
/// kept even by `-s -w`; `.go.buildinfo`) or the runtime's `runtime.goexit`.
/// The one test every tracker uses (the lock tracker to probe Go's
/// semaphores, the allocation tracker to refuse return probes in Go code).
pub fn is_go(elf: &object::File) -> bool {
    elf.section_by_name(".gopclntab").is_some()
        || elf.section_by_name(".go.buildinfo").is_some()
        || elf.symbols().any(|s| s.name() == Ok("runtime.goexit"))
}

/// Where a runtime global was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Symtab,
    /// Disassembly of a runtime function named by the pc table.
    Disassembly,
}

/// A Go executable, as every Go-aware tracker reads it: its version, its
/// pc table (function names and ranges, even in a stripped build), its
/// code, and the package-level variables of the program's own packages.
pub struct GoBinary {
    pub version: GoVersion,
    /// `go1.22.10`.
    pub version_string: String,
    pub symbols: GoSymbols,
    /// `.text`: (address, file offset, bytes).
    text: (u64, u64, Vec<u8>),
    /// Variables of the program's own packages (`main.`, `github.com/...`),
    /// from the symbol table (none when stripped).
    pub data: Vec<DataSymbol>,
    /// Whether the binary has a symbol table (names for maps).
    pub has_symtab: bool,
}

impl GoBinary {
    /// Reads the executable at `path`; an error when it is not a Go program.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let file = object::File::parse(&*bytes).with_context(|| format!("{} is not an ELF file", path.display()))?;
        Self::from_elf(&file)?.ok_or_else(|| anyhow!("not a Go program (no .go.buildinfo section)"))
    }

    /// `Ok(None)` when the ELF is not a Go program (no `.go.buildinfo`).
    pub fn from_elf(file: &object::File) -> Result<Option<Self>> {
        let Some((version, version_string)) = buildinfo::go_version(file)? else { return Ok(None) };
        let symbols = GoSymbols::from_elf(file)?.ok_or_else(|| anyhow!("Go binary without .gopclntab"))?;
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
        Ok(Some(Self { version, version_string, symbols, text, data, has_symtab }))
    }

    /// Entry and end address of a function (the first of that name in the
    /// pc table).
    pub fn function(&self, name: &str) -> Option<(u64, u64)> {
        self.symbols.pclntab.function_range(name)
    }

    /// Up to `n` bytes of code from `addr`.
    pub fn code(&self, addr: u64, n: usize) -> Option<&[u8]> {
        let (base, _, bytes) = &self.text;
        let start = usize::try_from(addr.checked_sub(*base)?).ok()?;
        bytes.get(start..start.saturating_add(n).min(bytes.len()))
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

/// Every function of a Go executable as (name, link-time address, size):
/// from the symbol table, else (a `-s -w` build) from `.gopclntab`, which
/// every Go binary keeps. An error says why a stripped binary's pc table
/// could not be read.
pub fn text_functions(file: &object::File) -> Result<Vec<(String, u64, u64)>> {
    let from_symtab: Vec<(String, u64, u64)> = file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
        .filter_map(|s| Some((s.name().ok()?.to_string(), s.address(), s.size())))
        .collect();
    if !from_symtab.is_empty() {
        return Ok(from_symtab);
    }
    Ok(match GoSymbols::from_elf(file)? {
        Some(g) => g.pclntab.functions().map(|(n, start, end)| (n, start, end.saturating_sub(start))).collect(),
        None => Vec::new(),
    })
}

/// A Go executable as the goroutine reader needs it: the [`GoBinary`] and
/// the runtime's `g` layout and goroutine table.
pub struct GoRuntime {
    bin: GoBinary,
    pub offsets: GOffsets,
    pub offsets_source: offsets::Source,
    /// Link-time address of `runtime.allgs` (a `[]*g` slice header).
    pub allgs: u64,
    pub allgs_source: Found,
    /// `runtime.waitReasonStrings` ([N]string): link-time address and N.
    pub wait_reasons: Option<(u64, u64)>,
}

impl std::ops::Deref for GoRuntime {
    type Target = GoBinary;

    fn deref(&self) -> &GoBinary {
        &self.bin
    }
}

impl GoRuntime {
    /// Reads a Go executable; `Ok(None)` when it is not one. An error says
    /// what is unsupported (a version, a missing table).
    pub fn open(path: &Path) -> Result<Option<Self>> {
        let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Option<Self>> {
        let elf = object::File::parse(data)?;
        if elf.architecture() != object::Architecture::X86_64 {
            return Ok(None);
        }
        let Some(bin) = GoBinary::from_elf(&elf)? else { return Ok(None) };
        let (version, version_string) = (bin.version, &bin.version_string);
        if version.major != 1 || version.minor < OLDEST_MINOR {
            anyhow::bail!("Go {version_string} is older than go1.{OLDEST_MINOR}, the oldest supported");
        }
        let (offsets, offsets_source) = offsets::offsets(&elf, version)?;
        let sym = |name: &str| elf.symbols().find(|s| s.name() == Ok(name)).map(|s| (s.address(), s.size()));
        let (allgs, allgs_source) = match sym("runtime.allgs") {
            Some((a, _)) => (a, Found::Symtab),
            None => (allgs_by_disassembly(&elf, &bin.symbols)?, Found::Disassembly),
        };
        let wait_reasons = match sym("runtime.waitReasonStrings") {
            // The symbol size is the file's word: an array of wait reasons
            // has a few dozen entries.
            Some((a, size)) => Some((a, size / 16)).filter(|&(_, n)| n > 0 && n < 256),
            None => wait_reasons_by_disassembly(data, &elf, &bin.symbols),
        };
        Ok(Some(Self { bin, offsets, offsets_source, allgs, allgs_source, wait_reasons }))
    }
}

/// The machine code of a function the pc table names.
fn function_code<'a>(elf: &'a object::File, symbols: &GoSymbols, name: &str) -> Option<(u64, &'a [u8])> {
    let (start, end) = symbols.pclntab.function_range(name)?;
    let text = elf.section_by_name(".text")?;
    let base = text.address();
    let data = text.data().ok()?;
    let lo = usize::try_from(start.checked_sub(base)?).ok()?;
    let hi = usize::try_from(end.checked_sub(base)?).ok()?;
    Some((start, data.get(lo..hi)?))
}

/// RIP-relative memory operands of a function: (instruction, address).
fn rip_operands(ip: u64, code: &[u8]) -> Vec<(iced_x86::Instruction, u64)> {
    linear(code, ip)
        .filter(|ins| ins.is_ip_rel_memory_operand() && ins.memory_base() == Register::RIP)
        .map(|ins| (ins, ins.ip_rel_memory_address()))
        .collect()
}

/// `runtime.allgs` in a binary without symbols: `forEachG` ranges over
/// `allgs` under `allglock`, so its code loads the slice's pointer and
/// length, two words 8 bytes apart (the lock is only LEA'd). Checked
/// against the symtab of every unstripped fixture (tests/go_offsets.rs).
pub fn allgs_by_disassembly(elf: &object::File, symbols: &GoSymbols) -> Result<u64> {
    let (ip, code) = function_code(elf, symbols, "runtime.forEachG")
        .ok_or_else(|| anyhow!("no symbols and no runtime.forEachG in the pc table: cannot find runtime.allgs"))?;
    let loads: Vec<u64> =
        rip_operands(ip, code).into_iter().filter(|(i, _)| i.mnemonic() == Mnemonic::Mov).map(|(_, a)| a).collect();
    loads
        .iter()
        .copied()
        .filter(|a| loads.contains(&(a + 8)))
        .min()
        .ok_or_else(|| anyhow!("runtime.forEachG does not load a slice: cannot find runtime.allgs"))
}

/// `runtime.waitReasonStrings` in a binary without symbols:
/// `waitReason.String` compares the reason with the array's length and
/// indexes the array it LEAs.
pub fn wait_reasons_by_disassembly(data: &[u8], elf: &object::File, symbols: &GoSymbols) -> Option<(u64, u64)> {
    let (ip, code) = function_code(elf, symbols, "runtime.waitReason.String")?;
    let (mut arrays, mut len) = (Vec::new(), None);
    for ins in linear(code, ip) {
        if ins.mnemonic() == Mnemonic::Lea && ins.memory_base() == Register::RIP {
            arrays.push(ins.ip_rel_memory_address());
        }
        if ins.mnemonic() == Mnemonic::Cmp && len.is_none() && ins.op_count() == 2 && ins.op0_kind() == OpKind::Register {
            len = is_imm(ins.op1_kind()).then(|| ins.immediate(1));
        }
    }
    let len = len.filter(|&n| n > 0 && n < 256)?;
    // The function also LEAs its "unknown wait reason" string: the array
    // is the LEA whose target holds `len` string headers.
    let array = arrays.into_iter().find(|&a| is_string_array(data, symbols, a, len))?;
    Some((array, len))
}

/// Whether `n` Go string headers at `va` in the file all point at short
/// printable strings (entry 0, `waitReasonZero`, is empty).
fn is_string_array(data: &[u8], symbols: &GoSymbols, va: u64, n: u64) -> bool {
    let read = |va: u64, len: usize| -> Option<&[u8]> {
        let off = usize::try_from(symbols.segments.offset_of_vaddr(va)?).ok()?;
        data.get(off..off.checked_add(len)?)
    };
    let Some(headers) = read(va, n as usize * 16) else { return false };
    headers.chunks(16).all(|h| {
        let ptr = u64::from_le_bytes(h[..8].try_into().unwrap());
        let len = u64::from_le_bytes(h[8..].try_into().unwrap());
        len == 0 || (len < 128 && read(ptr, len as usize).is_some_and(|s| s.iter().all(|b| b.is_ascii_graphic() || *b == b' ')))
    })
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
        let exe = std::env::current_exe().unwrap();
        let err = GoBinary::read(&exe).err().unwrap();
        assert!(err.to_string().contains("not a Go program"), "{err}");
        assert!(GoRuntime::open(&exe).unwrap().is_none());
    }
}

/// `runtime.runfinq`'s pc range in process `pid` (the finalizer goroutine's
/// loop: a close called under it is a finalizer's); `(0, 0)` when the
/// executable is not a Go program or has no such function.
pub fn finalizer_range(pid: u32) -> (u64, u64) {
    let exe = std::path::PathBuf::from(format!("/proc/{pid}/exe"));
    GoSymbols::open(&exe)
        .ok()
        .flatten()
        .and_then(|syms| {
            let (start, end) = syms.pclntab.function_range("runtime.runfinq")?;
            let bias = crate::binary::elf::exe_load_bias(pid, &syms.segments).unwrap_or(0);
            Some((start + bias, end + bias))
        })
        .unwrap_or((0, 0))
}
