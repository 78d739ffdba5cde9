"""A WSGI app that reports what its server put in the environ (the client
address, the scheme, SCRIPT_NAME; GET /pid: its pid), so tests can see that proxy headers and
--root-path reach a WSGI app (tests/granian.rs, both worker classes)."""

import json
import os


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/pid":  # what the test harness waits with
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    body = json.dumps({
        "client": environ.get("REMOTE_ADDR"),
        "scheme": environ.get("wsgi.url_scheme"),
        "root_path": environ.get("SCRIPT_NAME", ""),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
