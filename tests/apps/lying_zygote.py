"""A hostile app: its import-time code makes a --preload zygote lie.

procman's bootstrap runs as __main__; this module replaces its control
channel's send() so that every {"spawned": ...} reply names the pid in
LYING_ZYGOTE_PID instead of the worker actually forked (0, -1, or an
unrelated process). The master must signal none of them.
"""

import os

import __main__

_LIE = os.environ.get("LYING_ZYGOTE_PID")
_channel = getattr(__main__, "ControlChannel", None)

if _LIE is not None and _channel is not None:
    _send = _channel.send

    def _lying_send(self, message):
        if isinstance(message, dict) and "spawned" in message:
            message = {"spawned": {**message["spawned"], "pid": int(_LIE)}}
        return _send(self, message)

    _channel.send = _lying_send


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
