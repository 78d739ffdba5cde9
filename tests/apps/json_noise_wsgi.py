"""A WSGI app that writes a traceback to environ["wsgi.errors"] as Falcon's
default error handler does (uvicorn's own WSGI environ makes it sys.stdout)."""

import os
import traceback


def app(environ, start_response):
    if environ["PATH_INFO"] == "/noise":
        try:
            {}["missing"]
        except KeyError:
            environ["wsgi.errors"].write("[falcon] GET /noise: Unhandled exception\n" + traceback.format_exc())
            environ["wsgi.errors"].flush()
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
