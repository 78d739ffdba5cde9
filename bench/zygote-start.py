#!/usr/bin/env python3
"""A/B: how long the base zygote takes to get ready, and how much CPU it
uses, for two procman binaries (say, before and after a change to the
bootstrap).

Each sample starts `procman APP -w 1 --log-format json` afresh, reads the
zygote's own `zygote-ready` line ("Zygote P ready in 0.114s": from the
master's fork to the zygote's ready message, wall time) and, once the worker
is ready and the zygote idle, the zygote's CPU time so far from
/proc/P/schedstat (nanoseconds of run time; it includes the zygote's one
fork). The binaries alternate, so a change in the machine's load hits both
alike. CPU time is the steadier figure on a shared machine.

    bench/zygote-start.py --a OLD_PROCMAN --b NEW_PROCMAN [--runs 10]
                          [--python .venv/bin/python] [--app-dir examples/fastapi] [--app app:main]

Stdlib only.
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def sample(procman, python, app_dir, app):
    """(ready in, s; CPU ms) of the zygote of one fresh procman."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log")
        with open(log, "w") as out:
            p = subprocess.Popen(
                [procman, app, "-w", "1", "-b", f"127.0.0.1:{free_port()}", "--python", python,
                 "--no-access-log", "--log-format", "json"],
                cwd=app_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            ready_in = zygote = None
            while time.monotonic() < deadline:
                found = list(events(log))
                for e in found:
                    if e.get("event") == "zygote-ready":
                        zygote = e["zygote"]
                        ready_in = float(re.search(r"ready in ([0-9.]+)s", e["message"]).group(1))
                if zygote and any(e.get("event") == "all-ready" for e in found):
                    break
                time.sleep(0.01)
            else:
                raise SystemExit(f"{procman}: no zygote-ready and all-ready within 60 s (see {log})")
            time.sleep(0.2)  # the zygote has replied to its one spawn and waits
            with open(f"/proc/{zygote}/schedstat") as f:
                cpu_ms = int(f.read().split()[0]) / 1e6
            return ready_in, cpu_ms
        finally:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)


def show(label, runs):
    ready = [r for r, _ in runs]
    cpu = [c for _, c in runs]
    print(f"  {label}: ready in {statistics.median(ready) * 1000:.1f} ms "
          f"[{min(ready) * 1000:.1f}-{max(ready) * 1000:.1f}], "
          f"CPU {statistics.median(cpu):.1f} ms [{min(cpu):.1f}-{max(cpu):.1f}]")
    return statistics.median(ready), statistics.median(cpu)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="procman binary A (say, before)")
    ap.add_argument("--b", required=True, help="procman binary B (say, after)")
    ap.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"))
    ap.add_argument("--app-dir", default=os.path.join(REPO, "examples", "fastapi"))
    ap.add_argument("--app", default="app:main")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    runs = {"a": [], "b": []}
    for _ in range(args.runs):
        for key in ("a", "b"):
            runs[key].append(sample(getattr(args, key), args.python, args.app_dir, args.app))
    print(f"base zygote, median of {args.runs} [min-max]:")
    ra, ca = show(f"A {args.a}", runs["a"])
    rb, cb = show(f"B {args.b}", runs["b"])
    print(f"  B / A: ready in {rb / ra:.3f}, CPU {cb / ca:.3f}")


if __name__ == "__main__":
    sys.exit(main())
