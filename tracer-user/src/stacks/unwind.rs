//! Unwind rules for exact pcs, learned from each object's CFI and handed to
//! the kernel side's walker (`UNWIND_RULES` in `tracer-ebpf/src/stacks.rs`).
//!
//! Code built without frame pointers (Debian's libraries, `gcc -O2`,
//! `cargo build --release`) can only be unwound with the compiler's call
//! frame information (`.eh_frame`, else `.debug_frame`). A rule is a pure
//! function of the binary and the pc, so the kernel keeps one per pc it has
//! met: when a walk meets a pc without one it stops there and queues the pc
//! in `UNWIND_MISSES`; [`Unwinder::learn`] reads the queue, finds the object
//! mapped at each pc, asks gimli for the CFI row and inserts the rule; then
//! it steps through the copy of the stack the miss came with, by the same
//! rules, learning those of every caller on the path, and keeps the frames
//! it found ([`completed_frames`]) for the event's provisional key. So the
//! first events of a new call path get their whole stack too (as far as the
//! copy reaches), and later ones are walked whole in the kernel under a
//! hash of real return addresses; the judge merges the two by frames.
//!
//! Parsed CFI is cached per object (device, inode, size, mtime), built the
//! first time one of its pcs is met, and bounded ([`MAX_OBJECTS`]).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    sync::{Arc, OnceLock},
};

use anyhow::{Context, Result};
use aya::maps::{Array as BpfArray, HashMap as BpfHashMap, MapData};
use gimli::{
    BaseAddresses, CfaRule, DebugFrame, EhFrame, EhFrameHdr, EvaluationResult, FrameDescriptionEntry,
    LittleEndian, Location, RegisterRule, UnwindContext, UnwindSection, Value, X86_64,
};
use object::{Object, ObjectSection};
use tracer_common::stacks::{
    rule_kind, unwind_sync, CodeRange, MissSnapshot, UnwindRule, MAX_RULE_MAPPINGS, MAX_UNMAPPED, MAX_UNWIND_RULES,
    MAX_WALKED_FRAMES, PROVISIONAL_KEY, RULE_AT_PC,
};

use crate::{
    binary::{
        debug_file::{self, DebugLink},
        elf::Segments,
    },
    procfs::{self, Mapping, MemoryMap},
};

/// Objects whose parsed CFI is kept (the least recently added goes first).
pub const MAX_OBJECTS: usize = 256;

/// Provisional stacks finished from their miss's snapshot (a bound: a
/// provisional key only comes from the first events of a call path).
pub const MAX_COMPLETED: usize = 65536;

/// The frames found beyond the miss of each provisional stack key, shared
/// with the stack readers (`stacks::walked_stack`) that append them.
static COMPLETED: std::sync::Mutex<Option<HashMap<u64, Vec<u64>>>> = std::sync::Mutex::new(None);

/// The frames a provisional stack `key` continues with after its own
/// (`None`: not a provisional key, or not finished).
pub fn completed_frames(key: u64) -> Option<Vec<u64>> {
    if key & PROVISIONAL_KEY == 0 {
        return None;
    }
    COMPLETED.lock().ok()?.as_ref()?.get(&key).cloned()
}

/// Returns false when the bound is reached (the stack stays cut).
fn complete(key: u64, frames: Vec<u64>) -> bool {
    let Ok(mut m) = COMPLETED.lock() else { return false };
    let m = m.get_or_insert_with(HashMap::new);
    if m.len() >= MAX_COMPLETED {
        return false;
    }
    m.insert(key, frames);
    true
}

type Slice<'a> = gimli::EndianSlice<'a, LittleEndian>;

/// One CFI section, copied out of its file, at its link-time address.
struct Section {
    svma: u64,
    data: Vec<u8>,
}

/// The unwind information of one object: what a rule needs, and nothing
/// else of the file (a 50 MB binary keeps only its `.eh_frame*`).
pub struct ObjectCfi {
    eh_frame: Option<Section>,
    eh_frame_hdr: Option<Section>,
    debug_frame: Option<Section>,
    text_svma: u64,
    segments: Segments,
    /// Go binaries always keep frame pointers and carry no `.eh_frame`.
    frame_pointers: bool,
    /// Where a separate debug file may hold a `.debug_frame` (an object
    /// without one of its own), and that section once looked for: read the
    /// first time the object's own CFI has no row for a pc.
    debug_link: DebugLink,
    separate_debug_frame: OnceLock<Option<Section>>,
}

/// The frame-pointer step: `CFA = rbp + 16`, caller's rbp at `CFA - 16`.
const FP_RULE: UnwindRule = UnwindRule { kind: rule_kind::CFA_BP, cfa_offset: 16, rbp_offset: -16, _pad: 0 };
const END_RULE: UnwindRule = UnwindRule { kind: rule_kind::END, cfa_offset: 0, rbp_offset: 0, _pad: 0 };

impl ObjectCfi {
    /// Copies the CFI sections out of the ELF image of the object at `path`
    /// (as the target sees it; `root` prefixes paths looked up for it), and
    /// notes where its separate debug file may be.
    pub fn parse_at(data: &[u8], path: &std::path::Path, root: &str) -> Result<Self> {
        let mut cfi = Self::parse(data)?;
        if cfi.debug_frame.is_none() {
            cfi.debug_link = DebugLink::of(data, path, root);
        }
        Ok(cfi)
    }

    /// CFI from raw sections (`(link-time address, bytes)`), for an object
    /// without program headers: the fuzz target feeds it arbitrary bytes.
    pub fn from_sections(
        eh_frame: Option<(u64, Vec<u8>)>,
        eh_frame_hdr: Option<(u64, Vec<u8>)>,
        debug_frame: Option<(u64, Vec<u8>)>,
        text_svma: u64,
    ) -> Self {
        let section = |s: Option<(u64, Vec<u8>)>| s.map(|(svma, data)| Section { svma, data });
        Self {
            eh_frame: section(eh_frame),
            eh_frame_hdr: section(eh_frame_hdr),
            debug_frame: section(debug_frame),
            text_svma,
            segments: Segments::default(),
            frame_pointers: false,
            debug_link: DebugLink::default(),
            separate_debug_frame: OnceLock::new(),
        }
    }

    /// The start and length of every FDE of the `.eh_frame` (at most `max`),
    /// the addresses rules are asked for.
    pub fn fde_ranges(&self, max: usize) -> Vec<(u64, u64)> {
        let Some(eh) = &self.eh_frame else { return Vec::new() };
        let mut section = EhFrame::new(&eh.data, LittleEndian);
        section.set_address_size(8);
        let bases = BaseAddresses::default().set_eh_frame(eh.svma).set_text(self.text_svma);
        let mut entries = section.entries(&bases);
        let mut out = Vec::new();
        while let Ok(Some(e)) = entries.next() {
            if out.len() >= max {
                break;
            }
            if let gimli::CieOrFde::Fde(p) = e {
                if let Ok(fde) = p.parse(EhFrame::cie_from_offset) {
                    out.push((fde.initial_address(), fde.len()));
                }
            }
        }
        out
    }

    /// Copies the CFI sections out of an ELF image.
    pub fn parse(data: &[u8]) -> Result<Self> {
        let file = object::File::parse(data).context("not a valid ELF")?;
        let section = |name: &str| {
            let s = file.section_by_name(name)?;
            let bytes = s.uncompressed_data().ok()?;
            (!bytes.is_empty()).then(|| Section { svma: s.address(), data: bytes.into_owned() })
        };
        let text_svma = file.section_by_name(".text").map_or(0, |s| s.address());
        let frame_pointers = file.section_by_name(".gopclntab").is_some() || file.section_by_name(".go.buildinfo").is_some();
        Ok(Self {
            eh_frame: section(".eh_frame"),
            eh_frame_hdr: section(".eh_frame_hdr"),
            debug_frame: section(".debug_frame"),
            text_svma,
            segments: Segments::of(&file),
            frame_pointers,
            debug_link: DebugLink::default(),
            separate_debug_frame: OnceLock::new(),
        })
    }

    /// Bytes held for this object.
    pub fn size(&self) -> usize {
        let separate = self.separate_debug_frame.get().and_then(Option::as_ref);
        [self.eh_frame.as_ref(), self.eh_frame_hdr.as_ref(), self.debug_frame.as_ref(), separate]
            .into_iter()
            .flatten()
            .map(|s| s.data.len())
            .sum()
    }

    /// Whether the object has any CFI at all (its own, or in its separate
    /// debug file).
    pub fn has_cfi(&self) -> bool {
        self.eh_frame.is_some() || self.debug_frame.is_some() || self.separate_debug_frame().is_some()
    }

    /// The rule at link-time address `svma`: a return address (`at_return`,
    /// looked up inside the call, at `svma - 1`) or the pc a thread is at.
    pub fn rule(&self, svma: u64, at_return: bool) -> UnwindRule {
        if self.frame_pointers {
            return FP_RULE;
        }
        let addr = if at_return { svma.saturating_sub(1) } else { svma };
        if let Some(eh) = &self.eh_frame {
            let mut section = EhFrame::new(&eh.data, LittleEndian);
            section.set_address_size(8);
            let mut bases = BaseAddresses::default().set_eh_frame(eh.svma).set_text(self.text_svma);
            let mut fde = None;
            if let Some(hdr) = self.eh_frame_hdr.as_ref().filter(|h| hdr_table_fits(&h.data)) {
                bases = bases.set_eh_frame_hdr(hdr.svma);
                if let Ok(parsed) = EhFrameHdr::new(&hdr.data, LittleEndian).parse(&bases, 8) {
                    if let Some(table) = parsed.table() {
                        fde = Some(fde_from_table(&table, &parsed, &section, &bases, addr));
                    }
                }
            }
            let fde = fde.unwrap_or_else(|| section.fde_for_address(&bases, addr, EhFrame::cie_from_offset));
            if let Ok(fde) = fde {
                return rule_of_fde(&section, &bases, &fde, addr, svma);
            }
        }
        if let Some(rule) = self.debug_frame.as_ref().and_then(|df| self.debug_frame_rule(df, addr, svma)) {
            return rule;
        }
        if let Some(rule) = self.separate_debug_frame().and_then(|df| self.debug_frame_rule(df, addr, svma)) {
            return rule;
        }
        UnwindRule { kind: rule_kind::FP_GUESS, ..FP_RULE }
    }

    /// The rule at `addr` from a `.debug_frame` section, if it covers it.
    fn debug_frame_rule(&self, df: &Section, addr: u64, svma: u64) -> Option<UnwindRule> {
        let mut section = DebugFrame::new(&df.data, LittleEndian);
        section.set_address_size(8);
        let bases = BaseAddresses::default().set_text(self.text_svma);
        let fde = section.fde_for_address(&bases, addr, DebugFrame::cie_from_offset).ok()?;
        Some(rule_of_fde(&section, &bases, &fde, addr, svma))
    }

    /// The `.debug_frame` of the object's separate debug file, read once.
    fn separate_debug_frame(&self) -> Option<&Section> {
        self.separate_debug_frame
            .get_or_init(|| {
                let debug = self.debug_link.open()?;
                let (svma, data) = debug_file::debug_frame(&debug)?;
                Some(Section { svma, data })
            })
            .as_ref()
    }

    /// Whether a separate debug file's `.debug_frame` was read.
    pub fn uses_separate_debug_file(&self) -> bool {
        self.separate_debug_frame.get().is_some_and(Option::is_some)
    }

    /// Link-time address of runtime `pc` in mapping `m` of this object.
    pub fn svma_of(&self, m: &Mapping, pc: u64) -> Option<u64> {
        self.segments.vaddr_of_code_offset(pc - m.start + m.offset)
    }
}

/// Reads `data` as the `eh_frame` fuzz target's input and asks for a rule
/// at every FDE's start, middle and end and at a few addresses of the
/// input's choosing (the target, and the test that replays the inputs it
/// found crashing). Input: the `.eh_frame`, `.eh_frame_hdr` and `.text`
/// addresses (8 bytes LE each), the header's length (4), the
/// `.eh_frame_hdr` bytes, then the `.eh_frame` bytes (also read as a
/// `.debug_frame`).
#[doc(hidden)]
pub fn ask_rules_of_fuzz_input(data: &[u8]) {
    let u64_at = |at: usize| data.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let (Some(eh_svma), Some(hdr_svma), Some(text_svma)) = (u64_at(0), u64_at(8), u64_at(16)) else { return };
    let Some(hdr_len) = data.get(24..28).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize) else { return };
    let rest = &data[28..];
    let (hdr, eh) = rest.split_at(hdr_len.min(rest.len()));
    let cfi = ObjectCfi::from_sections(
        Some((eh_svma, eh.to_vec())),
        (!hdr.is_empty()).then(|| (hdr_svma, hdr.to_vec())),
        Some((0, eh.to_vec())),
        text_svma,
    );
    let mut at: Vec<u64> = Vec::new();
    for (start, len) in cfi.fde_ranges(256) {
        at.extend([start, start.wrapping_add(len / 2), start.wrapping_add(len).wrapping_sub(1), start.wrapping_add(len)]);
    }
    at.extend([0, 1, text_svma, eh_svma, u64::MAX]);
    for a in at {
        let _ = cfi.rule(a, false);
        let _ = cfi.rule(a, true);
    }
    let _ = cfi.size();
    let _ = cfi.has_cfi();
}

/// Whether `.eh_frame_hdr`'s table holds the rows its header claims
/// (gimli 0.34 multiplies a claimed count unchecked: a huge one overflowed;
/// found by the `eh_frame` fuzz target). A header that says otherwise, or
/// that this does not read, is not used: the FDEs are then searched in
/// `.eh_frame` itself.
fn hdr_table_fits(hdr: &[u8]) -> bool {
    // The size of a value in DW_EH_PE encoding `enc` (its low 4 bits).
    let size = |enc: u8| match enc & 0x0f {
        0x00 => Some(8usize), // absptr, 64-bit
        0x02 | 0x0a => Some(2),
        0x03 | 0x0b => Some(4),
        0x04 | 0x0c => Some(8),
        _ => None,
    };
    let [1, ptr_enc, count_enc, table_enc, ..] = *hdr else { return false };
    let (Some(ptr), Some(count_size), Some(entry)) = (size(ptr_enc), size(count_enc), size(table_enc)) else { return false };
    let Some(count) = hdr.get(4 + ptr..4 + ptr + count_size) else { return false };
    let count = count.iter().rev().fold(0u64, |v, b| v << 8 | u64::from(*b));
    let table = hdr.len() - (4 + ptr + count_size);
    count.checked_mul(2 * entry as u64).is_some_and(|bytes| bytes <= table as u64)
}

/// The FDE for `addr` through `.eh_frame_hdr`'s binary-search table, as
/// gimli's `EhHdrTable::fde_for_address` finds it, but with the table's
/// pointer checked against the section's start (gimli 0.34 subtracts
/// unchecked: a table pointing below `.eh_frame` overflowed; found by the
/// `eh_frame` fuzz target).
fn fde_from_table<'a>(
    table: &gimli::EhHdrTable<'_, Slice<'a>>,
    hdr: &gimli::ParsedEhFrameHdr<Slice<'a>>,
    section: &EhFrame<Slice<'a>>,
    bases: &BaseAddresses,
    addr: u64,
) -> gimli::Result<FrameDescriptionEntry<Slice<'a>>> {
    let ptr = table.lookup(addr, bases)?.direct()?;
    let start = hdr.eh_frame_ptr().direct()?;
    let offset = ptr.checked_sub(start).and_then(|o| usize::try_from(o).ok()).ok_or(gimli::Error::NoUnwindInfoForAddress)?;
    let fde = section.fde_from_offset(bases, gimli::EhFrameOffset(offset), EhFrame::cie_from_offset)?;
    if fde.contains(addr) {
        Ok(fde)
    } else {
        Err(gimli::Error::NoUnwindInfoForAddress)
    }
}

/// The rule of the CFI row for `addr` (`pc`: the address a PLT-style
/// expression sees as rip; only its low bits matter, which the load bias
/// keeps).
fn rule_of_fde<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    bases: &BaseAddresses,
    fde: &FrameDescriptionEntry<Slice<'a>>,
    addr: u64,
    pc: u64,
) -> UnwindRule {
    if fde.is_signal_trampoline() {
        return UnwindRule { kind: rule_kind::SIGNAL, ..END_RULE };
    }
    let mut ctx = UnwindContext::new();
    let Ok(row) = fde.unwind_info_for_address(section, bases, &mut ctx, addr) else { return END_RULE };
    match row.register(X86_64::RA) {
        Some(RegisterRule::Offset(-8)) => {}
        // Undefined: the outermost frame (`_start`, `clone3`).
        _ => return END_RULE,
    }
    let (kind, offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => (rule_kind::CFA_SP, *offset),
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => (rule_kind::CFA_BP, *offset),
        CfaRule::RegisterAndOffset { .. } => return END_RULE,
        CfaRule::Expression(e) => {
            // A PLT stub's CFA (rsp + 8 or 16 by rip's low bits): an
            // expression of rsp and rip alone, linear in rsp. Anything
            // reading memory (stack realignment) ends the stack there.
            let Ok(expr) = e.get(section) else { return END_RULE };
            let encoding = fde.cie().encoding();
            let eval_at = |rsp: u64| -> Option<u64> {
                let mut eval = expr.evaluation(encoding);
                let mut r = eval.evaluate().ok()?;
                loop {
                    match r {
                        EvaluationResult::Complete => break,
                        EvaluationResult::RequiresRegister { register, .. } => {
                            let v = match register {
                                X86_64::RSP => rsp,
                                X86_64::RA => pc,
                                _ => return None,
                            };
                            r = eval.resume_with_register(Value::Generic(v)).ok()?;
                        }
                        _ => return None,
                    }
                }
                match eval.as_result() {
                    [p] => match p.location {
                        Location::Address { address } => Some(address),
                        _ => None,
                    },
                    _ => None,
                }
            };
            const A: u64 = 0x10_0000;
            const B: u64 = 0x20_0000;
            match (eval_at(A), eval_at(B)) {
                (Some(a), Some(b)) if b.wrapping_sub(a) == B - A => (rule_kind::CFA_SP, a.wrapping_sub(A) as i64),
                _ => return END_RULE,
            }
        }
    };
    let Ok(cfa_offset) = i32::try_from(offset) else { return END_RULE };
    let rbp_offset = match row.register(X86_64::RBP) {
        Some(RegisterRule::Offset(o)) => i32::try_from(o).unwrap_or(0),
        _ => 0,
    };
    UnwindRule { kind, cfa_offset, rbp_offset, _pad: 0 }
}

/// Steps through a copy of a stack (`stack`, read from address `base`) by
/// unwind rules, as the kernel's walk does, from the frame of rule key
/// `key` (its registers `sp`, `bp`; `bp` 0 when unknown). `rule` gives the
/// rule of a key (`None`: none to be had, the walk stops). Returns the
/// return addresses found beyond the first frame and whether the walk
/// reached the stack's end (rather than the copy's or a missing rule).
pub fn walk_copy(
    mut key: u64,
    mut sp: u64,
    mut bp: u64,
    base: u64,
    stack: &[u8],
    mut rule: impl FnMut(u64) -> Option<UnwindRule>,
) -> (Vec<u64>, bool) {
    let read = |addr: u64| -> Option<u64> {
        let at = usize::try_from(addr.checked_sub(base)?).ok()?;
        Some(u64::from_le_bytes(stack.get(at..at + 8)?.try_into().ok()?))
    };
    let mut beyond = Vec::new();
    for _ in 0..MAX_WALKED_FRAMES {
        let Some(rule) = rule(key) else { return (beyond, false) };
        let next = match rule.kind {
            rule_kind::SIGNAL => {
                let m = sp + 40;
                match (read(m + 8 * 16), read(m + 8 * 15), read(m + 8 * 10)) {
                    (Some(ip), Some(nsp), Some(nbp)) => Some((ip | RULE_AT_PC, nsp, nbp)),
                    _ => None,
                }
            }
            rule_kind::CFA_SP | rule_kind::CFA_BP | rule_kind::FP_GUESS => {
                let base = if rule.kind == rule_kind::CFA_SP { sp } else { bp };
                let cfa = base.wrapping_add(rule.cfa_offset as i64 as u64);
                let nbp = if rule.rbp_offset != 0 { read(cfa.wrapping_add(rule.rbp_offset as i64 as u64)) } else { Some(bp) };
                match (read(cfa.wrapping_sub(8)), nbp) {
                    (Some(ret), Some(nbp)) if ret >= 4096 && cfa > sp => Some((ret, cfa, nbp)),
                    _ => None,
                }
            }
            _ => return (beyond, true),
        };
        let Some((k, s, b)) = next else { return (beyond, false) };
        beyond.push(k & !RULE_AT_PC);
        (key, sp, bp) = (k, s, b);
    }
    (beyond, false)
}

/// The parsed CFI of the objects one process maps, cached per object file
/// (device, inode, size, mtime) and bounded ([`MAX_OBJECTS`]).
pub struct CfiObjects {
    pid: u32,
    objects: HashMap<ObjectKey, Option<Arc<ObjectCfi>>>,
    /// Insertion order of `objects`, for the bound.
    order: Vec<ObjectKey>,
    warned_no_cfi: std::collections::HashSet<std::path::PathBuf>,
}

impl CfiObjects {
    pub fn new(pid: u32) -> Self {
        Self { pid, objects: HashMap::new(), order: Vec::new(), warned_no_cfi: Default::default() }
    }

    /// Objects cached.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Bytes of CFI kept (summed: a separate debug file's `.debug_frame`
    /// is read the first time a rule needs it).
    pub fn cfi_bytes(&self) -> usize {
        self.objects.values().flatten().map(|o| o.size()).sum()
    }

    /// The rule at `pc` in executable mapping `m`: a return address
    /// (`at_return`) or the pc a thread is at.
    pub fn rule_in(&mut self, m: &Mapping, pc: u64, at_return: bool) -> UnwindRule {
        let Some(obj) = self.object(m) else { return UnwindRule { kind: rule_kind::FP_GUESS, ..FP_RULE } };
        if !obj.has_cfi() && !obj.frame_pointers && self.warned_no_cfi.insert(m.path.clone()) {
            crate::output::note(format!(
                "{} has no unwind information: its frames are walked by frame pointers (counted)",
                m.path.display()
            ));
        }
        match obj.svma_of(m, pc) {
            Some(svma) => obj.rule(svma, at_return),
            None => END_RULE,
        }
    }

    /// The rule of a walk's key (an exact pc with [`RULE_AT_PC`], else a
    /// return address) in `memory`: anonymous or JIT code ends the stack.
    pub fn rule_of_key(&mut self, key: u64, memory: &MemoryMap) -> UnwindRule {
        let pc = key & !RULE_AT_PC;
        match memory.find(pc).filter(|m| m.executable).cloned() {
            Some(m) => self.rule_in(&m, pc, key & RULE_AT_PC == 0),
            None => END_RULE,
        }
    }

    /// The cached CFI of the object mapped at `m` (parsed on first use).
    fn object(&mut self, m: &Mapping) -> Option<Arc<ObjectCfi>> {
        let path = procfs::object_path(self.pid, m);
        let meta = std::fs::metadata(&path).ok()?;
        let key = ObjectKey { dev: meta.dev(), ino: meta.ino(), size: meta.size(), mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec() };
        if let Some(o) = self.objects.get(&key) {
            return o.clone();
        }
        let root = format!("/proc/{}/root", self.pid);
        let obj = map_file(&path).and_then(|data| ObjectCfi::parse_at(&data, &m.path, &root).ok()).map(Arc::new);
        if self.order.len() >= MAX_OBJECTS {
            let old = self.order.remove(0);
            self.objects.remove(&old);
        }
        self.order.push(key.clone());
        self.objects.insert(key, obj.clone());
        obj
    }
}

/// An object file as it is on disk (path + inode + mtime: a rebuilt or
/// replaced binary is another object).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ObjectKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
}

/// What the unwinder has done, for the report's notes and the benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnwindStats {
    /// Rules in the kernel table.
    pub rules: usize,
    /// Rules by kind: frame-pointer guesses (no CFI), stack ends.
    pub fp_guess_rules: usize,
    pub end_rules: usize,
    /// Objects whose CFI is cached, and the bytes it takes.
    pub objects: usize,
    pub cfi_bytes: usize,
    /// Whether the rule table filled (further misses stay misses).
    pub full: bool,
    /// Rules dropped because their code was unmapped (`dlclose`), and the
    /// times the kernel's walks were told the rules are current again.
    pub dropped: u64,
    pub resyncs: u64,
    /// Walks cut at a miss and finished here from their snapshot, and
    /// those of them whose snapshot ended before the stack did.
    pub finished: u64,
    pub unfinished: u64,
}

impl UnwindStats {
    /// One line for the session's closing notes.
    pub fn summary(&self) -> String {
        format!(
            "unwinding: {} rules learned ({} frame-pointer guesses, {} stack ends) from {} objects ({} KiB of CFI kept); \
             {} first walks of new call paths finished from their stack copy, {} of them cut short; \
             {} rules dropped with their unmapped code",
            self.rules,
            self.fp_guess_rules,
            self.end_rules,
            self.objects,
            self.cfi_bytes / 1024,
            self.finished,
            self.unfinished,
            self.dropped
        )
    }
}

/// Learns rules for the pcs the kernel side met without one.
pub struct Unwinder {
    pid: u32,
    rules: BpfHashMap<MapData, u64, UnwindRule>,
    misses: BpfHashMap<MapData, u64, MissSnapshot>,
    /// Keys already in `rules`.
    known: std::collections::HashSet<u64>,
    cfi: CfiObjects,
    pub stats: UnwindStats,
    /// The target's memory map as last read (not merged: a mapping gone is
    /// gone here), what rules are looked up in.
    current: MemoryMap,
    /// The mappings rules were learned in, with their rule keys (and
    /// kinds), mirrored into the kernel's `UNWIND_CODE`.
    rule_mappings: Vec<RuleMapping>,
    code: BpfArray<MapData, CodeRange>,
    sync: BpfArray<MapData, u64>,
    /// The kernel's ring of the target's last unmapped ranges.
    unmapped: BpfArray<MapData, CodeRange>,
}

/// A mapping rules were learned in: dropped with them when it is unmapped.
struct RuleMapping {
    start: u64,
    end: u64,
    inode: u64,
    keys: Vec<(u64, u32)>,
}

impl Unwinder {
    /// Takes the rule and miss maps out of the loaded object and watches
    /// the target's unmaps of code with rules.
    pub fn new(probes: &mut crate::probes::Probes, pid: u32) -> Result<Self> {
        probes.attach_tracepoints(&[
            ("unwind_munmap", "syscalls", "sys_enter_munmap"),
            ("unwind_munmap_exit", "syscalls", "sys_exit_munmap"),
            ("unwind_mmap_fixed", "syscalls", "sys_enter_mmap"),
            ("unwind_munmap_exit", "syscalls", "sys_exit_mmap"),
        ])?;
        Ok(Self {
            pid,
            rules: probes.take_map("UNWIND_RULES")?,
            misses: probes.take_map("UNWIND_MISSES")?,
            known: Default::default(),
            cfi: CfiObjects::new(pid),
            stats: UnwindStats::default(),
            current: MemoryMap::default(),
            rule_mappings: Vec::new(),
            code: probes.take_map("UNWIND_CODE")?,
            sync: probes.take_map("UNWIND_SYNC")?,
            unmapped: probes.take_map("UNMAPPED")?,
        })
    }

    /// After the target unmapped code that rules were learned in: reads its
    /// memory map, drops the rules of every mapping gone (or replaced), and
    /// tells the kernel's walks the rules are current as of the generation
    /// read first (an unmap meanwhile leaves them off until the next round).
    fn drop_unmapped(&mut self, memory: &mut MemoryMap) {
        let generation = self.sync.get(&unwind_sync::GENERATION, 0).unwrap_or(0);
        if self.sync.get(&unwind_sync::SYNCED, 0).unwrap_or(0) == generation {
            return;
        }
        let Ok(fresh) = MemoryMap::read(self.pid) else { return };
        memory.merge(&fresh);
        self.current = fresh;
        let dropped_before = self.stats.dropped;
        let current = &self.current;
        let (kept, gone): (Vec<RuleMapping>, Vec<RuleMapping>) = std::mem::take(&mut self.rule_mappings)
            .into_iter()
            .partition(|r| current.find(r.start).is_some_and(|m| (m.start, m.end, m.inode) == (r.start, r.end, r.inode)));
        self.rule_mappings = kept;
        for r in gone {
            for (key, kind) in r.keys {
                let _ = self.rules.remove(&key);
                self.known.remove(&key);
                self.forget_rule(kind);
                self.stats.dropped += 1;
            }
        }
        if self.stats.dropped > dropped_before {
            self.stats.full = false;
        }
        self.write_code_ranges();
        let _ = self.sync.set(unwind_sync::SYNCED, generation, 0);
        self.stats.resyncs += 1;
    }

    /// Mirrors `rule_mappings` into the kernel's `UNWIND_CODE`.
    fn write_code_ranges(&mut self) {
        for (i, r) in self.rule_mappings.iter().take(MAX_RULE_MAPPINGS as usize).enumerate() {
            let _ = self.code.set(i as u32, CodeRange { start: r.start, end: r.end }, 0);
        }
        let n = self.rule_mappings.len() as u64;
        let _ = self.sync.set(unwind_sync::CODE_ALL, u64::from(n > u64::from(MAX_RULE_MAPPINGS)), 0);
        let _ = self.sync.set(unwind_sync::CODE_COUNT, n.min(u64::from(MAX_RULE_MAPPINGS)), 0);
    }

    /// Records that the rule `key` (of `kind`) was learned in mapping `m`;
    /// a new mapping is watched by the kernel before its first rule goes in.
    fn note_rule_mapping(&mut self, m: Option<&Mapping>, key: u64, kind: u32) {
        let Some(m) = m else { return };
        if let Some(r) = self.rule_mappings.iter_mut().find(|r| (r.start, r.end, r.inode) == (m.start, m.end, m.inode)) {
            r.keys.push((key, kind));
            return;
        }
        self.rule_mappings.push(RuleMapping { start: m.start, end: m.end, inode: m.inode, keys: vec![(key, kind)] });
        self.write_code_ranges();
    }

    fn forget_rule(&mut self, kind: u32) {
        self.stats.rules = self.stats.rules.saturating_sub(1);
        match kind {
            rule_kind::FP_GUESS => self.stats.fp_guess_rules = self.stats.fp_guess_rules.saturating_sub(1),
            rule_kind::END => self.stats.end_rules = self.stats.end_rules.saturating_sub(1),
            _ => {}
        }
    }

    /// Learns the rules of every queued miss's call path; returns how many
    /// misses it took. `memory` is re-read once when a pc lies outside every
    /// known mapping (an object mapped since the last read).
    pub fn learn(&mut self, memory: &mut MemoryMap) -> usize {
        self.drop_unmapped(memory);
        let misses: Vec<(u64, MissSnapshot)> = self.misses.iter().filter_map(|e| e.ok()).collect();
        if misses.is_empty() {
            return 0;
        }
        // What is unmapped since each miss was taken (read before the map):
        // a pc of the copy in such a range may hold other code now.
        let unmaps_now = self.sync.get(&unwind_sync::UNMAPS, 0).unwrap_or(0);
        let ring: Vec<CodeRange> =
            (0..MAX_UNMAPPED).map(|i| self.unmapped.get(&i, 0).unwrap_or_default()).collect();
        // The map as it is now (a library loaded or replaced since the last read).
        if let Ok(fresh) = MemoryMap::read(self.pid) {
            memory.merge(&fresh);
            self.current = fresh;
        }
        let mut reread = true;
        let mut learned = 0;
        let taken = misses.len();
        for (provisional, snap) in misses {
            let _ = self.misses.remove(&provisional);
            let stack = &snap.stack[..(snap.len as usize).min(snap.stack.len())];
            // The newest of them when the ring went round since (an
            // allocator unmapping big blocks): cutting every such miss
            // would leave its stacks short for good.
            let since = unmaps_now.saturating_sub(snap.unmaps).min(u64::from(MAX_UNMAPPED));
            let unmapped_since: Vec<CodeRange> = (unmaps_now - since..unmaps_now)
                .map(|seq| ring[(seq % u64::from(MAX_UNMAPPED)) as usize])
                .collect();
            let (beyond, mut finished) = walk_copy(snap.rule_key, snap.sp, snap.bp, snap.sp, stack, |key| {
                let pc = key & !RULE_AT_PC;
                if unmapped_since.iter().any(|r| (r.start..r.end).contains(&pc)) {
                    // Its code was unmapped since: what is there now is not it.
                    return None;
                }
                let (rule, new) = self.learn_one(key, memory, &mut reread)?;
                learned += new as usize;
                Some(rule)
            });
            if beyond.len() + 1 >= MAX_WALKED_FRAMES {
                finished = true;
            }
            self.stats.finished += 1;
            // Not finished: the copy ended (a deep stack) or a read failed
            // first; or no room to keep what was found.
            if !complete(provisional, beyond) || !finished {
                self.stats.unfinished += 1;
            }
        }
        if learned > 0 {
            // Separate debug files are read as rules need them: sum again.
            self.stats.cfi_bytes = self.cfi.cfi_bytes();
        }
        taken
    }

    /// The rule for `key`, inserted in the kernel table when new (the flag
    /// says so); `None` when the table is full.
    fn learn_one(&mut self, key: u64, memory: &mut MemoryMap, reread: &mut bool) -> Option<(UnwindRule, bool)> {
        let pc = key & !RULE_AT_PC;
        if self.current.find(pc).is_none() && !*reread {
            *reread = true;
            if let Ok(fresh) = MemoryMap::read(self.pid) {
                memory.merge(&fresh);
                self.current = fresh;
            }
        }
        // Anonymous or JIT code, the vDSO: the stack ends cleanly.
        let mapping = self.current.find(pc).filter(|m| m.executable).cloned();
        let rule = self.cfi.rule_of_key(key, &self.current);
        self.stats.objects = self.cfi.len();
        self.stats.cfi_bytes = self.cfi.cfi_bytes();
        if self.known.contains(&key) {
            return Some((rule, false));
        }
        if self.stats.full {
            return None;
        }
        self.note_rule_mapping(mapping.as_ref(), key, rule.kind);
        if self.rules.insert(key, rule, 0).is_err() {
            self.stats.full = true;
            crate::output::warn(format!(
                "unwind rule table full ({MAX_UNWIND_RULES} pcs): new call paths are cut at their first unknown pc \
                 (counted in lost.truncated_stacks)"
            ));
            return None;
        }
        self.known.insert(key);
        self.stats.rules += 1;
        match rule.kind {
            rule_kind::FP_GUESS => self.stats.fp_guess_rules += 1,
            rule_kind::END => self.stats.end_rules += 1,
            _ => {}
        }
        Some((rule, true))
    }

    /// Forgets every rule (a new image after exec: the addresses mean
    /// something else now).
    pub fn clear(&mut self) {
        let keys: Vec<u64> = self.rules.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.rules.remove(&k);
        }
        self.known.clear();
        self.stats.rules = 0;
        self.stats.fp_guess_rules = 0;
        self.stats.end_rules = 0;
        self.stats.full = false;
        self.rule_mappings.clear();
        self.current = MemoryMap::default();
        self.write_code_ranges();
    }
}

/// The file at `path`, mapped read-only: only the pages of the sections
/// copied out are read.
fn map_file(path: &std::path::Path) -> Option<memmap2::Mmap> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: a read-only private mapping of an object the target has
    // mapped itself; the bytes are copied out at once and the map dropped.
    unsafe { memmap2::Mmap::map(&file) }.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stacks::syscall_sites;

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

    /// The `.eh_frame` rule at every syscall site the disassembly finds in
    /// this machine's libc says what the disassembly says: the return
    /// address at `sp + ret_offset` (CFA = rsp + ret_offset + 8). The
    /// unwinder replaces the syscall-site fix only because of this.
    #[test]
    fn eh_frame_agrees_with_syscall_site_disassembly() {
        let Ok(data) = std::fs::read(LIBC) else { return };
        let cfi = ObjectCfi::parse(&data).unwrap();
        let sites = syscall_sites::sites_in_elf(&data, syscall_sites::WRAPPERS).unwrap();
        assert!(sites.len() >= 3);
        for s in sites {
            let rule = cfi.rule(s.ip_after, false);
            assert_eq!(
                (rule.kind, rule.cfa_offset),
                (rule_kind::CFA_SP, s.ret_offset as i32 + 8),
                "site {:#x}",
                s.ip_after
            );
        }
    }

    /// glibc's signal trampoline is marked as one, `_start` ends the
    /// stack, and a function's first instruction has its return address at
    /// `[sp]`.
    #[test]
    fn libc_special_frames() {
        let Ok(data) = std::fs::read(LIBC) else { return };
        let cfi = ObjectCfi::parse(&data).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let sym = |n: &str| crate::binary::elf::find_text_symbol(&file, n).map(|(a, _)| a);
        // __restore_rt has no dynamic symbol; find it through sigaction's
        // neighbour-free marker: the FDE flagged `S`.
        if let Some(a) = sym("socket") {
            let r = cfi.rule(a, false);
            assert_eq!((r.kind, r.cfa_offset), (rule_kind::CFA_SP, 8));
        }
        let mut signal = 0;
        let mut section = EhFrame::new(&cfi.eh_frame.as_ref().unwrap().data, LittleEndian);
        section.set_address_size(8);
        let bases = BaseAddresses::default().set_eh_frame(cfi.eh_frame.as_ref().unwrap().svma).set_text(cfi.text_svma);
        let mut entries = section.entries(&bases);
        while let Ok(Some(e)) = entries.next() {
            if let gimli::CieOrFde::Fde(p) = e {
                if let Ok(fde) = p.parse(EhFrame::cie_from_offset) {
                    if fde.is_signal_trampoline() {
                        assert_eq!(cfi.rule(fde.initial_address() + 1, false).kind, rule_kind::SIGNAL);
                        signal += 1;
                    }
                }
            }
        }
        assert!(signal >= 1, "glibc's __restore_rt FDE is flagged as a signal frame");
    }

    /// The header of this machine's libc's `.eh_frame_hdr` is read right.
    #[test]
    fn libc_eh_frame_hdr_table_fits() {
        let Ok(data) = std::fs::read(LIBC) else { return };
        let cfi = ObjectCfi::parse(&data).unwrap();
        let hdr = &cfi.eh_frame_hdr.as_ref().unwrap().data;
        assert!(hdr_table_fits(hdr));
        // A count claiming more rows than there are bytes.
        let mut bad = hdr.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!hdr_table_fits(&bad));
    }

    /// Inputs the `eh_frame` fuzz target found crashing: now no rule.
    #[test]
    fn eh_frame_fuzz_crashes() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/eh_frame");
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            ask_rules_of_fuzz_input(&std::fs::read(e.path()).unwrap());
        }
    }

    /// A PLT stub's CFA expression becomes a plain rsp offset.
    #[test]
    fn plt_expression_is_an_rsp_offset() {
        let Ok(data) = std::fs::read(LIBC) else { return };
        let cfi = ObjectCfi::parse(&data).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let Some(plt) = file.section_by_name(".plt") else { return };
        // Entry 1 of the PLT: +0 pushes (CFA rsp+8), the jmp at +11 runs
        // after the push (CFA rsp+16).
        let e = plt.address() + 16;
        let at = |a| {
            let r = cfi.rule(a, false);
            (r.kind, r.cfa_offset)
        };
        assert_eq!(at(e), (rule_kind::CFA_SP, 8));
        assert_eq!(at(e + 11), (rule_kind::CFA_SP, 16));
    }

    /// What the first miss in a large object costs (`cargo test --release
    /// -p tracer-user --lib cfi_cost -- --ignored --nocapture`; figures in
    /// docs/performance.md): reading and copying its CFI, then one rule.
    #[test]
    #[ignore]
    fn cfi_cost() {
        let exe = std::env::args().next().unwrap();
        for path in [exe.as_str(), LIBC, "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"] {
            let Ok(meta) = std::fs::metadata(path) else { continue };
            let t = std::time::Instant::now();
            let cfi = ObjectCfi::parse(&map_file(std::path::Path::new(path)).unwrap()).unwrap();
            let parsed = t.elapsed();
            let data = std::fs::read(path).unwrap();
            let file = object::File::parse(&*data).unwrap();
            let text = file.section_by_name(".text").unwrap();
            let n = 2000u64;
            let t = std::time::Instant::now();
            let mut kinds = [0usize; 6];
            for i in 0..n {
                let r = cfi.rule(text.address() + i * (text.size() / n), true);
                kinds[r.kind as usize] += 1;
            }
            let per_rule = t.elapsed() / n as u32;
            println!(
                "{path}: {} MB, read+copy CFI {:?}, {} KiB kept, {:?} per rule, kinds {kinds:?}",
                meta.len() / 1_000_000,
                parsed,
                cfi.size() / 1024,
                per_rule
            );
        }
    }
}
