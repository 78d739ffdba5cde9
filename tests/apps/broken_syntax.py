"""An app module with a syntax error: importing it must fail with exit status 4."""

from fastapi import FastAPI

main = FastAPI(

def index():
    return "unreachable"
