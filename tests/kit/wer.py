"""Word error rate for the accuracy tests and ``bench/accuracy.py``.

Texts are normalised with Whisper's English normaliser (lower case, no
punctuation, spelled-out numbers and British spellings mapped to one form) so
that ``Mr. Smith, 10`` and ``MISTER SMITH TEN`` count as the same words, and
the WER of a set of files is the corpus WER: all word errors over all
reference words, so long files weigh more than short ones (not a mean of
per-file WERs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jiwer


@functools.cache
def _english() -> Callable[[str], str]:
    from whisper_normalizer.english import EnglishTextNormalizer

    normalizer: Callable[[str], str] = EnglishTextNormalizer()
    return normalizer


def normalize(text: str) -> str:
    """``text`` as Whisper's English normaliser writes it, with single spaces.

    Tokens without a letter or digit are dropped: the normaliser leaves a
    lone ``.`` of an ellipsis (``therefore...`` becomes ``therefore .``),
    which is no word."""
    words = str(_english()(text)).split()
    return " ".join(w for w in words if any(ch.isalnum() for ch in w))


@dataclass(frozen=True)
class Score:
    """Word errors of a set of files against their references."""

    errors: int
    """Substitutions + deletions + insertions."""
    words: int
    """Words in the (normalised) references."""
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def wer(self) -> float:
        """Corpus word error rate, 0.0 to 1.0 (or more, with many insertions)."""
        return self.errors / self.words if self.words else 0.0

    def __add__(self, other: Score) -> Score:
        return Score(
            self.errors + other.errors,
            self.words + other.words,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )


def score(reference: str, hypothesis: str) -> Score:
    """Word errors of one hypothesis against one reference (both normalised here).

    A reference that normalises to nothing counts every hypothesis word as an
    insertion.
    """
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        n = len(hyp.split())
        return Score(n, 0, insertions=n)
    out = jiwer.process_words(ref, hyp)
    subs, dels, ins = out.substitutions, out.deletions, out.insertions
    return Score(subs + dels + ins, subs + dels + out.hits, subs, dels, ins)


def corpus_score(references: Sequence[str], hypotheses: Sequence[str]) -> Score:
    """The summed :func:`score` of pairs of references and hypotheses.

    Raises ValueError when the two sequences differ in length.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    total = Score(0, 0)
    for ref, hyp in zip(references, hypotheses, strict=True):
        total += score(ref, hyp)
    return total


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate (total errors / total reference words), 0.0 to 1.0."""
    return corpus_score(references, hypotheses).wer


def ends_early(reference: str, hypothesis: str) -> bool:
    """True when the transcript is cut short: one of the last three normalised
    reference words is missing from the hypothesis (a deletion in the word
    alignment), as when a final was lost or truncated at the end of the audio.

    Another word in its place (``tale`` for ``tail``, ``there for`` for
    ``therefore``) is a substitution, counted in the WER, not an early end;
    "not among the last five words", the first form of this check, flagged
    those too.
    """
    ref, hyp = normalize(reference), normalize(hypothesis)
    n = len(ref.split())
    if n == 0:
        return False
    if not hyp:
        return True
    out = jiwer.process_words(ref, hyp)
    tail = range(max(0, n - 3), n)
    return any(
        chunk.type == "delete"
        and chunk.ref_start_idx < tail.stop
        and chunk.ref_end_idx > tail.start
        for chunk in out.alignments[0]
    )
