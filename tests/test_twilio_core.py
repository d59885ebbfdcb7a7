"""The pure part of Twilio Media Streams (core/twilio.py): messages, the
track interleaver, signatures and what subscribers may see. No loop, no sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest

from earshot.core.errors import (
    TwilioMediaError,
    TwilioMediaFormatError,
    TwilioMessageError,
)
from earshot.core.twilio import (
    MULAW_SILENCE,
    Connected,
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
    twilio_signature,
)

S = MULAW_SILENCE


def start_message(**overrides: Any) -> dict[str, Any]:
    start: dict[str, Any] = {
        "accountSid": "AC123",
        "streamSid": "MZ123",
        "callSid": "CA123",
        "tracks": ["inbound", "outbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"token": "secret", "agent": "7"},
    }
    start.update(overrides)
    return {"event": "start", "sequenceNumber": "1", "streamSid": "MZ123", "start": start}


def media_message(track: str, payload: bytes | str, chunk: int = 1, ts: int = 0) -> str:
    text = payload if isinstance(payload, str) else base64.b64encode(payload).decode()
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": "3",
            "streamSid": "MZ123",
            "media": {"track": track, "chunk": str(chunk), "timestamp": str(ts), "payload": text},
        }
    )


# -- messages -------------------------------------------------------------------


def test_every_known_event_parses() -> None:
    assert parse_message('{"event": "connected", "protocol": "Call", "version": "1.0.0"}') == (
        Connected("Call", "1.0.0")
    )
    start = parse_message(json.dumps(start_message(tracks=["outbound", "inbound"])))
    assert start == Start(
        "MZ123", "CA123", "AC123", ("inbound", "outbound"), {"token": "secret", "agent": "7"}
    )
    assert parse_message(media_message("outbound", b"\x01\x02", chunk=4, ts=60)) == Media(
        "outbound", 4, 60, b"\x01\x02"
    )
    assert parse_message('{"event": "mark", "mark": {"name": "m1"}}') == Mark("m1")
    assert parse_message(
        '{"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "5"}}'
    ) == Dtmf("inbound_track", "5")
    assert parse_message(
        '{"event": "stop", "stop": {"accountSid": "AC1", "callSid": "CA123"}}'
    ) == Stop("CA123")
    assert parse_message('{"event": "something_new", "x": 1}') == Unknown("something_new")


@pytest.mark.parametrize(
    ("text", "error", "field"),
    [
        ("not json", TwilioMessageError, None),
        ("[1, 2]", TwilioMessageError, None),
        ('{"no_event": 1}', TwilioMessageError, "event"),
        ('{"event": "media"}', TwilioMessageError, "media"),
        ('{"event": "media", "media": {"track": "inbound"}}', TwilioMediaError, "payload"),
        (media_message("inbound", "@@not base64@@"), TwilioMediaError, "payload"),
        (media_message("inbound", "AAE"), TwilioMediaError, "payload"),  # bad padding
        (
            json.dumps(
                {"event": "media", "media": {"track": "inbound", "payload": "", "timestamp": "x"}}
            ),
            TwilioMessageError,
            "timestamp",
        ),
        ('{"event": "start"}', TwilioMessageError, "start"),
        (json.dumps(start_message(callSid="")), TwilioMessageError, "callSid"),
        (json.dumps(start_message(tracks=["both"])), TwilioMediaFormatError, "tracks"),
        (json.dumps(start_message(tracks=[])), TwilioMediaFormatError, "tracks"),
        (
            json.dumps(start_message(tracks=["inbound", "inbound"])),
            TwilioMediaFormatError,
            "tracks",
        ),
        (
            json.dumps(start_message(mediaFormat={"encoding": "audio/l16", "sampleRate": 8000})),
            TwilioMediaFormatError,
            "mediaFormat",
        ),
        (
            json.dumps(
                start_message(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": 16000})
            ),
            TwilioMediaFormatError,
            "mediaFormat",
        ),
        ('{"event": "dtmf", "dtmf": {}}', TwilioMessageError, "digit"),
    ],
)
def test_malformed_messages_name_what_is_wrong(
    text: str, error: type[TwilioMessageError], field: str | None
) -> None:
    with pytest.raises(TwilioMessageError) as info:
        parse_message(text)
    assert type(info.value) is error
    assert info.value.details.get("field") == field
    assert info.value.code.startswith("twilio_")


def test_subscribers_do_not_see_secrets() -> None:
    params = {
        "token": "k",
        "earshot_webhook": "https://hooks/secret",
        "api_key": "x",
        "Password": "y",
        "agent": "7",
        "queue": "sales",
    }
    assert public_parameters(params) == {"agent": "7", "queue": "sales"}


# -- signatures -------------------------------------------------------------------


def test_signature_is_hmac_sha1_of_the_url_in_base64() -> None:
    # Computed here from the definition, independently of the module.
    token, url = "12345", "wss://asr.example.com/v1/twilio"
    expected = base64.b64encode(
        hmac.new(b"12345", b"wss://asr.example.com/v1/twilio", hashlib.sha1).digest()
    ).decode()
    assert twilio_signature(token, url) == expected
    # With POST parameters: the URL, then each name and value in name order.
    params = {"To": "+1", "CallSid": "CA1", "Digits": "5"}
    signed = b"https://a/b" + b"CallSidCA1" + b"Digits5" + b"To+1"
    assert (
        twilio_signature(token, "https://a/b", params)
        == base64.b64encode(hmac.new(b"12345", signed, hashlib.sha1).digest()).decode()
    )
    assert signature_matches(token, expected, ["ws://other/v1/twilio", url])
    assert not signature_matches(token, expected, ["wss://asr.example.com/v1/twilio?x=1"])
    assert not signature_matches("other", expected, [url])
    assert not signature_matches(token, "", [url])


# -- the interleaver ----------------------------------------------------------------


def frames(data: bytes, channels: int = 2) -> list[tuple[int, ...]]:
    return [tuple(data[i : i + channels]) for i in range(0, len(data), channels)]


def test_two_tracks_are_interleaved_in_channel_order() -> None:
    il = TrackInterleaver(("inbound", "outbound"))
    assert il.push("outbound", 0, bytes([10, 11, 12, 13])) == b""  # waits for inbound
    out = il.push("inbound", 0, bytes([1, 2, 3, 4, 5, 6]))
    assert frames(out) == [(1, 10), (2, 11), (3, 12), (4, 13)]
    assert frames(il.flush()) == [(5, S), (6, S)]
    assert il.emitted == 6


def test_timestamps_place_chunks_and_gaps_are_silence() -> None:
    il = TrackInterleaver(("inbound",))
    assert il.push("inbound", 0, bytes(range(1, 9))) == bytes(range(1, 9))  # 1 ms
    # 4 ms: the track ended at 1 ms, so 3 ms of silence in between.
    assert il.push("inbound", 4, bytes([9] * 8)) == bytes([S] * 24 + [9] * 8)
    # Whole ms with jitter: a chunk within 2 ms of the track's end follows it.
    assert il.push("inbound", 6, bytes([7] * 8)) == bytes([7] * 8)
    assert il.push("inbound", 5, bytes([6] * 8)) == bytes([6] * 8)
    assert il.emitted == 56


def test_a_late_chunk_fills_buffered_silence_and_what_was_emitted_is_dropped() -> None:
    il = TrackInterleaver(("inbound", "outbound"), snap_samples=0)
    assert il.push("outbound", 1, bytes([2] * 8)) == b""  # ms 0 of outbound missing
    assert il.push("outbound", 0, bytes([3] * 8)) == b""  # arrives late: fills it
    out = frames(il.push("inbound", 0, bytes([1] * 16)))
    assert out == [(1, 3)] * 8 + [(1, 2)] * 8
    # A chunk for a span already emitted is dropped (and counted).
    assert il.push("outbound", 0, bytes([4] * 8)) == b""
    assert il.dropped_samples == 8


def test_a_quiet_track_delays_the_other_by_at_most_max_wait() -> None:
    il = TrackInterleaver(("inbound", "outbound"), max_wait_samples=1600)
    emitted = 0
    for i in range(50):  # 1 s of inbound in 20 ms chunks; outbound on hold
        emitted += len(il.push("inbound", 20 * i, bytes([5] * 160))) // 2
        assert (i + 1) * 160 - emitted <= 1600
    assert emitted == 50 * 160 - 1600
    assert il.buffered_samples == 1600
    out = frames(il.flush())
    assert all(f == (5, S) for f in out)
    # The outbound track comes back: what it missed stays silence, it goes on.
    il.push("inbound", 1000, bytes([6] * 160))
    out = il.push("outbound", 1000, bytes([7] * 160))
    assert frames(out) == [(6, 7)] * 160


def test_a_timestamp_far_ahead_fills_at_most_max_gap() -> None:
    il = TrackInterleaver(("inbound",), max_gap_samples=80)
    out = il.push("inbound", 10**12, bytes([1] * 8))
    assert out == bytes([S] * 80 + [1] * 8)
    # The track's clock moved: the next chunk follows on.
    assert il.push("inbound", 10**12 + 1, bytes([2] * 8)) == bytes([2] * 8)


def test_unknown_tracks_and_bad_construction() -> None:
    il = TrackInterleaver(("inbound",))
    with pytest.raises(KeyError):
        il.push("outbound", 0, b"\x00")
    with pytest.raises(ValueError):
        TrackInterleaver(())
    with pytest.raises(ValueError):
        TrackInterleaver(("inbound", "inbound"))
