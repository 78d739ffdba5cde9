#!/usr/bin/env python3
"""procman vs gunicorn, idle and under a /metrics scrape (issue 16: the
master's wake-ups and RSS with a scrape every second "still <= 1/5 of
gunicorn's").

Starts procman (release build, --metrics on a free localhost port, 4 workers
of examples/fastapi) and counts its master's wake-ups (voluntary context
switches, from /proc/PID/status) over two windows of --seconds each: one with
no request at all (idle), then one with GET /metrics every second (each
answer checked: 200 and a whole body). Then, if gunicorn is importable by the
chosen Python, gunicorn with 4 UvicornWorkers, idle (it has no endpoint to
scrape; its arbiter wakes once a second whatever happens).

A scrape needs at least one wake-up of the master (to accept and answer it),
so with a scrape every second procman cannot wake less than once a second,
which is gunicorn's own idle rate: the ratio that can be held to 1/5 is that of
the wake-ups that are not the scrapes themselves. Reported:

  procman idle:      wake-ups with nothing asked of it
  procman scraped:   wake-ups in total, scrapes answered, wake-ups per scrape
                     (the total less the idle rate over the window, divided by
                     the scrapes), and wake-ups beyond the scrapes (the total
                     less one per scrape)
  gunicorn idle:     the arbiter's wake-ups
  ratios             procman idle / gunicorn, beyond-the-scrapes / gunicorn,
                     scraped total / gunicorn

--unix adds a run with --metrics unix:PATH scraped every second (no
TCP_DEFER_ACCEPT there: a scrape costs a second wake-up when its request had
not arrived yet when the master ran).

    bench/metrics-idle.py [--python bench/.venv/bin/python] [--seconds 30] [--unix]

Stdlib only. Run it on a quiet machine; the numbers of a loaded one are noise.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
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


def scrape(address):
    """GET /metrics as a scraper does (the request sent whole, at once);
    whether the answer was a 200 with a body."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(address)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: procman\r\nAccept: */*\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200 ") and b"procman_workers" in body


def window(pid, seconds, address=None):
    """Wake-ups of `pid` over `seconds`, scraping `address` every second if
    given: (wake-ups, scrapes answered, elapsed, RSS at the end)."""
    _, woke0 = status(pid)
    start = time.monotonic()
    answered = 0
    tick = start
    while time.monotonic() - start < seconds:
        if address is not None and scrape(address):
            answered += 1
        tick += 1
        time.sleep(max(0.0, tick - time.monotonic()))
    elapsed = time.monotonic() - start
    rss, woke1 = status(pid)
    return woke1 - woke0, answered, elapsed, rss


def run(argv, ready_url, body, env=None):
    proc = subprocess.Popen(argv, cwd=os.path.join(REPO, "examples/fastapi"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(ready_url, time.monotonic() + 60)
        time.sleep(3)  # let the start-up settle (workers' first heartbeats)
        return body(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def procman_argv(args, port, metrics):
    return [args.procman, "app:main", "--python", args.python, "-w", str(args.workers),
            "-b", f"127.0.0.1:{port}", "--metrics", metrics]


def main():
    ap = argparse.ArgumentParser()
    default_py = os.path.join(REPO, "bench/.venv/bin/python")
    if not os.path.exists(default_py):
        default_py = os.path.join(REPO, ".venv/bin/python")
    ap.add_argument("--python", default=default_py)
    ap.add_argument("--procman", default=os.path.join(REPO, "target/release/procman"))
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--unix", action="store_true", help="also scrape over --metrics unix:PATH")
    args = ap.parse_args()

    port, metrics = free_port(), free_port()
    url = f"http://127.0.0.1:{metrics}/readyz"
    idle, scraped = run(procman_argv(args, port, f"127.0.0.1:{metrics}"), url,
                        lambda pid: (window(pid, args.seconds),
                                     window(pid, args.seconds, ("127.0.0.1", metrics))))
    idle_woke, _, idle_s, _ = idle
    woke, answered, elapsed, rss = scraped
    idle_rate = idle_woke / idle_s
    per_scrape = (woke - idle_rate * elapsed) / answered if answered else float("nan")
    beyond = woke - answered
    print(f"procman ({args.workers} workers): master RSS {rss / 2**20:.1f} MiB")
    print(f"procman idle: {idle_woke} wake-ups in {idle_s:.0f} s ({idle_rate:.2f}/s)")
    print(f"procman scraped every second: {woke} wake-ups in {elapsed:.0f} s, {answered} scrapes "
          f"answered, {per_scrape:.2f} wake-ups per scrape, {beyond} wake-ups beyond the scrapes "
          f"({beyond / elapsed:.2f}/s)")

    if args.unix:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "metrics.sock")
            port = free_port()  # readiness: the app's own port answers
            u_woke, u_answered, u_elapsed, _ = run(
                procman_argv(args, port, f"unix:{path}"), f"http://127.0.0.1:{port}/",
                lambda pid: window(pid, args.seconds, path))
        u_per = (u_woke - idle_rate * u_elapsed) / u_answered if u_answered else float("nan")
        print(f"procman scraped over unix:PATH: {u_woke} wake-ups in {u_elapsed:.0f} s, "
              f"{u_answered} scrapes answered, {u_per:.2f} wake-ups per scrape")

    has_gunicorn = subprocess.run([args.python, "-c", "import gunicorn"],
                                  stderr=subprocess.DEVNULL).returncode == 0
    if not has_gunicorn:
        print(f"gunicorn: not importable by {args.python}; procman only")
        return
    port = free_port()
    g_woke, _, g_elapsed, g_rss = run(
        [args.python, "-m", "gunicorn", "app:main", "-w", str(args.workers),
         "-k", "uvicorn.workers.UvicornWorker", "-b", f"127.0.0.1:{port}"],
        f"http://127.0.0.1:{port}/", lambda pid: window(pid, args.seconds))
    g_rate = g_woke / g_elapsed
    print(f"gunicorn ({args.workers} workers): arbiter RSS {g_rss / 2**20:.1f} MiB, "
          f"idle: {g_woke} wake-ups in {g_elapsed:.0f} s ({g_rate:.2f}/s)")
    print(f"procman / gunicorn: RSS {rss / g_rss:.2f}; wake-ups idle {idle_rate / g_rate:.2f}, "
          f"beyond the scrapes {beyond / elapsed / g_rate:.2f} (target <= 0.20), "
          f"scraped in total {woke / elapsed / g_rate:.2f}")


if __name__ == "__main__":
    main()
