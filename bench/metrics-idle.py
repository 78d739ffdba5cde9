#!/usr/bin/env python3
"""procman vs gunicorn, idle under a /metrics scrape (issue 16: the master's
wake-ups and RSS with a scrape every second "still <= 1/5 of gunicorn's").

Starts procman (release build, --metrics on a free localhost port, 4 workers
of examples/fastapi) and, if gunicorn is importable by the chosen Python,
gunicorn with 4 UvicornWorkers; scrapes procman's /metrics every second for
--seconds; reports each master's RSS and voluntary context switches (its
wake-ups, from /proc/PID/status) over the window, and procman / gunicorn.

    bench/metrics-idle.py [--python bench/.venv/bin/python] [--seconds 30]

Stdlib only. Run it on a quiet machine; the numbers of a loaded one are noise.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.split()[0] if value.split() else ""
    return int(out["VmRSS"]) * 1024, int(out["voluntary_ctxt_switches"])


def wait_http(url, deadline):
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"no answer from {url}")


def measure(name, argv, ready_url, seconds, scrape=None, env=None):
    proc = subprocess.Popen(argv, cwd=os.path.join(REPO, "examples/fastapi"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(ready_url, time.monotonic() + 60)
        time.sleep(2)  # let the start-up settle (workers' first heartbeats)
        rss0, woke0 = status(proc.pid)
        start = time.monotonic()
        scrapes = 0
        while time.monotonic() - start < seconds:
            if scrape:
                with urllib.request.urlopen(scrape, timeout=5) as r:
                    r.read()
                scrapes += 1
            time.sleep(1)
        elapsed = time.monotonic() - start
        rss1, woke1 = status(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"{name}: master RSS {rss1 / 2**20:.1f} MiB, {woke1 - woke0} wake-ups in "
          f"{elapsed:.0f} s ({(woke1 - woke0) / elapsed:.1f}/s), {scrapes} scrapes")
    return rss1, (woke1 - woke0) / elapsed


def main():
    ap = argparse.ArgumentParser()
    default_py = os.path.join(REPO, "bench/.venv/bin/python")
    if not os.path.exists(default_py):
        default_py = os.path.join(REPO, ".venv/bin/python")
    ap.add_argument("--python", default=default_py)
    ap.add_argument("--procman", default=os.path.join(REPO, "target/release/procman"))
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()

    port, metrics = free_port(), free_port()
    pm = measure("procman", [args.procman, "app:main", "--python", args.python, "-w", str(args.workers),
                             "-b", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{metrics}"],
                 f"http://127.0.0.1:{metrics}/readyz", args.seconds,
                 scrape=f"http://127.0.0.1:{metrics}/metrics")
    has_gunicorn = subprocess.run([args.python, "-c", "import gunicorn"],
                                  stderr=subprocess.DEVNULL).returncode == 0
    if not has_gunicorn:
        print(f"gunicorn: not importable by {args.python}; procman only")
        return
    port = free_port()
    gu = measure("gunicorn", [args.python, "-m", "gunicorn", "app:main", "-w", str(args.workers),
                              "-k", "uvicorn.workers.UvicornWorker", "-b", f"127.0.0.1:{port}"],
                 f"http://127.0.0.1:{port}/", args.seconds)
    print(f"procman / gunicorn: RSS {pm[0] / gu[0]:.2f}, wake-ups {pm[1] / gu[1]:.2f} "
          f"(target: wake-ups <= 0.20)")


if __name__ == "__main__":
    main()
