//! procman's workers together weigh on the CPU as one session, like any
//! other program's processes, where the kernel shares the CPU among
//! sessions' autogroups first (`kernel.sched_autogroup_enabled`).
//!
//! Each worker leads a session of its own (see `boot_priority.rs`), so
//! each has an autogroup of its own: left at the default nice value, N
//! workers would weigh as N sessions against everything else on the
//! machine (a load generator on the same host, an editor, a database).
//! procman sets each worker's autogroup to the nice value whose weight is
//! one N-th of its own session's. Where the kernel keeps no autogroups
//! there is nothing to check and the tests say so.

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// procman with `n` command workers (READY=1 when serving), JSON logs.
fn workers(name: &str, n: usize) -> Start {
    Start::new(name, &["-w", &n.to_string(), "--ready", "notify"])
        .json()
        .args(["--"])
        .args(notify_worker())
}

/// The pids of the first `n` workers that logged `ready` after the first
/// `skip`.
fn ready_workers(h: &Harness, skip: usize, n: usize) -> Vec<i32> {
    let e = h.expect_events("ready", skip + n, BOOT, "workers ready", |_| true);
    e[skip..].iter().map(worker_of).collect()
}

/// Waits until every worker of `pids` has its autogroup at `nice`; fails
/// the test with what each had otherwise.
fn expect_autogroups(h: &Harness, pids: &[i32], nice: i32, what: &str) {
    let ok = wait_for(BOOT, || {
        pids.iter()
            .all(|&p| autogroup_nice_of(p) == Some(nice))
            .then_some(())
    });
    let seen: Vec<(i32, Option<i32>)> = pids.iter().map(|&p| (p, autogroup_nice_of(p))).collect();
    h.check(
        ok.is_some(),
        &format!("{what}: every worker's autogroup at nice {nice}: {seen:?}"),
    );
}

/// Whether this kernel keeps autogroups (else the test has nothing to see).
fn autogroups() -> bool {
    autogroup_nice_of(std::process::id() as i32).is_some()
}

#[test]
fn four_workers_together_weigh_as_one_session() {
    if !autogroups() {
        eprintln!("skipped: this kernel keeps no autogroups");
        return;
    }
    let h = workers("cpu-share-4", 4).spawn();
    let pids = ready_workers(&h, 0, 4);
    let own = autogroup_nice_of(h.pid).expect("procman's autogroup");
    // Nice 6 weighs 272 against nice 0's 1024: four of them, 1088, about
    // one session.
    expect_autogroups(&h, &pids, (own + 6).min(19), "4 workers");
}

#[test]
fn a_lone_worker_weighs_as_its_session() {
    if !autogroups() {
        eprintln!("skipped: this kernel keeps no autogroups");
        return;
    }
    let h = workers("cpu-share-1", 1).spawn();
    let pids = ready_workers(&h, 0, 1);
    let own = autogroup_nice_of(h.pid).expect("procman's autogroup");
    expect_autogroups(&h, &pids, own, "1 worker");
}

#[test]
fn without_cap_sys_admin_every_worker_still_gets_its_share() {
    if !autogroups() {
        eprintln!("skipped: this kernel keeps no autogroups");
        return;
    }
    // Without CAP_SYS_ADMIN the kernel allows one autogroup change a tenth
    // of a second, machine-wide, and refuses the others with EAGAIN: four
    // workers starting at once must not end up with one at its share and
    // three at the default weight.
    let h = workers("cpu-share-unprivileged", 4)
        .spawn_with("setpriv", &["--bounding-set=-sys_admin", "--", PROCMAN]);
    let pids = ready_workers(&h, 0, 4);
    let own = autogroup_nice_of(h.pid).expect("procman's autogroup");
    expect_autogroups(&h, &pids, (own + 6).min(19), "4 workers, rate-limited");
}

#[test]
fn scaling_reweighs_every_worker() {
    if !autogroups() {
        eprintln!("skipped: this kernel keeps no autogroups");
        return;
    }
    let h = workers("cpu-share-scale", 2).spawn();
    let first = ready_workers(&h, 0, 2);
    let own = autogroup_nice_of(h.pid).expect("procman's autogroup");
    // Two workers: nice 3 (526 each).
    expect_autogroups(&h, &first, (own + 3).min(19), "2 workers");
    // One at a time: signals of one kind pending together are one.
    for i in 1..=6 {
        h.signal(Signal::SIGTTIN);
        h.expect_events("scaled", i, BOOT, "a worker more", |_| true);
    }
    let added = ready_workers(&h, 2, 6);
    let all: Vec<i32> = first.iter().chain(added.iter()).copied().collect();
    // Eight workers: nice 9 (137 each, 1096 in all), the first two too.
    expect_autogroups(&h, &all, (own + 9).min(19), "8 workers after TTIN");
}
