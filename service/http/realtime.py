"""OpenAI Realtime transcription sessions at ``GET /v1/realtime`` (docs/protocol.md).

The websocket the ``openai`` SDK opens with ``client.realtime.connect()``
(or the beta ``client.beta.realtime.connect()``) when its ``base_url`` is
Earshot's ``/v1``. Client events are read and session settings merged by the
pure :mod:`earshot.core.realtime`; this module drives one
:class:`~earshot.service.http.livestream.LiveStream` with them (the shared
scheduler, the one model) and writes the session's events as Realtime
events. What becomes of an utterance:

* server VAD on: each utterance is an item: ``speech_started`` when it opens,
  deltas of its newly stable words, ``speech_stopped`` and ``committed`` when
  it closes, ``completed`` with its final;
* turn detection off: an item is the audio between two commits; utterances
  the endpointer closes on its own meanwhile (after 10 s of silence, or at the
  maximum length) are parts of it, and its ``completed`` joins their finals.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from earshot.core.errors import (
    EarshotError,
    InvalidParameterError,
    InvalidRequestError,
    ModelNotLocalError,
    RealtimeCommitEmptyError,
    RealtimeInvalidEventError,
    RealtimeSessionLockedError,
    RealtimeUnsupportedError,
    UnknownParameterError,
)
from earshot.core.openai_wire import error_body, error_type
from earshot.core.protocol import (
    Event,
    SpeechStartedEvent,
    StreamParams,
    TranscriptEvent,
    WarningEvent,
)
from earshot.core.realtime import (
    ClientEvent,
    DeltaTracker,
    Ids,
    SessionConfig,
    Variant,
    apply_update,
    changed_settings,
    cleared,
    committed,
    completed,
    default_config,
    delta,
    error_event,
    parse_client_event,
    session_event,
    speech_started,
    speech_stopped,
    stream_params,
    vad_overrides,
)
from earshot.core.session import StreamSession
from earshot.service.engine.engine import Engine, check_model_name
from earshot.service.http.context import ENGINE
from earshot.service.http.livestream import LiveStream, open_stream

log = logging.getLogger("earshot.server")

QUERY_PARAMETERS = ("model", "intent")
"""What the SDKs put in the URL: ``model`` (a realtime model's name, which
means the served model unless it names another Whisper model) and
``intent=transcription``."""


@dataclass
class _Item:
    """One conversation item: the utterances whose finals make its transcript."""

    id: str
    utterances: list[int] = field(default_factory=list)
    finals: dict[int, TranscriptEvent] = field(default_factory=dict)
    deltas: DeltaTracker = field(default_factory=DeltaTracker)
    sealed: bool = False

    def complete(self) -> bool:
        return self.sealed and all(u in self.finals for u in self.utterances)


@dataclass(frozen=True)
class _Opening:
    variant: Variant
    config: SessionConfig
    params: StreamParams


def session_params(engine: Engine, config: SessionConfig) -> StreamParams:
    """The stream parameters of ``config``, checked against the served model."""
    if config.language is not None and engine.backend.capabilities.refuses_language(
        config.language
    ):
        raise InvalidParameterError(
            f"language {config.language!r} is not supported by {engine.model_name!r}",
            field="session.audio.input.transcription.language",
        )
    check_model_name(engine, config.model or None, ())
    return stream_params(config)


class RealtimeStream(LiveStream):
    """One ``/v1/realtime`` connection: a transcription session."""

    protocol = "openai_realtime"

    def __init__(
        self,
        engine: Engine,
        ws: web.WebSocketResponse,
        opening: _Opening,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self.config = opening.config
        self.variant: Variant = opening.variant
        super().__init__(engine, ws, opening.params, transport)
        self.ids = Ids(uuid.uuid4().hex[:8] + "_")
        self.session_id = "sess_" + self.request_id.replace("-", "")[:24]
        self._audio_began = False
        self._uncommitted = False
        self._previous_item: str | None = None
        self._by_utterance: dict[int, _Item] = {}
        self._discarded: set[int] = set()
        self._current: _Item | None = None

    # -- settings ---------------------------------------------------------------

    @property
    def manual(self) -> bool:
        """Turn detection off: the client commits."""
        return self.config.turn_detection is None

    def _new_session(self, params: StreamParams) -> StreamSession:
        engine = self.engine
        return StreamSession(
            params,
            replace(engine.session_settings, **vad_overrides(self.config)),
            engine.vad_model,
            vad_factory=engine.vad_factory,
            clock=asyncio.get_running_loop().time,
            report_closes=True,
        )

    def _earshot(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "request_id": self.request_id,
            "model": engine.client_provenance(),
            "policy": engine.policy,
            "settings": self.params.to_dict(),
            "ignored_parameters": list(self.config.ignored),
            "decoding": engine.decoding(),
        }

    def log_fields(self) -> dict[str, Any]:
        return {**super().log_fields(), "variant": self.variant}

    # -- what the protocol says -------------------------------------------------

    def opening_messages(self) -> list[dict[str, Any]]:
        return [
            session_event(
                "created",
                self.config,
                self.variant,
                self.session_id,
                self.ids.event(),
                self._earshot(),
            )
        ]

    def closing_messages(self) -> list[dict[str, Any]]:
        # The stream ends (the server stops, or a limit): the audio since the
        # last commit is committed, so that no transcript is lost.
        self._drain()
        if self.manual and self._current is not None and self._current.utterances:
            self._seal(self._current)
        return []

    def render(self, ev: Event) -> list[dict[str, Any]]:
        self._drain()
        if isinstance(ev, SpeechStartedEvent):
            if not self.manual:
                item = self._item_of(ev.utterance)
                self.send(speech_started(self.ids.event(), item.id, ev.timestamp))
        elif isinstance(ev, TranscriptEvent):
            if ev.utterance in self._discarded:
                if ev.is_final:
                    self._discarded.discard(ev.utterance)
            elif ev.is_final:
                self._on_final(ev)
            else:
                self._on_interim(ev)
        elif isinstance(ev, WarningEvent):
            # The Realtime API has no warnings; the log has them.
            self.log_warning(ev)
        return []

    def render_error(self, err: EarshotError) -> dict[str, Any]:
        return error_event(err, self.ids.event(), error_type=error_type(err.http_status))

    def render_internal_error(self, message: str) -> dict[str, Any]:
        return {
            "type": "error",
            "event_id": self.ids.event(),
            "error": {
                "type": "server_error",
                "code": "internal_error",
                "message": message,
                "param": None,
                "event_id": None,
            },
        }

    # -- client events ----------------------------------------------------------

    def on_binary(self, data: bytes) -> None:
        self.send_error(
            RealtimeInvalidEventError(
                "binary frames are not part of the Realtime protocol: send audio as "
                "base64 in input_audio_buffer.append events",
                field="type",
            )
        )

    def on_text(self, text: str) -> bool:
        ev: ClientEvent | None = None
        try:
            ev = parse_client_event(text)
            self._handle(ev)
        except (InvalidRequestError, ModelNotLocalError) as exc:
            if ev is not None and ev.event_id is not None:
                exc.details.setdefault("event_id", ev.event_id)
            self.send_error(exc)
        return True

    def _handle(self, ev: ClientEvent) -> None:
        if ev.type in ("session.update", "transcription_session.update"):
            self._update(ev)
        elif ev.type == "input_audio_buffer.append":
            self._append(ev.audio)
        elif ev.type == "input_audio_buffer.commit":
            self._commit()
        elif ev.type == "input_audio_buffer.clear":
            self._clear()

    def _update(self, ev: ClientEvent) -> None:
        beta = ev.type == "transcription_session.update"
        new = apply_update(self.config, ev.session, beta_event=beta)
        changed = changed_settings(self.config, new)
        if changed and self._audio_began:
            what = (
                "the audio format cannot change"
                if "audio" in changed
                else f"settings ({', '.join(changed)}) cannot change"
            )
            raise RealtimeSessionLockedError(
                f"{what} after audio began; open a new session for other settings",
                field="session",
                changed=changed,
            )
        if changed:
            params = session_params(self.engine, new)
            self.config = new
            self.reconfigure(params)
        else:
            self.config = new
        self.send(
            session_event(
                "updated",
                self.config,
                "beta" if beta else "ga",
                self.session_id,
                self.ids.event(),
                {"settings": self.params.to_dict(), "ignored_parameters": list(new.ignored)},
            )
        )

    def _append(self, audio: bytes) -> None:
        if not audio:
            return
        self._audio_began = True
        self._uncommitted = True
        step = self.engine.config.max_frame_bytes
        for i in range(0, len(audio), step):
            self.push_audio(audio[i : i + step])
        self._drain()

    def _commit(self) -> None:
        if not self._uncommitted:
            raise RealtimeCommitEmptyError(
                "there is no audio to commit: none was appended since the last commit",
                field="type",
            )
        self._uncommitted = False
        if self.manual:
            self.finalize(at_end=True)
            self._drain()
            item, self._current = self._open_item, None
            self._seal(item)
            return
        before = self._previous_item
        self.finalize(at_end=True)
        self._drain()
        if self._previous_item == before:
            # No speech was open: the committed audio holds no words.
            self._seal(_Item(self.ids.item()))

    def _clear(self) -> None:
        self.discard()
        self._drain()
        if self.manual and self._current is not None:
            self._discarded.update(
                u for u in self._current.utterances if u not in self._current.finals
            )
            self._current = None
        self._uncommitted = False
        self.send(cleared(self.ids.event()))

    # -- items ------------------------------------------------------------------

    @property
    def _open_item(self) -> _Item:
        """Without turn detection, the item the audio since the last commit makes."""
        if self._current is None:
            self._current = _Item(self.ids.item())
        return self._current

    def _item_of(self, utterance: int) -> _Item:
        if self.manual:
            return self._open_item
        item = self._by_utterance.get(utterance)
        if item is None:
            item = self._by_utterance[utterance] = _Item(self.ids.item(), [utterance])
        return item

    def _drain(self) -> None:
        """Turn the utterances the session closed into commits."""
        for closed in self.session.take_closed():
            u = closed.utterance
            if closed.discarded:
                self._discarded.add(u)
                self._by_utterance.pop(u, None)
                continue
            if self.manual:
                self._open_item.utterances.append(u)
                continue
            item = self._item_of(u)
            if not closed.from_finalize:
                self.send(speech_stopped(self.ids.event(), item.id, closed.end))
            self._uncommitted = False
            self._seal(item)

    def _seal(self, item: _Item) -> None:
        item.sealed = True
        self.send(committed(self.ids.event(), item.id, self._previous_item))
        self._previous_item = item.id
        self._maybe_complete(item)

    def _on_interim(self, ev: TranscriptEvent) -> None:
        item = self._item_of(ev.utterance)
        if item.sealed:
            return
        words = [w.punctuated_word for w in ev.words] or ev.transcript.split()
        text = item.deltas.update(ev.utterance, words, ev.stable_words)
        if text:
            self.send(delta(self.ids.event(), item.id, text))

    def _on_final(self, ev: TranscriptEvent) -> None:
        if self.manual:
            items = [*self._by_utterance.values(), *([self._current] if self._current else [])]
            found = next((i for i in items if ev.utterance in i.utterances), None)
            item = found or self._open_item
            if ev.utterance not in item.utterances:
                item.utterances.append(ev.utterance)
        else:
            item = self._item_of(ev.utterance)
        item.finals[ev.utterance] = ev
        self._maybe_complete(item)

    def _maybe_complete(self, item: _Item) -> None:
        if not item.complete():
            if self.manual and item.sealed:
                for u in item.utterances:
                    self._by_utterance[u] = item
            return
        for u in item.utterances:
            self._by_utterance.pop(u, None)
        finals = [item.finals[u] for u in item.utterances]
        transcript = " ".join(f.transcript for f in finals if f.transcript)
        earshot = {
            "utterances": [
                {
                    "utterance": f.utterance,
                    "start": round(f.start, 3),
                    "duration": round(f.duration, 3),
                    "transcript": f.transcript,
                    "language": f.language,
                    "speech_final": f.speech_final,
                    "provenance": f.extra.get("provenance"),
                }
                for f in finals
            ],
            "deltas": item.deltas.text,
        }
        self.send(
            completed(
                self.ids.event(),
                item.id,
                transcript,
                sum(f.duration for f in finals),
                earshot,
            )
        )


def _write_error(err: EarshotError, headers: dict[str, str] | None) -> web.StreamResponse:
    return web.json_response(error_body(err), status=err.http_status, headers=headers)


async def handle_realtime(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]

    def validate() -> _Opening:
        for key in request.query:
            if key == "call_id":
                raise RealtimeUnsupportedError(
                    "call_id (joining a SIP or WebRTC call) is not supported here",
                    field="call_id",
                )
            if key not in QUERY_PARAMETERS:
                raise UnknownParameterError(
                    f"unknown query parameter {key!r}; /v1/realtime takes "
                    f"{', '.join(QUERY_PARAMETERS)}",
                    field=key,
                )
        intent = request.query.get("intent")
        if intent is not None and intent != "transcription":
            raise InvalidParameterError(
                f"intent must be 'transcription', not {intent!r}", field="intent"
            )
        check_model_name(engine, request.query.get("model") or None, ())
        beta = "realtime=v1" in request.headers.get("OpenAI-Beta", "").replace(" ", "")
        settings = engine.session_settings
        config = default_config(
            engine.model_name,
            threshold=settings.vad_threshold,
            prefix_padding_ms=settings.speech_pad_ms,
        )
        return _Opening("beta" if beta else "ga", config, session_params(engine, config))

    def make(opening: _Opening, ws: web.WebSocketResponse) -> LiveStream:
        return RealtimeStream(engine, ws, opening, request.transport)

    return await open_stream(request, validate, make, write_error=_write_error)


def register_realtime_routes(app: web.Application) -> None:
    """Add the realtime endpoints to ``app``."""
    app.router.add_get("/v1/realtime", handle_realtime)
