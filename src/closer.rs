//! Descriptors that senders pass to the notify socket (`SCM_RIGHTS`):
//! never the master's to close last.
//!
//! Closing a descriptor can block for as long as its file says: a TCP
//! socket with unsent data and `SO_LINGER=(1, N)` for up to N seconds, a
//! FUSE file for as long as its daemon takes to answer the flush. The
//! kernel does that work in the process that drops the last reference:
//! `close(2)`, and also a `recvmsg` whose control buffer cannot take the
//! descriptors (the kernel drops those references itself, and the final
//! release runs as the receiving task returns to user space). So:
//!
//! * On kernels with `SO_PASSRIGHTS` (Linux 6.16 and later) the socket
//!   refuses descriptors: the sender's `sendmsg` fails with `EPERM` and
//!   nothing reaches the master ([`refuse_rights`]).
//! * Elsewhere descriptors still arrive. The master receives them all (its
//!   control buffer holds the most one message can carry, `SCM_MAX_FD`)
//!   and hands them to a closer ([`Disposer`]): a child forked on first
//!   need that only receives descriptors on a socket pair and closes them.
//!   The master sends with `MSG_DONTWAIT`, then closes its own copies, then
//!   sends a message without descriptors. The closer closes what a message
//!   brought only once the next message (or end-of-file) has come: by then
//!   the master's copies are gone, so the closer's close is the last (were
//!   it to close at once, the master's own close could come after it, and
//!   be the last). The closer may block on a close, the master never does.
//! * A closer that cannot take more (its queue is full because a close
//!   blocks it, or it died) is killed and replaced, once per message; what
//!   it held is released as it exits, in its own context. If no closer can
//!   be had (fork fails), the master closes the descriptors itself, after
//!   setting `SO_LINGER=(1, 0)` on the sockets among them (a close that
//!   resets instead of waiting), and warns: that last resort can still
//!   block on other kinds of files.
//!
//! The closer is the master's child: it is reaped by the loop's
//! `waitpid(-1)` like any child (as a process that is not a worker), has
//! the parent-death signal, and ends at end-of-file when the master's end
//! of the pair closes. It keeps root's credentials, with no descriptor but
//! its end of the pair, no signal handler of the master's, and ignores the
//! terminal's and the operator's signals (a Ctrl-C reaches the master,
//! which stops, and then the closer dies with it).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use nix::unistd::Pid;
use tracing::{debug, warn};

/// `SO_PASSRIGHTS` (Linux 6.16): whether a unix socket accepts
/// `SCM_RIGHTS`. The value of the generic socket option table, which the
/// architectures procman builds for (x86, arm, riscv, …) use.
pub const SO_PASSRIGHTS: libc::c_int = 83;

/// The most descriptors one unix socket message carries (`SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Asks the kernel to refuse descriptors sent to `fd`; `false` on a kernel
/// without `SO_PASSRIGHTS` (`ENOPROTOOPT`).
pub fn refuse_rights(fd: BorrowedFd<'_>) -> bool {
    let off: libc::c_int = 0;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

/// Where received descriptors go (see the module's comment).
#[derive(Debug, Default)]
pub struct Disposer {
    closer: Option<Closer>,
    /// The last resort was said (once: it is not said per datagram).
    warned: bool,
}

#[derive(Debug)]
struct Closer {
    pid: Pid,
    /// The master's end of the pair.
    sock: OwnedFd,
}

impl Disposer {
    /// Takes over `fds`, just received: they are closed by the closer.
    pub fn dispose(&mut self, fds: &[RawFd]) {
        for chunk in fds.chunks(MAX_FDS_PER_MESSAGE) {
            self.dispose_chunk(chunk);
        }
    }

    /// The closer's pid, if one runs.
    pub fn closer(&self) -> Option<Pid> {
        self.closer.as_ref().map(|c| c.pid)
    }

    fn dispose_chunk(&mut self, fds: &[RawFd]) {
        // The current closer, else a fresh one; a closer that cannot take
        // them is replaced once.
        for _ in 0..2 {
            if self.closer.is_none() {
                match Closer::spawn() {
                    Ok(c) => self.closer = Some(c),
                    Err(e) => {
                        warn!("cannot start a process to close passed descriptors: {e}");
                        break;
                    }
                }
            }
            let Some(closer) = &self.closer else { break };
            match closer.send(fds) {
                Ok(()) => {
                    close_all(fds);
                    // Now the closer may close them. If this does not fit
                    // (its queue is full), the next message (or our end's
                    // closing) says it just as well.
                    let _ = closer.send(&[]);
                    return;
                }
                Err(e) => {
                    debug!(
                        closer = closer.pid.as_raw(),
                        "the descriptor closer takes no more ({}): replacing it",
                        e.desc()
                    );
                    // What it holds is released as it exits, in its context.
                    let _ = kill(closer.pid, Signal::SIGKILL);
                    self.closer = None;
                }
            }
        }
        for &fd in fds {
            defuse_linger(fd);
        }
        close_all(fds);
        if !std::mem::replace(&mut self.warned, true) {
            warn!("closing passed descriptors in the master (no closer process could be started): such a close may block; said once");
        }
    }
}

impl Drop for Disposer {
    fn drop(&mut self) {
        // Closing our end gives the closer end-of-file; it exits on its own
        // (and with the master, by its parent-death signal).
        self.closer = None;
    }
}

impl Closer {
    fn spawn() -> nix::Result<Closer> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // SAFETY: getpid cannot fail.
        let master = unsafe { libc::getpid() };
        // Every signal blocked across fork: a signal arriving before the
        // child resets its dispositions would run the master's handler
        // there (a write to the master's self-pipe).
        let all = nix::sys::signal::SigSet::all();
        let mut old = nix::sys::signal::SigSet::empty();
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&all),
            Some(&mut old),
        )?;
        let theirs_fd = theirs.as_raw_fd();
        // SAFETY: the master is single-threaded, so the child has a
        // consistent copy of memory; it runs only `closer_main`, which
        // makes async-signal-safe system calls on stack buffers and never
        // returns.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            closer_main(theirs_fd, master);
        }
        let fork_errno = Errno::last();
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&old),
            None,
        );
        // Only the closer holds its end: when it dies, what is queued to it
        // is released in its context, not here.
        drop(theirs);
        if pid < 0 {
            return Err(fork_errno);
        }
        debug!(
            closer = pid,
            "started process {pid} to close descriptors passed to the notify socket"
        );
        Ok(Closer {
            pid: Pid::from_raw(pid),
            sock: ours,
        })
    }

    /// One message of one byte carrying `fds` (if any), never waiting.
    fn send(&self, fds: &[RawFd]) -> nix::Result<()> {
        let iov = [std::io::IoSlice::new(&[0u8])];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsg: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        loop {
            match sendmsg::<()>(
                self.sock.as_fd().as_raw_fd(),
                &iov,
                cmsg,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn close_all(fds: &[RawFd]) {
    for &fd in fds {
        // A close that only drops a reference: no error to act on.
        let _ = nix::unistd::close(fd);
    }
}

/// A socket's close that resets the connection instead of lingering
/// (`SO_LINGER=(1, 0)`); no effect on other files.
fn defuse_linger(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a live local of the size given; on a
    // descriptor that is not a socket it fails with ENOTSOCK.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The closer: receives descriptors on `sock` and closes those of each
/// message when the next one comes (the master has closed its copies by
/// then), the last ones at end-of-file. Only async-signal-safe system
/// calls, on the stack.
fn closer_main(sock: RawFd, master: libc::pid_t) -> ! {
    const SOCK: RawFd = 3;
    // SAFETY: each call below is an async-signal-safe system call on
    // numbers or on buffers on this stack; no allocation, no lock, no Rust
    // object of the parent's is used (the whole function).
    unsafe {
        for sig in 1..=64 {
            libc::signal(sig, libc::SIG_DFL);
        }
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPIPE,
            libc::SIGWINCH,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGTSTP,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != master {
            libc::_exit(0);
        }
        // Its end of the pair at fd 3, nothing else open.
        if sock != SOCK && libc::dup2(sock, SOCK) < 0 {
            libc::_exit(1);
        }
        libc::syscall(libc::SYS_close_range, 0u32, 2u32, 0u32);
        if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0 {
            // Before close_range (5.9): one close per possible descriptor.
            for fd in 4..65536 {
                libc::close(fd);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        let mut byte = [0u8; 1];
        // Room for SCM_MAX_FD descriptors and their header, aligned.
        let mut control = [0u64; 256];
        // The previous message's descriptors, closed when the next comes.
        let mut pending = [-1 as libc::c_int; 2 * MAX_FDS_PER_MESSAGE];
        let mut held = 0usize;
        loop {
            let mut iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: byte.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            let n = libc::recvmsg(SOCK, &mut msg, 0);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            // Any message, or the end: the master's copies are closed.
            for &fd in &pending[..held] {
                libc::close(fd);
            }
            held = 0;
            if n <= 0 {
                libc::_exit(0);
            }
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                    let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<libc::c_int>() {
                        let fd = data.add(i).read_unaligned();
                        if held < pending.len() {
                            pending[held] = fd;
                            held += 1;
                        } else {
                            libc::close(fd);
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{Discard, Receiver};
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};

    /// `SO_LINGER=(1, secs)`: a close with unsent data waits up to `secs`.
    fn set_linger(s: &TcpStream, secs: u64) {
        socket2::SockRef::from(s)
            .set_linger(Some(std::time::Duration::from_secs(secs)))
            .expect("SO_LINGER");
    }

    /// A connection whose close lingers `secs`: its peer never reads and
    /// its send buffer is full.
    fn lingering(peer: &TcpListener, secs: i32) -> TcpStream {
        let s = TcpStream::connect(peer.local_addr().expect("addr")).expect("connect");
        s.set_nonblocking(true).expect("nonblocking");
        while (&s).write(&[b'x'; 65536]).is_ok() {}
        set_linger(&s, secs as u64);
        s
    }

    /// The fallback (a kernel without SO_PASSRIGHTS, or one told not to
    /// use it): the receiving thread hands lingering sockets to the closer
    /// and goes on. A receiver that closed them itself would take up to
    /// 3 x 20 s; the deadline (10 s) is generous for a loaded machine yet
    /// shorter than that, so this fails on such a receiver (not a measure
    /// of speed).
    #[test]
    fn passed_lingering_sockets_are_closed_by_the_closer_not_the_receiver() {
        let mut rx = Receiver::create_with(None, false).expect("receiver");
        assert!(!rx.refuses_rights());
        let peer = TcpListener::bind("127.0.0.1:0").expect("bind");
        let passed: Vec<TcpStream> = (0..3).map(|_| lingering(&peer, 20)).collect();
        let fds: Vec<RawFd> = passed.iter().map(|s| s.as_raw_fd()).collect();
        let tx = UnixDatagram::unbound().expect("socket");
        sendmsg(
            tx.as_raw_fd(),
            &[std::io::IoSlice::new(b"WATCHDOG=1")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            Some(&nix::sys::socket::UnixAddr::new(rx.path()).expect("addr")),
        )
        .expect("descriptors pass without SO_PASSRIGHTS");
        // Ours are not the last: the message in flight holds its own.
        drop(passed);
        let t = Instant::now();
        let got = rx.receive().expect("the datagram");
        let took = t.elapsed();
        let closer = rx.closer().expect("a closer was started");
        // Whatever happens below, the closer goes (it is our child here).
        struct Reap(Pid);
        impl Drop for Reap {
            fn drop(&mut self) {
                let _ = kill(self.0, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(self.0, None);
            }
        }
        let _reap = Reap(closer);
        assert!(
            took < Duration::from_secs(10),
            "the receiver was blocked {took:?}"
        );
        assert_eq!(got.discarded, vec![(Discard::Descriptors, 3)]);
        assert!(got.datagram.is_some(), "the datagram itself is handled");
        // Received here, none is left in this process: each went to the
        // closer, which is now stuck lingering in its close, not us.
        for fd in &fds {
            let open = nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_GETFD);
            assert!(open.is_err() || !is_tcp(*fd), "fd {fd} still open here");
        }
        assert_eq!(rx.closer(), Some(closer), "one closer serves them all");
    }

    /// Descriptors still queued when procman exits are not released by the
    /// master either (same deadline reasoning as above: 2 x 20 s of
    /// lingering against 10 s).
    #[test]
    fn descriptors_still_queued_at_exit_go_to_the_closer_too() {
        let rx = Receiver::create_with(None, false).expect("receiver");
        let peer = TcpListener::bind("127.0.0.1:0").expect("bind");
        let passed: Vec<TcpStream> = (0..2).map(|_| lingering(&peer, 20)).collect();
        let fds: Vec<RawFd> = passed.iter().map(|s| s.as_raw_fd()).collect();
        let tx = UnixDatagram::unbound().expect("socket");
        sendmsg(
            tx.as_raw_fd(),
            &[std::io::IoSlice::new(b"WATCHDOG=1")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            Some(&nix::sys::socket::UnixAddr::new(rx.path()).expect("addr")),
        )
        .expect("descriptors pass without SO_PASSRIGHTS");
        drop(passed);
        let t = Instant::now();
        drop(rx);
        let took = t.elapsed();
        // The closer started meanwhile is this test's child (the only
        // one): killed and reaped, so it does not linger on.
        let me = std::process::id() as i32;
        for kid in crate::procfs::pids() {
            if crate::procfs::stat(kid).is_some_and(|s| s.ppid == me) {
                let _ = kill(Pid::from_raw(kid), Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(Pid::from_raw(kid), None);
            }
        }
        assert!(
            took < Duration::from_secs(10),
            "the drop was blocked {took:?}"
        );
    }

    fn is_tcp(fd: RawFd) -> bool {
        std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .is_ok_and(|p| p.to_string_lossy().starts_with("socket:"))
    }

    #[test]
    fn this_kernel_refuses_rights_or_says_it_cannot() {
        let (a, b) = UnixDatagram::pair().expect("pair");
        let refused = refuse_rights(b.as_fd());
        let file = std::fs::File::open("/dev/null").expect("open");
        let fds = [file.as_raw_fd()];
        let sent = sendmsg::<()>(
            a.as_raw_fd(),
            &[std::io::IoSlice::new(b"x")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        );
        if refused {
            assert_eq!(
                sent,
                Err(Errno::EPERM),
                "SO_PASSRIGHTS=0 refuses SCM_RIGHTS"
            );
        } else {
            assert!(sent.is_ok(), "without SO_PASSRIGHTS descriptors pass");
        }
    }
}
