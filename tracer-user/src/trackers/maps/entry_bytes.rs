//! The memory one more entry of a Go map takes, read from the map's type
//! descriptor (the growth function's type argument, kept by the kernel side
//! in `MapInfo::map_type`): what time to exhaustion multiplies a map's
//! entry slope by (`judge::exhaustion`).
//!
//! A map's memory is its slots: a classic map's buckets hold 8 tophash
//! bytes, 8 keys, 8 elems and an overflow pointer (`BucketSize`); a Swiss
//! table's groups an 8-byte control word and 8 slots (`GroupSize`). A map
//! grows when its slots are 6.5/8 (classic) or 7/8 (Swiss) full, so one
//! entry costs at least a slot divided by that load. Keys or elems over 128
//! bytes live outside the slot (the slot holds a pointer): their size is
//! added. What keys and elems point to (a string's bytes, a struct behind a
//! pointer) is not counted: the figure is a lower bound, and the time to
//! exhaustion it gives an upper bound.
//!
//! Offsets, checked against the DWARF of the Go 1.19, 1.22, 1.24, 1.25 and
//! 1.27 fixtures: `Type.Size_` is the uintptr at 0 of every type; the map
//! type (`runtime.maptype`, `abi.MapType`, `abi.SwissMapType`, 1.27's
//! `abi.MapType`) has `Key *Type` at 48 and `Elem *Type` at 56; classic
//! `BucketSize` is a u16 at 82, Swiss `GroupSize` a uintptr at 80.

use std::collections::HashMap;

use crate::binary::golang::memory::{u64_at, TargetMemory};

const KEY_AT: usize = 48;
const ELEM_AT: usize = 56;
const BUCKET_SIZE_AT: usize = 82;
const GROUP_SIZE_AT: usize = 80;
/// Bytes of the map type read (every field above).
const DESCRIPTOR_LEN: usize = 88;
/// Keys and elems larger than this are stored indirectly (both layouts).
const MAX_INLINE: u64 = 128;
/// An entry of a Go 1.24+ `sync.Map`'s trie (`entry[any, any]`: `isEntry`
/// padded to 8, the overflow pointer, two interfaces).
pub const TRIE_ENTRY_BYTES: u64 = 48;

/// Memory per entry of a map whose type descriptor is `descriptor`, with
/// key and elem types of `key_size` and `elem_size` bytes; `None` for a
/// descriptor that is no map type.
pub fn per_entry(swiss: bool, descriptor: &[u8], key_size: u64, elem_size: u64) -> Option<u64> {
    let slot = if swiss {
        u64_at(descriptor, GROUP_SIZE_AT)? / 8
    } else {
        u64::from(u16::from_le_bytes(descriptor.get(BUCKET_SIZE_AT..BUCKET_SIZE_AT + 2)?.try_into().ok()?)) / 8
    };
    // A slot holds at least a control byte and a pointer; no group is 1 MiB.
    if !(2..=1 << 17).contains(&slot) {
        return None;
    }
    // slot / (6.5/8) or slot / (7/8), rounded up.
    let (num, den) = if swiss { (8, 7) } else { (16, 13) };
    let outside = |size: u64| if size > MAX_INLINE { size.min(1 << 30) } else { 0 };
    Some((slot * num).div_ceil(den) + outside(key_size) + outside(elem_size))
}

/// Bytes per entry by type descriptor address, read once each (types live
/// in the binary's read-only data for the program's lifetime).
#[derive(Default)]
pub struct EntryBytes {
    known: HashMap<u64, Option<u64>>,
}

/// Type descriptors remembered (a program has few map types; a bound all
/// the same: past it, new ones are read every time).
const MAX_TYPES: usize = 4096;

impl EntryBytes {
    /// Memory per entry of the maps of type `map_type` (0: unknown).
    pub fn of(&mut self, mem: &TargetMemory, swiss: bool, map_type: u64) -> Option<u64> {
        if map_type == 0 {
            return None;
        }
        if let Some(&b) = self.known.get(&map_type) {
            return b;
        }
        let b = read(mem, swiss, map_type);
        if self.known.len() < MAX_TYPES {
            self.known.insert(map_type, b);
        }
        b
    }
}

fn read(mem: &TargetMemory, swiss: bool, map_type: u64) -> Option<u64> {
    let d = mem.read_region(map_type, DESCRIPTOR_LEN)?;
    let size_of = |ptr: u64| if ptr == 0 { None } else { mem.read_u64(ptr) };
    let key = size_of(u64_at(&d, KEY_AT)?)?;
    let elem = size_of(u64_at(&d, ELEM_AT)?)?;
    per_entry(swiss, &d, key, elem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(at: usize, value: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; DESCRIPTOR_LEN];
        d[at..at + value.len()].copy_from_slice(value);
        d
    }

    #[test]
    fn string_to_string_maps() {
        // map[string]string, classic: 8 + 8*16 + 8*16 + 8 = 272-byte buckets.
        let classic = descriptor(BUCKET_SIZE_AT, &272u16.to_le_bytes());
        assert_eq!(per_entry(false, &classic, 16, 16), Some(42)); // 34 / 0.8125
        // Swiss: 8 + 8*32 = 264-byte groups.
        let swiss = descriptor(GROUP_SIZE_AT, &264u64.to_le_bytes());
        assert_eq!(per_entry(true, &swiss, 16, 16), Some(38)); // 33 / 0.875
    }

    #[test]
    fn large_elems_live_outside_the_slot() {
        // map[int][256]byte: the slot holds an 8-byte key and a pointer.
        let swiss = descriptor(GROUP_SIZE_AT, &(8u64 + 8 * 16).to_le_bytes());
        assert_eq!(per_entry(true, &swiss, 8, 256), Some(20 + 256));
    }

    #[test]
    fn garbage_is_no_map_type() {
        assert_eq!(per_entry(true, &[0u8; DESCRIPTOR_LEN], 8, 8), None);
        assert_eq!(per_entry(true, &descriptor(GROUP_SIZE_AT, &u64::MAX.to_le_bytes()), 8, 8), None);
        assert_eq!(per_entry(false, &[0u8; 10], 8, 8), None);
        assert_eq!(EntryBytes::default().of(&TargetMemory::new(std::process::id()), true, 0), None);
    }
}
