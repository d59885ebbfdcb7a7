"""One live stream's state machine (pure: bytes and results in, requests and events out).

A :class:`StreamSession` takes the audio of one websocket stream, decodes it
to 16 kHz per channel, follows voice activity per channel, and decides what
must be decoded: an interim window of the open utterance every interim step,
and one final window per closed utterance. The shell submits those
:class:`DecodeRequest` objects to the shared scheduler and hands the results
back with :meth:`StreamSession.on_result`, which returns the events to send.

Guarantees, each covered by tests:

* no decode of audio without voice: requests only cover open or closed
  utterances;
* utterances never overlap, so every second of speech received before a
  normal close is in exactly one final, and finals are emitted in order and
  never revised;
* an interim that arrives after its utterance closed is dropped;
* a stream's lag is tracked: how far its transcript is behind the live
  audio. A warning is raised past one threshold and :class:`LaggingError`
  past the limit.

Lag is measured on a wall clock (injected; without one, the stream's own audio
clock stands in, as for a client that sends in real time). An utterance's
final is *due* when the audio of its end would have arrived from a live
client: ``t0 + end`` for a stream whose first audio came at ``t0``, or later
when the client itself sent that audio later than real time. The lag is how
long ago the oldest final still missing fell due. A client that sends faster
than real time (a recording) is therefore never lagging because of its own
speed, only when the server decodes it more slowly than real time; a live
client that falls behind is lagging exactly as far as it is behind. A fast
client is held back instead (:attr:`StreamSession.saturated`: the shell stops
reading its frames while it has too many finals in flight).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from earshot.core.audio import FloatArray, RingBuffer, StreamAudio
from earshot.core.decoding import SAMPLE_RATE, Hypothesis, Window
from earshot.core.errors import EarshotError, LaggingError, PartialFrameError
from earshot.core.guards import GuardSettings, drop_reason
from earshot.core.protocol import (
    Event,
    SpeechStartedEvent,
    StreamParams,
    TranscriptEvent,
    UtteranceEndEvent,
    WarningEvent,
    Word,
)
from earshot.core.stabilizer import Stabilizer, normalize_word
from earshot.core.voice import FrameModel, SpeechEnd, SpeechStart, StreamingVad, VadSettings

FINAL = "final"
INTERIM = "interim"


@dataclass(frozen=True)
class SessionSettings:
    """Streaming policy. Every limit is named; see docs/protocol.md."""

    interim_step_s: float = 0.75
    min_interim_s: float = 0.4
    max_utterance_s: float = 20.0
    min_final_s: float = 0.1
    finalize_search_s: float = 1.0
    prompt_chars: int = 240
    lag_warning_s: float = 5.0
    lag_limit_s: float = 30.0
    # An interim at least this long fixes the language of the utterance's
    # later interims (when the stream detects its language).
    language_lock_s: float = 1.5
    # Finals in flight per channel past which the shell stops reading the
    # stream's frames (back-pressure on a client faster than real time).
    max_finals_in_flight: int = 2
    buffer_seconds: float = 40.0
    vad_threshold: float = 0.5
    min_speech_ms: int = 250
    speech_pad_ms: int = 200
    guards: GuardSettings = field(default_factory=GuardSettings)

    def vad_settings(self, endpointing_ms: int | None) -> VadSettings:
        # Endpointing off: only Finalize, the maximum length or the end of the
        # stream close an utterance; the detector's longest silence stands in.
        silence = endpointing_ms if endpointing_ms is not None else 10_000
        return VadSettings(
            threshold=self.vad_threshold,
            min_speech_ms=self.min_speech_ms,
            min_silence_ms=silence,
            speech_pad_ms=self.speech_pad_ms,
            max_speech_s=self.max_utterance_s,
            history_s=max(30.0, self.max_utterance_s + 5.0),
        )


@dataclass(frozen=True)
class DecodeRequest:
    """A window the session wants decoded. ``start``/``end`` are samples at 16 kHz
    on the stream clock."""

    kind: str
    channel: int
    utterance: int
    start: int
    end: int
    window: Window
    speech_final: bool = False
    from_finalize: bool = False

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE


@dataclass
class Output:
    """What one input produced: requests to submit and events to send, in order."""

    requests: list[DecodeRequest] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def extend(self, other: Output) -> None:
        self.requests.extend(other.requests)
        self.events.extend(other.events)


@dataclass(frozen=True)
class ClosedUtterance:
    """An utterance that closed (reported with ``report_closes``): where its
    audio ends on the stream clock (seconds), and why it closed."""

    channel: int
    utterance: int
    end: float
    from_finalize: bool = False
    discarded: bool = False


@dataclass
class _Channel:
    index: int
    vad: StreamingVad
    buffer: RingBuffer
    stabilizer: Stabilizer = field(default_factory=Stabilizer)
    open_start: int | None = None
    utterance: int = -1
    last_end: int = 0
    last_interim_end: int = 0
    interim_in_flight: bool = False
    interims_sent: set[int] = field(default_factory=set)
    pending: dict[int, DecodeRequest] = field(default_factory=dict)
    ready: dict[int, tuple[DecodeRequest, Hypothesis | None]] = field(default_factory=dict)
    next_emit: int = 0
    previous_text: str = ""
    last_word_end: float = 0.0
    # When each closed utterance's final fell due (wall clock), for the lag.
    due: dict[int, float] = field(default_factory=dict)
    # With language detection, the language the open utterance's interims
    # keep once one long enough has detected it (interims stay in one
    # language; the final detects again over the whole utterance).
    interim_language: str | None = None


def _confidence(avg_logprob: float) -> float:
    return float(min(1.0, max(0.0, math.exp(avg_logprob)))) if math.isfinite(avg_logprob) else 0.0


def hypothesis_words(hyp: Hypothesis, offset: float, duration: float) -> tuple[Word, ...]:
    """Words of a hypothesis on the stream clock. Without word timings from
    the backend, the words are spread evenly over the window's segments."""
    if hyp.words:
        return tuple(
            Word(
                word=normalize_word(w.word),
                start=offset + w.start,
                end=offset + w.end,
                confidence=w.probability,
                punctuated_word=w.word.strip(),
            )
            for w in hyp.words
            if w.word.strip()
        )
    tokens = hyp.text.split()
    if not tokens:
        return ()
    start = min((s.start for s in hyp.segments), default=0.0)
    end = max((s.end for s in hyp.segments), default=duration)
    if end <= start:
        start, end = 0.0, duration
    step = (end - start) / len(tokens)
    conf = _confidence(hyp.avg_logprob)
    return tuple(
        Word(normalize_word(t), offset + start + i * step, offset + start + (i + 1) * step, conf, t)
        for i, t in enumerate(tokens)
    )


class StreamSession:
    """The state of one stream. Not thread-safe; one shell task drives it.

    Raises the audio format errors of :mod:`earshot.core.audio` from :meth:`push`
    only for input that can never be valid (nothing is lost: earlier audio
    is still finalised by :meth:`finish`).
    """

    def __init__(
        self,
        params: StreamParams,
        settings: SessionSettings | None = None,
        vad_model: FrameModel | None = None,
        *,
        vad_factory: Callable[[VadSettings], StreamingVad] | None = None,
        clock: Callable[[], float] | None = None,
        report_closes: bool = False,
    ) -> None:
        """``clock`` is a monotonic wall clock in seconds (the shell's event
        loop time); None measures lag on the stream's own audio clock.

        ``report_closes`` (for protocols that announce the end of each
        utterance, such as OpenAI Realtime): every utterance that closes is
        recorded for :meth:`take_closed`, and every one gets a final
        :class:`TranscriptEvent`, with an empty transcript where nothing was
        kept (without it, such a final is only sent when interims were)."""
        self.params = params
        self.report_closes = report_closes
        self._closed: list[ClosedUtterance] = []
        self._clock = clock
        self._t0: float | None = None
        self.settings = settings or SessionSettings()
        fmt = params.audio
        self._audio = StreamAudio(
            fmt,
            mix_down=not params.multichannel,
            buffer_seconds=self.settings.buffer_seconds,
        )
        n = params.decoded_channels
        vad_settings = self.settings.vad_settings(params.endpointing_ms)

        if vad_factory is None and vad_model is None:
            raise TypeError("StreamSession needs a vad_model or a vad_factory")

        def make_vad() -> StreamingVad:
            if vad_factory is not None:
                return vad_factory(vad_settings)
            assert vad_model is not None
            return StreamingVad(vad_model, vad_settings)

        self._channels = [_Channel(i, make_vad(), self._audio.buffers[i]) for i in range(n)]
        self._finished = False
        self._lag_warned = False
        self.bytes_received = 0

    # -- inputs -------------------------------------------------------------

    @property
    def channels(self) -> int:
        return len(self._channels)

    @property
    def received_seconds(self) -> float:
        """Seconds of 16 kHz audio per channel received so far."""
        return self._channels[0].buffer.total / SAMPLE_RATE

    @property
    def pending_finals(self) -> int:
        """Finals requested or decoded but not yet emitted."""
        return sum(len(c.pending) + len(c.ready) for c in self._channels)

    @property
    def saturated(self) -> bool:
        """True while the stream has as many finals in flight as it may have:
        read no more of its audio until one is emitted."""
        return self.pending_finals >= self.settings.max_finals_in_flight * len(self._channels)

    @property
    def open_utterances(self) -> int:
        return sum(1 for c in self._channels if c.open_start is not None)

    def push(
        self, payload: bytes, *, interims_allowed: Callable[[int], bool] | None = None
    ) -> Output:
        """Add one binary frame of audio; return the requests and events it causes.

        ``interims_allowed(channel)`` says whether an interim may be requested
        now (the scheduler's load gate); None allows them."""
        self.bytes_received += len(payload)
        if self._t0 is None:
            self._t0 = self._clock() if self._clock is not None else 0.0
        return self._ingest(self._audio.push(payload), interims_allowed)

    def finalize(self, *, at_end: bool = False) -> Output:
        """Close every open utterance now (the client's ``Finalize``).

        Where speech is still under way, the cut goes at the quietest point of
        the last ``finalize_search_s`` seconds, so no word is split; speech
        after the cut opens the next utterance. ``at_end``: the cut goes at
        the end of the audio received, whatever it holds (OpenAI's commit:
        the client decides where its audio ends).
        """
        out = Output()
        for ch in self._channels:
            if ch.open_start is None:
                continue
            now = ch.buffer.total
            cut = now
            if ch.vad.is_speech and not at_end:
                lo = max(
                    ch.open_start / SAMPLE_RATE, now / SAMPLE_RATE - self.settings.finalize_search_s
                )
                try:
                    cut = round(ch.vad.quietest_point(lo, now / SAMPLE_RATE) * SAMPLE_RATE)
                except ValueError:
                    cut = now
                cut = min(max(cut, ch.open_start), now)
            out.extend(self._close(ch, cut, speech_final=False, from_finalize=True))
            if ch.vad.is_speech:
                self._open(ch, cut, out, announce=False)
        return out

    def discard(self) -> Output:
        """Drop every open utterance without decoding it (OpenAI's
        ``input_audio_buffer.clear``). Its final, if any is sent, is empty
        (``report_closes``); speech still under way opens the next utterance
        at the current end of the audio (announced as a new start)."""
        out = Output()
        for ch in self._channels:
            if ch.open_start is None:
                continue
            out.extend(self._close(ch, ch.buffer.total, speech_final=False, decode=False))
            if ch.vad.is_speech:
                self._open(ch, ch.buffer.total, out, announce=True)
        return out

    def take_closed(self) -> list[ClosedUtterance]:
        """The utterances closed since the last call, in order (``report_closes``)."""
        closed, self._closed = self._closed, []
        return closed

    def finish(self) -> tuple[Output, EarshotError | None]:
        """End of stream: flush decoder, resampler and detectors, close every
        utterance. Returns the output and, if the stream ended with a partial
        audio frame, that error (the whole frames before it are kept)."""
        out = Output()
        if self._finished:
            return out, None
        self._finished = True
        error: EarshotError | None = None
        try:
            tail = self._audio.finish()
        except PartialFrameError as exc:
            error = exc
            tail = exc.tail
        out.extend(self._ingest(tail, lambda _ch: False))
        for ch in self._channels:
            self._apply_vad_events(ch, ch.vad.flush(), out)
            if ch.open_start is not None:
                out.extend(self._close(ch, ch.buffer.total, speech_final=True))
        return out, error

    def on_result(
        self,
        request: DecodeRequest,
        hypothesis: Hypothesis | None,
        error: BaseException | None = None,
    ) -> list[Event]:
        """Hand back the outcome of a request: a hypothesis, None when the
        scheduler superseded it, or the error that failed it."""
        ch = self._channels[request.channel]
        if request.kind == INTERIM:
            ch.interim_in_flight = False
            if (
                hypothesis is None
                or error is not None
                or ch.open_start is None
                or request.utterance != ch.utterance
                or drop_reason(hypothesis, self.settings.guards) is not None
            ):
                return []
            if (
                self.params.language is None
                and ch.interim_language is None
                and request.window.duration >= self.settings.language_lock_s
            ):
                ch.interim_language = hypothesis.language or None
            words = hypothesis_words(hypothesis, request.start_s, request.window.duration)
            stable = ch.stabilizer.update([w.punctuated_word for w in words])
            ch.interims_sent.add(request.utterance)
            return [self._transcript(request, hypothesis, words, is_final=False, stable=stable)]

        events: list[Event] = []
        if error is not None:
            events.append(
                WarningEvent(
                    "decode_failed",
                    f"the final of utterance {request.utterance} on channel "
                    f"{request.channel} could not be decoded: {error}",
                    {"channel": request.channel, "start": round(request.start_s, 3)},
                )
            )
        ch.pending.pop(request.utterance, None)
        ch.ready[request.utterance] = (request, hypothesis if error is None else None)
        events.extend(self._emit_ready(ch))
        return events

    # -- lag ----------------------------------------------------------------

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return (self._t0 or 0.0) + self.received_seconds

    def lag_seconds(self) -> float:
        """How long ago the oldest final still missing fell due (module docstring)."""
        due = [d for c in self._channels for d in c.due.values()]
        return max(0.0, self._now() - min(due)) if due else 0.0

    def check_lag(self) -> list[Event]:
        """A warning when the lag first passes ``lag_warning_s``; raises
        LaggingError past ``lag_limit_s``."""
        lag = self.lag_seconds()
        s = self.settings
        if lag > s.lag_limit_s:
            raise LaggingError(
                f"the stream is {lag:.1f} s behind real time; the limit is {s.lag_limit_s:g} s",
                lag_s=round(lag, 2),
                limit_s=s.lag_limit_s,
            )
        if lag > s.lag_warning_s and not self._lag_warned:
            self._lag_warned = True
            return [
                WarningEvent(
                    "lagging",
                    f"transcripts are {lag:.1f} s behind the audio (warning at "
                    f"{s.lag_warning_s:g} s, the stream is closed at {s.lag_limit_s:g} s)",
                    {"lag_s": round(lag, 2), "limit_s": s.lag_limit_s},
                )
            ]
        if lag < s.lag_warning_s / 2:
            self._lag_warned = False
        return []

    # -- internals ----------------------------------------------------------

    def _ingest(
        self, samples: list[FloatArray], interims_allowed: Callable[[int], bool] | None
    ) -> Output:
        """Feed each channel's new 16 kHz samples (already in its buffer) to its
        voice detector and request what falls due."""
        out = Output()
        for ch in self._channels:
            chunk = samples[ch.index]
            if not len(chunk):
                continue
            self._apply_vad_events(ch, ch.vad.feed(chunk), out)
            if self.params.interim_results and (
                interims_allowed is None or interims_allowed(ch.index)
            ):
                req = self._maybe_interim(ch)
                if req is not None:
                    out.requests.append(req)
        return out

    def _apply_vad_events(self, ch: _Channel, events: list[Any], out: Output) -> None:
        for ev in events:
            t = round(ev.t * SAMPLE_RATE)
            if isinstance(ev, SpeechStart):
                if ch.open_start is None:
                    self._open(ch, t, out, announce=not ev.forced)
            elif isinstance(ev, SpeechEnd) and ch.open_start is not None:
                out.extend(self._close(ch, t, speech_final=not ev.forced))

    def _open(self, ch: _Channel, at: int, out: Output, *, announce: bool) -> None:
        ch.open_start = max(at, ch.last_end, ch.buffer.oldest)
        ch.utterance += 1
        ch.last_interim_end = ch.open_start
        ch.interim_language = None
        ch.stabilizer.reset()
        if announce and self.params.vad_events:
            out.events.append(
                SpeechStartedEvent(
                    ch.index, self.channels, ch.open_start / SAMPLE_RATE, ch.utterance
                )
            )

    def _window(self, ch: _Channel, start: int, end: int, *, final: bool) -> Window:
        prompt = None
        if final and self.settings.prompt_chars > 0 and ch.previous_text:
            tail = ch.previous_text[-self.settings.prompt_chars :]
            # Start the prompt at a word boundary.
            if len(ch.previous_text) > self.settings.prompt_chars and " " in tail:
                tail = tail.split(" ", 1)[1]
            prompt = tail
        return Window(
            audio=ch.buffer.read(start, end),
            prompt=prompt,
            language=self.params.language or (None if final else ch.interim_language),
            hotwords=" ".join(self.params.keyterms) or None,
        )

    def _maybe_interim(self, ch: _Channel) -> DecodeRequest | None:
        # In a pause the utterance may be about to close: an interim now would
        # most likely be thrown away, and would hold up the final.
        if ch.open_start is None or ch.interim_in_flight or ch.vad.in_pause:
            return None
        now = ch.buffer.total
        s = self.settings
        if (now - ch.open_start) < s.min_interim_s * SAMPLE_RATE:
            return None
        if (now - ch.last_interim_end) < s.interim_step_s * SAMPLE_RATE:
            return None
        ch.interim_in_flight = True
        ch.last_interim_end = now
        return DecodeRequest(
            INTERIM,
            ch.index,
            ch.utterance,
            ch.open_start,
            now,
            self._window(ch, ch.open_start, now, final=False),
        )

    def _close(
        self,
        ch: _Channel,
        at: int,
        *,
        speech_final: bool,
        from_finalize: bool = False,
        decode: bool = True,
    ) -> Output:
        out = Output()
        assert ch.open_start is not None
        start = ch.open_start
        end = min(max(at, start), ch.buffer.total)
        ch.open_start = None
        ch.last_end = end
        utt = ch.utterance
        if self.report_closes:
            self._closed.append(
                ClosedUtterance(ch.index, utt, end / SAMPLE_RATE, from_finalize, not decode)
            )
        if not decode or end - start < self.settings.min_final_s * SAMPLE_RATE:
            # Too short to hold a word: nothing to decode, but keep the order.
            window = Window(audio=np.zeros(0, np.float32))
            req = DecodeRequest(
                FINAL, ch.index, utt, start, end, window, speech_final, from_finalize
            )
            ch.ready[utt] = (req, None)
            out.events.extend(self._emit_ready(ch))
            return out
        req = DecodeRequest(
            FINAL,
            ch.index,
            utt,
            start,
            end,
            self._window(ch, start, end, final=True),
            speech_final=speech_final,
            from_finalize=from_finalize,
        )
        ch.pending[utt] = req
        # Live, the end's audio would have arrived at t0 + end; this client
        # sent it (received - end) seconds of audio before now.
        t0, now = self._t0 or 0.0, self._now()
        ch.due[utt] = max(t0 + req.end_s, now - (self.received_seconds - req.end_s))
        out.requests.append(req)
        return out

    def _emit_ready(self, ch: _Channel) -> list[Event]:
        events: list[Event] = []
        while ch.next_emit in ch.ready:
            req, hyp = ch.ready.pop(ch.next_emit)
            ch.due.pop(ch.next_emit, None)
            ch.next_emit += 1
            keep = hyp is not None and drop_reason(hyp, self.settings.guards) is None
            if keep:
                assert hyp is not None
                words = hypothesis_words(hyp, req.start_s, req.window.duration)
                events.append(self._transcript(req, hyp, words, is_final=True, stable=len(words)))
                ch.previous_text = (ch.previous_text + " " + hyp.text.strip()).strip()[-2000:]
                if words:
                    ch.last_word_end = words[-1].end
            elif req.utterance in ch.interims_sent or self.report_closes:
                # The client saw interims for this utterance: close it visibly.
                empty = Hypothesis("", (), (), "", 0.0, 1.0)
                events.append(self._transcript(req, empty, (), is_final=True, stable=0))
            ch.interims_sent.discard(req.utterance)
            if req.speech_final and self.params.utterance_end_ms is not None and keep:
                events.append(UtteranceEndEvent(ch.index, self.channels, ch.last_word_end))
        return events

    def _transcript(
        self,
        req: DecodeRequest,
        hyp: Hypothesis,
        words: tuple[Word, ...],
        *,
        is_final: bool,
        stable: int,
    ) -> TranscriptEvent:
        extra: dict[str, Any] = {"kind": req.kind}
        if hyp.info:
            extra["backend"] = hyp.info
        return TranscriptEvent(
            channel=req.channel,
            channels=self.channels,
            start=req.start_s,
            duration=req.end_s - req.start_s,
            transcript=hyp.text.strip(),
            confidence=_confidence(hyp.avg_logprob) if hyp.text else 0.0,
            words=words if self.params.words else (),
            is_final=is_final,
            speech_final=is_final and req.speech_final,
            from_finalize=req.from_finalize,
            utterance=req.utterance,
            stable_words=stable,
            language=hyp.language,
            extra=extra,
        )
