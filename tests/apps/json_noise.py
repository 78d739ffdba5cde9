"""An ASGI app that writes to stderr every way a framework or an
app does, for `--log-format json`: its own logger with its own handler on
stderr (as Quart's app.logger), a traceback through it and through a
handler added at the first request, print() to
stderr, a warning, an uncaught exception in a thread, and an exception
uvicorn logs. GET /noise makes the noise; GET /raise raises."""

import logging
import os
import sys
import threading
import warnings

log = logging.getLogger("noisy.app")
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s in %(module)s: %(message)s"))
log.addHandler(handler)
log.setLevel(logging.INFO)
log.propagate = False

print("json_noise imported\nwith a second line", file=sys.stderr)


def crash():
    raise ValueError("thread noise")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/raise":
        raise KeyError("uncaught noise")
    if scope["path"] == "/noise":
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("Exception on request GET /noise")
            # A handler added at the first error, as Quart's app.logger does.
            late = logging.getLogger("noisy.late")
            if not late.handlers:
                late_handler = logging.StreamHandler(sys.stderr)
                late_handler.setFormatter(logging.Formatter("%(levelname)s in %(module)s: %(message)s"))
                late.addHandler(late_handler)
                late.propagate = False
            late.exception("late handler noise")
        print("stderr noise\nsecond stderr line", file=sys.stderr)
        sys.stderr.write("partial ")
        sys.stderr.write("line\n")
        warnings.warn("warning noise")
        t = threading.Thread(target=crash)
        t.start()
        t.join()
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
