//! Stack keys from the kernel to symbolized frames, cached per key.

use std::collections::HashMap;

use anyhow::{anyhow, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, StackTraceMap},
    Ebpf,
};
use tracer_common::{
    jvm::JAVA_STACK,
    stacks::{StackKey, WalkedFrames, COLLIDED_STACK, OVERFLOW_STACK, PROVISIONAL_KEY, UNWOUND_STACK},
};

use crate::{
    stacks::SampleStack,
    procfs::MemoryMap,
    report::Frame,
    stacks::symbolize::{lookup_addr, SymbolizerService},
};

/// Resolves [`StackKey`]s of one target; results are cached for the session
/// (stack ids are stable: the stack map is never cleared while tracing).
pub struct StackResolver {
    pid: u32,
    traces: StackTraceMap<MapData>,
    /// Stacks walked with unwind rules (`UNWOUND_STACK` keys).
    unwound: BpfHashMap<MapData, u64, WalkedFrames>,
    /// Stacks walked by the programs when their `STACKS` bucket was taken.
    collided: BpfHashMap<MapData, u64, WalkedFrames>,
    /// Java stacks of a JVM target (`JAVA_STACK` keys), named by `java`.
    java_stacks: BpfHashMap<MapData, u64, WalkedFrames>,
    /// The JVM being traced, once its walk is set up.
    pub java: Option<crate::stacks::jvm::Jvm>,
    symbolizer: SymbolizerService,
    cache: HashMap<SampleStack, Vec<Frame>>,
}

impl StackResolver {
    /// Takes the shared `STACKS` and `UNWOUND_STACKS` maps out of the loaded object.
    pub fn new(ebpf: &mut Ebpf, pid: u32, symbolizer: SymbolizerService) -> Result<Self> {
        let map = ebpf.take_map("STACKS").ok_or_else(|| anyhow!("STACKS map missing"))?;
        let unwound = ebpf.take_map("UNWOUND_STACKS").ok_or_else(|| anyhow!("UNWOUND_STACKS map missing"))?;
        let collided = ebpf.take_map("STACK_FRAMES").ok_or_else(|| anyhow!("STACK_FRAMES map missing"))?;
        let java_stacks = ebpf.take_map("JAVA_STACKS").ok_or_else(|| anyhow!("JAVA_STACKS map missing"))?;
        Ok(Self {
            pid,
            traces: StackTraceMap::try_from(map)?,
            unwound: BpfHashMap::try_from(unwound)?,
            collided: BpfHashMap::try_from(collided)?,
            java_stacks: BpfHashMap::try_from(java_stacks)?,
            java: None,
            symbolizer,
            cache: HashMap::new(),
        })
    }

    /// The traced process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The raw addresses of a stack, innermost first: walked with unwind
    /// rules, or the kernel's with the wrapper's caller put back after the
    /// first frame.
    pub fn addresses(&self, key: &StackKey) -> Vec<u64> {
        let walked = match key.stack_id {
            UNWOUND_STACK => Some(&self.unwound),
            COLLIDED_STACK => Some(&self.collided),
            _ => None,
        };
        if let Some(table) = walked {
            return match crate::stacks::walked_stack(table, key.caller) {
                SampleStack::Addresses(a) => a,
                SampleStack::Kernel(_) | SampleStack::Java(_) => Vec::new(),
            };
        }
        if key.stack_id < 0 {
            return Vec::new();
        }
        let Ok(trace) = self.traces.get(&(key.stack_id as u32), 0) else { return Vec::new() };
        let mut addrs: Vec<u64> = trace.frames().iter().map(|f| f.ip).collect();
        if key.caller != 0 && !addrs.is_empty() {
            addrs.insert(1, key.caller);
        }
        addrs
    }

    /// Frames of each stack, resolving the ones not seen before in one batch.
    /// Stacks read from the target's memory are cached too: the same
    /// addresses name the same frames for the whole session.
    pub async fn resolve(&mut self, keys: &[SampleStack], map: &MemoryMap) -> HashMap<SampleStack, Vec<Frame>> {
        let mut missing: Vec<SampleStack> = keys.iter().filter(|k| !self.cache.contains_key(k)).cloned().collect();
        missing.sort();
        missing.dedup();
        // Java stacks are named from the JVM's own metadata, not by blazesym.
        let (java, missing): (Vec<SampleStack>, Vec<SampleStack>) =
            missing.into_iter().partition(|k| matches!(k, SampleStack::Kernel(key) if key.stack_id == JAVA_STACK) || matches!(k, SampleStack::Java(_)));
        for key in java {
            let frames = self.java_frames(&key);
            self.cache.insert(key, frames);
        }
        let mut out_of_cache = HashMap::new();
        if !missing.is_empty() {
            let stacks: Vec<Vec<u64>> = missing
                .iter()
                .map(|k| match k {
                    SampleStack::Kernel(key) => self.addresses(key),
                    SampleStack::Addresses(a) => a.clone(),
                    SampleStack::Java(_) => Vec::new(),
                })
                .collect();
            let lookups: Vec<u64> =
                stacks.iter().flat_map(|s| s.iter().enumerate().map(|(i, &a)| lookup_addr(i, a))).collect();
            let resolved = self.symbolizer.resolve(self.pid, map.clone(), lookups).await;
            let mut it = resolved.into_iter();
            for (key, addrs) in missing.iter().zip(stacks) {
                let mut frames = Vec::new();
                for _ in &addrs {
                    frames.extend(it.next().unwrap_or_default());
                }
                if frames.is_empty() {
                    frames.push(placeholder(key));
                }
                if matches!(key, SampleStack::Kernel(k) if k.caller & PROVISIONAL_KEY != 0 && k.stack_id == UNWOUND_STACK) {
                    // Finished later from its snapshot: not final yet.
                    out_of_cache.insert(key.clone(), frames);
                    continue;
                }
                self.cache.insert(key.clone(), frames);
            }
        }
        let mut out: HashMap<SampleStack, Vec<Frame>> =
            keys.iter().filter_map(|k| self.cache.get(k).map(|f| (k.clone(), f.clone()))).collect();
        out.extend(out_of_cache);
        out
    }
}

impl StackResolver {
    /// Names the Java stacks the kernel recorded since the last call, while
    /// the JVM is there to be read: a JVM that exits before a report asks
    /// for them still gets its names (they are read from its memory).
    pub fn name_new_java_stacks(&mut self) {
        if self.java.is_none() {
            return;
        }
        let keys: Vec<u64> = self.java_stacks.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let key = SampleStack::Kernel(StackKey { stack_id: JAVA_STACK, caller: k });
            if !self.cache.contains_key(&key) {
                let frames = self.java_frames(&key);
                self.cache.insert(key, frames);
            }
        }
    }

    /// The frames of a Java stack (`JAVA_STACK` key), named by the JVM.
    fn java_frames(&mut self, key: &SampleStack) -> Vec<Frame> {
        let frames = match (key, self.java.as_mut()) {
            (SampleStack::Java(ips), Some(jvm)) => jvm.frames(ips),
            (SampleStack::Kernel(k), Some(jvm)) => match self.java_stacks.get(&k.caller, 0) {
                Ok(f) => jvm.frames(&f.ips[..(f.len as usize).min(f.ips.len())]),
                Err(_) => Vec::new(),
            },
            _ => Vec::new(),
        };
        if frames.is_empty() {
            return vec![placeholder(key)];
        }
        frames
    }
}

/// Functions of the frames that stand for a stack the kernel could not keep.
const PLACEHOLDERS: [&str; 2] = ["[stack table full]", "[stack not recorded]"];

/// The frame shown for a stack the kernel could not keep.
fn placeholder(key: &SampleStack) -> Frame {
    let function = if *key == SampleStack::Kernel(OVERFLOW_STACK) { PLACEHOLDERS[0] } else { PLACEHOLDERS[1] };
    Frame { function: function.into(), file: None, line: None, module: None, addr: None, file_offset: None }
}

/// Whether resolved frames are a placeholder: a bucket of objects whose
/// stacks were lost, which holds unrelated stacks and is never judged.
pub fn is_placeholder(frames: &[Frame]) -> bool {
    matches!(frames, [f] if PLACEHOLDERS.contains(&f.function.as_str()))
}
