#!/usr/bin/env python3
"""A/B: how long a uvicorn worker takes to exit after a stop, for two
procman binaries (say, before and after a change to the bootstrap).

Each sample starts `procman APP -w 1 --log-format json` afresh, waits until
the worker is ready, optionally starts a light load (`--load N`: N threads,
each sending GET /pid on a new connection, one after the other), sends TERM
to procman and reads from the master's own log the time from its
`shutdown` event (TERM received) to the worker's `exited` event: both
stamped by the master, so the figure holds the worker's notice of the stop,
its drain, its lifespan shutdown and its exit. The binaries alternate, so a
change in the machine's load hits both alike.

    bench/stop-exit.py --a OLD_PROCMAN --b NEW_PROCMAN [--runs 10] [--load 0]
                       [--python .venv/bin/python] [--app-dir examples/fastapi] [--app app:main]

Stdlib only.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

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


def when(event):
    return datetime.strptime(event["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def load(port, stop):
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
        except OSError:
            time.sleep(0.001)


def sample(procman, python, app_dir, app, threads):
    """Seconds from TERM to the worker's exit, as the master logged them."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log")
        port = free_port()
        with open(log, "w") as out:
            p = subprocess.Popen(
                [procman, app, "-w", "1", "-b", f"127.0.0.1:{port}", "--python", python,
                 "--no-access-log", "--log-format", "json"],
                cwd=app_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        stop = threading.Event()
        clients = []
        try:
            deadline = time.monotonic() + 60
            while not any(e.get("event") == "all-ready" for e in events(log)):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{procman}: not ready within 60 s (see {log})")
                time.sleep(0.01)
            clients = [threading.Thread(target=load, args=(port, stop)) for _ in range(threads)]
            for c in clients:
                c.start()
            time.sleep(0.3 if threads else 0.05)
            os.kill(p.pid, signal.SIGTERM)
            p.wait(60)
        finally:
            stop.set()
            for c in clients:
                c.join()
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        found = list(events(log))
        term = next(when(e) for e in found if e.get("event") == "shutdown")
        exited = next(when(e) for e in found if e.get("event") == "exited")
        return exited - term


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="procman binary A (say, before)")
    ap.add_argument("--b", required=True, help="procman binary B (say, after)")
    ap.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"), type=os.path.abspath)
    ap.add_argument("--app-dir", default=os.path.join(REPO, "examples", "fastapi"))
    ap.add_argument("--app", default="app:main")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--load", type=int, default=0, help="client threads during the stop (0: idle)")
    args = ap.parse_args()
    runs = {"a": [], "b": []}
    for _ in range(args.runs):
        for key in ("a", "b"):
            runs[key].append(sample(getattr(args, key), args.python, args.app_dir, args.app, args.load) * 1000)
    print(f"TERM -> worker exit, {'idle' if not args.load else f'{args.load} client threads'}, "
          f"ms, median of {args.runs} [min-max]:")
    for key in ("a", "b"):
        v = runs[key]
        print(f"  {key.upper()} {getattr(args, key)}: {statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]")
    print(f"  B / A: {statistics.median(runs['b']) / statistics.median(runs['a']):.3f}")


if __name__ == "__main__":
    sys.exit(main())
