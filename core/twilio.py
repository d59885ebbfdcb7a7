"""Twilio Media Streams, the pure part (docs/protocol.md, "Twilio Media Streams").

Twilio's ``<Stream>`` sends JSON text frames: ``connected``, ``start`` (the
call's ids, its tracks, the media format and the ``<Parameter>`` values),
``media`` (one 20 ms chunk of one track: base64 µ-law at 8 kHz, with the
track's chunk number and its timestamp in ms since the stream started),
``mark``, ``dtmf`` and ``stop``. This module reads them
(:func:`parse_message`), puts the tracks side by side as the channels of one
stream (:class:`TrackInterleaver`), signs URLs as Twilio does
(:func:`twilio_signature`), and says which parameters a subscriber may see
(:func:`public_parameters`). No I/O: the handler is
``earshot.service.http.twilio``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from earshot.core.errors import (
    TwilioMediaError,
    TwilioMediaFormatError,
    TwilioMessageError,
)

TRACKS: tuple[str, ...] = ("inbound", "outbound")
"""Twilio's track names, in channel order: inbound (what the caller says) is
channel 0, outbound (what the call's other side says) channel 1."""

SAMPLE_RATE = 8000
ENCODING = "audio/x-mulaw"
MULAW_SILENCE = 0xFF
"""µ-law's code for 0 (the positive zero): what fills a track's gaps."""

SAMPLES_PER_MS = SAMPLE_RATE // 1000

KNOWN_EVENTS = frozenset({"connected", "start", "media", "mark", "dtmf", "stop"})

# <Parameter> names never repeated to subscribers: the stream's credentials and
# its webhook (a URL may hold a secret), and anything named like a secret.
SECRET_PARAMETERS = frozenset({"token", "earshot_webhook"})
_SECRET_WORDS = ("token", "secret", "password", "passwd", "key", "auth", "credential")


# -- messages -----------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    """In channel order (:data:`TRACKS`), whatever order ``start`` gave."""
    custom_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Media:
    track: str
    chunk: int | None
    timestamp_ms: int | None
    payload: bytes


@dataclass(frozen=True)
class Mark:
    name: str


@dataclass(frozen=True)
class Dtmf:
    track: str
    digit: str


@dataclass(frozen=True)
class Stop:
    call_sid: str


@dataclass(frozen=True)
class Unknown:
    """An event this module does not know (Twilio may add some): ignored."""

    event: str


Message = Connected | Start | Media | Mark | Dtmf | Stop | Unknown


def _bad(message: str, **details: Any) -> TwilioMessageError:
    return TwilioMessageError(message, **details)


def _object(data: Mapping[str, Any], name: str, event: str) -> Mapping[str, Any]:
    value = data.get(name)
    if not isinstance(value, Mapping):
        raise _bad(f"a {event!r} message must have an object {name!r}", event=event, field=name)
    return value


def _string(data: Mapping[str, Any], name: str, event: str, *, required: bool = True) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise _bad(
            f"a {event!r} message must have a non-empty string {name!r}",
            event=event,
            field=name,
        )
    return value


def _number(data: Mapping[str, Any], name: str, event: str) -> int | None:
    """An optional non-negative integer that Twilio sends as a decimal string."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        value = None
    elif isinstance(value, int):
        pass
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    else:
        value = None
    if value is None or value < 0:
        raise _bad(
            f"{event}.{name} must be a non-negative integer (as a decimal string), "
            f"not {data.get(name)!r}",
            event=event,
            field=name,
        )
    return int(value)


def _parse_start(data: Mapping[str, Any]) -> Start:
    start = _object(data, "start", "start")
    stream_sid = _string(start, "streamSid", "start", required=False) or _string(
        data, "streamSid", "start"
    )
    call_sid = _string(start, "callSid", "start")
    account_sid = _string(start, "accountSid", "start", required=False)
    raw_tracks = start.get("tracks", ["inbound"])
    if (
        not isinstance(raw_tracks, list)
        or not raw_tracks
        or not all(isinstance(t, str) for t in raw_tracks)
        or len(set(raw_tracks)) != len(raw_tracks)
        or not set(raw_tracks) <= set(TRACKS)
    ):
        raise TwilioMediaFormatError(
            f"start.tracks must list 'inbound' and/or 'outbound' once each, not {raw_tracks!r}",
            field="tracks",
            value=raw_tracks if isinstance(raw_tracks, list) else str(raw_tracks),
            allowed=list(TRACKS),
        )
    fmt = _object(start, "mediaFormat", "start")
    encoding, rate, channels = fmt.get("encoding"), fmt.get("sampleRate"), fmt.get("channels", 1)
    if encoding != ENCODING or rate != SAMPLE_RATE or channels != 1:
        raise TwilioMediaFormatError(
            f"start.mediaFormat must be {ENCODING} at {SAMPLE_RATE} Hz, 1 channel per "
            f"track, not {encoding!r} at {rate!r} Hz, {channels!r} channels",
            field="mediaFormat",
            value={"encoding": encoding, "sampleRate": rate, "channels": channels},
        )
    params = start.get("customParameters") or {}
    if not isinstance(params, Mapping):
        raise _bad(
            "start.customParameters must be an object", event="start", field="customParameters"
        )
    custom = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
    tracks = tuple(t for t in TRACKS if t in raw_tracks)
    return Start(stream_sid, call_sid, account_sid, tracks, custom)


def _parse_media(data: Mapping[str, Any]) -> Media:
    media = _object(data, "media", "media")
    track = _string(media, "track", "media", required=False) or "inbound"
    raw = media.get("payload")
    if not isinstance(raw, str):
        raise TwilioMediaError(
            "media.payload must be a string of base64 µ-law", field="payload", track=track
        )
    try:
        payload = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise TwilioMediaError(
            f"media.payload of track {track!r} is not valid base64 ({len(raw)} characters); "
            "the chunk is dropped and its span is silence",
            field="payload",
            track=track,
        ) from None
    return Media(
        track, _number(media, "chunk", "media"), _number(media, "timestamp", "media"), payload
    )


def parse_message(text: str) -> Message:
    """One text frame of Twilio's. Raises :class:`TwilioMessageError` (or a
    subclass) naming the field when it is not JSON or a known event lacks
    what it must have; an unknown event is returned as :class:`Unknown`."""
    try:
        data = json.loads(text)
    except ValueError:
        raise _bad(f"a Twilio message must be a JSON object, not {text[:40]!r}") from None
    if not isinstance(data, dict):
        raise _bad("a Twilio message must be a JSON object with an 'event'")
    event = data.get("event")
    if not isinstance(event, str) or not event:
        raise _bad("a Twilio message must have a string 'event'", field="event")
    if event == "connected":
        return Connected(str(data.get("protocol", "")), str(data.get("version", "")))
    if event == "start":
        return _parse_start(data)
    if event == "media":
        return _parse_media(data)
    if event == "mark":
        return Mark(_string(_object(data, "mark", "mark"), "name", "mark", required=False))
    if event == "dtmf":
        dtmf = _object(data, "dtmf", "dtmf")
        return Dtmf(_string(dtmf, "track", "dtmf", required=False), _string(dtmf, "digit", "dtmf"))
    if event == "stop":
        stop = data.get("stop")
        call_sid = stop.get("callSid", "") if isinstance(stop, Mapping) else ""
        return Stop(call_sid if isinstance(call_sid, str) else "")
    return Unknown(event[:64])


def public_parameters(params: Mapping[str, str]) -> dict[str, str]:
    """``customParameters`` without the credentials, the webhook and anything
    whose name says it is a secret: what a subscriber is shown."""
    out = {}
    for name, value in params.items():
        lowered = name.lower()
        if lowered in SECRET_PARAMETERS or any(w in lowered for w in _SECRET_WORDS):
            continue
        out[name] = value
    return out


# -- signatures -------------------------------------------------------------------


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """What Twilio puts in ``X-Twilio-Signature``: base64 of HMAC-SHA1, keyed
    with the account's auth token, over the full URL followed by each POST
    parameter's name and value in name order (a websocket upgrade has none)."""
    fields = params or {}
    message = url + "".join(k + fields[k] for k in sorted(fields))
    digest = hmac.new(auth_token.encode("utf-8"), message.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_matches(auth_token: str, signature: str, urls: Sequence[str]) -> bool:
    """Whether ``signature`` signs one of ``urls`` (the URL Twilio was given
    may differ from the one the server sees behind a proxy); compared in
    constant time, every candidate checked."""
    given = signature.strip().encode("ascii", "replace")
    found = False
    for url in urls:
        found |= hmac.compare_digest(given, twilio_signature(auth_token, url).encode("ascii"))
    return found


# -- the interleaver --------------------------------------------------------------


class TrackInterleaver:
    """Puts the tracks of one call side by side: interleaved µ-law frames,
    one byte per track per sample, in :data:`TRACKS` order.

    Each track's bytes go where its timestamp says (ms since the stream
    started, 8 samples a ms); a chunk that starts within ``snap_samples`` of
    where the track's previous chunk ended follows it directly (timestamps are
    whole ms and may jitter). A gap in a track is µ-law silence; a chunk that
    lands on buffered silence replaces it; the part of a chunk before what
    was already emitted is dropped. Frames are emitted once every track has
    covered them, or once one track is ``max_wait_samples`` ahead of another
    (the other is then padded with silence): a track that goes quiet (the
    agent on hold) or never sends delays the rest by at most that much.
    Each track's gap is at most ``max_gap_samples``: a timestamp further
    ahead moves that track's clock back (nothing allocates more than that).
    """

    def __init__(
        self,
        tracks: Sequence[str],
        *,
        max_wait_samples: int = 200 * SAMPLES_PER_MS,
        snap_samples: int = 2 * SAMPLES_PER_MS,
        max_gap_samples: int = 10_000 * SAMPLES_PER_MS,
    ) -> None:
        if not tracks or len(set(tracks)) != len(tracks):
            raise ValueError(f"tracks must be distinct and not empty, got {tracks!r}")
        self.tracks = tuple(tracks)
        self.max_wait = max_wait_samples
        self.snap = snap_samples
        self.max_gap = max_gap_samples
        self.emitted = 0
        """Samples per track emitted so far (the stream's clock, in samples)."""
        self._pending = {t: bytearray() for t in self.tracks}
        self._shift = dict.fromkeys(self.tracks, 0)
        self.dropped_samples = 0
        """Samples that arrived after their span had been emitted."""

    def push(self, track: str, timestamp_ms: int | None, payload: bytes) -> bytes:
        """Place one chunk; the interleaved frames now due (maybe none).
        ``timestamp_ms`` None: the chunk follows the track's previous one.
        Raises KeyError for a track not given to the constructor."""
        pending = self._pending[track]
        end = len(pending)
        rel = (
            end
            if timestamp_ms is None
            else timestamp_ms * SAMPLES_PER_MS - self._shift[track] - self.emitted
        )
        if abs(rel - end) <= self.snap:
            rel = end
        elif rel - end > self.max_gap:
            self._shift[track] += rel - end - self.max_gap
            rel = end + self.max_gap
        data = memoryview(payload)
        if rel < 0:
            self.dropped_samples += min(-rel, len(data))
            data = data[-rel:]
            rel = 0
        if not data:
            return self._due()
        if rel > end:
            pending.extend(bytes([MULAW_SILENCE]) * (rel - end))
        pending[rel : rel + len(data)] = data
        return self._due()

    def flush(self) -> bytes:
        """Everything buffered, the shorter tracks padded with silence (at the
        end of the stream)."""
        return self._emit(max(len(p) for p in self._pending.values()))

    @property
    def buffered_samples(self) -> int:
        """Samples held for the track furthest ahead."""
        return max(len(p) for p in self._pending.values())

    def _due(self) -> bytes:
        lengths = [len(p) for p in self._pending.values()]
        return self._emit(max(min(lengths), max(lengths) - self.max_wait))

    def _emit(self, n: int) -> bytes:
        if n <= 0:
            return b""
        columns = []
        for track in self.tracks:
            pending = self._pending[track]
            column = bytes(pending[:n])
            if len(column) < n:
                column += bytes([MULAW_SILENCE]) * (n - len(column))
            del pending[:n]
            columns.append(column)
        self.emitted += n
        if len(columns) == 1:
            return columns[0]
        out = bytearray(n * len(columns))
        for i, column in enumerate(columns):
            out[i :: len(columns)] = column
        return bytes(out)
