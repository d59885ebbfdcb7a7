"""The live streaming protocol of ``/v1/listen`` (pure: no I/O).

Modelled on the Deepgram live streaming API so that software written for it
can point at Earshot. docs/protocol.md describes it for clients; this module
is its single implementation: query parameters in, control messages in,
server messages out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from earshot.core.audio import AudioFormat
from earshot.core.errors import (
    EarshotError,
    InvalidMessageError,
    InvalidParameterError,
    UnknownParameterError,
    UnsupportedParameterError,
)
from earshot.core.values import parse_bool

PROTOCOL_VERSION = "1"

STREAM_PROTOCOLS = ("deepgram", "openai_realtime", "twilio")
"""The live wire protocols, as metrics and logs label them: Deepgram's
``/v1/listen``, OpenAI Realtime's ``/v1/realtime``, Twilio Media Streams'
``/v1/twilio``."""


# Deepgram options that only shape the text (formatting, tags, billing):
# accepted so that existing clients work, and listed in Metadata as ignored.
IGNORED_PARAMETERS = frozenset(
    {
        "punctuate",
        "smart_format",
        "profanity_filter",
        "filler_words",
        "numerals",
        "measurements",
        "tag",
        "version",
        "tier",
        "no_delay",
        "mip_opt_out",
        "extra",
    }
)

# Deepgram options whose effect a client depends on and that Earshot does not
# implement, with why. Each is refused before the upgrade when it asks for the
# effect; a value that asks for nothing (``redact=false``) is accepted.
UNSUPPORTED_PARAMETERS: dict[str, str] = {
    "redact": "redaction is not implemented: the transcript would still hold what the "
    "client wants removed",
    "callback": "results are only sent on this websocket; nothing is ever sent to a callback",
    "callback_method": "results are only sent on this websocket, never to a callback",
    "search": "search is not implemented: no hits would be reported",
    "replace": "find-and-replace is not implemented: the words would not be replaced",
    "diarize": "speaker diarization is not implemented; send each speaker as its own "
    "channel with multichannel=true",
    "diarize_version": "speaker diarization is not implemented",
    "dictation": "spoken punctuation commands are not converted",
    "alternatives": "one alternative is returned per result",
}
_NOTHING_ASKED = frozenset({"", "false", "0", "no", "off"})
_ONE_ALTERNATIVE = frozenset({"1"})

KNOWN_PARAMETERS = frozenset(
    {
        "encoding",
        "sample_rate",
        "channels",
        "multichannel",
        "language",
        "interim_results",
        "endpointing",
        "utterance_end_ms",
        "vad_events",
        "model",
        "words",
        "keyterm",
        "keywords",
        "detect_language",
        "warnings",
    }
)

MIN_ENDPOINTING_MS = 100
MAX_ENDPOINTING_MS = 10_000
DEFAULT_ENDPOINTING_MS = 500


def _parse_bool(name: str, value: str) -> bool:
    try:
        return parse_bool(value)
    except ValueError:
        raise InvalidParameterError(
            f"{name} must be true or false, not {value!r}", field=name, value=value
        ) from None


def _parse_int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise InvalidParameterError(
            f"{name} must be an integer from {lo} to {hi}, not {value!r}",
            field=name,
            value=value,
            min=lo,
            max=hi,
        ) from None
    if not lo <= n <= hi:
        raise InvalidParameterError(
            f"{name} must be from {lo} to {hi}, not {n}", field=name, value=n, min=lo, max=hi
        )
    return n


@dataclass(frozen=True)
class StreamParams:
    """What a client asked for in the query string, validated.

    ``endpointing_ms`` None means endpointing is off: utterances close only on
    ``Finalize``, at the maximum utterance length, or at the end of the stream.
    ``language`` None means detect it.
    """

    audio: AudioFormat
    multichannel: bool = False
    language: str | None = "en"
    interim_results: bool = False
    endpointing_ms: int | None = DEFAULT_ENDPOINTING_MS
    utterance_end_ms: int | None = None
    vad_events: bool = False
    model: str | None = None
    words: bool = True
    keyterms: tuple[str, ...] = ()
    warnings: bool = False
    ignored: tuple[str, ...] = ()

    @property
    def decoded_channels(self) -> int:
        """Channels transcribed separately: all of them with multichannel, else one mix."""
        return self.audio.channels if self.multichannel else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoding": self.audio.encoding,
            "sample_rate": self.audio.sample_rate,
            "channels": self.audio.channels,
            "multichannel": self.multichannel,
            "language": self.language or "auto",
            "interim_results": self.interim_results,
            "endpointing": self.endpointing_ms if self.endpointing_ms is not None else False,
            "utterance_end_ms": self.utterance_end_ms,
            "vad_events": self.vad_events,
            "model": self.model,
            "words": self.words,
            "keyterm": list(self.keyterms),
            "warnings": self.warnings,
        }


def parse_params(
    query: Mapping[str, str] | Sequence[tuple[str, str]],
    *,
    default_language: str | None = "en",
    max_keyterms: int = 100,
) -> StreamParams:
    """Validate the query string of a ``/v1/listen`` request.

    Raises UnknownParameterError for a parameter Earshot does not know,
    InvalidParameterError (or the audio format errors of earshot.core.audio) for
    a bad value, naming the field and the allowed values.
    """
    items = list(query.items()) if isinstance(query, Mapping) else list(query)
    single: dict[str, str] = {}
    keyterms: list[str] = []
    ignored: list[str] = []
    for key, value in items:
        if key == "keyterm":
            if value.strip():
                keyterms.append(value.strip())
        elif key == "keywords":
            # Deepgram's older keyword boosting, "word:intensifier": the word
            # becomes a key term (Whisper takes no intensity).
            word = value.rsplit(":", 1)[0].strip() if ":" in value else value.strip()
            if word:
                keyterms.append(word)
        elif key in IGNORED_PARAMETERS:
            ignored.append(key)
        elif key in UNSUPPORTED_PARAMETERS:
            asks = value.strip().lower()
            if asks not in _NOTHING_ASKED and not (
                key == "alternatives" and asks in _ONE_ALTERNATIVE
            ):
                raise UnsupportedParameterError(
                    f"parameter {key}={value!r} is not supported: {UNSUPPORTED_PARAMETERS[key]}",
                    field=key,
                    value=value,
                )
            ignored.append(key)
        elif key in KNOWN_PARAMETERS:
            if key in single:
                raise InvalidParameterError(f"parameter {key!r} is given more than once", field=key)
            single[key] = value
        else:
            raise UnknownParameterError(
                f"unknown parameter {key!r}; see docs/protocol.md for the supported ones",
                field=key,
            )
    if len(keyterms) > max_keyterms:
        raise InvalidParameterError(
            f"at most {max_keyterms} keyterm values are allowed, got {len(keyterms)}",
            field="keyterm",
            max=max_keyterms,
        )
    audio = AudioFormat.parse(
        single.get("encoding", "linear16"),
        single.get("sample_rate", "16000"),
        single.get("channels", "1"),
    )
    endpointing: int | None = DEFAULT_ENDPOINTING_MS
    if "endpointing" in single:
        raw = single["endpointing"].strip().lower()
        if raw in ("false", "off"):
            endpointing = None
        else:
            # Deepgram allows values down to 10 ms; a voice detector needs longer
            # to tell a pause from a stop, so small values are raised.
            endpointing = max(
                MIN_ENDPOINTING_MS, _parse_int("endpointing", raw, 0, MAX_ENDPOINTING_MS)
            )
    language: str | None = default_language
    if "detect_language" in single and _parse_bool("detect_language", single["detect_language"]):
        if "language" in single and single["language"].strip().lower() not in ("auto", "multi"):
            raise InvalidParameterError(
                "detect_language=true and a language were both given; give one of them",
                field="detect_language",
            )
        language = None
    elif "language" in single:
        raw = single["language"].strip()
        language = None if raw.lower() in ("auto", "multi", "") else raw.split("-")[0].lower()
    utterance_end = (
        _parse_int("utterance_end_ms", single["utterance_end_ms"], 1000, 60_000)
        if "utterance_end_ms" in single
        else None
    )
    return StreamParams(
        audio=audio,
        multichannel=_parse_bool("multichannel", single.get("multichannel", "false")),
        language=language,
        interim_results=_parse_bool("interim_results", single.get("interim_results", "false")),
        endpointing_ms=endpointing,
        utterance_end_ms=utterance_end,
        vad_events=_parse_bool("vad_events", single.get("vad_events", "false")),
        model=single.get("model") or None,
        words=_parse_bool("words", single.get("words", "true")),
        keyterms=tuple(keyterms),
        warnings=_parse_bool("warnings", single.get("warnings", "false")),
        ignored=tuple(sorted(set(ignored))),
    )


CONTROL_TYPES = ("KeepAlive", "Finalize", "CloseStream", "Configure")


def parse_control(text: str) -> str:
    """The type of a JSON control message: KeepAlive, Finalize or CloseStream.

    Raises InvalidMessageError (code ``invalid_message``) for text that is not
    JSON, not an object, or of an unknown type.
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise InvalidMessageError(
            "text frames must be JSON control messages such as "
            '{"type": "KeepAlive"}; this one is not valid JSON',
            field="message",
        ) from None
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in CONTROL_TYPES:
        raise InvalidMessageError(
            f"unknown control message type {kind!r}; expected one of {', '.join(CONTROL_TYPES)}",
            field="type",
        )
    return str(kind)


# -- events the session produces --------------------------------------------


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    confidence: float
    punctuated_word: str


@dataclass(frozen=True)
class TranscriptEvent:
    """An interim (``is_final`` False) or final transcript of one channel."""

    channel: int
    channels: int
    start: float
    duration: float
    transcript: str
    confidence: float
    words: tuple[Word, ...]
    is_final: bool
    speech_final: bool
    from_finalize: bool = False
    utterance: int = 0
    stable_words: int = 0
    # The language the window was decoded in (ISO code; "" when unknown).
    language: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpeechStartedEvent:
    channel: int
    channels: int
    timestamp: float
    # The utterance that starts (its number on the channel, from 0).
    utterance: int = 0


@dataclass(frozen=True)
class UtteranceEndEvent:
    channel: int
    channels: int
    last_word_end: float


@dataclass(frozen=True)
class WarningEvent:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


Event = TranscriptEvent | SpeechStartedEvent | UtteranceEndEvent | WarningEvent


def _r(x: float) -> float:
    return round(float(x), 3) if math.isfinite(x) else 0.0


def results_message(ev: TranscriptEvent, request_id: str, model_name: str) -> dict[str, Any]:
    """A Deepgram-shaped ``Results`` message, with Earshot's additions under ``earshot``.

    The language a result was decoded in is where Deepgram's clients look for
    it: ``channel.detected_language`` and the alternative's ``languages``."""
    alternative: dict[str, Any] = {
        "transcript": ev.transcript,
        "confidence": _r(ev.confidence),
        "words": [
            {
                "word": w.word,
                "start": _r(w.start),
                "end": _r(w.end),
                "confidence": _r(w.confidence),
                "punctuated_word": w.punctuated_word,
            }
            for w in ev.words
        ],
    }
    channel: dict[str, Any] = {"alternatives": [alternative]}
    if ev.language:
        alternative["languages"] = [ev.language]
        channel["detected_language"] = ev.language
    return {
        "type": "Results",
        "channel_index": [ev.channel, ev.channels],
        "duration": _r(ev.duration),
        "start": _r(ev.start),
        "is_final": ev.is_final,
        "speech_final": ev.speech_final,
        "from_finalize": ev.from_finalize,
        "channel": channel,
        "metadata": {
            "request_id": request_id,
            "model_info": {"name": model_name, "version": PROTOCOL_VERSION, "arch": "whisper"},
            "model_uuid": model_name,
        },
        "earshot": {"utterance": ev.utterance, "stable_words": ev.stable_words, **ev.extra},
    }


def event_message(ev: Event, request_id: str, model_name: str) -> dict[str, Any]:
    """Serialise any session event to its JSON message."""
    if isinstance(ev, TranscriptEvent):
        return results_message(ev, request_id, model_name)
    if isinstance(ev, SpeechStartedEvent):
        return {
            "type": "SpeechStarted",
            "channel": [ev.channel, ev.channels],
            "timestamp": _r(ev.timestamp),
        }
    if isinstance(ev, UtteranceEndEvent):
        return {
            "type": "UtteranceEnd",
            "channel": [ev.channel, ev.channels],
            "last_word_end": _r(ev.last_word_end),
        }
    return {"type": "Warning", "code": ev.code, "message": ev.message, **ev.details}


def error_message(err: EarshotError) -> dict[str, Any]:
    """The ``Error`` message sent before a close (or alone, for non-fatal errors).

    Deepgram's clients read ``variant`` and ``description``; Earshot's own
    ``code`` and ``message`` carry the same facts."""
    return {"type": "Error", "variant": err.code, "description": err.message, **err.to_dict()}


def configure_failure(request_id: str) -> dict[str, Any]:
    """The answer to Deepgram's ``Configure`` message: settings are fixed at the
    start of a stream here."""
    return {
        "type": "ConfigureFailure",
        "request_id": request_id,
        "code": "CONFIGURE_NOT_SUPPORTED",
        "description": "settings cannot be changed during a stream; open a new stream",
    }


def metadata_message(
    *,
    request_id: str,
    created: str,
    params: StreamParams,
    provenance: dict[str, Any],
    policy: dict[str, Any],
    decoding: dict[str, Any],
    duration: float | None = None,
    backends: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The ``Metadata`` message: sent first, and again with the totals at the end."""
    name = str(provenance.get("name") or "unknown")
    msg: dict[str, Any] = {
        "type": "Metadata",
        "transaction_key": "deprecated",
        "request_id": request_id,
        "sha256": provenance.get("model_sha256") or "",
        "created": created,
        "duration": _r(duration) if duration is not None else 0.0,
        "channels": params.audio.channels,
        "models": [name],
        "model_info": {name: {"name": name, "version": PROTOCOL_VERSION, "arch": "whisper"}},
        "earshot": {
            "protocol_version": PROTOCOL_VERSION,
            "model": provenance,
            "policy": policy,
            "settings": params.to_dict(),
            "ignored_parameters": list(params.ignored),
            "decoding": decoding,
        },
    }
    if backends is not None:
        # The last Metadata: decodes per backend ("local", or a remote's name).
        msg["earshot"]["backends_used"] = backends
    return msg
