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

use blazesym::symbolize::{source::Elf, source::Source, CodeInfo, Input, Symbolized, Symbolizer};

use crate::{procfs::MemoryMap, report::Frame, stacks::jvm};

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
    /// Per object: whether its section headers are safe to hand to
    /// blazesym, which allocates whatever a compression header claims
    /// ([`crate::binary::elf::check_sections_of`]).
    readable: HashMap<PathBuf, bool>,
}

impl Worker {
    fn new() -> Self {
        let symbolizer = Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build();
        Self { symbolizer, cache: HashMap::new(), max_cache: 200_000, go: HashMap::new(), readable: HashMap::new() }
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
        let readable = self.readable(&path);
        let found = if readable { self.symbolizer.symbolize_single(&src, Input::FileOffset(file_offset)).ok() } else { None };
        // A signal trampoline (glibc's `__restore_rt`) is "returned to" at
        // its first byte: the kernel pushed its address, no call did. The
        // byte before, where return addresses are looked up, is padding
        // outside any symbol; the function starting right after it is the
        // frame.
        let found = match found {
            Some(Symbolized::Sym(sym)) => Some(Symbolized::Sym(sym)),
            _ if readable => match self.symbolizer.symbolize_single(&src, Input::FileOffset(file_offset + 1)).ok() {
                Some(Symbolized::Sym(sym)) if sym.offset == 0 => Some(Symbolized::Sym(sym)),
                _ => None,
            },
            other => other,
        };
        let sym = match found {
            Some(Symbolized::Sym(sym)) => sym,
            _ => {
                return vec![self.go_frame(&path, &module, file_offset).unwrap_or_else(|| unknown(Some(module), hex, Some(file_offset)))]
            }
        };
        let mut out = Vec::new();
        // blazesym lists inlined calls outermost first; the innermost one is
        // where the code actually is, so it goes first. Each one's location
        // is inside that function (as `addr2line -i` pairs them; the
        // symbol's own location is in the symbol), which is what tells an
        // inlined `std::thread` constructor (`/usr/include/c++/...`) from
        // the program's code.
        let location = |c: Option<&CodeInfo>| {
            c.map_or((None, None), |c| (Some(c.to_path().display().to_string()), c.line))
        };
        for inl in sym.inlined.iter().rev() {
            let (file, line) = location(inl.code_info.as_ref());
            out.push(Frame { function: inl.name.to_string(), file, line, module: Some(module.clone()), addr: None, file_offset: None });
        }
        let (file, line) = location(sym.code_info.as_deref());
        out.push(Frame { function: sym.name.to_string(), file, line, module: Some(module), addr: None, file_offset: None });
        out
    }
}

impl Worker {
    /// Whether blazesym may read `path`: a file whose headers lie (a
    /// compressed section claiming terabytes) is named by its pc table or
    /// left `[unknown]`, with one warning.
    fn readable(&mut self, path: &PathBuf) -> bool {
        if let Some(&ok) = self.readable.get(path) {
            return ok;
        }
        if self.readable.len() >= 1024 {
            self.readable.clear();
        }
        let ok = match crate::binary::elf::check_sections_of(path) {
            Ok(()) => true,
            Err(e) => {
                crate::output::warn(format!("not reading symbols or DWARF of {e:#}"));
                false
            }
        };
        self.readable.insert(path.clone(), ok);
        ok
    }

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

/// Where a finding is named: the frame of the program's own code that
/// created it, and the library it went through to get there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// How the site frame is named ([`site_name`]).
    pub name: String,
    /// Index of the site frame in the stack (innermost first).
    pub index: usize,
    /// The outermost library frame between the site and the innermost frame
    /// (`github.com/gomodule/redigo/redis.Dial`, libhiredis's
    /// `redisConnect`), if the object was created through a library;
    /// runtimes, libc and standard libraries are not named (every stack
    /// goes through them).
    pub via: Option<String>,
}

/// What counts as the program's own code: the one site rule of every tracker.
///
/// A frame is own code when it is in the main executable (not a shared
/// object) and is neither a runtime, libc or standard library frame nor a
/// dependency linked into the executable: for Go, only package `main` and
/// the main module's packages (its path from `.go.buildinfo`); for native
/// code, not a frame whose source is in the cargo registry, a cargo git
/// checkout or the Rust standard library, nor a symbol of a crate seen there.
/// `--own PREFIX` replaces the rule by function-name prefixes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnCode {
    /// The main executable, as the target's memory map names it; `None`
    /// when unknown (then any object that is not a system library counts).
    pub executable: Option<String>,
    /// The executable is a Go program.
    pub go: bool,
    /// Go: the main module's path (`example.com/api`); `None` for GOPATH
    /// builds (then only package `main` is own code).
    pub go_module: Option<String>,
    /// `--own PREFIX`: when set, exactly the frames whose function starts
    /// with one of these are own code.
    pub prefixes: Vec<String>,
}

impl OwnCode {
    /// The rule for process `pid`'s current executable, with `prefixes`.
    pub fn of_process(pid: u32, prefixes: &[String]) -> Self {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.display().to_string());
        let (go, go_module) = std::fs::read(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|data| {
                let elf = object::File::parse(&*data).ok()?;
                let go = crate::binary::golang::is_go(&elf);
                Some((go, go.then(|| crate::binary::golang::buildinfo::main_module(&elf)).flatten()))
            })
            .unwrap_or((false, None));
        Self { executable: exe.map(|e| e.trim_end_matches(" (deleted)").to_string()), go, go_module, prefixes: prefixes.to_vec() }
    }

    /// The site of a stack (innermost first): the innermost own frame, with
    /// the library it went through. A stack with no own frame at all keeps
    /// the library rule ([`library_site_index`]) and has no `via`.
    pub fn site(&self, frames: &[Frame]) -> Site {
        let library_crates = library_crates(frames);
        let Some(index) = frames.iter().position(|f| self.is_own(f, &library_crates)) else {
            let index = library_site_index(frames);
            return Site { name: frames.get(index).map(site_name).unwrap_or_else(|| "[unknown]".into()), index, via: None };
        };
        let via = frames[..index].iter().rev().find(|f| !is_runtime_or_std(f)).map(site_name);
        Site { name: site_name(&frames[index]), index, via }
    }

    /// Where a waiting stack (innermost first) waits in the program's own
    /// code: the own frames from the innermost one out to the outermost
    /// one, and whether that outermost own frame is the thread's or
    /// goroutine's start function (only the runtime's entry frames lie
    /// outside it) rather than code a library called (an HTTP server
    /// calling a handler). `None` when no frame is own code.
    pub fn own_depth(&self, frames: &[Frame]) -> Option<(usize, bool)> {
        let library_crates = library_crates(frames);
        let own: Vec<usize> = frames.iter().enumerate().filter(|(_, f)| self.is_own(f, &library_crates)).map(|(i, _)| i).collect();
        let (&inner, &outer) = (own.first()?, own.last()?);
        let own_frames = own.iter().filter(|&&i| i >= inner && i <= outer).count();
        Some((own_frames, frames[outer + 1..].iter().all(is_entry_frame)))
    }

    /// Whether `f` is the program's own code (see [`OwnCode`]); crates in
    /// `library_crates` are dependencies linked into the executable.
    fn is_own(&self, f: &Frame, library_crates: &[&str]) -> bool {
        if !self.prefixes.is_empty() {
            let name = site_name(f);
            return self.prefixes.iter().any(|p| name.starts_with(p.as_str()));
        }
        if jvm::is_java_frame(f) {
            return !jvm::is_jdk(&f.function) && !jvm::is_java_library(&f.function);
        }
        if is_system_frame(f) {
            return false;
        }
        if let (Some(exe), Some(module)) = (&self.executable, &f.module) {
            if module.trim_end_matches(" (deleted)") != exe {
                return false;
            }
        }
        if f.function == "[unknown]" {
            // An unnamed address in the executable (stripped): its own code
            // as far as anyone can tell.
            return true;
        }
        if self.go {
            return is_go_main_module(&f.function, self.go_module.as_deref());
        }
        if f.file.as_deref().is_some_and(is_dependency_source) {
            return false;
        }
        !rust_crate(&f.function).is_some_and(|c| library_crates.contains(&c))
    }
}

/// Whether a Go function is in package `main` or the main module `module`.
fn is_go_main_module(func: &str, module: Option<&str>) -> bool {
    if func.starts_with("main.") {
        return true;
    }
    module.is_some_and(|m| {
        func.strip_prefix(m).is_some_and(|rest| rest.starts_with('/') || rest.starts_with('.'))
    })
}

/// Source paths of code linked into an executable that is not the
/// program's own: the cargo registry, cargo git checkouts, the Rust
/// standard library (`/rustc/HASH/library/...`, `rustlib`), system headers.
fn is_dependency_source(file: &str) -> bool {
    file.contains("/.cargo/registry/")
        || file.contains("/.cargo/git/")
        || file.starts_with("/rustc/")
        || file.contains("/rustlib/")
        || file.starts_with("/usr/include/")
}

/// The crate of a Rust symbol (`tokio` of `tokio::net::TcpStream::connect`;
/// `<hyper::Client as Foo>::bar` names `hyper`).
fn rust_crate(func: &str) -> Option<&str> {
    let f = func.trim_start_matches('<');
    let (head, _) = f.split_once("::")?;
    (!head.is_empty() && head.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(head)
}

/// Crates whose code in this stack comes from dependency sources: their
/// frames without line info (no DWARF for that address) are not own code either.
fn library_crates(frames: &[Frame]) -> Vec<&str> {
    let mut out: Vec<&str> = frames
        .iter()
        .filter(|f| f.file.as_deref().is_some_and(is_dependency_source))
        .filter_map(|f| rust_crate(&f.function))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The site of a stack with no own frame (today's rule for library-only
/// stacks): the first frame outside runtimes, libc and standard libraries
/// (a third-party library's); when every frame is system code (a connection
/// the standard library makes on its own, like an HTTP transport's dial
/// goroutine), the outermost frame that is not the runtime's thread or
/// goroutine entry names it better than the syscall stub.
fn library_site_index(frames: &[Frame]) -> usize {
    if let Some(i) = frames.iter().position(|f| !is_system_frame(f)) {
        return i;
    }
    frames.iter().rposition(|f| !is_entry_frame(f)).unwrap_or(0)
}

/// Whether a frame is the runtime's thread or goroutine entry (`_start`,
/// `__libc_start_main`, `start_thread`, `clone3`, `runtime.goexit`,
/// `runtime.main`), or unnamed.
fn is_entry_frame(f: &Frame) -> bool {
    let n = f.function.as_str();
    n == "[unknown]"
        || n.starts_with("runtime.")
        || n.starts_with("runtime/")
        || n.starts_with("_start")
        || n.starts_with("__libc_start")
        || n == "start_thread"
        || n.starts_with("clone")
        || n.starts_with("__clone")
}

/// Whether a frame belongs to a runtime, libc, a system library or a
/// standard library.
pub fn is_system_frame(f: &Frame) -> bool {
    if jvm::is_java_frame(f) {
        return jvm::is_jdk(&f.function);
    }
    if f.function == "[unknown]" {
        // An unnamed address in the application's own (stripped) object is
        // still the application's code.
        return f.file_offset.is_none() || f.module.as_deref().is_none_or(is_system_module);
    }
    if f.module.as_deref().is_some_and(is_system_module) {
        return true;
    }
    // A libc syscall wrapper linked into a static program: the program's
    // module, but libc's code (libc.a has no line info).
    if f.file.is_none() && crate::stacks::syscall_sites::WRAPPERS.contains(&f.function.trim_start_matches("__")) {
        return true;
    }
    is_standard_function(&f.function)
}

/// Whether a frame is a language runtime, libc or a standard library: every
/// stack goes through them, so they never name a `via` (a system library
/// such as libhiredis or libpq does).
fn is_runtime_or_std(f: &Frame) -> bool {
    const BASE: &[&str] = &["libc.so", "libc-", "ld-linux", "libpthread", "libstdc++", "libgcc_s", "libm.so", "libdl", "librt", "libresolv", "libnss_"];
    if jvm::is_java_frame(f) {
        return jvm::is_jdk(&f.function);
    }
    f.function == "[unknown]"
        || f.module.as_deref().is_some_and(|m| {
            let base = m.rsplit('/').next().unwrap_or(m);
            BASE.iter().any(|b| base.starts_with(b))
        })
        || is_standard_function(&f.function)
}

/// A demangled C++ name without the return type a function template's
/// name starts with (`void std::allocator_traits<..>::construct<..>(..)`,
/// `std::pair<.., bool> std::_Hashtable<..>::_M_emplace<..>(..)`): what
/// follows the last space outside template brackets before the parameters.
fn without_return_type(func: &str) -> &str {
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in func.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            '(' if depth == 0 => break,
            ' ' if depth == 0 => start = i + 1,
            _ => {}
        }
    }
    &func[start..]
}

/// Functions of a language's runtime or standard library, by name.
fn is_standard_function(func: &str) -> bool {
    // Rust's `<std::net::TcpStream>::connect`, `<alloc::vec::Vec<T> as ..>`.
    let func = func.trim_start_matches('<');
    let func = if func.starts_with("impl ") { func } else { without_return_type(func) };
    if func.starts_with("impl ") && ["std::", "core::", "alloc::"].iter().any(|p| func[5..].starts_with(p)) {
        return true;
    }
    is_go_std(func)
        || func.starts_with("std::")
        || func.starts_with("__gnu_cxx::")
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
    // A module path (`go.etcd.io/etcd/...`, `github.com/...`): its first
    // element has a dot, which the standard library's never has.
    if func.contains('/') && head.contains('.') {
        return false;
    }
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

    fn site_of(frames: &[Frame]) -> String {
        OwnCode::default().site(frames).name
    }

    fn go_api() -> OwnCode {
        OwnCode { executable: Some("/srv/api".into()), go: true, go_module: Some("example.com/api".into()), prefixes: vec![] }
    }

    #[test]
    fn a_function_templates_return_type_does_not_hide_std() {
        for f in [
            "void std::allocator_traits<std::allocator<int> >::construct<int, int&>(std::allocator<int>&, int*, int&)",
            "std::pair<std::__detail::_Node_iterator<int, false, false>, bool> std::_Hashtable<int>::_M_emplace<int&>(std::integral_constant<bool, true>, int&)",
            "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >::_M_construct(unsigned long, char)",
        ] {
            assert!(is_standard_function(f), "{f}");
        }
        for f in ["cache_session(int)", "void my::Cache<std::string>::put(int)", "operator new(unsigned long)", "main"] {
            assert!(!is_standard_function(f), "{f}");
        }
    }

    #[test]
    fn site_is_the_handler_and_via_the_client_library() {
        let frames = vec![
            frame("syscall.Syscall", "/srv/api"),
            frame("net.(*Dialer).DialContext", "/srv/api"),
            frame("github.com/gomodule/redigo/redis.DialContext", "/srv/api"),
            frame("github.com/gomodule/redigo/redis.Dial", "/srv/api"),
            frame("example.com/api/profile.fetch", "/srv/api"),
            frame("main.getProfile", "/srv/api"),
            frame("github.com/gin-gonic/gin.(*Context).Next", "/srv/api"),
        ];
        let site = go_api().site(&frames);
        assert_eq!(site, Site { name: "example.com/api/profile.fetch".into(), index: 4, via: Some("github.com/gomodule/redigo/redis.Dial".into()) });
        let main_only = OwnCode { go_module: None, ..go_api() }.site(&frames);
        assert_eq!((main_only.name.as_str(), main_only.index), ("main.getProfile", 5));
        // Through the standard library only: no `via`.
        let std_only = go_api().site(&[frames[0].clone(), frames[1].clone(), frames[5].clone()]);
        assert_eq!((std_only.name.as_str(), std_only.via), ("main.getProfile", None));
        // All library: the first library frame, as before.
        let lib = go_api().site(&[frames[0].clone(), frames[2].clone(), frames[6].clone()]);
        assert_eq!((lib.name.as_str(), lib.via), ("github.com/gomodule/redigo/redis.DialContext", None));
        // --own: exactly the prefixes given.
        let own = OwnCode { prefixes: vec!["github.com/gomodule/".into()], ..go_api() }.site(&frames);
        assert_eq!((own.name.as_str(), own.index), ("github.com/gomodule/redigo/redis.DialContext", 2));
    }

    #[test]
    fn native_dependencies_linked_in_are_not_own_code() {
        let exe = "/opt/app/bin/app";
        let with_file = |function: &str, file: &str| Frame { file: Some(file.into()), ..frame(function, exe) };
        let frames = vec![
            frame("__connect", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            with_file("std::net::tcp::TcpStream::connect", "/rustc/abc/library/std/src/net/tcp.rs"),
            with_file("mio::net::tcp::stream::TcpStream::connect", "/root/.cargo/registry/src/index.crates.io-1/mio-1.0/src/net/tcp/stream.rs"),
            frame("mio::sys::unix::tcp::new_socket", exe),
            frame("redis_client::connect", "/usr/lib/x86_64-linux-gnu/libhiredis.so.0.14"),
            with_file("app::cache::dial", "/src/app/src/cache.rs"),
        ];
        let own = OwnCode { executable: Some(exe.into()), ..OwnCode::default() };
        let site = own.site(&frames);
        assert_eq!(site.name, "app::cache::dial");
        assert_eq!(site.via.as_deref(), Some("redis_client::connect"));
        // mio's frame without line info is known by its crate.
        let no_line = own.site(&frames[..4]);
        assert_eq!((no_line.name.as_str(), no_line.via), ("mio::net::tcp::stream::TcpStream::connect", None));
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
        assert_eq!(OwnCode::default().site(&frames).index, 3);
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
    fn rust_and_cpp_library_frames_are_not_sites() {
        let frames = vec![
            frame("__GI_socket", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            frame("<std::sys::net::connection::socket::TcpStream>::connect::inner", "/srv/app"),
            frame("std::net::each_addr", "/srv/app"),
            frame("<alloc::vec::Vec<u8> as core::clone::Clone>::clone", "/srv/app"),
            frame("std::vector<int, std::allocator<int> >::push_back", "/srv/app"),
            frame("app::dial", "/srv/app"),
        ];
        assert_eq!(site_of(&frames), "app::dial");
    }

    #[test]
    fn third_party_go_packages_are_application_code() {
        assert!(!is_go_std("github.com/redis/go-redis/v9.(*Client).Get"));
        assert!(is_go_std("internal/poll.(*FD).Init"));
        assert!(!is_go_std("main.main"));
        // A module whose path starts with "go." is not package go/...
        assert!(!is_go_std("go.etcd.io/etcd/clientv3/concurrency.NewSession"));
        assert!(!is_go_std("go.uber.org/zap.(*Logger).Info"));
        assert!(is_go_std("go/ast.Walk"));
    }
}
