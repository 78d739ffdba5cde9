//! The forked child, from `fork` to `execve`: the only code that runs
//! between the two. It makes only async-signal-safe system calls on values
//! the parent computed before the fork ([`ChildSetup`]): no allocation, no
//! locks, no logging, no return into the master's code (which could run
//! destructors of the master's objects). [`ChildSetup::setup`] runs each
//! step `?`-checked in the order that matters and returns only on failure;
//! [`child_main`] is the one report point, which writes the failed
//! (stage, errno) to the exec-error pipe and calls `_exit(127)`.

use std::convert::Infallible;
use std::ffi::{c_char, c_int};
use std::os::fd::RawFd;

use nix::errno::Errno;

use super::{Stage, PID_WIDTH, REPORT_LEN};

/// Raw pointers and numbers the child uses; built by the parent before
/// fork, so the child only reads them (and writes into `raised` and the pid
/// slots, in its own copy-on-write memory).
pub(super) struct ChildSetup<'a> {
    pub(super) master: libc::pid_t,
    pub(super) program: *const c_char,
    pub(super) argv: *const *const c_char,
    pub(super) envp: *const *const c_char,
    pub(super) slots: &'a [*mut u8],
    pub(super) listeners: &'a [RawFd],
    pub(super) raised: &'a mut [c_int],
    pub(super) credentials: Option<(u32, u32)>,
    pub(super) groups: &'a [libc::gid_t],
    pub(super) chdir: Option<*const c_char>,
    pub(super) umask: libc::mode_t,
    pub(super) reset_signals: &'a [c_int],
    pub(super) err_fd: RawFd,
    pub(super) stderr: Option<RawFd>,
    pub(super) cpu: Option<&'a libc::cpu_set_t>,
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
pub(super) fn child_main(child: &mut ChildSetup) -> ! {
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

        // A session of its own, which it leads (so also a process group of
        // its own, whose id is its pid): the master signals the whole
        // group, so helpers the worker starts are stopped with it; and no
        // process outside the session (another worker's helper) can join
        // the group, since setpgid only moves a process within its own
        // session. It also leaves procman's controlling terminal: ^C there
        // reaches procman, which stops the workers itself.
        // SAFETY: setsid is async-signal-safe and takes no argument.
        check(unsafe { libc::setsid() }, Stage::Session)?;

        // --cpu-affinity: before exec, so every thread the program starts
        // inherits the mask. Best effort: a CPU taken away since procman
        // read its mask (EINVAL) leaves the worker on the master's mask
        // rather than failing its start.
        if let Some(set) = self.cpu {
            // SAFETY: sched_setaffinity is a plain system call (no lock, no
            // allocation); `set` points to a mask the parent built before
            // the fork, of the size given.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
        }

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
}
