//! Reads a target's memory with `process_vm_readv`, many ranges per
//! system call: a Go process's goroutine table is thousands of small
//! records, and one syscall per record would cost more than the reading.
//! Fixed-size records into one buffer ([`TargetMemory::read_many`]), or
//! regions of any length ([`read_regions`], the map tracker's headers and
//! tries).
//! Never writes, never stops the target.

use std::io;

/// Read access to one process's memory.
#[derive(Clone, Copy, Debug)]
pub struct TargetMemory {
    pid: u32,
}

/// Ranges per system call (the kernel's UIO_MAXIOV).
const MAX_IOV: usize = 1024;

impl TargetMemory {
    pub fn new(pid: u32) -> Self {
        Self { pid }
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

/// Reads `regions` (address, length) of process `pid`, regions of any
/// length (map headers, trie nodes): a region that cannot be read comes
/// back as `None` and never stops the rest.
pub fn read_regions(pid: u32, regions: &[(u64, usize)]) -> Vec<Option<Vec<u8>>> {
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

/// One region, or `None` when it cannot be read whole.
pub fn read_region(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
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

    #[test]
    fn reads_own_memory_and_survives_bad_regions() {
        let a: u64 = 0x1122_3344_5566_7788;
        let b = [7u8; 16];
        let pid = std::process::id();
        let r = read_regions(pid, &[(&a as *const u64 as u64, 8), (8, 8), (b.as_ptr() as u64, 16)]);
        assert_eq!(r[0].as_deref().and_then(|x| u64_at(x, 0)), Some(a));
        assert!(r[1].is_none(), "address 8 is never mapped");
        assert_eq!(r[2].as_deref(), Some(&b[..]));
    }
}
