"""The one small interface every decoder implements.

"Here are N audio windows with their options, give back N hypotheses." The
local faster-whisper runner, remote backends and the test backends all
implement :class:`Backend`; the scheduler and the batch CLI only talk to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from earshot.core.errors import ConfigError, InvalidRequestError

SAMPLE_RATE = 16000
"""Every window given to a backend is mono float32 at this rate."""

MAX_WINDOW_SECONDS = 30.0
"""Whisper's context: a window longer than this is refused."""

WINDOW_TOLERANCE_S = 0.05
"""How far past :data:`MAX_WINDOW_SECONDS` a window may run (resampling and
frame rounding add a few samples) before it is refused."""

TASKS = ("transcribe", "translate")

AudioArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Window:
    """One piece of audio to decode.

    ``audio`` is mono float32 at 16 kHz, at most 30 s. ``prompt`` is previous
    text that conditions the decoder (None for none). ``language`` is an ISO
    code, or None to detect it from the audio. ``hotwords`` are terms to bias
    the decoder towards (Whisper receives them as a prefix prompt).
    """

    audio: AudioArray
    prompt: str | None = None
    language: str | None = None
    hotwords: str | None = None

    @property
    def duration(self) -> float:
        return float(len(self.audio)) / SAMPLE_RATE


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding options shared by every window of one batch.

    ``max_tokens_per_second`` and ``min_tokens`` set each window's token
    budget (``min_tokens + ceil(duration * max_tokens_per_second)``), so that
    no window can run to the model's maximum length.
    """

    task: str = "transcribe"
    beam_size: int = 1
    patience: float = 1.0
    length_penalty: float = 1.0
    temperature: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    suppress_blank: bool = True
    suppress_tokens: tuple[int, ...] = (-1,)
    without_timestamps: bool = False
    word_timestamps: bool = False
    max_tokens_per_second: float = 8.0
    min_tokens: int = 16
    # Previous text is cut to its last N tokens. Prompts of equal token length
    # share one decoder call (see models/runner.py), so a fixed, short prompt
    # keeps the finals of many streams in one batch.
    max_prompt_tokens: int = 64
    # Encode only as many frames as the longest window of the batch needs
    # (its length plus short_context_pad_s of silence, rounded up to whole
    # seconds), instead of Whisper's padded 30 s. Much cheaper for short
    # windows; Whisper was trained on 30 s windows, so it may cost accuracy
    # (bench/context.py measures how much): an explicit opt-in.
    short_context: bool = False
    short_context_pad_s: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """The options as plain JSON values, for provenance records."""
        return {
            "task": self.task,
            "beam_size": self.beam_size,
            "patience": self.patience,
            "length_penalty": self.length_penalty,
            "temperature": self.temperature,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "suppress_blank": self.suppress_blank,
            "suppress_tokens": list(self.suppress_tokens),
            "without_timestamps": self.without_timestamps,
            "word_timestamps": self.word_timestamps,
            "max_tokens_per_second": self.max_tokens_per_second,
            "min_tokens": self.min_tokens,
            "max_prompt_tokens": self.max_prompt_tokens,
            "short_context": self.short_context,
            "short_context_pad_s": self.short_context_pad_s,
        }

    def token_budget(self, duration: float) -> int:
        """How many new tokens a window of ``duration`` seconds may produce."""
        return self.min_tokens + int(np.ceil(max(duration, 0.0) * self.max_tokens_per_second))


@dataclass(frozen=True)
class WordTiming:
    """A word with times in seconds from the start of its window."""

    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Segment:
    """A timestamped piece of a hypothesis, times from the start of its window."""

    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    words: tuple[WordTiming, ...] = ()


@dataclass(frozen=True)
class Hypothesis:
    """What a backend returns for one window."""

    text: str
    tokens: tuple[int, ...]
    segments: tuple[Segment, ...]
    language: str
    avg_logprob: float
    no_speech_prob: float
    words: tuple[WordTiming, ...] = ()
    # Extra facts a backend wants to pass along (e.g. which remote served it).
    info: dict[str, Any] = field(default_factory=dict)


def check_windows(windows: Sequence[Window], options: DecodeOptions) -> None:
    """The one check of what may reach a backend: a known task, and windows of
    non-empty mono audio no longer than 30 s. Raises InvalidRequestError."""
    if options.task not in TASKS:
        raise InvalidRequestError(
            f"task must be transcribe or translate, not {options.task!r}", field="task"
        )
    for i, window in enumerate(windows):
        check_window(window, f"window {i}")


def check_window(window: Window, label: str = "a decode window") -> None:
    """Raise InvalidRequestError unless ``window`` is non-empty mono audio of at
    most :data:`MAX_WINDOW_SECONDS` (plus :data:`WINDOW_TOLERANCE_S`)."""
    if np.ndim(window.audio) != 1 or len(window.audio) == 0:
        raise InvalidRequestError(
            f"{label} must be non-empty mono audio, not shape {np.shape(window.audio)}",
            field="audio",
        )
    if window.duration > MAX_WINDOW_SECONDS + WINDOW_TOLERANCE_S:
        raise InvalidRequestError(
            f"{label} is {window.duration:.2f} s long; the maximum is {MAX_WINDOW_SECONDS:.0f} s",
            field="audio",
        )


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares it can do, so that nobody has to probe it.

    ``device`` is where it decodes (``"cpu"`` or ``"cuda"``, which the default
    batch size follows, :func:`default_max_batch`; ``"remote"`` for a service
    elsewhere).
    ``multilingual`` is False for an English-only model (a ``.en`` one: no
    other language, no translation). ``languages`` lists the language codes it
    decodes, or is None when it takes any code the caller names (a remote
    service decides for itself).
    """

    device: str = "cpu"
    multilingual: bool = True
    languages: tuple[str, ...] | None = None
    workers: int = 1
    """Batches it decodes at once, each in a caller's thread (the scheduler
    keeps that many in flight)."""

    def refuses_language(self, language: str) -> bool:
        """Whether a request for ``language`` (a code) must be refused here."""
        return self.languages is not None and language not in self.languages


def default_max_batch(device: str, *, live: bool) -> int:
    """Windows per backend call when the operator sets none.

    On a GPU (``"cuda"`` or ``"cuda:N"``): 16; throughput comes from batching.
    On a CPU it depends on who waits. Live streams (``live=True``): 1. On a
    2-core CPU a batch does not raise the encoder's throughput much, and every
    window of a batch waits for the whole batch: bench/streams.py kept 4
    streams in real time with batches of 1 and only 1 with batches of 4.
    Files (``live=False``, the batch CLI): 4, the best throughput measured
    (tiny, 25 s windows: 35.7 audio-s per s at 4, 29.8 at 1, 30.2 at 16;
    bench/results/batch_throughput.json). Pass the resolved device, not
    ``"auto"``; anything else raises ConfigError.
    """
    if device == "cpu":
        return 1 if live else 4
    if device == "cuda" or device.startswith("cuda:"):
        return 16
    raise ConfigError(
        f"device must be cpu or cuda to choose a batch size, not {device!r}", field="device"
    )


def default_decode_workers(device: str, cpus: int) -> int:
    """Decode workers when the operator sets none: on a GPU 1 (its throughput
    comes from batching); on a CPU one per core, at most 4, each with the
    cores shared out. Measured on 2 cores (bench/decode_workers.py, real
    weights): two workers of one thread decode 1.9x the finals of one worker
    of two threads with tiny.en and 1.75x with base, because CTranslate2 keeps
    two threads of one call busy only part of the time."""
    if device.startswith("cuda"):
        return 1
    return max(1, min(cpus, 4))


@runtime_checkable
class Backend(Protocol):
    """A decoder of audio windows. Implementations must be thread-safe for one
    caller at a time: the scheduler calls ``transcribe_batch`` from a single
    worker thread while the event loop keeps running."""

    @property
    def name(self) -> str:
        """Short name of the model or service behind this backend."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """What it can do (device, languages): declared, never probed."""
        ...

    def provenance(self) -> dict[str, Any]:
        """Which model (by checksum), source and policy produce the results."""
        ...

    def transcribe_batch(
        self, windows: Sequence[Window], options: DecodeOptions
    ) -> list[Hypothesis]:
        """Decode every window; return one hypothesis per window, in order.

        Raises :class:`earshot.core.errors.InvalidRequestError` for a window longer
        than 30 s or an unknown language.
        """
        ...


@runtime_checkable
class Fallback(Backend, Protocol):
    """A backend that may take work the local one cannot (the remote one):
    overflow or failed windows, when policy allows it."""

    @property
    def model(self) -> str:
        """The model it serves, by the name clients would ask for."""
        ...

    @property
    def circuit_state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        ...

    def available(self) -> bool:
        """Whether it takes work now (cheap: no network traffic)."""
        ...

    def close(self) -> None:
        """Release its connections; idempotent."""
        ...
