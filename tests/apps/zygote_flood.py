"""A hostile app: its import-time code, run in a --preload zygote, finds the
zygote's channel to the master (the one AF_UNIX SOCK_SEQPACKET socket among
its descriptors) and floods it.

At import it forks ZYGOTE_FLOOD_PROCS processes (default 4) holding the
channel; once the file ZYGOTE_FLOOD_GO names exists, each sends messages as
fast as the channel takes them: oversized ones (60 000 bytes), small
well-formed ones the master never asked for (warnings, ready, spawned,
errors) and bytes that are not JSON. The text of each carries FLOODMARK, so a
test can count what reached procman's log. A flooder dies with the zygote
(PR_SET_PDEATHSIG) and stops when the channel is closed. Workers serve GET
/pid like any app.
"""

import ctypes
import json
import os
import signal
import socket
import time


def _find_channel():
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if probe.family == socket.AF_UNIX and probe.type == socket.SOCK_SEQPACKET:
                return probe
        except OSError:
            pass
        probe.close()
    return None


def _messages():
    big = json.dumps({"warning": "FLOODMARK big " + "x" * 60000}).encode()
    return [
        big,
        json.dumps({"warning": "FLOODMARK small"}).encode(),
        json.dumps({"ready": True, "pid": 1}).encode(),
        b"FLOODMARK not json",
    ]


def _flood(channel, go):
    libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the zygote
    os.nice(int(os.environ.get("ZYGOTE_FLOOD_NICE", "0")))  # tests: leave the machine's other work its CPU
    while not os.path.exists(go):
        time.sleep(0.01)
    messages = _messages()
    while True:
        for m in messages:
            try:
                channel.send(m)
            except OSError:
                os._exit(0)


_GO = os.environ.get("ZYGOTE_FLOOD_GO")
_channel = _find_channel() if _GO else None
if _channel is not None:
    for _ in range(int(os.environ.get("ZYGOTE_FLOOD_PROCS", "4"))):
        if os.fork() == 0:
            try:
                _flood(_channel, _GO)
            finally:
                os._exit(0)
    _channel.close()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
