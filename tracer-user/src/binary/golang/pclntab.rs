//! A reader for Go's `.gopclntab` (Go 1.18+ layouts): function name and
//! file:line for a pc. The section is in every Go binary, `-s -w` builds
//! included, which have neither symtab nor DWARF for blazesym to read.
//! Inlined calls are not expanded (the outer function is named).

use anyhow::{bail, Result};

/// Magic of Go 1.18-1.19 tables.
pub const MAGIC_118: u32 = 0xfffffff0;
/// Magic of Go 1.20+ tables.
pub const MAGIC_120: u32 = 0xfffffff1;

/// A parsed table; owns the section's bytes.
pub struct Pclntab {
    data: Vec<u8>,
    nfunc: usize,
    text_start: u64,
    funcname: usize,
    cu: usize,
    filetab: usize,
    pctab: usize,
    functab: usize,
    quantum: u64,
}

/// What the table says about one pc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcInfo {
    pub function: String,
    /// Entry address of the function.
    pub entry: u64,
    pub file: Option<String>,
    pub line: Option<u32>,
}

impl Pclntab {
    /// Parses the section's contents. `text` is the address of `.text`:
    /// the header's own text start is left zero by some linkers (seen in
    /// Go 1.27 `-s -w` builds), and `runtime.text` is where `.text` begins.
    pub fn parse(data: Vec<u8>, text: u64) -> Result<Self> {
        if data.len() < 8 + 8 * 8 {
            bail!(".gopclntab too short");
        }
        let magic = u32::from_le_bytes(data[0..4].try_into().unwrap());
        if magic != MAGIC_118 && magic != MAGIC_120 {
            bail!(".gopclntab magic {magic:#x} is not Go 1.18+");
        }
        if data[7] != 8 {
            bail!(".gopclntab pointer size {} (only 64-bit is supported)", data[7]);
        }
        let quantum = u64::from(data[6]);
        let word = |i: usize| u64::from_le_bytes(data[8 + i * 8..16 + i * 8].try_into().unwrap());
        // Every count and offset is the file's word: each is checked
        // against the section's length before it is used, so that a
        // hostile table is refused here rather than sending a later loop
        // over 2^60 functions or an index past the data.
        let len = data.len() as u64;
        let offset = |i: usize, what: &str| -> Result<usize> {
            let v = word(i);
            if v > len {
                bail!(".gopclntab {what} offset {v:#x} is past the table's end ({len} bytes)");
            }
            Ok(v as usize)
        };
        let functab = offset(7, "function table")?;
        let nfunc = word(0);
        // The function table holds nfunc (entry, offset) pairs of 8 bytes
        // and the end-of-text entry.
        let room = (len - functab as u64) / 8;
        if nfunc >= room {
            bail!(".gopclntab claims {nfunc} functions; its function table has room for {}", room.saturating_sub(1));
        }
        let t = Self {
            nfunc: nfunc as usize,
            text_start: if word(2) == 0 { text } else { word(2) },
            funcname: offset(3, "function name")?,
            cu: offset(4, "compilation unit")?,
            filetab: offset(5, "file")?,
            pctab: offset(6, "pc")?,
            functab,
            quantum: quantum.max(1),
            data,
        };
        Ok(t)
    }

    fn u32_at(&self, off: usize) -> Option<u32> {
        Some(u32::from_le_bytes(self.data.get(off..off.checked_add(4)?)?.try_into().ok()?))
    }

    fn cstr(&self, off: usize) -> Option<String> {
        let rest = self.data.get(off..)?;
        // Names are short; a missing terminator must not make every
        // lookup copy the rest of the table.
        let end = rest.iter().take(4096).position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    /// Number of functions.
    pub fn len(&self) -> usize {
        self.nfunc
    }

    pub fn is_empty(&self) -> bool {
        self.nfunc == 0
    }

    /// (entry address, offset of the `_func`) of function `i`.
    fn func(&self, i: usize) -> Option<(u64, usize)> {
        let e = self.u32_at(self.functab + i * 8)?;
        let f = self.u32_at(self.functab + i * 8 + 4)?;
        Some((self.text_start.checked_add(u64::from(e))?, self.functab.checked_add(f as usize)?))
    }

    /// End of the text the table covers.
    fn text_end(&self) -> u64 {
        self.text_start.saturating_add(u64::from(self.u32_at(self.functab + self.nfunc * 8).unwrap_or(0)))
    }

    fn name_of(&self, func: usize) -> Option<String> {
        let name_off = self.u32_at(func.checked_add(4)?)? as usize;
        self.cstr(self.funcname.checked_add(name_off)?)
    }

    /// The function containing `pc` (link-time address): its index.
    fn find(&self, pc: u64) -> Option<usize> {
        if pc < self.text_start || pc >= self.text_end() || self.nfunc == 0 {
            return None;
        }
        let (mut lo, mut hi) = (0usize, self.nfunc);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if self.func(mid)?.0 <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }

    /// Function name and file:line of `pc` (a link-time address).
    pub fn lookup(&self, pc: u64) -> Option<PcInfo> {
        let (entry, func) = self.func(self.find(pc)?)?;
        let function = self.name_of(func)?;
        let pcfile = self.u32_at(func.checked_add(20)?)?;
        let pcln = self.u32_at(func.checked_add(24)?)?;
        let cu_off = self.u32_at(func.checked_add(32)?)? as usize;
        let line = self.pcvalue(pcln, entry, pc).and_then(|l| u32::try_from(l).ok());
        let file = self.pcvalue(pcfile, entry, pc).and_then(|f| {
            let idx = usize::try_from(f).ok()?;
            let off = self.u32_at(cu_off.checked_add(idx)?.checked_mul(4)?.checked_add(self.cu)?)?;
            if off == u32::MAX {
                return None;
            }
            self.cstr(self.filetab.checked_add(off as usize)?)
        });
        Some(PcInfo { function, entry, file, line })
    }

    /// Every function's (name, entry, end).
    pub fn functions(&self) -> impl Iterator<Item = (String, u64, u64)> + '_ {
        (0..self.nfunc).filter_map(move |i| {
            let (entry, func) = self.func(i)?;
            let end = if i + 1 < self.nfunc { self.func(i + 1)?.0 } else { self.text_end() };
            Some((self.name_of(func)?, entry, end))
        })
    }

    /// [entry, end) of the function named `name`.
    pub fn function_range(&self, name: &str) -> Option<(u64, u64)> {
        self.functions().find(|(n, _, _)| n == name).map(|(_, s, e)| (s, e))
    }

    /// Decodes a pc-value table (runtime.pcvalue): the value at `target`.
    fn pcvalue(&self, off: u32, entry: u64, target: u64) -> Option<i64> {
        if off == 0 {
            return None;
        }
        let mut p = self.data.get(self.pctab.checked_add(off as usize)?..)?;
        let mut pc = entry;
        let mut val: i64 = -1;
        let mut first = true;
        loop {
            let (uv, n) = super::buildinfo::uvarint(p)?;
            if uv == 0 && !first {
                return None;
            }
            first = false;
            p = p.get(n..)?;
            let delta = if uv & 1 != 0 { !((uv >> 1) as i64) } else { (uv >> 1) as i64 };
            let (pcdelta, n) = super::buildinfo::uvarint(p)?;
            p = p.get(n..)?;
            pc = pc.checked_add(pcdelta.checked_mul(self.quantum)?)?;
            val = val.checked_add(delta)?;
            if target < pc {
                return Some(val);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Go 1.20+ header with `nfunc` functions and the tables at `tables`.
    fn header(nfunc: u64, tables: u64, len: usize) -> Vec<u8> {
        let mut d = MAGIC_120.to_le_bytes().to_vec();
        d.extend([0, 0, 1, 8]);
        for w in [nfunc, 0, 0x401000, tables, tables, tables, tables, tables] {
            d.extend(w.to_le_bytes());
        }
        d.resize(len, 0);
        d
    }

    /// Finding 12: a function count whose table size wraps around
    /// (2^61 x 8 = 0 mod 2^64) once passed the bounds check and sent
    /// `functions()` round 2^61 times (`--track locks` hung past `--for`).
    #[test]
    fn hostile_function_counts_are_refused_with_a_reason() {
        for nfunc in [1u64 << 61, u64::MAX, (1 << 61) - 1, 1 << 40, 1000] {
            let err = Pclntab::parse(header(nfunc, 72, 1024), 0).err().map(|e| e.to_string());
            assert!(err.as_deref().is_some_and(|e| e.contains("functions; its function table has room for")), "{nfunc}: {err:?}");
        }
        let err = Pclntab::parse(header(1, u64::MAX - 3, 1024), 0).err().unwrap().to_string();
        assert!(err.contains("past the table's end"), "{err}");
        // What fits is read, and lookups of anything stay in bounds.
        let t = Pclntab::parse(header(100, 72, 1024), 0).unwrap();
        assert_eq!(t.len(), 100);
        assert!(t.functions().count() <= 100);
        for pc in [0, 0x401000, 0x401001, u64::MAX] {
            let _ = t.lookup(pc);
        }
    }
}
