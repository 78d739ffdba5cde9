#!/usr/bin/env python3
"""A burst of /metrics scrapes on a busy host: how much does it delay the
master's reaping of a killed worker? (issue 24, item 8: < 10 ms for a
burst of 128 with 1,000+ processes on the host.)

Starts --idle idle processes (`sleep`, in a session of their own, killed
at the end) so that the host runs over a thousand, then, for each procman
binary given (--procman, repeatable: say, before and after), one procman
with --metrics on a free localhost port and --workers command workers
(`sleep`), JSON log. Then --rounds rounds, alternating:

  quiet:  SIGKILL a worker; GET /healthz.
  burst:  open 128 connections to the metrics port and send each a
          GET /metrics at once (one thread, non-blocking sockets), then
          SIGKILL a worker and GET /healthz; every answer is read and
          checked (200 and a whole body).

The reap delay is the time from the kill (wall clock, taken right after
kill(2) returned) to the timestamp of the master's `exited` event for that
worker in its JSON log (same clock). /healthz latency is from connect to
the whole answer. At the end: the master's RSS (VmRSS, and VmHWM, its
peak), and TERM-to-exit (TERM, then waitpid).

    bench/attack-scrape.py --procman target/release/procman \\
        [--procman /path/to/old/procman] [--idle 1000] [--rounds 10]

Stdlib only; traffic to 127.0.0.1 only, bounded (rounds x 129 requests).
The figures of a loaded machine are noisy: medians and maxima are shown.
"""

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import tempfile
import time

BURST = 128


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                yield json.loads(line)


def wall(ts):
    """A log timestamp (RFC 3339, UTC, microseconds) as seconds since the epoch."""
    import datetime
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def wait_for(what, cond, timeout=60, log=None):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            tail = open(log).read()[-3000:] if log else ""
            raise SystemExit(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.005)


def host_processes():
    return sum(1 for e in os.listdir("/proc") if e.isdigit())


def get(port, path, timeout=30):
    """(status, body length, seconds) of one GET over a fresh connection."""
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return status_of(data), time.monotonic() - t


def status_of(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        code = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return None
    length = next((int(l.split(b":")[1]) for l in lines if l.lower().startswith(b"content-length:")), -1)
    return code if len(body) == length else None


def burst_send(port):
    """BURST connections, each sent GET /metrics; returns (selector, buffers)."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(BURST):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        socks.append(s)
    for s in socks:
        sel.register(s, selectors.EVENT_WRITE)
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    pending = set(socks)
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(1):
            s = key.fileobj
            if s in pending:
                s.send(request)  # 37 bytes: one send
                pending.discard(s)
                sel.modify(s, selectors.EVENT_READ)
    if pending:
        raise SystemExit("the burst could not be sent")
    return sel, {s: b"" for s in socks}


def burst_collect(sel, bufs):
    """Reads every answer of a burst; the number that are whole 200s."""
    open_ = set(bufs)
    deadline = time.monotonic() + 60
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(1):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except ConnectionError:
                chunk = b""
            if chunk:
                bufs[s] += chunk
            else:
                sel.unregister(s)
                s.close()
                open_.discard(s)
    for s in open_:
        s.close()
    return sum(1 for b in bufs.values() if status_of(b) == 200)


def children(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def status_field(pid, name):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def run(procman, args):
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log")
        port = free_port()
        with open(log, "w") as out:
            p = subprocess.Popen(
                [procman, "-b", f"127.0.0.1:{free_port()}", "--metrics", f"127.0.0.1:{port}",
                 "-w", str(args.workers), "--log-format", "json", "--", "sleep", "100000"],
                cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return measure(p, log, port, args)
        finally:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def measure(p, log, port, args):
    def ready():
        return sum(1 for e in events(log) if e.get("event") == "ready")
    wait_for("all workers ready", lambda: ready() >= args.workers, log=log)
    wait_for("/healthz", lambda: get(port, "/healthz")[0] == 200)
    res = {"quiet": [], "burst": []}
    hz = {"quiet": [], "burst": []}
    answered = []
    for r in range(args.rounds * 2):
        kind = "burst" if r % 2 else "quiet"
        victim = children(p.pid)[r % args.workers]
        sel = None
        if kind == "burst":
            sel, bufs = burst_send(port)
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        code, took = get(port, "/healthz")
        if code != 200:
            raise SystemExit(f"/healthz answered {code}")
        hz[kind].append(took)
        if sel is not None:
            answered.append(burst_collect(sel, bufs))
        ev = wait_for(f"the exit of {victim}", lambda: next(
            (e for e in events(log) if e.get("event") in ("exited", "boot-failed") and e.get("worker") == victim), None), log=log)
        res[kind].append(wall(ev["timestamp"]) - killed)
        # The replacement is ready before the next round.
        wait_for("the replacement", lambda: ready() >= args.workers + r + 1, log=log)
    rss, hwm = status_field(p.pid, "VmRSS"), status_field(p.pid, "VmHWM")
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    term = time.monotonic() - t
    return res, hz, answered, rss, hwm, term


def ms(xs):
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(len(xs) * 0.9))]
    return (f"median {statistics.median(xs) * 1000:7.2f} ms, p90 {p90 * 1000:7.2f} ms, "
            f"max {xs[-1] * 1000:7.2f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procman", action="append", required=True, type=os.path.abspath)
    ap.add_argument("--idle", type=int, default=1000, help="idle processes to start (default 1000)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10, help="rounds of each kind (default 10)")
    args = ap.parse_args()
    idle = subprocess.Popen(
        ["sh", "-c", f"i=0; while [ $i -lt {args.idle} ]; do sleep 3600 & i=$((i+1)); done; echo up; wait"],
        stdout=subprocess.PIPE, start_new_session=True)
    try:
        idle.stdout.readline()
        print(f"host processes: {host_processes()}; load average: {os.getloadavg()[0]:.1f}")
        for procman in args.procman:
            res, hz, answered, rss, hwm, term = run(procman, args)
            print(f"\n{procman}")
            print(f"  reap delay, no burst:    {ms(res['quiet'])}")
            print(f"  reap delay, 128 scrapes: {ms(res['burst'])}")
            print(f"  /healthz, no burst:      {ms(hz['quiet'])}")
            print(f"  /healthz, 128 scrapes:   {ms(hz['burst'])}")
            print(f"  scrapes answered 200:    {sum(answered)}/{BURST * len(answered)}")
            print(f"  master RSS {rss} KiB (peak {hwm} KiB); TERM-to-exit {term * 1000:.1f} ms")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(idle.pid, signal.SIGKILL)
        idle.wait()


if __name__ == "__main__":
    main()
