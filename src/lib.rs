//! procman: a pre-fork process manager for network servers.
//!
//! A master process binds the listening sockets, forks N workers that
//! inherit them (the systemd `LISTEN_FDS` convention), and keeps the right
//! set of healthy workers alive from a single-threaded, SIGCHLD-driven
//! loop.
//!
//! The modules form layers, each importing only from layers below it (no
//! import cycles):
//! `main → startup → master (and master/*) → the parts (classes, zygote,
//! logging, generate, layers → config → cli) → the edges (policy, workers, spawn,
//! bind, notify, journal, signals, pid, pidfile, priority) → the leaves (error, identity,
//! safefs, procfs, cpus, escape)`. A lower module never names a higher one: what it
//! needs from above is passed in as a value.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(clippy::unwrap_used)]

// What the user asked for, validated.
pub mod cli;
pub mod config;
pub mod cpus;
pub mod error;
pub mod identity;
pub mod layers;
// `procman completions SHELL`, `procman man`: generated from cli.rs.
pub mod generate;

// Start-up: logging, then the steps before the first worker.
pub mod escape;
pub mod journal;
pub mod logging;
pub mod pidfile;
pub mod safefs;
pub mod startup;

// The edges of the master: sockets, signals, notifications, fork/exec.
pub mod bind;
pub mod closer;
pub mod notify;
pub mod pid;
pub mod priority;
pub mod procfs;
pub mod shed;
pub mod signals;
// `--reload`: inotify over the source trees.
pub mod spawn;
pub mod watch;

// What a worker runs.
pub mod classes;
pub mod zygote;

// What the master reports and how it is asked: the status snapshot, the
// non-blocking server of the metrics endpoint and the control socket.
pub mod control;
pub mod metrics;
pub mod serve;
pub mod status;
// In-place upgrade: the state handed to the next image, the binary and its
// pre-flight (below master, which hands over and adopts).
pub mod upgrade;

// The supervision: the table, the pure policy, the loop.
pub mod workers;
// (policy decides; master only carries decisions out)
pub mod policy;
// The loop itself.
pub mod master;

/// Test-only helpers shared by the modules' property tests.
#[cfg(test)]
pub(crate) mod testing {
    use proptest::test_runner::Config;

    /// A property test's configuration: `cases` runs, and no persisted failure files (a failing
    /// seed is printed; writing `proptest-regressions/` into the source tree from a test run would
    /// dirty the checkout).
    pub(crate) fn proptest_cases(cases: u32) -> Config {
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        }
    }
}
