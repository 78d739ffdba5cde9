"""An app that starts a thread at import time: fine cold, but with --preload
the thread lives only in the zygote, so procman warns."""

import threading
import time

from fastapi import FastAPI

threading.Thread(target=lambda: time.sleep(3600), daemon=True).start()

main = FastAPI()


@main.get("/pid")
async def pid() -> int:
    import os

    return os.getpid()
