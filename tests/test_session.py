"""The per-stream state machine, driven directly: bytes and results in,
requests and events out, no event loop and no sockets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from earshot.clients.audio import encode_audio
from earshot.core.decoding import DecodeOptions
from earshot.core.errors import LaggingError
from earshot.core.protocol import TranscriptEvent, WarningEvent, parse_params
from earshot.core.session import FINAL, INTERIM, DecodeRequest, SessionSettings, StreamSession
from earshot.core.stabilizer import Stabilizer, normalize_word
from earshot.models.silero import shared_model
from tests.kit.tones import ToneBackend, make_speech

TONE = ToneBackend()


def session(query: str = "", **settings: float) -> StreamSession:
    pairs = [tuple(kv.split("=")) for kv in query.split("&") if kv]
    return StreamSession(parse_params(pairs), SessionSettings(**settings), shared_model())  # type: ignore[arg-type]


def feed(s: StreamSession, audio: np.ndarray, frame_ms: int = 20) -> list[DecodeRequest]:
    pcm = encode_audio(audio, "linear16")
    step = 16000 * frame_ms // 1000 * 2
    requests: list[DecodeRequest] = []
    for i in range(0, len(pcm), step):
        out = s.push(pcm[i : i + step])
        assert not out.events or all(not isinstance(e, TranscriptEvent) for e in out.events)
        requests += out.requests
    return requests


def decode(req: DecodeRequest):  # type: ignore[no-untyped-def]
    return TONE.transcribe_batch([req.window], DecodeOptions())[0]


def test_finals_are_emitted_in_order_whatever_order_results_arrive() -> None:
    script = [["alpha"], ["bravo", "charlie"], ["delta"]]
    audio, _ = make_speech(script, 16000)
    s = session()
    requests = feed(s, audio)
    out, err = s.finish()
    requests += out.requests
    finals = [r for r in requests if r.kind == FINAL]
    assert [r.utterance for r in finals] == [0, 1, 2]
    assert err is None and s.pending_finals == 3
    events = []
    for req in reversed(finals):  # results come back last first
        events += s.on_result(req, decode(req))
    texts = [e.transcript for e in events if isinstance(e, TranscriptEvent)]
    assert texts == ["alpha", "bravo charlie", "delta"]
    assert s.pending_finals == 0
    # Utterances never overlap.
    assert all(a.end <= b.start for a, b in itertools.pairwise(finals))


def test_interims_step_and_one_at_a_time() -> None:
    audio, _ = make_speech([["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]], 16000)
    s = session("interim_results=true", interim_step_s=0.5)
    requests = feed(s, audio)
    interims = [r for r in requests if r.kind == INTERIM]
    # Nobody answered the first interim, so no second one was asked for.
    assert len(interims) == 1
    first = interims[0]
    assert first.end - first.start >= int(0.4 * 16000)
    events = s.on_result(first, decode(first))
    # The utterance closed while the interim was decoding: its result is stale.
    assert [r.kind for r in requests].count(FINAL) == 1
    assert events == []


def test_interim_result_while_open_and_stable_words() -> None:
    audio, _ = make_speech(
        [["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]], 16000, tail_s=0.0
    )
    s = session("interim_results=true", interim_step_s=0.3)
    pcm = encode_audio(audio, "linear16")
    seen: list[TranscriptEvent] = []
    for i in range(0, len(pcm), 640):
        out = s.push(pcm[i : i + 640])
        for req in out.requests:
            if req.kind == INTERIM:
                seen += [e for e in s.on_result(req, decode(req)) if isinstance(e, TranscriptEvent)]
    assert len(seen) >= 3
    assert all(not e.is_final for e in seen)
    words = [e.transcript.split() for e in seen]
    for earlier, later in itertools.pairwise(words):
        assert later[: len(earlier)] == earlier  # each interim extends the last
    assert seen[-1].stable_words >= 1


def test_superseded_and_failed_results() -> None:
    audio, _ = make_speech([["alpha", "bravo"]], 16000)
    s = session()
    requests = feed(s, audio) + s.finish()[0].requests
    (final,) = [r for r in requests if r.kind == FINAL]
    events = s.on_result(final, None, RuntimeError("backend down"))
    assert [e.code for e in events if isinstance(e, WarningEvent)] == ["decode_failed"]
    assert s.pending_finals == 0


def test_lag_warning_and_limit() -> None:
    script = [["alpha"], ["bravo"], ["charlie"], ["delta"], ["echo"]]
    audio, _ = make_speech(script, 16000, gap_s=1.0)
    s = session(lag_warning_s=1.0, lag_limit_s=3.5)
    pcm = encode_audio(audio, "linear16")
    warnings: list[WarningEvent] = []
    with pytest.raises(LaggingError) as info:
        for i in range(0, len(pcm), 640):
            s.push(pcm[i : i + 640])  # nobody answers: finals pile up
            warnings += [e for e in s.check_lag() if isinstance(e, WarningEvent)]
    assert [w.code for w in warnings] == ["lagging"]
    assert info.value.code == "stream_lagging" and info.value.ws_close_code == 4429
    assert s.lag_seconds() > 3.5


def test_mixed_down_unless_multichannel() -> None:
    a, _ = make_speech([["alpha"]], 16000)
    stereo = np.stack([a, np.zeros_like(a)], axis=1)
    assert session("channels=2").channels == 1
    s = session("channels=2&multichannel=true")
    assert s.channels == 2
    pcm = encode_audio(stereo, "linear16")
    requests = []
    for i in range(0, len(pcm), 1280):
        requests += s.push(pcm[i : i + 1280]).requests
    requests += s.finish()[0].requests
    assert {r.channel for r in requests if r.kind == FINAL} == {0}


def test_stabilizer() -> None:
    st = Stabilizer()
    assert st.update(["Hello", "there"]) == 0
    assert st.update(["hello,", "there", "friend"]) == 2
    assert st.update(["hello", "where"]) == 1
    st.reset()
    assert st.update(["hello"]) == 0
    assert normalize_word("  Don't! ") == "don't"
