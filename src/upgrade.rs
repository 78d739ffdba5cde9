//! In-place upgrade (issue 28): the state description a master hands to
//! its next image, the binary it execs, and the pre-flight that must
//! answer before it does.
//!
//! The state is one JSON object written to a memfd that is CLOEXEC
//! everywhere except across the one `execveat`; the new image finds it
//! through `PROCMAN_UPGRADE_FD` (removed from the environment at once).
//! The version is `"state_version": N` at the top ([`STATE_VERSION`]): a
//! state without it, or with a number this binary does not read
//! ([`ACCEPTS`]), is refused, and a binary that cannot read the version
//! this one writes says so in its pre-flight answer (`accepts`), so the
//! running master never execs it. Times are relative to the moment
//! the state was written (milliseconds, negative for the past), since an
//! `Instant` means nothing in another image.
//!
//! The pre-flight runs the checked binary with the same argv and
//! `PROCMAN_UPGRADE_CHECK=N`: it reads the configuration as a start would
//! and writes one JSON line on fd N: the [`MAGIC`], its version, the state
//! versions it accepts, and whether the configuration is valid. Only such
//! a line, positive and accepting [`STATE_VERSION`], passes: an exit status
//! alone (`/bin/true`) never does.

use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

/// The state format this binary writes. Version 2 added each listener's
/// slot sockets (`--reuse-port`): a binary that reads only version 1 would
/// leave them open, unnamed, in every worker it starts, so it is refused.
pub const STATE_VERSION: u32 = 2;
/// The state formats this binary reads (version 1 has no slot sockets).
pub const ACCEPTS: &[u32] = &[1, 2];
/// What only procman's check mode writes.
pub const MAGIC: &str = "procman-upgrade-check";
/// The variable naming the state's descriptor in the new image.
pub const STATE_ENV: &str = "PROCMAN_UPGRADE_FD";
/// The variable naming the answer's descriptor in the pre-flight.
pub const CHECK_ENV: &str = "PROCMAN_UPGRADE_CHECK";
/// How long the pre-flight may take (reading a configuration).
pub const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest state read back (a table of 10000 workers is far less).
const MAX_STATE: u64 = 64 << 20;

/// The whole description of a running master.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub state_version: u32,
    pub procman_version: String,
    /// Still booting (systemd not told READY yet).
    pub booting: bool,
    pub generation: u64,
    pub required_generation: u64,
    pub latest_generation: u64,
    pub target: usize,
    pub ever_up: bool,
    pub boot_failures: u32,
    /// How long ago the master started (for the status's uptime).
    pub started_ms: i64,
    pub upgrades: u64,
    pub workers: Vec<WorkerRecord>,
    pub listeners: Vec<ListenerRecord>,
    pub notify: SocketRecord,
    pub urgent: SocketRecord,
    pub control: Option<EndpointRecord>,
    pub metrics: Option<EndpointRecord>,
    /// The `procman upgrade` connection the new image answers.
    pub reply_fd: Option<RawFd>,
    /// Signals the old image had read but not handled (numbers).
    #[serde(default)]
    pub signals: Vec<i32>,
    /// The exec'd binary's descriptor, open for a script's interpreter
    /// (`/dev/fd/N`); the new image closes it.
    #[serde(default)]
    pub binary_fd: Option<RawFd>,
}

/// One worker row; `*_ms` are relative to the state's writing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerRecord {
    pub pid: i32,
    pub slot: usize,
    pub generation: u64,
    /// "starting", "ready" or "stopping".
    pub state: String,
    pub deadline_ms: Option<i64>,
    pub stable_at_ms: Option<i64>,
    pub recycle: Option<String>,
    pub draining: bool,
    pub retire_at_ms: Option<i64>,
    pub samples_over_memory: u32,
    pub lowered_from: Option<i32>,
    /// Booting raised: the nice it goes back to (procman's own at the
    /// fork), and when the boost ends at the latest.
    pub boosted_from: Option<i32>,
    #[serde(default)]
    pub boost_until_ms: Option<i64>,
    pub stop_reason: Option<String>,
    pub kill_at_ms: Option<i64>,
    /// procman SIGKILLed it: during a quick stop (true) or not.
    pub killed_quick: Option<bool>,
    pub started_ms: i64,
    pub ready_ms: Option<i64>,
    pub heartbeat_ms: Option<i64>,
    pub reported_error: Option<String>,
    pub reported_traceback: Option<String>,
}

/// A listening socket of the workers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListenerRecord {
    pub fd: RawFd,
    pub spec: String,
    pub name: String,
    pub display: String,
    /// The socket file to remove at exit: path, device, inode.
    pub unlink: Option<(PathBuf, u64, u64)>,
    pub inherited: bool,
    pub reuse_port: bool,
    /// `--reuse-port`: each slot's listening socket (slot, fd), kept by
    /// the master for the slot's next worker.
    #[serde(default)]
    pub slots: Vec<(usize, RawFd)>,
}

/// A notify socket: the socket, its private directory (open) and paths.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SocketRecord {
    pub fd: RawFd,
    pub dir_fd: RawFd,
    pub dir: PathBuf,
    pub path: PathBuf,
    pub queue_limit: usize,
}

/// The metrics endpoint or the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointRecord {
    pub fd: RawFd,
    /// The unix socket file: path, device, inode; `None` for TCP.
    pub unix: Option<(PathBuf, u64, u64)>,
}

/// A time relative to `now`, in milliseconds (negative: past).
pub fn rel(at: Instant, now: Instant) -> i64 {
    if at >= now {
        at.duration_since(now).as_millis().min(i64::MAX as u128) as i64
    } else {
        -(now.duration_since(at).as_millis().min(i64::MAX as u128) as i64)
    }
}

/// The instant a relative time names, from `now`.
pub fn abs(ms: i64, now: Instant) -> Instant {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        now + d
    } else {
        now.checked_sub(d).unwrap_or(now)
    }
}

impl State {
    /// Reads and checks a state: `state_version` first, then the rest.
    pub fn from_json(bytes: &[u8]) -> Result<State, String> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("the state is not JSON: {e}"))?;
        match v.get("state_version").and_then(serde_json::Value::as_u64) {
            Some(n) if ACCEPTS.contains(&(n as u32)) => {}
            Some(n) => {
                return Err(format!(
                    "state version {n} is not one this procman reads ({ACCEPTS:?})"
                ))
            }
            None => return Err("the state has no state_version".into()),
        }
        serde_json::from_value(v).map_err(|e| format!("the state is malformed: {e}"))
    }

    /// Every descriptor the state names (to keep open across exec).
    pub fn fds(&self) -> Vec<RawFd> {
        let mut out: Vec<RawFd> = self.listeners.iter().map(|l| l.fd).collect();
        out.extend(
            self.listeners
                .iter()
                .flat_map(|l| l.slots.iter().map(|s| s.1)),
        );
        for s in [&self.notify, &self.urgent] {
            out.extend([s.fd, s.dir_fd]);
        }
        out.extend(self.control.iter().chain(&self.metrics).map(|e| e.fd));
        out.extend(self.reply_fd);
        out.extend(self.binary_fd);
        out
    }
}

/// Sets or clears `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> Result<(), Errno> {
    let flag = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flag)).map(|_| ())
}

/// Writes the state to a fresh memfd (CLOEXEC), rewound.
pub fn write_memfd(state: &State) -> Result<OwnedFd, String> {
    let json = serde_json::to_vec(state).map_err(|e| format!("cannot write the state: {e}"))?;
    let fd = nix::sys::memfd::memfd_create(
        c"procman-upgrade-state",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(|e| format!("cannot create the state memfd: {}", e.desc()))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&json)
        .and_then(|_| std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).map(|_| ()))
        .map_err(|e| format!("cannot write the state memfd: {e}"))?;
    Ok(OwnedFd::from(f))
}

/// In the new image: takes the state named by [`STATE_ENV`], if any, and
/// removes the variable. `Err` if it is named but unreadable.
pub fn take_state() -> Result<Option<State>, String> {
    let Some(value) = std::env::var_os(STATE_ENV) else {
        return Ok(None);
    };
    std::env::remove_var(STATE_ENV);
    let n: RawFd = value
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 2)
        .ok_or_else(|| format!("{STATE_ENV}={value:?}: not a descriptor number"))?;
    // The descriptor must be a memfd named by our old image, not anything.
    let link = std::fs::read_link(format!("/proc/self/fd/{n}"))
        .map_err(|e| format!("{STATE_ENV}={n}: {e}"))?;
    if !link
        .as_os_str()
        .as_bytes()
        .starts_with(b"/memfd:procman-upgrade-state")
    {
        return Err(format!(
            "{STATE_ENV}={n}: not procman's state ({})",
            link.display()
        ));
    }
    // Recorded as inherited at start: it is procman's, never `fd://`'s.
    crate::bind::forget_inherited(n);
    // SAFETY: `n` is open (read_link above) and is the state memfd the old
    // image left for us; nothing else in this image owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(n) };
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_STATE)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the state: {e}"))?;
    State::from_json(&bytes).map(Some)
}

// ---- check mode: the new binary's side of the pre-flight ----

/// The answer of a pre-flight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Answer {
    pub magic: String,
    pub version: String,
    pub accepts: Vec<u32>,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// If this is a pre-flight (`PROCMAN_UPGRADE_CHECK=N`): checks the
/// configuration of `args` and answers on fd N. Returns whether it was one.
pub fn check_mode(args: &[OsString]) -> Option<std::process::ExitCode> {
    let value = std::env::var_os(CHECK_ENV)?;
    std::env::remove_var(CHECK_ENV);
    let Some(n) = value
        .to_str()
        .and_then(|s| s.parse::<RawFd>().ok())
        .filter(|n| *n > 2)
    else {
        eprintln!("procman: error: {CHECK_ENV}={value:?}: not a descriptor number");
        return Some(std::process::ExitCode::from(2));
    };
    let verdict = match crate::layers::load_config(args) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("the command line only prints (help or version)".to_string()),
        Err(e) => Err(format!("the configuration is refused: {e}")),
    };
    let answer = Answer {
        magic: MAGIC.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        accepts: test_accepts().unwrap_or_else(|| ACCEPTS.to_vec()),
        ok: verdict.is_ok(),
        error: verdict.err(),
    };
    let mut line = serde_json::to_vec(&answer).unwrap_or_default();
    line.push(b'\n');
    if nix::fcntl::fcntl(n, FcntlArg::F_GETFD).is_err() {
        eprintln!("procman: error: {CHECK_ENV}={n}: not open");
        return Some(std::process::ExitCode::from(2));
    }
    // SAFETY: `n` is open (checked above) and was handed to this process
    // for its answer; nothing else here owns it.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(n) });
    let _ = f.write_all(&line);
    Some(std::process::ExitCode::SUCCESS)
}

/// `PROCMAN_TEST_UPGRADE_ACCEPTS=2,3`: what a check answers it accepts,
/// so a test can play a future version that reads only a newer state.
/// Only in debug builds.
fn test_accepts() -> Option<Vec<u32>> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let v = std::env::var("PROCMAN_TEST_UPGRADE_ACCEPTS").ok()?;
    Some(v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
}

/// Judges a pre-flight's answer bytes and exit.
pub fn judge(answer: &[u8], status: Option<WaitStatus>) -> Result<Answer, String> {
    let line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
    let exit = match status {
        Some(WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
        Some(WaitStatus::Signaled(_, sig, _)) => format!("killed by {}", sig.as_str()),
        Some(_) => "ended".into(),
        None => format!("no answer in {}s", PREFLIGHT_TIMEOUT.as_secs()),
    };
    if line.is_empty() {
        return Err(format!("the new binary gave no pre-flight answer ({exit})"));
    }
    let a: Answer = serde_json::from_slice(line)
        .map_err(|_| format!("the new binary's pre-flight answer is not procman's ({exit})"))?;
    if a.magic != MAGIC {
        return Err(format!(
            "the new binary's pre-flight answer is not procman's ({exit})"
        ));
    }
    if !a.ok {
        let why = a.error.as_deref().unwrap_or("no reason given");
        return Err(format!("procman {} refuses: {why}", a.version));
    }
    if !a.accepts.contains(&STATE_VERSION) {
        return Err(format!(
            "procman {} reads state versions {:?}, not {STATE_VERSION} (what this procman writes)",
            a.version, a.accepts
        ));
    }
    if !matches!(status, Some(WaitStatus::Exited(_, 0))) {
        return Err(format!("the new binary's pre-flight {exit}"));
    }
    Ok(a)
}

// ---- the binary ----

/// Opens the binary to exec and checks it as any file root runs: a regular
/// executable file, owned by root (when procman is root) or by procman's
/// user, writable by nobody else. The returned descriptor is what the
/// pre-flight runs and what is exec'd, so no path is looked up twice.
pub fn open_binary(path: &Path) -> Result<OwnedFd, String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("{shown}: not an absolute path"));
    }
    let fd = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("{shown}: cannot open: {}", e.desc()))?;
    // SAFETY: `open` just returned this descriptor; it is ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let meta = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("{shown}: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    if meta.mode() & 0o111 == 0 {
        return Err(format!("{shown}: not executable"));
    }
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "{shown}: owned by uid {}, not root or procman's user",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{shown}: writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(fd)
}

/// Where procman was started from: `argv[0]` made absolute (by the
/// working directory, or the `PATH` search a shell made), not resolved
/// through symlinks, so a package upgrade that swaps the file or a link is
/// seen: /proc/self/exe may name the deleted old file by then.
pub fn started_from(argv0: &std::ffi::OsStr) -> Option<PathBuf> {
    let p = Path::new(argv0);
    if p.as_os_str().as_bytes().contains(&b'/') {
        return Some(std::env::current_dir().ok()?.join(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
        .or_else(|| std::env::current_exe().ok())
}

/// Turns argv/env into C strings (before any fork).
pub fn c_strings<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<CString>, String> {
    items
        .into_iter()
        .map(|b| CString::new(b).map_err(|_| "an argument contains a NUL byte".to_string()))
        .collect()
}

/// The environment of the new image or the pre-flight: procman's own,
/// less any stale marker, plus `extra`.
pub fn environment(extra: (&str, String)) -> Result<Vec<CString>, String> {
    let mut out: Vec<Vec<u8>> = std::env::vars_os()
        .filter(|(k, _)| k != STATE_ENV && k != CHECK_ENV)
        .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
        .collect();
    out.push(format!("{}={}", extra.0, extra.1).into_bytes());
    c_strings(out.iter().map(Vec::as_slice))
}

/// A pre-flight in progress: `binary` run with `argv` and [`CHECK_ENV`],
/// its answer read from a non-blocking pipe and its exit seen through a
/// pidfd, both in the master's poll set, until [`PREFLIGHT_TIMEOUT`]: the
/// master's loop goes on meanwhile (no wait, no sleep).
pub struct Preflight {
    child: Pid,
    read: Option<std::fs::File>,
    pidfd: Option<OwnedFd>,
    answer: Vec<u8>,
    status: Option<WaitStatus>,
    /// When the child is killed and the check failed.
    pub deadline: Instant,
}

impl Preflight {
    /// Forks and execs the check.
    pub fn start(binary: &OwnedFd, argv: &[CString], now: Instant) -> Result<Preflight, String> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| format!("cannot make the pre-flight pipe: {}", e.desc()))?;
        let envp = environment((CHECK_ENV, write.as_raw_fd().to_string()))?;
        let mut argp: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argp.push(std::ptr::null());
        let mut envpp: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
        envpp.push(std::ptr::null());
        let (bin, wfd) = (binary.as_raw_fd(), write.as_raw_fd());
        // SAFETY: the master is single-threaded; the child only calls
        // fcntl, execveat (as a raw syscall) and _exit, all
        // async-signal-safe, on memory allocated before the fork.
        let child = match unsafe { nix::unistd::fork() } {
            Ok(ForkResult::Child) => {
                // SAFETY: async-signal-safe calls on valid descriptors and
                // NUL-terminated arrays prepared above.
                unsafe {
                    libc::fcntl(wfd, libc::F_SETFD, 0);
                    // A script (#!) is read by its interpreter through
                    // /dev/fd/N: the binary's descriptor must stay open.
                    libc::fcntl(bin, libc::F_SETFD, 0);
                    libc::syscall(
                        libc::SYS_execveat,
                        bin,
                        c"".as_ptr(),
                        argp.as_ptr(),
                        envpp.as_ptr(),
                        libc::AT_EMPTY_PATH,
                    );
                    libc::_exit(127);
                }
            }
            Ok(ForkResult::Parent { child }) => child,
            Err(e) => return Err(format!("cannot fork the pre-flight: {}", e.desc())),
        };
        drop(write);
        // SAFETY: pidfd_open takes a pid and flags; returns a new fd or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) };
        // SAFETY: a non-negative return is a new descriptor owned here.
        let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) });
        if let Some(p) = &pidfd {
            let _ = set_cloexec(p.as_raw_fd(), true);
        }
        Ok(Preflight {
            child,
            read: Some(std::fs::File::from(read)),
            pidfd,
            answer: Vec::new(),
            status: None,
            deadline: now + PREFLIGHT_TIMEOUT,
        })
    }

    /// The check's pid (the master's reap loop hands its exit here).
    pub fn child(&self) -> Pid {
        self.child
    }

    /// What to poll: the answer pipe until its end, the pidfd until the
    /// exit is known.
    pub fn poll_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        let mut out = Vec::new();
        out.extend(self.read.as_ref().map(std::os::fd::AsFd::as_fd));
        if self.status.is_none() {
            out.extend(self.pidfd.as_ref().map(std::os::fd::AsFd::as_fd));
        }
        out
    }

    /// The check was reaped (by the master's loop).
    pub fn exited(&mut self, status: WaitStatus) {
        self.status = Some(status);
    }

    /// Reads what the check wrote (at most 4 KiB) and reaps it if it is
    /// done; then, once it answered and exited, the verdict; past the
    /// deadline, it is killed and the verdict is a failure. `None`: not
    /// done yet.
    pub fn poll(&mut self, now: Instant) -> Option<Result<Answer, String>> {
        if let Some(f) = &mut self.read {
            let mut buf = [0u8; 4096];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => {
                        self.read = None;
                        break;
                    }
                    Ok(n) => {
                        let room = 4096usize.saturating_sub(self.answer.len());
                        self.answer.extend_from_slice(&buf[..n.min(room)]);
                        if self.answer.len() >= 4096 {
                            self.read = None;
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break, // WouldBlock
                }
            }
        }
        if self.status.is_none() {
            match waitpid(self.child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
                Ok(s) => self.status = Some(s),
                Err(_) => {}
            }
        }
        if self.read.is_none() && self.status.is_some() {
            return Some(judge(&self.answer, self.status));
        }
        if now >= self.deadline {
            // Reaped by the master's loop like any other child.
            if self.status.is_none() {
                let _ = kill(self.child, Signal::SIGKILL);
            }
            return Some(judge(&self.answer, None));
        }
        None
    }
}

#[cfg(test)]
mod tests;
