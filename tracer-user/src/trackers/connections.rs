//! Connection tracker, user side: reads per-stack socket totals from the
//! kernel, reconciles the live-socket table with /proc/PID/fd so a missed
//! event can never keep a closed connection "live", and yields one sample
//! per creation stack.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use aya::maps::{MapData, PerCpuHashMap};
use tracer_common::{
    connections::{counter, flag, ConnInfo, FdKey},
    stacks::{StackCounts, StackKey},
};

use super::{fd_table::LiveFds, stack_samples, Collected, Counters, Judging, LiveStack, StackSample, Tally, Target, Tracker, TrackerSpec};
use crate::{
    cli::TraceOptions,
    probes::{LoadSettings, Probes, Tracepoints},
    procfs,
    report::Kind,
};

/// The connection tracker in the registry (a default tracker).
pub const SPEC: TrackerSpec = TrackerSpec { name: "connections", default: true, configure, new };

/// The live-socket table: `--max-sockets` entries when the tracker runs,
/// one otherwise.
fn configure(load: &mut LoadSettings, opts: &TraceOptions, active: bool) {
    load.max_entries.push(("CONN_FDS", if active { opts.max_sockets } else { 1 }));
}

fn new(probes: &mut Probes, opts: &TraceOptions, target: &Target) -> Result<Box<dyn Tracker>> {
    let mut c = ConnectionCollector::new(probes, target.pid)?;
    c.max_inventory = (opts.max_sockets as usize).min(MAX_INVENTORY);
    Ok(Box::new(c))
}

/// The connection tracker's programs: exits only (arguments come from the
/// saved user registers), except close, which acts at entry.
const TRACEPOINTS: Tracepoints = &[
    ("conn_socket_exit", "syscalls", "sys_exit_socket"),
    ("conn_connect_exit", "syscalls", "sys_exit_connect"),
    ("conn_accept_exit", "syscalls", "sys_exit_accept"),
    ("conn_accept4_exit", "syscalls", "sys_exit_accept4"),
    ("conn_close_enter", "syscalls", "sys_enter_close"),
    ("conn_dup_exit", "syscalls", "sys_exit_dup2"),
    ("conn_dup_exit", "syscalls", "sys_exit_dup3"),
    ("conn_close_range_exit", "syscalls", "sys_exit_close_range"),
];

impl Tracker for ConnectionCollector {
    fn name(&self) -> &'static str {
        SPEC.name
    }

    fn tracepoints(&self) -> Tracepoints {
        TRACEPOINTS
    }

    fn poll(&mut self) {
        self.live.poll_close_ranges();
    }

    fn on_start(&mut self, _probes: &mut Probes, _target: &Target) {
        self.live.set_finalizer_range();
        self.take_inventory();
    }

    /// Only sockets of the old image: the new one may already have made its
    /// own (CLOEXEC too) by the time we hear of the exec.
    fn on_exec(&mut self, _probes: &mut Probes, _target: &Target, at_ns: u64) {
        self.live.end_where(|_, info| info.flags & flag::CLOEXEC != 0 && info.created_ns < at_ns);
        self.live.set_finalizer_range();
    }

    fn collect(&mut self, _probes: &mut Probes, target: &Target, counters: &super::Counters, now_ns: u64) -> Result<Collected> {
        let samples = self.collect_samples(now_ns, target.alive, counters.sum(tracer_common::connections::counter::EVENTS))?;
        Ok(Collected::Growth { kind: Kind::Connection, judging: Judging::ObjectsSinceAttach, samples })
    }

    /// `LOST_EVENTS`, `LOST_STACKS` and `LOST_RING` are shared by every
    /// tracker and counted by the session.
    fn tally(&self, counters: &Counters) -> Tally {
        Tally { events: vec![(Kind::Connection, counters.sum(counter::EVENTS))], ..Tally::default() }
    }
}

/// Reads the connection tracker's maps for one target.
pub struct ConnectionCollector {
    pid: u32,
    live: LiveFds<ConnInfo>,
    stacks: PerCpuHashMap<MapData, StackKey, StackCounts>,
    /// Per stack: sockets Go's finalizer goroutine closed.
    finalized: PerCpuHashMap<MapData, StackKey, u64>,
    /// Socket inode of each live entry (keyed with its creation time), as
    /// first seen in /proc: a different inode later means the fd was reused
    /// by a socket we did not see made, and ours is gone.
    inodes: HashMap<(FdKey, u64), u64>,
    /// Peers found in /proc/PID/net for live sockets the syscalls gave no
    /// address for (accept with a NULL address, sockets adopted at connect).
    net_peers: HashMap<(FdKey, u64), String>,
    /// Sockets that existed at attach: inode -> group (its peer, or
    /// [`NO_PEER`]); at most `max_inventory`, the rest counted.
    before_attach: HashMap<u64, String>,
    /// Bound on `before_attach`: `--max-sockets`, at most [`MAX_INVENTORY`].
    max_inventory: usize,
    /// The last inventory samples: kept once the target exited (the final
    /// report shows what was open then).
    last_inventory: Vec<StackSample>,
}

/// The group of sockets from before attach that have no peer (listening,
/// unconnected, Unix sockets).
pub const NO_PEER: &str = "no peer (listening, unconnected or unix)";
/// Sockets from before attach remembered at most (one inode and a group
/// name each); `--max-sockets` lowers it.
pub const MAX_INVENTORY: usize = 100_000;
/// Groups of sockets from before attach reported; the others are summed
/// into [`OTHER_PEERS`] (accepted connections have a peer each).
pub const MAX_INVENTORY_GROUPS: usize = 32;
/// The group the smaller groups are summed into.
pub const OTHER_PEERS: &str = "other peers";

impl ConnectionCollector {
    /// Takes the tracker's maps out of the loaded object.
    pub fn new(probes: &mut Probes, pid: u32) -> Result<Self> {
        probes.seed_overflow_stack::<StackCounts>("CONN_STACKS")?;
        Ok(Self {
            pid,
            live: LiveFds::new(probes, pid, "CONN_FDS", "CONN_EVENTS", "CONN_FINALIZER")?,
            stacks: probes.take_map("CONN_STACKS")?,
            finalized: probes.take_map("CONN_FINALIZED")?,
            inodes: HashMap::new(),
            net_peers: HashMap::new(),
            before_attach: HashMap::new(),
            max_inventory: MAX_INVENTORY,
            last_inventory: Vec::new(),
        })
    }

    /// The sockets the target already has at attach, by peer (from
    /// /proc/PID/net): their creation stacks are unknown, so they are
    /// reported as "before attach" groups, not given a stack.
    fn take_inventory(&mut self) {
        let Ok(sockets) = procfs::socket_fds(self.pid) else { return };
        if sockets.is_empty() {
            // /proc/PID/net lists the whole namespace: slow on a busy host.
            return;
        }
        let peers = procfs::net_peers(self.pid);
        let mut groups: HashMap<String, usize> = HashMap::new();
        for ino in sockets.values().take(self.max_inventory) {
            let peer = peers.get(ino).cloned().unwrap_or_else(|| NO_PEER.to_string());
            *groups.entry(peer.clone()).or_default() += 1;
            self.before_attach.insert(*ino, peer);
        }
        // Bounded: the biggest groups keep their peer, the rest are one group.
        let mut by_size: Vec<(String, usize)> = groups.into_iter().collect();
        by_size.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let kept: HashSet<String> = by_size.into_iter().take(MAX_INVENTORY_GROUPS).map(|g| g.0).collect();
        for group in self.before_attach.values_mut() {
            if !kept.contains(group) {
                *group = OTHER_PEERS.to_string();
            }
        }
        if sockets.len() > self.max_inventory {
            crate::output::warn(format!(
                "{} sockets existed at attach; only {} are counted as before attach (--max-sockets)",
                sockets.len(),
                self.max_inventory
            ));
        }
    }

    /// Samples of the sockets from before attach still open, one per group
    /// (`sockets`: the target's socket fds now; `tracked`: inodes the kernel
    /// side tracks, adopted at a `connect`).
    fn inventory_samples(&mut self, sockets: &HashMap<u32, u64>, tracked: &HashSet<u64>) -> Vec<StackSample> {
        let open: HashSet<u64> = sockets.values().copied().collect();
        self.before_attach.retain(|ino, _| open.contains(ino) && !tracked.contains(ino));
        let mut groups: HashMap<&str, u64> = HashMap::new();
        for group in self.before_attach.values() {
            *groups.entry(group.as_str()).or_default() += 1;
        }
        let mut out: Vec<StackSample> = groups
            .into_iter()
            .map(|(group, n)| StackSample {
                live: n,
                created: 0,
                peer: Some(group.to_string()),
                before_attach: true,
                ..Default::default()
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    /// One sample per creation stack. `now_ns` is CLOCK_MONOTONIC (the
    /// clock of `bpf_ktime_get_ns`). When the target is gone the table is
    /// left as it was at exit: the final report shows what was live then.
    /// `events`: the tracker's `EVENTS` counter, read before the table.
    pub fn collect_samples(&mut self, now_ns: u64, target_alive: bool, events: u64) -> Result<Vec<StackSample>> {
        self.live.poll_close_ranges();
        // Snapshot the table first, then /proc: a socket in the snapshot that
        // /proc no longer lists was closed without us seeing it.
        let live: Vec<(FdKey, ConnInfo)> = self.live.live(events);
        let mut stale = HashSet::new();
        // Nothing tracked and nothing from before attach: /proc has nothing
        // to tell, and nothing is left to remember of live sockets.
        if live.is_empty() {
            self.inodes.clear();
            self.net_peers.clear();
        }
        if target_alive && !(live.is_empty() && self.before_attach.is_empty()) {
            // Read the fds, then make sure the process was not tearing down
            // (its sockets vanish at exit without close events; the final
            // report must show what was live, not zero).
            let sockets = procfs::socket_fds(self.pid).ok().filter(|_| procfs::has_memory(self.pid));
            if let Some(sockets) = sockets {
                let mut need_peers = Vec::new();
                for (key, info) in &live {
                    let id = (*key, info.created_ns);
                    let gone = match sockets.get(&key.fd) {
                        None => true,
                        Some(&ino) => *self.inodes.entry(id).or_insert(ino) != ino,
                    };
                    if gone {
                        stale.insert(key.fd);
                        self.live.remove_stale(*key, *info);
                    } else if format_peer(info).is_none() && !self.net_peers.contains_key(&id) {
                        need_peers.push((id, sockets[&key.fd]));
                    }
                }
                if !need_peers.is_empty() {
                    let by_inode = procfs::net_peers(self.pid);
                    for (id, ino) in need_peers {
                        if let Some(p) = by_inode.get(&ino) {
                            self.net_peers.insert(id, p.clone());
                        }
                    }
                }
                // Bounded by the live table: forget what is no longer live.
                let ids: HashSet<(FdKey, u64)> = live
                    .iter()
                    .filter(|(k, _)| !stale.contains(&k.fd))
                    .map(|(k, i)| (*k, i.created_ns))
                    .collect();
                self.inodes.retain(|id, _| ids.contains(id));
                self.net_peers.retain(|id, _| ids.contains(id));
                if !self.before_attach.is_empty() {
                    let tracked: HashSet<u64> = self.inodes.values().copied().collect();
                    self.last_inventory = self.inventory_samples(&sockets, &tracked);
                }
            }
        }

        let mut per_stack: HashMap<StackKey, LiveStack> = HashMap::new();
        for (key, info) in live.iter().filter(|(k, _)| !stale.contains(&k.fd)) {
            let peer = format_peer(info).or_else(|| self.net_peers.get(&(*key, info.created_ns)).cloned());
            per_stack.entry(info.stack).or_default().add(info.created_ns, peer);
        }
        let finalized: HashMap<StackKey, u64> = self
            .finalized
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, per_cpu)| (k, per_cpu.iter().sum()))
            .collect();
        let is_go = self.live.is_go;
        let mut samples: Vec<StackSample> = stack_samples(&self.stacks, &self.live.reconciled, per_stack, now_ns)
            .into_iter()
            .map(|(sample, peer)| {
                let ended_by_finalizer = match &sample.stack {
                    crate::stacks::SampleStack::Kernel(k) if is_go => Some(finalized.get(k).copied().unwrap_or(0)),
                    _ => None,
                };
                StackSample { peer, ended_by_finalizer, ..sample }
            })
            .collect();
        samples.extend(self.last_inventory.iter().cloned());
        Ok(samples)
    }
}

/// `ip:port`, `[ip6]:port`, `unix:/path` or `unix:@abstract`; None when the
/// socket has no peer (listening, unconnected).
pub fn format_peer(info: &ConnInfo) -> Option<String> {
    let p = &info.peer;
    let family = u16::from_le_bytes([p[0], p[1]]);
    match family {
        2 => {
            let port = u16::from_be_bytes([p[2], p[3]]);
            let ip = Ipv4Addr::new(p[4], p[5], p[6], p[7]);
            (port != 0 || !ip.is_unspecified()).then(|| format!("{ip}:{port}"))
        }
        10 => {
            let port = u16::from_be_bytes([p[2], p[3]]);
            let mut b = [0u8; 16];
            b.copy_from_slice(&p[8..24]);
            let ip = Ipv6Addr::from(b);
            if let Some(v4) = ip.to_ipv4_mapped() {
                return Some(format!("{v4}:{port}"));
            }
            (port != 0 || !ip.is_unspecified()).then(|| format!("[{ip}]:{port}"))
        }
        1 => {
            let path = &p[2..];
            if path.first() == Some(&0) {
                let end = path[1..].iter().position(|&c| c == 0).map_or(path.len(), |e| e + 1);
                Some(format!("unix:@{}", String::from_utf8_lossy(&path[1..end])))
            } else {
                let end = path.iter().position(|&c| c == 0).unwrap_or(path.len());
                (end > 0).then(|| format!("unix:{}", String::from_utf8_lossy(&path[..end])))
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::connections::PEER_LEN;

    fn info(peer: &[u8]) -> ConnInfo {
        let mut p = [0u8; PEER_LEN];
        p[..peer.len()].copy_from_slice(peer);
        ConnInfo {
            stack: StackKey::default(),
            created_ns: 0,
            family: 0,
            sock_type: 1,
            origin: 1,
            flags: 0,
            _pad: [0; 2],
            peer: p,
        }
    }

    #[test]
    fn formats_peers() {
        assert_eq!(format_peer(&info(&[2, 0, 0x18, 0xeb, 127, 0, 0, 1])).as_deref(), Some("127.0.0.1:6379"));
        let mut v6 = vec![10, 0, 0x1f, 0x90, 0, 0, 0, 0];
        v6.extend_from_slice(&[0; 15]);
        v6.push(1);
        assert_eq!(format_peer(&info(&v6)).as_deref(), Some("[::1]:8080"));
        assert_eq!(format_peer(&info(&[1, 0, b'/', b'r', b'u', b'n'])).as_deref(), Some("unix:/run"));
        assert_eq!(format_peer(&info(&[0, 0])), None);
    }
}
