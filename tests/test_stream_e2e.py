"""The streaming path end to end: a real server on 127.0.0.1, real websocket
clients, the real Silero endpointer, and the tone-language backend, so that
the exact words are known and word error rate 0 is the expected result."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientSession, WSServerHandshakeError

from earshot.clients.audio import encode_audio
from earshot.clients.stream import StreamClient, StreamRefusedError, transcribe_stream
from earshot.models.silero import shared_model
from earshot.service.config import load_config
from earshot.service.engine.engine import Engine
from earshot.service.engine.scheduler import JobKind
from tests.kit.live import (
    final_texts,
    masked_frame,
    non_reading_websocket,
    raw_stream,
    running_server,
    tone_engine,
)
from tests.kit.tones import ToneBackend, make_speech, random_script

pytestmark = pytest.mark.timeout(120)


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout=100))


def utterances(script: Sequence[Sequence[str]]) -> list[str]:
    return [" ".join(u) for u in script]


def finals_text(transcript: Any, channel: int = 0) -> list[str]:
    return [
        m["channel"]["alternatives"][0]["transcript"]
        for m in transcript.finals.get(channel, [])
        if m["channel"]["alternatives"][0]["transcript"]
    ]


@contextlib.asynccontextmanager
async def listen_url(engine: Engine) -> AsyncIterator[str]:
    """Serve ``engine``; yields the ws:// URL of its /v1/listen endpoint."""
    async with running_server(engine) as url:
        yield url.replace("http://", "ws://") + "/v1/listen"


@pytest.mark.parametrize(
    ("rate", "encoding"),
    [(16000, "linear16"), (8000, "mulaw"), (8000, "alaw"), (44100, "linear32")],
)
def test_exact_words_through_every_encoding(rate: int, encoding: str) -> None:
    script = random_script(4, (1, 6), seed=rate % 97 + len(encoding))
    audio, _ = make_speech(script, rate)

    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            return await transcribe_stream(
                url, audio, encoding=encoding, sample_rate=rate, realtime=False
            )

    result = run(main)
    assert result.close_code == 1000
    assert finals_text(result) == utterances(script)
    assert all(m["is_final"] for m in result.finals[0])
    meta = result.metadata
    assert meta["type"] == "Metadata"
    assert meta["earshot"]["settings"]["encoding"] == encoding
    assert meta["earshot"]["settings"]["sample_rate"] == rate


def test_two_channels_with_different_words() -> None:
    left = random_script(3, (2, 5), seed=11)
    right = random_script(3, (2, 5), seed=12)
    a, _ = make_speech(left, 16000)
    b, _ = make_speech(right, 16000, lead_s=1.7)
    n = max(len(a), len(b))
    stereo = np.zeros((n, 2), np.float32)
    stereo[: len(a), 0] = a
    stereo[: len(b), 1] = b

    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            return await transcribe_stream(
                url, stereo, channels=2, multichannel=True, realtime=False
            )

    result = run(main)
    assert finals_text(result, 0) == utterances(left)
    assert finals_text(result, 1) == utterances(right)
    assert {tuple(m["channel_index"]) for m in result.finals[1]} == {(1, 2)}


def test_paced_in_real_time_with_interims_and_word_times() -> None:
    script = [["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"], ["golf", "hotel"]]
    audio, truth = make_speech(script, 16000, lead_s=0.5, gap_s=1.0, tail_s=1.0)

    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            return await transcribe_stream(url, audio, realtime=True, interim_results=True)

    result = run(main)
    assert finals_text(result) == utterances(script)
    assert result.interims, "interims were expected while the first utterance was open"
    first_final_at = next(
        at
        for m, at in zip(result.messages, result.arrival_s, strict=True)
        if m.get("type") == "Results" and m["is_final"]
    )
    first_interim_at = next(
        at
        for m, at in zip(result.messages, result.arrival_s, strict=True)
        if m.get("type") == "Results" and not m["is_final"]
    )
    assert first_interim_at < first_final_at
    # Word times are on the stream's own clock.
    words = result.finals[0][0]["channel"]["alternatives"][0]["words"]
    expected = [w for w in truth.words if w.word in script[0]][: len(words)]
    for got, want in zip(words, expected, strict=True):
        assert got["word"] == want.word
        assert abs(got["start"] - want.start) < 0.1
        assert abs(got["end"] - want.end) < 0.1
    assert all(m["speech_final"] for m in result.finals[0])


def test_sixteen_concurrent_streams_lose_no_word() -> None:
    scripts = [random_script(3, (1, 5), seed=100 + i) for i in range(16)]
    audios = [make_speech(s, 8000)[0] for s in scripts]

    async def main() -> list[Any]:
        async with listen_url(tone_engine(ToneBackend(delay_per_window_s=0.002))) as url:
            return await asyncio.gather(
                *(
                    transcribe_stream(url, a, encoding="mulaw", sample_rate=8000, realtime=False)
                    for a in audios
                )
            )

    results = run(main)
    for script, result in zip(scripts, results, strict=True):
        assert result.close_code == 1000
        assert finals_text(result) == utterances(script)


def test_finalize_in_the_middle_of_an_utterance() -> None:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    audio, truth = make_speech([words], 16000, lead_s=0.5, tail_s=1.5)
    # Send up to the middle of the fifth word, then Finalize, then the rest.
    cut = int((truth.words[4].start + 0.12) * 16000)
    pcm = encode_audio(audio, "linear16")

    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            client = StreamClient(url, interim_results=False)
            finals: list[dict[str, Any]] = []
            async with client:
                await client.send_audio(pcm[: cut * 2])
                await asyncio.sleep(0.3)
                await client.finalize()
                await client.send_audio(pcm[cut * 2 :])
                await client.close_stream()
                async for message in client.messages():
                    if message.get("type") == "Results" and message["is_final"]:
                        finals.append(message)
            return finals, client.close_code

    finals, code = run(main)
    texts = [f["channel"]["alternatives"][0]["transcript"] for f in finals]
    assert " ".join(t for t in texts if t).split() == words
    assert len([t for t in texts if t]) == 2
    assert finals[0]["from_finalize"] is True
    assert code == 1000


def test_close_stream_flushes_the_last_final() -> None:
    script = [["kilo", "lima"], ["mike", "november", "oscar"]]
    audio, _ = make_speech(script, 16000, tail_s=0.0)

    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            return await transcribe_stream(url, audio, realtime=False, interim_results=False)

    result = run(main)
    assert finals_text(result) == utterances(script)
    assert result.close_code == 1000
    last = result.finals[0][-1]
    assert last["speech_final"] is True


def test_disconnect_mid_utterance_frees_the_session() -> None:
    audio, truth = make_speech([["alpha", "bravo", "charlie", "delta", "echo"]], 16000)
    pcm = encode_audio(audio, "linear16")
    cut = int((truth.words[2].end) * 16000) * 2

    async def main() -> int:
        engine = tone_engine()
        async with listen_url(engine) as url:
            client = StreamClient(url)
            await client.connect()
            await client.send_audio(pcm[:cut])
            await asyncio.sleep(0.2)
            assert engine.active_streams == 1
            await client.close()  # no CloseStream: the client just goes away
            for _ in range(100):
                if engine.active_streams == 0:
                    break
                await asyncio.sleep(0.05)
            # The server still serves others.
            result = await transcribe_stream(url, audio, realtime=False)
            assert finals_text(result) == ["alpha bravo charlie delta echo"]
            return engine.active_streams

    assert run(main) == 0


# -- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("encoding=opus8", 400, "unsupported_encoding"),
        ("sample_rate=0", 400, "invalid_sample_rate"),
        ("sample_rate=1000000000", 400, "invalid_sample_rate"),
        ("channels=9", 400, "invalid_channels"),
        ("interim_results=maybe", 400, "invalid_parameter"),
        ("colour=blue", 400, "unknown_parameter"),
        ("model=large-v3", 400, "model_not_available"),
    ],
)
def test_bad_parameters_are_refused_before_the_upgrade(query: str, status: int, code: str) -> None:
    async def main() -> Any:
        async with listen_url(tone_engine()) as url, ClientSession() as http:
            with pytest.raises(WSServerHandshakeError) as info:
                await http.ws_connect(f"{url}?{query}")
            resp = await http.get(url.replace("ws://", "http://") + "?" + query)
            return info.value, resp.status, await resp.json()

    err, http_status, body = run(main)
    assert http_status == status == err.status
    assert body["code"] == code
    assert body["message"]


def test_the_stream_client_reports_a_refusal() -> None:
    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            with pytest.raises(StreamRefusedError) as info:
                async with StreamClient(url, sample_rate=123):
                    pass
            return info.value

    err = run(main)
    assert err.status == 400
    assert "invalid_sample_rate" in str(err)


def _speech_pcm(script: list[list[str]]) -> bytes:
    audio, _ = make_speech(script, 16000)
    return encode_audio(audio, "linear16")


def _types(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages]


def test_odd_byte_count_reports_partial_frame_and_keeps_finals() -> None:
    pcm = _speech_pcm([["alpha", "bravo"]])

    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            return await raw_stream(url, [pcm + b"\x01", '{"type": "CloseStream"}'])

    messages, code = run(main)
    errors = [m for m in messages if m["type"] == "Error"]
    assert [e["code"] for e in errors] == ["audio_partial_frame"]
    assert final_texts(messages) == ["alpha bravo"]
    assert code == 1000


def test_text_that_is_not_json_and_unknown_controls_are_not_fatal() -> None:
    pcm = _speech_pcm([["charlie", "delta"]])

    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            frames: list[bytes | str] = [
                "this is not json",
                '{"type": "Dance"}',
                '{"type": "KeepAlive"}',
                pcm,
                '{"type": "CloseStream"}',
            ]
            return await raw_stream(url, frames)

    messages, code = run(main)
    errors = [m for m in messages if m["type"] == "Error"]
    assert [e["code"] for e in errors] == ["invalid_message", "invalid_message"]
    assert "not valid JSON" in errors[0]["message"]
    assert "Dance" in errors[1]["message"]
    assert final_texts(messages) == ["charlie delta"]
    assert code == 1000


def test_frame_over_the_limit_closes_with_its_code_and_keeps_finals() -> None:
    pcm = _speech_pcm([["echo", "foxtrot"], ["golf"]])
    limit = 4096

    async def main() -> Any:
        async with listen_url(tone_engine(max_frame_bytes=limit)) as url:
            chunks = [pcm[i : i + 4000] for i in range(0, len(pcm), 4000)]
            return await raw_stream(url, [*chunks, b"\0" * (limit + 2)])

    messages, code = run(main)
    errors = [m for m in messages if m["type"] == "Error"]
    assert [e["code"] for e in errors] == ["frame_too_large"]
    assert errors[0]["limit"] == limit and errors[0]["size"] == limit + 2
    assert final_texts(messages) == ["echo foxtrot", "golf"]
    assert code == 4413


def test_channels_that_do_not_match_the_data() -> None:
    # The client says stereo but sends mono: an odd number of 16-bit samples
    # leaves half a frame at the end, which is reported; whole frames are kept.
    mono = _speech_pcm([["hotel"]])
    if (len(mono) // 2) % 2 == 0:
        mono += b"\0\0"

    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            return await raw_stream(
                url, [mono, '{"type": "CloseStream"}'], "encoding=linear16&channels=2"
            )

    messages, code = run(main)
    errors = [m for m in messages if m["type"] == "Error"]
    assert [e["code"] for e in errors] == ["audio_partial_frame"]
    assert errors[0]["bytes_per_frame"] == 4
    assert code == 1000


def test_server_full_is_refused_with_503_and_retry_after() -> None:
    async def main() -> Any:
        engine = tone_engine(max_streams=1)
        async with listen_url(engine) as url:
            first = StreamClient(url)
            await first.connect()
            try:
                async with ClientSession() as http:
                    resp = await http.get(url.replace("ws://", "http://"))
                    return resp.status, resp.headers.get("Retry-After"), await resp.json()
            finally:
                await first.close()

    status, retry, body = run(main)
    assert status == 503 and retry is not None and int(retry) > 0
    assert body["code"] == "server_full" and "max_streams" in body["message"]


def _slow_engine(delay_s: float, **overrides: Any) -> Engine:
    # Each batch takes delay_s: slower than real time for a live client.
    return tone_engine(ToneBackend(delay_s=delay_s), max_batch=1, **overrides)


def test_lag_warning_only_for_clients_that_ask() -> None:
    script = random_script(3, (1, 2), seed=5)
    audio, _ = make_speech(script, 16000, gap_s=0.8)

    async def main(warnings: bool) -> Any:
        engine = _slow_engine(2.5, lag_warning_s=1.0, lag_limit_s=35.0)
        async with listen_url(engine) as url:
            return await transcribe_stream(
                url,
                audio,
                realtime=True,
                interim_results=False,
                warnings=warnings,
            )

    asked = run(lambda: main(True))
    lagging = [m for m in asked.messages if m["type"] == "Warning"]
    assert lagging and lagging[0]["code"] == "lagging"
    assert lagging[0]["lag_s"] > 1.0 and lagging[0]["limit_s"] == 35.0
    assert finals_text(asked) == utterances(script)
    silent = run(lambda: main(False))
    assert not [m for m in silent.messages if m["type"] == "Warning"]
    assert finals_text(silent) == utterances(script)


def test_live_stream_past_the_lag_limit_is_closed_with_its_code() -> None:
    script = random_script(6, (1, 2), seed=6)
    audio, _ = make_speech(script, 16000, gap_s=0.8)

    async def main() -> Any:
        async with listen_url(_slow_engine(3.0, lag_warning_s=1.0, lag_limit_s=2.0)) as url:
            return await transcribe_stream(url, audio, realtime=True, interim_results=False)

    result = run(main)
    assert result.close_code == 4429
    errors = [m for m in result.messages if m["type"] == "Error"]
    assert [e["code"] for e in errors] == ["stream_lagging"]
    assert errors[0]["limit_s"] == 2.0
    # Finals of the audio received before the close are still delivered, in order.
    got = finals_text(result)
    assert got and got == utterances(script)[: len(got)]


def test_a_client_faster_than_real_time_is_not_lagging() -> None:
    # The same slow server that closes a live client: a client that sends a
    # recording as fast as it can is held back by back-pressure instead, and
    # gets every final (the server is still faster than real time for it).
    script = random_script(12, (1, 3), seed=6)
    audio, _ = make_speech(script, 16000, gap_s=0.8)
    engine = _slow_engine(0.3, lag_warning_s=1.0, lag_limit_s=2.0)

    async def main() -> Any:
        async with listen_url(engine) as url:
            return await transcribe_stream(
                url, audio, realtime=False, interim_results=True, warnings=True
            )

    result = run(main)
    assert result.close_code == 1000
    assert not [m for m in result.messages if m["type"] in ("Warning", "Error")]
    assert finals_text(result) == utterances(script)
    assert engine.scheduler.stats().completed[JobKind.FINAL] >= len(script)


def test_ten_minutes_sent_fast_get_every_final() -> None:
    script = random_script(340, (2, 5), seed=21)
    audio, _ = make_speech(script, 8000, gap_s=0.8)
    assert len(audio) / 8000 >= 600

    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            return await transcribe_stream(
                url, audio, encoding="mulaw", sample_rate=8000, realtime=False
            )

    result = run(main)
    assert result.close_code == 1000
    assert finals_text(result) == utterances(script)


# -- more of the streaming policy ------------------------------------------------


def test_vad_events_and_utterance_end() -> None:
    script = [["alpha", "bravo"], ["charlie"]]
    audio, truth = make_speech(script, 16000)

    async def main() -> Any:
        async with listen_url(tone_engine()) as url:
            return await transcribe_stream(
                url, audio, realtime=False, vad_events=True, utterance_end_ms=1000
            )

    result = run(main)
    kinds = [m["type"] for m in result.messages]
    started = [m for m in result.messages if m["type"] == "SpeechStarted"]
    assert len(started) == 2
    for msg, utt in zip(started, truth.utterances, strict=True):
        assert abs(msg["timestamp"] - utt.start) < 0.3
    ends = [m for m in result.messages if m["type"] == "UtteranceEnd"]
    assert len(ends) == 2
    assert abs(ends[0]["last_word_end"] - truth.utterances[0].end) < 0.1
    # Each UtteranceEnd follows the final of its utterance.
    for i, kind in enumerate(kinds):
        if kind == "UtteranceEnd":
            assert kinds[i - 1] == "Results" and result.messages[i - 1]["is_final"]


def test_long_utterance_is_cut_at_a_quiet_point_without_losing_words() -> None:
    words = random_script(1, (30, 30), seed=9)[0]  # about 9.5 s of speech, no pause
    audio, _ = make_speech([words], 16000)

    async def main() -> Any:
        async with listen_url(tone_engine(max_utterance_s=4.0)) as url:
            return await transcribe_stream(url, audio, realtime=False, interim_results=False)

    result = run(main)
    finals = result.finals[0]
    assert len(finals) >= 3
    assert " ".join(finals_text(result)).split() == words
    assert [m["speech_final"] for m in finals][:-1] == [False] * (len(finals) - 1)
    assert finals[-1]["speech_final"] is True
    assert all(m["duration"] <= 4.0 + 0.05 for m in finals)


def test_silence_and_noise_are_never_decoded() -> None:
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(16000 * 4) * 10 ** (-50 / 20)).astype(np.float32)
    quiet = np.concatenate([np.zeros(16000 * 3, np.float32), noise])
    backend = ToneBackend()

    async def main() -> Any:
        async with listen_url(tone_engine(backend)) as url:
            return await transcribe_stream(url, quiet, realtime=False, interim_results=True)

    result = run(main)
    assert result.close_code == 1000
    assert not result.finals and not result.interims
    assert backend.windows_decoded == 0


def test_random_weight_whisper_end_to_end(micro_model: Any, testdata: Any) -> None:
    from earshot.models.runner import RunnerSettings, WhisperRunner
    from earshot.service.engine.audiofile import load_audio
    from tests.kit.paths import audio_dir

    runner = WhisperRunner(micro_model, RunnerSettings(device="cpu"))
    first = load_audio(audio_dir() / "librispeech" / "1089-134686-0001.flac").samples
    second = load_audio(audio_dir() / "librispeech" / "1089-134686-0002.flac").samples
    audio = np.concatenate([first, np.zeros(16000, np.float32), second]).astype(np.float32)
    cfg = load_config(env={}, overrides={"final_beam_size": 2})
    engine = Engine.create(cfg, runner, vad_model=shared_model())

    async def main() -> Any:
        async with listen_url(engine) as url:
            return await transcribe_stream(url, audio, realtime=False, interim_results=True)

    result = run(main)
    assert result.close_code == 1000
    texts = finals_text(result)
    assert len(texts) >= 2 and all(len(t.split()) >= 4 for t in texts)
    meta = result.metadata["earshot"]
    assert meta["model"]["model_sha256"] == runner.provenance()["model_sha256"]
    assert meta["decoding"]["final"]["beam_size"] == 2
    assert "path" not in meta["model"]
    words = result.finals[0][0]["channel"]["alternatives"][0]["words"]
    assert words and all(w["start"] <= w["end"] for w in words)


def test_a_client_that_never_reads_is_closed_and_memory_stays_bounded() -> None:
    script = random_script(30, (3, 6), seed=3)
    audio, _ = make_speech(script, 16000, gap_s=0.7)
    stereo8 = np.repeat(audio[:, None], 8, axis=1)
    pcm = encode_audio(stereo8, "linear16")
    engine = tone_engine(max_pending_messages=8, interim_step_s=0.1)

    async def main() -> Any:
        async with running_server(engine) as url:
            query = "channels=8&multichannel=true&interim_results=true&vad_events=true"
            sock = await non_reading_websocket(url, query)
            loop = asyncio.get_running_loop()
            # From here on the client sends audio and never reads a byte.
            sent = 0
            try:
                # Speech, again and again (bounded), until the server gives up.
                for _ in range(8):
                    for i in range(0, len(pcm), 32000):
                        frame = masked_frame(0x2, pcm[i : i + 32000])
                        await asyncio.wait_for(loop.sock_sendall(sock, frame), 5)
                        sent += 1
                        if engine.closes:
                            break
                    if engine.closes:
                        break
            except (OSError, asyncio.TimeoutError):
                pass  # the server closed or stopped reading: expected
            for _ in range(200):
                if engine.active_streams == 0:
                    break
                await asyncio.sleep(0.05)
            sock.close()
            return sent, engine.active_streams, dict(engine.closes)

    sent, active, closes = run(main)
    assert sent > 0
    assert active == 0
    assert closes == {4430: 1}


def test_warm_up_decodes_with_both_option_sets() -> None:
    backend = ToneBackend()
    engine = tone_engine(backend)
    assert engine.warm_up() >= 0.0
    assert backend.calls == 2
