//! `cargo xtask cores`: core files (gdb's `gcore`) of the Go fixtures at
//! known states, for every Go version the project builds, into
//! target/cores/: `<fixture>.core` next to a copy of the executable it was
//! taken of (`<fixture>`), so that a later fixture rebuild cannot pair a
//! core with another build. tracer-user/tests/cores.rs replays them through
//! the goroutine and map readers (no root, no kernel); it skips, saying
//! why, when they are absent. A few hundred MiB in all: not committed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::bench::Lines;
use crate::build;
use crate::cmd::{announce, fixtures_bin, stop_child, target_dir};

/// Suffixes of the Go fixture builds: Debian's 1.19, then setup's extra
/// toolchains, and the newest stripped.
pub const GO_BUILDS: &[&str] = &["", "122", "124", "125", "127", "127-stripped"];
/// Leaked sessions in the goroutineleak state (`-hold`).
pub const HOLD: u32 = 50;
/// Inserts per map in the mapgrow state (`-fill`); above mapgrow's bound (2000).
pub const FILL: u32 = 3000;

/// (fixture base name, arguments, the line that says the state is reached).
const STATES: &[(&str, &str, &str)] = &[("goroutineleak", "-hold", "held"), ("mapgrow-go", "-fill", "filled")];

pub fn cores_dir(root: &Path) -> PathBuf {
    target_dir(root).join("cores")
}

/// Runs `exe args`, waits for `line`, takes a core with gcore, stops it.
fn take_core(exe: &Path, args: &[String], line: &str, core: &Path) -> Result<()> {
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
    announce(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting {}", exe.display()))?;
    let mut out = Lines::new(child.stdout.take().expect("piped"));
    if !out.wait_line(line, Duration::from_secs(60)) {
        stop_child(&mut child, "fixture");
        bail!("{} did not print `{line}`", exe.display());
    }
    // File-backed mappings too (the executable's read-only data: wait
    // reason strings, type names), which gcore skips by default (0x33).
    fs::write(format!("/proc/{}/coredump_filter", child.id()), "0x3f")?;
    let prefix = core.with_extension("gcore");
    let mut gcore = Command::new("gcore");
    gcore.arg("-o").arg(&prefix).arg(child.id().to_string()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    announce(&gcore);
    let ok = gcore.status().is_ok_and(|s| s.success());
    stop_child(&mut child, "fixture");
    let written = PathBuf::from(format!("{}.{}", prefix.display(), child.id()));
    if !ok || !written.exists() {
        bail!("gcore of {} failed (is gdb installed? `cargo xtask setup`)", exe.display());
    }
    let compacted = compact_core(&written, core);
    let _ = fs::remove_file(&written);
    compacted
}

/// Rewrites an ELF core without its zero pages: gcore writes every page of
/// every mapping, and a Go program's reserved heap arenas make that over a
/// GiB of zeros. Each PT_LOAD is split into runs of data (kept) and runs of
/// at least [`ZERO_RUN`] zero pages (a PT_LOAD with no file bytes, which
/// readers fill with zeros); notes are kept as they are.
fn compact_core(src: &Path, dst: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    const PAGE: usize = 4096;
    const ZERO_RUN: usize = 16;
    let mut f = fs::File::open(src)?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh)?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        bail!("{} is not a 64-bit little-endian ELF file", src.display());
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(&eh, 0x20), u16_at(&eh, 0x36) as usize, u16_at(&eh, 0x38) as usize);
    let mut ph = vec![0u8; phentsize * phnum];
    f.seek(SeekFrom::Start(phoff))?;
    f.read_exact(&mut ph)?;
    // (header fields, where its bytes come from in `src`: offset, length).
    struct Seg {
        ptype: u32,
        flags: u32,
        vaddr: u64,
        memsz: u64,
        align: u64,
        from: Option<(u64, u64)>,
    }
    let mut segs = Vec::new();
    let mut page = vec![0u8; PAGE];
    for h in ph.chunks(phentsize) {
        let (ptype, flags) = (u32_at(h, 0), u32_at(h, 4));
        let (off, vaddr, filesz, memsz, align) = (u64_at(h, 8), u64_at(h, 16), u64_at(h, 32), u64_at(h, 40), u64_at(h, 48));
        if ptype != 1 {
            segs.push(Seg { ptype, flags, vaddr, memsz, align, from: Some((off, filesz)) });
            continue;
        }
        // Runs of pages: (start within the segment, length, zero?).
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        f.seek(SeekFrom::Start(off))?;
        let mut at = 0u64;
        while at < filesz {
            let n = (filesz - at).min(PAGE as u64) as usize;
            f.read_exact(&mut page[..n])?;
            let zero = page[..n].iter().all(|&b| b == 0);
            match runs.last_mut() {
                Some(r) if r.2 == zero => r.1 += n as u64,
                _ => runs.push((at, n as u64, zero)),
            }
            at += n as u64;
        }
        // Short zero runs stay data (fewer headers).
        let mut merged: Vec<(u64, u64, bool)> = Vec::new();
        for (start, len, zero) in runs {
            let zero = zero && len >= (ZERO_RUN * PAGE) as u64;
            match merged.last_mut() {
                Some(r) if r.2 == zero => r.1 += len,
                _ => merged.push((start, len, zero)),
            }
        }
        if memsz > filesz {
            merged.push((filesz, memsz - filesz, true));
        }
        for (start, len, zero) in merged {
            segs.push(Seg { ptype, flags, vaddr: vaddr + start, memsz: len, align, from: (!zero).then_some((off + start, len)) });
        }
    }
    if segs.len() > 60_000 {
        bail!("{}: {} segments after compaction", src.display(), segs.len());
    }
    let mut out = std::io::BufWriter::new(fs::File::create(dst)?);
    let mut header = eh;
    header[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    header[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    header[0x38..0x3a].copy_from_slice(&(segs.len() as u16).to_le_bytes());
    // No section headers in the copy.
    header[0x28..0x30].copy_from_slice(&0u64.to_le_bytes());
    header[0x3c..0x40].copy_from_slice(&[0, 0, 0, 0]);
    out.write_all(&header)?;
    let mut data_at = 64 + 56 * segs.len() as u64;
    for s in &segs {
        let (off, filesz) = match s.from {
            Some((_, len)) => {
                data_at = data_at.next_multiple_of(8);
                let at = data_at;
                data_at += len;
                (at, len)
            }
            None => (0, 0),
        };
        let mut h = [0u8; 56];
        h[0..4].copy_from_slice(&s.ptype.to_le_bytes());
        h[4..8].copy_from_slice(&s.flags.to_le_bytes());
        h[8..16].copy_from_slice(&off.to_le_bytes());
        h[16..24].copy_from_slice(&s.vaddr.to_le_bytes());
        h[32..40].copy_from_slice(&filesz.to_le_bytes());
        h[40..48].copy_from_slice(&(if s.ptype == 1 { s.memsz } else { filesz }).to_le_bytes());
        h[48..56].copy_from_slice(&s.align.to_le_bytes());
        out.write_all(&h)?;
    }
    let mut written = 64 + 56 * segs.len() as u64;
    for s in &segs {
        let Some((from, len)) = s.from else { continue };
        let pad = written.next_multiple_of(8) - written;
        out.write_all(&vec![0u8; pad as usize])?;
        written += pad;
        f.seek(SeekFrom::Start(from))?;
        std::io::copy(&mut (&mut f).take(len), &mut out)?;
        written += len;
    }
    out.flush()?;
    Ok(())
}

/// `cargo xtask cores`.
pub fn run(root: &Path) -> Result<i32> {
    // Setup (gdb, the Go toolchains) and the fixtures.
    build::run(root)?;
    let dir = cores_dir(root);
    fs::create_dir_all(&dir)?;
    for (base, flag, line) in STATES {
        let n = if *flag == "-hold" { HOLD } else { FILL };
        for suffix in GO_BUILDS {
            let name = format!("{base}{suffix}");
            let src = fixtures_bin(root).join(&name);
            if !src.exists() {
                bail!("{} is missing: run `cargo xtask fixtures`", src.display());
            }
            let exe = dir.join(&name);
            fs::copy(&src, &exe)?;
            let core = dir.join(format!("{name}.core"));
            take_core(&exe, &[flag.to_string(), n.to_string()], line, &core)?;
            let size = fs::metadata(&core).map(|m| m.len()).unwrap_or(0);
            eprintln!("cores: {} ({:.1} MiB)", core.display(), size as f64 / 1048576.0);
        }
    }
    eprintln!("cores: replay with `cargo test --release -p tracer-user --test cores`");
    Ok(0)
}
