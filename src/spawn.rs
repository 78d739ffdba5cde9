//! fork/exec of one worker: the crate's fork child.
//!
//! Everything a child needs is computed before `fork` ([`Plan`]): argv and
//! envp as NUL-terminated buffers (with fixed-width slots where the child
//! writes its own pid, for `LISTEN_PID` and `WATCHDOG_PID`), the listeners
//! to place at fd 3.., the credentials, the directory, the umask and a
//! CLOEXEC pipe to report a failure. Between `fork` and `execve` the child
//! makes only async-signal-safe system calls: no allocation, no locks, no
//! logging, no return into the master's code (which could run destructors
//! of the master's objects). The child is modelled as one setup function
//! returning `Result<Infallible, (Stage, Errno)>`, each step `?`-checked in
//! the order that matters, and one report point (`child_main`) that writes
//! the (stage, errno) to the pipe and calls `_exit(127)`. The parent reads
//! the pipe: end-of-file before any byte means exec worked; a full report
//! is the failure; anything else is a failure it cannot name.
//!
//! Why not `std::process::Command`: it builds the environment before fork,
//! so it cannot carry the child's own pid, which `LISTEN_PID` must be
//! (libsystemd and gunicorn ignore the sockets otherwise).

use std::convert::Infallible;
use std::ffi::{c_char, c_int, CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::identity::Credentials;

/// Width reserved for a pid's decimal digits in the environment.
const PID_WIDTH: usize = 20;

/// Where in the child's setup a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Resetting the signal mask and dispositions.
    Signals = 1,
    ProcessGroup = 2,
    /// Setting the parent-death signal.
    ParentDeath = 3,
    /// Moving the listeners to fd 3...
    Descriptors = 4,
    Chdir = 5,
    Credentials = 6,
    Exec = 7,
    /// Unknown: the child's report was cut short or unreadable, so the
    /// parent knows only that the child did not exec cleanly.
    Unknown = 0,
}

impl Stage {
    fn from_code(code: u32) -> Option<Stage> {
        Some(match code {
            1 => Stage::Signals,
            2 => Stage::ProcessGroup,
            3 => Stage::ParentDeath,
            4 => Stage::Descriptors,
            5 => Stage::Chdir,
            6 => Stage::Credentials,
            7 => Stage::Exec,
            _ => return None,
        })
    }

    /// What the child was doing, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Stage::Signals => "reset signals",
            Stage::ProcessGroup => "create a process group",
            Stage::ParentDeath => "set the parent-death signal",
            Stage::Descriptors => "pass the listening sockets",
            Stage::Chdir => "change directory",
            Stage::Credentials => "drop privileges",
            Stage::Exec => "execute",
            Stage::Unknown => "start (garbled failure report)",
        }
    }
}

/// Everything one child needs, computed before fork.
pub struct Plan {
    program: CString,
    argv: Vec<CString>,
    /// "KEY=VALUE\0" buffers; pid slots are filled by the child.
    env: Vec<Vec<u8>>,
    /// (env index, byte offset of the value) of each pid slot.
    pid_slots: Vec<(usize, usize)>,
    listeners: Vec<RawFd>,
    credentials: Option<Credentials>,
    chdir: Option<CString>,
    umask: u32,
    reset_signals: Vec<c_int>,
    /// Placed at fd 2 (`--log-file`); `None` keeps the master's stderr.
    stderr: Option<RawFd>,
}

/// A child that was forked; `exec_error` is set when it could not exec
/// (it has then already called `_exit(127)` and will be reaped as usual).
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// Why exec failed, if it did.
    pub exec_error: Option<(Stage, Errno)>,
}

/// A value that names a string with a NUL byte, which no argv or
/// environment entry can hold.
#[derive(Debug)]
pub struct NulError(pub String);

impl Plan {
    /// Builds a plan. Variables named in `pid_vars` get the child's own pid.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        program: &Path,
        argv: &[String],
        env: &[(OsString, OsString)],
        pid_vars: &[&str],
        listeners: &[RawFd],
        credentials: Option<&Credentials>,
        chdir: Option<&Path>,
        umask: u32,
        reset_signals: &[c_int],
    ) -> Result<Plan, NulError> {
        let cstr =
            |s: &[u8]| CString::new(s).map_err(|_| NulError(String::from_utf8_lossy(s).into()));
        let mut env_bufs = Vec::with_capacity(env.len() + pid_vars.len());
        // Names and values are bytes, passed on exactly as procman got
        // them (UTF-8 or not).
        for (k, v) in env {
            let mut b = Vec::with_capacity(k.len() + v.len() + 2);
            b.extend_from_slice(k.as_bytes());
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            if b.contains(&0) {
                return Err(NulError(k.to_string_lossy().into_owned()));
            }
            b.push(0);
            env_bufs.push(b);
        }
        let mut pid_slots = Vec::with_capacity(pid_vars.len());
        for name in pid_vars {
            let mut b = format!("{name}=").into_bytes();
            let offset = b.len();
            b.extend(std::iter::repeat_n(b'0', PID_WIDTH));
            b.push(0);
            pid_slots.push((env_bufs.len(), offset));
            env_bufs.push(b);
        }
        Ok(Plan {
            program: cstr(program.as_os_str().as_bytes())?,
            argv: argv
                .iter()
                .map(|a| cstr(a.as_bytes()))
                .collect::<Result<_, _>>()?,
            env: env_bufs,
            pid_slots,
            listeners: listeners.to_vec(),
            credentials: credentials.cloned(),
            chdir: chdir.map(|d| cstr(d.as_os_str().as_bytes())).transpose()?,
            umask,
            reset_signals: reset_signals.to_vec(),
            stderr: None,
        })
    }

    /// Gives the child `fd` (which the master keeps open until the spawn
    /// returns) as its stderr.
    pub fn with_stderr(mut self, fd: Option<RawFd>) -> Plan {
        self.stderr = fd;
        self
    }

    /// Forks and execs the child. Returns once exec succeeded or failed.
    pub fn spawn(mut self) -> Result<Spawned, Errno> {
        let master = nix::unistd::getpid().as_raw();

        // Every allocation happens here, before fork.
        let argv_ptrs: Vec<*const c_char> = self
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let mut env_ptrs: Vec<*const c_char> = Vec::with_capacity(self.env.len() + 1);
        let mut slot_ptrs: Vec<*mut u8> = Vec::with_capacity(self.pid_slots.len());
        for (i, buf) in self.env.iter_mut().enumerate() {
            let base = buf.as_mut_ptr();
            env_ptrs.push(base as *const c_char);
            for &(_, offset) in self.pid_slots.iter().filter(|(idx, _)| *idx == i) {
                // SAFETY: offset + PID_WIDTH + 1 <= buf.len() by construction
                // in `Plan::new`, so the pointer stays inside the buffer.
                slot_ptrs.push(unsafe { base.add(offset) });
            }
        }
        env_ptrs.push(std::ptr::null());
        let mut raised: Vec<c_int> = vec![-1; self.listeners.len()];
        let groups: Vec<libc::gid_t> = self
            .credentials
            .as_ref()
            .map(|c| c.groups.clone())
            .unwrap_or_default();
        let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut child = ChildSetup {
            master,
            program: self.program.as_ptr(),
            argv: argv_ptrs.as_ptr(),
            envp: env_ptrs.as_ptr(),
            slots: &slot_ptrs,
            listeners: &self.listeners,
            raised: &mut raised,
            credentials: self.credentials.as_ref().map(|c| (c.uid, c.gid)),
            groups: &groups,
            chdir: self.chdir.as_ref().map(|c| c.as_ptr()),
            umask: self.umask as libc::mode_t,
            reset_signals: &self.reset_signals,
            err_fd: err_write.as_raw_fd(),
            stderr: self.stderr,
        };

        // Block every signal across fork: otherwise a signal arriving in the
        // child before it resets its dispositions would run the master's
        // handler there and write to the master's self-pipe.
        let all = nix::sys::signal::SigSet::all();
        let mut old = nix::sys::signal::SigSet::empty();
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&all),
            Some(&mut old),
        )?;
        // SAFETY: the master is single-threaded (no runtime, no helper
        // threads), so the child gets a consistent copy of memory, and it
        // runs only `child_main`, which makes async-signal-safe calls and
        // ends in execve or _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            child_main(&mut child);
        }
        let fork_errno = Errno::last();
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&old),
            None,
        );
        drop(err_write);
        if pid < 0 {
            return Err(fork_errno);
        }
        let pid = Pid::from_raw(pid);
        // Also set the group from this side, so a signal to the group sent
        // right after spawn cannot miss it; EACCES after exec is harmless.
        let _ = nix::unistd::setpgid(pid, pid);
        Ok(Spawned {
            pid,
            exec_error: read_exec_result(&err_read),
        })
    }
}

/// The child's failure report: 4 bytes of stage code, 4 of errno, written
/// with one `write` (atomic: far below PIPE_BUF).
const REPORT_LEN: usize = 8;

/// Reads the child's report. End-of-file before any byte means exec
/// succeeded (the CLOEXEC pipe closed); exactly [`REPORT_LEN`] bytes are a
/// failure; anything else (a cut-short report, an unknown stage, a read
/// error) is a failure too, never a success: we cannot know the child ran.
fn read_exec_result(fd: &OwnedFd) -> Option<(Stage, Errno)> {
    let garbled = Some((Stage::Unknown, Errno::EIO));
    let mut buf = [0u8; REPORT_LEN];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(_) => return garbled,
        }
    }
    match got {
        0 => None,
        REPORT_LEN => {
            let stage = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            match Stage::from_code(stage) {
                Some(stage) => Some((stage, Errno::from_raw(errno))),
                None => garbled,
            }
        }
        _ => garbled,
    }
}

/// Raw pointers and numbers the child uses; built by the parent before
/// fork, so the child only reads them (and writes into `raised` and the pid
/// slots, in its own copy-on-write memory).
struct ChildSetup<'a> {
    master: libc::pid_t,
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    slots: &'a [*mut u8],
    listeners: &'a [RawFd],
    raised: &'a mut [c_int],
    credentials: Option<(u32, u32)>,
    groups: &'a [libc::gid_t],
    chdir: Option<*const c_char>,
    umask: libc::mode_t,
    reset_signals: &'a [c_int],
    err_fd: RawFd,
    stderr: Option<RawFd>,
}

/// A failed step of the child's setup.
type Failure = (Stage, Errno);

/// A system call's return value: negative is a failure of `stage`, with
/// errno (read at once, before another call can change it).
fn check(ret: c_int, stage: Stage) -> Result<c_int, Failure> {
    if ret < 0 {
        Err((stage, Errno::last()))
    } else {
        Ok(ret)
    }
}

/// The forked child, from fork to execve: runs the setup and, if a step
/// fails, reports it at the one report point and exits 127.
fn child_main(child: &mut ChildSetup) -> ! {
    // The setup moves the error pipe above the listeners' range; it says
    // where through `report_fd`, so a late failure is still heard.
    let mut report_fd = child.err_fd;
    let Err((stage, errno)) = child.setup(&mut report_fd);
    let mut msg = [0u8; REPORT_LEN];
    msg[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    msg[4..].copy_from_slice(&(errno as i32).to_ne_bytes());
    // SAFETY: write(2) is async-signal-safe; msg is on this stack frame
    // and REPORT_LEN bytes long. Nothing can be done if it fails.
    unsafe { libc::write(report_fd, msg.as_ptr().cast(), msg.len()) };
    // SAFETY: _exit(2) is async-signal-safe and runs no Rust code (no
    // destructors of the master's objects, no atexit handlers).
    unsafe { libc::_exit(127) }
}

impl ChildSetup<'_> {
    /// Every step between fork and execve, in the order that matters.
    /// Returns only on failure: success is the new program image.
    fn setup(&mut self, report_fd: &mut RawFd) -> Result<Infallible, Failure> {
        // Default dispositions for every signal the master changed
        // (exec resets handlers, but an ignored signal stays ignored,
        // and Rust ignores SIGPIPE), then an empty mask.
        // SAFETY: a zeroed sigaction is a valid value (no handler, no
        // flags), and sigemptyset writes only into it.
        let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
        dfl.sa_sigaction = libc::SIG_DFL;
        // SAFETY: sigemptyset only writes the given local set.
        unsafe { libc::sigemptyset(&mut dfl.sa_mask) };
        for &sig in self.reset_signals {
            check(
                // SAFETY: sigaction is async-signal-safe; `dfl` is a valid
                // action on this stack and the old action is not asked for.
                unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) },
                Stage::Signals,
            )?;
        }
        // SAFETY: a zeroed sigset_t is a valid (then emptied) set.
        let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: sigemptyset only writes the given local set.
        unsafe { libc::sigemptyset(&mut empty) };
        check(
            // SAFETY: sigprocmask is async-signal-safe; `empty` is a valid
            // set on this stack and the old mask is not asked for.
            unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) },
            Stage::Signals,
        )?;

        // Own process group: the master signals the whole group, so
        // helpers the worker starts are stopped with it.
        // SAFETY: setpgid is async-signal-safe and takes plain numbers.
        check(unsafe { libc::setpgid(0, 0) }, Stage::ProcessGroup)?;

        // Listeners to 3..3+n. First raise every source (and the error
        // pipe) above the target range so no dup2 clobbers a source;
        // dup2 then clears FD_CLOEXEC on the copies; finally close
        // everything else above the range but the (CLOEXEC) error pipe.
        // stderr first: its source may sit where a listener goes, and
        // everything else above 2 is closed below. dup2 clears CLOEXEC.
        if let Some(fd) = self.stderr.filter(|&fd| fd != 2) {
            // SAFETY: dup2 is async-signal-safe; `fd` is open in the
            // master until the spawn returns, so also in this child.
            check(unsafe { libc::dup2(fd, 2) }, Stage::Descriptors)?;
        }
        let n = self.listeners.len() as c_int;
        let first_free = 3 + n;
        let err_fd = check(
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) is async-signal-safe and only
            // creates a descriptor in this process.
            unsafe { libc::fcntl(self.err_fd, libc::F_DUPFD_CLOEXEC, first_free) },
            Stage::Descriptors,
        )?;
        *report_fd = err_fd;
        for (i, &src) in self.listeners.iter().enumerate() {
            self.raised[i] = check(
                // SAFETY: as above: F_DUPFD_CLOEXEC only adds a descriptor.
                unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, first_free) },
                Stage::Descriptors,
            )?;
        }
        for (i, &raised) in self.raised.iter().enumerate() {
            check(
                // SAFETY: dup2 is async-signal-safe; the target 3 + i is below
                // every raised copy, so no source is overwritten.
                unsafe { libc::dup2(raised, 3 + i as c_int) },
                Stage::Descriptors,
            )?;
        }
        close_from_to(first_free, err_fd - 1);
        close_from_to(err_fd + 1, c_int::MAX);

        if let Some(dir) = self.chdir {
            // SAFETY: chdir is async-signal-safe; `dir` points into a
            // CString the parent keeps alive across fork (Plan::chdir).
            check(unsafe { libc::chdir(dir) }, Stage::Chdir)?;
        }
        // SAFETY: umask is async-signal-safe and cannot fail.
        unsafe { libc::umask(self.umask) };

        if let Some((uid, gid)) = self.credentials {
            // Groups first, then gid, then uid: after setuid we could
            // no longer change the others.
            check(
                // SAFETY: setgroups is a system call (glibc's broadcast of it
                // to other threads has none to reach in this one-threaded
                // child); pointer and length come from one live slice.
                unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) },
                Stage::Credentials,
            )?;
            // SAFETY: setgid and setuid are async-signal-safe and take
            // plain numbers.
            check(unsafe { libc::setgid(gid) }, Stage::Credentials)?;
            // SAFETY: as above.
            check(unsafe { libc::setuid(uid) }, Stage::Credentials)?;
        }

        // Die with the master. Only now: the kernel clears the
        // parent-death signal whenever the credentials change
        // (commit_creds), so set before setuid it would be gone, and a
        // SIGKILLed master would leave `--user` workers holding the
        // port.
        check(
            // SAFETY: prctl(PR_SET_PDEATHSIG) is a plain system call on this
            // process with numeric arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
            Stage::ParentDeath,
        )?;
        // If the master died before prctl took effect, we were
        // re-parented and must not go on; there is nobody left to report
        // to, so this is the one exit that is not a report.
        // SAFETY: getppid is async-signal-safe and cannot fail.
        if unsafe { libc::getppid() } != self.master {
            // SAFETY: _exit is async-signal-safe and runs no Rust code.
            unsafe { libc::_exit(1) }
        }

        // SAFETY: getpid is async-signal-safe and cannot fail.
        let pid = unsafe { libc::getpid() };
        for &slot in self.slots {
            // SAFETY: each slot points at PID_WIDTH + 1 bytes inside an
            // environment buffer (Plan::new, Plan::spawn), in this child's
            // own copy of memory; no other reference to them is live here
            // (execve reads them only through `envp`, after this).
            let slot = unsafe { &mut *slot.cast::<[u8; PID_WIDTH + 1]>() };
            write_decimal(slot, pid as u32);
        }

        // SAFETY: execve is async-signal-safe; program, argv and envp are
        // NUL-terminated strings and NULL-terminated pointer arrays the
        // parent built before fork and keeps alive. It returns only on
        // failure.
        unsafe { libc::execve(self.program, self.argv, self.envp) };
        Err((Stage::Exec, Errno::last()))
    }
}

/// Closes fds in [first, last] without allocating: close_range(2) where the
/// kernel has it (5.9+), else one close(2) per fd up to the fd limit.
fn close_from_to(first: c_int, last: c_int) {
    if first > last {
        return;
    }
    // SAFETY: close_range is a raw system call that only affects this
    // (child) process's descriptor table; async-signal-safe.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0 as libc::c_uint,
        )
    };
    if r == 0 {
        return;
    }
    // SAFETY: a zeroed rlimit is a valid value for getrlimit to overwrite.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit is async-signal-safe and writes only into `lim`.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur.min(65536) as c_int
    } else {
        4096
    };
    let mut fd = first;
    while fd <= last && fd < max {
        // SAFETY: close is async-signal-safe; in the child no Rust object
        // will use these descriptors again (execve or _exit follows).
        unsafe { libc::close(fd) };
        fd += 1;
    }
}

/// Writes `value`'s digits and a NUL into `dst`. No allocation: usable in a
/// forked child.
fn write_decimal(dst: &mut [u8; PID_WIDTH + 1], mut value: u32) {
    let mut digits = [0u8; PID_WIDTH];
    let mut start = PID_WIDTH;
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    let len = PID_WIDTH - start;
    dst[..len].copy_from_slice(&digits[start..]);
    dst[len] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_digits_are_written_with_a_terminator() {
        for (value, want) in [
            (0u32, "0"),
            (7, "7"),
            (4242, "4242"),
            (u32::MAX, "4294967295"),
        ] {
            let mut buf = [b'x'; PID_WIDTH + 1];
            write_decimal(&mut buf, value);
            let end = buf.iter().position(|&b| b == 0).expect("NUL written");
            assert_eq!(&buf[..end], want.as_bytes());
        }
    }

    #[test]
    fn a_short_report_on_the_exec_error_pipe_is_a_failure_not_success() {
        // End-of-file before any byte is the only success; a cut-short
        // report (here 3 of its 8 bytes) still says the child failed.
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        nix::unistd::write(&write, &[6, 0, 0]).expect("write");
        drop(write);
        let got = read_exec_result(&read);
        assert!(got.is_some(), "a 3-byte report read as exec success");

        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        drop(write);
        assert_eq!(read_exec_result(&read), None, "EOF at once is success");
    }

    #[test]
    fn exec_failure_is_reported_with_its_errno() {
        let plan = Plan::new(
            Path::new("/nonexistent/program"),
            &["prog".to_string()],
            &[],
            &[],
            &[],
            None,
            None,
            0o022,
            &[],
        )
        .expect("plan");
        let spawned = plan.spawn().expect("fork");
        assert_eq!(spawned.exec_error, Some((Stage::Exec, Errno::ENOENT)));
        let status = nix::sys::wait::waitpid(spawned.pid, None).expect("reap");
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(spawned.pid, 127));
    }

    #[test]
    fn the_child_sees_its_own_pid_in_the_environment() {
        let dir = std::env::temp_dir().join(format!("procman-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let out = dir.join("env");
        let script = format!("echo \"$LISTEN_PID $$\" > {}", out.display());
        let plan = Plan::new(
            Path::new("/bin/sh"),
            &["sh".into(), "-c".into(), script],
            &[],
            &["LISTEN_PID"],
            &[],
            None,
            None,
            0o022,
            &[],
        )
        .expect("plan");
        let spawned = plan.spawn().expect("spawn");
        assert_eq!(spawned.exec_error, None);
        nix::sys::wait::waitpid(spawned.pid, None).expect("reap");
        let text = std::fs::read_to_string(&out).expect("output");
        let mut parts = text.split_whitespace();
        assert_eq!(parts.next(), parts.next(), "LISTEN_PID equals $$");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
