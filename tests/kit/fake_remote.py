"""A fake remote OpenAI-compatible transcription server for tests.

:func:`fake_remote` serves ``POST /v1/audio/transcriptions`` (and
``/v1/audio/translations``) on a free port of 127.0.0.1, from its own thread
with its own event loop, so that sync and async tests alike can use it. In
its default ``"tones"`` mode it reads the uploaded WAV with
:class:`tests.kit.tones.ToneBackend` and answers in OpenAI's shapes
(``verbose_json`` with the language as an English name, segments and, when
asked for, words), so the words are exactly right.

Every byte that reaches the server is counted where the socket delivers it
(a protocol wrapper in front of aiohttp's), including connections that never
send a valid request, so a test can assert that nothing at all was sent.
Every HTTP request is recorded (method, path, headers, raw body and the
parsed multipart fields).

Knobs, settable at any time from any thread: :meth:`FakeRemote.fail_next`
(answer the next N requests with an error status), :attr:`FakeRemote.delay_s`
(wait before answering), :attr:`FakeRemote.mode` (``"tones"`` or
``"garbage"``: a 200 whose body is not JSON) and
:attr:`FakeRemote.require_key` (answer 401 unless ``Authorization: Bearer
KEY``; like OpenAI's, the 401 message repeats the key it was given).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import numpy as np
import soundfile as sf
from aiohttp import web

from earshot.core.decoding import SAMPLE_RATE, DecodeOptions, Hypothesis, Window
from tests.kit.tones import ToneBackend

# The remote names the language as OpenAI does; deliberately a table of its
# own, so that the backend's mapping is not tested against itself.
_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "nl": "dutch"}

_TRANSCRIBE_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")


@functools.cache
def _tone_reader() -> ToneBackend:
    """One reader for every fake (it calibrates itself once, in about 0.2 s)."""
    return ToneBackend()


@dataclass
class RecordedRequest:
    """One HTTP request as the fake received it."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names lower-cased (a repeated header keeps its last value)."""
    body: bytes
    fields: dict[str, list[str]] = field(default_factory=dict)
    """Non-file multipart fields, every value in order."""
    files: dict[str, bytes] = field(default_factory=dict)
    """File parts of the multipart body, by field name."""
    received_at: float = 0.0
    """time.monotonic() when the whole body had arrived."""

    def value(self, name: str) -> str | None:
        """The last value of a multipart field, or None."""
        values = self.fields.get(name)
        return values[-1] if values else None


def parse_multipart(
    content_type: str, body: bytes
) -> tuple[dict[str, list[str]], dict[str, bytes]]:
    """Fields and files of a multipart/form-data body (binary-safe)."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        return {}, {}
    fields: dict[str, list[str]] = {}
    files: dict[str, bytes] = {}
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    for chunk in (b"\r\n" + body).split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        part = Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                part[name.strip()] = value.strip()
        disposition = part.get("content-disposition", "")
        cd = Message()
        cd["content-type"] = "x/x; " + disposition.partition(";")[2]
        field_name = cd.get_param("name")
        if not isinstance(field_name, str):
            continue
        if cd.get_param("filename") is not None:
            files[field_name] = content
        else:
            fields.setdefault(field_name, []).append(content.decode("utf-8", "replace"))
    return fields, files


class _Counting(asyncio.Protocol):
    """Passes everything to aiohttp's protocol, counting the bytes received."""

    def __init__(self, inner: asyncio.Protocol, count: Callable[[int, bool], None]) -> None:
        self._inner = inner
        self._count = count

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._count(0, True)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._count(len(data), False)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class FakeRemote:
    """The fake server's state and knobs. Made by :func:`fake_remote`."""

    def __init__(
        self, *, mode: str = "tones", delay_s: float = 0.0, require_key: str | None = None
    ) -> None:
        self.url = ""
        """Base URL, ``http://127.0.0.1:PORT/v1``."""
        self.mode = mode
        self.delay_s = delay_s
        self.require_key = require_key
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._bytes = 0
        self._connections = 0
        self._failures: list[tuple[int, float | None]] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._stopping: asyncio.Event | None = None

    # -- what a test reads -------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """Every HTTP request received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def bytes_received(self) -> int:
        """Every byte received on every connection, headers and bodies."""
        with self._lock:
            return self._bytes

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def max_in_flight(self) -> int:
        """The most requests that were being answered at the same time."""
        with self._lock:
            return self._max_in_flight

    def fail_next(self, n: int, status: int = 503, *, retry_after: float | None = None) -> None:
        """Answer the next ``n`` requests with ``status`` (OpenAI's error body),
        with a ``Retry-After`` header when given."""
        with self._lock:
            self._failures.extend([(status, retry_after)] * n)

    # -- the server --------------------------------------------------------
    def _count(self, n: int, new_connection: bool) -> None:
        with self._lock:
            self._connections += new_connection
            self._bytes += n

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fields, files = parse_multipart(request.headers.get("Content-Type", ""), body)
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            fields=fields,
            files=files,
            received_at=time.monotonic(),
        )
        with self._lock:
            self._requests.append(record)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            failure = self._failures.pop(0) if self._failures else None
        try:
            if self.delay_s > 0 and self._stopping is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.delay_s)
            return await self._answer(request, record, failure)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _answer(
        self,
        request: web.Request,
        record: RecordedRequest,
        failure: tuple[int, float | None] | None,
    ) -> web.StreamResponse:
        if failure is not None:
            status, retry_after = failure
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
            return _error(status, f"fake failure with status {status}", headers)
        if self.require_key is not None:
            given = record.headers.get("authorization", "")
            if given != f"Bearer {self.require_key}":
                key = given.removeprefix("Bearer ")
                return _error(401, f"Incorrect API key provided: {key}.")
        if request.path not in _TRANSCRIBE_PATHS:
            return _error(404, f"no route {request.path}")
        if request.method != "POST":
            return _error(405, f"{request.method} is not allowed here")
        if self.mode == "garbage":
            return web.Response(status=200, text="<html>not json</html>", content_type="text/html")
        wav = record.files.get("file")
        if wav is None:
            return _error(400, "the form has no 'file'")
        try:
            audio, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
        except Exception as exc:
            return _error(400, f"cannot read the audio: {exc}")
        if rate != SAMPLE_RATE or audio.shape[1] != 1:
            return _error(400, f"audio must be 16 kHz mono, not {rate} Hz x {audio.shape[1]}")
        language = record.value("language")
        window = Window(np.ascontiguousarray(audio[:, 0]), language=language)
        loop = asyncio.get_running_loop()
        hyp = await loop.run_in_executor(None, self._decode, window)
        return web.json_response(_verbose(record, hyp, window.duration))

    def _decode(self, window: Window) -> Hypothesis:
        return _tone_reader().transcribe_batch([window], DecodeOptions(word_timestamps=True))[0]

    def _factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            return _Counting(inner(), self._count)

        return make


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": None, "param": None}}
    return web.json_response(body, status=status, headers=headers)


def _verbose(record: RecordedRequest, hyp: Hypothesis, duration: float) -> dict[str, Any]:
    granularities = record.fields.get("timestamp_granularities[]", [])
    temperature = float(record.value("temperature") or 0.0)
    translate = record.path.endswith("/translations")
    body: dict[str, Any] = {
        "task": "translate" if translate else "transcribe",
        "language": _NAMES.get(hyp.language, hyp.language),
        "duration": round(duration, 3),
        "text": hyp.text,
    }
    if not granularities or "segment" in granularities:
        body["segments"] = [
            {
                "id": i,
                "seek": 0,
                "start": round(seg.start, 3),
                "end": round(seg.end, 3),
                "text": " " + seg.text,
                "tokens": list(seg.tokens),
                "temperature": temperature,
                "avg_logprob": hyp.avg_logprob,
                "compression_ratio": 1.0,
                "no_speech_prob": hyp.no_speech_prob,
            }
            for i, seg in enumerate(hyp.segments)
        ]
    if "word" in granularities:
        body["words"] = [
            {"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)} for w in hyp.words
        ]
    body["usage"] = {"type": "duration", "seconds": round(duration, 3)}
    return body


@contextlib.contextmanager
def fake_remote(
    *, mode: str = "tones", delay_s: float = 0.0, require_key: str | None = None
) -> Iterator[FakeRemote]:
    """Serve a :class:`FakeRemote` on 127.0.0.1 for the ``with`` block.

    Starting and stopping are bounded (10 s each); a request still waiting
    out ``delay_s`` when the block ends is answered at once.
    """
    fake = FakeRemote(mode=mode, delay_s=delay_s, require_key=require_key)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failed: list[BaseException] = []
    state: dict[str, Any] = {}

    async def start() -> None:
        fake._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fake._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        assert runner.server is not None
        server = await loop.create_server(fake._factory(runner.server), sock=sock)
        state.update(runner=runner, server=server)
        fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"

    async def stop() -> None:
        assert fake._stopping is not None
        fake._stopping.set()
        server: asyncio.Server = state["server"]
        server.close()
        await state["runner"].cleanup()
        await server.wait_closed()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:
            failed.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name="fake-remote", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the fake remote did not start within 10 s")
    if failed:
        raise RuntimeError("the fake remote failed to start") from failed[0]
    try:
        yield fake
    finally:
        try:
            asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
