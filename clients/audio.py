"""Audio for the streaming client: encoding samples the way the server reads
them, and reading files to send.

The encodings and their sizes are the server's own (``earshot.core.audio``):
what the client writes is by construction what the server decodes.
"""

from __future__ import annotations

import os
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from earshot.core.audio import ENCODINGS as BYTES_PER_SAMPLE
from earshot.core.audio import canonical_encoding as core_canonical_encoding

__all__ = [
    "BYTES_PER_SAMPLE",
    "ENCODINGS",
    "FloatArray",
    "canonical_encoding",
    "encode_audio",
    "fit_audio",
    "read_audio_file",
]

ENCODINGS: Final = tuple(BYTES_PER_SAMPLE)
"""The encodings the server reads, by its names."""

FloatArray = npt.NDArray[np.float32]


def canonical_encoding(encoding: str) -> str:
    """The server's name for ``encoding`` (any case, ``float`` for
    ``linear32``); ValueError for one the server does not read."""
    key = core_canonical_encoding(encoding)
    if key is None:
        raise ValueError(
            f"unsupported encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}"
        )
    return key


def _to_pcm16(x: npt.NDArray[np.float64]) -> npt.NDArray[np.int32]:
    # Full scale is 32768, as in the server's decoder; +1.0 clips to 32767.
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int32)


# floor(log2(v)) for v in 0..255 (0 for v == 0): the G.711 segment lookup.
_LOG2_TABLE: Final = np.array([max(0, int(v).bit_length() - 1) for v in range(256)], np.int32)

# A-law segment ends, in 13-bit magnitude units (G.711 table 1a).
_ALAW_SEGMENT_END: Final = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], np.int32)


def _mulaw_encode(pcm: npt.NDArray[np.int32]) -> npt.NDArray[np.uint8]:
    # G.711 µ-law on 16-bit input: bias the magnitude by 0x84 (33 in the
    # law's 14-bit units), find the segment from its leading bit, keep four
    # mantissa bits, and send the code inverted with bit 7 set for negatives.
    negative = pcm < 0
    magnitude = np.minimum(np.abs(pcm), 32635) + 0x84
    exponent = _LOG2_TABLE[magnitude >> 7]
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    code: npt.NDArray[np.int32] = (negative.astype(np.int32) << 7) | (exponent << 4) | mantissa
    return (code ^ 0xFF).astype(np.uint8)


def _alaw_encode(pcm: npt.NDArray[np.int32]) -> npt.NDArray[np.uint8]:
    # G.711 A-law on 13-bit input: negatives are coded as (-x - 1) so that the
    # two halves are symmetric; segments 0 and 1 share a step of 2, then the
    # step doubles. Bit 7 set means positive and the even bits are inverted
    # on the line (xor 0x55).
    x = pcm >> 3
    negative = x < 0
    magnitude = np.where(negative, -x - 1, x)
    segment = np.searchsorted(_ALAW_SEGMENT_END, magnitude, side="left").astype(np.int32)
    shift = np.maximum(segment, 1)
    mantissa = (magnitude >> shift) & 0x0F
    code = (segment << 4) | mantissa
    mask = np.where(negative, 0x55, 0xD5)
    return (code ^ mask).astype(np.uint8)


def encode_audio(samples: npt.ArrayLike, encoding: str) -> bytes:
    """Encode float samples in ``[-1, 1]`` as the raw bytes of ``encoding``.

    ``samples`` has shape ``(n,)`` (mono) or ``(n, channels)``; the result has
    the channels interleaved, little-endian, as ``/v1/listen`` expects.
    Encodings: ``linear16`` (16-bit signed PCM), ``linear32`` (32-bit IEEE
    float PCM; aliases ``float``, ``float32``), ``int32`` (32-bit signed PCM),
    ``mulaw`` and ``alaw`` (8-bit G.711). Integer and G.711 encodings scale
    full scale to 1.0 as the server's decoder does and clip values outside
    ``[-1, 1]``; NaN is sent as 0. ``linear32`` sends the values as they are
    (clipped to ``[-1, 1]``, which the server would do anyway).

    Raises ValueError for an unknown encoding or an array of more than two
    dimensions.
    """
    name = canonical_encoding(encoding)
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim not in (1, 2):
        raise ValueError(f"samples must have shape (n,) or (n, channels), not {x.shape}")
    x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    if name == "linear32":
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if name == "int32":
        scaled = np.clip(np.rint(x * 2147483648.0), -2147483648, 2147483647)
        return np.ascontiguousarray(scaled, dtype="<i4").tobytes()
    pcm = _to_pcm16(x)
    if name == "linear16":
        return np.ascontiguousarray(pcm, dtype="<i2").tobytes()
    encoded = _mulaw_encode(pcm) if name == "mulaw" else _alaw_encode(pcm)
    return np.ascontiguousarray(encoded).tobytes()


# ---------------------------------------------------------------------------
# Audio files


def read_audio_file(path: str | os.PathLike[str]) -> tuple[FloatArray, int]:
    """Read any file libsndfile can read: float32 samples ``(n, channels)`` and their rate.

    Raises ``soundfile.LibsndfileError`` (a RuntimeError) for unreadable files
    and FileNotFoundError for missing ones.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such file")
    data, rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(data, dtype=np.float32), int(rate)


def fit_audio(samples: npt.NDArray[Any], rate: int, sample_rate: int, channels: int) -> FloatArray:
    """Samples as ``(n, channels)`` float32 at ``sample_rate``."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"audio must have shape (n,) or (n, channels), not {x.shape}")
    have = x.shape[1]
    if have != channels:
        if channels == 1:
            x = x.mean(axis=1, keepdims=True, dtype=np.float32)
        elif have == 1:
            x = np.repeat(x, channels, axis=1)
        else:
            raise ValueError(
                f"the audio has {have} channels but the stream was opened with "
                f"channels={channels}; open it with channels={have}, or use mono audio"
            )
    if rate != sample_rate and len(x):
        x = soxr.resample(x, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------
# The client
