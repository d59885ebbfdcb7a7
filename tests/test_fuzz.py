"""Fuzzing every parser a client's bytes reach, then the real server.

Pure properties (hypothesis, no sockets): the control-message parser, the
query-string parser, the audio format and frame decoder, the OpenAI
multipart reader and its form fields. Each either gives a valid result or
raises an :class:`EarshotError` with a snake_case ``code`` (whose details
serialise to strict JSON, since they are sent to the client); any other
exception is a crash.

Live (``test_live_fuzz_through_the_real_server``): a few thousand random
websocket frames, query strings, handshakes, multipart uploads, methods,
paths and raw TCP bytes through a real server on 127.0.0.1 while one
well-behaved tone-language stream runs alongside: no status 500, every error
answer coded JSON, every websocket close documented and never 1011, the
well-behaved stream gets exactly its finals, and the server still answers
``/healthz``. ``bench/fuzz.py`` runs the same at scale. Set
``EARSHOT_FUZZ_SEED`` to vary the live inputs (they are fixed by default, so
that a failure here can be replayed with ``tests.kit.fuzz.replay``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar
from unittest import mock

import numpy as np
import pytest
from aiohttp import streams
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from earshot.core.audio import ENCODINGS, MAX_CHANNELS, AudioFormat, FrameDecoder
from earshot.core.errors import EarshotError
from earshot.core.protocol import (
    CONTROL_TYPES,
    IGNORED_PARAMETERS,
    MAX_ENDPOINTING_MS,
    MIN_ENDPOINTING_MS,
    UNSUPPORTED_PARAMETERS,
    StreamParams,
    parse_control,
    parse_params,
)
from earshot.service.http.openai import (
    GRANULARITIES,
    RESPONSE_FORMATS,
    AudioRequest,
    _check_fields,
    read_upload,
)
from tests.kit.fuzz import (
    MultipartSpec,
    audio_bytes,
    channel_args,
    check_coded,
    chunks_of,
    control_texts,
    cut_points,
    documented_close_codes,
    encoding_args,
    error_code_of,
    finite_in_unit_range,
    form_fields,
    gen_control_text,
    gen_multipart,
    gen_query,
    granularity_lists,
    is_snake_case,
    multipart_specs,
    query_pairs,
    rate_args,
    run_fuzz,
    valid_format_args,
    valid_multipart_specs,
)
from tests.kit.live import running_server, tone_engine
from tests.kit.tones import random_script

T = TypeVar("T")

FUZZ = settings(max_examples=300, deadline=None)
"""Bounded: the whole module runs in well under a minute on two cores."""

# aiohttp's multipart reader warns (RuntimeWarning) about a malformed
# Content-Disposition and goes on; only the warnings-as-errors setting of this
# test run would turn that into an exception, which a server never sees.
AIOHTTP_MULTIPART_WARNINGS = pytest.mark.filterwarnings(
    "ignore::aiohttp.multipart.BadContentDispositionHeader",
    "ignore::aiohttp.multipart.BadContentDispositionParam",
)


def outcome(fn: Callable[..., T], *args: Any) -> tuple[T | None, EarshotError | None]:
    """``fn(*args)``'s result, or its coded error; any other exception fails the test."""
    try:
        return fn(*args), None
    except Exception as exc:  # the property: nothing but a coded error escapes
        err = check_coded(exc)
        strict_json(err)
        return None, err


def strict_json(err: EarshotError) -> None:
    """The error's JSON (what a client is sent) must serialise, NaN-free."""
    try:
        json.dumps(err.to_dict(), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{err.code}: details do not serialise to JSON: {exc}") from exc


# -- control messages ----------------------------------------------------------


@FUZZ
@given(control_texts())
def test_control_parser_answers_every_text_with_a_type_or_invalid_message(text: str) -> None:
    kind, err = outcome(parse_control, text)
    if err is not None:
        assert err.code == "invalid_message"
        return
    assert kind in CONTROL_TYPES
    data = json.loads(text)
    assert isinstance(data, dict) and data["type"] == kind


# -- query strings -------------------------------------------------------------

QUERY_CODES = frozenset(
    {
        "unknown_parameter",
        "invalid_parameter",
        "unsupported_parameter",
        "unsupported_encoding",
        "invalid_sample_rate",
        "invalid_channels",
    }
)
"""The refusals docs/protocol.md lists for a bad query string."""


def check_params(params: StreamParams) -> None:
    audio = params.audio
    assert audio.encoding in ENCODINGS
    assert 8000 <= audio.sample_rate <= 48000 and 1 <= audio.channels <= MAX_CHANNELS
    ep = params.endpointing_ms
    assert ep is None or MIN_ENDPOINTING_MS <= ep <= MAX_ENDPOINTING_MS
    assert params.utterance_end_ms is None or 1000 <= params.utterance_end_ms <= 60_000
    assert len(params.keyterms) <= 100 and all(k and k == k.strip() for k in params.keyterms)
    assert set(params.ignored) <= IGNORED_PARAMETERS | set(UNSUPPORTED_PARAMETERS)
    json.dumps(params.to_dict(), allow_nan=False)


@FUZZ
@given(query_pairs())
def test_query_parser_gives_valid_settings_or_a_documented_refusal(
    pairs: list[tuple[str, str]],
) -> None:
    for query in (pairs, dict(pairs)):
        params, err = outcome(parse_params, query)
        if err is not None:
            assert err.code in QUERY_CODES, err.code
            assert isinstance(err.details.get("field"), str), err.details
            continue
        assert params is not None
        check_params(params)


# -- audio format and frames -----------------------------------------------------


@FUZZ
@given(encoding_args(), rate_args(), channel_args())
def test_audio_format_parse_accepts_valid_formats_and_codes_the_rest(
    encoding: str | None, rate: int | str | None, channels: int | str | None
) -> None:
    fmt, err = outcome(AudioFormat.parse, encoding, rate, channels)
    if err is not None:
        assert err.code in {"unsupported_encoding", "invalid_sample_rate", "invalid_channels"}
        assert err.details.get("field") in {"encoding", "sample_rate", "channels"}
        return
    assert fmt is not None
    assert fmt.encoding in ENCODINGS
    assert 8000 <= fmt.sample_rate <= 48000 and 1 <= fmt.channels <= MAX_CHANNELS


def _wrap(chunk: bytes, how: int) -> bytes | bytearray | memoryview:
    if how == 1:
        return bytearray(chunk)
    if how == 2:
        return memoryview(chunk)
    if how == 3 and len(chunk) % 2 == 0:
        # itemsize 2: the decoder casts it to bytes
        return memoryview(np.frombuffer(chunk, dtype=np.uint16).data)
    return chunk


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@FUZZ
@given(st.data())
def test_frame_decoder_loses_no_whole_frame_across_any_chunking(
    encoding: str, data: st.DataObject
) -> None:
    rate = data.draw(st.integers(8000, 48000), label="rate")
    channels = data.draw(st.integers(1, MAX_CHANNELS), label="channels")
    payload = data.draw(audio_bytes(), label="payload")
    cuts = data.draw(cut_points(len(payload)), label="cuts")
    kinds = data.draw(st.lists(st.integers(0, 3), min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    fmt = AudioFormat.parse(encoding, rate, channels)
    bpf = fmt.bytes_per_frame

    decoder = FrameDecoder(fmt)
    blocks = []
    for chunk, how in zip(chunks_of(payload, cuts), kinds, strict=True):
        block, err = outcome(decoder.decode, _wrap(chunk, how))
        assert err is None, err
        assert block is not None
        assert block.dtype == np.float32 and block.shape[0] == channels
        assert finite_in_unit_range(block)
        blocks.append(block)
    joined = np.concatenate(blocks, axis=1)
    whole = FrameDecoder(fmt).decode(payload)
    assert joined.shape == whole.shape == (channels, len(payload) // bpf)
    assert np.array_equal(joined, whole)
    assert decoder.frames_decoded == len(payload) // bpf
    assert decoder.pending_bytes == len(payload) % bpf

    _, err = outcome(decoder.finish)
    if len(payload) % bpf:
        assert err is not None and err.code == "audio_partial_frame"
        assert err.details["leftover_bytes"] == len(payload) % bpf
    else:
        assert err is None
    _, err = outcome(decoder.decode, b"\x00" * bpf)
    assert err is not None and err.code == "audio_after_finish"


@FUZZ
@given(valid_format_args(), rate_args(), channel_args(), st.binary(max_size=64))
def test_frame_decoder_behind_any_format_arguments(
    valid: tuple[str, int, int], rate: int | str | None, channels: int | str | None, payload: bytes
) -> None:
    """Valid and invalid formats mixed: whatever parse accepts decodes cleanly."""
    for args in ((valid[0], rate, channels), valid):
        fmt, err = outcome(AudioFormat.parse, *args)
        if fmt is None:
            continue
        decoder = FrameDecoder(fmt)
        block, err = outcome(decoder.decode, payload)
        assert err is None and block is not None and finite_in_unit_range(block)
        outcome(decoder.finish)


# -- the OpenAI multipart reader ------------------------------------------------


async def _read_upload(content_type: str | None, body: bytes, limit: int, length: str) -> Any:
    """``read_upload`` on an aiohttp request whose payload stream holds ``body``."""
    loop = asyncio.get_running_loop()
    payload = streams.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=loop)
    payload.feed_data(body)
    payload.feed_eof()
    headers: dict[str, str] = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if length == "exact":
        headers["Content-Length"] = str(len(body))
    elif length == "huge":
        headers["Content-Length"] = str(10**12)
    request = make_mocked_request(
        "POST", "/v1/audio/transcriptions", headers=headers, payload=payload
    )
    return await read_upload(request, limit)


def upload(spec: MultipartSpec, limit: int, length: str) -> tuple[Any, EarshotError | None]:
    header = spec.header()
    return outcome(
        asyncio.run, _read_upload(header if header else None, spec.body(), limit, length)
    )


def check_request(req: AudioRequest) -> None:
    assert req.response_format in RESPONSE_FORMATS
    assert 0.0 <= req.temperature <= 1.0
    assert set(req.granularities) <= set(GRANULARITIES)
    assert req.language is None or (req.language.isalpha() and 2 <= len(req.language) <= 3)
    assert isinstance(req.stream, bool)


_LIMITS = st.sampled_from([1024, 80_000, 1 << 20])
_LENGTHS = st.sampled_from(["exact", "exact", "none", "huge"])


@AIOHTTP_MULTIPART_WARNINGS
@FUZZ
@given(multipart_specs(), _LIMITS, _LENGTHS)
def test_multipart_reader_answers_any_body_with_a_form_or_a_coded_refusal(
    spec: MultipartSpec, limit: int, length: str
) -> None:
    req, _ = upload(spec, limit, length)
    if req is not None:
        check_request(req)


@AIOHTTP_MULTIPART_WARNINGS
@FUZZ
@given(valid_multipart_specs())
def test_multipart_reader_reads_well_formed_forms(spec: MultipartSpec) -> None:
    req, err = upload(spec, 1 << 20, "exact")
    if err is not None:  # a field value may be refused, never the form itself
        assert err.code == "invalid_request" and err.details.get("field") != "file", err.to_dict()
        return
    check_request(req)
    files = [p for p in spec.parts if p.name == "file"]
    assert req.audio == files[-1].content


@FUZZ
@given(form_fields(), granularity_lists(), st.binary(max_size=16))
def test_form_fields_give_a_valid_request_or_invalid_request(
    fields: dict[str, str], granularities: list[str], audio: bytes
) -> None:
    req, err = outcome(_check_fields, audio, "upload", fields, granularities)
    if err is not None:
        assert err.code == "invalid_request"
        assert isinstance(err.details.get("field"), str)
        return
    assert req is not None
    check_request(req)
    assert req.audio == audio


# -- the live generators, through the same pure parsers -------------------------


@AIOHTTP_MULTIPART_WARNINGS
@FUZZ
@given(st.randoms(use_true_random=False))
def test_live_inputs_through_the_pure_parsers(rng: random.Random) -> None:
    """What the live fuzz sends, judged here without a server."""
    outcome(parse_control, gen_control_text(rng, big=False))
    pairs = urllib.parse.parse_qsl(gen_query(rng), keep_blank_values=True)
    params, _ = outcome(parse_params, pairs)
    if params is not None:
        check_params(params)
    req, _ = upload(gen_multipart(rng), 1 << 20, "exact")
    if req is not None:
        check_request(req)


def test_judges() -> None:
    codes = documented_close_codes()
    assert {1000, 1009, 1006, 4400, 4413} <= codes
    assert is_snake_case("invalid_message") and not is_snake_case("CONFIGURE_NOT_SUPPORTED")
    assert not is_snake_case("") and not is_snake_case("a__b") and not is_snake_case(None)
    assert error_code_of({"error": {"code": "x"}}) == "x" and error_code_of("x") is None
    with pytest.raises(AssertionError, match="uncoded"):
        check_coded(ValueError("boom"))


# -- live ------------------------------------------------------------------------

LIVE_INPUTS = 3000
LIVE_SEED = int(os.environ.get("EARSHOT_FUZZ_SEED", "0"))


@pytest.mark.timeout(240)
@AIOHTTP_MULTIPART_WARNINGS
def test_live_fuzz_through_the_real_server() -> None:
    script = random_script(6, (2, 5), seed=LIVE_SEED + 11)

    async def main() -> Any:
        async with running_server(tone_engine()) as url:
            return await run_fuzz(url, count=LIVE_INPUTS, seed=LIVE_SEED, script=script)

    report = asyncio.run(asyncio.wait_for(main(), timeout=200))
    text = "\n".join(report.lines(examples=2))
    print(text)
    problems = []
    if report.health_status != 200:
        problems.append(f"/healthz answered {report.health_status} at the end")
    for wb in report.well_behaved:
        if not wb.ok:
            problems.append(
                f"well-behaved stream: close {wb.close_code}, errors {wb.errors}, "
                f"expected {wb.expected}, got {wb.got}"
            )
    if report.violations:
        problems.append(f"{len(report.violations)} answers broke a rule")
    assert report.inputs >= LIVE_INPUTS and report.well_behaved
    assert not problems, "\n".join(problems) + "\n" + text
