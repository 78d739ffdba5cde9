"""A FastAPI app that reports what a worker's process looks like from the
inside: its sys.argv and whether procman's bootstrap variables leaked into
its environment (tests/observability.rs)."""

import os
import sys

from fastapi import FastAPI

main = FastAPI()


@main.get("/pid")
async def pid() -> int:
    return os.getpid()


@main.get("/inside")
async def inside() -> dict:
    return {
        "pid": os.getpid(),
        "argv": sys.argv,
        "leaked": sorted(k for k in os.environ if k.startswith("PROCMAN_BOOTSTRAP")),
    }
