#!/usr/bin/env python3
"""The master under a zygote-channel flood, beside the same master with no
attack (issue 24, item 2).

Starts procman --preload -w 2 serving tests/apps/zygote_flood.py, whose
import (in the zygote) forks --flooders processes holding the zygote's
channel to the master; they flood it (60 000-byte warnings, small warnings,
`ready`, non-JSON, as fast as the channel takes them) once a file exists.
Each phase is one fresh procman: "none" never creates the file, "flood"
creates it once the workers are ready. In each phase, for --rounds rounds:

  reap delay    SIGKILL a worker, then the master's `exited` event's
                timestamp less the time of the kill (the master reaped it)
  /healthz      one GET on the --metrics endpoint, its latency
  master RSS    sampled after each round (VmRSS), the highest reported
  master CPU    its CPU time over the rounds, in % of one core

and at the end TERM-to-exit (SIGTERM to procman's exit). Medians and
maxima are printed per phase, and what the master dropped (from /metrics).

    bench/attack-zygote.py [--procman target/release/procman]
        [--python .venv/bin/python] [--rounds 10] [--flooders 4]

Bounded: two procman runs of --rounds kills each (a killed worker's slot
backs off before its respawn, so 10 rounds take one to three minutes);
traffic to 127.0.0.1 only. Stdlib only.
"""

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(REPO, "tests", "apps")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid):
    """User plus system CPU time of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def events(log):
    out = []
    with open(log, errors="replace") as f:
        for line in f:
            if line.startswith("{") and '"event"' in line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    return out


def when(e):
    return datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()


def wait_for(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.01)
    raise SystemExit("timed out waiting")


def get(url, timeout=10.0):
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = r.read().decode()
        status = r.status
    return status, body, time.perf_counter() - t


def phase(args, flood):
    tmp = tempfile.mkdtemp(prefix="procman-attack-zygote-")
    go = os.path.join(tmp, "go")
    log = os.path.join(tmp, "procman.log")
    env = {**os.environ, "ZYGOTE_FLOOD_GO": go, "ZYGOTE_FLOOD_PROCS": str(args.flooders)}
    cmd = [args.procman, "zygote_flood:app", "--preload", "-w", "2", "-b", "127.0.0.1:0",
           "--metrics", "127.0.0.1:0", "--log-format", "json", "--no-access-log",
           "--python", args.python, "--chdir", APPS]
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
    try:
        def metrics_url():
            with open(log, errors="replace") as f:
                m = re.search(r"Serving metrics at: (http://[0-9.:]+)/metrics", f.read())
            return m and m.group(1)
        base = wait_for(metrics_url)
        wait_for(lambda: any(e["event"] == "all-ready" for e in events(log)))
        if flood:
            open(go, "w").close()
            time.sleep(1.0)  # the flood is under way
        reaps, health, rss = [], [], [rss_kib(p.pid)]
        started, cpu0 = time.monotonic(), cpu_s(p.pid)
        for _ in range(args.rounds):
            workers = {e["worker"] for e in events(log) if e["event"] == "ready"}
            gone = {e["worker"] for e in events(log) if e["event"] == "exited"}
            victim = sorted(workers - gone)[0]
            t = time.time()
            os.kill(victim, signal.SIGKILL)
            exited = wait_for(lambda: [e for e in events(log)
                                       if e["event"] == "exited" and e["worker"] == victim])
            reaps.append((when(exited[0]) - t) * 1000)
            wait_for(lambda: sum(e["event"] == "ready" for e in events(log)) > len(workers))
            status, _, dt = get(base + "/healthz")
            health.append(dt * 1000 if status == 200 else float("inf"))
            rss.append(rss_kib(p.pid))
        seconds = time.monotonic() - started
        cpu = (cpu_s(p.pid) - cpu0) / seconds * 100
        _, text, _ = get(base + "/metrics")
        dropped = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("procman_zygote_messages_dropped_total"))
        t = time.perf_counter()
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        term = (time.perf_counter() - t) * 1000
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return reaps, health, max(rss), term, int(dropped), seconds, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procman", default=os.path.join(REPO, "target", "release", "procman"))
    ap.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--flooders", type=int, default=4)
    args = ap.parse_args()
    args.procman = os.path.abspath(args.procman)
    args.python = os.path.abspath(args.python)
    print(f"{'phase':<6} {'reap ms med/max':>17} {'/healthz ms med/max':>21} "
          f"{'master RSS MiB':>15} {'CPU %':>6} {'TERM-to-exit ms':>16} {'dropped':>10} {'in s':>6}")
    for name, flood in (("none", False), ("flood", True)):
        reaps, health, rss, term, dropped, seconds, cpu = phase(args, flood)
        print(f"{name:<6} {statistics.median(reaps):>8.1f}/{max(reaps):<8.1f} "
              f"{statistics.median(health):>10.1f}/{max(health):<10.1f} "
              f"{rss / 1024:>15.1f} {cpu:>6.0f} {term:>16.1f} {dropped:>10} {seconds:>6.1f}")


main()
