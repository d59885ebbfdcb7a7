"""The OpenAI audio API's wire shapes: errors, and verbose_json transcriptions.

Clients of ``/v1/audio/*``, ``/v1/models`` and ``/v1/realtime`` are OpenAI SDKs: they read
errors from ``{"error": {"message", "type", "code", "param"}}``, whatever
refused the request (the endpoint itself, authentication, or the framework's
own limits). This module is the one place that shape is built. It also
reads a ``verbose_json`` transcription into a Hypothesis (what the remote
backend gets back from an OpenAI-compatible service).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from earshot.core.decoding import Hypothesis, Segment, Window, WordTiming
from earshot.core.errors import EarshotError
from earshot.core.languages import language_code


def is_openai_path(path: str) -> bool:
    """Paths whose clients expect OpenAI's error envelope."""
    return (
        path.startswith("/v1/audio/")
        or path == "/v1/models"
        or path.startswith("/v1/models/")
        or path == "/v1/realtime"
    )


def error_type(status: int) -> str:
    """OpenAI's ``type`` for an HTTP status (what its SDKs map to exceptions)."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_envelope(
    code: str, message: str, status: int, param: str | None = None
) -> dict[str, Any]:
    """``{"error": {...}}`` for one refusal."""
    return {"error": {"message": message, "type": error_type(status), "code": code, "param": param}}


def error_body(err: EarshotError, *, status: int | None = None) -> dict[str, Any]:
    """The envelope for ``err``; ``param`` is the form field at fault."""
    param = err.details.get("field")
    return error_envelope(
        err.code,
        err.message,
        status or err.http_status,
        param if isinstance(param, str) else None,
    )


# --------------------------------------------------------------- verbose_json


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _num(value: object, default: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if default is None:
            raise TypeError(f"expected a number, got {value!r}")
        return default
    v = float(value)
    if not math.isfinite(v):
        if default is None:
            raise ValueError(f"expected a finite number, got {value!r}")
        return default
    return v


def _word(raw: object, duration: float, fallback_probability: float) -> WordTiming:
    if not isinstance(raw, dict) or not isinstance(raw.get("word"), str):
        raise TypeError(f"a word must be an object with a 'word' string, got {raw!r}")
    start = min(max(0.0, _num(raw.get("start"))), duration)
    end = min(max(start, _num(raw.get("end"))), duration)
    prob = _num(raw.get("probability"), fallback_probability)
    return WordTiming(word=raw["word"], start=start, end=end, probability=prob)


def hypothesis_from_verbose(
    body: Mapping[str, Any], window: Window, info: dict[str, Any]
) -> Hypothesis:
    """Map an OpenAI ``verbose_json`` transcription of ``window`` to a Hypothesis.

    Times are clipped to the window. Tokens are left empty (the remote's
    vocabulary is not known here). ``avg_logprob`` is the segments' mean
    (weighted by their token counts where given), ``no_speech_prob`` the
    first segment's; both 0.0 when the remote gives no segments. A word
    without its own ``probability`` gets ``exp(avg_logprob)`` of its segment,
    or 1.0. Raises TypeError/ValueError for a body of the wrong shape.
    """
    duration = window.duration
    text = body.get("text")
    if not isinstance(text, str):
        raise TypeError("the 'text' field is missing or not a string")
    raw_segments = body.get("segments") or []
    raw_words = body.get("words") or []
    if not isinstance(raw_segments, list) or not isinstance(raw_words, list):
        raise TypeError("'segments' and 'words' must be lists")

    seg_rows: list[tuple[float, float, str, float | None, float | None, int, list[Any]]] = []
    for raw in raw_segments:
        if not isinstance(raw, dict):
            raise TypeError(f"a segment must be an object, got {raw!r}")
        start = min(max(0.0, _num(raw.get("start"))), duration)
        end = min(max(start, _num(raw.get("end"))), duration)
        seg_text = raw.get("text", "")
        if not isinstance(seg_text, str):
            raise TypeError("a segment's 'text' must be a string")
        logprob = raw.get("avg_logprob")
        no_speech = raw.get("no_speech_prob")
        tokens = raw.get("tokens")
        n_tokens = len(tokens) if isinstance(tokens, list) else 0
        inner = raw.get("words")
        if not isinstance(inner, list):
            inner = []
        seg_rows.append(
            (
                start,
                end,
                seg_text.strip(),
                _num(logprob) if logprob is not None else None,
                _num(no_speech) if no_speech is not None else None,
                n_tokens,
                inner,
            )
        )

    def seg_prob(row: tuple[Any, ...] | None) -> float:
        return float(math.exp(min(0.0, row[3]))) if row is not None and row[3] is not None else 1.0

    # Words: OpenAI lists them at the top level; some servers inside segments.
    seg_words: list[list[WordTiming]] = [[] for _ in seg_rows]
    all_words: list[WordTiming] = []
    if raw_words:
        for raw in raw_words:
            w = _word(raw, duration, 1.0)
            mid = (w.start + w.end) / 2
            k = _segment_of(mid, seg_rows)
            if k is not None and not isinstance(raw.get("probability"), (int, float)):
                w = WordTiming(w.word, w.start, w.end, seg_prob(seg_rows[k]))
            if k is not None:
                seg_words[k].append(w)
            all_words.append(w)
    else:
        for k, row in enumerate(seg_rows):
            for raw in row[6]:
                w = _word(raw, duration, seg_prob(row))
                seg_words[k].append(w)
                all_words.append(w)

    segments = tuple(
        Segment(start=row[0], end=row[1], text=row[2], tokens=(), words=tuple(seg_words[k]))
        for k, row in enumerate(seg_rows)
    )
    if not segments and text.strip():
        start = all_words[0].start if all_words else 0.0
        end = all_words[-1].end if all_words else duration
        segments = (Segment(start, end, text.strip(), (), tuple(all_words)),)

    logprobs = [(row[3], max(row[5], 1)) for row in seg_rows if row[3] is not None]
    weight = sum(w for _, w in logprobs)
    avg_logprob = sum(lp * w for lp, w in logprobs) / weight if logprobs else 0.0
    first_no_speech = next((row[4] for row in seg_rows if row[4] is not None), None)
    language = language_code(_str(body.get("language"))) or window.language or ""
    return Hypothesis(
        text=text.strip(),
        tokens=(),
        segments=segments,
        language=language,
        avg_logprob=float(avg_logprob),
        no_speech_prob=float(first_no_speech) if first_no_speech is not None else 0.0,
        words=tuple(all_words),
        info=dict(info),
    )


def _segment_of(t: float, rows: Sequence[tuple[Any, ...]]) -> int | None:
    """Index of the segment holding time ``t`` (or the nearest one)."""
    if not rows:
        return None
    for k, row in enumerate(rows):
        if row[0] <= t <= row[1]:
            return k
    return min(range(len(rows)), key=lambda k: min(abs(t - rows[k][0]), abs(t - rows[k][1])))
