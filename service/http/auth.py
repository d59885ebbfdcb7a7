"""API-key authentication and browser-origin checks, as an aiohttp middleware.

Keys come from the ``api_keys`` setting (``EARSHOT_API_KEYS``, comma-separated)
and the ``api_keys_file`` setting (one key per line; ``#`` comments and blank
lines ignored). A request carries its key as ``Authorization: Bearer KEY``,
``Authorization: Token KEY`` (Deepgram's clients) or, for browsers, which
cannot set headers on a websocket, as the subprotocols ``token, KEY``
(``new WebSocket(url, ["token", KEY])``); the server then selects ``token``.

Every refusal happens before a websocket upgrade: 401 ``unauthorized`` for a
missing or wrong key, 403 ``forbidden_origin`` for an ``Origin`` header that
is neither in ``allowed_origins`` nor the server's own page on loopback.
``/healthz``, ``/readyz`` and the demo page stay open. Keys are compared
in constant time against every configured key and are never logged.
See docs/auth.md.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import itertools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from earshot.core.errors import ConfigError, EarshotError, ForbiddenOriginError, UnauthorizedError
from earshot.core.openai_wire import error_envelope, is_openai_path
from earshot.core.protocol import error_message
from earshot.service.config import Config, split_list
from earshot.service.http.context import DEFERRED_AUTH, ENGINE, DeferredAuth
from earshot.service.http.demo import DEMO_PATHS
from earshot.service.http.livestream import STREAM_PATHS
from earshot.service.http.metrics import METRICS

OPEN_PATHS = frozenset({"/healthz", "/readyz"}) | DEMO_PATHS
"""Paths answered without a key or an origin check (load balancers, probes,
and the browser demo's page and assets, whose user types the key into it)."""

DEFERRED_AUTH_PATHS = frozenset({"/v1/twilio"})
"""Paths whose handler checks the key itself, from what the auth middleware
leaves in ``request[DEFERRED_AUTH]``: Twilio's ``<Stream>`` cannot send an
``Authorization`` header, so its key comes in the ``start`` message."""

TOKEN_SUBPROTOCOL = "token"
"""The websocket subprotocol that announces a key in the next subprotocol."""

WWW_AUTHENTICATE = 'Bearer realm="earshot", Token realm="earshot"'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_AUTH_INSTALLED = web.AppKey("earshot_auth_installed", bool)


# --- keys ---------------------------------------------------------------------


def parse_keys_text(text: str) -> list[str]:
    """Keys in a keys file's text: one per line, ``#`` starts a comment."""
    keys = []
    for line in text.splitlines():
        key = line.split("#", 1)[0].strip()
        if key:
            keys.append(key)
    return keys


def load_api_keys(config: Config) -> tuple[str, ...]:
    """Every configured key, from ``api_keys`` and ``api_keys_file``
    (duplicates dropped). Raises ConfigError if the file cannot be read."""
    keys = split_list(config.api_keys)
    if config.api_keys_file:
        path = Path(config.api_keys_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read api_keys_file {path}: {exc.__class__.__name__}",
                field="api_keys_file",
            ) from None
        keys.extend(parse_keys_text(text))
    return tuple(dict.fromkeys(keys))


def key_matches(candidate: str, keys: Sequence[str]) -> bool:
    """Whether ``candidate`` is one of ``keys``. Compares against every key
    with :func:`hmac.compare_digest`, with no early exit, so the time taken
    does not tell which key (or how much of one) matched."""
    given = candidate.encode("utf-8")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode("utf-8"))
    return found


def _matches(keys: Sequence[str], candidate: str) -> bool:
    return key_matches(candidate, keys)


def _parse_origins(raw: str) -> frozenset[str]:
    return frozenset(o.rstrip("/").lower() for o in split_list(raw))


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_own_loopback_origin(origin: str, request: web.BaseRequest) -> bool:
    """Whether ``origin`` is this server's own page opened on loopback:
    ``http://127.0.0.1:PORT``, ``http://localhost:PORT`` or ``http://[::1]:PORT``
    with PORT the port the request came in on. Such an origin is only ever
    sent by a page this server itself served (the demo page at ``/``): a
    page of another site carries its own name as origin, even when its name
    is rebound to 127.0.0.1, so the Host header is never trusted here."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.hostname not in _LOOPBACK_HOSTS:
        return False
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return isinstance(sockname, tuple) and len(sockname) >= 2 and port == sockname[1]


def request_credentials(request: web.BaseRequest) -> list[str]:
    """The keys a request offers: from ``Authorization`` (Bearer or Token) and,
    on a websocket upgrade, from subprotocols ``token, KEY``."""
    found = []
    auth = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        found.append(value.strip())
    if request.headers.get(hdrs.UPGRADE, "").lower().strip() == "websocket":
        offered = [
            p.strip()
            for p in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",")
            if p.strip()
        ]
        for name, value in itertools.pairwise(offered):
            if name.lower() == TOKEN_SUBPROTOCOL:
                found.append(value)
    return found


# --- bind policy ----------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` only listens on loopback (``localhost``, 127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind_policy(config: Config) -> None:
    """Refuse to serve a non-loopback ``host`` with no API keys configured,
    unless ``allow_unauthenticated_remote`` is set. Raises ConfigError (also
    for an unreadable ``api_keys_file``)."""
    keys = load_api_keys(config)
    if keys or config.allow_unauthenticated_remote or is_loopback_host(config.host):
        return
    raise ConfigError(
        f"host {config.host!r} is not a loopback address and no API keys are configured: "
        "set api_keys (EARSHOT_API_KEYS) or api_keys_file, listen on 127.0.0.1, or set "
        "allow_unauthenticated_remote = true to serve without authentication",
        field="host",
    )


# --- middleware -----------------------------------------------------------------


def _refusal(request: web.Request, err: EarshotError, headers: dict[str, str]) -> web.Response:
    body: dict[str, Any]
    if is_openai_path(request.path):
        body = error_envelope(err.code, err.message, err.http_status)
    else:
        body = error_message(err)
    metrics = request.app.get(METRICS)
    if metrics is not None and request.path in STREAM_PATHS:
        metrics.refused(err.code, err.http_status)
    return web.json_response(body, status=err.http_status, headers=headers)


class _Auth:
    """The middleware's state: the keys and allowed origins, read once."""

    unauthorized_headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": WWW_AUTHENTICATE}

    def __init__(self, config: Config) -> None:
        self.keys = load_api_keys(config)
        self.origins = _parse_origins(config.allowed_origins)

    def origin_allowed(self, origin: str, request: web.BaseRequest | None = None) -> bool:
        if "*" in self.origins or origin.strip().rstrip("/").lower() in self.origins:
            return True
        return request is not None and is_own_loopback_origin(origin, request)

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not self.origin_allowed(origin, request):
            err: EarshotError = ForbiddenOriginError(
                f"browser origin {origin!r} is not in allowed_origins", origin=origin
            )
            return _refusal(request, err, {})
        if self.keys:
            offered = request_credentials(request)
            # Check every offered credential (no short cut on the first).
            ok = False
            for candidate in offered:
                ok |= key_matches(candidate, self.keys)
            if request.path in DEFERRED_AUTH_PATHS:
                # The handler decides (docs/auth.md, "Twilio Media Streams").
                request[DEFERRED_AUTH] = DeferredAuth(ok, functools.partial(_matches, self.keys))
                return await handler(request)
            if not ok:
                reason = "wrong API key" if offered else "missing API key"
                err = UnauthorizedError(
                    f"{reason}: send Authorization: Bearer KEY (or Token KEY), "
                    "or websocket subprotocols 'token, KEY'"
                )
                return _refusal(request, err, self.unauthorized_headers)
        return await handler(request)


def auth_middleware(config: Config) -> Middleware:
    """The aiohttp middleware enforcing ``config``'s keys and origins (keys are
    read now: a changed keys file takes effect on restart)."""
    state = _Auth(config)

    @web.middleware
    async def earshot_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await state(request, handler)

    return earshot_auth


def register_auth(app: web.Application) -> None:
    """Install :func:`auth_middleware` on an app made by ``create_app(engine)``,
    using the engine's config. Call before the app starts; a second call does
    nothing."""
    if app.get(_AUTH_INSTALLED):
        return
    app[_AUTH_INSTALLED] = True
    app.middlewares.append(auth_middleware(app[ENGINE].config))
