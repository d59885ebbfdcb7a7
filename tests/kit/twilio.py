"""A simulated Twilio Media Streams client and a call's subscriber, for tests.

:class:`TwilioCall` writes the messages Twilio sends for a call whose tracks
are µ-law byte strings (``connected``, ``start``, a ``media`` per track every
20 ms, ``stop``), written here from Twilio's documentation, independently of
the server's reader. :func:`play` sends them on a websocket, paced in real
time or not; :func:`follow` reads a subscriber's messages until it closes.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType

from tests.kit.tones import g711_encode

CHUNK = 160
"""Bytes of one 20 ms chunk of one track (8 kHz µ-law)."""


def mulaw_tracks(*tracks: np.ndarray) -> list[bytes]:
    """Float 8 kHz tracks as µ-law, padded with silence to the same length."""
    n = max(len(t) for t in tracks)
    return [g711_encode(np.pad(t, (0, n - len(t)))) for t in tracks]


@dataclass
class TwilioCall:
    """The messages of one call, as Twilio sends them."""

    tracks: dict[str, bytes]
    call_sid: str = "CA0123456789abcdef0123456789abcdef"
    stream_sid: str = "MZ0123456789abcdef0123456789abcdef"
    account_sid: str = "AC0123456789abcdef0123456789abcdef"
    parameters: dict[str, str] = field(default_factory=dict)
    _seq: int = 0

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

    def connected(self) -> str:
        return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self, **overrides: Any) -> str:
        start: dict[str, Any] = {
            "accountSid": self.account_sid,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "tracks": list(self.tracks),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": dict(self.parameters),
        }
        start.update(overrides)
        return json.dumps(
            {
                "event": "start",
                "sequenceNumber": self._next(),
                "start": start,
                "streamSid": self.stream_sid,
            }
        )

    def media(self, track: str, index: int, payload: bytes | None = None) -> str:
        """Chunk ``index`` (from 0) of ``track``; ``payload`` replaces its bytes."""
        data = (
            self.tracks[track][index * CHUNK : (index + 1) * CHUNK] if payload is None else payload
        )
        return self.raw_media(track, index, base64.b64encode(data).decode())

    def raw_media(self, track: str, index: int, payload: str) -> str:
        return json.dumps(
            {
                "event": "media",
                "sequenceNumber": self._next(),
                "media": {
                    "track": track,
                    "chunk": str(index + 1),
                    "timestamp": str(index * 20),
                    "payload": payload,
                },
                "streamSid": self.stream_sid,
            }
        )

    def stop(self) -> str:
        return json.dumps(
            {
                "event": "stop",
                "sequenceNumber": self._next(),
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                "streamSid": self.stream_sid,
            }
        )

    @property
    def chunks(self) -> int:
        return max(-(-len(t) // CHUNK) for t in self.tracks.values())

    def ticks(self, first: int = 0, last: int | None = None) -> list[list[str]]:
        """The media of every 20 ms tick from ``first`` to ``last``: one chunk per track."""
        end = self.chunks if last is None else last
        return [[self.media(t, i) for t in self.tracks] for i in range(first, end)]


async def play(
    ws: ClientWebSocketResponse[Any], ticks: Sequence[Sequence[str]], *, realtime: bool = True
) -> None:
    """Send each tick's messages, a tick every 20 ms when ``realtime``."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i, tick in enumerate(ticks):
        for message in tick:
            await ws.send_str(message)
        if realtime:
            await asyncio.sleep(max(0.0, t0 + 0.02 * (i + 1) - loop.time()))
        elif i % 25 == 0:
            await asyncio.sleep(0)


async def read_all(ws: ClientWebSocketResponse[Any]) -> list[dict[str, Any]]:
    """Every JSON message until the websocket closes."""
    out = []
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            out.append(json.loads(msg.data))
    return out


@dataclass
class Followed:
    messages: list[dict[str, Any]]
    close_code: int | None

    def finals(self) -> list[tuple[int, str, str]]:
        """(channel, track, transcript) of each non-empty final, in order."""
        return [
            (
                m["channel_index"][0],
                m["earshot"]["track"],
                m["channel"]["alternatives"][0]["transcript"],
            )
            for m in self.messages
            if m["type"] == "Results"
            and m["is_final"]
            and m["channel"]["alternatives"][0]["transcript"]
        ]

    def texts(self, channel: int) -> list[str]:
        return [text for ch, _, text in self.finals() if ch == channel]

    def codes(self, kind: str) -> list[str]:
        return [m["code"] for m in self.messages if m["type"] == kind]


async def follow(http: ClientSession, url: str, **kwargs: Any) -> Followed:
    """Subscribe to ``url`` (``.../v1/calls/SID/events``) and read until it closes."""
    async with http.ws_connect(url, **kwargs) as ws:
        messages = await read_all(ws)
        return Followed(messages, ws.close_code)
