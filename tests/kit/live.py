"""Run the real server in-process on 127.0.0.1 for integration tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import ClientSession, WSMsgType, web

from earshot.core.decoding import Backend, Fallback
from earshot.models.silero import shared_model
from earshot.service.config import load_config
from earshot.service.engine.engine import Engine
from earshot.service.http.app import create_app
from earshot.service.http.serving import EarshotRunner
from tests.kit.tones import ToneBackend


def tone_engine(
    backend: Backend | None = None, *, fallback: Fallback | None = None, **overrides: Any
) -> Engine:
    """An engine serving ``backend`` (the tone-language reader by default)
    with the real Silero endpointer; ``overrides`` are configuration settings
    (``max_streams=2``), ``fallback`` a remote fallback backend."""
    cfg = load_config(env={}, overrides=overrides)
    return Engine.create(cfg, backend or ToneBackend(), vad_model=shared_model(), fallback=fallback)


@contextlib.asynccontextmanager
async def running_server(
    engine: Engine, configure: Callable[[web.Application], None] | None = None
) -> AsyncIterator[str]:
    """Serve ``engine`` on a free loopback port; yields ``http://127.0.0.1:PORT``.

    ``configure`` may adjust the application before it starts."""
    app = create_app(engine)
    if configure is not None:
        configure(app)
    runner = EarshotRunner(app, engine.config)
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


async def non_reading_websocket(url: str, query: str) -> socket.socket:
    """A websocket to ``url`` (``http://HOST:PORT``) ``/v1/listen?query``, upgraded
    by hand on a socket with a 4 KiB receive buffer, for a client that will
    never read: send it frames with ``loop.sock_sendall`` (clients mask them,
    see :func:`masked_frame`)."""
    import base64
    import os

    host, port = url.removeprefix("http://").split("/")[0].split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(
        sock,
        (
            f"GET /v1/listen?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )
    if (await loop.sock_recv(sock, 12)) != b"HTTP/1.1 101":
        sock.close()
        raise AssertionError("the server did not upgrade the connection")
    return sock


def masked_frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    """One client-to-server websocket frame (RFC 6455: clients mask; ``masked``
    False makes the protocol violation a server must refuse)."""
    import os
    import struct

    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes([0x80 | opcode, bit | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
