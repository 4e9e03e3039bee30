//! Map tracker: Go maps that grow, found at their rare growth events
//! (`runtime.hashGrow`, Swiss-table `growToTable`/`rehash`), then sized by
//! user space from the map header in the target's memory every interval.

use crate::stacks::StackKey;

/// Value of the tracked-map table (key: the map header's address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapInfo {
    /// Stack of the most recent growth (the inserting code, with
    /// `mapassign`'s return address from `[sp]` as `caller`).
    pub stack: StackKey,
    /// The map's hash seed when it registered (`hmap.hash0` <= 1.23,
    /// `maps.Map.seed` 1.24+), masked by `MAP_SEED_MASK`: a map at a reused
    /// address has another seed.
    pub seed: u64,
    /// `bpf_ktime_get_ns()` of the growth that registered this entry.
    pub first_ns: u64,
    /// `bpf_ktime_get_ns()` of the latest growth that took the stack (at
    /// most one stack walk per map per [`STACK_REFRESH_NS`]).
    pub last_ns: u64,
    /// Growth events seen since registration.
    pub grows: u32,
    /// `runtime.mapclear` calls seen (a clear draws a new seed: user space
    /// accepts one new seed per clear).
    pub clears: u32,
    /// What the address holds: [`KIND_MAP`] or [`KIND_TRIE`].
    pub kind: u32,
    pub _pad: u32,
    /// The map's type descriptor (`*maptype` / `*abi.SwissMapType`: the
    /// growth function's type argument; 0 for a trie): user space reads the
    /// bytes an entry takes from it.
    pub map_type: u64,
}

/// A Go map header (`hmap`, or `internal/runtime/maps.Map`).
pub const KIND_MAP: u32 = 0;
/// A Go 1.24+ `sync.Map`: an `internal/sync.HashTrieMap`, which keeps no
/// count; user space counts its entries by walking the trie.
pub const KIND_TRIE: u32 = 1;
/// Offset of `HashTrieMap.seed` (a random u64) in Go 1.24 to 1.27.
pub const TRIE_SEED_OFFSET: u64 = 40;

/// A tracked map's stack is taken again at a growth at most this often.
pub const STACK_REFRESH_NS: u64 = 1_000_000_000;
/// Maps (with a count) are registered from this many entries: most maps
/// are small and short-lived, and no leak is this small.
pub const MIN_REGISTER_ENTRIES: u64 = 256;

/// Tracked maps (entries). A full table counts in `counter::MAP_LOST`.
pub const MAX_TRACKED_MAPS: u32 = 4096;

/// Indexes of the `MAP_SEED` config array, written by user space after load.
pub mod seed {
    /// Byte offset in the map header of the 8 bytes that hold the seed.
    pub const OFFSET: u32 = 0;
    /// Mask applied to those 8 bytes (`hash0` is the upper half of the
    /// u64 at offset 8 in the classic `hmap`).
    pub const MASK: u32 = 1;
}

/// The maps tracker's slots in `COUNTERS` (see [`crate::counter`]).
pub mod counter {
    use crate::counter::MAPS as BASE;
    /// Growth and clear events of tracked maps.
    pub const EVENTS: u32 = BASE;
    /// Maps not tracked because the tracked-map table was full.
    pub const LOST: u32 = BASE + 1;
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::MapInfo {}
}
