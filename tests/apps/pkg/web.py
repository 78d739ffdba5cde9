"""`procman pkg.web:main`: an app inside a package."""

import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

main = FastAPI(title="pkg.web")


@main.get("/pid", response_class=PlainTextResponse)
async def pid() -> str:
    return str(os.getpid())
