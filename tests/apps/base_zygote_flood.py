"""A hostile app for the base zygote (no --preload): the zygote never runs
its code, but a worker it forked runs as the same user, so the worker's
import can take the zygote's channel to the master (pidfd_getfd) and flood
it, as tests/apps/zygote_flood.py does from a --preload zygote.

Only the worker of slot 0 does it, at import: it finds its zygote (a child of
its own parent, the master, titled "procman: zygote"), copies each of the
zygote's descriptors until one is an AF_UNIX SOCK_SEQPACKET socket, and forks
ZYGOTE_FLOOD_PROCS processes (default 4) that flood it. Workers serve GET /pid.
"""

import ctypes
import os
import socket

import zygote_flood

SYS_PIDFD_GETFD = 438  # x86_64 and the generic table alike


def _zygote():
    master = os.getppid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                title = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == master and title.startswith(b"procman: zygote"):
            return int(name)
    return None


def _take_channel(pid):
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            try:
                probe = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            if probe.family == socket.AF_UNIX and probe.type == socket.SOCK_SEQPACKET:
                return probe
            probe.close()
    finally:
        os.close(pidfd)
    return None


if os.environ.get("PROCMAN_WORKER_ID") == "0":
    _z = _zygote()
    _channel = _take_channel(_z) if _z else None
    if _channel is not None:
        for _ in range(int(os.environ.get("ZYGOTE_FLOOD_PROCS", "4"))):
            if os.fork() == 0:
                try:
                    zygote_flood._flood(_channel, "/")  # "/" exists: at once
                finally:
                    os._exit(0)
        _channel.close()

app = zygote_flood.app
