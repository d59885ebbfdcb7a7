"""Serving the browser demo client: a page served by ``earshot serve`` at ``/``.

The page lives with the other clients (``clients/web/``, package data of
``earshot.clients``); this module only serves its files, read as resources,
never as Python imported from the clients. The page is plain HTML, CSS and
JavaScript with no build step and nothing fetched from elsewhere, so it works on an air-gapped
network. It captures the microphone with an AudioWorklet, resamples it to
16 kHz in the page and streams 16-bit PCM to ``/v1/listen``; it can also
stream a local audio file through the same websocket code. See
``docs/demo.md``.

The page and its assets are public (the API key is typed into the page), so
their paths are listed in :data:`DEMO_PATHS`, which ``earshot.service.http.auth`` lets
through without a key or an origin check. Every answer carries a
Content-Security-Policy that allows only the server's own scripts, styles and
websocket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Final

from aiohttp import web

WEB_DIR: Final = files("earshot.clients") / "web"
"""Where the page's files live (package data of ``earshot.clients``)."""

ASSET_PREFIX: Final = "/demo/"

_CONTENT_TYPES: Final[dict[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

ASSETS: Final[dict[str, str]] = {
    "/": "index.html",
    ASSET_PREFIX + "app.js": "app.js",
    ASSET_PREFIX + "worklet.js": "worklet.js",
    ASSET_PREFIX + "style.css": "style.css",
    ASSET_PREFIX + "icon.svg": "icon.svg",
}
"""URL path -> file name in :data:`WEB_DIR`: exactly what is served."""

DEMO_PATHS: Final = frozenset(ASSETS)
"""The demo's paths, answered without an API key or an origin check."""

CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "media-src 'self' blob:",
        "connect-src 'self' ws: wss:",
        "worker-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

SECURITY_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    "Cache-Control": "no-cache",
}


def _asset_handler(
    body: bytes, content_type: str
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": content_type, **SECURITY_HEADERS})

    return handle


def register_demo_routes(app: web.Application) -> None:
    """Serve the demo page at ``/`` and its assets under ``/demo/`` on ``app``.

    The files are read once, now; a missing file raises FileNotFoundError."""
    for path, name in ASSETS.items():
        file = WEB_DIR / name
        content_type = _CONTENT_TYPES[name[name.rfind(".") :]]
        app.router.add_get(path, _asset_handler(file.read_bytes(), content_type))
