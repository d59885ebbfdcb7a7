"""What every handler of the HTTP shell takes from the application."""

from __future__ import annotations

from aiohttp import web

from earshot.core.errors import EarshotError
from earshot.core.protocol import error_message
from earshot.service.engine.engine import Engine

ENGINE = web.AppKey("engine", Engine)


def json_error(
    err: EarshotError, *, status: int | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(error_message(err), status=status or err.http_status, headers=headers)
