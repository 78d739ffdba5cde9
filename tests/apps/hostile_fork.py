"""An app whose zygote cannot fork workers properly (for --preload tests).

Importing it replaces os.fork, which only the zygote uses (a cold worker
never forks), according to HOSTILE_FORK:
* "error": every fork fails, so the zygote answers each spawn with an error;
* "slow": a fork made by a process other than the importer (the zygote's
  intermediate, forking the worker) returns to the parent only after 3 s,
  so the worker's pid is reported past the master's 2 s patience.
Cold workers serve normally: GET /pid answers with the worker's pid.
"""

import os
import time

from fastapi import FastAPI

_real_fork = os.fork
_importer = os.getpid()
_mode = os.environ.get("HOSTILE_FORK", "")


def _hostile_fork():
    if _mode == "error":
        raise OSError(11, "Resource temporarily unavailable (hostile test app)")
    me = os.getpid()
    pid = _real_fork()
    if pid != 0 and me != _importer and _mode == "slow":
        time.sleep(3)
    return pid


os.fork = _hostile_fork

main = FastAPI()


@main.get("/pid")
async def pid() -> int:
    return os.getpid()
