"""The pure audio core of the streaming path: raw websocket bytes in, 16 kHz float32 out.

One stream's audio goes through, in order:

1. :class:`AudioFormat` -- the client's query parameters (``encoding``,
   ``sample_rate``, ``channels``), validated once when the stream opens.
2. :class:`FrameDecoder` -- bytes of interleaved samples to a float32 array of
   shape ``(channels, n)`` in ``[-1, 1]``.
3. :class:`StreamResampler` -- streaming resampling of all channels to 16 kHz.
4. :class:`RingBuffer` -- the last N seconds of each channel at 16 kHz,
   addressed by absolute sample index on the stream's own clock.

:class:`StreamAudio` composes the four for one stream. Nothing here does I/O,
keeps global state or calls Python code per sample.

Encodings (raw, headerless, little-endian, channels interleaved):

==============  =====================================================================
``linear16``    16-bit signed integer PCM.
``linear32``    32-bit IEEE float PCM. Deepgram's documentation defines ``linear32``
                as "32-bit, little endian, floating-point PCM", so we follow it, not
                the name. ``float`` and ``float32`` are accepted as aliases and
                normalised to ``linear32``.
``int32``       32-bit signed integer PCM (an Earshot extension; Deepgram has none).
``mulaw``       8-bit G.711 µ-law.
``alaw``        8-bit G.711 A-law.
==============  =====================================================================

Float input is sanitised rather than trusted: NaN becomes 0 and values are
clipped to ``[-1, 1]``; :attr:`FrameDecoder.clipped_samples` counts how many
samples needed it, which is a strong hint that the client mislabelled its
encoding (16-bit PCM read as float, say).

Partial frames: Deepgram requires every message to hold whole samples. We are
lenient: a message may end in the middle of a sample or of a multi-channel
frame, and the bytes left over are carried to the next message. Only at the end
of the stream is a remainder an error (``audio_partial_frame``), because then
the client certainly sent a number of bytes that is not a whole number of
frames. A ``channels`` (or ``encoding``) value that does not match the data is
not detectable from the bytes in general (mono audio declared as stereo is
just two plausible channels at half the rate); the partial final frame and the
clipping counter are the signals that exist.

Error codes defined here (see :mod:`earshot.core.errors` for the root type). The
first five are the client's doing (HTTP 400, websocket close 4400); the
ring-buffer ones are internal (HTTP 500, websocket close 1011):

============================  ==========================================================
``unsupported_encoding``      ``encoding`` missing or not one of the encodings above.
``invalid_sample_rate``       ``sample_rate`` missing, not an integer, or out of range
                              (8000..48000 Hz by default).
``invalid_channels``          ``channels`` not an integer or out of range (1..8 by
                              default).
``audio_partial_frame``       the stream ended with bytes that are not a whole frame.
``audio_after_finish``        audio pushed into a stream after it was finished.
``audio_range_invalid``       a ring-buffer read with a negative or reversed range (a bug).
``audio_range_overwritten``   a ring-buffer read of audio no longer held (the reader fell
                              further behind than the buffer's length, or read audio it
                              had discarded).
``audio_range_not_received``  a ring-buffer read past the newest sample (a bug).
============================  ==========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import soxr

from earshot.core.decoding import SAMPLE_RATE
from earshot.core.errors import (
    AudioAfterFinishError,
    AudioRangeError,
    AudioRangeNotReceivedError,
    AudioRangeOverwrittenError,
    ConfigError,
    InvalidChannelsError,
    InvalidSampleRateError,
    PartialFrameError,
    UnsupportedEncodingError,
)

__all__ = [
    "ALAW_TABLE",
    "DEFAULT_BUFFER_SECONDS",
    "ENCODINGS",
    "ENCODING_ALIASES",
    "MAX_CHANNELS",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "MULAW_TABLE",
    "TARGET_RATE",
    "AudioFormat",
    "FrameDecoder",
    "RingBuffer",
    "StreamAudio",
    "StreamResampler",
    "canonical_encoding",
]

FloatArray = npt.NDArray[np.float32]
Quality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]

TARGET_RATE: Final = SAMPLE_RATE
"""Sample rate of everything downstream of this module (Whisper's and Silero's rate)."""

MIN_SAMPLE_RATE: Final = 8_000
MAX_SAMPLE_RATE: Final = 48_000
MAX_CHANNELS: Final = 8
DEFAULT_BUFFER_SECONDS: Final = 40.0
"""Audio held per channel: longer than the longest utterance plus the scheduler's lag limit."""

# Canonical name -> bytes per sample.
ENCODINGS: Final[dict[str, int]] = {
    "linear16": 2,
    "linear32": 4,
    "int32": 4,
    "mulaw": 1,
    "alaw": 1,
}
ENCODING_ALIASES: Final[dict[str, str]] = {"float": "linear32", "float32": "linear32"}


def canonical_encoding(name: str) -> str | None:
    """The key of :data:`ENCODINGS` that ``name`` means (any case, aliases
    allowed), or None for an encoding Earshot does not read."""
    key = name.strip().lower()
    key = ENCODING_ALIASES.get(key, key)
    return key if key in ENCODINGS else None


# ---------------------------------------------------------------------------
# Errors


# ---------------------------------------------------------------------------
# Format


def _parse_int(value: object) -> int | None:
    """An int from an int or a decimal string (query parameters arrive as strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        # Bounded length: int() refuses very long digit strings, and no valid
        # value needs more than a few digits.
        if text.isascii() and text.isdigit() and len(text) <= 12:
            return int(text)
    return None


def _jsonable(value: object) -> object:
    """``value`` as it may appear in an error's details and message: JSON, and
    short (an int of thousands of digits becomes a description of it)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**15 else "an integer of more than 15 digits"
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, str):
        return value if len(value) <= 64 else value[:64] + "..."
    return repr(value)[:64]


@dataclass(frozen=True)
class AudioFormat:
    """How one stream's bytes are to be read. Build it with :meth:`parse`."""

    encoding: str
    """Canonical encoding name, a key of :data:`ENCODINGS`."""
    sample_rate: int
    channels: int

    @classmethod
    def parse(
        cls,
        encoding: str | None,
        sample_rate: int | str | None,
        channels: int | str | None = 1,
        *,
        min_sample_rate: int = MIN_SAMPLE_RATE,
        max_sample_rate: int = MAX_SAMPLE_RATE,
        max_channels: int = MAX_CHANNELS,
    ) -> AudioFormat:
        """Validate client parameters, as given in a query string or as ints.

        ``encoding`` is case-insensitive and may be an alias (``float``);
        ``sample_rate`` and ``channels`` may be ints or decimal strings;
        ``channels`` of ``None`` means 1 (Deepgram's default). The limits are
        settings; pass the configured values.

        Raises :class:`UnsupportedEncodingError`, :class:`InvalidSampleRateError`
        or :class:`InvalidChannelsError`, each naming the field, the value and
        what is allowed (also in ``details``: ``field``, ``value``, ``allowed``
        or ``min``/``max``).
        """
        allowed = sorted([*ENCODINGS, *ENCODING_ALIASES])
        if encoding is None:
            raise UnsupportedEncodingError(
                "encoding is required for raw audio; allowed: " + ", ".join(allowed),
                field="encoding",
                value=None,
                allowed=allowed,
            )
        canonical = canonical_encoding(encoding) if isinstance(encoding, str) else None
        if canonical is None:
            raise UnsupportedEncodingError(
                f"encoding={_jsonable(encoding)!r} is not supported; allowed: "
                + ", ".join(allowed),
                field="encoding",
                value=_jsonable(encoding),
                allowed=allowed,
            )
        assert canonical is not None

        rate = _parse_int(sample_rate)
        if rate is None or not min_sample_rate <= rate <= max_sample_rate:
            what = (
                " is required"
                if sample_rate is None
                else f"={_jsonable(sample_rate)!r} is not allowed"
            )
            raise InvalidSampleRateError(
                f"sample_rate{what}: it must be an integer from {min_sample_rate} "
                f"to {max_sample_rate} Hz",
                field="sample_rate",
                value=_jsonable(sample_rate),
                min=min_sample_rate,
                max=max_sample_rate,
            )

        count = 1 if channels is None else _parse_int(channels)
        if count is None or not 1 <= count <= max_channels:
            raise InvalidChannelsError(
                f"channels={_jsonable(channels)!r} is not allowed: it must be an integer "
                f"from 1 to {max_channels}",
                field="channels",
                value=_jsonable(channels),
                min=1,
                max=max_channels,
            )
        return cls(canonical, rate, count)

    @property
    def bytes_per_sample(self) -> int:
        """Bytes of one sample of one channel."""
        return ENCODINGS[self.encoding]

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of one sample for all channels (the unit messages are made of)."""
        return ENCODINGS[self.encoding] * self.channels

    @property
    def bytes_per_second(self) -> int:
        """Bytes of one second of audio, e.g. for rate limits on incoming data."""
        return self.bytes_per_frame * self.sample_rate


# ---------------------------------------------------------------------------
# G.711 tables


def _mulaw_table() -> FloatArray:
    # G.711 µ-law: the byte is sent inverted; sign bit set means negative.
    # Reconstruction in 16-bit units: ((2 * mantissa + 33) << exponent) - 33,
    # times 4 (the 14-bit law lives in the top bits of 16-bit PCM).
    code = np.arange(256, dtype=np.int32) ^ 0xFF
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    value = np.where(code & 0x80, -magnitude, magnitude)
    table = (value / 32768.0).astype(np.float32)
    table.flags.writeable = False
    return table


def _alaw_table() -> FloatArray:
    # G.711 A-law: even bits are inverted on the line (xor 0x55); sign bit set
    # means positive. Segment 0 is linear, the others double the step.
    code = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    linear = (mantissa << 4) + 8
    magnitude = np.where(exponent == 0, linear, (linear + 0x100) << np.maximum(exponent - 1, 0))
    value = np.where(code & 0x80, magnitude, -magnitude)
    table = (value / 32768.0).astype(np.float32)
    table.flags.writeable = False
    return table


MULAW_TABLE: Final[FloatArray] = _mulaw_table()
"""Float32 value of each µ-law byte (index = byte), scaled so 16-bit full scale is 1."""
ALAW_TABLE: Final[FloatArray] = _alaw_table()
"""Float32 value of each A-law byte (index = byte), scaled so 16-bit full scale is 1."""


# ---------------------------------------------------------------------------
# Decoding


class FrameDecoder:
    """Decodes one stream's binary messages to float32 samples.

    Create one per stream and feed it every message in order with
    :meth:`decode`; call :meth:`finish` once when the stream ends. A message
    may end in the middle of a frame: the leftover bytes are kept and
    completed by the next message.
    """

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self._bpf = fmt.bytes_per_frame
        self._pending = b""
        self._finished = False
        self.frames_decoded = 0
        """Frames (one sample per channel) decoded so far, at the input rate."""
        self.clipped_samples = 0
        """Float samples that were NaN, infinite or outside ``[-1, 1]`` (see module doc)."""

    @property
    def pending_bytes(self) -> int:
        """Bytes held back because they do not yet make up a whole frame."""
        return len(self._pending)

    def decode_interleaved(self, payload: bytes | bytearray | memoryview) -> FloatArray:
        """Like :meth:`decode` but returns shape ``(n, channels)``, C-contiguous.

        This is the layout the bytes already have and the one soxr wants, so
        it costs no transpose.
        """
        if self._finished:
            raise AudioAfterFinishError(
                "audio received after the stream was finished", bytes=len(payload)
            )
        view = memoryview(payload)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        data: bytes | memoryview = self._pending + view if self._pending else view
        usable = len(data) - len(data) % self._bpf
        self._pending = bytes(data[usable:]) if usable < len(data) else b""
        n = usable // self._bpf
        samples = self._convert(data, n * self.format.channels)
        self.frames_decoded += n
        return samples.reshape(n, self.format.channels)

    def decode(self, payload: bytes | bytearray | memoryview) -> FloatArray:
        """Decode one message to shape ``(channels, n)``, float32 in ``[-1, 1]``.

        ``n`` counts only whole frames; a trailing partial frame is carried
        over. The result is a new array (a transposed view of one, so its rows
        are strided; use ``np.ascontiguousarray`` where that matters). Raises
        :class:`AudioAfterFinishError` after :meth:`finish`.
        """
        return np.transpose(self.decode_interleaved(payload))

    def finish(self) -> None:
        """End the stream. Raises :class:`PartialFrameError` if bytes are left over.

        The leftover bytes are dropped either way and the decoder accepts no
        more audio.
        """
        self._finished = True
        leftover, self._pending = len(self._pending), b""
        if leftover:
            fmt = self.format
            raise PartialFrameError(
                f"the stream ended with {leftover} byte(s) that are not a whole frame: "
                f"one frame is {self._bpf} bytes ({fmt.channels} channel(s) of "
                f"{fmt.bytes_per_sample}-byte {fmt.encoding} samples); check that "
                "encoding and channels match the audio sent",
                leftover_bytes=leftover,
                bytes_per_frame=self._bpf,
                encoding=fmt.encoding,
                channels=fmt.channels,
            )

    def _convert(self, data: bytes | bytearray | memoryview, count: int) -> FloatArray:
        encoding = self.format.encoding
        if encoding == "mulaw":
            return MULAW_TABLE[np.frombuffer(data, dtype=np.uint8, count=count)]
        if encoding == "alaw":
            return ALAW_TABLE[np.frombuffer(data, dtype=np.uint8, count=count)]
        if encoding == "linear16":
            out = np.frombuffer(data, dtype="<i2", count=count).astype(np.float32)
            out *= np.float32(1.0 / 32768.0)
            return out
        if encoding == "int32":
            out = np.frombuffer(data, dtype="<i4", count=count).astype(np.float32)
            # 2**31 - 1 rounds to 2**31 in float32, so the result is within [-1, 1].
            out *= np.float32(1.0 / 2147483648.0)
            return out
        # linear32: IEEE float, sanitised.
        out = np.frombuffer(data, dtype="<f4", count=count).astype(np.float32)
        bad = np.count_nonzero(~(np.abs(out) <= np.float32(1.0)))
        if bad:
            self.clipped_samples += int(bad)
            np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
            np.clip(out, np.float32(-1.0), np.float32(1.0), out=out)
        return out


# ---------------------------------------------------------------------------
# Resampling


class StreamResampler:
    """Streaming resampler of one stream's channels to :data:`TARGET_RATE`.

    All channels of a stream go through one soxr stream (channels are
    independent; one call is cheaper than one per channel). Feed blocks in
    order with :meth:`process` and call :meth:`flush` once at the end: the
    concatenation of all outputs equals one-shot resampling of the whole
    signal, sample ``k`` of the output being at time ``k / out_rate``. soxr
    holds back some output until it has enough input (with ``HQ`` about 60 ms
    on average and up to about 120 ms from 8 kHz; about 40 ms at most from
    44.1/48 kHz), so output comes in irregular blocks, sometimes empty.
    When ``in_rate == out_rate`` it is a passthrough.
    """

    def __init__(
        self,
        in_rate: int,
        channels: int = 1,
        out_rate: int = TARGET_RATE,
        quality: Quality = "HQ",
    ) -> None:
        if in_rate <= 0 or out_rate <= 0 or channels <= 0:
            raise ConfigError(
                f"resampler needs positive rates and channels, got in_rate={in_rate}, "
                f"out_rate={out_rate}, channels={channels}"
            )
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.channels = channels
        self.passthrough = in_rate == out_rate
        self._finished = False
        self._stream = (
            None
            if self.passthrough
            else soxr.ResampleStream(in_rate, out_rate, channels, dtype="float32", quality=quality)
        )

    def process(self, samples: npt.ArrayLike) -> FloatArray:
        """Resample the next block, shape ``(channels, n)``; returns ``(channels, m)``.

        ``m`` may be 0. In passthrough the input array itself may be returned;
        otherwise the result is a transposed view of a new array. Raises
        :class:`AudioAfterFinishError` after :meth:`flush`, ``ValueError`` if
        the shape does not match ``channels``.
        """
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != self.channels:
            raise ValueError(f"expected shape ({self.channels}, n), got {x.shape}")
        if self._finished:
            raise AudioAfterFinishError("audio received after the resampler was flushed")
        if self._stream is None:
            return x
        out: FloatArray = self._stream.resample_chunk(np.ascontiguousarray(x.T))
        return np.transpose(out)

    def flush(self) -> FloatArray:
        """End the stream and return the output soxr was holding back, ``(channels, m)``."""
        if self._finished:
            raise AudioAfterFinishError("the resampler was already flushed")
        self._finished = True
        if self._stream is None:
            return np.zeros((self.channels, 0), dtype=np.float32)
        empty = np.zeros((0, self.channels), dtype=np.float32)
        out: FloatArray = self._stream.resample_chunk(empty, last=True)
        return np.transpose(out)


# ---------------------------------------------------------------------------
# Ring buffer


class RingBuffer:
    """The last ``capacity`` samples of one channel, by absolute sample index.

    Sample ``i`` is the ``i``-th sample ever appended (the stream clock at
    16 kHz). Memory is allocated once; appends overwrite the oldest samples.
    Not thread-safe: one owner appends and reads.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ConfigError(f"ring buffer capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._data = np.zeros(capacity, dtype=np.float32)
        self._total = 0
        self._discarded = 0

    @classmethod
    def for_seconds(cls, seconds: float, rate: int = TARGET_RATE) -> RingBuffer:
        """A buffer holding ``seconds`` of audio at ``rate``."""
        if not math.isfinite(seconds) or seconds <= 0:
            raise ConfigError(
                f"audio buffer length must be a positive number of seconds, got {seconds}"
            )
        return cls(max(1, round(seconds * rate)))

    @property
    def total(self) -> int:
        """Samples ever appended; the index the next sample will get."""
        return self._total

    @property
    def oldest(self) -> int:
        """Index of the oldest sample that can still be read."""
        return max(self._discarded, self._total - self.capacity)

    def append(self, samples: npt.ArrayLike) -> None:
        """Append 1-D samples (converted to float32). Never fails for length."""
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected a 1-D array of samples, got shape {x.shape}")
        n = x.shape[0]
        if n == 0:
            return
        if n >= self.capacity:
            # Only the last `capacity` samples survive; write them so that the
            # slot of index i stays i % capacity.
            start = (self._total + n - self.capacity) % self.capacity
            tail = x[n - self.capacity :]
            first = self.capacity - start
            self._data[start:] = tail[:first]
            self._data[:start] = tail[first:]
        else:
            start = self._total % self.capacity
            first = min(n, self.capacity - start)
            self._data[start : start + first] = x[:first]
            self._data[: n - first] = x[first:]
        self._total += n

    def read(self, start: int, end: int) -> FloatArray:
        """Copy of samples ``[start, end)``.

        Raises :class:`AudioRangeOverwrittenError` if ``start < oldest``,
        :class:`AudioRangeNotReceivedError` if ``end > total`` and
        :class:`AudioRangeError` if ``start < 0`` or ``end < start``.
        """
        if start < 0 or end < start:
            raise AudioRangeError(
                f"invalid audio range [{start}, {end}): need 0 <= start <= end",
                start=start,
                end=end,
            )
        if start < self.oldest:
            raise AudioRangeOverwrittenError(
                f"audio from sample {start} is no longer held: the buffer holds "
                f"[{self.oldest}, {self._total}) ({self.capacity} samples at most)",
                start=start,
                end=end,
                oldest=self.oldest,
                total=self._total,
            )
        if end > self._total:
            raise AudioRangeNotReceivedError(
                f"audio up to sample {end} has not been received: {self._total} so far",
                start=start,
                end=end,
                oldest=self.oldest,
                total=self._total,
            )
        n = end - start
        out = np.empty(n, dtype=np.float32)
        begin = start % self.capacity
        first = min(n, self.capacity - begin)
        out[:first] = self._data[begin : begin + first]
        out[first:] = self._data[: n - first]
        return out

    def discard_before(self, index: int) -> None:
        """Declare that samples before ``index`` will not be read again.

        Memory is preallocated, so nothing is freed: what this buys is that a
        later read of discarded audio fails loudly instead of silently
        returning audio the owner had finished with. ``index`` is clamped to
        ``total``; moving backwards is a no-op.
        """
        self._discarded = max(self._discarded, min(index, self._total))


# ---------------------------------------------------------------------------
# One stream


class StreamAudio:
    """Everything between a stream's binary messages and its 16 kHz audio.

    Create one per stream from its validated :class:`AudioFormat`, call
    :meth:`push` with each binary message in order and :meth:`finish` once at
    the end. With ``mix_down`` the channels are averaged into one before
    resampling (a stream that did not ask for ``multichannel``). Each output
    channel's audio is also kept in ``buffers[channel]``, a :class:`RingBuffer`
    of ``buffer_seconds`` (a setting) on the stream clock.
    """

    def __init__(
        self,
        fmt: AudioFormat,
        *,
        mix_down: bool = False,
        buffer_seconds: float = DEFAULT_BUFFER_SECONDS,
        quality: Quality = "HQ",
    ) -> None:
        self.format = fmt
        self.mix_down = mix_down and fmt.channels > 1
        channels = 1 if self.mix_down else fmt.channels
        self.decoder = FrameDecoder(fmt)
        self.resampler = StreamResampler(fmt.sample_rate, channels, TARGET_RATE, quality)
        self.buffers: tuple[RingBuffer, ...] = tuple(
            RingBuffer.for_seconds(buffer_seconds, TARGET_RATE) for _ in range(channels)
        )
        self._finished = False

    @property
    def total(self) -> int:
        """16 kHz samples per channel produced so far (the stream clock)."""
        return self.buffers[0].total

    @property
    def seconds_received(self) -> float:
        """Duration of the whole frames received, at the client's rate."""
        return self.decoder.frames_decoded / self.format.sample_rate

    def push(self, payload: bytes | bytearray | memoryview) -> list[FloatArray]:
        """Take one binary message; return the new 16 kHz samples, one array per channel.

        The arrays are contiguous float32 and owned by the caller; they may be
        empty (the resampler holds audio back, or the message was shorter than
        a frame). Raises :class:`AudioAfterFinishError` after :meth:`finish`.
        """
        if self._finished:
            raise AudioAfterFinishError(
                "audio received after the stream was finished", bytes=len(payload)
            )
        decoded = self.decoder.decode(payload)
        if self.mix_down:
            decoded = decoded.mean(axis=0, keepdims=True, dtype=np.float32)
        return self._store(self.resampler.process(decoded))

    def finish(self) -> list[FloatArray]:
        """End the stream; return the last 16 kHz samples, one array per channel.

        If bytes that are not a whole frame were left over, raises
        :class:`PartialFrameError` after doing everything else: the tail is
        in the buffers and in the error's ``tail``, so the caller can warn the
        client and carry on. Raises :class:`AudioAfterFinishError` if called twice.
        """
        if self._finished:
            raise AudioAfterFinishError("the stream was already finished")
        self._finished = True
        tail = self._store(self.resampler.flush())
        try:
            self.decoder.finish()
        except PartialFrameError as err:
            err.tail = tail
            raise
        return tail

    def _store(self, block: FloatArray) -> list[FloatArray]:
        out: list[FloatArray] = []
        for row, buffer in zip(block, self.buffers, strict=True):
            samples = np.ascontiguousarray(row)
            buffer.append(samples)
            out.append(samples)
        return out
