#!/usr/bin/env python3
"""Keep-alive clients during drains (issue 25 item 1): procman vs gunicorn.

4 clients (http.client), each reusing one connection until a response says
`Connection: close`, send back-to-back 0.2 s requests to
tests/apps/keep_alive_app.py on 2 workers while the server is reloaded twice
(HUP), or (--mode ttou, procman only) loses two workers of 4 to TTOU, or
(--mode max-requests, procman only) recycles workers at 30 requests. A
request that fails on a reused connection is one the server closed after a
response that promised keep-alive. Prints ok / failed / said close.

    bench/keep-alive.py --procman target/release/procman [--http h11|httptools]
        [--mode hup|ttou|max-requests] [--gunicorn PATH_TO_GUNICORN]

--gunicorn runs the same with `gunicorn -k uvicorn.workers.UvicornWorker`
(HUP only; its uvicorn worker speaks h11 unless httptools is installed in
its venv). Stdlib only; traffic to 127.0.0.1 only, bounded (about 10 s per
run).
"""

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(REPO, "tests", "apps")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clients:
    def __init__(self, port, n=4):
        self.port, self.stop = port, False
        self.ok, self.closes, self.failed = 0, 0, []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run) for _ in range(n)]
        for t in self.threads:
            t.start()

    def run(self):
        conn = None
        while not self.stop:
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", "/slow?s=0.2")
                r = conn.getresponse()
                r.read()
                with self.lock:
                    self.ok += 1
                    self.closes += r.will_close
                if r.will_close:
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001: every failure is counted
                with self.lock:
                    self.failed.append(f"{'reused' if reused else 'fresh'}: {type(e).__name__}")
                conn.close()
                conn = None

    def finish(self):
        self.stop = True
        for t in self.threads:
            t.join()


def wait_log(path, needle, count=1, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(path) as f:
            if f.read().count(needle) >= count:
                return
        time.sleep(0.1)
    sys.exit(f"no {count} x {needle!r} in {path} within {timeout}s")


def run(label, argv, log, ready, drains, port):
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        ready()
        clients = Clients(port)
        for n in (1, 2):
            time.sleep(2)
            drains(server, n)
        time.sleep(2)
        clients.finish()
        print(f"{label}: {clients.ok} ok, {len(clients.failed)} failed, "
              f"{clients.closes} said close {sorted(set(clients.failed))}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--procman", required=True)
    ap.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"))
    ap.add_argument("--http", default="h11")
    ap.add_argument("--mode", choices=("hup", "ttou", "max-requests"), default="hup")
    ap.add_argument("--gunicorn")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="keep-alive-")

    port = free_port()
    log = os.path.join(tmp, "procman.log")
    extra = {"hup": ["-w", "2"], "ttou": ["-w", "4"],
             "max-requests": ["-w", "2", "--max-requests", "30"]}[args.mode]

    def procman_drains(server, n):
        if args.mode == "hup":
            server.send_signal(signal.SIGHUP)
            wait_log(log, '"reload-done"', n)
        elif args.mode == "ttou":
            server.send_signal(signal.SIGTTOU)
            wait_log(log, '"exited"', n)
        else:
            wait_log(log, '"exited"', n)

    run(f"procman {args.mode} --http {args.http}",
        [os.path.abspath(args.procman), "keep_alive_app:main", "--python", args.python,
         "--chdir", APPS, "--http", args.http, "--no-access-log", "--log-format", "json",
         "-b", f"127.0.0.1:{port}", *extra],
        log, lambda: wait_log(log, '"all-ready"'), procman_drains, port)

    if args.gunicorn:
        port = free_port()
        log = os.path.join(tmp, "gunicorn.log")

        def gunicorn_drains(server, n):
            server.send_signal(signal.SIGHUP)
            wait_log(log, "Application startup complete", 2 + 2 * n)
            time.sleep(1)  # the old workers' drain

        run("gunicorn hup",
            [args.gunicorn, "keep_alive_app:main", "-k", "uvicorn.workers.UvicornWorker",
             "--chdir", APPS, "-w", "2", "-b", f"127.0.0.1:{port}"],
            log, lambda: wait_log(log, "Application startup complete", 2), gunicorn_drains, port)


if __name__ == "__main__":
    main()
