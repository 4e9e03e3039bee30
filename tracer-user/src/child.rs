//! Starting a command held before `exec`, so probes are attached before its
//! first instruction (`leaktrace run` and `check -- CMD`).
//!
//! We fork, the child blocks reading a pipe, the tracer attaches to the
//! child's pid, then one byte on the pipe lets it exec the command. If
//! leaktrace dies first the pipe closes and the child exits without running
//! the command untraced; if it dies later (even by SIGKILL) the kernel kills
//! the command (`PR_SET_PDEATHSIG`). The command sees what it would see
//! untraced: default SIGPIPE, an empty signal mask, the descriptor limit
//! leaktrace was given.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};


/// leaktrace's descriptor limit as it was given, before
/// [`raise_fd_limit`]: what the command gets back.
static GIVEN_NOFILE: std::sync::OnceLock<libc::rlimit> = std::sync::OnceLock::new();

/// Raises leaktrace's soft descriptor limit to its hard limit (BPF objects,
/// probes and /metrics clients all take descriptors). A command leaktrace
/// starts gets the limit leaktrace was given.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: reads and sets our own limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let _ = GIVEN_NOFILE.set(lim);
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &raised);
        }
    }
}

/// A process leaktrace started and holds before `exec` (run / check -- CMD).
pub trait HeldChild: Send {
    /// Lets the child exec its command.
    fn release(&mut self) -> Result<()>;
    /// Reaps the child if it exited; true when it is gone.
    fn reap(&mut self) -> bool;
    /// Stops the child (we started it, we end it).
    fn terminate(&mut self);
    /// Waits up to `limit` for a child that is exiting; its wait status.
    fn wait_exit(&mut self, limit: std::time::Duration) -> Option<i32>;
}

/// A forked child waiting to exec.
pub struct Held {
    pid: libc::pid_t,
    go_fd: Option<libc::c_int>,
    err_fd: libc::c_int,
    reaped: bool,
    /// Exit status once reaped.
    pub status: Option<i32>,
}

/// Finds `prog` the way a shell would (PATH unless it has a slash).
fn resolve_program(prog: &str) -> Result<PathBuf> {
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        if !p.exists() {
            bail!("command not found: {prog}");
        }
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(prog);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    bail!("command not found: {prog}")
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

impl Held {
    /// Forks; the child waits for [`HeldChild::release`] and then execs `cmd`.
    /// With `stdout_to_stderr` the command's stdout goes to our stderr, so
    /// that stdout carries only leaktrace's JSON.
    pub fn spawn(cmd: &[String], stdout_to_stderr: bool) -> Result<Self> {
        let Some((prog, _)) = cmd.split_first() else { bail!("no command given after --") };
        let path = resolve_program(prog)?;
        crate::procfs::check_executable(&path, &path.display().to_string())?;
        let c_path = CString::new(path.as_os_str().as_bytes())?;
        let c_args: Vec<CString> = cmd.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<_, _>>()?;
        let mut argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());

        let given_nofile = GIVEN_NOFILE.get().copied();
        // SAFETY: getpid cannot fail.
        let parent = unsafe { libc::getpid() };
        let mut go = [0; 2];
        let mut err = [0; 2];
        // SAFETY: valid arrays of two ints.
        unsafe {
            if libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) != 0 || libc::pipe2(err.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                bail!("pipe2: {}", std::io::Error::last_os_error());
            }
        }
        // SAFETY: after fork the child only calls async-signal-safe functions
        // (prctl, getppid, close, read, write, dup2, setrlimit, signal,
        // sigprocmask, execv, _exit) on memory prepared before fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            unsafe {
                // The command dies with leaktrace (even by SIGKILL): it never
                // runs on untraced. (Not across a set-user-ID exec, which
                // clears it.) If leaktrace died before this, give up.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                if libc::getppid() != parent {
                    libc::_exit(126);
                }
                libc::close(go[1]);
                libc::close(err[0]);
                let mut b = 0u8;
                loop {
                    let n = libc::read(go[0], &mut b as *mut u8 as *mut libc::c_void, 1);
                    if n == 1 {
                        break;
                    }
                    if n == 0 || *libc::__errno_location() != libc::EINTR {
                        libc::_exit(126);
                    }
                }
                if stdout_to_stderr {
                    libc::dup2(2, 1);
                }
                if let Some(lim) = given_nofile {
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                }
                // The Rust runtime ignores SIGPIPE in leaktrace; an ignored
                // signal survives exec. The command gets the default back
                // (as std::process::Command gives it) and an empty mask.
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                libc::execv(c_path.as_ptr(), argv.as_ptr());
                let e = *libc::__errno_location();
                libc::write(err[1], &e as *const i32 as *const libc::c_void, 4);
                libc::_exit(127);
            }
        }
        unsafe {
            libc::close(go[0]);
            libc::close(err[1]);
        }
        Ok(Self { pid, go_fd: Some(go[1]), err_fd: err[0], reaped: false, status: None })
    }

    /// Process id of the command.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }
}

impl HeldChild for Held {
    fn release(&mut self) -> Result<()> {
        let Some(fd) = self.go_fd.take() else { return Ok(()) };
        // SAFETY: our own fds.
        unsafe {
            let b = 1u8;
            libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
            libc::close(fd);
            // Blocks until exec succeeded (EOF: CLOEXEC closed it) or failed.
            let mut e = 0i32;
            let n = libc::read(self.err_fd, &mut e as *mut i32 as *mut libc::c_void, 4);
            libc::close(self.err_fd);
            if n == 4 {
                self.reap();
                bail!("cannot run the command: {}", std::io::Error::from_raw_os_error(e));
            }
        }
        Ok(())
    }

    fn reap(&mut self) -> bool {
        if self.reaped {
            return true;
        }
        let mut status = 0;
        // SAFETY: our child.
        let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        if r == self.pid {
            self.reaped = true;
            self.status = Some(status);
        } else if r < 0 {
            self.reaped = true;
        }
        self.reaped
    }

    fn wait_exit(&mut self, limit: std::time::Duration) -> Option<i32> {
        let until = std::time::Instant::now() + limit;
        while !self.reap() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.status
    }

    fn terminate(&mut self) {
        if self.reap() {
            return;
        }
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
            for _ in 0..50 {
                if self.reap() {
                    return;
                }
                libc::usleep(20_000);
            }
            libc::kill(self.pid, libc::SIGKILL);
            let mut status = 0;
            libc::waitpid(self.pid, &mut status, 0);
            self.reaped = true;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(fd) = self.go_fd.take() {
            // SAFETY: our fd; closing it makes the held child exit.
            unsafe { libc::close(fd) };
        }
        self.terminate();
    }
}
