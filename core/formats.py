"""Transcript output formats: plain text, SRT, WebVTT and JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("txt", "srt", "vtt", "json")


@dataclass(frozen=True)
class TimedWord:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class TimedSegment:
    """A piece of transcript with times in seconds from the start of the file."""

    start: float
    end: float
    text: str
    words: tuple[TimedWord, ...] = ()
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0


@dataclass
class Transcript:
    """Everything known about one transcribed input."""

    source: str
    duration: float
    language: str | None
    segments: list[TimedSegment]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())


def timestamp(seconds: float, *, decimal: str) -> str:
    """``HH:MM:SS<decimal>mmm``: SRT uses ``,``, WebVTT ``.``."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def _cues(segments: Sequence[TimedSegment]) -> list[TimedSegment]:
    return [s for s in segments if s.text.strip()]


def to_txt(t: Transcript) -> str:
    return "".join(s.text.strip() + "\n" for s in _cues(t.segments))


def to_srt(t: Transcript) -> str:
    blocks = []
    for i, s in enumerate(_cues(t.segments), start=1):
        start = timestamp(s.start, decimal=",")
        end = timestamp(max(s.end, s.start), decimal=",")
        blocks.append(f"{i}\n{start} --> {end}\n{s.text.strip()}\n")
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    out = ["WEBVTT", ""]
    for s in _cues(t.segments):
        start = timestamp(s.start, decimal=".")
        end = timestamp(max(s.end, s.start), decimal=".")
        out += [f"{start} --> {end}", s.text.strip(), ""]
    return "\n".join(out)


def to_dict(t: Transcript) -> dict[str, Any]:
    return {
        "source": t.source,
        "duration": round(t.duration, 3),
        "language": t.language,
        "text": t.text,
        "segments": [
            {
                "id": i,
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "avg_logprob": round(s.avg_logprob, 4),
                "no_speech_prob": round(s.no_speech_prob, 4),
                "words": [
                    {
                        "word": w.word,
                        "start": round(w.start, 3),
                        "end": round(w.end, 3),
                        "probability": round(w.probability, 4),
                    }
                    for w in s.words
                ],
            }
            for i, s in enumerate(t.segments)
        ],
        **t.metadata,
    }


def to_json(t: Transcript) -> str:
    return json.dumps(to_dict(t), ensure_ascii=False, indent=2) + "\n"


def render(t: Transcript, fmt: str) -> str:
    """The transcript in ``fmt`` (one of FORMATS)."""
    renderers = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "json": to_json}
    return renderers[fmt](t)
