#!/usr/bin/env python3
"""A stdlib-only worker for procman's *command* class, used by the integration tests.

It takes its listeners by the systemd convention (LISTEN_FDS, first at fd 3,
LISTEN_PID must be our pid), serves a tiny HTTP/1.0 subset and speaks
sd_notify to NOTIFY_SOCKET. Switches make it misbehave in the ways the tests
need (late, never ready, silent, crashing, deaf to TERM, ...).

HTTP (every response is `Connection: close`; the body is our pid as text):
    GET / and GET /pid     the pid
    GET /slow?s=N          sleeps N seconds (its own thread), then the pid

Behaviour worth knowing when writing tests:
* It accepts connections only once it is ready (READY=1 sent; or at once with
  --no-notify or without NOTIFY_SOCKET). A worker that is not ready yet, or
  --never-ready, leaves connections queued for its siblings, as a booting
  server would.
* Heartbeats (WATCHDOG=1) come from the main thread, the one that accepts.
* SIGTERM (and SIGINT): log `term`, stop accepting, finish every accepted
  connection, exit 0. SIGUSR1: log `usr1`, keep going.
* --log FILE gets `<pid> start`, `<pid> term`, `<pid> usr1`, one line each.
* --dump-env FILE writes one JSON object: every environment variable as
  received (LISTEN_* included; bytes that are not UTF-8 shown as U+FFFD), plus
  the key "fds": the numbers of the fds open when the interpreter handed over
  control, as a sorted list of integers, and "environb_hex": the exact bytes,
  as {hex(name): hex(value)}.
* The listeners' O_NONBLOCK flag is shared with every other worker and is
  never touched: an accept that lost the race for a connection to a sibling
  is cut short by a timer instead (see accept_nowait).
"""

import os


def _open_fds():
    # First thing, before this process opens anything. listdir lists its own
    # directory fd too; that one is closed again by the time we stat it.
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        found.append(int(name))
    return sorted(found)


FDS_AT_START = _open_fds()

import argparse  # noqa: E402  (after the fd snapshot on purpose)
import ctypes
import errno
import json
import select
import signal
import socket
import sys
import threading
import time
from urllib.parse import parse_qs

PID = os.getpid()
HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGALRM}
_libc = ctypes.CDLL(None, use_errno=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ready-after", type=float, default=0.0, metavar="SECS",
                   help="send READY=1 this long after start (default: at once)")
    p.add_argument("--never-ready", action="store_true", help="never send READY=1 (and never serve)")
    p.add_argument("--no-notify", action="store_true", help="never send anything; serve at once")
    p.add_argument("--heartbeat", type=float, metavar="SECS",
                   help="send WATCHDOG=1 this often (default: WATCHDOG_USEC/2 if set, else never)")
    p.add_argument("--silent-after", type=float, metavar="SECS", help="stop heartbeats after SECS, keep serving")
    p.add_argument("--exit-after-ready", action="store_true", help="send READY=1, then exit 0 at once")
    p.add_argument("--exit-code", type=int, metavar="N", help="exit status for --exit-after (default 0)")
    p.add_argument("--exit-after", type=float, metavar="SECS",
                   help="exit this long after start (default with --exit-code: at once, before READY)")
    p.add_argument("--ignore-term", action="store_true", help="SIG_IGN on SIGTERM")
    p.add_argument("--extend-on-term", type=int, metavar="USEC",
                   help="on SIGTERM, send EXTEND_TIMEOUT_USEC=USEC and keep running (never stop)")
    p.add_argument("--status", metavar="TEXT", help="send STATUS=TEXT at start")
    p.add_argument("--extend-timeout-usec", type=int, metavar="N",
                   help="send EXTEND_TIMEOUT_USEC=N at start, before waiting --ready-after")
    p.add_argument("--watchdog-trigger-after", type=float, metavar="SECS", help="send WATCHDOG=trigger after SECS")
    p.add_argument("--recycle-after", type=float, metavar="SECS", help="send X_PROCMAN_RECYCLE=test after SECS")
    p.add_argument("--log", metavar="FILE", help="append '<pid> start|term|usr1' lines")
    p.add_argument("--dump-env", metavar="FILE", help="write the environment and open fds as JSON")
    args = p.parse_args()
    if args.exit_code is not None and args.exit_after is None:
        args.exit_after = 0.0
    return args


def log_event(path, what):
    if path:
        with open(path, "a") as f:
            f.write(f"{PID} {what}\n")
            f.flush()


def dump_env(path):
    data = {
        k.decode(errors="replace"): v.decode(errors="replace") for k, v in os.environb.items()
    }
    data["environb_hex"] = {k.hex(): v.hex() for k, v in os.environb.items()}
    data["fds"] = FDS_AT_START
    if os.path.exists(path) and not os.path.isfile(path):
        # A device such as /dev/null: write to it, never rename over it.
        with open(path, "w") as f:
            json.dump(data, f)
        return
    tmp = f"{path}.{PID}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # readers never see half a file


class Notifier:
    def __init__(self, enabled):
        path = os.environ.get("NOTIFY_SOCKET", "")
        self.address = None
        if enabled and path.startswith("@"):
            self.address = "\0" + path[1:]
        elif enabled and path.startswith("/"):
            self.address = path
        self.sock = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)

    def send(self, text):
        if self.sock is None:
            return
        try:
            self.sock.sendto(text.encode(), self.address)
        except OSError:
            pass  # receiver gone or queue full: a test worker just carries on


def take_listeners():
    count = os.environ.pop("LISTEN_FDS", "")
    pid = os.environ.pop("LISTEN_PID", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not count.isdigit() or int(count) < 1 or pid != str(PID):
        sys.exit(f"notify_worker: no listeners for us (LISTEN_FDS={count!r} LISTEN_PID={pid!r}, pid {PID})")
    listeners = []
    for fd in range(3, 3 + int(count)):
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        listeners.append(sock)
    return listeners


def accept_nowait(listener):
    """accept4() that gives up after 50 ms, without touching O_NONBLOCK.

    Every worker is woken for a new connection, one wins it, and on a blocking
    listener the others would sleep in accept() until the next one, starving
    heartbeats and TERM handling. Python's accept() retries on EINTR, so call
    accept4 through ctypes and let a one-shot timer interrupt it: either the
    kernel handed us a connection (then we own it, whatever the timer does
    next) or it did not. Nothing can be lost in between.
    """
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        fd = _libc.accept4(listener.fileno(), None, None, socket.SOCK_CLOEXEC)
        err = ctypes.get_errno()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if fd >= 0:
        return socket.socket(fileno=fd)
    if err in (errno.EINTR, errno.EAGAIN, errno.ECONNABORTED):
        return None
    raise OSError(err, os.strerror(err))


class Connections:
    """Handler threads, counted so that a stop can wait for them."""

    def __init__(self):
        self.active = 0
        self.cond = threading.Condition()

    def start(self, conn):
        with self.cond:
            self.active += 1
        # Handler threads inherit a mask that blocks our signals: they must go
        # to the main thread, whose accept4 the timer is meant to interrupt.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            threading.Thread(target=self.run, args=(conn,), daemon=True).start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def run(self, conn):
        try:
            serve_one(conn)
        except Exception:
            pass
        finally:
            conn.close()
            with self.cond:
                self.active -= 1
                self.cond.notify_all()

    def wait_idle(self):
        with self.cond:
            while self.active:
                self.cond.wait()


def serve_one(conn):
    conn.settimeout(10)  # the accepted socket is ours alone
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        chunk = conn.recv(4096)
        if not chunk or len(data) > 65536:
            return
        data += chunk
    parts = data.split(b"\n", 1)[0].decode("latin-1").split()
    method, target = (parts + ["", ""])[:2]
    path, _, query = target.partition("?")
    status, body = "200 OK", str(PID)
    if method not in ("GET", "HEAD"):
        status, body = "405 Method Not Allowed", "method not allowed\n"
    elif path == "/slow":
        try:
            time.sleep(float(parse_qs(query).get("s", ["1"])[0]))
        except ValueError:
            status, body = "400 Bad Request", "bad s\n"
    elif path not in ("/", "/pid"):
        status, body = "404 Not Found", "not found\n"
    head = (f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    conn.sendall(head.encode() + (b"" if method == "HEAD" else body.encode()))
    # Half-close and read to EOF: closing with unread input would send a reset.
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(2)
    while conn.recv(4096):
        pass


def main():
    args = parse_args()
    start = time.monotonic()
    # Signals first: handlers only record; the wakeup pipe makes poll() return at once.
    events = []
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: events.append(signum))
    signal.signal(signal.SIGALRM, lambda signum, frame: None)  # only there to interrupt accept4
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    if args.dump_env:
        dump_env(args.dump_env)
    log_event(args.log, "start")
    listeners = take_listeners()
    notifier = Notifier(enabled=not args.no_notify)

    heartbeat = args.heartbeat
    usec = os.environ.get("WATCHDOG_USEC", "")
    if heartbeat is None and usec.isdigit() and int(usec) > 0 \
            and os.environ.get("WATCHDOG_PID", str(PID)) == str(PID):
        heartbeat = int(usec) / 2e6

    def at(secs):
        return None if secs is None else start + secs

    ready_at = None if args.never_ready else at(args.ready_after)
    exit_at, silent_at = at(args.exit_after), at(args.silent_after)
    once = {"WATCHDOG=trigger": at(args.watchdog_trigger_after), "X_PROCMAN_RECYCLE=test": at(args.recycle_after)}
    next_beat = start if heartbeat else None
    connections = Connections()
    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    by_fd = {sock.fileno(): sock for sock in listeners}

    def start_accepting():
        for fd in by_fd:
            poller.register(fd, select.POLLIN)

    if notifier.sock is None:
        start_accepting()  # nobody to tell: ready from the start
    if args.status is not None:
        notifier.send(f"STATUS={args.status}")
    if args.extend_timeout_usec is not None:
        notifier.send(f"EXTEND_TIMEOUT_USEC={args.extend_timeout_usec}")

    stopping = False
    while not stopping:
        now = time.monotonic()
        if exit_at is not None and now >= exit_at:
            os._exit(args.exit_code or 0)  # a crash: whatever is in flight is lost, on purpose
        if ready_at is not None and now >= ready_at:
            ready_at = None
            notifier.send("READY=1")
            if args.exit_after_ready:
                os._exit(0)
            if notifier.sock is not None:
                start_accepting()
        if next_beat is not None and now >= next_beat:
            if silent_at is None or now < silent_at:
                notifier.send("WATCHDOG=1")
            next_beat = now + heartbeat
        for message, when in once.items():
            if when is not None and now >= when:
                notifier.send(message)
                once[message] = None

        deadlines = [d for d in (exit_at, ready_at, next_beat, *once.values()) if d is not None]
        timeout = min([d - now for d in deadlines] + [1.0])
        for fd, _ in poller.poll(max(0.0, timeout) * 1000):
            if fd in by_fd:
                conn = accept_nowait(by_fd[fd])
                if conn is not None:
                    connections.start(conn)
        try:
            while os.read(wake_r, 512):  # empty the wakeup pipe
                pass
        except BlockingIOError:
            pass
        while events:
            signum = events.pop(0)
            if signum == signal.SIGUSR1:
                log_event(args.log, "usr1")
            elif signum == signal.SIGTERM and args.extend_on_term is not None:
                log_event(args.log, "term")
                notifier.send(f"EXTEND_TIMEOUT_USEC={args.extend_on_term}")
            elif not stopping:
                if signum == signal.SIGTERM:
                    log_event(args.log, "term")
                stopping = True

    # Stop: accept nothing more (what is still queued belongs to the siblings),
    # answer everything already accepted.
    for sock in listeners:
        sock.close()
    connections.wait_idle()
    sys.exit(0)


if __name__ == "__main__":
    main()
