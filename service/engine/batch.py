"""Batch transcription of files: the engine behind ``earshot transcribe``.

Every file is decoded to 16 kHz mono, cut at voice-activity boundaries into
pieces of at most ``max_piece_s`` seconds, and the pieces of ALL files are
batched together through one backend. A file whose audio cannot be read is
reported and skipped; the others still produce their transcripts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from earshot.core.decoding import (
    SAMPLE_RATE,
    AudioArray,
    Backend,
    DecodeOptions,
    Hypothesis,
    Segment,
    Window,
)
from earshot.core.errors import EarshotError
from earshot.core.formats import TimedSegment, TimedWord, Transcript
from earshot.core.guards import drop_reason
from earshot.service.engine.audiofile import LoadedAudio, load_audio

Span = tuple[float, float]
Segmenter = Callable[[AudioArray], list[Span]]
"""Speech spans (start, end) in seconds of a 16 kHz mono signal."""


@dataclass(frozen=True)
class Piece:
    """A window of one file to decode; times in seconds from the file start."""

    file_index: int
    start: float
    end: float
    audio: AudioArray


def pieces_from_spans(
    spans: Sequence[Span], duration: float, max_piece_s: float, pad_s: float = 0.2
) -> list[Span]:
    """Merge speech spans into windows of at most ``max_piece_s`` seconds.

    Consecutive spans are joined while the joined window stays within the
    limit, so Whisper sees whole sentences with their pauses; a span longer
    than the limit (the segmenter should already have cut it) is split evenly.
    """
    out: list[Span] = []
    for raw_start, raw_end in spans:
        start, end = max(0.0, raw_start - pad_s), min(duration, raw_end + pad_s)
        if out and end - out[-1][0] <= max_piece_s:
            out[-1] = (out[-1][0], max(out[-1][1], end))
            continue
        if out and start < out[-1][1]:
            start = out[-1][1]
        while end - start > max_piece_s:
            out.append((start, start + max_piece_s))
            start += max_piece_s
        if end - start > 0.01:
            out.append((start, end))
    return out


@dataclass
class _FileState:
    index: int
    label: str
    loaded: LoadedAudio | None = None
    error: EarshotError | None = None
    pending: int = 0
    segments: list[TimedSegment] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)


@dataclass
class BatchStats:
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    batches: int = 0
    windows: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class FileOutcome:
    """The transcript of one input, or the error that stopped it."""

    label: str
    transcript: Transcript | None
    error: EarshotError | None


Loader = Callable[[str], LoadedAudio]


def segments_on_clock(
    hyp: Hypothesis, start: float, end: float
) -> list[tuple[TimedSegment, Segment]]:
    """The non-empty segments of a hypothesis for the window ``[start, end]``,
    moved onto the clock of the whole file, each with the segment it came from."""
    out = []
    for seg in hyp.segments:
        if not seg.text.strip():
            continue
        words = tuple(
            TimedWord(w.word, start + w.start, start + w.end, w.probability) for w in seg.words
        )
        timed = TimedSegment(
            start=start + seg.start,
            end=min(end, start + seg.end),
            text=seg.text.strip(),
            words=words,
            avg_logprob=hyp.avg_logprob,
            no_speech_prob=hyp.no_speech_prob,
        )
        out.append((timed, seg))
    return out


def transcribe_files(
    inputs: Iterable[str],
    backend: Backend,
    options: DecodeOptions,
    segmenter: Segmenter,
    *,
    batch_size: int = 8,
    language: str | None = None,
    max_piece_s: float = 25.0,
    loader: Loader | None = None,
    on_audio: Callable[[float], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
    stats: BatchStats | None = None,
) -> Iterator[FileOutcome]:
    """Transcribe files, yielding each file's outcome as soon as it is complete.

    ``on_audio(seconds)`` is called when a file's duration becomes known,
    ``on_progress(seconds)`` as its audio is transcribed. Decoding errors of a
    file are yielded as that file's outcome; errors of the backend propagate.
    """
    load = loader or (lambda label: load_audio(label))
    stats = stats if stats is not None else BatchStats()
    started = time.monotonic()
    queue: list[Piece] = []
    files: dict[int, _FileState] = {}

    def finish(state: _FileState) -> FileOutcome:
        assert state.loaded is not None
        state.segments.sort(key=lambda s: s.start)
        lang = max(set(state.languages), key=state.languages.count) if state.languages else None
        transcript = Transcript(
            source=state.label,
            duration=state.loaded.duration,
            language=lang,
            segments=state.segments,
        )
        del files[state.index]
        return FileOutcome(state.label, transcript, None)

    def run_batch(batch: list[Piece]) -> Iterator[FileOutcome]:
        windows = [Window(audio=p.audio, language=language) for p in batch]
        hyps = backend.transcribe_batch(windows, options)
        stats.batches += 1
        stats.windows += len(batch)
        for piece, hyp in zip(batch, hyps, strict=True):
            state = files[piece.file_index]
            if drop_reason(hyp) is None:
                state.segments.extend(t for t, _ in segments_on_clock(hyp, piece.start, piece.end))
                state.languages.append(hyp.language)
            else:
                stats.dropped += 1
            state.pending -= 1
            if on_progress:
                on_progress(piece.end - piece.start)
            if state.pending == 0:
                yield finish(state)

    for index, label in enumerate(inputs):
        state = _FileState(index, label)
        try:
            state.loaded = load(label)
        except EarshotError as exc:
            yield FileOutcome(label, None, exc)
            continue
        files[index] = state
        audio = state.loaded.samples
        duration = state.loaded.duration
        stats.audio_seconds += duration
        if on_audio:
            on_audio(duration)
        spans = pieces_from_spans(segmenter(audio), duration, max_piece_s)
        speech = sum(e - s for s, e in spans)
        if on_progress:
            on_progress(duration - speech)  # silence needs no decoding
        if not spans:
            yield finish(state)
            continue
        for start, end in spans:
            a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
            queue.append(Piece(index, start, end, np.ascontiguousarray(audio[a:b])))
            state.pending += 1
        while len(queue) >= batch_size:
            batch, queue = queue[:batch_size], queue[batch_size:]
            yield from run_batch(batch)
    while queue:
        batch, queue = queue[:batch_size], queue[batch_size:]
        yield from run_batch(batch)
    stats.wall_seconds = time.monotonic() - started
