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
//! A watched root that goes (deleted, or moved away) is awaited: its
//! parent is watched, only while it is gone, for a directory of its name
//! to appear, which is then watched again (and its files count as changed).
//! A deleted root is noticed when events arrive: its path is looked up
//! again after each read (the kernel says a directory was deleted only once
//! nothing uses it, and the workers run in it).
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
use tracing::{info, warn};

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
    /// Each root's directory (device, inode) as watched; `None` while gone.
    root_ids: Vec<Option<(u64, u64)>>,
    /// Roots that went, by the watch of the parent they may come back in.
    awaited: HashMap<WatchDescriptor, Vec<usize>>,
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
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_DONT_FOLLOW
        | AddWatchFlags::IN_ONLYDIR
}

/// A real directory's (device, inode), not following a symlink; `None`
/// for anything else or nothing.
fn dir_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    m.is_dir().then(|| (m.dev(), m.ino()))
}

/// The events the watch of a gone root's parent asks for: a directory of
/// that name appearing.
fn parent_mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MOVED_TO
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
            root_ids: Vec::new(),
            awaited: HashMap::new(),
            limit_said: false,
        };
        w.root_ids = w.roots.iter().map(|r| dir_id(r)).collect();
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
                    // parent's watch sees a new one of that name; a root's
                    // parent is watched for it from now on.
                    if let Some(dir) = self.dirs.remove(&ev.wd) {
                        if dir.path == self.roots[dir.root] {
                            self.await_root(dir.root, &mut changed);
                        }
                    }
                    if let Some(roots) = self.awaited.remove(&ev.wd) {
                        for root in roots {
                            warn!(
                                "--reload: {} is gone, and so is its parent directory: it is not watched any more",
                                crate::escape::text(&self.roots[root].to_string_lossy())
                            );
                        }
                    }
                    continue;
                }
                if self.awaited.contains_key(&ev.wd) {
                    let name = ev.name.as_deref().map(Path::new);
                    let back: Vec<usize> = self.awaited[&ev.wd]
                        .iter()
                        .copied()
                        .filter(|&r| {
                            name.is_some()
                                && self.roots[r].file_name() == name.map(|n| n.as_os_str())
                        })
                        .collect();
                    for root in back {
                        self.root_back(root, &mut changed);
                    }
                    continue;
                }
                let Some(dir) = self.dirs.get(&ev.wd) else {
                    continue;
                };
                if ev.mask.contains(AddWatchFlags::IN_MOVE_SELF) {
                    // A root moved away: what is under it is no longer in
                    // the tree (another directory's own move is seen by
                    // its parent's watch).
                    let root = dir.root;
                    let path = self.roots[root].clone();
                    if dir.path == path {
                        self.unwatch_under(&path);
                        changed.push(path);
                        self.await_root(root, &mut changed);
                    }
                    continue;
                }
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
        // A root deleted while a process has it as its directory: no event
        // says so yet, but its path no longer leads to it.
        for root in 0..self.roots.len() {
            if self.root_ids[root].is_some() && dir_id(&self.roots[root]) != self.root_ids[root] {
                let path = self.roots[root].clone();
                self.unwatch_under(&path);
                changed.push(path);
                self.await_root(root, &mut changed);
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

    /// Root `root` went: its parent is watched for it to come back (and
    /// looked at once, in case it already did).
    fn await_root(&mut self, root: usize, changed: &mut Vec<PathBuf>) {
        self.root_ids[root] = None;
        let path = self.roots[root].clone();
        let shown = crate::escape::text(&path.to_string_lossy()).into_owned();
        let Some(parent) = path.parent() else {
            return;
        };
        match self.inotify.add_watch(parent, parent_mask()) {
            Ok(wd) => {
                let roots = self.awaited.entry(wd).or_default();
                if !roots.contains(&root) {
                    roots.push(root);
                }
                warn!("--reload: {shown} is gone; watching for it to come back");
            }
            Err(e) => {
                warn!(
                    "--reload: {shown} is gone, and its parent directory cannot be watched ({}): it is not watched any more",
                    e.desc()
                );
                return;
            }
        }
        self.root_back(root, changed);
    }

    /// Watches awaited root `root` again if it is a directory again (not a
    /// symlink: the trees were resolved once); its files count as changed.
    fn root_back(&mut self, root: usize, changed: &mut Vec<PathBuf>) {
        let path = self.roots[root].clone();
        let Some(id) = dir_id(&path) else {
            return;
        };
        self.root_ids[root] = Some(id);
        let mut unused = Vec::new();
        for (wd, roots) in self.awaited.iter_mut() {
            roots.retain(|&r| r != root);
            if roots.is_empty() {
                unused.push(*wd);
            }
        }
        for wd in unused {
            self.awaited.remove(&wd);
            let _ = self.inotify.rm_watch(wd);
        }
        self.add_tree(root, &path, changed);
        info!(
            "--reload: {} is back; watching it again",
            crate::escape::text(&path.to_string_lossy())
        );
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
mod tests;
