"""An app that watches how its worker stops (tests/stopping.rs), without
timing anything:

* GET /stop-self sends SIGTERM to its own worker, then yields to the event
  loop (asyncio.sleep(0)) up to 50 times, and answers after how many yields
  uvicorn logged "Shutting down" (null: not within 50). A worker that wakes
  its main loop on the signal gets there in a few; one that waits for its
  next 0.1 s tick does not (50 yields take well under a millisecond).
* Every asyncio.sleep() with a delay, once "Shutting down" was logged, is
  recorded with the name of the function that called it (the heartbeat,
  `beat`, is left out: it ticks on its own). At the lifespan shutdown the
  record is written to $STOP_REPORT as JSON: an idle worker should drain
  without any such sleep.
* GET /pid answers the worker's pid.
"""

import asyncio
import json
import logging
import os
import signal
import sys

SHUTTING_DOWN = False
TIMED_SLEEPS = []
_sleep = asyncio.sleep


class WatchShutdown(logging.Handler):
    def emit(self, record):
        global SHUTTING_DOWN
        if record.getMessage() == "Shutting down":
            SHUTTING_DOWN = True


logging.getLogger("uvicorn.error").addHandler(WatchShutdown())


async def recording_sleep(delay, result=None):
    caller = sys._getframe(1).f_code.co_name
    if SHUTTING_DOWN and delay > 0 and caller != "beat":
        TIMED_SLEEPS.append([caller, delay])
    return await _sleep(delay, result)


asyncio.sleep = recording_sleep


async def lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            path = os.environ.get("STOP_REPORT")
            if path:
                with open(f"{path}.{os.getpid()}", "w") as f:
                    json.dump({"timed_sleeps": TIMED_SLEEPS}, f)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def respond(send, body):
    body = body.encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["path"] == "/stop-self":
        os.kill(os.getpid(), signal.SIGTERM)
        yields = None
        for i in range(50):
            if SHUTTING_DOWN:
                yields = i
                break
            await _sleep(0)
        return await respond(send, json.dumps({"pid": os.getpid(), "yields": yields}))
    return await respond(send, str(os.getpid()))
