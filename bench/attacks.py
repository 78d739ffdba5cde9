"""Attacks on the master (issue 24): what a hostile sender costs the master.

For each attack, a fresh `procman -w N --metrics 127.0.0.1:PORT -- hello`
(the std-only example worker) runs; once its workers are up the attack
starts, and during it the script measures, beside the same figures with no
attack:

* master RSS: the most VmRSS seen (sampled every 20 ms), KiB;
* reap delay: SIGKILL one worker -> its replacement seen as a new child
  of the master (polled every 2 ms), ms;
* /healthz latency: sequential requests (2 s timeout each, a timeout
  counted as 2000 ms and as failed), median and max, ms;
* TERM-to-exit: SIGTERM to the master while the attack still runs -> its
  exit, ms.

A figure that could not be had is `-`: no replacement within 5 x the
duration, no exit within 30 s of TERM, or a master killed at the RSS cap.

Bounded in time: each attack runs `--duration` seconds (default 4) plus the
stop; a master whose RSS passes `--rss-cap` MiB (default 512) is killed
(the figure then says so) rather than left to eat the machine.

An attack is one function `attack_<name>(ctx) -> stop()` registered in
ATTACKS: it starts whatever it needs against ctx.notify_socket (the path
the workers got in NOTIFY_SOCKET), ctx.metrics (host, port) or
ctx.master (pid), and returns a function that stops it and returns a short
note. A zygote-channel flood or a /metrics scrape burst is one more such
function.

Usage: bench/attacks.py [--procman target/release/procman]
       [--hello target/release/examples/hello] [--workers 4]
       [--duration 4] [--attacks none,notify-flood,fd-linger]
"""

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(name))
    return sorted(out)


def vm_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def notify_socket_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        for kv in f.read().split(b"\0"):
            if kv.startswith(b"NOTIFY_SOCKET="):
                return kv.split(b"=", 1)[1].decode()
    raise RuntimeError("no NOTIFY_SOCKET in the worker's environment")


def healthz(addr, timeout=2.0):
    """Latency of one GET /healthz in ms, and whether it answered 200."""
    t = time.monotonic()
    try:
        c = http.client.HTTPConnection(*addr, timeout=timeout)
        c.request("GET", "/healthz")
        ok = c.getresponse().status == 200
        c.close()
    except OSError:
        ok = False
    return min((time.monotonic() - t) * 1000, timeout * 1000), ok


class Ctx:
    def __init__(self, master, notify_socket, metrics):
        self.master = master
        self.notify_socket = notify_socket
        self.metrics = metrics


# ---- attacks: each starts, and returns stop() -> note ----

def attack_none(ctx):
    return lambda: ""


FLOOD = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
payload = b"WATCHDOG=1\n" * 5900
while True:
    try:
        s.sendto(payload, sys.argv[1])
    except OSError:
        pass
"""


def attack_notify_flood(ctx):
    """Issue 24 item 1: six senders, WATCHDOG=1 x 5900 per datagram, in a loop."""
    procs = [subprocess.Popen([sys.executable, "-c", FLOOD, ctx.notify_socket]) for _ in range(6)]

    def stop():
        for p in procs:
            p.kill()
            p.wait()
        return "6 senders"
    return stop


LINGER = r"""
import array, os, signal, socket, struct, sys, time
master = int(sys.argv[2])
peer = socket.socket()
peer.bind(("127.0.0.1", 0))
peer.listen(1024)
tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sent = refused = 0
# Does the kernel refuse descriptors here (SO_PASSRIGHTS)? Asked once with
# /dev/null (harmless to close anywhere).
try:
    with open("/dev/null") as null:
        tx.sendmsg([b"X_PROBE=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", [null.fileno()]))], 0, sys.argv[1])
    refusing = False
except PermissionError:
    refusing = True
while True:
    socks = []
    for _ in range(4):
        s = socket.create_connection(peer.getsockname())
        s.setblocking(False)
        try:
            while True:
                s.send(b"x" * 65536)
        except BlockingIOError:
            pass
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
        socks.append(s)
    # The attacker who wins the race: its copies are closed before the
    # master reads the datagram, so the master's close is the last (the
    # bench, as root, holds the master still for those microseconds; not
    # where the kernel refuses, which would only measure the stop).
    if not refusing:
        os.kill(master, signal.SIGSTOP)
    try:
        tx.sendmsg([b"WATCHDOG=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [s.fileno() for s in socks]))], 0, sys.argv[1])
        sent += 1
    except OSError:
        refused += 1
        for s in socks:  # ours are the last: do not linger here
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    for s in socks:
        s.close()
    if not refusing:
        os.kill(master, signal.SIGCONT)
    print(sent, refused, flush=True)
    time.sleep(0.25)
"""


def attack_fd_linger(ctx):
    """Issue 24 item 3: 4 TCP sockets with unsent data and SO_LINGER=(1, 5) per datagram, 4 a second."""
    p = subprocess.Popen([sys.executable, "-c", LINGER, ctx.notify_socket, str(ctx.master)],
                         stdout=subprocess.PIPE, text=True, errors="replace")
    last = ["0 0"]

    def read():
        for line in p.stdout:
            last[0] = line.strip()
    t = threading.Thread(target=read, daemon=True)
    t.start()

    def stop():
        p.kill()
        p.wait()
        try:
            os.kill(ctx.master, signal.SIGCONT)  # never left stopped
        except OSError:
            pass
        t.join(timeout=2)
        sent, refused = last[0].split()
        return f"datagrams with 4 fds: {sent} passed, {refused} refused by the kernel"
    return stop


ATTACKS = {
    "none": attack_none,
    "notify-flood": attack_notify_flood,
    "fd-linger": attack_fd_linger,
}


def run(args, name):
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = open(os.path.join(tmp, "procman.log"), "w+")
        master = subprocess.Popen(
            [args.procman, "-b", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}",
             "-w", str(args.workers), "--", args.hello],
            stdout=log, stderr=log, cwd=tmp)
        try:
            return measure(args, name, master, ("127.0.0.1", port))
        finally:
            if master.poll() is None:
                master.kill()
                master.wait()
            log.close()


def wait(cond, timeout, step=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(step)
    return None


def measure(args, name, master, addr):
    pid = master.pid
    if not wait(lambda: len(children(pid)) == args.workers and healthz(addr)[1], 30):
        raise RuntimeError(f"{name}: procman did not come up")
    ctx = Ctx(pid, notify_socket_of(children(pid)[0]), addr)
    rss = [vm_rss_kib(pid) or 0]
    lat = []
    done = threading.Event()
    capped = []

    def sample_rss():
        while not done.is_set():
            r = vm_rss_kib(pid)
            if r is None:
                return
            rss.append(r)
            if r > args.rss_cap * 1024:
                capped.append(r)
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    probing = threading.Event()
    probing.set()

    def probe():
        while probing.is_set():
            lat.append(healthz(addr))
            time.sleep(0.01)

    threads = [threading.Thread(target=sample_rss), threading.Thread(target=probe)]
    stop = ATTACKS[name](ctx)
    for t in threads:
        t.start()
    time.sleep(args.duration / 2)
    t0 = time.monotonic()
    reap_ms = None
    kids = children(pid)
    if kids and master.poll() is None:
        victim = kids[0]
        os.kill(victim, signal.SIGKILL)
        replaced = wait(lambda: (lambda k: len(k) == args.workers and victim not in k)(children(pid)),
                        args.duration * 5, step=0.002)
        reap_ms = (time.monotonic() - t0) * 1000 if replaced else None
    time.sleep(max(0, args.duration / 2 - (time.monotonic() - t0)))
    probing.clear()  # what answers during the stop is not the attack's doing
    threads[1].join()
    t1 = time.monotonic()
    if master.poll() is None:
        master.send_signal(signal.SIGTERM)
    try:
        master.wait(timeout=30)
        term_ms = None if capped else (time.monotonic() - t1) * 1000
    except subprocess.TimeoutExpired:
        term_ms = None
    done.set()
    note = stop()
    for t in threads:
        t.join()
    ms = [m for m, _ in lat] or [0]
    return {
        "attack": name,
        "rss_max_kib": max(rss),
        "rss_capped": bool(capped),
        "reap_ms": reap_ms,
        "healthz_median_ms": statistics.median(ms),
        "healthz_max_ms": max(ms),
        "healthz_failed": sum(1 for _, ok in lat if not ok),
        "healthz_n": len(lat),
        "term_ms": term_ms,
        "note": note,
    }


def fmt(v, unit=""):
    return "-" if v is None else (f"{v:.1f}{unit}" if isinstance(v, float) else f"{v}{unit}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procman", default=os.path.join(REPO, "target/release/procman"), type=os.path.abspath)
    ap.add_argument("--hello", default=os.path.join(REPO, "target/release/examples/hello"), type=os.path.abspath)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--rss-cap", type=int, default=512, help="MiB; the master is killed past it")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    args = ap.parse_args()
    print(f"procman {args.procman}, {args.workers} workers, {args.duration}s per attack, kernel {os.uname().release}")
    print(f"{'attack':<14}{'RSS max KiB':>12}{'reap ms':>10}{'healthz med/max ms':>20}{'failed':>8}{'TERM ms':>10}  note")
    for name in args.attacks.split(","):
        r = run(args, name)
        rss = f"{r['rss_max_kib']}{' (cap)' if r['rss_capped'] else ''}"
        hz = f"{fmt(r['healthz_median_ms'])}/{fmt(r['healthz_max_ms'])}"
        print(f"{name:<14}{rss:>12}{fmt(r['reap_ms']):>10}{hz:>20}"
              f"{r['healthz_failed']:>4}/{r['healthz_n']:<3}{fmt(r['term_ms']):>10}  {r['note']}", flush=True)


if __name__ == "__main__":
    main()
