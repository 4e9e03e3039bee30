//! `cargo xtask vm-test [--kernel 5.10|6.1|6.12|unstable|ci|all]`: boots
//! Debian cloud kernels in QEMU (TCG) with an initramfs that runs
//! `leaktrace check` against a leaking and a clean fixture per tracker
//! (connections, threads, locks, allocations), and checks the exit
//! statuses. A kernel older than leaktrace's floor (5.15) must instead be
//! refused with one `kernel too old: needs ...` line and exit 1.
//!
//! 6.1 and 6.12 come from the host's apt sources (Debian 12); 5.10
//! (Debian 11) and the newest kernel Debian ships (unstable) from private
//! apt lists in .cache/vm/apt-<suite>/ that leave the host's sources alone.

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::build;
use crate::cmd::{announce, fixtures_bin, is_root, leaktrace_bin, probe, run_cmd, target_dir};
use crate::setup::apt_install_missing;

/// What `vm-test` needs on the host besides `build`'s packages.
const VM_APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio"];
/// Host-side limit for one boot (TCG is 5-20x slower than the host).
const VM_TIMEOUT: Duration = Duration::from_secs(600);
/// The guest's test cases on a supported kernel: name, expected exit
/// status, leaktrace arguments. Under TCG the fixtures' default leak rates
/// are still judged `leak` within 8 s (see README, "CI smoke test in a VM").
const VM_CASES: &[(&str, i32, &str)] = &[
    ("conn-leak", 3, "check --for 8s --interval 1s -- /conn_leak"),
    ("conn-clean", 0, "check --for 8s --interval 1s -- /conn_leak --no-leak"),
    ("thread-leak", 3, "check --for 8s --interval 1s --track tasks -- /thread_leak"),
    ("thread-clean", 0, "check --for 8s --interval 1s --track tasks -- /thread_leak --no-leak"),
    ("lock-contended", 3, "check --for 6s --interval 1s --track locks --fail-on-wait 0.2 -- /lock_contention"),
    ("lock-calm", 0, "check --for 6s --interval 1s --track locks --fail-on-wait 0.2 -- /lock_contention --no-hot"),
    ("alloc-leak", 3, "check --for 8s --interval 1s --track allocations -- /alloc_leak"),
    ("alloc-clean", 0, "check --for 8s --interval 1s --track allocations -- /alloc_leak --no-leak"),
    // Files and pipes kept by two helpers beside a look-alike that closes
    // (the fds programs verified on each kernel).
    ("fd-leak", 3, "check --for 8s --interval 1s --track fds -- /fd_leak --dir /tmp"),
    // The Java walk (loaded only for JVM targets) verified on each kernel:
    // forced on for a native target, whose stacks it leaves native.
    ("java-walk-loads", 3, "LEAKTRACE_JAVA_WALK=1 check --for 8s --interval 1s --track connections,tasks,locks -- /conn_leak"),
    // The agent's hub (its route programs tail-calling the target's own
    // load) on each kernel: a running conn_leak picked up by `leaktrace
    // agent`, its leak judged on /metrics (exit 0 once seen; the script's
    // `agent_case`, not a single command).
    ("agent-hub", 0, AGENT_CASE),
];
/// The arguments that stand for the agent case's script.
const AGENT_CASE: &str = "agent --match comm=conn_leak (scraped by wget)";
/// The one case on a kernel older than the floor: refused with this line.
const TOO_OLD_CASE: (&str, i32, &str) = ("too-old", 1, "check --for 8s --interval 1s -- /conn_leak");
const TOO_OLD_LINE: &str = "leaktrace: error: kernel too old: needs Linux 5.15";
/// The fixtures the cases run (from fixtures/bin, at / in the guest).
const VM_FIXTURES: &[&str] = &["conn_leak", "thread_leak", "lock_contention", "alloc_leak", "fd_leak"];

/// A kernel series `vm-test` can boot: the label used on the command line and
/// in log names, the prefix of the version in Debian's package names
/// (`linux-image-6.1.0-56-cloud-amd64`, `linux-image-6.12.117+deb12-cloud-amd64-unsigned`;
/// empty: the newest of the suite), the Debian suite whose private apt
/// list to search (`None`: the host's), and whether leaktrace supports it.
struct KernelSeries {
    label: &'static str,
    version_prefix: &'static str,
    suite: Option<&'static str>,
    supported: bool,
}

const VM_KERNELS: &[KernelSeries] = &[
    KernelSeries { label: "5.10", version_prefix: "5.10.0-", suite: Some("bullseye"), supported: false },
    KernelSeries { label: "6.1", version_prefix: "6.1.0-", suite: None, supported: true },
    KernelSeries { label: "6.12", version_prefix: "6.12.", suite: None, supported: true },
    KernelSeries { label: "unstable", version_prefix: "", suite: Some("sid"), supported: true },
];
/// What CI boots: the oldest supported kernel and the newest.
const CI_KERNELS: &[&str] = &["6.1", "unstable"];

fn vm_cache(root: &Path) -> PathBuf {
    root.join(".cache").join("vm")
}

fn vm_out(root: &Path) -> PathBuf {
    target_dir(root).join("vm")
}

/// The numbers in a kernel version string, for ordering:
/// `6.1.0-56` -> [6, 1, 0, 56]; `6.12.117+deb12` -> [6, 12, 117, 12].
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Cloud kernel image packages of one series in `apt-cache search` output,
/// best first: newest version first, the signed package before the
/// `-unsigned` one of the same version (both carry the same bootable image).
/// Debug-symbol and meta packages are skipped.
fn kernel_candidates(apt_cache_search: &str, series: &KernelSeries) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = apt_cache_search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let rest = name.strip_prefix("linux-image-")?;
            let (version, flavour) = rest.split_once("-cloud-amd64")?;
            if !(flavour.is_empty() || flavour == "-unsigned") {
                return None;
            }
            if !version.starts_with(series.version_prefix) || version_key(version).len() < 4 {
                return None;
            }
            // The newest-of-a-suite series takes no kernel another series names.
            if series.version_prefix.is_empty()
                && VM_KERNELS.iter().any(|k| !k.version_prefix.is_empty() && version.starts_with(k.version_prefix))
            {
                return None;
            }
            Some((name.to_string(), version.to_string()))
        })
        .collect();
    found.sort_by(|a, b| {
        version_key(&b.1)
            .cmp(&version_key(&a.1))
            .then_with(|| a.0.ends_with("-unsigned").cmp(&b.0.ends_with("-unsigned")))
    });
    found.dedup();
    found
}

/// The vmlinuz inside an unpacked kernel package, if it is there:
/// boot/vmlinuz-X, or usr/lib/modules/X/vmlinuz (Debian 14's split packages).
fn unpacked_vmlinuz(dir: &Path) -> Option<PathBuf> {
    let boot = fs::read_dir(dir.join("boot"))
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(OsStr::to_str).is_some_and(|n| n.starts_with("vmlinuz-")));
    boot.or_else(|| {
        fs::read_dir(dir.join("usr/lib/modules"))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("vmlinuz")))
            .find(|p| p.is_file())
    })
}

/// Newest kernel of the series already unpacked in .cache/vm (used when apt
/// cannot tell us about one, e.g. offline).
fn cached_kernel(root: &Path, series: &KernelSeries) -> Option<(String, PathBuf)> {
    let mut found: Vec<(Vec<u64>, String, PathBuf)> = fs::read_dir(vm_cache(root))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let cands = kernel_candidates(&name, series);
            let (pkg, version) = cands.into_iter().next()?;
            let vmlinuz = unpacked_vmlinuz(&e.path())?;
            Some((version_key(&version), pkg, vmlinuz))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().next().map(|(_, pkg, v)| (pkg, v))
}

/// The newest Debian cloud kernel of the series apt knows about, downloaded
/// (`apt-get download`) and unpacked (`dpkg-deb -x`) into
/// .cache/vm/<package>/ unless it already is. Returns (package, vmlinuz).
/// When apt knows none, the newest one already in .cache/vm is used; when
/// the download fails (stale package lists), `apt-get update` and one retry.
fn fetch_kernel(root: &Path, series: &KernelSeries) -> Result<(String, PathBuf)> {
    match fetch_kernel_once(root, series) {
        Ok(hit) => Ok(hit),
        Err(e) => {
            if let Some(hit) = cached_kernel(root, series) {
                eprintln!("vm-test: {e:#}; using the cached {}", hit.0);
                return Ok(hit);
            }
            eprintln!("vm-test: {e:#}; refreshing package lists and retrying");
            match series.suite {
                None => run_cmd(Command::new("apt-get").arg("update"))?,
                s => update_private_list(root, s, true)?,
            }
            fetch_kernel_once(root, series)
        }
    }
}

/// apt options that read and write a private package list of one Debian
/// suite in .cache/vm/apt-<suite>/ (the host's sources are not touched);
/// none for the host's own lists.
fn apt_options(root: &Path, suite: Option<&str>) -> Result<Vec<String>> {
    let Some(suite) = suite else { return Ok(Vec::new()) };
    let dir = vm_cache(root).join(format!("apt-{suite}"));
    fs::create_dir_all(dir.join("lists").join("partial"))?;
    fs::create_dir_all(dir.join("cache").join("archives").join("partial"))?;
    let list = dir.join("sources.list");
    fs::write(
        &list,
        format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {suite} main\n"),
    )?;
    Ok(vec![
        format!("-oDir::Etc::SourceList={}", list.display()),
        "-oDir::Etc::SourceParts=/nonexistent".into(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oAPT::Sandbox::User=root".into(),
    ])
}

/// `apt-get update` of a private suite list when it has never been fetched.
fn update_private_list(root: &Path, suite: Option<&str>, force: bool) -> Result<()> {
    let Some(s) = suite else { return Ok(()) };
    let lists = vm_cache(root).join(format!("apt-{s}")).join("lists");
    let fetched = fs::read_dir(&lists).is_ok_and(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with("_Packages")));
    if force || !fetched {
        run_cmd(Command::new("apt-get").args(apt_options(root, suite)?).arg("update"))?;
    }
    Ok(())
}

fn fetch_kernel_once(root: &Path, series: &KernelSeries) -> Result<(String, PathBuf)> {
    let cache = vm_cache(root);
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    update_private_list(root, series.suite, false)?;
    let opts = apt_options(root, series.suite)?;
    let mut search_args: Vec<&str> = opts.iter().map(String::as_str).collect();
    search_args.extend(["search", "linux-image-.*cloud-amd64"]);
    let search = probe("apt-cache", &search_args).unwrap_or_default();
    let cands = kernel_candidates(&search, series);
    let Some(best_version) = cands.first().map(|c| c.1.clone()) else {
        bail!("apt-cache search finds no linux-image-{}*-cloud-amd64 package", series.version_prefix);
    };
    // Already unpacked (the signed or unsigned package of the newest version)?
    for (pkg, version) in &cands {
        if *version != best_version {
            break;
        }
        if let Some(vmlinuz) = unpacked_vmlinuz(&cache.join(pkg)) {
            eprintln!("vm-test: kernel {}: {pkg} (cached in {})", series.label, cache.display());
            return Ok((pkg.clone(), vmlinuz));
        }
    }
    let pkg = cands[0].0.clone();
    let dest = cache.join(&pkg);
    let tmp = cache.join(format!("{pkg}.partial"));
    let _ = fs::remove_dir_all(&tmp);
    let deb = download_deb(&debs, &opts, series, &pkg)?;
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    if unpacked_vmlinuz(&tmp).is_none() {
        // Newer suites split the image: linux-image-X depends on
        // linux-binary-X, which holds /boot/vmlinuz-X.
        let depends = probe("dpkg-deb", &["-f", deb.to_str().unwrap_or_default(), "Depends"]).unwrap_or_default();
        for binary in depends.split([',', '|']).map(|d| d.split_whitespace().next().unwrap_or("")).filter(|d| d.starts_with("linux-binary-")) {
            let bdeb = download_deb(&debs, &opts, series, binary)?;
            run_cmd(Command::new("dpkg-deb").arg("-x").arg(&bdeb).arg(&tmp))?;
        }
    }
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&tmp, &dest)?;
    let vmlinuz = unpacked_vmlinuz(&dest).ok_or_else(|| anyhow!("{} (and its linux-binary package) has no vmlinuz", deb.display()))?;
    eprintln!("vm-test: kernel {}: {pkg} unpacked into {}", series.label, dest.display());
    Ok((pkg, vmlinuz))
}

/// The .deb of `pkg` in `debs`, downloaded with `apt-get download` unless
/// it is there already.
fn download_deb(debs: &Path, opts: &[String], series: &KernelSeries, pkg: &str) -> Result<PathBuf> {
    let find_deb = || -> Option<PathBuf> {
        fs::read_dir(debs)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
    };
    if find_deb().is_none() {
        eprintln!("vm-test: kernel {}: downloading {pkg}", series.label);
        // As root into a directory `_apt` cannot write: download unsandboxed
        // without apt's warning about it.
        run_cmd(
            Command::new("apt-get")
                .current_dir(debs)
                .args(opts)
                .args(["-o", "APT::Sandbox::User=root", "download", pkg]),
        )?;
    }
    find_deb().ok_or_else(|| anyhow!("apt-get download {pkg} left no .deb in {}", debs.display()))
}

/// Shared libraries (and the dynamic loader) `ldd` lists for `bin`.
fn ldd_paths(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = probe("ldd", &[bin.to_str().unwrap_or_default()])
        .ok_or_else(|| anyhow!("ldd {} failed", bin.display()))?;
    let mut v = Vec::new();
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            v.push(PathBuf::from(p));
        }
    }
    Ok(v)
}

/// Copies `src` (following symlinks) to the same absolute path under `stage`.
fn stage_file(stage: &Path, src: &Path, at: &Path) -> Result<()> {
    let dest = stage.join(at.strip_prefix("/").unwrap_or(at));
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(src, &dest).with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    Ok(())
}

/// The guest's /init: mounts, loopback, the cases, result lines, poweroff.
fn vm_init_script() -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# Generated by `cargo xtask vm-test`.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
ip link set lo up
up() { cut -d' ' -f1 /proc/uptime; }
echo "VMTEST kernel=$(uname -r) uptime=$(up)s"
pass=0
fail=0
run_case() {
    name=$1; expected=$2; shift 2
    echo "VMTEST case=$name running: leaktrace $*"
    t0=$(up)
    /bin/leaktrace "$@" >/tmp/$name.out 2>/tmp/$name.err
    got=$?
    t1=$(up)
    if grep -q '^final report' /tmp/$name.out; then
        sed -n '/^final report/,$p' /tmp/$name.out
    else
        echo "(no final report; last lines of stdout:)"
        tail -n 20 /tmp/$name.out
    fi
    echo "--- leaktrace stderr:"
    cat /tmp/$name.err
    if [ "$got" = "$expected" ]; then r=PASS; pass=$((pass+1)); else r=FAIL; fail=$((fail+1)); fi
    echo "VMTEST case=$name expected=$expected got=$got $r (${t0}s..${t1}s)"
}
agent_case() {
    name=$1; expected=$2
    echo "VMTEST case=$name running: leaktrace agent with a conn_leak, /metrics read by wget"
    t0=$(up)
    /conn_leak >/dev/null 2>&1 &
    tp=$!
    /bin/leaktrace agent --match comm=conn_leak --interval 1s --for 60s --listen 127.0.0.1:9477 >/dev/null 2>/tmp/$name.err &
    ap=$!
    got=1; i=0
    while [ $i -lt 55 ]; do
        sleep 1; i=$((i+1))
        if wget -qO /tmp/$name.metrics http://127.0.0.1:9477/metrics 2>/dev/null && grep -q 'site="dial_cache",verdict="leak"' /tmp/$name.metrics; then got=0; break; fi
    done
    kill $ap $tp 2>/dev/null
    wait $ap 2>/dev/null
    t1=$(up)
    grep '^leaktrace_live_objects' /tmp/$name.metrics 2>/dev/null | head -n 5
    echo "--- leaktrace stderr:"
    cat /tmp/$name.err
    if [ "$got" = "$expected" ]; then r=PASS; pass=$((pass+1)); else r=FAIL; fail=$((fail+1)); fi
    echo "VMTEST case=$name expected=$expected got=$got $r (${t0}s..${t1}s)"
}
"#,
    );
    // A kernel below the floor (vmtest.cases=too-old on the command line)
    // runs one case, which must end with exactly one line on stderr.
    let (name, expected, args) = TOO_OLD_CASE;
    s.push_str(&format!(
        r#"if grep -q 'vmtest.cases=too-old' /proc/cmdline; then
run_case {name} {expected} {args}
if [ "$(wc -l < /tmp/{name}.err)" = 1 ] && grep -q '^{TOO_OLD_LINE}' /tmp/{name}.err; then echo "VMTEST line=ok"; else echo "VMTEST line=missing"; fail=$((fail+1)); fi
else
"#
    ));
    for (name, expected, args) in VM_CASES {
        if *args == AGENT_CASE {
            s.push_str(&format!("agent_case {name} {expected}\n"));
            continue;
        }
        // A leading `VAR=value` is the environment of that case only.
        match args.split_once(' ').filter(|(head, _)| head.contains('=')) {
            Some((env, rest)) => s.push_str(&format!("export {env}\nrun_case {name} {expected} {rest}\nunset {}\n", env.split('=').next().unwrap_or(env))),
            None => s.push_str(&format!("run_case {name} {expected} {args}\n")),
        }
    }
    s.push_str(
        r#"fi
echo "VMTEST DONE pass=$pass fail=$fail"
sync
poweroff -f
"#,
    );
    s
}

/// Builds target/vm/initramfs.img (cpio newc, gzip): busybox-static with its
/// applet links, /init, leaktrace, the fixtures, their libraries and loader.
fn build_initramfs(root: &Path) -> Result<PathBuf> {
    let out = vm_out(root);
    let stage = out.join("rootfs");
    let _ = fs::remove_dir_all(&stage);
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "root"] {
        fs::create_dir_all(stage.join(d))?;
    }
    let busybox = Path::new("/bin/busybox");
    stage_file(&stage, busybox, busybox)?;
    let applets = probe("/bin/busybox", &["--list-full"]).ok_or_else(|| anyhow!("/bin/busybox --list-full failed"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let link = stage.join(applet);
        if link.exists() {
            continue;
        }
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir)?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)?;
    }
    let leaktrace = leaktrace_bin(root);
    stage_file(&stage, &leaktrace, Path::new("/bin/leaktrace"))?;
    let mut bins = vec![leaktrace];
    for f in VM_FIXTURES {
        let bin = fixtures_bin(root).join(f);
        stage_file(&stage, &bin, &Path::new("/").join(f))?;
        bins.push(bin);
    }
    for bin in &bins {
        for lib in ldd_paths(bin)? {
            stage_file(&stage, &lib, &lib)?;
        }
    }
    fs::write(stage.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(stage.join("etc/group"), "root:x:0:\n")?;
    let init = stage.join("init");
    fs::write(&init, vm_init_script())?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let img = out.join("initramfs.img");
    let script = format!(
        "set -euo pipefail; cd '{}'; find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 > '{}'",
        stage.display(),
        img.display()
    );
    run_cmd(Command::new("bash").args(["-c", &script]))?;
    let size = fs::metadata(&img).map(|m| m.len()).unwrap_or(0);
    eprintln!("vm-test: {} ({:.1} MiB)", img.display(), size as f64 / 1048576.0);
    Ok(img)
}

/// The line without terminal escape sequences (SeaBIOS and the kernel send
/// `ESC c`, `ESC [2J`...: they would reset the terminal and clutter the log)
/// and other control characters but tab.
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: parameters and intermediates up to one final byte;
            // otherwise a two-character sequence (ESC c, ESC 7, ...).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('\x40'..='\x7e').contains(&c) {
                        break;
                    }
                }
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

struct BootResult {
    kernel: String,
    package: String,
    /// From QEMU's start to the guest's first line (its init running).
    booted_at: Option<Duration>,
    boot: Duration,
    done_at: Option<Duration>,
    vmtest_lines: Vec<String>,
    passed: bool,
    why: String,
}

/// Boots one kernel with the initramfs under TCG, streaming the serial
/// console to our stdout and to target/vm/<label>.log.
fn boot_vm(root: &Path, series: &KernelSeries, package: &str, vmlinuz: &Path, initrd: &Path) -> Result<BootResult> {
    let log_path = vm_out(root).join(format!("{}.log", series.label));
    let mut log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new("qemu-system-x86_64");
    // Single-threaded TCG: with one host thread per vCPU, unstable's 7.2
    // once died of `Oops: int3` in __schedule while a static key was being
    // patched (the alloc-clean case attaching); one thread cannot run a
    // stale translation of code another vCPU is patching.
    cmd.args(["-accel", "tcg,thread=single", "-cpu", "max", "-m", "1024M", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet vmtest.cases={}", if series.supported { "supported" } else { "too-old" }))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    announce(&cmd);
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<(Duration, String)>();
    let mut readers = Vec::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                let line = strip_escapes(String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']));
                let _ = tx.send((start.elapsed(), line));
                buf.clear();
            }
        }));
    }
    drop(tx);

    let mut lines = Vec::<(Duration, String)>::new();
    let mut timed_out = false;
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((t, line)) => {
                println!("{line}");
                let _ = writeln!(log, "{line}");
                lines.push((t, line));
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both streams closed: QEMU is exiting.
            Err(mpsc::RecvTimeoutError::Disconnected) => thread::sleep(Duration::from_millis(20)),
        }
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if start.elapsed() >= VM_TIMEOUT {
            timed_out = true;
            eprintln!("vm-test: no poweroff within {VM_TIMEOUT:?}; killing qemu");
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
    };
    let boot = start.elapsed();
    for r in readers {
        let _ = r.join();
    }
    for (t, line) in rx.try_iter() {
        println!("{line}");
        let _ = writeln!(log, "{line}");
        lines.push((t, line));
    }

    let vmtest_lines: Vec<String> = lines
        .iter()
        .filter_map(|(_, l)| l.find("VMTEST ").map(|i| l[i..].to_string()))
        .filter(|l| l.contains(" expected=") || l.starts_with("VMTEST DONE") || l.starts_with("VMTEST line="))
        .collect();
    let done = lines.iter().find(|(_, l)| l.contains("VMTEST DONE"));
    let done_at = done.map(|(t, _)| *t);
    let booted_at = lines.iter().find(|(_, l)| l.contains("VMTEST kernel=")).map(|(t, _)| *t);
    let cases: Vec<(&str, i32, &str)> = if series.supported { VM_CASES.to_vec() } else { vec![TOO_OLD_CASE] };
    let case_passed = |name: &str| {
        vmtest_lines
            .iter()
            .any(|l| l.starts_with(&format!("VMTEST case={name} expected=")) && l.split_whitespace().nth(4) == Some("PASS"))
    };
    let mut why = Vec::new();
    match done {
        None => why.push("no `VMTEST DONE` line".to_string()),
        Some((_, l)) if !l.contains(&format!("pass={} fail=0", cases.len())) => {
            why.push(format!("`{}`", l.trim()))
        }
        Some(_) => {}
    }
    if !series.supported && !vmtest_lines.iter().any(|l| l == "VMTEST line=ok") {
        why.push(format!("no single `{TOO_OLD_LINE}...` line"));
    }
    for (name, _, _) in &cases {
        if !case_passed(name) {
            why.push(format!("case {name} did not pass"));
        }
    }
    if timed_out {
        why.push(format!("timed out after {VM_TIMEOUT:?}"));
    } else if let Some(st) = status.filter(|s| !s.success()) {
        why.push(format!("qemu exited with {st}"));
    }
    let _ = writeln!(log, "# host: boot to qemu exit {:.1}s", boot.as_secs_f64());
    Ok(BootResult {
        kernel: series.label.to_string(),
        package: package.to_string(),
        booted_at,
        boot,
        done_at,
        vmtest_lines,
        passed: why.is_empty(),
        why: why.join("; "),
    })
}

fn labels() -> String {
    VM_KERNELS.iter().map(|k| k.label).collect::<Vec<_>>().join("|")
}

/// `all`, `ci` ([`CI_KERNELS`]) or a comma-separated list of labels.
fn select_kernels(which: &str) -> Result<Vec<&'static KernelSeries>> {
    let names: Vec<&str> = match which {
        "all" => VM_KERNELS.iter().map(|k| k.label).collect(),
        "ci" => CI_KERNELS.to_vec(),
        w => w.split(',').collect(),
    };
    names
        .into_iter()
        .map(|w| {
            VM_KERNELS
                .iter()
                .find(|k| k.label == w)
                .ok_or_else(|| anyhow!("vm-test: --kernel must be {}, ci or all (or a comma-separated list), not `{w}`", labels()))
        })
        .collect()
}

pub fn run(root: &Path, args: &[String]) -> Result<i32> {
    let mut which = "ci".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.split_once('=') {
            Some(("--kernel", v)) => which = v.to_string(),
            _ if a == "--kernel" => which = it.next().cloned().ok_or_else(|| anyhow!("--kernel needs a value"))?,
            _ => bail!("vm-test: unknown argument `{a}` (usage: vm-test [--kernel {}|ci|all])", labels()),
        }
    }
    let series = select_kernels(&which)?;

    build::run(root)?;
    if !is_root() {
        bail!("vm-test: must run as root (installs packages, downloads kernels)");
    }
    apt_install_missing(VM_APT_PACKAGES)?;
    for bin in std::iter::once(leaktrace_bin(root)).chain(VM_FIXTURES.iter().map(|f| fixtures_bin(root).join(f))) {
        if !bin.exists() {
            bail!("{} is missing: run `cargo xtask build`", bin.display());
        }
    }
    let kernels = series
        .iter()
        .map(|s| fetch_kernel(root, s).map(|(pkg, vmlinuz)| (*s, pkg, vmlinuz)))
        .collect::<Result<Vec<_>>>()?;
    fs::create_dir_all(vm_out(root))?;
    let initrd = build_initramfs(root)?;

    let mut results = Vec::new();
    for (s, pkg, vmlinuz) in &kernels {
        eprintln!("vm-test: booting {} ({pkg}) under TCG", s.label);
        let r = boot_vm(root, s, pkg, vmlinuz, &initrd)?;
        eprintln!(
            "vm-test: kernel {}: boot to poweroff {:.1}s{}: {}",
            r.kernel,
            r.boot.as_secs_f64(),
            r.done_at.map(|t| format!(" (VMTEST DONE at {:.1}s)", t.as_secs_f64())).unwrap_or_default(),
            if r.passed { "PASS".to_string() } else { format!("FAIL ({})", r.why) }
        );
        results.push(r);
    }

    eprintln!("\nvm-test summary (boot: QEMU start to the guest's init; total: to poweroff):");
    for r in &results {
        eprintln!(
            "  {:<8} {:<48} boot {:>5.1}s  total {:>6.1}s  {}  (log: {})",
            r.kernel,
            r.package,
            r.booted_at.map_or(f64::NAN, |t| t.as_secs_f64()),
            r.boot.as_secs_f64(),
            if r.passed { "PASS" } else { "FAIL" },
            vm_out(root).join(format!("{}.log", r.kernel)).display()
        );
        for l in &r.vmtest_lines {
            eprintln!("        {l}");
        }
    }
    Ok(if results.iter().all(|r| r.passed) { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEARCH: &str = "\
linux-image-6.1.0-47-cloud-amd64-dbg - Debug symbols for linux-image-6.1.0-47-cloud-amd64
linux-image-6.1.0-47-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-cloud-amd64-dbg - Debugging symbols for Linux cloud-amd64 configuration (meta-package)
linux-image-6.1.0-9-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-56-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-56-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-cloud-amd64 - Linux for x86-64 cloud (meta-package)
linux-image-6.12-cloud-amd64 - Linux for x86-64 cloud (meta-package)
linux-image-6.12.117+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.99+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
";

    #[test]
    fn strips_terminal_escapes() {
        assert_eq!(strip_escapes("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16)"), "SeaBIOS (version 1.16)");
        assert_eq!(strip_escapes("VMTEST DONE pass=2 fail=0\r"), "VMTEST DONE pass=2 fail=0");
    }

    #[test]
    fn picks_newest_cloud_kernel_per_series() {
        let c61 = kernel_candidates(SEARCH, &VM_KERNELS[1]);
        assert_eq!(c61[0].0, "linux-image-6.1.0-56-cloud-amd64");
        assert_eq!(c61[1].0, "linux-image-6.1.0-56-cloud-amd64-unsigned");
        assert_eq!(c61.last().unwrap().0, "linux-image-6.1.0-9-cloud-amd64");
        let c612 = kernel_candidates(SEARCH, &VM_KERNELS[2]);
        assert_eq!(c612[0].0, "linux-image-6.12.117+deb12-cloud-amd64-unsigned");
        assert_eq!(c612.len(), 2);
    }

    #[test]
    fn unstable_takes_the_newest_kernel_no_other_series_names() {
        let sid = "linux-image-7.2.13+deb14-cloud-amd64 - Linux 7.2.13 for x86-64 cloud\n\
                   linux-image-6.12.117+deb13-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)\n\
                   linux-image-7.1.4+deb14-cloud-amd64-unsigned - Linux 7.1.4 for x86-64 cloud\n";
        let c = kernel_candidates(sid, &VM_KERNELS[3]);
        assert_eq!(c.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), ["linux-image-7.2.13+deb14-cloud-amd64", "linux-image-7.1.4+deb14-cloud-amd64-unsigned"]);
        let old = "linux-image-5.10.0-32-cloud-amd64 - Linux 5.10 for x86-64 cloud (signed)\n";
        assert_eq!(kernel_candidates(old, &VM_KERNELS[0])[0].0, "linux-image-5.10.0-32-cloud-amd64");
    }

    #[test]
    fn kernel_selection() {
        let labels = |w: &str| select_kernels(w).unwrap().iter().map(|k| k.label).collect::<Vec<_>>();
        assert_eq!(labels("ci"), ["6.1", "unstable"]);
        assert_eq!(labels("all"), ["5.10", "6.1", "6.12", "unstable"]);
        assert_eq!(labels("5.10,6.12"), ["5.10", "6.12"]);
        assert!(select_kernels("4.19").is_err());
    }

    #[test]
    fn init_script_runs_every_tracker_and_the_too_old_case() {
        let s = vm_init_script();
        for t in ["--track tasks", "--track locks", "--track allocations", "--track fds", "/conn_leak --no-leak", "vmtest.cases=too-old"] {
            assert!(s.contains(t), "{t}");
        }
        // A case's environment is set for it alone.
        assert!(s.contains("export LEAKTRACE_JAVA_WALK=1\nrun_case java-walk-loads 3 check "), "{s}");
        assert!(s.contains("unset LEAKTRACE_JAVA_WALK\n"), "{s}");
    }
}
