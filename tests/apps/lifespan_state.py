"""A FastAPI app with a lifespan (tests/granian.rs): its startup yields
state that every request reads (request.state), and its shutdown writes
the file LIFESPAN_MARK names, so a test can see both ran."""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request


@asynccontextmanager
async def lifespan(app):
    yield {"started_in": os.getpid()}
    with open(os.environ["LIFESPAN_MARK"], "a") as f:
        f.write(f"shutdown {os.getpid()}\n")


main = FastAPI(lifespan=lifespan)


@main.get("/pid")
async def pid() -> int:
    return os.getpid()


@main.get("/state")
async def state(request: Request) -> dict:
    return {"pid": os.getpid(), "started_in": request.state.started_in}
