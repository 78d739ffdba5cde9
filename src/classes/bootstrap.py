"""procman's uvicorn worker bootstrap (embedded in the binary, run by a short
`python -c <loader> "procman [app]"` that takes this source out of
PROCMAN_BOOTSTRAP, so that the command line stays readable).

What this file owns, between the Rust master and uvicorn:

* Sockets. The master hands over listeners by the systemd convention
  (LISTEN_FDS / LISTEN_PID, fds 3..3+n-1). They are wrapped with
  socket.socket(fileno=fd), which asks the kernel for the family, never with
  uvicorn's `fd=` (that one assumes AF_UNIX).
* Readiness and liveness, over NOTIFY_SOCKET (sd_notify): READY=1 only after
  uvicorn's startup (lifespan included) succeeded; WATCHDOG=1 from a task on
  the event loop, so a blocked loop stops the heartbeat and the master's
  --timeout catches it; STOPPING=1 when a stop begins;
  X_PROCMAN_RECYCLE=max-requests when --max-requests is reached (on
  PROCMAN_URGENT_SOCKET, which the master always polls, when it is set).
* The app import, so that a broken app gives one recognisable last line and
  exit status 4 instead of a uvicorn log line and status 3. A worker sends its
  traceback and last line to the master (X_PROCMAN_TRACEBACK=<JSON string>,
  X_PROCMAN_ERROR=<line>) instead of printing them, so that with N workers
  failing at once the master shows the first one only; without a master to
  tell (--check-config, a full queue) they are printed.
* Proxy headers (on unless --no-proxy-headers): uvicorn's middleware with
  --forwarded-allow-ips, and a unix socket's peer trusted too (ProxyHeaders).
* The interface (detect_interface): with --interface auto, an app whose
  call is a plain function taking (environ, start_response) is served as
  WSGI, and this is logged; one taking (scope, receive, send) is ASGI 3
  (uvicorn's own guess for both would be ASGI 2 and every request a 500).
  An app every request would fail on (not callable, the wrong number of
  arguments, an --interface its call contradicts) is refused as an import
  error is, also by --check-config.
* A failed lifespan startup (ReportingLifespan) is reported as a failed
  import is: traceback and last line to the master, exit 3.
* Logging: uvicorn's loggers (and Python's last-resort handler) write the
  master's format (--log-format: text `[time] [pid] [LEVEL] message`, or
  one JSON object a line with slot and generation) to stderr; so do the
  app's root handlers on stderr (basicConfig's) and warnings. With
  --log-format json, so do every logger's handlers on stderr, and sys.stderr
  itself turns what is written to it into JSON lines (JsonLines). With
  --log-file, stderr is that file (the master hands it over as fd 2) and USR1
  reopens it by path, after the master did. Tracebacks in these lines leave
  out the bootstrap's own frames (named <procman-bootstrap>).

Invariants:
* No datagram may block the event loop: the notify socket is non-blocking and
  a message that does not fit is dropped (the next heartbeat follows anyway).
* A graceful stop never resets a connection this worker has accepted: stop
  accepting first, let accepted connections deliver their request, then run
  uvicorn's own drain. Connections still in the kernel's accept queue belong
  to the shared listener and are served by the other workers.
* Nor does it lose a keep-alive client's next request: every response whose
  headers are sent after the stop signal says `Connection: close`
  (close_when_stopping), and a connection is closed only between requests,
  after its client was told or had REQUEST_GRACE to send one
  (close_between_requests).
* A stop the master asked for (TERM, INT, QUIT) ends with exit status 0.
  Other statuses: 3 = could not start (no uvicorn, no sockets, bad config,
  lifespan startup failed), 4 = the app could not be imported.
* Importing the app (load_app) is separate from serving it (serve), so that a
  zygote can import once and fork workers that only call serve().

Observability:
* The process title: `ps` and /proc/PID/cmdline show `procman: worker S gen G
  [name]`, `procman: zygote gen G [name]` or `procman: check [name]`, the name
  being -n/--name's, else the app (proc_name; set_title;
  a zygote-forked worker sets its own after the fork), and the thread name
  (`comm`, what `top` shows by default) is `procman: worker` or `procman:
  zygote`.
* SIGABRT (the master's "no heartbeat" signal, SIGKILL follows 1 s later)
  first writes every thread's Python traceback to fd 2 (faulthandler), so the
  log shows where the event loop was blocked, then ends the process as before.

PROCMAN_APP_CONFIG carries every key of CONFIG_KEYS, always (no defaults
here: the values, defaults included, come from procman's option table).

Modes (PROCMAN_APP_CONFIG "mode"): "worker" imports and serves; "check" only
imports (--check-config); "zygote" forks workers on request. With
"import_app" true (--preload) the zygote imports the app once and its workers
share it; without (the base zygote, the default) it imports only Python's
runtime (RUNTIME_MODULES) and uvicorn (protocols, lifespan, event loop, TLS) and each forked
worker imports the app itself, after taking its identity, exactly where a
cold worker would: nothing of the app is shared across fork, and an import
error is the worker's (exit 4, its traceback sent to the master). With
--reload ("app_trees": the watched trees and the workers' directory) the base
zygote also learns, from each worker it forks, which modules the app imported
from outside those trees (its third-party packages), and imports them itself
(ThirdParty): a worker of a later reload imports only the user's own modules.

* Started like a worker, plus PROCMAN_ZYGOTE_FD (an AF_UNIX SOCK_SEQPACKET
  socket to the master, one UTF-8 JSON object per message) and
  PROCMAN_MASTER_PID. LISTEN_*, NOTIFY_SOCKET and WATCHDOG_* are meant for the
  workers: the zygote keeps the listeners and the values and takes the
  variables out of the environment before the app is imported. It starts no
  event loop and no thread, so forking it is safe.
* Zygote to master: {"warning": "..."} (threads alive after the import),
  then {"ready": true, "pid": P}. Master to zygote: {"spawn": {"slot": S,
  "generation": G, "env": {...}}}. Every message gets exactly one reply, in
  order: {"spawned": {"slot": S, "pid": W}}, sent by the forked worker W
  itself, or {"error": "..."} from the zygote. EOF on the control socket or
  TERM/INT/QUIT ends the zygote with status 0; the workers it forked live on.
* A spawn double-forks: the intermediate child hands the worker's pid to the
  zygote and exits, so the worker is re-parented to the master (a child
  subreaper). The worker waits until its parent is the master and until the
  zygote says (over a pipe only the zygote can write to) that the
  intermediate reported it: if the zygote dies first, the worker exits
  instead of serving unsupervised. The worker then sends the reply itself on
  the control socket it inherited, and closes it: the master reads the
  sender's pid from the kernel (SO_PASSCRED) and adopts only the process
  that sent the reply, naming itself, a fresh child of the master not yet
  supervised; so the master knows the worker before it does anything else.
  It then sets PR_SET_PDEATHSIG, restores
  a cold worker's signal state, takes its identity from "env" and calls the
  same serve() as a cold worker. It never returns into the zygote's code.
* Stop signals are blocked around the fork and stay blocked in the
  intermediate, so a signal to the zygote's process group cannot kill an
  intermediate between creating a worker and reporting it.
"""

import gc

# The bootstrap's own imports (uvicorn's included) and a zygote's whole
# warm-up run with the cyclic collector's automatic trigger paused, as an app
# import does (collector_paused, which says why): they create objects by the
# hundred thousand, almost none of them garbage. resume_collector() gives the
# trigger back before anything is served or forked.
BOOT_THRESHOLD = gc.get_threshold()
gc.set_threshold(0)

import array  # noqa: E402 (after the pause, on purpose)
import asyncio  # noqa: E402
import atexit  # noqa: E402
import contextlib  # noqa: E402
import faulthandler  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import logging.config  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
import weakref  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

EXIT_CANNOT_START = 3  # also what uvicorn itself uses for a lifespan startup failure
EXIT_IMPORT_FAILED = 4
# How long accepted connections may take to deliver their request once we
# stopped accepting. Long enough for a request already on the wire, short
# enough not to matter next to --graceful-timeout.
REQUEST_GRACE = 0.5
# uvicorn's main loop ticks this often (on_tick: the Date header, the
# max-requests check); a stop signal wakes it at once instead.
TICK = 0.1
# Loop iterations to yield before trusting server_state.connections: a
# connection whose accept() returned before the listener closed reaches
# connection_made within two (asyncio: the accept task, then the
# transport's call_soon; uvloop: one call_soon). Twice that, for margin.
SETTLE_ITERATIONS = 4
# While waiting for connections or tasks to finish: the first look after
# FIRST_POLL, then twice as long each time, up to TICK (uvicorn looks every
# 0.1 s): a short request is noticed within about its own duration, a long
# drain costs no more wake-ups than uvicorn's.
FIRST_POLL = 0.001
# The same wait for requests to arrive (let_requests_arrive) looks at least
# this often: the drain, and so the exit, begins only when it ends.
REQUEST_POLL = 0.02
# How tracebacks name this file (procman runs it with this filename).
BOOTSTRAP_FILE = "<procman-bootstrap>"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# Zygote: the largest control message, and how long a forked worker waits to
# be re-parented to the master.
MAX_MESSAGE = 64 * 1024
# The longest traceback sent to the master (its notify buffer holds 64 KiB).
MAX_TRACEBACK = 60000
REPARENT_TIMEOUT = 10.0


def fail(message, code, exc=None):
    # The master names the cause in its own last line (X_PROCMAN_ERROR is
    # procman's private key; systemd ignores X_ keys). Printed here only when
    # no master heard it.
    if not tell_master("X_PROCMAN_ERROR=" + message.replace("\n", " ")[:3000]):
        say(message, exc=exc)
    sys.exit(code)


# Kept before Notifier.from_env() takes the variable out of the environment
# (so the app's own subprocesses do not inherit it).
NOTIFY_PATH = os.environ.get("NOTIFY_SOCKET", "")


def tell_master(text):
    """Sends one datagram to the master; False if there is none or it failed."""
    path = NOTIFY_PATH
    if not path.startswith(("/", "@")):
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # The process is about to exit: waiting up to a second for room in
            # the master's queue costs nothing and keeps the error visible.
            sock.settimeout(1.0)
            sock.sendto(text.encode("utf-8", "replace"), address)
            return True
    except OSError:
        return False


def flush_stdio():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def exit_now(signum=None, frame=None):
    # Until uvicorn serves there is nothing to drain: a stop signal just ends
    # the process (os._exit, so an app import in progress cannot swallow it).
    # A zygote never drains: this is its stop handler for good.
    flush_stdio()
    os._exit(0)


# --log-file, absolute (the master resolved it before we changed directory);
# None: stderr is whatever the master's stderr is, nothing to reopen.
LOG_PATH = None


def reopen_log(signum=None, frame=None):
    """USR1 (forwarded by the master after it reopened --log-file): point fd 2
    at the file now at LOG_PATH, so that logrotate's rename is followed.

    A Python handler (rather than SIG_IGN) is reset to the default by exec in
    any child. If the file cannot be opened (the workers' --user may not write
    where the master does), fd 2 stays on the old file and a line says so.
    """
    if not LOG_PATH:
        return
    try:
        fd = os.open(LOG_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        logging.getLogger("procman").warning(
            "cannot reopen the log file %s: %s; still writing to the old one", LOG_PATH, exc.strerror)
        return
    flush_stdio()
    os.dup2(fd, 2)  # the copy at 2 is inheritable, as stderr should be
    os.close(fd)


def dump_tracebacks_on_abort():
    """On SIGABRT, every thread's traceback to fd 2, then the default action.

    faulthandler writes from the C signal handler, so the dump happens even
    while the event loop is blocked in C or in Python code that never returns
    to the loop (the case the heartbeat timeout is for). It writes to fd 2 by
    number, so after a USR1 reopen (dup2 onto fd 2) it lands in the current
    log file. It then restores the default disposition and re-raises: the
    worker still dies of SIGABRT at once, as before. SIGABRT can only be had
    through enable(), which covers SIGSEGV, SIGFPE, SIGBUS and SIGILL too (a
    crash in a C extension gets a Python traceback as well).
    """
    with contextlib.suppress(Exception):  # no usable stderr: nothing to dump to
        faulthandler.enable(file=sys.stderr, all_threads=True)


# The argv area of this process, (address, size), found once by set_title().
ARGV_AREA = None
PR_SET_NAME = 15
COMM_MAX = 15  # the kernel's comm is 16 bytes with its NUL


def find_argv_area():
    """(address, size) of the argv strings exec laid out, or None.

    /proc/self/stat fields 48 and 49 (arg_start, arg_end) are what the kernel
    reads for /proc/PID/cmdline. CPython keeps its own (wide) copies of argv,
    so the original bytes are free to be overwritten. Checked against
    /proc/self/cmdline before anything is written there.
    """
    import ctypes  # noqa: PLC0415 (only here)

    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()  # fields[0] is field 3 (state)
    start, end = int(fields[45]), int(fields[46])
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read()
    if end <= start or ctypes.string_at(start, end - start) != cmdline:
        return None
    return start, end - start


def set_title(title, comm):
    """Shows `title` as this process's command line and `comm` as its name.

    The title overwrites the argv area (it cannot grow): the title, a NUL,
    and non-NUL padding to the end. A last byte that is not NUL is the
    kernel's sign that the process rewrote its title (setproctitle(3)): it
    then shows the area up to the first NUL, so `ps` sees the title alone.
    Best effort: a process title is cosmetic and never stops a worker.
    """
    global ARGV_AREA
    try:
        import ctypes  # noqa: PLC0415 (only here)

        if ARGV_AREA is None:
            ARGV_AREA = find_argv_area() or (0, 0)
        address, size = ARGV_AREA
        if size >= 3:
            text = title.encode("utf-8", "replace")[:size - 2] + b"\0"
            ctypes.memmove(address, text + b" " * (size - len(text)), size)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(comm.encode()[:COMM_MAX]), 0, 0, 0)
    except Exception:  # noqa: BLE001, S110 (cosmetic, see above)
        pass


def worker_title(app):
    slot = os.environ.get("PROCMAN_WORKER_ID", "?")
    generation = os.environ.get("PROCMAN_GENERATION", "?")
    set_title(f"procman: worker {slot} gen {generation} [{app}]", "procman: worker")


def install_boot_signals():
    """The dispositions of a worker until uvicorn serves (and of a zygote)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, exit_now)
    signal.signal(signal.SIGUSR1, reopen_log)


def strip_bootstrap_frames(tb):
    """Removes this file's frames (and importlib's) from a TracebackException
    and the exceptions chained to it: the app's traceback starts in the app."""
    pending, seen = [tb], set()
    while pending:
        tb = pending.pop()
        if tb is None or id(tb) in seen:
            continue
        seen.add(id(tb))
        tb.stack = traceback.StackSummary.from_list(
            [f for f in tb.stack if f.filename not in (BOOTSTRAP_FILE, "<string>", importlib.__file__)
             and not f.filename.startswith("<frozen importlib")])
        pending += [tb.__cause__, tb.__context__]


def format_exception(exc_info):
    tb = traceback.TracebackException(*exc_info)
    strip_bootstrap_frames(tb)
    return "".join(tb.format())


class MasterFormat(logging.Formatter):
    """The master's text line: `[2026-11-27T09:40:00.123456Z] [4242] [INFO] message`."""

    LEVELS = {"CRITICAL": "ERROR", "WARN": "WARNING"}

    def format(self, record):
        level = self.LEVELS.get(record.levelname, record.levelname)
        text = f"[{timestamp(record.created)}] [{record.process}] [{level}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text

    def formatException(self, ei):
        return format_exception(ei).rstrip("\n")


def timestamp(created):
    """The master's time format (UTC, microseconds, `Z`)."""
    return datetime.fromtimestamp(created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def worker_fields():
    """slot and generation, read at each line: a zygote-forked worker learns
    them after the fork (os.environ.update), a cold one at exec."""
    fields = {}
    for key, var in (("slot", "PROCMAN_WORKER_ID"), ("generation", "PROCMAN_GENERATION")):
        value = os.environ.get(var)
        if value is not None:
            fields[key] = int(value) if value.isdigit() else value
    return fields


def json_line(level, message, created=None, pid=None, **extra):
    """One line in the master's JSON format (the keys of src/logging.rs:
    timestamp, level, pid, message), plus slot and generation, plus extra."""
    obj = {
        "timestamp": timestamp(time.time() if created is None else created),
        "level": level,
        "pid": os.getpid() if pid is None else pid,
        "message": message,
    }
    obj.update(worker_fields())
    obj.update({k: v for k, v in extra.items() if v is not None})
    # ensure_ascii (the default) keeps the line one line whatever the text.
    return json.dumps(obj)


class MasterJson(MasterFormat):
    """The master's JSON line; a traceback is one field, `exc`, not more lines."""

    def format(self, record):
        level = self.LEVELS.get(record.levelname, record.levelname)
        exc = None
        if record.exc_info:
            exc = self.formatException(record.exc_info)
        elif record.exc_text:
            exc = record.exc_text
        stack = self.formatStack(record.stack_info) if record.stack_info else None
        return json_line(level, record.getMessage().rstrip("\n"), created=record.created, pid=record.process,
                         logger=record.name, exc=exc, stack=stack)


class JournalHandler(logging.Handler):
    """A worker's lines as native systemd journal entries (the protocol of
    src/journal.rs), when the master writes to the journal: the priority
    from the level, the message and its traceback as one entry, and
    WORKER (our pid), SLOT, GENERATION and LOGGER as fields; journald also
    knows the sender's own pid. One non-blocking send per line; a line the
    journal does not take is written to stderr as `<N>`-prefixed lines."""

    PRIORITIES = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7, "TRACE": 7}
    MAX_MESSAGE = 48 * 1024

    def __init__(self):
        super().__init__()
        self.path = os.environ.get("PROCMAN_JOURNAL_SOCKET") or "/run/systemd/journal/socket"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)

    @staticmethod
    def field(name, value):
        value = value.encode("utf-8", "replace")
        if b"\n" in value:
            return name.encode() + b"\n" + len(value).to_bytes(8, "little") + value + b"\n"
        return name.encode() + b"=" + value + b"\n"

    def emit(self, record):
        try:
            message = record.getMessage().rstrip("\n")
            if record.exc_info:
                message += "\n" + format_exception(record.exc_info).rstrip("\n")
            message = message[: self.MAX_MESSAGE]
            priority = self.PRIORITIES.get(record.levelname, 6)
            fields = [("MESSAGE", message), ("PRIORITY", str(priority)),
                      ("SYSLOG_IDENTIFIER", "procman"), ("WORKER", str(os.getpid())),
                      ("LOGGER", record.name)]
            fields += [(k.upper(), str(v)) for k, v in worker_fields().items()]
            payload = b"".join(self.field(k, v) for k, v in fields)
            try:
                self.sock.sendto(payload, self.path)
            except OSError:
                lines = "".join(f"<{priority}>{line}\n" for line in message.split("\n"))
                sys.stderr.write(lines)
                sys.stderr.flush()
        except Exception:
            self.handleError(record)


# "text", "json" or "journal": the master's --log-format, from
# PROCMAN_APP_CONFIG ("journal" also when the master found stderr to be the
# journal).
LOG_FORMAT = "text"


def formatter():
    return MasterJson() if LOG_FORMAT == "json" else MasterFormat()


def say(message, level="ERROR", exc=None):
    """A line the bootstrap writes to stderr itself (no master to tell):
    `procman: message` in text mode, a JSON object in JSON mode."""
    if LOG_FORMAT == "json":
        print(json_line(level, message, exc=exc), file=sys.stderr, flush=True)
    else:
        if exc:
            print(exc, end="" if exc.endswith("\n") else "\n", file=sys.stderr)
        if message:
            print(f"procman: {message}", file=sys.stderr, flush=True)


def configure_logging(level):
    """uvicorn's loggers and ours in the master's format on stderr (fd 2).
    The root logger is left to the app (its basicConfig() must still work):
    Python's last-resort handler, used when the app configured nothing, gets
    the format, and so do the app's own root handlers that write to stderr
    (adopt_root_handlers, once the app is imported and once it started)."""
    logging.addLevelName(5, "TRACE")  # uvicorn's level below DEBUG
    level = str(level).upper()
    handler = {"class": "logging.StreamHandler", "formatter": "procman", "stream": "ext://sys.stderr"}
    if LOG_FORMAT == "journal":
        handler = {"()": JournalHandler}
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"procman": {"()": MasterJson if LOG_FORMAT == "json" else MasterFormat}},
        "handlers": {"procman": handler},
        "loggers": {
            "uvicorn": {"handlers": ["procman"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["procman"], "level": "INFO", "propagate": False},
            "procman": {"handlers": ["procman"], "level": level, "propagate": False},
        },
    })
    last_resort = JournalHandler() if LOG_FORMAT == "journal" else logging.StreamHandler(sys.stderr)
    last_resort.setFormatter(formatter())
    last_resort.setLevel(logging.WARNING)
    logging.lastResort = last_resort
    # warnings.warn() through logging (py.warnings), not as bare lines on
    # stderr: to the app's root handlers, or to ours while the app has none
    # (captureWarnings gives py.warnings a NullHandler, so Python's
    # last-resort handler never sees them).
    logging.captureWarnings(True)
    warnings_handler = logging.StreamHandler(sys.stderr)
    warnings_handler.setFormatter(formatter())
    warnings_handler.addFilter(lambda record: not logging.getLogger().handlers)
    logging.getLogger("py.warnings").addHandler(warnings_handler)
    if LOG_FORMAT == "json":
        json_stdio()
    adopt_basic_config()


def adopt_basic_config():
    """The app's logging.basicConfig() at import time adopts the format at
    once, so that lines logged during the import have it too."""
    original = logging.basicConfig

    def basic_config(**kwargs):
        original(**kwargs)
        adopt_root_handlers()

    logging.basicConfig = basic_config


def adopt_root_handlers():
    """The app's root handlers that write to stderr (basicConfig's) take the
    master's format; their level and filters stay the app's. Handlers to
    other streams or files keep the app's format. With --log-format json,
    so do the handlers of every other logger on stderr (a framework's own,
    as Quart's app.logger): their lines are JSON too."""
    streams = (sys.stderr, sys.__stderr__)
    loggers = [logging.getLogger()]
    if LOG_FORMAT == "json":
        loggers += [logger for logger in list(logging.Logger.manager.loggerDict.values())
                    if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            adopt_handler(handler, streams)


def adopt_handler(handler, streams):
    if type(handler) is logging.StreamHandler and handler.stream in streams:
        handler.setFormatter(formatter())


class JsonLines:
    """sys.stderr with --log-format json: what the app (or a framework)
    writes there comes out as JSON lines in the master's format (level INFO,
    `stream` "stderr"), so that a print(file=sys.stderr), a traceback a
    framework writes itself (Falcon's to wsgi.errors: see
    errors_to_stderr) or a handler's plain text is one JSON object, not
    loose lines. stdout is the app's own, and stays untouched. Text is kept until a write ends with a newline, and all of it is
    one object (a multi-line print() or write() stays together; flush()
    writes out what is kept); lines that are JSON objects already (a
    handler with our formatter) pass unchanged. Bounded: kept text is
    written out at MAX_PENDING.

    What does not pass through here stays raw: writes to fd 1 or 2 by
    number (C code, os.write, faulthandler's dump on SIGABRT, a crash of
    the interpreter itself) and to sys.stderr.buffer."""

    MAX_PENDING = 64 * 1024

    def __init__(self, stream, name):
        self.stream = stream
        self.stream_name = name
        self.pending = ""
        self.lock = threading.Lock()

    def __getattr__(self, name):  # encoding, errors, fileno(), isatty(), buffer, ...
        return getattr(self.stream, name)

    def writable(self):
        return True

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self.lock:
            self.pending += text
            if self.pending.endswith("\n"):
                self.emit(self.pending[:-1])
                self.pending = ""
            elif len(self.pending) >= self.MAX_PENDING:
                self.emit(self.pending)
                self.pending = ""
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        with self.lock:
            if self.pending:
                self.emit(self.pending)
                self.pending = ""
        with contextlib.suppress(Exception):
            self.stream.flush()

    def emit(self, text):
        lines = text.split("\n")
        if all(is_json_object(line) for line in lines):
            out = text
        else:
            out = json_line("INFO", text, stream=self.stream_name)
        with contextlib.suppress(Exception):
            self.stream.write(out + "\n")
            self.stream.flush()


def is_json_object(line):
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def log_uncaught(message, exc_info, logger):
    """One JSON line for an exception Python would print to stderr itself."""
    line = json_line("ERROR", message, exc=format_exception(exc_info).rstrip("\n"), logger=logger)
    with contextlib.suppress(Exception):
        sys.__stderr__.write(line + "\n")
        sys.__stderr__.flush()


def json_stdio():
    """--log-format json: stderr as JsonLines, and the tracebacks Python
    prints itself (an uncaught exception in the main thread or in a thread,
    an exception ignored in __del__) as one JSON line each."""
    sys.stderr = JsonLines(sys.stderr, "stderr")
    # A handler on stderr added later (Quart adds its default handler when
    # app.logger is first used, at the first error) is adopted as it is
    # added: its records are JSON lines with their level and `exc`.
    add_handler = logging.Logger.addHandler

    def adopting_add_handler(logger, handler):
        add_handler(logger, handler)
        adopt_handler(handler, (sys.stderr, sys.__stderr__))

    logging.Logger.addHandler = adopting_add_handler

    def excepthook(exc_type, value, tb):
        log_uncaught("Uncaught exception", (exc_type, value, tb), "sys.excepthook")

    def thread_excepthook(args):
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        log_uncaught(f"Exception in thread {name}", (args.exc_type, args.exc_value, args.exc_traceback),
                     "threading")

    def unraisablehook(args):
        where = f" {args.object!r}" if args.object is not None else ""
        log_uncaught(f"{args.err_msg or 'Exception ignored in'}:{where}",
                     (args.exc_type, args.exc_value, args.exc_traceback), "sys.unraisablehook")

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook


install_boot_signals()

# Like gunicorn and the uvicorn CLI: the app directory (our cwd) comes first.
sys.path.insert(0, os.getcwd())
try:
    import uvicorn
    from uvicorn.lifespan.on import LifespanOn
except ImportError as exc:
    fail(
        f"uvicorn is not installed for {sys.executable}: {exc} (install it with "
        f"'{sys.executable} -m pip install uvicorn', or point --python at an "
        "interpreter that has it)",
        EXIT_CANNOT_START,
    )


class Notifier:
    """sd_notify sender. Never raises, never blocks."""

    def __init__(self, address, watchdog_interval, urgent_address=None):
        self.address = address
        self.watchdog_interval = watchdog_interval  # seconds, or None
        # The master's urgent socket (always polled, unlike NOTIFY_SOCKET
        # while it reads heartbeats in batches), or None.
        self.urgent_address = urgent_address if address else None
        self.sock = None
        if address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # CLOEXEC by default
            self.sock.setblocking(False)

    @classmethod
    def from_env(cls):
        return cls(*take_notify_env())

    def send(self, *lines, urgent=False):
        """urgent: to the socket the master always polls, when there is one
        (for what the master must act on now: a recycle request)."""
        if self.sock is None:
            return False
        address = (urgent and self.urgent_address) or self.address
        try:
            self.sock.sendto("\n".join(lines).encode(), address)
            return True
        except OSError:  # EAGAIN (queue full), master gone, ...: drop it
            return False

    async def send_surely(self, *lines, patience=30.0):
        """For messages that must arrive (READY=1): the master's queue holds
        only net.unix.max_dgram_qlen datagrams (often 10), so when it is full
        retry from the event loop, without blocking it, until it fits."""
        if self.sock is None:
            return False
        deadline = time.monotonic() + patience
        while not self.send(*lines):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True


def take_notify_env():
    """NOTIFY_SOCKET, WATCHDOG_* and PROCMAN_URGENT_SOCKET as (address,
    watchdog interval or None, urgent address or None).

    The variables are removed from the environment so that processes the app
    starts do not report READY/WATCHDOG in our name (the master accepts
    messages from a worker's descendants and attributes them to the worker).
    WATCHDOG_PID must name this process: a zygote checks it against its own
    pid and hands the result on to the workers it forks.
    """
    address = notify_address(os.environ.pop("NOTIFY_SOCKET", ""))
    urgent = notify_address(os.environ.pop("PROCMAN_URGENT_SOCKET", ""))
    usec = os.environ.pop("WATCHDOG_USEC", "")
    wpid = os.environ.pop("WATCHDOG_PID", "")
    interval = None
    if address and usec.isdigit() and int(usec) > 0 and wpid in ("", str(os.getpid())):
        # Three beats per timeout: a lost datagram still leaves one in time,
        # and an idle master wakes only every timeout/3 per worker.
        interval = int(usec) / 3e6
    return address, interval, urgent


def notify_address(path):
    """An sd_notify socket path as a sendto() address, or None."""
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract; CPython then omits the trailing NUL
    if path.startswith("/"):
        return path
    return None  # unset, or a kind we do not speak (vsock:)


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


# Every key of PROCMAN_APP_CONFIG. The master always sends all of them
# (src/classes/uvicorn.rs builds the object from procman's option table,
# with each option's resolved value or null for "unset"): the bootstrap keeps
# no defaults of its own, which could silently disagree with the table, and
# an object that lacks a key is refused. A unit test there checks that this
# list, the keys this file reads and the keys sent agree.
CONFIG_KEYS = (
    "mode", "import_app", "app", "factory", "interface", "lifespan", "http", "loop",
    "keep_alive", "limit_concurrency", "proxy_headers", "forwarded_allow_ips", "root_path",
    "ssl_keyfile", "ssl_certfile", "access_log", "log_level", "log_format", "log_file",
    "graceful_timeout", "max_requests", "max_requests_jitter", "backlog", "proc_name", "server",
    "app_trees",
)


def read_config():
    if "PROCMAN_APP_CONFIG" not in os.environ:
        fail("PROCMAN_APP_CONFIG is not set (this program is started by procman)", EXIT_CANNOT_START)
    try:
        given = json.loads(os.environ["PROCMAN_APP_CONFIG"])
        if not isinstance(given, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        fail(f"PROCMAN_APP_CONFIG is not a valid JSON object: {exc}", EXIT_CANNOT_START)
    missing = [key for key in CONFIG_KEYS if key not in given]
    if missing:
        fail(f"PROCMAN_APP_CONFIG lacks {', '.join(missing)} (the bootstrap has no defaults: "
             "procman sends every key)", EXIT_CANNOT_START)
    return given


# Python's runtime: the standard-library modules web apps (FastAPI,
# Starlette, pydantic, Django, Flask and what they depend on) commonly import.
# The base zygote imports them before it forks, so each worker imports only
# the app and its third-party packages. Each was checked (bench/runtime-
# modules.py) to start no thread and to leave no file descriptor open when
# imported; why each group has no fork hazard:
RUNTIME_MODULES = (
    # Data formats: pure functions and C codecs, no state (json, base64,
    # struct, pickle, copy are imported by the bootstrap or uvicorn already).
    "base64", "binascii", "csv", "json", "pickle", "struct", "zlib", "gzip", "copy",
    # Text: tables and functions only.
    "string", "textwrap", "unicodedata", "html", "shlex", "fnmatch",
    # Dates and time zones: zoneinfo reads its search path (PYTHONTZPATH,
    # which the zygote has from the same environment as its workers) at
    # import; its cache of zones starts empty and fills in each worker.
    "datetime", "calendar", "zoneinfo",
    # Numbers: decimal's context is per thread (and per task), created on
    # first use in each worker.
    "decimal", "fractions", "numbers",
    # Hashing and secrets: OpenSSL is initialised by the ssl module already
    # (uvicorn's TLS) and reseeds its generator in a forked child; secrets
    # reads os.urandom() at each call; random reseeds at fork
    # (os.register_at_fork), and the worker reseeds too.
    "hashlib", "hmac", "secrets", "uuid",
    # Email, MIME and HTTP parsing: classes and tables; mimetypes reads the
    # system's type files only on its first guess (in the worker), not at
    # import; http.client opens no connection.
    "email.message", "email.parser", "email.utils", "mimetypes",
    "http", "http.cookies", "http.client", "urllib.parse", "ipaddress",
    # Typing, classes and introspection: no state.
    "typing", "dataclasses", "enum", "inspect", "abc", "types", "weakref",
    "contextvars", "functools", "collections", "operator", "itertools", "warnings", "traceback",
    # Files and package metadata: importlib.metadata's caches and tempfile's
    # random names are filled on use (tempfile's also checks the pid).
    "pathlib", "tempfile", "shutil", "importlib.metadata", "importlib.resources",
    # Concurrency primitives: concurrent.futures re-creates its locks in a
    # forked child (os.register_at_fork); no executor exists at import.
    "concurrent.futures", "queue", "heapq", "bisect",
)


def spec_from_others(guard, name, path=None, target=None):
    """What the finders of sys.meta_path other than `guard` find for `name`
    (None: nothing): the guards below judge a spec, they never find one."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if finder is guard or find is None:
            continue
        spec = find(name, path, target)
        if spec is not None:
            return spec
    return None


class StandardLibraryOnly:
    """A meta path finder, first in sys.meta_path while the base zygote
    imports RUNTIME_MODULES: it finds each module as the import system would
    (the finders after it), and refuses (ImportError) one that would not be
    the standard library's own: built in, frozen, or a file of the standard
    library's directory outside any site-packages.

    The app's directory is first on sys.path, so a decimal.py next to the app
    is what `import decimal` means for this app, in a cold worker as in a
    forked one. The zygote must not run it (app code), nor import the
    standard one in its place (the worker would then find the wrong one in
    sys.modules): refusing it makes the import that needed it fail, and that
    module (fractions imports decimal) is left to the worker too. The same for
    a module of PYTHONPATH or site-packages that a standard one imports
    optionally."""

    STDLIB = os.path.dirname(os.__file__) + os.sep  # lib-dynload is inside

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        spec = spec_from_others(cls, name, path, target)
        if spec is None:
            return None  # not found: the import system says so
        origin = spec.origin or ""
        parts = origin.split(os.sep)
        if origin in ("built-in", "frozen") or (
                origin.startswith(cls.STDLIB) and "site-packages" not in parts
                and "dist-packages" not in parts):
            return spec
        raise ImportError(f"{name} would come from {origin or 'a namespace package'}, "
                          "not the standard library: left to the worker")


def import_runtime():
    """The base zygote's import of RUNTIME_MODULES (see there). A module this
    Python lacks (a trimmed build), one that the app's directory shadows (or
    that imports one it shadows: StandardLibraryOnly), or one that fails to
    import is skipped silently: the worker imports it itself if the app needs
    it, exactly as a cold worker would."""
    sys.meta_path.insert(0, StandardLibraryOnly)
    try:
        for name in RUNTIME_MODULES:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    finally:
        sys.meta_path.remove(StandardLibraryOnly)


# --reload with the base zygote: what a worker tells the zygote it imported.
# At most a pipe's buffer (64 KiB, a FastAPI app's list is about 20 KiB), so
# the worker's write never blocks; a longer list is cut at its last line.
MAX_LEARNED = 64 * 1024
# Pipes of workers still importing, at most; the oldest is dropped first (a
# worker hung in its import must not hold descriptors forever).
MAX_LEARNING = 8
# The longest a probe of the learned modules may take (ThirdParty).
PROBE_TIMEOUT = 60.0


def inside(path, trees, resolved_dirs=None):
    """Whether `path` (resolved) lies in one of `trees` (resolved directories).
    `resolved_dirs`: a cache of resolved directories for one pass over many
    modules (a few dozen directories hold hundreds of them): a path that is
    not itself a symlink is its resolved directory plus its name."""
    if resolved_dirs is None or os.path.islink(path):
        real = os.path.realpath(path)
    else:
        head, name = os.path.split(os.path.abspath(path))
        if head not in resolved_dirs:
            resolved_dirs[head] = os.path.realpath(head)
        real = os.path.join(resolved_dirs[head], name)
    return any(real == tree or real.startswith(tree + os.sep) for tree in trees)


def is_module_name(name):
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def module_origin(module):
    """Where the import system found `module`: a file, "built-in" or
    "frozen", "" for a namespace package; None for a module it did not
    find (made by code and put in sys.modules), which is never learned."""
    spec = getattr(module, "__spec__", None)
    if spec is None:
        return None
    origin = spec.origin
    if origin is None:
        return "" if spec.submodule_search_locations is not None else None
    return origin if isinstance(origin, str) else None


def spec_places(spec):
    """The files and directories a module found as `spec` comes from."""
    places = [spec.origin] if spec.has_location and isinstance(spec.origin, str) else []
    with contextlib.suppress(Exception):  # a namespace path recomputes itself
        places.extend(p for p in list(spec.submodule_search_locations or ()) if isinstance(p, str))
    return places


def third_party_since(before, trees):
    """The modules imported since `before` (names) that come from outside
    `trees`, in import order, as "name\torigin" lines (bytes, at most
    MAX_LEARNED, whole lines)."""
    lines, size, resolved_dirs = [], 0, {}
    for name, module in list(sys.modules.items()):
        if name in before or not is_module_name(name):
            continue
        origin = module_origin(module)
        spec = getattr(module, "__spec__", None)
        if origin is None or "\t" in origin or "\n" in origin or any(
                inside(p, trees, resolved_dirs) for p in spec_places(spec)):
            continue
        line = f"{name}\t{origin}\n".encode("utf-8", "surrogateescape")
        if size + len(line) > MAX_LEARNED:
            break
        lines.append(line)
        size += len(line)
    return b"".join(lines)


class ThirdParty:
    """The base zygote's imports of what its workers learned (--reload).

    A worker forked by the zygote imports the app; then it writes the names
    of the modules it imported from outside the app's trees (and where each
    was found) to a pipe only the zygote reads, without blocking, and
    closes it. The zygote reads such lists between the master's requests
    (bounded, never trusted: a valid dotted name, not imported yet, not
    skipped before). It does not import them at once: a probe, a child
    forked from the zygote, imports them first, one by one, with Guard first
    in sys.meta_path (nothing of the app's trees is imported; a name that
    resolves to another file than the worker's is refused), and reports the
    names whose import neither failed nor was refused anything; then it
    exits. Only those are imported by the zygote, one per turn of its loop
    (a request of the master goes first), the guard still on: so a module
    that fails here (it needs the app's setup first), or that would take
    the app's own code, is never half-imported into the zygote (no partial
    registrations, no extension module loaded twice), and is left to each
    worker, as before. The probe's output is discarded, warnings are not
    shown (the worker showed them), and a probe that takes longer than
    PROBE_TIMEOUT is killed and its names left to the workers. So the zygote
    holds the app's third-party packages soon after the first worker's
    import, and a reloaded worker imports only the user's modules: the new
    code is served sooner."""

    class Guard:
        def __init__(self, trees, expected):
            self.trees = trees
            self.expected = expected
            self.refused = False

        def find_spec(self, name, path=None, target=None):
            spec = spec_from_others(self, name, path, target)
            if spec is None:
                return None
            origin = spec.origin if isinstance(spec.origin, str) else ""
            if any(inside(p, self.trees) for p in spec_places(spec)) or (
                    name in self.expected and self.expected[name] != origin):
                self.refused = True
                raise ImportError(f"{name} is the app's own ({origin}): left to the worker")
            return spec

    def __init__(self, trees, libc):
        self.trees = [os.path.realpath(t) for t in trees]
        self.libc = libc
        self.pipes = {}  # a worker's read end -> bytes read so far, oldest first
        self.learned = {}  # name -> origin: from the workers, to probe
        self.probe = None  # [pid, read end, bytes, deadline, {name: origin}]
        self.queue = {}  # name -> origin: probed, for the zygote to import
        self.skipped = set()  # names a probe could not import cleanly

    def pipe(self):
        """A pipe for the next worker: (read end, write end); the zygote keeps the read end."""
        read_end, write_end = os.pipe()
        self.pipes[read_end] = b""
        while len(self.pipes) > MAX_LEARNING:
            self.drop(next(iter(self.pipes)))
        return read_end, write_end

    def drop(self, fd):
        self.pipes.pop(fd, None)
        with contextlib.suppress(OSError):
            os.close(fd)

    def close_all(self):
        """In a forked child: the workers' pipes and the probe's are not its own."""
        for fd in list(self.pipes):
            self.drop(fd)
        if self.probe is not None:
            with contextlib.suppress(OSError):
                os.close(self.probe[1])
            self.probe = None

    def busy(self):
        return bool(self.pipes or self.learned or self.probe or self.queue)

    def fds(self):
        return [*self.pipes, *([self.probe[1]] if self.probe else [])]

    def timeout(self):
        """How long the zygote may wait for a message (poll's ms; None: as long as it takes)."""
        if self.queue or (self.learned and self.probe is None):
            return 0
        if self.probe is not None:
            return max(0, int((self.probe[3] - time.monotonic()) * 1000) + 1)
        return None

    def read(self, fd):
        """Reads what is there; at EOF (or past the bound) takes the list."""
        try:
            data = os.read(fd, MAX_LEARNED + 1)
        except OSError:
            data = b""
        if self.probe is not None and fd == self.probe[1]:
            if data and len(self.probe[2]) + len(data) <= MAX_LEARNED:
                self.probe[2] += data
            else:
                self.probed()
            return
        if data and len(self.pipes[fd]) + len(data) <= MAX_LEARNED:
            self.pipes[fd] += data
            return
        listed = self.pipes[fd]
        self.drop(fd)
        for line in listed.split(b"\n")[:-1]:  # the last piece is incomplete (or empty)
            name, _, origin = line.decode("utf-8", "surrogateescape").partition("\t")
            if (is_module_name(name) and name not in sys.modules and name not in self.skipped
                    and name not in self.queue
                    and not (self.probe is not None and name in self.probe[4])):
                self.learned.setdefault(name, origin)

    def step(self, control):
        """Nothing to read: one step of the work (kill a late probe, start
        one, or import one probed name)."""
        if self.probe is not None and time.monotonic() >= self.probe[3]:
            with contextlib.suppress(OSError):
                os.kill(self.probe[0], signal.SIGKILL)
            self.skipped.update(self.probe[4])
            say(f"zygote {os.getpid()}: importing the app's {len(self.probe[4])} third-party "
                f"modules took the probe longer than {PROBE_TIMEOUT:g} s; they are left to the "
                "workers (--reload)", level="WARNING")
            self.probed(killed=True)
        elif self.queue:
            name, origin = next(iter(self.queue.items()))
            del self.queue[name]
            if name not in sys.modules and not self.imported(name, origin):
                self.skipped.add(name)  # not as in the probe: not tried again
            if not self.queue:
                gc.collect()
                gc.freeze()  # as the zygote's own imports: their pages stay shared
        elif self.learned and self.probe is None:
            self.start_probe(control)

    def imported(self, name, origin):
        """Imports one name in the zygote, as the probe did; False if it did not go as there."""
        guard = self.Guard(self.trees, {name: origin})
        sys.meta_path.insert(0, guard)
        try:
            with collector_paused(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(name)
            return not guard.refused
        except (Exception, SystemExit):
            return False
        finally:
            sys.meta_path.remove(guard)

    def start_probe(self, control):
        names, self.learned = self.learned, {}
        read_end, write_end = os.pipe()
        flush_stdio()
        zygote = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            self.skipped.update(names)
            return
        if pid == 0:  # the probe: never returns
            code = 0
            try:
                os.close(read_end)
                control.close()  # the channel's EOF must mean "zygote gone"
                self.close_all()
                if self.libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != zygote:
                    return
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                clean = []
                for name, origin in names.items():
                    if name in sys.modules or self.imported(name, origin):
                        clean.append(f"{name}\n".encode("utf-8", "surrogateescape"))
                os.write(write_end, b"".join(clean)[:MAX_LEARNED])
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(write_end)
        self.probe = [pid, read_end, b"", time.monotonic() + PROBE_TIMEOUT, names]

    def probed(self, killed=False):
        """The probe ended (or was killed): what it imported cleanly is queued, in order."""
        pid, fd, output, _, names = self.probe
        self.probe = None
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        if killed:
            return
        clean = set(output.decode("utf-8", "surrogateescape").split("\n")[:-1])
        for name, origin in names.items():
            if name in clean:
                self.queue.setdefault(name, origin)
            else:
                self.skipped.add(name)


def thread_count():
    """The process's threads, also those a C extension started."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


@contextlib.contextmanager
def collector_paused():
    """No automatic cyclic collection while the app is imported.

    An import creates objects by the hundred thousand and almost none of them
    is garbage, so the young-generation collections the allocations trigger
    are wasted work: pausing them takes about a tenth off the CPU time of
    importing a FastAPI app (bench/gc-import.py). Only the automatic trigger
    is paused (threshold 0, not gc.disable()), so an app that calls
    gc.disable() or gc.set_threshold() at import keeps its choice: the saved
    thresholds come back only if the first one is still 0. Nothing is
    collected when the pause ends; a worker's load_app freezes what the
    import made first (it says why)."""
    saved = gc.get_threshold()
    gc.set_threshold(0)
    try:
        yield
    finally:
        resume_collector(saved)


def resume_collector(saved=BOOT_THRESHOLD):
    """Ends a pause: `saved` comes back unless the first threshold is no
    longer 0 (the app chose its own). Pauses nest: the boot pause around an
    app import saves 0 and gives back 0, the boot's end the defaults."""
    if gc.get_threshold()[0] == 0:
        gc.set_threshold(*saved)


def load_app(spec, factory, report_to_master=False, freeze=True):
    """Import `module:attr.sub` (and call it if a factory). Exits 4 on any failure.

    With `freeze`, what the process has made so far (the bootstrap's and the
    app's imports, the factory's objects) is frozen at the end, before the
    collector's trigger comes back: made while it was paused, it is all
    still young, so the first collection after the pause would scan all of
    it (7-10 ms of each worker's start for the FastAPI example), the next
    generation's first collection again, in a serving worker (every
    connection it holds stalled), and each full one after that. Frozen
    (O(1), nothing scanned), as a zygote freezes its imports: never scanned
    again. Cyclic garbage the import left stays, a little memory. The
    --preload zygote collects it first (freeze=False here, then
    gc.collect(); gc.freeze() before its first fork)."""
    module_name, _, attrs = (spec or "").partition(":")
    if not module_name or not attrs:
        fail(f"Failed to load application '{spec}': ValueError: expected 'module:attribute'",
             EXIT_IMPORT_FAILED)
    try:
        with collector_paused():
            obj = importlib.import_module(module_name)
            for attr in attrs.split("."):
                obj = getattr(obj, attr)
            if factory:
                obj = obj()
            if freeze:
                gc.freeze()
    except (Exception, SystemExit) as exc:  # SystemExit: an app calling sys.exit() at import
        # The user's traceback, without the importlib/bootstrap frames in front of it.
        text = format_exception((type(exc), exc, exc.__traceback__))
        # A worker hands it to the master, which shows the first failing
        # worker's only; the tail is what matters if it is huge.
        told = report_to_master and tell_master(
            "X_PROCMAN_TRACEBACK=" + json.dumps(text[-MAX_TRACEBACK:]))
        message = " ".join(str(exc).split())  # the last line stays one line
        fail(f"Failed to load application '{spec}': {type(exc).__name__}"
             + (f": {message}" if message else ""), EXIT_IMPORT_FAILED,
             exc=None if told else text)
    return obj


def call_shape(app):
    """(is_async, positional parameter names, display name) of how `app` is
    called, or None when that cannot be told (a class, a builtin, a call
    that takes *args, optional positional parameters): then uvicorn decides
    as it always does.

    A class is left alone (an ASGI 2 class, or one with __await__)."""
    if inspect.isclass(app) or not callable(app):
        return None
    call = app if inspect.isroutine(app) else getattr(type(app), "__call__", None)
    is_async = (inspect.iscoroutinefunction(app)  # also a functools.partial of one
                or inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
                or inspect.iscoroutinefunction(getattr(app, "__call__", None)))
    try:
        parameters = list(inspect.signature(app).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin)
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.default is not p.empty for p in positional):
        return None
    name = getattr(app, "__qualname__", None) or f"{type(app).__qualname__}.__call__"
    return is_async, [p.name for p in positional], name


# How many positional arguments each interface calls the app with.
INTERFACE_ARGUMENTS = {"wsgi": 2, "asgi2": 1, "asgi3": 3}


def detect_interface(app, chosen):
    """(interface, why): the interface to serve `app` with under --interface
    `chosen`, and a line saying why when procman, not the user, decided WSGI.
    Exits 4 (as an import error) for an app that every request would fail
    on and that can be told now: not callable, or called with arguments it
    does not take.

    uvicorn's `auto` takes any plain callable (not a coroutine function) for
    ASGI 2, so a Flask or Django app would answer 500 to every request, and
    so would an ASGI 3 router whose synchronous __call__(scope, receive,
    send) returns an awaitable. Here: a plain call of two arguments is WSGI,
    of three ASGI 3, of one ASGI 2; a coroutine function is ASGI 3."""
    if not callable(app):
        raise AppUnusable(f"the app is not callable (a {type(app).__name__}): it must be a WSGI or ASGI "
                          "callable (did you mean an attribute of it, or --factory?)")
    shape = call_shape(app)
    if shape is None:
        return chosen, None
    is_async, names, name = shape
    signature = f"{name}({', '.join(names)})"
    count = len(names)
    if chosen == "auto":
        if is_async:
            if count == 3:
                return "asgi3", None
            raise AppUnusable(f"{signature} is a coroutine function, so ASGI 3, which is called with "
                              "(scope, receive, send)")
        by_count = {n: interface for interface, n in INTERFACE_ARGUMENTS.items()}
        if count not in by_count:
            raise AppUnusable(f"{signature} takes {count} arguments: WSGI calls an app with 2 (environ, "
                              "start_response), ASGI with 3 (scope, receive, send) or 1 (scope)")
        interface = by_count[count]
        if interface == "wsgi":
            return "wsgi", (f"serving %s as WSGI (detected {signature}, a plain callable with WSGI's "
                            "arguments); pass --interface wsgi to silence this")
        return interface, None
    wanted = INTERFACE_ARGUMENTS.get(chosen)
    if wanted is not None and (count != wanted or (is_async and chosen != "asgi3")):
        what = "is a coroutine function" if is_async else f"takes {count} argument{'s' * (count != 1)}"
        raise AppUnusable(f"{signature} {what}, but --interface {chosen} calls it "
                          f"{'as a plain function ' if is_async else ''}with {wanted}: "
                          "drop --interface (procman tells from the call) or fix it")
    return chosen, None


class AppUnusable(Exception):
    """The app imported, but no request could be served with it."""


def resolve_interface(app, config):
    """The interface to serve `app` with (config["interface"] is set to it),
    logged once (by the zygote, slot 0 or --check-config) when procman chose
    WSGI. An app every request would fail on ends the process as an import
    error does (exit 4, the line to the master). WSGI has no lifespan:
    --lifespan auto becomes off for it (uvicorn would try and say "ASGI
    'lifespan' protocol appears unsupported" in every worker)."""
    try:
        interface, why = detect_interface(app, config["interface"])
    except AppUnusable as exc:
        fail(f"Failed to load application '{config['app']}': {exc}", EXIT_IMPORT_FAILED)
    config["interface"] = interface
    if interface == "wsgi":
        if config["lifespan"] == "on":
            fail(f"Failed to load application '{config['app']}': --lifespan on needs an ASGI app, and "
                 "this one is served as WSGI, which has no lifespan: drop --lifespan on", EXIT_IMPORT_FAILED)
        config["lifespan"] = "off"
    if why and os.environ.get("PROCMAN_WORKER_ID", "0") == "0":
        logging.getLogger("procman").warning(why, config["app"])


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
        # What the main loop awaits between ticks (a future the timer or a
        # stop signal completes), None outside that wait.
        self.next_tick = None
        self.accepted = weakref.WeakSet()  # see track_accepted
        # While draining: connections left open after a response that
        # promised keep-alive, each with when it may be closed if it stays
        # idle (None: its response is not over yet). See close_between_requests.
        self.kept_open = weakref.WeakKeyDictionary()
        self.told_to_close = weakref.WeakSet()  # other protocols, told once
        # When the first stop signal arrived (time.monotonic()): the drain
        # budget (--graceful-timeout less the master's reserve) counts from it.
        self.stop_requested_at = None

    def handle_exit(self, sig, frame):
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        super().handle_exit(sig, frame)
        self.wake_main_loop()

    def wake_main_loop(self):
        """From a signal handler: end the main loop's wait for its next tick
        now (call_soon_threadsafe: the handler may interrupt a callback of
        the loop itself, so the loop does the work)."""
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
                self.loop.call_soon_threadsafe(self.tick_now)

    def tick_now(self):
        if self.next_tick is not None and not self.next_tick.done():
            self.next_tick.set_result(None)

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {
            signal.SIGQUIT: signal.signal(signal.SIGQUIT, self.quick_stop),
            signal.SIGUSR1: signal.signal(signal.SIGUSR1, reopen_log),
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
        self.wake_main_loop()

    def abort_connections(self):
        for conn in list(self.server_state.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        for task in list(self.server_state.tasks):
            task.cancel()

    def track_accepted(self):
        """Keeps (weakly) every HTTP protocol the listeners create.

        A connection joins server_state.connections only in connection_made,
        which for TLS runs after the handshake: a connection accepted just
        before a stop, its handshake still under way, would be invisible to
        let_requests_arrive, and reset when the worker exits. Its protocol
        exists from the accept on (asyncio and uvloop create it first), with
        no transport until connection_made; one whose handshake fails is
        dropped (and leaves the set when collected)."""
        make = self.config.http_protocol_class

        def http_protocol(*args, **kwargs):
            protocol = make(*args, **kwargs)
            self.accepted.add(protocol)
            return protocol

        self.config.http_protocol_class = http_protocol

    def handshaking(self):
        """True while a protocol the listeners created has no transport yet."""
        return any(getattr(p, "transport", True) is None for p in list(self.accepted))

    async def beat(self):
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(self.notifier.watchdog_interval)

    async def startup(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        self.track_accepted()
        if self.notifier.watchdog_interval:
            # Beats start with the boot: a long lifespan startup is not a hang.
            self.heartbeat = self.loop.create_task(self.beat())
        await super().startup(sockets=sockets)  # a failed lifespan startup exits 3 from here
        adopt_root_handlers()  # a lifespan startup may have configured logging
        if self.started and not self.should_exit:
            # The master forwards USR1 to ready workers only: a rotation
            # while we were starting is caught up with here.
            reopen_log()
            await self.notifier.send_surely("READY=1", f"STATUS=serving {self.label}")

    async def main_loop(self):
        # uvicorn 0.54.0's Server.main_loop (a tick every 0.1 s until
        # on_tick says stop), except that the wait between ticks ends at once
        # when a stop signal arrives: the stop is noticed now, not up to a
        # tick later (a tick later, on a loaded machine, can be much more).
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            self.next_tick = self.loop.create_future()
            timer = self.loop.call_later(TICK, self.tick_now)
            try:
                await self.next_tick
            finally:
                timer.cancel()
                self.next_tick = None
            should_exit = await self.on_tick(counter)

    async def on_tick(self, counter):
        if (self.recycle_after is not None and not self.recycle_requested
                and self.server_state.total_requests >= self.recycle_after):
            # Ask to be replaced and keep serving: the master starts the
            # replacement first and sends TERM once it is ready. On the
            # urgent socket, which the master reads at once. Retried on the
            # next tick if the datagram was dropped.
            self.recycle_requested = self.notifier.send(
                f"X_PROCMAN_RECYCLE=max-requests (limit {self.recycle_after}, "
                f"after {self.server_state.total_requests} requests)", urgent=True)
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None):
        # uvicorn 0.54.0's Server.shutdown (stop accepting, ask connections
        # to shut down, wait for connections then tasks within the graceful
        # timeout, cancel what is left, lifespan shutdown), with two changes:
        # accepted connections first get to deliver their request
        # (let_requests_arrive), and no fixed sleep: uvicorn sleeps 0.1 s
        # after asking connections to shut down and looks every 0.1 s
        # whether they are gone, so an idle worker took 0.1 s to stop and a
        # busy one up to 0.1 s more than its last request.
        self.notifier.send("STOPPING=1", f"STATUS=stopping {self.label}")
        logger = logging.getLogger("uvicorn.error")
        logger.info("Shutting down")
        for server in self.servers:
            server.close()  # stop accepting; closes only our fd of the shared listener
        for sock in sockets or []:
            sock.close()
        if not self.force_exit:
            # The drain budget counts from the stop signal: our wait below
            # comes out of it; what follows the drain (cancelling, the
            # lifespan shutdown, interpreter exit) has the master's reserve.
            began = self.stop_requested_at or time.monotonic()
            budget = self.config.timeout_graceful_shutdown
            drain_ends = None if budget is None else began + budget
            await self.let_requests_arrive(drain_ends)
            if drain_ends is not None:
                self.config.timeout_graceful_shutdown = max(0.0, drain_ends - time.monotonic())
        if self.force_exit:
            self.abort_connections()
        self.close_between_requests()
        try:
            await asyncio.wait_for(self.wait_drained(logger), timeout=self.config.timeout_graceful_shutdown)
        except asyncio.TimeoutError:
            logger.error("Cancel %s running task(s), timeout graceful shutdown exceeded",
                         len(self.server_state.tasks))
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def wait_drained(self, logger):
        # uvicorn 0.54.0's Server._wait_tasks_to_complete, polling as
        # FIRST_POLL says instead of every 0.1 s. Idle connections that
        # shutdown() just closed are gone after an iteration or two: only
        # then is anything left worth a log line.
        await self.settle()
        state = self.server_state
        # uvicorn's lines say "(CTRL+C to force quit)": under procman a
        # quick stop is QUIT (or a second TERM to procman), and the master
        # ends the drain at --graceful-timeout anyway.
        if state.connections and not self.force_exit:
            count = len(state.connections)
            logger.info("Waiting for %d connection%s to close", count, "" if count == 1 else "s")
            await self.until(lambda: self.close_between_requests() or self.force_exit)
        if state.tasks and not self.force_exit:
            count = len(state.tasks)
            logger.info("Waiting for %d background task%s to complete", count, "" if count == 1 else "s")
            await self.until(lambda: not state.tasks or self.force_exit)
        for server in self.servers:
            await server.wait_closed()

    @staticmethod
    async def settle():
        """Lets the loop run what is already scheduled (SETTLE_ITERATIONS)."""
        for _ in range(SETTLE_ITERATIONS):
            await asyncio.sleep(0)

    async def until(self, done, deadline=None, longest=TICK):
        await poll_until(self.loop, done, deadline, longest)

    async def let_requests_arrive(self, drain_ends=None):
        # uvicorn's drain closes every connection with no request in
        # progress. One that was just accepted (its TLS handshake under way
        # included: track_accepted), or whose request is still on the wire,
        # would see a reset. So wait (at most REQUEST_GRACE) until no
        # connection is idle; meanwhile a connection that is mid-request
        # is told to close after its response instead of keeping alive. With
        # no connection at all (an idle worker) there is nothing to wait for.
        deadline = self.loop.time() + REQUEST_GRACE
        if drain_ends is not None:
            deadline = min(deadline, self.loop.time() + (drain_ends - time.monotonic()))
        await self.settle()  # just-accepted connections register first

        def all_busy():
            if self.force_exit:
                return True
            idle = self.handshaking()
            for conn in list(self.server_state.connections):
                cycle = getattr(conn, "cycle", conn)
                if cycle is conn:
                    continue  # no HTTP cycle (websocket, other protocol): the drain handles it
                if cycle is None or cycle.response_complete:
                    idle = True
                elif not cycle.response_started:
                    conn.shutdown()  # only sets keep_alive = False while a request is in progress
            return not idle

        await self.until(all_busy, deadline, longest=REQUEST_POLL)

    def close_between_requests(self):
        """One look at the connections while draining; True once none is left.

        A connection is closed only between requests:
        * idle: at once (let_requests_arrive already gave it REQUEST_GRACE
          to send a request);
        * a request whose response has not started: after that response,
          which says `Connection: close` (close_when_stopping);
        * a response whose headers went out before the stop signal: it
          promised keep-alive, and its client sends the next request as soon
          as it has read the body, so closing right after it would lose that
          request. The connection stays open until it has been idle for
          REQUEST_GRACE; a request that arrives meanwhile is answered, with
          `Connection: close`.
        Other protocols (websockets) get uvicorn's shutdown, once."""
        now = self.loop.time()
        for conn in list(self.server_state.connections):
            cycle = getattr(conn, "cycle", conn)
            if cycle is conn:
                if conn not in self.told_to_close:
                    self.told_to_close.add(conn)
                    conn.shutdown()
            elif cycle is None or cycle.response_complete:
                if conn not in self.kept_open:
                    conn.shutdown()  # idle: closes it
                    continue
                until = self.kept_open[conn]
                if until is None:
                    self.kept_open[conn] = now + REQUEST_GRACE
                elif now >= until:
                    del self.kept_open[conn]
                    conn.shutdown()
            elif cycle.response_started:
                if cycle.keep_alive:
                    self.kept_open.setdefault(conn, None)
            else:
                conn.shutdown()  # only sets keep_alive = False: its response says close
        return not self.server_state.connections


def uvicorn_config(app, config, limit_max_requests=None):
    """A loaded uvicorn.Config for an imported app. Exits 3 if it cannot be loaded.

    Loading imports the protocol, lifespan and middleware modules and builds
    the TLS context; a zygote does it once so that its workers share them.
    """
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
        proxy_headers=False,  # ProxyHeaders below, which also trusts a unix-socket peer
        forwarded_allow_ips=config["forwarded_allow_ips"],
        root_path=config["root_path"],
        ssl_keyfile=config["ssl_keyfile"],
        ssl_certfile=config["ssl_certfile"],
        access_log=bool(config["access_log"]),
        log_config=None,  # configure_logging() did it, in the master's format
        log_level=config["log_level"],
        timeout_graceful_shutdown=float(config["graceful_timeout"]),
        # Serving calls listen() again on the shared socket: keep its backlog.
        backlog=int(config["backlog"]),
    )
    try:
        uv_config.load()  # protocol classes, TLS context, interface wrappers
    except Exception as exc:
        message = f"cannot start uvicorn: {type(exc).__name__}: {exc}"
        say(message if LOG_FORMAT == "json" else "", exc=format_exception(sys.exc_info()))
        fail(message, EXIT_CANNOT_START)
    if uv_config.lifespan_class is LifespanOn:
        uv_config.lifespan_class = ReportingLifespan
    if config["proxy_headers"]:
        uv_config.loaded_app = ProxyHeaders(uv_config.loaded_app, config["forwarded_allow_ips"])
    return uv_config


async def poll_until(loop, done, deadline=None, longest=TICK):
    """Returns once done() is true (or the loop's clock reaches deadline),
    looking after FIRST_POLL, then twice as long each time up to `longest`."""
    delay = FIRST_POLL
    while not done():
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                return
            delay = min(delay, left)
        await asyncio.sleep(delay)
        delay = min(delay * 2, longest)


class HeldErrors:
    """uvicorn.error as the lifespan sees it while it starts: error lines
    (the app's traceback, "Application startup failed. Exiting.") are kept
    for ReportingLifespan instead of logged; everything else goes through."""

    def __init__(self, lifespan, logger):
        self.lifespan = lifespan
        self.logger = logger

    def __getattr__(self, name):
        return getattr(self.logger, name)

    def error(self, msg, *args, exc_info=None, **kwargs):
        if not self.lifespan.starting:
            self.logger.error(msg, *args, exc_info=exc_info, **kwargs)
        elif isinstance(exc_info, BaseException):
            self.lifespan.exception = exc_info
        elif msg != "Application startup failed. Exiting.":
            self.lifespan.messages.append(str(msg) % args if args else str(msg))


class ReportingLifespan(LifespanOn):
    """uvicorn's lifespan (--lifespan on or auto), except that a failed
    startup is reported as a failed import is: the traceback and a last line
    naming the exception go to the master (X_PROCMAN_TRACEBACK,
    X_PROCMAN_ERROR), which shows them once however many workers fail the
    same way, and the worker exits 3. uvicorn would log the traceback in
    every worker and end with "Application startup failed. Exiting."."""

    def __init__(self, config):
        super().__init__(config)
        self.starting = False
        self.exception = None  # raised by the app's lifespan (uvicorn logged it with exc_info)
        self.messages = []  # the app's "lifespan.startup.failed" message (Starlette: its traceback)
        self.logger = HeldErrors(self, self.logger)

    async def startup(self):
        self.starting = True
        try:
            await super().startup()
        finally:
            self.starting = False
        if self.should_exit:
            self.report_failure()

    def report_failure(self):
        if self.exception is not None:
            exc = self.exception
            text = format_exception((type(exc), exc, exc.__traceback__))
            message = " ".join(str(exc).split())
            last = type(exc).__name__ + (f": {message}" if message else "")
        else:
            text = "\n".join(self.messages)
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            last = lines[-1] if lines else "the app reported a failed startup and gave no reason"
        told = bool(text) and tell_master("X_PROCMAN_TRACEBACK=" + json.dumps(text[-MAX_TRACEBACK:]))
        fail(f"lifespan startup failed: {last}", EXIT_CANNOT_START, exc=None if told or not text else text)


# What a unix-socket peer is called while uvicorn's middleware decides; no
# address can be written so (it is not an IP), so only ProxyHeaders sets it.
UNIX_PEER = ("unix:", 0)
# The headers uvicorn's ProxyHeadersMiddleware reads (ASGI header names are lowercase).
FORWARDED_HEADERS = frozenset((b"x-forwarded-for", b"x-forwarded-proto"))


class ProxyHeaders:
    """uvicorn's ProxyHeadersMiddleware (same trust rules: X-Forwarded-For is
    read right to left and the first untrusted entry is the client), with a
    peer of a unix socket trusted as gunicorn trusts it: who may connect is
    decided by the socket file's mode and group. uvicorn gives such a peer
    no address (client None), which no --forwarded-allow-ips short of '*'
    matches. The app still sees client None when no header replaced it.
    """

    def __init__(self, app, trusted):
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        self.app = app
        hosts = trusted if trusted.strip() == "*" else f"{trusted},{UNIX_PEER[0]}"
        self.middleware = ProxyHeadersMiddleware(self.restore, trusted_hosts=hosts)

    def __call__(self, scope, receive, send):
        # The middleware changes nothing in a request that carries neither
        # header, whoever its peer: such a request (nearly all of them where
        # no proxy is in front) goes straight to the app, without the three
        # coroutines of the middleware's path (2-3 us of CPU per request
        # under wrk, BENCHMARKS.md). Not async: the app's own awaitable is
        # what the server awaits.
        if scope["type"] in ("http", "websocket"):
            for name, _ in scope.get("headers", ()):
                if name in FORWARDED_HEADERS:
                    return self.forwarded(scope, receive, send)
        return self.app(scope, receive, send)

    async def forwarded(self, scope, receive, send):
        server = scope.get("server")
        if (scope["type"] in ("http", "websocket") and scope.get("client") is None
                and server is not None and server[1] is None):  # (path, None): a unix socket
            scope["client"] = UNIX_PEER
        return await self.middleware(scope, receive, send)

    async def restore(self, scope, receive, send):
        if scope.get("client") == UNIX_PEER:
            scope["client"] = None
        return await self.app(scope, receive, send)


def serve(app, config, sockets, notifier):
    """Serve an already imported app on the given listeners until stopped. Returns the exit status."""
    if config["server"] == "granian":
        return granian_serve(app, config, sockets, notifier)
    max_requests = int(config["max_requests"])
    recycle_after = None
    limit_max_requests = None
    if max_requests > 0:
        limit = max_requests + random.randint(0, max(0, int(config["max_requests_jitter"])))
        if notifier.sock is not None:
            recycle_after = limit
        else:
            limit_max_requests = limit  # nobody to ask: recycle the uvicorn way (exit)
    adopt_root_handlers()  # the import may have configured logging
    if config["interface"] == "wsgi":
        app = errors_to_stderr(app)
    uv_config = uvicorn_config(app, config, limit_max_requests)
    server = ProcmanServer(uv_config, notifier, recycle_after, config["app"])
    uv_config.loaded_app = close_when_stopping(uv_config.loaded_app, server)
    server.run(sockets=sockets)
    return 0


def errors_to_stderr(app):
    """A WSGI app's `wsgi.errors` is sys.stderr, the log (uvicorn's is
    sys.stdout, which is not: it is the app's own output, which neither
    --log-file nor --log-format json touches). Falcon writes an unhandled
    exception's traceback there."""

    def wsgi_app(environ, start_response):
        environ["wsgi.errors"] = sys.stderr
        return app(environ, start_response)

    return wsgi_app


def close_when_stopping(app, server):
    """Every response whose headers are sent once a stop has begun says
    `Connection: close`: decided when the headers go out, not when the
    request arrived, so a request in flight when the drain begins is answered
    with it too. A keep-alive client then never reuses a connection that we
    are about to close, which is the other way a request can be lost during
    a stop. (httptools says `close` by itself when uvicorn's shutdown ended
    keep-alive before the headers; h11 does not, and would just close the
    connection after a response that promised keep-alive.)
    """

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        # The protocol's request-response cycle (send is its bound method):
        # its keep_alive is what the drain reads as "the client was told".
        cycle = getattr(send, "__self__", None)

        async def send_with_close(message):
            if message["type"] == "http.response.start" and server.should_exit:
                headers = list(message.get("headers", ()))
                if not any(bytes(k).lower() == b"connection" and b"close" in bytes(v).lower()
                           for k, v in headers):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
                if hasattr(cycle, "keep_alive"):
                    cycle.keep_alive = False
            await send(message)

        return await app(scope, receive, send_with_close)

    return wrapped


# The granian class (-k granian): granian's HTTP server (its Rust worker,
# from granian's compiled module) serving the app on procman's listeners,
# in place of uvicorn. Everything else (the listeners, the import, the
# interface, logging, sd_notify, the zygote) is the uvicorn class's.
#
# granian has no public API for serving on a descriptor (its PR #848 is
# open), so this calls private names whose signatures changed in 2.4, 2.6
# and 2.7: only the range below, tested, is accepted (pyproject.toml's
# `granian` extra says the same), and the names' shape is checked before
# anything is served (granian_api). Any other version or shape ends the
# process with exit 4 and one line naming the installed version and the
# range, never a traceback from inside granian.
GRANIAN_RANGE = ">=2.8.9,<2.9"
GRANIAN_LOWEST, GRANIAN_BELOW = (2, 8, 9), (2, 9)
# The parameters this file passes or calls, by name: a release that renames
# or drops one is refused at boot, not half-served.
GRANIAN_SHAPE = {
    "ASGIWorker": ("worker_id", "sock", "ipc", "threads", "blocking_threads", "py_threads",
                   "py_threads_idle_timeout", "backpressure", "http_mode", "websockets_enabled",
                   "ssl_enabled", "ssl_cert",
                   "ssl_key", "ssl_protocol_min", "ssl_crl"),
    "WSGIWorker": ("worker_id", "sock", "ipc", "threads", "blocking_threads", "py_threads",
                   "py_threads_idle_timeout", "backpressure", "http_mode", "ssl_enabled", "ssl_cert",
                   "ssl_key", "ssl_protocol_min", "ssl_crl"),
    "SocketHolder": ("fd", "uds", "backlog"),
    "ASGIWorker.serve_str": ("callback", "event_loop", "signal"),
    "ASGIWorker.serve_str_uds": ("callback", "event_loop", "signal"),
    "WSGIWorker.serve_str": ("callback", "event_loop", "signal"),
    "WSGIWorker.serve_str_uds": ("callback", "event_loop", "signal"),
    "asgi_wrapper": ("callback", "scope_opts", "state", "access_log_fmt"),
    "wsgi_wrapper": ("callback", "scope_opts", "access_log_fmt"),
    "new_scheduler": ("loop", "cb", "impl_asyncio"),
}


def version_tuple(text):
    """'2.8.9' -> (2, 8, 9); digits up to the first non-digit of each part."""
    parts = []
    for part in text.split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
        if digits != part:
            break
    return tuple(parts)


def granian_api(quiet=False):
    """granian's worker pieces as a namespace, once the installed version is
    in GRANIAN_RANGE and each name has the parameters GRANIAN_SHAPE lists.
    Exits 4 (as an app that cannot be imported: retrying cannot help) with
    one line otherwise; quiet (the base zygote, which only imports granian
    ahead of its workers): returns None instead, and each worker says it."""

    def refuse(message):
        if quiet:
            return None
        return fail(message, EXIT_IMPORT_FAILED)

    import importlib.metadata  # noqa: PLC0415
    import types  # noqa: PLC0415

    try:
        installed = importlib.metadata.version("granian")
    except importlib.metadata.PackageNotFoundError:
        return refuse(f"-k granian: granian is not installed for {sys.executable} (supported: "
                      f"granian{GRANIAN_RANGE}, e.g. pip install 'procman[granian]')")
    if not GRANIAN_LOWEST <= version_tuple(installed) < GRANIAN_BELOW:
        return refuse(f"-k granian: granian {installed} is installed, procman supports granian{GRANIAN_RANGE} "
                      "(its private worker API changes between releases): install a supported version")
    try:
        from granian._futures import _future_watcher_wrapper, _new_cbscheduler  # noqa: PLC0415
        from granian._granian import ASGIWorker, SocketHolder, WorkerSignal, WSGIWorker  # noqa: PLC0415
        from granian.asgi import LifespanProtocol  # noqa: PLC0415
        from granian.asgi import _callback_wrapper as asgi_wrapper  # noqa: PLC0415
        from granian.log import DEFAULT_ACCESSLOG_FMT  # noqa: PLC0415
        from granian.wsgi import _callback_wrapper as wsgi_wrapper  # noqa: PLC0415

        api = types.SimpleNamespace(
            ASGIWorker=ASGIWorker, WSGIWorker=WSGIWorker, SocketHolder=SocketHolder,
            WorkerSignal=WorkerSignal, LifespanProtocol=LifespanProtocol, asgi_wrapper=asgi_wrapper,
            wsgi_wrapper=wsgi_wrapper, new_scheduler=_new_cbscheduler, watch=_future_watcher_wrapper,
            access_format=DEFAULT_ACCESSLOG_FMT)
        for name, wanted in GRANIAN_SHAPE.items():
            obj = api
            for part in name.split("."):
                obj = getattr(obj, part)
            have = list(inspect.signature(obj).parameters)
            missing = [p for p in wanted if p not in have]
            if missing:
                raise TypeError(f"{name}({', '.join(have)}) lacks {', '.join(missing)}")
        for name in ("set", "add_cb"):
            getattr(WorkerSignal, name)
    except Exception as exc:
        message = " ".join(str(exc).split())
        return refuse(f"-k granian: granian {installed}'s private worker API is not the expected one "
                      f"({type(exc).__name__}: {message}), procman supports granian{GRANIAN_RANGE}")
    return api


def granian_loop(choice):
    """The event loop --loop names (auto: uvloop when installed)."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop  # noqa: PLC0415

            return uvloop.new_event_loop()
        except ImportError:
            if choice == "uvloop":
                fail("--loop uvloop: uvloop is not installed", EXIT_CANNOT_START)
    return asyncio.new_event_loop()


def asgi2_as_asgi3(app):
    async def asgi3(scope, receive, send):
        return await app(scope)(receive, send)

    return asgi3


class WsgiProxyHeaders:
    """Proxy headers for a WSGI app under granian, with uvicorn's trust rules
    (ProxyHeaders'): from a trusted peer (--forwarded-allow-ips, '*' for any,
    a unix socket's peer always), X-Forwarded-Proto sets wsgi.url_scheme and
    X-Forwarded-For, read right to left, gives the first untrusted entry as
    REMOTE_ADDR."""

    def __init__(self, app, trusted):
        self.app = app
        self.hosts = {h.strip() for h in trusted.split(",") if h.strip()}
        self.everyone = "*" in self.hosts

    def trusts(self, host):
        return self.everyone or host in self.hosts

    def __call__(self, environ, start_response):
        peer = environ.get("REMOTE_ADDR") or ""
        if not peer or self.trusts(peer):  # no address: a unix socket's peer
            proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[-1].strip().lower()
            if proto in ("http", "https"):
                environ["wsgi.url_scheme"] = proto
            hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
            for hop in reversed(hops):
                environ["REMOTE_ADDR"] = hop
                if not self.trusts(hop):
                    break
        return self.app(environ, start_response)


def wsgi_root_path(app, root_path):
    """--root-path for a WSGI app as uvicorn gives it: SCRIPT_NAME is the
    root path, and PATH_INFO loses it only where it starts with it."""
    root = root_path.rstrip("/")

    def with_root(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if root and (path == root or path.startswith(root + "/")):
            environ["PATH_INFO"] = path[len(root):] or "/"
        environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + root
        return app(environ, start_response)

    return with_root


def counting(app, wsgi, on_request):
    """The app, calling on_request() as each HTTP request starts (from
    granian's threads for a WSGI app: on_request must be thread-safe)."""
    if wsgi:
        def counted_wsgi(environ, start_response):
            on_request()
            return app(environ, start_response)

        return counted_wsgi

    async def counted(scope, receive, send):
        if scope["type"] == "http":
            on_request()
        return await app(scope, receive, send)

    return counted


def granian_lifespan_failed(lifespan):
    exc = lifespan.exc
    if exc is not None:
        text = format_exception((type(exc), exc, exc.__traceback__))
        message = " ".join(str(exc).split())
        last = type(exc).__name__ + (f": {message}" if message else "")
    else:
        text, last = "", "the app reported a failed startup"
    told = bool(text) and tell_master("X_PROCMAN_TRACEBACK=" + json.dumps(text[-MAX_TRACEBACK:]))
    fail(f"lifespan startup failed: {last}", EXIT_CANNOT_START, exc=None if told or not text else text)


def closed_door():
    """A listening unix socket nobody can connect to (bound to a path that is
    unlinked before listen()): accept() on it, non-blocking, only ever says
    EAGAIN. None if no temporary directory takes a socket."""
    import tempfile  # noqa: PLC0415 (only when a granian worker stops)

    door = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        where = tempfile.mkdtemp(prefix="procman-door-")
        try:
            path = os.path.join(where, "d")
            door.bind(path)
            os.unlink(path)
        finally:
            os.rmdir(where)
        door.listen(1)
        door.setblocking(False)
        return door
    except OSError:
        door.close()
        return None


def leave_listener(sock):
    """Stops granian's accept loop from taking connections off the shared
    listener `sock`, at once and without touching the listener itself (the
    master and the other workers keep it): granian accepts on sock's
    descriptor number, which from now on names a closed door. Its runtime's
    epoll still watches the listener (the master holds it open), so a new
    connection wakes the accept loop, whose accept() on the door says EAGAIN
    and leaves the connection to another worker. Returns the door to keep,
    or None when it could not be made (then the stop is granian's own)."""
    door = closed_door()
    if door is None and sock.family != socket.AF_UNIX:
        # A TCP accept drops a unix connection (its address is not an
        # internet one), so an abstract name (autobound, no file) will do
        # when no directory takes a socket. Not for a unix listener: anyone
        # could connect to that name, past the socket file's permissions.
        door = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            door.bind("")
            door.listen(1)
            door.setblocking(False)
        except OSError:
            door.close()
            door = None
    if door is not None:
        os.dup2(door.fileno(), sock.fileno(), inheritable=False)
    return door


def connection_counter(keys):
    """A function counting the connections accepted on the listeners `keys`
    (listener_key) that this process holds: its stream sockets, not
    listening, whose local address has a listener's port (TCP) or path
    (unix). Each descriptor is asked with getsockopt/getsockname through
    libc, never made into a socket object (with a default timeout set, that
    would make it non-blocking under whoever owns it). libc and the buffers
    are set up once here, not at every count."""
    import ctypes  # noqa: PLC0415 (only when a granian worker stops)

    libc = ctypes.CDLL(None, use_errno=True)
    value, value_size = ctypes.c_int(), ctypes.c_uint32()
    address, address_size = ctypes.create_string_buffer(128), ctypes.c_uint32()

    def option(fd, name):
        value_size.value = ctypes.sizeof(value)
        ok = libc.getsockopt(fd, socket.SOL_SOCKET, name, ctypes.byref(value), ctypes.byref(value_size)) == 0
        return value.value if ok else None

    def count():
        found = 0
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if option(fd, socket.SO_TYPE) != socket.SOCK_STREAM or option(fd, socket.SO_ACCEPTCONN) != 0:
                continue  # not a socket, not a stream, a listener, or closed meanwhile
            address_size.value = len(address)
            if libc.getsockname(fd, address, ctypes.byref(address_size)) != 0:
                continue
            raw = address.raw[:min(address_size.value, len(address))]
            if address_key(int.from_bytes(raw[:2], sys.byteorder), raw[2:]) in keys:
                found += 1
        return found

    return count


def address_key(family, rest):
    """(family, port) for an internet address, (AF_UNIX, path bytes) for a
    unix one, from a sockaddr's family and the bytes after it."""
    if family in (socket.AF_INET, socket.AF_INET6):
        return (family, int.from_bytes(rest[:2], "big"))
    if family == socket.AF_UNIX:
        # A path ends at its NUL; an abstract name starts with one.
        return (family, rest if rest[:1] == b"\0" else rest.split(b"\0", 1)[0])
    return (family, None)


def listener_key(sock):
    """What connections accepted on `sock` share with it (address_key)."""
    local = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return (socket.AF_UNIX, local if isinstance(local, bytes) else os.fsencode(local))
    return (sock.family, local[1])


def granian_serve(app, config, sockets, notifier):
    """serve() for -k granian: one granian worker (its Rust runtime, made
    here, after any fork) per listener, on the listener's descriptor. READY=1
    once every one of them accepts (after the lifespan startup); WATCHDOG=1
    from a task of the event loop the ASGI app runs on, so a blocked app stops
    the heartbeat (a WSGI app runs in granian's threads: the beat then shows
    the interpreter is alive). TERM/INT: the worker leaves its listeners
    (leave_listener), gives the connections it accepted REQUEST_GRACE to
    deliver their request, then granian finishes the requests in flight and
    closes idle connections; the worker exits once all are done, or when the
    drain time (config "graceful_timeout") is over. QUIT: exit now."""
    api = granian_api()
    loop = granian_loop(config["loop"])
    asyncio.set_event_loop(loop)
    adopt_root_handlers()
    ours = logging.getLogger("uvicorn").handlers
    for name in ("granian", "granian.access", "_granian"):
        logger = logging.getLogger(name)
        logger.handlers[:] = ours
        logger.propagate = False
        logger.setLevel(logging.getLogger("procman").level)
    logging.getLogger("granian.access").setLevel(logging.INFO)
    # granian's own format less its timestamp (the master's line has one).
    access = api.access_format.replace("[%(time)s] ", "") if config["access_log"] else None
    scope_opts = {"url_path_prefix": config["root_path"] or None}
    wsgi = config["interface"] == "wsgi"
    lifespan = None
    done = asyncio.Event()
    state = {"left": len(sockets), "stopping": False, "signals": [], "recycle_asked": False}
    max_requests = int(config["max_requests"])
    if max_requests > 0:
        # --max-requests: counted here (granian does not count for us); at
        # the limit the worker asks the master to replace it and keeps
        # serving (the master starts the replacement, then sends TERM), as
        # the uvicorn class does; without a master to ask, it stops itself.
        limit = max_requests + random.randint(0, max(0, int(config["max_requests_jitter"])))
        served = itertools.count(1)

        def on_request():
            n = next(served)  # atomic under the GIL, also from granian's threads
            if n < limit or state["recycle_asked"]:
                return
            if notifier.sock is None:
                state["recycle_asked"] = True
                loop.call_soon_threadsafe(stop)
                return
            # On the urgent socket; retried at the next request if dropped.
            state["recycle_asked"] = notifier.send(
                f"X_PROCMAN_RECYCLE=max-requests (limit {limit}, after {n} requests)", urgent=True)

        app = counting(app, wsgi, on_request)
    if wsgi:
        if config["root_path"]:
            app = wsgi_root_path(app, config["root_path"])
        if config["proxy_headers"]:
            app = WsgiProxyHeaders(app, config["forwarded_allow_ips"])
        # granian's own prefix would cut len(prefix) characters off every
        # path, also off one that does not start with it: wsgi_root_path.
        callback = api.wsgi_wrapper(app, {"url_path_prefix": None}, access)
    else:
        if config["interface"] == "asgi2":
            app = asgi2_as_asgi3(app)
        if config["proxy_headers"]:
            app = ProxyHeaders(app, config["forwarded_allow_ips"])
        if config["lifespan"] != "off":
            lifespan = api.LifespanProtocol(app)
        callback = api.watch(api.asgi_wrapper(app, scope_opts, lifespan.state if lifespan else {}, access))
    backpressure = max(1, int(config["backlog"]))
    worker_id = int(os.environ.get("PROCMAN_WORKER_ID", "0") or 0)

    def one_stopped():  # from granian's threads
        def count():
            state["left"] -= 1
            if state["left"] <= 0:
                done.set()
        loop.call_soon_threadsafe(count)

    graceful = max(0.0, float(config["graceful_timeout"]))

    def stop():
        if state["stopping"]:
            return
        state["stopping"] = True
        notifier.send("STOPPING=1")
        loop.call_later(graceful, done.set)
        if not state["signals"]:
            done.set()
            return
        # granian's stop ends its accept loop, then closes every connection
        # whose request it has not read yet as idle: one accepted a moment
        # before, its request on the wire, would get no answer. So first
        # leave the listeners, then give the connections accepted so far
        # REQUEST_GRACE to deliver their request (no wait without any).
        keys = {listener_key(sock) for sock in sockets}
        state["doors"] = [leave_listener(sock) for sock in sockets]
        state["grace"] = loop.create_task(let_requests_arrive(keys))

    async def let_requests_arrive(keys):
        deadline = loop.time() + min(REQUEST_GRACE, graceful)
        accepted = connection_counter(keys)
        await asyncio.sleep(FIRST_POLL)  # an accept() under way returns first
        await poll_until(loop, lambda: not accepted(), deadline, REQUEST_POLL)
        for sig in state["signals"]:
            sig.set()

    async def heartbeat():
        while True:
            notifier.send("WATCHDOG=1")
            await asyncio.sleep(notifier.watchdog_interval)

    async def main():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        signal.signal(signal.SIGQUIT, exit_now)
        signal.signal(signal.SIGUSR1, reopen_log)
        if lifespan is not None:
            await lifespan.startup()
            if lifespan.interrupt or (lifespan.unsupported and config["lifespan"] == "on"):
                granian_lifespan_failed(lifespan)
        if state["stopping"]:
            return
        worker_class = api.WSGIWorker if wsgi else api.ASGIWorker
        threads = max(1, min(backpressure // 2, 64)) if wsgi else 1
        # --certfile/--keyfile: granian's TLS, from TLS 1.2 on as uvicorn's
        # (granian's own command line says "tls1.2"/"tls1.3"; the class's
        # default, "1.3", is not a value its Rust side accepts).
        tls = {"ssl_enabled": False, "ssl_protocol_min": "tls1.2", "ssl_crl": []}
        if config["ssl_certfile"]:
            tls.update(ssl_enabled=True, ssl_cert=config["ssl_certfile"], ssl_key=config["ssl_keyfile"])
        # WebSockets: granian's own implementation, on as in granian alone
        # (its worker's own default is off). A WSGI worker has none.
        websockets = {} if wsgi else {"websockets_enabled": True}
        for sock in sockets:
            uds = sock.family == socket.AF_UNIX
            holder = api.SocketHolder(sock.fileno(), uds, int(config["backlog"]))
            worker = worker_class(worker_id=worker_id, sock=(None, holder), ipc=None, threads=1,
                                  blocking_threads=512, py_threads=threads, py_threads_idle_timeout=30,
                                  backpressure=backpressure, http_mode="1", **websockets, **tls)
            sig = api.WorkerSignal()
            sig.add_cb(one_stopped)
            state["signals"].append(sig)
            scheduler = api.new_scheduler(loop, callback, impl_asyncio=False)
            serve = worker.serve_str_uds if uds else worker.serve_str
            serve(scheduler, loop, sig)
        await notifier.send_surely("READY=1")
        beat = loop.create_task(heartbeat()) if notifier.watchdog_interval else None
        await done.wait()
        if beat is not None:
            beat.cancel()
        if lifespan is not None:
            await lifespan.shutdown()

    resume_collector()
    try:
        loop.run_until_complete(main())
    except SystemExit:
        raise
    # granian's runtime threads are not Python's: end the process here
    # (atexit handlers first, as the interpreter's exit would run them).
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    flush_stdio()
    os._exit(0)


class ControlChannel:
    """The zygote's end of its SOCK_SEQPACKET socket to the master: one JSON object per message."""

    def __init__(self, sock):
        self.sock = sock

    @classmethod
    def from_env(cls):
        value = os.environ.pop("PROCMAN_ZYGOTE_FD", "")
        if not value.isdigit():
            fail(f"PROCMAN_ZYGOTE_FD={value!r} is not a file descriptor", EXIT_CANNOT_START)
        try:
            sock = socket.socket(fileno=int(value))
        except OSError as exc:
            fail(f"fd {value} from PROCMAN_ZYGOTE_FD is not a socket: {exc}", EXIT_CANNOT_START)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            fail(f"fd {value} from PROCMAN_ZYGOTE_FD is not an AF_UNIX SOCK_SEQPACKET socket",
                 EXIT_CANNOT_START)
        sock.set_inheritable(False)  # not for the app's subprocesses
        # Our own end (its own open file description): blocking, whatever the
        # master created the pair with.
        sock.setblocking(True)
        return cls(sock)

    def send(self, message):
        """False if the master is gone."""
        data = json.dumps(message, separators=(",", ":")).encode()
        try:
            self.sock.send(data)
            return True
        except OSError:
            return False

    def receive(self, max_fds=0):
        """(the next message's bytes, the descriptors passed with it); None
        for the bytes at EOF. Up to max_fds descriptors are taken (close-on-
        exec); ValueError, with none kept open, for a message that was too
        long or passed more."""
        size = array.array("i").itemsize
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                MAX_MESSAGE, socket.CMSG_SPACE(max_fds * size) if max_fds else 0,
                socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            return None, []
        except OSError as exc:
            fail(f"cannot read the control socket: {exc}", 1)
        fds = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[:len(payload) - len(payload) % size]))
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            if flags & socket.MSG_CTRUNC:
                raise ValueError(f"more than {max_fds} descriptors passed")
            raise ValueError(f"message longer than {MAX_MESSAGE} bytes")
        if not data:
            for fd in fds:
                os.close(fd)
            return None, []
        return data, fds


def pin_to_cpu():
    """--cpu-affinity auto, in a worker forked by a zygote: this process and
    every thread it starts from now on run on the CPU the master chose for
    the slot (PROCMAN_CPU). A worker the master forks itself is pinned
    before its exec. Best effort: a CPU no longer allowed leaves the mask."""
    cpu = os.environ.get("PROCMAN_CPU")
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {int(cpu)})
    except (ValueError, OSError) as exc:
        logging.getLogger("procman").warning("cannot pin this worker to CPU %s: %s", cpu, exc)


def parse_spawn(message, passed, listeners):
    """(slot, generation, env, places) from {"spawn": {...}} that came with
    `passed` descriptors, for a zygote with `listeners` listeners: places[i]
    is the listener whose socket the worker replaces with the i-th passed
    one (--reuse-port: its slot's own). ValueError names what is wrong."""
    if not isinstance(message, dict) or set(message) != {"spawn"}:
        raise ValueError("expected {\"spawn\": {...}}, got " + json.dumps(message)[:200])
    request = message["spawn"]
    if not isinstance(request, dict):
        raise ValueError("\"spawn\" must be an object")
    places = request.get("sockets", [])
    if (not isinstance(places, list) or len(places) != passed
            or any(type(i) is not int or not 0 <= i < listeners for i in places)
            or len(set(places)) != len(places)):
        raise ValueError(f"\"sockets\" must name {passed} distinct listeners of {listeners}, "
                         f"got {json.dumps(places)[:200]}")
    unknown = sorted(set(request) - {"slot", "generation", "env", "sockets"})
    if unknown:
        raise ValueError(f"unknown keys in \"spawn\": {', '.join(unknown)}")
    slot, generation, env = request.get("slot"), request.get("generation"), request.get("env")
    for name, value in (("slot", slot), ("generation", generation)):
        if type(value) is not int or value < 0:
            raise ValueError(f"\"{name}\" must be a non-negative integer, got {json.dumps(value)}")
    if not isinstance(env, dict):
        raise ValueError("\"env\" must be an object of strings")
    for key, value in env.items():
        if (not isinstance(value, str) or not key or "=" in key
                or "\0" in key or "\0" in value):
            raise ValueError(f"bad variable in \"env\": {json.dumps(key)}")
    return slot, generation, env, places


def exit_status(exc):
    """What the interpreter would exit with for this SystemExit."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def shed_file_pages(libc):
    """Drops the zygote's mappings of the read-only file pages its imports
    touched (libraries' code and constants: OpenSSL's initialisation alone
    maps about 3 MiB), as the master does with its own code (src/shed.rs).
    A fork copies no page-table entry of a file mapping, so a worker maps
    only what it runs itself; what only the zygote had mapped was counted
    whole in its RSS and PSS, for nothing. Dropped, a page is mapped again
    from the page cache when next used. Only private, read-only mappings of
    a file with no anonymous page (no copy-on-write copy: the relocated
    data of a library has some and is kept) are dropped: those hold exactly
    the file's content. Best effort: any error leaves things as they are."""
    import ctypes  # noqa: PLC0415 (only the zygote needs it)

    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    dont_need = 4  # MADV_DONTNEED
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return
    mappings = []
    for line in text.splitlines():
        if line.startswith("Anonymous:"):
            if mappings:
                mappings[-1][3] = line.split()[1] == "0"
            continue
        fields = line.split(None, 5)
        if len(fields) < 5 or "-" not in fields[0] or ":" in fields[0]:
            continue
        start, _, end = fields[0].partition("-")
        path = fields[5] if len(fields) > 5 else ""
        try:
            mappings.append([int(start, 16), int(end, 16), fields[1], False, path])
        except ValueError:
            continue
    for start, end, perms, no_anonymous, path in mappings:
        if path.startswith("/") and "w" not in perms and perms.endswith("p") and no_anonymous:
            madvise(start, end - start, dont_need)


class Zygote:
    """Imports the app once, then forks workers on the master's request."""

    def __init__(self, config):
        self.config = config
        self.generation = None
        self.warned_threads = False
        # Everything meant for the master or the workers leaves the
        # environment before the app is imported.
        self.control = ControlChannel.from_env()
        master = os.environ.pop("PROCMAN_MASTER_PID", "")
        if not master.isdigit() or int(master) < 1:
            fail(f"PROCMAN_MASTER_PID={master!r} is not a pid", EXIT_CANNOT_START)
        self.master = int(master)
        self.sockets = listen_sockets()
        self.notify = take_notify_env()  # (address, interval, urgent) for the workers' Notifier
        self.import_app = bool(config["import_app"])
        if self.import_app:
            self.app = load_app(config["app"], config["factory"], report_to_master=True, freeze=False)
            resolve_interface(self.app, config)  # its workers inherit the answer
            # What each worker's serve() would import anyway (protocols,
            # lifespan, event loop): imported here, it is shared too.
            uvicorn_config(self.app, config).get_loop_factory()
        else:
            # The base zygote: the same modules, loaded for a stand-in app
            # (an ASGI 3 coroutine), so the app is first imported by a worker.
            self.app = None

            async def stand_in(scope, receive, send):
                pass

            uvicorn_config(stand_in, {**config, "interface": "asgi3"}).get_loop_factory()
            import_runtime()  # never the app: only the standard library's own modules
        if config["server"] == "granian":
            granian_api(quiet=True)  # granian's Python side shared (no runtime: no thread)
        import ctypes  # noqa: PLC0415 (only the zygote needs it)

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.get_errno = ctypes.get_errno
        trees = config["app_trees"]
        # --reload: learn the app's third-party modules from the workers.
        self.third_party = (ThirdParty([t for t in trees if isinstance(t, str)], self.libc)
                            if not self.import_app and isinstance(trees, list) and trees else None)

    def run(self):
        resume_collector()  # the warm-up is over; the workers inherit the thresholds
        gc.collect()
        gc.freeze()  # imported objects: never scanned again, so their pages stay shared
        shed_file_pages(self.libc)
        threads = threading.active_count() - 1
        if threads > 0:
            self.control.send({"warning": f"the app started {threads} threads at import time; threads "
                                          "do not survive fork (start them in the lifespan instead)"})
        if not self.control.send({"ready": True, "pid": os.getpid()}):
            exit_now()  # the master is gone
        while True:
            fds = []
            try:
                data, fds = self.receive()
                if data is None:
                    exit_now()  # EOF: the master is gone or closed us
                slot, generation, env, places = parse_spawn(json.loads(data.decode("utf-8")),
                                                            len(fds), len(self.sockets))
            except ValueError as exc:  # also JSON and UTF-8 errors
                for fd in fds:
                    os.close(fd)
                self.control.send({"error": f"bad message: {exc}"})
                continue
            if generation != self.generation:  # the master does not tell it sooner
                self.generation = generation
                set_title(f"procman: zygote gen {generation} [{self.config['proc_name']}]", "procman: zygote")
            try:
                self.spawn(slot, env, list(zip(places, fds)))
            finally:
                for fd in fds:  # the worker has its own copies
                    os.close(fd)

    def receive(self):
        """The master's next message (see ControlChannel.receive); meanwhile
        the lists of the workers that are importing the app (--reload) are
        read, probed and imported, one module per turn (ThirdParty). A
        request goes first."""
        third_party = self.third_party
        while third_party is not None and third_party.busy():
            poller = select.poll()
            for fd in (self.control.sock.fileno(), *third_party.fds()):
                poller.register(fd, select.POLLIN)
            ready = [fd for fd, _ in poller.poll(third_party.timeout())]
            if self.control.sock.fileno() in ready:
                break
            for fd in ready:
                third_party.read(fd)
            if not ready:
                third_party.step(self.control.sock)
            threads = thread_count()
            if threads > 1 and not self.warned_threads:
                self.warned_threads = True
                # Said here: the master takes warnings only from a starting zygote.
                say(f"zygote {os.getpid()}: importing the app's third-party modules (--reload) "
                    f"started {threads - 1} threads; threads do not survive fork: a worker forked "
                    "now may hang (restart procman, or use --preload)", level="WARNING")
        return self.control.receive(max_fds=len(self.sockets))

    def spawn(self, slot, env, passed):
        flush_stdio()  # or buffered output would be written again by the children
        # Blocked across the fork, for the whole life of the intermediate
        # (the worker unblocks them) and until the worker is reported: a stop
        # signal to our process group can then never kill an intermediate
        # between forking and reporting, nor us between its exit and our
        # report (a pending stop signal ends us once the reply is sent).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.spawn_blocked(slot, env, passed)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def spawn_blocked(self, slot, env, passed):
        read_end, write_end = os.pipe()  # intermediate -> us: the worker's pid
        # Us -> the worker: one byte once the master was told its pid. Only we
        # hold the write end, so if we die first (the master gave up on the
        # request and killed us) the worker reads EOF and does not serve:
        # nobody supervises it.
        go_read, go_write = os.pipe()
        # The worker -> us: what it imported (--reload; see ThirdParty).
        learn_read, learn_write = self.third_party.pipe() if self.third_party else (None, None)
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (read_end, write_end, go_read, go_write):
                os.close(fd)
            if learn_read is not None:
                self.third_party.drop(learn_read)
                os.close(learn_write)
            self.control.send({"error": f"cannot fork: {exc} (slot {slot})"})
            return
        if pid == 0:
            os.close(read_end)
            os.close(go_write)
            self.intermediate(slot, env, write_end, go_read, learn_write, passed)  # never returns
        os.close(go_read)
        if learn_write is not None:
            os.close(learn_write)
        try:
            self.report(slot, pid, read_end, write_end, go_write)
        finally:
            os.close(go_write)

    def report(self, slot, pid, read_end, write_end, go_write):
        """Reads the worker's pid from intermediate `pid`, tells the master, and lets the worker go."""
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            reported = pipe.read()  # EOF when the intermediate exits
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 0  # the app set SIGCHLD to SIG_IGN: no status; the pipe tells
        worker = int(reported) if reported.isdigit() else None
        if code == 0 and worker is not None:
            # The intermediate has exited, so the worker was re-parented to
            # the master: it may report itself (the reply to this request).
            with contextlib.suppress(OSError):
                os.write(go_write, b"1")
        elif code != 1:  # 1: the intermediate sent "error" itself
            self.control.send({"error": f"cannot spawn slot {slot}: the intermediate process "
                                        f"ended with status {code} before reporting"})

    def tell_imports(self, fd, before):
        """In a worker that imported the app (--reload): the modules it
        imported from outside the app's trees, to the zygote (ThirdParty).
        One write that never blocks (a short pipe's buffer cuts the list at
        a line, which the zygote drops); the zygote is not waited for."""
        try:
            os.set_blocking(fd, False)
            os.write(fd, third_party_since(before, self.third_party.trees))
        except OSError:
            pass
        finally:
            os.close(fd)

    def intermediate(self, slot, env, report_fd, go_fd, learn_fd, passed):
        """Forks the worker, writes its pid to report_fd and exits. Runs with stop signals blocked."""
        code = 2
        me = os.getpid()  # before the fork: the worker's getppid() may already be the master
        try:
            try:
                pid = os.fork()
            except OSError as exc:
                if self.control.send({"error": f"cannot fork: {exc} (slot {slot})"}):
                    code = 1
                return
            if pid == 0:
                os.close(report_fd)
                self.worker(slot, env, me, go_fd, learn_fd, passed)  # never returns
            os.close(go_fd)
            # The worker makes itself the leader of a session of its own (and
            # so of its own process group); its pid is reported only once it
            # has, so that a signal to its group cannot miss it. Not setpgid
            # from here: a group leader cannot call setsid.
            deadline = time.monotonic() + REPARENT_TIMEOUT
            while os.getsid(pid) != pid:
                gone = os.waitpid(pid, os.WNOHANG)[0] == pid
                if gone or time.monotonic() >= deadline:  # nobody knows this worker: it must not serve
                    if not gone:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                    return  # code 2: the zygote reports the failure
                time.sleep(0.0002)
            data = str(pid).encode()
            if os.write(report_fd, data) == len(data):  # a pipe write this small is atomic
                code = 0
            else:  # nobody knows this worker: it must not serve
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
        except OSError:
            pass  # code 2: the zygote reports the failure
        finally:
            os._exit(code)

    def worker(self, slot, env, intermediate, go_fd, learn_fd, passed):
        """Becomes a worker: reports itself to the master, then serves. Never returns.
        `passed`: (listener, descriptor) pairs, the sockets of this worker's
        own (--reuse-port: its slot's), which take the place of those
        listeners' (the zygote's are the master's sockets that only reserve
        the address)."""

        def give_up(message=None):
            if message:
                say(message)
            flush_stdio()
            os._exit(1)

        code = 1
        try:
            # A session of its own (so its own process group), at once: a
            # signal to the zygote's group must not reach a worker, and no
            # process outside the session can join its group (the
            # intermediate waits for this before it reports our pid).
            os.setsid()
            for index, fd in passed:
                os.dup2(fd, self.sockets[index].fileno(), inheritable=False)
                os.close(fd)
            # The master knows our pid once the intermediate reported it and
            # exited; then the kernel re-parents us to the master (a child
            # subreaper).
            parent = os.getppid()
            deadline = time.monotonic() + REPARENT_TIMEOUT
            while parent == intermediate and time.monotonic() < deadline:
                time.sleep(0.001)
                parent = os.getppid()
            if parent != self.master:
                give_up(f"a worker forked by the zygote was not adopted by the master (pid "
                        f"{self.master}): " + (f"its parent did not exit within {REPARENT_TIMEOUT:g} s"
                                               if parent == intermediate else
                                               f"pid {parent} adopted it (the master died, or is "
                                               "not a child subreaper)"))
            # Report only once the zygote heard from the intermediate: a
            # spawn whose zygote died (killed by a master that gave up on
            # the request) must not leave a worker nobody supervises.
            with os.fdopen(go_fd, "rb") as go:
                told = go.read(1)
            if told != b"1":
                give_up("the zygote could not report this worker to the master; not serving")
            # The reply to the master's request, from this process: the
            # kernel tells the master who sent it. Then the channel is the
            # zygote's alone (its EOF must mean "zygote gone").
            reported = self.control.send({"spawned": {"slot": slot, "pid": os.getpid()}})
            self.control.sock.close()
            if not reported:
                give_up("this worker could not report itself to the master; not serving")
            # Die with the master. It may have died before prctl took effect:
            # then we were re-parented again and must not go on.
            if self.libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
                give_up(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(self.get_errno())}")
            if os.getppid() != self.master:
                give_up()
            # A cold worker's signal state: the zygote's dispositions are the
            # boot ones; the mask blocked for the fork is emptied (a stop
            # signal the master sent meanwhile is delivered now: exit 0).
            install_boot_signals()
            # The zygote's fd 2 is the log file as it was when the zygote
            # started; after a rotation (USR1 goes to workers only) that is
            # the old file: start on the current one.
            reopen_log()
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            random.seed()  # CPython re-seeds at fork too; be explicit (--max-requests jitter)
            os.environ.update(env)  # PROCMAN_WORKER_ID, PROCMAN_GENERATION, the user's variables
            pin_to_cpu()  # before the app or the server can start a thread
            worker_title(self.config["proc_name"])  # its argv area is still the zygote's title
            app = self.app
            if not self.import_app:
                if self.third_party is not None:
                    self.third_party.close_all()  # the other workers' pipes
                before = set(sys.modules)
                # As a cold worker: identity and environment first, then
                # the app's import-time code, in this process only.
                app = load_app(self.config["app"], self.config["factory"], report_to_master=True)
                resolve_interface(app, self.config)
                if learn_fd is not None:
                    self.tell_imports(learn_fd, before)
            # LISTEN_PID and WATCHDOG_PID named the zygote and mean "this
            # process" now: the listeners are ours, and so is the watchdog.
            code = serve(app, self.config, self.sockets, Notifier(*self.notify))
        except SystemExit as exc:
            code = exit_status(exc)
        except BaseException:
            say("a worker forked by the zygote failed", exc=format_exception(sys.exc_info()))
            code = 1
        finally:
            # The interpreter's exit, minus the zygote's stack (never unwound
            # into): the app's atexit handlers run as in a cold worker.
            with contextlib.suppress(BaseException):
                atexit._run_exitfuncs()
            flush_stdio()
            os._exit(code)


def main():
    global LOG_PATH, LOG_FORMAT
    config = read_config()
    LOG_PATH = config["log_file"]
    LOG_FORMAT = config["log_format"] if config["log_format"] in ("json", "journal") else "text"
    configure_logging(config["log_level"])
    dump_tracebacks_on_abort()
    mode = config["mode"]
    name = config["proc_name"]  # -n/--name, else the app
    if mode == "worker":
        worker_title(name)
        sockets = listen_sockets()  # before the import: the app never sees LISTEN_*
        notifier = Notifier.from_env()
        app = load_app(config["app"], config["factory"], report_to_master=True)
        resolve_interface(app, config)
        resume_collector()
        sys.exit(serve(app, config, sockets, notifier))
    if mode == "zygote":  # --preload: import once, fork workers on request
        set_title(f"procman: zygote [{name}]", "procman: zygote")
        Zygote(config).run()  # never returns
    if mode == "check":  # import the app once and report (for --check-config)
        set_title(f"procman: check [{name}]", "procman: check")
        if config["server"] == "granian":
            granian_api()
        app = load_app(config["app"], config["factory"])
        resolve_interface(app, config)
        sys.exit(0)
    fail(f"unknown bootstrap mode {mode!r}", EXIT_CANNOT_START)


main()
