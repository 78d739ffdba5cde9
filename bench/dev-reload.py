#!/usr/bin/env python3
"""bench/dev-reload.py — `--reload` for development (issue 27, item 4).

For each server, on a copy of the FastAPI example (examples/fastapi/app.py) in
a temporary directory, one worker:

  procman   procman app:main --reload -w 1            (base zygote)
  procman-preload   the same with --preload
  uvicorn   uvicorn app:main --reload                (watchfiles when installed)
  gunicorn  gunicorn -k uvicorn_worker.UvicornWorker --reload app:main
  gunicorn-asgi   gunicorn -k asgi --reload app:main   (gunicorn's own ASGI worker)
  granian   granian --interface asgi --reload app:main

then N saves of app.py (a new VERSION each, written in place), each timed from
the save to the first response of GET /version that shows the new VERSION
(polled every 5 ms), with a client loop (GET /version, one connection per
request, every 10 ms) running through all of it and counting failed requests
(refused, reset, non-200). Last, a broken edit (a syntax error): for 3 s, how
many of the client loop's requests succeed; then the fix, and the time until
it is served.

The median and the 90th percentile of the save → new code time, the failed
requests, and the broken edit's behaviour are printed as a Markdown table.
Run it on a quiet machine; the numbers are wall-clock.

    bench/dev-reload.py [--saves 10] [--python bench/.venv/bin/python]
                        [--procman target/release/procman] [--only procman,uvicorn]

Python packages: uvicorn, fastapi (and watchfiles, gunicorn, uvicorn-worker,
granian for the other rows) in the environment of --python; a server whose
executable is missing is skipped. PYTHONDONTWRITEBYTECODE=1 for every server:
saves of the same size within one second would otherwise hit a stale .pyc.

gunicorn with UvicornWorker never serves a save, and no flag changes that, so
its row gives the reason instead of a time. gunicorn's --reload runs in the
worker (gunicorn/workers/base.py, init_process): a reloader thread polls,
once a second, the files of the modules already imported (app.py among them;
--reload-engine inotify only changes how the change is seen, and
--reload-extra-file only adds files), and its callback `changed` logs "Worker
reloading: app.py modified", sets worker.alive = False, writes to the
worker's wake-up pipe and calls sys.exit(0). Run in the reloader thread,
sys.exit only ends that thread. gunicorn's own workers see `alive` go False
and exit, and the arbiter forks a new one that imports the new code;
uvicorn_worker.UvicornWorker (0.4.0, its newest release) runs uvicorn's Server,
whose main loop looks only at its own should_exit, never at worker.alive,
and the pipe is not in its loop: the worker keeps serving the old code, and
with its reloader thread gone it never notices a later save either. Seen by
hand with gunicorn 27.0.1: the log line appears once, the same worker pid
answers version "1" for ever. Upstream: benoitc/gunicorn#2339 ("reload does
not work for uvicorn.workers.UvicornWorker", the thread-local sys.exit),
benoitc/gunicorn#3135, uvicorn PRs #781 and #1193 (make the worker watch
`alive`; both closed unmerged), Kludex/uvicorn-worker#7 (open). The
workaround users take is a subclass of the worker that watches `alive`
itself; that would be our code, not gunicorn's, so it is not measured.
What a user of gunicorn alone would run instead is gunicorn's own asyncio
ASGI worker, `-k asgi` (gunicorn/workers/gasgi.py in gunicorn 27.0.1):
its serving loop checks `while self.alive` once a second, so --reload works
with it. That is the gunicorn-asgi row: the reloader's 1 s poll plus that
1 s loop make its figures about 1-2 s by design. Its broken edit gets a 500
page and its fix is never served: the import of app.py fails, so app.py is no
longer among the imported modules, and ASGIWorker.load_wsgi, unlike the base
Worker's, does not add the failing file to the reloader (add_extra_file),
so the new worker watches everything but app.py. `--reload-extra-file
app.py` would cover it; the row keeps gunicorn's defaults.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path="/version", timeout=2.0):
    """One short-connection GET; (status, body) or raises."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head:
        raise ConnectionError("empty reply")
    status = int(head.split()[1])
    return status, body.decode("utf-8", "replace")


class Client(threading.Thread):
    """A request every 10 ms; counts successes and failures."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.failed = 0
        self.reasons = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self):
        while not self.stop.is_set():
            try:
                status, _ = get(self.port)
                good = status == 200
                why = f"status {status}"
            except Exception as e:  # refused, reset, timeout
                good = False
                why = type(e).__name__
            with self.lock:
                if good:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.reasons[why] = self.reasons.get(why, 0) + 1
            time.sleep(0.01)

    def counts(self):
        with self.lock:
            return self.ok, self.failed


def app_source(template, version):
    return template.replace('VERSION = "1"', f'VERSION = "{version}"', 1)


def commands(name, args, port, app_dir):
    py = args.python
    bindir = os.path.dirname(py)
    if name in ("procman", "procman-preload"):
        return [args.procman, "app:main", "--reload", "-w", "1", "--python", py,
                "--no-access-log", "-b", f"127.0.0.1:{port}", "--chdir", app_dir] + (
                    ["--preload"] if name == "procman-preload" else [])
    if name == "uvicorn":
        return [py, "-m", "uvicorn", "app:main", "--reload", "--port", str(port),
                "--host", "127.0.0.1", "--no-access-log"]
    if name in ("gunicorn", "gunicorn-asgi"):
        worker = "uvicorn_worker.UvicornWorker" if name == "gunicorn" else "asgi"
        return [os.path.join(bindir, "gunicorn"), "-k", worker,
                "--reload", "-w", "1", "-b", f"127.0.0.1:{port}", "app:main"]
    if name == "granian":
        return [os.path.join(bindir, "granian"), "--interface", "asgi", "--reload",
                "--workers", "1", "--host", "127.0.0.1", "--port", str(port), "app:main"]
    raise ValueError(name)


def available(name, args):
    if name.startswith("procman"):
        return os.access(args.procman, os.X_OK)
    if name == "uvicorn":
        return subprocess.run([args.python, "-c", "import uvicorn"],
                              capture_output=True).returncode == 0
    if name == "gunicorn-asgi":  # gunicorn's own ASGI worker (-k asgi)
        return subprocess.run([args.python, "-c", "import gunicorn.workers.gasgi"],
                              capture_output=True).returncode == 0
    return os.access(os.path.join(os.path.dirname(args.python), name), os.X_OK)


def wait_version(port, want, deadline):
    while time.monotonic() < deadline:
        try:
            status, body = get(port, timeout=1.0)
            if status == 200 and f'"version":"{want}"' in body.replace(" ", ""):
                return time.monotonic()
        except Exception:
            pass
        time.sleep(0.005)
    return None


def serving_pid(port):
    """The pid in the answer of GET /version, or None."""
    try:
        status, body = get(port, timeout=1.0)
        if status == 200:
            return json.loads(body).get("pid")
    except Exception:
        pass
    return None


def not_served(name, i, log_path, pid_before, port):
    """Why save i was not served: one clear reason when the log shows it."""
    with open(log_path, errors="replace") as f:
        lines = f.read().splitlines()
    seen = [n for n, line in enumerate(lines) if "Worker reloading:" in line]
    pid_now = serving_pid(port)
    if (name == "gunicorn" and seen and pid_now is not None and pid_now == pid_before
            and not any("Booting worker" in line for line in lines[seen[0]:])):
        return (f"never reloads: the reloader saw save {i} (\"Worker reloading: app.py "
                f"modified\") but worker {pid_now} kept serving the old code; "
                "UvicornWorker ignores gunicorn's reload (gunicorn#2339, uvicorn-worker#7)")
    return f"save {i} not served within 30 s"


def run_one(name, args, template):
    app_dir = tempfile.mkdtemp(prefix=f"dev-reload-{name}-")
    app = os.path.join(app_dir, "app.py")
    with open(app, "w") as f:
        f.write(app_source(template, "start"))
    port = free_port()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for k in ("NOTIFY_SOCKET", "WEB_CONCURRENCY", "PORT", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(k, None)
    # Beside the app directory, not in it: a watcher that counts any file
    # (granian's default) would reload at every line of its own log.
    log_path = app_dir + ".log"
    log = open(log_path, "w")
    proc = subprocess.Popen(commands(name, args, port, app_dir), cwd=app_dir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    result = {"name": name}
    client = None
    try:
        if wait_version(port, "start", time.monotonic() + 60) is None:
            result["error"] = "did not start"
            return result
        time.sleep(1.0)  # let the watcher settle
        client = Client(port)
        client.start()
        times = []
        for i in range(args.saves):
            version = f"save-{i:03d}"
            pid_before = serving_pid(port)
            with open(app, "w") as f:
                f.write(app_source(template, version))
            t0 = time.monotonic()
            t1 = wait_version(port, version, t0 + 30)
            if t1 is None:
                result["error"] = not_served(name, i, log_path, pid_before, port)
                return result
            times.append(t1 - t0)
            time.sleep(args.pause)
        ok_before, failed_before = client.counts()
        with client.lock:
            reasons = dict(client.reasons)
        # A broken edit: does the server keep answering?
        with open(app, "w") as f:
            f.write(app_source(template, "broken") + "\ndef broken(:\n")
        time.sleep(3.0)
        ok_after, failed_after = client.counts()
        broken_ok = ok_after - ok_before
        broken_failed = failed_after - failed_before
        with open(app, "w") as f:
            f.write(app_source(template, "fixed"))
        t0 = time.monotonic()
        t1 = wait_version(port, "fixed", t0 + 30)
        client.stop.set()
        client.join()
        result.update(
            times=times,
            failed=failed_before,
            requests=ok_before + failed_before,
            reasons=reasons,
            broken_ok=broken_ok,
            broken_failed=broken_failed,
            fix=None if t1 is None else t1 - t0,
        )
        return result
    finally:
        if client is not None:
            client.stop.set()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()
        if args.keep:
            print(f"[{name}] kept {app_dir} and {log_path}", file=sys.stderr)
        else:
            shutil.rmtree(app_dir, ignore_errors=True)
            os.unlink(log_path)


def ms(x):
    return f"{x * 1000:.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--saves", type=int, default=10)
    p.add_argument("--pause", type=float, default=1.0, help="seconds between saves")
    p.add_argument("--python", default=os.path.join(ROOT, "bench/.venv/bin/python"))
    p.add_argument("--procman", default=os.path.join(ROOT, "target/release/procman"))
    p.add_argument("--only",
                   default="procman,procman-preload,uvicorn,gunicorn,gunicorn-asgi,granian")
    p.add_argument("--keep", action="store_true", help="keep the app directories (logs)")
    args = p.parse_args()
    args.python = os.path.abspath(args.python)
    args.procman = os.path.abspath(args.procman)
    with open(os.path.join(ROOT, "examples/fastapi/app.py")) as f:
        template = f.read()
    assert 'VERSION = "1"' in template
    rows = []
    for name in args.only.split(","):
        if not available(name, args):
            print(f"[{name}] not installed: skipped", file=sys.stderr)
            continue
        print(f"[{name}] {args.saves} saves ...", file=sys.stderr)
        rows.append(run_one(name, args, template))
    print(f"\n{args.saves} saves each, one worker, FastAPI example; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| server | save → new code, median ms | p90 ms | failed requests (of) | "
          "broken edit: answered / failed in 3 s | fix served after ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | {r['error']} | | | | |")
            continue
        t = sorted(r["times"])
        p90 = t[min(len(t) - 1, int(round(0.9 * (len(t) - 1))))]
        reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"].items())
        print(f"| {r['name']} | {ms(statistics.median(t))} | {ms(p90)} | "
              f"{r['failed']} ({r['requests']}){' ' + reasons if reasons else ''} | "
              f"{r['broken_ok']} / {r['broken_failed']} | "
              f"{'not served' if r['fix'] is None else ms(r['fix'])} |")


if __name__ == "__main__":
    main()
