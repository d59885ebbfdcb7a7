"""Deepgram's live protocol at ``GET /v1/listen`` (docs/protocol.md).

The query string sets the stream up (:func:`~earshot.core.protocol.parse_params`);
binary frames are audio; text frames are the control messages ``KeepAlive``,
``Finalize``, ``CloseStream`` and ``Configure``. Results, SpeechStarted,
UtteranceEnd, Metadata, Warning and Error come back as Deepgram writes them.
Everything else is the shared :class:`~earshot.service.http.livestream.LiveStream`.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from earshot.core.errors import EarshotError, InvalidMessageError
from earshot.core.protocol import (
    Event,
    StreamParams,
    WarningEvent,
    configure_failure,
    error_message,
    event_message,
    metadata_message,
    parse_control,
    parse_params,
)
from earshot.service.engine.engine import check_model_name
from earshot.service.http.context import ENGINE
from earshot.service.http.livestream import LiveStream, open_stream

log = logging.getLogger("earshot.server")


# Deepgram tier names that are also Whisper model names: Deepgram clients send
# them, so they mean the served model like every other Deepgram name.
_DEEPGRAM_TIERS = frozenset({"base"})


class ListenStream(LiveStream):
    """One ``/v1/listen`` connection, in Deepgram's messages."""

    protocol = "deepgram"

    def _metadata(self, *, final: bool) -> dict[str, Any]:
        engine = self.engine
        return metadata_message(
            request_id=self.request_id,
            created=self.created,
            params=self.params,
            provenance=engine.client_provenance(),
            policy=engine.policy,
            decoding=engine.decoding(),
            duration=self.session.received_seconds if final else None,
            backends=dict(self.backends_used) if final else None,
        )

    def opening_messages(self) -> list[dict[str, Any]]:
        return [self._metadata(final=False)]

    def closing_messages(self) -> list[dict[str, Any]]:
        return [self._metadata(final=True)]

    def render(self, ev: Event) -> list[dict[str, Any]]:
        if isinstance(ev, WarningEvent) and not self.params.warnings:
            # Deepgram's SDKs fail on message types they do not know.
            self.log_warning(ev)
            return []
        return [event_message(ev, self.request_id, self.engine.model_name)]

    def render_error(self, err: EarshotError) -> dict[str, Any]:
        return error_message(err)

    def on_text(self, text: str) -> bool:
        try:
            kind = parse_control(text)
        except InvalidMessageError as exc:
            self.send(error_message(exc))
            return True
        if kind == "Finalize":
            self.finalize()
        elif kind == "CloseStream":
            return False
        elif kind == "Configure":
            self.send(configure_failure(self.request_id))
        return True  # KeepAlive: the receive itself reset the idle timer


async def handle_listen(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]

    def validate() -> StreamParams:
        params = parse_params(
            list(request.query.items()), default_language=engine.config.default_language
        )
        check_model_name(engine, params.model, _DEEPGRAM_TIERS)
        return params

    def make(params: StreamParams, ws: web.WebSocketResponse) -> LiveStream:
        return ListenStream(engine, ws, params, request.transport)

    return await open_stream(request, validate, make)
