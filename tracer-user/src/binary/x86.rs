//! x86-64 machine code, decoded with iced-x86: the stack-pointer walk over
//! every path of a function (where the return address is at each `syscall`
//! and `call`), which instructions the kernel's uprobe code emulates, and
//! the cheap probe place in a Go function's prologue.

use std::collections::HashSet;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpAccess, OpKind, Register};

/// Every instruction of `code` (its first byte at `ip`), one after another:
/// a linear sweep, sound where a function holds no data between its
/// instructions (Go's and gcc's code).
pub fn linear(code: &[u8], ip: u64) -> impl Iterator<Item = Instruction> + '_ {
    Decoder::with_ip(64, code, ip, DecoderOptions::NONE).into_iter()
}

/// The direct near `CALL` that returns to `ret` (a return address, such as
/// a goroutine's `gopc`): its address and its target, when `code` (the 5
/// bytes before `ret`) decodes as one; `None` otherwise (an indirect call,
/// or the bytes are something else).
pub fn direct_call_before(code: &[u8], ret: u64) -> Option<(u64, u64)> {
    let at = ret.checked_sub(code.len() as u64)?;
    let ins = linear(code, at).next()?;
    (ins.flow_control() == FlowControl::Call && ins.op0_kind() == OpKind::NearBranch64 && ins.next_ip() == ret && emulated(&ins))
        .then(|| (at, ins.near_branch_target()))
}

/// Whether an operand is an immediate (`sub $0x18,%rsp`).
pub fn is_imm(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Immediate8 | OpKind::Immediate8to32 | OpKind::Immediate8to64 | OpKind::Immediate32to64 | OpKind::Immediate32
    )
}

/// Whether an operand access writes (maybe only under a condition).
pub fn writes(a: OpAccess) -> bool {
    matches!(a, OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite)
}

/// Instructions the x86 uprobe code emulates instead of single-stepping
/// (~0.5 µs a hit against ~18 µs): `push reg`, `nop`, and near jumps,
/// conditional jumps and calls.
pub fn emulated(ins: &Instruction) -> bool {
    match ins.mnemonic() {
        Mnemonic::Push => ins.op0_kind() == OpKind::Register,
        Mnemonic::Nop => true,
        _ => matches!(
            (ins.flow_control(), ins.op0_kind()),
            (FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch | FlowControl::Call, OpKind::NearBranch64)
        ),
    }
}

/// Index of the 64-bit general-purpose register `r` is part of, in
/// iced-x86's order: rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8-r15.
pub fn gpr(r: Register) -> Option<usize> {
    let full = r.full_register();
    let i = (full as u32).checked_sub(Register::RAX as u32)? as usize;
    (i < 16 && full.is_gpr64()).then_some(i)
}

/// The 64-bit register with index `i` (as [`gpr`] counts).
pub fn gpr_name(i: usize) -> Register {
    Register::try_from(Register::RAX as usize + i).unwrap_or(Register::None)
}

/// The stack at an instruction, relative to the function's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpState {
    /// Bytes `sp` is below the entry's `sp`, where the return address is
    /// (negative on a path that popped more than it pushed).
    pub depth: i64,
    /// The `depth` at which the caller's `rbp` was pushed; 0: not saved.
    pub rbp_at: i64,
}

/// A `syscall` or a `call` the walk reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reached {
    Syscall { ip_after: u64 },
    /// `target`: a direct call's callee.
    Call { ip_after: u64, target: Option<u64> },
}

/// Follows every path from `entry`, tracking how far `sp` is below the
/// entry's and where `rbp` was saved, and calls `visit` at each `syscall`
/// and `call` reached; `visit` returns false to end the path there (a call
/// that never returns). Jumps are followed to wherever `code` has bytes
/// for (`code(addr)`: the bytes from `addr` on, `None` for a target not to
/// follow); a path that sets `sp` another way is abandoned rather than
/// guessed. At most `budget` instructions are decoded.
pub fn walk_sp<'c>(
    code: impl Fn(u64) -> Option<&'c [u8]>,
    entry: u64,
    mut budget: usize,
    mut visit: impl FnMut(Reached, SpState) -> bool,
) {
    let mut seen: HashSet<u64> = HashSet::new();
    let mut work = vec![(entry, SpState { depth: 0, rbp_at: 0 })];
    while let Some((start, state0)) = work.pop() {
        if seen.contains(&start) {
            continue;
        }
        let Some(bytes) = code(start) else { continue };
        let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
        let mut st = state0;
        while decoder.can_decode() && budget > 0 {
            budget -= 1;
            let ins = decoder.decode();
            if ins.is_invalid() || !seen.insert(ins.ip()) {
                break;
            }
            let writes_sp = ins.op0_kind() == OpKind::Register && ins.op0_register() == Register::RSP;
            let op0_rbp = ins.op0_kind() == OpKind::Register && ins.op0_register() == Register::RBP;
            match ins.mnemonic() {
                Mnemonic::Syscall => {
                    let go_on = visit(Reached::Syscall { ip_after: ins.next_ip() }, st);
                    if !go_on {
                        break;
                    }
                }
                Mnemonic::Push => {
                    st.depth += 8;
                    if op0_rbp && st.rbp_at == 0 {
                        st.rbp_at = st.depth;
                    }
                }
                Mnemonic::Pop if !writes_sp => {
                    if op0_rbp && st.depth == st.rbp_at {
                        st.rbp_at = 0;
                    }
                    st.depth -= 8;
                }
                Mnemonic::Sub if writes_sp && is_imm(ins.op1_kind()) => st.depth += ins.immediate(1) as i64,
                Mnemonic::Add if writes_sp && is_imm(ins.op1_kind()) => st.depth -= ins.immediate(1) as i64,
                Mnemonic::Call => {
                    let target = (ins.op0_kind() == OpKind::NearBranch64).then(|| ins.near_branch_target());
                    if !visit(Reached::Call { ip_after: ins.next_ip(), target }, st) {
                        break;
                    }
                }
                _ if writes_sp => break,
                _ => {}
            }
            match ins.flow_control() {
                FlowControl::ConditionalBranch => work.push((ins.near_branch_target(), st)),
                FlowControl::UnconditionalBranch => {
                    work.push((ins.near_branch_target(), st));
                    break;
                }
                FlowControl::Return | FlowControl::IndirectBranch | FlowControl::Exception | FlowControl::Interrupt => {
                    break
                }
                _ => {}
            }
        }
    }
}

/// The first emulated instruction of a Go function's prologue that every
/// call runs once with its arguments intact: `PUSHQ BP` (Go 1.21+), else the
/// stack check's conditional jump (Go 1.19's prologue pushes nothing).
/// `None` when neither comes before the stack pointer moves or control
/// leaves the straight line. A uprobe there costs ~0.5 µs, against ~17 µs
/// for the single-stepped `CMPQ SP, 16(R14)` at the symbol. Used by every
/// tracker that probes Go.
pub fn go_cheap_entry(code: &[u8], entry: u64) -> Option<u64> {
    let mut jcc = None;
    for ins in linear(code, entry).take(6) {
        if ins.mnemonic() == Mnemonic::Push && ins.op0_kind() == OpKind::Register && ins.op0_register() == Register::RBP {
            return Some(ins.ip());
        }
        if ins.flow_control() == FlowControl::ConditionalBranch {
            jcc.get_or_insert(ins.ip());
            continue;
        }
        // The stack check `CMPQ SP, 16(R14)` only reads SP.
        let compares = matches!(ins.mnemonic(), Mnemonic::Cmp | Mnemonic::Test);
        let writes_sp =
            !compares && ins.op_count() > 0 && ins.op0_kind() == OpKind::Register && ins.op0_register() == Register::RSP;
        if writes_sp || ins.flow_control() != FlowControl::Next {
            break;
        }
    }
    jcc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_call_a_return_address_comes_back_from() {
        // e8 rel32 at 0x401000: call 0x402000, returns to 0x401005.
        let call = [0xe8, 0xfb, 0x0f, 0x00, 0x00];
        assert_eq!(direct_call_before(&call, 0x401005), Some((0x401000, 0x402000)));
        // Indirect `call *%rax` (2 bytes) after 3 others: not a direct call.
        assert_eq!(direct_call_before(&[0x90, 0x90, 0x90, 0xff, 0xd0], 0x401005), None);
        assert_eq!(direct_call_before(&[0x48, 0x89, 0xc3, 0x90, 0x90], 0x401005), None);
    }

    fn within<'c>(code: &'c [u8], base: u64) -> impl Fn(u64) -> Option<&'c [u8]> {
        move |a| (base..base + code.len() as u64).contains(&a).then(|| &code[(a - base) as usize..])
    }

    #[test]
    fn walk_tracks_depth_rbp_and_calls() {
        // push rbp; push rbx; sub $8,%rsp; call +0; syscall; add $8,%rsp; pop rbx; pop rbp; ret
        let code: &[u8] = &[
            0x55, 0x53, 0x48, 0x83, 0xec, 0x08, 0xe8, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x83, 0xc4, 0x08, 0x5b, 0x5d,
            0xc3,
        ];
        let mut seen = Vec::new();
        walk_sp(within(code, 0x1000), 0x1000, usize::MAX, |r, st| {
            seen.push((r, st));
            true
        });
        let st = SpState { depth: 0x18, rbp_at: 8 };
        assert_eq!(
            seen,
            vec![
                (Reached::Call { ip_after: 0x100b, target: Some(0x100b) }, st),
                (Reached::Syscall { ip_after: 0x100d }, st),
            ]
        );
        // A call that does not return ends the path.
        let mut n = 0;
        walk_sp(within(code, 0x1000), 0x1000, usize::MAX, |_, _| {
            n += 1;
            false
        });
        assert_eq!(n, 1);
        // The budget bounds the instructions decoded.
        let mut n = 0;
        walk_sp(within(code, 0x1000), 0x1000, 4, |_, _| {
            n += 1;
            true
        });
        assert_eq!(n, 1);
    }

    #[test]
    fn go_prologue_choices() {
        // 1.21+: cmp 0x10(%r14),%rsp; jbe; push %rbp; mov %rsp,%rbp
        let new: &[u8] = &[0x49, 0x3b, 0x66, 0x10, 0x76, 0x20, 0x55, 0x48, 0x89, 0xe5];
        assert_eq!(go_cheap_entry(new, 0x100), Some(0x106));
        // 1.19: cmp; jbe; sub $0x28,%rsp; mov %rbp,0x20(%rsp)
        let old: &[u8] = &[0x49, 0x3b, 0x66, 0x10, 0x76, 0x20, 0x48, 0x83, 0xec, 0x28, 0x48, 0x89, 0x6c, 0x24, 0x20];
        assert_eq!(go_cheap_entry(old, 0x100), Some(0x104));
        // No stack check: nothing cheap before sp moves.
        assert_eq!(go_cheap_entry(&[0x48, 0x83, 0xec, 0x38], 0x100), None);
    }

    #[test]
    fn registers_in_iced_order() {
        assert_eq!(gpr(Register::EAX), Some(0));
        assert_eq!(gpr(Register::R15D), Some(15));
        assert_eq!(gpr(Register::XMM0), None);
        assert_eq!((0..16).map(gpr_name).filter_map(gpr).count(), 16);
        assert_eq!(gpr_name(7), Register::RDI);
    }
}
