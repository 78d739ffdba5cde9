//! `--reload`: the inotify edge. Watches directory trees for changed source
//! files, from a non-blocking descriptor the master polls with its others.
//!
//! Every directory of the trees is watched (inotify is not recursive):
//! those found at start, and those that appear later (created or moved in),
//! which are scanned when added so that a file written before its watch
//! existed still counts. Excluded directories (`.git`, `__pycache__`,
//! virtualenvs, `node_modules`, …) are not watched at all, which saves
//! watches and keeps the workers' own writes (bytecode caches) from ever
//! waking the master. Symbolic links are never followed: a symlinked
//! directory is skipped, and every watch is added with `IN_DONT_FOLLOW`, so
//! the watch cannot leave the trees the operator named (resolved once, at
//! start). A file counts when it is written and closed, renamed in or out,
//! or deleted: an editor's rename-save is a `IN_MOVED_TO` of the real name.
//!
//! Each [`Watcher::read`] reads a bounded number of buffers: anything left
//! keeps the descriptor readable, and the next pass reads on. Running out of
//! watches (`fs.inotify.max_user_watches`) is said once, with how to raise
//! it; what could be watched still is.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tracing::warn;

/// Reads of at most 4 KiB (nix's buffer) per pass: 64 events of a short
/// name each, a bounded slice of work even when a worker writes files
/// under the watched tree without pause.
const READS_PER_PASS: usize = 8;

/// Which files count: names matching an include pattern and neither
/// matching an exclude pattern nor under a directory that does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

/// The default `--reload-include`.
pub const DEFAULT_INCLUDE: &[&str] = &["*.py"];
/// The default `--reload-exclude`: version control, bytecode, virtualenvs
/// (also any directory holding `pyvenv.cfg`), node modules, and editors'
/// swap, backup and lock files (`4913` is vim's write test).
pub const DEFAULT_EXCLUDE: &[&str] = &[
    ".git",
    "__pycache__",
    ".venv",
    "venv",
    "node_modules",
    ".*.swp",
    "*~",
    ".#*",
    "4913",
];

impl Filter {
    /// Whether a name (a file's or a directory's) is excluded.
    pub fn excluded(&self, name: &str) -> bool {
        self.exclude.iter().any(|p| glob(p, name))
    }

    /// Whether a file (its path relative to a watched root) counts.
    pub fn counts(&self, rel: &Path) -> bool {
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy()) else {
            return false;
        };
        let dirs_ok = rel
            .parent()
            .into_iter()
            .flat_map(|p| p.iter())
            .all(|c| !self.excluded(&c.to_string_lossy()));
        let whole = rel.to_string_lossy();
        dirs_ok
            && !self.excluded(&name)
            && self.include.iter().any(|p| {
                if p.contains('/') {
                    glob(p, &whole)
                } else {
                    glob(p, &name)
                }
            })
    }
}

/// Shell-style matching of a whole name: `*`, `?`, `[abc]`, `[a-z]`,
/// `[!abc]`; `*` also matches `/` (a pattern with a `/` is matched against
/// the path relative to its root).
pub fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => match class(&p[pi..], n[ni]) {
                Some((hit, len)) => hit.then_some(len),
                None => (n[ni] == '[').then_some(1),
            },
            Some(c) if *c == n[ni] => Some(1),
            _ => None,
        };
        match (step, star) {
            (Some(len), _) => {
                pi += len;
                ni += 1;
            }
            (None, Some((sp, sn))) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A `[...]` class at the start of `p` against `c`: whether it matches, and
/// the class's length; `None` if unclosed (then `[` is a literal).
fn class(p: &[char], c: char) -> Option<(bool, usize)> {
    let end = p.iter().skip(2).position(|&x| x == ']').map(|i| i + 2)?;
    let (negate, body) = match p[1] {
        '!' | '^' => (true, &p[2..end]),
        _ => (false, &p[1..end]),
    };
    let mut hit = false;
    let mut i = 0;
    while i < body.len() {
        if i + 2 < body.len() && body[i + 1] == '-' {
            hit |= body[i] <= c && c <= body[i + 2];
            i += 3;
        } else {
            hit |= body[i] == c;
            i += 1;
        }
    }
    Some((hit != negate, end + 1))
}

/// What one directory watch is.
struct Dir {
    /// The directory.
    path: PathBuf,
    /// The watched root it is under.
    root: usize,
}

/// The watches over the trees.
pub struct Watcher {
    inotify: Inotify,
    roots: Vec<PathBuf>,
    dirs: HashMap<WatchDescriptor, Dir>,
    filter: Filter,
    /// Out of watches was said.
    limit_said: bool,
}

/// The events a directory watch asks for.
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DONT_FOLLOW
        | AddWatchFlags::IN_ONLYDIR
}

impl Watcher {
    /// Watches every directory under `roots` (already resolved). Returns
    /// the watcher and the number of directories watched.
    pub fn new(roots: Vec<PathBuf>, filter: Filter) -> std::io::Result<Watcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mut w = Watcher {
            inotify,
            roots,
            dirs: HashMap::new(),
            filter,
            limit_said: false,
        };
        for root in 0..w.roots.len() {
            let path = w.roots[root].clone();
            let mut found = Vec::new();
            w.add_tree(root, &path, &mut found);
        }
        Ok(w)
    }

    /// The descriptor to poll for reading.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// How many directories are watched.
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    /// Whether a directory is one to skip (excluded, a virtualenv).
    fn skip_dir(&self, path: &Path) -> bool {
        let name = path.file_name().map(|n| n.to_string_lossy());
        name.is_some_and(|n| self.filter.excluded(&n)) || path.join("pyvenv.cfg").exists()
    }

    /// Watches `dir` and every directory under it (no symlink followed);
    /// pushes the files found that count (a directory that appeared with
    /// files in it).
    fn add_tree(&mut self, root: usize, dir: &Path, found: &mut Vec<PathBuf>) {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            if self.skip_dir(&d) {
                continue;
            }
            match self.inotify.add_watch(&d, mask()) {
                Ok(wd) => {
                    self.dirs.insert(
                        wd,
                        Dir {
                            path: d.clone(),
                            root,
                        },
                    );
                }
                Err(Errno::ENOSPC) => {
                    if !self.limit_said {
                        self.limit_said = true;
                        warn!(
                            event = "watch-limit",
                            "--reload: out of inotify watches (fs.inotify.max_user_watches) at {}: changes below it are not seen; raise the limit with `sysctl fs.inotify.max_user_watches=524288`, or narrow --reload-dir / --reload-exclude",
                            crate::escape::text(&d.to_string_lossy())
                        );
                    }
                    return;
                }
                // Gone meanwhile, or not a directory (IN_ONLYDIR): nothing to watch.
                Err(_) => continue,
            }
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                // Not followed: a symlink is neither a directory nor a file here.
                let Ok(t) = e.file_type() else { continue };
                let path = e.path();
                if t.is_dir() {
                    stack.push(path);
                } else if t.is_file() && self.counts(root, &path) {
                    found.push(path);
                }
            }
        }
    }

    fn counts(&self, root: usize, path: &Path) -> bool {
        path.strip_prefix(&self.roots[root])
            .is_ok_and(|rel| self.filter.counts(rel))
    }

    /// Reads what is queued (a bounded amount) and returns the files that
    /// changed and count, in order, and whether events were lost (the
    /// kernel's queue overflowed: then the trees are scanned again for new
    /// directories, and the caller treats it as a change).
    pub fn read(&mut self) -> (Vec<PathBuf>, bool) {
        let mut changed = Vec::new();
        let mut overflow = false;
        for _ in 0..READS_PER_PASS {
            let events = match self.inotify.read_events() {
                Ok(e) if !e.is_empty() => e,
                Ok(_) | Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("--reload: reading inotify events failed: {}", e.desc());
                    break;
                }
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    overflow = true;
                    continue;
                }
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory went (deleted, or moved away): its
                    // parent's watch sees a new one of that name.
                    self.dirs.remove(&ev.wd);
                    continue;
                }
                let Some(dir) = self.dirs.get(&ev.wd) else {
                    continue;
                };
                let Some(name) = ev.name else { continue };
                let path = dir.path.join(&name);
                let root = dir.root;
                let appeared = ev
                    .mask
                    .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
                if ev.mask.contains(AddWatchFlags::IN_ISDIR) {
                    if appeared {
                        // Not followed if it is a symlink: IN_ISDIR is
                        // only set for a real directory, and add_watch
                        // does not follow (IN_DONT_FOLLOW).
                        self.add_tree(root, &path, &mut changed);
                    } else if ev.mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                        // Moved away (maybe out of the tree): its watches
                        // would report under a name it no longer has.
                        self.unwatch_under(&path);
                        if self.scan_counts(root, &path) {
                            changed.push(path);
                        }
                    }
                    continue;
                }
                // A file created is counted when written and closed.
                if ev.mask.contains(AddWatchFlags::IN_CREATE) {
                    continue;
                }
                if self.counts(root, &path) {
                    changed.push(path);
                }
            }
        }
        if overflow {
            for root in 0..self.roots.len() {
                let path = self.roots[root].clone();
                let known: Vec<PathBuf> = self.dirs.values().map(|d| d.path.clone()).collect();
                self.rescan(root, &path, &known);
            }
        }
        (changed, overflow)
    }

    /// Drops the watches of `dir` and every directory under it.
    fn unwatch_under(&mut self, dir: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, d)| d.path.starts_with(dir))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.inotify.rm_watch(wd);
        }
    }

    /// A directory moved away: whether it would hold a file that counts
    /// (its name alone decides, its files are gone from the tree).
    fn scan_counts(&self, root: usize, path: &Path) -> bool {
        path.strip_prefix(&self.roots[root]).is_ok_and(|rel| {
            !rel.iter()
                .any(|c| self.filter.excluded(&c.to_string_lossy()))
        })
    }

    /// After lost events: watch the directories not watched yet.
    fn rescan(&mut self, root: usize, dir: &Path, known: &[PathBuf]) {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            if self.skip_dir(&d) {
                continue;
            }
            if !known.contains(&d) {
                let mut found = Vec::new();
                self.add_tree(root, &d, &mut found);
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Filter {
        Filter {
            include: DEFAULT_INCLUDE.iter().map(|s| s.to_string()).collect(),
            exclude: DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob("*.py", "app.py"));
        assert!(!glob("*.py", "app.pyc"));
        assert!(!glob("*.py", "app.py~"));
        assert!(glob(".*.swp", ".app.py.swp"));
        assert!(glob("*~", "app.py~"));
        assert!(glob(".#*", ".#app.py"));
        assert!(glob("a?c", "abc"));
        assert!(glob("[a-c]x", "bx"));
        assert!(!glob("[!a-c]x", "bx"));
        assert!(glob("*.[ch]", "x.h"));
        assert!(glob("[", "["));
        assert!(glob("*a*b", "xxaxxb"));
        assert!(!glob("*a*b", "xxaxxbc"));
        assert!(glob("*", ""));
    }

    #[test]
    fn the_default_filter_counts_sources_only() {
        let f = defaults();
        assert!(f.counts(Path::new("app.py")));
        assert!(f.counts(Path::new("pkg/sub/mod.py")));
        assert!(!f.counts(Path::new("__pycache__/app.cpython-312.pyc")));
        assert!(!f.counts(Path::new("__pycache__/x.py")));
        assert!(!f.counts(Path::new(".venv/lib/site.py")));
        assert!(!f.counts(Path::new("node_modules/a/b.py")));
        assert!(!f.counts(Path::new(".git/hooks/x.py")));
        assert!(!f.counts(Path::new(".app.py.swp")));
        assert!(!f.counts(Path::new("app.py~")));
        assert!(!f.counts(Path::new(".#app.py")));
        assert!(!f.counts(Path::new("4913")));
        assert!(!f.counts(Path::new("README.md")));
    }

    #[test]
    fn an_include_with_a_slash_matches_the_relative_path() {
        let mut f = defaults();
        f.include.push("templates/*.html".into());
        assert!(f.counts(Path::new("templates/a.html")));
        assert!(!f.counts(Path::new("a.html")));
    }
}
