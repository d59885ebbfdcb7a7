"""Tests of the pure audio core: formats, G.711 and PCM decoding, partial frames,
streaming resampling, the ring buffer and their composition for one stream."""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soxr

from earshot.core.audio import (
    ALAW_TABLE,
    MULAW_TABLE,
    TARGET_RATE,
    AudioFormat,
    FrameDecoder,
    RingBuffer,
    StreamAudio,
    StreamResampler,
)
from earshot.core.errors import (
    AudioAfterFinishError,
    AudioDecodeError,
    AudioRangeError,
    AudioRangeNotReceivedError,
    AudioRangeOverwrittenError,
    ConfigError,
    EarshotError,
    InvalidChannelsError,
    InvalidRequestError,
    InvalidSampleRateError,
    PartialFrameError,
    UnsupportedEncodingError,
)

F32 = npt.NDArray[np.float32]

# ---------------------------------------------------------------------------
# G.711 references, derived from the segment tables of the recommendation:
# each segment s holds 16 uniform steps; a code decodes to the middle of its
# step. Magnitudes are in the law's own units (14-bit for µ-law, 12-bit
# magnitude for A-law) and scaled to 16-bit PCM.

# µ-law: segment s starts just above lower[s] with step 2**(s+1).
_MULAW_LOWER = [-1, 31, 95, 223, 479, 991, 2015, 4063]
# A-law: segments 0 and 1 have step 2, then the step doubles.
_ALAW_LOWER = [0, 32, 64, 128, 256, 512, 1024, 2048]
_ALAW_STEP = [2, 2, 4, 8, 16, 32, 64, 128]


def ref_mulaw(byte: int) -> int:
    """16-bit PCM value of a µ-law byte (transmitted inverted; bit 7 set = negative)."""
    code = byte ^ 0xFF
    segment, step_index = (code >> 4) & 7, code & 0x0F
    step = 1 << (segment + 1)
    magnitude = _MULAW_LOWER[segment] + step // 2 + step * step_index
    return (-magnitude if code & 0x80 else magnitude) * 4


def ref_alaw(byte: int) -> int:
    """16-bit PCM value of an A-law byte (even bits inverted; bit 7 set = positive)."""
    code = byte ^ 0x55
    segment, step_index = (code >> 4) & 7, code & 0x0F
    step = _ALAW_STEP[segment]
    magnitude = _ALAW_LOWER[segment] + step // 2 + step * step_index
    return (magnitude if code & 0x80 else -magnitude) * 8


def encode_mulaw(pcm: npt.NDArray[np.int16]) -> bytes:
    x = pcm.astype(np.int32)
    sign = (x < 0).astype(np.int32) << 7
    magnitude = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return bytes(((sign | (exponent << 4) | mantissa) ^ 0xFF).astype(np.uint8))


def encode_alaw(pcm: npt.NDArray[np.int16]) -> bytes:
    x = pcm.astype(np.int32)
    sign = (x >= 0).astype(np.int32) << 7
    magnitude = np.minimum(np.abs(x) >> 3, 4095)
    segment = np.where(
        magnitude < 32, 0, np.floor(np.log2(np.maximum(magnitude, 1))).astype(np.int32) - 4
    )
    step_index = np.where(segment == 0, magnitude >> 1, magnitude >> np.maximum(segment, 1)) & 0x0F
    return bytes(((sign | (segment << 4) | step_index) ^ 0x55).astype(np.uint8))


def snr_db(reference: F32, decoded: F32) -> float:
    noise = reference - decoded
    return float(10 * np.log10(np.sum(reference**2) / np.sum(noise**2)))


def test_mulaw_known_values() -> None:
    table = MULAW_TABLE * 32768
    assert table[0xFF] == 0
    assert table[0x7F] == 0  # "negative zero"
    assert table[0x00] == -32124
    assert table[0x80] == 32124
    assert table[0xFE] == 8  # smallest positive step
    assert table[0x7E] == -8


def test_alaw_known_values() -> None:
    table = ALAW_TABLE * 32768
    assert table[0xD5] == 8
    assert table[0x55] == -8
    assert table[0xAA] == 32256
    assert table[0x2A] == -32256


@pytest.mark.parametrize(("table", "ref"), [(MULAW_TABLE, ref_mulaw), (ALAW_TABLE, ref_alaw)])
def test_g711_tables_match_segment_reference(table: F32, ref: Any) -> None:
    expected = np.array([ref(b) for b in range(256)], dtype=np.float64) / 32768
    assert table.dtype == np.float32
    assert table.shape == (256,)
    np.testing.assert_array_equal(table.astype(np.float64), expected)
    assert not table.flags.writeable


def test_g711_tables_match_audioop_where_available() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # removed in Python 3.13
    codes = bytes(range(256))
    ulaw = np.frombuffer(audioop.ulaw2lin(codes, 2), dtype=np.int16)
    alaw = np.frombuffer(audioop.alaw2lin(codes, 2), dtype=np.int16)
    np.testing.assert_array_equal(MULAW_TABLE * 32768, ulaw)
    np.testing.assert_array_equal(ALAW_TABLE * 32768, alaw)


@pytest.mark.parametrize(
    ("encoding", "encoder", "table"),
    [("mulaw", encode_mulaw, MULAW_TABLE), ("alaw", encode_alaw, ALAW_TABLE)],
)
def test_g711_encoder_decoder_agree(encoding: str, encoder: Any, table: F32) -> None:
    # Every code's decoded value encodes back to the same code (except µ-law's
    # negative zero, which is 0 and so comes back as positive zero).
    values = np.round(table * 32768).astype(np.int16)
    codes = np.frombuffer(encoder(values), dtype=np.uint8)
    expected = np.arange(256)
    if encoding == "mulaw":
        expected[0x7F] = 0xFF
    np.testing.assert_array_equal(codes, expected)


@pytest.mark.parametrize(("encoding", "encoder"), [("mulaw", encode_mulaw), ("alaw", encode_alaw)])
@pytest.mark.parametrize("amplitude", [0.9, 0.3, 0.05])
def test_g711_sine_round_trip_snr(encoding: str, encoder: Any, amplitude: float) -> None:
    t = np.arange(8000) / 8000
    sine = (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pcm = np.round(sine * 32767).astype(np.int16)
    decoder = FrameDecoder(AudioFormat.parse(encoding, 8000, 1))
    decoded = decoder.decode(encoder(pcm))
    assert decoded.shape == (1, 8000)
    assert decoded.dtype == np.float32
    assert snr_db(sine, decoded[0]) > 30


# ---------------------------------------------------------------------------
# PCM decoding


def test_linear16_decoding() -> None:
    pcm = np.array([0, 1, -1, 16384, 32767, -32768], dtype="<i2")
    out = FrameDecoder(AudioFormat.parse("linear16", 16000, 1)).decode(pcm.tobytes())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], pcm / 32768)


def test_int32_decoding() -> None:
    pcm = np.array([0, 2**30, -(2**30), 2**31 - 1, -(2**31)], dtype="<i4")
    out = FrameDecoder(AudioFormat.parse("int32", 16000, 1)).decode(pcm.tobytes())
    np.testing.assert_allclose(out[0], [0, 0.5, -0.5, 1, -1], atol=1e-7)
    assert np.all(np.abs(out) <= 1)


def test_float32_decoding_is_exact_in_range() -> None:
    values = np.array([0, 0.25, -0.5, 1, -1, 1e-30], dtype="<f4")
    decoder = FrameDecoder(AudioFormat.parse("linear32", 16000, 1))
    out = decoder.decode(values.tobytes())
    np.testing.assert_array_equal(out[0], values)
    assert decoder.clipped_samples == 0


def test_float32_decoding_sanitises_and_counts() -> None:
    values = np.array([np.nan, np.inf, -np.inf, 2.5, -3, 0.5], dtype="<f4")
    decoder = FrameDecoder(AudioFormat.parse("float", 16000, 1))
    out = decoder.decode(values.tobytes())
    np.testing.assert_array_equal(out[0], [0, 1, -1, 1, -1, 0.5])
    assert decoder.clipped_samples == 5


def test_big_endian_host_independence() -> None:
    # The wire format is little-endian whatever the host: bytes spelled out.
    out = FrameDecoder(AudioFormat.parse("linear16", 16000, 1)).decode(b"\x00\x40\x00\xc0")
    np.testing.assert_array_equal(out[0], [0.5, -0.5])


def test_interleaved_channels_are_split() -> None:
    frames = np.array([[100, -100], [200, -200], [300, -300]], dtype="<i2")
    out = FrameDecoder(AudioFormat.parse("linear16", 8000, 2)).decode(frames.tobytes())
    assert out.shape == (2, 3)
    np.testing.assert_array_equal(out[0] * 32768, [100, 200, 300])
    np.testing.assert_array_equal(out[1] * 32768, [-100, -200, -300])
    interleaved = FrameDecoder(AudioFormat.parse("linear16", 8000, 2)).decode_interleaved(
        frames.tobytes()
    )
    assert interleaved.shape == (3, 2)
    assert interleaved.flags.c_contiguous


def test_memoryview_of_wider_items_is_read_as_bytes() -> None:
    pcm = np.array([1, 2, 3], dtype="<i2")
    out = FrameDecoder(AudioFormat.parse("linear16", 8000, 1)).decode(pcm.data)
    np.testing.assert_array_equal(out[0] * 32768, [1, 2, 3])


def _random_payload(fmt: AudioFormat, frames: int, rng: np.random.Generator) -> bytes:
    if fmt.encoding == "linear32":
        values = rng.uniform(-1, 1, frames * fmt.channels).astype("<f4")
        return values.tobytes()
    return rng.integers(0, 256, frames * fmt.bytes_per_frame, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("encoding", ["linear16", "linear32", "int32", "mulaw", "alaw"])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_split_payloads_decode_like_one(encoding: str, channels: int) -> None:
    rng = np.random.default_rng(channels)
    fmt = AudioFormat.parse(encoding, 8000, channels)
    payload = _random_payload(fmt, 997, rng)
    whole = FrameDecoder(fmt).decode(payload)

    decoder = FrameDecoder(fmt)
    # A run of one-byte messages, then cuts at random places (repeated cuts
    # give empty messages, which are harmless).
    cuts = [1, 2, 3, 4, 5, *np.sort(rng.integers(5, len(payload), 60)).tolist(), 77, 77]
    cuts.sort()
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    assert b"" in pieces
    outputs = [decoder.decode(piece) for piece in pieces]
    assert all(o.shape[0] == channels for o in outputs)
    np.testing.assert_array_equal(np.concatenate(outputs, axis=1), whole)
    assert decoder.pending_bytes == 0
    assert decoder.frames_decoded == 997
    decoder.finish()


@pytest.mark.parametrize("encoding", ["linear16", "mulaw"])
def test_one_byte_messages_decode_like_one(encoding: str) -> None:
    fmt = AudioFormat.parse(encoding, 8000, 2)
    payload = _random_payload(fmt, 50, np.random.default_rng(7))
    decoder = FrameDecoder(fmt)
    outputs = [decoder.decode(payload[i : i + 1]) for i in range(len(payload))]
    whole = FrameDecoder(fmt).decode(payload)
    np.testing.assert_array_equal(np.concatenate(outputs, axis=1), whole)


def test_partial_final_frame_is_reported() -> None:
    fmt = AudioFormat.parse("linear16", 8000, 2)
    decoder = FrameDecoder(fmt)
    out = decoder.decode(b"\x01\x00\x02\x00\x03\x00")  # one frame and half of the next
    assert out.shape == (2, 1)
    assert decoder.pending_bytes == 2
    with pytest.raises(PartialFrameError) as info:
        decoder.finish()
    err = info.value
    assert isinstance(err, AudioDecodeError)
    assert err.code == "audio_partial_frame"
    assert err.details["leftover_bytes"] == 2
    assert err.details["bytes_per_frame"] == 4
    assert "2 byte(s)" in err.message and "4 bytes" in err.message
    json.dumps(err.to_dict())
    with pytest.raises(AudioAfterFinishError) as after:
        decoder.decode(b"\x00\x00")
    assert after.value.code == "audio_after_finish"


def test_clean_finish_raises_nothing() -> None:
    decoder = FrameDecoder(AudioFormat.parse("mulaw", 8000, 2))
    decoder.decode(b"\xff")
    decoder.decode(b"\xff")
    decoder.finish()


# ---------------------------------------------------------------------------
# Formats


def test_parse_accepts_query_strings_and_aliases() -> None:
    fmt = AudioFormat.parse("MuLaw", "8000", "2")
    assert fmt == AudioFormat("mulaw", 8000, 2)
    assert fmt.bytes_per_frame == 2
    assert fmt.bytes_per_second == 16000
    assert AudioFormat.parse("float", 16000).encoding == "linear32"
    assert AudioFormat.parse("float32", 16000, None).channels == 1
    assert AudioFormat.parse("linear32", 48000, 8).bytes_per_frame == 32
    assert AudioFormat.parse("int32", 8000, 1).bytes_per_sample == 4
    assert AudioFormat.parse("alaw", 8000, 1).bytes_per_frame == 1
    with pytest.raises(AttributeError):
        fmt.channels = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "error", "code", "field"),
    [
        (("opus", 16000, 1), UnsupportedEncodingError, "unsupported_encoding", "encoding"),
        ((None, 16000, 1), UnsupportedEncodingError, "unsupported_encoding", "encoding"),
        (("", 16000, 1), UnsupportedEncodingError, "unsupported_encoding", "encoding"),
        (("linear16", 0, 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
        (("linear16", 10**9, 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
        (("linear16", 7999, 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
        (("linear16", 48001, 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
        (("linear16", -16000, 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
        (("linear16", "16k", 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
        (("linear16", "16000.5", 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
        (("linear16", 16000.0, 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
        (("linear16", True, 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
        (("linear16", None, 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
        (("linear16", 16000, 0), InvalidChannelsError, "invalid_channels", "channels"),
        (("linear16", 16000, 9), InvalidChannelsError, "invalid_channels", "channels"),
        (("linear16", 16000, "-1"), InvalidChannelsError, "invalid_channels", "channels"),
        (("linear16", 16000, "two"), InvalidChannelsError, "invalid_channels", "channels"),
        (("linear16", "9" * 5000, 1), InvalidSampleRateError, "invalid_sample_rate", "sample_rate"),
    ],
)
def test_invalid_formats_have_codes(
    args: tuple[Any, Any, Any], error: type[EarshotError], code: str, field: str
) -> None:
    with pytest.raises(error) as info:
        AudioFormat.parse(*args)
    err = info.value
    assert isinstance(err, InvalidRequestError)
    assert err.code == code
    assert err.http_status == 400
    assert err.details["field"] == field
    assert field in err.message
    payload = json.loads(json.dumps(err.to_dict()))
    assert payload["code"] == code


def test_invalid_format_messages_give_the_numbers() -> None:
    with pytest.raises(InvalidSampleRateError) as rate:
        AudioFormat.parse("linear16", 10**9, 1)
    assert "1000000000" in rate.value.message
    assert "8000" in rate.value.message and "48000" in rate.value.message
    assert rate.value.details["min"] == 8000 and rate.value.details["max"] == 48000
    with pytest.raises(InvalidSampleRateError, match=r"^sample_rate is required"):
        AudioFormat.parse("mulaw", None)
    with pytest.raises(InvalidChannelsError) as channels:
        AudioFormat.parse("linear16", 16000, 12)
    assert "12" in channels.value.message and "1 to 8" in channels.value.message
    with pytest.raises(UnsupportedEncodingError) as encoding:
        AudioFormat.parse("flac", 16000, 1)
    assert "'flac'" in encoding.value.message
    assert "linear16" in encoding.value.message and "mulaw" in encoding.value.message


def test_limits_are_settings() -> None:
    assert AudioFormat.parse("linear16", 96000, 1, max_sample_rate=96000).sample_rate == 96000
    with pytest.raises(InvalidChannelsError, match="from 1 to 2"):
        AudioFormat.parse("linear16", 16000, 3, max_channels=2)


# ---------------------------------------------------------------------------
# Resampling


def _chunks(x: F32, rng: np.random.Generator, largest: int) -> list[F32]:
    cuts = np.cumsum(rng.integers(0, largest, x.shape[-1] // max(1, largest // 2)))
    cuts = cuts[cuts < x.shape[-1]]
    return np.split(x, cuts, axis=-1)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_streaming_resample_equals_one_shot(rate: int) -> None:
    rng = np.random.default_rng(rate)
    n = rate * 2 + 37
    t = np.arange(n) / rate
    signal = (0.5 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    one_shot = soxr.resample(signal, rate, TARGET_RATE, quality="HQ")

    resampler = StreamResampler(rate, channels=1)
    parts = [resampler.process(chunk[None, :]) for chunk in _chunks(signal, rng, rate // 25)]
    parts.append(resampler.flush())
    streamed = np.concatenate(parts, axis=1)[0]

    assert abs(streamed.shape[0] - n * TARGET_RATE / rate) <= 2
    assert abs(streamed.shape[0] - one_shot.shape[0]) <= 2
    m = min(streamed.shape[0], one_shot.shape[0])
    np.testing.assert_allclose(streamed[:m], one_shot[:m], atol=1e-4)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampled_sine_is_on_time(rate: int) -> None:
    # No delay: output sample k is the input signal at time k / 16000.
    n = rate  # one second
    sine = np.sin(2 * np.pi * 1000 * np.arange(n) / rate).astype(np.float32)
    resampler = StreamResampler(rate)
    step = rate // 50
    parts = [resampler.process(sine[None, i : i + step]) for i in range(0, n, step)]
    out = np.concatenate([*parts, resampler.flush()], axis=1)[0]
    expected = np.sin(2 * np.pi * 1000 * np.arange(out.shape[0]) / TARGET_RATE)
    middle = slice(800, out.shape[0] - 800)
    assert np.max(np.abs(out[middle] - expected[middle])) < 2e-3


def test_multichannel_resample_equals_per_channel() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (3, 4410)).astype(np.float32)
    together = StreamResampler(44100, channels=3)
    out = np.concatenate([together.process(x[:, :1000]), together.process(x[:, 1000:])], axis=1)
    out = np.concatenate([out, together.flush()], axis=1)
    for channel in range(3):
        alone = StreamResampler(44100, channels=1)
        ref = np.concatenate([alone.process(x[channel : channel + 1]), alone.flush()], axis=1)
        np.testing.assert_array_equal(out[channel], ref[0])


def test_passthrough_at_16k() -> None:
    resampler = StreamResampler(16000, channels=2)
    assert resampler.passthrough
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    np.testing.assert_array_equal(resampler.process(x), x)
    assert resampler.flush().shape == (2, 0)


def test_resampler_misuse() -> None:
    resampler = StreamResampler(8000, channels=2)
    with pytest.raises(ValueError, match=r"\(2, n\)"):
        resampler.process(np.zeros((1, 10), dtype=np.float32))
    resampler.flush()
    with pytest.raises(AudioAfterFinishError):
        resampler.process(np.zeros((2, 10), dtype=np.float32))
    with pytest.raises(AudioAfterFinishError):
        resampler.flush()
    with pytest.raises(ConfigError):
        StreamResampler(0)


# ---------------------------------------------------------------------------
# Ring buffer


def test_ring_buffer_wraps_around() -> None:
    rng = np.random.default_rng(11)
    ring = RingBuffer(100)
    reference = np.zeros(0, dtype=np.float32)
    for size in [0, 1, 30, 99, 100, 7, 250, 3, 64, 64, 64]:
        block = rng.standard_normal(size).astype(np.float32)
        ring.append(block)
        reference = np.concatenate([reference, block])
        assert ring.total == reference.shape[0]
        assert ring.oldest == max(0, ring.total - 100)
        np.testing.assert_array_equal(ring.read(ring.oldest, ring.total), reference[ring.oldest :])
        for start in range(ring.oldest, ring.total, 13):
            end = min(ring.total, start + 41)
            np.testing.assert_array_equal(ring.read(start, end), reference[start:end])


def test_ring_buffer_read_is_a_copy() -> None:
    ring = RingBuffer(10)
    ring.append(np.ones(5, dtype=np.float32))
    out = ring.read(0, 5)
    out[:] = 7
    np.testing.assert_array_equal(ring.read(0, 5), np.ones(5))
    assert ring.read(3, 3).shape == (0,)


def test_ring_buffer_bounds() -> None:
    ring = RingBuffer(10)
    ring.append(np.arange(25, dtype=np.float32))
    assert (ring.oldest, ring.total) == (15, 25)
    with pytest.raises(AudioRangeOverwrittenError) as old:
        ring.read(14, 20)
    assert old.value.code == "audio_range_overwritten"
    assert old.value.details == {"start": 14, "end": 20, "oldest": 15, "total": 25}
    assert "[15, 25)" in old.value.message
    with pytest.raises(AudioRangeNotReceivedError) as future:
        ring.read(20, 26)
    assert future.value.code == "audio_range_not_received"
    with pytest.raises(AudioRangeError) as reversed_range:
        ring.read(20, 19)
    assert reversed_range.value.code == "audio_range_invalid"
    with pytest.raises(AudioRangeError):
        ring.read(-1, 3)
    assert isinstance(old.value, EarshotError)
    assert old.value.http_status == 500
    with pytest.raises(ValueError, match="1-D"):
        ring.append(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ConfigError):
        RingBuffer(0)
    with pytest.raises(ConfigError):
        RingBuffer.for_seconds(float("nan"))


def test_ring_buffer_discard_before() -> None:
    ring = RingBuffer.for_seconds(0.01)  # 160 samples
    assert ring.capacity == 160
    ring.append(np.arange(100, dtype=np.float32))
    ring.discard_before(40)
    assert ring.oldest == 40
    np.testing.assert_array_equal(ring.read(40, 42), [40, 41])
    with pytest.raises(AudioRangeOverwrittenError):
        ring.read(39, 42)
    ring.discard_before(10)  # backwards: no-op
    assert ring.oldest == 40
    ring.discard_before(10**6)  # clamped to total
    assert ring.oldest == 100
    ring.append(np.arange(100, 300, dtype=np.float32))
    assert ring.oldest == 140
    np.testing.assert_array_equal(ring.read(140, 300), np.arange(140, 300))


# ---------------------------------------------------------------------------
# One stream


def _tone_pair(rate: int, seconds: float) -> npt.NDArray[np.int16]:
    """Two channels of different tones, as int16 of shape (n, 2)."""
    t = np.arange(round(rate * seconds)) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.3 * np.sin(2 * np.pi * 1200 * t)
    return np.round(np.stack([left, right], axis=1) * 32767).astype(np.int16)


def test_stream_audio_mulaw_stereo_8k() -> None:
    pcm = _tone_pair(8000, 1.0)
    payload = encode_mulaw(pcm)  # interleaved, one byte per sample
    fmt = AudioFormat.parse("mulaw", 8000, 2)
    stream = StreamAudio(fmt, buffer_seconds=5)
    pieces: list[list[F32]] = []
    for i in range(0, len(payload), 320):  # 20 ms frames
        pieces.append(stream.push(payload[i : i + 320]))
    pieces.append(stream.finish())
    assert all(len(p) == 2 for p in pieces)
    left = np.concatenate([p[0] for p in pieces])
    right = np.concatenate([p[1] for p in pieces])
    assert left.flags.c_contiguous and left.dtype == np.float32
    assert left.shape == right.shape
    assert abs(left.shape[0] - TARGET_RATE) <= 2
    assert stream.total == left.shape[0]
    assert stream.seconds_received == pytest.approx(1.0)
    np.testing.assert_array_equal(stream.buffers[0].read(0, stream.total), left)
    np.testing.assert_array_equal(stream.buffers[1].read(0, stream.total), right)

    # Same as decoding and resampling the whole stream at once, per channel.
    whole = FrameDecoder(fmt).decode(payload)
    for channel, got in enumerate((left, right)):
        ref = soxr.resample(np.ascontiguousarray(whole[channel]), 8000, TARGET_RATE)
        m = min(ref.shape[0], got.shape[0])
        np.testing.assert_allclose(got[:m], ref[:m], atol=1e-4)

    # And the channels kept their own tones.
    t = np.arange(left.shape[0]) / TARGET_RATE
    middle = slice(1000, -1000)
    left_ref = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    right_ref = (0.3 * np.sin(2 * np.pi * 1200 * t)).astype(np.float32)
    assert snr_db(left_ref[middle], left[middle]) > 30
    assert snr_db(right_ref[middle], right[middle]) > 25

    with pytest.raises(AudioAfterFinishError):
        stream.push(b"\xff\xff")
    with pytest.raises(AudioAfterFinishError):
        stream.finish()


def test_stream_audio_passthrough_16k_is_exact() -> None:
    pcm = np.arange(-500, 500, dtype="<i2")
    stream = StreamAudio(AudioFormat.parse("linear16", 16000, 1))
    first = stream.push(pcm[:301].tobytes()[:-1])  # ends mid-sample
    second = stream.push(pcm.tobytes()[601:])
    tail = stream.finish()
    assert len(tail) == 1 and tail[0].shape == (0,)
    got = np.concatenate([first[0], second[0]])
    np.testing.assert_array_equal(got * 32768, pcm)
    np.testing.assert_array_equal(stream.buffers[0].read(0, 1000) * 32768, pcm)


def test_stream_audio_partial_frame_keeps_the_tail() -> None:
    stream = StreamAudio(AudioFormat.parse("linear16", 8000, 2))
    pcm = _tone_pair(8000, 0.2)
    pushed = stream.push(pcm.tobytes() + b"\x01")  # one stray byte
    with pytest.raises(PartialFrameError) as info:
        stream.finish()
    tail = info.value.tail
    assert len(tail) == 2
    total = pushed[0].shape[0] + tail[0].shape[0]
    assert abs(total - 3200) <= 2
    assert stream.total == total
    np.testing.assert_array_equal(stream.buffers[1].read(total - tail[1].shape[0], total), tail[1])
    assert info.value.details["leftover_bytes"] == 1


def test_stream_audio_bounded_buffers() -> None:
    stream = StreamAudio(AudioFormat.parse("linear16", 16000, 1), buffer_seconds=1)
    block = np.zeros(16000, dtype="<i2").tobytes()
    for _ in range(5):
        stream.push(block)
    assert stream.total == 80000
    assert stream.buffers[0].oldest == 64000
    assert stream.buffers[0].capacity == 16000
