#!/usr/bin/env python3
"""A/B: respawn and reload under load, for two procman binaries (say, before
and after booting workers ran at a raised priority).

Each sample starts `procman APP -w 4` afresh on a free port and waits until
all 4 workers answer. Then, under bench.py's load (4 threads of short
connections to /pid, as the respawn and reload scenarios of bench/run):
kill -9 one worker and time until a pid not seen before answers (respawn);
then HUP and time until 4 new pids answered and every old one is gone
(reload). Failed requests are counted for both. The binaries alternate, so a
change in the machine's load hits both alike.

    bench/boot-priority.py --a OLD_PROCMAN --b NEW_PROCMAN [--runs 5]
                           [--python .venv/bin/python] [--app-dir examples/fastapi] [--app app:main]

Stdlib only (bench/ab.py for the arguments, bench/bench.py for the load).
"""

import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import time

import ab
import bench as B

WORKERS = 4


def sample(procman, args):
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(tmp, "log"), "w") as log:
        port = ab.free_port()
        p = subprocess.Popen(
            [procman, args.app, "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--python", args.python,
             "--no-access-log"],
            cwd=args.app_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            poller, _, _ = B.wait_workers(p, port, WORKERS, "/pid", 60)
            poller.stop()
            old = set(poller.pids())
            if len(old) < WORKERS:
                raise SystemExit(f"{procman}: only {len(old)} workers answered within 60 s")
            respawned, serving = respawn(port, old)
            return respawned | reload(p, port, serving)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def under_load(port, act, done, cap=20.0):
    """Starts the load, waits for 50 requests, act(); then polls done(load) until it returns a
    time. Returns (seconds from act to that time, failed requests)."""
    load = B.Client(port, "/pid", threads=4, max_requests=400_000, max_seconds=cap + 5).start()
    try:
        B.wait_until(lambda: load.total >= 50, 5.0)
        t0 = B.now()
        act()
        t = B.wait_until(lambda: done(load), cap, 0.005)
    finally:
        load.stop()
    if t is None:
        raise SystemExit(f"nothing within {cap} s")
    return t - t0, load.failures()[0]


def respawn(port, old):
    """kill -9 one of `old`: the figures, and the workers serving afterwards."""
    victim = min(old)
    seen = {}

    def answered(load):
        seen.update(load.new_pids(old))
        return min(seen.values()) if seen else None

    secs, failed = under_load(port, lambda: os.kill(victim, signal.SIGKILL), answered)
    B.wait_until(lambda: False, 1.0)  # the new worker settles before the reload
    return {"respawn": secs, "respawn_failed": failed}, (old - {victim}) | set(seen)


def reload(p, port, old):
    """HUP: until WORKERS pids not in `old` answered and every one of `old` is gone."""

    def all_new(load):
        new = load.new_pids(old)
        if len(new) < WORKERS or any(B.alive(x) for x in old):
            return None
        return max(sorted(new.values())[WORKERS - 1], B.now())

    secs, failed = under_load(port, lambda: os.kill(p.pid, signal.SIGHUP), all_new)
    return {"reload": secs, "reload_failed": failed}


def main():
    ap = ab.parser(__doc__)
    ap.set_defaults(runs=5)
    args = ap.parse_args()
    runs = ab.alternate(args, lambda procman: sample(procman, args))
    for key in ("respawn", "respawn_failed", "reload", "reload_failed"):
        a = [r[key] for r in runs["a"]]
        b = [r[key] for r in runs["b"]]
        ma, mb = statistics.median(a), statistics.median(b)
        ratio = f"  b/a {mb / ma:.2f}" if ma else ""
        print(f"{key:15} a {ma:7.3f} [{min(a):.3f}-{max(a):.3f}]   b {mb:7.3f} [{min(b):.3f}-{max(b):.3f}]{ratio}")
        print(f"{'':15} a {[round(x, 3) for x in a]}  b {[round(x, 3) for x in b]}")


if __name__ == "__main__":
    main()
