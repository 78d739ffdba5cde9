"""An app that records which process ran its import-time code
(tests/zygote.rs: with the base zygote, each worker imports the app itself)."""

import os

from fastapi import FastAPI

IMPORTED_IN = os.getpid()

main = FastAPI()


@main.get("/pid")
async def pid() -> int:
    return os.getpid()


@main.get("/imported")
async def imported() -> dict:
    return {"pid": os.getpid(), "imported_in": IMPORTED_IN}
