"""The streaming client library (clients/stream.py) and ``earshot stream`` (clients/stream_cli.py).

Encoders are checked against the server's own decoder (earshot.core.audio), so
client and server cannot disagree on a format. Network tests talk to a small
aiohttp websocket server defined here (Metadata, Results, close 1000, plus
refusals and an error close), run in a thread on 127.0.0.1 so that both the
async API and the CLI (which runs its own event loop) can use it. Every test
runs its own loop with ``asyncio.run`` under a time bound; no plugin needed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from aiohttp import WSMsgType, web

from earshot.clients.audio import BYTES_PER_SAMPLE, encode_audio
from earshot.clients.stream import (
    StreamClient,
    StreamClosedError,
    StreamConnectError,
    StreamRefusedError,
    channel_of,
    is_final,
    stream_file,
    transcribe_stream,
    transcript_of,
)
from earshot.clients.stream_cli import _Display, add_stream_parser, cmd_stream
from earshot.core.audio import ALAW_TABLE, ENCODINGS, MULAW_TABLE, AudioFormat, FrameDecoder

T = TypeVar("T")
F32 = npt.NDArray[np.float32]


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run ``coro`` on a fresh loop, failing after ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> F32:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def speechlike(seconds: float, rate: int, seed: int = 0) -> F32:
    """Noise under a slow loudness envelope: a wide range of levels, like speech."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    envelope = 0.02 + 0.6 * np.abs(np.sin(np.linspace(0, 6 * np.pi, n)))
    return (rng.standard_normal(n) * 0.3 * envelope).clip(-1, 1).astype(np.float32)


def decode(data: bytes, encoding: str, channels: int = 1) -> F32:
    """Decode with the server's decoder: shape (channels, n)."""
    decoder = FrameDecoder(AudioFormat.parse(encoding, 16000, channels))
    out = decoder.decode(data)
    decoder.finish()
    return np.ascontiguousarray(out)


def snr_db(reference: F32, decoded: F32) -> float:
    noise = reference.astype(np.float64) - decoded.astype(np.float64)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum(noise**2)))


# ---------------------------------------------------------------------------
# Encoders


def test_client_knows_exactly_the_server_encodings() -> None:
    assert set(BYTES_PER_SAMPLE) == set(ENCODINGS)
    for name, size in BYTES_PER_SAMPLE.items():
        assert AudioFormat.parse(name, 16000, 1).bytes_per_sample == size


@pytest.mark.parametrize(("encoding", "table"), [("mulaw", MULAW_TABLE), ("alaw", ALAW_TABLE)])
def test_g711_every_code_round_trips(encoding: str, table: F32) -> None:
    # Each code's decoded value encodes back to the same code; µ-law's
    # "negative zero" (0x7F) decodes to 0 and comes back as positive zero.
    codes = np.frombuffer(encode_audio(table, encoding), dtype=np.uint8)
    expected = np.arange(256, dtype=np.uint8)
    if encoding == "mulaw":
        expected[0x7F] = 0xFF
    np.testing.assert_array_equal(codes, expected)


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
@pytest.mark.parametrize("signal", ["tone", "speechlike"])
def test_g711_round_trip_snr_above_30_db(encoding: str, signal: str) -> None:
    x = tone(1.0, 8000) if signal == "tone" else speechlike(1.0, 8000)
    data = encode_audio(x, encoding)
    assert len(data) == len(x)
    y = decode(data, encoding)[0]
    assert snr_db(x, y) > 30.0


def test_g711_is_monotonic_and_saturates() -> None:
    x = np.linspace(-1.0, 1.0, 20001)
    for encoding, table in (("mulaw", MULAW_TABLE), ("alaw", ALAW_TABLE)):
        y = table[np.frombuffer(encode_audio(x, encoding), dtype=np.uint8)]
        assert np.all(np.diff(y) >= 0), encoding
        assert y[0] == table.min() and y[-1] == table.max()


def test_linear16_is_exact_on_its_grid() -> None:
    x = (np.arange(-32768, 32768, dtype=np.float64) / 32768).astype(np.float32)
    data = encode_audio(x, "linear16")
    assert len(data) == 2 * len(x)
    np.testing.assert_array_equal(np.frombuffer(data, "<i2"), np.arange(-32768, 32768))
    np.testing.assert_array_equal(decode(data, "linear16")[0], x)


def test_linear16_rounds_and_clips() -> None:
    data = encode_audio(np.array([1.0, 2.0, -1.0, -3.0, 0.4 / 32768, 0.6 / 32768]), "linear16")
    assert np.frombuffer(data, "<i2").tolist() == [32767, 32767, -32768, -32768, 0, 1]


def test_linear32_is_float_and_exact() -> None:
    x = speechlike(0.5, 16000, seed=3)
    data = encode_audio(x, "linear32")
    np.testing.assert_array_equal(np.frombuffer(data, "<f4"), x)
    np.testing.assert_array_equal(decode(data, "linear32")[0], x)
    assert encode_audio(x, "float") == data == encode_audio(x, "FLOAT32")


def test_linear32_sanitises_nan_and_range() -> None:
    data = encode_audio(np.array([np.nan, 2.0, -np.inf, 0.25]), "linear32")
    assert np.frombuffer(data, "<f4").tolist() == [0.0, 1.0, -1.0, 0.25]


def test_int32_round_trip() -> None:
    x = speechlike(0.5, 16000, seed=4)
    data = encode_audio(x, "int32")
    assert len(data) == 4 * len(x)
    np.testing.assert_allclose(decode(data, "int32")[0], x, rtol=0, atol=2e-7)
    extremes = np.frombuffer(encode_audio(np.array([1.0, -1.0, 0.0]), "int32"), "<i4")
    assert extremes.tolist() == [2**31 - 1, -(2**31), 0]


@pytest.mark.parametrize("encoding", sorted(BYTES_PER_SAMPLE))
def test_channels_are_interleaved(encoding: str) -> None:
    left = tone(0.1, 16000, 300.0)
    right = tone(0.1, 16000, 900.0, amp=0.25)
    data = encode_audio(np.stack([left, right], axis=1), encoding)
    assert len(data) == 2 * len(left) * BYTES_PER_SAMPLE[encoding]
    both = decode(data, encoding, channels=2)
    for channel, reference in enumerate((left, right)):
        mono = decode(encode_audio(reference, encoding), encoding)[0]
        np.testing.assert_array_equal(both[channel], mono)


def test_encode_audio_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="unsupported encoding"):
        encode_audio(np.zeros(4), "opus")
    with pytest.raises(ValueError, match="shape"):
        encode_audio(np.zeros((2, 2, 2)), "linear16")


# ---------------------------------------------------------------------------
# URL and options


def query_of(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def test_query_string_carries_the_options() -> None:
    client = StreamClient(
        "ws://127.0.0.1:1/v1/listen?model=base",
        encoding="mulaw",
        sample_rate=8000,
        channels=2,
        multichannel=True,
        language="de",
        interim_results=False,
        endpointing=False,
        utterance_end_ms=1500,
        vad_events=True,
        keyterms=["Earshot", "on prem"],
        extra_params={"punctuate": True, "tag": "x"},
    )
    q = query_of(client.url)
    assert q[0] == ("model", "base")
    assert dict(q) | {"keyterm": None} == {
        "model": "base",
        "encoding": "mulaw",
        "sample_rate": "8000",
        "channels": "2",
        "multichannel": "true",
        "language": "de",
        "interim_results": "false",
        "endpointing": "false",
        "utterance_end_ms": "1500",
        "vad_events": "true",
        "keyterm": None,
        "warnings": "true",
        "punctuate": "true",
        "tag": "x",
    }
    assert [v for k, v in q if k == "keyterm"] == ["Earshot", "on prem"]
    assert client.bytes_per_second == 2 * 8000


def test_defaults_leave_server_defaults_alone() -> None:
    q = dict(query_of(StreamClient("ws://h/v1/listen", encoding="float").url))
    assert q == {
        "encoding": "linear32",
        "sample_rate": "16000",
        "channels": "1",
        "interim_results": "true",
        "warnings": "true",
    }
    q = dict(query_of(StreamClient("ws://h/v1/listen", endpointing=300, warnings=False).url))
    assert "warnings" not in q
    assert q["endpointing"] == "300"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"encoding": "opus"},
        {"sample_rate": 0},
        {"channels": 0},
        {"endpointing": True},
    ],
)
def test_bad_client_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        StreamClient("ws://127.0.0.1/v1/listen", **kwargs)


def test_url_must_be_a_websocket_url() -> None:
    with pytest.raises(ValueError, match="ws://"):
        StreamClient("http://127.0.0.1:8000/v1/listen")


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("ws://h/v1/listen?encoding=mulaw", None),
        ("ws://h/v1/listen", {"sample_rate": 8000}),
        ("ws://h/v1/listen", [("interim_results", "false")]),
    ],
)
def test_format_parameters_only_through_their_arguments(url: str, extra: Any) -> None:
    # The server refuses a repeated parameter, and the audio is encoded from
    # the arguments: a second value elsewhere is refused here, clearly.
    with pytest.raises(ValueError, match="argument"):
        StreamClient(url, extra_params=extra)


def test_results_helpers() -> None:
    msg = {
        "type": "Results",
        "channel_index": [1, 2],
        "is_final": True,
        "channel": {"alternatives": [{"transcript": "hi there"}]},
    }
    assert transcript_of(msg) == "hi there"
    assert channel_of(msg) == 1
    assert is_final(msg)
    assert channel_of({"type": "SpeechStarted", "channel": [1, 2]}) == 1
    assert transcript_of({"type": "Metadata"}) == ""
    assert not is_final({"type": "Metadata", "is_final": True})


# ---------------------------------------------------------------------------
# A small stand-in server


@dataclass
class Seen:
    """What the stand-in server saw on one stream."""

    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    audio_bytes: int = 0
    frames: int = 0
    controls: list[str] = field(default_factory=list)
    frame_times: list[float] = field(default_factory=list)


class MiniServer:
    """A websocket server that speaks a few messages of the protocol.

    ``/v1/listen``: Metadata first; on CloseStream one interim and one final
    Results per decoded channel (transcript "hello world"), a last Metadata
    with the duration, close 1000. ``/lagging/v1/listen``: after the first
    audio frame, an Error (stream_lagging) and close 4429.
    ``/full/v1/listen``: HTTP 503 with Retry-After. ``/auth/v1/listen``: HTTP
    401 unless ``Authorization: Token secret``. Any path: HTTP 400 for an
    unknown query parameter named ``bogus``.
    """

    def __init__(self) -> None:
        self.streams: list[Seen] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name="mini-server", daemon=True)
        self._ready = threading.Event()

    def url(self, prefix: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}{prefix}/v1/listen"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the stand-in server did not start")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/listen", self._handle)
        app.router.add_get("/{prefix}/v1/listen", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = int(self._runner.addresses[0][1])
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    @staticmethod
    def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
        return web.json_response(
            {"type": "Error", "code": code, "message": message}, status=status, headers=headers
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        prefix = request.match_info.get("prefix", "")
        query = list(request.query.items())
        if prefix == "full":
            return self._error(
                503, "server_full", "at the limit of 1 streams", **{"Retry-After": "2"}
            )
        if prefix == "auth" and request.headers.get("Authorization") != "Token secret":
            return self._error(401, "unauthorized", "a valid API key is required")
        if any(k == "bogus" for k, _ in query):
            return self._error(400, "unknown_parameter", "unknown parameter 'bogus'")
        params = dict(query)
        fmt = AudioFormat.parse(
            params.get("encoding", "linear16"),
            params.get("sample_rate", "16000"),
            params.get("channels", "1"),
        )
        decoded = fmt.channels if params.get("multichannel") == "true" else 1
        seen = Seen(prefix, query, dict(request.headers))
        self.streams.append(seen)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "Metadata", "request_id": "req-1", "models": ["mini"]})
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                seen.audio_bytes += len(msg.data)
                seen.frames += 1
                seen.frame_times.append(time.monotonic())
                if prefix == "lagging":
                    await ws.send_json(
                        {"type": "Error", "code": "stream_lagging", "message": "31 s behind"}
                    )
                    await ws.close(code=4429, message=b"stream_lagging")
                    break
            elif msg.type == WSMsgType.TEXT:
                kind = json.loads(msg.data)["type"]
                seen.controls.append(kind)
                if kind == "CloseStream":
                    duration = seen.audio_bytes / fmt.bytes_per_second
                    for channel in range(decoded):
                        for final in (False, True):
                            await ws.send_json(results(channel, decoded, duration, final))
                    await ws.send_json(
                        {"type": "Metadata", "request_id": "req-1", "duration": duration}
                    )
                    await ws.close(code=1000)
                    break
        return ws


def results(channel: int, channels: int, duration: float, final: bool) -> dict[str, Any]:
    text = "hello world" if final else "hello"
    return {
        "type": "Results",
        "channel_index": [channel, channels],
        "start": 0.0,
        "duration": duration,
        "is_final": final,
        "speech_final": final,
        "channel": {"alternatives": [{"transcript": text, "confidence": 0.9, "words": []}]},
    }


@pytest.fixture(scope="module")
def server() -> Any:
    mini = MiniServer()
    mini.start()
    yield mini
    mini.stop()


@pytest.fixture
def mini(server: MiniServer) -> MiniServer:
    server.streams.clear()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------
# Client against the stand-in server


def test_transcribe_stream_collects_everything(mini: MiniServer) -> None:
    audio = tone(0.5, 16000)
    result = run(transcribe_stream(mini.url(), audio, realtime=False, language="en"))
    assert result.ok and result.close_code == 1000
    assert [m["type"] for m in result.messages] == ["Metadata", "Results", "Results", "Metadata"]
    assert result.metadata is not None and result.metadata["request_id"] == "req-1"
    assert result.text() == "hello world"
    assert len(result.interims) == 1 and list(result.finals) == [0]
    assert result.arrival_s == sorted(result.arrival_s)
    assert len(result.arrival_s) == len(result.messages)
    assert result.started_wall == pytest.approx(time.time(), abs=30)
    assert result.audio_seconds == pytest.approx(0.5)
    assert result.errors == [] and result.warnings == []
    seen = mini.streams[-1]
    assert seen.audio_bytes == len(audio) * 2
    assert seen.frames == 25  # 20 ms frames
    assert seen.controls == ["CloseStream"]
    assert ("language", "en") in seen.query
    assert "Authorization" not in seen.headers


def test_file_is_resampled_and_mixed_to_the_stream_format(mini: MiniServer, tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([tone(1.0, 44100), tone(1.0, 44100, 660.0)], axis=1), 44100)
    result = run(
        transcribe_stream(mini.url(), path, encoding="mulaw", sample_rate=8000, realtime=False)
    )
    assert result.ok
    assert abs(mini.streams[-1].audio_bytes - 8000) <= 2


def test_array_rate_and_multichannel(mini: MiniServer) -> None:
    stereo = np.stack([tone(0.5, 48000), tone(0.5, 48000, 880.0)], axis=1)
    result = run(
        transcribe_stream(
            mini.url(),
            stereo,
            sample_rate=16000,
            channels=2,
            multichannel=True,
            audio_sample_rate=48000,
            realtime=False,
        )
    )
    assert sorted(result.finals) == [0, 1]
    assert result.text(1) == "hello world"
    assert abs(mini.streams[-1].audio_bytes - 0.5 * 16000 * 2 * 2) <= 8


def test_mono_file_duplicated_but_stereo_into_three_channels_refused(mini: MiniServer) -> None:
    result = run(transcribe_stream(mini.url(), tone(0.1, 16000), channels=2, realtime=False))
    assert mini.streams[-1].audio_bytes == 1600 * 2 * 2
    assert result.ok
    stereo = np.zeros((1600, 2), np.float32)
    with pytest.raises(ValueError, match="2 channels"):
        run(transcribe_stream(mini.url(), stereo, channels=3, realtime=False))


def test_raw_bytes_are_sent_as_they_are(mini: MiniServer) -> None:
    raw = bytes(range(256)) * 10
    run(transcribe_stream(mini.url(), raw, encoding="mulaw", sample_rate=8000, realtime=False))
    assert mini.streams[-1].audio_bytes == len(raw)
    assert mini.streams[-1].frames == 16  # 160-byte frames of 20 ms


def test_control_messages_and_metadata(mini: MiniServer) -> None:
    async def go() -> StreamClient:
        async with StreamClient(mini.url(), api_key="k3y") as client:
            await client.send_audio(encode_audio(tone(0.1, 16000), "linear16"))
            await client.send_audio(b"")
            await client.keep_alive()
            await client.finalize()
            await client.close_stream()
            kinds = [m["type"] async for m in client.messages()]
            assert kinds == ["Metadata", "Results", "Results", "Metadata"]
            assert client.closed
            with pytest.raises(StreamClosedError):
                await client.send_audio(b"\0\0")
        return client

    client = run(go())
    assert client.close_code == 1000
    assert client.metadata is not None and client.metadata["models"] == ["mini"]
    assert client.last_metadata is not None and "duration" in client.last_metadata
    seen = mini.streams[-1]
    assert seen.controls == ["KeepAlive", "Finalize", "CloseStream"]
    assert seen.frames == 1
    assert seen.headers["Authorization"] == "Token k3y"


def test_error_close_is_reported(mini: MiniServer) -> None:
    result = run(transcribe_stream(mini.url("/lagging"), tone(2.0, 16000), realtime=True))
    assert result.close_code == 4429
    assert result.close_reason == "stream_lagging"
    assert not result.ok
    assert [e["code"] for e in result.errors] == ["stream_lagging"]
    # The sender stopped as soon as the server closed, not after 2 s of audio.
    assert result.audio_seconds < 1.0


@pytest.mark.parametrize(
    ("prefix", "kwargs", "status", "code"),
    [
        ("/full", {}, 503, "server_full"),
        ("/auth", {}, 401, "unauthorized"),
        ("", {"extra_params": {"bogus": 1}}, 400, "unknown_parameter"),
    ],
)
def test_refusals_before_the_upgrade(
    mini: MiniServer, prefix: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    with pytest.raises(StreamRefusedError) as info:
        run(transcribe_stream(mini.url(prefix), tone(0.1, 16000), **kwargs))
    err = info.value
    assert err.status == status and err.code == code
    assert err.body is not None and err.body["type"] == "Error"
    assert err.retry_after == (2.0 if status == 503 else None)
    assert f"HTTP {status}" in str(err)
    assert mini.streams == []


def test_api_key_is_accepted(mini: MiniServer) -> None:
    result = run(transcribe_stream(mini.url("/auth"), tone(0.1, 16000), api_key="secret"))
    assert result.ok


def test_unreachable_server() -> None:
    with pytest.raises(StreamConnectError) as info:
        run(transcribe_stream(f"ws://127.0.0.1:{free_port()}/v1/listen", tone(0.1, 16000)))
    assert not isinstance(info.value, StreamRefusedError)


def test_missing_file_fails_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run(transcribe_stream(f"ws://127.0.0.1:{free_port()}/v1/listen", tmp_path / "no.wav"))


def test_failing_source_does_not_hang(mini: MiniServer) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"\0" * 640
        raise OSError("microphone unplugged")

    started = time.monotonic()
    with pytest.raises(OSError, match="unplugged"):
        run(transcribe_stream(mini.url(), chunks()), timeout=10)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------------------
# Pacing


def test_realtime_pacing_takes_about_the_audio_duration(mini: MiniServer) -> None:
    async def go() -> tuple[float, float]:
        async with StreamClient(mini.url(), interim_results=False) as client:
            started = asyncio.get_running_loop().time()
            seconds = await stream_file(client, tone(1.0, 16000), chunk_ms=20, realtime=True)
            elapsed = asyncio.get_running_loop().time() - started
            async for _ in client.messages():
                pass
        return seconds, elapsed

    seconds, elapsed = run(go())
    assert seconds == pytest.approx(1.0)
    assert 0.9 <= elapsed < 2.0
    # Frames arrive spread over the second, not in a burst.
    times = mini.streams[-1].frame_times
    assert len(times) == 50
    assert times[25] - times[0] >= 0.4


def test_fast_streaming_does_not_wait(mini: MiniServer) -> None:
    started = time.monotonic()
    result = run(transcribe_stream(mini.url(), tone(5.0, 16000), realtime=False))
    assert result.ok
    assert time.monotonic() - started < 2.0
    assert result.audio_seconds == pytest.approx(5.0)


def test_realtime_latency_is_measured(mini: MiniServer) -> None:
    result = run(transcribe_stream(mini.url(), tone(0.4, 16000), realtime=True))
    assert result.audio_start_s is not None and result.audio_end_s is not None
    assert result.audio_end_s - result.audio_start_s >= 0.3
    (latency,) = result.final_latencies()
    assert -0.1 < latency < 1.0


# ---------------------------------------------------------------------------
# CLI


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="earshot")
    add_stream_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EARSHOT_API_KEY", raising=False)
    monkeypatch.delenv("EARSHOT_URL", raising=False)
    args = parse(["stream", "a.wav"])
    assert args.func is cmd_stream
    assert args.file == "a.wav"
    assert args.url == "ws://127.0.0.1:8000/v1/listen"
    assert args.realtime is True
    assert args.encoding == "linear16"
    assert args.sample_rate is None and args.channels is None
    assert not args.multichannel and not args.no_interim and not args.json
    assert args.language is None and args.api_key is None and args.endpointing is None


def test_cli_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EARSHOT_API_KEY", "from-env")
    args = parse(
        [
            "stream",
            "-",
            "--url",
            "ws://h:1/v1/listen",
            "--fast",
            "--encoding",
            "mulaw",
            "--sample-rate",
            "8000",
            "--channels",
            "2",
            "--multichannel",
            "--language",
            "fr",
            "--no-interim",
            "--json",
            "--endpointing",
            "false",
            "--keyterm",
            "a",
            "--keyterm",
            "b c",
            "--param",
            "punctuate=true",
        ]
    )
    assert args.file == "-" and args.url == "ws://h:1/v1/listen"
    assert args.realtime is False
    assert (args.encoding, args.sample_rate, args.channels) == ("mulaw", 8000, 2)
    assert args.multichannel and args.no_interim and args.json
    assert args.language == "fr" and args.endpointing is False
    assert args.keyterm == ["a", "b c"] and args.param == [("punctuate", "true")]
    assert args.api_key == "from-env"
    assert parse(["stream", "x", "--api-key", "k"]).api_key == "k"
    assert parse(["stream", "x", "--endpointing", "300"]).endpointing == 300
    assert parse(["stream", "x", "--realtime"]).realtime is True


@pytest.mark.parametrize(
    "argv",
    [
        ["stream"],
        ["stream", "x", "--realtime", "--fast"],
        ["stream", "x", "--encoding", "opus"],
        ["stream", "x", "--sample-rate", "0"],
        ["stream", "x", "--channels", "two"],
        ["stream", "x", "--endpointing", "soon"],
        ["stream", "x", "--param", "novalue"],
    ],
)
def test_cli_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    capsys.readouterr()


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    path = tmp_path / "speech.wav"
    sf.write(path, tone(0.3, 16000), 16000, subtype="PCM_16")
    return path


def test_cli_prints_finals(mini: MiniServer, wav: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cmd_stream(parse(["stream", str(wav), "--url", mini.url(), "--fast"]))
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "hello world\n"  # not a TTY: no interims
    assert "streaming to mini" in err
    assert ("interim_results", "true") in mini.streams[-1].query
    assert mini.streams[-1].audio_bytes == 0.3 * 16000 * 2


def test_cli_json_lines(mini: MiniServer, wav: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["stream", str(wav), "--url", mini.url(), "--fast", "--json", "--no-interim"]
    assert cmd_stream(parse(argv)) == 0
    out, _ = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [m["type"] for m in lines] == ["Metadata", "Results", "Results", "Metadata"]
    assert ("interim_results", "false") in mini.streams[-1].query


def test_cli_multichannel_prefixes(
    mini: MiniServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "two.wav"
    sf.write(path, np.zeros((8000, 2), np.float32), 8000)
    argv = ["stream", str(path), "--url", mini.url(), "--fast", "--multichannel"]
    assert cmd_stream(parse(argv)) == 0
    out, _ = capsys.readouterr()
    assert out == "[ch 0] hello world\n[ch 1] hello world\n"
    q = dict(mini.streams[-1].query)
    assert (q["sample_rate"], q["channels"], q["multichannel"]) == ("8000", "2", "true")


def test_cli_stdin_raw(
    mini: MiniServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = encode_audio(tone(0.25, 8000), "alaw")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw)))
    argv = ["stream", "-", "--url", mini.url(), "--fast", "--encoding", "alaw"]
    assert cmd_stream(parse([*argv, "--sample-rate", "8000"])) == 0
    assert capsys.readouterr().out == "hello world\n"
    assert mini.streams[-1].audio_bytes == len(raw)
    assert dict(mini.streams[-1].query)["encoding"] == "alaw"


@pytest.mark.parametrize(
    ("prefix", "extra", "expected"),
    [
        ("/full", [], ["HTTP 503", "[server_full]", "retry after 2 s"]),
        ("/auth", [], ["HTTP 401", "[unauthorized]"]),
        ("", ["--param", "bogus=1"], ["HTTP 400", "[unknown_parameter]"]),
        ("/lagging", [], ["[stream_lagging]", "31 s behind", "code 4429"]),
    ],
)
def test_cli_failures_exit_non_zero(
    mini: MiniServer,
    wav: Path,
    capsys: pytest.CaptureFixture[str],
    prefix: str,
    extra: list[str],
    expected: list[str],
) -> None:
    code = cmd_stream(parse(["stream", str(wav), "--url", mini.url(prefix), "--fast", *extra]))
    _, err = capsys.readouterr()
    assert code == 1
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1
    for text in expected:
        assert text in error_lines[0]


def test_cli_unreadable_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not audio")
    assert cmd_stream(parse(["stream", str(bad)])) == 2
    assert cmd_stream(parse(["stream", str(tmp_path / "missing.wav")])) == 2
    err = capsys.readouterr().err
    assert err.count("earshot: error: cannot read") == 2


def test_cli_unreachable(wav: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"ws://127.0.0.1:{free_port()}/v1/listen"
    assert cmd_stream(parse(["stream", str(wav), "--url", url])) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_display_rewrites_interims_on_a_tty() -> None:
    out, err = io.StringIO(), io.StringIO()
    display = _Display(out, err, as_json=False, tty=True)
    display.message(results(0, 1, 1.0, final=False))
    display.message(results(0, 1, 1.0, final=False))
    display.message(results(0, 1, 1.0, final=True))
    display.message({"type": "Warning", "code": "lagging", "message": "6 s behind"})
    display.finish()
    assert out.getvalue() == "\r\x1b[Khello" * 2 + "\r\x1b[Khello world\n"
    assert err.getvalue() == "earshot: warning: 6 s behind [lagging]\n"
    display = _Display(out := io.StringIO(), err, as_json=False, tty=True)
    display.message(results(1, 2, 1.0, final=False))
    display.message(results(1, 2, 1.0, final=True) | {"channel": {"alternatives": []}})
    display.finish()
    assert out.getvalue() == "\r\x1b[K[ch 1] hello\r\x1b[K"
