"""Example FastAPI app for procman (and the test suite's uvicorn-class app).

    procman app:main --workers 2 --bind 127.0.0.1:8000

Every response names the worker that served it, so tests (and curious humans)
can see reloads, recycling and load spreading at work.
"""

import asyncio
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

# Tests copy this app and change the constant to see that a reload runs new code.
VERSION = "1"

main = FastAPI(title="procman example")

# Memory held on purpose by /alloc, released by /free.
_ballast: list[bytearray] = []


def _identity() -> dict:
    return {
        "pid": os.getpid(),
        "worker": os.environ.get("PROCMAN_WORKER_ID"),
        "generation": os.environ.get("PROCMAN_GENERATION"),
    }


@main.get("/")
async def root() -> dict:
    return _identity()


@main.get("/pid", response_class=PlainTextResponse)
async def pid() -> str:
    return str(os.getpid())


@main.get("/version")
async def version() -> dict:
    return {"version": VERSION, "pid": os.getpid()}


@main.get("/slow")
async def slow(s: float = 3.0) -> dict:
    """A slow request that leaves the event loop free."""
    await asyncio.sleep(s)
    return {"slept": s, "pid": os.getpid()}


@main.get("/block")
async def block(s: float = 30.0) -> dict:
    """Blocks the event loop on purpose (a hung worker: no heartbeats, no requests)."""
    time.sleep(s)
    return {"blocked": s, "pid": os.getpid()}


@main.post("/echo")
async def echo(request: Request) -> dict:
    return {"echo": await request.json(), "pid": os.getpid()}


@main.get("/alloc")
async def alloc(mb: int = 100) -> dict:
    """Grow the process by `mb` MiB that stays resident until /free."""
    chunk = bytearray(mb * 1024 * 1024)
    # A fresh bytearray may be untouched zero pages; write one byte per page
    # so the memory is really resident (RSS grows).
    chunk[::4096] = b"\x01" * len(range(0, len(chunk), 4096))
    _ballast.append(chunk)
    return {"allocated_mb": sum(len(c) for c in _ballast) // (1024 * 1024), "pid": os.getpid()}


@main.get("/free")
async def free() -> dict:
    _ballast.clear()
    return {"allocated_mb": 0, "pid": os.getpid()}
