#!/usr/bin/env python3
"""procman benchmark driver (stdlib only, Python 3.11).

Runs one FastAPI app under gunicorn + UvicornWorker, uvicorn --workers, granian --interface
asgi, procman (default), procman --preload and (when the binary has it) procman --no-zygote,
interleaved round by round, and measures start-up (as the clients see it and as each server
logs it), memory (master RSS, total PSS, per-worker USS), idle cost, throughput, respawn,
reload, shutdown; a worker-count curve (1..16 workers: start-up and memory); optionally
boot failure and a blocked event loop; plus, procman only, the spread of requests over the
workers with one shared socket vs --reuse-port, and the command worker class (spawn time
and master RSS for 1..256 workers). The Summary checks issue 15's targets (procman default
÷ gunicorn) and compares procman with granian.

Start it through bench/run, which installs wrk, the pinned venv and builds procman.

Rules kept here: every load loop is bounded in count and time and targets 127.0.0.1;
every process started is stopped by pid (its process group, its descendants and its
session), also on exceptions and Ctrl-C; each server gets a fresh free port; waits
are polls with deadlines, never sleeps used as synchronisation.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The order is the interleaving order within a round. "procman" is procman's default (the
# reference of every ratio in the tables); procman-nozygote only exists when the binary
# has --no-zygote (checked at run time from `procman --help`).
SERVERS = ("gunicorn", "uvicorn", "granian", "procman", "procman-preload", "procman-nozygote")
PROCMAN_VARIANTS = ("procman", "procman-preload", "procman-nozygote")
SCENARIOS = ("main", "curve", "bootfail", "blocked", "spread", "command")
# What a plain `bench/run` runs (the full report must stay well under 25 min on 2 cores);
# the others are asked for with --scenarios.
DEFAULT_SCENARIOS = ("main", "curve", "command")
TITLES = {
    "procman": "procman (default)",
    "procman-preload": "procman --preload",
    "procman-nozygote": "procman --no-zygote",
    "gunicorn": "gunicorn + UvicornWorker",
    "uvicorn": "uvicorn --workers",
    "granian": "granian --interface asgi",
}
# Servers without a heartbeat timeout for a blocked event loop (scenario 9 shows –).
NO_TIMEOUT = ("uvicorn", "granian")


def is_procman(server: str) -> bool:
    return server in PROCMAN_VARIANTS
now = time.monotonic
LOG_TAG = "bench"  # bench/preload.py, which imports these helpers, sets its own


def log(msg: str) -> None:
    print(f"[{LOG_TAG}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc


def _read(path: str) -> str | None:
    try:
        with open(path, "r", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def proc_stat(pid: int) -> dict | None:
    """Fields of /proc/PID/stat that we use (None if the process is gone)."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    # rest[0] is field 3 (state)
    return {
        "state": rest[0],
        "ppid": int(rest[1]),
        "pgrp": int(rest[2]),
        "session": int(rest[3]),
        "utime": int(rest[11]),
        "stime": int(rest[12]),
        "cutime": int(rest[13]),
        "cstime": int(rest[14]),
    }


def alive(pid: int) -> bool:
    """Running (not reaped and not a zombie)."""
    st = proc_stat(pid)
    return st is not None and st["state"] not in ("Z", "X")


def exists(pid: int) -> bool:
    """Still has a /proc entry, zombie included (i.e. not yet reaped)."""
    return os.path.exists(f"/proc/{pid}")


def all_stats() -> dict[int, dict]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def descendants(root: int, stats: dict[int, dict] | None = None) -> set[int]:
    stats = stats if stats is not None else all_stats()
    kids: dict[int, list[int]] = {}
    for pid, st in stats.items():
        kids.setdefault(st["ppid"], []).append(pid)
    out, todo = set(), [root]
    while todo:
        for c in kids.get(todo.pop(), ()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def live_descendants(root: int) -> set[int]:
    stats = all_stats()
    return {p for p in descendants(root, stats) if stats[p]["state"] not in ("Z", "X")}


def session_members(sid: int, stats: dict[int, dict] | None = None) -> set[int]:
    stats = stats if stats is not None else all_stats()
    return {p for p, st in stats.items() if st["session"] == sid and st["state"] not in ("Z", "X")}


def status_field(pid: int, key: str) -> int | None:
    raw = _read(f"/proc/{pid}/status")
    if raw is None:
        return None
    for line in raw.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def smaps_rollup(pid: int) -> tuple[int, int] | None:
    """(Rss kB, Pss kB) of one process."""
    raw = _read(f"/proc/{pid}/smaps_rollup")
    if raw is None:
        return None
    rss = pss = None
    for line in raw.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    if rss is None or pss is None:
        return None
    return rss, pss


def uss_kb(pid: int) -> int | None:
    """USS of one process (kB): Private_Clean + Private_Dirty from smaps_rollup, the memory
    that would be freed if it exited."""
    raw = _read(f"/proc/{pid}/smaps_rollup")
    if raw is None:
        return None
    tot, seen = 0, 0
    for line in raw.splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            tot += int(line.split()[1])
            seen += 1
    return tot if seen == 2 else None


def cpu_ticks(pid: int) -> int | None:
    st = proc_stat(pid)
    return None if st is None else st["utime"] + st["stime"]


def task_totals(pid: int) -> tuple[int, int]:
    """(on-CPU ns from schedstat, voluntary context switches), summed over all threads."""
    ns = vol = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        raw = _read(f"/proc/{pid}/task/{tid}/schedstat")
        if raw:
            ns += int(raw.split()[0])
        v = status_field_path(f"/proc/{pid}/task/{tid}/status", "voluntary_ctxt_switches")
        vol += v or 0
    return ns, vol


def status_field_path(path: str, key: str) -> int | None:
    raw = _read(path)
    if raw is None:
        return None
    for line in raw.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def socket_inodes_of(pid: int) -> set[int]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _hexaddr(port: int) -> str:
    return f"0100007F:{port:04X}"


def accepted_conn(server_port: int, client_port: int) -> tuple[int, int] | None:
    """Server side of a loopback connection in /proc/net/tcp: (inode, rx_queue).

    inode is 0 while the connection still sits in the accept queue; a non-zero
    inode means a worker accepted it, rx_queue 0 means it also read the request."""
    raw = _read("/proc/net/tcp")
    if raw is None:
        return None
    local, remote = _hexaddr(server_port), _hexaddr(client_port)
    for line in raw.splitlines()[1:]:
        f = line.split()
        if len(f) > 9 and f[1] == local and f[2] == remote:
            rxq = int(f[4].split(":")[1], 16)
            return int(f[9]), rxq
    return None


# --------------------------------------------------------------------------- processes


class Registry:
    """Every process the bench starts, so that all of them can be stopped by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def spawn(self, argv: list[str], cwd: str, env: dict, log_path: str) -> subprocess.Popen:
        logf = open(log_path, "ab")
        try:
            p = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            logf.close()
        with self.lock:
            self.procs.append(p)
        return p

    def _targets(self, p: subprocess.Popen) -> set[int]:
        stats = all_stats()
        pids = descendants(p.pid, stats) | session_members(p.pid, stats)
        if p.poll() is None:
            pids.add(p.pid)
        return pids

    def kill_tree(self, p: subprocess.Popen, deadline_s: float = 5.0) -> int:
        """SIGKILL the master, its process group, its session and every descendant
        (workers lead their own process groups, so each group is killed too).
        Returns how many processes (other than the master) were still alive."""
        me, mygrp = os.getpid(), os.getpgrp()
        pids = self._targets(p)
        leftover = len(pids - {p.pid})
        end = now() + deadline_s
        while pids and now() < end:
            groups = set()
            for pid in pids:
                st = proc_stat(pid)
                if st is not None:
                    groups.add(st["pgrp"])
            for g in groups:
                if g > 1 and g != mygrp:
                    try:
                        os.killpg(g, signal.SIGKILL)
                    except OSError:
                        pass
            for pid in pids:
                if pid not in (me, 1):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            try:
                p.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
            pids = {x for x in self._targets(p) if alive(x)}
        try:
            p.wait(timeout=max(0.1, end - now()))
        except subprocess.TimeoutExpired:
            pass
        return leftover

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        """SIGTERM the master, wait for it up to `grace`, then kill everything left."""
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill_tree(p)

    def cleanup_all(self) -> None:
        with self.lock:
            procs = list(self.procs)
        for p in procs:
            try:
                self.kill_tree(p, deadline_s=3.0)
            except Exception as e:  # keep going: the others must still die
                log(f"cleanup of pid {p.pid} failed: {e}")


REG = Registry()


def procman_has_flag(binary: str, flag: str) -> bool:
    """Whether `procman --help` mentions flag (variants exist only in some builds)."""
    try:
        cp = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", cp.stdout + cp.stderr) is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, interval: float = 0.01):
    """Poll pred() until it returns something truthy or the deadline passes."""
    end = now() + timeout
    while True:
        v = pred()
        if v:
            return v
        if now() >= end:
            return None
        time.sleep(interval)


# --------------------------------------------------------------------------- HTTP


class Resp:
    __slots__ = ("kind", "status", "body", "elapsed", "client_port")

    def __init__(self, kind, status=None, body=b"", elapsed=0.0, client_port=None):
        self.kind, self.status, self.body = kind, status, body
        self.elapsed, self.client_port = elapsed, client_port

    @property
    def pid(self) -> int | None:
        m = re.search(rb"\d+", self.body or b"")
        return int(m.group()) if m else None

    def describe(self) -> str:
        if self.kind == "ok":
            return f"ok ({self.elapsed:.3f})"
        return f"{self.kind} ({self.elapsed:.3f})"


def http_get(port: int, path: str, timeout: float = 2.0, on_sent=None, close_wait: float = 0.2) -> Resp:
    """One short connection: GET, read the response, let the server close first (waiting up
    to close_wait s for it; 0: return as soon as the response is complete).

    kind: ok (200) | non200 | refused | reset | empty | partial | timeout | error:<errno>"""
    t0 = now()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    cport = None
    try:
        s.settimeout(timeout)
        s.connect((HOST, port))
        cport = s.getsockname()[1]
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
        if on_sent is not None:
            on_sent(cport)
        buf = b""
        head_end = -1
        clen = None
        while True:
            if head_end >= 0 and clen is not None and len(buf) - head_end - 4 >= clen:
                # complete; give the server a moment to close first (no TIME_WAIT here)
                if close_wait > 0:
                    s.settimeout(close_wait)
                    try:
                        s.recv(1)
                    except OSError:
                        pass
                break
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if head_end < 0:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0:
                    m = re.search(rb"(?im)^content-length:\s*(\d+)", buf[:head_end])
                    clen = int(m.group(1)) if m else None
        el = now() - t0
        if not buf:
            return Resp("empty", elapsed=el, client_port=cport)
        m = re.match(rb"HTTP/1\.[01] (\d{3})", buf)
        if not m or head_end < 0:
            return Resp("partial", elapsed=el, client_port=cport)
        status = int(m.group(1))
        body = buf[head_end + 4:]
        return Resp("ok" if status == 200 else "non200", status, body, el, cport)
    except ConnectionRefusedError:
        return Resp("refused", elapsed=now() - t0, client_port=cport)
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return Resp("reset", elapsed=now() - t0, client_port=cport)
    except (socket.timeout, TimeoutError):
        return Resp("timeout", elapsed=now() - t0, client_port=cport)
    except OSError as e:
        return Resp(f"error:{errno.errorcode.get(e.errno, e.errno)}", elapsed=now() - t0, client_port=cport)
    finally:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        s.close()


class Client:
    """A bounded loop of short connections from `threads` threads.

    Used both as the load during respawn/reload and as the pid poller at start-up.
    Bounded by max_requests (all threads together) and max_seconds; `interval` paces each
    thread (a poller); close_wait goes to http_get."""

    def __init__(self, port: int, path: str = "/pid", threads: int = 4, interval: float = 0.0,
                 max_requests: int = 200_000, max_seconds: float = 30.0, timeout: float = 2.0,
                 close_wait: float = 0.2):
        self.port, self.path, self.nthreads = port, path, threads
        self.interval, self.max_requests, self.max_seconds = interval, max_requests, max_seconds
        self.timeout, self.close_wait = timeout, close_wait
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.total = 0
        self.kinds: dict[str, int] = {}
        self.first_seen: dict[int, float] = {}
        self.last_seen: dict[int, float] = {}
        self.per_pid: dict[int, int] = {}  # 200 responses per answering pid
        self.first_ok: float | None = None
        self.fail_times: list[tuple[float, str]] = []
        self.threads: list[threading.Thread] = []
        self.t_start = 0.0

    def start(self) -> "Client":
        self.t_start = now()
        for i in range(self.nthreads):
            t = threading.Thread(target=self._run, name=f"client-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _run(self) -> None:
        end = self.t_start + self.max_seconds
        while not self.stop_ev.is_set() and now() < end:
            with self.lock:
                if self.total >= self.max_requests:
                    return
                self.total += 1
            r = http_get(self.port, self.path, timeout=self.timeout, close_wait=self.close_wait)
            t = now()
            with self.lock:
                self.kinds[r.kind] = self.kinds.get(r.kind, 0) + 1
                if r.kind == "ok":
                    if self.first_ok is None:
                        self.first_ok = t
                    pid = r.pid
                    if pid is not None:
                        self.per_pid[pid] = self.per_pid.get(pid, 0) + 1
                        if pid not in self.first_seen:
                            self.first_seen[pid] = t
                        self.last_seen[pid] = t
                else:
                    self.fail_times.append((t, r.kind))
            if self.interval:
                # pacing of a poller, not synchronisation: refused connections would spin
                self.stop_ev.wait(self.interval)

    def stop(self) -> None:
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=self.timeout + 1.0)

    def join(self) -> None:
        """Wait for the loop to end by itself (max_requests or max_seconds reached)."""
        end = self.t_start + self.max_seconds + self.timeout + 1.0
        for t in self.threads:
            t.join(timeout=max(0.0, end - now()))
        self.stop()

    def count(self) -> int:
        """Requests started so far."""
        with self.lock:
            return self.total

    def pids(self) -> dict[int, float]:
        """The pids that answered: {pid: time of its first answer}."""
        with self.lock:
            return dict(self.first_seen)

    def new_pids(self, old: set[int]) -> dict[int, float]:
        with self.lock:
            return {p: t for p, t in self.first_seen.items() if p not in old}

    def failures(self) -> tuple[int, int, str]:
        with self.lock:
            bad = {k: v for k, v in self.kinds.items() if k != "ok"}
            total = sum(self.kinds.values())
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(bad.items())) or "none"
        return sum(bad.values()), total, kinds


def wait_workers(p, port: int, n: int, path: str, cap: float, threads: int = 2, interval: float = 0.005,
                 close_wait: float = 0.2):
    """Poll `path` with short connections (`threads` threads, one every `interval` s each)
    until n distinct pids answered, p exited or `cap` passed.
    Returns (client, t_first_ok, t_all) — times are absolute (monotonic), t_all None unless
    n pids answered."""
    c = Client(port, path, threads=threads, interval=interval, max_requests=10**7,
               max_seconds=cap, timeout=2.0, close_wait=close_wait).start()
    try:
        def done():
            if p.poll() is not None:
                return "exited"
            with c.lock:
                if len(c.first_seen) >= n:
                    return "ok"
            return None

        state = wait_until(done, cap, 0.002)
    finally:
        c.stop()
    if state != "ok":
        return c, c.first_ok, None
    t_all = sorted(c.first_seen.values())[n - 1]
    return c, c.first_ok, t_all


# Readiness as each server itself reports it, from its own log: (regex, what it means).
# A match's group 1, when there is one, is a worker id (a pid or a slot) counted once.
# procman (with --log-format json) says when a worker is ready and when all of the first
# generation are ("all-ready"); gunicorn's UvicornWorker and uvicorn's workers each log
# uvicorn's "Application startup complete." once their lifespan startup ran (the socket is
# already inherited, so that is "ready to accept"); granian logs "Started worker-N" per worker.
SELF_READY = {
    "procman": (r'"event":"ready"[^\n]*?"worker":(\d+)', 'procman\'s `"event":"ready"` log lines'),
    "gunicorn": (r"\[(\d+)\] \[INFO\] Application startup complete", "each worker's \"Application startup complete\""),
    "uvicorn": (r"Application startup complete", "each worker's \"Application startup complete\""
                " (uvicorn's lines carry no pid: counted)"),
    "granian": (r"Started worker-(\d+)", "each \"Started worker-N\" line"),
}
PROCMAN_ALL_READY = '"event":"all-ready"'


def self_ready_spec(server: str) -> tuple[str, str]:
    return SELF_READY["procman" if is_procman(server) else server]


class LogReadiness:
    """Follows a server's log file from a thread and notes (monotonic) when its n-th worker
    said it is ready, and, for procman, when it logged all-ready. Polls every 5 ms: the
    figures are "when the line appeared in the log", within that resolution."""

    def __init__(self, server: str, logp: str, n: int, cap: float):
        self.server, self.logp, self.n, self.cap = server, logp, n, cap
        self.pattern = re.compile(self_ready_spec(server)[0])
        self.t_first = self.t_nth = self.t_all_ready = None
        self.ids: set[str] = set()
        self.count = 0
        self.stop_ev = threading.Event()
        self.th = threading.Thread(target=self._run, name="log-readiness", daemon=True)

    def start(self) -> "LogReadiness":
        self.th.start()
        return self

    def _done(self) -> bool:
        if self.t_nth is None:
            return False
        return not is_procman(self.server) or self.t_all_ready is not None

    def _run(self) -> None:
        end = now() + self.cap
        pos, buf = 0, ""
        while not self.stop_ev.is_set() and now() < end and not self._done():
            try:
                with open(self.logp, "r", errors="replace") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
            except OSError:
                chunk = ""
            t = now()
            if chunk:
                buf += chunk
                lines, buf = buf.rsplit("\n", 1) if "\n" in buf else ("", buf)
                for line in lines.splitlines():
                    m = self.pattern.search(line)
                    if m:
                        key = m.group(1) if m.groups() and m.group(1) else f"#{self.count}"
                        if key not in self.ids:
                            self.ids.add(key)
                            self.count += 1
                            if self.t_first is None:
                                self.t_first = t
                            if self.count >= self.n and self.t_nth is None:
                                self.t_nth = t
                    if PROCMAN_ALL_READY in line and self.t_all_ready is None:
                        self.t_all_ready = t
            self.stop_ev.wait(0.005)

    def finish(self, grace: float) -> None:
        """Give the log up to `grace` s more to say it (it may lag the HTTP poll), then stop."""
        self.th.join(timeout=grace)
        self.stop_ev.set()
        self.th.join(timeout=1.0)


def in_flight(port: int, cport_box: list, workers: set[int], timeout: float = 5.0) -> int | None:
    """Wait until the request sent from cport_box[0] was accepted and read by a worker;
    return that worker's pid (or -1 if accepted but the holder was not found)."""

    def check():
        if not cport_box:
            return None
        c = accepted_conn(port, cport_box[0])
        if c is None or c[0] == 0 or c[1] != 0:
            return None
        inode = c[0]
        for w in workers:
            if inode in socket_inodes_of(w):
                return w
        return -1

    return wait_until(check, timeout, 0.005)


def conns_per_worker(port: int, workers: set[int]) -> dict[int, int]:
    """Established server-side connections on `port` (from /proc/net/tcp) that each worker
    holds: for keep-alive load, the connections a worker accepted are the requests it serves."""
    raw = _read("/proc/net/tcp") or ""
    local = _hexaddr(port)
    inodes = set()
    for line in raw.splitlines()[1:]:
        f = line.split()
        if len(f) > 9 and f[1] == local and f[3] == "01" and f[9] != "0":
            inodes.add(int(f[9]))
    return {w: len(inodes & socket_inodes_of(w)) for w in workers}


def spread_stats(per_pid: dict[int, int], workers: set[int]) -> dict:
    """Requests per worker, workers that answered nothing included (as 0).

    cv = population stdev / mean of the per-worker counts (0 = perfectly even);
    shares are of all 200 responses."""
    counts = {w: 0 for w in workers}
    for pid, k in per_pid.items():
        counts[pid] = counts.get(pid, 0) + k
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    vals = [v for _, v in ordered]
    total = sum(vals)
    mean = total / len(vals) if vals else 0
    return {
        "per_pid": {str(k): v for k, v in ordered},
        "sorted": vals,
        "total": total,
        "pids": len(vals),
        "max_share": round(vals[0] / total, 4) if total else None,
        "min_share": round(vals[-1] / total, 4) if total else None,
        "cv": round(statistics.pstdev(vals) / mean, 4) if mean else None,
    }


# The wrk script of the spread scenario (written to bench/out/spread.lua): every wrk thread
# has its own Lua state, so each one tallies the bodies (worker pids) it got, and done()
# (run in the main state) reads every thread's table through thread:get().
SPREAD_LUA = """\
-- written by bench/bench.py (load spread): tallies response bodies (worker pids) per wrk thread
local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  counts = {}
  other = 0
end

function response(status, headers, body)
  local pid = body and body:match("%d+")
  if status == 200 and pid then
    counts[pid] = (counts[pid] or 0) + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    local id = t:get("id")
    for pid, n in pairs(t:get("counts")) do
      io.write(string.format("SPREAD thread=%d pid=%s count=%d\\n", id, pid, n))
    end
    io.write(string.format("SPREAD thread=%d other=%d\\n", id, t:get("other")))
  end
end
"""

SPREAD_CLASSES = (("fastapi", "FastAPI app", "/pid"), ("command", "command class (hello)", "/"))
SPREAD_MODES = (("shared", "shared socket"), ("reuse", "`--reuse-port`"))
SPREAD_LOADS = (("short", "short connections, 4 threads"), ("wrk", "wrk -t2 -c64"))


# --------------------------------------------------------------------------- servers


ENV_DROP = ("VIRTUAL_ENV", "WEB_CONCURRENCY", "PORT", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
            "NOTIFY_SOCKET", "PYTHONPATH", "PYTHONHOME")


def server_env(vbin: str, drop: tuple[str, ...] = ()) -> dict:
    """The servers' environment: ours without PROCMAN_*, ENV_DROP and `drop`, with the venv's
    bin first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("PROCMAN_") or k in ENV_DROP or k in drop)}
    env["PATH"] = vbin + os.pathsep + env.get("PATH", "")
    return env


class Bench:
    def __init__(self, args):
        self.a = args
        self.root = os.path.abspath(args.root)
        self.bench_dir = os.path.join(self.root, "bench")
        self.venv = os.path.join(self.bench_dir, ".venv")
        self.vbin = os.path.join(self.venv, "bin")
        self.out_dir = os.path.join(self.bench_dir, "out")
        self.log_dir = os.path.join(self.out_dir, "logs")
        shutil.rmtree(self.log_dir, ignore_errors=True)  # logs of this run only
        os.makedirs(self.log_dir, exist_ok=True)
        self.procman = os.path.join(self.root, "target", "release", "procman")
        self.hello = os.path.join(self.root, "target", "release", "examples", "hello")
        self.app_dir = os.path.abspath(args.app_dir or os.path.join(self.root, "examples", "fastapi"))
        self.app = args.app
        self.n = args.workers
        q = args.quick
        self.rounds = 1 if q and args.rounds is None else (args.rounds or 3)
        self.idle = args.idle if args.idle is not None else (3.0 if q else 10.0)
        self.wrk_d = args.wrk_duration if args.wrk_duration is not None else (3 if q else 10)
        self.startup_cap = 30.0 if q else 60.0
        self.respawn_cap = 15.0 if q else 20.0
        self.reload_cap = 20.0 if q else 30.0
        self.term_cap = 40.0
        self.bootfail_cap = 10.0 if q else 30.0
        self.block_cap = 25.0 if q else 45.0
        # load spread: (a) short connections, bounded by count and time; (b) wrk -d
        self.spread_short_n = 5000 if q else 20000
        self.spread_short_s = 3.0 if q else 5.0
        self.spread_wrk_d = 3 if q else 5
        self.has_no_zygote = procman_has_flag(self.procman, "--no-zygote")
        if "procman-nozygote" in args.only and not self.has_no_zygote and args.only_explicit:
            log(f"procman-nozygote left out: `{self.procman} --help` does not list --no-zygote")
        self.servers = [s for s in SERVERS if s in args.only
                        and (s != "procman-nozygote" or self.has_no_zygote)]
        if not self.servers:
            raise SystemExit("no server left to run (see --only)")
        self.curve_settle = 1.0 if q else 2.0
        self.results: dict[str, dict[str, list]] = {s: {} for s in self.servers}
        self.errors: list[str] = []
        self.cmd_results: dict[int, dict[str, list]] = {}
        self.spread_results: dict[str, list] = {}  # "class/load/mode" -> one dict per round
        self.migrate_req = (_read("/proc/sys/net/ipv4/tcp_migrate_req") or "?").strip()
        self.env = server_env(self.vbin)
        self.run_id = 0

    # ---- helpers

    def record(self, server: str, key: str, value, rnd: int) -> None:
        lst = self.results[server].setdefault(key, [None] * self.rounds)
        lst[rnd] = value

    def argv(self, server: str, app: str, port: int, timeout: int | None = None,
             workers: int | None = None) -> list[str]:
        n = str(workers or self.n)
        bind = f"{HOST}:{port}"
        if server == "gunicorn":
            a = [os.path.join(self.vbin, "gunicorn"), app, "-k", "uvicorn_worker.UvicornWorker",
                 "-w", n, "-b", bind]
            if timeout is not None:
                a += ["--timeout", str(timeout)]
            return a
        if server == "uvicorn":
            return [os.path.join(self.vbin, "uvicorn"), app, "--workers", n, "--host", HOST,
                    "--port", str(port), "--no-access-log"]
        if server == "granian":
            # Granian's access log is off by default. It does not replace a crashed worker
            # unless told to: without the flag the respawn scenario would only measure "never".
            return [os.path.join(self.vbin, "granian"), "--interface", "asgi", "--workers", n,
                    "--respawn-failed-workers", "--host", HOST, "--port", str(port), app]
        a = [self.procman, app, "-w", n, "-b", bind, "--no-access-log",
             "--python", os.path.join(self.vbin, "python"), "--log-format", "json"]
        if server == "procman-preload":
            a.append("--preload")
        elif server == "procman-nozygote":
            a.append("--no-zygote")
        if timeout is not None:
            a += ["-t", str(timeout)]
        return a

    def display_cmd(self, server: str, timeout: int | None = None) -> str:
        a = self.argv(server, self.app, 0, timeout)
        s = " ".join(a).replace(self.root + "/", "")
        return s.replace(f"{HOST}:0", f"{HOST}:PORT").replace("--port 0", "--port PORT")

    def start(self, server: str, tag: str, app: str | None = None, cwd: str | None = None,
              timeout: int | None = None, argv: list[str] | None = None, workers: int | None = None):
        self.run_id += 1
        port = free_port()
        argv = argv or self.argv(server, app or self.app, port, timeout, workers)
        if is_procman(server) and not os.access(argv[0], os.X_OK):
            raise RuntimeError(f"{argv[0]} not found (build failed? see bench/out/cargo-build.log)")
        logp = os.path.join(self.log_dir, f"{self.run_id:03d}-{server}-{tag}.log")
        with open(logp, "w") as f:
            f.write("$ " + " ".join(argv) + "\n")
        t0 = now()
        p = REG.spawn(argv, cwd or self.app_dir, self.env, logp)
        return p, port, t0, logp

    @staticmethod
    def worker_deaths(logp: str) -> list[str]:
        """procman's log lines about workers that exited before the master was told to stop
        (text format, or the "exited" events of --log-format json before "stopping")."""
        raw = _read(logp) or ""
        text = raw.split("] Shutting down", 1)[0]
        out = re.findall(r"\[(?:INFO|WARNING|ERROR)\] (Worker \d+ .*exited: .*)$", text, re.M)
        for line in raw.splitlines():
            if '"event":"stopping"' in line or '"event":"shutdown"' in line:
                break
            if '"event":"exited"' in line:
                try:
                    out.append(json.loads(line).get("message", line))
                except ValueError:
                    out.append(line)
        return out

    @staticmethod
    def log_tail(logp: str, n: int = 3) -> str:
        raw = _read(logp) or ""
        lines = [l.strip() for l in raw.splitlines()[1:] if l.strip()]
        return " | ".join(lines[-n:])[-300:]

    def current_workers(self, p, port: int, cap: float = 10.0) -> set[int]:
        """N distinct live worker pids that answer right now."""
        c, _, t_all = wait_workers(p, port, self.n, "/pid", cap)
        pids = {x for x in c.pids() if alive(x)}
        if len(pids) < self.n:
            raise RuntimeError(f"only {len(pids)} of {self.n} workers answer /pid")
        return pids

    # ---- scenarios

    def main_instance(self, server: str, rnd: int) -> None:
        """Start-up, memory, idle cost, wrk, respawn, reload, shutdown on one instance."""
        rec = lambda k, v: self.record(server, k, v, rnd)  # noqa: E731
        try:
            p, port, t0, logp = self.start(server, "main")
        except Exception as e:
            self.fail(server, rnd, "start-up", str(e), MAIN_KEYS)
            return
        try:
            # 1. start-up, as the clients see it and as the server's log says it
            lr = LogReadiness(server, logp, self.n, self.startup_cap).start()
            c, t_first, t_all = wait_workers(p, port, self.n, "/pid", self.startup_cap)
            lr.finish(grace=3.0)
            if t_all is None:
                code = p.poll()
                why = (f"exited with {code}" if code is not None
                       else f"{len(c.pids())} of {self.n} workers answered within {self.startup_cap:.0f} s")
                self.fail(server, rnd, "start-up", f"{why}: {self.log_tail(logp)}", MAIN_KEYS)
                return
            rec("startup_first", t_first - t0)
            rec("startup_all", t_all - t0)
            self.record_self_ready(server, rnd, lr, t0, "")
            workers = {x for x in c.pids() if alive(x)}
            steps = [
                ("idle/memory", lambda: self.idle_and_memory(server, rnd, p, workers)),  # 3. and 2.
                ("wrk", lambda: self.run_wrk(server, rnd, port)),  # 4.
                ("respawn", lambda: self.respawn(server, rnd, p, port)),  # 5.
                ("reload", lambda: self.reload(server, rnd, p, port)),  # 6.
                ("shutdown", lambda: self.shutdown(server, rnd, p, port)),  # 7.
            ]
            for i, (name, step) in enumerate(steps):
                if p.poll() is not None:
                    rest = [k for n, _ in steps[i:] for k in STEP_KEYS[n]]
                    self.fail(server, rnd, name, f"master exited ({p.returncode}) before this step: "
                              f"{self.log_tail(logp)}", rest)
                    break
                try:
                    step()
                except Exception as e:
                    self.fail(server, rnd, name, f"{type(e).__name__}: {e} | log: {self.log_tail(logp)}",
                              STEP_KEYS[name])
        finally:
            REG.stop(p, grace=5.0)

    def record_self_ready(self, server: str, rnd: int, lr: "LogReadiness", t0: float, suffix: str) -> None:
        """The server's own view of its start-up (see SELF_READY), from exec."""
        since = lambda t: round(t - t0, 3) if t is not None else "–"  # noqa: E731
        self.record(server, "self_ready_first" + suffix, since(lr.t_first), rnd)
        self.record(server, "self_ready_all" + suffix, since(lr.t_nth), rnd)
        if is_procman(server):
            self.record(server, "self_all_ready_event" + suffix, since(lr.t_all_ready), rnd)

    def fail(self, server: str, rnd: int, what: str, msg: str, keys=()) -> None:
        """Log an error and mark the keys of this round that have no value yet as n/a
        (the first one carries the message)."""
        msg = msg.replace(self.root + "/", "")
        line = f"{server} round {rnd + 1} {what}: {msg}"
        log("FAILED " + line)
        self.errors.append(line)
        if isinstance(keys, str):
            keys = [keys]
        first = True
        for k in keys:
            cur = self.results[server].get(k, [None] * self.rounds)[rnd]
            if cur is None:
                self.record(server, k, f"n/a ({msg[:70]})" if first else "n/a", rnd)
                first = False

    def idle_and_memory(self, server: str, rnd: int, p, workers: set[int]) -> None:
        rec = lambda k, v: self.record(server, k, v, rnd)  # noqa: E731
        m = p.pid
        kids0 = live_descendants(m)
        tk0, (ns0, vol0) = cpu_ticks(m), task_totals(m)
        w0 = {k: (cpu_ticks(k), task_totals(k)) for k in kids0}
        try:
            p.wait(timeout=self.idle)  # the idle window: a measurement, not a synchronisation
            raise RuntimeError(f"master exited during the idle window ({p.returncode})")
        except subprocess.TimeoutExpired:
            pass
        tk1, (ns1, vol1) = cpu_ticks(m), task_totals(m)
        rec("idle_master_cpu_sched", (ns1 - ns0) / 1e9)
        rec("idle_master_cpu_ticks", (tk1 - tk0) / CLK_TCK)
        rec("idle_master_wakeups", vol1 - vol0)
        wcpu = wvol = 0.0
        for k, (t, (ns, vol)) in w0.items():
            t1 = cpu_ticks(k)
            if t1 is None:
                continue
            ns1k, vol1k = task_totals(k)
            wcpu += (ns1k - ns) / 1e9
            wvol += vol1k - vol
        rec("idle_workers_cpu", wcpu)
        rec("idle_workers_wakeups", int(wvol))
        # memory
        kids = live_descendants(m)
        rec("mem_master_rss", (status_field(m, "VmRSS") or 0) / 1024)
        rss = pss = 0
        for pid in {m} | kids:
            r = smaps_rollup(pid)
            if r:
                rss += r[0]
                pss += r[1]
        rec("mem_total_rss", rss / 1024)
        rec("mem_total_pss", pss / 1024)
        rec("procs", 1 + len(kids))
        self.record_uss(server, rnd, p.pid, workers, kids, "")

    def record_uss(self, server: str, rnd: int, master: int, workers: set[int], kids: set[int],
                   suffix: str) -> None:
        """Per-worker USS (median over the workers that answered /pid and are still alive) and
        the PSS of the helpers: descendants that are not workers (procman's zygote)."""
        uss = [u for u in (uss_kb(w) for w in workers if w in kids) if u is not None]
        self.record(server, "mem_worker_uss" + suffix,
                    statistics.median(uss) / 1024 if uss else "n/a", rnd)
        helpers = kids - workers
        self.record(server, "mem_helpers_pss" + suffix,
                    sum((smaps_rollup(h) or (0, 0))[1] for h in helpers) / 1024, rnd)

    def run_wrk(self, server: str, rnd: int, port: int) -> None:
        rec = lambda k, v: self.record(server, k, v, rnd)  # noqa: E731
        cmd = ["wrk", "-t2", "-c64", f"-d{self.wrk_d}s", "--latency", f"http://{HOST}:{port}/pid"]
        try:
            cp = subprocess.run(cmd, capture_output=True, text=True, timeout=self.wrk_d + 30,
                                start_new_session=True)
        except subprocess.TimeoutExpired:
            rec("wrk_rps", "n/a (wrk timed out)")
            return
        out = cp.stdout
        with open(os.path.join(self.log_dir, f"{self.run_id:03d}-{server}-wrk.txt"), "w") as f:
            f.write(out + cp.stderr)
        m = re.search(r"Requests/sec:\s*([\d.]+)", out)
        if not m:
            rec("wrk_rps", f"n/a (wrk: {(cp.stderr or out).strip()[:80]})")
            return
        rec("wrk_rps", float(m.group(1)))
        for pct, key in (("50", "wrk_p50"), ("99", "wrk_p99")):
            mm = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
            if mm:
                scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[mm.group(2)]
                rec(key, float(mm.group(1)) * scale)
        non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        rec("wrk_non2xx", int(non2xx.group(1)) if non2xx else 0)
        rec("wrk_sockerr", sum(int(x) for x in sock.groups()) if sock else 0)

    def respawn(self, server: str, rnd: int, p, port: int) -> None:
        rec = lambda k, v: self.record(server, k, v, rnd)  # noqa: E731
        workers = self.current_workers(p, port)
        victim = min(workers)
        kids_before = live_descendants(p.pid)
        load = Client(port, "/pid", threads=4, max_requests=200_000,
                      max_seconds=self.respawn_cap + 5).start()
        try:
            wait_until(lambda: load.total >= 50, 5.0)
            t_kill = now()
            os.kill(victim, signal.SIGKILL)
            t_reaped = t_proc = t_new = None
            end = t_kill + self.respawn_cap
            while now() < end and (t_reaped is None or t_proc is None or t_new is None):
                t = now()
                if t_reaped is None and not exists(victim):
                    t_reaped = t
                if t_proc is None and live_descendants(p.pid) - kids_before:
                    t_proc = t
                if t_new is None:
                    new = load.new_pids(workers)
                    if new:
                        t_new = min(new.values())
                time.sleep(0.01)
            # a short tail after the new worker answered, to catch late failures
            wait_until(lambda: False, 0.5 if t_new else 0.0)
        finally:
            load.stop()
        fmt = lambda t: round(t - t_kill, 3) if t is not None else "–"  # noqa: E731
        rec("respawn_reaped", fmt(t_reaped))
        rec("respawn_proc", fmt(t_proc))
        rec("respawn_answered", fmt(t_new))
        bad, total, kinds = load.failures()
        rec("respawn_failed", bad)
        rec("respawn_failed_txt", f"{bad} / {total} ({kinds})")

    def reload(self, server: str, rnd: int, p, port: int) -> None:
        rec = lambda k, v: self.record(server, k, v, rnd)  # noqa: E731
        old = self.current_workers(p, port)
        load = Client(port, "/pid", threads=4, max_requests=400_000,
                      max_seconds=self.reload_cap + 5).start()
        max_procs = len(live_descendants(p.pid))
        try:
            wait_until(lambda: load.total >= 50, 5.0)
            t_hup = now()
            os.kill(p.pid, signal.SIGHUP)
            t_old_gone = t_new_all = None
            end = t_hup + self.reload_cap
            while now() < end and (t_old_gone is None or t_new_all is None):
                t = now()
                kids = live_descendants(p.pid)
                max_procs = max(max_procs, len(kids))
                if t_old_gone is None and not any(alive(x) for x in old):
                    t_old_gone = t
                if t_new_all is None:
                    new = {k: v for k, v in load.new_pids(old).items()}
                    if len(new) >= self.n:
                        t_new_all = sorted(new.values())[self.n - 1]
                if p.poll() is not None:
                    break
                time.sleep(0.02)
            wait_until(lambda: False, 0.5)  # tail window for late failures
        finally:
            load.stop()
        rec("hup_survives", "yes" if p.poll() is None else f"no (exit {p.returncode})")
        if t_old_gone is not None and t_new_all is not None:
            rec("hup_all_new", round(max(t_old_gone, t_new_all) - t_hup, 3))
        else:
            rec("hup_all_new", "–")
        bad, total, kinds = load.failures()
        rec("hup_failed", bad)
        rec("hup_failed_txt", f"{bad} / {total} ({kinds})")
        rec("hup_max_procs", max_procs)

    def shutdown(self, server: str, rnd: int, p, port: int) -> None:
        rec = lambda k, v: self.record(server, k, v, rnd)  # noqa: E731
        workers = self.current_workers(p, port)
        box: list = []
        res: list = []
        th = threading.Thread(target=lambda: res.append(
            http_get(port, "/slow?s=2", timeout=15.0, on_sent=box.append)), daemon=True)
        th.start()
        holder = in_flight(port, box, workers)
        if holder is None:
            raise RuntimeError("the /slow request was not accepted by a worker within 5 s")
        t_sig = now()
        os.kill(p.pid, signal.SIGTERM)
        try:
            code = p.wait(timeout=self.term_cap)
            rec("term_exit_after", round(now() - t_sig, 3))
            rec("term_exit_code", code)
        except subprocess.TimeoutExpired:
            rec("term_exit_after", f"– (> {self.term_cap:.0f} s)")
            rec("term_exit_code", "–")
        th.join(timeout=20)
        r = res[0] if res else None
        rec("term_slow", r.describe() if r else "no answer")
        # processes of this run still alive after the master exited (3 s)
        sid = p.pid
        left = wait_until(lambda: not session_members(sid) and not live_descendants(sid), 3.0, 0.05)
        rec("term_leftover", 0 if left else len(session_members(sid) | live_descendants(sid)))

    def boot_failure(self, server: str, rnd: int, tmp: str) -> None:
        rec = lambda k, v: self.record(server, k, v, rnd)  # noqa: E731
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            p, port, t0, logp = self.start(server, "bootfail", app="broken:main", cwd=tmp)
        except Exception as e:
            self.fail(server, rnd, "boot failure", str(e), BOOT_KEYS)
            return
        seen: set[int] = set()
        live_cpu = 0
        try:
            end = t0 + self.bootfail_cap
            while p.poll() is None and now() < end:
                seen |= live_descendants(p.pid)
                time.sleep(0.02)
            if p.poll() is None:
                rec("boot_exit_code", "–")
                rec("boot_exit_after", "–")
                stats = all_stats()
                for d in descendants(p.pid, stats):
                    st = stats.get(d)
                    if st:
                        live_cpu += st["utime"] + st["stime"] + st["cutime"] + st["cstime"]
            else:
                rec("boot_exit_code", p.returncode)
                rec("boot_exit_after", round(now() - t0, 3))
        finally:
            REG.kill_tree(p)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime) + live_cpu / CLK_TCK
        rec("boot_cpu", round(cpu, 3))
        rec("boot_procs", len(seen))

    def blocked(self, server: str, rnd: int) -> None:
        rec = lambda k, v: self.record(server, k, v, rnd)  # noqa: E731
        if server in NO_TIMEOUT:
            for k in ("block_killed", "block_replaced", "block_result"):
                rec(k, "–")
            return
        try:
            p, port, t0, logp = self.start(server, "blocked", timeout=10)
        except Exception as e:
            self.fail(server, rnd, "blocked loop", str(e), BLOCK_KEYS)
            return
        try:
            c, _, t_all = wait_workers(p, port, self.n, "/pid", self.startup_cap)
            if t_all is None:
                self.fail(server, rnd, "blocked loop", f"did not start: {self.log_tail(logp)}",
                          BLOCK_KEYS)
                return
            workers = {x for x in c.pids() if alive(x)}
            box: list = []
            res: list = []
            th = threading.Thread(target=lambda: res.append(
                http_get(port, "/block?s=40", timeout=50.0, on_sent=box.append)), daemon=True)
            th.start()
            holder = in_flight(port, box, workers)
            t_req = now()
            if holder is None or holder < 0:
                raise RuntimeError(f"could not tell which worker took /block ({holder})")
            poll = Client(port, "/pid", threads=1, interval=0.02, max_requests=100_000,
                          max_seconds=self.block_cap + 2).start()
            t_killed = t_new = None
            try:
                end = t_req + self.block_cap
                while now() < end and (t_killed is None or t_new is None):
                    if t_killed is None and not alive(holder):
                        t_killed = now()
                    if t_new is None:
                        new = poll.new_pids(workers)
                        if new:
                            t_new = min(new.values())
                    time.sleep(0.01)
            finally:
                poll.stop()
            rec("block_killed", round(t_killed - t_req, 3) if t_killed else "–")
            rec("block_replaced", round(t_new - t_req, 3) if t_new else "–")
            th.join(timeout=0.5 if t_killed else 0.0)
            r = res[0] if res else None
            rec("block_result", r.describe() if r else "pending")
        except Exception as e:
            self.fail(server, rnd, "blocked loop", f"{type(e).__name__}: {e}", BLOCK_KEYS)
        finally:
            REG.stop(p, grace=5.0)

    def curve(self, rnd: int) -> None:
        """Worker-count curve: for each N, each server started once, interleaved; start-up
        (first 200, all N pids, the server's own readiness), then after a settle window
        master RSS, total PSS and per-worker USS."""
        for n in self.a.curve_workers:
            for server in self.servers:
                sfx = f"@{n}"
                keys = [k + sfx for k in CURVE_KEYS]
                try:
                    p, port, t0, logp = self.start(server, f"curve{n}", workers=n)
                except Exception as e:
                    self.fail(server, rnd, f"curve N={n}", str(e), keys)
                    continue
                try:
                    lr = LogReadiness(server, logp, n, self.startup_cap).start()
                    c, t_first, t_all = wait_workers(p, port, n, "/pid", self.startup_cap,
                                                     threads=min(4, max(2, n // 4)))
                    lr.finish(grace=3.0)
                    if t_all is None:
                        code = p.poll()
                        why = (f"exited with {code}" if code is not None
                               else f"{len(c.pids())} of {n} workers answered within {self.startup_cap:.0f} s")
                        self.fail(server, rnd, f"curve N={n}", f"{why}: {self.log_tail(logp)}", keys)
                        continue
                    self.record(server, "curve_first" + sfx, t_first - t0, rnd)
                    self.record(server, "curve_all" + sfx, t_all - t0, rnd)
                    self.record_self_ready(server, rnd, lr, t0, sfx)
                    workers = {x for x in c.pids() if alive(x)}
                    try:
                        p.wait(timeout=self.curve_settle)  # the settle window: a measurement, not a sync
                        raise RuntimeError(f"master exited during the settle window ({p.returncode})")
                    except subprocess.TimeoutExpired:
                        pass
                    kids = live_descendants(p.pid)
                    self.record(server, "curve_master_rss" + sfx,
                                (status_field(p.pid, "VmRSS") or 0) / 1024, rnd)
                    pss = sum((smaps_rollup(x) or (0, 0))[1] for x in kids | {p.pid})
                    self.record(server, "curve_total_pss" + sfx, pss / 1024, rnd)
                    self.record_uss(server, rnd, p.pid, workers, kids, sfx)
                except Exception as e:
                    self.fail(server, rnd, f"curve N={n}", f"{type(e).__name__}: {e}", keys)
                finally:
                    REG.stop(p, grace=5.0)
                r = self.results[server]
                log(f"  curve N={n} {server}: " + ", ".join(
                    f"{k}={fmt_num(r[k + sfx][rnd])}" for k in ("curve_first", "curve_all", "self_ready_all",
                                                               "curve_master_rss", "curve_total_pss",
                                                               "mem_worker_uss") if k + sfx in r))

    def command_class(self) -> None:
        """procman only: spawn time and master RSS with K command workers."""
        if not os.access(self.hello, os.X_OK) or not os.access(self.procman, os.X_OK):
            self.errors.append(f"command class: {self.hello} or {self.procman} missing")
            return
        for rnd in range(self.rounds):
            for k in self.a.command_workers:
                res = self.cmd_results.setdefault(k, {})
                port = free_port()
                argv = [self.procman, "-w", str(k), "-b", f"{HOST}:{port}", "--", self.hello]
                try:
                    p, _, t0, logp = self.start("procman", f"cmd{k}", argv=argv, cwd=self.root)
                except Exception as e:
                    self.errors.append(f"command class k={k}: {e}")
                    continue
                try:
                    c, t_first, t_all = wait_workers(p, port, k, "/", self.startup_cap,
                                                          threads=min(4, k))
                    if t_all is None:
                        msg = f"{len(c.pids())} of {k} answered; {self.log_tail(logp)}"
                        self.errors.append(f"command class k={k} round {rnd + 1}: {msg}")
                        res.setdefault("spawn", []).append(f"n/a ({msg[:60]})")
                        continue
                    res.setdefault("spawn", []).append(t_all - t0)
                    res.setdefault("first", []).append(t_first - t0)
                    res.setdefault("rss", []).append((status_field(p.pid, "VmRSS") or 0) / 1024)
                    kids = live_descendants(p.pid)
                    pss = sum((smaps_rollup(x) or (0, 0))[1] for x in kids | {p.pid})
                    res.setdefault("pss", []).append(pss / 1024)
                finally:
                    REG.stop(p, grace=10.0)
                log(f"command class k={k} round {rnd + 1}: "
                    + ", ".join(f"{a}={fmt_num(b[-1])}" for a, b in res.items()))

    # ---- load spread over the workers, with and without --reuse-port (procman only)

    def spread_argv(self, cls: str, mode: str, port: int) -> list[str]:
        rp = ["--reuse-port"] if mode == "reuse" else []
        if cls == "fastapi":
            return self.argv("procman", self.app, port) + rp
        return [self.procman, "-w", str(self.n), "-b", f"{HOST}:{port}"] + rp + ["--", self.hello]

    def spread_display(self, cls: str, mode: str) -> str:
        s = " ".join(self.spread_argv(cls, mode, 0)).replace(self.root + "/", "")
        return s.replace(f"{HOST}:0", f"{HOST}:PORT")

    def spread_record(self, key: str, rnd: int, value) -> None:
        self.spread_results.setdefault(key, [None] * self.rounds)[rnd] = value

    def spread(self, rnd: int) -> None:
        if not os.access(self.procman, os.X_OK):
            self.errors.append(f"load spread round {rnd + 1}: {self.procman} missing")
            return
        lua = os.path.join(self.out_dir, "spread.lua")
        with open(lua, "w") as f:
            f.write(SPREAD_LUA)
        for cls, _, path in SPREAD_CLASSES:
            if cls == "command" and not os.access(self.hello, os.X_OK):
                self.errors.append(f"load spread round {rnd + 1}: {self.hello} missing")
                continue
            for mode, _ in SPREAD_MODES:
                try:
                    self.spread_one(cls, mode, path, lua, rnd)
                except Exception as e:
                    self.errors.append(f"load spread {cls}/{mode} round {rnd + 1}: "
                                       f"{type(e).__name__}: {e}".replace(self.root + "/", ""))
                    log(f"FAILED load spread {cls}/{mode} round {rnd + 1}: {e}")

    def spread_one(self, cls: str, mode: str, path: str, lua: str, rnd: int) -> None:
        port = free_port()
        argv = self.spread_argv(cls, mode, port)
        p, _, t0, logp = self.start("procman", f"spread-{cls}-{mode}", argv=argv,
                                    cwd=self.app_dir if cls == "fastapi" else self.root)
        try:
            c, _, t_all = wait_workers(p, port, self.n, path, self.startup_cap)
            if t_all is None:
                raise RuntimeError(f"{len(c.pids())} of {self.n} workers answered: {self.log_tail(logp)}")
            workers = {x for x in c.pids() if alive(x)}
            # (a) short connections: one request per connection, 4 threads, bounded
            load = Client(port, path, threads=4, max_requests=self.spread_short_n,
                          max_seconds=self.spread_short_s, timeout=2.0).start()
            load.join()
            el = now() - load.t_start
            st = spread_stats(load.per_pid, workers)
            bad, total, kinds = load.failures()
            st.update(failed=bad, requests=total, kinds=kinds, seconds=round(el, 2),
                      rps=round(total / el, 1) if el else None)
            self.spread_record(f"{cls}/short/{mode}", rnd, st)
            # (b) wrk with the tallying Lua script; connections per worker sampled mid-run
            wlog = os.path.join(self.log_dir, f"{self.run_id:03d}-procman-spread-{cls}-{mode}-wrk.txt")
            cmd = ["wrk", "-t2", "-c64", f"-d{self.spread_wrk_d}s", "-s", lua, f"http://{HOST}:{port}{path}"]
            w = REG.spawn(cmd, self.root, self.env, wlog)
            conns = None
            try:
                w.wait(timeout=self.spread_wrk_d / 2)  # the sampling instant, not a synchronisation
            except subprocess.TimeoutExpired:
                conns = conns_per_worker(port, workers)
            try:
                w.wait(timeout=self.spread_wrk_d + 30)
            except subprocess.TimeoutExpired:
                REG.kill_tree(w)
                raise RuntimeError("wrk did not finish")
            out = _read(wlog) or ""
            per_pid: dict[int, int] = {}
            per_thread: dict[str, dict[str, int]] = {}
            other = 0
            for m in re.finditer(r"^SPREAD thread=(\d+) pid=(\d+) count=(\d+)$", out, re.M):
                per_pid[int(m.group(2))] = per_pid.get(int(m.group(2)), 0) + int(m.group(3))
                per_thread.setdefault(m.group(1), {})[m.group(2)] = int(m.group(3))
            for m in re.finditer(r"^SPREAD thread=\d+ other=(\d+)$", out, re.M):
                other += int(m.group(1))
            if not per_pid:
                raise RuntimeError(f"wrk printed no tallies: {out.strip()[-200:]}")
            st = spread_stats(per_pid, workers)
            sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
            rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
            st.update(other=other, per_thread=per_thread,
                      sockerr=sum(int(x) for x in sock.groups()) if sock else 0,
                      rps=float(rps.group(1)) if rps else None,
                      conns=sorted(conns.values(), reverse=True) if conns else None,
                      conns_cv=(round(statistics.pstdev(conns.values()) / statistics.mean(conns.values()), 4)
                                if conns and sum(conns.values()) else None))
            self.spread_record(f"{cls}/wrk/{mode}", rnd, st)
            # a worker that died during the loads skews the spread: say so (the log says why)
            died = self.worker_deaths(logp)
            if died:
                self.errors.append(f"load spread {cls}/{mode} round {rnd + 1}: {'; '.join(died)[:240]}"
                                   f" (log: {rel(logp, self.root)})")
            sh_ = self.spread_results
            log(f"  spread {cls}/{mode}: short {'/'.join(map(str, sh_[f'{cls}/short/{mode}'][rnd]['sorted']))}"
                f" cv={sh_[f'{cls}/short/{mode}'][rnd]['cv']}; wrk {'/'.join(map(str, st['sorted']))}"
                f" cv={st['cv']} conns={st['conns']}")
        finally:
            REG.stop(p, grace=5.0)

    # ---- the whole run

    def warm_up(self) -> None:
        """Warm the page cache (discarded) and measure the Python boot floor."""
        py = os.path.join(self.vbin, "python")
        times = []
        for _ in range(3):
            t = now()
            subprocess.run([py, "-c", "import fastapi, uvicorn"], cwd=self.app_dir, env=self.env,
                           capture_output=True, timeout=60)
            times.append(now() - t)
        self.boot_floor = statistics.median(times[1:])
        cp = subprocess.run([py, "-c", f"import {self.app.split(':')[0]}"], cwd=self.app_dir,
                            env=self.env, capture_output=True, text=True, timeout=60)
        if cp.returncode != 0:
            raise SystemExit(f"the app {self.app} does not import in {self.app_dir}:\n{cp.stderr}")

    def run(self) -> None:
        self.t_begin = datetime.datetime.now(datetime.timezone.utc)
        self.revision = source_revision(self.root)
        self.stale_at_start = stale_sources(self.root, self.procman)
        self.loadavg_begin = (_read("/proc/loadavg") or "").split()[:3]
        self.warm_up()
        tmp = tempfile.mkdtemp(prefix="procman-bench-")
        try:
            with open(os.path.join(tmp, "broken.py"), "w") as f:
                f.write("raise RuntimeError('procman bench: this module fails at import on purpose')\n"
                        "main = None\n")
            sc = self.a.scenarios
            for rnd in range(self.rounds):
                if "main" in sc:
                    log(f"round {rnd + 1}/{self.rounds}: main scenarios")
                    for s in self.servers:
                        self.main_instance(s, rnd)
                        self.progress(s, rnd)
                if "curve" in sc:
                    log(f"round {rnd + 1}/{self.rounds}: worker-count curve"
                        f" ({','.join(map(str, self.a.curve_workers))} workers)")
                    self.curve(rnd)
                if "bootfail" in sc:
                    log(f"round {rnd + 1}/{self.rounds}: boot failure")
                    for s in self.servers:
                        self.boot_failure(s, rnd, tmp)
                if "blocked" in sc:
                    log(f"round {rnd + 1}/{self.rounds}: blocked event loop")
                    for s in self.servers:
                        self.blocked(s, rnd)
                if "bootfail" in sc or "blocked" in sc:
                    for s in self.servers:
                        self.progress(s, rnd, keys=("boot_exit_code", "boot_exit_after", "boot_cpu",
                                                    "block_killed", "block_replaced", "block_result"))
                if self.procman_bin_users() and "spread" in sc:
                    log(f"round {rnd + 1}/{self.rounds}: load spread (procman, shared socket vs --reuse-port)")
                    self.spread(rnd)
            if self.procman_bin_users() and "command" in sc:
                log("command class (procman only)")
                self.command_class()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.t_end = datetime.datetime.now(datetime.timezone.utc)

    def procman_bin_users(self) -> list[str]:
        """The procman variants in this run (spread and the command class need the binary)."""
        return [s for s in self.servers if is_procman(s)]

    def progress(self, s: str, rnd: int, keys=None) -> None:
        r = self.results[s]
        keys = keys or ("startup_all", "mem_master_rss", "mem_total_pss", "idle_master_wakeups",
                        "wrk_rps", "respawn_answered", "respawn_failed_txt", "hup_all_new",
                        "hup_failed_txt", "term_slow", "term_exit_after")
        log(f"  {s}: " + ", ".join(f"{k}={fmt_num(r[k][rnd])}" for k in keys if k in r))


# --------------------------------------------------------------------------- report


def fmt_num(v) -> str:
    """Short human figures: 14212, 215.9, 28.19, 0.763, 0.00412."""
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 10:
            return f"{v:.2f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.3g}"
    return str(v)


def numbers(vals) -> list[float]:
    return [v for v in (vals or []) if isinstance(v, (int, float)) and not isinstance(v, bool)]


def median_of(vals):
    nums = numbers(vals)
    return statistics.median(nums) if nums else None


# (key, label, kind) — kind: "num" (median, ratio vs procman), "text" (each round), "int"
ROWS = [
    ("1. start-up", None, None),
    ("startup_first", "start-up: first 200 on /pid (s)", "num"),
    ("startup_all", "start-up: all N worker pids answered /pid (s) [client view]", "num"),
    ("self_ready_first", "start-up: first worker ready, as the server logs it (s) [server view]", "num"),
    ("self_ready_all", "start-up: N workers ready, as the server logs it (s) [server view]", "num"),
    ("self_all_ready_event", "start-up: procman's all-ready event (s) [server view]", "num"),
    ("2. memory (after the idle window)", None, None),
    ("mem_master_rss", "master RSS (MiB)", "num"),
    ("mem_total_rss", "total RSS, master + descendants (MiB)", "num"),
    ("mem_total_pss", "total PSS, master + descendants (MiB)", "num"),
    ("procs", "processes (master + workers + helpers)", "num"),
    ("mem_worker_uss", "per-worker USS, median over the workers (MiB)", "num"),
    ("mem_helpers_pss", "PSS of helpers: descendants that are not workers, e.g. a zygote (MiB)", "num"),
    ("3. idle cost (over the idle window)", None, None),
    ("idle_master_cpu_sched", "master CPU (s, schedstat, all threads)", "num"),
    ("idle_master_cpu_ticks", "master CPU (s, utime+stime)", "num"),
    ("idle_master_wakeups", "master wake-ups (voluntary ctxt switches, all threads)", "num"),
    ("idle_workers_cpu", "workers' CPU total (s, schedstat)", "num"),
    ("idle_workers_wakeups", "workers' wake-ups total", "num"),
    ("4. throughput: wrk -t2 -c64 --latency /pid", None, None),
    ("wrk_rps", "req/s", "num"),
    ("wrk_p50", "p50 latency (ms)", "num"),
    ("wrk_p99", "p99 latency (ms)", "num"),
    ("wrk_non2xx", "non-2xx responses", "num"),
    ("wrk_sockerr", "socket errors (connect+read+write+timeout)", "num"),
    ("5. respawn: kill -9 one worker under a 4-thread short-connection loop", None, None),
    ("respawn_reaped", "killed worker reaped after (s)", "num"),
    ("respawn_proc", "new worker process after (s)", "num"),
    ("respawn_answered", "new pid answered /pid after (s)", "num"),
    ("respawn_failed_txt", "failed / total requests (kinds)", "text"),
    ("6. reload: SIGHUP under the same loop", None, None),
    ("hup_survives", "master survives", "text"),
    ("hup_all_new", "all worker pids new after (s)", "num"),
    ("hup_failed_txt", "failed / total requests (kinds)", "text"),
    ("hup_max_procs", "max descendant processes during reload", "num"),
    ("7. shutdown: SIGTERM with /slow?s=2 in flight", None, None),
    ("term_slow", "in-flight request: result (s)", "text"),
    ("term_exit_after", "master exit after (s)", "num"),
    ("term_exit_code", "exit code", "text"),
    ("term_leftover", "processes alive 3 s after master exit", "text"),
    ("8. boot failure: the app raises at import", None, None),
    ("boot_exit_code", "exit code (each run; – = still running at the cap)", "text"),
    ("boot_exit_after", "exit after (s)", "num"),
    ("boot_cpu", "CPU used until exit or cap (s)", "num"),
    ("boot_procs", "worker processes seen (20 ms scans)", "num"),
    ("9. blocked event loop: /block?s=40 with a 10 s timeout", None, None),
    ("block_killed", "blocked worker gone after (s)", "num"),
    ("block_replaced", "new pid answered /pid after (s)", "num"),
    ("block_result", "/block request: result (s)", "text"),
]

STEP_KEYS = {
    "startup": ["startup_first", "startup_all", "self_ready_first", "self_ready_all", "self_all_ready_event"],
    "idle/memory": ["mem_master_rss", "mem_total_rss", "mem_total_pss", "procs", "mem_worker_uss",
                    "mem_helpers_pss", "idle_master_cpu_sched",
                    "idle_master_cpu_ticks", "idle_master_wakeups", "idle_workers_cpu",
                    "idle_workers_wakeups"],
    "wrk": ["wrk_rps", "wrk_p50", "wrk_p99", "wrk_non2xx", "wrk_sockerr"],
    "respawn": ["respawn_reaped", "respawn_proc", "respawn_answered", "respawn_failed_txt"],
    "reload": ["hup_survives", "hup_all_new", "hup_failed_txt", "hup_max_procs"],
    "shutdown": ["term_slow", "term_exit_after", "term_exit_code", "term_leftover"],
}
MAIN_KEYS = ["startup_all", "startup_first"] + [k for n, ks in STEP_KEYS.items() if n != "startup"
                                                  for k in ks]
BOOT_KEYS = ["boot_exit_code", "boot_exit_after", "boot_cpu", "boot_procs"]
BLOCK_KEYS = ["block_killed", "block_replaced", "block_result"]
CURVE_KEYS = ["curve_first", "curve_all", "self_ready_first", "self_ready_all", "self_all_ready_event",
              "curve_master_rss", "curve_total_pss", "mem_worker_uss", "mem_helpers_pss"]


def cell(vals, kind: str, ref=None, show_ratio: bool = False) -> str:
    vals = vals or []
    if not vals or all(v is None for v in vals):
        return "–"
    nums = numbers(vals)
    if kind == "text" or not nums:
        uniq = [fmt_num(v) for v in vals]
        if len(set(uniq)) == 1:
            return uniq[0]
        return ", ".join(uniq)
    med = statistics.median(nums)
    if all(isinstance(v, int) for v in nums) and med == int(med):
        med = int(med)
    s = fmt_num(med)
    if len(nums) > 1 and min(nums) != max(nums):
        s += f" [{fmt_num(min(nums))}–{fmt_num(max(nums))}]"
    if len(nums) < len(vals):
        miss = [fmt_num(v) for v in vals if v not in nums]
        s += f" ({len(nums)}/{len(vals)} runs; other: {', '.join(miss)[:60]})"
    if show_ratio and ref not in (None, 0) and med is not None:
        s += f" (×{med / ref:.2f})"
    return s


def render_table(b: Bench) -> str:
    cols = b.servers
    lines = ["| metric | " + " | ".join(TITLES[s] for s in cols) + " |",
             "|---|" + "---|" * len(cols)]
    heading = None
    for key, label, kind in ROWS:
        if label is None:
            heading = f"| **{key}** |" + " |" * len(cols)
            continue
        if not any(key in b.results[s] for s in cols):
            continue
        if heading:
            lines.append(heading)
            heading = None
        ref = median_of(b.results.get("procman", {}).get(key)) if "procman" in cols else None
        cells = []
        for s in cols:
            vals = b.results[s].get(key)
            cells.append(cell(vals, kind, ref, show_ratio=(s != "procman" and kind == "num")))
        lines.append(f"| {label.replace('N worker', f'{b.n} worker')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def render_cmd_table(b: Bench) -> str:
    if not b.cmd_results:
        return ""
    lines = ["| command workers (target/release/examples/hello) | spawn: all pids answered GET / (s) "
             "| first 200 (s) | master RSS (MiB) | total PSS (MiB) |", "|---|---|---|---|---|"]
    for k in sorted(b.cmd_results):
        r = b.cmd_results[k]
        lines.append(f"| {k} | {cell(r.get('spawn'), 'num')} | {cell(r.get('first'), 'num')} "
                     f"| {cell(r.get('rss'), 'num')} | {cell(r.get('pss'), 'num')} |")
    return "\n".join(lines)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def med_range(vals, fmt) -> str:
    """median [min–max] of the numbers in vals, each formatted by fmt."""
    nums = numbers(vals)
    if not nums:
        return "–"
    s = fmt(statistics.median(nums))
    if len(nums) > 1 and min(nums) != max(nums):
        s += f" [{fmt(min(nums))}–{fmt(max(nums))}]"
    if len(nums) < len(vals or []):
        s += f" ({len(nums)}/{len(vals)} runs)"
    return s


def render_spread(b: Bench) -> str:
    """The load-spread table: one row per worker class × load × listener."""
    if not b.spread_results:
        return ""
    lines = [f"| worker class | load | listener | requests per worker, busiest first"
             f" ({'; '.join(f'round {i + 1}' for i in range(b.rounds))}) | busiest worker's share"
             f" | least busy worker's share | CV (stdev/mean) | wrk: open connections per worker"
             f" mid-run | failed requests |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cls, cls_label, path in SPREAD_CLASSES:
        for load, load_label in SPREAD_LOADS:
            for mode, mode_label in SPREAD_MODES:
                vals = b.spread_results.get(f"{cls}/{load}/{mode}")
                if not vals:
                    continue
                get = lambda k: [v.get(k) if v else None for v in vals]  # noqa: E731
                counts = "; ".join(("/".join(map(str, v["sorted"]))
                                    + (f" ({v['pids']} pids: a worker was replaced during the load)"
                                       if v["pids"] > b.n else "")) if v else "n/a" for v in vals)
                if load == "wrk":
                    conns = "; ".join("/".join(map(str, v["conns"])) if v and v.get("conns")
                                      and sum(v["conns"]) else "–" for v in vals)
                    if cls == "command":
                        conns = "– (one request per connection)"
                    failed = [v["other"] + v["sockerr"] if v else None for v in vals]
                else:
                    conns = "–"
                    failed = get("failed")
                fl = [fmt_num(x) for x in failed]
                lines.append(f"| {cls_label} `GET {path}` | {load_label} | {mode_label} | {counts} "
                             f"| {med_range(get('max_share'), _pct)} | {med_range(get('min_share'), _pct)} "
                             f"| {med_range(get('cv'), lambda x: f'{x:.3f}')} | {conns} "
                             f"| {fl[0] if len(set(fl)) == 1 else ', '.join(fl)} |")
    return "\n".join(lines)


def spread_sentence(b: Bench) -> str:
    parts = []
    for cls, cls_label, _ in SPREAD_CLASSES:
        sub = []
        for load, load_label in SPREAD_LOADS:
            cv = [median_of([v.get("cv") if v else None
                             for v in b.spread_results.get(f"{cls}/{load}/{mode}", [])])
                  for mode, _ in SPREAD_MODES]
            if all(c is not None for c in cv):
                sub.append(f"{'short connections' if load == 'short' else 'wrk requests'}"
                           f" {cv[0]:.3f} → {cv[1]:.3f}")
            if load == "wrk" and cls == "fastapi":
                cc = [median_of([v.get("conns_cv") if v else None
                                 for v in b.spread_results.get(f"{cls}/{load}/{mode}", [])])
                      for mode, _ in SPREAD_MODES]
                if all(c is not None for c in cc):
                    sub.append(f"wrk keep-alive connections {cc[0]:.3f} → {cc[1]:.3f}")
        if sub:
            parts.append(f"{cls_label}: " + ", ".join(sub))
    return "; ".join(parts)


def mi_nproc() -> str:
    return str(len(os.sched_getaffinity(0)))


def render_spread_section(b: Bench, spread_table: str) -> list[str]:
    if not spread_table:
        return []
    mig = b.migrate_req
    out = [
        f"## Load spread over {b.n} workers (`--reuse-port`)",
        "",
        f"procman only. Each instance is started once with one shared listening socket (all {b.n}"
        f" workers accept from the same queue, the default) and once with `--reuse-port` (each"
        f" worker gets its own `SO_REUSEPORT` listener and the kernel picks one by a hash of the"
        f" connection), in that order in every round, and takes two loads one after the other, both"
        f" counting which pid answered each request:",
        "",
        f"- (a) short connections: one request per connection (`Connection: close`), 4 Python client"
        f" threads, at most {b.spread_short_n} requests or {b.spread_short_s:g} s;",
        f"- (b) `wrk -t2 -c64 -d{b.spread_wrk_d}s -s bench/out/spread.lua URL`: the Lua script's"
        f" `response()` tallies the body (the pid) per wrk thread and `done()` prints the tallies."
        f" The FastAPI app keeps the 64 connections alive, so its spread is the spread of the 64"
        f" connections accepted at the start (sampled from `/proc/net/tcp` half-way through);"
        f" `hello` closes every connection after one response, so wrk reconnects for each request.",
        "",
        "```",
    ]
    for cls, _, _ in SPREAD_CLASSES:
        for mode, _ in SPREAD_MODES:
            out.append(b.spread_display(cls, mode))
    out += [
        "```",
        "",
        f"How to read: an even spread gives every worker {100 / b.n:.0f} % of the requests and a"
        f" coefficient of variation (population stdev ÷ mean of the per-worker counts, workers"
        f" that answered nothing counted as 0) of 0. Shares and CV are medians over the rounds"
        f" [min–max]. Under wrk, a FastAPI worker's request count follows its share of the CPU"
        f" more than its number of connections ({b.n} workers on {mi_nproc()} CPUs, so each is"
        f" CPU-bound): a worker holding few connections serves them back to back while one holding"
        f" many makes each of them wait, so an uneven connections column means uneven latency even"
        f" when the request counts look even, and a worker with no connection serves nothing.",
        "",
        spread_table,
        "",
    ]
    sent = spread_sentence(b)
    if sent:
        out += [f"Median CV, shared socket → `--reuse-port`: {sent}.", ""]
    out += [
        f"The trade-off: with `--reuse-port` every worker has its own accept queue, so connections"
        f" already queued on a stopping worker's own socket (at a reload, a recycle or a crash) are"
        f" reset instead of being taken by another worker, unless `net.ipv4.tcp_migrate_req=1`"
        f" lets the kernel move them to another listener of the group; on this machine"
        f" `/proc/sys/net/ipv4/tcp_migrate_req` is {mig}"
        f"{' (off: procman warns about it at start)' if mig == '0' else ''}. The shared socket"
        f" loses nothing when a worker stops (the respawn and reload figures above use it), at the"
        f" price of the spread shown here.",
        "",
    ]
    return out


# (key, label, better) for the final summary
SUMMARY_ROWS = [
    ("startup_first", "start-up: first 200 on /pid (s)", "lower"),
    ("startup_all", "start-up: all N workers answer /pid (s) [client view]", "lower"),
    ("self_ready_all", "start-up: N workers ready as the server logs it (s) [server view]", "lower"),
    ("mem_master_rss", "master RSS (MiB)", "lower"),
    ("mem_total_pss", "total PSS, master + workers (MiB)", "lower"),
    ("mem_worker_uss", "per-worker USS (MiB)", "lower"),
    ("respawn_answered", "respawn: kill -9 until the new pid answers (s)", "lower"),
    ("hup_all_new", "reload: SIGHUP until all pids are new (s)", "lower"),
    ("idle_master_wakeups", "master idle wake-ups (per IDLE s)", "lower"),
    ("wrk_rps", "throughput, wrk req/s", "higher"),
    ("wrk_p99", "p99 latency under wrk (ms)", "lower"),
    ("hup_failed", "failed requests during a SIGHUP reload", "lower"),
    ("boot_cpu", "CPU used by a boot failure (s)", "lower"),
]


def _overlap(a, b) -> bool:
    na, nb = numbers(a), numbers(b)
    if len(na) < 2 or len(nb) < 2:
        return False
    return max(min(na), min(nb)) <= min(max(na), max(nb))


def compare(p_vals, o_vals, better: str) -> str:
    """procman relative to the other server, in words: '8.77× lower (better)'."""
    p, o = median_of(p_vals), median_of(o_vals)
    if p is None or o is None:
        return "–"
    noise = "; ranges overlap" if _overlap(p_vals, o_vals) else ""
    if p == o:
        return f"same{' (ranges overlap)' if noise else ''}"
    if p == 0 or o == 0:
        word = "lower" if p < o else "higher"
        verdict = "better" if (word == better) else "worse"
        return f"{fmt_num(p)} vs {fmt_num(o)} ({verdict}{noise})"
    word = "lower" if p < o else "higher"
    r = o / p if p < o else p / o
    verdict = "better" if word == better else "worse"
    return f"{r:.2f}× {word} ({verdict}{noise})"


# Issue 15's targets: (label, metric, op, limit), ratio = procman default ÷ gunicorn, same
# run, medians. metric: a results key, or (key, workers) for "this figure at that worker
# count" (the main scenario's figure when the count is --workers, else the curve's).
TARGETS = [
    ("respawn: kill -9 until the new pid answers", "respawn_answered", "<=", 0.7),
    ("first 200 on /pid, 4 workers", ("first", 4), "<=", 1.0),
    ("first 200 on /pid, 8 workers", ("first", 8), "<=", 1.0),
    ("all 4 workers answered /pid [client view]", ("all", 4), "<=", 0.9),
    ("total PSS, master + descendants", "mem_total_pss", "<=", 0.95),
    ("wrk req/s", "wrk_rps", ">=", 0.98),
    ("wrk p99 latency", "wrk_p99", "<=", 1.05),
    ("reload: SIGHUP until all new pids answer (and 0 failed requests)", "hup_all_new", "<=", 1.5),
]


def target_values(b: Bench, server: str, metric) -> tuple[list | None, str]:
    """The per-round values of a target's metric for a server, and where they come from."""
    r = b.results.get(server, {})
    if isinstance(metric, str):
        return r.get(metric), f"main scenario, {b.n} workers"
    what, n = metric
    if n == b.n and r.get(f"startup_{what}"):
        return r.get(f"startup_{what}"), "main scenario"
    return r.get(f"curve_{what}@{n}"), "worker-count curve"


def render_targets(b: Bench) -> list[str]:
    if "procman" not in b.servers or "gunicorn" not in b.servers:
        return ["Targets (issue 15): not evaluated, this run lacks procman (default) or gunicorn.", ""]
    variants = [s for s in b.servers if is_procman(s) and s != "procman"]
    out = [
        "### Targets (issue 15): procman (default) ÷ gunicorn + UvicornWorker",
        "",
        f"Ratio = procman default's median ÷ gunicorn's median over the {b.rounds} round"
        f"{'s' if b.rounds != 1 else ''} of this run. The other procman variants' ratios are shown"
        " for information; pass/fail is the default's.",
        "",
        "| target | source | procman (default) | gunicorn | ratio | target | result | "
        + " | ".join(f"{TITLES[v]} ratio" for v in variants) + (" |" if variants else ""),
        "|---|---|---|---|---|---|---|" + "---|" * len(variants),
    ]
    for label, metric, op, limit in TARGETS:
        pv, src = target_values(b, "procman", metric)
        gv, _ = target_values(b, "gunicorn", metric)
        pm, gm = median_of(pv), median_of(gv)
        ratio = pm / gm if pm is not None and gm not in (None, 0) else None
        if ratio is None:
            result = "not measured"
        else:
            ok = ratio <= limit if op == "<=" else ratio >= limit
            result = "**pass**" if ok else "**FAIL**"
            if metric == "hup_all_new":
                failed = b.results["procman"].get("hup_failed") or []
                bad = [x for x in failed if x != 0]
                if bad or not numbers(failed):
                    result = f"**FAIL** (failed requests: {', '.join(map(fmt_num, failed)) or 'n/a'})"
            if _overlap(pv, gv):
                result += " (ranges overlap)"
        vr = []
        for v in variants:
            vv, _ = target_values(b, v, metric)
            vm = median_of(vv)
            vr.append(f"{vm / gm:.2f}" if vm is not None and gm not in (None, 0) else "–")
        out.append(f"| {label} | {src} | {med_range(pv, fmt_num)} | {med_range(gv, fmt_num)} | "
                   f"{'–' if ratio is None else f'{ratio:.2f}'} | {op} {limit:g} | {result} |"
                   + "".join(f" {x} |" for x in vr))
    out.append("")
    return out


def render_vs_granian(b: Bench) -> list[str]:
    if "procman" not in b.servers or "granian" not in b.servers:
        return []
    rows = list(SUMMARY_ROWS) + [(f"curve_{w}@{n}", f"{lab}, {n} workers (curve)", "lower")
                                 for n in b.a.curve_workers if "curve" in b.a.scenarios
                                 for w, lab in (("first", "first 200 on /pid (s)"),
                                                ("total_pss", "total PSS (MiB)"))]
    better, worse, same = [], [], []
    lines = ["| metric | procman (default) | granian | procman relative to granian |", "|---|---|---|---|"]
    for key, label, good in rows:
        label = label.replace("N workers", f"{b.n} workers").replace("IDLE", f"{b.idle:g}")
        pv, gv = b.results["procman"].get(key), b.results["granian"].get(key)
        pm, gm = median_of(pv), median_of(gv)
        if pm is None or gm is None:
            continue
        c = compare(pv, gv, good)
        lines.append(f"| {label} | {med_range(pv, fmt_num)} | {med_range(gv, fmt_num)} | {c} |")
        if "overlap" in c or pm == gm:
            same.append(label)
        elif "(better" in c:
            better.append(label)
        else:
            worse.append(label)
    out = ["### procman (default) against granian", "",
           "granian is a Rust server (its own HTTP stack and event loop integration), a different design"
           " from the three uvicorn-based servers, so where it is faster that is the HTTP path, not process"
           " management. Its workers are not replaced after a crash unless `--respawn-failed-workers` is"
           " given (used here).", ""]
    out += lines + [""]
    out.append(f"- granian better: {', '.join(worse) or 'nothing measured'}")
    out.append(f"- procman better: {', '.join(better) or 'nothing measured'}")
    out.append(f"- within noise (ranges overlap) or equal: {', '.join(same) or 'none'}")
    out.append("")
    return out


def render_curve(b: Bench) -> str:
    """Worker-count curve: one table per metric, rows = worker counts, columns = servers."""
    ns = [n for n in b.a.curve_workers
          if any(f"curve_first@{n}" in b.results[s] or f"curve_all@{n}" in b.results[s] for s in b.servers)]
    if not ns:
        return ""
    metrics = [
        ("curve_first", "first 200 on /pid (s)"),
        ("curve_all", "all N pids answered /pid (s) [client view]"),
        ("self_ready_all", "N workers ready as the server logs it (s) [server view]"),
        ("self_all_ready_event", "procman's all-ready event (s) [server view]"),
        ("curve_master_rss", "master RSS (MiB)"),
        ("curve_total_pss", "total PSS, master + descendants (MiB)"),
        ("mem_worker_uss", "per-worker USS, median (MiB)"),
    ]
    out = []
    for key, label in metrics:
        cols = [s for s in b.servers if any(f"{key}@{n}" in b.results[s] for n in ns)]
        if not cols:
            continue
        out += [f"**{label}**", "", "| workers | " + " | ".join(TITLES[s] for s in cols) + " |",
                "|---|" + "---|" * len(cols)]
        for n in ns:
            k = f"{key}@{n}"
            ref = median_of(b.results.get("procman", {}).get(k))
            out.append(f"| {n} | " + " | ".join(cell(b.results[s].get(k), "num", ref, show_ratio=(s != "procman"))
                                               for s in cols) + " |")
        out.append("")
    return "\n".join(out)


def render_summary(b: Bench) -> list[str]:
    if "procman" not in b.servers or not any(b.results["procman"].get(k) for k, _, _ in SUMMARY_ROWS):
        return []
    others = [s for s in b.servers if not is_procman(s)]
    out = [
        "## Summary",
        "",
    ]
    out += render_targets(b)
    out += render_vs_granian(b)
    out += [
        "### Every server, procman (default) against each",
        "",
        f"procman compared with each other server: medians over {b.rounds} round"
        f"{'s' if b.rounds != 1 else ''}, and procman's figure relative to theirs (\"2.00× lower\""
        f" = half of theirs); \"ranges overlap\" = the [min–max] of the two servers overlap, so the"
        f" difference is within this machine's noise.",
        "",
        "| metric | better | " + " | ".join(TITLES[s] for s in b.servers) + " | "
        + " | ".join(f"procman vs {s}" for s in others) + " |",
        "|---|---|" + "---|" * (len(b.servers) + len(others)),
    ]
    for key, label, better in SUMMARY_ROWS:
        label = label.replace("N workers", f"{b.n} workers").replace("IDLE", f"{b.idle:g}")
        vals = {s: b.results[s].get(key) for s in b.servers}
        if not any(numbers(v) for v in vals.values()):
            continue
        cells = [med_range(vals[s], fmt_num) for s in b.servers]
        if key == "boot_cpu":
            cells = [c + (" (still retrying at the cap)" if "–" in map(str, b.results[s].get("boot_exit_code") or [])
                          else "") for c, s in zip(cells, b.servers)]
        cmp = [compare(vals["procman"], vals[s], better) for s in others]
        out.append(f"| {label} | {better} | " + " | ".join(cells) + " | " + " | ".join(cmp) + " |")
    out.append("")
    return out


COLORS = {"procman": "#d9480f", "procman-preload": "#f08c00", "procman-nozygote": "#a61e4d",
          "gunicorn": "#1c7ed6", "uvicorn": "#2b8a3e", "granian": "#7048e8"}


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def nice_step(vmax: float, max_ticks: int = 5) -> float:
    """A round grid step (1, 2, 2.5 or 5 × 10^k) giving at most max_ticks lines up to vmax."""
    raw = vmax / max_ticks
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def render_svg(b: Bench) -> str:
    """Grouped bars, one panel per unit: start-up (s) and memory (MiB)."""
    panels = [
        ("Start-up (s, median)", [("first 200", "startup_first"), (f"all {b.n} pids", "startup_all")]),
        ("Memory (MiB, median)", [("master RSS", "mem_master_rss"), ("total RSS", "mem_total_rss"),
                                  ("total PSS", "mem_total_pss")]),
    ]
    W, PH, top, left, gap = 1080, 260, 60, 60, 30
    H = top + len(panels) * (PH + gap)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         'font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="16" font-weight="bold">'
         f'FastAPI app, {b.n} workers: procman vs gunicorn vs uvicorn vs granian'
         f'{" (quick mode)" if b.a.quick else ""}</text>']
    # legend
    lx = left
    for s in b.servers:
        o.append(f'<rect x="{lx}" y="34" width="12" height="12" fill="{COLORS[s]}"/>')
        o.append(f'<text x="{lx + 16}" y="45">{_esc(TITLES[s])}</text>')
        lx += 30 + 7 * len(TITLES[s])
    y0 = top
    for title, metrics in panels:
        vals = {(s, k): median_of(b.results[s].get(k)) for s in b.servers for _, k in metrics}
        top_v = max([v for v in vals.values() if v is not None] or [1.0]) or 1.0
        step = nice_step(top_v * 1.1)
        ticks = int(-(-top_v * 1.1 // step))  # ceil
        vmax = step * ticks
        plot_h = PH - 50
        base = y0 + 20 + plot_h
        o.append(f'<text x="{left}" y="{y0 + 10}" font-size="14" font-weight="bold">{_esc(title)}</text>')
        o.append(f'<line x1="{left}" y1="{base}" x2="{W - 20}" y2="{base}" stroke="#333"/>')
        for i in range(0, ticks + 1):
            gv = step * i
            gy = base - plot_h * i / ticks
            o.append(f'<line x1="{left}" y1="{gy:.1f}" x2="{W - 20}" y2="{gy:.1f}" stroke="#ddd"/>')
            o.append(f'<text x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end" fill="#555">'
                     f'{gv:g}</text>')
        gw = (W - 20 - left) / len(metrics)
        bw = min(60.0, (gw - 30) / max(1, len(b.servers)))
        for gi, (mlabel, key) in enumerate(metrics):
            gx = left + gi * gw + (gw - bw * len(b.servers)) / 2
            for si, s in enumerate(b.servers):
                v = vals[(s, key)]
                x = gx + si * bw
                if v is None:
                    o.append(f'<text x="{x + bw / 2:.1f}" y="{base - 4}" text-anchor="middle" '
                             f'fill="#999">n/a</text>')
                    continue
                h = plot_h * v / vmax
                o.append(f'<rect x="{x + 2:.1f}" y="{base - h:.1f}" width="{bw - 4:.1f}" height="{h:.1f}" '
                         f'fill="{COLORS[s]}"><title>{_esc(TITLES[s])} {mlabel}: {fmt_num(v)}</title></rect>')
                o.append(f'<text x="{x + bw / 2:.1f}" y="{base - h - 4:.1f}" text-anchor="middle">'
                         f'{fmt_num(v)}</text>')
            o.append(f'<text x="{left + gi * gw + gw / 2:.1f}" y="{base + 18}" text-anchor="middle">'
                     f'{_esc(mlabel)}</text>')
        y0 += PH + gap
    o.append("</svg>")
    return "\n".join(o) + "\n"


def stale_sources(root: str, binary: str, examples: bool = True) -> str | None:
    """The newest source file (anything under src/, examples/*.rs unless examples=False,
    Cargo.*, build.rs) if it is newer than the binary, else None. cargo rebuilds on change;
    this catches BENCH_SKIP_SETUP=1 runs."""
    try:
        built = os.stat(binary).st_mtime
    except OSError:
        return "binary missing"
    newest, newest_t = None, 0.0
    cands = [os.path.join(root, f) for f in ("Cargo.toml", "Cargo.lock", "build.rs")]
    for d in ("src", "examples") if examples else ("src",):
        for dp, _, fs in os.walk(os.path.join(root, d)):
            cands += [os.path.join(dp, f) for f in fs if d == "src" or f.endswith(".rs")]
    for f in cands:
        try:
            t = os.stat(f).st_mtime
        except OSError:
            continue
        if t > newest_t:
            newest, newest_t = f, t
    return os.path.relpath(newest, root) if newest and newest_t > built else None


def git_state(root: str, paths: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """(short HEAD, the paths under `paths` with uncommitted changes), by read-only git (no
    index refresh); None if git could not be run."""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        st = subprocess.run(["git", "--no-optional-locks", "-C", root, "status", "--porcelain", "--",
                             *paths], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head, [line[3:] for line in st.splitlines() if line.strip()]


def source_revision(root: str) -> str:
    """Commit of the tree and its uncommitted source changes (read-only git, no index refresh)."""
    state = git_state(root, ("src", "examples", "Cargo.toml", "Cargo.lock"))
    if state is None or not state[0]:
        return "unknown"
    head, dirty = state
    if not dirty:
        return f"commit {head}, clean"
    return f"commit {head} plus uncommitted changes to {', '.join(dirty[:6])}{' …' if len(dirty) > 6 else ''}"


def sh(cmd: list[str]) -> str:
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (cp.stdout or cp.stderr).strip().splitlines()[0] if (cp.stdout or cp.stderr).strip() else "?"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"n/a ({e})"


def machine_info() -> dict:
    model = "?"
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = status_field_path("/proc/meminfo", "MemTotal") or 0
    return {"nproc": sh(["nproc"]), "cpu": model, "kernel": platform.release(),
            "memory": f"{mem / 1024 / 1024:.1f} GiB"}


def package_versions(pkgs) -> dict:
    """{package: installed version or "not installed"} (of this interpreter's environment)."""
    v = {}
    for pkg in pkgs:
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = "not installed"
    return v


def versions(b: Bench) -> dict:
    v = package_versions(("fastapi", "uvicorn", "uvloop", "httptools", "gunicorn", "uvicorn-worker",
                          "starlette", "granian"))
    v["python"] = platform.python_version()
    v["procman"] = sh([b.procman, "--version"]) if os.access(b.procman, os.X_OK) else "not built"
    try:
        built = datetime.datetime.fromtimestamp(os.stat(b.procman).st_mtime, datetime.timezone.utc)
        built_s = f"binary built {built:%H:%M} UTC"
    except OSError:
        built_s = "binary missing"
    stale_now = stale_sources(b.root, b.procman)
    if b.stale_at_start:
        v["procman_build"] = (f"{built_s}, STALE: older than {b.stale_at_start} at the start of the run"
                              " (BENCH_SKIP_SETUP=1 / --skip-setup skips the build)")
    elif stale_now:
        v["procman_build"] = (f"{built_s}, newer than every source file at the start of the run;"
                              f" {stale_now} changed later, during the run, and is not in these figures")
    else:
        v["procman_build"] = f"{built_s}, newer than every source file"
    v["wrk"] = sh(["wrk", "-v"]).split("Copyright")[0].strip()
    v["rustc"] = sh(["rustc", "--version"])
    return v


def rel(path: str, root: str) -> str:
    r = os.path.relpath(path, root)
    return path if r.startswith("..") else r


def command_line(prog: str = "bench/run") -> str:
    """How the driver was invoked, as a `prog` command line (without --root)."""
    args, skip = [], False
    for x in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if x == "--root":
            skip = True
            continue
        if x.startswith("--root="):
            continue
        args.append(x)
    return " ".join([prog] + args)


def render_report(b: Bench, table: str, cmd_table: str, chart_rel: str, spread_table: str = "",
                  curve_table: str = "") -> str:
    mi, ver = machine_info(), versions(b)
    q = " (quick mode: smoke figures, not for comparison)" if b.a.quick else ""
    dur = int((b.t_end - b.t_begin).total_seconds())
    out = [
        "# Benchmarks: procman vs gunicorn vs uvicorn vs granian" + q,
        "",
        f"Generated by `{command_line()}` on {b.t_begin:%Y-%m-%d %H:%M} UTC (run took {dur // 60} min"
        f" {dur % 60} s).",
        "",
        f"How to read: every scenario ran {b.rounds} time{'s' if b.rounds != 1 else ''}"
        + (f", interleaved ({' → '.join(b.servers)}, then again)" if b.rounds > 1 else "")
        + f", on a {mi['nproc']}-CPU machine shared with other"
        " jobs, so single figures are noisy. A cell is the median over the rounds with [min–max];"
        " `(×r)` is that server's median divided by procman's: for times, memory, wake-ups, latency"
        " and CPU a ratio above 1 means procman used less, for req/s a ratio above 1 means the other"
        " server was faster. Where two servers' [min–max] ranges overlap, treat the difference as"
        " noise. The Summary at the end collects the headline comparisons; the load-spread section"
        " is procman alone (shared socket vs `--reuse-port`).",
        "",
        "## Machine and versions",
        "",
        f"- machine: {mi['nproc']} CPUs (`nproc`), {mi['cpu']}, {mi['memory']} RAM, kernel {mi['kernel']};"
        f" load average at start {' '.join(b.loadavg_begin)} (the cores are shared: compare servers only"
        " within one run)",
        f"- procman: {ver['procman']} ({ver['rustc']}, `cargo build --release --bins --examples`;"
        f" {ver['procman_build']}); source at the start of the run: {b.revision}",
        f"- gunicorn {ver['gunicorn']} + uvicorn-worker {ver['uvicorn-worker']}; uvicorn {ver['uvicorn']};"
        f" granian {ver['granian']};"
        f" fastapi {ver['fastapi']} (starlette {ver['starlette']}); uvloop {ver['uvloop']};"
        f" httptools {ver['httptools']}; Python {ver['python']}",
        f"- load generator: {ver['wrk']}; plus the driver's own short-connection loops (Python threads)",
        f"- worker boot floor: `python -c \"import fastapi, uvicorn\"` takes {b.boot_floor:.3f} s here",
        f"- `net.ipv4.tcp_migrate_req` = {b.migrate_req} (matters for `--reuse-port`, see the load-spread"
        " section)",
        "",
        "## Commands",
        "",
        f"The same app (`{b.app}`, cwd `{rel(b.app_dir, b.root)}`), {b.n} workers, a fresh free"
        " port on 127.0.0.1 for every start:",
        "",
        "```",
    ]
    for s in b.servers:
        out.append(b.display_cmd(s))
    out.append("```")
    if "granian" in b.servers:
        out += ["", "granian gets `--respawn-failed-workers`: without it, it does not replace a crashed worker"
                " (the respawn scenario would measure \"never\")."]
    if "blocked" in b.a.scenarios:
        out += ["", "Blocked event loop (9), with a 10 s heartbeat timeout (uvicorn and granian have no"
                " equivalent: –):", "", "```"]
        for s in b.servers:
            if s not in NO_TIMEOUT:
                out.append(b.display_cmd(s, timeout=10))
        out.append("```")
    out += [
        "",
        f"Throughput (4): `wrk -t2 -c64 -d{b.wrk_d}s --latency http://127.0.0.1:PORT/pid`."
        " Boot failure (8): the same commands with `broken:main` (cwd a temp dir), a module that raises"
        " at import. uvicorn and procman run with `--no-access-log`: uvicorn logs every request by"
        " default, gunicorn's access log is off by default.",
        "",
    ]
    if table:
        out += [
            f"## Results ({b.rounds} interleaved round{'s' if b.rounds != 1 else ''}:"
            f" {' → '.join(b.servers)} per scenario and round)",
            "",
            f"Numbers are medians over rounds, [min–max] when there are several; `(×r)` = that server's"
            f" median ÷ procman's. Idle window {b.idle:g} s; wrk `-t2 -c64 -d{b.wrk_d}s`. Request kinds:"
            " ok = 200, refused = ECONNREFUSED, reset = ECONNRESET, empty = closed without a response,"
            " timeout = no answer within 2 s, non200 = another status. – = did not happen within the"
            " scenario's cap (boot failure: {0:.0f} s; blocked loop: {1:.0f} s).".format(b.bootfail_cap,
                                                                                       b.block_cap),
            "",
            table,
            "",
            f"![start-up and memory]({chart_rel})",
            "",
        ]
    if curve_table:
        out += [
            "## Worker-count curve",
            "",
            f"Each server started with N = {', '.join(map(str, b.a.curve_workers))} workers (the same"
            f" command lines with `-w N` / `--workers N`), interleaved server by server for each N in"
            f" every round; memory read after a {b.curve_settle:g} s settle window (not the main"
            f" scenario's idle window). `(×r)` = that server's median ÷ procman default's."
            " `uvicorn --workers 1` runs the app in its main process (no child), so its master RSS"
            " is a worker's and it has no per-worker USS.",
            "",
            curve_table,
            "",
        ]
    if cmd_table:
        out += [
            "## procman command class",
            "",
            f"`procman -w K -b 127.0.0.1:PORT -- target/release/examples/hello` (a std-only HTTP server"
            f" taking its listener from LISTEN_FDS). Spawn = from exec until K distinct pids answered"
            f" `GET /`.",
            "",
            cmd_table,
            "",
        ]
    out += render_spread_section(b, spread_table)
    if b.errors:
        out += ["## Errors during the run", ""] + [f"- {e}" for e in b.errors] + [""]
    out += [
        "## Method",
        "",
        "- Start-up: from `exec` until N distinct worker pids answered `GET /pid` (2 polling threads,"
        " short connections every 5 ms). This is the **client view**: through one shared socket the"
        " kernel picks which waiting worker gets each connection, so \"all N answered\" also measures"
        " how soon the poller happens to reach the last worker, not only when it was ready.",
        "- Readiness, **server view**: the time (from `exec`, polled every 5 ms) at which the server's own"
        " log said N workers were ready: "
        + "; ".join(f"{TITLES[s] if not is_procman(s) else 'procman (every variant)'}: {self_ready_spec(s)[1]}"
                    for s in b.servers if not is_procman(s) or s == min(b.procman_bin_users()))
        + ". procman runs with `--log-format json` for this; its `all-ready` event is shown too."
        " gunicorn's \"Booting worker\" lines are forks, not readiness, so they are not used.",
        "- Per-worker USS: Private_Clean + Private_Dirty from `/proc/PID/smaps_rollup` of each worker"
        " that answered `/pid` (median over the workers); helpers = descendants that are not workers"
        " (procman's zygote, multiprocessing's helpers), their PSS summed.",
        "- Memory: `/proc/PID/status` VmRSS of the master; RSS and PSS from `/proc/PID/smaps_rollup`"
        " summed over the master and all its descendants, read at the end of the idle window.",
        "- Idle cost: deltas over the idle window of the master's `/proc/PID/stat` utime+stime,"
        " `/proc/PID/task/*/schedstat` and `voluntary_ctxt_switches` summed over its threads.",
        "- Respawn and reload: 4 client threads doing short connections to `/pid`, bounded by count"
        " and time; times are from the signal until the event was observed (polled every 5–10 ms).",
        "- Shutdown: SIGTERM is sent once `/proc/net/tcp` shows the `/slow?s=2` connection accepted by"
        " a worker with its request read.",
        "- Load spread: 200 responses per answering pid, from the driver's own loop (a) and from"
        " the wrk Lua tallies (b); per-thread tallies and pids are in `bench/out/results.json`.",
        "- Every process started is killed by pid (process group, descendants and session) at the"
        " end of its scenario; logs are in `bench/out/logs/`, raw figures in `bench/out/results.json`.",
        "",
    ]
    out += render_summary(b)
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def driver_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A driver's argument parser, with the hidden --root (the repository) its wrapper passes."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help=argparse.SUPPRESS)
    return ap


def interrupt_on_signals() -> None:
    """SIGTERM, SIGINT and SIGHUP raise KeyboardInterrupt, so that the finally blocks stop every
    process started (SIGINT also when the driver was started with it ignored, as a background job)."""

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_term)


def parse_args(argv):
    ap = driver_parser("bench/run", __doc__)
    ap.add_argument("--workers", "-w", type=int, default=4, help="workers per server (default 4)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: 1 round, 3 s idle window, 3 s wrk, shorter caps; report in bench/out/BENCHMARKS.quick.md")
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of " + ",".join(SERVERS) + " (default: all of them;"
                    " procman-nozygote only when `procman --help` lists --no-zygote)")
    ap.add_argument("--curve-workers", default="1,2,4,8,16",
                    help="worker counts of the worker-count curve (default 1,2,4,8,16)")
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                    help="comma-separated subset of " + ",".join(SCENARIOS) + " (default: "
                    + ",".join(DEFAULT_SCENARIOS) + "). main = start-up, memory, idle, wrk, respawn, reload,"
                    " shutdown; curve = start-up and memory for --curve-workers; command = procman's command"
                    " class for 1..256 workers; bootfail = the app raises at import; blocked = a blocked"
                    " event loop with a 10 s timeout; spread = requests per worker with and without"
                    " --reuse-port")
    ap.add_argument("--skip-command-class", action="store_true",
                    help="skip procman's command-class spawn/RSS measurements (= --scenarios without command)")
    ap.add_argument("--command-workers", default="1,16,64,256",
                    help="worker counts for the command class (default 1,16,64,256)")
    ap.add_argument("--idle", type=float, default=None, help="idle window in s (default 10; 3 with --quick)")
    ap.add_argument("--wrk-duration", type=int, default=None, help="wrk -d in s (default 10; 3 with --quick)")
    ap.add_argument("--app-dir", default=None, help="directory of the app (default examples/fastapi)")
    ap.add_argument("--app", default="app:main", help="module:attribute (default app:main)")
    ap.add_argument("--out", default=None, help="markdown report (default BENCHMARKS.md at the repo root;"
                    " bench/out/BENCHMARKS.quick.md with --quick)")
    ap.add_argument("--chart", default=None, help="SVG chart (default bench/chart.svg; bench/out/chart.quick.svg with --quick)")
    a = ap.parse_args(argv)
    a.only_explicit = a.only is not None
    a.only = [s.strip() for s in (a.only or ",".join(SERVERS)).split(",") if s.strip()]
    bad = [s for s in a.only if s not in SERVERS]
    if bad or not a.only:
        ap.error(f"--only: unknown server(s) {bad}; choose from {', '.join(SERVERS)}")
    a.command_workers = [int(x) for x in a.command_workers.split(",") if x.strip()]
    a.curve_workers = [int(x) for x in a.curve_workers.split(",") if x.strip()]
    if any(x < 1 for x in a.curve_workers + a.command_workers):
        ap.error("--curve-workers / --command-workers: counts must be >= 1")
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    bad = [s for s in a.scenarios if s not in SCENARIOS]
    if bad or not a.scenarios:
        ap.error(f"--scenarios: unknown {bad}; choose from {', '.join(SCENARIOS)}")
    if a.skip_command_class:
        a.scenarios = [s for s in a.scenarios if s != "command"]
    if a.workers < 1:
        ap.error("--workers must be >= 1")
    return a


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    interrupt_on_signals()
    b = Bench(a)
    if not shutil.which("wrk"):
        log("wrk not found (bench/run installs it)")
        return 1
    if b.procman_bin_users() and os.path.exists(os.path.join(b.out_dir, "cargo-build.failed")):
        log("note: the last cargo build failed (bench/out/cargo-build.log)")
    if b.procman_bin_users():
        stale = stale_sources(b.root, b.procman)
        if stale:  # the same check is recorded at the start of b.run() for the report
            log(f"WARNING: target/release/procman is older than {stale}: the figures are for an old"
                " build (run bench/run without BENCH_SKIP_SETUP=1 / --skip-setup to rebuild)")
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted: stopping every process started")
        REG.cleanup_all()
        return 130
    finally:
        REG.cleanup_all()
    table, cmd_table, spread_table = render_table(b), render_cmd_table(b), render_spread(b)
    curve_table = render_curve(b)
    # a smoke run never overwrites the committed report
    out_md = os.path.abspath(a.out or (os.path.join(b.out_dir, "BENCHMARKS.quick.md") if a.quick
                                       else os.path.join(b.root, "BENCHMARKS.md")))
    chart = os.path.abspath(a.chart or (os.path.join(b.out_dir, "chart.quick.svg") if a.quick
                                        else os.path.join(b.bench_dir, "chart.svg")))
    with open(chart, "w") as f:
        f.write(render_svg(b))
    report = render_report(b, table, cmd_table, os.path.relpath(chart, os.path.dirname(out_md)),
                           spread_table, curve_table)
    with open(out_md, "w") as f:
        f.write(report)
    with open(os.path.join(b.out_dir, "results.json"), "w") as f:
        json.dump({"servers": b.results, "command_class": b.cmd_results, "spread": b.spread_results,
                   "tcp_migrate_req": b.migrate_req, "errors": b.errors,
                   "workers": b.n, "rounds": b.rounds, "quick": a.quick}, f, indent=1, default=str)
    print(table)
    if curve_table:
        print()
        print(curve_table)
    if cmd_table:
        print()
        print(cmd_table)
    if spread_table:
        print()
        print(spread_table)
    if b.errors:
        print("\nErrors:\n" + "\n".join(f"- {e}" for e in b.errors))
    print(f"\nwritten: {out_md}, {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
