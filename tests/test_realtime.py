"""The official ``openai`` SDK's realtime client against a real Earshot server.

Every test serves an engine on 127.0.0.1, points ``AsyncOpenAI(base_url=...)``
at its ``/v1`` and opens ``client.realtime.connect()`` (the beta client,
``client.beta.realtime.connect()``, in one test): a transcription session
on the one engine. The tone language (tests/kit/tones.py) gives exact words;
one test uses the real tiny.en model on a LibriSpeech recording and scores
its word error rate. Each wait for an event is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soxr

from earshot.service.engine.audiofile import load_audio
from tests.kit.live import running_server, tone_engine
from tests.kit.tones import g711_encode, make_speech
from tests.kit.wer import normalize, score

try:
    from openai import AsyncOpenAI
    from openai.types.realtime import (
        ConversationItemInputAudioTranscriptionCompletedEvent,
        RealtimeErrorEvent,
        SessionCreatedEvent,
    )
    from websockets.exceptions import ConnectionClosed, InvalidStatus
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"the openai SDK's realtime client is missing: {exc}", allow_module_level=True)

pytestmark = pytest.mark.timeout(120)

COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"

Event = dict[str, Any]


def pcm16(audio: npt.NDArray[np.float32]) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.asynccontextmanager
async def realtime(
    url: str, *, api_key: str = "anything", beta: bool = False
) -> AsyncIterator[Any]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
    if beta:
        # The beta client always dials wss:// unless told a websocket base.
        ws_base = url.replace("http://", "ws://", 1) + "/v1"
        client = AsyncOpenAI(
            base_url=f"{url}/v1", websocket_base_url=ws_base, api_key=api_key, max_retries=0
        )
        manager = client.beta.realtime.connect(
            model="gpt-4o-transcribe", extra_query={"intent": "transcription"}
        )
    else:
        manager = client.realtime.connect(
            model="gpt-realtime", extra_query={"intent": "transcription"}
        )
    async with manager as conn:
        yield conn


class Reader:
    """Reads a connection's events: as the SDK parses them (``typed``) and as
    they were sent (``events``); every wait is bounded."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.events: list[Event] = []
        self.typed: list[Any] = []

    async def until(
        self, done: Callable[[list[Event]], bool], timeout: float = 20.0
    ) -> list[Event]:
        async def loop() -> None:
            while not done(self.events):
                data = await self.conn.recv_bytes()
                self.typed.append(self.conn.parse_event(data))
                self.events.append(json.loads(data))

        await asyncio.wait_for(loop(), timeout)
        return self.events

    async def count(self, kind: str, n: int, timeout: float = 20.0) -> list[Event]:
        await self.until(lambda evs: sum(e["type"] == kind for e in evs) >= n, timeout)
        return [e for e in self.events if e["type"] == kind]

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e["type"] == kind]


async def send_paced(conn: Any, pcm: bytes, chunk: int, pause: float = 0.01) -> None:
    """Append ``pcm`` in chunks of ``chunk`` bytes, a little faster than real time."""
    for i in range(0, len(pcm), chunk):
        await conn.input_audio_buffer.append(audio=b64(pcm[i : i + chunk]))
        await asyncio.sleep(pause)


def vad_session(**turn: Any) -> dict[str, Any]:
    return {
        "type": "transcription",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500, **turn},
            }
        },
    }


def manual_session(fmt: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "transcription",
        "audio": {
            "input": {
                "format": fmt or {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "whisper-1"},
                "turn_detection": None,
            }
        },
    }


def deltas_of(events: list[Event], item_id: str) -> str:
    return "".join(e["delta"] for e in events if e["type"] == DELTA and e["item_id"] == item_id)


def _prefixes(text: str) -> list[str]:
    words = text.split()
    return [" ".join(words[:n]) for n in range(1, len(words) + 1)]


# -- server VAD -------------------------------------------------------------------


def test_server_vad_deltas_then_completed_with_the_exact_words() -> None:
    script = [
        ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"],
        ["hotel", "india", "juliett", "kilo", "lima"],
    ]
    audio, truth = make_speech(script, 24000, tail_s=1.5)

    async def main() -> None:
        async with running_server(tone_engine()) as url, realtime(url) as conn:
            r = Reader(conn)
            created = (await r.count("session.created", 1))[0]
            assert isinstance(r.typed[0], SessionCreatedEvent)
            # Earshot's provenance rides along; the SDK's model keeps it.
            assert created["earshot"]["model"]["name"] == "tone"
            assert "policy" in created["earshot"]
            assert created["session"]["type"] == "transcription"
            await conn.session.update(session=vad_session())
            updated = (await r.count("session.updated", 1))[0]
            turn = updated["session"]["audio"]["input"]["turn_detection"]
            assert turn["type"] == "server_vad" and turn["silence_duration_ms"] == 500
            await send_paced(conn, pcm16(audio), 4800)  # 100 ms a chunk
            done = await r.count(COMPLETED, 2)

            assert [e["transcript"] for e in done] == truth.texts
            assert all(isinstance(t, ConversationItemInputAudioTranscriptionCompletedEvent)
                       for t in r.typed if getattr(t, "type", "") == COMPLETED)  # fmt: skip
            started = r.of("input_audio_buffer.speech_started")
            stopped = r.of("input_audio_buffer.speech_stopped")
            commits = r.of("input_audio_buffer.committed")
            ids = [e["item_id"] for e in done]
            assert [e["item_id"] for e in started] == ids
            assert [e["item_id"] for e in stopped] == ids
            assert [e["item_id"] for e in commits] == ids
            assert commits[1]["previous_item_id"] == ids[0]
            # Each item: speech_started < its deltas < speech_stopped <= committed < completed.
            kinds = [(e["type"], e.get("item_id")) for e in r.events]
            for item in ids:
                order = [k for k, i in kinds if i == item]
                assert order[0] == "input_audio_buffer.speech_started"
                assert order[-3:] == [
                    "input_audio_buffer.speech_stopped",
                    "input_audio_buffer.committed",
                    COMPLETED,
                ]
            for u, e in zip(truth.utterances, started, strict=True):
                assert abs(e["audio_start_ms"] / 1000 - u.start) < 0.5
            for u, e in zip(truth.utterances, stopped, strict=True):
                assert u.end - 0.1 < e["audio_end_ms"] / 1000 < u.end + 1.0
            # The deltas are newly stable words: their concatenation is a
            # word prefix of the final transcript, never a revision.
            total = 0
            for e, text in zip(done, truth.texts, strict=True):
                said = deltas_of(r.events, e["item_id"]).split()
                assert said == text.split()[: len(said)]
                total += len(said)
                assert e["earshot"]["utterances"][0]["provenance"]["backend"] == "local"
                assert e["usage"]["type"] == "duration" and e["usage"]["seconds"] > 0
            assert total > 0, "no delta was sent"

    asyncio.run(main())


def test_server_vad_settings_in_effect() -> None:
    """threshold and prefix_padding_ms set the voice detector; what is in
    effect is reported (clamped), and ignored fields are listed."""

    async def main() -> None:
        async with running_server(tone_engine()) as url, realtime(url) as conn:
            r = Reader(conn)
            session = vad_session(threshold=1.0, prefix_padding_ms=300, silence_duration_ms=20)
            session["audio"]["input"]["noise_reduction"] = {"type": "near_field"}
            await conn.session.update(session=session)
            updated = (await r.count("session.updated", 1))[0]
            turn = updated["session"]["audio"]["input"]["turn_detection"]
            assert turn == {
                "type": "server_vad",
                "threshold": 0.99,
                "prefix_padding_ms": 300,
                "silence_duration_ms": 100,
            }
            assert updated["session"]["audio"]["input"]["noise_reduction"] is None
            assert "session.audio.input.noise_reduction" in updated["earshot"]["ignored_parameters"]
            assert updated["earshot"]["settings"]["endpointing"] == 100

    asyncio.run(main())


def test_commit_under_server_vad_closes_the_open_utterance() -> None:
    """A commit while speech is under way commits it at the end of the audio
    appended (committed, no speech_stopped); item ids follow one another."""
    words = ["alpha", "bravo", "charlie", "delta"]
    speech, _ = make_speech([words], 24000, tail_s=0.0)

    async def main() -> None:
        async with running_server(tone_engine()) as url, realtime(url) as conn:
            r = Reader(conn)
            await conn.session.update(session=vad_session())
            await r.count("session.updated", 1)
            await send_paced(conn, pcm16(speech), 4800)
            started = (await r.count("input_audio_buffer.speech_started", 1))[0]
            await conn.input_audio_buffer.commit()
            done = await r.count(COMPLETED, 1)
            assert done[0]["transcript"] == " ".join(words)
            (commit,) = r.of("input_audio_buffer.committed")
            assert commit["item_id"] == started["item_id"] == done[0]["item_id"]
            assert not r.of("input_audio_buffer.speech_stopped")
            assert started["item_id"].startswith("item_") and started["item_id"].endswith("_1")

    asyncio.run(main())


def test_a_fatal_error_is_an_openai_error_event_before_the_close() -> None:
    async def main() -> None:
        engine = tone_engine(idle_timeout_s=0.5)
        async with running_server(engine) as url, realtime(url) as conn:
            r = Reader(conn)
            await r.count("session.created", 1)
            err = (await r.count("error", 1, timeout=10))[0]
            assert err["error"]["code"] == "idle_timeout"
            assert err["error"]["type"] == "invalid_request_error"
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(conn.recv(), 10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 4408

    asyncio.run(main())


# -- manual commit ----------------------------------------------------------------


def test_manual_commit_without_turn_detection() -> None:
    first, t1 = make_speech([["alpha", "charlie", "echo"]], 24000, tail_s=0.3)
    # A pause past 10 s: the endpointer closes the first utterance itself.
    second, t2 = make_speech([["golf", "india"], ["kilo", "mike"]], 24000, gap_s=10.6, tail_s=0.3)

    async def main() -> None:
        async with running_server(tone_engine()) as url, realtime(url) as conn:
            r = Reader(conn)
            await conn.session.update(session=manual_session())
            await r.count("session.updated", 1)
            await send_paced(conn, pcm16(first), 9600, pause=0.0)
            await conn.input_audio_buffer.commit()
            done = await r.count(COMPLETED, 1)
            commits = r.of("input_audio_buffer.committed")
            assert done[0]["transcript"] == t1.text
            assert commits[0]["item_id"] == done[0]["item_id"]
            assert commits[0]["previous_item_id"] is None
            # Two utterances before one commit: one item.
            await send_paced(conn, pcm16(second), 9600, pause=0.0)
            await conn.input_audio_buffer.commit()
            done = await r.count(COMPLETED, 2)
            commits = r.of("input_audio_buffer.committed")
            assert done[1]["transcript"] == t2.text == "golf india kilo mike"
            assert commits[1]["item_id"] == done[1]["item_id"]
            assert commits[1]["previous_item_id"] == done[0]["item_id"]
            assert len(done[1]["earshot"]["utterances"]) == 2
            # No turn detection: no speech events.
            assert not r.of("input_audio_buffer.speech_started")
            assert not r.of("input_audio_buffer.speech_stopped")
            # Nothing appended since: a commit is refused, and the stream goes on.
            await conn.input_audio_buffer.commit(event_id="c3")
            err = (await r.count("error", 1))[0]["error"]
            assert err["code"] == "input_audio_buffer_commit_empty" and err["event_id"] == "c3"

    asyncio.run(main())


def test_g711_ulaw_at_8khz() -> None:
    audio, truth = make_speech([["bravo", "delta", "foxtrot", "hotel"]], 8000, tail_s=0.3)

    async def main() -> None:
        async with running_server(tone_engine()) as url, realtime(url) as conn:
            r = Reader(conn)
            await conn.session.update(session=manual_session({"type": "audio/pcmu"}))
            updated = (await r.count("session.updated", 1))[0]
            assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
            assert updated["earshot"]["settings"]["encoding"] == "mulaw"
            assert updated["earshot"]["settings"]["sample_rate"] == 8000
            await send_paced(conn, g711_encode(audio, "mulaw"), 1600, pause=0.0)
            await conn.input_audio_buffer.commit()
            done = await r.count(COMPLETED, 1)
            assert done[0]["transcript"] == truth.text

    asyncio.run(main())


def test_beta_transcription_session_update() -> None:
    """The beta client (``OpenAI-Beta: realtime=v1``) gets the beta event names
    and session shape; g711_alaw is its A-law."""
    audio, truth = make_speech([["echo", "kilo", "oscar"]], 8000, tail_s=0.3)

    async def main() -> None:
        async with running_server(tone_engine()) as url, realtime(url, beta=True) as conn:
            r = Reader(conn)
            created = (await r.count("transcription_session.created", 1))[0]
            assert created["session"]["input_audio_format"] == "pcm16"
            await conn.send(
                {
                    "type": "transcription_session.update",
                    "session": {
                        "input_audio_format": "g711_alaw",
                        "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                        "turn_detection": None,
                    },
                }
            )
            updated = (await r.count("transcription_session.updated", 1))[0]
            assert updated["session"]["input_audio_format"] == "g711_alaw"
            assert updated["session"]["turn_detection"] is None
            await send_paced(conn, g711_encode(audio, "alaw"), 1600, pause=0.0)
            await conn.send({"type": "input_audio_buffer.commit"})
            done = await r.count(COMPLETED, 1)
            assert done[0]["transcript"] == truth.text

    asyncio.run(main())


# -- clear ------------------------------------------------------------------------


def test_clear_drops_the_uncommitted_audio() -> None:
    dropped, _ = make_speech([["alpha", "bravo", "charlie"]], 24000, tail_s=0.3)
    kept, truth = make_speech([["november", "oscar", "papa"]], 24000, tail_s=0.3)

    async def main() -> None:
        async with running_server(tone_engine()) as url, realtime(url) as conn:
            r = Reader(conn)
            await conn.session.update(session=manual_session())
            await r.count("session.updated", 1)
            await send_paced(conn, pcm16(dropped), 9600, pause=0.0)
            await conn.input_audio_buffer.clear(event_id="clr")
            await r.count("input_audio_buffer.cleared", 1)
            # Nothing is left to commit.
            await conn.input_audio_buffer.commit()
            err = (await r.count("error", 1))[0]["error"]
            assert err["code"] == "input_audio_buffer_commit_empty"
            await send_paced(conn, pcm16(kept), 9600, pause=0.0)
            await conn.input_audio_buffer.commit()
            done = await r.count(COMPLETED, 1)
            assert done[0]["transcript"] == truth.text
            assert len(r.of("input_audio_buffer.committed")) == 1
            # The cleared words are in no transcript (a delta may have said them
            # before the clear: deltas are sent as words become stable).
            assert [e["transcript"] for e in r.of(COMPLETED)] == ["november oscar papa"]
            assert deltas_of(r.events, done[0]["item_id"]) in ("", *_prefixes(truth.text))

    asyncio.run(main())


def test_clear_under_server_vad_drops_the_open_utterance() -> None:
    """Cleared while an utterance is open (no speech_stopped yet): its item is
    never committed; the next utterance is transcribed as usual."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    open_speech, _ = make_speech([words], 24000, tail_s=0.0)
    later, truth = make_speech([["lima", "mike"]], 24000, lead_s=1.0, tail_s=1.5)

    async def main() -> None:
        async with running_server(tone_engine()) as url, realtime(url) as conn:
            r = Reader(conn)
            await conn.session.update(session=vad_session())
            await r.count("session.updated", 1)
            await send_paced(conn, pcm16(open_speech), 4800)
            await r.count("input_audio_buffer.speech_started", 1)
            await conn.input_audio_buffer.clear()
            await r.count("input_audio_buffer.cleared", 1)
            cleared_item = r.of("input_audio_buffer.speech_started")[0]["item_id"]
            await send_paced(conn, pcm16(later), 4800)
            await r.until(lambda evs: any(e.get("transcript") for e in evs))
            done = r.of(COMPLETED)
            # The speech under way at the clear opens a new item at once; it
            # held the end of the cleared word at most, so it is empty.
            assert [e["transcript"] for e in done if e["transcript"]] == [truth.text]
            assert all(e["transcript"] == "" for e in done[:-1])
            commits = r.of("input_audio_buffer.committed")
            assert [c["item_id"] for c in commits] == [e["item_id"] for e in done]
            assert cleared_item not in [c["item_id"] for c in commits]

    asyncio.run(main())


# -- bad input --------------------------------------------------------------------


def test_bad_input_gets_openai_errors_and_the_stream_goes_on() -> None:
    first, t1 = make_speech([["alpha", "bravo", "charlie"]], 24000, tail_s=0.3)
    second, t2 = make_speech([["delta", "echo"]], 24000, tail_s=0.3)

    async def main() -> None:
        async with running_server(tone_engine()) as url, realtime(url) as conn:
            r = Reader(conn)
            await conn.session.update(session=manual_session())
            await r.count("session.updated", 1)
            await send_paced(conn, pcm16(first), 9600, pause=0.0)
            await conn.input_audio_buffer.commit()
            await r.count(COMPLETED, 1)
            # A transcript already produced is not lost by what follows.
            await send_paced(conn, pcm16(second[: len(second) // 2]), 9600, pause=0.0)
            raw = conn._connection  # the websocket, for frames the SDK would not send

            def ev(kind: str, eid: str, **fields: Any) -> str:
                return json.dumps({"type": kind, "event_id": eid, **fields})

            def upd(eid: str, session: dict[str, Any]) -> str:
                return ev("session.update", eid, session=session)

            tx = {"type": "transcription"}
            bad: list[tuple[str | bytes, str, str | None]] = [
                (ev("input_audio_buffer.frobnicate", "e1"), "unknown_event", "e1"),
                (ev("input_audio_buffer.commit", "e2", foo=1), "unknown_parameter", "e2"),
                (ev("input_audio_buffer.append", "e3", audio="%%%not b64"), "invalid_audio", "e3"),
                (ev("response.create", "e4"), "unsupported_feature", "e4"),
                (ev("conversation.item.create", "e5", item={}), "unsupported_feature", "e5"),
                ("this is not json", "invalid_event", None),
                (b"\x00\x01binary", "invalid_event", None),
                (upd("e6", manual_session({"type": "audio/pcmu"})), "session_locked", "e6"),
                (upd("e7", {"type": "realtime"}), "unsupported_feature", "e7"),
                (upd("e8", {**tx, "tools": []}), "unsupported_feature", "e8"),
                (upd("e9", {**tx, "audio": {"input": {"bogus": 1}}}), "unknown_parameter", "e9"),
                (upd("e10", {**tx, "audio": {"output": {}}}), "unsupported_feature", "e10"),
            ]
            for frame, _, _ in bad:
                await raw.send(frame)
            errors = await r.count("error", len(bad))
            for (frame, code, event_id), got in zip(bad, errors, strict=True):
                err = got["error"]
                assert err["code"] == code, (frame, err)
                assert err["type"] == "invalid_request_error"
                assert err["event_id"] == event_id
                assert err["message"]
            assert errors[1]["error"]["param"] == "foo"
            assert errors[3]["error"]["message"].startswith("response.create is not supported")
            assert "audio format cannot change" in errors[7]["error"]["message"]
            assert errors[8]["error"]["param"] == "session.type"
            assert errors[10]["error"]["param"] == "session.audio.input.bogus"
            assert all(isinstance(t, RealtimeErrorEvent) for t in r.typed if t.type == "error")
            # The stream goes on: the rest of the audio, a commit, the words.
            await send_paced(conn, pcm16(second[len(second) // 2 :]), 9600, pause=0.0)
            await conn.input_audio_buffer.commit()
            done = await r.count(COMPLETED, 2)
            assert [e["transcript"] for e in done] == [t1.text, t2.text]

    asyncio.run(main())


def test_refusals_before_the_upgrade_are_openai_shaped() -> None:
    """With API keys configured, a missing or wrong key is refused with 401
    and OpenAI's error envelope; the right key opens the session."""

    async def main() -> None:
        import aiohttp

        async with running_server(tone_engine(api_keys="sekrit")) as url:
            with pytest.raises(InvalidStatus) as info:
                async with realtime(url, api_key="wrong"):
                    pass
            response = info.value.response
            assert response.status_code == 401
            body = json.loads(response.body or b"{}")
            assert body["error"]["code"] == "unauthorized"
            assert body["error"]["type"] == "authentication_error"
            async with realtime(url, api_key="sekrit") as conn:
                r = Reader(conn)
                await r.count("session.created", 1)
            async with aiohttp.ClientSession() as http:
                got = await http.get(
                    f"{url}/v1/realtime?intent=speech",
                    headers={"Authorization": "Bearer sekrit"},
                )
                assert got.status == 400
                assert (await got.json())["error"]["code"] == "invalid_parameter"

    asyncio.run(main())


# -- the real model ---------------------------------------------------------------

REAL_FILES = ("1089-134686-0000.flac", "1089-134686-0002.flac")
MAX_WER = 0.10
"""tiny.en's word error rate on these LibriSpeech test-clean files, through
the stream, must stay under 10 % (measured: 2.2 %)."""


def test_real_words_with_tiny_en(
    tiny_en_model: Path, testdata: Path, audio_manifest: list[dict[str, Any]]
) -> None:
    from tests.kit.real_models import real_model_server

    refs = {m["path"]: m["text"] for m in audio_manifest}
    audio_root = testdata / "audio" / "librispeech"
    clips = []
    for name in REAL_FILES:
        loaded = load_audio(audio_root / name)
        samples = np.asarray(loaded.samples, dtype=np.float32)
        at_24k = soxr.resample(samples, 16000, 24000).astype(np.float32)
        tail = np.zeros(24000, np.float32)
        clips.append((pcm16(np.concatenate([at_24k, tail])), refs[f"librispeech/{name}"]))

    async def main(url: str) -> list[str]:
        texts = []
        async with realtime(url) as conn:
            r = Reader(conn)
            await conn.session.update(session=manual_session())
            await r.count("session.updated", 1, timeout=60)
            for n, (pcm, _) in enumerate(clips, start=1):
                await send_paced(conn, pcm, 24000, pause=0.0)
                await conn.input_audio_buffer.commit()
                done = await r.count(COMPLETED, n, timeout=90)
                texts.append(done[-1]["transcript"])
                assert done[-1]["earshot"]["utterances"][0]["provenance"]["backend"] == "local"
        return texts

    with real_model_server(tiny_en_model) as live:
        texts = asyncio.run(main(live.url))
    total = None
    for text, (_, ref) in zip(texts, clips, strict=True):
        s = score(ref, text)
        total = s if total is None else total + s
    assert total is not None
    print(f"tiny.en through /v1/realtime: WER {total.wer:.3f}")
    assert total.wer <= MAX_WER, (total.wer, [normalize(t) for t in texts])
