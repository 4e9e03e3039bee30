//! ELF files, read with `object`: text symbols by their base name, the
//! bytes at a link-time address, link-time addresses <-> file offsets
//! through the PT_LOAD segments, the load bias of a mapped object, the
//! globals (data symbols) that contain an address, and GNU build ids.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::procfs::{self, Mapping, MemoryMap};

/// The GNU build id (`.note.gnu.build-id`) of the ELF file at `path`, as
/// lowercase hex.
pub fn file_build_id(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: read-only map of an object file; a file truncated under us
    // would fault, which a mapped program's image cannot be.
    let data = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let id = object::File::parse(&*data).ok()?.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// The build ids of the objects named `modules` (paths as the target maps
/// them), read from the files `memory` says were mapped — checked by device
/// and inode, so a file replaced since, or another one at the same path in
/// another mount namespace, gives no build id rather than a wrong one. Works
/// after the target exited for files still on the host.
pub fn mapped_build_ids<'a>(pid: u32, memory: &MemoryMap, modules: impl IntoIterator<Item = &'a str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for module in modules {
        if out.contains_key(module) {
            continue;
        }
        let mapped = memory.mappings.iter().find(|m| m.path.as_os_str() == module);
        if let Some(id) = mapped.and_then(|m| procfs::verified_object_path(pid, m)).and_then(|p| file_build_id(&p)) {
            out.insert(module.to_string(), id);
        }
    }
    out
}

/// A function symbol, its version (`@GLIBC_2.2.5`, `@@GLIBC_2.2.5`) dropped
/// from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextSymbol<'d> {
    pub name: &'d str,
    pub addr: u64,
    pub size: u64,
}

/// Every function symbol: the dynamic symbols first (a stripped library
/// keeps them), then the symbol table.
pub fn text_symbols<'d: 'f, 'f>(file: &'f object::File<'d>) -> impl Iterator<Item = TextSymbol<'d>> + 'f {
    file.dynamic_symbols().chain(file.symbols()).filter(|s| s.kind() == SymbolKind::Text).filter_map(|s| {
        let name = s.name().ok()?;
        Some(TextSymbol { name: name.split('@').next().unwrap_or(name), addr: s.address(), size: s.size() })
    })
}

/// Address and size of the first defined function named `name` (see
/// [`text_symbols`]).
pub fn find_text_symbol(file: &object::File, name: &str) -> Option<(u64, u64)> {
    text_symbols(file).find(|s| s.name == name && s.addr != 0).map(|s| (s.addr, s.size))
}

/// The largest section leaktrace (or blazesym on its behalf) inflates: the
/// DWARF of the biggest programs is a few hundred MiB.
pub const MAX_INFLATED_SECTION: u64 = 1 << 30;

/// Whether a compressed section's header can be telling the truth: the
/// size it claims must be what `compressed_len` bytes of that format can
/// inflate to (deflate: about 1032:1; zstd: 32768:1, a 128 KiB RLE block
/// in 4 bytes) and at most [`MAX_INFLATED_SECTION`]. Checked before any
/// buffer of the claimed size is allocated.
pub fn check_compressed_claim(name: &str, format: object::CompressionFormat, compressed_len: u64, claimed: u64) -> Result<()> {
    let ratio = match format {
        object::CompressionFormat::None => return Ok(()),
        object::CompressionFormat::Zlib => 1032,
        object::CompressionFormat::Zstandard => 32768,
        f => bail!("{name}: unsupported compression {f:?}"),
    };
    let possible = compressed_len.saturating_mul(ratio).saturating_add(64);
    if claimed > possible {
        bail!("{name}: its compression header claims {claimed} bytes, more than its {compressed_len} compressed bytes can hold");
    }
    if claimed > MAX_INFLATED_SECTION {
        bail!("{name}: its compression header claims {claimed} bytes (at most {MAX_INFLATED_SECTION} are inflated)");
    }
    Ok(())
}

/// Checks every compressed section header of an ELF file (see
/// [`check_compressed_claim`]) and that no section reaches past the end of
/// the file: what blazesym must not be handed, since it allocates what a
/// compression header claims.
pub fn check_sections<'d, R: object::ReadRef<'d>>(file: &object::File<'d, R>, file_len: u64) -> Result<()> {
    for sec in file.sections() {
        let name = sec.name().unwrap_or("?");
        if let Some((off, len)) = sec.file_range() {
            if off.checked_add(len).is_none_or(|end| end > file_len) {
                bail!("section {name} ({len} bytes at {off:#x}) reaches past the end of the file ({file_len} bytes)");
            }
        }
        let c = sec.compressed_file_range().map_err(|e| anyhow!("section {name}: {e}"))?;
        check_compressed_claim(name, c.format, c.compressed_size, c.uncompressed_size)?;
    }
    Ok(())
}

/// [`check_sections`] on the file at `path`, reading only its headers.
pub fn check_sections_of(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len();
    let cache = object::read::ReadCache::new(f);
    let file = object::File::parse(&cache).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    check_sections(&file, len).with_context(|| format!("{}", path.display()))
}

/// One PT_LOAD segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    vaddr: u64,
    offset: u64,
    filesz: u64,
    executable: bool,
}

/// An ELF file's PT_LOAD segments, in file order: they map link-time
/// addresses to file offsets and back.
#[derive(Clone, Debug, Default)]
pub struct Segments(Vec<Segment>);

impl Segments {
    pub fn of(file: &object::File) -> Self {
        Self(
            file.segments()
                .map(|s| {
                    let (offset, filesz) = s.file_range();
                    let executable =
                        matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
                    Segment { vaddr: s.address(), offset, filesz, executable }
                })
                .collect(),
        )
    }

    /// Link-time address of a file offset.
    pub fn vaddr_of_offset(&self, offset: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|s| offset >= s.offset && offset - s.offset < s.filesz.max(1))
            .and_then(|s| s.vaddr.checked_add(offset - s.offset))
    }

    /// Link-time address of a file offset that holds code: the executable
    /// segment is preferred, since with lld's layout a page-aligned mapping
    /// offset can fall in the segment before it while the code's own
    /// offset lies in the executable one.
    pub fn vaddr_of_code_offset(&self, offset: u64) -> Option<u64> {
        self.0
            .iter()
            .filter(|s| offset >= s.offset && offset < s.offset + s.filesz.max(1))
            .max_by_key(|s| s.executable)
            .map(|s| s.vaddr + (offset - s.offset))
    }

    /// File offset of a link-time address (what a uprobe is attached at).
    pub fn offset_of_vaddr(&self, vaddr: u64) -> Option<u64> {
        self.segment_of(vaddr).and_then(|s| s.offset.checked_add(vaddr - s.vaddr))
    }

    /// Runtime address minus link-time address of the object mapped at
    /// `m` (a mapping of this file): 0 for a fixed-address executable.
    pub fn load_bias(&self, m: &Mapping) -> Option<u64> {
        Some(m.start.wrapping_sub(self.vaddr_of_offset(m.offset)?))
    }

    /// Up to `size` bytes of `data` (the whole file) from link-time
    /// address `vaddr`, cut at the end of the segment that holds it.
    pub fn bytes_at<'d>(&self, data: &'d [u8], vaddr: u64, size: u64) -> Option<&'d [u8]> {
        let s = self.segment_of(vaddr)?;
        let file = s.bytes(data)?;
        let start = (vaddr - s.vaddr) as usize;
        file.get(start..start.saturating_add(size as usize).min(file.len()))
    }

    /// A function's `size` bytes at `vaddr`, all of them or `None`.
    pub fn function_bytes<'d>(&self, data: &'d [u8], vaddr: u64, size: u64) -> Option<&'d [u8]> {
        self.bytes_at(data, vaddr, size).filter(|b| b.len() as u64 == size)
    }

    /// The code from `vaddr` to the end of the executable segment holding it.
    pub fn code_at<'d>(&self, data: &'d [u8], vaddr: u64) -> Option<&'d [u8]> {
        let s = self.0.iter().find(|s| s.executable && s.contains(vaddr))?;
        let file = s.bytes(data)?;
        file.get((vaddr - s.vaddr) as usize..)
    }

    fn segment_of(&self, vaddr: u64) -> Option<&Segment> {
        self.0.iter().find(|s| s.contains(vaddr))
    }
}

impl Segment {
    fn contains(&self, vaddr: u64) -> bool {
        vaddr >= self.vaddr && vaddr - self.vaddr < self.filesz
    }

    /// The segment's bytes in `data`; `None` when the header points past it.
    fn bytes<'d>(&self, data: &'d [u8]) -> Option<&'d [u8]> {
        let start = usize::try_from(self.offset).ok()?;
        data.get(start..start.checked_add(usize::try_from(self.filesz).ok()?)?)
    }
}

/// The libc a dynamically linked glibc program will map once its loader
/// runs: the one leaktrace's loader picked (same environment, which the
/// command inherits, same mount namespace). `None` for a static program or
/// another loader (musl). A program whose RPATH picks another libc maps
/// that one instead; it is probed when it appears.
pub fn libc_it_will_map(program: &Path) -> Option<PathBuf> {
    let data = std::fs::read(program).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let interp = file.section_by_name(".interp")?.data().ok()?;
    let interp = Path::new(std::str::from_utf8(interp).ok()?.trim_end_matches('\0'));
    if !interp.file_name()?.to_str()?.starts_with("ld-linux-x86-64") {
        return None;
    }
    let ours = MemoryMap::read(std::process::id()).ok()?;
    let libc = ours.mappings.iter().find(|m| m.executable && crate::stacks::syscall_sites::is_libc(&m.path))?;
    Some(libc.path.clone())
}

/// Load bias of process `pid`'s executable (whose segments are given),
/// from the first mapping of the file `/proc/PID/exe` names: 0 unless it
/// is position-independent.
pub fn exe_load_bias(pid: u32, segments: &Segments) -> Option<u64> {
    let exe = procfs::exe_path(pid)?;
    let map = MemoryMap::read(pid).ok()?;
    segments.load_bias(map.mappings.iter().find(|m| m.path == exe)?)
}

/// A global: `main.cache` at link-time address `addr`, `size` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSymbol {
    pub name: String,
    pub addr: u64,
    pub size: u64,
}

/// Every defined data symbol of the symbol table and the dynamic symbols,
/// sorted by address, one per address (the smallest).
pub fn data_symbols(file: &object::File) -> Vec<DataSymbol> {
    let mut symbols: Vec<(u64, u64, String)> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.kind() == SymbolKind::Data && s.address() != 0)
        .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
        .collect();
    symbols.sort();
    symbols.dedup_by_key(|s| s.0);
    symbols.into_iter().map(|(addr, size, name)| DataSymbol { name, addr, size }).collect()
}

/// Names a process's addresses by the global containing them, per mapped
/// object (read once, cached).
#[derive(Default)]
pub struct Globals {
    objects: HashMap<PathBuf, ObjectGlobals>,
}

#[derive(Default)]
struct ObjectGlobals {
    segments: Segments,
    symbols: Vec<DataSymbol>,
}

impl Globals {
    /// The global containing `addr` and how far into it; `None` for heap
    /// and stack addresses.
    pub fn containing(&mut self, pid: u32, memory: &MemoryMap, addr: u64) -> Option<(&DataSymbol, u64)> {
        // The mapping containing the address, or the object mapped just
        // below it (its .bss continues in anonymous memory).
        let i = memory.mappings.partition_point(|m| m.start <= addr);
        let m = memory.mappings.get(i.checked_sub(1)?)?;
        if addr >= m.end + (64 << 20) {
            return None;
        }
        let path = procfs::object_path(pid, m);
        let obj = self.objects.entry(path.clone()).or_insert_with(|| {
            let Ok(data) = std::fs::read(&path) else { return ObjectGlobals::default() };
            let Ok(file) = object::File::parse(&*data) else { return ObjectGlobals::default() };
            ObjectGlobals { segments: Segments::of(&file), symbols: data_symbols(&file) }
        });
        let vaddr = addr.wrapping_sub(obj.segments.load_bias(m)?);
        let j = obj.symbols.partition_point(|s| s.addr <= vaddr);
        let sym = obj.symbols.get(j.checked_sub(1)?)?;
        (vaddr < sym.addr + sym.size.max(1)).then(|| (sym, vaddr - sym.addr))
    }

    /// `hot_lock`, or `main.pool+0x8` inside a global larger than `whole`
    /// bytes (a global that small is named whole wherever the address is).
    pub fn name(&mut self, pid: u32, memory: &MemoryMap, addr: u64, whole: u64) -> Option<String> {
        let (sym, off) = self.containing(pid, memory, addr)?;
        Some(if off == 0 || sym.size <= whole { sym.name.clone() } else { format!("{}+{off:#x}", sym.name) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_globals_of_this_test_binary() {
        static PROBE: [u64; 16] = [1; 16];
        let pid = std::process::id();
        let memory = MemoryMap::read(pid).unwrap();
        let mut n = Globals::default();
        let name = n.name(pid, &memory, &PROBE as *const _ as u64 + 8, 64);
        assert!(name.as_deref().is_some_and(|s| s.contains("PROBE") && s.ends_with("+0x8")), "{name:?}");
        assert!(n.name(pid, &memory, &PROBE as *const _ as u64 + 8, 128).is_some_and(|s| !s.contains('+')));
        let heap = Box::new(5u64);
        assert_eq!(n.name(pid, &memory, &*heap as *const u64 as u64, 64), None);
    }

    /// This machine's libc: symbols by base name, bytes and offsets agree.
    #[test]
    fn system_libc_symbols_bytes_and_offsets() {
        let Ok(data) = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6") else { return };
        let file = object::File::parse(&*data).unwrap();
        let (addr, size) = find_text_symbol(&file, "connect").expect("connect");
        let segments = Segments::of(&file);
        let code = segments.function_bytes(&data, addr, size).unwrap();
        let off = segments.offset_of_vaddr(addr).unwrap();
        assert_eq!(&data[off as usize..off as usize + size as usize], code);
        assert_eq!(segments.vaddr_of_offset(off), Some(addr));
        assert!(segments.code_at(&data, addr).is_some_and(|c| c.len() as u64 >= size));
        assert_eq!(segments.bytes_at(&data, addr, 4), Some(&code[..4]));
        assert_eq!(segments.function_bytes(&data, addr, u64::MAX / 2), None);
    }
}
