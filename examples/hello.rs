//! A minimal worker for procman's command class: std, plus `nix` for the
//! stop signal.
//!
//! It takes its listening socket the systemd way: `LISTEN_FDS` says how
//! many sockets start at fd 3, and `LISTEN_PID` must be our own pid (a
//! socket meant for another process is not ours to take). Every request is
//! answered with the worker's pid, so you can watch the load spread:
//!
//! ```sh
//! cargo build --release --bins --examples
//! procman -w 4 -b 127.0.0.1:8000 -- target/release/examples/hello
//! curl http://127.0.0.1:8000/
//! ```
//!
//! It drains on its stop signal (TERM, or INT from a terminal), which is
//! what makes a restart lossless: it stops accepting (closing its own
//! descriptor of the listener, which the other workers and procman keep
//! open, so connections still in the kernel's queue go to them), answers
//! every connection it had accepted, then exits 0. Each response says
//! `Connection: close`, so no client ever waits on an idle keep-alive
//! connection of a worker that is going away.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, FromRawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

fn main() {
    let listener = match inherited_listener() {
        Ok(l) => l,
        Err(why) => {
            eprintln!("hello: {why}");
            std::process::exit(2);
        }
    };
    // The stop signals are blocked before any thread exists (threads
    // inherit the mask) and read from a signalfd: the accept loop waits for
    // a connection or a stop at once, with no handler.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    let signals = stop
        .thread_block()
        .and_then(|()| SignalFd::with_flags(&stop, SfdFlags::SFD_CLOEXEC));
    let signals = match signals {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hello: cannot watch the stop signals: {e}");
            std::process::exit(2);
        }
    };
    // Another worker may take a connection between our poll and accept.
    if let Err(e) = listener.set_nonblocking(true) {
        eprintln!("hello: cannot make the listener non-blocking: {e}");
        std::process::exit(2);
    }
    let in_flight = Arc::new(InFlight::default());
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("hello: poll failed: {e}");
                std::process::exit(1);
            }
        }
        if fds[1].any().unwrap_or(false) {
            break;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let guard = InFlight::enter(&in_flight);
                std::thread::spawn(move || {
                    serve(stream);
                    drop(guard);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => eprintln!("hello: accept failed: {e}"),
        }
    }
    // Stop accepting: this closes only our descriptor of the shared socket.
    drop(listener);
    in_flight.wait_idle();
}

/// The connections being served, and a way to wait until there are none.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

/// One connection being served; dropping it (also on a panic) counts it out.
struct Serving(Arc<InFlight>);

impl InFlight {
    fn enter(this: &Arc<InFlight>) -> Serving {
        *this.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Serving(this.clone())
    }

    fn wait_idle(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *count > 0 {
            count = self.idle.wait(count).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut count = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *count -= 1;
        self.0.idle.notify_all();
    }
}

fn inherited_listener() -> Result<TcpListener, String> {
    let fds: i32 = std::env::var("LISTEN_FDS")
        .map_err(|_| "LISTEN_FDS is not set: run me under procman".to_string())?
        .parse()
        .map_err(|_| "LISTEN_FDS is not a number".to_string())?;
    let pid: u32 = std::env::var("LISTEN_PID")
        .map_err(|_| "LISTEN_PID is not set".to_string())?
        .parse()
        .map_err(|_| "LISTEN_PID is not a number".to_string())?;
    if pid != std::process::id() {
        return Err(format!(
            "LISTEN_PID is {pid}, not my pid {}",
            std::process::id()
        ));
    }
    if fds < 1 {
        return Err("no socket was passed (LISTEN_FDS=0)".into());
    }
    // SAFETY: the systemd convention hands us fd 3 as an open listening
    // socket that nothing else in this process owns.
    Ok(unsafe { TcpListener::from_raw_fd(3) })
}

fn serve(stream: TcpStream) {
    // Accepted from a non-blocking listener: Linux does not pass that on,
    // but say so rather than rely on it.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Skip the headers.
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
        line.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    if let Some(secs) = path
        .strip_prefix("/slow?s=")
        .and_then(|s| s.parse::<f64>().ok())
    {
        std::thread::sleep(Duration::from_secs_f64(secs.clamp(0.0, 60.0)));
    }
    let body = format!("{}\n", std::process::id());
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = &stream;
    let _ = stream.write_all(response.as_bytes());
}
