"""A FastAPI app that reports what uvicorn put in the ASGI scope, so tests can
see that procman's uvicorn options (root path, proxy headers, limits) reach
uvicorn."""

import asyncio
import os

from fastapi import FastAPI, Request

main = FastAPI()


@main.get("/scope")
async def scope(request: Request) -> dict:
    return {
        "pid": os.getpid(),
        "root_path": request.scope.get("root_path", ""),
        "scheme": request.scope.get("scheme"),
        "client": (request.scope.get("client") or [None])[0],
    }


@main.get("/pid")
async def pid() -> int:
    return os.getpid()


@main.get("/slow")
async def slow(s: float = 2.0) -> dict:
    await asyncio.sleep(s)
    return {"slept": s, "pid": os.getpid()}
