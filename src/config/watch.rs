//! `--reload` and its `--reload-*` options, validated: the directories to
//! watch (resolved once, here) and which files count.

use std::path::{Path, PathBuf};

use super::{belongs, invalid};
use crate::cli::Cli;
use crate::error::Result;
use crate::watch::{Filter, DEFAULT_EXCLUDE, DEFAULT_INCLUDE};

/// What `--reload` watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    /// The trees, resolved (no symlink left in them).
    pub roots: Vec<PathBuf>,
    pub filter: Filter,
}

/// `None` without `--reload`. `chdir`: the workers' directory (the
/// default tree); `uvicorn`: whether workers run an APP (a command's
/// sources are not Python: it needs its own `--reload-include`).
pub(super) fn watch_config(
    cli: &Cli,
    chdir: Option<&Path>,
    uvicorn: bool,
) -> Result<Option<WatchConfig>> {
    if !cli.flag("reload") {
        for name in ["reload-dir", "reload-include", "reload-exclude"] {
            if cli.is_set(name) {
                return Err(belongs(
                    name,
                    format!("'--{name}' needs '--reload' (it only says what --reload watches)"),
                ));
            }
        }
        return Ok(None);
    }
    if !uvicorn && !cli.is_set("reload-include") {
        return Err(belongs(
            "reload",
            "'--reload' with a COMMAND needs '--reload-include GLOB': which of its files are sources (the default, *.py, is for an APP)",
        ));
    }
    let mut roots = Vec::new();
    let given = cli.list("reload-dir");
    let dirs: Vec<PathBuf> = if given.is_empty() {
        vec![chdir.map_or_else(|| PathBuf::from("."), Path::to_path_buf)]
    } else {
        given.iter().map(PathBuf::from).collect()
    };
    for d in dirs {
        let shown = d.display().to_string();
        let resolved = match std::fs::canonicalize(&d) {
            Ok(p) if p.is_dir() => p,
            Ok(_) => return Err(invalid("reload-dir", &shown, "not a directory")),
            Err(e) => return Err(invalid("reload-dir", &shown, e)),
        };
        // A tree inside another is watched once.
        if !roots.iter().any(|r: &PathBuf| resolved.starts_with(r)) {
            roots.retain(|r: &PathBuf| !r.starts_with(&resolved));
            roots.push(resolved);
        }
    }
    let patterns = |name: &'static str, defaults: &[&str]| -> Result<Vec<String>> {
        let mut out: Vec<String> = defaults.iter().map(|s| s.to_string()).collect();
        for p in cli.list(name) {
            if p.is_empty() {
                return Err(invalid(name, p, "an empty pattern"));
            }
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        Ok(out)
    };
    let include = patterns("reload-include", DEFAULT_INCLUDE)?;
    let mut exclude = patterns("reload-exclude", DEFAULT_EXCLUDE)?;
    // As uvicorn: a pattern asked for by name is not excluded by default.
    let asked = cli.list("reload-include");
    exclude.retain(|e| !asked.contains(e) || cli.list("reload-exclude").contains(e));
    Ok(Some(WatchConfig {
        roots,
        filter: Filter { include, exclude },
    }))
}
