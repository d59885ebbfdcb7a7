"""Hallucination guards: which hypotheses are dropped instead of sent.

Whisper invents text for silence and noise, and sometimes loops on a phrase.
A hypothesis is dropped when the model itself says there is probably no
speech (high no-speech probability together with a low average
log-probability, Whisper's own rule) or when its text repeats itself (high
gzip compression ratio, or one n-gram repeated many times in a row).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from earshot.core.decoding import Hypothesis


@dataclass(frozen=True)
class GuardSettings:
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    max_ngram_repeats: int = 4


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def longest_repeat_run(words: list[str], max_n: int = 4) -> int:
    """The largest number of back-to-back repetitions of any n-gram (n <= max_n)."""
    best = 1
    for n in range(1, max_n + 1):
        i = 0
        while i + 2 * n <= len(words):
            runs = 1
            j = i + n
            while j + n <= len(words) and words[j : j + n] == words[i : i + n]:
                runs += 1
                j += n
            best = max(best, runs)
            i += 1 if runs == 1 else n * (runs - 1)
    return best


def drop_reason(hyp: Hypothesis, settings: GuardSettings | None = None) -> str | None:
    """Why ``hyp`` must not be sent (``no_speech``, ``repetition``), or None to keep it."""
    s = settings or GuardSettings()
    if not hyp.text.strip():
        return "empty"
    if hyp.no_speech_prob > s.no_speech_threshold and hyp.avg_logprob < s.logprob_threshold:
        return "no_speech"
    if compression_ratio(hyp.text) > s.compression_ratio_threshold:
        return "repetition"
    if longest_repeat_run(hyp.text.lower().split()) > s.max_ngram_repeats:
        return "repetition"
    return None
