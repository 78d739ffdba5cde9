"""ASGI 3 apps whose call is a plain function that returns an awaitable (a
router object's synchronous `__call__(self, scope, receive, send)`, or a
plain function of the same three arguments): uvicorn's own guess is ASGI 2.
Every path answers the worker's pid."""

import os


async def respond(scope, receive, send):
    if scope["type"] != "http":
        return  # lifespan: nothing to start
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Router:
    def __call__(self, scope, receive, send):
        return respond(scope, receive, send)


app = Router()


def function_app(scope, receive, send):
    return respond(scope, receive, send)
