"""An app built by a factory: `procman factory_app:create_app --factory`."""

import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse


def create_app() -> FastAPI:
    app = FastAPI(title="factory app")

    @app.get("/pid", response_class=PlainTextResponse)
    async def pid() -> str:
        return str(os.getpid())

    return app
