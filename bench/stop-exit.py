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

Stdlib only (and bench/ab.py, the A/B both scripts share).
"""

import os
import signal
import socket
import statistics
import sys
import threading
import time
from datetime import datetime

import ab


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


def sample(procman, args):
    """Seconds from TERM to the worker's exit, as the master logged them."""
    stop = threading.Event()
    clients = []
    with ab.one_worker(procman, args) as (p, log, port):
        try:
            ab.wait_events(procman, log, lambda found: any(e.get("event") == "all-ready" for e in found))
            clients = [threading.Thread(target=load, args=(port, stop)) for _ in range(args.load)]
            for c in clients:
                c.start()
            time.sleep(0.3 if args.load else 0.05)
            os.kill(p.pid, signal.SIGTERM)
            p.wait(60)
        finally:
            stop.set()
            for c in clients:
                c.join()
        found = list(ab.events(log))
    term = next(when(e) for e in found if e.get("event") == "shutdown")
    exited = next(when(e) for e in found if e.get("event") == "exited")
    return exited - term


def main():
    ap = ab.parser(__doc__)
    ap.add_argument("--load", type=int, default=0, help="client threads during the stop (0: idle)")
    args = ap.parse_args()
    runs = ab.alternate(args, lambda procman: sample(procman, args) * 1000)
    print(f"TERM -> worker exit, {'idle' if not args.load else f'{args.load} client threads'}, "
          f"ms, median of {args.runs} [min-max]:")
    for key in ("a", "b"):
        v = runs[key]
        print(f"  {key.upper()} {getattr(args, key)}: {statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]")
    print(f"  B / A: {statistics.median(runs['b']) / statistics.median(runs['a']):.3f}")


if __name__ == "__main__":
    sys.exit(main())
