"""procman's uvicorn worker bootstrap (embedded in the binary, run as `python -c <this>`).

What this file owns, between the Rust master and uvicorn:

* Sockets. The master hands over listeners by the systemd convention
  (LISTEN_FDS / LISTEN_PID, fds 3..3+n-1). They are wrapped with
  socket.socket(fileno=fd), which asks the kernel for the family, never with
  uvicorn's `fd=` (that one assumes AF_UNIX).
* Readiness and liveness, over NOTIFY_SOCKET (sd_notify): READY=1 only after
  uvicorn's startup (lifespan included) succeeded; WATCHDOG=1 from a task on
  the event loop, so a blocked loop stops the heartbeat and the master's
  --timeout catches it; STOPPING=1 when a stop begins;
  X_PROCMAN_RECYCLE=max-requests when --max-requests is reached.
* The app import, so that a broken app gives one recognisable last line and
  exit status 4 instead of a uvicorn log line and status 3.

Invariants:
* No datagram may block the event loop: the notify socket is non-blocking and
  a message that does not fit is dropped (the next heartbeat follows anyway).
* A graceful stop never resets a connection this worker has accepted: stop
  accepting first, let accepted connections deliver their request, then run
  uvicorn's own drain. Connections still in the kernel's accept queue belong
  to the shared listener and are served by the other workers.
* A stop the master asked for (TERM, INT, QUIT) ends with exit status 0.
  Other statuses: 3 = could not start (no uvicorn, no sockets, bad config,
  lifespan startup failed), 4 = the app could not be imported.
* Importing the app (load_app) is separate from serving it (serve), so that a
  zygote can import once and fork workers that only call serve().
"""

import asyncio
import contextlib
import importlib
import json
import os
import random
import signal
import socket
import sys
import traceback

EXIT_CANNOT_START = 3  # also what uvicorn itself uses for a lifespan startup failure
EXIT_IMPORT_FAILED = 4
# How long accepted connections may take to deliver their request once we
# stopped accepting. Long enough for a request already on the wire, short
# enough not to matter next to --graceful-timeout.
REQUEST_GRACE = 0.5


def fail(message, code):
    print(f"procman: {message}", file=sys.stderr, flush=True)
    # The master names the cause in its own last line (X_PROCMAN_ERROR is
    # procman's private key; systemd ignores X_ keys).
    tell_master("X_PROCMAN_ERROR=" + message.replace("\n", " ")[:3000])
    sys.exit(code)


# Kept before Notifier.from_env() takes the variable out of the environment
# (so the app's own subprocesses do not inherit it).
NOTIFY_PATH = os.environ.get("NOTIFY_SOCKET", "")


def tell_master(text):
    path = NOTIFY_PATH
    if not path.startswith(("/", "@")):
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with contextlib.suppress(OSError):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(text.encode("utf-8", "replace"), address)


def exit_now(signum=None, frame=None):
    # Until uvicorn serves there is nothing to drain: a stop signal just ends
    # the process (os._exit, so an app import in progress cannot swallow it).
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def ignore(signum, frame):
    # USR1 is forwarded by the master for log reopening; our logs go to the
    # inherited stderr, so there is nothing to reopen. A Python-level no-op
    # (rather than SIG_IGN) is reset to the default by exec in any child.
    pass


for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
    signal.signal(_sig, exit_now)
signal.signal(signal.SIGUSR1, ignore)

# Like gunicorn and the uvicorn CLI: the app directory (our cwd) comes first.
sys.path.insert(0, os.getcwd())
try:
    import uvicorn
except ImportError as exc:
    fail(
        f"uvicorn is not installed for {sys.executable}: {exc} (install it with "
        f"'{sys.executable} -m pip install uvicorn', or point --python at an "
        "interpreter that has it)",
        EXIT_CANNOT_START,
    )


class Notifier:
    """sd_notify sender. Never raises, never blocks."""

    def __init__(self, address, watchdog_interval):
        self.address = address
        self.watchdog_interval = watchdog_interval  # seconds, or None
        self.sock = None
        if address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # CLOEXEC by default
            self.sock.setblocking(False)

    @classmethod
    def from_env(cls):
        # Removed from the environment so that processes the app starts do not
        # report READY/WATCHDOG in our name (the master accepts messages from
        # a worker's descendants and attributes them to the worker).
        path = os.environ.pop("NOTIFY_SOCKET", "")
        usec = os.environ.pop("WATCHDOG_USEC", "")
        wpid = os.environ.pop("WATCHDOG_PID", "")
        if path.startswith("@"):
            address = "\0" + path[1:]  # abstract; CPython then omits the trailing NUL
        elif path.startswith("/"):
            address = path
        else:
            address = None  # unset, or a kind we do not speak (vsock:)
        interval = None
        if address and usec.isdigit() and int(usec) > 0 and wpid in ("", str(os.getpid())):
            interval = int(usec) / 4e6  # four beats per timeout: one lost datagram is harmless
        return cls(address, interval)

    def send(self, *lines):
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError:  # EAGAIN (queue full), master gone, ...: drop it
            return False


def listen_sockets():
    """The listeners from LISTEN_FDS, as socket objects; LISTEN_* are consumed."""
    count = os.environ.pop("LISTEN_FDS", "")
    pid = os.environ.pop("LISTEN_PID", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not count.isdigit() or int(count) < 1 or pid != str(os.getpid()):
        fail(
            f"no listening sockets were passed (LISTEN_FDS={count!r}, LISTEN_PID={pid!r}, "
            f"own pid {os.getpid()})",
            EXIT_CANNOT_START,
        )
    sockets = []
    for fd in range(3, 3 + int(count)):
        try:
            sock = socket.socket(fileno=fd)  # family and type come from the kernel
        except OSError as exc:
            fail(f"fd {fd} from LISTEN_FDS is not a socket: {exc}", EXIT_CANNOT_START)
        if sock.type != socket.SOCK_STREAM:
            fail(f"fd {fd} from LISTEN_FDS is not a stream socket", EXIT_CANNOT_START)
        # The master cleared FD_CLOEXEC to hand the fd over; set it again so
        # that subprocesses of the app do not hold the port open.
        sock.set_inheritable(False)
        # O_NONBLOCK: asyncio and uvloop put the listener in non-blocking mode
        # when serving it (create_server calls sock.setblocking(False)). That
        # flag lives on the open file description, which every worker shares,
        # and no dup() can give us a private one. It is harmless among uvicorn
        # workers: all of them accept only when the loop reports readiness and
        # treat EAGAIN (a sibling took the connection) as "nothing to do".
        sockets.append(sock)
    return sockets


def read_config():
    defaults = {
        "app": None, "factory": False, "interface": "auto", "lifespan": "auto",
        "http": "auto", "loop": "auto", "keep_alive": 5, "limit_concurrency": None,
        "proxy_headers": True, "forwarded_allow_ips": None, "root_path": "",
        "ssl_keyfile": None, "ssl_certfile": None, "access_log": True,
        "log_level": "info", "graceful_timeout": 30.0, "max_requests": 0,
        "max_requests_jitter": 0, "mode": "worker", "backlog": 2048,
    }
    if "PROCMAN_APP_CONFIG" not in os.environ:
        fail("PROCMAN_APP_CONFIG is not set (this program is started by procman)", EXIT_CANNOT_START)
    try:
        given = json.loads(os.environ["PROCMAN_APP_CONFIG"])
        if not isinstance(given, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        fail(f"PROCMAN_APP_CONFIG is not a valid JSON object: {exc}", EXIT_CANNOT_START)
    # null means "unset": keep the default then.
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def load_app(spec, factory):
    """Import `module:attr.sub` (and call it if a factory). Exits 4 on any failure."""
    module_name, _, attrs = (spec or "").partition(":")
    if not module_name or not attrs:
        fail(f"Failed to load application '{spec}': ValueError: expected 'module:attribute'",
             EXIT_IMPORT_FAILED)
    try:
        obj = importlib.import_module(module_name)
        for attr in attrs.split("."):
            obj = getattr(obj, attr)
        if factory:
            obj = obj()
    except (Exception, SystemExit) as exc:  # SystemExit: an app calling sys.exit() at import
        # The user's traceback, without the importlib/bootstrap frames in front of it.
        tb = traceback.TracebackException.from_exception(exc)
        tb.stack = traceback.StackSummary.from_list(
            [f for f in tb.stack if f.filename not in ("<string>", importlib.__file__)
             and not f.filename.startswith("<frozen importlib")])
        print("".join(tb.format()), end="", file=sys.stderr)
        message = " ".join(str(exc).split())  # the last line stays one line
        fail(f"Failed to load application '{spec}': {type(exc).__name__}"
             + (f": {message}" if message else ""), EXIT_IMPORT_FAILED)
    return obj


class ProcmanServer(uvicorn.Server):
    """uvicorn.Server plus sd_notify, a connection-preserving stop and recycling by request."""

    def __init__(self, config, notifier, recycle_after, label):
        super().__init__(config)
        self.notifier = notifier
        self.recycle_after = recycle_after  # requests, or None (also None: uvicorn's own limit is used)
        self.recycle_requested = False
        self.label = label
        self.loop = None
        self.heartbeat = None

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {
            signal.SIGQUIT: signal.signal(signal.SIGQUIT, self.quick_stop),
            signal.SIGUSR1: signal.signal(signal.SIGUSR1, ignore),
        }
        try:
            with super().capture_signals():  # TERM/INT: graceful, a second INT forces
                try:
                    yield
                finally:
                    # uvicorn re-raises the stop signal once it is done so that the
                    # process dies "by" it. A worker is done, and a stop the master
                    # asked for is a clean exit: status 0.
                    self._captured_signals.clear()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def quick_stop(self, signum, frame):
        if not self.started or self.loop is None:
            exit_now()
        self.should_exit = self.force_exit = True
        # A signal handler may run in the middle of a loop callback: do the
        # work from the loop itself.
        self.loop.call_soon_threadsafe(self.abort_connections)

    def abort_connections(self):
        for conn in list(self.server_state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        for task in list(self.server_state.tasks):
            task.cancel()

    async def beat(self):
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(self.notifier.watchdog_interval)

    async def startup(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        if self.notifier.watchdog_interval:
            # Beats start with the boot: a long lifespan startup is not a hang.
            self.heartbeat = self.loop.create_task(self.beat())
        await super().startup(sockets=sockets)  # a failed lifespan startup exits 3 from here
        if self.started and not self.should_exit:
            self.notifier.send("READY=1", f"STATUS=serving {self.label}")

    async def on_tick(self, counter):
        if (self.recycle_after is not None and not self.recycle_requested
                and self.server_state.total_requests >= self.recycle_after):
            # Ask to be replaced and keep serving: the master starts the
            # replacement first and sends TERM once it is ready. Retried on
            # the next tick if the datagram was dropped.
            self.recycle_requested = self.notifier.send("X_PROCMAN_RECYCLE=max-requests")
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None):
        self.notifier.send("STOPPING=1", f"STATUS=stopping {self.label}")
        if not self.force_exit:
            started = self.loop.time()
            for server in self.servers:
                server.close()  # stop accepting; closes only our fd of the shared listener
            await self.let_requests_arrive()
            if self.config.timeout_graceful_shutdown is not None:
                spent = self.loop.time() - started
                self.config.timeout_graceful_shutdown = max(0.0, self.config.timeout_graceful_shutdown - spent)
        if self.force_exit:
            self.abort_connections()
        await super().shutdown(sockets=sockets)

    async def let_requests_arrive(self):
        # uvicorn's shutdown closes every connection with no request in
        # progress. One that was just accepted, or whose request is still on the
        # wire, would see a reset. So wait (at most REQUEST_GRACE) until no
        # connection is idle; meanwhile a connection that is mid-request is told
        # to close after its response instead of keeping alive.
        deadline = self.loop.time() + REQUEST_GRACE
        while not self.force_exit:
            await asyncio.sleep(0.02)  # first: lets just-accepted connections register
            waiting = False
            for conn in list(self.server_state.connections):
                cycle = getattr(conn, "cycle", conn)
                if cycle is conn:
                    continue  # no HTTP cycle (websocket, other protocol): uvicorn's drain handles it
                if cycle is None or cycle.response_complete:
                    waiting = True
                else:
                    conn.shutdown()  # only sets keep_alive = False while a request is in progress
            if not waiting or self.loop.time() >= deadline:
                return


def serve(app, config, sockets, notifier):
    """Serve an already imported app on the given listeners until stopped. Returns the exit status."""
    max_requests = int(config["max_requests"] or 0)
    recycle_after = None
    limit_max_requests = None
    if max_requests > 0:
        limit = max_requests + random.randint(0, max(0, int(config["max_requests_jitter"] or 0)))
        if notifier.sock is not None:
            recycle_after = limit
        else:
            limit_max_requests = limit  # nobody to ask: recycle the uvicorn way (exit)
    uv_config = uvicorn.Config(
        app,
        factory=False,  # load_app already called the factory
        workers=1,  # else uvicorn reads WEB_CONCURRENCY
        interface=config["interface"],
        lifespan=config["lifespan"],
        http=config["http"],
        loop=config["loop"],
        timeout_keep_alive=int(config["keep_alive"]),
        limit_concurrency=config["limit_concurrency"],
        limit_max_requests=limit_max_requests,
        proxy_headers=bool(config["proxy_headers"]),
        forwarded_allow_ips=config["forwarded_allow_ips"],
        root_path=config["root_path"],
        ssl_keyfile=config["ssl_keyfile"],
        ssl_certfile=config["ssl_certfile"],
        access_log=bool(config["access_log"]),
        log_level=config["log_level"],
        timeout_graceful_shutdown=float(config["graceful_timeout"]),
        # Serving calls listen() again on the shared socket: keep its backlog.
        backlog=int(config["backlog"]),
    )
    server = ProcmanServer(uv_config, notifier, recycle_after, config["app"])
    try:
        uv_config.load()  # protocol classes, TLS context, interface wrappers
    except Exception as exc:
        traceback.print_exc()
        fail(f"cannot start uvicorn: {type(exc).__name__}: {exc}", EXIT_CANNOT_START)
    uv_config.loaded_app = close_when_stopping(uv_config.loaded_app, server)
    server.run(sockets=sockets)
    return 0


def close_when_stopping(app, server):
    """Once a stop has begun, every response says `Connection: close`.

    A keep-alive client then never reuses a connection that we are about to
    close, which is the other way a request can be lost during a stop.
    """

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or not server.should_exit:
            return await app(scope, receive, send)

        async def send_with_close(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        return await app(scope, receive, send_with_close)

    return wrapped


def main():
    config = read_config()
    mode = config["mode"]
    if mode == "worker":
        sockets = listen_sockets()  # before the import: the app never sees LISTEN_*
        notifier = Notifier.from_env()
        app = load_app(config["app"], config["factory"])
        sys.exit(serve(app, config, sockets, notifier))
    if mode == "check":  # import the app once and report (for --check-config)
        load_app(config["app"], config["factory"])
        sys.exit(0)
    fail(f"unknown bootstrap mode {mode!r}", EXIT_CANNOT_START)


main()
