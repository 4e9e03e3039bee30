//! Where `malloc`'s result can be read without a return probe.
//!
//! The classic way to learn the block a `malloc` call returned is an entry
//! probe (size, stack) plus a return probe (address): two traps per call on
//! top of `free`'s, and the return probe's trampoline is a third. Here the
//! allocator's own code is analysed instead (iced-x86 decoding, a small
//! abstract interpretation of its registers and stack slots) to find, on
//! every path that returns a block, the last branch before the return: a
//! `jcc`/`jmp` the kernel emulates, where the block's address is already in
//! a register and nothing after it changes it. A probe there ("result
//! point") sees the address, the requested size (still in the register or
//! stack slot that saved `rdi`), the return address (at a known distance
//! above `sp`) and the caller's frame pointer — everything the entry and
//! return probes gave, in one trap. glibc 2.36: the tcache path returns
//! after `malloc+0x157` (`jne` to the corruption check), so a `malloc` that
//! hits the tcache costs one emulated trap.
//!
//! A result point on a conditional branch counts only when the branch goes
//! the way that leads to the return (the probe evaluates the condition from
//! the saved flags). Paths on which the size is gone by the time the result
//! is known (glibc's single-thread path moves `rbx` over it) get a "size
//! point" earlier on the same path, on an emulated instruction that
//! dominates the result point, which stores the size for it.
//!
//! One assumption is gcc's layout rather than a proof: a call followed by
//! padding (`nop`, `int3`, `ud2`) does not return (`malloc_printerr`,
//! `__malloc_assert`); the tests check the plan for this machine's glibc,
//! dynamic and static, against exact block and byte counts on every path.
//!
//! Every step is checked: branch targets on instruction boundaries, no
//! indirect jumps, no tail calls, `sp` known everywhere it is needed, every
//! value-returning path covered. When anything does not hold, no plan is
//! made and the caller falls back to entry and return probes.

use std::collections::{BTreeMap, HashMap, VecDeque};

use iced_x86::{
    ConditionCode, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
    Register,
};

use crate::binary::x86::{emulated, gpr, gpr_name, is_imm, linear, writes};

/// Where a value is at the probed instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// A general-purpose register (64-bit name).
    Reg(Register),
    /// The stack, this many bytes above `sp`.
    Stack(u32),
}

/// When a probe on a conditional branch counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// Every time (unconditional jump, `push`, `nop`, call).
    Always,
    /// When the branch is taken (`true`) / not taken (`false`).
    Branch { cc: ConditionCode, taken: bool },
}

/// A probe that reads `malloc`'s result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultPoint {
    /// Address of the probed instruction (ELF virtual address).
    pub addr: u64,
    pub when: When,
    /// The block's address.
    pub result: Loc,
    /// The requested size; `None`: a size point stored it.
    pub size: Option<Loc>,
    /// The caller's frame pointer (what `rbp` was at the call).
    pub caller_bp: Loc,
    /// Bytes from `sp` to the return address.
    pub ret_slot: u32,
}

/// A probe that stores the size for a later result point of the same call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizePoint {
    pub addr: u64,
    pub when: When,
    pub size: Loc,
    pub ret_slot: u32,
}

/// The probes that replace `malloc`'s entry and return probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResultPlan {
    pub results: Vec<ResultPoint>,
    pub sizes: Vec<SizePoint>,
}

/// Largest distance from `sp` a probe can be told about (cookie fields).
const MAX_SLOT: i64 = 1023;
/// Functions longer than this are not analysed.
const MAX_INSTRUCTIONS: usize = 4000;

/// An abstract value: what the program put in a register or stack slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Val {
    Unknown,
    /// The value a register had at the function's entry.
    Entry(Register),
    Zero,
}

/// Registers and stack slots before an instruction. `sp` and slot keys are
/// bytes from the entry's `sp` (where the return address is).
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    sp: Option<i64>,
    regs: [Val; 16],
    slots: BTreeMap<i64, Val>,
}

const CALLER_SAVED: [Register; 9] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

impl State {
    fn entry() -> Self {
        let mut regs = [Val::Unknown; 16];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = Val::Entry(gpr_name(i));
        }
        State { sp: Some(0), regs, slots: BTreeMap::new() }
    }

    fn get(&self, r: Register) -> Val {
        gpr(r).map_or(Val::Unknown, |i| self.regs[i])
    }

    fn set(&mut self, r: Register, v: Val) {
        if let Some(i) = gpr(r) {
            self.regs[i] = v;
        }
    }

    fn slot(&self, off: Option<i64>) -> Val {
        off.and_then(|o| self.slots.get(&o).copied()).unwrap_or(Val::Unknown)
    }

    /// Forgets every slot overlapping `[at, at + len)`.
    fn clobber(&mut self, at: i64, len: i64) {
        self.slots.retain(|&o, _| o + 8 <= at || o >= at + len);
    }

    /// Where `v` is: a register (preferring `prefer`) or a slot at or above `sp`.
    fn find(&self, v: Val, prefer: Register, escaped: bool) -> Option<Loc> {
        if self.get(prefer) == v {
            return Some(Loc::Reg(prefer));
        }
        if let Some(i) = (0..16).find(|&i| i != 4 && self.regs[i] == v) {
            return Some(Loc::Reg(gpr_name(i)));
        }
        if escaped {
            return None;
        }
        let sp = self.sp?;
        self.slots.iter().find(|&(&o, &s)| s == v && o >= sp).and_then(|(&o, _)| to_slot(o - sp))
    }

    /// The merge of two paths' states; whether `self` changed.
    fn join(&mut self, other: &State) -> bool {
        let before = self.clone();
        if self.sp != other.sp {
            self.sp = None;
        }
        for i in 0..16 {
            if self.regs[i] != other.regs[i] {
                self.regs[i] = Val::Unknown;
            }
        }
        self.slots.retain(|o, v| other.slots.get(o) == Some(v));
        *self != before
    }
}

fn to_slot(off: i64) -> Option<Loc> {
    (0..=MAX_SLOT).contains(&off).then(|| Loc::Stack(off as u32))
}

/// One decoded function with its control flow.
struct Function {
    ins: Vec<Instruction>,
    index: HashMap<u64, usize>,
    /// Successors (instruction indices) of each instruction.
    succ: Vec<Vec<usize>>,
    /// An `lea` of a stack address or a copy of `sp`: stack slots may be
    /// written through pointers, so none is trusted to keep a value.
    escaped: bool,
}

impl Function {
    fn decode(code: &[u8], start: u64) -> Option<Function> {
        let mut ins = Vec::new();
        for i in linear(code, start) {
            if i.is_invalid() || ins.len() >= MAX_INSTRUCTIONS {
                return None;
            }
            ins.push(i);
        }
        let index: HashMap<u64, usize> = ins.iter().enumerate().map(|(n, i)| (i.ip(), n)).collect();
        // Code that would wrap around the address space is no function.
        let end = start.checked_add(code.len() as u64)?;
        let mut succ = Vec::with_capacity(ins.len());
        let mut escaped = false;
        for (n, i) in ins.iter().enumerate() {
            let next = (n + 1 < ins.len()).then_some(n + 1);
            let target = || -> Option<Option<usize>> {
                let t = i.near_branch_target();
                if t >= start && t < end {
                    // Inside the function: must be an instruction boundary.
                    index.get(&t).map(|&x| Some(x))
                } else {
                    Some(None)
                }
            };
            let s: Vec<usize> = match i.flow_control() {
                FlowControl::Next => next.into_iter().collect(),
                FlowControl::ConditionalBranch => {
                    if i.op0_kind() != OpKind::NearBranch64 {
                        return None;
                    }
                    // A conditional jump out of the function (conditional tail call).
                    let t = target()??;
                    std::iter::once(t).chain(next).collect()
                }
                FlowControl::UnconditionalBranch => {
                    if i.op0_kind() != OpKind::NearBranch64 {
                        return None;
                    }
                    vec![target()??]
                }
                FlowControl::Return => Vec::new(),
                FlowControl::Call | FlowControl::IndirectCall => {
                    // gcc pads after a call that never returns (abort,
                    // malloc_printerr) when a jump target follows.
                    let noreturn = next.map_or(true, |x| {
                        matches!(ins[x].mnemonic(), Mnemonic::Nop | Mnemonic::Int3 | Mnemonic::Ud2)
                    });
                    if noreturn {
                        Vec::new()
                    } else {
                        next.into_iter().collect()
                    }
                }
                FlowControl::Interrupt | FlowControl::Exception => {
                    if i.mnemonic() == Mnemonic::Int3 || i.mnemonic() == Mnemonic::Ud2 {
                        Vec::new()
                    } else {
                        return None;
                    }
                }
                _ => return None,
            };
            if (i.mnemonic() == Mnemonic::Lea && i.memory_base() == Register::RSP)
                || (i.mnemonic() == Mnemonic::Mov && i.op1_kind() == OpKind::Register && i.op1_register() == Register::RSP)
            {
                escaped = true;
            }
            succ.push(s);
        }
        Some(Function { ins, index, succ, escaped })
    }

    /// The state after instruction `n`.
    fn step(&self, n: usize, st: &State, info: &mut InstructionInfoFactory) -> State {
        let i = &self.ins[n];
        let mut out = st.clone();
        let reg0 = (i.op_count() > 0 && i.op0_kind() == OpKind::Register).then(|| i.op0_register());
        let reg1 = (i.op_count() > 1 && i.op1_kind() == OpKind::Register).then(|| i.op1_register());
        let rsp_mem = |i: &Instruction, st: &State| -> Option<i64> {
            (i.memory_base() == Register::RSP && i.memory_index() == Register::None)
                .then(|| st.sp.map(|sp| sp + i.memory_displacement64() as i64))
                .flatten()
        };
        match i.mnemonic() {
            Mnemonic::Push => {
                let v = reg0.filter(|r| r.is_gpr64()).map_or(Val::Unknown, |r| st.get(r));
                out.sp = st.sp.map(|s| s - 8);
                if let Some(s) = out.sp {
                    out.clobber(s, 8);
                    out.slots.insert(s, v);
                }
                return out;
            }
            Mnemonic::Pop if reg0.is_some_and(|r| r.is_gpr64() && r != Register::RSP) => {
                out.set(reg0.unwrap(), st.slot(st.sp));
                out.sp = st.sp.map(|s| s + 8);
                return out;
            }
            Mnemonic::Add | Mnemonic::Sub
                if reg0 == Some(Register::RSP) && is_imm(i.op1_kind()) =>
            {
                let imm = i.immediate(1) as i64;
                out.sp = st.sp.map(|s| if i.mnemonic() == Mnemonic::Add { s + imm } else { s - imm });
                if let Some(s) = out.sp {
                    // Below the new sp is dead (signal frames may use it).
                    out.slots.retain(|&o, _| o >= s);
                }
                return out;
            }
            Mnemonic::Mov if reg0.is_some_and(|r| r.is_gpr64()) && reg1.is_some_and(|r| r.is_gpr64() && r != Register::RSP) => {
                out.set(reg0.unwrap(), st.get(reg1.unwrap()));
                return out;
            }
            Mnemonic::Mov if reg0.is_some_and(|r| r.is_gpr64()) && i.op1_kind() == OpKind::Memory && rsp_mem(i, st).is_some() => {
                out.set(reg0.unwrap(), st.slot(rsp_mem(i, st)));
                return out;
            }
            Mnemonic::Mov if i.op0_kind() == OpKind::Memory && reg1.is_some_and(|r| r.is_gpr64()) && rsp_mem(i, st).is_some() => {
                let at = rsp_mem(i, st).unwrap();
                out.clobber(at, 8);
                out.slots.insert(at, st.get(reg1.unwrap()));
                return out;
            }
            Mnemonic::Xor | Mnemonic::Sub if reg0.is_some() && reg0 == reg1 && reg0.unwrap().is_gpr() => {
                out.set(reg0.unwrap(), Val::Zero);
                return out;
            }
            Mnemonic::Call => {
                for r in CALLER_SAVED {
                    out.set(r, Val::Unknown);
                }
                return out;
            }
            _ => {}
        }
        let zero_imm = i.mnemonic() == Mnemonic::Mov
            && matches!(i.op1_kind(), OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64)
            && i.immediate(1) == 0;
        let used = info.info(i);
        for u in used.used_registers() {
            let written = writes(u.access());
            if !written {
                continue;
            }
            let full = u.register().full_register();
            if full == Register::RSP {
                out.sp = None;
                out.slots.clear();
            } else if zero_imm && u.access() == OpAccess::Write && u.register().is_gpr32() | u.register().is_gpr64() {
                out.set(full, Val::Zero);
            } else {
                out.set(full, Val::Unknown);
            }
        }
        for m in used.used_memory() {
            let written = writes(m.access());
            if !written || m.base() != Register::RSP {
                continue;
            }
            match (m.index(), st.sp) {
                (Register::None, Some(sp)) => out.clobber(sp + m.displacement() as i64, 16),
                _ => out.slots.clear(),
            }
        }
        out
    }

    /// Each instruction's state on entry (None: unreachable).
    fn states(&self) -> Vec<Option<State>> {
        let mut info = InstructionInfoFactory::new();
        let mut states: Vec<Option<State>> = vec![None; self.ins.len()];
        if self.ins.is_empty() {
            return states;
        }
        states[0] = Some(State::entry());
        let mut work = VecDeque::from([0usize]);
        let mut queued = vec![false; self.ins.len()];
        queued[0] = true;
        while let Some(n) = work.pop_front() {
            queued[n] = false;
            let Some(st) = states[n].clone() else { continue };
            let out = self.step(n, &st, &mut info);
            for &s in &self.succ[n] {
                let changed = match &mut states[s] {
                    Some(old) => old.join(&out),
                    slot @ None => {
                        *slot = Some(out.clone());
                        true
                    }
                };
                if changed && !queued[s] {
                    queued[s] = true;
                    work.push_back(s);
                }
            }
        }
        states
    }

    fn preds(&self) -> Vec<Vec<usize>> {
        let mut p = vec![Vec::new(); self.ins.len()];
        for (n, s) in self.succ.iter().enumerate() {
            for &x in s {
                p[x].push(n);
            }
        }
        p
    }
}

/// Where the returned value is before each instruction of a tail (`None`:
/// the tail returns zero from there back).
type Tail = Vec<(usize, Option<TailLoc>)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TailLoc {
    Reg(Register),
    /// A stack slot, in entry-relative bytes.
    Slot(i64),
}

/// The straight run of non-emulated instructions that ends at the `ret` at
/// `r`, with where the returned value is before each of them; `None` when
/// the value is computed in a way not followed.
fn tail(f: &Function, states: &[Option<State>], r: usize) -> Option<Tail> {
    let mut start = r;
    while start > 0 {
        let p = &f.ins[start - 1];
        if p.flow_control() != FlowControl::Next || emulated(p) {
            break;
        }
        start -= 1;
    }
    let mut loc = Some(TailLoc::Reg(Register::RAX));
    let mut out = vec![(r, loc)];
    for n in (start..r).rev() {
        let i = &f.ins[n];
        let st = states[n].as_ref()?;
        if let Some(l) = loc {
            loc = back_through(i, st, l)?;
        }
        out.push((n, loc));
    }
    out.reverse();
    Some(out)
}

/// Where the value that is at `l` after `i` was before it (`Some(None)`:
/// `i` zeroes it).
fn back_through(i: &Instruction, st: &State, l: TailLoc) -> Option<Option<TailLoc>> {
    let mut info = InstructionInfoFactory::new();
    let used = info.info(i);
    let reg0 = (i.op_count() > 0 && i.op0_kind() == OpKind::Register).then(|| i.op0_register());
    let reg1 = (i.op_count() > 1 && i.op1_kind() == OpKind::Register).then(|| i.op1_register());
    match l {
        TailLoc::Reg(r) => {
            let writes = used.used_registers().iter().any(|u| {
                u.register().full_register() == r
                    && writes(u.access())
            });
            if !writes {
                return Some(Some(l));
            }
            match i.mnemonic() {
                Mnemonic::Mov if reg0 == Some(r) && reg1.is_some_and(|x| x.is_gpr64() && x != Register::RSP) => {
                    Some(Some(TailLoc::Reg(reg1.unwrap())))
                }
                Mnemonic::Xor | Mnemonic::Sub if reg0.is_some_and(|x| x.full_register() == r) && reg0 == reg1 => Some(None),
                Mnemonic::Mov
                    if reg0.is_some_and(|x| x.full_register() == r)
                        && matches!(i.op1_kind(), OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64)
                        && i.immediate(1) == 0 =>
                {
                    Some(None)
                }
                Mnemonic::Pop if reg0 == Some(r) => Some(Some(TailLoc::Slot(st.sp?))),
                Mnemonic::Mov
                    if reg0 == Some(r)
                        && i.op1_kind() == OpKind::Memory
                        && i.memory_base() == Register::RSP
                        && i.memory_index() == Register::None =>
                {
                    Some(Some(TailLoc::Slot(st.sp? + i.memory_displacement64() as i64)))
                }
                _ => None,
            }
        }
        TailLoc::Slot(o) => {
            let sp = st.sp?;
            match i.mnemonic() {
                Mnemonic::Push if sp - 8 == o => reg0.filter(|r| r.is_gpr64()).map(|r| Some(TailLoc::Reg(r))),
                _ => {
                    let hits = used.used_memory().iter().any(|m| {
                        writes(m.access())
                            && (m.base() != Register::RSP
                                || m.index() != Register::None
                                || (sp + m.displacement() as i64 - o).abs() < 8)
                    });
                    let moves_sp = i.mnemonic() == Mnemonic::Push;
                    if hits && !moves_sp {
                        None
                    } else {
                        Some(Some(l))
                    }
                }
            }
        }
    }
}

const CALLEE_SAVED: [Register; 6] = [Register::RBX, Register::RBP, Register::R12, Register::R13, Register::R14, Register::R15];

/// The result and size points of the function at `start` whose code is
/// `code`, for a function whose size argument is in `rdi` (`malloc`).
/// `None` when any path cannot be covered.
pub fn plan(code: &[u8], start: u64) -> Option<ResultPlan> {
    let f = Function::decode(code, start)?;
    let states = f.states();
    let mut results = Vec::new();
    let mut returns = 0;
    for r in 0..f.ins.len() {
        if f.ins[r].flow_control() != FlowControl::Return || states[r].is_none() {
            continue;
        }
        returns += 1;
        let t = tail(&f, &states, r)?;
        let first = t[0].0;
        // Every way into the tail: jumps to any of its instructions, and
        // the fall-through into its first one.
        for (n, succ) in f.succ.iter().enumerate() {
            let Some(st) = states[n].as_ref() else { continue };
            for &s in succ {
                let Some(&(_, loc)) = t.iter().find(|(x, _)| *x == s) else { continue };
                let src = &f.ins[n];
                let fallthrough = s == n + 1 && src.flow_control() != FlowControl::UnconditionalBranch && !(src.flow_control() == FlowControl::ConditionalBranch && src.near_branch_target() == f.ins[s].ip());
                if fallthrough && s != first {
                    // Inside the tail.
                    continue;
                }
                let Some(loc) = loc else { continue };
                let value = match loc {
                    TailLoc::Reg(r) => st.get(r),
                    TailLoc::Slot(o) => st.slot(Some(o)),
                };
                if value == Val::Zero {
                    continue;
                }
                let when = match src.flow_control() {
                    FlowControl::ConditionalBranch => Some(When::Branch { cc: src.condition_code(), taken: !fallthrough }),
                    FlowControl::UnconditionalBranch => Some(When::Always),
                    FlowControl::Call if emulated(src) => {
                        // The probe fires before the call: only a value the
                        // call keeps can be read there.
                        match loc {
                            TailLoc::Reg(r) if CALLEE_SAVED.contains(&r) => Some(When::Always),
                            TailLoc::Slot(_) => Some(When::Always),
                            _ => None,
                        }
                    }
                    FlowControl::Next if emulated(src) && matches!(loc, TailLoc::Reg(_)) => Some(When::Always),
                    _ => None,
                };
                let when = when?;
                let sp = st.sp?;
                let result = match loc {
                    TailLoc::Reg(r) => Loc::Reg(r),
                    TailLoc::Slot(o) => {
                        if f.escaped {
                            return None;
                        }
                        to_slot(o - sp)?
                    }
                };
                let size = st.find(Val::Entry(Register::RDI), Register::RDI, f.escaped);
                let caller_bp = st.find(Val::Entry(Register::RBP), Register::RBP, f.escaped)?;
                let ret_slot = u32::try_from(-sp).ok().filter(|&s| i64::from(s) <= MAX_SLOT)?;
                results.push((n, ResultPoint { addr: src.ip(), when, result, size, caller_bp, ret_slot }));
            }
        }
    }
    if returns == 0 || results.is_empty() {
        return None;
    }
    let sizes = size_points(&f, &states, &results)?;
    let mut out = ResultPlan { results: results.into_iter().map(|(_, p)| p).collect(), sizes };
    out.results.sort_by_key(|p| p.addr);
    out.results.dedup();
    Some(out)
}

/// For each result point without the size: the nearest emulated
/// instruction that dominates it and still has the size.
fn size_points(f: &Function, states: &[Option<State>], results: &[(usize, ResultPoint)]) -> Option<Vec<SizePoint>> {
    let lacking: Vec<usize> = results.iter().filter(|(_, p)| p.size.is_none()).map(|(n, _)| *n).collect();
    if lacking.is_empty() {
        return Some(Vec::new());
    }
    let dom = dominators(f, states);
    let mut out: Vec<SizePoint> = Vec::new();
    for c in lacking {
        let best = dom[c]
            .iter()
            .copied()
            .filter(|&d| d != c && emulated(&f.ins[d]))
            .filter_map(|d| {
                let st = states[d].as_ref()?;
                let size = st.find(Val::Entry(Register::RDI), Register::RDI, f.escaped)?;
                let sp = st.sp?;
                Some((d, size, sp))
            })
            .max_by_key(|(d, _, _)| dom[*d].len())?;
        let (d, size, sp) = best;
        let i = &f.ins[d];
        let when = if i.flow_control() == FlowControl::ConditionalBranch {
            let taken = f.index[&i.near_branch_target()];
            let via_taken = reaches(f, taken, c, d);
            let via_next = d + 1 < f.ins.len() && reaches(f, d + 1, c, d);
            match (via_taken, via_next) {
                (true, false) => When::Branch { cc: i.condition_code(), taken: true },
                (false, true) => When::Branch { cc: i.condition_code(), taken: false },
                _ => When::Always,
            }
        } else {
            When::Always
        };
        let ret_slot = u32::try_from(-sp).ok().filter(|&s| i64::from(s) <= MAX_SLOT)?;
        let p = SizePoint { addr: i.ip(), when, size, ret_slot };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out.sort_by_key(|p| p.addr);
    Some(out)
}

/// Whether `to` is reachable from `from` without passing `avoid`.
fn reaches(f: &Function, from: usize, to: usize, avoid: usize) -> bool {
    let mut seen = vec![false; f.ins.len()];
    let mut stack = vec![from];
    while let Some(n) = stack.pop() {
        if n == to {
            return true;
        }
        if n == avoid || seen[n] {
            continue;
        }
        seen[n] = true;
        stack.extend(f.succ[n].iter().copied());
    }
    false
}

/// Each reachable instruction's dominators (sorted indices).
fn dominators(f: &Function, states: &[Option<State>]) -> Vec<Vec<usize>> {
    let n = f.ins.len();
    let reachable: Vec<usize> = (0..n).filter(|&i| states[i].is_some()).collect();
    let preds = f.preds();
    let mut dom: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &i in &reachable {
        dom[i] = if i == 0 { vec![0] } else { reachable.clone() };
    }
    let mut changed = true;
    while changed {
        changed = false;
        for &i in reachable.iter().skip_while(|&&i| i == 0) {
            let mut new: Option<Vec<usize>> = None;
            for &p in &preds[i] {
                if states[p].is_none() {
                    continue;
                }
                new = Some(match new {
                    None => dom[p].clone(),
                    Some(acc) => acc.into_iter().filter(|x| dom[p].binary_search(x).is_ok()).collect(),
                });
            }
            let mut new = new.unwrap_or_default();
            if let Err(at) = new.binary_search(&i) {
                new.insert(at, i);
            }
            if new != dom[i] {
                dom[i] = new;
                changed = true;
            }
        }
    }
    dom
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `cargo xtask fuzz` (x86_code): code placed so near the top
    /// of the address space that its end wraps overflowed the analysis.
    #[test]
    fn code_that_wraps_the_address_space_is_no_function() {
        let code = [0x76, 0x7d, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0xdd, 0x20, 0xcc];
        assert!(plan(&code, 0xffff_ffff_ffff_fff0).is_none());
        assert!(crate::stacks::syscall_sites::sites_in_function(&code, 0xffff_ffff_ffff_fff0).is_empty());
    }

    fn libc_malloc() -> Option<(Vec<u8>, u64)> {
        use object::{Object, ObjectSegment, ObjectSymbol};
        let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").ok()?;
        let file = object::File::parse(&*data).ok()?;
        let sym = file.dynamic_symbols().find(|s| s.name().is_ok_and(|n| n == "malloc"))?;
        let (addr, size) = (sym.address(), sym.size());
        let code = file.segments().find_map(|s| {
            let (fo, fsz) = s.file_range();
            (addr >= s.address() && addr < s.address() + fsz).then(|| data[(fo + addr - s.address()) as usize..][..size as usize].to_vec())
        })?;
        Some((code, addr))
    }

    /// glibc 2.36 (Debian 12): the tcache path's `jne` at +0x157, the arena
    /// and single-thread paths after `_int_malloc`, one size point before
    /// the single-thread path moves `rbx` over the size.
    #[test]
    fn system_malloc_has_result_points() {
        let Some((code, addr)) = libc_malloc() else { return };
        let plan = plan(&code, addr).expect("a plan for this machine's malloc");
        for p in &plan.results {
            eprintln!("result {:#x} {:?} result {:?} size {:?} bp {:?} ret {}", p.addr - addr, p.when, p.result, p.size, p.caller_bp, p.ret_slot);
        }
        for p in &plan.sizes {
            eprintln!("size {:#x} {:?} {:?} ret {}", p.addr - addr, p.when, p.size, p.ret_slot);
        }
        // The tcache path, the arena path (mmapped chunk / arena check),
        // the single-thread path (three exits, size stored before the call
        // to _int_malloc, where it is still in rsi).
        let at: Vec<u64> = plan.results.iter().map(|p| p.addr - addr).collect();
        assert_eq!(at, [0xb7, 0xf2, 0x157, 0x1aa, 0x1b3, 0x1e3]);
        assert!(plan.results.iter().all(|p| p.result == Loc::Reg(Register::RAX) && p.ret_slot == 40 && p.caller_bp == Loc::Stack(24)));
        let tcache = &plan.results[2];
        assert_eq!(tcache.when, When::Branch { cc: ConditionCode::ne, taken: false });
        assert_eq!(tcache.size, Some(Loc::Reg(Register::RBX)));
        assert_eq!(plan.results.iter().filter(|p| p.size.is_none()).count(), 3);
        assert_eq!(plan.sizes, [SizePoint { addr: addr + 0x195, when: When::Always, size: Loc::Reg(Register::RSI), ret_slot: 40 }]);
    }

    /// What the plan refuses: an indirect jump, a tail call, a function
    /// whose result is computed by a call right before `ret`.
    #[test]
    fn unknown_shapes_get_no_plan() {
        // push rbx; mov rbx,rdi; call rel32; pop rbx; ret — the result comes
        // from the call with nothing emulated after it.
        let call_then_ret = [0x53, 0x48, 0x89, 0xfb, 0xe8, 0x00, 0x10, 0x00, 0x00, 0x5b, 0xc3];
        assert_eq!(plan(&call_then_ret, 0x1000), None);
        // jmp *rax
        assert_eq!(plan(&[0xff, 0xe0], 0x1000), None);
        // tail call: jmp rel32 out of the function
        assert_eq!(plan(&[0xe9, 0x00, 0x10, 0x00, 0x00], 0x1000), None);
    }

    /// A hand-made allocator: `test rdi,rdi; je null; mov rax,[rip+x];
    /// jmp out; null: xor eax,eax; out: ret` — the result point is the `jmp`,
    /// the NULL path needs none, the size is still in rdi.
    #[test]
    fn small_function_plan() {
        let code = [
            0x48, 0x85, 0xff, // test rdi,rdi
            0x74, 0x09, // je +9 -> null
            0x48, 0x8b, 0x05, 0x00, 0x00, 0x00, 0x00, // mov rax,[rip]
            0xeb, 0x02, // jmp +2 -> out
            0x31, 0xc0, // null: xor eax,eax
            0xc3, // out: ret
        ];
        let p = plan(&code, 0x1000).expect("plan");
        assert_eq!(p.sizes, []);
        assert_eq!(p.results.len(), 1, "{p:?}");
        let r = &p.results[0];
        assert_eq!((r.addr, r.when, r.result, r.size, r.caller_bp, r.ret_slot), (0x100c, When::Always, Loc::Reg(Register::RAX), Some(Loc::Reg(Register::RDI)), Loc::Reg(Register::RBP), 0));
    }
}
