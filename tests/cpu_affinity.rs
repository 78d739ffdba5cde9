//! `--cpu-affinity auto`: each worker, and every thread it starts, runs on
//! one CPU, the slots taking procman's allowed CPUs in turn (slot i on the
//! (i mod n)-th). Checked in `/proc/PID/task/*/status` for every path a
//! worker is started by: forked by a zygote (uvicorn and granian workers,
//! which pin themselves before any thread), and forked by the master (a
//! command, or a uvicorn worker without a zygote, pinned before exec). The
//! default leaves every worker on procman's mask.

mod util;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use util::*;

const BOOT: Duration = Duration::from_secs(60);

/// The CPUs procman may use: the test's own mask, which procman inherits.
fn allowed() -> Vec<usize> {
    let set = nix::sched::sched_getaffinity(Pid::from_raw(0)).expect("own mask");
    (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// The mask of each thread of `pid`, as the kernel lists it ("0", "0-1").
fn thread_masks(pid: i32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .collect()
}

/// procman's own mask, as the kernel lists it.
fn own_mask() -> String {
    thread_masks(std::process::id() as i32)
        .into_iter()
        .next()
        .expect("own mask")
}

/// slot → pid of the first `n` workers that said they were ready after the
/// first `skip`.
fn ready_slots(h: &Harness, skip: usize, n: usize) -> BTreeMap<u64, i32> {
    let e = h.expect_events("ready", skip + n, BOOT, "workers ready", |_| true);
    e[skip..]
        .iter()
        .map(|e| (e["slot"].as_u64().expect("slot"), worker_of(e)))
        .collect()
}

/// Waits until every worker has at least `threads` threads, all on its
/// slot's CPU; fails the test with what each had otherwise.
fn expect_pinned(h: &Harness, slots: &BTreeMap<u64, i32>, threads: usize) {
    let cpus = allowed();
    let want = |slot: u64| cpus[slot as usize % cpus.len()].to_string();
    let ok = wait_for(BOOT, || {
        slots
            .iter()
            .all(|(&slot, &pid)| {
                let masks = thread_masks(pid);
                masks.len() >= threads && masks.iter().all(|m| *m == want(slot))
            })
            .then_some(())
    });
    let seen: Vec<(u64, i32, Vec<String>)> = slots
        .iter()
        .map(|(&s, &p)| (s, p, thread_masks(p)))
        .collect();
    h.check(
        ok.is_some(),
        &format!("every thread of each worker on its slot's CPU of {cpus:?}: {seen:?}"),
    );
}

fn granian_python() -> PathBuf {
    repo().join("target/granian-venv/bin/python")
}

#[test]
fn every_thread_of_a_zygote_forked_granian_worker_runs_on_its_slots_cpu() {
    let python = granian_python();
    let h = Start::new(
        "affinity-granian",
        &["-k", "granian", "--python", python.to_str().expect("utf8")],
    )
    .args(["--no-access-log", "--chdir"])
    .args([fastapi_dir().to_str().expect("utf8")])
    .args(["app:main", "-w", "3", "--cpu-affinity", "auto"])
    .json()
    .spawn();
    let slots = ready_slots(&h, 0, 3);
    // granian's runtime thread and the interpreter's, at least.
    expect_pinned(&h, &slots, 2);
    let zygotes = zygote_pids(&h);
    h.check(!zygotes.is_empty(), "a zygote");
    for z in zygotes {
        h.check(
            thread_masks(z).iter().all(|m| *m == own_mask()),
            "the zygote keeps procman's mask",
        );
    }
}

#[test]
fn a_command_worker_the_master_forks_runs_on_its_slots_cpu() {
    let h = Start::new(
        "affinity-command",
        &["-w", "2", "--ready", "notify", "--cpu-affinity", "auto"],
    )
    .json()
    .args(["--"])
    .args(notify_worker())
    .spawn();
    let slots = ready_slots(&h, 0, 2);
    expect_pinned(&h, &slots, 1);
}

#[test]
fn a_uvicorn_worker_without_a_zygote_runs_on_its_slots_cpu() {
    let h = uvicorn(
        "affinity-cold",
        &fastapi_dir(),
        "app:main",
        &["-w", "2", "--no-zygote", "--cpu-affinity", "auto"],
    )
    .json()
    .spawn();
    let slots = ready_slots(&h, 0, 2);
    expect_pinned(&h, &slots, 1);
}

#[test]
fn a_respawned_worker_runs_on_its_slots_cpu_again() {
    let h = uvicorn(
        "affinity-respawn",
        &fastapi_dir(),
        "app:main",
        &["-w", "2", "--cpu-affinity", "auto"],
    )
    .json()
    .spawn();
    let first = ready_slots(&h, 0, 2);
    let victim = first[&1];
    let _ = kill(Pid::from_raw(victim), Signal::SIGKILL);
    let again = ready_slots(&h, 2, 1);
    h.check(
        again.get(&1).is_some_and(|&p| p != victim),
        &format!("slot 1 respawned: {again:?}"),
    );
    expect_pinned(&h, &again, 1);
}

/// Off, also with a `PROCMAN_CPU` in procman's own environment: that
/// variable is procman's to set per worker, never passed on.
#[test]
fn without_cpu_affinity_workers_keep_procmans_mask() {
    let h = uvicorn("affinity-off", &fastapi_dir(), "app:main", &["-w", "2"])
        .env("PROCMAN_CPU", "0")
        .json()
        .spawn();
    let slots = ready_slots(&h, 0, 2);
    for (slot, pid) in slots {
        let masks = thread_masks(pid);
        h.check(
            !masks.is_empty() && masks.iter().all(|m| *m == own_mask()),
            &format!("slot {slot}: {masks:?}, procman's {}", own_mask()),
        );
    }
}

#[test]
fn a_cpu_affinity_other_than_auto_or_off_is_refused_in_one_line() {
    let (code, _out, err) = run_procman(
        &["--cpu-affinity", "sometimes", "--", "true"],
        &[],
        &std::env::temp_dir(),
    );
    assert_eq!(code, 2, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("'sometimes'") && lines[0].contains("--cpu-affinity"),
        "{err}"
    );
}

/// The config file's key, and a reload: the next generation takes the new
/// value (here from off to auto).
#[test]
fn a_reload_turning_cpu_affinity_on_pins_the_next_generation() {
    let start = Start::new("affinity-reload", &[]).json();
    let file = start.dir().join("procman.toml");
    let command = notify_worker()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = |mode: &str| {
        format!(
            "workers = 2\nready = \"notify\"\ncpu-affinity = \"{mode}\"\ncommand = [{command}]\n"
        )
    };
    std::fs::write(&file, config("off")).expect("write");
    let h = start.args(["-c", file.to_str().expect("utf8")]).spawn();
    for (slot, pid) in ready_slots(&h, 0, 2) {
        h.check(
            thread_masks(pid).iter().all(|m| *m == own_mask()),
            &format!("slot {slot} unpinned while off"),
        );
    }
    std::fs::write(&file, config("auto")).expect("write");
    h.signal(Signal::SIGHUP);
    h.expect_event("reload-done", BOOT, "reloaded", |e| e["generation"] == 2);
    expect_pinned(&h, &ready_slots(&h, 2, 2), 1);
}

/// A cpuset cgroup for one test, beside this process's own, holding
/// `cpus` (v1: the cpuset hierarchy; v2: where the cpuset controller is
/// enabled), or None where none can be made here. The caller removes it.
fn cpuset_cgroup(name: &str, cpus: &[usize]) -> Option<PathBuf> {
    let (base, _) = own_cgroup_dir("cpuset")?;
    let dir = base.join(format!("procman-test-{}-{name}", std::process::id()));
    std::fs::create_dir(&dir).ok()?;
    let list = cpus
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    // v1 wants both set before any task joins; v2 inherits the memory nodes.
    let mems = std::fs::read_to_string(base.join("cpuset.mems"))
        .or_else(|_| std::fs::read_to_string(base.join("cpuset.mems.effective")))
        .unwrap_or_default();
    let _ = std::fs::write(dir.join("cpuset.mems"), mems.trim());
    if std::fs::write(dir.join("cpuset.cpus"), &list).is_err() {
        let _ = std::fs::remove_dir(&dir);
        return None;
    }
    Some(dir)
}

/// A CPU taken away from procman after it started (its cpuset shrank):
/// the worker started next for that CPU's slot is not pinned to a CPU it
/// may not use; a warning names the slot and the CPU, and the worker runs
/// and gets ready on the CPUs left. A command worker the master forks.
#[test]
fn a_cpu_taken_away_leaves_the_slots_next_worker_unpinned_with_a_warning() {
    shrink_then_respawn_slot_1(
        Start::new(
            "affinity-shrink",
            &["-w", "2", "--ready", "notify", "--cpu-affinity", "auto"],
        )
        .json()
        .args(["--"])
        .args(notify_worker()),
    );
}

/// The same for a uvicorn worker a zygote forks.
#[test]
fn a_cpu_taken_away_leaves_the_slots_next_zygote_forked_worker_unpinned_with_a_warning() {
    shrink_then_respawn_slot_1(
        uvicorn(
            "affinity-shrink-zygote",
            &fastapi_dir(),
            "app:main",
            &["-w", "2", "--cpu-affinity", "auto"],
        )
        .json(),
    );
}

/// Runs `start` (two workers, `--cpu-affinity auto`) in a cpuset of two
/// CPUs, takes the second away, kills slot 1's worker and checks its
/// replacement and the warning.
fn shrink_then_respawn_slot_1(start: Start) {
    let cpus = allowed();
    if cpus.len() < 2 {
        eprintln!("SKIP: needs two CPUs, has {cpus:?}");
        return;
    }
    let Some(cg) = cpuset_cgroup("shrink", &cpus[..2]) else {
        eprintln!("SKIP: cannot create a cpuset cgroup here");
        return;
    };
    // procman moves itself into the cgroup, then runs.
    let h = start
        .env("PROCMAN_CG", cg.to_str().expect("utf8"))
        .spawn_with(
            "sh",
            &[
                "-c",
                "echo $$ > \"$PROCMAN_CG/cgroup.procs\" && exec \"$0\" \"$@\"",
                PROCMAN,
            ],
        );
    let first = ready_slots(&h, 0, 2);
    let (kept, gone) = (cpus[0], cpus[1]);
    std::fs::write(cg.join("cpuset.cpus"), kept.to_string()).expect("shrink the cpuset");
    let victim = first[&1];
    let _ = kill(Pid::from_raw(victim), Signal::SIGKILL);
    let again = ready_slots(&h, 2, 1);
    let mask = again.get(&1).map(|&pid| thread_masks(pid));
    let warned = h.messages().iter().any(|m| {
        m.contains("slot 1") && m.contains(&format!("CPU {gone}")) && m.contains("unpinned")
    });
    let log = h.log_text();
    drop(h);
    let _ = wait_for(Duration::from_secs(5), || std::fs::remove_dir(&cg).ok());
    assert_eq!(
        mask,
        Some(vec![kept.to_string()]),
        "slot 1's new worker runs on the CPU left\n{log}"
    );
    assert!(warned, "a warning names slot 1 and CPU {gone}\n{log}");
}
