//! Who a traced process is, for `leaktrace_target_info`: its command,
//! executable and build id, and the container and pod it runs in, derived
//! from its cgroup v2 path (`/proc/PID/cgroup`). The patterns recognised are
//! listed in docs/report.md ("Fleet: leaktrace agent").

use std::path::Path;

/// Identity of one traced process; every field is a label value (empty when
/// unknown).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub pid: u32,
    /// `/proc/PID/comm` when it was picked up.
    pub comm: String,
    /// `/proc/PID/exe` (a path inside the process's mount namespace).
    pub exe: String,
    /// The executable's GNU build id, hex (`.note.gnu.build-id`).
    pub build_id: String,
    /// The cgroup v2 path (`0::PATH` of `/proc/PID/cgroup`).
    pub cgroup: String,
    pub container: Container,
}

/// What a cgroup path says about the process's container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    /// The 64-hex-digit container id.
    pub id: String,
    /// `docker`, `containerd`, `cri-o`, `podman`, or `cri` for a kubepods
    /// cgroupfs path that does not name its runtime.
    pub runtime: String,
    /// The Kubernetes pod's uid (with dashes, as the API shows it).
    pub pod_uid: String,
    /// `besteffort`, `burstable`, or `guaranteed` for pods.
    pub qos_class: String,
    /// The systemd unit the process runs in (`nginx.service`), outside containers.
    pub systemd_unit: String,
}

impl Identity {
    /// Reads what /proc says of `pid`; fields that cannot be read stay empty.
    pub fn read(pid: u32) -> Self {
        let exe = crate::procfs::exe_path(pid).map(|p| p.display().to_string()).unwrap_or_default();
        let cgroup = cgroup_path(pid).unwrap_or_default();
        Identity {
            pid,
            comm: crate::procfs::comm(pid),
            build_id: crate::binary::elf::file_build_id(Path::new(&format!("/proc/{pid}/exe"))).unwrap_or_default(),
            container: Container::from_cgroup(&cgroup),
            exe,
            cgroup,
        }
    }
}

/// The cgroup v2 path of `pid` (the `0::` line of `/proc/PID/cgroup`), as
/// seen from leaktrace's own cgroup namespace.
pub fn cgroup_path(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    parse_cgroup_file(&text)
}

/// The unified hierarchy's path in a `/proc/PID/cgroup` text.
pub fn parse_cgroup_file(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// A container id: 64 hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Container {
    /// Reads a cgroup v2 path, segment by segment (the innermost match wins).
    pub fn from_cgroup(path: &str) -> Self {
        let mut c = Container::default();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let in_kubepods = segments.iter().any(|s| *s == "kubepods" || s.starts_with("kubepods.slice") || s.starts_with("kubepods-"));
        for (i, seg) in segments.iter().enumerate() {
            let parent = if i > 0 { segments[i - 1] } else { "" };
            // systemd driver: NAME-<id>.scope
            let scope = seg.strip_suffix(".scope");
            let found = [("docker-", "docker"), ("cri-containerd-", "containerd"), ("crio-", "cri-o"), ("libpod-", "podman")]
                .iter()
                .find_map(|(prefix, runtime)| {
                    let id = scope.unwrap_or(seg).strip_prefix(prefix)?;
                    is_container_id(id).then(|| (id.to_string(), runtime.to_string()))
                });
            if let Some((id, runtime)) = found {
                c.id = id;
                c.runtime = runtime;
            } else if is_container_id(seg) {
                // cgroupfs driver: /docker/<id>, /kubepods/<qos>/pod<uid>/<id>.
                c.id = seg.to_string();
                c.runtime = if parent == "docker" { "docker".into() } else if in_kubepods { "cri".into() } else { String::new() };
            }
            if let Some(uid) = pod_uid(seg) {
                c.pod_uid = uid;
            }
            if in_kubepods {
                for qos in ["besteffort", "burstable"] {
                    if *seg == qos || seg.strip_prefix("kubepods-").and_then(|s| s.strip_suffix(".slice")) == Some(qos) {
                        c.qos_class = qos.into();
                    }
                }
            }
            if seg.ends_with(".service") {
                c.systemd_unit = seg.to_string();
            }
        }
        if in_kubepods && !c.pod_uid.is_empty() && c.qos_class.is_empty() {
            // Guaranteed pods sit directly under kubepods.
            c.qos_class = "guaranteed".into();
        }
        if !c.id.is_empty() {
            c.systemd_unit.clear();
        }
        c
    }
}

/// The pod uid a kubepods segment names: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid with _ for ->.slice` (systemd).
fn pod_uid(seg: &str) -> Option<String> {
    let raw = if let Some(rest) = seg.strip_prefix("kubepods-").and_then(|s| s.strip_suffix(".slice")) {
        rest.rsplit_once("pod").map(|(_, uid)| uid).filter(|_| rest.contains("pod"))?
    } else {
        seg.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    let ok = uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    ok.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a5c9d0b1e4f6a8c7d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b";
    const UID: &str = "8d3c6e2a-1b4f-4a5e-9c7d-0e1f2a3b4c5d";

    fn c(path: &str) -> Container {
        Container::from_cgroup(path)
    }

    #[test]
    fn docker_both_drivers() {
        let x = c(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!((x.id.as_str(), x.runtime.as_str(), x.pod_uid.as_str()), (ID, "docker", ""));
        assert_eq!(x.systemd_unit, "");
        let x = c(&format!("/docker/{ID}"));
        assert_eq!((x.id.as_str(), x.runtime.as_str()), (ID, "docker"));
    }

    #[test]
    fn kubepods_systemd_driver_containerd_and_crio() {
        let u = UID.replace('-', "_");
        let x = c(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"));
        assert_eq!((x.id.as_str(), x.runtime.as_str(), x.pod_uid.as_str(), x.qos_class.as_str()), (ID, "containerd", UID, "burstable"));
        let x = c(&format!("/kubepods.slice/kubepods-pod{u}.slice/crio-{ID}.scope"));
        assert_eq!((x.id.as_str(), x.runtime.as_str(), x.pod_uid.as_str(), x.qos_class.as_str()), (ID, "cri-o", UID, "guaranteed"));
    }

    #[test]
    fn kubepods_cgroupfs_driver() {
        let x = c(&format!("/kubepods/besteffort/pod{UID}/{ID}"));
        assert_eq!((x.id.as_str(), x.runtime.as_str(), x.pod_uid.as_str(), x.qos_class.as_str()), (ID, "cri", UID, "besteffort"));
        let x = c(&format!("/kubepods/burstable/pod{UID}/crio-{ID}"));
        assert_eq!((x.runtime.as_str(), x.qos_class.as_str()), ("cri-o", "burstable"));
    }

    #[test]
    fn podman_and_systemd_units_and_plain_paths() {
        let x = c(&format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"));
        assert_eq!((x.id.as_str(), x.runtime.as_str(), x.systemd_unit.as_str()), (ID, "podman", ""));
        let x = c("/system.slice/nginx.service");
        assert_eq!((x.id.as_str(), x.systemd_unit.as_str()), ("", "nginx.service"));
        assert_eq!(c("/"), Container::default());
        assert_eq!(c("/user.slice/user-0.slice/session-3.scope"), Container::default());
        // Not 64 hex digits: not an id.
        assert_eq!(c("/docker/abc").id, "");
        assert_eq!(c("/kubepods/burstable/podnot-a-uid/x").pod_uid, "");
    }

    #[test]
    fn reads_the_unified_line() {
        assert_eq!(parse_cgroup_file("12:pids:/a\n0::/system.slice/x.service\n").as_deref(), Some("/system.slice/x.service"));
        assert_eq!(parse_cgroup_file("1:name=systemd:/\n"), None);
    }

    #[test]
    fn own_identity_has_exe_and_build_id() {
        let me = Identity::read(std::process::id());
        assert!(!me.exe.is_empty());
        // cargo links test binaries with a build id.
        assert!(me.build_id.len() >= 16, "{me:?}");
        assert!(me.cgroup.starts_with('/'), "{me:?}");
    }
}
