//! A HotSpot JVM's description of itself, read from outside: libjvm exports
//! `gHotSpotVMStructs`, `gHotSpotVMTypes` and `gHotSpotVMIntConstants`
//! (every HotSpot build does: the Serviceability Agent reads them), tables
//! of field offsets, static field addresses and type sizes by name. Read
//! once per JVM through the target's memory; nothing is hard-coded but the
//! names, and a name this JVM lacks is a one-line error.
//! Also where libjvm's TLS holds the current `Thread*` (`Thread::_thr_current`):
//! the module id from the live GOT of its TLS relocations, the offset by
//! matching the candidates against a known thread.

use std::{collections::HashMap, path::PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use object::{Object, ObjectSymbol};

use crate::{
    binary::{elf::Segments, golang::memory::TargetMemory},
    procfs::{self, MemoryMap},
};

/// libjvm as mapped by one process.
pub struct Libjvm {
    pub path: PathBuf,
    /// Load bias (runtime address of link-time address 0).
    pub bias: u64,
    /// Runtime addresses of the exported `gHotSpot*` symbols.
    symbols: HashMap<String, u64>,
    /// Runtime addresses of the GOT pairs of libjvm's TLS relocations
    /// (module id, offset).
    tls_got: Vec<u64>,
}

/// Whether the process maps a libjvm (a HotSpot JVM, or another VM built
/// on HotSpot's layout of files).
pub fn libjvm_mapping(memory: &MemoryMap) -> Option<&procfs::Mapping> {
    memory.mappings.iter().find(|m| m.path.file_name().is_some_and(|n| n == "libjvm.so"))
}

impl Libjvm {
    /// Reads libjvm's symbols and TLS relocations.
    pub fn open(pid: u32, memory: &MemoryMap) -> Result<Option<Self>> {
        let Some(m) = libjvm_mapping(memory) else { return Ok(None) };
        let path = procfs::object_path(pid, m);
        let data = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let file = object::File::parse(&*data).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let bias = Segments::of(&file).load_bias(m).ok_or_else(|| anyhow!("{}: cannot find its load address", path.display()))?;
        let symbols: HashMap<String, u64> = file
            .dynamic_symbols()
            .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
            .filter(|(n, a)| n.starts_with("gHotSpot") && *a != 0)
            .map(|(n, a)| (n, a.wrapping_add(bias)))
            .collect();
        if !symbols.contains_key("gHotSpotVMStructs") {
            bail!("{} exports no gHotSpotVMStructs: not a HotSpot JVM", m.path.display());
        }
        const R_X86_64_DTPMOD64: u32 = 16;
        let tls_got = file
            .dynamic_relocations()
            .into_iter()
            .flatten()
            .filter(|(_, r)| matches!(r.flags(), object::RelocationFlags::Elf { r_type } if r_type == R_X86_64_DTPMOD64))
            .map(|(off, _)| off.wrapping_add(bias))
            .collect();
        Ok(Some(Self { path: m.path.clone(), bias, symbols, tls_got }))
    }

    fn symbol(&self, mem: &TargetMemory, name: &str) -> Result<u64> {
        let at = *self.symbols.get(name).ok_or_else(|| anyhow!("libjvm exports no {name}"))?;
        mem.read_u64(at).ok_or_else(|| anyhow!("cannot read {name}"))
    }

    /// The (module id, offset) pairs of libjvm's TLS relocations, from the
    /// live GOT (the dynamic loader filled them).
    pub fn tls_candidates(&self, mem: &TargetMemory) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> =
            self.tls_got.iter().filter_map(|&slot| Some((mem.read_u64(slot)?, mem.read_u64(slot + 8)?))).filter(|p| p.0 != 0).collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The VMStructs tables of one JVM.
#[derive(Debug, Default)]
pub struct VmStructs {
    /// (type, field) -> offset (instance fields) or address (static fields).
    fields: HashMap<(String, String), u64>,
    /// type -> size.
    sizes: HashMap<String, u64>,
}

/// Reads a NUL-terminated string of the target (at most 256 bytes).
pub fn read_cstr(mem: &TargetMemory, addr: u64) -> Option<String> {
    if addr == 0 {
        return None;
    }
    let mut out = Vec::new();
    for chunk in 0..8u64 {
        let at = addr + chunk * 32;
        // The last bytes of a mapping: fall back to smaller reads.
        let bytes = mem.read_region(at, 32).or_else(|| {
            let mut b = Vec::new();
            for i in 0..32 {
                let mut one = [0u8];
                if mem.read(at + i, &mut one).is_err() {
                    break;
                }
                b.push(one[0]);
                if one[0] == 0 {
                    break;
                }
            }
            (!b.is_empty()).then_some(b)
        })?;
        if let Some(end) = bytes.iter().position(|&b| b == 0) {
            out.extend_from_slice(&bytes[..end]);
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&bytes);
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Entries read per table at most (JDK 17 has under 1000 fields).
const MAX_ENTRIES: usize = 20_000;

impl VmStructs {
    pub fn read(mem: &TargetMemory, jvm: &Libjvm) -> Result<Self> {
        let g = |n: &str| jvm.symbol(mem, n);
        let mut out = VmStructs::default();
        // Fields: type name, field name, is static, offset, address.
        let (mut at, stride) = (g("gHotSpotVMStructs")?, g("gHotSpotVMStructEntryArrayStride")?);
        let (o_type, o_field) = (g("gHotSpotVMStructEntryTypeNameOffset")?, g("gHotSpotVMStructEntryFieldNameOffset")?);
        let (o_static, o_offset, o_addr) =
            (g("gHotSpotVMStructEntryIsStaticOffset")?, g("gHotSpotVMStructEntryOffsetOffset")?, g("gHotSpotVMStructEntryAddressOffset")?);
        if at == 0 || !(8..=256).contains(&stride) {
            bail!("VMStructs not initialised yet");
        }
        for _ in 0..MAX_ENTRIES {
            let e = mem.read_region(at, stride as usize).ok_or_else(|| anyhow!("cannot read VMStructs at {at:#x}"))?;
            let word = |o: u64| e.get(o as usize..o as usize + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
            let type_name = word(o_type);
            if type_name == 0 {
                break;
            }
            let is_static = e.get(o_static as usize..o_static as usize + 4).is_some_and(|b| b != [0; 4]);
            if let (Some(t), Some(f)) = (read_cstr(mem, type_name), read_cstr(mem, word(o_field))) {
                out.fields.insert((t, f), if is_static { word(o_addr) } else { word(o_offset) });
            }
            at += stride;
        }
        let (mut at, stride) = (g("gHotSpotVMTypes")?, g("gHotSpotVMTypeEntryArrayStride")?);
        let (o_type, o_size) = (g("gHotSpotVMTypeEntryTypeNameOffset")?, g("gHotSpotVMTypeEntrySizeOffset")?);
        if at == 0 || !(8..=256).contains(&stride) {
            bail!("VMTypes not initialised yet");
        }
        for _ in 0..MAX_ENTRIES {
            let e = mem.read_region(at, stride as usize).ok_or_else(|| anyhow!("cannot read VMTypes at {at:#x}"))?;
            let word = |o: u64| e.get(o as usize..o as usize + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
            let type_name = word(o_type);
            if type_name == 0 {
                break;
            }
            if let Some(t) = read_cstr(mem, type_name) {
                out.sizes.insert(t, word(o_size));
            }
            at += stride;
        }
        Ok(out)
    }

    /// The offset (or static address) of `ty::name`, looking in each of
    /// `types` in turn (a field moved between classes across versions).
    pub fn field(&self, types: &[&str], name: &str) -> Result<u64> {
        types
            .iter()
            .find_map(|t| self.fields.get(&(t.to_string(), name.to_string())).copied())
            .ok_or_else(|| anyhow!("missing VMStructs field {}::{name}", types[0]))
    }

    pub fn has_field(&self, ty: &str, name: &str) -> bool {
        self.fields.contains_key(&(ty.to_string(), name.to_string()))
    }

    /// `sizeof(ty)`.
    pub fn size(&self, ty: &str) -> Result<u64> {
        self.sizes.get(ty).copied().ok_or_else(|| anyhow!("missing VMStructs type {ty}"))
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }
}
