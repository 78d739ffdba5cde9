#!/usr/bin/env python3
"""Warm-start benchmark (stdlib only, Python 3.11): procman --preload vs cold procman vs
gunicorn + UvicornWorker with and without --preload, on the same FastAPI app.

Start it through bench/run-preload (checks the venv, builds procman, then runs this).

Per round, for each worker count (4 and 8), the four servers run one after the other
(A B C D), so drift on the shared machine hits all of them alike; the report gives the
median over the rounds and ratios within this run only. On each instance:

1. start-up: from exec until N distinct worker pids answered GET /pid;
2. memory: once start-up settled, PSS and RSS (/proc/PID/smaps_rollup) summed over the
   workers, and separately over the master and everything else it started (the zygote);
3. respawn: kill -9 one worker, time until a pid not seen before answers /pid (several
   kills per instance, the instance's median is its figure);
4. reload: SIGHUP, time until every worker pid is new (old ones gone, N new ones
   answered), with a 4-thread short-connection loop counting failed requests;
5. stop: SIGTERM, exit code and leftover processes (a sanity check).

Rules: every process started is stopped by pid (its process group, descendants and
session), also on errors and Ctrl-C; every load loop is bounded in count and time and
targets 127.0.0.1; each start gets a fresh free port; waits are polls with deadlines.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

# The /proc readers, process registry, HTTP client loops and report helpers are bench/bench.py's.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as common  # noqa: E402
from bench import (HOST, REG, Client, _read, alive, free_port, live_descendants, log, now,  # noqa: E402
                   session_members, sh, smaps_rollup, stale_sources, wait_until)
from bench import median_of as med, numbers as nums  # noqa: E402

common.LOG_TAG = "preload"  # log() (also REG's) prints [preload]

SERVERS = ("procman-preload", "procman", "gunicorn-preload", "gunicorn")
TITLES = {
    "procman-preload": "procman --preload",
    "procman": "procman (cold)",
    "gunicorn-preload": "gunicorn --preload",
    "gunicorn": "gunicorn (no preload)",
}
BASE = "procman-preload"  # ratios are against this one
STEADY = 1.5  # s after start-up before the first kill -9


def children(pid: int) -> set[int]:
    """Direct children of pid (/proc/PID/task/PID/children)."""
    raw = _read(f"/proc/{pid}/task/{pid}/children")
    return {int(x) for x in raw.split()} if raw else set()


# --------------------------------------------------------------------------- the bench


class StepFailed(Exception):
    pass


class Bench:
    def __init__(self, a):
        self.a = a
        self.root = os.path.abspath(a.root)
        self.bench_dir = os.path.join(self.root, "bench")
        self.vbin = os.path.join(self.bench_dir, ".venv", "bin")
        self.out_dir = os.path.join(self.bench_dir, "out")
        # Our own log dir: bench/bench.py empties bench/out/logs at its start.
        self.log_dir = os.path.join(self.out_dir, "preload-logs")
        shutil.rmtree(self.log_dir, ignore_errors=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self.procman_src = os.path.join(self.root, "target", "release", "procman")
        self.app_dir = os.path.join(self.root, "examples", "fastapi")
        self.app = "app:main"
        self.rounds = 1 if a.quick and a.rounds is None else (a.rounds or 3)
        self.ns = a.workers
        self.kills = a.kills
        self.servers = [s for s in SERVERS if s in a.only]
        self.startup_cap = 60.0
        self.respawn_cap = 20.0
        self.reload_cap = 30.0
        self.term_cap = 40.0
        self.results: dict = {s: {} for s in self.servers}  # server -> key -> [per round]
        self.samples: dict = {s: {} for s in self.servers}  # server -> key -> all samples
        self.errors: list[str] = []
        self.log_notes: list[str] = []
        self.env = common.server_env(self.vbin, drop=("GUNICORN_CMD_ARGS",))
        self.run_id = 0
        self.tmp = tempfile.mkdtemp(prefix="procman-preload-bench-")
        self.procman = self.procman_src
        self.procman_sha = "?"
        self.no_zygote = common.procman_has_flag(self.procman_src, "--no-zygote")

    def pin_procman(self) -> None:
        """Run a private copy of target/release/procman: a concurrent rebuild (another
        bench, a test run) then cannot change the binary in the middle of the run."""
        if not os.access(self.procman_src, os.X_OK):
            raise SystemExit(f"{self.procman_src} not found: build it (bench/run-preload without "
                             "BENCH_SKIP_SETUP=1)")
        dst = os.path.join(self.tmp, "procman")
        shutil.copy2(self.procman_src, dst)
        with open(dst, "rb") as f:
            self.procman_sha = hashlib.sha256(f.read()).hexdigest()[:12]
        self.procman = dst

    # ---- commands

    def argv(self, server: str, n: int, port: int) -> list[str]:
        bind = f"{HOST}:{port}"
        if server.startswith("gunicorn"):
            a = [os.path.join(self.vbin, "gunicorn"), self.app, "-k", "uvicorn_worker.UvicornWorker",
                 "-w", str(n), "-b", bind]
        else:
            a = [self.procman, self.app, "-w", str(n), "-b", bind]
        if server.endswith("preload"):
            a.append("--preload")
        if server.startswith("procman"):
            a += ["--no-access-log", "--python", os.path.join(self.vbin, "python")]
        if server == "procman" and self.no_zygote:
            # "cold" means every worker imports the app itself: where procman's default forks
            # workers from a base zygote, that takes --no-zygote
            a.append("--no-zygote")
        return a

    def display_cmd(self, server: str) -> str:
        a = self.argv(server, 0, 0)
        a[0] = "target/release/procman" if server.startswith("procman") else "bench/.venv/bin/gunicorn"
        s = " ".join(a).replace(self.root + "/", "")
        return s.replace("-w 0", "-w N").replace(f"{HOST}:0", f"{HOST}:PORT")

    def start(self, server: str, n: int):
        self.run_id += 1
        port = free_port()
        argv = self.argv(server, n, port)
        logp = os.path.join(self.log_dir, f"{self.run_id:03d}-{server}-w{n}.log")
        with open(logp, "w") as f:
            f.write("$ " + " ".join(argv) + "\n")
        t0 = now()
        p = REG.spawn(argv, self.app_dir, self.env, logp)
        return p, port, t0, logp

    # ---- results

    def record(self, server: str, key: str, value, rnd: int) -> None:
        lst = self.results[server].setdefault(key, [None] * self.rounds)
        lst[rnd] = value

    def sample(self, server: str, key: str, value) -> None:
        self.samples[server].setdefault(key, []).append(value)

    def fail(self, server: str, n: int, rnd: int, what: str, msg: str) -> None:
        line = f"{TITLES[server]} N={n} round {rnd + 1} {what}: {msg}".replace(self.root + "/", "")
        log("FAILED " + line)
        self.errors.append(line)

    log_tail = staticmethod(common.Bench.log_tail)

    # ---- steps

    def memory(self, m: int, workers: set[int]) -> dict:
        """PSS/RSS (MiB) summed over the workers and over the rest (master, zygote, ...)."""
        others = ({m} | live_descendants(m)) - workers
        w_rss = w_pss = o_rss = o_pss = 0
        missing = 0
        for pid in workers:
            r = smaps_rollup(pid)
            if r is None:
                missing += 1
                continue
            w_rss += r[0]
            w_pss += r[1]
        for pid in others:
            r = smaps_rollup(pid)
            if r:
                o_rss += r[0]
                o_pss += r[1]
        return {"w_rss": w_rss / 1024, "w_pss": w_pss / 1024, "o_rss": o_rss / 1024,
                "o_pss": o_pss / 1024, "others": len(others), "missing": missing}

    def settled_memory(self, m: int, workers: set[int], cap: float = 10.0) -> tuple[dict, bool]:
        """Sample every 250 ms until the total PSS moved by < 0.5 % (or 0.5 MiB) over the last
        three samples, or the cap passes."""
        hist: list[dict] = []

        def steady():
            hist.append(self.memory(m, workers))
            if len(hist) < 3:
                return None
            tot = [h["w_pss"] + h["o_pss"] for h in hist[-3:]]
            return (max(tot) - min(tot)) <= max(0.5, 0.005 * max(tot))

        ok = wait_until(steady, cap, 0.25)
        return hist[-1], bool(ok)

    def respawn_once(self, p, port: int, workers: set[int]) -> dict:
        """kill -9 the lowest worker pid; returns {"answered": s, "forked": s, "pid", "failed"}
        (times from the kill; None when not seen within the cap)."""
        victim = sorted(workers)[0]
        poll = Client(port, "/pid", threads=4, interval=0.002, max_requests=500_000,
                      max_seconds=self.respawn_cap + 5, timeout=2.0, close_wait=0.0).start()
        t_fork = None
        try:
            if not wait_until(lambda: poll.count() >= 20, 5.0, 0.002):
                raise StepFailed("the /pid poller got no answers before the kill")
            kids0 = children(p.pid)
            t_kill = now()
            os.kill(victim, signal.SIGKILL)

            def check():
                nonlocal t_fork
                if t_fork is None and children(p.pid) - kids0:
                    t_fork = now()  # a new child of the master (procman --preload: once adopted)
                if p.poll() is not None:
                    return "exited"
                return poll.new_pids(workers)

            new = wait_until(check, self.respawn_cap, 0.001)
        finally:
            poll.stop()
        bad, total, kinds = poll.failures()
        if new == "exited":
            raise StepFailed(f"master exited ({p.returncode}) after the kill")
        out = {"answered": None, "pid": None, "failed": f"{bad}/{total} ({kinds})",
               "forked": None if t_fork is None else t_fork - t_kill}
        if new:
            pid, t = min(new.items(), key=lambda kv: kv[1])
            out["answered"], out["pid"] = t - t_kill, pid
        return out

    def reload(self, p, port: int, n: int, old: set[int]) -> dict:
        load = Client(port, "/pid", threads=4, interval=0.0, max_requests=1_000_000,
                      max_seconds=self.reload_cap + 10, timeout=2.0, close_wait=0.0).start()
        try:
            if not wait_until(lambda: load.count() >= 50, 5.0, 0.002):
                raise StepFailed("the load loop got no answers before HUP")
            t_hup = now()
            os.kill(p.pid, signal.SIGHUP)
            t_old_gone = t_new_all = None
            end = t_hup + self.reload_cap
            while now() < end and (t_old_gone is None or t_new_all is None) and p.poll() is None:
                t = now()
                if t_old_gone is None and not any(alive(x) for x in old):
                    t_old_gone = t
                if t_new_all is None:
                    new = load.new_pids(old)
                    if len(new) >= n:
                        t_new_all = sorted(new.values())[n - 1]
                time.sleep(0.005)  # pacing of the observer
            # a short tail to catch late failures (bounded; the loop is the measurement)
            tail_end = now() + 0.5
            while now() < tail_end and p.poll() is None:
                time.sleep(0.05)
        finally:
            load.stop()
        bad, total, kinds = load.failures()
        out = {"failed": bad, "failed_txt": f"{bad}/{total} ({kinds})",
               "survived": p.poll() is None}
        if t_old_gone is not None and t_new_all is not None:
            out["time"] = max(t_old_gone, t_new_all) - t_hup
            out["new"] = set(load.new_pids(old))
        else:
            out["time"] = None
            why = []
            if t_old_gone is None:
                left = sorted(x for x in old if alive(x))
                with load.lock:
                    last = {x: load.last_seen.get(x) for x in left}
                ans = [f"{x} (last answered /pid {last[x] - t_hup:.1f} s after HUP)" if last[x] and
                       last[x] > t_hup else f"{x}" for x in left]
                kids = children(p.pid)
                why.append(f"{len(left)} of {n} old workers still running {self.reload_cap:.0f} s after HUP:"
                           f" {', '.join(ans)}; the master has {len(kids)} live children")
            if t_new_all is None:
                why.append(f"only {len(load.new_pids(old))} of {n} new pids answered within"
                           f" {self.reload_cap:.0f} s")
            out["why"] = "; ".join(why)
        return out

    def stop(self, p) -> dict:
        t = now()
        sid = p.pid
        try:
            os.kill(p.pid, signal.SIGTERM)
        except OSError:
            pass
        try:
            code = p.wait(timeout=self.term_cap)
            took = now() - t
        except subprocess.TimeoutExpired:
            code, took = None, None
        left = wait_until(lambda: not session_members(sid), 3.0, 0.05)
        return {"code": code, "took": took,
                "leftover": 0 if left else len(session_members(sid))}

    def instance(self, server: str, n: int, rnd: int) -> None:
        tag = f"w{n}"
        rec = lambda k, v: self.record(server, f"{k}_{tag}", v, rnd)  # noqa: E731
        log(f"round {rnd + 1}/{self.rounds}: {TITLES[server]} N={n}")
        try:
            p, port, t0, logp = self.start(server, n)
        except Exception as e:
            self.fail(server, n, rnd, "start", str(e))
            return
        try:
            # 1. start-up
            # 4 threads, a short connection every 3 ms each, not waiting for the server's close
            c, _, t_all = common.wait_workers(p, port, n, "/pid", self.startup_cap, threads=4,
                                              interval=0.003, close_wait=0.0)
            if t_all is None:
                why = (f"exited with {p.returncode}" if p.poll() is not None
                       else f"{len(c.pids())} of {n} workers answered within {self.startup_cap:.0f} s")
                self.fail(server, n, rnd, "start-up", f"{why}: {self.log_tail(logp)}")
                return
            seen = c.pids()
            rec("startup", t_all - t0)
            rec("startup_first", c.first_ok - t0)
            workers = {x for x in seen if alive(x)}
            if len(workers) != n:
                self.fail(server, n, rnd, "start-up", f"{len(seen)} pids answered but only {len(workers)}"
                          " are alive")
                return
            # 2. memory
            mem, ok = self.settled_memory(p.pid, workers)
            for k in ("w_rss", "w_pss", "o_rss", "o_pss"):
                rec(k, mem[k])
            rec("t_pss", mem["w_pss"] + mem["o_pss"])
            rec("t_rss", mem["w_rss"] + mem["o_rss"])
            rec("others", mem["others"])
            if not ok:
                self.fail(server, n, rnd, "memory", "did not settle within 10 s (last sample used)")
            # 3. respawn, in steady state: kills start once every worker has been answering for
            # STEADY s (procman counts a worker that dies within 1 s of becoming ready, before
            # any worker was up 1 s, as a failed boot). A wait for a time, not for an event;
            # p.wait returns early if the master dies.
            try:
                p.wait(timeout=max(0.0, t_all + STEADY - now()))
                raise StepFailed(f"master exited ({p.returncode}) before the respawn step")
            except subprocess.TimeoutExpired:
                pass
            times, forks = [], []
            for k in range(self.kills):
                if p.poll() is not None:
                    raise StepFailed(f"master exited ({p.returncode})")
                r = self.respawn_once(p, port, workers)
                self.sample(server, f"respawn_{tag}", r["answered"])
                self.sample(server, f"respawn_fork_{tag}", r["forked"])
                self.sample(server, f"respawn_failed_{tag}", r["failed"])
                if r["forked"] is not None:
                    forks.append(r["forked"])
                if r["answered"] is None:
                    self.fail(server, n, rnd, f"respawn #{k + 1}",
                              f"no new pid answered within {self.respawn_cap:.0f} s: {self.log_tail(logp)}")
                    break
                times.append(r["answered"])
                victim = sorted(workers)[0]
                workers = (workers - {victim}) | {r["pid"]}
            if times:
                rec("respawn", statistics.median(times))
                rec("respawn_max", max(times))
            if forks:
                rec("respawn_fork", statistics.median(forks))
            # the current workers, checked: each is alive
            workers = {x for x in workers if alive(x)}
            if len(workers) != n:
                raise StepFailed(f"after the respawns {len(workers)} of the {n} known workers are alive")
            # 4. reload
            r = self.reload(p, port, n, workers)
            rec("reload_failed", r["failed"])
            self.sample(server, f"reload_failed_txt_{tag}", r["failed_txt"])
            if not r["survived"]:
                raise StepFailed(f"master exited ({p.returncode}) on HUP: {self.log_tail(logp)}")
            if r["time"] is None:
                done = "'Reload done' logged" if "Reload done" in (_read(logp) or "") else \
                    "no 'Reload done' in the log"
                self.fail(server, n, rnd, "reload", f"{r['why']}; {done}"
                          if server.startswith("procman") else r["why"])
                rec("reload", f"not complete in {self.reload_cap:.0f} s")
            else:
                rec("reload", r["time"])
            # 5. stop
            s = self.stop(p)
            rec("stop_code", s["code"])
            rec("stop_took", s["took"])
            rec("stop_leftover", s["leftover"])
            if s["code"] not in (0,) or s["leftover"]:
                self.fail(server, n, rnd, "stop (SIGTERM)",
                          f"exit code {s['code']}, {s['leftover']} processes left: {self.log_tail(logp)}")
        except StepFailed as e:
            self.fail(server, n, rnd, "run", f"{e}")
        except Exception as e:
            self.fail(server, n, rnd, "run", f"{type(e).__name__}: {e} | log: {self.log_tail(logp)}")
        finally:
            REG.kill_tree(p)
            self.scan_log(server, n, rnd, logp)

    LOG_BAD = re.compile(r"\[(WARN|WARNING|ERROR|CRITICAL)\]|Traceback|panicked|ERROR:|WARNING:")

    def scan_log(self, server: str, n: int, rnd: int, logp: str) -> None:
        """Warnings and errors in a server's log are worth reading (procman misbehaviour)."""
        raw = _read(logp) or ""
        bad = [x.strip() for x in raw.splitlines()[1:] if self.LOG_BAD.search(x)]
        # our own kill -9: gunicorn "Worker (pid:N) was sent SIGKILL!", procman "exited: killed by
        # SIGKILL (perhaps out of memory?); respawning" are expected
        bad = [x for x in bad if "was sent SIGKILL" not in x
               and not re.search(r"exited: killed by SIGKILL \(perhaps out of memory\?\); respawning$", x)]
        if server.startswith("procman"):
            # every worker the master booted should be reported ready (sd_notify READY=1)
            booted = re.findall(r"Booting worker \d+ with pid (\d+)", raw)
            ready = set(re.findall(r"Worker (\d+) \(slot \d+\) ready in", raw))
            never = [x for x in booted if x not in ready]
            if never:
                bad.append(f"{len(never)} of {len(booted)} workers booted but never reported ready"
                           f" (pids {', '.join(never)})")
            if not re.search(r"All \d+ workers ready", raw):
                bad.append("no 'All N workers ready' line")
        if bad:
            name = os.path.relpath(logp, self.root)
            self.log_notes.append(f"{TITLES[server]} N={n} round {rnd + 1} ({name}): "
                                  + " | ".join(x[:200] for x in bad[:4])
                                  + (f" … (+{len(bad) - 4} more)" if len(bad) > 4 else ""))

    def run(self) -> None:
        self.t_begin = datetime.datetime.now(datetime.timezone.utc)
        self.load_begin = os.getloadavg()
        if any(s.startswith("procman") for s in self.servers):
            stale = stale_sources(self.root, self.procman_src, examples=False)
            if stale:
                log(f"WARNING: target/release/procman is older than {stale}")
            self.pin_procman()
        self.versions = versions(self)  # while the pinned copy exists
        for rnd in range(self.rounds):
            for n in self.ns:
                for s in self.servers:
                    self.instance(s, n, rnd)
        self.t_end = datetime.datetime.now(datetime.timezone.utc)
        self.load_end = os.getloadavg()


# --------------------------------------------------------------------------- report


def fmt(v: float, unit: str) -> str:
    if unit == "ms":
        return f"{v * 1000:.0f}" if v * 1000 >= 10 else f"{v * 1000:.1f}"
    if unit == "s":
        return f"{v:.2f}"
    if unit == "MiB":
        return f"{v:.0f}" if v >= 10 else f"{v:.1f}"
    return f"{v:g}"


def cell(b: Bench, server: str, key: str, unit: str, ratio: bool = True) -> str:
    vals = b.results[server].get(key)
    v = nums(vals)
    if not v:
        why = sorted({x for x in (vals or []) if isinstance(x, str)})
        k = sum(1 for x in (vals or []) if isinstance(x, str))
        return f"n/a ({'; '.join(why)}: {k}/{b.rounds} rounds)" if why else "n/a"
    m = statistics.median(v)
    out = fmt(m, unit)
    if len(v) > 1:
        out += f" [{fmt(min(v), unit)}–{fmt(max(v), unit)}]"
    if len(v) < b.rounds:
        out += f" ({len(v)}/{b.rounds} rounds)"
    if ratio and server != BASE and BASE in b.results:
        base = med(b.results[BASE].get(key))
        if base:
            out += f" (×{m / base:.2f})"
    return out


def render_table(b: Bench) -> str:
    rows = []
    for n in b.ns:
        t = f"w{n}"
        rows += [
            (f"start-up, {n} workers (s)", f"startup_{t}", "s", True),
            (f"respawn after kill -9, {n} workers (ms)", f"respawn_{t}", "ms", True),
            (f"↳ of which: new worker process appeared (ms)", f"respawn_fork_{t}", "ms", True),
            (f"reload (HUP) until all pids new, {n} workers (s)", f"reload_{t}", "s", True),
            (f"failed requests during reload, {n} workers", f"reload_failed_{t}", "n", False),
            (f"PSS of the {n} workers (MiB)", f"w_pss_{t}", "MiB", True),
            (f"RSS of the {n} workers (MiB)", f"w_rss_{t}", "MiB", True),
            (f"PSS master + zygote, {n} workers (MiB)", f"o_pss_{t}", "MiB", True),
            (f"RSS master + zygote, {n} workers (MiB)", f"o_rss_{t}", "MiB", True),
            (f"**total PSS, {n} workers (MiB)**", f"t_pss_{t}", "MiB", True),
            (f"total RSS, {n} workers (MiB)", f"t_rss_{t}", "MiB", True),
        ]
    head = "| metric | " + " | ".join(TITLES[s] for s in b.servers) + " |"
    sep = "|---|" + "---:|" * len(b.servers)
    lines = [head, sep]
    for label, key, unit, ratio in rows:
        lines.append(f"| {label} | " + " | ".join(cell(b, s, key, unit, ratio) for s in b.servers) + " |")
    return "\n".join(lines)


def targets(b: Bench) -> list[tuple[str, str]]:
    """(PASS|FAIL|n/a, text) for the three targets of the issue."""
    out = []
    P = b.results.get(BASE, {})
    G = b.results.get("gunicorn", {})
    # 1. respawn < 50 ms
    parts, verdicts = [], []
    for n in b.ns:
        m = med(P.get(f"respawn_w{n}"))
        allv = nums(b.samples.get(BASE, {}).get(f"respawn_w{n}"))
        if m is None:
            parts.append(f"N={n}: n/a")
            verdicts.append(None)
            continue
        verdicts.append(m < 0.050)
        parts.append(f"N={n}: median {m * 1000:.1f} ms (all {len(allv)} kills: "
                     f"{min(allv) * 1000:.1f}–{max(allv) * 1000:.1f} ms, "
                     f"{sum(1 for x in allv if x < 0.050)}/{len(allv)} under 50 ms)")
    out.append((verdict(verdicts), "procman --preload respawns a killed worker in under 50 ms"
                " (kill -9 → a new pid answers /pid): " + "; ".join(parts)))
    # 2. start-up of 8 workers <= 0.4x gunicorn without preload
    n8 = 8 if 8 in b.ns else max(b.ns)
    pm, gm = med(P.get(f"startup_w{n8}")), med(G.get(f"startup_w{n8}"))
    if pm is None or gm is None:
        out.append(("n/a", f"start-up of {n8} workers ≤ 0.4× gunicorn without preload: not measured"))
    else:
        out.append((verdict([pm <= 0.4 * gm]), f"start-up of {n8} workers ≤ 0.4× gunicorn without preload:"
                    f" {pm:.2f} s vs {gm:.2f} s = {pm / gm:.2f}×"))
    # 3. total PSS <= 0.6x gunicorn without preload
    parts, verdicts = [], []
    for n in b.ns:
        pm, gm = med(P.get(f"t_pss_w{n}")), med(G.get(f"t_pss_w{n}"))
        if pm is None or gm is None:
            parts.append(f"N={n}: n/a")
            verdicts.append(None)
            continue
        verdicts.append(pm <= 0.6 * gm)
        pw, gw = med(P.get(f"w_pss_w{n}")), med(G.get(f"w_pss_w{n}"))
        extra = f"; workers only {pw:.0f} vs {gw:.0f} MiB = {pw / gw:.2f}×" if pw and gw else ""
        parts.append(f"N={n}: {pm:.0f} MiB vs {gm:.0f} MiB = {pm / gm:.2f}×"
                     f" {'✓' if pm <= 0.6 * gm else '✗'}{extra}")
    out.append((verdict(verdicts), "total PSS (workers + master + zygote) ≤ 0.6× gunicorn without"
                " preload: " + "; ".join(parts)))
    return out


def verdict(vs: list) -> str:
    if not vs or any(v is None for v in vs):
        return "n/a" if not any(v is False for v in vs) else "FAIL"
    return "PASS" if all(vs) else "FAIL"


def versions(b: Bench) -> dict:
    v = common.package_versions(("gunicorn", "uvicorn-worker", "uvicorn", "fastapi", "starlette", "uvloop",
                                 "httptools"))
    v["python"] = sh([os.path.join(b.vbin, "python"), "--version"]).replace("Python ", "")
    v["procman"] = sh([b.procman, "--version"]) if os.access(b.procman, os.X_OK) else "not built"
    v["rustc"] = sh(["rustc", "--version"])
    try:
        built = datetime.datetime.fromtimestamp(os.stat(b.procman_src).st_mtime, datetime.timezone.utc)
        stale = stale_sources(b.root, b.procman_src, examples=False)
        v["build"] = f"binary built {built:%H:%M} UTC, " + (
            f"STALE: older than {stale} (BENCH_SKIP_SETUP=1 skips the build)" if stale
            else "newer than every source file")
    except OSError:
        v["build"] = "binary missing"
    state = common.git_state(b.root, ("src", "Cargo.toml", "Cargo.lock"))
    if state is None:
        v["source"] = "unknown"
    else:
        head, dirty = state
        v["source"] = f"commit {head}" + (f" plus uncommitted changes to {', '.join(dirty[:5])}" if dirty
                                          else ", src clean")
    return v


def render(b: Bench) -> str:
    mi, ver = common.machine_info(), b.versions
    dur = int((b.t_end - b.t_begin).total_seconds())
    q = " — quick mode (1 round: smoke figures)" if b.a.quick and b.rounds == 1 else ""
    order = " → ".join(TITLES[s] for s in b.servers)
    out = [
        "## Warm start (`--preload`)" + q,
        "",
        f"Generated by `{common.command_line('bench/run-preload')}` on {b.t_begin:%Y-%m-%d %H:%M} UTC (took {dur // 60} min {dur % 60} s)."
        f" {b.rounds} round{'s' if b.rounds != 1 else ''}; in each round, for N = "
        f"{' then '.join(str(n) for n in b.ns)}, the servers ran one after the other ({order}), so drift"
        " on the shared machine hits all of them alike. Compare within this run only.",
        "",
        f"- machine: {mi['nproc']} CPUs (`nproc`), {mi['cpu']}, {mi['memory']} RAM, kernel {mi['kernel']};"
        f" load average {b.load_begin[0]:.2f} at the start, {b.load_end[0]:.2f} at the end (shared with"
        " other jobs)",
        f"- procman: {ver['procman']} ({ver['rustc']}; `cargo build --release --bins --examples`, {ver['build']}; {ver['source']};"
        f" the binary was copied to a temp dir at the start of the run, sha256 {b.procman_sha}…)",
        f"- gunicorn {ver['gunicorn']} + uvicorn-worker {ver['uvicorn-worker']}; uvicorn {ver['uvicorn']};"
        f" fastapi {ver['fastapi']} (starlette {ver['starlette']}); uvloop {ver['uvloop']};"
        f" httptools {ver['httptools']}; Python {ver['python']} (bench/.venv)",
        "",
        "Commands (cwd `examples/fastapi`, app `app:main`, N = "
        + " and ".join(str(n) for n in b.ns) + ", a fresh free port on 127.0.0.1 for every start):",
        "",
        "```",
    ]
    out += [b.display_cmd(s) for s in b.servers]
    out += [
        "```",
        "",
        "Cells: median over the rounds [min–max]; `(×r)` = that server's median ÷ procman --preload's"
        " (above 1: procman --preload is faster / smaller).",
        "",
        render_table(b),
        "",
        "### Targets",
        "",
    ]
    for v, txt in targets(b):
        out.append(f"- **{v}** — {txt}")
    out += [
        "",
        "### Method",
        "",
        "- Start-up: from `exec` of the server until N distinct pids answered `GET /pid` (4 polling"
        " threads, a short connection every 3 ms each).",
        f"- Respawn: {b.kills} × per instance, `kill -9` of one worker while 4 threads poll `/pid`"
        " (short connections, 2 ms pacing); the time until a pid not seen before answers. An instance's"
        " figure is the median of its kills; the cell is the median over the rounds.",
        "- Reload: `SIGHUP` to the master while 4 threads send short connections to `/pid` without"
        " pause; the time until every old worker is gone and N new pids answered. Failed = any"
        " answer other than 200 (refused, reset, empty, timeout 2 s) counted from just before HUP until 0.5 s after the"
        " reload was complete."
        " gunicorn --preload re-forks its already imported app on HUP (it cannot load new code);"
        " procman --preload starts a new zygote that imports the app again.",
        "- Memory: after start-up, `/proc/PID/smaps_rollup` sampled every 250 ms until the total PSS"
        " stays within 0.5 % over three samples (cap 10 s); workers = the N pids that answered;"
        " master + zygote = the master and every other live descendant (gunicorn: the arbiter alone;"
        " with --preload it holds the imported app). PSS splits shared pages among the processes"
        " mapping them, so PSS sums are the memory the server really costs.",
        "- Every instance is stopped with SIGTERM (exit code and leftover processes checked), then"
        " its process groups, descendants and session are SIGKILLed by pid. Logs:"
        " `bench/out/preload-logs/`, raw figures: `bench/out/preload.json`.",
        "",
    ]
    stops = []
    for s in b.servers:
        for n in b.ns:
            codes = b.results[s].get(f"stop_code_w{n}") or []
            took = nums(b.results[s].get(f"stop_took_w{n}"))
            left = nums(b.results[s].get(f"stop_leftover_w{n}"))
            if codes:
                stops.append(f"{TITLES[s]} N={n}: exit {', '.join(str(c) for c in codes)}"
                             + (f" after {max(took):.2f} s at most" if took else "")
                             + (f", leftovers {int(sum(left))}" if left and sum(left) else ""))
    if stops:
        out += ["SIGTERM at the end of each instance: " + "; ".join(stops) + ".", ""]
    fails = []
    for s in b.servers:
        for n in b.ns:
            txt = b.samples[s].get(f"reload_failed_txt_w{n}")
            if txt:
                fails.append(f"{TITLES[s]} N={n}: {' / '.join(txt)}")
    if fails:
        out += ["Requests during reload (failed/total, per round): " + "; ".join(fails) + ".", ""]
    if b.errors:
        out += ["### Errors during the run", ""] + [f"- {e}" for e in b.errors] + [""]
    if b.log_notes:
        out += ["### Warnings and errors in the servers' logs", ""] + [f"- {x}" for x in b.log_notes] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv):
    ap = common.driver_parser("bench/run-preload", __doc__)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="1 round")
    ap.add_argument("--workers", default="4,8", help="worker counts (default 4,8)")
    ap.add_argument("--kills", type=int, default=3, help="kill -9 respawns per instance (default 3)")
    ap.add_argument("--only", default=",".join(SERVERS), help="subset of " + ",".join(SERVERS))
    ap.add_argument("--out", default=None, help="markdown output (default bench/out/preload.md)")
    a = ap.parse_args(argv)
    a.workers = [int(x) for x in a.workers.split(",") if x.strip()]
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in a.only if s not in SERVERS]
    if bad or not a.only:
        ap.error(f"--only: unknown {bad}; choose from {', '.join(SERVERS)}")
    if not a.workers or min(a.workers) < 1:
        ap.error("--workers: positive integers")
    if a.kills < 1:
        ap.error("--kills must be >= 1")
    if a.rounds is not None and a.rounds < 1:
        ap.error("--rounds must be >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    common.interrupt_on_signals()
    b = Bench(a)
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted: stopping every process started")
        return 130
    finally:
        REG.cleanup_all()
        shutil.rmtree(b.tmp, ignore_errors=True)
    report = render(b)
    out_md = os.path.abspath(a.out or os.path.join(b.out_dir, "preload.md"))
    with open(out_md, "w") as f:
        f.write(report + "\n")
    with open(os.path.join(b.out_dir, "preload.json"), "w") as f:
        json.dump({"results": b.results, "samples": b.samples, "errors": b.errors,
                   "log_notes": b.log_notes, "workers": b.ns, "rounds": b.rounds,
                   "kills": b.kills}, f, indent=1, default=str)
    print(report)
    print(f"\nwritten: {os.path.relpath(out_md, b.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
