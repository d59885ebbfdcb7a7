"""Hallucination guards: which hypotheses are dropped instead of sent.

Whisper invents text for silence and noise, and sometimes loops on a phrase.
A hypothesis is dropped when the model itself says there is probably no
speech (high no-speech probability together with a low average
log-probability, Whisper's own rule) or when its text repeats itself (high
gzip compression ratio, or one n-gram repeated many times in a row).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, replace

from earshot.core.decoding import Hypothesis, Segment, WordTiming


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


TIMELESS_WORD_S = 0.05
"""A repeated copy whose words last less than this on average (the aligner
piled them onto one instant) was never said."""

_WORD_KEY = re.compile(r"[^\w']+")


def _key(word: str) -> str:
    return _WORD_KEY.sub("", word.lower())


def trim_timeless_repeats(hyp: Hypothesis, max_phrase: int = 8) -> Hypothesis:
    """``hyp`` without a trailing run of copies of the phrase before it that
    the word alignment gives (almost) no time: the loop Whisper falls into
    when it is shown little audio ("Good night, husband. Good night, husband."
    with the second copy aligned to 0 s). A repetition the speaker made takes
    time and is kept. Needs word timings; a hypothesis without them, or
    without such a tail, comes back as it is. The runner applies it to every
    hypothesis it returns."""
    words = [w for seg in hyp.segments for w in seg.words]
    keys = [_key(w.word) for w in words]
    cut = len(words)
    for n in range(1, min(max_phrase, len(words) // 2) + 1):
        end = len(words)
        while end - 2 * n >= 0 and keys[end - n : end] == keys[end - 2 * n : end - n]:
            copy = words[end - n : end]
            if sum(w.end - w.start for w in copy) >= TIMELESS_WORD_S * n:
                break
            end -= n
        cut = min(cut, end)
    if cut == len(words):
        return hyp
    kept: list[Segment] = []
    left = cut
    for seg in hyp.segments:
        if left <= 0:
            break
        mine: tuple[WordTiming, ...] = seg.words[:left]
        left -= len(seg.words)
        if len(mine) < len(seg.words):
            seg = replace(seg, words=mine, text="".join(w.word for w in mine), end=mine[-1].end)
        kept.append(seg)
    text = "".join(w.word for w in words[:cut]).strip()
    return replace(hyp, text=text, segments=tuple(kept))


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
