"""Reading whole audio files for batch transcription.

Any format libsndfile reads (WAV, FLAC, OGG/Vorbis, ...) is read with
soundfile; anything else (MP3, M4A, WebM, video containers, ...) goes through
faster-whisper's PyAV decoder. Every file comes out as mono float32 at 16 kHz,
resampled with soxr; channels are averaged.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from earshot.core.decoding import SAMPLE_RATE, AudioArray
from earshot.core.errors import AudioDecodeError, EmptyAudioError


@dataclass(frozen=True)
class LoadedAudio:
    """A decoded file: 16 kHz mono samples and what the file was."""

    samples: AudioArray
    source_rate: int
    source_channels: int
    decoder: str

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def to_mono_16k(data: np.ndarray, rate: int) -> AudioArray:
    """(frames,) or (frames, channels) float audio at ``rate`` -> mono float32 16 kHz."""
    mono = data.mean(axis=1) if data.ndim == 2 else data
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != SAMPLE_RATE and len(mono):
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return mono


def _read_soundfile(source: str | io.BytesIO) -> LoadedAudio:
    data, rate = sf.read(source, dtype="float32", always_2d=True)
    return LoadedAudio(to_mono_16k(data, rate), int(rate), int(data.shape[1]), "soundfile")


def _read_pyav(source: str | io.BytesIO) -> LoadedAudio:
    from faster_whisper.audio import decode_audio

    samples = decode_audio(source, sampling_rate=SAMPLE_RATE)
    return LoadedAudio(np.asarray(samples, dtype=np.float32), 0, 0, "pyav")


def load_audio(source: str | Path | bytes, *, label: str | None = None) -> LoadedAudio:
    """Decode a file path or the bytes of a file.

    Raises AudioDecodeError (code ``audio_decode_failed``) naming the file and
    the reason when it is missing or not audio, and EmptyAudioError (code
    ``audio_empty``) when it decodes to no samples.
    """
    name = label or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        if not source:
            raise EmptyAudioError(f"{name}: the input is empty (0 bytes)", file=name)

        def opener() -> str | io.BytesIO:
            return io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise AudioDecodeError(f"{name}: no such file", file=name)
        if path.is_dir():
            raise AudioDecodeError(f"{name}: is a folder, not an audio file", file=name)
        if path.stat().st_size == 0:
            raise EmptyAudioError(f"{name}: the file is empty (0 bytes)", file=name)

        def opener() -> str | io.BytesIO:
            return str(path)

    try:
        loaded = _read_soundfile(opener())
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        try:
            loaded = _read_pyav(opener())
        except Exception as exc:  # PyAV raises many error types for non-audio input
            reason = str(exc).strip() or type(exc).__name__
            raise AudioDecodeError(
                f"{name}: not a readable audio file ({reason})", file=name
            ) from exc
    if len(loaded.samples) == 0:
        raise EmptyAudioError(f"{name}: the file holds no audio samples", file=name)
    if not np.all(np.isfinite(loaded.samples)):
        raise AudioDecodeError(f"{name}: the audio holds NaN or infinite samples", file=name)
    return loaded
