"""Serving the application: the HTTP connection policy and the process lifecycle.

aiohttp parses requests; this module decides what a client that misbehaves
at the HTTP level gets, and in which order a shutdown happens:

* Every error answer is JSON with a machine-readable ``code`` (OpenAI's
  envelope under ``/v1/audio`` and ``/v1/models``), including the ones
  aiohttp produces itself: an unknown path (404), a wrong method (405), a
  body over the size limit (413), a request aiohttp cannot parse (400),
  headers that are too long or too many (431), and an unexpected failure
  (500). Route-level errors are turned into JSON by :func:`error_middleware`;
  parse-level ones, which aiohttp answers before any middleware runs, by the
  connection handler of :class:`EarshotRunner`.
* A connection must complete its request headers within ``header_timeout_s``
  of opening (or of its previous response), or it is closed; at most
  ``max_pending_connections`` connections may be open without having sent a
  complete request (slowloris), further ones get 503 and are closed.
* Access log lines never carry a secret from the query string (``token``,
  ``api_key``, ``key``, ``access_token``...).
* Shutdown (SIGTERM, SIGINT) in an order a load balancer understands: the
  listener stays open and answers ``/readyz`` and new streams with 503 and
  ``Retry-After`` while open streams receive their finals (at least
  ``drain_s``), then it closes; the whole exit takes at most
  ``shutdown_timeout_s`` whatever clients do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from earshot.core.openai_wire import error_envelope, is_openai_path
from earshot.service.config import Config

log = logging.getLogger("earshot.http")
access_log = logging.getLogger("earshot.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SECRET_QUERY_KEYS = frozenset(
    {
        "token",
        "access_token",
        "api_key",
        "apikey",
        "api-key",
        "key",
        "password",
        "secret",
        "auth",
        "authorization",
    }
)
"""Query-string keys whose values are replaced by ``REDACTED`` in every log line."""


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    426: "websocket_required",
    431: "request_header_too_large",
    500: "internal_error",
    503: "service_unavailable",
}
"""The code of each HTTP status aiohttp may answer with by itself."""


def http_error_code(status: int) -> str:
    return _HTTP_CODES.get(status, "bad_request" if status < 500 else "internal_error")


def error_body(path: str, status: int, code: str, message: str) -> dict[str, Any]:
    """The one error shape: ``{"code", "message"}``, or OpenAI's envelope."""
    if is_openai_path(path):
        return error_envelope(code, message, status)
    return {"type": "Error", "code": code, "message": message}


def redact_query(query: str) -> str:
    """``query`` with the values of secret keys replaced by ``REDACTED``."""
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode(
        [(k, "REDACTED" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe=":/"
    )


def redacted_target(request: web.BaseRequest) -> str:
    """The request's path and query as they may appear in a log line."""
    query = request.query_string
    return request.path + (f"?{redact_query(query)}" if query else "")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Route-level errors as JSON with a code (404, 405, 413... and 500)."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
        message = message or exc.reason
        if exc.status == 405:
            allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
            message = f"method {request.method} is not allowed here" + (
                f"; allowed: {allowed}" if allowed else ""
            )
        elif exc.status == 404:
            message = f"no such path: {request.path}"
        elif exc.status == 413:
            message = f"the request body is too large: {exc.text}"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return web.json_response(
            error_body(request.path, exc.status, http_error_code(exc.status), message),
            status=exc.status,
            headers=headers,
        )
    except asyncio.CancelledError:
        raise
    except ConnectionError:
        # The client went away mid-request (an upload cut off): nothing to
        # answer, and not a failure of the server.
        log.info("client disconnected during the request", extra={"path": request.path})
        return web.json_response(
            error_body(request.path, 400, "client_disconnected", "the client went away"),
            status=400,
        )
    except Exception:
        log.exception("request failed", extra={"path": request.path})
        return web.json_response(
            error_body(request.path, 500, "internal_error", "the server failed on this request"),
            status=500,
        )
    return response


class RedactingAccessLogger(AbstractAccessLogger):
    """One access line per request, without query-string secrets."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %d",
            request.method,
            redacted_target(request),
            response.status,
            extra={
                "method": request.method,
                "path": redacted_target(request),
                "status": response.status,
                "duration_ms": round(time * 1000, 1),
                "peer": request.remote,
            },
        )


class _ConnectionHandler(RequestHandler):
    """aiohttp's connection handler, with JSON parse errors and a bound on
    connections that have not yet sent a request."""

    _earshot_pending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._manager
        limit = getattr(server, "max_pending", 0)
        if isinstance(server, _Server) and limit and server.pending >= limit:
            body = json.dumps(
                error_body(
                    "",
                    503,
                    "too_many_connections",
                    f"{limit} connections are already waiting to send a request "
                    "(max_pending_connections)",
                )
            ).encode()
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
            ).encode()
            with contextlib.suppress(Exception):
                transport.write(head + body)  # type: ignore[attr-defined]
            transport.close()
            server.refused += 1
            return
        if isinstance(server, _Server):
            server.pending += 1
            self._earshot_pending = True
        super().connection_made(transport)

    def _left_pending(self) -> None:
        if self._earshot_pending:
            self._earshot_pending = False
            if isinstance(self._manager, _Server):
                self._manager.pending -= 1

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._earshot_pending and self._request_count > 0:
            self._left_pending()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._left_pending()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs the traceback
        else:
            # A request that cannot be parsed is the client's doing, and anyone
            # can send one: one line, not a traceback at ERROR for each.
            log.info(
                "refused a malformed request: %s",
                exc if exc is not None else message,
                extra={"status": status, "peer": request.remote},
            )
            if request.writer.output_size > 0:
                raise ConnectionError("the response had begun; cannot send an error")
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "header" in str(exc).lower()
        ):
            status = 431
        text = exc.message if isinstance(exc, HttpProcessingError) and exc.message else None
        if status >= 500:
            text = "the server failed on this request"
        path = ""
        with contextlib.suppress(Exception):
            path = request.path
        body = error_body(path, status, http_error_code(status), text or http_error_code(status))
        resp = web.json_response(body, status=status)
        resp.force_close()
        return resp


class _Server(web.Server):
    """aiohttp's server with :class:`_ConnectionHandler` and its counters."""

    def __init__(self, *args: Any, max_pending: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_pending = max_pending
        self.pending = 0
        self.refused = 0

    def __call__(self) -> RequestHandler:
        return _ConnectionHandler(self, loop=self._loop, **self._kwargs)

    def transports(self) -> list[asyncio.Transport]:
        return list(self._connections.values())


class EarshotRunner(web.AppRunner):
    """An AppRunner whose connections follow this module's policy."""

    def __init__(self, app: web.Application, config: Config, **kwargs: Any) -> None:
        kwargs.setdefault("access_log_class", RedactingAccessLogger)
        kwargs.setdefault("access_log", access_log)
        kwargs.setdefault("keepalive_timeout", config.header_timeout_s)
        kwargs.setdefault("shutdown_timeout", config.shutdown_timeout_s)
        super().__init__(app, handle_signals=False, **kwargs)
        self._max_pending = config.max_pending_connections

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # runs the app's startup and freezes it
        kwargs = dict(self._kwargs)
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            loop=asyncio.get_running_loop(),
            max_pending=self._max_pending,
            **kwargs,
        )

    @property
    def connections(self) -> int:
        server = self.server
        return len(server.connections) if server is not None else 0


async def serve(
    app: web.Application,
    config: Config,
    *,
    drain: Callable[[float], Awaitable[None]],
    sock: socket.socket | None = None,
    stop: asyncio.Event | None = None,
    on_started: Callable[[EarshotRunner], None] | None = None,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT (or ``stop`` is set), then shut down.

    ``drain(deadline)`` is the application's part of the shutdown (new
    streams refused, open ones flushed), given the loop time by which it must
    be done. The listener stays open while it runs, and at least
    ``config.drain_s``; then it closes and whatever is left is ended, all
    within ``config.shutdown_timeout_s`` of the signal.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    runner = EarshotRunner(app, config)
    await runner.setup()
    deadline: float | None = None
    try:
        if sock is not None:
            site: web.BaseSite = web.SockSite(runner, sock)
        else:
            site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        if on_started is not None:
            on_started(runner)
        await stop.wait()
        started = loop.time()
        deadline = started + config.shutdown_timeout_s
        log.info(
            "shutting down: draining for up to %.0f s",
            config.shutdown_timeout_s,
            extra={"open_connections": runner.connections},
        )
        # Keep a little of the budget for closing the connections afterwards.
        drained_by = deadline - min(2.0, config.shutdown_timeout_s / 4)
        await asyncio.gather(
            drain(drained_by), asyncio.sleep(max(0.0, min(config.drain_s, drained_by - started)))
        )
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await _close(runner, deadline or loop.time() + config.shutdown_timeout_s)


async def _close(runner: EarshotRunner, deadline: float) -> None:
    """Close the listener, then every connection, by ``deadline`` at the latest."""
    loop = asyncio.get_running_loop()
    server = runner.server
    left = max(0.1, deadline - loop.time())
    # aiohttp waits this long for requests in progress (a stalled upload, say)
    # before it cancels them; only now is the budget left known.
    runner._shutdown_timeout = max(0.05, left - 0.5)
    try:
        await asyncio.wait_for(runner.cleanup(), timeout=left)
    except asyncio.TimeoutError:
        log.warning("connections still open at the shutdown deadline; closing them")
    finally:
        if isinstance(server, _Server):
            for transport in server.transports():
                transport.abort()
