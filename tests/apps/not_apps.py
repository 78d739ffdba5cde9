"""Attributes that import fine but that no server can call as an app: what
--check-config must refuse instead of saying OK."""

# Not callable at all.
settings = {"debug": False}


# An ASGI 3 coroutine function missing `send`: every request would fail.
async def two_arguments(scope, receive):
    pass


# Four required arguments: neither WSGI (2) nor ASGI (1 or 3).
def four_arguments(a, b, c, d):
    pass
