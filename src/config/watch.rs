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

impl WatchConfig {
    /// The directories whose Python modules are the user's own, resolved:
    /// every watched tree and the workers' directory (`chdir`, else the
    /// current one). The base zygote pre-imports what the app imports from
    /// anywhere else (its third-party packages), never a module from these,
    /// so that a reloaded worker imports only the user's modules.
    pub fn app_trees(&self, chdir: Option<&Path>) -> Vec<String> {
        let mut trees: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        // A directory that cannot be resolved (gone since the start) is
        // left out: no worker can run in it.
        if let Ok(dir) = std::fs::canonicalize(chdir.unwrap_or(Path::new("."))) {
            let dir = dir.display().to_string();
            if !trees.contains(&dir) {
                trees.push(dir);
            }
        }
        trees
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str], uvicorn: bool) -> Result<Option<WatchConfig>> {
        let argv = ["procman"].iter().chain(args).chain(["--", "true"].iter());
        let cli = Cli::try_parse_from(argv).expect("parses");
        watch_config(&cli, None, uvicorn)
    }

    #[test]
    fn nested_directories_are_one_tree_resolved_once() {
        let base = std::env::temp_dir().join(format!("procman-watch-cfg-{}", std::process::id()));
        std::fs::create_dir_all(base.join("a/b")).expect("mkdir");
        let (a, b) = (base.join("a"), base.join("a/b"));
        let w = resolve(
            &[
                "--reload",
                "--reload-dir",
                b.to_str().expect("utf8"),
                "--reload-dir",
                a.to_str().expect("utf8"),
            ],
            true,
        )
        .expect("valid")
        .expect("on");
        assert_eq!(w.roots, [a.canonicalize().expect("resolves")]);
        let file = base.join("f");
        std::fs::write(&file, "").expect("file");
        let e = resolve(
            &["--reload", "--reload-dir", file.to_str().expect("utf8")],
            true,
        )
        .expect_err("a file");
        assert!(e.to_string().contains("not a directory"), "{e}");
        std::fs::remove_dir_all(&base).expect("rm");
    }

    #[test]
    fn the_app_trees_are_the_watched_ones_and_the_workers_directory() {
        let base = std::env::temp_dir().join(format!("procman-trees-{}", std::process::id()));
        let (app, extra) = (base.join("app"), base.join("extra"));
        std::fs::create_dir_all(&app).expect("mkdir");
        std::fs::create_dir_all(&extra).expect("mkdir");
        let resolved = |p: &Path| p.canonicalize().expect("resolves").display().to_string();
        let w = resolve(
            &["--reload", "--reload-dir", extra.to_str().expect("utf8")],
            true,
        )
        .expect("valid")
        .expect("on");
        // The watched tree, and the workers' directory (not watched here).
        assert_eq!(w.app_trees(Some(&app)), [resolved(&extra), resolved(&app)]);
        // Watched already: once.
        assert_eq!(w.app_trees(Some(&extra)), [resolved(&extra)]);
        std::fs::remove_dir_all(&base).expect("rm");
    }

    #[test]
    fn includes_and_excludes_add_to_the_defaults() {
        let w = resolve(
            &[
                "--reload",
                "--reload-include",
                "*.html",
                "--reload-include",
                "4913",
                "--reload-exclude",
                "tmp",
            ],
            true,
        )
        .expect("valid")
        .expect("on");
        assert_eq!(w.filter.include, ["*.py", "*.html", "4913"]);
        // Asked for by name: not excluded by default any more.
        assert!(!w.filter.exclude.contains(&"4913".to_string()));
        assert!(w.filter.exclude.contains(&"tmp".to_string()));
        assert!(w.filter.exclude.contains(&"__pycache__".to_string()));
    }

    #[test]
    fn refusals_name_the_option() {
        let e = resolve(&["--reload"], false).expect_err("a command without an include");
        assert!(e.to_string().contains("--reload-include"), "{e}");
        assert!(resolve(&["--reload", "--reload-include", "*.go"], false).is_ok());
        let e = resolve(&["--reload-dir", "."], true).expect_err("without --reload");
        assert!(e.to_string().contains("needs '--reload'"), "{e}");
        assert_eq!(resolve(&[], true).expect("off"), None);
    }
}
