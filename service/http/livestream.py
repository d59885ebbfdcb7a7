"""One live websocket stream on the shared scheduler, whatever its wire protocol.

:class:`LiveStream` moves audio from a websocket into a pure
:class:`~earshot.core.session.StreamSession`, sends the session's decode
requests to the engine's one scheduler and writes the session's events back.
The protocols (Deepgram's ``/v1/listen``, OpenAI Realtime, Twilio Media
Streams) are subclasses that only translate: what a frame means, how an event
is written. :func:`open_stream` is the admission every endpoint shares
(shutdown, ``max_streams``, overload, the upgrade, masked frames, the
counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar

from aiohttp import WebSocketError, WSCloseCode, WSMessage, WSMsgType, web

from earshot.core.decoding import Hypothesis
from earshot.core.errors import (
    CLOSE_ABNORMAL,
    CLOSE_CLIENT_NOT_READING,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    ClientNotReadingError,
    EarshotError,
    FrameTooLargeError,
    IdleTimeoutError,
    InvalidHandshakeError,
    SchedulerStoppedError,
    ServerFullError,
    SessionTooLongError,
    WebsocketRequiredError,
)
from earshot.core.protocol import Event, StreamParams, TranscriptEvent, WarningEvent
from earshot.core.session import FINAL, DecodeRequest, Output, StreamSession
from earshot.service.engine.engine import Engine, backend_label
from earshot.service.engine.scheduler import DecodeJob, JobKind
from earshot.service.http.context import ENGINE, json_error
from earshot.service.http.metrics import METRICS
from earshot.service.http.wsframes import MaskCheck
from earshot.service.logs import transcript_fields

log = logging.getLogger("earshot.server")

_P = TypeVar("_P")

STREAM_PATHS = frozenset({"/v1/listen", "/v1/realtime", "/v1/twilio"})
"""The live stream endpoints: their refusals count in ``earshot_refusals_total``."""


_GONE = WSMessage(WSMsgType.CLOSED, None, None)
"""What :meth:`LiveStream._receive` returns for a connection that broke."""


class LiveStream:
    """One live websocket stream: reads frames, drives the session, sends events.

    The wire protocol is a subclass's: what the client is sent first and last
    (:meth:`opening_messages`, :meth:`closing_messages`), how a session event
    and an error are written (:meth:`render`, :meth:`render_error`) and what
    a text or binary frame means (:meth:`on_text`, :meth:`on_binary`, which
    call :meth:`push_audio`, :meth:`finalize` and :meth:`send`). The rest (the
    shared scheduler, back-pressure, limits, the flush of the last finals, the
    close) is the same for every protocol and lives here.
    """

    protocol: ClassVar[str] = "deepgram"
    """The wire protocol's label in metrics and logs."""

    results_outlive_client: ClassVar[bool] = False
    """True where the stream's results go elsewhere than its own websocket
    (Twilio's go to the call's subscribers): its last finals are then decoded
    even when the client has closed or dropped its socket."""

    def __init__(
        self,
        engine: Engine,
        ws: web.WebSocketResponse,
        params: StreamParams,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.ws = ws
        self.params = params
        self.request_id = str(uuid.uuid4())
        self.created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self.session = self._new_session(params)
        # Set while the session may take more audio (see _wait_for_room).
        self._room = asyncio.Event()
        self._room.set()
        self._outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(
            maxsize=engine.config.max_pending_messages
        )
        self._futures: set[asyncio.Future[Hypothesis | None]] = set()
        self._finals_done = asyncio.Event()
        self._finals_done.set()
        self._fatal: EarshotError | None = None
        self._close_reason: str | None = None
        self._stopping = asyncio.Event()
        self._stop_waiter: asyncio.Future[Any] | None = None
        self._ending = False
        self.finished = asyncio.Event()
        self.finals_sent = 0
        self.backends_used: Counter[str] = Counter()
        # When the send in progress started (None: the sender is idle).
        self._sending_since: float | None = None

    @property
    def received_seconds(self) -> float:
        """Seconds of audio received (what the metrics read)."""
        return self.session.received_seconds

    def lag_seconds(self) -> float:
        """The session's lag now (what the metrics read)."""
        return self.session.lag_seconds()

    def _new_session(self, params: StreamParams) -> StreamSession:
        engine = self.engine
        return StreamSession(
            params,
            engine.session_settings,
            engine.vad_model,
            vad_factory=engine.vad_factory,
            clock=asyncio.get_running_loop().time,
        )

    # -- what a protocol says -------------------------------------------------

    def opening_messages(self) -> list[dict[str, Any]]:
        """The messages sent as soon as the stream is open."""
        return []

    def closing_messages(self) -> list[dict[str, Any]]:
        """The messages sent after the last final, before the close."""
        return []

    def render(self, ev: Event) -> list[dict[str, Any]]:
        """The messages that say ``ev`` to the client (none: it is not told)."""
        raise NotImplementedError

    def render_error(self, err: EarshotError) -> dict[str, Any]:
        """The message that reports ``err`` to the client."""
        raise NotImplementedError

    def render_internal_error(self, message: str) -> dict[str, Any]:
        """The message that reports a bug of the server to the client."""
        return {"type": "Error", "code": "internal_error", "message": message}

    def on_text(self, text: str) -> bool:
        """Handle a text frame; False ends the stream as the client asked.
        Raise an EarshotError to end it with that error."""
        raise NotImplementedError

    def on_binary(self, data: bytes) -> None:
        """Handle a binary frame: by default it is audio in the stream's format."""
        self.push_audio(data)

    def log_fields(self) -> dict[str, Any]:
        """What the "stream opened" log line says of this stream."""
        audio = self.params.audio
        return {
            "encoding": audio.encoding,
            "sample_rate": audio.sample_rate,
            "channels": audio.channels,
            "language": self.params.language,
        }

    # -- what a protocol calls ------------------------------------------------

    def push_audio(self, data: bytes) -> None:
        """Give the session audio in its format (interleaved frames)."""
        limit = self.engine.config.max_frame_bytes
        if len(data) > limit:
            raise FrameTooLargeError(
                f"a frame of {len(data)} bytes of audio is over the limit of "
                f"{limit} bytes (max_frame_bytes)",
                size=len(data),
                limit=limit,
            )
        self._submit(self.session.push(data, interims_allowed=self._interims_allowed))
        self._emit(self.session.check_lag())

    def finalize(self, *, at_end: bool = False) -> None:
        """Close the open utterances now (Deepgram's Finalize, OpenAI's commit
        with ``at_end``: see StreamSession.finalize)."""
        self._submit(self.session.finalize(at_end=at_end))

    def discard(self) -> None:
        """Drop the open utterances undecoded (OpenAI's ``input_audio_buffer.clear``)."""
        self._submit(self.session.discard())

    def reconfigure(self, params: StreamParams) -> None:
        """Start over with ``params``: only before any audio was received."""
        if self.session.received_seconds > 0:
            raise RuntimeError("a stream cannot be reconfigured after its audio began")
        self.params = params
        self.session = self._new_session(params)

    def send(self, message: dict[str, Any]) -> None:
        """Queue a message for the client. A client that does not read is
        closed (4430) by count, past ``max_pending_messages`` waiting, and by
        time, when one send has been stuck for ``max_unread_s``: what it may
        cost the server is bounded both ways."""
        limit_s = self.engine.config.max_unread_s
        stuck = self._sending_since
        if stuck is not None and asyncio.get_running_loop().time() - stuck > limit_s:
            self._fatal = self._fatal or ClientNotReadingError(
                f"the client has read nothing for {limit_s:g} s (max_unread_s)",
                limit_s=limit_s,
            )
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self._fatal = self._fatal or ClientNotReadingError(
                f"the client has not read its last {self._outbox.maxsize} messages "
                "(max_pending_messages)",
                limit=self._outbox.maxsize,
            )

    def send_error(self, err: EarshotError) -> None:
        """Tell the client of an error that does not end the stream."""
        log.info(
            "stream message refused %s: %s",
            err.code,
            err.message,
            extra={"session": self.request_id, "code": err.code, "protocol": self.protocol},
        )
        self.send(self.render_error(err))

    def log_warning(self, warning: WarningEvent) -> None:
        """Write ``warning`` to the log (for one the client is not sent)."""
        log.info(
            "stream warning %s: %s",
            warning.code,
            warning.message,
            extra={"session": self.request_id, "code": warning.code, "protocol": self.protocol},
        )

    def stop(self) -> None:
        """Ask the stream to end as at a server shutdown (see Engine.shut_down)."""
        self._stopping.set()

    # -- receiving ------------------------------------------------------------

    async def _receive(self, timeout: float) -> Any:
        """The next websocket message; raises SchedulerStoppedError once the
        server is shutting down and asyncio.TimeoutError after ``timeout``."""
        if self._stop_waiter is None:
            self._stop_waiter = asyncio.ensure_future(self._stopping.wait())
        receive = asyncio.ensure_future(self.ws.receive(timeout=timeout))
        await asyncio.wait({receive, self._stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if receive.done():
            try:
                return receive.result()
            except ConnectionError:  # it went while the server answered its pings
                return _GONE
        receive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receive
        raise SchedulerStoppedError(
            "the server is shutting down; this stream's finals are sent before it closes"
        )

    # -- sending --------------------------------------------------------------

    async def _sender(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await self._outbox.get()
            if message is None:
                return
            self._sending_since = loop.time()
            await self.ws.send_str(json.dumps(message, ensure_ascii=False))
            self._sending_since = None

    def _emit(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, TranscriptEvent) and ev.is_final:
                self.finals_sent += 1
                ev.extra["provenance"] = self.engine.result_provenance(
                    ev.extra.get("backend") or {}
                )
                log.debug(
                    "final",
                    extra={
                        "session": self.request_id,
                        "protocol": self.protocol,
                        "channel": ev.channel,
                        "start": round(ev.start, 3),
                        "duration": round(ev.duration, 3),
                        "words": len(ev.words),
                        **transcript_fields(ev.transcript, self.engine.config.log_transcripts),
                    },
                )
            for message in self.render(ev):
                self.send(message)

    # -- decoding -------------------------------------------------------------

    def _submit(self, out: Output) -> None:
        self._emit(out.events)
        for req in out.requests:
            kind = JobKind.FINAL if req.kind == FINAL else JobKind.INTERIM
            job = DecodeJob(
                key=(self.request_id, req.channel), kind=kind, window=req.window, tag=req
            )
            fut = self.engine.scheduler.submit(job)
            self._futures.add(fut)
            if req.kind == FINAL:
                self._finals_done.clear()
            fut.add_done_callback(functools.partial(self._on_done, self.session, req))

    def _on_done(
        self,
        session: StreamSession,
        req: DecodeRequest,
        fut: asyncio.Future[Hypothesis | None],
    ) -> None:
        self._futures.discard(fut)
        if session is not self.session:  # decoded for a session since replaced
            return
        hyp: Hypothesis | None = None
        err: BaseException | None = None
        if fut.cancelled():
            err = asyncio.CancelledError()
        elif fut.exception() is not None:
            err = fut.exception()
            log.warning("decode failed: %s", err, extra={"session": self.request_id})
        else:
            hyp = fut.result()
        if hyp is not None:
            self._note_backend(hyp)
        self._emit(self.session.on_result(req, hyp, err))
        if self.session.pending_finals == 0:
            self._finals_done.set()
        if not self.session.saturated:
            self._room.set()

    def _note_backend(self, hyp: Hypothesis) -> None:
        """Count which backend decoded; the first remote result of the stream
        is announced (a log line, and a Warning to clients that asked)."""
        name = backend_label(hyp.info)
        first = name != "local" and not any(n != "local" for n in self.backends_used)
        self.backends_used[name] += 1
        if first:
            reason = str(hyp.info.get("fallback") or "")
            log.warning(
                "stream uses the remote fallback %s (%s)",
                name,
                reason,
                extra={"session": self.request_id, "backend": name, "reason": reason},
            )
            self._emit(
                [
                    WarningEvent(
                        "remote_fallback",
                        f"results of this stream now also come from the remote backend {name} "
                        f"({reason}); each such result says so in earshot.provenance",
                        {"backend": name, "reason": reason},
                    )
                ]
            )

    async def _wait_for_room(self) -> None:
        """Back-pressure: while the session has as many finals in flight as it
        may, read nothing more (a client sending faster than real time then
        waits on its own socket). The lag is still checked meanwhile, so a
        live client that falls behind is warned and closed as always."""
        while self.session.saturated and self._fatal is None and not self._stopping.is_set():
            self._room.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=0.5)
            self._emit(self.session.check_lag())

    def _interims_allowed(self, channel: int) -> bool:
        return self.engine.scheduler.should_submit_interim((self.request_id, channel))

    # -- main loop ------------------------------------------------------------

    async def run(self) -> None:
        engine = self.engine
        cfg = engine.config
        sender = asyncio.create_task(self._sender())
        for message in self.opening_messages():
            self.send(message)
        close_code = CLOSE_NORMAL
        client_gone = False
        loop = asyncio.get_running_loop()
        opened = loop.time()
        deadline = opened + cfg.max_session_s
        try:
            while self._fatal is None:
                await self._wait_for_room()
                if self._fatal is not None:
                    break
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    msg = await self._receive(min(cfg.idle_timeout_s, remaining))
                except asyncio.TimeoutError:
                    if loop.time() >= deadline:
                        raise SessionTooLongError(
                            f"the stream reached the limit of {cfg.max_session_s:g} s "
                            "(max_session_s); open a new stream to go on",
                            limit_s=cfg.max_session_s,
                        ) from None
                    raise IdleTimeoutError(
                        f"no audio and no KeepAlive for {cfg.idle_timeout_s:g} s (idle_timeout_s)",
                        limit_s=cfg.idle_timeout_s,
                    ) from None
                if msg.type == WSMsgType.BINARY:
                    data: bytes = msg.data
                    if len(data) > cfg.max_frame_bytes:
                        raise FrameTooLargeError(
                            f"a binary frame of {len(data)} bytes is over the limit of "
                            f"{cfg.max_frame_bytes} bytes (max_frame_bytes)",
                            size=len(data),
                            limit=cfg.max_frame_bytes,
                        )
                    self.on_binary(data)
                elif msg.type == WSMsgType.TEXT:
                    if not self.on_text(msg.data):
                        break
                else:  # CLOSE, CLOSING, CLOSED, ERROR: the client is gone
                    client_gone = True
                    close_code = self._client_close_code(msg)
                    break
            if self._fatal is not None:
                raise self._fatal
        except EarshotError as exc:
            close_code = exc.ws_close_code
            self._close_reason = exc.code
            log.info(
                "stream error %s: %s",
                exc.code,
                exc.message,
                extra={"session": self.request_id, "protocol": self.protocol},
            )
            self.send(self.render_error(exc))
        except Exception as exc:  # a bug: report, flush, close
            log.exception("stream failed", extra={"session": self.request_id})
            close_code = CLOSE_INTERNAL
            self._close_reason = "internal_error"
            self.send(self.render_internal_error(str(exc)))
        if close_code == CLOSE_CLIENT_NOT_READING:
            client_gone = True  # its buffers are full: nothing more would be read
        try:
            if not client_gone or self.results_outlive_client:
                await self._flush()
        finally:
            for fut in list(self._futures):
                fut.cancel()
            with contextlib.suppress(asyncio.QueueFull):
                self._outbox.put_nowait(None)
            if not client_gone:
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                    await asyncio.wait_for(asyncio.shield(sender), timeout=5.0)
            engine.closes[close_code] += 1
            log.info(
                "stream closed",
                extra={
                    "session": self.request_id,
                    "protocol": self.protocol,
                    "close_code": close_code,
                    "reason": self._close_reason or ("client_gone" if client_gone else "normal"),
                    "audio_s": round(self.session.received_seconds, 3),
                    "wall_s": round(loop.time() - opened, 3),
                    "finals": self.finals_sent,
                },
            )
            if close_code == CLOSE_CLIENT_NOT_READING and self.transport is not None:
                # A client that does not read cannot take a close frame either.
                self.transport.abort()
            sender.cancel()
            with contextlib.suppress(
                asyncio.CancelledError, asyncio.TimeoutError, ConnectionError, RuntimeError
            ):
                await asyncio.wait_for(sender, timeout=2.0)
            reason = (self._close_reason or "").encode()[:120]
            try:
                await asyncio.wait_for(self.ws.close(code=close_code, message=reason), 10.0)
            except (asyncio.TimeoutError, ConnectionError):
                if self.transport is not None:
                    self.transport.abort()
            if self._stop_waiter is not None:
                self._stop_waiter.cancel()
            self.finished.set()

    def _client_close_code(self, msg: Any) -> int:
        """How the client ended the stream, for the metrics and the log: its
        own close code, the protocol error the websocket layer found (1002,
        1009), or 1006 when the connection dropped without a close frame."""
        if msg.type == WSMsgType.CLOSE and isinstance(msg.data, int) and msg.data:
            return int(msg.data)
        if self.ws.close_code and self.ws.close_code != CLOSE_NORMAL:
            return int(self.ws.close_code)
        return CLOSE_ABNORMAL

    async def _read_until_closed(self) -> None:
        """Read and ignore whatever the client sends until it closes."""
        while True:
            try:
                msg = await self.ws.receive()
            except ConnectionError:
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return

    async def _flush(self) -> None:
        """Finish the stream: decode every open utterance and wait for its final."""
        out, error = self.session.finish()
        self._submit(out)
        if error is not None:
            self.send(self.render_error(error))
        # Keep reading while the last finals are decoded: aiohttp answers the
        # client's pings only inside receive(), and a client whose pings go
        # unanswered gives up before its finals arrive.
        reader = asyncio.create_task(self._read_until_closed())
        finals = asyncio.create_task(self._finals_done.wait())
        try:
            await asyncio.wait(
                {finals} if self.results_outlive_client else {reader, finals},
                timeout=self.engine.config.flush_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            finals.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        for message in self.closing_messages():
            self.send(message)


# -- admission ------------------------------------------------------------------


ErrorWriter = Callable[[EarshotError, "dict[str, str] | None"], web.StreamResponse]
"""Writes a refusal before the upgrade in an endpoint's own error shape."""


def _earshot_error(err: EarshotError, headers: dict[str, str] | None) -> web.StreamResponse:
    return json_error(err, headers=headers)


def refuse(
    request: web.Request,
    err: EarshotError,
    headers: dict[str, str] | None = None,
    write: ErrorWriter = _earshot_error,
) -> web.StreamResponse:
    """Answer a stream request with ``err`` before the upgrade (logged, counted)."""
    log.info(
        "stream refused: %s",
        err.message,
        extra={"code": err.code, "status": err.http_status, "peer": request.remote},
    )
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.refused(err.code, err.http_status)
    return write(err, headers)


def admission_error(engine: Engine) -> tuple[EarshotError, dict[str, str]] | None:
    """Why the engine takes no new stream now (and the headers to send), or None."""
    cfg = engine.config
    if engine.shutting_down:
        return (
            SchedulerStoppedError("the server is shutting down; try another instance"),
            {"Retry-After": "5"},
        )
    if engine.active_streams >= cfg.max_streams:
        return (
            ServerFullError(
                f"the server is at its limit of {cfg.max_streams} streams (max_streams)",
                limit=cfg.max_streams,
            ),
            {"Retry-After": "5"},
        )
    if not engine.scheduler.accepting():
        return (
            ServerFullError(
                f"the server is overloaded: {engine.scheduler.overload_reason() or 'busy'}"
            ),
            {"Retry-After": "2"},
        )
    return None


async def open_stream(
    request: web.Request,
    validate: Callable[[], _P],
    make: Callable[[_P, web.WebSocketResponse], LiveStream],
    *,
    protocols: tuple[str, ...] = ("token",),
    write_error: ErrorWriter = _earshot_error,
) -> web.StreamResponse:
    """Upgrade ``request`` and run the stream ``make`` builds, as every live
    endpoint does: the admission checks, the endpoint's own ``validate`` (of
    its query, say: an EarshotError it raises is the refusal), the upgrade
    and its errors, the mask check, the socket's send buffer, the counters
    and metrics. ``make`` gets what ``validate`` returned and the open
    websocket. ``write_error`` writes a refusal in the endpoint's own error
    shape (the default: Earshot's)."""
    engine = request.app[ENGINE]
    cfg = engine.config

    def refused(err: EarshotError, headers: dict[str, str] | None = None) -> web.StreamResponse:
        return refuse(request, err, headers, write_error)

    why = admission_error(engine)
    if why is not None:
        return refused(*why)
    try:
        validated = validate()
    except EarshotError as exc:
        return refused(exc)
    ws = web.WebSocketResponse(
        max_msg_size=cfg.max_frame_bytes * 4, timeout=5.0, protocols=protocols
    )
    try:
        upgradable = ws.can_prepare(request).ok
    except ValueError:  # e.g. a Sec-WebSocket-Key that is not ASCII
        return refused(
            InvalidHandshakeError(
                "the websocket handshake is malformed: Sec-WebSocket-Key must be 16 bytes "
                "in base64 (RFC 6455 4.1)",
                field="Sec-WebSocket-Key",
            )
        )
    if not upgradable:
        return refused(
            WebsocketRequiredError(
                f"GET {request.path} is a websocket endpoint: send the upgrade headers "
                "(Connection: Upgrade, Upgrade: websocket, Sec-WebSocket-Key, "
                "Sec-WebSocket-Version: 13)"
            ),
            {"Upgrade": "websocket"},
        )
    await ws.prepare(request)
    require_masked_frames(request, ws)
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        # What a client that stops reading can make the kernel hold for it.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.socket_send_buffer)
    stream = make(validated, ws)
    engine.active_streams += 1
    engine.streams_opened[stream.protocol] += 1
    engine.streams.add(stream)
    log.info(
        "stream opened",
        extra={
            "session": stream.request_id,
            "protocol": stream.protocol,
            "peer": request.remote,
            **stream.log_fields(),
            "active_streams": engine.active_streams,
        },
    )
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.stream_started(stream)
    try:
        await stream.run()
    finally:
        if metrics is not None:
            metrics.stream_ended(stream)
        engine.streams.discard(stream)
        engine.active_streams -= 1
    return ws


class _MaskCheckingParser:
    """Sits in front of aiohttp's websocket frame parser and ends the stream
    with 1002 at the first unmasked client frame (RFC 6455 5.1), which the
    parser itself accepts."""

    def __init__(self, inner: Any, queue: Any) -> None:
        self._inner = inner
        self._queue = queue
        self._check = MaskCheck()

    def feed_data(self, data: bytes | bytearray | memoryview) -> tuple[bool, bytes]:
        if self._check.violation:
            return True, b""
        if not self._check.feed(data):
            self._queue.set_exception(
                WebSocketError(
                    WSCloseCode.PROTOCOL_ERROR,
                    "client frames must be masked (RFC 6455, section 5.1)",
                )
            )
            return True, b""
        result: tuple[bool, bytes] = self._inner.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self._inner.feed_eof()


def require_masked_frames(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Install :class:`_MaskCheckingParser` on an upgraded connection (aiohttp
    keeps the parser and the message queue it feeds in private attributes;
    tests/test_hardening.py fails if that changes)."""
    protocol = request.protocol
    inner = getattr(protocol, "_payload_parser", None)
    queue = getattr(ws, "_reader", None)
    if inner is None or queue is None or not hasattr(queue, "set_exception"):
        log.warning("cannot check that client frames are masked")
        return
    protocol._payload_parser = _MaskCheckingParser(inner, queue)
