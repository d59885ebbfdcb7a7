"""Client reconnection with resume (clients/resume.py, ``transcribe_stream(...,
reconnect=True)``, ``earshot stream``): no final received twice, no word lost.

Three levels: the pure bookkeeping (:class:`ResumeState`); a scripted
stand-in server on a fixed loopback port, run in a thread, whose connections
go away, drop or refuse as told (the exact bytes each connection received are
checked); and the real server with the tone-language backend, stopped
gracefully or cut off mid-stream and replaced by a new one on the same port,
so that the exact words of every utterance are known. Every test runs its own
loop under a time bound; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import socket
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import soundfile as sf
from aiohttp import WSMsgType, web

from earshot.clients.audio import encode_audio
from earshot.clients.resume import ResumeState
from earshot.clients.stream import (
    RETRYABLE_CLOSE_CODES,
    StreamRefusedError,
    StreamTranscript,
    transcribe_stream,
    transcript_of,
)
from earshot.clients.stream_cli import add_stream_parser
from earshot.service.engine.engine import Engine
from earshot.service.http.app import create_app
from earshot.service.http.serving import EarshotRunner
from tests.kit.live import tone_engine
from tests.kit.tones import make_speech

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")
RATE = 16000
BPS = RATE * 2  # linear16 mono


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def final(
    start: float, duration: float, text: str, channel: int = 0, channels: int = 1
) -> dict[str, Any]:
    return {
        "type": "Results",
        "channel_index": [channel, channels],
        "start": start,
        "duration": duration,
        "is_final": True,
        "speech_final": True,
        "channel": {
            "alternatives": [
                {
                    "transcript": text,
                    "words": [{"word": text, "start": start + 0.1, "end": start + duration - 0.1}],
                }
            ]
        },
    }


def interim(start: float, duration: float) -> dict[str, Any]:
    return {**final(start, duration, "inter"), "is_final": False, "speech_final": False}


def pcm(seconds: float) -> bytes:
    """linear16 audio whose every sample is its own index (mod 2**15): a
    re-sent piece is recognisable by its bytes."""
    n = round(seconds * RATE)
    return (np.arange(n) % 32768).astype("<i2").tobytes()


# ---------------------------------------------------------------------------
# The pure bookkeeping


def state(max_buffer_s: float = 60.0, channels: int = 1) -> ResumeState:
    return ResumeState(
        sample_rate=RATE, frame_bytes=2, channels=channels, max_buffer_s=max_buffer_s
    )


def test_resume_starts_at_the_end_of_the_last_final() -> None:
    s = state()
    audio = pcm(3.0)
    for i in range(0, len(audio), 640):
        s.record(audio[i : i + 640])
    assert s.end_s == pytest.approx(3.0)
    out = s.translate(final(0.25, 1.0, "one"))
    assert out is not None and out["start"] == 0.25
    assert s.committed_s == [1.25]
    # The audio before the final's end is let go.
    assert s.buffered_s == pytest.approx(1.75, abs=0.03)
    resume = s.resume()
    assert resume.offset_s == pytest.approx(1.25)
    assert resume.data == audio[round(1.25 * RATE) * 2 :]
    assert resume.lost_s == 0
    # The new connection's clock starts at 0 at 1.25 s of the caller's.
    out = s.translate(final(0.5, 0.5, "two"))
    assert out is not None and out["start"] == 1.75
    assert out["channel"]["alternatives"][0]["words"][0]["start"] == pytest.approx(1.85)
    assert s.committed_s == [2.25]
    assert s.translate({"type": "SpeechStarted", "timestamp": 0.5})["timestamp"] == 1.75  # type: ignore[index]
    assert s.translate({"type": "UtteranceEnd", "last_word_end": 1.0})["last_word_end"] == 2.25  # type: ignore[index]
    meta = {"type": "Metadata", "duration": 4.0}
    assert s.translate(meta) == meta


def test_resume_without_any_final_resends_everything_and_a_second_resume_stacks() -> None:
    s = state()
    audio = pcm(1.0)
    s.record(audio)
    first = s.resume()
    assert first.offset_s == 0 and first.data == audio
    # Nothing new was finalized on the second connection: the same audio again.
    s.record(pcm(0.5))
    second = s.resume()
    assert second.offset_s == 0 and len(second.data) == len(audio) + BPS // 2
    # Offsets are on the caller clock, not the previous connection's.
    s.translate(final(0.0, 1.2, "x"))
    third = s.resume()
    assert third.offset_s == pytest.approx(1.2)
    s.translate(final(0.1, 0.2, "y"))
    assert s.committed_s == [pytest.approx(1.5)]


def test_translate_does_not_touch_the_message_it_is_given() -> None:
    s = state()
    s.record(pcm(2.0))
    s.translate(final(0.0, 1.0, "a"))
    s.resume()
    message = final(0.0, 0.5, "b")
    out = s.translate(message)
    assert (
        message["start"] == 0.0
        and message["channel"]["alternatives"][0]["words"][0]["start"] == 0.1
    )
    assert out is not None and out["start"] == 1.0


def test_duplicates_are_dropped_per_channel() -> None:
    s = state(channels=2)
    s.record(pcm(4.0))
    s.translate(final(0.0, 3.0, "left", channel=0, channels=2))
    s.translate(final(0.0, 1.0, "right", channel=1, channels=2))
    # The earliest channel decides where the resume starts.
    resume = s.resume()
    assert resume.offset_s == pytest.approx(1.0)
    # Channel 0 hears its utterance again (it started at 0.5 s, inside its
    # last final): dropped; channel 1's new one is kept; interims too.
    assert s.translate(interim(0.5, 1.0) | {"channel_index": [0, 2]}) is None
    assert s.translate(final(0.0, 1.8, "left", channel=0, channels=2)) is None
    assert s.dropped_duplicates == 2
    kept = s.translate(final(0.2, 1.0, "more", channel=1, channels=2))
    assert kept is not None and kept["start"] == pytest.approx(1.2)
    # A final that starts where the last one ended is not a duplicate.
    assert s.translate(final(2.0, 0.5, "next", channel=0, channels=2)) is not None


def test_the_buffer_is_bounded_and_a_resume_past_it_warns() -> None:
    s = state(max_buffer_s=1.0)
    audio = pcm(3.0)
    for i in range(0, len(audio), 640):
        s.record(audio[i : i + 640])
    # Never more than the cap (plus one chunk) is kept.
    assert s.buffered_s <= 1.0 + 640 / BPS
    assert s.dropped_bytes == len(audio) - s.buffered_bytes
    resume = s.resume()
    assert resume.lost_s == pytest.approx(2.0, abs=0.03)
    assert resume.offset_s == pytest.approx(2.0, abs=0.03)
    assert resume.data == audio[len(audio) - len(resume.data) :]
    assert len(s.warnings) == 1 and "not re-sent" in s.warnings[0]


def test_a_final_past_the_audio_sent_is_clamped() -> None:
    s = state()
    s.record(pcm(1.0))
    s.translate(final(0.5, 1.0, "late"))  # ends at 1.5 s: more than was sent
    resume = s.resume()
    assert resume.offset_s == pytest.approx(1.0) and resume.data == b""


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ResumeState(sample_rate=0, frame_bytes=2)
    with pytest.raises(ValueError):
        ResumeState(sample_rate=RATE, frame_bytes=2, max_buffer_s=0)


# ---------------------------------------------------------------------------
# A scripted stand-in server


@dataclass
class Plan:
    """What the stand-in does with one connection.

    ``kind``: ``normal`` (on CloseStream: a final over everything received,
    a last Metadata, close 1000), ``goaway`` (once ``after`` bytes arrived:
    a final over the first ``final_s`` seconds, an Error, a last Metadata,
    close ``code``), ``drop`` (once ``after`` bytes arrived: the final, then
    the TCP connection is aborted without a close frame), ``refuse`` (HTTP
    ``code`` before the upgrade, ``Retry-After: retry_after``).
    """

    kind: str = "normal"
    after: int = 0
    final_s: float = 0.0
    code: int = 1001
    retry_after: str | None = None


@dataclass
class Conn:
    plan: Plan
    audio: bytearray = field(default_factory=bytearray)
    controls: list[str] = field(default_factory=list)


class Scripted:
    """A stand-in server on a fixed loopback port whose connections follow
    ``plans`` in order (then ``normal``); runs in a thread of its own."""

    def __init__(self, plans: list[Plan]) -> None:
        self.plans = list(plans)
        self.conns: list[Conn] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="scripted-server", daemon=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/listen"

    def __enter__(self) -> Scripted:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the stand-in server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/listen", self._handle)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        plan = self.plans.pop(0) if self.plans else Plan()
        conn = Conn(plan)
        self.conns.append(conn)
        index = len(self.conns)
        if plan.kind == "refuse":
            headers = {"Retry-After": plan.retry_after} if plan.retry_after else {}
            body = {"type": "Error", "code": f"refused_{plan.code}", "message": "no"}
            return web.json_response(body, status=plan.code, headers=headers)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "Metadata", "request_id": f"req-{index}", "duration": 0.0})
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                conn.audio += msg.data
                if plan.kind in ("goaway", "drop", "close") and len(conn.audio) >= plan.after:
                    if plan.final_s:
                        await ws.send_json(final(0.0, plan.final_s, f"c{index}"))
                    if plan.kind == "drop":
                        # Let the final reach the client before the cut.
                        await asyncio.sleep(0.1)
                        assert request.transport is not None
                        request.transport.abort()
                        return ws
                    await ws.send_json({"type": "Error", "code": "going", "message": "bye"})
                    duration = len(conn.audio) / BPS
                    await ws.send_json({"type": "Metadata", "duration": duration})
                    await ws.close(code=plan.code, message=b"going")
                    return ws
            elif msg.type == WSMsgType.TEXT:
                kind = json.loads(msg.data)["type"]
                conn.controls.append(kind)
                if kind == "CloseStream":
                    duration = len(conn.audio) / BPS
                    await ws.send_json(interim(0.0, duration))
                    await ws.send_json(final(0.0, duration, f"c{index}"))
                    await ws.send_json({"type": "Metadata", "duration": duration})
                    await ws.close(code=1000)
                    return ws
        return ws


def texts(result: StreamTranscript) -> list[str]:
    return [transcript_of(m) for m in result.finals.get(0, [])]


def stream(url: str, audio: bytes, **kwargs: Any) -> StreamTranscript:
    options: dict[str, Any] = {"realtime": False, "reconnect": True, "reconnect_backoff_s": 0.02}
    options.update(kwargs)
    return run(transcribe_stream(url, audio, **options))


@pytest.mark.parametrize("code", [1001, 1011, 1012, 1013])
def test_server_going_away_resumes_after_the_last_final(code: int) -> None:
    audio = pcm(2.0)
    plans = [Plan("goaway", after=BPS, final_s=0.75, code=code)]
    with Scripted(plans) as server:
        result = stream(server.url, audio)
    first, second = server.conns
    assert bytes(first.audio) == audio[: len(first.audio)]
    # The second connection got exactly the audio after the first's final.
    assert bytes(second.audio) == audio[round(0.75 * RATE) * 2 :]
    assert second.controls == ["CloseStream"]
    assert result.ok and result.close_code == 1000
    assert result.reconnects == 1
    assert [c.close_code for c in result.connections] == [code, 1000]
    assert [c.request_id for c in result.connections] == ["req-1", "req-2"]
    assert result.connections[1].offset_s == pytest.approx(0.75)
    # Re-sent: what the client had sent after 0.75 s (sending flat out, maybe all).
    assert len(first.audio) / BPS - 0.75 <= result.connections[1].resent_s <= 1.25
    assert result.connections[1].last_metadata == {"type": "Metadata", "duration": 1.25}
    assert texts(result) == ["c1", "c2"]
    # One clock: the second connection's final starts where the first one's ended.
    starts = [m["start"] for m in result.finals[0]]
    assert starts == [0.0, 0.75]
    interims = [m["start"] for m in result.interims]
    assert interims == [0.75]
    assert result.audio_seconds == pytest.approx(2.0)
    assert result.metadata is not None and result.metadata["request_id"] == "req-1"


def test_a_dropped_connection_resends_what_was_not_finalized() -> None:
    audio = pcm(2.0)
    plans = [Plan("drop", after=BPS, final_s=0.5), Plan("drop", after=BPS // 4)]
    with Scripted(plans) as server:
        result = stream(server.url, audio)
    _, second, third = server.conns
    assert bytes(second.audio) == audio[BPS // 2 : BPS // 2 + len(second.audio)]
    # No final on the second connection: the third starts from 0.5 s again.
    assert bytes(third.audio) == audio[BPS // 2 :]
    assert [c.close_code for c in result.connections] == [1006, 1006, 1000]
    assert result.reconnects == 2
    assert texts(result) == ["c1", "c3"]
    assert [m["start"] for m in result.finals[0]] == [0.0, 0.5]


def test_past_the_resume_buffer_the_oldest_audio_is_dropped_with_a_warning() -> None:
    audio = pcm(2.0)
    seen: list[dict[str, Any]] = []
    # No final before the drop, and only 0.5 s may be kept.
    plans = [Plan("drop", after=round(1.5 * BPS))]
    with Scripted(plans) as server:
        result = stream(server.url, audio, resume_buffer_s=0.5, on_message=seen.append)
    _, second = server.conns
    resent = round(result.connections[1].resent_s * BPS)
    assert 0 < resent <= BPS // 2 + 640
    assert bytes(second.audio) == audio[len(audio) - len(second.audio) :]
    assert len(second.audio) < len(audio)
    assert len(result.client_warnings) == 1 and "not re-sent" in result.client_warnings[0]
    # The caller's clock: the new connection's final starts where its audio does.
    assert result.finals[0][0]["start"] == pytest.approx(result.connections[1].offset_s, abs=1e-3)
    assert seen[-2]["start"] == result.finals[0][0]["start"]


def test_no_reconnect_by_default() -> None:
    with Scripted([Plan("goaway", after=BPS // 2, final_s=0.25)]) as server:
        result = run(transcribe_stream(server.url, pcm(1.0), realtime=False))
    assert len(server.conns) == 1
    assert result.close_code == 1001 and result.reconnects == 0
    assert [c.close_code for c in result.connections] == [1001]


@pytest.mark.parametrize("code", [1000, 4400, 4408, 4409, 4429])
def test_no_reconnect_on_a_normal_close_or_a_client_error(code: int) -> None:
    with Scripted([Plan("close", after=BPS // 2, code=code)]) as server:
        result = stream(server.url, pcm(1.0))
    assert len(server.conns) == 1
    assert result.close_code == code and result.reconnects == 0
    assert code not in RETRYABLE_CLOSE_CODES


def test_a_refusal_is_not_retried() -> None:
    with Scripted([Plan("refuse", code=401)]) as server:
        with pytest.raises(StreamRefusedError) as refused:
            stream(server.url, pcm(0.5))
        assert refused.value.status == 401
        assert len(server.conns) == 1


def test_a_refused_reconnect_ends_the_stream_with_its_reason() -> None:
    plans = [Plan("goaway", after=BPS // 2, final_s=0.25), Plan("refuse", code=401)]
    with Scripted(plans) as server:
        result = stream(server.url, pcm(1.0))
    assert len(server.conns) == 2
    assert result.close_code == 1001 and result.reconnects == 0
    assert result.reconnect_error is not None and "401" in result.reconnect_error
    assert texts(result) == ["c1"]


def test_503_with_retry_after_is_retried_and_honoured() -> None:
    plans = [
        Plan("refuse", code=503, retry_after="0.3"),
        Plan("goaway", after=BPS // 2, final_s=0.25),
        Plan("refuse", code=503, retry_after="0.3"),
    ]
    notes: list[str] = []
    loop_times: list[float] = []

    async def go() -> StreamTranscript:
        loop = asyncio.get_running_loop()

        def note(text: str) -> None:
            notes.append(text)
            loop_times.append(loop.time())

        return await transcribe_stream(
            server.url, pcm(1.0), realtime=False, reconnect=True, reconnect_backoff_s=0.01,
            on_reconnect=note,
        )  # fmt: skip

    with Scripted(plans) as server:
        result = run(go())
    assert len(server.conns) == 4
    assert result.ok and result.reconnects == 1
    assert texts(result) == ["c2", "c4"]
    # The waits after a refusal were Retry-After's 0.3 s, not the 0.01 s
    # backoff (the first connection's refusal too).
    waits = [n for n in notes if "reconnecting in" in n]
    assert len(waits) == 3, notes
    assert all("in 0.30 s" in n for n in waits if n.startswith("refused")), notes
    assert sum(n.startswith("refused") for n in waits) == 2
    gaps = [b - a for a, b in itertools.pairwise(loop_times)]
    assert max(gaps) >= 0.29
    assert any(n.startswith("reconnected") for n in notes)


def test_attempts_are_bounded() -> None:
    plans = [Plan("goaway", after=BPS // 2, final_s=0.25)] + [Plan("refuse", code=503)] * 10
    with Scripted(plans) as server:
        result = stream(server.url, pcm(1.0), max_reconnects=3)
    assert len(server.conns) == 1 + 3
    assert result.reconnect_attempts == 3 and result.reconnects == 0
    assert result.close_code == 1001
    assert result.reconnect_error is not None and "3 attempts" in result.reconnect_error


def test_an_unreachable_server_is_retried_within_the_time_bound() -> None:
    plans = [Plan("goaway", after=BPS // 2, final_s=0.25)]
    with Scripted(plans) as server:
        url = server.url

        async def go() -> StreamTranscript:
            def lost(text: str) -> None:
                if "reconnecting" in text:
                    # The server is gone for good (this blocks the client's
                    # loop for a moment, which does not matter here).
                    server.stop()

            return await transcribe_stream(
                url, pcm(1.0), realtime=False, reconnect=True, reconnect_backoff_s=0.05,
                reconnect_timeout_s=1.0, max_reconnects=100, on_reconnect=lost,
            )  # fmt: skip

        result = run(go())
    assert result.close_code == 1001
    assert result.reconnect_error is not None and "within 1 s" in result.reconnect_error


def test_poisonous_audio_is_not_retried_forever() -> None:
    # Every connection fails (1011) before it delivers a final.
    plans = [Plan("goaway", after=BPS // 4, code=1011)] * 10
    with Scripted(plans) as server:
        result = stream(server.url, pcm(1.0), max_reconnects=2)
    assert len(server.conns) == 3
    assert result.close_code == 1011 and result.reconnects == 2
    assert result.reconnect_error is not None


def test_a_live_source_resends_at_once_then_is_paced() -> None:
    chunk = 640  # 20 ms

    async def live() -> AsyncIterator[bytes]:
        audio = pcm(1.6)
        for i in range(0, len(audio), chunk):
            yield audio[i : i + chunk]

    plans = [Plan("drop", after=BPS // 2, final_s=0.1)]

    async def go() -> tuple[StreamTranscript, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await transcribe_stream(
            server.url, live(), realtime=True, reconnect=True, reconnect_backoff_s=0.02
        )
        return result, loop.time() - started

    with Scripted(plans) as server:
        result, took = run(go())
    _, second = server.conns
    audio = pcm(1.6)
    assert bytes(second.audio) == audio[round(0.1 * RATE) * 2 :]
    assert result.ok and result.reconnects == 1
    # Paced on the source's clock: the outage is made up, not added.
    assert 1.5 < took < 2.4


# ---------------------------------------------------------------------------
# earshot stream


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="earshot")
    add_stream_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    path = tmp_path / "a.wav"
    sf.write(path, np.frombuffer(pcm(1.0), "<i2"), RATE, subtype="PCM_16")
    return path


def test_cli_options() -> None:
    parser = argparse.ArgumentParser(prog="earshot")
    add_stream_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["stream", "a.wav"])
    assert args.reconnect is True and args.max_reconnects == 5
    args = parser.parse_args(["stream", "a.wav", "--no-reconnect", "--max-reconnects", "0"])
    assert args.reconnect is False and args.max_reconnects == 0


def test_cli_reconnects_by_default(wav: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Scripted([Plan("drop", after=BPS // 2, final_s=0.25)]) as server:
        code = cli(["stream", str(wav), "--url", server.url, "--fast"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines() == ["c1", "c2"]
    assert "reconnecting" in err and "reconnected" in err
    assert len(server.conns) == 2


def test_cli_no_reconnect(wav: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Scripted([Plan("drop", after=BPS // 2, final_s=0.25)]) as server:
        code = cli(["stream", str(wav), "--url", server.url, "--fast", "--no-reconnect"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.splitlines() == ["c1"]
    assert "lost" in err and "reconnect" not in err
    assert len(server.conns) == 1


def test_cli_gives_up_with_exit_1(wav: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plans = [Plan("goaway", after=BPS // 2, final_s=0.25)] + [Plan("refuse", code=503)] * 3
    with Scripted(plans) as server:
        code = cli(["stream", str(wav), "--url", server.url, "--fast", "--max-reconnects", "1"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "gave up reconnecting" in err
    # The going-away Error of the first connection is shown, once.
    assert err.count("[going]") == 1
    assert len(server.conns) == 2


# ---------------------------------------------------------------------------
# The real server, replaced on the same port


class Replica:
    """The real server (tone-language backend, real Silero endpointer) on a
    fixed loopback port; another one can take the port once it has gone."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.engine: Engine = tone_engine()
        self.runner = EarshotRunner(create_app(self.engine), self.engine.config)
        self.site: web.SockSite | None = None

    async def start(self) -> Replica:
        await self.runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.site = web.SockSite(self.runner, sock)
        await self.site.start()
        return self

    async def go_away(self) -> None:
        """Graceful: stop listening, send every stream its finals, close 1001."""
        await self.runner.cleanup()

    async def drop(self) -> None:
        """Abrupt: stop listening and cut every connection without a close frame."""
        assert self.site is not None
        await self.site.stop()
        server = self.runner.server
        assert server is not None
        for handler in list(server.connections):
            if handler.transport is not None:
                handler.transport.abort()
        await self.runner.cleanup()


SCRIPT = [
    ["alpha", "bravo"],
    ["charlie", "delta", "echo"],
    ["foxtrot", "golf"],
    ["hotel", "india", "juliett"],
    ["kilo", "lima"],
]


def joined_words(result: StreamTranscript) -> list[str]:
    return [w for m in result.finals.get(0, []) for w in transcript_of(m).split()]


def check_one_clock(result: StreamTranscript) -> None:
    finals = result.finals[0]
    ends = [m["start"] + m["duration"] for m in finals]
    starts = [m["start"] for m in finals]
    # Utterances never overlap on the caller's clock, and words are in order.
    for i in range(1, len(finals)):
        assert starts[i] >= ends[i - 1] - 0.002, (starts, ends)
    word_times = [w["start"] for m in finals for w in m["channel"]["alternatives"][0]["words"]]
    assert word_times == sorted(word_times)


def speech(word_gap_s: float = 0.07) -> tuple[Any, Any]:
    return make_speech(SCRIPT, RATE, gap_s=1.2, lead_s=0.5, tail_s=1.0, word_gap_s=word_gap_s)


async def live_stream_with(
    cut: str, at_s: float, word_gap_s: float = 0.07
) -> tuple[StreamTranscript, list[str]]:
    """Stream :data:`SCRIPT` in real time to a replica, cut it (``go_away``
    or ``drop``) ``at_s`` seconds in, and start a new replica on the port."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/v1/listen"
    audio, _ = speech(word_gap_s)
    data = encode_audio(audio, "linear16")
    cut_now = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        # Paced by transcribe_stream (realtime); the cut comes when the audio
        # up to ``at_s`` has been handed over (give or take the client's
        # read-ahead of two 20 ms chunks), however late the loop runs.
        for i in range(0, len(data), 640):
            if i >= (at_s + 0.03) * BPS:
                cut_now.set()
            yield data[i : i + 640]

    notes: list[str] = []
    old = await Replica(port).start()
    new: Replica | None = None
    try:
        task = asyncio.create_task(
            transcribe_stream(
                url,
                source(),
                realtime=True,
                reconnect=True,
                reconnect_backoff_s=0.1,
                on_reconnect=notes.append,
            )
        )
        reached = asyncio.ensure_future(cut_now.wait())
        await asyncio.wait({reached, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        reached.cancel()
        assert cut_now.is_set(), "the cut point was never reached"
        if cut == "go_away":
            await old.go_away()
        else:
            await old.drop()
        new = await Replica(port).start()
        result = await task
    finally:
        with contextlib.suppress(Exception):
            await old.runner.cleanup()
        if new is not None:
            await new.runner.cleanup()
    return result, notes


@pytest.mark.parametrize("where", ["after an utterance", "between two words"])
def test_real_server_going_away_mid_stream(where: str) -> None:
    # The old server finalizes what it heard and closes with 1001; the rest
    # is heard by the new one. Cut 0.15 s after the third utterance's speech
    # (its final is not out yet: the old server's flush sends it), or in the
    # middle of the 0.25 s silence between its two words (the utterance is
    # split: its first word in the old server's final, its second in the new).
    word_gap_s = 0.07 if where == "after an utterance" else 0.25
    _, truth = speech(word_gap_s)
    third = truth.utterances[2]
    at = third.end + 0.15 if where == "after an utterance" else 0.5 * (third.start + third.end)
    result, notes = run(live_stream_with("go_away", at, word_gap_s), timeout=90)
    assert result.ok, (result.close_code, notes)
    assert result.reconnects == 1, notes
    assert [c.close_code for c in result.connections] == [1001, 1000]
    # Every word exactly once, in order, on one clock.
    assert joined_words(result) == truth.text.split()
    check_one_clock(result)
    assert result.connections[0].finals == 3
    offset = result.connections[1].offset_s
    assert third.start < offset < truth.utterances[3].start
    assert result.connections[0].request_id != result.connections[1].request_id
    # The server said why it went away; the new connection has its own Metadata.
    assert "server_shutting_down" in [e["code"] for e in result.errors]
    assert result.connections[1].metadata is not None


def test_real_server_dropped_mid_utterance() -> None:
    _, truth = speech()
    fourth = truth.utterances[3]
    at = 0.5 * (fourth.start + fourth.end)
    result, notes = run(live_stream_with("drop", at), timeout=90)
    assert result.ok, (result.close_code, notes)
    assert result.reconnects == 1, notes
    assert [c.close_code for c in result.connections] == [1006, 1000]
    # The open utterance was re-sent and transcribed once, by the new server.
    assert joined_words(result) == truth.text.split()
    assert [transcript_of(m) for m in result.finals[0]] == truth.texts
    check_one_clock(result)
    first, second = result.connections
    assert first.finals == 3 and second.finals == 2
    assert second.offset_s < fourth.start < second.offset_s + second.resent_s
