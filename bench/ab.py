"""What bench/stop-exit.py and bench/zygote-start.py share: an A/B of two
procman binaries, each sample a fresh `procman APP -w 1 --log-format json`
in a temp dir, the binaries alternating so that a change in the machine's
load hits both alike. Stdlib only; imported from the scripts' directory.
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(doc):
    """The arguments every A/B script takes (--a, --b, --python, --app-dir, --app, --runs)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--a", required=True, type=os.path.abspath, help="procman binary A (say, before)")
    ap.add_argument("--b", required=True, type=os.path.abspath, help="procman binary B (say, after)")
    # Paths absolute: procman runs with the app's directory as its cwd.
    ap.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"), type=os.path.abspath)
    ap.add_argument("--app-dir", default=os.path.join(REPO, "examples", "fastapi"))
    ap.add_argument("--app", default="app:main")
    ap.add_argument("--runs", type=int, default=10)
    return ap


def alternate(args, sample):
    """{"a": [...], "b": [...]}: sample(binary) for A then B, args.runs times."""
    runs = {"a": [], "b": []}
    for _ in range(args.runs):
        for key in runs:
            runs[key].append(sample(getattr(args, key)))
    return runs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(path):
    """The JSON lines of a procman log, skipping any other line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


@contextlib.contextmanager
def one_worker(procman, args):
    """Starts `procman APP -w 1` on a free port and yields (process, log path, port); the
    process group is killed on the way out if it is still there."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log")
        port = free_port()
        with open(log, "w") as out:
            p = subprocess.Popen(
                [procman, args.app, "-w", "1", "-b", f"127.0.0.1:{port}", "--python", args.python,
                 "--no-access-log", "--log-format", "json"],
                cwd=args.app_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield p, log, port
        finally:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def wait_events(procman, log, done, timeout=60):
    """Polls the log until done(list of events) is true; exits with a message after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(events(log))
        if done(found):
            return found
        if time.monotonic() > deadline:
            raise SystemExit(f"{procman}: not ready within {timeout} s (see {log})")
        time.sleep(0.01)
