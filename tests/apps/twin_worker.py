"""A hostile app: its import-time code, in a --preload zygote, has the
first worker it forked answer the zygote's next spawn requests itself,
naming itself: one process reported for two slots, by that process.

At import it makes a pipe, and every process the zygote forks (the
intermediates and the workers) starts a thread at fork that keeps a copy of
the zygote's channel and, once its process leads a session of its own (a
worker: an intermediate never does), waits on the pipe. Before each spawn
but the first, the zygote writes the slot to the pipe and waits (5 s at
most) until a worker has answered: that worker sends {"spawned": {"slot": S,
"pid": its own pid}} on the channel, says TWINWORKER on fd 2 and acks. So
the lie always reaches the master before the reply of the process the
zygote forks next, whatever the scheduler does. Workers serve GET /pid.
"""

import json
import os
import select
import socket
import sys
import threading
import time

import __main__

_read, _write = os.pipe()
_ack_read, _ack_write = os.pipe()
_spawns = []


def _channel():
    for name in os.listdir("/proc/self/fd"):
        try:
            probe = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        if probe.family == socket.AF_UNIX and probe.type == socket.SOCK_SEQPACKET:
            return probe
        probe.close()
    return None


def _answer(channel):
    deadline = time.monotonic() + 30
    while os.getsid(0) != os.getpid():  # an intermediate, or a worker not yet on its own
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)
    while True:
        data = os.read(_read, 16)
        if not data:
            return
        slot = int(data.split(b"\n")[0])
        print(f"TWINWORKER pid {os.getpid()} answers slot {slot}", file=sys.stderr, flush=True)
        channel.send(json.dumps({"spawned": {"slot": slot, "pid": os.getpid()}}).encode())
        os.write(_ack_write, b"k")


def _after_fork():
    channel = _channel()
    if channel is not None:
        threading.Thread(target=_answer, args=(channel,), daemon=True).start()


_zygote = getattr(__main__, "Zygote", None)
if _zygote is not None:
    _spawn = _zygote.spawn

    def _spawn_with_twin(self, slot, env, *passed):
        if _spawns:
            os.write(_write, f"{slot}\n".encode())
            if select.select([_ack_read], [], [], 5)[0]:
                os.read(_ack_read, 1)
        _spawns.append(slot)
        return _spawn(self, slot, env, *passed)

    _zygote.spawn = _spawn_with_twin
    os.register_at_fork(after_in_child=_after_fork)


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
