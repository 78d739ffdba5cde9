"""An app module that fails while being imported: exit status 4, the traceback shown."""

from fastapi import FastAPI

main = FastAPI()


def _configure():
    raise RuntimeError("boom at import")


_configure()
