"""Fuzz inputs for Earshot, shared by ``tests/test_fuzz.py`` and ``bench/fuzz.py``.

Three parts:

1. **Judges.** What counts as an acceptable answer: an :class:`EarshotError`
   with a snake_case ``code`` from a pure function; from the server, an HTTP
   answer whose error body (status 400 and up) is JSON with a
   machine-readable code (top-level ``code`` or OpenAI's ``error.code``), no
   status 500, and websocket closes with a code that docs/protocol.md lists
   ("Close codes"), never 1011.
2. **Hypothesis strategies** for the pure property tests: control-message
   text, query strings, audio formats and byte chunkings, multipart bodies,
   OpenAI form fields.
3. **Live generators and the runner.** Generators driven by a
   :class:`random.Random` (one per input, seeded from the run's seed and the
   input's number, so any input can be rebuilt alone) make websocket
   sessions, HTTP requests and raw TCP bytes; :func:`run_fuzz` sends them to a
   real server on 127.0.0.1 from a few concurrent workers while one
   well-behaved tone-language stream runs alongside, and returns a
   :class:`FuzzReport` of counts, outcomes and violations.

HTTP inputs are written byte for byte on a plain socket (``asyncio.open_connection``)
and websocket sessions are driven by the small client here (:class:`RawWebSocket`),
so that inputs no well-behaved client library would send (bad methods,
unmasked frames, invalid UTF-8, lying lengths) reach the server as they are,
and every violation comes with the exact bytes that caused it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import random
import re
import string
import time
import traceback
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from hypothesis import strategies as st

from earshot.clients.audio import encode_audio
from earshot.core.audio import ENCODINGS, MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from earshot.core.errors import EarshotError
from earshot.core.protocol import (
    CONTROL_TYPES,
    IGNORED_PARAMETERS,
    KNOWN_PARAMETERS,
    UNSUPPORTED_PARAMETERS,
)
from tests.kit.paths import REPO_ROOT
from tests.kit.tones import make_speech, make_utterance, random_script

# ---------------------------------------------------------------------------
# 1. Judges
# ---------------------------------------------------------------------------

SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
"""A machine-readable code: lower-case words joined by single underscores."""

_ALIASES: dict[str, str] = {"float": "linear32", "float32": "linear32"}
"""The encoding aliases of docs/protocol.md ("Query parameters")."""

FAILURE_CLOSE_CODES = frozenset({1011})
"""Documented, but a failure all the same: 1011 is ``internal_error`` (a bug)."""


def is_snake_case(code: object) -> bool:
    """Whether ``code`` is a non-empty snake_case string."""
    return isinstance(code, str) and SNAKE_CASE.fullmatch(code) is not None


def check_coded(exc: BaseException) -> EarshotError:
    """``exc`` itself if it is an :class:`EarshotError` with a snake_case code.

    Raises AssertionError naming the exception otherwise (any other type is a
    crash of the function under test, not an answer)."""
    if not isinstance(exc, EarshotError):
        raise AssertionError(f"uncoded exception {type(exc).__qualname__}: {exc!r}"[:2000]) from exc
    if not is_snake_case(exc.code):
        raise AssertionError(f"{type(exc).__qualname__} has code {exc.code!r}, not snake_case")
    if not isinstance(exc.message, str) or not exc.message:
        raise AssertionError(f"{type(exc).__qualname__} ({exc.code}) has no message")
    return exc


def documented_close_codes(doc: Path | None = None) -> frozenset[int]:
    """The websocket close codes of the "Close codes" section of docs/protocol.md.

    Every four-digit 1xxx or 4xxx number in that section: the table and the
    codes a client may see without them coming from Earshot (1009, 1006)."""
    text = (doc or REPO_ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    start = text.index("## Close codes")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else len(text)]
    return frozenset(int(m) for m in re.findall(r"\b([14]\d{3})\b", section))


def error_code_of(body: object) -> object:
    """The machine-readable code of an error body: top-level ``code`` or ``error.code``."""
    if not isinstance(body, dict):
        return None
    if "code" in body:
        return body["code"]
    inner = body.get("error")
    return inner.get("code") if isinstance(inner, dict) else None


# ---------------------------------------------------------------------------
# 2. Hypothesis strategies (pure property tests)
# ---------------------------------------------------------------------------

_CASE_VARIANTS: tuple[str, ...] = tuple(
    v
    for t in CONTROL_TYPES
    for v in (t, t.lower(), t.upper(), f" {t}", f"{t} ", f"{t}\x00", t[:-1], t + "s")
)

json_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(_CASE_VARIANTS),
)

json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)


def nested_json(depth: int, kind: str, closed: bool, inner: str = "1") -> str:
    """Arrays (``kind`` "[") or objects ("{") nested ``depth`` deep, closed or not."""
    if kind == "[":
        return "[" * depth + inner + ("]" * depth if closed else "")
    return '{"a":' * depth + inner + ("}" * depth if closed else "")


def _with_type(kind: object, extra: dict[str, Any] | None = None) -> str:
    return json.dumps({"type": kind, **(extra or {})}, ensure_ascii=False)


_JSON_MUTATIONS = ("truncate", "insert", "delete", "duplicate_key", "trailing_comma", "bom", "nan")


def mutate_json(text: str, op: str, at: int, char: str) -> str:
    """``text`` damaged by one of :data:`_JSON_MUTATIONS` at position ``at``."""
    pos = at % (len(text) + 1)
    if op == "truncate":
        return text[:pos]
    if op == "insert":
        return text[:pos] + char + text[pos:]
    if op == "delete":
        return text[:pos] + text[pos + 1 :]
    if op == "duplicate_key" and text.endswith("}"):
        return text[:-1] + ', "type": ' + json.dumps(char) + "}"
    if op == "trailing_comma" and text.endswith("}"):
        return text[:-1] + ",}"
    if op == "bom":
        return "\ufeff" + text
    if op == "nan":
        return text.replace('"', "", 2) if pos % 2 else '{"type": NaN, "x": Infinity}'
    return text + char


def control_texts() -> st.SearchStrategy[str]:
    """Text frames a client might send: arbitrary text, JSON, near-JSON,
    deeply nested arrays and objects, huge numbers, unicode, objects with a
    random ``type``, and the valid control messages themselves."""
    valid = st.sampled_from(CONTROL_TYPES).map(lambda t: _with_type(t))
    typed = st.builds(
        _with_type,
        st.one_of(st.sampled_from(_CASE_VARIANTS), json_values),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    )
    deep = st.builds(
        nested_json,
        st.integers(1, 120_000),
        st.sampled_from("[{"),
        st.booleans(),
        st.sampled_from(["1", '"KeepAlive"', '{"type": "KeepAlive"}', "[]", ""]),
    )
    deep_typed = st.builds(
        lambda depth, kind: '{"type": ' + nested_json(depth, kind, True) + "}",
        st.integers(900, 1100) | st.integers(1, 3000),
        st.sampled_from("[{"),
    )
    huge_numbers = st.one_of(
        st.integers(1, 20_000).map(lambda n: "1" * n),
        st.integers(1, 20_000).map(lambda n: '{"type": ' + "9" * n + "}"),
        st.integers(0, 10**6).map(lambda e: f'{{"type": 1e{e}}}'),
        st.integers(0, 10**6).map(lambda e: f"-0.{'0' * (e % 5000)}1e-{e}"),
    )
    mutated = st.builds(
        mutate_json,
        st.one_of(valid, typed),
        st.sampled_from(_JSON_MUTATIONS),
        st.integers(0, 200),
        st.characters(),
    )
    escapes = st.sampled_from(
        [
            '{"type": "\\ud800"}',
            '{"type": "Keep\\u0000Alive"}',
            '{"type": "\\uDFFF\\uD800"}',
            '"\\ud83d"',
            '{"\\ud800": 1, "type": "KeepAlive"}',
            '{"type": "KeepAlive"}' * 2,
            '{"type": "KeepAlive"} trailing',
            "{}",
            "[]",
            "null",
            "",
            " ",
            "\n\t",
            '{"type": null}',
            '{"TYPE": "KeepAlive"}',
        ]
    )
    return st.one_of(
        st.text(),
        st.text(alphabet=st.characters(codec="utf-8"), min_size=1000, max_size=5000),
        json_values.map(lambda v: json.dumps(v, ensure_ascii=False)),
        valid,
        typed,
        deep,
        deep_typed,
        huge_numbers,
        mutated,
        escapes,
    )


ALL_PARAMETER_NAMES: tuple[str, ...] = tuple(
    sorted(KNOWN_PARAMETERS | IGNORED_PARAMETERS | set(UNSUPPORTED_PARAMETERS))
)
"""Every query parameter name Earshot knows: used, ignored or refused."""

_VALUE_WORDS: tuple[str, ...] = (
    *("true", "false", "TRUE", "False", "1", "0", "yes", "no", "on", "off", "Yes", "maybe"),
    *("", " ", "  true ", "none", "null", "pci", "ssn", "http://example.com/hook"),
    *ENCODINGS,
    *_ALIASES,
    *("LINEAR16", " mulaw ", "opus", "flac", "linear24", "pcm"),
    *("8000", "16000", "44100", "48000", "7999", "48001", "0", "-1", "+16000", "16000.0"),
    *("1e4", "0x10", "١٦٠٠٠", "16 000", "9" * 13, "9" * 5000),
    *("100", "10", "10000", "10001", "60000", "60001", "999", "1000"),
    *("en", "en-US", "EN", "de", "auto", "multi", "xx", "-", "en-", "-en"),
    *("whisper-1", "base", "nova-3", "large-v3", "tiny", "small.en", "tone", "../etc/passwd"),
    *("alpha", "alpha:2", "alpha:", ":", "::", "a:b:c"),
)


def query_values() -> st.SearchStrategy[str]:
    """Values of query parameters: booleans, encodings, numbers in and out of
    range, language codes, model names, and random text."""
    return st.one_of(
        st.sampled_from(_VALUE_WORDS),
        st.integers(-(10**20), 10**20).map(str),
        st.text(max_size=40),
        st.text(alphabet=string.digits, min_size=1, max_size=4400),
    )


def query_pairs() -> st.SearchStrategy[list[tuple[str, str]]]:
    """Lists of (key, value): keys from the known, ignored and refused sets,
    repeated or not, plus random strings."""
    keys = st.one_of(
        st.sampled_from(ALL_PARAMETER_NAMES),
        st.sampled_from(("keyterm", "keywords")),
        st.text(max_size=20),
        st.sampled_from(ALL_PARAMETER_NAMES).map(str.upper),
    )
    return st.one_of(
        st.lists(st.tuples(keys, query_values()), max_size=12),
        st.lists(st.tuples(st.just("keyterm"), query_values()), min_size=90, max_size=130),
    )


def encoding_args() -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.none(),
        st.sampled_from(sorted([*ENCODINGS, *_ALIASES])),
        st.sampled_from(sorted([*ENCODINGS, *_ALIASES])).map(lambda e: f" {e.upper()} "),
        st.text(max_size=20),
    )


def _number_args() -> st.SearchStrategy[int | str | None]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(-10, 10**6).map(str),
        st.integers(0, 50_000).map(lambda n: f" {n} "),
        st.sampled_from(["", "+16000", "16000.0", "1e4", "0x1F40", "١٦٠٠٠", "٢", "²"]),
        st.sampled_from([10**5000, -(10**5000), 2**63, 2**64 + 16000]),
        st.text(alphabet=string.digits, min_size=12, max_size=5000),
        st.text(max_size=12),
    )


def rate_args() -> st.SearchStrategy[int | str | None]:
    return st.one_of(st.integers(MIN_SAMPLE_RATE - 2, MAX_SAMPLE_RATE + 2), _number_args())


def channel_args() -> st.SearchStrategy[int | str | None]:
    return st.one_of(st.integers(-1, MAX_CHANNELS + 2), _number_args())


def valid_format_args() -> st.SearchStrategy[tuple[str, int, int]]:
    """(encoding, sample_rate, channels) that :meth:`AudioFormat.parse` accepts."""
    return st.tuples(
        st.sampled_from(sorted([*ENCODINGS, *_ALIASES])),
        st.integers(MIN_SAMPLE_RATE, MAX_SAMPLE_RATE),
        st.integers(1, MAX_CHANNELS),
    )


_SPECIAL_FLOATS = np.array(
    [np.nan, np.inf, -np.inf, 1.0, -1.0, 1.0000001, 3.4e38, -3.4e38, 1e-45, -0.0, 0.5],
    dtype="<f4",
).tobytes()


def audio_bytes() -> st.SearchStrategy[bytes]:
    """Binary frames: random bytes, extremes of every integer and float
    encoding, NaNs and infinities in float32."""
    return st.one_of(
        st.binary(max_size=3000),
        st.integers(0, 400).map(lambda n: _SPECIAL_FLOATS * (n // 11 + 1)),
        st.sampled_from([b"\xff", b"\x00", b"\x7f", b"\x80"]).flatmap(
            lambda b: st.integers(0, 2000).map(lambda n: b * n)
        ),
    )


def cut_points(size: int) -> st.SearchStrategy[list[int]]:
    """Sorted positions at which to cut ``size`` bytes into chunks (empty chunks included)."""
    return st.lists(st.integers(0, size), max_size=12).map(sorted)


def chunks_of(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (sorted positions; repeats give empty chunks)."""
    out: list[bytes] = []
    last = 0
    for c in cuts:
        out.append(data[last:c])
        last = c
    out.append(data[last:])
    return out


# -- multipart ---------------------------------------------------------------

FORM_FIELDS: tuple[str, ...] = (
    "file",
    "model",
    "language",
    "prompt",
    "response_format",
    "temperature",
    "timestamp_granularities[]",
    "timestamp_granularities",
    "stream",
)
"""The form fields of ``POST /v1/audio/transcriptions``."""

FIELD_VALUES: dict[str, tuple[str, ...]] = {
    "model": ("whisper-1", "gpt-4o-transcribe", "tone", "large-v3", "", "x" * 200, "base"),
    "language": ("en", "de", "en-US", "auto", "multi", "", "english", "e", "ß", "zz", "1a"),
    "prompt": ("hello", "", " ", "\x00", "ü" * 50),
    "response_format": (*("json", "text", "srt", "vtt", "verbose_json"), "JSON", "xml", "", " "),
    "temperature": (*("0", "1", "0.5", "1.0000001", "-0", "-0.0", "nan", "NaN", "inf"), "-inf"),
    "timestamp_granularities[]": ("word", "segment", "Word", "", "char", "word,segment"),
    "timestamp_granularities": ("word", "segment", "both"),
    "stream": ("true", "false", "1", "0", "yes", "no", "", "TRUE", "on", "maybe"),
}
"""Typical, edge and wrong values of each non-file field."""


@dataclass(frozen=True)
class Part:
    """One part of a multipart body. ``name`` None leaves the name out;
    ``disposition`` replaces the whole Content-Disposition header."""

    name: str | None
    content: bytes
    filename: str | None = None
    content_type: str | None = None
    disposition: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class MultipartSpec:
    """A multipart body and the Content-Type it is sent with, possibly broken.

    ``header_boundary`` is what the Content-Type announces (None: no boundary
    parameter), ``boundary`` what the body uses; ``truncate`` keeps that
    fraction of the body; ``raw_body`` replaces the body entirely."""

    content_type: str = "multipart/form-data"
    header_boundary: str | None = "XyZ"
    boundary: str = "XyZ"
    parts: tuple[Part, ...] = ()
    closed: bool = True
    newline: str = "\r\n"
    preamble: bytes = b""
    epilogue: bytes = b""
    truncate: float | None = None
    raw_body: bytes | None = None

    def header(self) -> str:
        """The Content-Type header value."""
        if self.header_boundary is None:
            return self.content_type
        return f"{self.content_type}; boundary={self.header_boundary}"

    def body(self) -> bytes:
        if self.raw_body is not None:
            return self.raw_body
        nl = self.newline.encode()
        dash = b"--" + self.boundary.encode("utf-8", "surrogateescape")
        out = io.BytesIO()
        out.write(self.preamble)
        for part in self.parts:
            out.write(dash + nl)
            if part.disposition is not None:
                out.write(b"Content-Disposition: " + part.disposition.encode() + nl)
            else:
                disp = "form-data"
                if part.name is not None:
                    disp += f'; name="{part.name}"'
                if part.filename is not None:
                    disp += f'; filename="{part.filename}"'
                out.write(b"Content-Disposition: " + disp.encode() + nl)
            if part.content_type is not None:
                out.write(b"Content-Type: " + part.content_type.encode() + nl)
            for key, value in part.headers:
                out.write(f"{key}: {value}".encode() + nl)
            out.write(nl + part.content + nl)
        if self.closed:
            out.write(dash + b"--" + nl)
        out.write(self.epilogue)
        data = out.getvalue()
        if self.truncate is not None:
            data = data[: int(len(data) * self.truncate)]
        return data


_WAV_CACHE: dict[tuple[int, str], bytes] = {}


def tone_wav(seed: int = 0, fmt: str = "WAV") -> bytes:
    """A short, valid audio file (one tone-language utterance), cached."""
    key = (seed % 4, fmt)
    if key not in _WAV_CACHE:
        audio = make_utterance(random_script(1, (1, 2), seed=seed % 4)[0], 16000)
        buf = io.BytesIO()
        sf.write(buf, np.concatenate([np.zeros(1600, np.float32), audio]), 16000, format=fmt)
        _WAV_CACHE[key] = buf.getvalue()
    return _WAV_CACHE[key]


def file_contents() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.just(b""),
        st.binary(max_size=200),
        st.sampled_from([0, 1, 2, 3]).map(tone_wav),
        st.tuples(st.sampled_from([0, 1]), st.integers(0, 60)).map(
            lambda t: tone_wav(t[0])[: t[1]]
        ),
        st.just(b"RIFF\xff\xff\xff\xffWAVEfmt " + b"\xff" * 40),
    )


def _boundaries() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["XyZ", "", "a" * 70, "a" * 71, "a" * 300, '"XyZ"', "Xy Z", "--", "-"]),
        st.text(alphabet=string.ascii_letters + string.digits + "'()+_,-./:=? ", max_size=80),
        st.text(max_size=10),
    )


def _content_types() -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            "multipart/form-data",
            "multipart/form-data",
            "multipart/mixed",
            "multipart/related",
            "MULTIPART/FORM-DATA",
            "text/plain",
            "application/json",
            "application/x-www-form-urlencoded",
            "application/octet-stream",
            "",
            "multipart/",
            "multipart",
            "form-data",
        ]
    )


def form_parts() -> st.SearchStrategy[Part]:
    known = st.sampled_from(tuple(FIELD_VALUES)).flatmap(
        lambda name: st.builds(
            Part,
            st.just(name),
            st.one_of(st.sampled_from(FIELD_VALUES[name]), st.text(max_size=30)).map(
                lambda v: v.encode("utf-8", "surrogatepass")
            ),
        )
    )
    file_part = st.builds(
        Part,
        st.just("file"),
        file_contents(),
        st.one_of(st.none(), st.sampled_from(["a.wav", "", "../../x", "ü.wav", "a" * 300])),
        st.one_of(st.none(), st.sampled_from(["audio/wav", "text/plain", "multipart/mixed"])),
    )
    odd = st.builds(
        Part,
        st.one_of(st.none(), st.text(max_size=12), st.sampled_from(FORM_FIELDS)),
        st.binary(max_size=100),
        st.one_of(st.none(), st.text(alphabet=string.printable, max_size=12)),
        st.one_of(st.none(), st.sampled_from(["multipart/mixed; boundary=inner", "x/y", ""])),
        st.one_of(
            st.none(),
            st.sampled_from(
                ["form-data", "form-data; name=", 'form-data; name="', "attachment", "; ;", ""]
            ),
            st.text(alphabet=string.printable.replace("\r", "").replace("\n", ""), max_size=30),
        ),
    )
    huge = st.builds(
        Part,
        st.sampled_from(["prompt", "model", "language", "file"]),
        st.integers(60 * 1024, 70 * 1024).map(lambda n: b"x" * n),
    )
    return st.one_of(known, file_part, odd, huge)


def multipart_specs() -> st.SearchStrategy[MultipartSpec]:
    """Multipart uploads: valid forms, truncated bodies, missing, empty and
    300-character boundaries, wrong content types, huge fields, nested parts,
    no multipart body at all."""
    return st.builds(
        MultipartSpec,
        content_type=_content_types(),
        header_boundary=st.one_of(st.none(), _boundaries()),
        boundary=_boundaries(),
        parts=st.lists(form_parts(), max_size=6).map(tuple),
        closed=st.booleans(),
        newline=st.sampled_from(["\r\n", "\r\n", "\n"]),
        preamble=st.sampled_from([b"", b"\r\n", b"preamble\r\n"]),
        epilogue=st.sampled_from([b"", b"\r\n", b"epilogue"]),
        truncate=st.one_of(st.none(), st.floats(0.0, 1.0)),
        raw_body=st.one_of(
            st.none(), st.none(), st.sampled_from([b"not a multipart body", b"", b"--XyZ"])
        ),
    )


def valid_multipart_specs() -> st.SearchStrategy[MultipartSpec]:
    """Well-formed forms with a file part (and other fields, any values)."""
    return st.builds(
        lambda parts, fname, audio, b: MultipartSpec(
            header_boundary=b, boundary=b, parts=(Part("file", audio, fname), *parts)
        ),
        st.lists(
            st.sampled_from(tuple(FIELD_VALUES)).flatmap(
                lambda n: st.sampled_from(FIELD_VALUES[n]).map(lambda v: Part(n, v.encode()))
            ),
            max_size=5,
        ),
        st.one_of(st.none(), st.just("a.wav")),
        file_contents(),
        st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=70),
    )


def form_fields() -> st.SearchStrategy[dict[str, str]]:
    """The text fields of a form, as ``earshot.service.http.openai.read_upload`` collects them."""
    pairs = st.sampled_from(tuple(FIELD_VALUES)).flatmap(
        lambda name: st.tuples(
            st.just(name),
            st.one_of(
                st.sampled_from(FIELD_VALUES[name]),
                st.text(max_size=30),
                st.floats(allow_nan=True).map(str),
                st.integers().map(str),
            ),
        )
    )
    return st.one_of(
        st.lists(pairs, max_size=8).map(dict),
        st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4),
    )


def granularity_lists() -> st.SearchStrategy[list[str]]:
    return st.lists(
        st.one_of(st.sampled_from(FIELD_VALUES["timestamp_granularities[]"]), st.text(max_size=8)),
        max_size=4,
    )


# ---------------------------------------------------------------------------
# 3. Live generators (random.Random) and the runner
# ---------------------------------------------------------------------------


def _rand_text(rng: random.Random, n: int) -> str:
    """Random unicode text (no surrogates): ASCII, control characters,
    accented letters, CJK, right-to-left, combining marks, emoji."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x4E00, 0x4FFF), (0x0590, 0x06FF)]
    ranges += [(0x0300, 0x036F), (0x1F300, 0x1F64F), (0xFFF0, 0xFFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _rand_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return rng.choice(
            [
                None,
                True,
                False,
                rng.randint(-(2**70), 2**70),
                rng.random() * 10 ** rng.randint(-300, 300),
                _rand_text(rng, rng.randint(0, 12)),
                rng.choice(_CASE_VARIANTS),
            ]
        )
    if roll < 0.75:
        return [_rand_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_rand_text(rng, rng.randint(0, 6)): _rand_json(rng, depth + 1) for _ in range(3)}


def gen_control_text(rng: random.Random, *, big: bool = True) -> str:
    """One text frame: see :func:`control_texts` (same families, drawn from ``rng``)."""
    roll = rng.randrange(100)
    if roll < 8:
        return _with_type(rng.choice(CONTROL_TYPES))
    if roll < 22:
        kind = rng.choice([rng.choice(_CASE_VARIANTS), _rand_json(rng), _rand_text(rng, 5)])
        return _with_type(kind, {"features": _rand_json(rng)} if rng.random() < 0.3 else None)
    if roll < 34:
        return json.dumps(_rand_json(rng), ensure_ascii=rng.random() < 0.5)
    if roll < 44:
        depth = rng.choice([rng.randint(1, 50), rng.randint(900, 1100), rng.randint(1, 30_000)])
        if big and rng.random() < 0.2:
            depth = rng.randint(30_000, 150_000)
        return nested_json(depth, rng.choice("[{"), rng.random() < 0.5, rng.choice(["1", "[]", ""]))
    if roll < 50:
        return '{"type": ' + nested_json(rng.randint(890, 1100), rng.choice("[{"), True) + "}"
    if roll < 58:
        n = rng.choice([rng.randint(1, 400), rng.randint(4290, 4310), rng.randint(1, 20_000)])
        return rng.choice(["1" * n, '{"type": ' + "9" * n + "}", f'{{"type": 1e{n}}}', f"-1e-{n}"])
    if roll < 72:
        base = _with_type(rng.choice([*CONTROL_TYPES, "x"]))
        return mutate_json(
            base, rng.choice(_JSON_MUTATIONS), rng.randint(0, 40), _rand_text(rng, 1) or "x"
        )
    if roll < 80:
        return rng.choice(
            [
                '{"type": "\\ud800"}',
                '{"type": "Keep\\u0000Alive"}',
                '{"type": "KeepAlive"}' * 2,
                '{"type": "KeepAlive"} x',
                "{}",
                "[]",
                "null",
                "",
                " ",
                '{"type": null}',
                '{"TYPE": "KeepAlive"}',
                '{"type": "Configure", "features": {"interim_results": true}}',
            ]
        )
    if roll < 97 or not big:
        return _rand_text(rng, rng.choice([rng.randint(0, 40), rng.randint(0, 3000)]))
    return _rand_text(rng, rng.randint(50_000, 300_000))


def _quote(rng: random.Random, text: str) -> str:
    roll = rng.random()
    if roll < 0.7:
        return urllib.parse.quote(text, safe="")
    if roll < 0.85:
        return urllib.parse.quote_plus(text)
    # Left raw: what a careless client would send (the server may refuse it).
    return text.replace(" ", "+").replace("\r", "").replace("\n", "").replace("#", "%23")


def gen_query(rng: random.Random) -> str:
    """A query string for ``/v1/listen``: parameters from every set Earshot
    knows and random ones, any values, percent-encoded or not, repeated,
    without ``=``, broken escapes."""
    pairs: list[str] = []
    for _ in range(rng.choice([0, 1, 2, 3, 4, 6, 10])):
        roll = rng.random()
        if roll < 0.6:
            key = rng.choice(ALL_PARAMETER_NAMES)
        elif roll < 0.7:
            key = rng.choice(ALL_PARAMETER_NAMES).upper()
        else:
            key = _rand_text(rng, rng.randint(0, 12))
        roll = rng.random()
        if roll < 0.6:
            value = rng.choice(_VALUE_WORDS)
        elif roll < 0.75:
            value = str(rng.randint(-(10**12), 10**12))
        else:
            value = _rand_text(rng, rng.randint(0, 30))
        k, v = _quote(rng, key), _quote(rng, value)
        pairs.append(rng.choice([f"{k}={v}", f"{k}={v}", f"{k}={v}", k, f"{k}=", f"={v}"]))
    if rng.random() < 0.03:
        pairs += [f"keyterm={rng.choice(_VALUE_WORDS)}"] * rng.randint(95, 130)
    if rng.random() < 0.05:
        pairs.append(rng.choice(["%", "%zz", "%ff%fe", "%00", "a=%E2%82", "%%", "&&", ";", "=&="]))
    if rng.random() < 0.03:
        pairs.append("keyterm=" + "x" * rng.randint(1000, 6000))
    return rng.choice(["&", "&", "&", ";", "&&"]).join(pairs)


def gen_valid_query(rng: random.Random) -> tuple[str, str, int, int]:
    """A query the server accepts, and its (encoding, sample_rate, channels)."""
    encoding = rng.choice([*ENCODINGS, *_ALIASES])
    rate = rng.choice([8000, 16000, 16000, 22050, 44100, 48000, rng.randint(8000, 48000)])
    channels = rng.choice([1, 1, 1, 2, 2, rng.randint(1, MAX_CHANNELS)])
    parts = [f"encoding={encoding}", f"sample_rate={rate}", f"channels={channels}"]
    for key, values in (
        ("multichannel", ("true", "false")),
        ("interim_results", ("true", "false")),
        ("vad_events", ("true",)),
        ("utterance_end_ms", ("1000",)),
        ("endpointing", ("false", "10", "300")),
        ("punctuate", ("true",)),
        ("warnings", ("true",)),
    ):
        if rng.random() < 0.25:
            parts.append(f"{key}={rng.choice(values)}")
    return "&".join(parts), encoding, rate, channels


def gen_audio_frame(
    rng: random.Random, encoding: str, channels: int, max_frame_bytes: int, *, huge: bool = True
) -> bytes:
    """One binary frame for a stream of ``encoding``: any length (partial
    frames too), random bytes, extremes, NaN floats, silence, tone speech;
    rarely over ``max_frame_bytes`` (and, more rarely, four times over)."""
    bps = ENCODINGS[_ALIASES.get(encoding, encoding)]
    bpf = bps * channels
    if huge and rng.random() < 0.004:
        return os.urandom(max_frame_bytes + rng.randint(1, 64))
    if huge and rng.random() < 0.0008:
        return bytes(4 * max_frame_bytes + rng.randint(1, 64))
    size = rng.choice(
        [
            0,
            1,
            bpf - 1,
            bpf,
            bpf + 1,
            rng.randint(0, 64),
            rng.randint(1, 40) * bpf,
            rng.randint(0, 4096),
        ]
    )
    roll = rng.random()
    if roll < 0.4:
        return rng.randbytes(size)
    if roll < 0.55:
        return bytes(size)
    if roll < 0.65:
        return rng.choice([b"\xff", b"\x7f", b"\x80", b"\x00\x80"]) * (size // 2 + 1)
    if roll < 0.75:
        return (_SPECIAL_FLOATS * (size // len(_SPECIAL_FLOATS) + 1))[:size]
    speech = make_utterance(random_script(1, (1, 2), seed=rng.randrange(8))[0], 16000)
    frames = np.repeat(speech[:, None], channels, axis=1)
    data = encode_audio(frames, _ALIASES.get(encoding, encoding))
    start = rng.randrange(max(1, len(data) - size))
    return data[start : start + size]


# -- raw HTTP ------------------------------------------------------------------


@dataclass
class HttpAnswer:
    """One HTTP response read off a socket."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool = True
    """False when the body may go on: it was cut short, or it ends with the connection."""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: ([^\r\n]*))?")


def parse_answers(data: bytes) -> tuple[list[HttpAnswer], bytes]:
    """The HTTP responses in ``data`` (pipelined ones too), and what is left over."""
    answers: list[HttpAnswer] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        head = data[:end].split(b"\r\n")
        m = _STATUS_LINE.fullmatch(head[0])
        if m is None:
            break
        headers = []
        for line in head[1:]:
            key, _, value = line.partition(b":")
            headers.append((key.decode("latin-1").strip(), value.decode("latin-1").strip()))
        answer = HttpAnswer(int(m.group(3)), (m.group(4) or b"").decode("latin-1"), headers, b"")
        rest = data[end + 4 :]
        length = answer.header("content-length")
        if answer.header("transfer-encoding") == "chunked":
            body, rest, answer.complete = _dechunk(rest)
        elif length is not None and length.isdigit():
            answer.complete = len(rest) >= int(length)
            body, rest = rest[: int(length)], rest[int(length) :]
        elif answer.status in (101, 204, 304):
            body = b""
        else:
            body, rest, answer.complete = rest, b"", False
        answer.body = body
        answers.append(answer)
        data = rest
    return answers, data


def _dechunk(data: bytes) -> tuple[bytes, bytes, bool]:
    """A chunked body: its bytes, what follows it, and whether it was complete."""
    out = io.BytesIO()
    while True:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return out.getvalue(), b"", False
        try:
            size = int(data[:line_end].split(b";")[0], 16)
        except ValueError:
            return out.getvalue(), data, False
        data = data[line_end + 2 :]
        if size == 0:
            trailer = data.find(b"\r\n")
            return out.getvalue(), data[trailer + 2 :] if trailer >= 0 else b"", trailer >= 0
        out.write(data[:size])
        data = data[size + 2 :]


def http_request(
    method: str,
    target: str,
    host: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    content_length: bool = True,
) -> bytes:
    """The bytes of one HTTP/1.1 request (``Connection: close``)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if content_length and (body or method in ("POST", "PUT", "PATCH")):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body


async def exchange(
    host: str,
    port: int,
    data: bytes,
    *,
    timeout: float = 15.0,
    half_close_after: float | None = None,
    answers: int | None = 1,
) -> tuple[bytes, str]:
    """Write ``data`` on a new connection and read until ``answers`` complete
    HTTP answers have come (None: until the server closes the connection).

    ``half_close_after``: if nothing has come back after that many seconds,
    shut down the write side (for inputs that leave the server waiting for
    more, or a kept-alive connection open). Returns what was read and how
    the connection ended: ``answered``, ``eof``, ``reset`` or ``timeout``."""
    reader, writer = await asyncio.open_connection(host, port)
    got = bytearray()
    ending = "eof"
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        deadline = time.monotonic() + timeout
        half_closed = half_close_after is None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                ending = "timeout"
                break
            wait = left if half_close_after is None or half_closed else min(left, half_close_after)
            try:
                chunk = await asyncio.wait_for(reader.read(65536), wait)
            except asyncio.TimeoutError:
                if not half_closed:
                    half_closed = True
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    continue
                ending = "timeout"
                break
            except ConnectionError:
                ending = "reset"
                break
            if not chunk:
                break
            got += chunk
            if answers is not None:
                parsed, _ = parse_answers(bytes(got))
                if sum(a.complete for a in parsed) >= answers:
                    ending = "answered"
                    break
    finally:
        writer.transport.abort()
    return bytes(got), ending


# -- raw websocket ---------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def ws_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    declared_length: int | None = None,
) -> bytes:
    """One client websocket frame (RFC 6455), masked unless ``mask`` is False;
    ``declared_length`` lies about the payload's length."""
    n = len(payload) if declared_length is None else declared_length
    head = bytearray([(0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)])
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(bit | 127)
        head += n.to_bytes(8, "big")
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    data = np.frombuffer(payload, dtype=np.uint8)
    masked = data ^ np.resize(np.frombuffer(key, dtype=np.uint8), len(data))
    return bytes(head) + key + masked.tobytes()


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else code.to_bytes(2, "big") + reason


def handshake_request(
    path: str, host: str, *, headers: Sequence[tuple[str, str]] | None = None
) -> bytes:
    """A websocket upgrade request for ``path`` (``headers`` replace the usual ones)."""
    if headers is None:
        key = base64.b64encode(os.urandom(16)).decode()
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
        ]
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers)]
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n"


@dataclass
class WsResult:
    """What one websocket session saw: the server's JSON messages, its close
    code (None: the session was aborted by the client before one came;
    1006: the connection dropped without a close frame) and anything odd."""

    messages: list[Any] = field(default_factory=list)
    close_code: int | None = None
    bad_text: list[str] = field(default_factory=list)
    ending: str = ""


class RawWebSocket:
    """A minimal websocket client over a plain socket that sends whatever
    frames it is told to and reads the server's frames in the background."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.result = WsResult()
        self.closed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls, host: str, port: int, request: bytes, timeout: float = 10.0
    ) -> tuple[RawWebSocket | None, HttpAnswer | None, str]:
        """Send the upgrade ``request``; a websocket on 101, else the HTTP answer.

        The third value says how a refused handshake ended (``eof``,
        ``reset``, ``timeout``)."""
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError) as exc:
            partial = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
            writer.transport.abort()
            answers, _ = parse_answers(partial)
            return None, answers[0] if answers else None, "reset"
        except asyncio.TimeoutError:
            writer.transport.abort()
            return None, None, "timeout"
        answers, _ = parse_answers(head)
        if answers and answers[0].status == 101:
            return cls(reader, writer), answers[0], "upgraded"
        rest = b""
        length = answers[0].header("content-length") if answers else None
        with contextlib.suppress(
            asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError
        ):
            if length is not None and length.isdigit():
                rest = await asyncio.wait_for(reader.readexactly(int(length)), timeout)
            else:  # chunked or till the end: the server decides when it closes
                rest = await asyncio.wait_for(reader.read(), timeout)
        writer.transport.abort()
        answers, _ = parse_answers(head + rest)
        return None, answers[0] if answers else None, "eof"

    async def send(self, frame: bytes) -> bool:
        """Write raw frame bytes; False once the connection is gone."""
        if self.writer.transport.is_closing():
            return False
        try:
            self.writer.write(frame)
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def _read(self) -> None:
        result = self.result
        try:
            while True:
                b0, b1 = await self.reader.readexactly(2)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = int.from_bytes(await self.reader.readexactly(2), "big")
                elif n == 127:
                    n = int.from_bytes(await self.reader.readexactly(8), "big")
                if b1 & 0x80:
                    await self.reader.readexactly(4)  # servers do not mask; ignore the key
                payload = await self.reader.readexactly(n)
                if opcode == OP_TEXT:
                    try:
                        result.messages.append(json.loads(payload))
                    except ValueError:
                        result.bad_text.append(payload[:200].decode("utf-8", "replace"))
                elif opcode == OP_PING:
                    await self.send(ws_frame(OP_PONG, payload[:125]))
                elif opcode == OP_CLOSE:
                    result.close_code = int.from_bytes(payload[:2], "big") if n >= 2 else 1005
                    result.ending = f"close frame, reason {payload[2:62]!r}"
                    await self.send(ws_frame(OP_CLOSE, payload[:2]))
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            result.close_code = 1006
            result.ending = "dropped"
        finally:
            self.closed.set()

    async def wait_closed(self, timeout: float) -> None:
        """Wait for the server to close (its close frame or the connection)."""
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except asyncio.TimeoutError:
            self.result.ending = "timeout"
        self.abort()

    def abort(self) -> None:
        self._task.cancel()
        self.writer.transport.abort()


# -- cases -----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The server under fuzz and the limits the generators aim at."""

    host: str
    port: int
    max_frame_bytes: int = 1_048_576
    max_upload_bytes: int = 26_214_400

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Violation:
    """One answer that breaks a rule, with what caused it.

    ``rule`` is the broken rule, ``status`` the HTTP status or websocket close
    code, ``detail`` the body or message at fault, ``reproducer`` the input
    (request bytes as a Python literal, or the websocket frames sent)."""

    kind: str
    rule: str
    status: int | None
    detail: str
    reproducer: str
    seed: str

    def group(self) -> tuple[str, int | None, str]:
        """Violations of one group come from one cause: same rule, same status,
        same shape of body (quoted text and numbers blanked), whatever the kind
        of input that met it."""
        shape = re.sub(r"b?'[^']*'|\"[^\"]*\"|\d+", "…", self.detail.split("\n")[0])[:70]
        return (self.rule, self.status, shape)


@dataclass
class CaseResult:
    """What one generated case did: its kind, how many inputs it sent (frames,
    requests, byte strings), how it was answered and which rules it broke."""

    kind: str
    inputs: int
    outcome: str
    violations: list[Violation] = field(default_factory=list)


def _lit(data: bytes, limit: int = 600) -> str:
    if len(data) <= limit:
        return repr(data)
    return f"{data[: limit // 2]!r} + <{len(data) - limit} bytes> + {data[-limit // 2 :]!r}"


def judge_http(
    kind: str, answer: HttpAnswer, *, method: str, reproducer: str, seed: str
) -> list[Violation]:
    """The rules for an HTTP answer: never 500; from 400 up, a JSON body with a
    snake_case code (HEAD answers carry no body: their Content-Type must say JSON)."""
    out: list[Violation] = []

    def bad(rule: str) -> None:
        detail = answer.body[:300].decode("utf-8", "replace") or f"<empty, {answer.reason}>"
        ctype = answer.header("content-type") or "-"
        out.append(Violation(kind, rule, answer.status, f"[{ctype}] {detail}", reproducer, seed))

    if answer.status == 500:
        bad("status 500")
    if answer.status >= 400:
        ctype = (answer.header("content-type") or "").split(";")[0].strip().lower()
        if method == "HEAD":
            if ctype != "application/json":
                bad("error answer is not JSON")
            return out
        try:
            body = json.loads(answer.body)
        except ValueError:
            bad("error answer is not JSON")
            return out
        code = error_code_of(body)
        if not is_snake_case(code):
            bad(f"error answer has no snake_case code ({code!r})")
    return out


def judge_ws(
    kind: str,
    result: WsResult,
    *,
    aborted: bool,
    reproducer: str,
    seed: str,
    close_codes: frozenset[int],
) -> list[Violation]:
    """The rules for a websocket session: a documented close code other than
    1011, every server message JSON, every ``Error`` with a snake_case code."""
    out: list[Violation] = []
    code = result.close_code
    if not aborted:
        if code is None:
            out.append(Violation(kind, "no close", None, result.ending, reproducer, seed))
        elif code in FAILURE_CLOSE_CODES:
            errors = [
                m for m in result.messages if isinstance(m, dict) and m.get("type") == "Error"
            ]
            detail = json.dumps(errors[-1])[:300] if errors else "no Error message"
            out.append(Violation(kind, "close 1011", code, detail, reproducer, seed))
        elif code not in close_codes:
            codes = [
                m.get("code")
                for m in result.messages
                if isinstance(m, dict) and m.get("type") == "Error"
            ]
            detail = f"{result.ending}\nError codes before it: {codes}"
            out.append(Violation(kind, "undocumented close code", code, detail, reproducer, seed))
    for text in result.bad_text:
        out.append(Violation(kind, "server text frame is not JSON", code, text, reproducer, seed))
    for m in result.messages:
        if isinstance(m, dict) and m.get("type") == "Error" and not is_snake_case(m.get("code")):
            detail = json.dumps(m)[:300]
            out.append(
                Violation(kind, "Error without snake_case code", code, detail, reproducer, seed)
            )
    return out


@dataclass(frozen=True)
class Context:
    target: Target
    close_codes: frozenset[int]


def _ws_outcome(result: WsResult, aborted: bool) -> str:
    if aborted:
        return "ws aborted by client"
    return (
        f"ws close {result.close_code}" if result.close_code is not None else f"ws {result.ending}"
    )


async def _ws_session(
    ctx: Context,
    kind: str,
    seed: str,
    query: str,
    frames: Sequence[bytes],
    ending: str,
    notes: Sequence[str],
) -> CaseResult:
    """Open ``/v1/listen?query``, send ``frames`` (raw frame bytes), then end:
    ``close_stream`` (CloseStream and wait), ``client_close`` (a close frame,
    in ``frames`` already, and wait) or ``abort`` (drop the connection)."""
    t = ctx.target
    path = "/v1/listen" + (f"?{query}" if query else "")
    request = handshake_request(path, t.hostport)
    ws, answer, how = await RawWebSocket.connect(t.host, t.port, request)
    repro = f"GET {path!r} upgrade, then frames: " + ", ".join(notes)
    if ws is None:
        if answer is None:
            return CaseResult(kind, 1, f"handshake {how}")
        return CaseResult(
            kind,
            1,
            f"http {answer.status}",
            judge_http(kind, answer, method="GET", reproducer=repro, seed=seed),
        )
    sent = 0
    for frame in frames:
        if not await ws.send(frame):
            break
        sent += 1  # the frames that went out
    aborted = ending == "abort"
    if aborted:
        await asyncio.sleep(0)
        ws.abort()
    else:
        if ending == "close_stream":
            await ws.send(ws_frame(OP_TEXT, b'{"type": "CloseStream"}'))
        await ws.wait_closed(20.0)
    result = ws.result
    violations = judge_ws(
        kind, result, aborted=aborted, reproducer=repro, seed=seed, close_codes=ctx.close_codes
    )
    return CaseResult(kind, max(1, sent), _ws_outcome(result, aborted), violations)


def _ending(rng: random.Random) -> tuple[str, list[bytes], list[str]]:
    roll = rng.random()
    if roll < 0.8:
        return "close_stream", [], ["CloseStream"]
    if roll < 0.92:
        code = rng.choice([1000, 1000, 1001, 4000, 3000, None, 999, 1005, 1006, 1015, 5000, 2000])
        reason = rng.choice([b"", b"bye", b"\xff\xfe", b"x" * 123])
        return (
            "client_close",
            [ws_frame(OP_CLOSE, close_payload(code, reason)[:125])],
            [f"close({code}, {reason[:8]!r})"],
        )
    return "abort", [], ["<connection dropped>"]


async def case_ws_text(ctx: Context, rng: random.Random, seed: str) -> CaseResult:
    """Text frames on an open stream: malformed control messages of every family."""
    frames: list[bytes] = []
    notes: list[str] = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.1:
            frames.append(ws_frame(OP_BINARY, bytes(rng.choice([0, 320, 3200]))))
            notes.append("binary silence")
            continue
        text = gen_control_text(rng)
        if text == _with_type("CloseStream") and rng.random() < 0.5:
            text = _with_type("KeepAlive")
        frames.append(ws_frame(OP_TEXT, text.encode()))
        notes.append(f"text {text[:80]!r}" + (f"...({len(text)} chars)" if len(text) > 80 else ""))
    ending, tail, tail_notes = _ending(rng)
    return await _ws_session(ctx, "ws_text", seed, "", frames + tail, ending, notes + tail_notes)


async def case_ws_binary(ctx: Context, rng: random.Random, seed: str) -> CaseResult:
    """Binary frames in a random valid format: any lengths, any bytes."""
    query, encoding, _, channels = gen_valid_query(rng)
    frames: list[bytes] = []
    notes: list[str] = []
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.08:
            text = rng.choice(["Finalize", "KeepAlive", "CloseStream", "Configure"])
            frames.append(ws_frame(OP_TEXT, _with_type(text).encode()))
            notes.append(text)
            continue
        data = gen_audio_frame(rng, encoding, channels, ctx.target.max_frame_bytes)
        frames.append(ws_frame(OP_BINARY, data))
        notes.append(f"binary {len(data)} bytes {_lit(data, 24)}")
    ending, tail, tail_notes = _ending(rng)
    return await _ws_session(
        ctx, "ws_binary", seed, query, frames + tail, ending, notes + tail_notes
    )


async def case_ws_frames(ctx: Context, rng: random.Random, seed: str) -> CaseResult:
    """Websocket protocol oddities: invalid UTF-8, unmasked frames, reserved
    bits and opcodes, fragments, pings, oversized control frames, lying lengths."""
    frames: list[bytes] = []
    notes: list[str] = []
    for _ in range(rng.randint(1, 3)):
        roll = rng.randrange(12)
        if roll == 0:
            frames.append(
                ws_frame(OP_TEXT, rng.choice([b"\xff\xfe", b'{"type": "\xc3"}', b"\xed\xa0\x80"]))
            )
            notes.append("text with invalid UTF-8")
        elif roll == 1:
            frames.append(ws_frame(OP_TEXT, b'{"type": "KeepAlive"}', mask=False))
            notes.append("unmasked text")
        elif roll == 2:
            rsv = rng.randint(1, 7)
            frames.append(ws_frame(OP_BINARY, bytes(320), rsv=rsv))
            notes.append(f"binary with rsv={rsv}")
        elif roll == 3:
            op = rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
            frames.append(ws_frame(op, b"x"))
            notes.append(f"opcode {op:#x}")
        elif roll == 4:
            frames.append(ws_frame(OP_CONT, bytes(10)))
            notes.append("continuation without a first fragment")
        elif roll == 5:
            msg = b'{"type": "KeepAlive"}'
            frames += [
                ws_frame(OP_TEXT, msg[:5], fin=False),
                ws_frame(OP_PING, b"p"),
                ws_frame(OP_CONT, msg[5:]),
            ]
            notes.append("fragmented KeepAlive with a ping between the fragments")
        elif roll == 6:
            frames += [ws_frame(OP_BINARY, bytes(100), fin=False), ws_frame(OP_CONT, bytes(101))]
            notes.append("fragmented binary of 201 bytes")
        elif roll == 7:
            if rng.random() < 0.5:
                n = rng.randint(10, 100)
                frames.append(ws_frame(OP_PING, b"p") * n)
                notes.append(f"{n} pings")
            else:
                frames.append(ws_frame(OP_PING, bytes(rng.choice([0, 125, 126, 200]))))
                notes.append("ping")
        elif roll == 8:
            frames.append(ws_frame(OP_PONG, b"unsolicited"))
            notes.append("unsolicited pong")
        elif roll == 9:
            n = rng.choice([2**62, 2**40, 4 * ctx.target.max_frame_bytes + 1])
            frames.append(ws_frame(OP_BINARY, b"", declared_length=n, mask=False)[:10])
            notes.append(f"binary frame header declaring {n} bytes, no payload")
        elif roll == 10:
            frames.append(ws_frame(OP_TEXT, b"", fin=False))
            frames.append(ws_frame(OP_TEXT, b"x"))
            notes.append("text fragment followed by a new text frame")
        else:
            frames.append(ws_frame(OP_CLOSE, b"\x03"))
            notes.append("close frame with a 1-byte payload")
    ending, tail, tail_notes = _ending(rng)
    if ending == "close_stream" and rng.random() < 0.5:
        ending = "abort" if rng.random() < 0.3 else ending
    return await _ws_session(ctx, "ws_frames", seed, "", frames + tail, ending, notes + tail_notes)


async def _http_case(
    ctx: Context,
    kind: str,
    seed: str,
    data: bytes,
    method: str,
    half_close: float | None = None,
    answers: int | None = 1,
) -> CaseResult:
    t = ctx.target
    got, how = await exchange(t.host, t.port, data, half_close_after=half_close, answers=answers)
    replies, _ = parse_answers(got)
    repro = _lit(data)
    if not replies:
        return CaseResult(kind, 1, f"no answer ({how})" if not got else f"garbage answer ({how})")
    violations: list[Violation] = []
    for a in replies:
        violations += judge_http(kind, a, method=method, reproducer=repro, seed=seed)
    outcome = "http " + "+".join(str(a.status) for a in replies)
    return CaseResult(kind, 1, outcome, violations)


async def case_listen_get(ctx: Context, rng: random.Random, seed: str) -> CaseResult:
    """``GET /v1/listen`` with a random query string and no upgrade."""
    query = gen_valid_query(rng)[0] if rng.random() < 0.15 else gen_query(rng)
    target = "/v1/listen" + (f"?{query}" if query or rng.random() < 0.5 else "")
    data = http_request("GET", target, ctx.target.hostport)
    return await _http_case(ctx, "listen_get", seed, data, "GET")


_HANDSHAKE_BREAKS = (
    "no key",
    "bad key",
    "version 12",
    "no version",
    "no upgrade",
    "upgrade h2c",
    "connection keep-alive",
    "protocol",
    "origin",
    "post",
)


async def case_listen_upgrade(ctx: Context, rng: random.Random, seed: str) -> CaseResult:
    """A websocket upgrade of ``/v1/listen`` with a random query string, and
    sometimes a broken handshake; an accepted stream is closed with CloseStream."""
    broken = rng.choice(_HANDSHAKE_BREAKS) if rng.random() < 0.35 else ""
    # A broken handshake mostly comes with good settings, so that the
    # handshake itself is what the server meets first.
    valid_query = rng.random() < (0.6 if broken else 0.2)
    query = gen_valid_query(rng)[0] if valid_query else gen_query(rng)
    path = "/v1/listen" + (f"?{query}" if query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]
    if broken:
        if broken == "no key":
            headers = [h for h in headers if h[0] != "Sec-WebSocket-Key"]
        elif broken == "bad key":
            headers[2] = (
                "Sec-WebSocket-Key",
                rng.choice(["abc", "", "x" * 100, "ü", "é" * 24, "AAAAAAAAAAAAAAAAAAAAAA==\x7f"]),
            )
        elif broken == "version 12":
            headers[3] = ("Sec-WebSocket-Version", rng.choice(["12", "8", "14", "x"]))
        elif broken == "no version":
            headers = headers[:3]
        elif broken == "no upgrade":
            headers = headers[1:]
        elif broken == "upgrade h2c":
            headers[0] = ("Upgrade", "h2c")
        elif broken == "connection keep-alive":
            headers[1] = ("Connection", "keep-alive")
        elif broken == "protocol":
            headers.append(("Sec-WebSocket-Protocol", rng.choice(["token, x", "", "a" * 300, "ü"])))
        elif broken == "origin":
            headers.append(("Origin", rng.choice(["http://evil.example", "null", "", "ü://"])))
    request = handshake_request(path, ctx.target.hostport, headers=headers)
    if broken == "post":
        request = b"POST" + request[3:]
    t = ctx.target
    ws, answer, how = await RawWebSocket.connect(t.host, t.port, request)
    repro = _lit(request)
    if ws is None:
        if answer is None:
            return CaseResult("listen_upgrade", 1, f"handshake {how}")
        v = judge_http("listen_upgrade", answer, method="GET", reproducer=repro, seed=seed)
        return CaseResult("listen_upgrade", 1, f"http {answer.status}", v)
    await ws.send(ws_frame(OP_TEXT, b'{"type": "CloseStream"}'))
    await ws.wait_closed(20.0)
    v = judge_ws(
        "listen_upgrade",
        ws.result,
        aborted=False,
        reproducer=repro + " + CloseStream",
        seed=seed,
        close_codes=ctx.close_codes,
    )
    return CaseResult("listen_upgrade", 1, "101 + " + _ws_outcome(ws.result, False), v)


def gen_multipart(rng: random.Random) -> MultipartSpec:
    """A multipart upload as :func:`multipart_specs` makes them, drawn from ``rng``."""

    def value_part(name: str) -> Part:
        if rng.random() < 0.8:
            return Part(name, rng.choice(FIELD_VALUES[name]).encode())
        return Part(name, _rand_text(rng, rng.randint(0, 20)).encode())

    parts: list[Part] = []
    roll = rng.random()
    if roll < 0.55:
        audio = rng.choice(
            [tone_wav(rng.randrange(4)), b"", rng.randbytes(rng.randint(1, 300)), tone_wav(0)[:44]]
        )
        parts.append(Part("file", audio, rng.choice([None, "a.wav", "", "ü.wav", "a" * 300])))
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.7:
            parts.append(value_part(rng.choice(tuple(FIELD_VALUES))))
        elif r < 0.8:
            parts.append(
                Part(rng.choice(["prompt", "model", "file"]), b"x" * rng.randint(60_000, 70_000))
            )
        elif r < 0.9:
            parts.append(
                Part(
                    rng.choice([None, "", "file", "x"]),
                    rng.randbytes(rng.randint(0, 50)),
                    disposition=rng.choice(
                        [
                            None,
                            "form-data",
                            "form-data; name=",
                            'form-data; name="',
                            "attachment",
                            "; ;",
                            "",
                        ]
                    ),
                    content_type=rng.choice([None, "multipart/mixed; boundary=inner", "x/y"]),
                )
            )
        else:
            parts.append(
                Part(_rand_text(rng, rng.randint(0, 8)), rng.randbytes(rng.randint(0, 20)))
            )
    rng.shuffle(parts)
    boundary = rng.choice(["XyZ", "XyZ", "XyZ", "", "a" * 70, "a" * 71, "a" * 300, "b o", "é"])
    header_boundary: str | None = boundary
    content_type = "multipart/form-data"
    raw_body = None
    truncate = None
    r = rng.random()
    if r < 0.1:
        header_boundary = None
    elif r < 0.2:
        header_boundary = rng.choice(["XyZ", "", '"XyZ"', "other", "a" * 300])
    elif r < 0.3:
        content_type = rng.choice(
            [
                "text/plain",
                "application/json",
                "multipart/mixed",
                "application/x-www-form-urlencoded",
                "",
                "multipart/",
            ]
        )
    elif r < 0.38:
        raw_body = rng.choice([b"not a multipart body", b"", b"--XyZ", b"--XyZ\r\n", b"--XyZ--"])
    if rng.random() < 0.2:
        truncate = rng.random()
    return MultipartSpec(
        content_type=content_type,
        header_boundary=header_boundary,
        boundary=boundary,
        parts=tuple(parts),
        closed=rng.random() < 0.85,
        newline="\r\n" if rng.random() < 0.9 else "\n",
        truncate=truncate,
        raw_body=raw_body,
    )


async def case_multipart(ctx: Context, rng: random.Random, seed: str) -> CaseResult:
    """``POST /v1/audio/transcriptions`` (or translations) with a random, often
    malformed multipart body; sometimes chunked, sometimes with a lying length."""
    spec = gen_multipart(rng)
    body = spec.body()
    path = "/v1/audio/transcriptions" if rng.random() < 0.9 else "/v1/audio/translations"
    headers: list[tuple[str, str]] = []
    ctype = spec.header()
    if ctype or rng.random() < 0.5:
        headers.append(("Content-Type", ctype))
    r = rng.random()
    t = ctx.target
    if r < 0.08:
        lie = rng.choice([len(body) + rng.randint(1, 100), t.max_upload_bytes + 1, 10**12])
        data = http_request(
            "POST",
            path,
            t.hostport,
            [*headers, ("Content-Length", str(lie))],
            body,
            content_length=False,
        )
        return await _http_case(ctx, "multipart", seed, data, "POST", half_close=0.2)
    if r < 0.15:
        chunked = b"".join(
            b"%x\r\n%s\r\n" % (len(c), c) for c in chunks_of(body, [len(body) // 2]) if c
        )
        chunked += rng.choice([b"0\r\n\r\n", b"0\r\n\r\n", b"zz\r\n", b""])
        data = http_request(
            "POST",
            path,
            t.hostport,
            [*headers, ("Transfer-Encoding", "chunked")],
            chunked,
            content_length=False,
        )
        return await _http_case(ctx, "multipart", seed, data, "POST", half_close=0.2)
    data = http_request("POST", path, t.hostport, headers, body)
    return await _http_case(ctx, "multipart", seed, data, "POST")


_PATHS = (
    "/",
    "/healthz",
    "/readyz",
    "/v1/policy",
    "/v1/models",
    "/v1/models/whisper-1",
    "/v1/models/nope",
    "/v1/listen",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/metrics",
    "/v1/",
    "/v1/listen/",
    "/v1/listen/x",
    "/v2/listen",
    "/nope",
    "/%00",
    "/..%2f..%2fetc%2fpasswd",
    "/../../etc/passwd",
    "//",
    "/v1/models/%ff",
    "/v1/models/" + "a" * 500,
    "*",
    "http://example.com/healthz",
)
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT")


async def case_http_random(ctx: Context, rng: random.Random, seed: str) -> CaseResult:
    """Random methods on random paths: known routes, unknown ones, odd ones."""
    r = rng.random()
    if r < 0.7:
        path = rng.choice(_PATHS)
    elif r < 0.9:
        path = "/" + _quote(rng, _rand_text(rng, rng.randint(0, 30)))
    else:
        path = rng.choice(_PATHS) + "?" + gen_query(rng)
    if rng.random() < 0.8:
        method = rng.choice(_METHODS)
    else:
        method = "".join(
            rng.choice(string.ascii_uppercase + "-_!") for _ in range(rng.randint(1, 12))
        )
    body = rng.randbytes(rng.randint(0, 100)) if method in ("POST", "PUT", "PATCH") else b""
    data = http_request(method, path, ctx.target.hostport, body=body)
    return await _http_case(ctx, "http_random", seed, data, method)


def gen_garbage(rng: random.Random, hostport: str) -> bytes:
    """Bytes on a raw TCP connection: random, HTTP-looking with one part
    broken, other protocols' greetings, pipelined requests, bad framing."""
    ok = f"GET /healthz HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode()
    post = b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
    choices: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randint(1, 2000)),
        lambda: rng.randbytes(rng.randint(1, 64)) + b"\r\n\r\n",
        lambda: b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        lambda: b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        lambda: b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: \x00\x01\r\n\r\n",
        lambda: b"G\x00T /healthz HTTP/1.1\r\n\r\n",
        lambda: b"GET /heal thz HTTP/1.1\r\nHost: x\r\n\r\n",
        lambda: b"GET /healthz\r\n\r\n",
        lambda: b"GET\r\n\r\n",
        lambda: b"\r\n\r\n",
        lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),
        lambda: post + b"Content-Length: -1\r\n\r\n",
        lambda: post + b"Content-Length: abc\r\n\r\n",
        lambda: post + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        lambda: post + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        lambda: post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        lambda: post + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        lambda: ok + rng.randbytes(rng.randint(1, 200)) + b"\r\n\r\n",
        lambda: ok * rng.randint(2, 5),
        lambda: b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * rng.randint(100, 300) + b"\r\n",
        lambda: b"GET /" + b"a" * rng.randint(8000, 20000) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        lambda: (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: "
            + b"v" * rng.randint(8000, 70000)
            + b"\r\n\r\n"
        ),
        lambda: (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"X" * rng.randint(8000, 20000)
            + b": v\r\n\r\n"
        ),
        lambda: b"GET /healthz HTTP/1.1\r\nHost: x\r\n Folded: continuation\r\n\r\n",
        lambda: b"GET /healthz HTTP/1.1\nHost: x\n\n",
        lambda: b"GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        lambda: b"GET /v1/listen?" + gen_query(rng).encode() + b" HTTP/1.0\r\n\r\n",
        lambda: "GET /ü HTTP/1.1\r\nHost: é\r\n\r\n".encode(),
        lambda: ok[: rng.randint(1, len(ok) - 1)],
    ]
    return rng.choice(choices)()


async def case_tcp_garbage(ctx: Context, rng: random.Random, seed: str) -> CaseResult:
    """Raw bytes on a TCP connection; answers that parse as HTTP are judged."""
    data = gen_garbage(rng, ctx.target.hostport)
    return await _http_case(ctx, "tcp_garbage", seed, data, "GET", half_close=0.5, answers=None)


CaseFn = Callable[[Context, random.Random, str], Awaitable[CaseResult]]

CASES: dict[str, tuple[CaseFn, int]] = {
    "ws_text": (case_ws_text, 4),
    "ws_binary": (case_ws_binary, 3),
    "ws_frames": (case_ws_frames, 1),
    "listen_get": (case_listen_get, 2),
    "listen_upgrade": (case_listen_upgrade, 2),
    "multipart": (case_multipart, 3),
    "http_random": (case_http_random, 2),
    "tcp_garbage": (case_tcp_garbage, 2),
}
"""Every kind of live input: the function that makes and sends one, and its weight."""


def case_rng(seed: int, index: int) -> random.Random:
    """The generator of input ``index`` of the run with ``seed``: any input
    can be rebuilt alone (see :func:`replay`)."""
    return random.Random(f"earshot-fuzz:{seed}:{index}")


def pick_kind(rng: random.Random, kinds: Sequence[str] | None = None) -> str:
    names = list(kinds or CASES)
    return rng.choices(names, weights=[CASES[n][1] for n in names])[0]


async def run_case(
    ctx: Context, seed: int, index: int, kinds: Sequence[str] | None = None
) -> CaseResult:
    """Build and send case ``index`` of the run with ``seed``.

    An exception on the client's side (a bug of this harness, or the server
    doing something no client should have to handle) is recorded as a
    violation rather than stopping the run."""
    rng = case_rng(seed, index)
    kind = pick_kind(rng, kinds)
    tag = f"seed={seed} index={index}"
    try:
        return await asyncio.wait_for(CASES[kind][0](ctx, rng, tag), 60.0)
    except asyncio.TimeoutError:
        return CaseResult(
            kind, 1, "case timeout", [Violation(kind, "no answer in 60 s", None, "", tag, tag)]
        )
    except (ConnectionError, OSError) as exc:
        return CaseResult(kind, 1, f"connection error {type(exc).__name__}")


# -- the well-behaved stream ---------------------------------------------------


@dataclass
class WellBehaved:
    """One well-behaved tone-language stream: what it should get and what it got."""

    expected: list[str]
    got: list[str] = field(default_factory=list)
    close_code: int | None = None
    errors: list[Any] = field(default_factory=list)
    audio_s: float = 0.0
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.got == self.expected and self.close_code == 1000 and not self.errors


async def well_behaved_stream(
    base_url: str,
    script: Sequence[Sequence[str]],
    *,
    speed: float = 1.0,
    chunk_s: float = 0.1,
    started: asyncio.Event | None = None,
) -> WellBehaved:
    """Stream ``script`` as 16 kHz linear16 at ``speed`` times real time (paced
    to the clock, not to the previous send), then CloseStream, reading all the
    while; sets ``started`` once the first Metadata has arrived."""
    from aiohttp import ClientSession, WSMsgType

    audio, truth = make_speech(script, 16000)
    pcm = encode_audio(audio, "linear16")
    result = WellBehaved(expected=truth.texts, audio_s=truth.duration)
    step = int(16000 * chunk_s) * 2
    url = base_url.replace("http://", "ws://") + "/v1/listen?encoding=linear16&sample_rate=16000"
    t0 = time.monotonic()
    async with ClientSession() as http, http.ws_connect(url) as ws:

        async def read() -> None:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                m = json.loads(msg.data)
                if started is not None and m.get("type") == "Metadata":
                    started.set()
                if m.get("type") == "Results" and m.get("is_final"):
                    result.got.append(m["channel"]["alternatives"][0]["transcript"])
                elif m.get("type") == "Error":
                    result.errors.append(m)

        reader = asyncio.create_task(read())
        start = time.monotonic()
        for i, at in enumerate(range(0, len(pcm), step)):
            delay = start + i * chunk_s / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send_bytes(pcm[at : at + step])
        await ws.send_str('{"type": "CloseStream"}')
        await asyncio.wait_for(reader, 60.0)
        result.close_code = ws.close_code
    if started is not None:
        started.set()
    result.wall_s = time.monotonic() - t0
    return result


# -- the run ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedError:
    """A record the server logged at ERROR: who logged it, the exception (if
    any) and where in Earshot's code it was raised; ``protocol`` marks the
    HTTP parser's refusals of malformed requests (aiohttp logs each of those
    with its traceback, even though the client was answered 400)."""

    logger: str
    message: str
    exception: str
    where: str
    protocol: bool
    at: float = 0.0
    """When it was logged (``time.time()``)."""

    def line(self) -> str:
        at = f" at {self.where}" if self.where else ""
        return f"{self.logger}: {self.message[:80]} [{self.exception[:160]}]{at}"


class ServerLogTrap(logging.Handler):
    """Collects what the server logs at ERROR: an exception other than the
    HTTP parser's refusals is an unhandled error inside the server."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[LoggedError] = []

    def emit(self, record: logging.LogRecord) -> None:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        where = ""
        if exc is not None:
            for frame in traceback.extract_tb(exc.__traceback__):
                if (
                    f"{os.sep}service{os.sep}" in frame.filename
                    or f"{os.sep}clients{os.sep}" in frame.filename
                ):
                    where = f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        what = f"{type(exc).__name__}: {exc}".split("\n")[0] if exc is not None else ""
        self.records.append(
            LoggedError(
                record.name,
                record.getMessage().split("\n")[0],
                what,
                where,
                isinstance(exc, HttpProcessingError),
                record.created,
            )
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[ServerLogTrap]:
        root = logging.getLogger()
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)


@dataclass
class FuzzReport:
    """Everything a run saw; :meth:`lines` prints it, :meth:`to_json` saves it."""

    seed: int
    inputs: int = 0
    cases: Counter[str] = field(default_factory=Counter)
    inputs_by_kind: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    well_behaved: list[WellBehaved] = field(default_factory=list)
    spans: list[tuple[int, str, float, float]] = field(default_factory=list)
    """Every case: its index, kind, and when it started and ended (``time.time()``)."""
    health_status: int | None = None
    server_log_errors: list[LoggedError] = field(default_factory=list)
    elapsed_s: float = 0.0

    def groups(self) -> dict[tuple[str, int | None, str], list[Violation]]:
        out: dict[tuple[str, int | None, str], list[Violation]] = {}
        for v in self.violations:
            out.setdefault(v.group(), []).append(v)
        return dict(sorted(out.items(), key=lambda kv: (-len(kv[1]), kv[0][0], str(kv[0][1]))))

    def lines(self, examples: int = 1) -> list[str]:
        cases = sum(self.cases.values())
        out = [
            f"fuzz: {self.inputs} inputs in {cases} cases, {self.elapsed_s:.1f} s, seed {self.seed}"
        ]
        out.append("inputs per kind:")
        for kind in sorted(self.cases):
            out.append(
                f"  {kind:<15} {self.inputs_by_kind[kind]:>7} inputs in {self.cases[kind]:>6} cases"
            )
        out.append("outcomes (status code / close code):")
        for kind in sorted(self.cases):
            row = sorted(
                ((o, n) for (k, o), n in self.outcomes.items() if k == kind), key=lambda x: -x[1]
            )
            out.append(f"  {kind:<15} " + ", ".join(f"{o}: {n}" for o, n in row))
        out.append("well-behaved streams:")
        for i, wb in enumerate(self.well_behaved):
            verdict = "OK" if wb.ok else "MISMATCH"
            out.append(
                f"  #{i}: {verdict} close {wb.close_code}, "
                f"{len(wb.got)}/{len(wb.expected)} finals, "
                f"{wb.audio_s:.1f} s audio in {wb.wall_s:.1f} s, {len(wb.errors)} errors"
            )
            if not wb.ok:
                out.append(f"      expected {wb.expected}")
                out.append(f"      got      {wb.got}")
        out.append(f"health at the end: {self.health_status}")
        protocol = [r for r in self.server_log_errors if r.protocol]
        out.append(
            f"server log errors: {len(self.server_log_errors)} "
            f"({len(protocol)} of them aiohttp's tracebacks for malformed requests it answered 400)"
        )
        for rec, n in Counter(
            r.line() for r in self.server_log_errors if not r.protocol
        ).most_common(10):
            out.append(f"  {n} x {rec}")
        for rec, n in Counter(r.exception.split(":")[0] for r in protocol).most_common(5):
            out.append(f"  {n} x parser refusal {rec}")
        out.append(f"violations: {len(self.violations)} in {len(self.groups())} groups")
        for (rule, status, shape), vs in self.groups().items():
            kinds = ", ".join(f"{k} {n}" for k, n in Counter(v.kind for v in vs).most_common())
            out.append(f"  [{len(vs)}] {rule} (status {status}) {shape}  <- {kinds}")
            for v in sorted(vs, key=lambda v: len(v.reproducer))[:examples]:
                out.append(f"      detail: {v.detail[:200]!r}")
                out.append(f"      input ({v.seed}): {v.reproducer[:400]}")
        return out

    def to_json(self) -> dict[str, Any]:
        def well(wb: WellBehaved) -> dict[str, Any]:
            return {
                "ok": wb.ok,
                "expected": wb.expected,
                "got": wb.got,
                "close_code": wb.close_code,
                "errors": wb.errors,
                "audio_s": round(wb.audio_s, 2),
                "wall_s": round(wb.wall_s, 2),
            }

        def group(key: tuple[str, int | None, str], vs: list[Violation]) -> dict[str, Any]:
            return {
                "rule": key[0],
                "status": key[1],
                "shape": key[2],
                "count": len(vs),
                "kinds": dict(Counter(v.kind for v in vs)),
                "examples": [
                    {"kind": v.kind, "detail": v.detail, "input": v.reproducer, "seed": v.seed}
                    for v in sorted(vs, key=lambda v: len(v.reproducer))[:3]
                ],
            }

        return {
            "seed": self.seed,
            "inputs": self.inputs,
            "elapsed_s": round(self.elapsed_s, 2),
            "cases": dict(self.cases),
            "inputs_by_kind": dict(self.inputs_by_kind),
            "outcomes": {
                k: dict(sorted(((o, n) for (kk, o), n in self.outcomes.items() if kk == k)))
                for k in sorted(self.cases)
            },
            "well_behaved": [well(wb) for wb in self.well_behaved],
            "health_status": self.health_status,
            "server_log_errors": dict(Counter(r.line() for r in self.server_log_errors)),
            "violations": len(self.violations),
            "violation_groups": [group(k, vs) for k, vs in self.groups().items()],
        }


def log_violations(
    records: Sequence[LoggedError], spans: Sequence[tuple[int, str, float, float]], seed: int
) -> list[Violation]:
    """An exception the server logged that is not the HTTP parser refusing a
    malformed request: an unhandled error inside Earshot or aiohttp (a
    request handler that raised, a task that failed). A log record is not
    tied to one input: the reproducer lists the inputs in flight when it was
    logged (``spans``: index, kind, start, end), to replay one by one."""
    out = []
    for r in records:
        if r.protocol or not r.exception:
            continue
        # In flight when it was logged first, then those that had just ended
        # (a handler may log after its client has gone).
        inside = [f"{kind} #{i}" for i, kind, a, b in spans if a <= r.at <= b]
        after = [f"{kind} #{i}" for i, kind, a, b in spans if b < r.at <= b + 0.5]
        suspects = inside + after
        out.append(
            Violation(
                "server_log",
                "unhandled exception logged by the server",
                None,
                f"{r.exception} at {r.where or '?'} ({r.logger}: {r.message})",
                f"one of the inputs in flight: {', '.join(suspects[:12]) or '?'} "
                f"(replay each with bench/fuzz.py --seed {seed} --replay N)",
                f"seed={seed}",
            )
        )
    return out


async def health(base_url: str) -> int:
    from aiohttp import ClientSession

    async with ClientSession() as http, http.get(base_url + "/healthz") as resp:
        await resp.read()
        return resp.status


async def run_fuzz(
    base_url: str,
    *,
    count: int,
    seed: int = 0,
    concurrency: int = 8,
    script: Sequence[Sequence[str]] | None = None,
    repeat_well_behaved: bool = False,
    speed: float = 1.0,
    kinds: Sequence[str] | None = None,
    max_frame_bytes: int = 1_048_576,
    max_upload_bytes: int = 26_214_400,
    progress: Callable[[int], None] | None = None,
) -> FuzzReport:
    """Send ``count`` inputs to the server at ``base_url`` (``http://127.0.0.1:PORT``)
    from ``concurrency`` workers, while the well-behaved stream of ``script``
    runs (again and again until the fuzz is done, with ``repeat_well_behaved``).

    Inputs start once the well-behaved stream has its first Metadata. Returns
    the report; nothing is asserted here."""
    parsed = urllib.parse.urlsplit(base_url)
    target = Target(
        parsed.hostname or "127.0.0.1", parsed.port or 80, max_frame_bytes, max_upload_bytes
    )
    ctx = Context(target, documented_close_codes())
    report = FuzzReport(seed=seed)
    t0 = time.monotonic()
    done = asyncio.Event()
    started = asyncio.Event()

    async def well_behaved_loop() -> None:
        assert script is not None
        n = 0
        while True:
            shifted = [list(u) for u in script[n % len(script) :]] + [
                list(u) for u in script[: n % len(script)]
            ]
            report.well_behaved.append(
                await well_behaved_stream(base_url, shifted, speed=speed, started=started)
            )
            n += 1
            if not repeat_well_behaved or done.is_set():
                return

    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while report.inputs < count:
            index = next_index
            next_index += 1
            began = time.time()
            res = await run_case(ctx, seed, index, kinds)
            report.spans.append((index, res.kind, began, time.time()))
            report.cases[res.kind] += 1
            report.inputs_by_kind[res.kind] += res.inputs
            report.inputs += res.inputs
            report.outcomes[(res.kind, res.outcome)] += 1
            report.violations += res.violations
            if progress is not None:
                progress(report.inputs)

    trap = ServerLogTrap()
    with trap.installed():
        wb_task = asyncio.create_task(well_behaved_loop()) if script else None
        if wb_task is not None:
            await asyncio.wait(
                {wb_task, asyncio.create_task(started.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        done.set()
        if wb_task is not None:
            await wb_task
        report.health_status = await health(base_url)
    report.server_log_errors = trap.records
    report.violations += log_violations(trap.records, report.spans, seed)
    report.elapsed_s = time.monotonic() - t0
    return report


async def replay(
    base_url: str, seed: int, index: int, kinds: Sequence[str] | None = None
) -> CaseResult:
    """Send case ``index`` of the run with ``seed`` again, alone."""
    parsed = urllib.parse.urlsplit(base_url)
    ctx = Context(
        Target(parsed.hostname or "127.0.0.1", parsed.port or 80), documented_close_codes()
    )
    return await run_case(ctx, seed, index, kinds)


def finite_in_unit_range(x: np.ndarray) -> bool:
    """Every value finite and within [-1, 1]."""
    return bool(np.all(np.isfinite(x)) and (x.size == 0 or float(np.max(np.abs(x))) <= 1.0))
