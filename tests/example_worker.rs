//! examples/hello.rs is the command worker the README points to: it must
//! show a lossless stop (stop accepting, answer what it accepted, exit).

mod util;

use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// Sends a slow request to the only worker `pid` and waits until the
/// worker holds its connection (one fd more than when idle).
fn slow_request_in(
    h: &Harness,
    pid: i32,
    secs: u32,
) -> std::thread::JoinHandle<Result<(u16, String), String>> {
    let idle = idle_fd_count(pid);
    let addr: SocketAddr = h.addr();
    let slow = std::thread::spawn(move || {
        http_request(
            addr,
            "GET",
            &format!("/slow?s={secs}"),
            None,
            Duration::from_secs(60),
        )
    });
    let accepted = wait_for(BOOT, || (open_fds(pid).len() > idle).then_some(()));
    h.check(accepted.is_some(), "the slow request reached the worker");
    slow
}

#[test]
fn the_example_worker_answers_an_accepted_request_when_stopped() {
    let mut h = Start::new("hello-term", &["-w", "1", "--", &hello()])
        .json()
        .spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let slow = slow_request_in(&h, pid, 2);
    h.signal(Signal::SIGTERM);
    let reply = slow.join().expect("thread");
    h.check(
        reply
            .as_ref()
            .is_ok_and(|r| r.0 == 200 && r.1.trim() == pid.to_string()),
        &format!("the request in flight at the stop: {reply:?}"),
    );
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
    h.check(
        h.has_event("exited", |e| {
            worker_of(e) == pid
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("exited cleanly"))
        }),
        "the worker exited 0 on its own",
    );
}

#[test]
fn the_example_worker_answers_an_accepted_request_across_a_reload() {
    let mut h = Start::new("hello-hup", &["-w", "1", "--", &hello()])
        .json()
        .spawn();
    let pid = *h.wait_workers(1, BOOT).iter().next().expect("worker");
    let slow = slow_request_in(&h, pid, 3);
    h.signal(Signal::SIGHUP);
    h.expect_event("reload-done", BOOT, "reload done", |e| e["generation"] == 2);
    let reply = slow.join().expect("thread");
    h.check(
        reply
            .as_ref()
            .is_ok_and(|r| r.0 == 200 && r.1.trim() == pid.to_string()),
        &format!("the request in flight at the reload: {reply:?}"),
    );
    h.signal(Signal::SIGTERM);
    assert_eq!(h.exit_code(BOOT), 0, "{}", h.log_text());
}
