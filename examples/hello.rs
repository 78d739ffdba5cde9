//! A minimal worker for procman's command class, using only std.
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

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::time::Duration;

fn main() {
    let listener = match inherited_listener() {
        Ok(l) => l,
        Err(why) => {
            eprintln!("hello: {why}");
            std::process::exit(2);
        }
    };
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || serve(stream));
            }
            Err(e) => eprintln!("hello: accept failed: {e}"),
        }
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
