//! fork/exec of one worker: the crate's fork child, seen from the parent.
//!
//! Everything a child needs is computed before `fork` ([`Plan`]): argv and
//! envp as NUL-terminated buffers (with fixed-width slots where the child
//! writes its own pid, for `LISTEN_PID` and `WATCHDOG_PID`), the listeners
//! to place at fd 3.., the credentials, the directory, the umask and a
//! CLOEXEC pipe to report a failure. What the child does between `fork`
//! and `execve` is in `spawn/child.rs`. The parent reads the pipe:
//! end-of-file before any byte means exec worked; a full report is the
//! failure; anything else is a failure it cannot name.
//!
//! Why not `std::process::Command`: it builds the environment before fork,
//! so it cannot carry the child's own pid, which `LISTEN_PID` must be
//! (libsystemd and gunicorn ignore the sockets otherwise).

use std::ffi::{c_char, c_int, CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::identity::Credentials;

mod child;

use child::{child_main, ChildSetup};

/// Width reserved for a pid's decimal digits in the environment.
const PID_WIDTH: usize = 20;

/// Where in the child's setup a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Resetting the signal mask and dispositions.
    Signals = 1,
    /// Making it the leader of a new session (and process group).
    Session = 2,
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
            2 => Stage::Session,
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
            Stage::Session => "create a session",
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
    /// `--cpu-affinity`: the one CPU the child (and every thread it
    /// starts) runs on; `None` keeps the master's mask.
    cpu: Option<usize>,
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
            cpu: None,
        })
    }

    /// Gives the child `fd` (which the master keeps open until the spawn
    /// returns) as its stderr.
    pub fn with_stderr(mut self, fd: Option<RawFd>) -> Plan {
        self.stderr = fd;
        self
    }

    /// Pins the child to `cpu` (best effort: a CPU no longer allowed, say
    /// after a cpuset change, leaves it on the master's mask).
    pub fn with_cpu(mut self, cpu: Option<usize>) -> Plan {
        self.cpu = cpu;
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
        let cpu_set = self.cpu.and_then(cpu_set_of);
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
            cpu: cpu_set.as_ref(),
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
        // No setpgid from this side: had it made the child a group leader
        // first, the child's setsid would fail (EPERM). None is needed
        // either: by the time `read_exec_result` returns the child has
        // exec'd, so its setsid is done, or it failed and is exiting.
        Ok(Spawned {
            pid,
            exec_error: read_exec_result(&err_read),
        })
    }
}

/// The child's failure report: 4 bytes of stage code, 4 of errno, written
/// with one `write` (atomic: far below PIPE_BUF).
const REPORT_LEN: usize = 8;

/// The affinity mask holding only `cpu` (built before fork: the child only
/// passes it to the kernel). `None` for a CPU beyond what a mask holds.
fn cpu_set_of(cpu: usize) -> Option<libc::cpu_set_t> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return None;
    }
    // SAFETY: a zeroed cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE (checked above), so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    Some(set)
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
