//! Start-up, as a straight list of named steps: parse the command line,
//! validate the configuration, start logging, install the signal handlers
//! (undoing whatever signal state the parent left), bind every socket, run
//! the `--pre-start` commands (a stop request ends start-up there), then
//! hand over to the master loop.
//!
//! Nothing is bound before the whole configuration is valid, and no worker
//! starts before every socket is bound, so a bad value or a busy port never
//! leaves a half-started server behind.

use std::ffi::OsString;
use std::process::ExitCode;

use tracing::{info, warn};

use std::os::fd::{AsRawFd, OwnedFd};

use crate::bind::{self, BindSpec, Listener};
use crate::config;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::layers;
use crate::logging;
use crate::master::{self, Master};
use crate::pidfile::Pidfile;
use crate::signals;
use crate::signals::{MasterSignal, Signals};
use crate::spawn::Plan;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// Runs procman with the given argv. `Ok` carries the exit code of a clean
/// run (0, or --help/--version); `Err` the failure to print.
pub fn run(args: impl IntoIterator<Item = OsString>) -> Result<ExitCode> {
    // Before procman opens anything: what is open now was inherited, and
    // only that may be named by fd:// (see bind.rs).
    bind::record_inherited_fds();
    let args: Vec<OsString> = args.into_iter().collect();
    if let Some(request) = crate::generate::requested(&args) {
        crate::generate::print(request?)?;
        return Ok(ExitCode::SUCCESS);
    }
    // `procman status|reload|scale|stop|upgrade`: a client of a running master's
    // control socket, recognised in first position only.
    if let Some(sub) = args.get(1).and_then(|a| a.to_str()) {
        if crate::control::SUBCOMMANDS.contains(&sub) {
            let rest: Vec<String> = args[1..]
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            return Ok(crate::control::run_client(&rest));
        }
    }
    // The pre-flight of an upgrade (`crate::upgrade`): answer and exit.
    if let Some(code) = crate::upgrade::check_mode(&args) {
        return Ok(code);
    }
    // The new image of an in-place upgrade: the state its old image left.
    let upgraded = crate::upgrade::take_state().map_err(Error::runtime)?;
    let Some((cfg, layered)) = layers::load_config(&args)? else {
        return Ok(ExitCode::SUCCESS);
    };
    if layered.cli.flag("print-config") {
        print!("{}", layered.render_toml());
        return Ok(ExitCode::SUCCESS);
    }
    if layered.cli.flag("check-config") {
        probe_interpreter(&cfg)?;
        check(&cfg)?;
        println!("procman: configuration OK ({})", cfg.describe_workers());
        return Ok(ExitCode::SUCCESS);
    }
    logging::init(
        cfg.log_level,
        cfg.log_format,
        cfg.log_file.as_deref(),
        cfg.credentials.as_ref(),
    )?;
    become_subreaper();
    let mut signals = Signals::install()?;
    // Where `--user` workers will reach the notify socket is part of a valid
    // start: decided before anything is bound.
    crate::notify::notify_base(cfg.credentials.as_ref())?;
    probe_interpreter(&cfg)?;
    if cfg.uvicorn().is_some() {
        crate::classes::uvicorn::bootstrap_fd()
            .map_err(|e| Error::runtime(format!("cannot hold the bootstrap's source: {e}")))?;
    }
    if let Some(state) = upgraded {
        // Same pid: the pidfile is rewritten (it names us already).
        let _pidfile = cfg.pidfile.as_deref().map(Pidfile::create).transpose()?;
        Master::adopt(cfg, state, signals, args)?.run()?;
        info!("Stopped");
        return Ok(ExitCode::SUCCESS);
    }
    let mut listeners = bind_all(&cfg)?;
    let _pidfile = cfg.pidfile.as_deref().map(Pidfile::create).transpose()?;
    let pre_start = run_pre_start(&cfg, &mut signals);
    if !matches!(pre_start, Ok(PreStart::Done)) {
        // No worker will use the sockets: leave no socket file behind.
        for l in &mut listeners {
            l.remove_file();
        }
    }
    if pre_start? == PreStart::Stopped {
        info!("Stopped");
        return Ok(ExitCode::SUCCESS);
    }
    let master = Master::new(cfg, listeners, signals, args)?;
    master.run()?;
    info!("Stopped");
    Ok(ExitCode::SUCCESS)
}

/// --check-config: everything is valid; for an APP, import it once with the
/// chosen Python (its own error, if any, is printed on stderr). The import
/// runs the app's code, so it runs exactly like a worker's: forked with the
/// workers' user, groups, directory and umask, never as root when `--user`
/// is set.
fn check(cfg: &Config) -> Result<()> {
    let Some(opts) = cfg.uvicorn() else {
        return Ok(());
    };
    let json = crate::classes::uvicorn::app_config(opts, cfg, crate::classes::uvicorn::Mode::Check);
    let mut env = master::worker_base_env(cfg);
    env.retain(|(k, _)| k != crate::classes::uvicorn::CONFIG_VAR);
    env.push((
        crate::classes::uvicorn::CONFIG_VAR.into(),
        json.to_string().into(),
    ));
    let mut argv = vec![opts.python.display().to_string()];
    argv.extend(crate::classes::uvicorn::bootstrap_args(&opts.app));
    let cannot =
        |why: String| Error::runtime(format!("cannot run {}: {why}", opts.python.display()));
    let (env, fds) = crate::classes::uvicorn::with_bootstrap(&env, &[])
        .map_err(|e| cannot(format!("cannot hand it the bootstrap: {e}")))?;
    let child = spawn_helper(cfg, &opts.python, &argv, &env, &fds, cannot)?;
    let status = loop {
        match waitpid(child.pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    match status {
        Ok(WaitStatus::Exited(_, 0)) => Ok(()),
        Ok(WaitStatus::Exited(_, 4)) => Err(Error::AppImport(format!(
            "Failed to load application '{}' (the Python error is above)",
            opts.app
        ))),
        Ok(other) => Err(Error::BootFailed(format!(
            "checking '{}' failed ({}; see above)",
            opts.app,
            master::describe(&other)
        ))),
        Err(e) => Err(cannot(e.desc().to_string())),
    }
}

/// Orphans of workers (double-forked helpers) are re-parented to procman
/// instead of init, so they are reaped here and never linger; as PID 1
/// this is automatic.
/// Start a one-off helper (`--check`'s import, a pre-start command) as the
/// workers would run: same credentials, directory, umask and signal
/// dispositions, no sockets. `fail` words an error; a child that could not
/// exec is reaped here, so a returned child did exec.
/// `--user` with the uvicorn class: the interpreter is run once (`python -I
/// -S -c ''`, no directory change) as that user before anything is bound,
/// so that one the user cannot execute (a virtualenv under a 0700 home) is
/// one line naming the interpreter, the user and the fix. Without it each
/// zygote and worker failed with "Permission denied" before procman gave up
/// with exit 3, and no line named the user. Any other outcome is left to
/// the workers, which say it as before.
fn probe_interpreter(cfg: &Config) -> Result<()> {
    let (Some(opts), Some(creds)) = (cfg.uvicorn(), cfg.credentials.as_ref()) else {
        return Ok(());
    };
    let python = opts.python.display().to_string();
    let argv = [
        python.clone(),
        "-I".into(),
        "-S".into(),
        "-c".into(),
        String::new(),
    ];
    let Ok(plan) = Plan::new(
        &opts.python,
        &argv,
        &[],
        &[],
        &[],
        Some(creds),
        None,
        cfg.umask,
        &signals::changed_dispositions(),
    ) else {
        return Ok(()); // a NUL in the path: config validation says it
    };
    let Ok(child) = plan.spawn() else {
        return Ok(());
    };
    while let Err(Errno::EINTR) = waitpid(child.pid, None) {}
    match child.exec_error {
        Some((crate::spawn::Stage::Exec, Errno::EACCES)) => Err(Error::usage(format!(
            "user '{user}' cannot execute the interpreter {python} (permission denied: the file, or a directory on its path, is not executable by '{user}'): point --python at an interpreter '{user}' can run (a virtualenv outside a private home directory, e.g. made with /usr/bin/python3 -m venv), or let '{user}' reach this one",
            user = creds.user_name
        ))),
        _ => Ok(()),
    }
}

fn spawn_helper(
    cfg: &Config,
    program: &std::path::Path,
    argv: &[String],
    env: &[(OsString, OsString)],
    fds: &[std::os::fd::RawFd],
    fail: impl Fn(String) -> Error,
) -> Result<crate::spawn::Spawned> {
    let plan = Plan::new(
        program,
        argv,
        env,
        &[],
        fds,
        cfg.credentials.as_ref(),
        cfg.chdir.as_deref(),
        cfg.umask,
        &signals::changed_dispositions(),
    )
    .map_err(|e| fail(format!("'{}' contains a NUL byte", e.0)))?;
    let child = plan.spawn().map_err(|e| fail(e.desc().to_string()))?;
    if let Some((stage, errno)) = child.exec_error {
        let _ = waitpid(child.pid, None);
        return Err(fail(format!(
            "cannot {}: {}",
            stage.describe(),
            errno.desc()
        )));
    }
    Ok(child)
}

fn become_subreaper() {
    if std::process::id() != 1 {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            warn!("cannot become a child subreaper: {}", e.desc());
        }
    }
}

/// The sockets: those systemd passed to procman (socket activation),
/// matched to `--bind` entries by address, then by name, then by order,
/// and every remaining `--bind` bound here. Without `--bind`, all
/// inherited sockets are used and nothing is bound. The first failure
/// aborts (exit 1); sockets bound so far are closed and their files
/// removed on the way out.
fn bind_all(cfg: &Config) -> Result<Vec<Listener>> {
    let var = |k: &str| std::env::var(k).ok();
    let passed = bind::activation_fds(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    );
    let mut inherited: Vec<Option<(OwnedFd, String)>> = Vec::new();
    for (fd, name) in passed {
        // Only a listening socket that was really open at start is a
        // usable inheritance; anything else at that number is a mistake of
        // whoever started us (or one of our own fds, if the number was
        // free at start), and is left alone.
        match bind::claim_inherited(fd) {
            Ok(owned) => inherited.push(Some((owned, name))),
            Err(why) => warn!("ignoring inherited fd {fd} ({name}): {why}"),
        }
    }
    let mut listeners: Vec<Listener> = Vec::new();
    let abort = |listeners: &mut Vec<Listener>, e: Error| {
        for l in listeners.iter_mut() {
            l.remove_file();
        }
        e
    };
    let specs: &[BindSpec] = if cfg.binds_given || inherited.is_empty() {
        &cfg.binds
    } else {
        &[]
    };
    // Pass 1: address, then name; pass 2: order, for what is left.
    let mut assigned: Vec<Option<usize>> = specs
        .iter()
        .map(|spec| {
            inherited.iter().position(|slot| {
                slot.as_ref().is_some_and(|(fd, name)| {
                    bind::spec_matches(spec, fd)
                        || *name == spec.to_string()
                        || *name == spec.fd_name()
                })
            })
        })
        .collect();
    let mut taken: Vec<usize> = assigned.iter().flatten().copied().collect();
    for a in assigned.iter_mut().filter(|a| a.is_none()) {
        if let Some(i) = (0..inherited.len()).find(|i| !taken.contains(i)) {
            taken.push(i);
            *a = Some(i);
        }
    }
    for (spec, slot) in specs.iter().zip(assigned) {
        let listener = match slot.and_then(|i| inherited[i].take()) {
            Some((fd, name)) => Listener::inherited(spec.clone(), fd, name),
            None => match Listener::bind(spec, &cfg.bind_options()) {
                Ok(l) => l,
                Err(e) => return Err(abort(&mut listeners, e)),
            },
        };
        listeners.push(listener);
    }
    // Sockets systemd passed that no --bind named are served too.
    for (fd, name) in inherited.into_iter().flatten() {
        listeners.push(Listener::inherited(BindSpec::Fd(fd.as_raw_fd()), fd, name));
    }
    if cfg.reuse_port {
        let migrate =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").unwrap_or_default();
        if migrate.trim() != "1" {
            warn!(
                "--reuse-port: net.ipv4.tcp_migrate_req is off, so connections queued on a slot's socket are lost when the slot goes (fewer workers, a reload to other addresses, a slot backing off after crashes) (sysctl -w net.ipv4.tcp_migrate_req=1)"
            );
        }
    }
    for l in &listeners {
        let how = match (l.inherited, l.reuse_port) {
            (true, _) => "inherited",
            (false, true) => "bound, one SO_REUSEPORT listener per worker slot",
            (false, false) => "bound",
        };
        info!(
            event = "listening",
            address = %l.display,
            name = %l.name,
            inherited = l.inherited,
            reuse_port = l.reuse_port,
            "Listening at: {} ({}, {how})",
            l.display,
            l.name
        );
    }
    Ok(listeners)
}

/// How the `--pre-start` commands ended, when none failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreStart {
    /// All ran and succeeded: start the workers.
    Done,
    /// TERM, INT or QUIT came first: exit 0 without starting any worker.
    Stopped,
}

/// After the SIGKILL at the graceful deadline, how long to wait for the
/// command's process group to be gone (as a subreaper procman reaps every
/// member itself; this only bounds the wait if it could not become one).
const KILL_GRACE: Duration = Duration::from_secs(1);

/// `--pre-start` commands: each once, in order, as `sh -c CMD`, with the
/// workers' environment, directory, umask and user (forked like a worker,
/// without sockets); output goes to procman's own stdout and stderr. The
/// first failure stops procman (exit 1) before any worker starts; so does
/// TERM, INT or QUIT, with exit 0 (see [`wait_pre_start`]).
fn run_pre_start(cfg: &Config, signals: &mut Signals) -> Result<PreStart> {
    if cfg.pre_start.is_empty() {
        return Ok(PreStart::Done);
    }
    let sh = config::find_program("sh", std::env::var_os("PATH").as_deref(), None)
        .map_err(|why| Error::runtime(format!("cannot run pre-start commands: sh {why}")))?;
    let env = master::worker_base_env(cfg);
    for cmd in &cfg.pre_start {
        // A stop that came before (or between) the commands: the next one
        // does not start.
        if let Some(sig) = take_stop(signals) {
            info!(
                "Shutting down: {} before pre-start command '{cmd}'; not starting any worker",
                signal_name(sig)
            );
            return Ok(PreStart::Stopped);
        }
        info!(event = "pre-start", "Running pre-start command: {cmd}");
        let argv = ["sh".to_string(), "-c".to_string(), cmd.clone()];
        let fail =
            |why: String| Error::runtime(format!("cannot run pre-start command '{cmd}': {why}"));
        let child = spawn_helper(cfg, &sh, &argv, &env, &[], fail)?;
        match wait_pre_start(child.pid, cmd, cfg.graceful_timeout, signals) {
            PreStartEnd::Exited(WaitStatus::Exited(_, 0)) => {}
            PreStartEnd::Exited(other) => {
                return Err(Error::runtime(format!(
                    "pre-start command '{cmd}' {}; not starting any worker",
                    master::describe(&other)
                )))
            }
            PreStartEnd::Stopped => return Ok(PreStart::Stopped),
        }
    }
    Ok(PreStart::Done)
}

/// How one pre-start command ended.
enum PreStartEnd {
    /// It exited on its own, with this status.
    Exited(WaitStatus),
    /// procman was asked to stop and the command's process group is gone.
    Stopped,
}

/// Drains the signal pipe: the first stop request, if any. Everything
/// else (HUP, TTIN, ...) is held for the master loop; CHLD is dropped, as
/// the caller reaps anyway.
fn take_stop(signals: &mut Signals) -> Option<MasterSignal> {
    let mut stop = None;
    for sig in signals.drain() {
        match sig {
            s if s.is_stop() => stop = stop.or(Some(s)),
            MasterSignal::ChildExited => {}
            other => signals.hold(other),
        }
    }
    stop
}

/// "SIGTERM", for the log.
fn signal_name(sig: MasterSignal) -> &'static str {
    Signal::try_from(sig.number()).map_or("a signal", |s| s.as_str())
}

/// Waits for the pre-start command `leader` (which leads its own process
/// group, so a terminal's Ctrl-C does not reach it) without a master loop:
/// poll(2) on the signal self-pipe, where SIGCHLD arrives too, and reap
/// after each wake-up. TERM, INT or QUIT is sent on to the command's
/// process group; if the group is not gone by `--graceful-timeout`, it
/// gets SIGKILL. A stopped command ends start-up, whatever its status.
fn wait_pre_start(
    leader: Pid,
    cmd: &str,
    graceful: Duration,
    signals: &mut Signals,
) -> PreStartEnd {
    let mut status: Option<WaitStatus> = None;
    // When stopping: the deadline, and whether SIGKILL was sent.
    let mut stopping: Option<(Instant, bool)> = None;
    loop {
        let mut stops = Vec::new();
        for sig in signals.drain() {
            match sig {
                s if s.is_stop() => stops.push(s),
                MasterSignal::ChildExited => {}
                other => signals.hold(other),
            }
        }
        for sig in stops {
            if stopping.is_none() {
                info!(
                    event = "shutdown",
                    reason = "pre-start",
                    "Shutting down: {} during pre-start command '{cmd}' (pid {leader}); not starting any worker",
                    signal_name(sig)
                );
                stopping = Some((Instant::now() + graceful, false));
            }
            // Every stop signal is passed on (a second Ctrl-C included).
            if let Ok(sig) = Signal::try_from(sig.number()) {
                let _ = killpg(leader, sig);
            }
        }
        // Reap every child: the command, and any of its helpers that were
        // re-parented to procman (a subreaper) when their parent died.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(s) if s.pid() == Some(leader) => status = Some(s),
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(_) => break, // ECHILD
            }
        }
        let now = Instant::now();
        match (status, stopping) {
            (Some(s), None) => return PreStartEnd::Exited(s),
            // The group outlives its leader until every member is gone.
            (Some(_), Some(_)) if killpg(leader, None) == Err(Errno::ESRCH) => {
                return PreStartEnd::Stopped
            }
            (_, Some((deadline, false))) if now >= deadline => {
                warn!(
                    event = "killing",
                    reason = "pre-start",
                    process = leader.as_raw(),
                    "Pre-start command '{cmd}' (pid {leader}) did not stop in {}s; killing it",
                    graceful.as_secs_f64()
                );
                let _ = killpg(leader, Signal::SIGKILL);
                stopping = Some((now + KILL_GRACE, true));
                continue;
            }
            (_, Some((deadline, true))) if now >= deadline => {
                warn!("Pre-start command '{cmd}' (pid {leader}): processes of its group are still there after SIGKILL");
                return PreStartEnd::Stopped;
            }
            _ => {}
        }
        let timeout = match stopping {
            None => PollTimeout::NONE,
            // Rounded up, so the loop never wakes just before the deadline.
            Some((deadline, _)) => {
                let ms = deadline
                    .saturating_duration_since(now)
                    .as_nanos()
                    .div_ceil(1_000_000)
                    .min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(signals.fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                // Without the pipe there is no event to wait for: wait for
                // the command alone, as if no signal came.
                warn!(
                    "poll failed: {}; waiting for pre-start command '{cmd}'",
                    e.desc()
                );
                return match (stopping, status.or_else(|| waitpid(leader, None).ok())) {
                    (None, Some(s)) => PreStartEnd::Exited(s),
                    _ => PreStartEnd::Stopped,
                };
            }
        }
    }
}
