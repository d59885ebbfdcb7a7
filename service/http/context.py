"""What every handler of the HTTP shell takes from the application."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from earshot.core.errors import EarshotError
from earshot.core.protocol import error_message
from earshot.service.engine.engine import Engine

ENGINE = web.AppKey("engine", Engine)


@dataclass(frozen=True)
class DeferredAuth:
    """What the auth middleware leaves on a request to a path whose handler
    checks the API key itself (``/v1/twilio``: Twilio cannot send headers,
    its key comes in the stream's first messages). Only set when API keys
    are configured."""

    header_ok: bool
    """The request's own headers carried a valid key."""
    check: Callable[[str], bool]
    """Whether a key is one of the configured keys (constant time)."""


DEFERRED_AUTH = web.RequestKey("earshot_deferred_auth", DeferredAuth)


def json_error(
    err: EarshotError, *, status: int | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(error_message(err), status=status or err.http_status, headers=headers)
