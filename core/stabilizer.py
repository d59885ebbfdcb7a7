"""Agreement between successive interim hypotheses of one utterance.

Words on which two successive hypotheses agree (the same words, in the same
places from the start of the utterance) are marked stable; the rest may still
change. Finals replace interims, so stability is advice for display, not a
promise: a later hypothesis may still revise a word that was stable.
"""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[^\w']+", re.UNICODE)


def normalize_word(word: str) -> str:
    """A word for comparison and for Deepgram's ``word`` field: lower case,
    without surrounding punctuation."""
    return _PUNCT.sub("", word.strip().lower())


class Stabilizer:
    """Tracks the previous hypothesis of one utterance."""

    def __init__(self) -> None:
        self._previous: list[str] = []

    def reset(self) -> None:
        """Forget the previous hypothesis (call when the utterance closes)."""
        self._previous = []

    def update(self, words: list[str]) -> int:
        """Record a new hypothesis; return how many of its leading words are
        stable (agree with the previous hypothesis)."""
        current = [normalize_word(w) for w in words]
        stable = 0
        for a, b in zip(self._previous, current, strict=False):
            if a != b:
                break
            stable += 1
        self._previous = current
        return stable
