"""The pure parts of OpenAI Realtime sessions (earshot.core.realtime), and the
session hooks they use (report_closes, discard, finalize at the end), driven
directly: no event loop, no sockets."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earshot.clients.audio import encode_audio
from earshot.core.decoding import DecodeOptions
from earshot.core.errors import EarshotError
from earshot.core.protocol import SpeechStartedEvent, StreamParams, TranscriptEvent
from earshot.core.realtime import (
    DeltaTracker,
    Ids,
    SessionConfig,
    apply_update,
    changed_settings,
    completed,
    default_config,
    error_event,
    parse_client_event,
    session_event,
    stream_params,
    vad_overrides,
)
from earshot.core.session import FINAL, DecodeRequest, StreamSession
from earshot.models.silero import shared_model
from tests.kit.tones import ToneBackend, make_speech

BASE = default_config("base", threshold=0.5, prefix_padding_ms=200)
TONE = ToneBackend()


def code_of(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    with pytest.raises(EarshotError) as info:
        fn(*args, **kwargs)
    return info.value.code, info.value.details


# -- client events ----------------------------------------------------------------


def test_append_decodes_base64_audio() -> None:
    ev = parse_client_event(
        json.dumps({"type": "input_audio_buffer.append", "event_id": "a", "audio": "AAEC"})
    )
    assert (ev.type, ev.event_id, ev.audio) == ("input_audio_buffer.append", "a", b"\x00\x01\x02")


@pytest.mark.parametrize(
    ("text", "code", "field", "event_id"),
    [
        ("nope", "invalid_event", None, None),
        ("[1, 2]", "invalid_event", "type", None),
        ('{"event_id": "x"}', "invalid_event", "type", "x"),
        ('{"type": "bogus.event", "event_id": "x"}', "unknown_event", "type", "x"),
        ('{"type": "response.create"}', "unsupported_feature", "type", None),
        ('{"type": "conversation.item.delete", "item_id": "i"}', "unsupported_feature", "type", None),  # noqa: E501
        ('{"type": "output_audio_buffer.clear"}', "unsupported_feature", "type", None),
        ('{"type": "input_audio_buffer.clear", "extra": 1}', "unknown_parameter", "extra", None),
        ('{"type": "input_audio_buffer.append", "audio": "a=b"}', "invalid_audio", "audio", None),
        ('{"type": "input_audio_buffer.append", "audio": 5}', "invalid_audio", "audio", None),
        ('{"type": "input_audio_buffer.append"}', "invalid_audio", "audio", None),
        ('{"type": "session.update"}', "invalid_parameter", "session", None),
        ('{"type": "input_audio_buffer.commit", "event_id": 7}', "invalid_parameter", "event_id", None),  # noqa: E501
    ],
)  # fmt: skip
def test_bad_client_events(text: str, code: str, field: str | None, event_id: str | None) -> None:
    got, details = code_of(parse_client_event, text)
    assert got == code
    assert details.get("field") == field
    assert details.get("event_id") == event_id


def test_error_event_has_openais_shape() -> None:
    _, _ = code_of(parse_client_event, '{"type": "bogus", "event_id": "c1"}')
    try:
        parse_client_event('{"type": "bogus", "event_id": "c1"}')
    except EarshotError as exc:
        msg = error_event(exc, "event_9")
    assert msg == {
        "type": "error",
        "event_id": "event_9",
        "error": {
            "type": "invalid_request_error",
            "code": "unknown_event",
            "message": msg["error"]["message"],
            "param": "type",
            "event_id": "c1",
        },
    }


# -- settings ---------------------------------------------------------------------


def ga(**inp: Any) -> dict[str, Any]:
    return {"type": "transcription", "audio": {"input": inp}}


def test_ga_update_maps_onto_stream_params() -> None:
    cfg = apply_update(
        BASE,
        ga(
            format={"type": "audio/pcmu"},
            transcription={"model": "gpt-4o-transcribe", "language": "de-DE", "prompt": "Zürich"},
            turn_detection={"type": "server_vad", "silence_duration_ms": 700, "threshold": 0.6},
        ),
        beta_event=False,
    )
    params = stream_params(cfg)
    assert (params.audio.encoding, params.audio.sample_rate, params.audio.channels) == (
        "mulaw",
        8000,
        1,
    )
    assert params.language == "de"
    assert params.interim_results and params.vad_events
    assert params.endpointing_ms == 700
    assert params.keyterms == ("Zürich",)
    assert vad_overrides(cfg) == {"vad_threshold": 0.6, "speech_pad_ms": 200}
    # Fields not in the update keep their values.
    again = apply_update(cfg, ga(transcription={"keywords": ["Earshot"]}), beta_event=False)
    assert (again.audio, again.language, again.prompt) == ("g711_ulaw", "de", "Zürich")
    assert stream_params(again).keyterms == ("Zürich", "Earshot")
    assert changed_settings(cfg, again) == ["keywords"]


def test_turn_detection_null_is_manual_commit() -> None:
    cfg = apply_update(BASE, ga(turn_detection=None), beta_event=False)
    params = stream_params(cfg)
    assert params.endpointing_ms is None and not params.vad_events
    assert vad_overrides(cfg) == {}


@pytest.mark.parametrize(("silence", "want"), [(0, 100), (20, 100), (500, 500), (99_999, 10_000)])
def test_silence_duration_is_clamped_as_endpointing_is(silence: int, want: int) -> None:
    cfg = apply_update(
        BASE,
        ga(turn_detection={"type": "server_vad", "silence_duration_ms": silence}),
        beta_event=False,
    )
    assert stream_params(cfg).endpointing_ms == want
    obj = session_event("updated", cfg, "ga", "sess_1", "e1")
    assert obj["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == want


def test_beta_update_shape() -> None:
    cfg = apply_update(
        BASE,
        {
            "input_audio_format": "g711_alaw",
            "input_audio_transcription": {"model": "whisper-1", "language": "fr"},
            "turn_detection": None,
            "input_audio_noise_reduction": {"type": "far_field"},
        },
        beta_event=True,
    )
    assert (cfg.audio, cfg.language, cfg.turn_detection) == ("g711_alaw", "fr", None)
    assert cfg.ignored == ("session.input_audio_noise_reduction",)
    msg = session_event("updated", cfg, "beta", "sess_1", "e1")
    assert msg["type"] == "transcription_session.updated"
    assert msg["session"]["input_audio_format"] == "g711_alaw"
    assert msg["session"]["input_audio_transcription"]["language"] == "fr"


@pytest.mark.parametrize(
    ("session", "code", "field"),
    [
        ({"type": "realtime"}, "unsupported_feature", "session.type"),
        ({"type": "translation"}, "invalid_parameter", "session.type"),
        ({"type": "transcription", "tools": []}, "unsupported_feature", "session.tools"),
        ({"type": "transcription", "voice": "alloy"}, "unsupported_feature", "session.voice"),
        ({"type": "transcription", "audio": {"output": {}}}, "unsupported_feature", "session.audio.output"),  # noqa: E501
        ({"type": "transcription", "audio": {"input": {"x": 1}}}, "unknown_parameter", "session.audio.input.x"),  # noqa: E501
        ({"type": "transcription", "bogus": 1}, "unknown_parameter", "session.bogus"),
        (ga(format={"type": "audio/opus"}), "invalid_parameter", "session.audio.input.format.type"),
        (ga(format={"type": "audio/pcm", "rate": 16000}), "invalid_parameter", "session.audio.input.format.rate"),  # noqa: E501
        (ga(transcription=None), "unsupported_feature", "session.audio.input.transcription"),
        (ga(transcription={"language": "english!"}), "invalid_parameter", "session.audio.input.transcription.language"),  # noqa: E501
        (ga(transcription={"languages": ["en", "de"]}), "unsupported_feature", "session.audio.input.transcription.languages"),  # noqa: E501
        (ga(transcription={"prompt": "x" * 1001}), "invalid_parameter", "session.audio.input.transcription.prompt"),  # noqa: E501
        (ga(turn_detection={"type": "semantic_vad"}), "unsupported_feature", "session.audio.input.turn_detection.type"),  # noqa: E501
        (ga(turn_detection={"type": "server_vad", "threshold": "high"}), "invalid_parameter", "session.audio.input.turn_detection.threshold"),  # noqa: E501
        (ga(turn_detection={"type": "server_vad", "idle_timeout_ms": 5000}), "unsupported_feature", "session.audio.input.turn_detection.idle_timeout_ms"),  # noqa: E501
        ({"type": "transcription", "include": ["item.input_audio_transcription.logprobs"]}, "unsupported_feature", "session.include"),  # noqa: E501
        ({"input_audio_format": "opus"}, "invalid_parameter", "session.input_audio_format"),
    ],
)  # fmt: skip
def test_refused_updates_name_the_field(session: dict[str, Any], code: str, field: str) -> None:
    got, details = code_of(apply_update, BASE, session, beta_event=False)
    assert (got, details.get("field")) == (code, field)


def test_session_events_parse_as_the_sdks_models() -> None:
    pytest.importorskip("openai")
    from openai.types.beta.realtime import TranscriptionSessionUpdatedEvent
    from openai.types.realtime import (
        ConversationItemInputAudioTranscriptionCompletedEvent,
        SessionCreatedEvent,
    )

    cfg = apply_update(BASE, ga(turn_detection=None), beta_event=False)
    created = SessionCreatedEvent.model_validate(
        session_event("created", cfg, "ga", "sess_1", "e1", {"model": {"name": "base"}})
    )
    assert created.session.type == "transcription"
    # Extra fields are kept, not refused: Earshot's provenance reaches the client.
    assert created.model_extra == {"earshot": {"model": {"name": "base"}}}
    done = ConversationItemInputAudioTranscriptionCompletedEvent.model_validate(
        completed("e2", "item_1", "hello there", 1.5, {"utterances": []})
    )
    assert done.transcript == "hello there" and done.usage.type == "duration"
    beta_cfg = apply_update(cfg, ga(transcription={"model": "whisper-1"}), beta_event=False)
    beta = TranscriptionSessionUpdatedEvent.model_validate(
        session_event("updated", beta_cfg, "beta", "sess_1", "e3")
    )
    assert beta.session.turn_detection is None


# -- deltas -----------------------------------------------------------------------


def test_deltas_send_newly_stable_words_only() -> None:
    t = DeltaTracker()
    assert t.update(0, ["Hello"], 0) == ""
    assert t.update(0, ["Hello", "world"], 1) == "Hello"
    assert t.update(0, ["Hello", "world,", "how"], 2) == " world,"
    # A later interim disagrees with what was sent: nothing, never a revision.
    assert t.update(0, ["Yellow", "world", "how", "are"], 3) == ""
    # It agrees again (punctuation and case aside): the new words follow.
    assert t.update(0, ["hello", "World", "how", "are"], 3) == " how"
    # Fewer stable words than were sent: nothing.
    assert t.update(0, ["hello"], 1) == ""
    # The next utterance of the same item continues after a space.
    assert t.update(1, ["Fine", "thanks"], 1) == " Fine"
    assert t.text == "Hello world, how Fine"


def test_ids_are_distinct() -> None:
    ids = Ids("ab_")
    assert [ids.event(), ids.event(), ids.item()] == ["event_ab_1", "event_ab_2", "item_ab_1"]


# -- the session hooks ------------------------------------------------------------


def realtime_session(config: SessionConfig) -> StreamSession:
    return StreamSession(stream_params(config), vad_model=shared_model(), report_closes=True)


def feed(s: StreamSession, pcm: bytes, step: int = 960) -> tuple[list[DecodeRequest], list[Any]]:
    requests: list[DecodeRequest] = []
    events: list[Any] = []
    for i in range(0, len(pcm), step):
        out = s.push(pcm[i : i + step])
        requests += out.requests
        events += out.events
    return requests, events


def decode(s: StreamSession, req: DecodeRequest) -> list[Any]:
    return s.on_result(req, TONE.transcribe_batch([req.window], DecodeOptions())[0])


def test_report_closes_records_each_close_and_speech_starts_carry_the_utterance() -> None:
    audio, truth = make_speech([["alpha", "bravo"], ["charlie"]], 24000, tail_s=1.0)
    s = realtime_session(BASE)
    requests, events = feed(s, encode_audio(audio, "linear16"))
    starts = [e for e in events if isinstance(e, SpeechStartedEvent)]
    assert [e.utterance for e in starts] == [0, 1]
    closed = s.take_closed()
    assert [(c.utterance, c.from_finalize, c.discarded) for c in closed] == [
        (0, False, False),
        (1, False, False),
    ]
    assert s.take_closed() == []
    for c, u in zip(closed, truth.utterances, strict=True):
        assert u.end <= c.end < u.end + 0.8
    finals = [r for r in requests if r.kind == FINAL]
    texts = [e.transcript for r in finals for e in decode(s, r) if isinstance(e, TranscriptEvent)]
    assert texts == truth.texts


def test_discard_drops_the_open_utterance_undecoded() -> None:
    audio, _ = make_speech([["alpha", "bravo", "charlie", "delta"]], 24000, tail_s=0.0)
    s = realtime_session(apply_update(BASE, ga(turn_detection=None), beta_event=False))
    pcm = encode_audio(audio, "linear16")
    feed(s, pcm[: len(pcm) // 2])
    assert s.open_utterances == 1
    out = s.discard()
    assert not [r for r in out.requests if r.kind == FINAL]
    finals = [e for e in out.events if isinstance(e, TranscriptEvent) and e.is_final]
    # Every close gets its final with report_closes: this one is empty.
    assert [(f.utterance, f.transcript) for f in finals] == [(0, "")]
    assert [(c.utterance, c.discarded) for c in s.take_closed()] == [(0, True)]
    # Speech under way goes on in a new utterance.
    assert s.open_utterances == 1


def test_finalize_at_end_cuts_at_the_end_of_the_audio() -> None:
    # A 1 s pause inside a stream without endpointing: Finalize would cut in
    # the pause; a commit (at_end) takes all the audio.
    audio, truth = make_speech([["golf", "india"], ["kilo"]], 24000, tail_s=0.2)
    for at_end, want in ((False, ["golf india"]), (True, [truth.text])):
        s = realtime_session(apply_update(BASE, ga(turn_detection=None), beta_event=False))
        feed(s, encode_audio(audio, "linear16"))
        out = s.finalize(at_end=at_end)
        finals = [r for r in out.requests if r.kind == FINAL]
        texts = [
            e.transcript for r in finals for e in decode(s, r) if isinstance(e, TranscriptEvent)
        ]
        assert texts == want


def test_stream_params_default_is_24khz_pcm16() -> None:
    params = stream_params(BASE)
    assert params == StreamParams(
        audio=params.audio, language=None, interim_results=True, endpointing_ms=500,
        vad_events=True, model="base",
    )  # fmt: skip
    assert (params.audio.encoding, params.audio.sample_rate) == ("linear16", 24000)
    assert base64.b64encode(b"") == b""


# -- fuzzing ----------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
_keys = st.sampled_from(
    ["type", "audio", "input", "format", "transcription", "turn_detection", "rate", "language",
     "prompt", "keywords", "threshold", "silence_duration_ms", "prefix_padding_ms",
     "input_audio_format", "input_audio_transcription", "include", "noise_reduction", "model"]
)  # fmt: skip
_sessions = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 100_000)
    | st.floats()
    | st.sampled_from(
        ["transcription", "realtime", "server_vad", "audio/pcm", "audio/pcmu", "pcm16", "en", ""]
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=25,
)


def _coded(exc: EarshotError) -> None:
    assert exc.code and exc.code == exc.code.lower() and " " not in exc.code
    json.dumps(error_event(exc, "e"), allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), _json.map(json.dumps)))
def test_any_text_is_an_event_or_a_coded_error(text: str) -> None:
    try:
        ev = parse_client_event(text)
    except EarshotError as exc:
        _coded(exc)
    else:
        assert ev.type in ("session.update", "transcription_session.update") or ev.session is None


@settings(max_examples=400, deadline=None)
@given(_sessions, st.booleans())
def test_any_session_update_is_settings_or_a_coded_error(session: Any, beta: bool) -> None:
    try:
        cfg = apply_update(BASE, session, beta_event=beta)
    except EarshotError as exc:
        _coded(exc)
        return
    params = stream_params(cfg)
    assert params.interim_results
    assert params.endpointing_ms is None or 100 <= params.endpointing_ms <= 10_000
    vad = vad_overrides(cfg)
    assert not vad or (0 < vad["vad_threshold"] < 1 and 0 <= vad["speech_pad_ms"] <= 1000)
    json.dumps(session_event("updated", cfg, "beta" if beta else "ga", "s", "e"), allow_nan=False)
