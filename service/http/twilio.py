"""Twilio Media Streams at ``GET /v1/twilio``, and each call's subscribers at
``GET /v1/calls/{call_sid}/events`` (docs/protocol.md, "Twilio Media Streams").

Twilio's ``<Stream>`` connects to ``/v1/twilio`` and sends JSON messages
(read by :mod:`earshot.core.twilio`). At ``start`` the stream becomes one
multichannel µ-law stream on the shared scheduler (:class:`TwilioStream`, a
:class:`~earshot.service.http.livestream.LiveStream`): the inbound track is
channel 0, the outbound track channel 1, put side by side by a
:class:`~earshot.core.twilio.TrackInterleaver`. Twilio does not read what a
server says, so the transcripts go to the call's subscribers (any number of
websockets, through the app's :class:`CallHub`) and, where one is set, to a
webhook that every final is POSTed to, through the egress guard. Only errors
are written on Twilio's own socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout, WSMsgType, web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from earshot.core.audio import AudioFormat
from earshot.core.errors import (
    CLOSE_NORMAL,
    CallNotStartedError,
    EarshotError,
    EgressRefusedError,
    InvalidRequestError,
    SchedulerStoppedError,
    ServerFullError,
    SubscriberNotReadingError,
    TwilioCallInUseError,
    TwilioDuplicateStartError,
    TwilioMediaFormatError,
    TwilioMessageError,
    TwilioNotStartedError,
    TwilioSignatureError,
    TwilioUnknownTrackError,
    UnauthorizedError,
    WebsocketRequiredError,
)
from earshot.core.protocol import (
    PROTOCOL_VERSION,
    Event,
    SpeechStartedEvent,
    StreamParams,
    TranscriptEvent,
    UtteranceEndEvent,
    WarningEvent,
    error_message,
    event_message,
)
from earshot.core.twilio import (
    Dtmf,
    Mark,
    Media,
    Start,
    Stop,
    TrackInterleaver,
    Unknown,
    parse_message,
    public_parameters,
    signature_matches,
)
from earshot.service.engine.engine import Engine
from earshot.service.http.context import DEFERRED_AUTH, ENGINE, DeferredAuth, json_error
from earshot.service.http.livestream import LiveStream, open_stream, refuse
from earshot.service.http.metrics import METRICS
from earshot.service.sovereignty import (
    AllowedNetworks,
    check_destination,
    current_guard,
    egress_reason,
    egress_session,
    is_egress_refusal,
)

log = logging.getLogger("earshot.server")

TWILIO_PATH = "/v1/twilio"
EVENTS_PATH = "/v1/calls/{call_sid}/events"
SIGNATURE_HEADER = "X-Twilio-Signature"

MAX_MESSAGES_BEFORE_START = 50
"""Messages other than ``connected`` a socket may send before ``start`` (each
answered with an error) before it is closed: a second of media."""

WEBHOOK_QUEUE = 256
"""Finals waiting for a slow webhook, at most; more are dropped and counted."""
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_DRAIN_S = 5.0
"""At the end of a call, how long its last finals may take to reach the webhook."""

_CALL_SID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_PLACEHOLDER = StreamParams(audio=AudioFormat.parse("mulaw", 8000, 1), multichannel=True)
"""A stream's settings until its ``start`` says what the call is."""


# -- the hub: callSid -> stream and subscribers ---------------------------------


class Subscriber:
    """One websocket following one call: a bounded queue of messages. The
    hub never waits for it: one that lets ``limit`` messages pile up is
    dropped (:attr:`dropped`) and the call goes on."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Two places more than the limit: the CallEnded and the end always fit.
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(limit + 2)
        self.dropped = asyncio.Event()
        self.counted = False
        self.started = False

    def offer(self, message: dict[str, Any], *, last: bool = False) -> bool:
        """Queue ``message``; False when this subscriber is (now) dropped."""
        if self.dropped.is_set():
            return False
        if not last and self.queue.qsize() >= self.limit:
            self.dropped.set()
            return False
        self.queue.put_nowait(message)
        return True

    def end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)


@dataclass
class Call:
    call_sid: str
    subscribers: set[Subscriber] = field(default_factory=set)
    stream: TwilioStream | None = None
    started: dict[str, Any] | None = None
    """The CallStarted message, once the stream has started."""


class CallHub:
    """The calls this server knows: the live ones and those subscribers wait
    for. At most ``max_calls`` entries and ``max_subscribers`` per call;
    :attr:`counts` counts what went wrong (dropped subscribers, webhooks)."""

    def __init__(self, *, max_calls: int, max_subscribers: int, queue_size: int) -> None:
        self.max_calls = max_calls
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        self.calls: dict[str, Call] = {}
        self.counts: Counter[str] = Counter()

    def _entry(self, call_sid: str) -> Call:
        call = self.calls.get(call_sid)
        if call is None:
            if len(self.calls) >= self.max_calls:
                raise ServerFullError(
                    f"the server follows {self.max_calls} calls already (2 x max_streams)",
                    limit=self.max_calls,
                )
            call = self.calls[call_sid] = Call(call_sid)
        return call

    def subscribe(self, call_sid: str) -> Subscriber:
        """A new subscriber of ``call_sid`` (started or not). Raises
        ServerFullError past the limits."""
        call = self._entry(call_sid)
        if len(call.subscribers) >= self.max_subscribers:
            raise ServerFullError(
                f"call {call_sid} has {self.max_subscribers} subscribers already "
                "(twilio_max_subscribers)",
                limit=self.max_subscribers,
            )
        sub = Subscriber(self.queue_size)
        call.subscribers.add(sub)
        if call.started is not None:
            sub.offer(call.started)
        return sub

    def unsubscribe(self, call_sid: str, sub: Subscriber) -> None:
        call = self.calls.get(call_sid)
        if call is None:
            return
        call.subscribers.discard(sub)
        if call.stream is None and not call.subscribers:
            del self.calls[call_sid]

    def start(self, call_sid: str, stream: TwilioStream, message: dict[str, Any]) -> None:
        """``stream`` carries ``call_sid`` now; its subscribers get ``message``.
        Raises TwilioCallInUseError when another stream has it, ServerFullError."""
        call = self.calls.get(call_sid)
        if call is not None and call.stream is not None:
            raise TwilioCallInUseError(
                f"call {call_sid} already has a live stream on this server; one stream "
                "per call is transcribed",
                call_sid=call_sid,
            )
        call = self._entry(call_sid)
        call.stream = stream
        call.started = message
        self.publish(call_sid, message)

    def publish(self, call_sid: str, message: dict[str, Any], *, last: bool = False) -> None:
        call = self.calls.get(call_sid)
        if call is None:
            return
        for sub in list(call.subscribers):
            if not sub.offer(message, last=last):
                self.drop(call_sid, sub, f"{sub.limit} messages unread")

    def drop(self, call_sid: str, sub: Subscriber, why: str) -> None:
        """``sub`` does not read: it gets nothing more (its handler closes it)."""
        sub.dropped.set()
        call = self.calls.get(call_sid)
        if call is not None and sub in call.subscribers:
            call.subscribers.discard(sub)
        if not sub.counted:
            sub.counted = True
            self.counts["subscribers_dropped"] += 1
            log.warning(
                "call subscriber dropped: %s",
                why,
                extra={"call_sid": call_sid, "code": SubscriberNotReadingError.code},
            )

    def end(self, call_sid: str, stream: TwilioStream, message: dict[str, Any]) -> None:
        """The call's stream ended: its subscribers get ``message``, then the end."""
        call = self.calls.get(call_sid)
        if call is None or call.stream is not stream:
            return
        self.publish(call_sid, message, last=True)
        for sub in call.subscribers:
            sub.end()
        del self.calls[call_sid]


CALLS = web.AppKey("earshot_twilio_calls", CallHub)


# -- the webhook -------------------------------------------------------------------


class Webhook:
    """POSTs each final of one call, as JSON, to one URL, from a task of its
    own (a slow webhook never holds the stream up), through the egress guard:
    each connection is judged and audited with the reason ``twilio webhook``
    and the stream's session id. A refused destination ends the webhook at
    once; other failures are counted and warned of once."""

    def __init__(self, stream: TwilioStream, url: str) -> None:
        self.stream = stream
        self.url = url
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(WEBHOOK_QUEUE)
        self.refused = False
        self._failed_warned = False
        self._task = asyncio.create_task(self._run())

    def offer(self, message: dict[str, Any]) -> None:
        if self.refused:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.stream.hub.counts["webhook_dropped"] += 1

    async def close(self) -> None:
        """Deliver what is queued (for at most :data:`WEBHOOK_DRAIN_S`), then stop."""
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), WEBHOOK_DRAIN_S)
        except asyncio.TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        hub = self.stream.hub
        with egress_reason("twilio webhook"), egress_session(self.stream.request_id):
            async with ClientSession(timeout=ClientTimeout(total=WEBHOOK_TIMEOUT_S)) as http:
                while True:
                    message = await self.queue.get()
                    if message is None:
                        return
                    try:
                        async with http.post(self.url, json=message) as response:
                            await response.read()
                            ok = response.status < 300
                            why = f"HTTP {response.status}"
                    except Exception as exc:  # connection errors, timeouts, the guard
                        if is_egress_refusal(exc):
                            self._refuse(str(_egress_message(exc)))
                            return
                        ok, why = False, type(exc).__name__
                    if ok:
                        hub.counts["webhook_delivered"] += 1
                        continue
                    hub.counts["webhook_failed"] += 1
                    log.warning(
                        "twilio webhook failed: %s",
                        why,
                        extra={"session": self.stream.request_id, "reason": why},
                    )
                    if not self._failed_warned:
                        self._failed_warned = True
                        self.stream.warn(
                            WarningEvent(
                                "webhook_failed",
                                f"a final of this call could not be delivered to its webhook "
                                f"({why}); later finals are still tried",
                                {"reason": why},
                            )
                        )

    def _refuse(self, why: str) -> None:
        """The destination is not allowed: nothing more is sent to it."""
        self.refused = True
        self.stream.hub.counts["webhook_refused"] += 1
        log.warning(
            "twilio webhook refused: %s",
            why,
            extra={"session": self.stream.request_id, "code": EgressRefusedError.code},
        )
        self.stream.warn(
            WarningEvent(
                "webhook_refused",
                f"the webhook of this call is refused and gets nothing: {why}",
                {"reason": EgressRefusedError.code},
            )
        )


def _egress_message(exc: BaseException | None) -> str:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, EgressRefusedError):
            return exc.message
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return "egress refused"


def webhook_refusal(engine: Engine, url: str) -> str | None:
    """Why ``url`` may not be a webhook before anything is sent, or None.
    Where an egress guard is current it judges (and audits) the connection
    itself; without one, on-prem-only mode is checked here."""
    if not url.lower().startswith(("http://", "https://")):
        return "a webhook must be an http:// or https:// URL"
    cfg = engine.config
    if cfg.on_prem_only and current_guard() is None:
        try:
            check_destination(url, AllowedNetworks(cfg.allowed_networks), setting="earshot_webhook")
        except EgressRefusedError as exc:
            return exc.message
    return None


# -- the stream ------------------------------------------------------------------


class TwilioStream(LiveStream):
    """One ``/v1/twilio`` connection: Twilio's messages in; the call's events
    out to its subscribers and webhook, its errors also on Twilio's socket."""

    protocol = "twilio"
    results_outlive_client = True  # the subscribers read them, not Twilio

    def __init__(
        self,
        engine: Engine,
        ws: web.WebSocketResponse,
        hub: CallHub,
        deferred: DeferredAuth | None,
        transport: asyncio.Transport | None = None,
    ) -> None:
        super().__init__(engine, ws, _PLACEHOLDER, transport)
        self.hub = hub
        self.deferred = deferred
        self.call: Start | None = None
        self.interleaver: TrackInterleaver | None = None
        self.webhook: Webhook | None = None
        self.stopped = False
        self._before_start = 0

    # -- what the call's listeners are told

    def _track_of(self, ev: Event) -> str | None:
        if self.call is None or not isinstance(
            ev, (TranscriptEvent, SpeechStartedEvent, UtteranceEndEvent)
        ):
            return None
        tracks = self.call.tracks
        return tracks[ev.channel] if 0 <= ev.channel < len(tracks) else None

    def render(self, ev: Event) -> list[dict[str, Any]]:
        if self.call is None:
            return []
        message = event_message(ev, self.request_id, self.engine.model_name)
        track = self._track_of(ev)
        if track is not None:
            message.setdefault("earshot", {})["track"] = track
        self.hub.publish(self.call.call_sid, message)
        if self.webhook is not None and isinstance(ev, TranscriptEvent) and ev.is_final:
            self.webhook.offer(
                {**message, "call_sid": self.call.call_sid, "stream_sid": self.call.stream_sid}
            )
        return []  # Twilio reads nothing of it

    def render_error(self, err: EarshotError) -> dict[str, Any]:
        message = error_message(err)
        if self.call is not None:
            self.hub.publish(self.call.call_sid, message)
        return message

    def render_internal_error(self, message: str) -> dict[str, Any]:
        out = super().render_internal_error(message)
        if self.call is not None:
            self.hub.publish(self.call.call_sid, out)
        return out

    def warn(self, warning: WarningEvent) -> None:
        """Tell the call's subscribers (and the log) of ``warning``."""
        self.log_warning(warning)
        self.render(warning)

    def log_fields(self) -> dict[str, Any]:
        return {"encoding": "mulaw", "sample_rate": 8000}

    # -- Twilio's messages

    def on_binary(self, data: bytes) -> None:
        self._refuse(
            TwilioMessageError(
                f"Twilio sends JSON text frames; a binary frame of {len(data)} bytes was ignored"
            )
        )

    def _refuse(self, err: EarshotError) -> None:
        """Tell of ``err`` and go on; before ``start``, only so many times."""
        if self.call is None:
            self._before_start += 1
            if self._before_start > MAX_MESSAGES_BEFORE_START:
                raise TwilioNotStartedError(
                    f"{self._before_start} messages and no 'start' (at most "
                    f"{MAX_MESSAGES_BEFORE_START})",
                    limit=MAX_MESSAGES_BEFORE_START,
                )
        self.send_error(err)

    def _not_started(self, what: str) -> None:
        self._refuse(
            TwilioNotStartedError(
                f"{what} before 'start': a Twilio stream must send 'start' first",
                limit=MAX_MESSAGES_BEFORE_START,
            )
        )

    def on_text(self, text: str) -> bool:
        try:
            message = parse_message(text)
        except TwilioMessageError as exc:
            if isinstance(exc, TwilioMediaFormatError) or exc.details.get("event") == "start":
                raise  # a call that cannot be set up
            self._refuse(exc)
            return True
        if isinstance(message, Media):
            self._on_media(message)
        elif isinstance(message, Start):
            self._on_start(message)
        elif isinstance(message, Stop):
            self.stopped = True
            if self.interleaver is not None:
                tail = self.interleaver.flush()
                if tail:
                    self.push_audio(tail)
            return False  # the flush sends the last finals
        elif isinstance(message, Unknown):
            log.info(
                "twilio event ignored: %s",
                message.event,
                extra={"session": self.request_id, "event": message.event},
            )
        elif isinstance(message, (Mark, Dtmf)) and self.call is None:
            self._not_started(f"a {type(message).__name__.lower()!r} message")
        # connected, and a started call's mark and dtmf (never logged: a DTMF
        # digit may be a PIN) need nothing.
        return True

    def _on_media(self, media: Media) -> None:
        if self.call is None or self.interleaver is None:
            self._not_started("'media'")
            return
        if media.track not in self.call.tracks:
            self.send_error(
                TwilioUnknownTrackError(
                    f"media of track {media.track!r}, which 'start' did not announce "
                    f"(tracks: {', '.join(self.call.tracks)}); the chunk is dropped",
                    track=media.track,
                    allowed=list(self.call.tracks),
                )
            )
            return
        data = self.interleaver.push(media.track, media.timestamp_ms, media.payload)
        if data:
            self.push_audio(data)

    def _on_start(self, start: Start) -> None:
        if self.call is not None:
            raise TwilioDuplicateStartError(
                f"a second 'start' (stream {start.stream_sid}) on the stream of call "
                f"{self.call.call_sid}",
                call_sid=self.call.call_sid,
            )
        if self.deferred is not None and not self.deferred.header_ok:
            token = start.custom_parameters.get("token", "")
            if not token or not self.deferred.check(token):
                raise UnauthorizedError(
                    ("wrong" if token else "missing")
                    + ' API key: send it in the stream\'s <Parameter name="token" '
                    'value="KEY"/>, or configure twilio_auth_token to check '
                    "X-Twilio-Signature instead"
                )
        cfg = self.engine.config
        self.reconfigure(
            StreamParams(
                audio=AudioFormat.parse("mulaw", 8000, len(start.tracks)),
                multichannel=True,
                language=cfg.default_language,
                interim_results=cfg.twilio_interim_results,
            )
        )
        started = {
            "type": "CallStarted",
            "call_sid": start.call_sid,
            "stream_sid": start.stream_sid,
            "tracks": list(start.tracks),
            "custom_parameters": public_parameters(start.custom_parameters),
            "earshot": {
                "protocol_version": PROTOCOL_VERSION,
                "request_id": self.request_id,
                "model": self.engine.client_provenance(),
                "policy": self.engine.policy,
                "settings": self.params.to_dict(),
                "channels": {track: i for i, track in enumerate(start.tracks)},
            },
        }
        self.hub.start(start.call_sid, self, started)
        self.call = start
        self.interleaver = TrackInterleaver(start.tracks)
        log.info(
            "twilio call started",
            extra={
                "session": self.request_id,
                "call_sid": start.call_sid,
                "stream_sid": start.stream_sid,
                "tracks": list(start.tracks),
            },
        )
        url = start.custom_parameters.get("earshot_webhook") or cfg.twilio_webhook_url
        if url:
            why = webhook_refusal(self.engine, url)
            if why is not None:
                self.webhook = None
                self.hub.counts["webhook_refused"] += 1
                log.warning("twilio webhook refused: %s", why, extra={"session": self.request_id})
                self.warn(
                    WarningEvent(
                        "webhook_refused",
                        f"the webhook of this call is refused and gets nothing: {why}",
                        {"reason": EgressRefusedError.code},
                    )
                )
            else:
                self.webhook = Webhook(self, url)

    async def end_call(self) -> None:
        """After the stream: the subscribers' CallEnded, the webhook's last finals."""
        if self.call is None:
            return
        reason = "stop" if self.stopped else (self._close_reason or "disconnected")
        self.hub.end(
            self.call.call_sid,
            self,
            {"type": "CallEnded", "call_sid": self.call.call_sid, "reason": reason},
        )
        if self.webhook is not None:
            await self.webhook.close()


def _signed_urls(request: web.Request, configured: str) -> list[str]:
    if configured:
        return [configured]
    # The URL Twilio was given is wss:// (a TLS proxy in front of this server).
    return [f"{scheme}://{request.host}{request.path_qs}" for scheme in ("wss", "ws")]


async def handle_twilio(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    hub = request.app[CALLS]
    cfg = engine.config

    def validate() -> DeferredAuth | None:
        if cfg.twilio_auth_token:
            signature = request.headers.get(SIGNATURE_HEADER, "")
            urls = _signed_urls(request, cfg.twilio_stream_url)
            if not signature or not signature_matches(cfg.twilio_auth_token, signature, urls):
                raise TwilioSignatureError(
                    ("wrong" if signature else "missing")
                    + f" {SIGNATURE_HEADER}: it must sign {urls[0]} with the configured "
                    "twilio_auth_token (set twilio_stream_url to the URL in the TwiML if "
                    "a proxy changes it)"
                )
            return None  # Twilio itself
        return request.get(DEFERRED_AUTH)

    streams: list[TwilioStream] = []

    def make(deferred: DeferredAuth | None, ws: web.WebSocketResponse) -> LiveStream:
        stream = TwilioStream(engine, ws, hub, deferred, request.transport)
        streams.append(stream)
        return stream

    try:
        return await open_stream(request, validate, make)
    finally:
        for stream in streams:
            await stream.end_call()


# -- subscribers ---------------------------------------------------------------------


async def _read_until_closed(ws: web.WebSocketResponse) -> None:
    while True:
        try:
            msg = await ws.receive()
        except ConnectionError:
            return
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return


async def handle_call_events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/calls/{call_sid}/events``: the call's messages, from
    CallStarted to CallEnded, then close 1000."""
    engine = request.app[ENGINE]
    hub = request.app[CALLS]
    cfg = engine.config
    call_sid = request.match_info["call_sid"]
    if not _CALL_SID.match(call_sid):
        return refuse(
            request,
            InvalidRequestError(
                "a call's id (callSid) is 1 to 64 letters, digits, '-' or '_'", field="call_sid"
            ),
        )
    if engine.shutting_down:
        return json_error(SchedulerStoppedError("the server is shutting down"))
    ws = web.WebSocketResponse(timeout=5.0, protocols=("token",), heartbeat=None)
    if not ws.can_prepare(request).ok:
        return json_error(
            WebsocketRequiredError(f"GET {request.path} is a websocket endpoint"),
            headers={"Upgrade": "websocket"},
        )
    try:
        sub = hub.subscribe(call_sid)
    except EarshotError as exc:
        return json_error(exc, headers={"Retry-After": "5"})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.twilio_subscriber_wait_s
    close_code, reason = CLOSE_NORMAL, ""
    try:
        await ws.prepare(request)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:  # what a subscriber that stops reading can make the kernel hold
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.socket_send_buffer)
        reader = asyncio.create_task(_read_until_closed(ws))
        dropped = asyncio.create_task(sub.dropped.wait())
        try:
            while True:
                get = asyncio.create_task(sub.queue.get())
                timeout = None if sub.started else max(0.0, deadline - loop.time())
                await asyncio.wait(
                    {get, reader, dropped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not get.done():
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                if dropped.done() or sub.dropped.is_set():
                    err: EarshotError = SubscriberNotReadingError(
                        f"this subscriber left {sub.limit} messages unread "
                        f"(twilio_subscriber_queue), or one for {cfg.max_unread_s:g} s "
                        "(max_unread_s); the call goes on without it",
                        limit=sub.limit,
                        limit_s=cfg.max_unread_s,
                    )
                    close_code, reason = err.ws_close_code, err.code
                    break
                if reader.done():
                    close_code = 0  # the subscriber went
                    break
                if not get.done() or get.cancelled():
                    err = CallNotStartedError(
                        f"call {call_sid} did not start within "
                        f"{cfg.twilio_subscriber_wait_s:g} s (twilio_subscriber_wait_s)",
                        call_sid=call_sid,
                        limit_s=cfg.twilio_subscriber_wait_s,
                    )
                    await ws.send_str(json.dumps(error_message(err)))
                    close_code, reason = err.ws_close_code, err.code
                    break
                message = get.result()
                if message is None:
                    break
                if message.get("type") == "CallStarted":
                    sub.started = True
                # A subscriber that stops reading blocks this send, not the call;
                # past max_unread_s it is dropped as one whose queue is full.
                send = asyncio.create_task(ws.send_str(json.dumps(message, ensure_ascii=False)))
                await asyncio.wait(
                    {send, dropped}, timeout=cfg.max_unread_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not send.done():
                    send.cancel()
                    hub.drop(call_sid, sub, f"a message unread for {cfg.max_unread_s:g} s")
                    await asyncio.sleep(0)  # `dropped` is done now
                    continue  # said at the top of the loop
                send.result()
        finally:
            reader.cancel()
            dropped.cancel()
    except (ConnectionError, asyncio.CancelledError):
        close_code = 0
        raise
    finally:
        hub.unsubscribe(call_sid, sub)
        if close_code:  # a subscriber that does not read gets 2 s for its close frame
            try:
                await asyncio.wait_for(ws.close(code=close_code, message=reason.encode()), 2.0)
            except (asyncio.TimeoutError, ConnectionError):
                if request.transport is not None:
                    request.transport.abort()
    return ws


def register_twilio_routes(app: web.Application) -> None:
    """Add ``/v1/twilio`` and ``/v1/calls/{call_sid}/events`` to ``app`` (made
    by ``create_app(engine)``), with the app's :class:`CallHub`."""
    cfg = app[ENGINE].config
    app[CALLS] = CallHub(
        max_calls=2 * cfg.max_streams,
        max_subscribers=cfg.twilio_max_subscribers,
        queue_size=cfg.twilio_subscriber_queue,
    )
    app.router.add_get(TWILIO_PATH, handle_twilio)
    app.router.add_get(EVENTS_PATH, handle_call_events)
    metrics = app.get(METRICS)
    if metrics is not None:
        metrics.registry.register(_HubCollector(app[CALLS]))


HUB_EVENTS = (
    "subscribers_dropped",
    "webhook_delivered",
    "webhook_failed",
    "webhook_refused",
    "webhook_dropped",
)
"""What :attr:`CallHub.counts` counts, as ``earshot_twilio_events_total`` labels."""


class _HubCollector(Collector):
    """The call hub's figures at scrape time, for ``/metrics``."""

    def __init__(self, hub: CallHub) -> None:
        self._hub = hub

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        calls = list(hub.calls.values())
        yield GaugeMetricFamily(
            "earshot_twilio_calls",
            "Twilio calls with a live stream now.",
            value=sum(1 for c in calls if c.stream is not None),
        )
        yield GaugeMetricFamily(
            "earshot_twilio_subscribers",
            "Subscribers of /v1/calls/{callSid}/events connected now (to live or awaited calls).",
            value=sum(len(c.subscribers) for c in calls),
        )
        events = CounterMetricFamily(
            "earshot_twilio_events",
            "Call subscribers dropped for not reading, and each final's webhook delivery "
            "by outcome (delivered, failed, refused by the egress policy, dropped from a "
            "full queue).",
            labels=["event"],
        )
        for name in sorted({*HUB_EVENTS, *hub.counts}):
            events.add_metric([name], hub.counts[name])
        yield events
