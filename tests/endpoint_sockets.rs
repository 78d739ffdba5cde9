//! The control socket (`--control-socket PATH`) and a metrics endpoint on
//! a unix socket (`--metrics unix:PATH`) are made like a `--bind unix:`
//! socket (issue 24, item 9): a live server's socket file is never taken
//! over (only a refused connection proves a file stale, and procman's
//! probe never blocks), a file that is not a socket is refused, the mode is
//! the endpoint's whatever procman's umask, and at exit a path someone
//! else has replaced is left alone.

mod util;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(30);

/// The two endpoints a unix socket can serve.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Control,
    Metrics,
}

const BOTH: [Endpoint; 2] = [Endpoint::Control, Endpoint::Metrics];

impl Endpoint {
    /// procman's arguments for this endpoint at `path`.
    fn args(self, path: &Path) -> Vec<String> {
        match self {
            Endpoint::Control => vec!["--control-socket".into(), path.display().to_string()],
            Endpoint::Metrics => vec!["--metrics".into(), format!("unix:{}", path.display())],
        }
    }

    /// The mode its socket file has.
    fn mode(self) -> u32 {
        match self {
            Endpoint::Control => 0o600,
            Endpoint::Metrics => 0o660,
        }
    }
}

/// Waits for procman to exit by itself; `None` if it is still running
/// (serving) when the deadline passes.
fn exit_within(h: &mut Harness, within: Duration) -> Option<i32> {
    wait_for(within, || h.wait_exit(Duration::ZERO)).map(|status| status.code().unwrap_or(-1))
}

fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).expect("the file").ino()
}

/// A live server at `path` whose accept queue is full: it accepts nothing,
/// and a blocking connect(2) to it would wait until it does. Returns the
/// listener and the connections that fill its queue (keep both).
fn busy_server(path: &Path) -> (socket2::Socket, Vec<socket2::Socket>) {
    use socket2::{Domain, SockAddr, Socket, Type};
    let server = Socket::new(Domain::UNIX, Type::STREAM, None).expect("socket");
    server
        .bind(&SockAddr::unix(path).expect("addr"))
        .expect("bind");
    server.listen(1).expect("listen");
    let mut queued = Vec::new();
    for _ in 0..64 {
        let c = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).expect("socket");
        match c.connect(&SockAddr::unix(path).expect("addr")) {
            Ok(()) => queued.push(c),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return (server, queued),
            Err(e) => panic!("filling the queue: {e}"),
        }
    }
    panic!("the accept queue never filled");
}

#[test]
fn a_live_server_whose_queue_is_full_is_not_taken_over_nor_waited_for() {
    for which in BOTH {
        let start = Start::new("busy-endpoint", &["-w", "1"]);
        let path = start.dir().join("busy.sock");
        let (server, queued) = busy_server(&path);
        let before = inode(&path);
        let mut h = start.args(which.args(&path)).args(["--", &hello()]).spawn();
        let code = exit_within(&mut h, BOOT);
        h.check(
            code == Some(1),
            &format!("{which:?}: procman exits 1 (it blocked or took the path over: {code:?})"),
        );
        let log = h.log_text();
        h.check(
            log.contains(&path.display().to_string()) && log.contains("already listening"),
            &format!("{which:?}: the error names the path and why"),
        );
        assert_eq!(
            inode(&path),
            before,
            "{which:?}: the server's file was replaced"
        );
        drop(queued);
        drop(server);
    }
}

#[test]
fn a_live_socket_procman_may_not_connect_to_is_not_taken_over() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: this test needs root");
        return;
    }
    for which in BOTH {
        // procman runs as nobody; in a directory nobody may write to (so
        // nobody could remove the file) sits root's live socket, mode
        // 0700: connecting to it is refused with EACCES, which says
        // nothing about whether it is stale.
        let start = Start::new("root-endpoint", &["-w", "1"]).json();
        let dir = start.dir().to_path_buf();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let shared = dir.join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::os::unix::fs::chown(&shared, Some(65534), Some(65534)).expect("chown");
        let path = shared.join("endpoint.sock");
        let live = UnixListener::bind(&path).expect("root's server");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let before = inode(&path);
        let mut h = start
            .env("RUNTIME_DIRECTORY", shared.to_str().expect("utf8"))
            .args(which.args(&path))
            .args(["--", "sleep", "1000"])
            .spawn_with(
                "setpriv",
                &[
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "--inh-caps=-all",
                    PROCMAN,
                ],
            );
        let code = exit_within(&mut h, BOOT);
        h.check(
            code == Some(1),
            &format!("{which:?}: procman exits 1 instead of taking the path over ({code:?})"),
        );
        let log = h.log_text();
        h.check(
            log.contains(&path.display().to_string()) && log.contains("Permission denied"),
            &format!("{which:?}: the error names the path and why"),
        );
        assert_eq!(
            inode(&path),
            before,
            "{which:?}: root's socket was replaced"
        );
        UnixStream::connect(&path).expect("root's server still reachable");
        drop(live);
    }
}

#[test]
fn a_file_that_is_not_a_socket_is_refused_and_left_alone() {
    for which in BOTH {
        let start = Start::new("not-a-socket", &["-w", "1"]);
        let file = start.dir().join("data");
        std::fs::write(&file, b"precious\n").expect("write");
        let link = start.dir().join("link.sock");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        for path in [file.clone(), link.clone()] {
            let mut h = Start::new("not-a-socket-run", &["-w", "1"])
                .args(which.args(&path))
                .args(["--", &hello()])
                .spawn();
            let code = exit_within(&mut h, BOOT);
            h.check(
                code == Some(1),
                &format!("{which:?} at {path:?}: exit 1, got {code:?}"),
            );
            h.check(
                h.log_text().contains("not a socket"),
                &format!("{which:?} at {path:?}: the error says why"),
            );
        }
        assert_eq!(std::fs::read(&file).expect("the file"), b"precious\n");
        assert!(std::fs::symlink_metadata(&link)
            .expect("the link")
            .is_symlink());
        // This Start only lent its directory: it was never spawned.
        let _ = std::fs::remove_dir_all(start.dir());
    }
}

#[test]
fn endpoint_sockets_have_their_mode_whatever_the_umask() {
    let start = Start::new("endpoint-mode", &["-w", "1"]).json();
    let control = start.dir().join("control.sock");
    let metrics = start.dir().join("metrics.sock");
    let mut h = start
        .args(Endpoint::Control.args(&control))
        .args(Endpoint::Metrics.args(&metrics))
        .args(["--", &hello()])
        .spawn_with("sh", &["-c", "umask 000; exec \"$0\" \"$@\"", PROCMAN]);
    h.expect_event("all-ready", BOOT, "the worker became ready", |_| true);
    for (which, path) in [(Endpoint::Control, &control), (Endpoint::Metrics, &metrics)] {
        let meta = std::fs::symlink_metadata(path).expect("socket file");
        h.check(
            meta.mode() & 0o7777 == which.mode(),
            &format!("{which:?}: mode {:o}", meta.mode() & 0o7777),
        );
        h.check(
            meta.uid() == nix::unistd::geteuid().as_raw(),
            &format!("{which:?}: owned by procman's user"),
        );
    }
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    assert!(
        !control.exists() && !metrics.exists(),
        "procman's own files are removed"
    );
}

#[test]
fn an_endpoint_socket_replaced_by_another_server_is_not_unlinked_at_exit() {
    let start = Start::new("endpoint-replaced", &["-w", "1"]).json();
    let paths: Vec<(Endpoint, PathBuf)> = BOTH
        .iter()
        .map(|w| (*w, start.dir().join(format!("{w:?}.sock"))))
        .collect();
    let mut start = start;
    for (which, path) in &paths {
        start = start.args(which.args(path));
    }
    let mut h = start.args(["--", &hello()]).spawn();
    h.expect_event("all-ready", BOOT, "the worker became ready", |_| true);
    // An operator moved procman's socket files away and started other
    // servers at the paths. (Moved, not deleted: a deleted inode's number
    // may be reused at once.)
    let others: Vec<UnixListener> = paths
        .iter()
        .map(|(which, path)| {
            std::fs::rename(path, h.dir.join(format!("moved-{which:?}.sock"))).expect("move");
            UnixListener::bind(path).expect("another server")
        })
        .collect();
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0);
    for (which, path) in &paths {
        h.check(
            path.exists(),
            &format!("{which:?}: the other server's socket file is still there"),
        );
        UnixStream::connect(path).expect("the other server is reachable");
    }
    drop(others);
}
