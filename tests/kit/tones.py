"""A synthetic "tone language" and a backend that reads it exactly.

Trained Whisper weights cannot be had in the test environment, so the
streaming machinery (every word spoken ends up in exactly one final, nothing
lost or doubled) is tested with a language that a deterministic backend reads
without error:

- Each word of :data:`VOCABULARY` is a short voiced syllable whose
  fundamental frequency is its identity: word ``i`` has
  ``F0 = 90 Hz * 2 ** (i / 16)``, so the sixteen words span 90 to 173 Hz in
  steps of 1/16 octave (4.4 %), less than an octave in all, so no word is an
  octave of another.
- Only harmonics between 200 and 3400 Hz identify a word (the fundamental
  itself is ignored), so the words survive the telephone band, µ-law and
  A-law at 8 kHz, and resampling.
- The syllable is shaped to sound like speech to Silero VAD, the real
  endpointer. Measured with faster-whisper 1.2.1's Silero v6 on 20 random
  scripts (speech probability per 32 ms frame): a pure sine at the same F0s
  gets 0.70 on average inside words but 0.17 at the 10th percentile; a steady
  1/k harmonic series gets 0.02; a steady voice-like vowel 0.3 to 0.65. This
  syllable (1/k harmonics through three formants that glide from /i/ to /a/,
  30 ms attack, 60 ms decay) gets 0.96 on average and 0.92 at the 10th
  percentile inside words, and at most 0.03 in the silences between
  utterances, at 16 kHz, from 44.1 kHz and after 8 kHz µ-law or A-law alike.
  Silero needs the part below 300 Hz, though: after a 300 to 3400 Hz
  band-pass it gives about 0.3 inside words (the backend still reads them).
- Words inside an utterance are separated by short silences
  (:data:`DEFAULT_WORD_GAP_S`, far shorter than any endpointing setting);
  utterances by long ones (:data:`DEFAULT_GAP_S`).

:func:`make_speech` builds audio and its :class:`SpeechTruth` (each word's and
each utterance's span); :class:`ToneBackend` implements
:class:`earshot.core.decoding.Backend` and turns windows of such audio back into
words, reporting a word only when enough of it lies inside the window. The
G.711 and resampling helpers are written from the standard, independently of
the service's audio code, so tests do not check that code against itself.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import soxr

from earshot.core.decoding import (
    MAX_WINDOW_SECONDS,
    SAMPLE_RATE,
    AudioArray,
    Capabilities,
    DecodeOptions,
    Hypothesis,
    Segment,
    Window,
    WordTiming,
)
from earshot.core.errors import InvalidRequestError

# ---------------------------------------------------------------------------
# The language
# ---------------------------------------------------------------------------

VOCABULARY: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliett", "kilo", "lima", "mike", "november", "oscar", "papa",
)  # fmt: skip
"""The words, in order of rising fundamental frequency."""

F0_LOWEST_HZ = 90.0
"""Fundamental frequency of the first word."""

STEPS_PER_OCTAVE = 16
"""Word ``i`` has fundamental ``F0_LOWEST_HZ * 2 ** (i / STEPS_PER_OCTAVE)``."""

DEFAULT_WORD_S = 0.24
"""Nominal duration of one word, attack and decay included."""

DEFAULT_WORD_GAP_S = 0.07
"""Silence between the words of one utterance."""

DEFAULT_GAP_S = 1.0
"""Silence between utterances."""

DEFAULT_LEAD_S = 0.5
"""Silence before the first utterance."""

DEFAULT_TAIL_S = 1.0
"""Silence after the last utterance."""

DEFAULT_LEVEL = 0.25
"""Peak amplitude of every word (-12 dBFS peak, about -22 dBFS RMS)."""

_ATTACK_S = 0.03
_DECAY_S = 0.06
_MAX_HARMONIC_HZ = 3800.0
# Formants (centre Hz, bandwidth Hz, gain) of /i/ and /a/; a word glides from
# the first vowel to the second. Silero hears this glide as speech far more
# reliably than a steady vowel (see the module docstring).
_FORMANTS_FROM = np.array([[270.0, 60.0, 1.0], [2290.0, 100.0, 0.4], [3010.0, 200.0, 0.3]])
_FORMANTS_TO = np.array([[730.0, 90.0, 1.0], [1090.0, 110.0, 0.5], [2440.0, 170.0, 0.3]])

_INDEX = {word: i for i, word in enumerate(VOCABULARY)}
_F0 = F0_LOWEST_HZ * 2.0 ** (np.arange(len(VOCABULARY)) / STEPS_PER_OCTAVE)


def word_frequency(word: str) -> float:
    """The fundamental frequency (Hz) that identifies ``word``.

    Raises ValueError for a word not in :data:`VOCABULARY`.
    """
    return float(_F0[_word_index(word)])


def _word_index(word: str) -> int:
    try:
        return _INDEX[word]
    except KeyError:
        raise ValueError(
            f"unknown tone word {word!r}; the vocabulary is {', '.join(VOCABULARY)}"
        ) from None


@functools.lru_cache(maxsize=256)
def _word_audio(index: int, sample_rate: int, word_s: float, level: float) -> AudioArray:
    """One word, cached and read-only (scripts repeat words)."""
    n = round(word_s * sample_rate)
    t = np.arange(n, dtype=np.float64) / sample_rate
    s = np.arange(n, dtype=np.float64) / n
    glide = s * s * (3.0 - 2.0 * s)  # smoothstep: the vowel moves mostly mid-word
    formants = _FORMANTS_FROM + glide[:, None, None] * (_FORMANTS_TO - _FORMANTS_FROM)
    centre, bandwidth, gain = formants[..., 0], formants[..., 1], formants[..., 2]

    f0 = float(_F0[index])
    top = min(_MAX_HARMONIC_HZ, 0.45 * sample_rate)
    out = np.zeros(n, dtype=np.float64)
    for k in range(1, int(top // f0) + 1):
        # Harmonic k over time: a 1/k source tilt times the sum of one broad
        # resonance curve per formant.
        detune = (k * f0 - centre) / (0.5 * bandwidth)
        amplitude = (gain / np.sqrt(1.0 + detune * detune)).sum(axis=1)
        out += amplitude / k * np.sin(2.0 * np.pi * k * f0 * t)

    attack = min(round(_ATTACK_S * sample_rate), n // 2)
    decay = min(round(_DECAY_S * sample_rate), n - attack)
    out[:attack] *= 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    out[n - decay :] *= 0.5 + 0.5 * np.cos(np.pi * np.arange(decay) / decay)
    audio: AudioArray = (out * (level / np.max(np.abs(out)))).astype(np.float32)
    audio.flags.writeable = False
    return audio


def _check_shape(sample_rate: int, word_s: float, level: float) -> None:
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be at least 8000 Hz, got {sample_rate}")
    if word_s < 0.1:
        raise ValueError(f"word_s must be at least 0.1 s, got {word_s}")
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")


def make_word(
    word: str,
    sample_rate: int = SAMPLE_RATE,
    *,
    word_s: float = DEFAULT_WORD_S,
    level: float = DEFAULT_LEVEL,
) -> AudioArray:
    """One word: float32 mono audio of ``round(word_s * sample_rate)`` samples.

    ``level`` is the peak amplitude. Harmonics stop below 3800 Hz and below
    0.45 * ``sample_rate``, so words made at 8 kHz have no aliasing. Raises
    ValueError for an unknown word, a rate below 8 kHz, ``word_s`` under
    0.1 s or ``level`` outside (0, 1].
    """
    _check_shape(sample_rate, word_s, level)
    audio = _word_audio(_word_index(word), sample_rate, float(word_s), float(level))
    return np.array(audio, dtype=np.float32)


def make_utterance(
    words: Sequence[str],
    sample_rate: int = SAMPLE_RATE,
    *,
    word_s: float = DEFAULT_WORD_S,
    word_gap_s: float = DEFAULT_WORD_GAP_S,
    level: float = DEFAULT_LEVEL,
) -> AudioArray:
    """The words one after another, ``word_gap_s`` of silence between them.

    No silence is added before the first word or after the last; no words
    give an empty array. Raises ValueError as :func:`make_word` does.
    """
    audio, _ = _render([list(words)], sample_rate, 0.0, 0.0, 0.0, word_s, word_gap_s, level)
    return audio


@dataclass(frozen=True)
class WordSpan:
    """A word of the script and its nominal span, in seconds from the audio's start."""

    word: str
    start: float
    end: float


@dataclass(frozen=True)
class UtteranceSpan:
    """An utterance: its words, from the first word's start to the last word's end."""

    words: tuple[WordSpan, ...]

    @property
    def start(self) -> float:
        return self.words[0].start

    @property
    def end(self) -> float:
        return self.words[-1].end

    @property
    def text(self) -> str:
        return " ".join(w.word for w in self.words)


@dataclass(frozen=True)
class SpeechTruth:
    """What :func:`make_speech` put where. Times are exact (sample index / rate)."""

    utterances: tuple[UtteranceSpan, ...]
    sample_rate: int
    duration: float

    @property
    def words(self) -> tuple[WordSpan, ...]:
        """Every word of every utterance, in order."""
        return tuple(w for u in self.utterances for w in u.words)

    @property
    def text(self) -> str:
        """All words joined by single spaces: the expected transcript."""
        return " ".join(w.word for w in self.words)

    @property
    def texts(self) -> list[str]:
        """The text of each utterance."""
        return [u.text for u in self.utterances]

    def words_between(self, start: float, end: float) -> tuple[WordSpan, ...]:
        """The words whose midpoint lies in ``[start, end)``."""
        return tuple(w for w in self.words if start <= 0.5 * (w.start + w.end) < end)


def make_speech(
    utterances: Sequence[Sequence[str]],
    sample_rate: int = SAMPLE_RATE,
    *,
    gap_s: float = DEFAULT_GAP_S,
    lead_s: float = DEFAULT_LEAD_S,
    tail_s: float = DEFAULT_TAIL_S,
    word_s: float = DEFAULT_WORD_S,
    word_gap_s: float = DEFAULT_WORD_GAP_S,
    level: float = DEFAULT_LEVEL,
) -> tuple[AudioArray, SpeechTruth]:
    """A script spoken in the tone language: float32 mono audio and its truth.

    ``lead_s`` of silence, then the utterances separated by ``gap_s`` of
    silence, then ``tail_s``. Within an utterance, words are ``word_s`` long
    and ``word_gap_s`` apart. For an endpointer to split the utterances, keep
    ``gap_s`` well above its endpointing silence; for :class:`ToneBackend` to
    tell words apart, keep ``word_gap_s`` at 30 ms or more (and build the
    backend with the same ``word_s``). Raises ValueError for an empty
    utterance, an unknown word, a negative silence, or as :func:`make_word`.
    """
    for i, utterance in enumerate(utterances):
        if not utterance:
            raise ValueError(f"utterance {i} is empty")
    return _render(
        [list(u) for u in utterances], sample_rate, gap_s, lead_s, tail_s, word_s, word_gap_s, level
    )


def _render(
    utterances: list[list[str]],
    sample_rate: int,
    gap_s: float,
    lead_s: float,
    tail_s: float,
    word_s: float,
    word_gap_s: float,
    level: float,
) -> tuple[AudioArray, SpeechTruth]:
    _check_shape(sample_rate, word_s, level)
    for name, value in (("gap_s", gap_s), ("lead_s", lead_s), ("tail_s", tail_s)):
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
    if word_gap_s < 0:
        raise ValueError(f"word_gap_s must not be negative, got {word_gap_s}")
    indices = [[_word_index(w) for w in u] for u in utterances]
    n_word = round(word_s * sample_rate)

    # Place every word first, so that the buffer is allocated once.
    placed: list[list[tuple[int, int]]] = []
    pos = round(lead_s * sample_rate)
    for u, utterance in enumerate(indices):
        pos += round(gap_s * sample_rate) if u else 0
        row = []
        for j, index in enumerate(utterance):
            pos += round(word_gap_s * sample_rate) if j else 0
            row.append((index, pos))
            pos += n_word
        placed.append(row)
    audio = np.zeros(pos + round(tail_s * sample_rate), dtype=np.float32)

    spans = []
    for row in placed:
        words = []
        for index, at in row:
            audio[at : at + n_word] = _word_audio(index, sample_rate, float(word_s), float(level))
            end = (at + n_word) / sample_rate
            words.append(WordSpan(VOCABULARY[index], at / sample_rate, end))
        if words:
            spans.append(UtteranceSpan(tuple(words)))
    return audio, SpeechTruth(tuple(spans), sample_rate, len(audio) / sample_rate)


def random_script(
    n_utterances: int,
    words_per_utterance: tuple[int, int] = (1, 8),
    seed: int = 0,
) -> list[list[str]]:
    """``n_utterances`` utterances of random words; the same seed gives the same script.

    Each utterance has between ``words_per_utterance[0]`` and
    ``words_per_utterance[1]`` words, both included. Words may repeat, also
    back to back.
    """
    low, high = words_per_utterance
    if not 1 <= low <= high:
        raise ValueError(f"words_per_utterance must satisfy 1 <= low <= high, got {low}, {high}")
    rng = np.random.default_rng(seed)
    script = []
    for _ in range(n_utterances):
        count = int(rng.integers(low, high + 1))
        script.append([VOCABULARY[int(i)] for i in rng.integers(0, len(VOCABULARY), count)])
    return script


# ---------------------------------------------------------------------------
# Telephony: G.711 (ITU-T) and resampling
# ---------------------------------------------------------------------------

Law = Literal["mulaw", "alaw"]

_MULAW_BIAS = 0x84
_MULAW_CLIP = 32635


def _floor_log2(x: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """floor(log2(x)) of positive integers, exactly."""
    return (np.frexp(x.astype(np.float64))[1] - 1).astype(np.int64)


def g711_encode(audio: npt.ArrayLike, law: Law = "mulaw") -> bytes:
    """Float samples in [-1, 1] to G.711 bytes, one byte per sample.

    Samples are rounded to 16-bit PCM first (clipping outside [-1, 1)), as a
    telephony client holds them. Raises ValueError for an unknown ``law``.
    """
    x = np.asarray(audio, dtype=np.float64)
    s = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int64)
    if law == "mulaw":
        magnitude = np.minimum(np.abs(s), _MULAW_CLIP) + _MULAW_BIAS
        exponent = _floor_log2(magnitude) - 7
        mantissa = (magnitude >> (exponent + 3)) & 0x0F
        code = ((s < 0).astype(np.int64) << 7) | (exponent << 4) | mantissa
        return (~code & 0xFF).astype(np.uint8).tobytes()
    if law == "alaw":
        positive = s >= 0
        magnitude = np.where(positive, s, ~s) >> 3  # 12 bits, 0..4095
        segment = np.where(magnitude < 32, 0, _floor_log2(np.maximum(magnitude, 1)) - 4)
        mantissa = (magnitude >> np.maximum(segment, 1)) & 0x0F
        code = (positive.astype(np.int64) << 7) | (segment << 4) | mantissa
        return (code ^ 0x55).astype(np.uint8).tobytes()
    raise ValueError(f"law must be 'mulaw' or 'alaw', got {law!r}")


def g711_decode(data: bytes, law: Law = "mulaw") -> AudioArray:
    """G.711 bytes to float32 samples in [-1, 1). Raises ValueError for an unknown ``law``."""
    b = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    if law == "mulaw":
        code = ~b & 0xFF
        exponent = (code >> 4) & 0x07
        magnitude = ((((code & 0x0F) << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
        value = np.where(code & 0x80, -magnitude, magnitude)
    elif law == "alaw":
        code = b ^ 0x55
        segment = (code >> 4) & 0x07
        mantissa = code & 0x0F
        shift = np.maximum(segment, 1)
        # Each code decodes to the middle of its quantization interval.
        magnitude = np.where(
            segment == 0, 2 * mantissa + 1, ((16 + mantissa) << shift) + (1 << (shift - 1))
        )
        value = np.where(code & 0x80, magnitude << 3, -(magnitude << 3))
    else:
        raise ValueError(f"law must be 'mulaw' or 'alaw', got {law!r}")
    return (value / 32768.0).astype(np.float32)


def resample(audio: npt.ArrayLike, from_rate: int, to_rate: int) -> AudioArray:
    """Mono float32 audio from one rate to another (soxr, high quality)."""
    x = np.asarray(audio, dtype=np.float32)
    if from_rate == to_rate:
        return np.array(x, dtype=np.float32)
    return np.asarray(soxr.resample(x, from_rate, to_rate, quality="HQ"), dtype=np.float32)


def telephone_roundtrip(
    audio: npt.ArrayLike, sample_rate: int = SAMPLE_RATE, law: Law = "mulaw"
) -> AudioArray:
    """``audio`` as it arrives after a telephone hop: resampled to 8 kHz, G.711
    encoded and decoded, and resampled back to ``sample_rate``."""
    narrow = resample(audio, sample_rate, 8000)
    return resample(g711_decode(g711_encode(narrow, law), law), 8000, sample_rate)


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------

# Envelope: 20 ms RMS every 5 ms. The RMS frame is longer than the longest
# pitch period (11 ms at 90 Hz), so the envelope does not ripple with it.
_HOP = 80
_FRAME = 320
# A frame belongs to a word when it is within this many dB of the loudest
# frame nearby; the silences between words are far below.
_WORD_DYNAMIC_DB = 25.0
# Identification uses harmonics in this band only (the telephone band).
_BAND_HZ = (200.0, 3400.0)
# Pitch candidates: from half a step below the first word to half a step above
# the last, in quarter steps. A word's own grid point must score best; a sound
# whose pitch lies between two words wins on a point in between and is dropped.
_GRID_PER_STEP = 4
# Least fraction of in-band power on the harmonics of the pitch found.
_MIN_TONALITY = 0.6
# Least share of that power on odd harmonics, and on even ones.
_MIN_BALANCE = 0.15


@dataclass(frozen=True)
class DetectedWord:
    """A tone word found in a window, before the coverage rule is applied.

    ``start`` and ``end`` estimate the word's nominal bounds in seconds from
    the window start, clipped to the window; ``coverage`` is the estimated
    fraction of the nominal duration inside the window. ``tonality`` is the
    fraction of in-band power on the word's harmonics (near 1 for a clean
    word; white noise scores about 0.2) and ``pitch_hz`` the pitch found.
    ``cut_start`` and ``cut_end`` say that the word runs past a window edge.
    """

    word: str
    start: float
    end: float
    coverage: float
    tonality: float
    pitch_hz: float
    cut_start: bool
    cut_end: bool


@dataclass(frozen=True)
class _PitchTables:
    grid: npt.NDArray[np.float64]
    # (candidates, harmonics): the spectrum bin of each in-band harmonic of a
    # candidate and of the point midway to the next harmonic, and the weight
    # of each (0 out of band). Subtracting the midway points makes a pitch an
    # octave below the true one score low.
    hits: npt.NDArray[np.intp]
    misses: npt.NDArray[np.intp]
    weights: npt.NDArray[np.float32]
    band: tuple[int, int]
    band_hz: npt.NDArray[np.float64]


@functools.lru_cache(maxsize=8)
def _pitch_tables(nfft: int) -> _PitchTables:
    half = _GRID_PER_STEP // 2
    steps = np.arange(-half, (len(VOCABULARY) - 1) * _GRID_PER_STEP + half + 1)
    grid = F0_LOWEST_HZ * 2.0 ** (steps / (_GRID_PER_STEP * STEPS_PER_OCTAVE))
    bin_hz = SAMPLE_RATE / nfft
    lo, hi = _BAND_HZ
    harmonic = grid[:, None] * np.arange(1, int(hi // grid[0]) + 2)[None, :]
    midway = harmonic + 0.5 * grid[:, None]
    valid = (harmonic >= lo) & (midway <= hi)
    weights = valid / valid.sum(axis=1, keepdims=True)
    band = (int(np.ceil(lo / bin_hz)), int(np.floor(hi / bin_hz)) + 1)
    return _PitchTables(
        grid=grid,
        hits=np.where(valid, np.round(harmonic / bin_hz), 0).astype(np.intp),
        misses=np.where(valid, np.round(midway / bin_hz), 0).astype(np.intp),
        weights=weights.astype(np.float32),
        band=band,
        band_hz=np.arange(*band, dtype=np.float64) * bin_hz,
    )


@functools.lru_cache(maxsize=64)
def _hann(n: int) -> npt.NDArray[np.float64]:
    return np.hanning(n)


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(first, last + 1) of every run of True."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, stops = np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()
    return list(zip(starts, stops, strict=True))


def _frame_levels(audio: AudioArray) -> npt.NDArray[np.float64]:
    """RMS level (dBFS) of each 20 ms frame, one frame every 5 ms."""
    n_hops = len(audio) // _HOP
    hops = audio[: n_hops * _HOP].reshape(n_hops, _HOP)
    energy = np.concatenate(([0.0], np.cumsum(np.einsum("ij,ij->i", hops, hops), dtype=float)))
    per_frame = _FRAME // _HOP
    mean_square = (energy[per_frame:] - energy[:-per_frame]) / _FRAME
    return 10.0 * np.log10(np.maximum(mean_square, 0.0) + 1e-20)


def _local_max(levels: npt.NDArray[np.float64], half_width: int) -> npt.NDArray[np.float64]:
    """The maximum of ``levels`` within ``half_width`` either side of each
    point, in linear time (van Herk / Gil-Werman: running maxima forwards and
    backwards within blocks of the window's width)."""
    width = 2 * half_width + 1
    n = len(levels)
    blocks = -(-(n + 2 * half_width) // width)
    padded = np.full(blocks * width, -np.inf)
    padded[half_width : half_width + n] = levels
    shaped = padded.reshape(blocks, width)
    forward = np.maximum.accumulate(shaped, axis=1).reshape(-1)
    backward = np.maximum.accumulate(shaped[:, ::-1], axis=1)[:, ::-1].reshape(-1)
    return np.maximum(backward[:n], forward[width - 1 : width - 1 + n])


class ToneBackend:
    """A :class:`earshot.core.decoding.Backend` that reads the tone language exactly.

    In each window it finds word-sized stretches of sound by their loudness
    envelope (a stretch is within 25 dB of its neighbourhood's peak, so the
    silences between words split them) and names each from one FFT over it:
    the word whose pitch's harmonics (200 to 3400 Hz) score best. A stretch
    is dropped unless it is 0.4 to 1.5 ``word_s`` long, its best pitch is a
    word's own, at least 60 % of its in-band power lies on that pitch's
    harmonics, odd and even harmonics both carry some of it (noise, lone
    sines and other sounds fail these), and at least ``min_coverage`` of the
    nominal word duration lies inside the window. ``min_coverage`` is above
    0.5, so a word that a window edge cuts is reported by at most one of the
    two windows on either side; a word cut near its middle is reported by
    neither, so final windows must not cut words. ``word_s`` must be the one
    the audio was made with; ``min_level_dbfs`` is the quietest 20 ms RMS
    level that counts as sound (a word at the default level is about
    -22 dBFS).

    Deterministic; a 30 s window takes a few milliseconds. Windows must be
    float32 mono at 16 kHz, as the protocol says; text is the words joined by
    spaces, tokens are word indices in :data:`VOCABULARY`, each word counts
    as one token of ``options.token_budget(duration)``, and words with times
    are always returned, whatever ``options.word_timestamps`` says.

    ``delay_s`` and ``delay_per_window_s`` make each batch wait
    ``delay_s + delay_per_window_s * len(windows)`` seconds (through
    ``sleep``, :func:`time.sleep` by default) to stand in for decoding cost
    in scheduler tests. :attr:`calls`, :attr:`windows_decoded` and
    :attr:`batch_sizes` count the work done.
    """

    capabilities = Capabilities()
    """Any language, on the CPU (the tones have no language)."""

    def __init__(
        self,
        *,
        word_s: float = DEFAULT_WORD_S,
        min_coverage: float = 0.6,
        min_level_dbfs: float = -55.0,
        delay_s: float = 0.0,
        delay_per_window_s: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0.5 < min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be in (0.5, 1], got {min_coverage}")
        _check_shape(SAMPLE_RATE, word_s, DEFAULT_LEVEL)
        if delay_s < 0 or delay_per_window_s < 0:
            raise ValueError(f"delays must not be negative, got {delay_s}, {delay_per_window_s}")
        self.word_s = float(word_s)
        self.min_coverage = float(min_coverage)
        self.min_level_dbfs = float(min_level_dbfs)
        self.delay_s = float(delay_s)
        self.delay_per_window_s = float(delay_per_window_s)
        self._sleep = sleep
        self._lock = threading.Lock()
        self.calls = 0
        """Number of :meth:`transcribe_batch` calls."""
        self.windows_decoded = 0
        """Number of windows decoded, over all calls."""
        self.batch_sizes: list[int] = []
        """The number of windows of every call, in order."""
        self._head_bias = self._tail_bias = 0.0
        self._head_bias, self._tail_bias = self._calibrate()

    @property
    def name(self) -> str:
        """Always ``"tone"``."""
        return "tone"

    def provenance(self) -> dict[str, Any]:
        """Names this a synthetic test backend; ``sha256`` is a digest of its settings."""
        settings = {
            "vocabulary": list(VOCABULARY),
            "f0_lowest_hz": F0_LOWEST_HZ,
            "steps_per_octave": STEPS_PER_OCTAVE,
            "word_s": self.word_s,
            "min_coverage": self.min_coverage,
            "min_level_dbfs": self.min_level_dbfs,
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        return {
            "name": self.name,
            "kind": "synthetic-test-backend",
            "synthetic": True,
            "description": "Deterministic reader of the synthetic tone language of the tests",
            "source": "tests/kit/tones.py",
            "revision": digest[:12],
            "license": "Apache-2.0",
            "quantization": "none",
            "sha256": digest,
            "settings": settings,
        }

    def reset_counters(self) -> None:
        """Set :attr:`calls`, :attr:`windows_decoded` and :attr:`batch_sizes` back to zero."""
        with self._lock:
            self.calls = 0
            self.windows_decoded = 0
            self.batch_sizes = []

    def transcribe_batch(
        self, windows: Sequence[Window], options: DecodeOptions
    ) -> list[Hypothesis]:
        """One :class:`Hypothesis` per window, in order.

        Raises :class:`InvalidRequestError` (nothing counted, no delay) for a
        window longer than 30 s or whose audio is not one-dimensional.
        """
        for i, window in enumerate(windows):
            shape = np.shape(window.audio)
            if len(shape) != 1:
                raise InvalidRequestError(
                    f"window {i}: audio must be mono (1-D), got shape {shape}", field="audio"
                )
            if window.duration > MAX_WINDOW_SECONDS + 1e-9:
                raise InvalidRequestError(
                    f"window {i} is {window.duration:.3f} s long; the limit is "
                    f"{MAX_WINDOW_SECONDS:g} s",
                    field="audio",
                    limit_s=MAX_WINDOW_SECONDS,
                )
        with self._lock:
            self.calls += 1
            self.windows_decoded += len(windows)
            self.batch_sizes.append(len(windows))
        pause = self.delay_s + self.delay_per_window_s * len(windows)
        if pause > 0:
            self._sleep(pause)
        return [self._hypothesis(window, options) for window in windows]

    def read_words(self, audio: npt.ArrayLike) -> list[WordTiming]:
        """The words :meth:`transcribe_batch` reports for ``audio`` (16 kHz
        mono), before any token budget."""
        return [
            WordTiming(w.word, w.start, w.end, round(w.tonality, 4))
            for w in self.detect(audio)
            if w.coverage >= self.min_coverage
        ]

    def detect(self, audio: npt.ArrayLike) -> list[DetectedWord]:
        """Every tone word in 16 kHz mono ``audio``, whole or cut by an edge,
        before the coverage rule. Raises ValueError for audio that is not 1-D."""
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"audio must be 1-D, got shape {x.shape}")
        if len(x) < _FRAME:
            return []
        levels = _frame_levels(x)
        peak = _local_max(levels, max(1, round(0.6 * self.word_s * SAMPLE_RATE / _HOP)))
        # Loud enough, within 25 dB of the neighbourhood's peak, and a little
        # above the window's background (its quietest tenth) where that is
        # noise, but never so high that it eats into a word's body.
        background = float(np.percentile(levels, 10)) + 6.0
        threshold = np.maximum(self.min_level_dbfs, peak - _WORD_DYNAMIC_DB)
        threshold = np.maximum(threshold, np.minimum(background, peak - 10.0))
        min_frames = 0.4 * self.word_s * SAMPLE_RATE / _HOP
        # Longer than any word: a sustained sound, or words run together.
        max_frames = (1.5 * self.word_s * SAMPLE_RATE - _FRAME) / _HOP + 1
        runs = [
            (first, stop)
            for first, stop in _runs(levels > threshold)
            if min_frames <= stop - first <= max_frames
        ]
        return self._identify(x, runs, len(levels)) if runs else []

    def _hypothesis(self, window: Window, options: DecodeOptions) -> Hypothesis:
        found = self.detect(window.audio)
        kept = [w for w in found if w.coverage >= self.min_coverage]
        budget = options.token_budget(window.duration)
        info: dict[str, Any] = {
            "backend": self.name,
            "partial_words_dropped": len(found) - len(kept),
            "words_over_budget": max(0, len(kept) - budget),
        }
        words = tuple(
            WordTiming(w.word, w.start, w.end, round(w.tonality, 4)) for w in kept[:budget]
        )
        tokens = tuple(_INDEX[w.word] for w in words)
        text = " ".join(w.word for w in words)
        segments = (Segment(words[0].start, words[-1].end, text, tokens, words),) if words else ()
        return Hypothesis(
            text=text,
            tokens=tokens,
            segments=segments,
            language=window.language or "en",
            avg_logprob=-0.1 if words else -1.0,
            no_speech_prob=0.02 if words else 0.98,
            words=words,
            info=info,
        )

    def _identify(
        self, x: AudioArray, runs: list[tuple[int, int]], n_frames: int
    ) -> list[DetectedWord]:
        """Name the word in each run of loud frames, or drop the run."""
        bounds = [(first * _HOP, min(len(x), (stop - 1) * _HOP + _FRAME)) for first, stop in runs]
        lengths = np.array([b - a for a, b in bounds], dtype=np.float64)
        nfft = max(4096, 1 << (int(lengths.max()) - 1).bit_length())
        # float64: numpy's float32 FFT is several times slower.
        pieces = np.zeros((len(runs), nfft), dtype=np.float64)
        for row, (a, b) in enumerate(bounds):
            pieces[row, : b - a] = x[a:b] * _hann(b - a)
        tables = _pitch_tables(nfft)
        lo, hi = tables.band
        spectrum = np.abs(np.fft.rfft(pieces, axis=1)[:, :hi])
        band_power = spectrum[:, lo:] ** 2
        total = band_power.sum(axis=1)

        # Compressed magnitudes let the many weak harmonics vote, not only the
        # strong ones near the first formant. (Gathers, not a matrix product:
        # OpenBLAS threads make small products slow on small machines.)
        soft = np.sqrt(spectrum).astype(np.float32)
        score = ((soft[:, tables.hits] - soft[:, tables.misses]) * tables.weights).sum(axis=2)
        best = np.argmax(score, axis=1)
        pitch = tables.grid[best]
        index, off_grid = np.divmod(best - _GRID_PER_STEP // 2, _GRID_PER_STEP)

        # Power within the main lobe (of the Hann window) of each harmonic.
        freqs = tables.band_hz[None, :]
        harmonic = np.round(freqs / pitch[:, None])
        on = np.abs(freqs - harmonic * pitch[:, None]) <= (2.0 * SAMPLE_RATE / lengths)[:, None]
        on_power = np.where(on, band_power, 0.0)
        on_harmonics = on_power.sum(axis=1)
        tonality = on_harmonics / np.maximum(total, 1e-30)
        # A word spreads its power over odd and even harmonics alike; a lone
        # sine (one harmonic) or a series an octave up (even ones only) fits a
        # word's pitch but is not a word.
        odd = np.where(harmonic % 2 == 1, on_power, 0.0).sum(axis=1)
        balance = np.minimum(odd, on_harmonics - odd) / np.maximum(on_harmonics, 1e-30)

        duration = len(x) / SAMPLE_RATE
        found = []
        for row, (first, stop) in enumerate(runs):
            if (
                total[row] <= 0.0
                or off_grid[row] != 0
                or not 0 <= index[row] < len(VOCABULARY)
                or tonality[row] < _MIN_TONALITY
                or balance[row] < _MIN_BALANCE
            ):
                continue
            cut_start, cut_end = first == 0, stop == n_frames
            start = 0.0 if cut_start else first * _HOP / SAMPLE_RATE - self._head_bias
            end = duration if cut_end else bounds[row][1] / SAMPLE_RATE + self._tail_bias
            start, end = max(0.0, start), min(duration, end)
            found.append(
                DetectedWord(
                    word=VOCABULARY[index[row]],
                    start=start,
                    end=end,
                    coverage=(end - start) / self.word_s,
                    tonality=float(tonality[row]),
                    pitch_hz=float(pitch[row]),
                    cut_start=cut_start,
                    cut_end=cut_end,
                )
            )
        return found

    def _calibrate(self) -> tuple[float, float]:
        """How far the measured extent of a whole word lies inside its nominal
        bounds (attack and decay are quiet), measured on the words themselves."""
        lead = 0.2
        heads, tails = [], []
        for word in VOCABULARY:
            audio, _ = _render([[word]], SAMPLE_RATE, 0.0, lead, lead, self.word_s, 0.0, 0.25)
            found = self.detect(audio)
            if len(found) != 1:
                raise RuntimeError(f"tone calibration failed for {word!r}: found {found}")
            heads.append(found[0].start - lead)
            tails.append(lead + self.word_s - found[0].end)
        return float(np.mean(heads)), float(np.mean(tails))
