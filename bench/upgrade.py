#!/usr/bin/env python3
"""In-place upgrade (issue 28): how long `procman upgrade` takes, from the
client's request to the new image's answer (sent once it has adopted the
state and before its first loop round: from then on it handles events),
and what a client loop sees meanwhile.

Starts `procman APP -w 2 --control-socket ...` once, waits for every
worker, starts N load threads (each GET /pid on a new connection, one
after the other) and runs `procman upgrade` --upgrades times in a row,
timing each; then counts requests served and failed while the upgrades
ran, and checks that the workers' pids did not change.

    bench/upgrade.py [--procman target/release/procman] [--upgrades 10]
                     [--load 2] [--python .venv/bin/python]
                     [--app-dir examples/fastapi] [--app app:main]

Stdlib only; bounded (a minute at most); 127.0.0.1 only.
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.settimeout(5)
        s.sendall(b"GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.startswith(b"HTTP/1.1 200")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--procman", default="target/release/procman")
    p.add_argument("--upgrades", type=int, default=10)
    p.add_argument("--load", type=int, default=2)
    p.add_argument("--python", default=".venv/bin/python")
    p.add_argument("--app-dir", default="examples/fastapi")
    p.add_argument("--app", default="app:main")
    a = p.parse_args()
    procman = os.path.abspath(a.procman)
    tmp = tempfile.mkdtemp(prefix="procman-bench-upgrade-")
    sock = os.path.join(tmp, "ctl")
    port = free_port()
    log = open(os.path.join(tmp, "procman.log"), "w")
    proc = subprocess.Popen(
        [procman, a.app, "-w", "2", "-b", f"127.0.0.1:{port}", "--no-access-log",
         "--python", os.path.abspath(a.python), "--chdir", os.path.abspath(a.app_dir),
         "--control-socket", sock],
        stdout=log, stderr=log)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if get(port):
                    break
            except OSError:
                time.sleep(0.1)
        children = lambda: sorted(
            int(t) for t in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split())
        before = children()
        stop = threading.Event()
        counts = {"ok": 0, "failed": 0}
        lock = threading.Lock()

        def loop():
            while not stop.is_set():
                try:
                    ok = get(port)
                except OSError:
                    ok = False
                with lock:
                    counts["ok" if ok else "failed"] += 1

        threads = [threading.Thread(target=loop) for _ in range(a.load)]
        for t in threads:
            t.start()
        took = []
        started = time.time()
        for _ in range(a.upgrades):
            t0 = time.monotonic()
            out = subprocess.run([procman, "upgrade", "--control-socket", sock],
                                 capture_output=True, text=True, timeout=60)
            took.append((time.monotonic() - t0) * 1000)
            if out.returncode != 0:
                print("upgrade failed:", out.stderr.strip(), file=sys.stderr)
                return 1
        span = time.time() - started
        stop.set()
        for t in threads:
            t.join()
        after = children()
        kept = len(set(before) & set(after))
        print(f"{a.upgrades} upgrades in {span:.2f}s: procman upgrade -> new image answering: "
              f"median {statistics.median(took):.1f} ms [min {min(took):.1f} - max {max(took):.1f}]; "
              f"requests during them ({a.load} client loops): {counts['ok']} served, "
              f"{counts['failed']} failed; children kept: {kept} of {len(before)} "
              f"(the base zygote is replaced, the workers are not)")
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
