//! Unit tests of the endpoint server: real sockets, one pass at a time.

use super::*;

fn echo_line(_: u64, bytes: &[u8], _: &Stream) -> Framed {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => Framed::Reply(bytes[..=i].to_vec()),
        None => Framed::Incomplete,
    }
}

fn pump(server: &mut Server, until: impl Fn(&Server) -> bool) {
    let end = Instant::now() + Duration::from_secs(5);
    while !until(server) && Instant::now() < end {
        server.service(Instant::now(), echo_line);
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn answers_a_request_and_closes() {
    let mut s = Server::bind("127.0.0.1:0", 0o600, Duration::from_secs(2)).expect("bind");
    let port = s.local_port().expect("port");
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.write_all(b"hello\n").expect("write");
    c.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        s.service(Instant::now(), echo_line);
        let mut b = [0u8; 64];
        c.set_nonblocking(true).ok();
        match c.read(&mut b) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    assert_eq!(got, b"hello\n");
    assert_eq!(s.open_connections(), 0);
}

/// A temporary directory of this test process.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("procman-serve-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// Whether `fd` becomes readable within `within`.
fn readable(fd: BorrowedFd<'_>, within: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = PollTimeout::try_from(within.as_millis() as i32).expect("timeout");
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, ms), Ok(n) if n > 0)
}

#[test]
fn idle_and_oversized_connections_are_closed_and_bounded() {
    // Over a unix socket a silent connection is accepted at once (over
    // TCP the kernel holds it back: TCP_DEFER_ACCEPT), so the bound
    // and the read deadline are what deal with it.
    let dir = temp_dir("bounded");
    let path = dir.join("m.sock");
    let addr = format!("unix:{}", path.display());
    let mut s = Server::bind(&addr, 0o600, Duration::from_millis(200)).expect("bind");
    let idle: Vec<UnixStream> = (0..MAX_CONNS + 20)
        .map(|_| UnixStream::connect(&path).expect("connect"))
        .collect();
    pump(&mut s, |s| s.open_connections() == MAX_CONNS);
    assert_eq!(s.open_connections(), MAX_CONNS);
    let mut big = UnixStream::connect(&path).expect("connect");
    big.set_nonblocking(true).ok();
    let _ = big.write(&vec![b'x'; MAX_REQUEST * 2]);
    // Everything goes by its deadline.
    pump(&mut s, |s| s.open_connections() == 0);
    assert_eq!(s.open_connections(), 0);
    assert!(s.deadline().is_none());
    drop(idle);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tcp_request_costs_one_pass_its_silent_connection_none() {
    let mut s = Server::bind("127.0.0.1:0", 0o600, Duration::from_secs(2)).expect("bind");
    let port = s.local_port().expect("port");
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // Connected, nothing sent: the listener is not readable, so the
    // master is not woken (TCP_DEFER_ACCEPT).
    assert!(
        !readable(s.listen.fd(), Duration::from_millis(300)),
        "a connection that sent nothing made the listener readable"
    );
    // A request longer than one read, sent at once: readable with its
    // bytes, accepted, read, answered and closed in one pass.
    let request = format!("{}\n", "x".repeat(6000));
    c.write_all(request.as_bytes()).expect("write");
    assert!(
        readable(s.listen.fd(), Duration::from_secs(5)),
        "the request never made the listener readable"
    );
    s.service(Instant::now(), echo_line);
    assert_eq!(s.open_connections(), 0, "not answered in one pass");
    c.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("read the answer to its end");
    assert_eq!(got, request.as_bytes());
}

#[test]
fn a_unix_request_already_sent_is_answered_in_the_pass_that_accepts_it() {
    let dir = temp_dir("unix-one-pass");
    let path = dir.join("m.sock");
    let mut s = Server::bind(
        &format!("unix:{}", path.display()),
        0o600,
        Duration::from_secs(2),
    )
    .expect("bind");
    let mut c = UnixStream::connect(&path).expect("connect");
    c.write_all(b"hello\n").expect("write");
    s.service(Instant::now(), echo_line);
    assert_eq!(s.open_connections(), 0, "not answered in one pass");
    c.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("read the answer to its end");
    assert_eq!(got, b"hello\n");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_burst_is_answered_a_bounded_batch_per_pass_and_the_rest_stay_readable() {
    // 40 requests, each already sent: one pass answers at most
    // ANSWERS_PER_PASS of them; the rest wait in the kernel, where
    // they keep a polled descriptor readable (the loop does not sleep
    // on them), and the next passes answer them in turn.
    let dir = temp_dir("burst");
    let path = dir.join("m.sock");
    let mut s = Server::bind(
        &format!("unix:{}", path.display()),
        0o600,
        Duration::from_secs(5),
    )
    .expect("bind");
    let mut clients: Vec<UnixStream> = (0..40)
        .map(|_| {
            let mut c = UnixStream::connect(&path).expect("connect");
            c.write_all(b"hello\n").expect("write");
            c
        })
        .collect();
    let mut per_pass = Vec::new();
    while per_pass.iter().sum::<usize>() < clients.len() && per_pass.len() < 10 {
        let any_ready = {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let mut fds: Vec<PollFd> = s
                .poll_fds()
                .into_iter()
                .map(|(fd, _)| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        };
        assert!(
            any_ready,
            "requests wait but nothing is readable: {per_pass:?}"
        );
        let mut answered = 0;
        s.service(Instant::now(), |id, b, st| {
            let f = echo_line(id, b, st);
            answered += usize::from(matches!(f, Framed::Reply(_)));
            f
        });
        per_pass.push(answered);
    }
    assert_eq!(
        per_pass,
        [
            ANSWERS_PER_PASS,
            ANSWERS_PER_PASS,
            40 - 2 * ANSWERS_PER_PASS
        ]
    );
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("read the answer");
        assert_eq!(got, b"hello\n");
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_unix_socket_has_the_mode_asked_and_replaces_a_stale_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("mode");
    let path = dir.join("ctl.sock");
    let addr = format!("unix:{}", path.display());
    {
        let _stale = UnixListener::bind(&path).expect("stale");
    }
    let s = Server::bind(&addr, 0o600, Duration::from_secs(1)).expect("bind");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(Server::bind(&addr, 0o600, Duration::from_secs(1)).is_err());
    drop(s);
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
