"""An app that records, at import, what its process had already done
before the app's own code ran (tests/zygote.rs, tests/gc_pause.rs):

* which standard-library modules were already imported (a worker forked from
  the base zygote inherits Python's runtime; a cold worker imports it
  itself);
* how many young-generation collections the cyclic garbage collector had
  run (a zygote that imports uvicorn with the collector paused runs almost
  none, and its workers inherit the count).

Nothing is imported before the record is taken but sys and gc (built in)."""

import gc
import sys

PROBES = ("decimal", "email.parser", "zoneinfo", "hashlib")
AT_IMPORT = {
    "preloaded": {name: name in sys.modules for name in PROBES},
    "young_collections": gc.get_stats()[0]["collections"],
}

import json  # noqa: E402
import os  # noqa: E402


async def main(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"pid": os.getpid(), **AT_IMPORT}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
