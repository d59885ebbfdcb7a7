"""Run the real server in-process on 127.0.0.1 for integration tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import ClientSession, WSMsgType, web

from service.server import Engine, create_app


@contextlib.asynccontextmanager
async def running_server(
    engine: Engine, configure: Callable[[web.Application], None] | None = None
) -> AsyncIterator[str]:
    """Serve ``engine`` on a free loopback port; yields ``http://127.0.0.1:PORT``.

    ``configure`` may adjust the application before it starts."""
    app = create_app(engine)
    if configure is not None:
        configure(app)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


Frame = bytes | str | float
"""What :func:`raw_stream` sends: audio bytes, a text frame, or a pause in seconds."""


async def raw_stream(
    url: str, frames: Sequence[Frame], query: str = "encoding=linear16&sample_rate=16000"
) -> tuple[list[dict[str, Any]], int | None]:
    """Send ``frames`` on a websocket to ``url`` (a ws:// /v1/listen URL), then
    read until the server closes; every JSON message received, and the close code."""
    messages: list[dict[str, Any]] = []
    async with ClientSession() as http, http.ws_connect(f"{url}?{query}") as ws:
        for frame in frames:
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            elif isinstance(frame, str):
                await ws.send_str(frame)
            else:
                await asyncio.sleep(frame)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                messages.append(msg.json())
        return messages, ws.close_code


def final_texts(messages: Sequence[dict[str, Any]]) -> list[str]:
    """The transcripts of the final Results among ``messages``, in order."""
    return [
        m["channel"]["alternatives"][0]["transcript"]
        for m in messages
        if m["type"] == "Results" and m["is_final"]
    ]
