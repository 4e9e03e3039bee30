//! Java frames of a HotSpot JVM: setting up the kernel side's walk
//! (`tracer-ebpf/src/jvm.rs`) and naming what it recorded.
//!
//! Set up once per JVM from its VMStructs tables (`binary::hotspot`), its
//! TLS and the kernel's BTF: the offsets and address ranges the walk needs
//! go into `JVM_CONFIG`. The walk records, per physical frame, an
//! interpreted frame's `Method*` and bytecode index or a compiled frame's
//! pc; here a `Method*` is named `package.Class.method` from its constant
//! pool, and a compiled pc is expanded into the methods inlined at that
//! call site from the nmethod's `PcDesc` table and scope descriptors.
//! What cannot be named (a freed nmethod, a cut walk) is an `[unknown]`
//! frame, counted, never a guess.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use tracer_common::jvm::{
    compiled_slot, const_method_check, header, interpreted_slot, unknown_pc_slot, CodeHeapRange, JvmConfig, ADDRESS_MASK, BCI_SHIFT, BCI_UNKNOWN, CHECK_MASK, CHECK_SHIFT, COMPILE_ID_MASK, COMPILE_ID_SHIFT, INTERPRETED_FRAME,
    MAX_CODE_HEAPS, MAX_JAVA_FRAMES, METHOD_BITS, UNKNOWN_PC_FRAME,
};

use crate::{
    binary::{
        btf::Btf,
        golang::memory::TargetMemory,
        hotspot::{read_cstr, Libjvm, VmStructs},
    },
    procfs::MemoryMap,
    report::Frame,
};

/// The module Java frames are shown in (they have no object file).
pub const JAVA_MODULE: &str = "java";

/// The top frame of a Java stack taken while its thread was entering a
/// contended `synchronized` monitor.
pub const MONITOR_ENTER_FRAME: &str = "[monitor enter]";

/// Whether the target may be a JVM, decided before the eBPF object is
/// loaded: libjvm.so is mapped, or the program a held child will exec is
/// `java` (or has a libjvm next to it). A process that execs into a JVM
/// later gets native stacks. `LEAKTRACE_JAVA_WALK=1` loads the walk for
/// any target (the VM test verifies it on kernels that have no JVM).
pub fn may_be_jvm(pid: u32, program: Option<&std::path::Path>) -> bool {
    if std::env::var_os("LEAKTRACE_JAVA_WALK").is_some_and(|v| v == "1") {
        return true;
    }
    if let Some(p) = program {
        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        return p.file_name().is_some_and(|n| n == "java")
            || p.parent().and_then(|d| d.parent()).is_some_and(|home| home.join("lib/server/libjvm.so").exists());
    }
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains("/libjvm.so"))
}

/// The JVM is mapped but not initialised yet (`run`): try again later.
#[derive(Debug)]
pub struct NotReady(pub String);

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for NotReady {}

/// Offsets the naming reads.
struct Offsets {
    method_const_method: u64,
    const_method_constants: u64,
    const_method_name_index: u64,
    pool_holder: u64,
    pool_size: u64,
    klass_name: u64,
    /// `ConstMethod::_flags` (u2 to JDK 20, u4 from 21 on), `_code_size`,
    /// and `sizeof(ConstMethod)`: the line-number table follows the
    /// bytecodes when flag bit 1 is set (`_has_linenumber_table`).
    const_method_flags: u64,
    const_method_code_size: u64,
    const_method_size: u64,
    /// `_source_file_name_index` (u2): in the `ConstantPool` from JDK 17
    /// (`true`), in the `InstanceKlass` before.
    source_file_index: (u64, bool),
    /// Where the Java threads are listed, `JavaThread::_osthread` and
    /// `OSThread::_thread_id` (the tid): the wait tracker's walks.
    threads: ThreadList,
    osthread: u64,
    os_thread_id: u64,
    /// `InstanceKlass::_methods` and `Array<Method*>::_data`.
    klass_methods: u64,
    array_data: u64,
    symbol_length: u64,
    symbol_body: u64,
    blob_name: u64,
    blob_code_begin: u64,
    compiled_method: u64,
    scopes_data_begin: u64,
    scopes_pcs: u64,
    dependencies: u64,
    metadata: u64,
    pc_desc_size: u64,
    pc_desc_pc: u64,
    pc_desc_scope: u64,
    /// `nmethod::_compile_id` (0: not exported, not checked).
    compile_id: u64,
    /// `nmethod::_state` (a signed char), and its largest value while the
    /// nmethod's metadata is alive (in use or not entrant; above: unloaded
    /// or a zombie, its methods maybe freed with their classes).
    nmethod_state: u64,
    max_alive_state: i8,
    /// Byte values the scope stream never uses (0 before JDK 20; 1 from
    /// JDK 20 on, UNSIGNED5: no zero bytes).
    excluded: u32,
}

/// Names kept per JVM at most (methods, compiled call sites); cleared when full.
const MAX_NAMES: usize = 100_000;
/// Java threads read by the wait tracker at most.
const MAX_THREADS: usize = 100_000;
/// As the kernel side's walk (`tracer-ebpf/src/jvm.rs`): how far above the
/// system call's sp the anchor may be, the largest frame believed (words).
const MAX_NATIVE_SPAN: u64 = 8 << 20;
const MAX_FRAME_WORDS: i64 = 1 << 14;
/// Bytes of a method's line-number table read at most.
const MAX_LINE_TABLE: usize = 16 << 10;
/// Inlined scopes followed per call site at most.
const MAX_SCOPES: usize = 32;
/// Largest PcDesc table read (bytes).
const MAX_PC_DESCS: u64 = 1 << 20;

/// One JVM target: what its walk needs, and the naming state.
pub struct Jvm {
    mem: TargetMemory,
    off: Offsets,
    pub config: JvmConfig,
    /// VMStructs fields read (for the closing note).
    pub fields: usize,
    /// The JDK's major version.
    pub version: i32,
    /// How long setting up the walk took (VMStructs, TLS, BTF), ms.
    pub setup_ms: f64,
    methods: HashMap<u64, Option<MethodInfo>>,
    call_sites: HashMap<u64, Option<Vec<(u64, u64)>>>,
    /// Frames that could not be named (freed code, cut walks).
    pub unknown_frames: u64,
}

impl Jvm {
    /// Sets up the walk of process `pid` when it is a HotSpot JVM:
    /// `Ok(None)` when it maps no libjvm; an error says why Java frames
    /// are off ([`NotReady`] when it is only too early).
    pub fn attach(pid: u32, memory: &MemoryMap) -> Result<Option<Self>> {
        let Some(libjvm) = Libjvm::open(pid, memory)? else { return Ok(None) };
        let mem = TargetMemory::new(pid);
        let vm = VmStructs::read(&mem, &libjvm).map_err(|e| anyhow!(NotReady(format!("{e:#}"))))?;
        let f = |t: &[&str], n: &str| vm.field(t, n);
        let read = |addr: u64| mem.read_u64(addr).ok_or_else(|| anyhow!("cannot read the JVM's memory at {addr:#x}"));
        let read_i32 = |addr: u64| -> Result<i64> {
            let mut b = [0u8; 4];
            mem.read(addr, &mut b)?;
            Ok(i32::from_le_bytes(b) as i64)
        };
        // JDK 20 changed the scope stream's encoding (UNSIGNED5: no zero
        // bytes) and JDK 23 removed CompiledMethod: the layout of JDK 11
        // to 22 is read here.
        let major = f(&["Abstract_VM_Version"], "_vm_major_version").ok().and_then(|a| {
            let mut b = [0u8; 4];
            mem.read(a, &mut b).ok().map(|_| i32::from_le_bytes(b))
        });
        let excluded = match major {
            Some(11..=19) => 0,
            Some(20..=22) => 1,
            Some(v) => bail!("JDK {v} is not supported yet (Java frames are read for JDK 11 to 22)"),
            None => bail!("cannot read the JVM's version (Abstract_VM_Version::_vm_major_version)"),
        };
        let off = Offsets {
            method_const_method: f(&["Method"], "_constMethod")?,
            const_method_constants: f(&["ConstMethod"], "_constants")?,
            const_method_name_index: f(&["ConstMethod"], "_name_index")?,
            pool_holder: f(&["ConstantPool"], "_pool_holder")?,
            pool_size: vm.size("ConstantPool")?,
            klass_name: f(&["Klass"], "_name")?,
            const_method_flags: f(&["ConstMethod"], "_flags").or_else(|_| f(&["ConstMethod"], "_flags._flags"))?,
            const_method_code_size: f(&["ConstMethod"], "_code_size")?,
            const_method_size: vm.size("ConstMethod")?,
            source_file_index: match f(&["ConstantPool"], "_source_file_name_index") {
                Ok(o) => (o, true),
                Err(_) => (f(&["InstanceKlass"], "_source_file_name_index")?, false),
            },
            threads: ThreadList::of(&vm)?,
            osthread: f(&["JavaThread", "Thread"], "_osthread")?,
            os_thread_id: f(&["OSThread"], "_thread_id")?,
            klass_methods: f(&["InstanceKlass"], "_methods")?,
            array_data: f(&["Array<Method*>"], "_data")?,
            symbol_length: f(&["Symbol"], "_length")?,
            symbol_body: f(&["Symbol"], "_body")?,
            blob_name: f(&["CodeBlob"], "_name")?,
            blob_code_begin: f(&["CodeBlob"], "_code_begin")?,
            compiled_method: f(&["CompiledMethod", "nmethod"], "_method")?,
            scopes_data_begin: f(&["CompiledMethod", "nmethod"], "_scopes_data_begin")?,
            scopes_pcs: f(&["nmethod"], "_scopes_pcs_offset")?,
            dependencies: f(&["nmethod"], "_dependencies_offset")?,
            metadata: f(&["nmethod"], "_metadata_offset")?,
            pc_desc_size: vm.size("PcDesc")?,
            pc_desc_pc: f(&["PcDesc"], "_pc_offset")?,
            pc_desc_scope: f(&["PcDesc"], "_scope_decode_offset")?,
            compile_id: vm.field(&["nmethod", "CompiledMethod"], "_compile_id").unwrap_or(0),
            nmethod_state: f(&["nmethod", "CompiledMethod"], "_state")?,
            // JDK 11 to 19: in_use 0, not_used 1, not_entrant 2, unloaded
            // 3, zombie 4; JDK 20 on (no sweeper): in_use 0, not_entrant 1.
            max_alive_state: if excluded == 0 { 2 } else { 1 },
            excluded: 0,
        };
        let off = Offsets { excluded, ..off };
        let anchor = f(&["JavaThread"], "_anchor")?;
        let (a_sp, a_pc, a_fp) = (
            f(&["JavaFrameAnchor"], "_last_Java_sp")?,
            f(&["JavaFrameAnchor"], "_last_Java_pc")?,
            f(&["JavaFrameAnchor"], "_last_Java_fp")?,
        );
        if ![a_sp, a_pc, a_fp].iter().all(|o| [0, 8, 16].contains(o)) {
            bail!("unexpected JavaFrameAnchor layout ({a_sp}, {a_pc}, {a_fp})");
        }
        // The interpreter, the code heaps and the entry stub exist once the
        // VM is initialised.
        let queue = read(f(&["AbstractInterpreter"], "_code")?)?;
        if queue == 0 {
            bail!(NotReady("the interpreter is not generated yet".into()));
        }
        let interp_lo = read(queue + f(&["StubQueue"], "_stub_buffer")?)?;
        let interp_hi = interp_lo + read_i32(queue + f(&["StubQueue"], "_buffer_limit")?)? as u64;
        let heaps_array = read(f(&["CodeCache"], "_heaps")?)?;
        if heaps_array == 0 {
            bail!(NotReady("the code cache is not set up yet".into()));
        }
        let n = read_i32(heaps_array + f(&["GrowableArrayBase", "GenericGrowableArray"], "_len")?)?;
        let data = read(heaps_array + f(&["GrowableArray<int>"], "_data")?)?;
        if !(1..=MAX_CODE_HEAPS as i64).contains(&n) {
            bail!(NotReady(format!("{n} code heaps")));
        }
        let (memory_f, segmap_f, low, high, log2) = (
            f(&["CodeHeap"], "_memory")?,
            f(&["CodeHeap"], "_segmap")?,
            f(&["VirtualSpace"], "_low_boundary")?,
            f(&["VirtualSpace"], "_high_boundary")?,
            f(&["CodeHeap"], "_log2_segment_size")?,
        );
        let mut heaps = [CodeHeapRange::default(); MAX_CODE_HEAPS];
        for (i, h) in heaps.iter_mut().enumerate().take(n as usize) {
            let heap = read(data + 8 * i as u64)?;
            *h = CodeHeapRange {
                lo: read(heap + memory_f + low)?,
                hi: read(heap + memory_f + high)?,
                segmap: read(heap + segmap_f + low)?,
                log2_segment: read_i32(heap + log2)? as u64,
            };
        }
        let call_stub_return = read(f(&["StubRoutines"], "_call_stub_return_address")?)?;
        let (dtv_slot, tls_offset) = find_thread_tls(&mem, &vm, &libjvm)?;
        let fsbase_offset = Btf::kernel()?.offset_of("task_struct", &["thread", "fsbase"])?;
        let pending_monitor = vm.field(&["JavaThread", "Thread"], "_current_pending_monitor").unwrap_or(0);
        let config = JvmConfig {
            fsbase_offset,
            dtv_slot,
            tls_offset,
            anchor,
            anchor_sp: a_sp,
            anchor_pc: a_pc,
            anchor_fp: a_fp,
            pending_monitor,
            interp_lo,
            interp_hi,
            call_stub_return,
            heap_block: vm.size("HeapBlock")?,
            frame_size: f(&["CodeBlob"], "_frame_size")?,
            compile_id: off.compile_id,
            const_method: off.method_const_method,
            const_method_size: vm.size("ConstMethod")?,
            n_heaps: n as u64,
            heaps,
        };
        Ok(Some(Self { mem, off, config, fields: vm.len(), version: major.unwrap_or(0), setup_ms: 0.0, methods: HashMap::new(), call_sites: HashMap::new(), unknown_frames: 0 }))
    }

    fn u64_at(&self, addr: u64) -> Option<u64> {
        self.mem.read_u64(addr)
    }

    fn u16_at(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 2];
        self.mem.read(addr, &mut b).ok()?;
        Some(u16::from_le_bytes(b) as u64)
    }

    fn i32_at(&self, addr: u64) -> Option<i64> {
        let mut b = [0u8; 4];
        self.mem.read(addr, &mut b).ok()?;
        Some(i32::from_le_bytes(b) as i64)
    }

    fn symbol(&self, sym: u64) -> Option<String> {
        let len = self.u16_at(sym + self.off.symbol_length)?;
        let body = self.mem.read_region(sym + self.off.symbol_body, len as usize)?;
        Some(String::from_utf8_lossy(&body).into_owned())
    }

    /// A `Method*` whose `ConstMethod*` has `check`
    /// ([`const_method_check`]: the walk's, or read now for a compiled
    /// frame's scope), cached by both.
    fn method(&mut self, method: u64, check: u64) -> Option<&MethodInfo> {
        let key = (check << CHECK_SHIFT) | ((method >> 3) & METHOD_BITS);
        if !self.methods.contains_key(&key) {
            let info = self.read_method(method, check);
            if self.methods.len() >= MAX_NAMES {
                self.methods.clear();
            }
            self.methods.insert(key, info);
        }
        self.methods.get(&key).and_then(Option::as_ref)
    }

    /// The frame of `method` at `bci` (`u64::MAX` or out of range: no line).
    fn method_frame(&mut self, method: u64, check: u64, bci: u64) -> Option<Frame> {
        let m = self.method(method, check)?;
        Some(Frame { file: m.file.clone(), line: m.line_of(bci), ..java_frame(m.name.clone()) })
    }

    fn read_method(&self, method: u64, check: u64) -> Option<MethodInfo> {
        let o = &self.off;
        let cm = self.u64_at(method + o.method_const_method)?;
        // The method the walk saw is gone (its class unloaded, the memory
        // reused): no name rather than another method's.
        if check != const_method_check(cm) {
            return None;
        }
        let pool = self.u64_at(cm + o.const_method_constants)?;
        let index = self.u16_at(cm + o.const_method_name_index)?;
        let holder = self.u64_at(pool + o.pool_holder)?;
        // And its class still lists it (memory reused by other metadata
        // can lead to a real method that is not this one).
        let methods = self.u64_at(holder + o.klass_methods)?;
        let count = self.i32_at(methods)?.clamp(0, u16::MAX as i64) as usize;
        let listed = self.mem.read_region(methods + o.array_data, 8 * count)?;
        if !listed.chunks_exact(8).any(|m| u64::from_le_bytes(m.try_into().unwrap()) == method) {
            return None;
        }
        let class = self.symbol(self.u64_at(holder + o.klass_name)?)?;
        let name = self.symbol(self.u64_at(pool + o.pool_size + 8 * index)? & !1)?;
        let (at, in_pool) = o.source_file_index;
        let file = self
            .u16_at(if in_pool { pool } else { holder } + at)
            .filter(|&i| i != 0)
            .and_then(|i| self.symbol(self.u64_at(pool + o.pool_size + 8 * i)? & !1));
        let lines = self.line_table(cm).unwrap_or_default();
        Some(MethodInfo { name: format!("{}.{name}", clean_class_name(&class)), file, lines })
    }

    /// The method's (bci, line) pairs from its compressed line-number
    /// table (after its bytecodes), in table order; empty without one.
    fn line_table(&self, cm: u64) -> Option<Vec<(u32, u32)>> {
        let o = &self.off;
        if self.u16_at(cm + o.const_method_flags)? & 1 == 0 {
            return Some(Vec::new());
        }
        let code_size = self.u16_at(cm + o.const_method_code_size)?;
        let at = cm + o.const_method_size + code_size;
        // The table's length is not stored: read a bound's worth (less at
        // the end of a mapping); a table longer than that gives no lines.
        let buf = [MAX_LINE_TABLE, 1024, 64].iter().find_map(|&n| self.mem.read_region(at, n))?;
        let (mut bci, mut line) = (0u32, 0u32);
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let Some(&b) = buf.get(pos) else { return Some(Vec::new()) };
            pos += 1;
            match b {
                0 => break,
                0xff => {
                    let x = o.excluded;
                    let (Some(db), Some(dl)) = (read_compressed_int(&buf, &mut pos, x), read_compressed_int(&buf, &mut pos, x)) else {
                        return Some(Vec::new());
                    };
                    bci = bci.wrapping_add(decode_sign(db));
                    line = line.wrapping_add(decode_sign(dl));
                }
                b => {
                    bci += (b >> 3) as u32;
                    line += (b & 7) as u32;
                }
            }
            out.push((bci, line));
        }
        Some(out)
    }

    /// The code blob holding `pc` (the code heap's segment map, as the kernel side).
    fn blob_of(&self, pc: u64) -> Option<u64> {
        let c = &self.config;
        let h = c.heaps[..c.n_heaps as usize].iter().find(|h| pc >= h.lo && pc < h.hi)?;
        let mut seg = (pc - h.lo) >> h.log2_segment;
        for _ in 0..64 {
            let mut tag = [0u8];
            self.mem.read(h.segmap + seg, &mut tag).ok()?;
            match tag[0] as u64 {
                0 => return Some(h.lo + (seg << h.log2_segment) + c.heap_block),
                0xff => return None,
                t if t > seg => return None,
                t => seg -= t,
            }
        }
        None
    }

    /// The methods at a compiled call site (`ip`: pc and compile-id bits),
    /// innermost first, with their bytecode indexes (`u64::MAX`: not
    /// known); a method 0 is a scope that cannot be named; `None` when the
    /// pc is in no live Java code, or in another compilation than the walk's.
    fn call_site(&mut self, ip: u64) -> Option<Vec<(u64, u64)>> {
        if let Some(s) = self.call_sites.get(&ip) {
            return s.clone();
        }
        let site = self.read_call_site(ip & ADDRESS_MASK, (ip >> COMPILE_ID_SHIFT) & COMPILE_ID_MASK);
        if self.call_sites.len() >= MAX_NAMES {
            self.call_sites.clear();
        }
        self.call_sites.insert(ip, site.clone());
        site
    }

    fn read_call_site(&self, pc: u64, compile_id: u64) -> Option<Vec<(u64, u64)>> {
        let o = &self.off;
        let blob = self.blob_of(pc)?;
        let kind = read_cstr(&self.mem, self.u64_at(blob + o.blob_name)?)?;
        // The walk read the same word of whatever blob held the pc (a
        // compile id in an nmethod, stable code bytes in a stub): another
        // value now means the code was flushed since and the space reused.
        if o.compile_id != 0 && (self.i32_at(blob + o.compile_id)? as u64) & COMPILE_ID_MASK != compile_id {
            return None;
        }
        let method = self.u64_at(blob + o.compiled_method)?;
        if kind.ends_with("nmethod") {
            let mut state = [0u8];
            self.mem.read(blob + o.nmethod_state, &mut state).ok()?;
            if !(0..=o.max_alive_state).contains(&(state[0] as i8)) {
                // Unloaded with its classes: its metadata may be freed.
                return None;
            }
        }
        match kind.as_str() {
            "native nmethod" => return Some(vec![(method, u64::MAX)]),
            "nmethod" => {}
            // A runtime stub on the way into the VM (monitor enter, a
            // safepoint poll): known code, no Java frame.
            _ => return Some(Vec::new()),
        }
        let code_begin = self.u64_at(blob + o.blob_code_begin)?;
        let pcs = blob + self.i32_at(blob + o.scopes_pcs)? as u64;
        let pcs_end = blob + self.i32_at(blob + o.dependencies)? as u64;
        let metadata = blob + self.i32_at(blob + o.metadata)? as u64;
        let scopes = self.u64_at(blob + o.scopes_data_begin)?;
        if pcs_end <= pcs || pcs_end - pcs > MAX_PC_DESCS || o.pc_desc_size == 0 {
            return Some(vec![(method, u64::MAX)]);
        }
        let table = self.mem.read_region(pcs, (pcs_end - pcs) as usize)?;
        let want = pc.wrapping_sub(code_begin) as i64;
        let at = |b: &[u8], off: u64| b.get(off as usize..off as usize + 4).map(|x| i32::from_le_bytes(x.try_into().unwrap()) as i64);
        let decode = table
            .chunks_exact(o.pc_desc_size as usize)
            .find(|d| at(d, o.pc_desc_pc) == Some(want))
            .and_then(|d| at(d, o.pc_desc_scope));
        let Some(mut decode) = decode.filter(|&d| d > 0) else {
            // No debug info at this pc (a frame returning into its
            // nmethod's deoptimization handler): the compilation root,
            // and an unknown frame for what it may have inlined.
            return Some(vec![(0, u64::MAX), (method, u64::MAX)]);
        };
        let mut out = Vec::new();
        while decode > 0 && out.len() < MAX_SCOPES {
            let bytes = self.mem.read_region(scopes + decode as u64, 16)?;
            let mut pos = 0;
            let x = o.excluded;
            let sender = read_compressed_int(&bytes, &mut pos, x)?;
            let index = read_compressed_int(&bytes, &mut pos, x)?;
            let bci = read_compressed_int(&bytes, &mut pos, x)?.wrapping_sub(1);
            let m = if index == 0 { 0 } else { self.u64_at(metadata + 8 * (index as u64 - 1))? };
            out.push((m, bci as u32 as u64));
            decode = sender as i64;
        }
        Some(out)
    }

    /// Names the frames of a Java stack (`ips[0]`: header flags).
    pub fn frames(&mut self, ips: &[u64]) -> Vec<Frame> {
        let mut out = Vec::new();
        let flags = ips.first().copied().unwrap_or(0);
        if flags & header::PENDING_MONITOR != 0 {
            out.push(java_frame(MONITOR_ENTER_FRAME.into()));
        }
        for &ip in ips.iter().skip(1) {
            if ip & INTERPRETED_FRAME != 0 {
                let method = (ip & METHOD_BITS) << 3;
                let check = (ip >> CHECK_SHIFT) & CHECK_MASK;
                let bci = match (ip >> BCI_SHIFT) & BCI_UNKNOWN {
                    BCI_UNKNOWN => u64::MAX,
                    bci => bci,
                };
                match self.method_frame(method, check, bci) {
                    Some(f) => out.push(f),
                    None => out.push(self.unknown(method)),
                }
                continue;
            }
            if ip & UNKNOWN_PC_FRAME != 0 {
                // Where a walk stopped: the code blob's kind when it is in
                // the code cache (a stub without a frame), else unknown.
                let pc = ip & ADDRESS_MASK;
                let blob = self.blob_of(pc).and_then(|b| read_cstr(&self.mem, self.u64_at(b + self.off.blob_name)?));
                out.push(match blob {
                    Some(name) => {
                        self.unknown_frames += 1;
                        Frame { addr: Some(format!("{pc:#x}")), ..java_frame(format!("[{name}]")) }
                    }
                    None => self.unknown(pc),
                });
                continue;
            }
            match self.call_site(ip) {
                Some(scopes) => {
                    for (m, bci) in scopes {
                        let check = self.u64_at(m + self.off.method_const_method).map(const_method_check);
                        match check.filter(|_| m != 0).and_then(|c| self.method_frame(m, c, bci)) {
                            Some(f) => out.push(f),
                            None => out.push(self.unknown(ip & ADDRESS_MASK)),
                        }
                    }
                }
                None => out.push(self.unknown(ip & ADDRESS_MASK)),
            }
        }
        if flags & header::CUT != 0 && !ips.last().is_some_and(|ip| ip & UNKNOWN_PC_FRAME != 0 && ip & INTERPRETED_FRAME == 0) {
            out.push(self.unknown(0));
        }
        out
    }

    /// The Java threads by tid (at most [`MAX_THREADS`]).
    pub fn java_threads(&self) -> HashMap<u32, u64> {
        let o = &self.off;
        o.threads
            .read(&self.mem, MAX_THREADS)
            .into_iter()
            .filter_map(|jt| {
                let os = self.u64_at(jt + o.osthread)?;
                let tid = self.i32_at(os + o.os_thread_id)?;
                (tid > 0).then_some((tid as u32, jt))
            })
            .collect()
    }

    /// A blocked Java thread's frames in the kernel walk's encoding
    /// (`ips[0]` the header, then one word per physical frame), walked here
    /// from its frame anchor as `tracer-ebpf/src/jvm.rs` does at an event:
    /// for the wait tracker, which reads waits from the target's state.
    /// `sp`: the thread's user sp in its system call (the anchor must lie
    /// above it); `None` when it has no Java frames.
    pub fn walk_thread(&self, jt: u64, sp_in_call: u64) -> Option<Vec<u64>> {
        let c = &self.config;
        let anchor = self.mem.read_region(jt + c.anchor, 24)?;
        let word = |off: u64| u64::from_le_bytes(anchor[off as usize..off as usize + 8].try_into().unwrap());
        let (mut sp, mut pc, mut fp) = (word(c.anchor_sp), word(c.anchor_pc), word(c.anchor_fp));
        if sp <= sp_in_call || sp - sp_in_call > MAX_NATIVE_SPAN || sp & 7 != 0 {
            return None;
        }
        if pc == 0 {
            pc = self.u64_at(sp - 8)?;
        }
        let mut flags = 0;
        if c.pending_monitor != 0 && self.u64_at(jt + c.pending_monitor).is_some_and(|m| m != 0) {
            flags |= header::PENDING_MONITOR;
        }
        let mut ips = vec![0];
        while ips.len() <= MAX_JAVA_FRAMES {
            if pc >= c.interp_lo && pc < c.interp_hi {
                let Some(w) = self.mem.read_region(fp.wrapping_sub(64), 80) else {
                    flags |= header::CUT;
                    break;
                };
                let w = |i: usize| u64::from_le_bytes(w[8 * i..8 * i + 8].try_into().unwrap());
                let method = w(5);
                let const_method = self.u64_at(method + c.const_method).unwrap_or(0);
                ips.push(interpreted_slot(method, const_method, w(0).wrapping_sub(const_method + c.const_method_size)));
                if w(7) < sp {
                    break;
                }
                (sp, fp, pc) = (w(7), w(8), w(9));
                continue;
            }
            if pc == c.call_stub_return {
                break;
            }
            let blob = self.blob_of(pc);
            let words = blob.and_then(|b| self.i32_at(b + c.frame_size)).unwrap_or(0);
            if words <= 0 || words > MAX_FRAME_WORDS {
                ips.push(unknown_pc_slot(pc));
                flags |= header::CUT;
                break;
            }
            let compile_id = match (blob, c.compile_id) {
                (Some(b), off) if off != 0 => self.i32_at(b + off).unwrap_or(0) as u64,
                _ => 0,
            };
            ips.push(compiled_slot(pc, compile_id));
            sp += words as u64 * 8;
            let (Some(saved_fp), Some(ret)) = (self.u64_at(sp - 16), self.u64_at(sp - 8)) else {
                flags |= header::CUT;
                break;
            };
            (fp, pc) = (saved_fp, ret);
        }
        ips[0] = flags;
        Some(ips)
    }

    fn unknown(&mut self, addr: u64) -> Frame {
        self.unknown_frames += 1;
        Frame {
            function: "[unknown]".into(),
            file: None,
            line: None,
            module: Some(JAVA_MODULE.into()),
            addr: (addr != 0).then(|| format!("{addr:#x}")),
            file_offset: None,
        }
    }
}

/// A named method: `package.Class.method`, its source file, its lines.
#[derive(Clone)]
struct MethodInfo {
    name: String,
    file: Option<String>,
    /// (bci, line) pairs of its line-number table.
    lines: Vec<(u32, u32)>,
}

impl MethodInfo {
    /// The source line of bytecode index `bci`: the entry at `bci`, else
    /// the closest one before it (as `Method::line_number_from_bci`).
    fn line_of(&self, bci: u64) -> Option<u32> {
        // A compiled scope's -1 (a synchronized method's entry) is its start.
        let bci = if bci == u32::MAX as u64 { 0 } else { u32::try_from(bci).ok()? };
        if let Some(&(_, line)) = self.lines.iter().find(|(b, _)| *b == bci) {
            return Some(line);
        }
        self.lines.iter().filter(|(b, _)| *b < bci).max_by_key(|(b, _)| *b).map(|&(_, line)| line)
    }
}

/// A zigzag-coded signed int (`CompressedReadStream::read_signed_int`).
fn decode_sign(x: u32) -> u32 {
    (x >> 1) ^ (x & 1).wrapping_neg()
}

fn java_frame(function: String) -> Frame {
    Frame { function, file: None, line: None, module: Some(JAVA_MODULE.into()), addr: None, file_offset: None }
}

/// HotSpot's compressed int stream (`CompressedReadStream::read_int`):
/// bytes below `192 + x` end a number; each byte adds its value less `x`,
/// shifted by 6 more bits than the last, at most 5 bytes. `x` is 0 before
/// JDK 20 and 1 from JDK 20 on (UNSIGNED5, which never writes a zero byte).
fn read_compressed_int(b: &[u8], pos: &mut usize, x: u32) -> Option<u32> {
    const L: u32 = 192;
    let b0 = *b.get(*pos)? as u32;
    *pos += 1;
    let mut sum = b0.wrapping_sub(x);
    if b0 < L + x {
        return Some(sum);
    }
    let mut shift = 6;
    for i in 1..5 {
        let bi = *b.get(*pos)? as u32;
        *pos += 1;
        sum = sum.wrapping_add(bi.wrapping_sub(x) << shift);
        if bi < L + x || i == 4 {
            return Some(sum);
        }
        shift += 6;
    }
    Some(sum)
}

/// A class name as users write it: dots, and a lambda's or hidden class's
/// generated suffix cut (`Pool$$Lambda$14/0x0000000800c0b000` and
/// `Pool$$Lambda$14+0x…` are `Pool$$Lambda`).
pub fn clean_class_name(internal: &str) -> String {
    let mut name = internal;
    for marker in ["+0x", "/0x"] {
        if let Some(i) = name.rfind(marker) {
            name = &name[..i];
        }
    }
    if let Some(i) = name.find("$$Lambda") {
        name = &name[..i + "$$Lambda".len()];
    }
    name.replace('/', ".")
}

/// Where `Thread::_thr_current` is: the TLS module id (as the dtv slot's
/// byte offset) and the offset in libjvm's block, found by trying every
/// TLS relocation's (module, offset) on the JVM's first Java threads:
/// the right one holds the thread itself. Needs no symbol table.
fn find_thread_tls(mem: &TargetMemory, vm: &VmStructs, libjvm: &Libjvm) -> Result<(u64, u64)> {
    let candidates = libjvm.tls_candidates(mem);
    if candidates.is_empty() {
        bail!("{}: no TLS relocations (Thread::_thr_current not found)", libjvm.path.display());
    }
    let threads = ThreadList::of(vm)?.read(mem, 8);
    if threads.is_empty() {
        bail!(NotReady("no Java threads yet".into()));
    }
    let osthread = vm.field(&["JavaThread", "Thread"], "_osthread")?;
    let pthread = vm.field(&["OSThread"], "_pthread_id")?;
    for jt in threads {
        let Some(fsbase) = mem.read_u64(jt + osthread).and_then(|os| mem.read_u64(os + pthread)) else { continue };
        let Some(dtv) = mem.read_u64(fsbase + 8) else { continue };
        for &(modid, offset) in &candidates {
            let Some(block) = mem.read_u64(dtv + 16 * modid) else { continue };
            if mem.read_u64(block.wrapping_add(offset)) == Some(jt) {
                return Ok((16 * modid, offset));
            }
        }
    }
    bail!("Thread::_thr_current not found in libjvm's TLS ({} candidates)", candidates.len())
}

/// Where a JVM lists its Java threads: the thread-SMR list where VMStructs
/// exports it (JDK 17 on: `ThreadsSMRSupport::_java_thread_list`, its
/// `_length` and `_threads`), else the linked list JDK 11 exports instead
/// (`Threads::_thread_list`, `JavaThread::_next`).
#[derive(Clone, Copy)]
enum ThreadList {
    Smr { list: u64, length: u64, threads: u64 },
    Linked { head: u64, next: u64 },
}

impl ThreadList {
    fn of(vm: &VmStructs) -> Result<Self> {
        if let Ok(list) = vm.field(&["ThreadsSMRSupport"], "_java_thread_list") {
            return Ok(ThreadList::Smr { list, length: vm.field(&["ThreadsList"], "_length")?, threads: vm.field(&["ThreadsList"], "_threads")? });
        }
        Ok(ThreadList::Linked { head: vm.field(&["Threads"], "_thread_list")?, next: vm.field(&["JavaThread"], "_next")? })
    }

    /// The first `max` Java threads (`JavaThread*`).
    fn read(self, mem: &TargetMemory, max: usize) -> Vec<u64> {
        match self {
            ThreadList::Smr { list, length, threads } => {
                let Some(list) = mem.read_u64(list).filter(|&l| l != 0) else { return Vec::new() };
                let mut n = [0u8; 4];
                if mem.read(list + length, &mut n).is_err() {
                    return Vec::new();
                }
                let n = (u32::from_le_bytes(n) as usize).min(max);
                let Some(threads) = mem.read_u64(list + threads) else { return Vec::new() };
                mem.read_region(threads, 8 * n)
                    .map(|b| b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
                    .unwrap_or_default()
            }
            ThreadList::Linked { head, next } => {
                let mut jt = mem.read_u64(head).unwrap_or(0);
                let mut out = Vec::new();
                while jt != 0 && out.len() < max {
                    out.push(jt);
                    jt = mem.read_u64(jt + next).unwrap_or(0);
                }
                out
            }
        }
    }
}

/// Whether a frame is a Java frame (named by [`Jvm::frames`]).
pub fn is_java_frame(f: &Frame) -> bool {
    f.module.as_deref() == Some(JAVA_MODULE)
}

/// Java code of the runtime: the JDK's packages, and the walker's own
/// markers (`[monitor enter]`, `[unknown]`).
pub fn is_jdk(function: &str) -> bool {
    const JDK: &[&str] = &["java.", "javax.", "jdk.", "sun.", "com.sun.", "["];
    JDK.iter().any(|p| function.starts_with(p))
}

/// Pool and driver libraries: they stay in the stack and name a finding's
/// `via`, but not its site while the application's code is below them.
pub fn is_java_library(function: &str) -> bool {
    const LIBRARIES: &[&str] = &[
        "org.apache.commons.pool2.",
        "org.apache.commons.dbcp2.",
        "com.zaxxer.hikari.",
        "io.lettuce.",
        "redis.clients.",
        "io.netty.",
        "org.postgresql.",
        "com.mysql.",
        "org.mariadb.",
        "okhttp3.",
        "org.apache.http.",
        "org.apache.hc.",
        "com.mongodb.",
        "org.springframework.",
        "reactor.",
        "kotlin.",
        "kotlinx.",
        "scala.",
    ];
    LIBRARIES.iter().any(|p| function.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_and_hidden_class_names_are_cleaned() {
        assert_eq!(clean_class_name("SockLoop$$Lambda$14+0x0000000800c0b000"), "SockLoop$$Lambda");
        assert_eq!(clean_class_name("com/acme/Pool$$Lambda$3/0x0000000800c03000"), "com.acme.Pool$$Lambda");
        assert_eq!(clean_class_name("java/lang/invoke/LambdaForm$MH+0x0000000800c10400"), "java.lang.invoke.LambdaForm$MH");
        assert_eq!(clean_class_name("com/acme/Pool$Entry"), "com.acme.Pool$Entry");
    }

    #[test]
    fn compressed_ints_decode_one_and_several_bytes() {
        let mut pos = 0;
        assert_eq!(read_compressed_int(&[5, 191], &mut pos, 0), Some(5));
        assert_eq!(read_compressed_int(&[5, 191], &mut pos, 0), Some(191));
        // 192 + (3 << 6)
        let mut pos = 0;
        assert_eq!(read_compressed_int(&[192, 3], &mut pos, 0), Some(192 + (3 << 6)));
        assert_eq!(pos, 2);
        // Truncated input is no number.
        let mut pos = 0;
        assert_eq!(read_compressed_int(&[200], &mut pos, 0), None);
        // UNSIGNED5 (JDK 20+): every byte one more, so 0 is written as 1
        // and 191 as 192; 192 + (3 << 6) as (193, 4).
        let mut pos = 0;
        assert_eq!(read_compressed_int(&[1, 192], &mut pos, 1), Some(0));
        assert_eq!(read_compressed_int(&[1, 192], &mut pos, 1), Some(191));
        let mut pos = 0;
        assert_eq!(read_compressed_int(&[193, 4], &mut pos, 1), Some(192 + (3 << 6)));
    }

    #[test]
    fn lines_come_from_the_entry_at_or_before_the_bci() {
        let m = MethodInfo { name: "A.b".into(), file: None, lines: vec![(0, 10), (4, 11), (9, 13), (7, 12)] };
        assert_eq!(m.line_of(4), Some(11));
        assert_eq!(m.line_of(8), Some(12));
        assert_eq!(m.line_of(100), Some(13));
        assert_eq!(m.line_of(u32::MAX as u64), Some(10));
        assert_eq!(m.line_of(u64::MAX), None);
        assert_eq!(MethodInfo { lines: Vec::new(), ..m }.line_of(3), None);
        assert_eq!(decode_sign(0), 0);
        assert_eq!(decode_sign(1), u32::MAX);
        assert_eq!(decode_sign(6), 3);
        assert_eq!(decode_sign(5) as i32, -3);
    }

    #[test]
    fn jdk_and_library_frames() {
        assert!(is_jdk("java.net.Socket.<init>"));
        assert!(is_jdk("jdk.internal.misc.Unsafe.park"));
        assert!(is_jdk("[monitor enter]"));
        assert!(!is_jdk("com.acme.Api.fetch"));
        assert!(is_java_library("org.apache.commons.pool2.impl.GenericObjectPool.borrowObject"));
        assert!(!is_java_library("com.acme.Api.fetch"));
    }
}
