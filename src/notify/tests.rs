//! The receiver and parser's tests (unit and property).

use super::*;
use std::os::unix::net::UnixDatagram;
use std::time::Instant;

#[test]
fn parses_the_keys_procman_acts_on() {
    let table: &[(&str, Vec<Message>)] = &[
        ("READY=1", vec![Message::Ready]),
        (
            "READY=1\nSTATUS=up",
            vec![Message::Ready, Message::Status("up".into())],
        ),
        ("WATCHDOG=1", vec![Message::Heartbeat]),
        ("WATCHDOG=trigger", vec![Message::WatchdogTrigger]),
        ("STOPPING=1", vec![Message::Stopping]),
        ("RELOADING=1", vec![Message::Reloading]),
        ("ERRNO=2", vec![Message::Errno("2".into())]),
        (
            "EXTEND_TIMEOUT_USEC=5000000",
            vec![Message::ExtendTimeout(Duration::from_secs(5))],
        ),
        ("EXTEND_TIMEOUT_USEC=soon", vec![]),
        (
            "X_PROCMAN_RECYCLE=max-requests",
            vec![Message::Recycle("max-requests".into())],
        ),
        (
            "X_PROCMAN_TRACEBACK=\"Traceback:\\n  boom\\n\"",
            vec![Message::Traceback("Traceback:\n  boom\n".into())],
        ),
        ("X_PROCMAN_TRACEBACK=not json", vec![]),
        ("READY=0", vec![]),
        ("FOO=bar\nnoequals\n", vec![]),
        ("MAINPID=1", vec![]),
        ("", vec![]),
    ];
    for (text, want) in table {
        assert_eq!(&parse(text), want, "{text:?}");
    }
}

/// Every queued datagram.
fn all(rx: &mut Receiver) -> Vec<Receipt> {
    std::iter::from_fn(|| rx.receive()).collect()
}

#[test]
fn receiver_reads_credentials_and_drops_malformed_datagrams() {
    let mut rx = Receiver::create(None).expect("receiver");
    let tx = UnixDatagram::unbound().expect("socket");
    tx.send_to(b"READY=1\nSTATUS=hi", rx.path()).expect("send");
    tx.send_to(b"WATCH\0DOG=1", rx.path()).expect("send");
    let got = all(&mut rx);
    assert_eq!(got.len(), 2, "both datagrams left the queue");
    let me = std::process::id() as i32;
    let d = got[0].datagram.as_ref().expect("the first is handled");
    assert_eq!((d.pid, d.uid), (me, nix::unistd::getuid().as_raw()));
    assert_eq!(d.messages[0], Message::Ready);
    assert!(got[1].datagram.is_none(), "the NUL datagram is dropped");
    assert_eq!(got[1].discarded, vec![(Discard::Malformed, 1)]);
    assert_eq!(got[1].sender.map(|s| s.0), Some(me));
    assert!(rx.receive().is_none());
}

#[test]
fn only_the_first_lines_of_a_datagram_are_read() {
    let mut rx = Receiver::create(None).expect("receiver");
    let tx = UnixDatagram::unbound().expect("socket");
    let flood = "WATCHDOG=1\n".repeat(5900);
    tx.send_to(flood.as_bytes(), rx.path()).expect("send");
    let got = rx.receive().expect("a datagram");
    let d = got.datagram.expect("handled");
    assert_eq!(d.messages.len(), MAX_LINES);
    assert_eq!(
        got.discarded,
        vec![(Discard::ExcessLines, 5900 - MAX_LINES)]
    );
    assert_eq!(got.bytes, flood.len());
}

#[test]
fn a_datagram_read_late_carries_its_send_time() {
    let mut rx = Receiver::create(None).expect("receiver");
    let tx = UnixDatagram::unbound().expect("socket");
    tx.send_to(b"WATCHDOG=1", rx.path()).expect("send");
    // The scenario: the datagram waits in the queue (load only makes
    // the wait longer, and only a lower bound is checked).
    let waited = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let got: Vec<Datagram> = all(&mut rx)
        .into_iter()
        .filter_map(|r| r.datagram)
        .collect();
    assert_eq!(got.len(), 1);
    assert!(
        got[0].age >= Duration::from_millis(190),
        "aged {:?} while queued for at least {:?}",
        got[0].age,
        waited.elapsed()
    );
}

#[test]
fn the_queue_limit_is_the_kernels() {
    let mut rx = Receiver::create(None).expect("receiver");
    let tx = UnixDatagram::unbound().expect("socket");
    tx.set_nonblocking(true).expect("nonblocking");
    // The kernel refuses a datagram once more than the limit are queued.
    let mut sent = 0;
    while tx.send_to(b"WATCHDOG=1", rx.path()).is_ok() {
        sent += 1;
        assert!(sent <= rx.queue_limit() + 1, "more queued than the limit");
    }
    // With a large limit the sender's own buffer (net.core.wmem_default,
    // which queued datagrams are charged to) may run out first.
    if rx.queue_limit() <= 64 {
        assert_eq!(
            sent,
            rx.queue_limit() + 1,
            "the socket holds the limit and one"
        );
    }
    assert_eq!(all(&mut rx).len(), sent);
}

mod properties {
    use crate::notify::*;
    use proptest::prelude::*;

    /// One line's value: anything but a newline (which ends the line).
    fn value() -> impl Strategy<Value = String> {
        "[^\n\x00]{0,40}"
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            Just(Message::Ready),
            Just(Message::Reloading),
            Just(Message::Stopping),
            Just(Message::Heartbeat),
            Just(Message::WatchdogTrigger),
            value().prop_map(Message::Status),
            value().prop_map(Message::Errno),
            any::<u64>().prop_map(|us| Message::ExtendTimeout(Duration::from_micros(us))),
            value().prop_map(Message::Recycle),
            value().prop_map(Message::Error),
            any::<String>().prop_map(Message::Traceback),
        ]
    }

    /// Bytes shaped like a notification, so that many cases parse.
    fn notification_like() -> impl Strategy<Value = Vec<u8>> {
        let key = prop::sample::select(vec![
            "READY",
            "RELOADING",
            "STOPPING",
            "WATCHDOG",
            "STATUS",
            "ERRNO",
            "EXTEND_TIMEOUT_USEC",
            "X_PROCMAN_RECYCLE",
            "X_PROCMAN_ERROR",
            "X_PROCMAN_TRACEBACK",
            "MAINPID",
            "",
        ]);
        let line = (key, prop::collection::vec(any::<u8>(), 0..12)).prop_map(|(k, v)| {
            let mut l = format!("{k}=").into_bytes();
            l.extend(v);
            l
        });
        prop::collection::vec(line, 0..5).prop_map(|lines| lines.join(&b'\n'))
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_cases(512))]

        #[test]
        fn any_payload_is_parsed_or_dropped_without_panic(
            payload in prop_oneof![prop::collection::vec(any::<u8>(), 0..512), notification_like()],
        ) {
            if let Ok(messages) = parse_datagram(&payload) {
                prop_assert!(messages.len() <= payload.len());
            }
        }

        #[test]
        fn formatted_messages_parse_back(messages in prop::collection::vec(message(), 0..8)) {
            let text = messages.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("\n");
            prop_assert_eq!(parse_datagram(text.as_bytes()), Ok(messages));
        }
    }
}
