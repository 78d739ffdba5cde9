//! File-system steps that stay safe when procman runs as root in
//! directories other users can write to (the pidfile's directory, a unix
//! socket's directory, a shared `/tmp`).
//!
//! Rules kept here:
//! * a path is never followed into a file someone else planted: new files
//!   are created `O_EXCL|O_NOFOLLOW` under unpredictable names, and
//!   ownership is changed through a descriptor opened `O_PATH|O_NOFOLLOW`
//!   after checking it is still the kind of file procman made and still
//!   procman's (`fchownat(fd, "", AT_EMPTY_PATH)`), never by path;
//! * a file procman appends to (`--log-file`) is opened `O_NOFOLLOW`
//!   relative to a descriptor of its directory taken at start ([`Dir`]),
//!   and only a regular file with one link is kept;
//! * a file procman made is removed at exit only while the path still names
//!   the same inode (device and inode number recorded when it was made):
//!   another process may have replaced it meanwhile, and that one is not
//!   procman's to remove. Between the check and `unlink` a process that can
//!   write to the directory could still swap the file; such a process could
//!   remove it anyway, so nothing is given away.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// An inode's identity: what a path must still name for procman to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of a file whose metadata procman holds.
    pub fn of(meta: &Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// Its device and inode, to describe it to an upgraded image.
    pub fn parts(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// The identity [`FileId::parts`] described.
    pub fn from_parts(dev: u64, ino: u64) -> FileId {
        FileId { dev, ino }
    }

    /// What `path` names now, without following a final symlink.
    pub fn at(path: &Path) -> Option<FileId> {
        std::fs::symlink_metadata(path).ok().map(|m| FileId::of(&m))
    }
}

/// Removes `path` only if it still names `id` (see the module notes).
pub fn remove_if_same(path: &Path, id: FileId) {
    if FileId::at(path) == Some(id) {
        let _ = std::fs::remove_file(path);
    }
}

/// The kinds of file procman hands over to the worker user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A unix socket file (a `--bind unix:` socket, the notify socket).
    Socket,
    /// A directory (the notify directory).
    Directory,
}

/// Opens a file procman just made, as an `O_PATH` handle that does not
/// follow a final symlink, and checks it is still what procman made: the
/// expected kind, owned by procman's effective user. A symlink or another
/// user's file put in its place is refused, never followed.
pub fn open_own(path: &Path, kind: Kind) -> io::Result<(File, FileId)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    let ft = meta.file_type();
    let right_kind = match kind {
        Kind::Socket => std::os::unix::fs::FileTypeExt::is_socket(&ft),
        Kind::Directory => ft.is_dir(),
    };
    let euid = nix::unistd::geteuid().as_raw();
    if !right_kind || meta.uid() != euid {
        return Err(io::Error::other(format!(
            "{} was replaced by another file (refusing to touch it)",
            path.display()
        )));
    }
    Ok((file, FileId::of(&meta)))
}

/// Gives the file behind a descriptor from [`open_own`] to `uid:gid`.
pub fn chown_fd(file: &File, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: the fd is open for the duration of the call (borrowed from
    // `file`), the path is a valid NUL-terminated empty string, and
    // AT_EMPTY_PATH makes the call act on the fd itself (an O_PATH fd
    // is accepted), so no path is resolved.
    let rc = unsafe {
        libc::fchownat(
            file.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A directory held open, so that files are later opened in the directory
/// it named when it was opened, whatever its path names by then.
#[derive(Debug)]
pub struct Dir(File);

impl Dir {
    /// Opens the directory `path` (an `O_PATH` handle: no read access is
    /// needed, only lookups in it).
    pub fn open(path: &Path) -> io::Result<Dir> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
            .map(Dir)
    }

    /// Opens `name` (one path component) in this directory for appending,
    /// created (mode 0666 less the umask) if absent. A symlink at `name`
    /// is not followed (`O_NOFOLLOW`), a FIFO's open does not wait for a
    /// reader (`O_NONBLOCK`, cleared again once the file is checked), and
    /// anything but a regular file with a single link (a hard link to
    /// another file cannot pass for the log) is refused with a sentence
    /// saying what it is. Returns the file and its metadata, for checks of
    /// its owner.
    pub fn open_append(&self, name: &std::ffi::OsStr) -> io::Result<(File, Metadata)> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.contains(&b'/') || bytes == b"." || bytes == b".." {
            return Err(io::Error::other("it is not a file name"));
        }
        let cname = std::ffi::CString::new(bytes)
            .map_err(|_| io::Error::other("its name holds a NUL byte"))?;
        let flags = libc::O_WRONLY
            | libc::O_APPEND
            | libc::O_CREAT
            | libc::O_NOFOLLOW
            | libc::O_NONBLOCK
            | libc::O_NOCTTY
            | libc::O_CLOEXEC;
        // SAFETY: the directory fd is open for the duration of the call
        // (borrowed from `self`) and `cname` is a valid NUL-terminated
        // string; the mode argument is read because O_CREAT is given.
        let fd = unsafe { libc::openat(self.0.as_raw_fd(), cname.as_ptr(), flags, 0o666) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ELOOP) => io::Error::other("it is a symbolic link (not followed)"),
                Some(libc::ENXIO) => io::Error::other("it is a FIFO or socket, not a regular file"),
                Some(libc::EISDIR) => io::Error::other("it is a directory, not a regular file"),
                _ => e,
            });
        }
        // SAFETY: `fd` was just returned by openat and is owned by nothing
        // else.
        let file = unsafe { File::from_raw_fd(fd) };
        let meta = file.metadata()?;
        let ft = meta.file_type();
        if !ft.is_file() {
            let what = if std::os::unix::fs::FileTypeExt::is_fifo(&ft) {
                "a FIFO"
            } else if std::os::unix::fs::FileTypeExt::is_char_device(&ft)
                || std::os::unix::fs::FileTypeExt::is_block_device(&ft)
            {
                "a device"
            } else {
                "not a regular file"
            };
            return Err(io::Error::other(format!(
                "it is {what}, not a regular file"
            )));
        }
        if meta.nlink() != 1 {
            return Err(io::Error::other(format!(
                "it has {} hard links (a link to another file is refused)",
                meta.nlink()
            )));
        }
        // SAFETY: F_SETFL on an fd we own, with flags derived from F_GETFL.
        let rc = unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK)
            }
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((file, meta))
    }
}

/// Sixteen unpredictable lowercase letters and digits, for names others
/// must not be able to plant in advance.
pub fn random_token() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 16];
    // SAFETY: the buffer is valid for writes of its length.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        // No entropy source (very old kernel, seccomp): fall back to the
        // clock. Names then become guessable, but every file made with
        // them is created O_EXCL|O_NOFOLLOW, so a planted name only makes
        // creation fail; it never redirects a write.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (nanos >> ((i % 8) * 8)) as u8 ^ (std::process::id() >> (i % 4)) as u8;
        }
    }
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("procman-safefs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn a_socket_swapped_for_a_symlink_is_never_chowned_through() {
        let d = dir("swap");
        let victim = d.join("victim");
        std::fs::write(&victim, "x").expect("write");
        let path = d.join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (own, id) = open_own(&path, Kind::Socket).expect("our socket");
        assert_eq!(FileId::at(&path), Some(id));
        drop(own);
        // Someone swaps the socket file for a symlink to another file.
        // (Moved, not deleted: a deleted inode's number may be reused at
        // once, and the recorded identity must stay unique.)
        std::fs::rename(&path, d.join("moved.sock")).expect("move away");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        let err = open_own(&path, Kind::Socket).expect_err("a symlink is refused");
        assert!(err.to_string().contains("replaced"), "{err}");
        // A regular file in its place is refused too.
        std::fs::remove_file(&path).expect("unlink");
        std::fs::write(&path, "y").expect("write");
        assert!(open_own(&path, Kind::Socket).is_err());
        // And removal at exit leaves what is not the recorded inode.
        remove_if_same(&path, id);
        assert!(path.exists(), "a file procman did not make was removed");
        drop(listener);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn chown_acts_on_the_descriptor() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let d = dir("chown");
        let path = d.join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (own, _) = open_own(&path, Kind::Socket).expect("our socket");
        chown_fd(&own, 65534, 65534).expect("fchownat");
        let meta = std::fs::symlink_metadata(&path).expect("meta");
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        drop(listener);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_log_is_opened_in_its_directory_and_only_a_plain_file_is_kept() {
        let d = dir("append");
        let held = Dir::open(&d).expect("open dir");
        let name = std::ffi::OsStr::new("app.log");
        // Absent: made; then appended to.
        let (mut f, meta) = held.open_append(name).expect("create");
        assert!(meta.is_file());
        std::io::Write::write_all(&mut f, b"one\n").expect("write");
        // The directory's path now names another directory: the file is
        // still opened in the one held.
        let moved = d.with_extension("moved");
        let _ = std::fs::remove_dir_all(&moved);
        std::fs::rename(&d, &moved).expect("move the dir");
        std::fs::create_dir(&d).expect("a new dir at the old path");
        let (mut f, _) = held.open_append(name).expect("reopen");
        std::io::Write::write_all(&mut f, b"two\n").expect("write");
        assert_eq!(
            std::fs::read_to_string(moved.join("app.log")).expect("read"),
            "one\ntwo\n"
        );
        assert!(!d.join("app.log").exists());
        let path = moved.join("app.log");
        let victim = moved.join("victim");
        std::fs::write(&victim, "v").expect("write");
        let refused = |why: &str| {
            let err = held.open_append(name).expect_err(why);
            assert!(err.to_string().contains(why), "{err}");
        };
        std::fs::remove_file(&path).expect("unlink");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        refused("symbolic link");
        std::fs::remove_file(&path).expect("unlink");
        std::fs::hard_link(&victim, &path).expect("link");
        refused("hard links");
        std::fs::remove_file(&path).expect("unlink");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        // No reader: the open must not wait for one.
        refused("FIFO");
        std::fs::remove_file(&path).expect("unlink");
        std::fs::create_dir(&path).expect("mkdir");
        refused("directory");
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "v");
        for bad in ["", ".", "..", "a/b"] {
            assert!(
                held.open_append(std::ffi::OsStr::new(bad)).is_err(),
                "{bad:?}"
            );
        }
        let _ = std::fs::remove_dir_all(d);
        let _ = std::fs::remove_dir_all(moved);
    }

    #[test]
    fn tokens_differ_and_are_plain() {
        let a = random_token();
        let b = random_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
    }
}
