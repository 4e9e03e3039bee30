//! What /proc says about the target: name, liveness, memory map, open fds.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// One line of /proc/PID/maps that maps a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    pub executable: bool,
    pub path: PathBuf,
    /// Device (major, minor) and inode of the mapped file: which file it
    /// is, whatever its path now names (another mount namespace, a file
    /// replaced or deleted since).
    pub dev: (u32, u32),
    pub inode: u64,
}

/// The target's file mappings, sorted by start address.
#[derive(Clone, Debug, Default)]
pub struct MemoryMap {
    pub mappings: Vec<Mapping>,
}

impl MemoryMap {
    /// A static program (Go, musl): mapped, and without a dynamic loader,
    /// which the kernel maps at exec; no libc will come.
    pub fn is_static(&self) -> bool {
        let dynamic = self.mappings.iter().any(|x| {
            x.path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ld-linux") || n.starts_with("ld-musl"))
        });
        !self.mappings.is_empty() && !dynamic
    }

    /// Reads /proc/PID/maps (file-backed mappings only).
    pub fn read(pid: u32) -> Result<Self> {
        let text = fs::read_to_string(format!("/proc/{pid}/maps"))
            .with_context(|| format!("cannot read /proc/{pid}/maps"))?;
        Ok(Self::parse(&text))
    }

    /// Parses the text of a maps file.
    pub fn parse(text: &str) -> Self {
        let mut mappings = Vec::new();
        for line in text.lines() {
            let mut it = line.split_ascii_whitespace();
            let (Some(range), Some(perms), Some(offset), Some(dev), Some(inode)) =
                (it.next(), it.next(), it.next(), it.next(), it.next())
            else {
                continue;
            };
            let path: String = it.collect::<Vec<_>>().join(" ");
            if !path.starts_with('/') {
                continue;
            }
            let path = path.trim_end_matches(" (deleted)");
            let Some((s, e)) = range.split_once('-') else { continue };
            let (Ok(start), Ok(end), Ok(offset)) = (
                u64::from_str_radix(s, 16),
                u64::from_str_radix(e, 16),
                u64::from_str_radix(offset, 16),
            ) else {
                continue;
            };
            let dev = dev
                .split_once(':')
                .and_then(|(ma, mi)| Some((u32::from_str_radix(ma, 16).ok()?, u32::from_str_radix(mi, 16).ok()?)))
                .unwrap_or((0, 0));
            mappings.push(Mapping {
                start,
                end,
                offset,
                executable: perms.as_bytes().get(2) == Some(&b'x'),
                path: PathBuf::from(path),
                dev,
                inode: inode.parse().unwrap_or(0),
            });
        }
        mappings.sort_by_key(|m| m.start);
        Self { mappings }
    }

    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    /// Adds mappings of `other` not known yet (keeps what an exited or
    /// unmapped object had, so old stacks still resolve). A mapping is
    /// known by its range *and* what it maps: another file (or another part
    /// of one) mapped at exactly the same range replaces the old entry.
    pub fn merge(&mut self, other: &MemoryMap) {
        let identity = |m: &Mapping| (m.start, m.end, m.offset, m.dev, m.inode, m.executable);
        let known: HashSet<_> = self.mappings.iter().map(identity).collect();
        let mut changed = false;
        for m in &other.mappings {
            if !known.contains(&identity(m)) {
                // A new mapping over an old range replaces it.
                self.mappings.retain(|o| o.end <= m.start || o.start >= m.end);
                self.mappings.push(m.clone());
                changed = true;
            }
        }
        if changed {
            self.mappings.sort_by_key(|m| m.start);
        }
    }
}

/// The `[start, end)` of the executable's code in the process (its
/// executable mappings of `/proc/PID/exe`).
pub fn exe_text(pid: u32, map: &MemoryMap) -> Option<(u64, u64)> {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let exe = exe.to_string_lossy();
    let exe = Path::new(exe.trim_end_matches(" (deleted)"));
    let text: Vec<&Mapping> = map.mappings.iter().filter(|m| m.executable && m.path == exe).collect();
    Some((text.iter().map(|m| m.start).min()?, text.iter().map(|m| m.end).max()?))
}

/// Whether the process exists and is not a zombie; an error when /proc
/// cannot tell (leaktrace out of descriptors or memory): a failure of our
/// own is never the target's death.
pub fn liveness(pid: u32) -> io::Result<bool> {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // State is the first field after the parenthesised comm.
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
            Ok(!matches!(state, Some('Z') | Some('X') | None))
        }
        Err(e) if is_gone(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether an error reading /proc/PID/... means the process is gone.
fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// [`liveness`], taking "cannot tell" for alive.
pub fn is_alive(pid: u32) -> bool {
    liveness(pid).unwrap_or(true)
}

/// Whether the process still has its address space. An exiting process
/// drops it (exit_mm) before its files are closed (exit_files), so fds that
/// vanish while this is true were closed, not torn down by exit.
pub fn has_memory(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_ascii_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .is_some_and(|pages| pages > 0)
}

/// Checks that `pid` names a live process, with a one-line error otherwise.
pub fn check_target(pid: u32) -> Result<()> {
    if pid == 0 {
        bail!("no such process: 0");
    }
    if !Path::new(&format!("/proc/{pid}")).exists() || !is_alive(pid) {
        bail!("no such process: {pid}");
    }
    if pid == std::process::id() {
        bail!("{pid} is leaktrace itself");
    }
    crate::privileges::check_process_access(pid)?;
    // Kernel threads have no executable and no user stack to attribute.
    if fs::read_link(format!("/proc/{pid}/exe")).is_err() && fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.is_empty()) {
        bail!("{pid} is a kernel thread: nothing to trace");
    }
    check_executable(Path::new(&format!("/proc/{pid}/exe")), &format!("{pid} ({})", comm(pid)))?;
    // Only whole processes: a thread id is not a target.
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    if let Some(tgid) = status.lines().find_map(|l| l.strip_prefix("Tgid:")) {
        let tgid: u32 = tgid.trim().parse().unwrap_or(pid);
        if tgid != pid {
            bail!("{pid} is a thread of process {tgid}: give the process id (--pid {tgid})");
        }
    }
    Ok(())
}

/// Refuses what the probes cannot read: a 32-bit or non-x86-64 ELF
/// executable (its syscalls and stacks are another ABI; traced, it would
/// silently show 0 events). Anything that is not ELF (a script before its
/// exec, an unreadable file) passes: its interpreter is judged after exec.
pub fn check_executable(path: &Path, who: &str) -> Result<()> {
    let mut head = [0u8; 20];
    let Ok(mut f) = fs::File::open(path) else { return Ok(()) };
    if io::Read::read_exact(&mut f, &mut head).is_err() || head[..4] != *b"\x7fELF" {
        return Ok(());
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    const EM_X86_64: u16 = 62;
    if head[4] != 2 || machine != EM_X86_64 {
        let what = if head[4] == 1 { "a 32-bit program".to_string() } else { format!("an ELF for machine {machine}") };
        bail!("{who} is {what}: leaktrace traces 64-bit x86-64 processes only");
    }
    Ok(())
}

/// The process's command name, or "?".
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Thread ids of the process (/proc/PID/task).
pub fn task_ids(pid: u32) -> io::Result<std::collections::HashSet<u32>> {
    let mut out = std::collections::HashSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(entry) = entry else { continue };
        if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            out.insert(tid);
        }
    }
    Ok(out)
}

/// A thread's name (/proc/PID/task/TID/comm), None when it is gone.
pub fn thread_comm(pid: u32, tid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok().map(|s| s.trim_end().to_string())
}

/// Open fds of the process with what each link names (`/proc/PID/fd/N`).
fn fd_links(pid: u32) -> io::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(target) = fs::read_link(entry.path()) {
            out.push((fd, target));
        }
    }
    Ok(out)
}

/// Open fds of the process that are sockets, with the socket's inode.
pub fn socket_fds(pid: u32) -> io::Result<HashMap<u32, u64>> {
    let mut out = HashMap::new();
    for (fd, target) in fd_links(pid)? {
        let t = target.to_string_lossy();
        if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            out.insert(fd, ino.parse().unwrap_or(0));
        }
    }
    Ok(out)
}

/// One open fd as /proc shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdEntry {
    /// The object it refers to: (device, inode) of the link's target. Anon
    /// inodes (eventfd, epoll...) share one inode per kind.
    pub identity: (u64, u64),
    /// `file`, `pipe`, `socket`, `epoll`, `eventfd`... from the link.
    pub kind: &'static str,
    /// Files: the path (` (deleted)` kept: the file was unlinked while open).
    pub path: Option<String>,
}

/// Every open fd of the process: what it is and which object it names.
pub fn fd_table(pid: u32) -> io::Result<HashMap<u32, FdEntry>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = HashMap::new();
    for (fd, target) in fd_links(pid)? {
        let link = target.to_string_lossy();
        let identity = fs::metadata(format!("/proc/{pid}/fd/{fd}")).map(|m| (m.dev(), m.ino())).unwrap_or((0, 0));
        let kind = fd_kind(&link);
        let path = (kind == "file").then(|| link.into_owned());
        out.insert(fd, FdEntry { identity, kind, path });
    }
    Ok(out)
}

/// The kind of object a `/proc/PID/fd` link names.
pub fn fd_kind(link: &str) -> &'static str {
    if link.starts_with("/memfd:") {
        return "memfd";
    }
    if link.starts_with('/') {
        return "file";
    }
    let Some((prefix, rest)) = link.split_once(':') else { return "other" };
    let name = rest.trim_start_matches('[').trim_end_matches(']');
    match (prefix, name) {
        ("socket", _) => "socket",
        ("pipe", _) => "pipe",
        ("anon_inode", "eventpoll") => "epoll",
        ("anon_inode", "eventfd") => "eventfd",
        ("anon_inode", "timerfd") => "timerfd",
        ("anon_inode", "signalfd") => "signalfd",
        ("anon_inode", "inotify") => "inotify",
        ("anon_inode", "fanotify") => "fanotify",
        ("anon_inode", "userfaultfd") => "userfaultfd",
        ("anon_inode", "pidfd") => "pidfd",
        ("anon_inode", "io_uring") => "io_uring",
        _ => "other",
    }
}

/// How many fds the process has open.
pub fn fd_count(pid: u32) -> io::Result<u64> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// The process's soft limit on open files (`Max open files` in
/// /proc/PID/limits); None when unlimited or unreadable.
pub fn open_files_limit(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_ascii_whitespace().next()?.parse().ok()
}

/// The cgroup directories of the process, innermost first, up to the root:
/// the v2 hierarchy's, else the v1 `controller` hierarchy's.
pub fn cgroup_dirs(pid: u32, controller: &str) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else { return Vec::new() };
    let mut found = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if ctrls.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            found = Some(PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/')));
            break;
        }
        if ctrls.split(',').any(|c| c == controller) {
            found = Some(PathBuf::from("/sys/fs/cgroup").join(controller).join(path.trim_start_matches('/')));
        }
    }
    let mut out = Vec::new();
    let mut dir = found;
    while let Some(d) = dir {
        if !d.starts_with("/sys/fs/cgroup") || d.as_os_str().len() < "/sys/fs/cgroup".len() {
            break;
        }
        dir = d.parent().map(Path::to_path_buf);
        out.push(d);
    }
    out
}

/// A cgroup file holding one number; None for `max`, a missing file or garbage.
pub fn cgroup_value(dir: &Path, file: &str) -> Option<u64> {
    fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
}

/// Threads on the whole system (`/proc/loadavg`'s scheduling entities) and
/// the kernel's limit (`/proc/sys/kernel/threads-max`).
pub fn system_threads() -> Option<(u64, u64)> {
    let load = fs::read_to_string("/proc/loadavg").ok()?;
    let total = load.split_ascii_whitespace().nth(3)?.split_once('/')?.1.parse().ok()?;
    let max = fs::read_to_string("/proc/sys/kernel/threads-max").ok()?.trim().parse().ok()?;
    Some((total, max))
}

/// The process's resident set, bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// A variable of the process's initial environment.
pub fn environ_var(pid: u32, name: &str) -> Option<String> {
    let data = fs::read(format!("/proc/{pid}/environ")).ok()?;
    data.split(|&b| b == 0).find_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        kv.strip_prefix(name)?.strip_prefix('=').map(str::to_string)
    })
}

/// Remote addresses of the process's TCP and UDP sockets by inode, from
/// /proc/PID/net/{tcp,tcp6,udp,udp6} (the target's network namespace).
pub fn net_peers(pid: u32) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    for (file, v6) in [("tcp", false), ("tcp6", true), ("udp", false), ("udp6", true)] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_ascii_whitespace().collect();
            let (Some(rem), Some(ino)) = (cols.get(2), cols.get(9)) else { continue };
            let Ok(ino) = ino.parse::<u64>() else { continue };
            if let Some(peer) = parse_net_addr(rem, v6) {
                out.insert(ino, peer);
            }
        }
    }
    out
}

/// The range of local ports for outgoing connections of `pid`'s network
/// namespace (`net.ipv4.ip_local_port_range`, also used for IPv6). A net
/// sysctl belongs to a namespace and /proc/sys shows the reader's: for a
/// target in another one (a container, `unshare -n`) it is read from a
/// thread that joins the target's namespace first. `None` when that cannot
/// be done: no figure rather than the host's.
pub fn local_port_range(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let theirs = format!("/proc/{pid}/ns/net");
    let same = fs::metadata("/proc/self/ns/net").ok()?.ino() == fs::metadata(&theirs).ok()?.ino();
    let text = if same {
        fs::read_to_string(RANGE).ok()?
    } else {
        let ns = fs::File::open(&theirs).ok()?;
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd; it changes only this
            // short-lived thread's network namespace.
            (unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0).then(|| fs::read_to_string(RANGE).ok()).flatten()
        })
        .join()
        .ok()??
    };
    let mut it = text.split_ascii_whitespace().map(|v| v.parse::<u64>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    (hi >= lo).then_some((lo, hi))
}

/// TCP sockets of the process's network namespace whose remote address is
/// `peer` (any state: `TIME_WAIT` ones still hold their local port).
pub fn tcp_sockets_to(pid: u32, peer: std::net::SocketAddr) -> u64 {
    let want = peer.to_string();
    let mut n = 0;
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else { continue };
        for line in text.lines().skip(1) {
            let rem = line.split_ascii_whitespace().nth(2);
            if rem.and_then(|r| parse_net_addr(r, v6)).is_some_and(|p| p == want) {
                n += 1;
            }
        }
    }
    n
}

/// `0100007F:18EB` -> `127.0.0.1:6379`; None for the unspecified address.
fn parse_net_addr(s: &str, v6: bool) -> Option<String> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Each 32-bit word is the raw in-memory value printed as a host
    // (little-endian) integer: its little-endian bytes are network order.
    let bytes: Vec<u8> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).map(u32::to_le_bytes))
        .collect::<Result<Vec<_>, _>>()
        .ok()?
        .concat();
    if port == 0 && bytes.iter().all(|&b| b == 0) {
        return None;
    }
    if !v6 && bytes.len() == 4 {
        return Some(format!("{}:{port}", std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])));
    }
    if bytes.len() == 16 {
        let mut b = [0u8; 16];
        b.copy_from_slice(&bytes);
        let ip = std::net::Ipv6Addr::from(b);
        return Some(match ip.to_ipv4_mapped() {
            Some(v4) => format!("{v4}:{port}"),
            None => format!("[{ip}]:{port}"),
        });
    }
    None
}

/// The file a mapping maps, as a path leaktrace can open and probe: the
/// path itself when it still names that file (same device and inode), else
/// the path in the target's mount namespace (`/proc/PID/root/...`: a
/// container's own libc), else the mapping itself (`/proc/PID/map_files/...`:
/// an executable replaced or deleted since it started). Symbols, syscall
/// sites and uprobes all go through here, so they are the target's file.
pub fn object_path(pid: u32, m: &Mapping) -> PathBuf {
    // Without CAP_SYS_ADMIN map_files cannot be opened: the best guess.
    verified_object_path(pid, m).unwrap_or_else(|| PathBuf::from(format!("/proc/{pid}/root{}", m.path.display())))
}

/// [`object_path`] when it is known to be the mapped file (same device and
/// inode, or the mapping itself); `None` rather than a guess.
pub fn verified_object_path(pid: u32, m: &Mapping) -> Option<PathBuf> {
    let candidates = [m.path.clone(), PathBuf::from(format!("/proc/{pid}/root{}", m.path.display()))];
    if m.inode == 0 {
        return Some(candidates.into_iter().find(|p| p.exists()).unwrap_or_else(|| map_files(pid, m)));
    }
    if let Some(path) = candidates.into_iter().find(|p| is_same_file(p, m)) {
        return Some(path);
    }
    Some(map_files(pid, m)).filter(|p| p.exists())
}

fn map_files(pid: u32, m: &Mapping) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
}

/// Whether `path` is the file `m` maps (device and inode).
fn is_same_file(path: &Path, m: &Mapping) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(path) else { return false };
    let dev = meta.dev();
    meta.ino() == m.inode && (libc::major(dev), libc::minor(dev)) == m.dev
}

/// The path of the process's executable as its memory map names it
/// (`/proc/PID/exe` without the ` (deleted)` of a replaced file).
pub fn exe_path(pid: u32) -> Option<PathBuf> {
    let link = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let text = link.to_str()?;
    Some(PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another file mapped at exactly an old mapping's range replaces it
    /// (its names were kept before); an unmapped one stays for old stacks.
    #[test]
    fn merge_replaces_a_same_range_mapping_of_another_file() {
        let old = Mapping { start: 0x1000, end: 0x3000, offset: 0, executable: true, path: "/old.so".into(), dev: (8, 1), inode: 7 };
        let gone = Mapping { start: 0x8000, end: 0x9000, path: "/gone.so".into(), inode: 9, ..old.clone() };
        let mut memory = MemoryMap { mappings: vec![old.clone(), gone.clone()] };
        let new = Mapping { path: "/new.so".into(), inode: 8, ..old.clone() };
        memory.merge(&MemoryMap { mappings: vec![new.clone()] });
        assert_eq!(memory.find(0x2000).map(|m| m.path.clone()), Some(new.path));
        assert_eq!(memory.find(0x8800).map(|m| m.path.clone()), Some(gone.path));
        assert_eq!(memory.mappings.len(), 2);
    }

    /// A mapping resolves to the file it maps: its path while that names
    /// the same inode, else the mapping itself (map_files, needs root).
    #[test]
    fn object_path_is_the_mapped_file() {
        let pid = std::process::id();
        let map = MemoryMap::read(pid).unwrap();
        let exe = exe_path(pid).unwrap();
        let m = map.mappings.iter().find(|m| m.path == exe && m.executable).unwrap();
        assert_eq!(object_path(pid, m), m.path);
        let replaced = Mapping { inode: m.inode + 1, ..m.clone() };
        let path = object_path(pid, &replaced);
        assert_ne!(path, m.path, "a path naming another inode was taken for the mapped file");
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(path, PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)));
        }
    }

    #[test]
    fn parses_proc_net_addresses() {
        assert_eq!(parse_net_addr("0100007F:18EB", false).as_deref(), Some("127.0.0.1:6379"));
        assert_eq!(parse_net_addr("00000000:0000", false), None);
        assert_eq!(
            parse_net_addr("00000000000000000000000001000000:1F90", true).as_deref(),
            Some("[::1]:8080")
        );
        assert_eq!(
            parse_net_addr("0000000000000000FFFF00000100007F:18EB", true).as_deref(),
            Some("127.0.0.1:6379")
        );
    }

    #[test]
    fn names_fd_kinds_from_links() {
        assert_eq!(fd_kind("/var/log/app.log"), "file");
        assert_eq!(fd_kind("pipe:[123]"), "pipe");
        assert_eq!(fd_kind("socket:[9]"), "socket");
        assert_eq!(fd_kind("anon_inode:[eventfd]"), "eventfd");
        assert_eq!(fd_kind("anon_inode:[eventpoll]"), "epoll");
        assert_eq!(fd_kind("anon_inode:inotify"), "inotify");
        assert_eq!(fd_kind("/memfd:cache (deleted)"), "memfd");
        assert_eq!(fd_kind("anon_inode:[io_uring]"), "io_uring");
        assert_eq!(fd_kind("weird"), "other");
    }

    #[test]
    fn parses_maps_and_finds_addresses() {
        let text = "\
55d0c0000000-55d0c0001000 r--p 00000000 fe:01 123 /usr/bin/demo
55d0c0001000-55d0c0002000 r-xp 00001000 fe:01 123 /usr/bin/demo
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 [heap]
7f1000028000-7f100019d000 r-xp 00028000 fe:01 456 /usr/lib/x86_64-linux-gnu/libc.so.6
";
        let map = MemoryMap::parse(text);
        assert_eq!(map.mappings.len(), 3);
        let m = map.find(0x55d0c0001234).unwrap();
        assert!(m.executable);
        assert_eq!((m.dev, m.inode), ((0xfe, 1), 123));
        assert_eq!(m.path, PathBuf::from("/usr/bin/demo"));
        assert!(map.find(0x7f0000000010).is_none());
        assert!(map.find(0x55d0c0002000).is_none());
    }
}
