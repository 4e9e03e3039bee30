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
        let t = Self {
            nfunc: word(0) as usize,
            text_start: if word(2) == 0 { text } else { word(2) },
            funcname: word(3) as usize,
            cu: word(4) as usize,
            filetab: word(5) as usize,
            pctab: word(6) as usize,
            functab: word(7) as usize,
            quantum: quantum.max(1),
            data,
        };
        if t.functab + (t.nfunc + 1) * 8 > t.data.len() {
            bail!(".gopclntab function table out of bounds");
        }
        Ok(t)
    }

    fn u32_at(&self, off: usize) -> Option<u32> {
        Some(u32::from_le_bytes(self.data.get(off..off + 4)?.try_into().ok()?))
    }

    fn cstr(&self, off: usize) -> Option<String> {
        let rest = self.data.get(off..)?;
        let end = rest.iter().position(|&b| b == 0)?;
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
        Some((self.text_start + u64::from(e), self.functab + f as usize))
    }

    /// End of the text the table covers.
    fn text_end(&self) -> u64 {
        self.text_start + u64::from(self.u32_at(self.functab + self.nfunc * 8).unwrap_or(0))
    }

    fn name_of(&self, func: usize) -> Option<String> {
        let name_off = self.u32_at(func + 4)? as usize;
        self.cstr(self.funcname + name_off)
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
        let pcfile = self.u32_at(func + 20)?;
        let pcln = self.u32_at(func + 24)?;
        let cu_off = self.u32_at(func + 32)? as usize;
        let line = self.pcvalue(pcln, entry, pc).and_then(|l| u32::try_from(l).ok());
        let file = self.pcvalue(pcfile, entry, pc).and_then(|f| {
            let idx = usize::try_from(f).ok()?;
            let off = self.u32_at(self.cu + (cu_off + idx) * 4)?;
            if off == u32::MAX {
                return None;
            }
            self.cstr(self.filetab + off as usize)
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
        let mut p = self.data.get(self.pctab + off as usize..)?;
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
            pc += pcdelta * self.quantum;
            val += delta;
            if target < pc {
                return Some(val);
            }
        }
    }
}
