//! The one reader of a target's memory. A live process is read with
//! `process_vm_readv`, many ranges per system call: a Go process's
//! goroutine table is thousands of small records, and one syscall per
//! record would cost more than the reading. A core file (gdb's `gcore`) is
//! read from its PT_LOAD segments instead, so that the same goroutine and
//! map readers replay a known state in unit tests, without root or a kernel.
//! Fixed-size records into one buffer ([`TargetMemory::read_many`]), or
//! regions of any length ([`TargetMemory::read_regions`], the map
//! tracker's headers and tries).
//! Never writes, never stops the target.

use std::{io, path::Path, sync::Arc};

use anyhow::{anyhow, bail, Context, Result};

/// Read access to one process's memory, live or from a core file.
#[derive(Clone, Debug)]
pub struct TargetMemory {
    pid: u32,
    source: Source,
}

#[derive(Clone, Debug)]
enum Source {
    Process,
    Core(Arc<CoreImage>),
}

/// The memory a core file holds: its PT_LOAD segments over the file's bytes.
#[derive(Debug)]
pub struct CoreImage {
    data: Vec<u8>,
    /// (address, size in memory, file offset, size in the file), by address.
    segments: Vec<(u64, u64, u64, u64)>,
}

impl CoreImage {
    /// Reads an ELF core file (`gcore`'s output).
    pub fn open(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(data).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(data: Vec<u8>) -> Result<Self> {
        use object::read::elf::{FileHeader, ProgramHeader};
        let header = object::elf::FileHeader64::<object::Endianness>::parse(&*data).map_err(|e| anyhow!("not an ELF file: {e}"))?;
        let endian = header.endian().map_err(|e| anyhow!("{e}"))?;
        if header.e_type(endian) != object::elf::ET_CORE {
            bail!("not a core file");
        }
        let mut segments = Vec::new();
        for ph in header.program_headers(endian, &*data).map_err(|e| anyhow!("program headers: {e}"))? {
            if ph.p_type(endian) != object::elf::PT_LOAD {
                continue;
            }
            let (addr, memsz, off, filesz) = (ph.p_vaddr(endian), ph.p_memsz(endian), ph.p_offset(endian), ph.p_filesz(endian));
            // Bounded by what the file holds: a segment past its end is cut.
            let filesz = filesz.min(memsz).min((data.len() as u64).saturating_sub(off));
            segments.push((addr, memsz, off, filesz));
        }
        segments.sort_unstable();
        Ok(Self { data, segments })
    }

    /// Fills `buf` from `addr` if one segment holds all of it (bytes past
    /// a segment's file data read as zero, as gcore leaves them).
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let i = self.segments.partition_point(|s| s.0 <= addr);
        let Some(&(start, memsz, off, filesz)) = i.checked_sub(1).and_then(|i| self.segments.get(i)) else { return false };
        let rel = addr - start;
        if rel.checked_add(buf.len() as u64).is_none_or(|end| end > memsz) {
            return false;
        }
        buf.fill(0);
        if rel < filesz {
            let n = (filesz - rel).min(buf.len() as u64) as usize;
            let from = (off + rel) as usize;
            buf[..n].copy_from_slice(&self.data[from..from + n]);
        }
        true
    }
}

/// Ranges per system call (the kernel's UIO_MAXIOV).
const MAX_IOV: usize = 1024;

impl TargetMemory {
    /// A live process.
    pub fn new(pid: u32) -> Self {
        Self { pid, source: Source::Process }
    }

    /// The process a core file was taken of (`pid` only names it).
    pub fn core(pid: u32, core: Arc<CoreImage>) -> Self {
        Self { pid, source: Source::Core(core) }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fills `buf` from `addr`; an error unless every byte was read.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let ok = self.read_many(&[addr], buf.len(), buf);
        if ok.first() == Some(&true) {
            Ok(())
        } else {
            Err(io::Error::other(format!("cannot read {} bytes at {addr:#x} in {}", buf.len(), self.pid)))
        }
    }

    pub fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }

    /// Reads `len` bytes at each of `addrs` into consecutive slots of
    /// `out` (resized to `addrs.len() * len`); per range, whether it was
    /// read whole. An unreadable range (unmapped, freed) costs one more
    /// call and leaves its slot zeroed.
    pub fn read_many(&self, addrs: &[u64], len: usize, out: &mut [u8]) -> Vec<bool> {
        let mut ok = vec![false; addrs.len()];
        if len == 0 || out.len() < addrs.len() * len {
            return ok;
        }
        if let Source::Core(core) = &self.source {
            for (i, &a) in addrs.iter().enumerate() {
                let slot = &mut out[i * len..(i + 1) * len];
                ok[i] = core.read(a, slot);
                if !ok[i] {
                    slot.fill(0);
                }
            }
            return ok;
        }
        let mut i = 0;
        while i < addrs.len() {
            let n = (addrs.len() - i).min(MAX_IOV);
            let local: Vec<libc::iovec> = (0..n)
                .map(|k| libc::iovec { iov_base: out[(i + k) * len..].as_mut_ptr().cast(), iov_len: len })
                .collect();
            let remote: Vec<libc::iovec> =
                (0..n).map(|k| libc::iovec { iov_base: addrs[i + k] as *mut libc::c_void, iov_len: len }).collect();
            // SAFETY: every local iovec points into `out`, `len` bytes each,
            // inside its bounds (checked above); remote addresses are only
            // read by the kernel, in the other process.
            let got = unsafe {
                libc::process_vm_readv(self.pid as libc::pid_t, local.as_ptr(), n as _, remote.as_ptr(), n as _, 0)
            };
            if got < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
                    break; // the target is gone
                }
                // The first range failed: skip it.
                i += 1;
                continue;
            }
            let whole = (got as usize / len).min(n);
            for slot in ok.iter_mut().skip(i).take(whole) {
                *slot = true;
            }
            // The kernel stops at the first range it cannot read whole: skip it.
            i += if whole == n { n } else { whole + 1 };
        }
        ok
    }
}

impl TargetMemory {
    /// Reads `regions` (address, length), regions of any length (map
    /// headers, trie nodes): a region that cannot be read comes back as
    /// `None` and never stops the rest.
    pub fn read_regions(&self, regions: &[(u64, usize)]) -> Vec<Option<Vec<u8>>> {
        match &self.source {
            Source::Process => read_regions(self.pid, regions),
            Source::Core(_) => regions.iter().map(|&(a, len)| self.read_region(a, len)).collect(),
        }
    }

    /// One region, or `None` when it cannot be read whole.
    pub fn read_region(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        match &self.source {
            Source::Process => read_region(self.pid, addr, len),
            Source::Core(core) => {
                let mut buf = vec![0u8; len];
                core.read(addr, &mut buf).then_some(buf)
            }
        }
    }
}

/// Live-process [`TargetMemory::read_regions`].
fn read_regions(pid: u32, regions: &[(u64, usize)]) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::with_capacity(regions.len());
    for chunk in regions.chunks(MAX_IOV) {
        let mut bufs: Vec<Vec<u8>> = chunk.iter().map(|&(_, len)| vec![0u8; len]).collect();
        let local: Vec<libc::iovec> =
            bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        let remote: Vec<libc::iovec> =
            chunk.iter().map(|&(addr, len)| libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len }).collect();
        // SAFETY: every local iovec points into a live buffer of its length;
        // remote addresses are only read by the kernel, which checks them.
        let n = unsafe {
            libc::process_vm_readv(pid as libc::pid_t, local.as_ptr(), local.len() as _, remote.as_ptr(), remote.len() as _, 0)
        };
        // The kernel stops at the first region it cannot read: those before
        // it are complete, the rest are retried one by one.
        let mut done = n.max(0) as usize;
        for (i, buf) in bufs.into_iter().enumerate() {
            let len = chunk[i].1;
            if done >= len {
                done -= len;
                out.push(Some(buf));
            } else {
                done = 0;
                out.push(read_region(pid, chunk[i].0, len));
            }
        }
    }
    out
}

/// Live-process [`TargetMemory::read_region`].
fn read_region(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    // SAFETY: as in read_regions.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    (n == len as isize).then_some(buf)
}

/// The little-endian u64 at `off` of a buffer.
pub fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_in_batches_and_skips_holes() {
        let data: Vec<u64> = (0..3000).collect();
        let mem = TargetMemory::new(std::process::id());
        let mut addrs: Vec<u64> = data.iter().map(|v| v as *const u64 as u64).collect();
        addrs[5] = 8; // unmapped
        let mut out = vec![0u8; addrs.len() * 8];
        let ok = mem.read_many(&addrs, 8, &mut out);
        assert!(!ok[5]);
        for (i, &good) in ok.iter().enumerate() {
            if i != 5 {
                assert!(good, "range {i}");
                assert_eq!(u64::from_le_bytes(out[i * 8..i * 8 + 8].try_into().unwrap()), i as u64);
            }
        }
        assert_eq!(mem.read_u64(&data[7] as *const u64 as u64), Some(7));
        assert_eq!(mem.read_u64(16), None);

    }

    /// A core of two PT_LOADs: 16 bytes of data at 0x1000 (memsz 32: the
    /// rest reads as zeros) and a zero-only one at 0x5000, plus one whose
    /// header points past the file (cut, not trusted).
    fn tiny_core() -> Vec<u8> {
        let mut d = vec![0u8; 64];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2; // 64-bit
        d[5] = 1; // little-endian
        d[6] = 1;
        d[16..18].copy_from_slice(&object::elf::ET_CORE.to_le_bytes());
        d[18..20].copy_from_slice(&object::elf::EM_X86_64.to_le_bytes());
        d[20..24].copy_from_slice(&1u32.to_le_bytes());
        d[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        d[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let data_at: u64 = 64 + 3 * 56;
        for (vaddr, off, filesz, memsz) in [(0x1000u64, data_at, 16u64, 32u64), (0x5000, 0, 0, 4096), (0x9000, 1 << 40, 4096, 4096)] {
            let mut h = [0u8; 56];
            h[..4].copy_from_slice(&object::elf::PT_LOAD.to_le_bytes());
            h[8..16].copy_from_slice(&off.to_le_bytes());
            h[16..24].copy_from_slice(&vaddr.to_le_bytes());
            h[32..40].copy_from_slice(&filesz.to_le_bytes());
            h[40..48].copy_from_slice(&memsz.to_le_bytes());
            d.extend(h);
        }
        d.extend(1..=16u8);
        d
    }

    #[test]
    fn reads_a_core_file_like_a_process() {
        let mem = TargetMemory::core(7, Arc::new(CoreImage::parse(tiny_core()).unwrap()));
        assert_eq!(mem.pid(), 7);
        assert_eq!(mem.read_u64(0x1000), Some(u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8])));
        // Across the end of the file data: zeros follow.
        let r = mem.read_region(0x100c, 8).unwrap();
        assert_eq!(r, [13, 14, 15, 16, 0, 0, 0, 0]);
        assert_eq!(mem.read_region(0x5000, 4096).map(|b| b.iter().all(|&x| x == 0)), Some(true));
        // Past a segment's end, in no segment, a header past the file.
        assert_eq!(mem.read_region(0x101c, 8), None);
        assert_eq!(mem.read_region(0x3000, 1), None);
        assert_eq!(mem.read_region(0x9000, 8).map(|b| b.iter().all(|&x| x == 0)), Some(true));
        let mut out = vec![0u8; 16];
        assert_eq!(mem.read_many(&[0x1000, 0x3000], 8, &mut out), [true, false]);
        assert!(CoreImage::parse(b"\x7fELF".to_vec()).is_err());
    }

    #[test]
    fn reads_own_memory_and_survives_bad_regions() {
        let a: u64 = 0x1122_3344_5566_7788;
        let b = [7u8; 16];
        let pid = std::process::id();
        let r = TargetMemory::new(pid).read_regions(&[(&a as *const u64 as u64, 8), (8, 8), (b.as_ptr() as u64, 16)]);
        assert_eq!(r[0].as_deref().and_then(|x| u64_at(x, 0)), Some(a));
        assert!(r[1].is_none(), "address 8 is never mapped");
        assert_eq!(r[2].as_deref(), Some(&b[..]));
    }
}
