"""A Flask-like WSGI app: an object whose `__call__(self, environ, start_response)`
is a plain method. Served without `--interface wsgi`, procman detects it."""

import os


class FlaskLike:
    def __call__(self, environ, start_response):
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


app = FlaskLike()
