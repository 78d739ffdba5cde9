"""A FastAPI app with a WebSocket route (tests/granian.rs): /echo answers
each text message with "echo: " and the message; /pid names the worker."""

import os

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

main = FastAPI()


@main.get("/pid")
async def pid() -> int:
    return os.getpid()


@main.websocket("/echo")
async def echo(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            text = await ws.receive_text()
            await ws.send_text(f"echo: {text}")
    except WebSocketDisconnect:
        pass
