//! Reads a target's memory with `process_vm_readv`, many ranges per
//! system call: a Go process's goroutine table is thousands of small
//! records, and one syscall per record would cost more than the reading.
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
}
