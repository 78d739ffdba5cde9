"""An app that imports fine but whose lifespan startup fails: uvicorn exits 3, never ready."""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI


@asynccontextmanager
async def lifespan(app: FastAPI):
    raise RuntimeError("database unreachable at startup")
    yield  # unreachable; makes this an async generator


main = FastAPI(lifespan=lifespan)


@main.get("/pid")
async def pid() -> int:
    return os.getpid()
