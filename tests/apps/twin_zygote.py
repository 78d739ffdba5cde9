"""A hostile app: its import-time code makes a --preload zygote report one
pid for two slots.

procman's bootstrap runs as __main__; this module wraps its zygote's spawn
and its control channel's send(). Each spawn forks just after a 10 ms clock
tick began (CLOCK_BOOTTIME, the clock of /proc/PID/stat's start time), so
the worker it forks and the master's next request fall in the same tick as
often as possible. The first {"spawned": ...} message is sent as it is; every
later one names the first worker's pid instead of the process just forked,
once the message says TWINLIE on fd 2. Whichever process sends the reply
(the zygote or the forked worker) lies the same way. Workers serve GET /pid.
"""

import mmap
import os
import struct
import sys
import time

import __main__

_HZ = os.sysconf("SC_CLK_TCK")
# The first worker's pid, shared by the zygote and every process it forks
# (whichever of them sends the reply).
_first = mmap.mmap(-1, 8)


def _first_pid():
    return struct.unpack("q", _first[:8])[0]


def _after_tick_start():
    """Waits until a clock tick began less than 1 ms ago."""
    tick = 1.0 / _HZ
    while (time.clock_gettime(time.CLOCK_BOOTTIME) % tick) > 0.001:
        pass


_zygote = getattr(__main__, "Zygote", None)
_channel = getattr(__main__, "ControlChannel", None)
if _zygote is not None and _channel is not None:
    _spawn = _zygote.spawn
    _send = _channel.send

    def _aligned_spawn(self, slot, env, *passed):
        _after_tick_start()
        return _spawn(self, slot, env, *passed)

    def _twin_send(self, message):
        if isinstance(message, dict) and "spawned" in message:
            first = _first_pid()
            if not first:
                _first[:8] = struct.pack("q", message["spawned"]["pid"])
            else:
                real = message["spawned"]["pid"]
                message = {"spawned": {**message["spawned"], "pid": first}}
                print(f"TWINLIE slot {message['spawned']['slot']} named {first} "
                      f"instead of {real}", file=sys.stderr, flush=True)
        return _send(self, message)

    _zygote.spawn = _aligned_spawn
    _channel.send = _twin_send


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
