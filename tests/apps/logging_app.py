"""A plain ASGI app that logs the way apps do: basicConfig() at import, a
warning, a record per request, an exception uvicorn logs with its
traceback, and a print() to stdout (which procman leaves alone)."""

import logging
import warnings

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("logging_app")
warnings.warn("a warning at import")


async def main(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/boom":
        raise ZeroDivisionError("boom in the app")
    log.info("handled %s", scope["path"])
    print("a print from the app", flush=True)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
