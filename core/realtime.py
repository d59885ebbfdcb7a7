"""OpenAI Realtime transcription sessions: events in, settings and events out (pure).

The websocket of ``/v1/realtime`` speaks the Realtime API of OpenAI's SDKs in
its transcription form (docs/protocol.md, "OpenAI Realtime"). This module
reads the client's JSON events (:func:`parse_client_event`), merges a
``session.update`` (the GA shape, ``session.type = "transcription"``, or the
beta ``transcription_session.update``) into the session's settings
(:func:`apply_update`), maps the settings onto the stream parameters of the
one engine (:func:`stream_params`, :func:`vad_overrides`), builds every
server event, and turns the stable words of interims into deltas that never
revise what they already sent (:class:`DeltaTracker`). The shell
(``earshot.service.http.realtime``) only moves these between the websocket
and the stream.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from earshot.core.audio import AudioFormat
from earshot.core.errors import (
    EarshotError,
    InvalidParameterError,
    RealtimeInvalidAudioError,
    RealtimeInvalidEventError,
    RealtimeUnknownEventError,
    RealtimeUnsupportedError,
    UnknownParameterError,
)
from earshot.core.protocol import MAX_ENDPOINTING_MS, MIN_ENDPOINTING_MS, StreamParams
from earshot.core.stabilizer import normalize_word

Variant = Literal["ga", "beta"]
"""Which shape of the API a connection speaks: the GA one (``session.*``
events) or the beta one (``transcription_session.*``, sent by clients with
the header ``OpenAI-Beta: realtime=v1``)."""

AudioName = Literal["pcm16", "g711_ulaw", "g711_alaw"]

# The audio formats, by their beta names: (encoding, sample rate) on the wire.
AUDIO_FORMATS: dict[str, tuple[str, int]] = {
    "pcm16": ("linear16", 24000),
    "g711_ulaw": ("mulaw", 8000),
    "g711_alaw": ("alaw", 8000),
}
_GA_FORMAT_NAMES = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
_GA_FORMATS: dict[str, dict[str, Any]] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
}

SUPPORTED_EVENTS = (
    "session.update",
    "transcription_session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)

# Client events of the Realtime API that a transcription session does not
# implement, with why: refused by name.
UNSUPPORTED_EVENTS: dict[str, str] = {
    "response.create": "responses (a model answering) are not implemented: this server "
    "only transcribes",
    "response.cancel": "responses are not implemented: Earshot only transcribes",
    "conversation.item.create": "conversation items are not implemented: send audio with "
    "input_audio_buffer.append",
    "conversation.item.retrieve": "conversation items are not kept: each transcript is sent once",
    "conversation.item.truncate": "conversation items are not implemented",
    "conversation.item.delete": "conversation items are not implemented",
    "output_audio_buffer.clear": "output audio is not implemented: Earshot only transcribes",
}

# Fields of a realtime (conversation) session, refused in a transcription one.
_CONVERSATION_FIELDS: dict[str, str] = {
    "tools": "tools (function calling)",
    "tool_choice": "tools (function calling)",
    "voice": "output audio (a voice)",
    "instructions": "responses (instructions for a model)",
    "output_modalities": "output modalities (responses)",
    "max_output_tokens": "responses",
    "max_response_output_tokens": "responses",
    "temperature": "responses",
    "tracing": "tracing",
    "truncation": "conversation truncation",
    "prompt": "prompts for responses (for the transcription prompt use "
    "audio.input.transcription.prompt)",
    "output_audio_format": "output audio",
}

DEFAULT_SILENCE_MS = 500
MAX_PROMPT_CHARS = 1000
MAX_KEYWORDS = 100


def _event_error(cls: type[EarshotError], message: str, **details: Any) -> EarshotError:
    return cls(message, **{k: v for k, v in details.items() if v is not None})


# -- settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class TurnDetection:
    """Server VAD: the endpointer closes an utterance after ``silence_duration_ms``."""

    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int


@dataclass(frozen=True)
class SessionConfig:
    """A transcription session's settings, as in effect (not as asked)."""

    audio: AudioName = "pcm16"
    model: str = ""
    language: str | None = None
    prompt: str = ""
    keywords: tuple[str, ...] = ()
    turn_detection: TurnDetection | None = None
    include: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    """Fields accepted without effect (``noise_reduction``, ``create_response``...)."""

    @property
    def audio_format(self) -> AudioFormat:
        encoding, rate = AUDIO_FORMATS[self.audio]
        return AudioFormat(encoding, rate, 1)


def default_config(
    model: str, *, threshold: float, prefix_padding_ms: int, language: str | None = None
) -> SessionConfig:
    """The settings a session starts with: pcm16 at 24 kHz, server VAD with the
    server's own voice-detector settings and 500 ms of silence."""
    return SessionConfig(
        model=model,
        language=language,
        turn_detection=TurnDetection(threshold, prefix_padding_ms, DEFAULT_SILENCE_MS),
    )


def _check_fields(obj: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for key in obj:
        if key not in allowed:
            name = f"{path}.{key}" if path else key
            raise _event_error(
                UnknownParameterError,
                f"unknown parameter {name!r}; a transcription session takes "
                f"{', '.join(repr(a) for a in allowed)} there",
                field=name,
            )


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _event_error(
            InvalidParameterError, f"{path} must be an object, not {value!r}", field=path
        )
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _event_error(
            InvalidParameterError, f"{path} must be a string, not {value!r}", field=path
        )
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _event_error(
            InvalidParameterError, f"{path} must be a number, not {value!r}", field=path
        )
    return float(value)


def _language(value: Any, path: str) -> str | None:
    if value is None:
        return None
    raw = _string(value, path).strip()
    if raw.lower() in ("", "auto"):
        return None
    code = raw.split("-")[0].lower()
    if not (code.isalpha() and 2 <= len(code) <= 3):
        raise _event_error(
            InvalidParameterError,
            f"{path} must be an ISO-639-1 code such as 'en', not {raw!r}",
            field=path,
        )
    return code


def _turn_detection(
    value: Any, path: str, current: TurnDetection | None, ignored: list[str]
) -> TurnDetection | None:
    if value is None:
        return None
    obj = _object(value, path)
    _check_fields(
        obj,
        (
            "type",
            "threshold",
            "prefix_padding_ms",
            "silence_duration_ms",
            "create_response",
            "interrupt_response",
            "idle_timeout_ms",
            "eagerness",
        ),
        path,
    )
    kind = obj.get("type", "server_vad")
    if kind == "semantic_vad":
        raise _event_error(
            RealtimeUnsupportedError,
            f"{path}.type 'semantic_vad' is not supported: turns are detected by "
            "voice activity; use 'server_vad' or null (commit by hand)",
            field=f"{path}.type",
        )
    if kind != "server_vad":
        raise _event_error(
            InvalidParameterError,
            f"{path}.type must be 'server_vad' (or the whole setting null), not {kind!r}",
            field=f"{path}.type",
        )
    if obj.get("idle_timeout_ms") is not None:
        raise _event_error(
            RealtimeUnsupportedError,
            f"{path}.idle_timeout_ms triggers a response, and responses are not implemented",
            field=f"{path}.idle_timeout_ms",
        )
    for key in ("create_response", "interrupt_response", "eagerness"):
        if key in obj:
            ignored.append(f"{path}.{key}")
    base = current or TurnDetection(0.5, 300, DEFAULT_SILENCE_MS)
    threshold = base.threshold
    if "threshold" in obj:
        # The voice detector takes a threshold strictly inside (0, 1).
        threshold = min(0.99, max(0.01, _number(obj["threshold"], f"{path}.threshold")))
    padding = base.prefix_padding_ms
    if "prefix_padding_ms" in obj:
        padding = int(
            min(1000, max(0, _number(obj["prefix_padding_ms"], f"{path}.prefix_padding_ms")))
        )
    silence = base.silence_duration_ms
    if "silence_duration_ms" in obj:
        raw = _number(obj["silence_duration_ms"], f"{path}.silence_duration_ms")
        silence = int(min(MAX_ENDPOINTING_MS, max(MIN_ENDPOINTING_MS, raw)))
    return TurnDetection(round(threshold, 3), padding, silence)


def _transcription(
    value: Any, path: str, config: SessionConfig, ignored: list[str]
) -> dict[str, Any]:
    if value is None:
        raise _event_error(
            RealtimeUnsupportedError,
            f"{path} cannot be null here: a transcription session always transcribes",
            field=path,
        )
    obj = _object(value, path)
    _check_fields(obj, ("model", "language", "languages", "prompt", "keywords", "delay"), path)
    changes: dict[str, Any] = {}
    if "model" in obj:
        changes["model"] = _string(obj["model"], f"{path}.model")
    if "language" in obj:
        changes["language"] = _language(obj["language"], f"{path}.language")
    if "languages" in obj:
        langs = obj["languages"]
        if not isinstance(langs, list) or len(langs) > 1:
            raise _event_error(
                RealtimeUnsupportedError,
                f"{path}.languages may name at most one language here (Whisper decodes "
                "one language per utterance, or detects it when none is given)",
                field=f"{path}.languages",
            )
        if langs and "language" not in obj:
            changes["language"] = _language(langs[0], f"{path}.languages[0]")
    if "prompt" in obj:
        prompt = _string(obj["prompt"], f"{path}.prompt").strip()
        if len(prompt) > MAX_PROMPT_CHARS:
            raise _event_error(
                InvalidParameterError,
                f"{path}.prompt may have at most {MAX_PROMPT_CHARS} characters, not {len(prompt)}",
                field=f"{path}.prompt",
            )
        changes["prompt"] = prompt
    if "keywords" in obj:
        words = obj["keywords"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise _event_error(
                InvalidParameterError,
                f"{path}.keywords must be a list of strings",
                field=f"{path}.keywords",
            )
        if len(words) > MAX_KEYWORDS:
            raise _event_error(
                InvalidParameterError,
                f"{path}.keywords may have at most {MAX_KEYWORDS} entries",
                field=f"{path}.keywords",
            )
        changes["keywords"] = tuple(w.strip() for w in words if w.strip())
    if "delay" in obj:
        ignored.append(f"{path}.delay")
    return changes


def _format(value: Any, path: str, *, ga: bool) -> AudioName:
    if ga:
        obj = _object(value, path)
        _check_fields(obj, ("type", "rate"), path)
        kind = obj.get("type")
        name = _GA_FORMAT_NAMES.get(kind) if isinstance(kind, str) else None
        if name is None:
            raise _event_error(
                InvalidParameterError,
                f"{path}.type must be one of {', '.join(_GA_FORMAT_NAMES)}, not {kind!r}",
                field=f"{path}.type",
            )
        rate = obj.get("rate")
        want = AUDIO_FORMATS[name][1]
        if rate is not None and (name != "pcm16" or rate != want):
            raise _event_error(
                InvalidParameterError,
                f"{path}.rate must be 24000 for audio/pcm (and is not given for G.711, "
                f"which is 8000), not {rate!r}",
                field=f"{path}.rate",
            )
        return name  # type: ignore[return-value]
    if not isinstance(value, str) or value not in AUDIO_FORMATS:
        raise _event_error(
            InvalidParameterError,
            f"{path} must be one of {', '.join(AUDIO_FORMATS)}, not {value!r}",
            field=path,
        )
    return value  # type: ignore[return-value]


def _include(value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _event_error(InvalidParameterError, f"{path} must be a list of strings", field=path)
    for v in value:
        if v == "item.input_audio_transcription.logprobs":
            raise _event_error(
                RealtimeUnsupportedError,
                f"{path}: log probabilities of transcripts are not sent",
                field=path,
            )
    return tuple(value)


def _noise_reduction(value: Any, path: str, ignored: list[str]) -> None:
    if value is not None:
        # A filter before the voice detector: accepted without effect, and said so.
        ignored.append(path)


def apply_update(config: SessionConfig, session: Any, *, beta_event: bool) -> SessionConfig:
    """``config`` with the fields ``session`` (a client's ``session`` object)
    sets; the others keep their values. ``beta_event``: the event was
    ``transcription_session.update`` (whose fields are the beta ones); a
    ``session.update`` may carry either shape (the GA one when it has
    ``type`` or ``audio``). Raises an EarshotError (``unknown_parameter``,
    ``invalid_parameter``, ``unsupported_feature``) naming the field."""
    obj = _object(session, "session")
    ignored: list[str] = []
    changes: dict[str, Any] = {}
    ga = not beta_event and ("type" in obj or "audio" in obj)
    for key, why in _CONVERSATION_FIELDS.items():
        if key in obj:
            raise _event_error(
                RealtimeUnsupportedError,
                f"session.{key} is not supported: {why} belongs to realtime "
                "(conversation) sessions; this server only runs transcription sessions",
                field=f"session.{key}",
            )
    if ga or "type" in obj:
        kind = obj.get("type", "transcription")
        if kind == "realtime":
            raise _event_error(
                RealtimeUnsupportedError,
                "session.type 'realtime' (a conversation with a model) is not supported: "
                "this server only runs transcription sessions; send "
                "session.type = 'transcription'",
                field="session.type",
            )
        if kind != "transcription":
            raise _event_error(
                InvalidParameterError,
                f"session.type must be 'transcription', not {kind!r}",
                field="session.type",
            )
    if ga:
        _check_fields(
            obj, ("type", "audio", "include", "id", "object", "expires_at", "model"), "session"
        )
        if "model" in obj or "id" in obj or "object" in obj or "expires_at" in obj:
            ignored.extend(
                f"session.{k}" for k in ("model", "id", "object", "expires_at") if k in obj
            )
        if "include" in obj:
            changes["include"] = _include(obj["include"], "session.include")
        if "audio" in obj:
            audio = _object(obj["audio"], "session.audio")
            if "output" in audio:
                raise _event_error(
                    RealtimeUnsupportedError,
                    "session.audio.output is not supported: output audio belongs to "
                    "realtime sessions; Earshot only transcribes",
                    field="session.audio.output",
                )
            _check_fields(audio, ("input",), "session.audio")
            if "input" in audio:
                inp = _object(audio["input"], "session.audio.input")
                path = "session.audio.input"
                _check_fields(
                    inp, ("format", "transcription", "turn_detection", "noise_reduction"), path
                )
                if "format" in inp:
                    changes["audio"] = _format(inp["format"], f"{path}.format", ga=True)
                if "transcription" in inp:
                    changes.update(
                        _transcription(
                            inp["transcription"], f"{path}.transcription", config, ignored
                        )
                    )
                if "turn_detection" in inp:
                    changes["turn_detection"] = _turn_detection(
                        inp["turn_detection"],
                        f"{path}.turn_detection",
                        config.turn_detection,
                        ignored,
                    )
                if "noise_reduction" in inp:
                    _noise_reduction(inp["noise_reduction"], f"{path}.noise_reduction", ignored)
    else:
        _check_fields(
            obj,
            (
                "type",
                "input_audio_format",
                "input_audio_transcription",
                "turn_detection",
                "input_audio_noise_reduction",
                "include",
                "modalities",
                "client_secret",
                "id",
                "object",
                "model",
                "expires_at",
            ),
            "session",
        )
        for key in ("modalities", "client_secret", "id", "object", "model", "expires_at"):
            if key in obj:
                ignored.append(f"session.{key}")
        if "modalities" in obj and obj["modalities"] not in (
            ["text"],
            ["audio", "text"],
            ["text", "audio"],
        ):
            raise _event_error(
                InvalidParameterError,
                "session.modalities must be ['text'] here",
                field="session.modalities",
            )
        if "include" in obj:
            changes["include"] = _include(obj["include"], "session.include")
        if "input_audio_format" in obj:
            changes["audio"] = _format(
                obj["input_audio_format"], "session.input_audio_format", ga=False
            )
        if "input_audio_transcription" in obj:
            changes.update(
                _transcription(
                    obj["input_audio_transcription"],
                    "session.input_audio_transcription",
                    config,
                    ignored,
                )
            )
        if "turn_detection" in obj:
            changes["turn_detection"] = _turn_detection(
                obj["turn_detection"], "session.turn_detection", config.turn_detection, ignored
            )
        if "input_audio_noise_reduction" in obj:
            _noise_reduction(
                obj["input_audio_noise_reduction"], "session.input_audio_noise_reduction", ignored
            )
    changes["ignored"] = tuple(sorted(set(ignored)))
    return replace(config, **changes)


def stream_params(config: SessionConfig) -> StreamParams:
    """The stream parameters of the engine's one session type for ``config``.

    Interims are always on (they feed the deltas); server VAD's
    ``silence_duration_ms`` is the endpointing, and ``turn_detection`` null
    turns endpointing off (utterances close on a commit). The transcription
    prompt and keywords go to the decoder as its key terms (its hot-words
    prompt)."""
    turn = config.turn_detection
    keyterms = tuple(k for k in (config.prompt, *config.keywords) if k)
    return StreamParams(
        audio=config.audio_format,
        language=config.language,
        interim_results=True,
        endpointing_ms=turn.silence_duration_ms if turn is not None else None,
        vad_events=turn is not None,
        model=config.model or None,
        keyterms=keyterms,
    )


def vad_overrides(config: SessionConfig) -> dict[str, Any]:
    """The session settings server VAD's ``threshold`` and ``prefix_padding_ms``
    set (``vad_threshold``, ``speech_pad_ms``); none with turn detection off."""
    turn = config.turn_detection
    if turn is None:
        return {}
    return {"vad_threshold": turn.threshold, "speech_pad_ms": turn.prefix_padding_ms}


def session_object(config: SessionConfig, variant: Variant, session_id: str) -> dict[str, Any]:
    """The ``session`` of ``session.created``/``updated`` (and the beta events):
    the settings in effect."""
    turn: dict[str, Any] | None = None
    if config.turn_detection is not None:
        t = config.turn_detection
        turn = {
            "type": "server_vad",
            "threshold": t.threshold,
            "prefix_padding_ms": t.prefix_padding_ms,
            "silence_duration_ms": t.silence_duration_ms,
        }
    transcription: dict[str, Any] = {
        "model": config.model,
        "language": config.language,
        "prompt": config.prompt,
    }
    if config.keywords:
        transcription["keywords"] = list(config.keywords)
    if variant == "beta":
        return {
            "id": session_id,
            "object": "realtime.transcription_session",
            "input_audio_format": config.audio,
            "input_audio_transcription": transcription,
            "turn_detection": turn,
            "input_audio_noise_reduction": None,
            "include": list(config.include),
            "modalities": ["text"],
            # No ephemeral key is issued: the connection's own key is the credential.
            "client_secret": {"value": "", "expires_at": 0},
        }
    return {
        "type": "transcription",
        "id": session_id,
        "object": "realtime.transcription_session",
        "include": list(config.include),
        "audio": {
            "input": {
                "format": dict(_GA_FORMATS[config.audio]),
                "transcription": transcription,
                "turn_detection": turn,
                "noise_reduction": None,
            }
        },
    }


def changed_settings(old: SessionConfig, new: SessionConfig) -> list[str]:
    """The settings (by name) that differ between ``old`` and ``new``,
    ignoring what has no effect."""
    names = ("audio", "model", "language", "prompt", "keywords", "turn_detection", "include")
    return [n for n in names if getattr(old, n) != getattr(new, n)]


# -- client events ----------------------------------------------------------------


@dataclass(frozen=True)
class ClientEvent:
    """One client event, read: its ``type``, ``event_id``, and what it carries."""

    type: str
    event_id: str | None = None
    session: dict[str, Any] | None = None
    audio: bytes = b""


def _event_id(data: dict[str, Any]) -> str | None:
    value = data.get("event_id")
    return value if isinstance(value, str) else None


_EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "session.update": ("type", "event_id", "session"),
    "transcription_session.update": ("type", "event_id", "session"),
    "input_audio_buffer.append": ("type", "event_id", "audio"),
    "input_audio_buffer.commit": ("type", "event_id"),
    "input_audio_buffer.clear": ("type", "event_id"),
}


def parse_client_event(text: str) -> ClientEvent:
    """Read one text frame. Raises ``invalid_event`` (not a JSON object with a
    string ``type``), ``unknown_event``, ``unsupported_feature`` (an event of
    the Realtime API that Earshot does not implement), ``unknown_parameter``
    (a field the event does not have) or ``invalid_audio`` (``audio`` that is
    not base64); the error's ``event_id`` detail is the client's."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise _event_error(
            RealtimeInvalidEventError,
            "client events must be JSON objects such as "
            '{"type": "input_audio_buffer.commit"}; this text frame is not valid JSON',
        ) from None
    if not isinstance(data, dict):
        raise _event_error(
            RealtimeInvalidEventError, "a client event must be a JSON object", field="type"
        )
    event_id = _event_id(data)
    kind = data.get("type")
    if not isinstance(kind, str) or not kind:
        raise _event_error(
            RealtimeInvalidEventError,
            "a client event must have a string 'type'",
            field="type",
            event_id=event_id,
        )
    if kind in UNSUPPORTED_EVENTS:
        raise _event_error(
            RealtimeUnsupportedError,
            f"{kind} is not supported: {UNSUPPORTED_EVENTS[kind]}",
            field="type",
            event_id=event_id,
        )
    if kind not in _EVENT_FIELDS:
        raise _event_error(
            RealtimeUnknownEventError,
            f"unknown client event type {kind!r}; a transcription session takes "
            f"{', '.join(SUPPORTED_EVENTS)}",
            field="type",
            event_id=event_id,
        )
    for key in data:
        if key not in _EVENT_FIELDS[kind]:
            raise _event_error(
                UnknownParameterError,
                f"unknown parameter {key!r} of {kind}",
                field=key,
                event_id=event_id,
            )
    if "event_id" in data and event_id is None:
        raise _event_error(InvalidParameterError, "event_id must be a string", field="event_id")
    if kind in ("session.update", "transcription_session.update"):
        if not isinstance(data.get("session"), dict):
            raise _event_error(
                InvalidParameterError,
                f"{kind} needs a 'session' object",
                field="session",
                event_id=event_id,
            )
        return ClientEvent(kind, event_id, session=data["session"])
    if kind == "input_audio_buffer.append":
        raw = data.get("audio")
        if not isinstance(raw, str):
            raise _event_error(
                RealtimeInvalidAudioError,
                "input_audio_buffer.append needs 'audio', a base64 string",
                field="audio",
                event_id=event_id,
            )
        try:
            audio = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise _event_error(
                RealtimeInvalidAudioError,
                "audio is not valid base64 (RFC 4648, with padding)",
                field="audio",
                event_id=event_id,
            ) from None
        return ClientEvent(kind, event_id, audio=audio)
    return ClientEvent(kind, event_id)


# -- server events ----------------------------------------------------------------


class Ids:
    """Server event and item ids: ``event_<prefix><n>``, ``item_<prefix><n>``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._events = 0
        self._items = 0

    def event(self) -> str:
        self._events += 1
        return f"event_{self.prefix}{self._events}"

    def item(self) -> str:
        self._items += 1
        return f"item_{self.prefix}{self._items}"


def error_event(
    err: EarshotError, event_id: str, *, error_type: str = "invalid_request_error"
) -> dict[str, Any]:
    """OpenAI's realtime ``error`` event for ``err``: ``param`` is the field at
    fault, ``error.event_id`` the client event that caused it."""
    param = err.details.get("field")
    client_event = err.details.get("event_id")
    return {
        "type": "error",
        "event_id": event_id,
        "error": {
            "type": error_type,
            "code": err.code,
            "message": err.message,
            "param": param if isinstance(param, str) else None,
            "event_id": client_event if isinstance(client_event, str) else None,
        },
    }


def session_event(
    kind: Literal["created", "updated"],
    config: SessionConfig,
    variant: Variant,
    session_id: str,
    event_id: str,
    earshot: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``session.created``/``session.updated``, or their beta names."""
    prefix = "transcription_session" if variant == "beta" else "session"
    msg: dict[str, Any] = {
        "type": f"{prefix}.{kind}",
        "event_id": event_id,
        "session": session_object(config, variant, session_id),
    }
    if earshot is not None:
        msg["earshot"] = earshot
    return msg


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000)) if math.isfinite(seconds) else 0


def speech_started(event_id: str, item_id: str, at: float) -> dict[str, Any]:
    return {
        "type": "input_audio_buffer.speech_started",
        "event_id": event_id,
        "item_id": item_id,
        "audio_start_ms": _ms(at),
    }


def speech_stopped(event_id: str, item_id: str, at: float) -> dict[str, Any]:
    return {
        "type": "input_audio_buffer.speech_stopped",
        "event_id": event_id,
        "item_id": item_id,
        "audio_end_ms": _ms(at),
    }


def committed(event_id: str, item_id: str, previous_item_id: str | None) -> dict[str, Any]:
    return {
        "type": "input_audio_buffer.committed",
        "event_id": event_id,
        "item_id": item_id,
        "previous_item_id": previous_item_id,
    }


def cleared(event_id: str) -> dict[str, Any]:
    return {"type": "input_audio_buffer.cleared", "event_id": event_id}


def delta(event_id: str, item_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "conversation.item.input_audio_transcription.delta",
        "event_id": event_id,
        "item_id": item_id,
        "content_index": 0,
        "delta": text,
    }


def completed(
    event_id: str,
    item_id: str,
    transcript: str,
    seconds: float,
    earshot: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The item's transcript, authoritative (it may differ from its deltas)."""
    msg: dict[str, Any] = {
        "type": "conversation.item.input_audio_transcription.completed",
        "event_id": event_id,
        "item_id": item_id,
        "content_index": 0,
        "transcript": transcript,
        "usage": {"type": "duration", "seconds": round(max(0.0, seconds), 3)},
    }
    if earshot is not None:
        msg["earshot"] = earshot
    return msg


# -- deltas -----------------------------------------------------------------------


@dataclass
class DeltaTracker:
    """The deltas of one item: only newly stable words, never a revision.

    An interim's first ``stable_words`` words are the ones on which it and
    the interim before it agree (:mod:`earshot.core.stabilizer`). A delta
    sends the stable words past those already sent, when the words already
    sent are still the first stable words (compared as the stabilizer
    compares them: lower case, without punctuation). When a later interim's
    stable words disagree with what was sent, nothing is sent for it: a
    delta never revises. An item may span several utterances (a commit by
    hand after long pauses); each utterance's words continue the item's
    text after a space. The completed transcript is the final's, whatever
    the deltas said.
    """

    sent: dict[int, list[str]] = field(default_factory=dict)
    text: str = ""
    """Everything the deltas sent, concatenated."""

    def update(self, utterance: int, words: Sequence[str], stable: int) -> str:
        """The delta for an interim of ``utterance`` with ``words`` of which
        the first ``stable`` are stable ("" when there is nothing new)."""
        stable_words = [w for w in words[: max(0, stable)] if w.strip()]
        sent = self.sent.setdefault(utterance, [])
        head = stable_words[: len(sent)]
        if len(head) < len(sent) or [normalize_word(w) for w in head] != [
            normalize_word(w) for w in sent
        ]:
            return ""
        new = stable_words[len(sent) :]
        if not new:
            return ""
        sent.extend(new)
        out = " ".join(w.strip() for w in new)
        if self.text:
            out = " " + out
        self.text += out
        return out
