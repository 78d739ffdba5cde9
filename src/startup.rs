//! Start-up, as a straight list of named steps: parse the command line,
//! validate the configuration, start logging, install the signal handlers,
//! bind every socket, then hand over to the master loop.
//!
//! Nothing is bound before the whole configuration is valid, and no worker
//! starts before every socket is bound, so a bad value or a busy port never
//! leaves a half-started server behind.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use tracing::{info, warn};

use crate::bind::Listener;
use crate::cli::Cli;
use crate::config::{Config, Environment};
use crate::error::{Error, Result};
use crate::logging;
use crate::master::Master;
use crate::signals::Signals;

/// Runs procman with the given argv. `Ok` carries the exit code of a clean
/// run (0, or --help/--version); `Err` the failure to print.
pub fn run(args: impl IntoIterator<Item = OsString>) -> Result<ExitCode> {
    let cli = match parse_args(args)? {
        Parsed::Run(cli) => cli,
        Parsed::Printed => return Ok(ExitCode::SUCCESS),
    };
    let cfg = Config::from_cli(&cli, &Environment::from_process())?;
    logging::init(cfg.log_level);
    become_subreaper();
    let signals = Signals::install()?;
    let listeners = bind_all(&cfg)?;
    let master = Master::new(cfg, listeners, signals)?;
    master.run()?;
    info!("Stopped");
    Ok(ExitCode::SUCCESS)
}

enum Parsed {
    Run(Box<Cli>),
    Printed,
}

/// clap's errors are several lines (usage, tips); procman prints one line
/// naming the value and the problem.
fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Parsed> {
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok(Parsed::Run(Box::new(cli))),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayVersion
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                Ok(Parsed::Printed)
            }
            _ => {
                let text = e.render().to_string();
                let first = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid command line")
                    .trim()
                    .trim_start_matches("error: ")
                    .to_string();
                Err(Error::usage(format!("{first} (see procman --help)")))
            }
        },
    }
}

/// Orphans of workers (double-forked helpers) are re-parented to procman
/// instead of init, so they are reaped here and never linger; as PID 1
/// this is automatic.
fn become_subreaper() {
    if std::process::id() != 1 {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            warn!("cannot become a child subreaper: {}", e.desc());
        }
    }
}

/// Binds every `--bind` in order; the first failure aborts (exit 1) and the
/// sockets already bound are closed (and their files removed) on the way out.
fn bind_all(cfg: &Config) -> Result<Vec<Listener>> {
    let mut listeners: Vec<Listener> = Vec::with_capacity(cfg.binds.len());
    for spec in &cfg.binds {
        match Listener::bind(spec, cfg.backlog, cfg.umask) {
            Ok(l) => {
                info!("Listening at: {} ({})", l.display, l.name);
                listeners.push(l);
            }
            Err(e) => {
                for l in &mut listeners {
                    l.remove_file();
                }
                return Err(e);
            }
        }
    }
    Ok(listeners)
}
