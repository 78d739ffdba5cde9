//! Tests of `upgrade`.

use super::*;

fn answer(accepts: &[u32], ok: bool) -> Vec<u8> {
    let a = Answer {
        magic: MAGIC.into(),
        version: "9.9.9".into(),
        accepts: accepts.to_vec(),
        ok,
        error: (!ok).then(|| "bad --workers".into()),
    };
    serde_json::to_vec(&a).expect("json")
}

#[test]
fn only_a_positive_answer_accepting_our_state_passes() {
    let ok = Some(WaitStatus::Exited(Pid::from_raw(1), 0));
    assert!(judge(&answer(&[1, 2], true), ok).is_ok());
    let e = judge(b"", ok).expect_err("/bin/true");
    assert!(e.contains("no pre-flight answer"), "{e}");
    let e = judge(b"{\"magic\":\"x\"}", ok).expect_err("not ours");
    assert!(e.contains("not procman's"), "{e}");
    // A binary that reads only version 1 (before slot sockets).
    let e = judge(&answer(&[1], true), ok).expect_err("version");
    assert!(e.contains("reads state versions [1], not 2"), "{e}");
    let e = judge(&answer(&[2], false), ok).expect_err("config");
    assert!(e.contains("bad --workers"), "{e}");
    let crashed = Some(WaitStatus::Exited(Pid::from_raw(1), 1));
    assert!(judge(&answer(&[2], true), crashed).is_err());
}

#[test]
fn a_state_is_recognised_by_its_version() {
    assert!(State::from_json(b"{}")
        .expect_err("none")
        .contains("no state_version"));
    assert!(State::from_json(b"{\"state_version\":3}")
        .expect_err("newer")
        .contains("state version 3"));
    assert!(
        State::from_json(b"{\"state_version\":1}").is_err(),
        "malformed"
    );
}

#[test]
fn a_version_1_listener_has_no_slot_sockets() {
    // Written by a binary from before --reuse-port kept slot sockets.
    let l: ListenerRecord = serde_json::from_str(
        r#"{"fd":3,"spec":"127.0.0.1:8000","name":"127.0.0.1:8000","display":"http://127.0.0.1:8000","unlink":null,"inherited":false,"reuse_port":true}"#,
    )
    .expect("a version 1 listener");
    assert!(l.slots.is_empty());
}

#[test]
fn relative_times_round_trip() {
    let now = Instant::now();
    let later = now + Duration::from_millis(1500);
    assert_eq!(rel(later, now), 1500);
    assert_eq!(abs(1500, now), later);
    let t = now + Duration::from_secs(10);
    assert_eq!(rel(now, t), -10_000);
    assert_eq!(abs(-10_000, t), now);
}
