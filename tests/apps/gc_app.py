"""An app that records the cyclic garbage collector's state at import time
(tests/gc_pause.rs: the bootstrap pauses automatic collection while it imports
the app and gives the app's own choice back afterwards).

GC_APP_CHOICE=disable makes the app call gc.disable() at import, =threshold
makes it set its own thresholds; both must survive the import.

It also keeps BALLAST objects made at import, which must be frozen (out of
every generation a collection scans) by the time the worker serves: "now"
reports how many objects a full collection would scan."""

import gc
import os

CHOICE = os.environ.get("GC_APP_CHOICE", "")
if CHOICE == "disable":
    gc.disable()
elif CHOICE == "threshold":
    gc.set_threshold(5000, 20, 20)

BALLAST = 50_000
KEPT = [[n] for n in range(BALLAST)]  # lists: always tracked

AT_IMPORT = {"threshold": list(gc.get_threshold()), "enabled": gc.isenabled()}


async def main(scope, receive, send):
    if scope["type"] != "http":
        return
    import json

    body = json.dumps({
        "pid": os.getpid(),
        "at_import": AT_IMPORT,
        "now": {"threshold": list(gc.get_threshold()), "enabled": gc.isenabled(),
                "scanned": len(gc.get_objects()), "frozen": gc.get_freeze_count()},
        "ballast": BALLAST,
    }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
