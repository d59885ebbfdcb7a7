"""Voice activity: the detector's state machine on scripted probabilities, and
the real Silero model on real speech (LibriSpeech from the shared test data)."""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from earshot.core.errors import InvalidRequestError
from earshot.core.voice import (
    CONTEXT_SAMPLES,
    FRAME_SAMPLES,
    SAMPLE_RATE,
    SpeechEnd,
    SpeechSpan,
    SpeechStart,
    StreamingVad,
    VadEvent,
    VadSettings,
    segment_speech,
)
from earshot.models.silero import SileroModel, shared_model

F = FRAME_SAMPLES / SAMPLE_RATE  # one frame in seconds (0.032)
Audio = npt.NDArray[np.float32]


# --------------------------------------------------------------------------- helpers


class ScriptedModel:
    """A stand-in voice model: a frame's probability is the mean of its new
    samples, so a test writes the probabilities it wants into the audio."""

    def initial_state(self) -> None:
        return None

    def run(self, frames: Audio, state: None) -> tuple[Audio, None]:
        assert frames.shape[1] == CONTEXT_SAMPLES + FRAME_SAMPLES
        return frames[:, CONTEXT_SAMPLES:].mean(axis=1).astype(np.float32), state


def scripted(*runs: tuple[float, int]) -> Audio:
    """Audio whose frames score ``p`` for ``n`` frames, for each ``(p, n)``."""
    return np.concatenate([np.full(n * FRAME_SAMPLES, p, np.float32) for p, n in runs])


def at(seconds: float) -> float:
    """``seconds`` on the detector's grid (whole samples), for exact comparison."""
    return round(seconds * SAMPLE_RATE) / SAMPLE_RATE


def feed_in_chunks(vad: StreamingVad, audio: Audio, chunk: int) -> list[tuple[float, VadEvent]]:
    """Feed ``audio`` in pieces of ``chunk`` samples; return (stream time when
    the event came out, event) for every event, flush included."""
    out: list[tuple[float, VadEvent]] = []
    for i in range(0, len(audio), chunk):
        out.extend((vad.time, e) for e in vad.feed(audio[i : i + chunk]))
    out.extend((vad.time, e) for e in vad.flush())
    return out


def spans_of(events: list[VadEvent]) -> list[tuple[float, float]]:
    starts = [e.t for e in events if isinstance(e, SpeechStart)]
    ends = [e.t for e in events if isinstance(e, SpeechEnd)]
    assert len(starts) == len(ends)
    return list(zip(starts, ends, strict=True))


def assert_alternating(events: list[VadEvent]) -> None:
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStart, SpeechEnd] * (len(events) // 2), kinds
    times = [e.t for e in events]
    assert times == sorted(times)


# --------------------------------------------------------------------------- settings


def test_settings_defaults() -> None:
    s = VadSettings()
    assert s.threshold == 0.5
    assert s.effective_neg_threshold == pytest.approx(0.35)
    assert s.max_speech_s <= 30.0
    assert VadSettings(threshold=0.1).effective_neg_threshold == pytest.approx(0.01)
    assert VadSettings(neg_threshold=0.2).effective_neg_threshold == 0.2
    assert s.to_dict()["min_silence_ms"] == s.min_silence_ms


@pytest.mark.parametrize(
    ("field", "kwargs", "fragment"),
    [
        ("threshold", {"threshold": 0.0}, "(0, 1)"),
        ("threshold", {"threshold": 1.0}, "(0, 1)"),
        ("threshold", {"threshold": math.nan}, "(0, 1)"),
        ("threshold", {"threshold": "0.5"}, "(0, 1)"),
        ("threshold", {"threshold": True}, "(0, 1)"),
        ("neg_threshold", {"neg_threshold": 0.6}, "(0, 0.5]"),
        ("neg_threshold", {"neg_threshold": 0.0}, "(0, 0.5]"),
        ("min_speech_ms", {"min_speech_ms": -1}, "[0, 5000]"),
        ("min_speech_ms", {"min_speech_ms": 2.5}, "integer"),
        ("min_silence_ms", {"min_silence_ms": 10001}, "[0, 10000]"),
        ("speech_pad_ms", {"speech_pad_ms": -5}, "[0, 1000]"),
        ("max_speech_s", {"max_speech_s": 1.0}, "[2, 30]"),
        ("max_speech_s", {"max_speech_s": 31.0}, "[2, 30]"),
        ("quiet_window_ms", {"quiet_window_ms": 10}, "[32, 1000]"),
        ("history_s", {"history_s": 10.0}, "[25, 600]"),
        ("speech_pad_ms", {"max_speech_s": 2.0, "speech_pad_ms": 600}, "500 ms"),
    ],
)
def test_settings_validation(field: str, kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        VadSettings(**kwargs)
    err = info.value
    assert err.details["field"] == field
    assert field in err.message
    assert fragment in err.message
    assert err.to_dict()["code"] == "invalid_request"


# --------------------------------------------------------------------------- state machine

# Defaults: threshold 0.5, neg 0.35, min_speech 250 ms, min_silence 500 ms, pad 200 ms.


def test_utterance_times_and_when_events_come_out() -> None:
    vad = StreamingVad(ScriptedModel())
    audio = scripted((0.0, 10), (0.9, 20), (0.0, 30))
    out = feed_in_chunks(vad, audio, FRAME_SAMPLES)
    assert [e for _, e in out] == [
        SpeechStart(at(10 * F - 0.2)),
        SpeechEnd(at(30 * F + 0.2)),
    ]
    # The start is confirmed once min_speech_ms of speech was heard (8 frames)
    # and the end once min_silence_ms of silence was heard (16 frames).
    assert out[0][0] == pytest.approx(18 * F)
    assert out[1][0] == pytest.approx(46 * F)
    assert not vad.is_speech


def test_is_speech_follows_the_events() -> None:
    vad = StreamingVad(ScriptedModel())
    assert not vad.is_speech
    vad.feed(scripted((0.9, 10)))
    assert vad.is_speech
    vad.feed(scripted((0.0, 20)))
    assert not vad.is_speech


def test_a_blip_shorter_than_min_speech_is_not_speech() -> None:
    vad = StreamingVad(ScriptedModel())
    assert feed_in_chunks(vad, scripted((0.0, 5), (0.9, 5), (0.0, 40)), 320) == []


def test_hysteresis_between_thresholds() -> None:
    # Between neg_threshold and threshold: neither opens nor closes.
    vad = StreamingVad(ScriptedModel())
    audio = scripted((0.4, 30), (0.9, 10), (0.4, 40), (0.9, 10), (0.0, 30))
    events = [e for _, e in feed_in_chunks(vad, audio, 1000)]
    assert events == [
        SpeechStart(at(30 * F - 0.2)),
        SpeechEnd(at(90 * F + 0.2)),
    ]


def test_a_pause_shorter_than_min_silence_does_not_close() -> None:
    vad = StreamingVad(ScriptedModel(), VadSettings(min_silence_ms=500))
    audio = scripted((0.9, 10), (0.1, 15), (0.9, 10), (0.1, 16), (0.9, 10), (0.0, 20))
    assert spans_of([e for _, e in feed_in_chunks(vad, audio, 4000)]) == [
        (0.0, at(35 * F + 0.2)),
        (at(51 * F - 0.2), at(61 * F + 0.2)),
    ]


def test_padding_never_overlaps_the_previous_utterance() -> None:
    settings = VadSettings(speech_pad_ms=400, min_silence_ms=500)
    vad = StreamingVad(ScriptedModel(), settings)
    audio = scripted((0.0, 20), (0.9, 20), (0.0, 17), (0.9, 20), (0.0, 40))
    (s1, e1), (s2, e2) = spans_of([e for _, e in feed_in_chunks(vad, audio, 777)])
    assert s1 == pytest.approx(20 * F - 0.4)
    assert e1 == pytest.approx(40 * F + 0.4)
    assert s2 == e1  # 57 * F - 0.4 would overlap; clamped to the previous end
    assert e2 == pytest.approx(77 * F + 0.4)


def test_end_padding_stops_at_the_audio_heard() -> None:
    settings = VadSettings(speech_pad_ms=1000, min_silence_ms=300, max_speech_s=10.0)
    vad = StreamingVad(ScriptedModel(), settings)
    events = vad.feed(scripted((0.9, 20), (0.0, 10)))
    assert events == [SpeechStart(0.0), SpeechEnd(at(30 * F))]


def test_flush_closes_an_open_utterance_and_the_stream_goes_on() -> None:
    vad = StreamingVad(ScriptedModel())
    vad.feed(scripted((0.0, 10), (0.9, 20)))
    vad.feed(np.full(100, 0.9, np.float32))  # an incomplete frame: not scored
    assert vad.is_speech
    assert vad.flush() == [SpeechEnd(at(30 * F + 100 / SAMPLE_RATE))]
    assert not vad.is_speech
    assert vad.flush() == []
    # Speech that goes on after a flush opens a new utterance, after the end.
    events = vad.feed(scripted((0.9, 20)))
    assert events == [SpeechStart(at(30 * F + 100 / SAMPLE_RATE))]


def test_flush_during_a_short_pause_ends_where_the_silence_began() -> None:
    vad = StreamingVad(ScriptedModel())
    vad.feed(scripted((0.9, 20), (0.0, 10)))
    assert vad.flush() == [SpeechEnd(at(20 * F + 0.2))]


def test_flush_reports_a_pending_candidate_only_if_long_enough() -> None:
    short = StreamingVad(ScriptedModel())
    short.feed(scripted((0.0, 10), (0.9, 5)))
    assert short.flush() == []
    # Long enough, but its start could not be confirmed before the flush.
    settings = VadSettings(min_speech_ms=250)
    vad = StreamingVad(ScriptedModel(), settings)
    assert vad.feed(scripted((0.0, 10), (0.9, 7))) == []
    vad.feed(np.full(500, 0.9, np.float32))
    assert vad.flush() == [
        SpeechStart(at(10 * F - 0.2)),
        SpeechEnd(at(17 * F + 500 / SAMPLE_RATE)),
    ]


def test_long_speech_is_cut_at_the_quietest_point() -> None:
    settings = VadSettings(max_speech_s=4.0, speech_pad_ms=0, min_speech_ms=0)
    vad = StreamingVad(ScriptedModel(), settings)
    # A dip at frames 94-98 (between the thresholds: it does not end the
    # utterance); the quiet window is 5 frames, so the cut is mid-dip.
    audio = scripted((0.9, 94), (0.4, 5), (0.9, 101), (0.0, 30))
    events = [e for _, e in feed_in_chunks(vad, audio, 320)]
    cut = (94 * FRAME_SAMPLES + 5 * FRAME_SAMPLES // 2) / SAMPLE_RATE
    assert events[:3] == [SpeechStart(0.0), SpeechEnd(cut, True), SpeechStart(cut, True)]
    assert_alternating(events)
    spans = spans_of(events)
    assert all(end - start <= 4.0 for start, end in spans)
    assert spans[-1][1] == pytest.approx(200 * F)
    # Contiguous: nothing lost or doubled at the cuts.
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_long_speech_in_a_short_pause_ends_at_the_pause() -> None:
    settings = VadSettings(max_speech_s=4.0, speech_pad_ms=0, min_speech_ms=0)
    vad = StreamingVad(ScriptedModel(), settings)
    audio = scripted((0.9, 119), (0.0, 13), (0.9, 60), (0.0, 30))
    events = [e for _, e in feed_in_chunks(vad, audio, 320)]
    assert events == [
        SpeechStart(0.0),
        SpeechEnd(at(119 * F), True),
        SpeechStart(at(132 * F)),
        SpeechEnd(at(192 * F)),
    ]


def test_a_dip_at_the_limit_does_not_beat_an_earlier_pause() -> None:
    settings = VadSettings(max_speech_s=4.0, speech_pad_ms=0, min_speech_ms=0)
    vad = StreamingVad(ScriptedModel(), settings)
    # A pause of 6 frames (too short to end the utterance) at frames 70-75,
    # and a dip under neg_threshold just when the limit is reached.
    audio = scripted((0.9, 70), (0.0, 6), (0.9, 48), (0.3, 2), (0.9, 74), (0.0, 30))
    events = [e for _, e in feed_in_chunks(vad, audio, 320)]
    cut = (70 * FRAME_SAMPLES + 5 * FRAME_SAMPLES // 2) / SAMPLE_RATE
    assert events[:3] == [SpeechStart(0.0), SpeechEnd(cut, True), SpeechStart(cut, True)]
    assert_alternating(events)
    spans = spans_of(events)
    assert all(end - start <= 4.0 for start, end in spans)
    assert spans[-1][1] == pytest.approx(200 * F)


def test_segment_speech_on_scripted_audio() -> None:
    audio = scripted((0.0, 10), (0.9, 20), (0.0, 30), (0.9, 3), (0.0, 30), (0.9, 10))
    spans = segment_speech(audio, VadSettings(), ScriptedModel())
    assert spans == [
        SpeechSpan(round((10 * F - 0.2) * SAMPLE_RATE), round((30 * F + 0.2) * SAMPLE_RATE)),
        SpeechSpan(round((93 * F - 0.2) * SAMPLE_RATE), len(audio)),
    ]
    assert spans[0].start == pytest.approx(10 * F - 0.2)
    assert spans[0].duration == pytest.approx(20 * F + 0.4)
    assert segment_speech(np.zeros(0, np.float32), VadSettings(), ScriptedModel()) == []


def test_quietest_point_and_history() -> None:
    settings = VadSettings(max_speech_s=4.0, history_s=4.0, speech_pad_ms=0)
    vad = StreamingVad(ScriptedModel(), settings)
    vad.feed(scripted((0.9, 50), (0.2, 3), (0.9, 50), (0.1, 5), (0.9, 50)))
    # The 3-frame dip is deeper per frame, but the 5-frame window (160 ms)
    # averages the 5-frame dip lower.
    assert vad.quietest_point(0.0, 6.0) == pytest.approx((103 + 2.5) * F)
    # A range narrower than the window: the middle of that range's frames.
    assert vad.quietest_point(50 * F, 53 * F) == pytest.approx(51.5 * F)
    times, probs = vad.frame_probabilities(50 * F, 53 * F)
    assert times == pytest.approx([50 * F, 51 * F, 52 * F])
    assert probs == pytest.approx([0.2, 0.2, 0.2])
    with pytest.raises(ValueError):
        vad.quietest_point(10.0, 12.0)  # not heard yet
    with pytest.raises(ValueError):
        vad.quietest_point(1.0, 1.01)  # no whole frame inside

    # The history is a fixed ring: old frames go, memory stays put.
    vad.feed(scripted((0.9, 500)))
    assert vad.history_start > 0.0
    times, probs = vad.frame_probabilities()
    assert times[0] == pytest.approx(vad.history_start)
    assert times[-1] == pytest.approx(vad.scored_time - F)
    assert len(probs) < 500
    with pytest.raises(ValueError):
        vad.quietest_point(0.0, 1.0)  # forgotten


def test_feed_rejects_non_mono_and_accepts_empty() -> None:
    vad = StreamingVad(ScriptedModel())
    with pytest.raises(ValueError, match="1-D"):
        vad.feed(np.zeros((2, 320), np.float32))
    assert vad.feed(np.zeros(0, np.float32)) == []
    assert vad.time == 0.0


# --------------------------------------------------------------------------- real speech

# LibriSpeech test-clean utterances without long inner pauses (checked with
# the model: none has a stretch under neg_threshold longer than 100 ms).
CLEAN_UTTERANCES = ("0002", "0003", "0008", "0010", "0014")
GAP_S = 1.0


@dataclass(frozen=True)
class Joined:
    audio: Audio
    speech: list[tuple[float, float]]  # where each utterance's speech is


def trim(audio: Audio) -> Audio:
    """Cut a recording's leading and trailing room tone (10 ms frames more than
    40 dB under the loudest), so that the joins are where speech stops."""
    n = len(audio) // 160 * 160
    level = 10 * np.log10(np.mean(audio[:n].reshape(-1, 160) ** 2, axis=1) + 1e-12)
    loud = np.nonzero(level > level.max() - 40.0)[0]
    return audio[loud[0] * 160 : (loud[-1] + 1) * 160]


def join(clips: list[Audio], gap_s: float, edge_s: float) -> Joined:
    gap = np.zeros(round(gap_s * SAMPLE_RATE), np.float32)
    edge = np.zeros(round(edge_s * SAMPLE_RATE), np.float32)
    parts: list[Audio] = [edge]
    speech: list[tuple[float, float]] = []
    pos = len(edge)
    for i, clip in enumerate(clips):
        if i:
            parts.append(gap)
            pos += len(gap)
        speech.append((pos / SAMPLE_RATE, (pos + len(clip)) / SAMPLE_RATE))
        parts.append(clip)
        pos += len(clip)
    parts.append(edge)
    return Joined(np.concatenate(parts), speech)


@pytest.fixture(scope="module")
def librispeech(audio_manifest: list[dict[str, Any]]) -> dict[str, Audio]:
    out: dict[str, Audio] = {}
    for row in audio_manifest:
        path = Path(row["abspath"])
        if row["path"].startswith("librispeech/") and path.is_file():
            audio, rate = sf.read(path, dtype="float32")
            assert rate == SAMPLE_RATE and audio.ndim == 1
            out[path.stem.rsplit("-", 1)[-1]] = trim(audio)
    missing = [k for k in CLEAN_UTTERANCES if k not in out]
    if missing:
        pytest.skip(f"LibriSpeech utterances {missing} not in the test data")
    return out


@pytest.fixture(scope="module")
def joined(librispeech: dict[str, Audio]) -> Joined:
    return join([librispeech[k] for k in CLEAN_UTTERANCES], GAP_S, edge_s=1.0)


@pytest.fixture(scope="module")
def model() -> SileroModel:
    return shared_model()


REAL = VadSettings(min_silence_ms=600, history_s=60.0)
TOL_S = 0.3


def test_segment_speech_splits_at_the_silences(model: SileroModel, joined: Joined) -> None:
    spans = segment_speech(joined.audio, REAL, model)
    assert len(spans) == len(joined.speech)
    pad = REAL.speech_pad_ms / 1000
    for span, (on, off) in zip(spans, joined.speech, strict=True):
        assert abs(span.start + pad - on) <= TOL_S, (span, on)
        assert abs(span.end - pad - off) <= TOL_S, (span, off)
        assert span.duration <= REAL.max_speech_s
    for a, b in itertools.pairwise(spans):
        assert a.end <= b.start


def test_segment_speech_agrees_with_faster_whisper(model: SileroModel, joined: Joined) -> None:
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    ours = segment_speech(joined.audio, REAL, model)
    theirs = get_speech_timestamps(
        joined.audio,
        VadOptions(
            threshold=REAL.threshold,
            min_speech_duration_ms=REAL.min_speech_ms,
            min_silence_duration_ms=REAL.min_silence_ms,
            speech_pad_ms=REAL.speech_pad_ms,
        ),
    )
    assert len(ours) == len(theirs)
    for span, ref in zip(ours, theirs, strict=True):
        assert abs(span.start_sample - ref["start"]) <= FRAME_SAMPLES
        assert abs(span.end_sample - ref["end"]) <= FRAME_SAMPLES


def test_streaming_in_20ms_chunks(model: SileroModel, joined: Joined) -> None:
    vad = StreamingVad(model, REAL)
    out = feed_in_chunks(vad, joined.audio, 320)
    events = [e for _, e in out]
    assert_alternating(events)
    assert len(events) == 2 * len(joined.speech)
    assert not any(e.forced for e in events)
    pad = REAL.speech_pad_ms / 1000
    for (start, end), (on, off) in zip(spans_of(events), joined.speech, strict=True):
        assert abs(start + pad - on) <= TOL_S
        assert abs(end - pad - off) <= TOL_S
    # Every utterance closed on silence, before the end of the stream.
    assert out[-1][0] < vad.time - 0.1
    # Latency of the events: a start comes min_speech_ms (plus the model's lag
    # and the frame) after speech begins, an end min_silence_ms after it stops.
    for (start_at, _), (end_at, _), (on, off) in zip(
        out[::2], out[1::2], joined.speech, strict=True
    ):
        assert 0.25 <= start_at - on <= 0.25 + 0.2
        assert 0.6 <= end_at - off <= 0.6 + 0.2
    # A file and a stream are cut alike.
    spans = segment_speech(joined.audio, REAL, model)
    assert [(s.start, s.end) for s in spans] == spans_of(events)


@pytest.mark.parametrize("chunk", [160, 320, 511, 512, 513, 4000])
def test_probabilities_do_not_depend_on_chunking(
    model: SileroModel, joined: Joined, chunk: int
) -> None:
    whole = StreamingVad(model, REAL)
    whole_events = whole.feed(joined.audio) + whole.flush()
    times, probs = whole.frame_probabilities()
    assert len(probs) == len(joined.audio) // FRAME_SAMPLES

    vad = StreamingVad(model, REAL)
    events = [e for _, e in feed_in_chunks(vad, joined.audio, chunk)]
    t2, p2 = vad.frame_probabilities()
    assert np.array_equal(times, t2)
    assert np.max(np.abs(probs - p2)) <= 1e-5
    assert events == whole_events


def test_long_input_is_scored_in_blocks_alike(
    model: SileroModel, joined: Joined, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = StreamingVad(model, REAL)
    events = whole.feed(joined.audio)
    _, probs = whole.frame_probabilities()
    monkeypatch.setattr("earshot.core.voice._MAX_FRAMES_PER_RUN", 7)
    blocked = StreamingVad(model, REAL)
    assert blocked.feed(joined.audio) == events
    _, p2 = blocked.frame_probabilities()
    assert np.max(np.abs(probs - p2)) <= 1e-5
    assert blocked.time == whole.time == len(joined.audio) / SAMPLE_RATE


def test_random_chunk_sizes_and_faster_whisper_probabilities(
    model: SileroModel, joined: Joined
) -> None:
    from faster_whisper.vad import get_vad_model

    rng = np.random.default_rng(7)
    vad = StreamingVad(model, REAL)
    pos = 0
    while pos < len(joined.audio):
        n = int(rng.integers(0, 1500))
        vad.feed(joined.audio[pos : pos + n])
        pos += n
    _, probs = vad.frame_probabilities()
    # faster-whisper's own call (it zeroes part of the last frame it is
    # given, so give it one frame more and ignore that one).
    n = len(joined.audio) // FRAME_SAMPLES * FRAME_SAMPLES
    ref = get_vad_model()(np.pad(joined.audio[:n], (0, FRAME_SAMPLES))).reshape(-1)[:-1]
    assert np.max(np.abs(probs - ref)) <= 1e-5


def test_streams_share_one_model_across_threads(model: SileroModel, joined: Joined) -> None:
    expected = [e for _, e in feed_in_chunks(StreamingVad(model, REAL), joined.audio, 320)]
    results: list[list[VadEvent]] = [[], []]

    def work(i: int) -> None:
        results[i] = [e for _, e in feed_in_chunks(StreamingVad(model, REAL), joined.audio, 320)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected, expected]


def test_silence_and_low_noise_are_not_speech(model: SileroModel) -> None:
    rng = np.random.default_rng(0)
    silence = np.zeros(10 * SAMPLE_RATE, np.float32)
    noise = (rng.standard_normal(10 * SAMPLE_RATE) * 10 ** (-50 / 20)).astype(np.float32)
    for audio in (silence, noise):
        vad = StreamingVad(model, REAL)
        assert feed_in_chunks(vad, audio, 320) == []
        assert not vad.is_speech
        assert segment_speech(audio, REAL, model) == []
        _, probs = vad.frame_probabilities()
        assert probs.max() < REAL.effective_neg_threshold


def test_flush_closes_real_speech(model: SileroModel, librispeech: dict[str, Audio]) -> None:
    clip = librispeech["0002"]
    audio = np.concatenate([np.zeros(SAMPLE_RATE // 2, np.float32), clip[: len(clip) // 2]])
    vad = StreamingVad(model, REAL)
    events = vad.feed(audio)
    assert [type(e) for e in events] == [SpeechStart]
    assert vad.is_speech
    assert vad.flush() == [SpeechEnd(len(audio) / SAMPLE_RATE)]
    assert not vad.is_speech


def test_long_speech_is_cut_into_pieces(model: SileroModel, librispeech: dict[str, Audio]) -> None:
    # About 17 s of speech with 250 ms pauses: one utterance for the endpointer.
    # No clip is longer than half of max_speech_s, so each cut has a pause in
    # reach.
    order = ["0010", "0003", "0014", "0003", "0010", "0014"]
    long = join([librispeech[k] for k in order], gap_s=0.25, edge_s=0.5)
    settings = VadSettings(min_silence_ms=700, max_speech_s=8.0, history_s=60.0)
    spans = segment_speech(long.audio, settings, model)
    assert len(spans) >= 3
    assert all(s.duration <= settings.max_speech_s for s in spans)
    assert all(a.end_sample == b.start_sample for a, b in itertools.pairwise(spans))
    assert spans[0].start <= long.speech[0][0]
    assert spans[-1].end >= long.speech[-1][1]

    vad = StreamingVad(model, settings)
    events = [e for _, e in feed_in_chunks(vad, long.audio, 320)]
    assert_alternating(events)
    assert [(s.start, s.end) for s in spans] == spans_of(events)
    cuts = [e.t for e in events if isinstance(e, SpeechEnd) and e.forced]
    assert len(cuts) == len(spans) - 1
    pauses = [(a[1], b[0]) for a, b in itertools.pairwise(long.speech)]
    for cut in cuts:
        # In one of the pauses, where the model hears no voice.
        assert any(lo - 0.05 <= cut <= hi + 0.05 for lo, hi in pauses), (cut, pauses)
        _, probs = vad.frame_probabilities(cut - 2 * F, cut + 2 * F)
        assert probs.mean() < settings.effective_neg_threshold, (cut, probs)
