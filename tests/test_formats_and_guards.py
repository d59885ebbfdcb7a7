"""Pure pieces of the batch path: output formats, hallucination guards, piece cutting."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from earshot.core.decoding import Hypothesis, Segment, WordTiming
from earshot.core.formats import TimedSegment, TimedWord, Transcript, render, timestamp
from earshot.core.guards import drop_reason, longest_repeat_run, trim_timeless_repeats
from earshot.service.engine.batch import pieces_from_spans

SRT_TIME = r"\d{2}:\d{2}:\d{2},\d{3}"
VTT_TIME = r"\d{2}:\d{2}:\d{2}\.\d{3}"


def sample() -> Transcript:
    return Transcript(
        source="a.wav",
        duration=3725.5,
        language="en",
        segments=[
            TimedSegment(0.0, 1.5, "hello there", (TimedWord(" hello", 0.0, 0.7, 0.9),)),
            TimedSegment(2.0, 2.0, "   "),
            TimedSegment(3723.25, 3725.5, "goodbye"),
        ],
        metadata={"model": {"name": "m"}},
    )


def test_timestamps() -> None:
    assert timestamp(3723.25, decimal=",") == "01:02:03,250"
    assert timestamp(0.0005, decimal=".") == "00:00:00.000"
    assert timestamp(-1, decimal=".") == "00:00:00.000"


def test_txt_skips_empty_segments() -> None:
    assert render(sample(), "txt") == "hello there\ngoodbye\n"


def test_srt_is_well_formed() -> None:
    text = render(sample(), "srt")
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 2
    for i, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        assert lines[0] == str(i)
        assert re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
    assert "01:02:03,250 --> 01:02:05,500" in text


def test_vtt_is_well_formed() -> None:
    text = render(sample(), "vtt")
    assert text.startswith("WEBVTT\n\n")
    cues = re.findall(f"({VTT_TIME}) --> ({VTT_TIME})\n(.+)\n", text)
    assert [c[2] for c in cues] == ["hello there", "goodbye"]


def test_json_carries_words_and_metadata() -> None:
    data = json.loads(render(sample(), "json"))
    assert data["text"] == "hello there goodbye"
    assert data["segments"][0]["words"][0] == {
        "word": " hello",
        "start": 0.0,
        "end": 0.7,
        "probability": 0.9,
    }
    assert data["model"] == {"name": "m"}


def hyp(text: str, no_speech: float = 0.0, logprob: float = -0.2) -> Hypothesis:
    return Hypothesis(text, (), (), "en", logprob, no_speech)


@pytest.mark.parametrize(
    ("h", "reason"),
    [
        (hyp("a perfectly ordinary sentence"), None),
        (hyp(""), "empty"),
        (hyp("thanks for watching", no_speech=0.9, logprob=-1.5), "no_speech"),
        (hyp("thanks for watching", no_speech=0.9, logprob=-0.3), None),
        (hyp("I'm sorry. " * 30), "repetition"),
        (hyp("go go go go go now"), "repetition"),
    ],
)
def test_drop_reason(h: Hypothesis, reason: str | None) -> None:
    assert drop_reason(h) == reason


def test_longest_repeat_run() -> None:
    assert longest_repeat_run(["a", "b", "a", "b", "a", "b", "c"]) == 3
    assert longest_repeat_run(["one", "two", "three"]) == 1


def test_pieces_merge_close_spans_within_limit() -> None:
    spans = [(1.0, 4.0), (5.0, 9.0), (30.0, 33.0)]
    pieces = pieces_from_spans(spans, duration=40.0, max_piece_s=25.0, pad_s=0.2)
    assert pieces == [(0.8, 9.2), (29.8, 33.2)]


def test_pieces_never_exceed_limit_or_overlap() -> None:
    spans = [(0.0, 70.0), (70.1, 71.0)]
    pieces = pieces_from_spans(spans, duration=72.0, max_piece_s=25.0, pad_s=0.2)
    assert all(e - s <= 25.0 + 1e-9 for s, e in pieces)
    assert all(a[1] <= b[0] + 1e-9 for a, b in itertools.pairwise(pieces))
    assert pieces[0][0] == 0.0 and pieces[-1][1] == pytest.approx(71.2)


def _hyp(*words: tuple[str, float, float]) -> Hypothesis:
    timed = tuple(WordTiming(w, s, e, 0.9) for w, s, e in words)
    text = "".join(w for w, _, _ in words).strip()
    return Hypothesis(text, (), (Segment(0.0, 2.0, text, (), timed),), "en", -0.3, 0.0)


GOOD_NIGHT = [(" Good", 0.68, 0.96), (" night,", 0.96, 1.22), (" husband.", 1.28, 1.42)]


@pytest.mark.parametrize(
    "words, expected",
    [
        pytest.param(
            # Measured on real tiny.en with a short context: copies piled on 1.42 s.
            [
                *GOOD_NIGHT,
                *[(" Good", 1.42, 1.42), (" night,", 1.42, 1.42), (" husband.", 1.42, 1.42)],
                *[(" Good", 1.42, 1.42), (" night,", 1.42, 1.42), (" husband.", 1.42, 1.54)],
            ],
            "Good night, husband.",
            id="timeless copies are dropped",
        ),
        pytest.param(
            [(" No,", 0.1, 0.4), (" no,", 0.5, 0.8), (" no.", 0.9, 1.2)],
            "No, no, no.",
            id="a repetition that takes time was said",
        ),
        pytest.param(
            [*GOOD_NIGHT, (" Good", 1.5, 1.8), (" night,", 1.8, 2.1), (" husband.", 2.1, 2.5)],
            "Good night, husband. Good night, husband.",
            id="a timed second copy is kept",
        ),
        pytest.param(
            [(" a", 0.1, 0.1), (" cat", 0.2, 0.5), (" sat", 0.6, 0.6)],
            "a cat sat",
            id="short words alone are not a repetition",
        ),
        pytest.param(
            [(" yes", 0.1, 0.4), (" yes", 0.4, 0.4), (" yes", 0.4, 0.4), (" yes", 0.4, 0.4)],
            "yes",
            id="one word piled up",
        ),
    ],
)
def test_trim_timeless_repeats(words: list[tuple[str, float, float]], expected: str) -> None:
    hyp = trim_timeless_repeats(_hyp(*words))
    assert hyp.text == expected
    kept = [w.word for seg in hyp.segments for w in seg.words]
    assert "".join(kept).strip() == expected


def test_trim_timeless_repeats_leaves_a_hypothesis_without_words_alone() -> None:
    hyp = Hypothesis("Good night, husband. Good night, husband.", (), (), "en", -0.3, 0.0)
    assert trim_timeless_repeats(hyp) is hyp
