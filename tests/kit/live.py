"""Run the real server in-process on 127.0.0.1 for integration tests and benchmarks."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable

from aiohttp import web

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
