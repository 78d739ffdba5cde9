"""A raw ASGI app for keep-alive clients during a drain (tests/keep_alive.rs):

* GET /slow?s=SECONDS answers the worker's pid after sleeping (the event
  loop stays free), headers and body together.
* GET /stream?s=SECONDS sends the response headers at once, then the body
  (the worker's pid) after sleeping: a response whose headers went out
  before a drain began and whose end comes after.
"""

import asyncio
import os
from urllib.parse import parse_qs


def seconds(scope):
    query = parse_qs(scope.get("query_string", b"").decode())
    try:
        return min(max(float(query.get("s", ["0"])[0]), 0.0), 60.0)
    except ValueError:
        return 0.0


async def main(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"{os.getpid()}\n".encode()
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/plain"),
                         (b"content-length", str(len(body)).encode())]}
    if scope["path"] == "/stream":
        await send(start)
        await asyncio.sleep(seconds(scope))
    else:
        await asyncio.sleep(seconds(scope))
        await send(start)
    await send({"type": "http.response.body", "body": body})
