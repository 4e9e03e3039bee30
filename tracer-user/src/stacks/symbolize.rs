//! Addresses to frames, on a thread of its own, cached per address so that a
//! final report still resolves after the target has exited.
//!
//! blazesym reads ELF symbol tables and DWARF (file:line, inlined calls) for C,
//! C++, Rust and Go binaries. We resolve against our own copy of the target's
//! memory map (refreshed each interval and kept after exit) and ask blazesym
//! for *file offsets* in the ELF objects, so nothing depends on /proc/PID once
//! the addresses are known.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::mpsc,
    thread,
};

use blazesym::symbolize::{source::Elf, source::Source, Input, Symbolized, Symbolizer};

use crate::{procfs::MemoryMap, report::Frame};

/// One request: resolve `addrs` of process `pid` with `map`.
struct Request {
    pid: u32,
    map: MemoryMap,
    addrs: Vec<u64>,
    reply: tokio::sync::oneshot::Sender<Vec<Vec<Frame>>>,
}

/// Handle to the symbolizer thread.
#[derive(Clone)]
pub struct SymbolizerService {
    tx: mpsc::Sender<Request>,
}

impl SymbolizerService {
    /// Starts the thread.
    pub fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("symbolizer".into())
            .spawn(move || {
                let mut worker = Worker::new();
                for req in rx {
                    let frames = req.addrs.iter().map(|&a| worker.resolve(req.pid, &req.map, a)).collect();
                    let _ = req.reply.send(frames);
                }
            })
            .expect("spawn symbolizer thread");
        Self { tx }
    }

    /// Resolves each address to its frames (more than one when calls were
    /// inlined there: innermost first). `addrs` are return addresses except
    /// the first of a stack; callers pass `addr - 1` for those lookups
    /// themselves via [`lookup_addr`].
    pub async fn resolve(&self, pid: u32, map: MemoryMap, addrs: Vec<u64>) -> Vec<Vec<Frame>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let n = addrs.len();
        if self.tx.send(Request { pid, map, addrs, reply }).is_err() {
            return vec![Vec::new(); n];
        }
        rx.await.unwrap_or_else(|_| vec![Vec::new(); n])
    }
}

/// The address to look up for frame `index` of a stack: return addresses
/// point after the call, so step back into it for the right line.
pub fn lookup_addr(index: usize, addr: u64) -> u64 {
    if index == 0 { addr } else { addr.saturating_sub(1) }
}

struct Worker {
    symbolizer: Symbolizer,
    cache: HashMap<(u32, u64), Vec<Frame>>,
    /// Bound on the cache (addresses); cleared when exceeded.
    max_cache: usize,
    /// Go pc tables per object, for the frames blazesym cannot name
    /// (`-s -w` Go builds have no symtab and no DWARF); `None`: not Go.
    go: HashMap<PathBuf, Option<crate::binary::golang::GoSymbols>>,
}

impl Worker {
    fn new() -> Self {
        let symbolizer = Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build();
        Self { symbolizer, cache: HashMap::new(), max_cache: 200_000, go: HashMap::new() }
    }

    fn resolve(&mut self, pid: u32, map: &MemoryMap, addr: u64) -> Vec<Frame> {
        if let Some(f) = self.cache.get(&(pid, addr)) {
            return f.clone();
        }
        let frames = self.resolve_uncached(pid, map, addr);
        if self.cache.len() >= self.max_cache {
            self.cache.clear();
        }
        self.cache.insert((pid, addr), frames.clone());
        frames
    }

    fn resolve_uncached(&mut self, pid: u32, map: &MemoryMap, addr: u64) -> Vec<Frame> {
        let hex = format!("{addr:#x}");
        let Some(m) = map.find(addr) else {
            return vec![unknown(None, hex, None)];
        };
        let module = m.path.to_string_lossy().into_owned();
        let path: PathBuf = crate::procfs::object_path(pid, m);
        let file_offset = addr - m.start + m.offset;
        let src = Source::Elf(Elf::new(path.clone()));
        let sym = match self.symbolizer.symbolize_single(&src, Input::FileOffset(file_offset)) {
            Ok(Symbolized::Sym(sym)) => sym,
            _ => {
                return vec![self.go_frame(&path, &module, file_offset).unwrap_or_else(|| unknown(Some(module), hex, Some(file_offset)))]
            }
        };
        let mut out = Vec::new();
        // blazesym lists inlined calls outermost first; the innermost one is
        // where the code actually is, so it goes first.
        let mut code_info = sym.code_info.as_deref().map(|c| (c.to_path().display().to_string(), c.line));
        for inl in sym.inlined.iter().rev() {
            let (file, line) = code_info.take().map_or((None, None), |(f, l)| (Some(f), l));
            out.push(Frame { function: inl.name.to_string(), file, line, module: Some(module.clone()), addr: None, file_offset: None });
            code_info = inl.code_info.as_ref().map(|c| (c.to_path().display().to_string(), c.line));
        }
        let (file, line) = code_info.map_or((None, None), |(f, l)| (Some(f), l));
        out.push(Frame { function: sym.name.to_string(), file, line, module: Some(module), addr: None, file_offset: None });
        out
    }
}

impl Worker {
    /// A frame named by the object's `.gopclntab`, if it is a Go binary.
    fn go_frame(&mut self, path: &PathBuf, module: &str, file_offset: u64) -> Option<Frame> {
        if is_system_module(module) {
            return None;
        }
        if !self.go.contains_key(path) {
            if self.go.len() >= 64 {
                self.go.clear();
            }
            let syms = crate::binary::golang::GoSymbols::open(path).ok().flatten();
            self.go.insert(path.clone(), syms);
        }
        let info = self.go.get(path)?.as_ref()?.lookup_offset(file_offset)?;
        Some(Frame {
            function: info.function,
            file: info.file,
            line: info.line,
            module: Some(module.to_string()),
            addr: None,
            file_offset: None,
        })
    }
}

fn unknown(module: Option<String>, addr: String, file_offset: Option<u64>) -> Frame {
    Frame { function: "[unknown]".into(), file: None, line: None, module, addr: Some(addr), file_offset }
}

/// Whether a module is a system library (libc, the dynamic loader, ...).
fn is_system_module(m: &str) -> bool {
    (m.starts_with("/lib/") || m.starts_with("/lib64/") || m.starts_with("/usr/lib/")) && !m.contains("/go/")
}

/// How a frame is named as a site: its function, or for an object without
/// symbols (stripped) `object+0xoffset`, which still tells one site from another.
pub fn site_name(f: &Frame) -> String {
    match (&f.module, f.file_offset) {
        (Some(m), Some(off)) if f.function == "[unknown]" => {
            let base = m.rsplit('/').next().unwrap_or(m);
            format!("{base}+{off:#x}")
        }
        _ => f.function.clone(),
    }
}

/// Application modules (not system libraries) among `frames` that resolved
/// to no symbol at all: stripped binaries, to warn about once.
pub fn stripped_modules(frames: &[Frame]) -> Vec<String> {
    let mut out: Vec<String> = frames
        .iter()
        .filter(|f| f.function == "[unknown]")
        .filter_map(|f| f.module.clone())
        .filter(|m| !is_system_module(m))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The first frame that is the application's own code: not a runtime, libc,
/// a system library or a language's standard library.
pub fn site_of(frames: &[Frame]) -> String {
    frames.get(site_index(frames)).map(site_name).unwrap_or_else(|| "[unknown]".into())
}

/// Index of the site's frame in `frames` (see [`site_of`]). When every frame
/// is system code (a connection the standard library makes on its own, like
/// an HTTP transport's dial goroutine), the outermost frame that is not the
/// runtime's thread or goroutine entry names it better than the syscall stub.
pub fn site_index(frames: &[Frame]) -> usize {
    if let Some(i) = frames.iter().position(|f| !is_system_frame(f)) {
        return i;
    }
    let entry = |f: &Frame| {
        let n = f.function.as_str();
        n == "[unknown]"
            || n.starts_with("runtime.")
            || n.starts_with("runtime/")
            || n.starts_with("_start")
            || n.starts_with("__libc_start")
            || n == "start_thread"
            || n.starts_with("clone")
            || n.starts_with("__clone")
    };
    frames.iter().rposition(|f| !entry(f)).unwrap_or(0)
}

/// Whether a frame belongs to a runtime, libc or a standard library.
pub fn is_system_frame(f: &Frame) -> bool {
    if f.function == "[unknown]" {
        // An unnamed address in the application's own (stripped) object is
        // still the application's code.
        return f.file_offset.is_none() || f.module.as_deref().is_none_or(is_system_module);
    }
    if let Some(m) = &f.module {
        if is_system_module(m) {
            return true;
        }
    }
    let func = f.function.as_str();
    if is_go_std(func) {
        return true;
    }
    // A libc syscall wrapper linked into a static program: the program's
    // module, but libc's code (libc.a has no line info).
    if f.file.is_none() && crate::stacks::syscall_sites::WRAPPERS.contains(&func.trim_start_matches("__")) {
        return true;
    }
    func.starts_with("std::")
        || func.starts_with("core::")
        || func.starts_with("alloc::")
        || func.starts_with("tokio::")
        || func.starts_with("__libc_")
        || func.starts_with("_start")
}

/// Go functions of the standard library and runtime: their import path's
/// first element has no dot (`net/http.(*Client).Do`, `runtime.goexit`),
/// unlike `main.x` and `github.com/...`.
fn is_go_std(func: &str) -> bool {
    let head = func.split('/').next().unwrap_or(func);
    let pkg = head.split('.').next().unwrap_or(head);
    if pkg == "main" || pkg.is_empty() {
        return false;
    }
    const GO_STD: &[&str] = &[
        "runtime", "internal", "syscall", "net", "os", "io", "bufio", "sync", "crypto", "context",
        "time", "fmt", "errors", "reflect", "strconv", "strings", "bytes", "encoding", "math",
        "sort", "unicode", "vendor", "log", "mime", "path", "regexp", "text", "html", "compress",
        "container", "database", "debug", "embed", "expvar", "flag", "go", "hash", "image",
        "index", "iter", "maps", "slices", "testing", "unique", "unsafe", "weak", "cmp", "archive",
        "structs", "golang.org",
    ];
    // A Go symbol always has a dot between package and name; generic type
    // arguments (`[go.shape.interface {}]`) may hold spaces.
    let outside_brackets = func.split('[').next().unwrap_or(func);
    func.contains('.') && !head.contains("::") && GO_STD.contains(&pkg) && !outside_brackets.contains(' ')
}

/// Objects already warned about for having no symbols: one warning each.
#[derive(Default)]
pub struct StrippedWarnings(std::collections::HashSet<String>);

impl StrippedWarnings {
    /// Warns once per object that a finding's stack shows without symbols.
    pub fn warn_once(&mut self, findings: &[crate::report::Finding]) {
        for f in findings {
            for m in stripped_modules(&f.stack) {
                if self.0.insert(m.clone()) {
                    crate::output::warn(format!("{m} has no symbols (stripped?): its frames are shown as object+offset"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, module: &str) -> Frame {
        Frame { function: function.into(), file: None, line: None, module: Some(module.into()), addr: None, file_offset: None }
    }

    #[test]
    fn site_skips_go_runtime_and_std() {
        let frames = vec![
            frame("syscall.Syscall", "/srv/api"),
            frame("net.(*sysDialer).dialSingle", "/srv/api"),
            frame("net/http.(*Client).Do", "/srv/api"),
            frame("internal/sync.(*HashTrieMap[go.shape.interface {},go.shape.interface {}]).Swap", "/srv/api"),
            frame("main.dialCache", "/srv/api"),
            frame("main.badHandler", "/srv/api"),
        ];
        assert_eq!(site_of(&frames), "main.dialCache");
    }

    #[test]
    fn site_skips_libc() {
        let frames = vec![
            frame("__connect", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            frame("dial_cache", "/opt/app/bin/app"),
            frame("bad_handler", "/opt/app/bin/app"),
        ];
        assert_eq!(site_of(&frames), "dial_cache");
    }

    #[test]
    fn all_system_stacks_are_named_by_their_outermost_library_frame() {
        let frames = vec![
            frame("runtime/internal/syscall.Syscall6", "/srv/api"),
            frame("net.sysSocket", "/srv/api"),
            frame("net/http.(*Transport).dialConn", "/srv/api"),
            frame("net/http.(*Transport).dialConnFor", "/srv/api"),
            frame("runtime.goexit", "/srv/api"),
        ];
        assert_eq!(site_of(&frames), "net/http.(*Transport).dialConnFor");
        assert_eq!(site_index(&frames), 3);
    }

    #[test]
    fn stripped_application_frames_are_named_by_object_and_offset() {
        let mut app = frame("[unknown]", "/opt/app/bin/server");
        app.file_offset = Some(0x1234);
        let frames = vec![frame("__GI_socket", "/usr/lib/x86_64-linux-gnu/libc.so.6"), app];
        assert_eq!(site_of(&frames), "server+0x1234");
        assert_eq!(stripped_modules(&frames), vec!["/opt/app/bin/server".to_string()]);
    }

    #[test]
    fn third_party_go_packages_are_application_code() {
        assert!(!is_go_std("github.com/redis/go-redis/v9.(*Client).Get"));
        assert!(is_go_std("internal/poll.(*FD).Init"));
        assert!(!is_go_std("main.main"));
    }
}
