//! Reads of the target's memory, batched: one `process_vm_readv` for many
//! small regions (map headers, pointer-sized variables). A region that
//! cannot be read (unmapped) comes back as `None`; it never stops the rest.

/// Regions per `process_vm_readv` call (the kernel's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Reads `regions` (address, length) of process `pid`.
pub fn read_many(pid: u32, regions: &[(u64, usize)]) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::with_capacity(regions.len());
    for chunk in regions.chunks(IOV_MAX) {
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
                out.push(read_one(pid, chunk[i].0, len));
            }
        }
    }
    out
}

/// One region, or `None` when it cannot be read whole.
pub fn read_one(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    // SAFETY: as in read_many.
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
    fn reads_own_memory_and_survives_bad_regions() {
        let a: u64 = 0x1122_3344_5566_7788;
        let b = [7u8; 16];
        let pid = std::process::id();
        let r = read_many(pid, &[(&a as *const u64 as u64, 8), (8, 8), (b.as_ptr() as u64, 16)]);
        assert_eq!(r[0].as_deref().and_then(|x| u64_at(x, 0)), Some(a));
        assert!(r[1].is_none(), "address 8 is never mapped");
        assert_eq!(r[2].as_deref(), Some(&b[..]));
    }
}
