"""A plain ASGI app for the stop-budget and logging tests.

* lifespan shutdown takes 0.5 s (like closing a database pool), then writes
  `$MARKER_DIR/shutdown-<pid>`;
* GET /stream sends a chunk every 0.1 s until cancelled (a stream in flight);
* GET /pid answers the worker's pid; GET /boom raises (a traceback in the log);
* GET /print prints a line to stdout (the app's own output).
"""

import asyncio
import os

PID = str(os.getpid())


async def lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await asyncio.sleep(0.5)
            directory = os.environ.get("MARKER_DIR")
            if directory:
                with open(os.path.join(directory, f"shutdown-{os.getpid()}"), "w") as f:
                    f.write("done\n")
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    path = scope["path"]
    if path == "/boom":
        raise RuntimeError("boom in a request")
    if path == "/print":
        print("printed by the app", flush=True)
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": (PID + "\n").encode(), "more_body": True})
        while True:
            await asyncio.sleep(0.1)
            await send({"type": "http.response.body", "body": b".", "more_body": True})
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
