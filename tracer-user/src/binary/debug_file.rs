//! Separate debug files: where distributions put what `strip` took out of
//! an object (`objcopy --only-keep-debug`), found the way gdb finds them —
//! by build id under `/usr/lib/debug/.build-id/xx/rest.debug`, else by the
//! object's `.gnu_debuglink` name next to it, in its `.debug/` directory or
//! under `/usr/lib/debug/<its directory>/`. A debug file only counts when
//! its build id matches the object's (or, without build ids, the debuglink
//! CRC does): a stale one describes other code.

use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};


/// The global debug directory (Debian's `*-dbg` / `*-dbgsym` packages).
pub const DEBUG_DIR: &str = "/usr/lib/debug";

/// How to find and recognise an object's separate debug file.
#[derive(Clone, Debug, Default)]
pub struct DebugLink {
    /// Where it may be, best first.
    pub candidates: Vec<PathBuf>,
    build_id: Option<Vec<u8>>,
    /// The CRC named by `.gnu_debuglink` (checked when there is no build id).
    crc: Option<u32>,
}

impl DebugLink {
    /// The debug link of the object `data`. `path` is the object's path as
    /// the target sees it; `root` is prefixed to every candidate
    /// (`/proc/PID/root` for a target in another mount namespace, `""`).
    pub fn of(data: &[u8], path: &Path, root: &str) -> Self {
        let Ok(file) = object::File::parse(data) else { return Self::default() };
        let mut link = Self::default();
        if let Ok(Some(id)) = file.build_id() {
            if id.len() >= 2 {
                let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
                link.candidates.push(PathBuf::from(format!("{root}{DEBUG_DIR}/.build-id/{}/{}.debug", &hex[..2], &hex[2..])));
                link.build_id = Some(id.to_vec());
            }
        }
        if let (Ok(Some((name, crc))), Some(dir)) = (file.gnu_debuglink(), path.parent()) {
            // A link is a file name, never a path.
            if let Some(name) = std::str::from_utf8(name).ok().filter(|n| !n.is_empty() && !n.contains('/')) {
                let dir = dir.display();
                link.candidates.push(PathBuf::from(format!("{root}{dir}/{name}")));
                link.candidates.push(PathBuf::from(format!("{root}{dir}/.debug/{name}")));
                link.candidates.push(PathBuf::from(format!("{root}{DEBUG_DIR}{dir}/{name}")));
                link.crc = Some(crc);
            }
        }
        link
    }

    /// Whether `debug` (a debug file's bytes) belongs to this object: the
    /// same build id, or without one the CRC the debuglink names.
    pub fn matches(&self, debug: &[u8]) -> bool {
        let Ok(dbg) = object::File::parse(debug) else { return false };
        match (&self.build_id, dbg.build_id()) {
            (Some(a), Ok(Some(b))) => a == b,
            (Some(_), _) => false,
            (None, _) => self.crc.is_some_and(|c| crc32(debug) == c),
        }
    }

    /// The first candidate that exists and belongs to the object, mapped.
    pub fn open(&self) -> Option<memmap2::Mmap> {
        self.candidates.iter().filter_map(|p| map(p)).find(|d| self.matches(d))
    }
}

fn map(path: &Path) -> Option<memmap2::Mmap> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: a read-only private mapping of a debug file; its bytes are
    // parsed (and the section wanted copied out) before it is dropped.
    unsafe { memmap2::Mmap::map(&file) }.ok()
}

/// The bytes of `.debug_frame` in a debug file (uncompressed) and its
/// address, if it has one.
pub fn debug_frame(debug: &[u8]) -> Option<(u64, Vec<u8>)> {
    let file = object::File::parse(debug).ok()?;
    let s = file.section_by_name(".debug_frame")?;
    let bytes = s.uncompressed_data().ok()?;
    (!bytes.is_empty()).then(|| (s.address(), bytes.into_owned()))
}

/// The CRC-32 (IEEE, as `.gnu_debuglink` uses) of `data`.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's libc6-dbg puts libc's debug file under its build id.
    #[test]
    fn finds_libcs_debug_file_by_build_id() {
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let Ok(data) = std::fs::read(libc) else { return };
        let link = DebugLink::of(&data, libc, "");
        let Some(debug) = link.candidates.iter().find(|p| p.exists()) else { return }; // libc6-dbg not installed
        assert!(debug.starts_with("/usr/lib/debug/.build-id/"), "{debug:?}");
        let bytes = std::fs::read(debug).unwrap();
        assert!(link.matches(&bytes));
        assert!(link.open().is_some());
        // Another object's debug file is refused.
        let ours = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!DebugLink::of(&ours, Path::new("/x/y"), "").matches(&bytes));
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
