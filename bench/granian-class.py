"""-k granian side by side (issue 29 item 3, throughput and latency only):
procman -k granian, granian alone, procman's uvicorn class, procman -k
granian with --cpu-affinity auto and with --reuse-port (granian alone's own
listener layout: it gives each worker its own SO_REUSEPORT listener), the
same FastAPI app (examples/fastapi, GET /pid), the same worker count, on
127.0.0.1, interleaved rounds; prints each sample and the medians.

    python3 bench/granian-class.py [--workers 2] [--rounds 3] [--seconds 5]

Needs wrk on PATH, target/release/procman (or --procman) and
target/granian-venv (scripts/test makes it: the pinned granian plus the
example's requirements; its python runs every server). Bounded: each sample
is one `wrk -t2 -c64 -dSECONDS --latency`; halfway through it, `ss` counts
wrk's connections per server process (how evenly the listener spread
them), and the CPU time (user + system) the server's processes spent per
request. With --reload: instead, the time from HUP until every worker of the
new generation has answered, and
the failed requests of 4 short-connection clients meanwhile, for
procman -k granian (also with --reuse-port) and granian alone (granian
reloads its workers on HUP).
With --lifecycle: the first answer after the start, the total PSS of the
process tree once every worker answered, and the respawn after `kill -9` of
one worker (until a new pid answers), for procman -k granian (also with
--reuse-port) and granian alone (with --respawn-failed-workers, without
which it does not respawn).

With --cpu-cgroup (root, a writable cpu cgroup hierarchy): the whole run,
every server and wrk, in a new cpu cgroup. With --cgroup-each instead
(throughput only): each server in a new cpu cgroup of its own and wrk
outside, as each would be in a container or in a systemd unit with
`CPUWeight=` (examples/systemd/procman.service). The scheduler's
autogroups (one per session, kernel.sched_autogroup_enabled) decide only
between tasks of the root cpu cgroup; procman's workers each lead a session (issue 24), so outside a
cgroup each is an autogroup of its own while granian's workers share one.
"""

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, "target", "granian-venv")
APP_DIR = os.path.join(REPO, "examples", "fastapi")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(procman, workers, port):
    python = os.path.join(VENV, "bin", "python")
    common = ["app:main", "-w", str(workers), "-b", f"127.0.0.1:{port}", "--no-access-log", "--python", python]
    return {
        "procman -k granian": [procman, "-k", "granian", *common],
        "granian": [os.path.join(VENV, "bin", "granian"), "--interface", "asgi", "--workers", str(workers),
                    "--respawn-failed-workers", "--host", "127.0.0.1", "--port", str(port), "app:main"],
        "procman (uvicorn)": [procman, *common],
        # Each worker and its threads on one CPU (README, *Pinning workers to CPUs*).
        "procman -k granian --cpu-affinity auto": [procman, "-k", "granian", "--cpu-affinity", "auto", *common],
        # granian alone's listener layout: one SO_REUSEPORT listener per worker.
        "procman -k granian --reuse-port": [procman, "-k", "granian", "--reuse-port", *common],
    }


def wait_answering(port, deadline):
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/pid", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def spread(port):
    """How wrk's connections are spread over the server's processes
    (established connections per pid, from `ss`), fewest first."""
    try:
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return []
    return sorted(Counter(re.findall(r"pid=(\d+)", out)).values())


def cpu_seconds(pids):
    """User + system CPU time of these processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def wrk(port, seconds, pids=()):
    """(req/s, p99 ms, errors, connection spread halfway through, CPU us
    per request of `pids`: the server's processes)."""
    cpu = cpu_seconds(pids)
    proc = subprocess.Popen(["wrk", "-t2", "-c64", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/pid"],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(seconds / 2)
    connections = spread(port)
    out = proc.communicate(timeout=seconds + 30)[0]
    cpu = cpu_seconds(pids) - cpu
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    per_request = 1e6 * cpu / requests if requests else float("nan")
    return rps, float(p99.group(1)) * scale, errors.group(0) if errors else "", connections, per_request


# Set by --cgroup-each: the cpu hierarchy in which each server gets a
# cgroup of its own.
CGROUP_EACH = None


def sample(name, argv, port, seconds):
    group = None
    if CGROUP_EACH:
        group = os.path.join(CGROUP_EACH, f"procman-bench-{os.getpid()}-{port}")
        os.mkdir(group)
    with tempfile.TemporaryFile() as log:
        def enter():  # in the child, before exec: the server and all it forks
            if group:
                with open(os.path.join(group, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
        try:
            proc = subprocess.Popen(argv, cwd=APP_DIR, stdout=log, stderr=log, start_new_session=True,
                                    preexec_fn=enter)
        except BaseException:
            if group:
                os.rmdir(group)
            raise
        try:
            if not wait_answering(port, time.monotonic() + 60):
                raise RuntimeError(f"{name} did not answer within 60 s")
            time.sleep(1)  # every worker up (granian has no readiness to ask)
            return wrk(port, seconds, tree(proc.pid))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if group:
                remove_cgroup(group)


def remove_cgroup(group):
    """rmdir once the server's last process has left (its workers may
    outlive the master by a moment)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            os.rmdir(group)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def get_pid(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/pid", timeout=5) as r:
        return int(r.read().decode().strip().strip('"'))


def pids_answering(port, workers, deadline, exclude=()):
    seen = set()
    while time.monotonic() < deadline and len(seen) < workers:
        try:
            pid = get_pid(port)
        except (OSError, ValueError):
            continue
        if pid not in exclude:
            seen.add(pid)
    return seen


def reload_sample(name, argv, port, workers):
    """(seconds from HUP until every new worker answered, ok, failed)."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, cwd=APP_DIR, stdout=log, stderr=log, start_new_session=True)
        stop = threading.Event()
        counts = {"ok": 0, "failed": 0}

        def client():
            while not stop.is_set():
                try:
                    get_pid(port)
                    counts["ok"] += 1
                except (OSError, ValueError):
                    counts["failed"] += 1

        try:
            if not wait_answering(port, time.monotonic() + 60):
                raise RuntimeError(f"{name} did not answer within 60 s")
            old = pids_answering(port, workers, time.monotonic() + 60)
            clients = [threading.Thread(target=client) for _ in range(4)]
            for c in clients:
                c.start()
            time.sleep(1)
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGHUP)
            new = pids_answering(port, workers, time.monotonic() + 120, exclude=old)
            took = time.monotonic() - t0
            time.sleep(1)
            stop.set()
            for c in clients:
                c.join()
            if len(new) < workers:
                return None, counts["ok"], counts["failed"]
            return took, counts["ok"], counts["failed"]
        finally:
            stop.set()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def tree(root):
    """root and every descendant, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def lifecycle_sample(name, argv, port, workers):
    """(first answer s, PSS MiB, respawn s or None)."""
    with tempfile.TemporaryFile() as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=APP_DIR, stdout=log, stderr=log, start_new_session=True)
        try:
            if not wait_answering(port, t0 + 60):
                raise RuntimeError(f"{name} did not answer within 60 s")
            first = time.monotonic() - t0
            old = pids_answering(port, workers, time.monotonic() + 60)
            time.sleep(1)
            pss = pss_kib(tree(proc.pid)) / 1024
            victim = min(old)
            t1 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            new = pids_answering(port, 1, time.monotonic() + 60, exclude=old)
            respawn = time.monotonic() - t1 if new else None
            return first, pss, respawn
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def lifecycles(args):
    results = {}
    for r in range(args.rounds):
        for name in ("procman -k granian", "procman -k granian --reuse-port", "granian"):
            port = free_port()
            argv = commands(args.procman, args.workers, port)[name]
            first, pss, respawn = lifecycle_sample(name, argv, port, args.workers)
            results.setdefault(name, []).append((first, pss, respawn))
            shown = "never (within 60 s)" if respawn is None else f"{respawn:.2f} s"
            print(f"round {r + 1}: {name}: first answer {first:.2f} s, PSS {pss:.1f} MiB, "
                  f"respawn {shown}", flush=True)
    print(f"\nmedians over {args.rounds} rounds, -w {args.workers}:")
    for name, v in results.items():
        respawns = [x[2] for x in v if x[2] is not None]
        respawn = f"{statistics.median(respawns):.2f} s" if respawns else "never"
        print(f"  {name}: first answer {statistics.median(x[0] for x in v):.2f} s, "
              f"PSS {statistics.median(x[1] for x in v):.1f} MiB, respawn {respawn}")


def reloads(args):
    results = {}
    for r in range(args.rounds):
        for name in ("procman -k granian", "procman -k granian --reuse-port", "granian"):
            port = free_port()
            argv = commands(args.procman, args.workers, port)[name]
            took, ok, failed = reload_sample(name, argv, port, args.workers)
            results.setdefault(name, []).append((took, failed))
            shown = "never (within 120 s)" if took is None else f"{took:.2f} s"
            print(f"round {r + 1}: {name}: reload {shown}, {failed} failed of {ok + failed}", flush=True)
    print(f"\nmedians over {args.rounds} rounds, -w {args.workers}, HUP until every new worker answered:")
    for name, v in results.items():
        times = [t for t, _ in v if t is not None]
        median = f"{statistics.median(times):.2f} s" if times else "never"
        print(f"  {name}: {median}, failed requests per reload {[f for _, f in v]}")


def cpu_hierarchy(option):
    """The root of the cpu cgroup hierarchy, where new cgroups can be made."""
    v1 = "/sys/fs/cgroup/cpu"
    if os.path.isdir(v1) and os.path.exists(os.path.join(v1, "cgroup.procs")):
        return v1
    parent = "/sys/fs/cgroup"  # v2: the cpu controller must be enabled for children
    with open(os.path.join(parent, "cgroup.subtree_control")) as f:
        if "cpu" not in f.read().split():
            raise SystemExit(f"{option}: the cpu controller is not enabled in /sys/fs/cgroup")
    return parent


def enter_cpu_cgroup():
    """Moves this process (and so every child from now on) into a new cpu
    cgroup; returns a function that moves it back and removes the cgroup."""
    parent = cpu_hierarchy("--cpu-cgroup")
    path = os.path.join(parent, f"procman-bench-{os.getpid()}")
    os.mkdir(path)
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))

    def leave():
        with open(os.path.join(parent, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        os.rmdir(path)

    return leave


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procman", default=os.path.join(REPO, "target", "release", "procman"), type=os.path.abspath)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reload", action="store_true", help="measure HUP reloads instead of throughput")
    ap.add_argument("--lifecycle", action="store_true", help="first answer, PSS and respawn instead")
    ap.add_argument("--cpu-cgroup", action="store_true", help="run everything in a new cpu cgroup (root)")
    ap.add_argument("--cgroup-each", action="store_true",
                    help="run each server in a new cpu cgroup of its own, wrk outside (root)")
    args = ap.parse_args()
    if args.cgroup_each:
        if args.cpu_cgroup or args.reload or args.lifecycle:
            raise SystemExit("--cgroup-each: throughput only, and not with --cpu-cgroup")
        global CGROUP_EACH
        CGROUP_EACH = cpu_hierarchy("--cgroup-each")
    if args.cpu_cgroup:
        leave = enter_cpu_cgroup()
        try:
            return run(args)
        finally:
            leave()
    return run(args)


def run(args):
    if args.reload:
        return reloads(args)
    if args.lifecycle:
        return lifecycles(args)
    results = {}
    for r in range(args.rounds):
        for name in commands(args.procman, args.workers, 0):
            port = free_port()
            argv = commands(args.procman, args.workers, port)[name]
            rps, p99, errors, connections, cpu = sample(name, argv, port, args.seconds)
            results.setdefault(name, []).append((rps, p99, cpu))
            spread_text = "/".join(map(str, connections))
            print(f"round {r + 1}: {name}: {rps:.0f} req/s, p99 {p99:.2f} ms, connections {spread_text} "
                  f"cpu {cpu:.1f} us/request {errors}", flush=True)
    where = " in a cpu cgroup" if args.cpu_cgroup else " each server in a cpu cgroup of its own" if args.cgroup_each else ""
    print(f"\nmedians over {args.rounds} rounds, -w {args.workers}, wrk -t2 -c64 -d{args.seconds}s /pid{where}:")
    base = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in results.items()}
    ours = base["procman -k granian"]
    for name, (rps, p99, cpu) in base.items():
        print(f"  {name}: {rps:.0f} req/s (procman -k granian / this: {ours[0] / rps:.2f}x), "
              f"p99 {p99:.2f} ms (procman -k granian / this: {ours[1] / p99:.2f}x), "
              f"CPU {cpu:.1f} us/request (procman -k granian / this: {ours[2] / cpu:.2f}x)")


if __name__ == "__main__":
    main()
