//! The launcher: what workers are started from, as one value
//! ([`Settings`]: the configuration, the class's launch recipe, the base
//! environment and the listeners), and how it becomes the environment and
//! the fork plan of a child. A reload prepares the next `Settings` whole
//! and swaps it in or drops it (see reload.rs); while it goes on, the
//! settings it may go back to are kept in a [`Reload`].

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::rc::Rc;

use crate::bind::Listener;
use crate::classes::{self, Behaviour, Launch};
use crate::config::Config;
use crate::signals;
use crate::spawn::Plan;

/// Variables procman may have inherited from its own supervisor that must
/// never reach a worker (they describe procman's sockets, not the worker's;
/// `PROCMAN_CPU` is procman's to set per worker, with `--cpu-affinity`).
const SCRUBBED: &[&str] = &[
    "PROCMAN_CPU",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",
];

/// The variables that tell a worker who it is: its slot, its generation
/// and, with `--cpu-affinity auto`, its CPU. The same for a worker the
/// master forks and one a zygote forks (which pins itself from
/// `PROCMAN_CPU`, before any thread).
pub(super) fn worker_vars(
    slot: usize,
    generation: u64,
    cpu: Option<usize>,
) -> Vec<(&'static str, String)> {
    let mut vars = vec![
        ("PROCMAN_WORKER_ID", slot.to_string()),
        ("PROCMAN_GENERATION", generation.to_string()),
    ];
    vars.extend(cpu.map(|c| ("PROCMAN_CPU", c.to_string())));
    vars
}

/// What workers are started from; replaced whole by a reload.
pub(super) struct Settings {
    pub(super) cfg: Config,
    pub(super) launch: Launch,
    /// What the master decides per class.
    pub(super) class: Behaviour,
    pub(super) base_env: Vec<(OsString, OsString)>,
    /// Shared with the settings a reload may go back to (see reload.rs).
    pub(super) listeners: Vec<Rc<Listener>>,
    /// How many workers (TTIN/TTOU change it).
    pub(super) target: usize,
    /// How many workers may boot at once: the CPUs procman may use (as
    /// `--workers auto` counts them). Only for workers that say when they
    /// are ready: a `--ready exec` worker's boot has no known end.
    pub(super) max_booting: usize,
    /// `--cpu-affinity auto`: the CPUs procman may use, which the slots
    /// take in turn (read here, so a slot keeps its CPU: empty when off).
    cpus: Vec<usize>,
}

impl Settings {
    /// The settings for a configuration and its listeners.
    pub(super) fn new(cfg: Config, listeners: Vec<Rc<Listener>>) -> Settings {
        let class = classes::behaviour(&cfg);
        Settings {
            launch: classes::launch(&cfg),
            max_booting: if class.notify_ready {
                crate::cpus::available().0
            } else {
                usize::MAX
            },
            class,
            cpus: if cfg.cpu_affinity {
                crate::cpus::allowed()
            } else {
                Vec::new()
            },
            base_env: worker_base_env(&cfg),
            target: cfg.workers,
            listeners,
            cfg,
        }
    }

    /// `--reuse-port`: closes the master's copy of the slot sockets
    /// `which` selects, on every listener (`Listener::slot_socket`): for
    /// slots no longer wanted, or whose next worker is not due at once.
    pub(super) fn forget_slot_sockets(&self, which: impl Fn(usize) -> bool + Copy) {
        for l in &self.listeners {
            l.forget_slots(which);
        }
    }

    /// The CPU worker `slot` runs on (`--cpu-affinity auto`), if any. The
    /// mask is read again at each start: a CPU taken away since (a cpuset
    /// that shrank) would refuse the worker, which then runs unpinned on
    /// the CPUs left, and a warning says so.
    pub(super) fn slot_cpu(&self, slot: usize) -> Option<usize> {
        if self.cpus.is_empty() {
            return None;
        }
        let now = crate::cpus::allowed();
        match crate::cpus::for_slot_now(&self.cpus, &now, slot) {
            Ok(cpu) => cpu,
            Err(cpu) => {
                let left: Vec<String> = now.iter().map(|c| c.to_string()).collect();
                tracing::warn!(
                    "cannot pin worker slot {slot} to CPU {cpu}: procman may no longer run there \
                     (its CPUs are now {}); the worker runs unpinned on those",
                    left.join(",")
                );
                None
            }
        }
    }

    /// The environment of a child (worker or zygote): procman's own (less
    /// what described procman's sockets) with `--env`, the class's
    /// variables, `extra`, and the protocol variables (`urgent_socket`:
    /// see urgent.rs). Also returns the variables whose value the child's
    /// own pid fills in after fork.
    pub(super) fn child_env(
        &self,
        notify_socket: &Path,
        urgent_socket: &Path,
        extra: &[(&str, String)],
    ) -> (Vec<(OsString, OsString)>, Vec<&'static str>) {
        let mut env = self.base_env.clone();
        let mut set = |k: &str, v: OsString| {
            env.retain(|(key, _)| key != k);
            env.push((k.into(), v));
        };
        for (k, v) in &self.launch.env {
            set(k, v.into());
        }
        for (k, v) in extra {
            set(k, v.into());
        }
        set("LISTEN_FDS", self.listeners.len().to_string().into());
        let names: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
        set("LISTEN_FDNAMES", names.join(":").into());
        // The path as bytes: a runtime directory need not be UTF-8.
        set("NOTIFY_SOCKET", notify_socket.as_os_str().to_owned());
        set(super::urgent::ENV, urgent_socket.as_os_str().to_owned());
        let mut pid_vars = vec!["LISTEN_PID"];
        if let Some(t) = self.cfg.timeout {
            set("WATCHDOG_USEC", t.as_micros().to_string().into());
            pid_vars.push("WATCHDOG_PID");
        }
        (env, pid_vars)
    }

    /// What to fork for a child of the configured class: its program,
    /// argv, environment and these fds at 3.., as the workers' user, in
    /// their directory, with their umask.
    pub(super) fn child_plan(
        &self,
        env: &[(OsString, OsString)],
        pid_vars: &[&str],
        fds: &[std::os::fd::RawFd],
    ) -> std::result::Result<Plan, crate::spawn::NulError> {
        // A uvicorn child also gets the bootstrap's source, as an fd after
        // these (made at start-up: a failure here cannot happen, and would
        // leave the loader without its variable, which it says).
        let with_source = match self.cfg.uvicorn() {
            Some(_) => classes::uvicorn::with_bootstrap(env, fds).ok(),
            None => None,
        };
        let (env, fds) = match &with_source {
            Some((env, fds)) => (env.as_slice(), fds.as_slice()),
            None => (env, fds),
        };
        Plan::new(
            &self.launch.program,
            &self.launch.argv,
            env,
            pid_vars,
            fds,
            self.cfg.credentials.as_ref(),
            self.cfg.chdir.as_deref(),
            self.cfg.umask,
            &signals::changed_dispositions(),
        )
        // With --log-file, the workers' stderr is the log file too.
        .map(|plan| plan.with_stderr(crate::logging::file_fd()))
    }

    /// What to fork for a zygote (uvicorn only): the class's program with
    /// the bootstrap in zygote mode (importing the app only with
    /// `--preload`), the listeners at 3.. and its end of the channel after
    /// them. `None` for a class without zygotes.
    pub(super) fn zygote_plan(
        &self,
        notify_socket: &Path,
        urgent_socket: &Path,
        channel: std::os::fd::RawFd,
    ) -> Option<std::result::Result<Plan, crate::spawn::NulError>> {
        let opts = self.cfg.uvicorn()?;
        let json = classes::uvicorn::app_config(
            opts,
            &self.cfg,
            classes::uvicorn::Mode::Zygote {
                import_app: opts.preload,
            },
        );
        let (env, pid_vars) = self.child_env(
            notify_socket,
            urgent_socket,
            &[
                (classes::uvicorn::CONFIG_VAR, json.to_string()),
                ("PROCMAN_ZYGOTE_FD", (3 + self.listeners.len()).to_string()),
                ("PROCMAN_MASTER_PID", std::process::id().to_string()),
            ],
        );
        let mut fds: Vec<_> = self.listeners.iter().map(|l| l.fd.as_raw_fd()).collect();
        fds.push(channel);
        Some(self.child_plan(&env, &pid_vars, &fds))
    }
}

/// A rolling reload in progress.
pub(super) struct Reload {
    /// The generation being rolled out.
    pub(super) generation: u64,
    /// The generation in force before, and the one the policy required
    /// then: both put back if the reload fails.
    pub(super) previous_generation: u64,
    pub(super) previous_required: u64,
    /// The settings in force before the reload, put back if it fails.
    pub(super) previous: Settings,
    /// Whether every step of it (a reload superseded by another is one)
    /// kept the base zygote in force ([`super::Master::abort_reload`] gives
    /// it back to the previous generation).
    pub(super) zygote_kept: bool,
}

/// Drops listeners; those no other settings hold are closed (unix socket
/// files removed). Returns how the closed ones are shown in logs.
pub(super) fn release(listeners: Vec<Rc<Listener>>) -> Vec<String> {
    let mut closed = Vec::new();
    for l in listeners {
        if let Ok(mut l) = Rc::try_unwrap(l) {
            l.remove_file();
            closed.push(l.display.clone());
        }
    }
    closed
}

/// The environment every worker (and pre-start command) starts from:
/// procman's own, without what described procman's sockets, plus `--env`.
/// Names and values are bytes: a variable that is not UTF-8 is passed on
/// unchanged (`std::env::vars` would panic on it).
pub fn worker_base_env(cfg: &Config) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !SCRUBBED.iter().any(|s| k == s))
        .collect();
    for (k, v) in &cfg.env {
        env.retain(|(key, _)| key != k.as_str());
        env.push((k.into(), v.into()));
    }
    env
}
