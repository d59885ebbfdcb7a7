"""OpenAI-compatible HTTP endpoints: an adapter in front of the one decode queue.

``POST /v1/audio/transcriptions`` takes OpenAI's multipart upload, cuts the
file at voice-activity boundaries into pieces of at most
:data:`MAX_PIECE_S` seconds and submits every piece as a FINAL job to the
engine's one shared :class:`earshot.service.engine.scheduler.Scheduler`, exactly like a
stream's finals; nothing here calls the backend directly. The answer comes in
OpenAI's shapes (json, text, srt, vtt, verbose_json, or server-sent
``transcript.text.delta`` / ``transcript.text.done`` events with
``stream=true``), and errors in OpenAI's ``{"error": {...}}`` shape with
Earshot's machine-readable code in ``code``.

OpenAI's model names (``whisper-1``, ``gpt-4o-transcribe``, ...) mean the
served model; naming another Whisper model is refused rather than answered
by a different one. Every response says which model ran (``x-earshot-model``
header, and an ``earshot`` field in JSON bodies).

``POST /v1/audio/translations`` goes through the same queue: its pieces are
FINAL jobs that carry their own options (the finals' options with task
``translate``), and the scheduler batches them apart from transcriptions.
A model that only knows English cannot translate: ``translation_unavailable``.

Limits (service/config.py): ``max_upload_bytes`` on the request body
(``upload_too_large``, 413) and ``max_audio_s`` on the decoded audio's
duration (``audio_too_long``, 413); each error gives the numbers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from aiohttp import BodyPartReader, web

from earshot.core.decoding import SAMPLE_RATE, DecodeOptions, Hypothesis, Window
from earshot.core.errors import (
    AudioTooLongError,
    BodyTimeoutError,
    DecodeFailedError,
    EarshotError,
    InvalidRequestError,
    MalformedUploadError,
    ModelUnavailableError,
    SchedulerStoppedError,
    ServerFullError,
    TranslationUnavailableError,
    UploadTooLargeError,
)
from earshot.core.formats import TimedSegment, Transcript, to_srt, to_vtt
from earshot.core.guards import compression_ratio, drop_reason
from earshot.core.languages import language_name
from earshot.core.openai_wire import error_body
from earshot.core.values import parse_bool
from earshot.core.voice import VadSettings, segment_speech
from earshot.service.engine.audiofile import load_audio
from earshot.service.engine.batch import pieces_from_spans, segments_on_clock
from earshot.service.engine.engine import Engine, backend_label, check_model_name
from earshot.service.engine.scheduler import DecodeJob, JobKind
from earshot.service.http.context import ENGINE
from earshot.service.http.metrics import METRICS

log = logging.getLogger("earshot.http")

T = TypeVar("T")

MAX_FIELD_BYTES = 64 * 1024
"""Largest non-file form field (prompt, language, ...)."""

MAX_PIECE_S = 25.0
"""Longest piece of a file given to the decoder (Whisper's window is 30 s)."""

OPENAI_MODEL_ALIASES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
"""OpenAI's transcription model names; each means the served model."""

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")

_REGISTERED_KEY = web.AppKey("openai_routes_registered", bool)
_CREATED_KEY = web.AppKey("openai_models_created", int)

MODEL_HEADER = "x-earshot-model"


# --- errors -------------------------------------------------------------------


def openai_error(
    err: EarshotError,
    engine: Engine,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        error_body(err, status=status),
        status=status or err.http_status,
        headers={MODEL_HEADER: engine.model_name, **(headers or {})},
    )


# --- models -------------------------------------------------------------------


def resolve_model(engine: Engine, name: str | None) -> str:
    """The served model's name for the requested ``name`` (see
    :func:`earshot.service.http.listen.check_model_name`): OpenAI's names mean it too."""
    hint = f" (OpenAI's names {', '.join(OPENAI_MODEL_ALIASES)} also mean it)"
    return check_model_name(engine, name or None, OPENAI_MODEL_ALIASES, hint)


def _model_ids(engine: Engine) -> list[str]:
    ids = [engine.model_name]
    ids += [a for a in OPENAI_MODEL_ALIASES if a != engine.model_name]
    return ids


def _model_object(engine: Engine, model_id: str, created: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "earshot",
        "earshot": {
            "served_model": engine.model_name,
            "alias": model_id != engine.model_name,
            "provenance": engine.client_provenance(),
            "policy": engine.policy,
        },
    }


async def handle_models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    created = request.app[_CREATED_KEY]
    data = [_model_object(engine, m, created) for m in _model_ids(engine)]
    return web.json_response(
        {"object": "list", "data": data}, headers={MODEL_HEADER: engine.model_name}
    )


async def handle_model(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    model_id = request.match_info["model_id"]
    if model_id not in _model_ids(engine):
        err = ModelUnavailableError(
            f"model {model_id!r} is not served here; this server runs {engine.model_name!r}",
            field="model",
            served=engine.model_name,
        )
        return openai_error(err, engine, status=404)
    return web.json_response(
        _model_object(engine, model_id, request.app[_CREATED_KEY]),
        headers={MODEL_HEADER: engine.model_name},
    )


# --- the upload ---------------------------------------------------------------


@dataclass
class AudioRequest:
    """The fields of one transcription request, checked."""

    audio: bytes
    filename: str
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    response_format: str = "json"
    temperature: float = 0.0
    granularities: list[str] = field(default_factory=list)
    stream: bool = False


def _too_large(size: int, limit: int) -> UploadTooLargeError:
    return UploadTooLargeError(
        f"the request body is {'over ' if size > limit else ''}{size} bytes; "
        f"the limit is {limit} bytes ({limit / 1024 / 1024:.1f} MiB)",
        field="file",
        limit_bytes=limit,
        size_bytes=size,
    )


async def _within(step: Awaitable[T], timeout: float) -> T:
    """One read of the body; the client may pause at most ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(step, timeout)
    except asyncio.TimeoutError:
        raise BodyTimeoutError(
            f"no byte of the request body arrived for {timeout:g} s (body_timeout_s)",
            limit_s=timeout,
        ) from None


async def _read_part(
    part: BodyPartReader, budget: int, limit: int, cap: int, timeout: float
) -> bytes:
    """Read one part, refusing it past ``budget`` bytes of body left or ``cap``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await _within(part.read_chunk(64 * 1024), timeout)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > budget:
            raise _too_large(limit - budget + size, limit)
        if size > cap:
            raise InvalidRequestError(
                f"form field {part.name!r} is over {cap} bytes", field=part.name or "form"
            )
        chunks.append(chunk)


def _bool(name: str, raw: str) -> bool:
    try:
        return parse_bool(raw)
    except ValueError:
        raise InvalidRequestError(
            f"{name} must be true or false, not {raw!r}", field=name
        ) from None


async def read_upload(request: web.Request, limit: int, timeout: float = 30.0) -> AudioRequest:
    """Parse OpenAI's multipart form, streaming, with ``limit`` bytes at most
    and at most ``timeout`` seconds between two pieces of the body.

    Raises coded errors only: ``invalid_multipart`` for a body that is not the
    multipart form its headers announce (no or a bad boundary, cut short),
    ``upload_too_large``, ``body_timeout`` and ``invalid_request``.
    """
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    if not request.content_type.startswith("multipart/"):
        raise InvalidRequestError(
            f"the body must be multipart/form-data, not {request.content_type!r}", field="file"
        )
    try:
        return await _read_form(request, limit, timeout)
    except EarshotError:
        raise
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:  # aiohttp's reader raises several types for bad bodies
        raise MalformedUploadError(
            f"the body is not a valid multipart/form-data form ({type(exc).__name__}: {exc}); "
            "send it with a boundary that the body uses, every part complete",
            field="file",
        ) from None


async def _read_form(request: web.Request, limit: int, timeout: float) -> AudioRequest:
    reader = await request.multipart()
    fields: dict[str, str] = {}
    granularities: list[str] = []
    audio: bytes | None = None
    filename = "upload"
    used = 0
    while True:
        part = await _within(reader.next(), timeout)
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise InvalidRequestError("nested multipart bodies are not accepted", field="file")
        name = part.name or ""
        if name == "file":
            audio = await _read_part(part, limit - used, limit, limit, timeout)
            used += len(audio)
            filename = part.filename or filename
            continue
        raw = await _read_part(part, limit - used, limit, MAX_FIELD_BYTES, timeout)
        used += len(raw)
        text = raw.decode("utf-8", errors="replace")
        if name in ("timestamp_granularities[]", "timestamp_granularities"):
            granularities.append(text.strip())
        else:
            fields[name] = text
    if audio is None:
        raise InvalidRequestError("the form has no 'file' field with the audio", field="file")
    return _check_fields(audio, filename, fields, granularities)


def _check_fields(
    audio: bytes, filename: str, fields: dict[str, str], granularities: list[str]
) -> AudioRequest:
    fmt = fields.get("response_format", "").strip() or "json"
    if fmt not in RESPONSE_FORMATS:
        raise InvalidRequestError(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {fmt!r}",
            field="response_format",
        )
    for g in granularities:
        if g not in GRANULARITIES:
            raise InvalidRequestError(
                f"timestamp_granularities[] must be word or segment, not {g!r}",
                field="timestamp_granularities[]",
            )
    raw_temp = fields.get("temperature", "").strip() or "0"
    try:
        temperature = float(raw_temp)
    except ValueError:
        temperature = float("nan")
    if not 0.0 <= temperature <= 1.0:
        raise InvalidRequestError(
            f"temperature must be a number from 0 to 1, not {raw_temp!r}", field="temperature"
        )
    raw_lang = fields.get("language", "").strip()
    language = raw_lang.split("-")[0].lower() if raw_lang else None
    if language in ("auto", "multi"):
        language = None
    if language is not None and not (language.isalpha() and 2 <= len(language) <= 3):
        raise InvalidRequestError(
            f"language must be an ISO-639-1 code such as 'en', not {raw_lang!r}",
            field="language",
        )
    prompt = fields.get("prompt", "").strip() or None
    return AudioRequest(
        audio=audio,
        filename=filename,
        model=fields.get("model", "").strip() or None,
        language=language,
        prompt=prompt,
        response_format=fmt,
        temperature=temperature,
        granularities=granularities,
        stream=_bool("stream", fields.get("stream", "false")),
    )


def _check_language(engine: Engine, language: str | None) -> None:
    """Refuse a language the backend would refuse, before it can fail a batch."""
    if language is not None and engine.backend.capabilities.refuses_language(language):
        raise InvalidRequestError(
            f"language {language!r} is not supported by {engine.model_name!r}",
            field="language",
        )


# --- decoding -----------------------------------------------------------------


@dataclass(frozen=True)
class PieceResult:
    """One decoded piece of the file, times on the file's clock."""

    start: float
    end: float
    hypothesis: Hypothesis | None

    @property
    def kept(self) -> bool:
        return self.hypothesis is not None and drop_reason(self.hypothesis) is None

    @property
    def text(self) -> str:
        return self.hypothesis.text.strip() if self.kept and self.hypothesis else ""


def _pieces(engine: Engine, samples: np.ndarray) -> list[tuple[float, float]]:
    """The file's pieces: Silero over every sample, about 2 ms of one core per
    second of audio (seconds for a long upload), so run it off the event loop."""
    duration = len(samples) / SAMPLE_RATE
    spans = segment_speech(samples, VadSettings(), model=engine.vad_model)
    return pieces_from_spans([(s.start, s.end) for s in spans], duration, MAX_PIECE_S)


def submit_pieces(
    engine: Engine,
    request_id: str,
    samples: np.ndarray,
    spans: Sequence[tuple[float, float]],
    req: AudioRequest,
    language: str | None,
    options: DecodeOptions | None = None,
) -> list[asyncio.Future[Hypothesis | None]]:
    """Queue every piece as a FINAL job of the shared scheduler (with
    ``options`` instead of the finals' own, when given)."""
    futures: list[asyncio.Future[Hypothesis | None]] = []
    try:
        for i, (start, end) in enumerate(spans):
            a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
            window = Window(
                audio=np.ascontiguousarray(samples[a:b], dtype=np.float32),
                prompt=req.prompt,
                language=language,
            )
            job = DecodeJob(
                ("openai", request_id, i), JobKind.FINAL, window, tag=i, options=options
            )
            futures.append(engine.scheduler.submit(job))
    except BaseException:
        _cancel(futures)
        raise
    return futures


def _cancel(futures: Sequence[asyncio.Future[Hypothesis | None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()  # retrieved, so asyncio does not log it


async def _result(fut: asyncio.Future[Hypothesis | None]) -> Hypothesis | None:
    try:
        return await fut
    except EarshotError:
        raise
    except Exception as exc:
        raise DecodeFailedError(f"the decoder failed: {type(exc).__name__}: {exc}") from exc


def _timed_segments(piece: PieceResult) -> list[tuple[TimedSegment, tuple[int, ...]]]:
    hyp = piece.hypothesis
    if hyp is None or not piece.kept:
        return []
    return [(timed, seg.tokens) for timed, seg in segments_on_clock(hyp, piece.start, piece.end)]


# --- responses ----------------------------------------------------------------


def _transcript(
    req: AudioRequest, duration: float, results: Sequence[PieceResult]
) -> tuple[Transcript, list[tuple[TimedSegment, tuple[int, ...]]], str]:
    segs = [s for r in results for s in _timed_segments(r)]
    langs = [r.hypothesis.language for r in results if r.kept and r.hypothesis]
    lang = max(set(langs), key=langs.count) if langs else (req.language or "")
    transcript = Transcript(req.filename, duration, lang or None, [s for s, _ in segs])
    return transcript, segs, lang


def _verbose(
    engine: Engine,
    req: AudioRequest,
    duration: float,
    results: Sequence[PieceResult],
    task: str,
) -> dict[str, Any]:
    transcript, segs, lang = _transcript(req, duration, results)
    temperature = engine.scheduler.final_options.temperature
    body: dict[str, Any] = {
        "task": task,
        "language": language_name(lang),
        "duration": round(duration, 3),
        "text": transcript.text,
    }
    if not req.granularities or "segment" in req.granularities:
        body["segments"] = [
            {
                "id": i,
                "seek": round(seg.start * 100),
                "start": round(seg.start, 3),
                "end": round(seg.end, 3),
                "text": seg.text,
                "tokens": list(tokens),
                "temperature": temperature,
                "avg_logprob": round(seg.avg_logprob, 4),
                "compression_ratio": round(compression_ratio(seg.text), 4),
                "no_speech_prob": round(seg.no_speech_prob, 4),
            }
            for i, (seg, tokens) in enumerate(segs)
        ]
    if "word" in req.granularities:
        body["words"] = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for seg in transcript.segments
            for w in seg.words
        ]
    body["usage"] = {"type": "duration", "seconds": round(duration, 3)}
    return body


def _earshot_info(
    engine: Engine, req: AudioRequest, request_id: str, results: Sequence[PieceResult] = ()
) -> dict[str, Any]:
    """Which model ran, and what produced each piece (local, or the remote fallback)."""
    sources: list[dict[str, Any]] = []
    for piece in results:
        if piece.hypothesis is not None:
            source = engine.result_provenance(piece.hypothesis.info)
            if source not in sources:
                sources.append(source)
    return {
        "model": engine.model_name,
        "requested_model": req.model,
        "request_id": request_id,
        "provenance": sources,
        "policy": {"on_prem_only": engine.config.on_prem_only},
    }


def _render(
    engine: Engine,
    req: AudioRequest,
    request_id: str,
    duration: float,
    results: Sequence[PieceResult],
    task: str,
) -> web.Response:
    used = {backend_label(r.hypothesis.info) for r in results if r.hypothesis is not None}
    headers = {
        MODEL_HEADER: engine.model_name,
        "x-request-id": request_id,
        # Which backends decoded this file: "local", or a remote fallback's name too.
        "x-earshot-backends": ",".join(sorted(used)) or "none",
    }
    fmt = req.response_format
    if fmt == "verbose_json":
        body = _verbose(engine, req, duration, results, task)
        body["earshot"] = _earshot_info(engine, req, request_id, results)
        return web.json_response(body, headers=headers)
    transcript, _, _ = _transcript(req, duration, results)
    if fmt == "json":
        body = {
            "text": transcript.text,
            "usage": {"type": "duration", "seconds": round(duration, 3)},
            "earshot": _earshot_info(engine, req, request_id, results),
        }
        return web.json_response(body, headers=headers)
    if fmt == "text":
        return web.Response(text=transcript.text + "\n", content_type="text/plain", headers=headers)
    if fmt == "srt":
        return web.Response(text=to_srt(transcript), content_type="text/plain", headers=headers)
    return web.Response(text=to_vtt(transcript), content_type="text/vtt", headers=headers)


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def _stream(
    request: web.Request,
    engine: Engine,
    request_id: str,
    spans: Sequence[tuple[float, float]],
    futures: Sequence[asyncio.Future[Hypothesis | None]],
) -> web.StreamResponse:
    """Send one ``transcript.text.delta`` per piece, in order, then ``done``."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            MODEL_HEADER: engine.model_name,
            "x-request-id": request_id,
        }
    )
    await response.prepare(request)
    texts: list[str] = []
    try:
        for (start, end), fut in zip(spans, futures, strict=True):
            try:
                piece = PieceResult(start, end, await _result(fut))
            except EarshotError as exc:
                await response.write(_sse({"type": "error", **error_body(exc)}))
                return response
            if piece.text:
                delta = piece.text if not texts else " " + piece.text
                texts.append(piece.text)
                await response.write(_sse({"type": "transcript.text.delta", "delta": delta}))
        await response.write(_sse({"type": "transcript.text.done", "text": " ".join(texts)}))
        await response.write_eof()
    finally:
        _cancel(futures)
    return response


# --- the endpoints ------------------------------------------------------------


def _task_options(engine: Engine, task: str) -> DecodeOptions | None:
    """The options for ``task``: None (the finals' own) to transcribe."""
    if task == "transcribe":
        return None
    if not engine.backend.capabilities.multilingual:
        raise TranslationUnavailableError(
            f"model {engine.model_name!r} knows only English and cannot translate; "
            "serve a multilingual model (one without .en) for /v1/audio/translations",
            served=engine.model_name,
        )
    return replace(engine.scheduler.final_options, task=task)


async def _transcribe(request: web.Request, task: str) -> web.StreamResponse:
    engine = request.app[ENGINE]
    cfg = engine.config
    request_id = str(uuid.uuid4())
    try:
        if engine.shutting_down:
            raise SchedulerStoppedError("the server is shutting down; try another instance")
        options = _task_options(engine, task)
        if not engine.scheduler.accepting():
            raise ServerFullError(
                f"the server is overloaded: {engine.scheduler.overload_reason() or 'busy'}"
            )
        req = await read_upload(request, cfg.max_upload_bytes, cfg.body_timeout_s)
        resolve_model(engine, req.model)
        language = req.language
        if language is None and task == "transcribe":
            language = cfg.default_language
        _check_language(engine, language)
        loaded = await asyncio.to_thread(load_audio, req.audio, label=req.filename)
        if loaded.duration > cfg.max_audio_s:
            raise AudioTooLongError(
                f"the audio is {loaded.duration:.1f} s long; the limit is "
                f"{cfg.max_audio_s:g} s per request (max_audio_s)",
                field="file",
                limit_s=cfg.max_audio_s,
                duration_s=round(loaded.duration, 3),
            )
        samples = loaded.samples
        # Voice detection costs CPU in proportion to the file's length: in a
        # thread, so a long upload does not stall every live stream on the loop.
        spans = await asyncio.to_thread(_pieces, engine, samples)
        futures = submit_pieces(engine, request_id, samples, spans, req, language, options)
    except EarshotError as exc:
        log.info(
            "%s refused: %s",
            task,
            exc.message,
            extra={"session": request_id, "code": exc.code, "status": exc.http_status},
        )
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.refused(exc.code, exc.http_status)
        retry = None
        if isinstance(exc, ServerFullError | SchedulerStoppedError):
            retry = {"Retry-After": "2" if isinstance(exc, ServerFullError) else "5"}
        response = openai_error(exc, engine, headers=retry)
        if isinstance(exc, BodyTimeoutError | MalformedUploadError):
            response.force_close()  # the rest of the body is not worth waiting for
        return response
    log.info(
        "%s request",
        task,
        extra={
            "session": request_id,
            "audio_s": round(loaded.duration, 3),
            "pieces": len(spans),
            "response_format": req.response_format,
            "stream": req.stream,
        },
    )
    if req.stream:
        return await _stream(request, engine, request_id, spans, futures)
    try:
        hyps = [await _result(f) for f in futures]
    except EarshotError as exc:
        return openai_error(exc, engine)
    finally:
        _cancel(futures)
    results = [PieceResult(s, e, h) for (s, e), h in zip(spans, hyps, strict=True)]
    return _render(engine, req, request_id, loaded.duration, results, task)


async def handle_transcriptions(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, "transcribe")


async def handle_translations(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, "translate")


def register_openai_routes(app: web.Application) -> None:
    """Add the OpenAI-compatible routes to an app made by ``create_app``.

    Calling it again on the same app does nothing.
    """
    if app.get(_REGISTERED_KEY):
        return
    app[_REGISTERED_KEY] = True
    app[_CREATED_KEY] = int(time.time())
    app.router.add_post("/v1/audio/transcriptions", handle_transcriptions)
    app.router.add_post("/v1/audio/translations", handle_translations)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/models/{model_id}", handle_model)
