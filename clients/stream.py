"""Async Python client for Earshot's live streaming endpoint ``GET /v1/listen``.

The wire protocol is described in ``docs/protocol.md`` (protocol version 1). In
short: settings go in the query string, audio goes up as binary websocket
frames, control messages (``KeepAlive``, ``Finalize``, ``CloseStream``) go up
as JSON text frames, and the server answers with JSON text frames
(``Metadata``, ``Results``, ``SpeechStarted``, ``UtteranceEnd``, ``Warning``,
``Error``) until it closes the connection.

Typical use::

    async with StreamClient("ws://127.0.0.1:8000/v1/listen", sample_rate=8000,
                            encoding="mulaw") as client:
        sender = asyncio.create_task(stream_file(client, "call.wav"))
        async for message in client.messages():
            if message["type"] == "Results" and message["is_final"]:
                print(transcript_of(message))
        await sender
    print(client.close_code)        # 1000 on a normal close

or, all at once, :func:`transcribe_stream`, which also records when each
message arrived (for tests and benchmarks of latency).

To survive a server that goes away (a rolling restart behind a load
balancer) or a dropped connection, pass ``reconnect=True``::

    result = await transcribe_stream(url, "call.wav", reconnect=True)
    print(result.text(), result.reconnects, [c.close_code for c in result.connections])

The stream is then resumed on a new connection to the same URL from the end
of the last final received: the audio sent since then is kept (bounded, see
:mod:`earshot.clients.resume`) and re-sent first, so no final arrives twice
and no word is lost; the new connection's times are shifted so the caller
sees one clock. :class:`StreamClient` itself is one connection and never
reconnects.

Messages are yielded as the parsed JSON ``dict`` exactly as the server sent
them (no dataclass wrapping, so fields that a newer server adds are never
lost); :func:`transcript_of`, :func:`channel_of` and :func:`is_final` read the
common fields of a ``Results`` message.

This module depends only on numpy, soundfile, soxr and websockets; it does not
import the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from earshot.clients.audio import (
    BYTES_PER_SAMPLE,
    ENCODINGS,
    canonical_encoding,
    encode_audio,
    fit_audio,
    read_audio_file,
)
from earshot.clients.resume import DEFAULT_MAX_BUFFER_S, ResumeState
from earshot.core.errors import CLOSE_GOING_AWAY, CLOSE_NORMAL

__all__ = [
    "BYTES_PER_SAMPLE",
    "CLOSE_NORMAL",
    "DEFAULT_URL",
    "ENCODINGS",
    "RETRYABLE_CLOSE_CODES",
    "RETRYABLE_STATUSES",
    "AudioSource",
    "StreamClient",
    "StreamClosedError",
    "StreamConnectError",
    "StreamConnection",
    "StreamError",
    "StreamProtocolError",
    "StreamRefusedError",
    "StreamTranscript",
    "channel_of",
    "encode_audio",
    "is_final",
    "read_audio_file",
    "stream_file",
    "transcribe_stream",
    "transcript_of",
]

DEFAULT_URL: Final = "ws://127.0.0.1:8000/v1/listen"

_ALWAYS_SENT: Final = frozenset({"encoding", "sample_rate", "channels", "interim_results"})

Message = dict[str, Any]

AudioSource = str | os.PathLike[str] | npt.NDArray[Any] | bytes | AsyncIterable[bytes]
"""What :func:`stream_file` sends: a file path, float samples, raw encoded bytes,
or an async iterable of raw encoded chunks (e.g. read live from a pipe)."""


# ---------------------------------------------------------------------------
# Errors


class StreamError(Exception):
    """Root of the errors this module raises."""


class StreamConnectError(StreamError):
    """The connection could not be opened (refused, unreachable, timed out,
    not a websocket endpoint)."""


class StreamRefusedError(StreamConnectError):
    """The server answered the upgrade request with an HTTP error (400, 401, 503...).

    ``status`` is the HTTP status; ``code`` and ``message`` come from the JSON
    body (``{"type": "Error", "code": ..., "message": ...}``) when there is one,
    ``body`` is that body parsed (or ``None``), and ``retry_after`` the
    ``Retry-After`` header in seconds when the server sent one (503).
    """

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        body: Message | None = None,
        retry_after: float | None = None,
    ) -> None:
        text = f"HTTP {status}"
        if code:
            text += f" [{code}]"
        if message:
            text += f": {message}"
        super().__init__(text)
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.retry_after = retry_after


class StreamClosedError(StreamError):
    """Audio or a control message was sent after the connection had closed.

    ``code`` and ``reason`` are the close code and reason, when known. The
    messages the server sent before closing can still be read from
    :meth:`StreamClient.messages`.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"the stream is closed (code {code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class StreamProtocolError(StreamError):
    """The server sent something that is not a JSON object text frame."""


# ---------------------------------------------------------------------------
# Reading Results messages


def is_final(message: Mapping[str, Any]) -> bool:
    """True for a final ``Results`` message."""
    return message.get("type") == "Results" and bool(message.get("is_final"))


def channel_of(message: Mapping[str, Any]) -> int:
    """The channel a ``Results``, ``SpeechStarted`` or ``UtteranceEnd`` is about (0 if none)."""
    index = message.get("channel_index", message.get("channel"))
    if isinstance(index, list) and index and isinstance(index[0], int):
        return index[0]
    return 0


def transcript_of(message: Mapping[str, Any]) -> str:
    """The transcript of the first alternative of a ``Results`` message ("" if none)."""
    channel = message.get("channel")
    if not isinstance(channel, Mapping):
        return ""
    alternatives = channel.get("alternatives")
    if not isinstance(alternatives, list) or not alternatives:
        return ""
    first = alternatives[0]
    return str(first.get("transcript", "")) if isinstance(first, Mapping) else ""


def _query_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _MessageIterator:
    """Async iterator over a client's server messages; see :meth:`StreamClient.messages`."""

    def __init__(self, client: StreamClient) -> None:
        self._client = client

    def __aiter__(self) -> _MessageIterator:
        return self

    async def __anext__(self) -> Message:
        message = await self._client.receive()
        if message is None:
            raise StopAsyncIteration
        return message


class StreamClient:
    """One streaming session with ``/v1/listen``. Use it as an async context manager.

    The keyword arguments become query parameters (see docs/protocol.md);
    ``None`` leaves a parameter out so the server's default applies:

    * ``encoding``, ``sample_rate``, ``channels``: how the audio you send is
      encoded (``linear16``, ``linear32`` (float), ``int32``, ``mulaw``,
      ``alaw``); ``multichannel`` transcribes each channel on its own instead
      of a mix;
    * ``language``: a code such as ``"en"``, or ``"auto"`` to detect it;
    * ``interim_results``: also send interim (non-final) results;
    * ``endpointing``: silence in ms that ends an utterance, or ``False`` to
      close utterances only on ``Finalize``, at the maximum length or at the
      end of the stream;
    * ``utterance_end_ms``, ``vad_events``: ask for ``UtteranceEnd`` and
      ``SpeechStarted`` messages;
    * ``keyterms``: words or phrases to favour (one ``keyterm`` parameter each);
    * ``api_key``: sent as ``Authorization: Token KEY``;
    * ``extra_params``: further query parameters, sent as given (booleans as
      ``true``/``false``); the server refuses parameters it does not know.

    Entering the context opens the connection and raises
    :class:`StreamRefusedError` when the server answers with an HTTP error, or
    :class:`StreamConnectError` when it cannot be reached. Leaving it closes
    the connection (with code 1000) if the server has not already done so.
    The sending methods may be called from one task while another reads
    :meth:`messages`; each raises :class:`StreamClosedError` once the
    connection has closed.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        encoding: str = "linear16",
        sample_rate: int = 16000,
        channels: int = 1,
        multichannel: bool = False,
        language: str | None = None,
        interim_results: bool = True,
        endpointing: int | bool | None = None,
        utterance_end_ms: int | None = None,
        vad_events: bool = False,
        keyterms: Iterable[str] = (),
        api_key: str | None = None,
        extra_params: Mapping[str, object] | Sequence[tuple[str, object]] | None = None,
        warnings: bool = True,
        open_timeout: float | None = 10.0,
        close_timeout: float | None = 10.0,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, not {sample_rate}")
        if channels <= 0:
            raise ValueError(f"channels must be positive, not {channels}")
        if endpointing is True:
            raise ValueError("endpointing must be a number of milliseconds, False or None")
        self.encoding = canonical_encoding(encoding)
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        self.multichannel = multichannel
        self.api_key = api_key
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout

        params: list[tuple[str, str]] = [
            ("encoding", self.encoding),
            ("sample_rate", str(self.sample_rate)),
            ("channels", str(self.channels)),
        ]
        if multichannel:
            params.append(("multichannel", "true"))
        if language is not None:
            params.append(("language", language))
        params.append(("interim_results", _query_value(interim_results)))
        if endpointing is not None:
            params.append(("endpointing", "false" if endpointing is False else str(endpointing)))
        if utterance_end_ms is not None:
            params.append(("utterance_end_ms", str(utterance_end_ms)))
        if vad_events:
            params.append(("vad_events", "true"))
        params.extend(("keyterm", term) for term in keyterms)
        if warnings:
            # Earshot sends Warning messages (lag) only to clients that ask.
            params.append(("warnings", "true"))
        extra: list[tuple[str, str]] = []
        if extra_params is not None:
            items = extra_params.items() if isinstance(extra_params, Mapping) else extra_params
            extra = [(str(k), _query_value(v)) for k, v in items]
            params.extend(extra)
        self.params: tuple[tuple[str, str], ...] = tuple(params)

        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"the URL must start with ws:// or wss://, not {url!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        # These are always sent, and the audio is encoded from them: a second
        # value from the URL or extra_params would be refused by the server
        # (or, worse, disagree with the bytes sent).
        for key, _ in [*query, *extra]:
            if key in _ALWAYS_SENT:
                raise ValueError(
                    f"set {key} with the {key}= argument, not in the URL or extra_params"
                )
        query += list(self.params)
        self.url: str = urlunsplit(parts._replace(query=urlencode(query)))
        """The full URL, query string included."""

        self._ws: ClientConnection | None = None
        self.metadata: Message | None = None
        """The first ``Metadata`` message (sent by the server as soon as the stream opens)."""
        self.last_metadata: Message | None = None
        """The latest ``Metadata`` message (the server sends one with totals at the end)."""
        self.errors: list[Message] = []
        """Every ``Error`` message received, in order."""
        self.close_code: int | None = None
        """The close code once the connection has closed (1000: normal; 1006: dropped)."""
        self.close_reason: str = ""

    # -- connection -----------------------------------------------------------

    @property
    def bytes_per_second(self) -> int:
        """Bytes of one second of audio in this stream's format."""
        return BYTES_PER_SAMPLE[self.encoding] * self.channels * self.sample_rate

    @property
    def closed(self) -> bool:
        """True once the connection has closed (or was never opened)."""
        self._record_close()
        return self._ws is None or self.close_code is not None

    async def connect(self) -> None:
        """Open the connection (what entering the context does). Call once."""
        if self._ws is not None:
            raise RuntimeError("this StreamClient is already connected; create a new one")
        headers = {"Authorization": f"Token {self.api_key}"} if self.api_key else None
        try:
            self._ws = await connect(
                self.url,
                additional_headers=headers,
                open_timeout=self.open_timeout,
                close_timeout=self.close_timeout,
                # Audio does not compress; deflate would only cost CPU on both ends.
                compression=None,
                # A ping cannot overtake the audio queued before it: when the
                # server holds back a client that sends faster than real time
                # (back-pressure), pongs come late, and a ping timeout would
                # drop a healthy stream. The server's own limits end dead ones.
                ping_timeout=None,
            )
        except InvalidStatus as exc:
            raise _refusal(exc) from None
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise StreamConnectError(f"cannot connect to {self.url}: {reason}") from exc

    async def close(self) -> None:
        """Close the connection now (code 1000) without waiting for finals.

        To end a stream and still get every final, call :meth:`close_stream`
        and read :meth:`messages` until they end instead.
        """
        if self._ws is not None:
            await self._ws.close()
            self._record_close()

    async def __aenter__(self) -> StreamClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- sending --------------------------------------------------------------

    async def _send(self, data: str | bytes) -> None:
        ws = self._require_ws()
        try:
            await ws.send(data)
        except ConnectionClosed:
            self._record_close()
            raise StreamClosedError(self.close_code, self.close_reason) from None

    async def send_audio(self, data: bytes | bytearray | memoryview) -> None:
        """Send one binary frame of encoded audio. Empty data is not sent.

        A frame need not hold whole samples (the server carries a partial
        sample over to the next frame) but the whole stream must.
        """
        if len(data):
            await self._send(bytes(data))

    async def keep_alive(self) -> None:
        """Send ``KeepAlive``: keeps the stream open while no audio is sent."""
        await self._send(json.dumps({"type": "KeepAlive"}))

    async def finalize(self) -> None:
        """Send ``Finalize``: close the open utterances now and send their finals."""
        await self._send(json.dumps({"type": "Finalize"}))

    async def close_stream(self) -> None:
        """Send ``CloseStream``: no more audio; the server sends the remaining
        finals and a last ``Metadata``, then closes with 1000."""
        await self._send(json.dumps({"type": "CloseStream"}))

    # -- receiving ------------------------------------------------------------

    def messages(self) -> AsyncIterator[Message]:
        """Iterate over the server's messages, parsed, until the server closes.

        Each message is the JSON object as sent (``message["type"]`` is one of
        ``Metadata``, ``Results``, ``SpeechStarted``, ``UtteranceEnd``,
        ``Warning``, ``Error``). The iteration ends without an error whatever
        the close code: check :attr:`close_code` afterwards (and
        :attr:`errors` for the ``Error`` messages). Only one task may iterate
        at a time. Raises :class:`StreamProtocolError` for a frame that is not
        a JSON object.
        """
        return _MessageIterator(self)

    async def receive(self) -> Message | None:
        """The next server message, or None once the connection has closed."""
        ws = self._require_ws()
        try:
            raw = await ws.recv()
        except ConnectionClosed:
            self._record_close()
            return None
        if isinstance(raw, bytes):
            raise StreamProtocolError(f"unexpected binary frame of {len(raw)} bytes from server")
        try:
            message = json.loads(raw)
        except ValueError:
            raise StreamProtocolError(
                f"the server sent a text frame that is not JSON: {raw[:200]!r}"
            ) from None
        if not isinstance(message, dict):
            raise StreamProtocolError(f"the server sent JSON that is not an object: {raw[:200]!r}")
        kind = message.get("type")
        if kind == "Metadata":
            if self.metadata is None:
                self.metadata = message
            self.last_metadata = message
        elif kind == "Error":
            self.errors.append(message)
        return message

    # -- internals ------------------------------------------------------------

    def _require_ws(self) -> ClientConnection:
        if self._ws is None:
            raise RuntimeError(
                "the StreamClient is not connected; use 'async with StreamClient(...)'"
            )
        return self._ws

    def _record_close(self) -> None:
        ws = self._ws
        if ws is not None and self.close_code is None and ws.close_code is not None:
            self.close_code = ws.close_code
            self.close_reason = ws.close_reason or ""


def _refusal(exc: InvalidStatus) -> StreamRefusedError:
    response = exc.response
    body: Message | None = None
    code: str | None = None
    text = bytes(response.body or b"").decode("utf-8", "replace").strip()
    message = text[:500] or response.reason_phrase
    with contextlib.suppress(ValueError):
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            body = parsed
            code = str(parsed["code"]) if "code" in parsed else None
            message = str(parsed.get("message", message))
    retry_after: float | None = None
    with contextlib.suppress(TypeError, ValueError):
        retry_after = float(response.headers.get("Retry-After", ""))
    return StreamRefusedError(
        response.status_code, code, message, body=body, retry_after=retry_after
    )


# ---------------------------------------------------------------------------
# Sending a whole source


class _Pacer:
    """Sleeps so that audio goes out no faster than real time, without drift.

    Deadlines are computed from the loop time of the first chunk plus the
    audio sent so far, so a late wake-up is made up on the next chunk rather
    than accumulated.
    """

    def __init__(self, realtime: bool) -> None:
        self.realtime = realtime
        self._start: float | None = None

    def begin(self) -> None:
        if self._start is None:
            self._start = asyncio.get_running_loop().time()

    async def wait(self, seconds_sent: float) -> None:
        if not self.realtime or self._start is None:
            # Let the receiving task run even when sending flat out.
            await asyncio.sleep(0)
            return
        delay = self._start + seconds_sent - asyncio.get_running_loop().time()
        await asyncio.sleep(max(0.0, delay))


def _chunks_of(data: bytes, size: int) -> Iterable[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])


async def stream_file(
    client: StreamClient,
    source: AudioSource,
    *,
    chunk_ms: float = 20.0,
    realtime: bool = True,
    sample_rate: int | None = None,
    close: bool = True,
    on_chunk: Callable[[float], None] | None = None,
) -> float:
    """Send a whole source over ``client``, then ``CloseStream``; return the seconds sent.

    ``source`` is one of:

    * a path: read with soundfile, resampled with soxr to the client's
      ``sample_rate``, mixed down (client mono) or duplicated (file mono) to
      the client's ``channels``, and encoded with :func:`encode_audio`;
    * a float array ``(n,)`` or ``(n, channels)`` at ``sample_rate`` (default:
      the client's), treated the same way;
    * ``bytes``: audio already in the client's encoding, sent as it is;
    * an async iterable of ``bytes`` chunks already in the client's encoding
      (e.g. read live from standard input), sent as they come.

    Audio goes out in frames of ``chunk_ms`` milliseconds; with ``realtime``
    each frame is sent when its audio would have been captured (paced on the
    loop's clock, so pacing does not drift), otherwise as fast as the
    connection takes it. ``close=False`` skips the final ``CloseStream``.
    ``on_chunk`` is called after each frame with the seconds sent so far.

    Raises :class:`StreamClosedError` if the server closes the stream while
    audio is still being sent, ValueError for audio that cannot be fitted to
    the client's channels, and the errors of :func:`read_audio_file`.
    """
    if chunk_ms <= 0:
        raise ValueError(f"chunk_ms must be positive, not {chunk_ms}")
    bps = client.bytes_per_second
    pacer = _Pacer(realtime)
    sent = 0

    async def send(chunk: bytes) -> None:
        nonlocal sent
        pacer.begin()
        await client.send_audio(chunk)
        sent += len(chunk)
        if on_chunk is not None:
            on_chunk(sent / bps)
        await pacer.wait(sent / bps)

    if isinstance(source, AsyncIterable):
        async for chunk in source:
            await send(bytes(chunk))
    else:
        data = _encoded(client, source, sample_rate)
        frame = BYTES_PER_SAMPLE[client.encoding] * client.channels
        per_chunk = max(1, round(client.sample_rate * chunk_ms / 1000.0)) * frame
        for chunk in _chunks_of(data, per_chunk):
            await send(chunk)
    if close:
        await client.close_stream()
    return sent / bps


def _encoded(client: StreamClient, source: AudioSource, sample_rate: int | None) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, np.ndarray):
        samples, rate = source, sample_rate or client.sample_rate
    elif isinstance(source, (str, os.PathLike)):
        samples, rate = read_audio_file(source)
    else:
        raise TypeError(f"cannot stream a {type(source).__name__}")
    fitted = fit_audio(samples, rate, client.sample_rate, client.channels)
    return encode_audio(fitted, client.encoding)


# ---------------------------------------------------------------------------
# Everything at once


RETRYABLE_CLOSE_CODES: Final = frozenset({1001, 1006, 1011, 1012, 1013, 1014, 4503})
"""Close codes after which :func:`transcribe_stream` reconnects (with
``reconnect=True``): the server going away (1001), a dropped connection
(1006, or no close frame at all), a server error (1011), a restart or a
"try again later" (1012, 1013, 1014), an overloaded server (4503). Never 1000
(the stream ended) nor the other 4xxx codes (the stream broke a limit or sent
something wrong: a new connection would fare no better)."""

RETRYABLE_STATUSES: Final = frozenset({502, 503, 504})
"""HTTP refusals of the upgrade that are retried (``Retry-After`` honoured):
a full or stopping server (503 ``server_full``, ``server_shutting_down``), or a
load balancer without a healthy replica. Any other refusal (400, 401, 403...)
is final."""


@dataclass
class StreamConnection:
    """One websocket connection of a :func:`transcribe_stream` call (several
    when it reconnected)."""

    offset_s: float = 0.0
    """The caller's time of this connection's stream time 0: its Results were
    shifted by this much."""
    resent_s: float = 0.0
    """Seconds of audio re-sent on opening (sent before, not yet in a final)."""
    opened_s: float = 0.0
    """When it opened, in seconds from the first connection's opening."""
    close_code: int | None = None
    close_reason: str = ""
    metadata: Message | None = None
    """Its first ``Metadata`` (each connection has its own ``request_id``)."""
    last_metadata: Message | None = None
    """Its last ``Metadata`` (``duration``: the seconds this connection received)."""
    finals: int = 0
    """How many finals it delivered."""

    @property
    def request_id(self) -> str | None:
        meta = self.metadata
        return str(meta["request_id"]) if meta and "request_id" in meta else None


@dataclass
class StreamTranscript:
    """What :func:`transcribe_stream` collected.

    Times are seconds on the event loop's monotonic clock, counted from the
    moment the connection opened; ``started_wall`` is the wall-clock time
    (``time.time()``) of that moment, so ``started_wall + arrival_s[i]`` is
    the wall time message ``i`` arrived.

    After reconnections (``reconnect=True``) the messages of every connection
    are here in arrival order, with their times (``start``, word times,
    ``timestamp``, ``last_word_end``) shifted onto one clock, that of the
    audio sent; :attr:`connections` tells the connections apart.
    """

    messages: list[Message] = field(default_factory=list)
    """Every server message, in arrival order."""
    arrival_s: list[float] = field(default_factory=list)
    """When each message of :attr:`messages` arrived."""
    finals: dict[int, list[Message]] = field(default_factory=dict)
    """Final ``Results`` per channel, in order."""
    interims: list[Message] = field(default_factory=list)
    """Interim ``Results`` of every channel, in order."""
    metadata: Message | None = None
    """The first ``Metadata``."""
    close_code: int | None = None
    """The close code of the last connection."""
    close_reason: str = ""
    started_wall: float = 0.0
    audio_seconds: float = 0.0
    """Seconds of audio sent (of the source: re-sent audio is not counted twice)."""
    audio_start_s: float | None = None
    """When the first audio frame had been sent."""
    audio_end_s: float | None = None
    """When the last audio frame had been sent."""
    reconnects: int = 0
    """How many times the stream reconnected (``len(connections) - 1``)."""
    connections: list[StreamConnection] = field(default_factory=list)
    """Every connection, in order; the last one's close code is :attr:`close_code`."""
    reconnect_attempts: int = 0
    """Connection attempts made after the first one, failed ones included."""
    reconnect_error: str | None = None
    """Why reconnecting was given up, when it was (the stream then ends with
    the last connection's close code)."""
    client_warnings: list[str] = field(default_factory=list)
    """What the client itself noticed in resuming (audio it could not re-send)."""
    duplicates_dropped: int = 0
    """Results of a new connection dropped because an earlier one had
    already finalized their audio (multichannel resumes only)."""

    @property
    def ok(self) -> bool:
        """The server closed the stream normally (1000)."""
        return self.close_code == CLOSE_NORMAL

    @property
    def errors(self) -> list[Message]:
        return [m for m in self.messages if m.get("type") == "Error"]

    @property
    def warnings(self) -> list[Message]:
        return [m for m in self.messages if m.get("type") == "Warning"]

    def text(self, channel: int = 0) -> str:
        """The finals of one channel joined with spaces (empty finals skipped)."""
        return " ".join(t for t in (transcript_of(m) for m in self.finals.get(channel, [])) if t)

    def final_latencies(self, channel: int = 0) -> list[float]:
        """For each final of ``channel``: seconds between the end of its audio
        being sent and the final arriving.

        Meaningful for real-time streaming, where audio at stream time ``t``
        is sent at ``audio_start_s + t``.
        """
        if self.audio_start_s is None:
            return []
        base = self.audio_start_s
        out = []
        for message, at in zip(self.messages, self.arrival_s, strict=True):
            if is_final(message) and channel_of(message) == channel:
                end = float(message.get("start", 0.0)) + float(message.get("duration", 0.0))
                out.append(at - (base + end))
        return out

    def add(self, message: Message, at: float) -> None:
        """Record one message that arrived at ``at``."""
        self.messages.append(message)
        self.arrival_s.append(at)
        kind = message.get("type")
        if kind == "Results":
            if message.get("is_final"):
                self.finals.setdefault(channel_of(message), []).append(message)
            else:
                self.interims.append(message)
        elif kind == "Metadata" and self.metadata is None:
            self.metadata = message


class _Source:
    """The audio of a :func:`transcribe_stream` call as chunks, read once and
    shared by its connections: :meth:`next` may be cancelled without losing a
    chunk (an async iterable is read by a task of its own into a queue)."""

    def __init__(self, audio: bytes | AsyncIterable[bytes], chunk_bytes: int) -> None:
        self.done = False
        self._data: bytes | None = None
        self._pos = 0
        self._chunk = chunk_bytes
        # Little read-ahead: a chunk read is a chunk taken from a live source.
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=2)
        self._task: asyncio.Task[None] | None = None
        if isinstance(audio, (bytes, bytearray, memoryview)):
            self._data = bytes(audio)
        else:
            self._task = asyncio.create_task(self._pump(audio))

    async def _pump(self, audio: AsyncIterable[bytes]) -> None:
        try:
            async for chunk in audio:
                await self._queue.put(bytes(chunk))
        except Exception as exc:  # handed to the sender, which raises it
            await self._queue.put(exc)
            return
        await self._queue.put(None)

    async def next(self) -> bytes | None:
        """The next chunk, or None at the end (and every time after)."""
        if self.done:
            return None
        if self._data is not None:
            if self._pos >= len(self._data):
                self.done = True
                return None
            chunk = self._data[self._pos : self._pos + self._chunk]
            self._pos += len(chunk)
            return chunk
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item is None:
            self.done = True
        return item

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class _Retry:
    """Backoff of (re)connection attempts: at most ``attempts`` in a row
    without progress, each outage within ``timeout_s``; delays double from
    ``backoff_s`` up to ``max_backoff_s`` with jitter (x0.5 to x1), and are
    never shorter than a refusal's ``Retry-After``."""

    def __init__(
        self, attempts: int, backoff_s: float, max_backoff_s: float, timeout_s: float
    ) -> None:
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.failures = 0
        self.total = 0

    def progress(self) -> None:
        self.failures = 0

    def delay(self, retry_after: float | None) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2.0**self.failures)
        delay = base * (0.5 + 0.5 * random.random())
        return max(delay, retry_after or 0.0)


async def _open(
    make_client: Callable[[], StreamClient],
    retry: _Retry | None,
    *,
    first: bool,
    notify: Callable[[str], None],
    why: str = "",
) -> tuple[StreamClient | None, str | None]:
    """Open a connection, retrying as ``retry`` allows (not at all when None).

    The first connection retries only refusals in :data:`RETRYABLE_STATUSES`
    and raises what stopped it; a reconnection also retries a server it cannot
    reach, and returns ``(None, why it gave up)`` instead of raising."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (retry.timeout_s if retry is not None else 0.0)
    retry_after: float | None = None
    last: StreamConnectError | None = None
    wait_first = not first
    while True:
        if wait_first:
            assert retry is not None
            if retry.failures >= retry.attempts:
                reason = (
                    f"{retry.failures} attempts in a row failed"
                    if retry.failures
                    else "no reconnection attempts are allowed (max_reconnects=0)"
                )
                if last is not None:
                    reason += f" (last: {last})"
                if first:
                    raise last if last is not None else StreamConnectError(reason)
                return None, reason
            delay = retry.delay(retry_after)
            if loop.time() + delay > deadline:
                reason = f"no connection within {retry.timeout_s:g} s"
                if last is not None:
                    reason += f" (last: {last})"
                if first and last is not None:
                    raise last
                return None, reason
            retry.failures += 1
            retry.total += 1
            attempt = f"attempt {retry.failures} of {retry.attempts}"
            notify(f"{why}reconnecting in {delay:.2f} s ({attempt})")
            why = ""
            await asyncio.sleep(delay)
        wait_first = True
        client = make_client()
        try:
            await client.connect()
            return client, None
        except StreamRefusedError as exc:
            last = exc
            retry_after = exc.retry_after
            if retry is None or exc.status not in RETRYABLE_STATUSES:
                if first:
                    raise
                return None, f"the server refused the stream: {exc}"
            why = f"refused ({exc}); "
        except StreamConnectError as exc:
            last = exc
            retry_after = None
            if retry is None or first:
                raise
            why = f"{exc}; "


async def transcribe_stream(
    url: str,
    audio: AudioSource,
    *,
    encoding: str = "linear16",
    sample_rate: int = 16000,
    channels: int = 1,
    multichannel: bool = False,
    language: str | None = None,
    interim_results: bool = True,
    endpointing: int | bool | None = None,
    utterance_end_ms: int | None = None,
    vad_events: bool = False,
    keyterms: Iterable[str] = (),
    api_key: str | None = None,
    extra_params: Mapping[str, object] | Sequence[tuple[str, object]] | None = None,
    warnings: bool = True,
    chunk_ms: float = 20.0,
    realtime: bool = True,
    audio_sample_rate: int | None = None,
    on_message: Callable[[Message], None] | None = None,
    reconnect: bool = False,
    max_reconnects: int = 5,
    reconnect_backoff_s: float = 0.2,
    reconnect_max_backoff_s: float = 5.0,
    reconnect_timeout_s: float = 30.0,
    resume_buffer_s: float = DEFAULT_MAX_BUFFER_S,
    on_reconnect: Callable[[str], None] | None = None,
) -> StreamTranscript:
    """Stream ``audio`` to ``url`` and collect everything the server sends.

    Sending (as :func:`stream_file` does, then ``CloseStream``) and receiving run
    concurrently; the call returns when the server has closed the stream,
    whatever the close code (check :attr:`StreamTranscript.ok`). The stream
    options are those of :class:`StreamClient`; ``audio_sample_rate`` is the
    rate of a float array ``audio`` (default: ``sample_rate``).
    ``on_message`` is called with each message as it arrives.

    Raises :class:`StreamRefusedError` / :class:`StreamConnectError` when the
    stream cannot be opened, and whatever preparing the audio raises (a
    missing file, say). If the server closes while audio is still being
    sent, sending stops quietly and the transcript shows the close code.

    **Reconnecting.** With ``reconnect=True``, a connection that ends with a
    code of :data:`RETRYABLE_CLOSE_CODES` (the server went away after its
    finals, an internal error, a dropped connection) is replaced by a new one
    to the same URL (behind a load balancer: another replica), and the stream
    goes on where the finals stopped: the audio sent since the end of the last
    final received is re-sent first, as fast as the server takes it, then the
    source continues (paced again when ``realtime``: a live source catches up
    with the audio that came during the outage). So no final is received
    twice, and audio that was sent but not finalized is transcribed once, by
    the new connection. Each connection's stream clock starts at 0; its
    messages are shifted by where its audio starts, so the caller sees one
    clock (:attr:`StreamConnection.offset_s`). The audio kept for resuming
    is bounded by ``resume_buffer_s`` (twice the server's longest utterance
    by default): audio older than that and not yet in a final is dropped, and
    a resume that needed it records a warning in
    :attr:`StreamTranscript.client_warnings`.

    Attempts wait ``reconnect_backoff_s``, doubling up to
    ``reconnect_max_backoff_s``, with jitter, and never less than a refusal's
    ``Retry-After``; at most ``max_reconnects`` in a row (the count restarts
    once a connection delivers a final or the server goes away with 1001) and
    for at most ``reconnect_timeout_s`` per outage. Only refusals in
    :data:`RETRYABLE_STATUSES` are retried (also for the first connection);
    an unreachable server is retried only once the stream has started.
    Never retried: a normal close (1000), 4xxx codes (limits and client
    errors), other refusals (401...). When reconnecting is given up, the
    call returns with the last close code and
    :attr:`StreamTranscript.reconnect_error`. ``on_reconnect`` is called with
    a line of text at each step (lost, waiting, resumed, given up).
    """
    if max_reconnects < 0:
        raise ValueError(f"max_reconnects must not be negative, not {max_reconnects}")
    if reconnect_backoff_s < 0 or reconnect_max_backoff_s < 0 or reconnect_timeout_s < 0:
        raise ValueError("reconnect delays must not be negative")
    if not resume_buffer_s > 0:
        raise ValueError(f"resume_buffer_s must be positive, not {resume_buffer_s}")
    if chunk_ms <= 0:
        raise ValueError(f"chunk_ms must be positive, not {chunk_ms}")

    def make_client() -> StreamClient:
        return StreamClient(
            url,
            encoding=encoding,
            sample_rate=sample_rate,
            channels=channels,
            multichannel=multichannel,
            language=language,
            interim_results=interim_results,
            endpointing=endpointing,
            utterance_end_ms=utterance_end_ms,
            vad_events=vad_events,
            keyterms=keyterms,
            api_key=api_key,
            extra_params=extra_params,
            warnings=warnings,
        )

    keyterms = tuple(keyterms)
    client = make_client()
    if not isinstance(audio, AsyncIterable):
        # Read, resample and encode before connecting: a bad file fails fast
        # and the stream's clock is not spent on it.
        audio = _encoded(client, audio, audio_sample_rate)
    frame = BYTES_PER_SAMPLE[client.encoding] * client.channels
    per_chunk = max(1, round(client.sample_rate * chunk_ms / 1000.0)) * frame
    bps = client.bytes_per_second
    state = ResumeState(
        sample_rate=client.sample_rate,
        frame_bytes=frame,
        channels=client.channels if multichannel else 1,
        # Without reconnecting nothing is ever re-sent: keep about one chunk.
        max_buffer_s=resume_buffer_s if reconnect else chunk_ms / 1000.0,
    )
    retry = (
        _Retry(max_reconnects, reconnect_backoff_s, reconnect_max_backoff_s, reconnect_timeout_s)
        if reconnect
        else None
    )

    def notify(text: str) -> None:
        if on_reconnect is not None:
            on_reconnect(text)

    result = StreamTranscript()
    loop = asyncio.get_running_loop()
    opened, _ = await _open(make_client, retry, first=True, notify=notify)
    assert opened is not None
    client = opened
    t0 = loop.time()
    result.started_wall = time.time()
    pacer = _Pacer(realtime)
    source = _Source(audio, per_chunk)
    resend = b""
    try:
        while True:
            connection = StreamConnection(
                offset_s=state.offset_s, resent_s=len(resend) / bps, opened_s=loop.time() - t0
            )
            result.connections.append(connection)
            await _run_connection(
                client, connection, resend, source, state, pacer, result, loop, t0,
                bps=bps, chunk_bytes=per_chunk, translate=reconnect, on_message=on_message,
            )  # fmt: skip
            code = None if client.close_code is None else int(client.close_code)
            connection.close_code = code
            connection.close_reason = client.close_reason
            if retry is None or (code is not None and code not in RETRYABLE_CLOSE_CODES):
                break
            if connection.finals or code == CLOSE_GOING_AWAY:
                retry.progress()
            why = f"the connection closed with code {code}"
            why += f" ({client.close_reason}); " if client.close_reason else "; "
            new, reason = await _open(make_client, retry, first=False, notify=notify, why=why)
            if new is None:
                result.reconnect_error = reason
                notify(f"gave up reconnecting: {reason}")
                break
            client = new
            resume = state.resume()
            if resume.lost_s > 0:
                result.client_warnings.append(state.warnings[-1])
            resend = resume.data
            result.reconnects += 1
            notify(
                f"reconnected (connection {result.reconnects + 1}); re-sending "
                f"{len(resend) / bps:.2f} s of audio from {resume.offset_s:.2f} s"
            )
    finally:
        await source.aclose()
        with contextlib.suppress(StreamError):
            await client.close()
    result.close_code = client.close_code
    result.close_reason = client.close_reason
    result.duplicates_dropped = state.dropped_duplicates
    result.reconnect_attempts = retry.total if retry is not None else 0
    return result


async def _run_connection(
    client: StreamClient,
    connection: StreamConnection,
    resend: bytes,
    source: _Source,
    state: ResumeState,
    pacer: _Pacer,
    result: StreamTranscript,
    loop: asyncio.AbstractEventLoop,
    t0: float,
    *,
    bps: int,
    chunk_bytes: int,
    translate: bool,
    on_message: Callable[[Message], None] | None,
) -> None:
    """Send (re-sent audio, then the source, then ``CloseStream``) and receive
    on one connection until the server closes it."""

    def sent() -> None:
        now = loop.time() - t0
        if result.audio_start_s is None:
            result.audio_start_s = now
        result.audio_end_s = now
        result.audio_seconds = state.end_bytes / bps

    async def send() -> None:
        with contextlib.suppress(StreamClosedError):
            for piece in _chunks_of(resend, chunk_bytes):
                await client.send_audio(piece)
                await asyncio.sleep(0)
            while True:
                chunk = await source.next()
                if chunk is None:
                    break
                # Kept before it is sent: a chunk whose send fails is re-sent.
                state.record(chunk)
                pacer.begin()
                await client.send_audio(chunk)
                sent()
                await pacer.wait(state.end_bytes / bps)
            await client.close_stream()

    async def receive() -> None:
        async for raw in client.messages():
            at = loop.time() - t0
            if raw.get("type") == "Metadata":
                if connection.metadata is None:
                    connection.metadata = raw
                connection.last_metadata = raw
            message = state.translate(raw) if translate else raw
            if message is None:
                continue
            if is_final(message):
                connection.finals += 1
            result.add(message, at)
            if on_message is not None:
                on_message(message)

    sender = asyncio.create_task(send())
    receiver = asyncio.create_task(receive())
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if receiver in done:
            # The server closed (or sent garbage): nothing more can be sent,
            # and a sender waiting for its next chunk must not hold us up.
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await receiver
        elif sender.exception() is not None:
            # Sending failed for a reason of ours: do not wait for an idle timeout.
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
            await sender
        else:
            await receiver
    finally:
        for task in (sender, receiver):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, StreamError):
                    await task
