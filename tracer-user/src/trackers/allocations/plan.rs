//! Where the allocation tracker's uprobes go in an allocator's code.
//!
//! A uprobe's cost depends on the instruction under it: the kernel emulates
//! `push reg`, branches, calls and nops (~0.5 µs a hit here) and
//! single-steps anything else (~18 µs: glibc's
//! `free` starts with `test %rdi,%rdi`). For each allocator entry point we
//! decode its first instructions (iced-x86) and take the first emulated one
//! that every call reaches with its argument registers and `sp` as at the
//! call: `sp` unchanged keeps the return address at `[sp]`, which the return
//! probe hijacks and the entry programs read. When no such instruction comes
//! first, the probe goes on the symbol itself (correct, but dear) and the
//! session says so.
//!
//! `malloc` is planned differently when [`results::plan`] understands its
//! code: no entry and no return probe, but a probe on the emulated branch
//! before each of its returns, where the block, the size and the caller are
//! all readable — one trap per call instead of three.

use std::{collections::HashSet, path::Path};

use anyhow::{Context, Result};
use iced_x86::{FlowControl, InstructionInfoFactory, Mnemonic, OpKind, Register};

use super::results;
use crate::binary::{
    elf::{find_text_symbol, Segments},
    x86::{emulated, is_imm, linear, writes},
};

/// One allocator entry point: which program, where (file offset), and
/// whether the return probe goes there too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocProbe {
    /// Symbol, without the prefix (`malloc`).
    pub function: String,
    /// Entry program in the eBPF object.
    pub program: &'static str,
    /// Offset of the probed instruction in the ELF file.
    pub file_offset: u64,
    /// Bytes from the symbol to the probed instruction.
    pub delta: u64,
    /// The probed instruction is one the kernel emulates.
    pub cheap: bool,
    /// `alloc_return` is attached at the same place.
    pub returns: bool,
    /// The probe's cookie: for `operator new`, how far `sp` is below the
    /// entry's at the probed instruction (its program reads the return
    /// address at `[sp + depth]`); for `malloc`'s result and size points,
    /// where everything is (`tracer_common::allocations::point`).
    pub cookie: Option<u64>,
}

/// An entry point: name without prefix, program, argument registers the
/// program reads, needs the return probe.
struct Entry {
    name: &'static str,
    program: &'static str,
    args: &'static [Register],
    returns: bool,
    /// Left out when no cheap offset exists (glibc's `reallocarray`
    /// multiplies its arguments, then tail-calls `realloc`, which is probed).
    optional: bool,
}

const fn e(name: &'static str, program: &'static str, args: &'static [Register], returns: bool) -> Entry {
    Entry { name, program, args, returns, optional: false }
}

use Register::{RDI, RDX, RSI};

/// The malloc family, in the order addresses are claimed (aliases share
/// an address: `aligned_alloc` is `memalign` in glibc).
const ENTRIES: &[Entry] = &[
    e("malloc", "alloc_malloc", &[RDI], true),
    e("free", "alloc_free", &[RDI], false),
    e("calloc", "alloc_calloc", &[RDI, RSI], true),
    e("realloc", "alloc_realloc", &[RDI, RSI], true),
    Entry { name: "reallocarray", program: "alloc_reallocarray", args: &[RDI, RSI, RDX], returns: true, optional: true },
    e("posix_memalign", "alloc_posix_memalign", &[RDI, RSI, RDX], true),
    e("aligned_alloc", "alloc_memalign", &[RDI, RSI], true),
    e("memalign", "alloc_memalign", &[RDI, RSI], true),
    e("valloc", "alloc_malloc", &[RDI], true),
    e("pvalloc", "alloc_pvalloc", &[RDI], true),
];

/// C++ `operator new` and `new[]`, plain, nothrow, aligned (mangled).
pub const OPERATOR_NEW: &[&str] = &[
    "_Znwm",
    "_Znam",
    "_ZnwmRKSt9nothrow_t",
    "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t",
    "_ZnamSt11align_val_t",
    "_ZnwmSt11align_val_tRKSt9nothrow_t",
    "_ZnamSt11align_val_tRKSt9nothrow_t",
];

/// Instructions decoded at most when looking for the probe's place.
const MAX_PREFIX: usize = 6;

/// The malloc family's probes in one ELF file (a libc, a static binary, a
/// custom allocator), names with `prefix` (`je_`); empty when it has no `malloc`.
pub fn allocator_probes(data: &[u8], prefix: &str) -> Result<Vec<AllocProbe>> {
    let file = object::File::parse(data).context("not a valid ELF")?;
    if crate::binary::golang::is_go(&file) {
        // Return probes move a goroutine's return address; Go's stack
        // growth and traceback would then crash the program.
        anyhow::bail!("a Go program: leaktrace never puts return probes in Go code");
    }
    if find_text_symbol(&file, &format!("{prefix}malloc")).is_none() {
        return Ok(Vec::new());
    }
    let segments = Segments::of(&file);
    let mut out = Vec::new();
    let mut claimed = HashSet::new();
    for entry in ENTRIES {
        let Some((addr, size)) = find_text_symbol(&file, &format!("{prefix}{}", entry.name)) else { continue };
        if !claimed.insert(addr) {
            continue;
        }
        if entry.name == "malloc" {
            if let Some(points) = result_probes(&segments, data, entry.name, addr, size) {
                out.extend(points);
                continue;
            }
        }
        let Some(code) = segments.bytes_at(data, addr, size.clamp(1, 64)) else { continue };
        let (delta, cheap) = match probe_delta(code, addr, entry.args, false) {
            Some((d, _)) => (d, true),
            None if entry.optional => continue,
            None => (0, false),
        };
        let Some(file_offset) = segments.offset_of_vaddr(addr + delta) else { continue };
        out.push(AllocProbe {
            function: entry.name.to_string(),
            program: entry.program,
            file_offset,
            delta,
            cheap,
            returns: entry.returns,
            cookie: None,
        });
    }
    Ok(out)
}

/// `operator new` probes in one ELF file (libstdc++, or a static C++ binary).
pub fn operator_new_probes(data: &[u8]) -> Result<Vec<AllocProbe>> {
    let file = object::File::parse(data).context("not a valid ELF")?;
    let segments = Segments::of(&file);
    let mut out = Vec::new();
    let mut claimed = HashSet::new();
    for name in OPERATOR_NEW {
        let Some((addr, size)) = find_text_symbol(&file, name) else { continue };
        if !claimed.insert(addr) {
            continue;
        }
        let Some(code) = segments.bytes_at(data, addr, size.clamp(1, 64)) else { continue };
        let (delta, sp_depth, cheap) = probe_delta(code, addr, &[], true).map_or((0, 0, false), |(d, depth)| (d, depth, true));
        let Some(file_offset) = segments.offset_of_vaddr(addr + delta) else { continue };
        let cookie = (sp_depth > 0).then_some(u64::from(sp_depth));
        out.push(AllocProbe { function: name.to_string(), program: "alloc_new", file_offset, delta, cheap, returns: false, cookie });
    }
    Ok(out)
}

/// `malloc`'s result and size points (see [`results`]), as probes; `None`
/// when its code was not understood (then it gets entry and return probes).
fn result_probes(segments: &Segments, data: &[u8], name: &str, addr: u64, size: u64) -> Option<Vec<AllocProbe>> {
    use tracer_common::allocations::point;
    if size == 0 {
        return None;
    }
    let code = segments.function_bytes(data, addr, size)?;
    let plan = results::plan(code, addr)?;
    let when = |w: results::When| match w {
        results::When::Always => 0,
        results::When::Branch { cc, taken } => {
            point::BRANCH | (cc as u64 - 1) | if taken { 0 } else { point::NOT_TAKEN }
        }
    };
    let mut out = Vec::new();
    let mut push = |program: &'static str, at: u64, cookie: u64| -> Option<()> {
        out.push(AllocProbe {
            function: name.to_string(),
            program,
            file_offset: segments.offset_of_vaddr(at)?,
            delta: at - addr,
            cheap: true,
            returns: false,
            cookie: Some(cookie),
        });
        Some(())
    };
    // Size points first: probes are attached in this order, and a result
    // point attached before its size point would meet calls that passed
    // the size point unprobed (each counted as a lost call).
    for p in &plan.sizes {
        push("alloc_size", p.addr, point::pack(when(p.when), p.ret_slot.into(), 0, loc_code(p.size)?, 0))?;
    }
    for p in &plan.results {
        let size = p.size.map_or(Some(point::PENDING), loc_code)?;
        let cookie = point::pack(when(p.when), p.ret_slot.into(), loc_code(p.result)?, size, loc_code(p.caller_bp)?);
        push("alloc_result", p.addr, cookie)?;
    }
    Some(out)
}

/// A location as the point cookies encode it.
fn loc_code(loc: results::Loc) -> Option<u64> {
    use tracer_common::allocations::point::{reg, STACK};
    Some(match loc {
        results::Loc::Stack(off) if off < 0x1000 => STACK | u64::from(off),
        results::Loc::Stack(_) => return None,
        results::Loc::Reg(r) => match r {
            Register::R15 => reg::R15,
            Register::R14 => reg::R14,
            Register::R13 => reg::R13,
            Register::R12 => reg::R12,
            Register::RBP => reg::RBP,
            Register::RBX => reg::RBX,
            Register::R11 => reg::R11,
            Register::R10 => reg::R10,
            Register::R9 => reg::R9,
            Register::R8 => reg::R8,
            Register::RAX => reg::RAX,
            Register::RCX => reg::RCX,
            Register::RDX => reg::RDX,
            Register::RSI => reg::RSI,
            Register::RDI => reg::RDI,
            _ => return None,
        },
    })
}

/// Reads an ELF file and plans its probes.
pub fn probes_in_file(path: &Path, prefix: &str, with_new: bool) -> Result<Vec<AllocProbe>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = allocator_probes(&data, prefix)?;
    if with_new {
        out.extend(operator_new_probes(&data)?);
    }
    Ok(out)
}

/// Bytes from the entry to the first instruction the kernel emulates, when
/// every instruction before it falls through without writing any of `args`
/// or `sp` — except, with `allow_depth`, `sub $imm,%rsp` (then the second
/// value says how far `sp` moved).
pub fn probe_delta(code: &[u8], entry: u64, args: &[Register], allow_depth: bool) -> Option<(u64, u32)> {
    let mut info = InstructionInfoFactory::new();
    let mut depth = 0u32;
    for ins in linear(code, entry).take(MAX_PREFIX) {
        if ins.is_invalid() {
            return None;
        }
        if emulated(&ins) {
            // Code that wraps past 2^64 is no function.
            return Some((ins.ip().checked_sub(entry)?, depth));
        }
        if ins.flow_control() != FlowControl::Next {
            return None;
        }
        if allow_depth
            && ins.mnemonic() == Mnemonic::Sub
            && ins.op0_kind() == OpKind::Register
            && ins.op0_register() == Register::RSP
            && is_imm(ins.op1_kind())
        {
            depth = depth.checked_add(u32::try_from(ins.immediate(1)).ok()?)?;
            continue;
        }
        let writes = info.info(&ins).used_registers().iter().any(|u| {
            let written = writes(u.access());
            let full = u.register().full_register();
            written && (full == Register::RSP || args.contains(&full))
        });
        if writes {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `cargo xtask fuzz` (x86_code): a prefix that wraps past
    /// 2^64 before the emulated instruction underflowed the offset.
    #[test]
    fn a_prefix_that_wraps_the_address_space_has_no_probe_place() {
        let mut code = vec![0x0f, 0xba, 0xe4, 0x55];
        code.extend([0x71; 41]);
        assert_eq!(probe_delta(&code, u64::MAX, &[Register::RDI], true), None);
    }

    /// glibc 2.36's `free`: `test %rdi,%rdi` (single-stepped) then `je`.
    #[test]
    fn free_probe_skips_the_test() {
        let code = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55];
        assert_eq!(probe_delta(&code, 0x1000, &[RDI], false), Some((3, 0)));
    }

    /// `malloc` starts with `push %r12`: probed on the symbol.
    #[test]
    fn push_first_is_probed_at_zero() {
        assert_eq!(probe_delta(&[0x41, 0x54, 0x55], 0x1000, &[RDI], false), Some((0, 0)));
    }

    /// glibc's `reallocarray`: `mov %rsi,%rax; mul %rdx; mov %rax,%rsi; jo`:
    /// the arguments change before the first emulated instruction.
    #[test]
    fn argument_writes_stop_the_search() {
        let code = [0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2, 0x48, 0x89, 0xc6, 0x70, 0x05];
        assert_eq!(probe_delta(&code, 0x1000, &[RDI, RSI, RDX], false), None);
        // `sub $8,%rsp` first: the return address moved.
        assert_eq!(probe_delta(&[0x48, 0x83, 0xec, 0x08, 0x55], 0x1000, &[], false), None);
        // ... unless the program is told how far (nothrow `operator new`:
        // endbr64; sub $8,%rsp; call).
        let nothrow = [0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xec, 0x08, 0xe8, 0x00, 0x00, 0x00, 0x00];
        assert_eq!(probe_delta(&nothrow, 0x1000, &[], true), Some((8, 8)));
        // `cmpb $0,x(%rip)` then `push %r12` (posix_memalign).
        assert_eq!(probe_delta(&[0x80, 0x3d, 0x01, 0x02, 0x14, 0x00, 0x00, 0x41, 0x54], 0x1000, &[RDI], false), Some((7, 0)));
    }

    /// On this machine's libc every malloc-family probe is cheap, and free
    /// is probed after its test.
    #[test]
    fn system_libc_probes_are_cheap() {
        let Ok(data) = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6") else { return };
        let probes = allocator_probes(&data, "").unwrap();
        let free = probes.iter().find(|p| p.function == "free").expect("free");
        assert!(free.cheap && free.delta > 0, "{free:?}");
        // malloc: result points (no entry or return probe), the tcache
        // path's among them.
        let malloc: Vec<&AllocProbe> = probes.iter().filter(|p| p.function == "malloc").collect();
        assert!(malloc.iter().all(|p| !p.returns && p.cookie.is_some()), "{malloc:?}");
        assert!(malloc.iter().any(|p| p.program == "alloc_result" && p.delta == 0x157), "{malloc:?}");
        assert!(malloc.iter().any(|p| p.program == "alloc_size"), "{malloc:?}");
        assert!(probes.iter().all(|p| p.cheap), "{probes:?}");
        assert!(allocator_probes(&data, "je_").unwrap().is_empty());
    }

    /// A Go binary is refused, whatever prefix is asked for.
    #[test]
    fn go_programs_are_refused() {
        let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/bin/connleak-go");
        let Ok(data) = std::fs::read(bin) else { return };
        let err = allocator_probes(&data, "runtime.").unwrap_err();
        assert!(err.to_string().contains("Go program"), "{err}");
    }

    /// Every `operator new` of this machine's libstdc++ gets a cheap probe.
    #[test]
    fn system_operator_new_probes_are_cheap() {
        let Ok(data) = std::fs::read("/lib/x86_64-linux-gnu/libstdc++.so.6") else { return };
        let probes = operator_new_probes(&data).unwrap();
        assert!(probes.iter().any(|p| p.function == "_Znwm"), "{probes:?}");
        assert!(probes.iter().all(|p| p.cheap), "{probes:?}");
    }
}
