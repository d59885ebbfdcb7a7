"""The local Whisper runner: one CTranslate2 model, batched encode and decode.

:class:`WhisperRunner` is the only place in Earshot that calls the model. It
loads a CTranslate2 Whisper model folder once and offers
:meth:`WhisperRunner.transcribe_batch`: N windows of at most 30 s, each with
its own prompt and language, decoded with one batched encoder call and one
batched decoder call.

One CTranslate2 constraint shapes the batching: all prompts of a
``generate`` call must put ``<|startoftranscript|>`` at the same position and
carry the same number of task tokens. Windows whose prompts share a shape (no
previous text, or previous text of equal token length) and a language share
one encoder call and one decoder call; a batch with several prompt shapes
makes one encoder and one decoder call per shape. (Windows without a language
are encoded once together for detection first.) Padding prompts
to a common length would let a window's words depend on which other windows
were batched with it, so Earshot does not do that.

With timestamps on, Whisper may end a window early: after a complete
segment (two timestamps in a row) it stops and expects to be called again from
that point, and a sequence cut by its token budget ends in an unfinished
segment that is thrown away. faster-whisper's ``transcribe`` then decodes the
rest of the audio from the last timestamp; so does the runner (up to
``_MAX_CONTINUATIONS`` times per window, batched like the first round), so
that no word a plain offline decode keeps is lost.

Thread safety: a single runner may be called from one worker thread while
the asyncio event loop runs in another; calls are serialised by a lock.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from earshot.core.decoding import (
    MAX_WINDOW_SECONDS,
    SAMPLE_RATE,
    Capabilities,
    DecodeOptions,
    Hypothesis,
    Segment,
    Window,
    WordTiming,
    check_windows,
    default_decode_workers,
)
from earshot.core.errors import ConfigError, InvalidRequestError
from earshot.core.guards import trim_timeless_repeats
from earshot.models.provenance import ChecksumCache, Provenance, folder_provenance

log = logging.getLogger("earshot.runner")

_PREPEND_PUNCT = "\"'“¿([{-"
_APPEND_PUNCT = "\"'.。,，!！?？:：”)]}、"
# Continuations of a window that ended early (see the module docstring): at most
# this many per window, and none for a remainder shorter than this.
_MAX_CONTINUATIONS = 8
_MIN_CONTINUATION_S = 0.3


def cuda_device_count() -> int:
    """Number of CUDA devices CTranslate2 can use (0 without a GPU or CUDA libraries)."""
    import ctranslate2

    try:
        return int(ctranslate2.get_cuda_device_count())
    except Exception:  # a broken CUDA install reads as no GPU
        return 0


def pick_device(device: str, compute_type: str) -> tuple[str, str]:
    """Resolve ``auto`` settings: CUDA with float16 where a GPU is, else CPU with int8.

    Raises ConfigError for an unknown device or a compute type the device
    does not support.
    """
    import ctranslate2

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {device!r}", field="device")
    if device == "auto":
        device = "cuda" if cuda_device_count() > 0 else "cpu"
    if device == "cuda" and cuda_device_count() == 0:
        raise ConfigError(
            "device cuda was asked for but CTranslate2 sees no CUDA device "
            "(no GPU, or the CUDA 12 libraries cuBLAS/cuDNN are not installed)",
            field="device",
        )
    if compute_type in ("auto", "default"):
        compute_type = "float16" if device == "cuda" else "int8"
    supported = set(ctranslate2.get_supported_compute_types(device))
    if compute_type not in supported:
        raise ConfigError(
            f"compute type {compute_type!r} is not supported on {device}; "
            f"choose one of {', '.join(sorted(supported))}",
            field="compute_type",
        )
    return device, compute_type


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RunnerSettings:
    """How to load the model.

    ``workers`` is how many batches may decode at once (CTranslate2 replicas
    of the model, one thread of the caller's each); 0 chooses
    (:func:`earshot.core.decoding.default_decode_workers`). ``cpu_threads`` is
    the threads of each worker; 0 shares the usable CPUs among the workers
    (CTranslate2's own default, 4 each, oversubscribes a 2-core machine).
    """

    device: str = "auto"
    compute_type: str = "auto"
    cpu_threads: int = 0
    device_index: int = 0
    workers: int = 0

    def resolved_workers(self, device: str) -> int:
        return self.workers or default_decode_workers(device, usable_cpus())

    def threads_per_worker(self, device: str) -> int:
        return self.cpu_threads or max(1, usable_cpus() // self.resolved_workers(device))


@dataclass
class _Prepared:
    index: int
    window: Window
    language: str
    prompt: list[int]
    sot_index: int
    budget: int


class WhisperRunner:
    """A loaded CTranslate2 Whisper model that decodes batches of windows.

    Raises ConfigError at construction when the device or compute type is
    unusable, and ModelNotFoundError-like OSErrors from CTranslate2 when the
    folder does not hold a valid model.
    """

    def __init__(
        self,
        model_path: Path,
        settings: RunnerSettings | None = None,
        *,
        name: str | None = None,
        provenance: Provenance | None = None,
        checksum_cache: ChecksumCache | None = None,
    ) -> None:
        from faster_whisper import WhisperModel

        self.settings = settings or RunnerSettings()
        self.device, self.compute_type = pick_device(
            self.settings.device, self.settings.compute_type
        )
        self.path = Path(model_path)
        self._model = WhisperModel(
            str(self.path),
            device=self.device,
            device_index=self.settings.device_index,
            compute_type=self.compute_type,
            cpu_threads=self.settings.threads_per_worker(self.device),
            num_workers=self.settings.resolved_workers(self.device),
        )
        prov = provenance or folder_provenance(
            self.path, name=name, cache=checksum_cache or ChecksumCache()
        )
        self._provenance = replace(prov, compute_type=self.compute_type, device=self.device)
        self._name = name or self._provenance.name
        # At most `workers` batches decode at once, each in its caller's thread.
        self.workers = self.settings.resolved_workers(self.device)
        self._slots = threading.BoundedSemaphore(self.workers)
        self._count_lock = threading.Lock()
        self._multilingual = bool(self._model.model.is_multilingual)
        self.capabilities = Capabilities(
            device=self.device,
            multilingual=self._multilingual,
            languages=tuple(self._model.supported_languages),
            workers=self.workers,
        )
        self._n_frames = self._model.feature_extractor.nb_max_frames
        self._tokenizers: dict[tuple[str, str], Any] = {}
        self.calls = 0

    # -- Backend interface -------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    def provenance(self) -> dict[str, Any]:
        out = self._provenance.to_dict()
        out["backend"] = "local"
        return out

    def transcribe_batch(
        self, windows: Sequence[Window], options: DecodeOptions
    ) -> list[Hypothesis]:
        """Decode ``windows``; one hypothesis per window, in order.

        Raises InvalidRequestError for an empty window, one longer than 30 s,
        an unknown language or an unknown task.
        """
        if not windows:
            return []
        self._validate(windows, options)
        with self._slots:
            with self._count_lock:
                self.calls += 1
            hyps = self._transcribe_with_continuations(list(windows), options)
        # Whisper's loops show in its own word alignment (copies piled onto one
        # instant): trimmed here, so every path that decodes locally is spared them.
        return [trim_timeless_repeats(h) for h in hyps]

    # -- internals ---------------------------------------------------------
    def _validate(self, windows: Sequence[Window], options: DecodeOptions) -> None:
        check_windows(windows, options)
        languages = set(self.capabilities.languages or ())
        for w in windows:
            if w.language is not None and w.language not in languages:
                raise InvalidRequestError(
                    f"language {w.language!r} is not supported by model {self.name}",
                    field="language",
                )

    def _tokenizer(self, language: str, task: str) -> Any:
        from faster_whisper.tokenizer import Tokenizer

        key = (language, task)
        tok = self._tokenizers.get(key)
        if tok is None:
            tok = Tokenizer(
                self._model.hf_tokenizer,
                self._multilingual,
                task=task,
                language=language if self._multilingual else "en",
            )
            self._tokenizers[key] = tok
        return tok

    def _features(
        self, windows: Sequence[Window], short_context: bool, pad_s: float = 1.0
    ) -> np.ndarray:
        fe = self._model.feature_extractor
        frames = self._n_frames
        if short_context:
            # The longest window and its padding, in whole seconds: 100 mel
            # frames per second.
            longest = max(w.duration for w in windows) + pad_s
            frames = min(self._n_frames, math.ceil(longest) * fe.nb_max_frames // 30)
        feats = []
        for w in windows:
            audio = np.ascontiguousarray(w.audio, dtype=np.float32)
            # The last frame comes from the extractor's own padding; faster-whisper's
            # transcribe leaves it out (content_frames), and so must the runner,
            # or a window ends with a frame of no audio (measured: 1.2 points of
            # WER on base, LibriSpeech).
            mel = fe(audio, chunk_length=int(MAX_WINDOW_SECONDS))[:, :-1]
            # Pad or trim to the frames the encoder is given (30 s, as Whisper
            # was trained, unless short_context asks for less).
            if mel.shape[-1] < frames:
                mel = np.pad(mel, ((0, 0), (0, frames - mel.shape[-1])))
            feats.append(mel[:, :frames])
        return np.ascontiguousarray(np.stack(feats).astype(np.float32))

    def _detect_languages(self, encoder_output: Any, count: int) -> list[str]:
        if not self._multilingual:
            return ["en"] * count
        results = self._model.model.detect_language(encoder_output)
        return [r[0][0][2:-2] for r in results]

    def _prepare(
        self, windows: list[Window], languages: list[str], options: DecodeOptions
    ) -> list[_Prepared]:
        prepared = []
        for i, (w, lang) in enumerate(zip(windows, languages, strict=True)):
            tok = self._tokenizer(lang, options.task)
            previous = tok.encode(" " + w.prompt.strip()) if w.prompt else []
            previous = previous[-options.max_prompt_tokens :] if options.max_prompt_tokens else []
            prompt = self._model.get_prompt(
                tok,
                previous,
                without_timestamps=options.without_timestamps,
                hotwords=w.hotwords,
            )
            sot_index = prompt.index(tok.sot)
            budget = min(options.token_budget(w.duration), self._model.max_length - len(prompt))
            prepared.append(_Prepared(i, w, lang, prompt, sot_index, max(budget, 1)))
        return prepared

    def _transcribe_with_continuations(
        self, windows: list[Window], options: DecodeOptions
    ) -> list[Hypothesis]:
        rounds = self._transcribe_locked(windows, options)
        parts: list[list[tuple[float, Hypothesis]]] = [[(0.0, h)] for h, _ in rounds]
        # (window index, offset in seconds of the rest still to decode)
        todo = [(i, at) for i, (_, at) in enumerate(rounds) if at is not None]

        def left(i: int) -> int:
            # The window's token budget covers its continuations too.
            used = sum(len(h.tokens) for _, h in parts[i])
            return options.token_budget(windows[i].duration) - used

        for _ in range(_MAX_CONTINUATIONS):
            todo = [
                (i, at)
                for i, at in todo
                if windows[i].duration - at >= _MIN_CONTINUATION_S and left(i) > 0
            ]
            if not todo:
                break
            rest = []
            for i, at in todo:
                w = windows[i]
                said = " ".join(h.text for _, h in parts[i] if h.text)
                prompt = " ".join(t for t in (w.prompt, said) if t) or None
                rest.append(
                    replace(
                        w,
                        audio=w.audio[round(at * SAMPLE_RATE) :],
                        prompt=prompt,
                        language=parts[i][0][1].language,
                    )
                )
            again = self._transcribe_locked(rest, options, budgets=[left(i) for i, _ in todo])
            nxt = []
            for (i, at), (hyp, resume) in zip(todo, again, strict=True):
                parts[i].append((at, hyp))
                if resume is not None:
                    nxt.append((i, at + resume))
            todo = nxt
        return [_join(p) for p in parts]

    def _transcribe_locked(
        self, windows: list[Window], options: DecodeOptions, budgets: list[int] | None = None
    ) -> list[tuple[Hypothesis, float | None]]:
        """One decode of every window: each hypothesis with, where the model
        stopped before the end of its audio, the second to resume from.
        ``budgets`` caps each window's new tokens below its own budget."""
        features = self._features(windows, options.short_context, options.short_context_pad_s)
        languages = [w.language for w in windows]
        encoder_output = None
        if any(lang is None for lang in languages):
            # Detection needs the encoder output of the windows first.
            encoder_output = self._model.encode(features)
            detected = self._detect_languages(encoder_output, len(windows))
            languages = [lang or d for lang, d in zip(languages, detected, strict=True)]
        prepared = self._prepare(windows, [lang or "en" for lang in languages], options)
        for p, cap in zip(prepared, budgets or (), strict=False):
            p.budget = max(1, min(p.budget, cap))

        groups: dict[tuple[int, int, str], list[_Prepared]] = {}
        for p in prepared:
            groups.setdefault((p.sot_index, len(p.prompt), p.language), []).append(p)

        out: list[tuple[Hypothesis, float | None] | None] = [None] * len(windows)
        for group in groups.values():
            idx = [p.index for p in group]
            if len(groups) == 1 and encoder_output is not None:
                enc = encoder_output  # already computed for language detection
            else:
                enc = self._model.encode(features[idx])
            for p, hyp in zip(group, self._decode_group(enc, group, options), strict=True):
                out[p.index] = hyp
        return [h for h in out if h is not None]

    def _decode_group(
        self, encoder_output: Any, group: list[_Prepared], options: DecodeOptions
    ) -> list[tuple[Hypothesis, float | None]]:
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self._model
        tok = self._tokenizer(group[0].language, options.task)
        # CTranslate2 generates at most min(max_length // 2, max_length -
        # prompt length + 1) new tokens: ask for enough room, then cut each
        # window to its own budget below.
        budget = max(p.budget for p in group)
        max_length = min(
            model.max_length, max(2 * budget, max(len(p.prompt) for p in group) + budget)
        )
        suppress = get_suppressed_tokens(tok, list(options.suppress_tokens))
        sampling = options.temperature > 0 and options.beam_size == 1
        results = model.model.generate(
            encoder_output,
            [p.prompt for p in group],
            beam_size=options.beam_size,
            patience=options.patience,
            length_penalty=options.length_penalty,
            max_length=max_length,
            suppress_blank=options.suppress_blank,
            suppress_tokens=suppress,
            return_scores=True,
            return_no_speech_prob=True,
            sampling_temperature=options.temperature if sampling else 1.0,
            sampling_topk=0 if sampling else 1,
            repetition_penalty=options.repetition_penalty,
            no_repeat_ngram_size=options.no_repeat_ngram_size,
        )
        seg_dicts: list[list[dict[str, Any]]] = []
        scored: list[tuple[list[int], float, float]] = []
        resume: list[float | None] = []
        for p, res in zip(group, results, strict=True):
            tokens = list(res.sequences_ids[0])[: p.budget]
            seq_len = len(res.sequences_ids[0])
            cum = res.scores[0] * (seq_len**options.length_penalty)
            scored.append((tokens, float(cum / (seq_len + 1)), float(res.no_speech_prob)))
            segs, resume_at = self._segments(tok, tokens, p.window.duration)
            seg_dicts.append(segs)
            resume.append(resume_at)

        if options.word_timestamps:
            frames = [
                min(self._n_frames, math.ceil(p.window.duration * model.frames_per_second))
                for p in group
            ]
            model.add_word_timestamps(
                seg_dicts, tok, encoder_output, frames, _PREPEND_PUNCT, _APPEND_PUNCT, 0.0
            )

        hyps = []
        for p, (tokens, avg_logprob, no_speech), segs, resume_at in zip(
            group, scored, seg_dicts, resume, strict=True
        ):
            segments = tuple(self._to_segment(tok, s, p.window.duration) for s in segs)
            words = tuple(wd for s in segments for wd in s.words)
            if resume_at is not None:
                # The unfinished last segment is decoded again from resume_at.
                tokens = [t for s in segs for t in s["tokens"]]
            text_tokens = [t for t in tokens if t < tok.eot]
            hyp = Hypothesis(
                text=tok.decode(text_tokens).strip(),
                tokens=tuple(tokens),
                segments=segments,
                language=p.language,
                avg_logprob=avg_logprob,
                no_speech_prob=no_speech,
                words=words,
            )
            hyps.append((hyp, resume_at))
        return hyps

    def _segments(
        self, tok: Any, tokens: list[int], duration: float
    ) -> tuple[list[dict[str, Any]], float | None]:
        """The segments of a timestamped sequence, and the second from which
        the rest of the window must be decoded again (None: nothing is left)."""
        model = self._model
        size = min(self._n_frames, math.ceil(duration * model.frames_per_second))
        subsegments, seek, _ = model._split_segments_by_timestamps(
            tokenizer=tok,
            tokens=tokens,
            time_offset=0.0,
            segment_size=size,
            segment_duration=duration,
            seek=0,
        )
        segs: list[dict[str, Any]] = [
            s for s in subsegments if any(t < tok.eot for t in s["tokens"])
        ]
        resume_at = seek / model.frames_per_second if 0 < seek < size else None
        return segs or [dict(seek=0, start=0.0, end=duration, tokens=[])], resume_at

    @staticmethod
    def _to_segment(tok: Any, seg: dict[str, Any], duration: float) -> Segment:
        text_tokens = [t for t in seg["tokens"] if t < tok.eot]
        words = tuple(
            WordTiming(
                word=str(w["word"]),
                start=float(w["start"]),
                end=float(w["end"]),
                probability=float(w["probability"]),
            )
            for w in seg.get("words") or ()
        )
        return Segment(
            start=float(max(0.0, seg["start"])),
            end=float(min(duration, seg["end"])),
            text=tok.decode(text_tokens).strip(),
            tokens=tuple(int(t) for t in seg["tokens"]),
            words=words,
        )


def _join(parts: list[tuple[float, Hypothesis]]) -> Hypothesis:
    """One hypothesis from a window's first decode and its continuations
    (each with its offset in seconds from the window's start)."""
    if len(parts) == 1:
        return parts[0][1]
    first = parts[0][1]
    segments = tuple(
        replace(
            s,
            start=s.start + at,
            end=s.end + at,
            words=tuple(replace(w, start=w.start + at, end=w.end + at) for w in s.words),
        )
        for at, h in parts
        for s in h.segments
        if s.text
    )
    n_tokens = [max(len(h.tokens), 1) for _, h in parts]
    avg_logprob = sum(h.avg_logprob * n for (_, h), n in zip(parts, n_tokens, strict=True))
    return Hypothesis(
        text=" ".join(h.text for _, h in parts if h.text),
        tokens=tuple(t for _, h in parts for t in h.tokens),
        segments=segments,
        language=first.language,
        avg_logprob=avg_logprob / sum(n_tokens),
        no_speech_prob=first.no_speech_prob,
        words=tuple(w for s in segments for w in s.words),
    )


__all__ = ["SAMPLE_RATE", "RunnerSettings", "WhisperRunner", "pick_device"]
