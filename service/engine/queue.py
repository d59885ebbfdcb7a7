"""The decode queue's policy, pure: which jobs wait, which batch goes next, and when.

Nothing here runs a task, a thread or a backend, and nothing reads a clock:
every method that depends on time takes ``now`` (seconds on any monotonic
clock, the same one for every call; the scheduler passes ``time.monotonic()``).
The scheduler (service/engine/scheduler.py) owns the event loop side: the
futures, the batcher tasks, the worker threads, the fallback and the
counters. Each queued job carries an opaque ``payload`` (the scheduler's job
and future) that the queue never looks at.

The rules, each kept here and nowhere else:

- Two kinds of job, finals and interims. A batch holds jobs of one kind only,
  and finals go before interims: while any final is queued, the next batch
  is of finals. Within a kind the oldest go first.
- A batch holds at most ``max_batch`` jobs, all with equal decode options
  (the options of its oldest live job); queued jobs with other options keep
  their places for a later batch.
- Finals are never dropped or replaced. A newer interim with the same key as
  a queued interim supersedes it: the older one leaves the queue (its payload
  is handed back so that its submitter can be told) and the newer one takes
  over its place, and its ``queued_at``, so that a stream that keeps
  refreshing its interim is not pushed to the back. Interims of other keys
  are untouched.
- Once a kind has a job queued, its batch is taken when it is full
  (``max_batch`` jobs of that kind queued) or ``max_wait_ms`` after its
  oldest job was queued, whichever comes first; when flushing (a draining
  stop) it is taken at once.
- The measured backend cost (an exponentially weighted moving average of
  seconds per window, per kind) gives the estimated wait of a new job, which
  decides whether the server is overloaded and whether a stream should
  submit an interim at all.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Generic, NamedTuple, TypeVar

from earshot.core.decoding import DecodeOptions, default_max_batch
from earshot.core.errors import ConfigError

P = TypeVar("P")


class JobKind(str, Enum):
    """What a decode is for. The value is a stable label for logs and metrics."""

    FINAL = "final"
    INTERIM = "interim"


class QueueDepth(NamedTuple):
    """Jobs waiting in the queue (not counting the batch in flight)."""

    finals: int
    interims: int


@dataclass(frozen=True)
class SchedulerSettings:
    """Limits of the decode queue. Every value is checked; ConfigError names the bad one.

    - ``max_batch``: most jobs in one backend call.
    - ``max_wait_ms``: once a kind has a queued job, how long (from when that
      job was queued) the batcher waits for its batch to fill; 0 = never wait.
    - ``max_queue``: high watermark on queued jobs (both kinds); past it
      :meth:`Scheduler.is_overloaded` is True. It is not a hard limit: submit
      never refuses a job for being over it, the server refuses new streams.
    - ``interim_max_wait_s``: :meth:`Scheduler.should_submit_interim` says no
      when a new interim would be expected to take longer than this.
    - ``overload_final_wait_s``: :meth:`Scheduler.is_overloaded` is True when
      a new final would be expected to take longer than this.
    - ``ewma_alpha``: weight of the newest batch in the moving averages.
    - ``interim_probe_s``: after this long without a decoded interim, one is
      let through whatever the estimate says, so that the estimate recovers.
    - ``prior_window_s``: seconds per window assumed before any batch of that
      kind has been measured.
    - ``workers``: batches the backend decodes at once (each in its own
      thread); the estimates share the queued work among them.
    """

    max_batch: int = 4
    max_wait_ms: float = 10.0
    max_queue: int = 256
    interim_max_wait_s: float = 2.0
    overload_final_wait_s: float = 10.0
    ewma_alpha: float = 0.2
    interim_probe_s: float = 5.0
    prior_window_s: float = 0.5
    workers: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, value: object, rule: str) -> ConfigError:
            return ConfigError(
                f"scheduler setting {name} must be {rule}, not {value!r}", field=name
            )

        if self.max_batch < 1:
            raise bad("max_batch", self.max_batch, ">= 1")
        if not 0.0 <= self.max_wait_ms <= 10_000.0:
            raise bad("max_wait_ms", self.max_wait_ms, "between 0 and 10000")
        if self.max_queue < 1:
            raise bad("max_queue", self.max_queue, ">= 1")
        if not 1 <= self.workers <= 64:
            raise bad("workers", self.workers, "from 1 to 64")
        if not self.interim_max_wait_s > 0.0:
            raise bad("interim_max_wait_s", self.interim_max_wait_s, "> 0")
        if not self.overload_final_wait_s > 0.0:
            raise bad("overload_final_wait_s", self.overload_final_wait_s, "> 0")
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise bad("ewma_alpha", self.ewma_alpha, "in (0, 1]")
        if not self.prior_window_s >= 0.0 or math.isinf(self.prior_window_s):
            raise bad("prior_window_s", self.prior_window_s, "finite and >= 0")

    @classmethod
    def for_device(cls, device: str, **overrides: Any) -> SchedulerSettings:
        """Defaults suited to ``device`` (see :func:`default_max_batch`).

        On the CPU, waiting for a batch to fill buys nothing (batching does not
        raise throughput there), so ``max_wait_ms`` is 0; on a GPU it is 10 ms.
        ``overrides`` replace any field by name.
        """
        base = cls(
            max_batch=default_max_batch(device, live=True),
            max_wait_ms=0.0 if device == "cpu" else 10.0,
        )
        return replace(base, **overrides)


@dataclass(frozen=True, eq=False)
class QueuedJob(Generic[P]):
    """One job in the queue.

    ``key`` is the stream and channel (interims of one key supersede each
    other); ``options`` what it is decoded with (a batch holds equal ones);
    ``queued_at`` when its place in the queue was taken (a superseding
    interim inherits it from the job it replaces); ``payload`` is the
    submitter's own and never looked at. Entries compare by identity.
    """

    key: Hashable
    kind: JobKind
    options: DecodeOptions
    queued_at: float
    payload: P


class BatchChoice(NamedTuple):
    """What the batcher should do next: take a batch of ``kind`` at ``take_at``.

    ``take_at <= now`` means take it now; otherwise wait until ``take_at``, or
    until the queue changes (a submit may fill the batch, or bring a final
    while interims wait), and ask again.
    """

    kind: JobKind
    take_at: float

    def due(self, now: float) -> bool:
        """Whether the batch should be taken at ``now``."""
        return self.take_at <= now


@dataclass(frozen=True)
class Batch(Generic[P]):
    """What :meth:`DecodeQueue.take` removed from the queue: ``jobs`` to
    decode (oldest first, equal options, at most ``max_batch``), and
    ``dropped``, the withdrawn jobs it skipped on the way (not to decode)."""

    kind: JobKind
    jobs: list[QueuedJob[P]]
    dropped: list[QueuedJob[P]]


class InFlight(NamedTuple):
    """The batch the backend is decoding now: its kind, size and start time."""

    kind: JobKind
    size: int
    started: float


class DecodeQueue(Generic[P]):
    """The queued jobs of every stream, per kind, and the decisions over them.

    See the module docstring for the rules. ``now`` is the time of
    construction on the caller's clock; it starts the interim probe's idle
    time (see :meth:`should_submit_interim`).
    """

    def __init__(self, settings: SchedulerSettings, *, now: float) -> None:
        self.settings = settings
        self._finals: deque[QueuedJob[P]] = deque()
        # Insertion-ordered: the first entry is the oldest place in the queue.
        self._interims: dict[Hashable, QueuedJob[P]] = {}
        self._ewma_batch: dict[JobKind, float | None] = dict.fromkeys(JobKind)
        self._ewma_window: dict[JobKind, float | None] = dict.fromkeys(JobKind)
        self._last_done: dict[JobKind, float] = dict.fromkeys(JobKind, now)

    @property
    def max_wait_s(self) -> float:
        """``max_wait_ms`` in seconds."""
        return self.settings.max_wait_ms / 1000.0

    # -- the queue ---------------------------------------------------------
    def push(
        self, key: Hashable, kind: JobKind, options: DecodeOptions, payload: P, *, now: float
    ) -> QueuedJob[P] | None:
        """Queue a job at ``now``; the interim it superseded, or None.

        A final goes to the back of the finals. An interim whose key already
        has one queued replaces it in its place (and keeps its ``queued_at``);
        the replaced entry is returned, out of the queue.
        """
        if kind is JobKind.FINAL:
            self._finals.append(QueuedJob(key, kind, options, now, payload))
            return None
        old = self._interims.get(key)
        queued_at = now if old is None else old.queued_at
        # Assigning to an existing key keeps its place in insertion order.
        self._interims[key] = QueuedJob(key, kind, options, queued_at, payload)
        return old

    def drop_interim(self, key: Hashable) -> QueuedJob[P] | None:
        """Remove the queued interim of ``key``; it, or None when there was none."""
        return self._interims.pop(key, None)

    def has_interim(self, key: Hashable) -> bool:
        """Whether ``key`` has an interim queued."""
        return key in self._interims

    def put_back(self, jobs: Iterable[QueuedJob[P]]) -> None:
        """Return taken finals to the front of the queue, in their order (a
        batch that could not be decoded elsewhere: late, but not lost)."""
        entries = list(jobs)
        if any(entry.kind is not JobKind.FINAL for entry in entries):
            raise ValueError("only finals are put back")
        self._finals.extendleft(reversed(entries))

    def clear(self) -> list[QueuedJob[P]]:
        """Empty the queue; every entry it held, finals first, oldest first."""
        entries = [*self._finals, *self._interims.values()]
        self._finals.clear()
        self._interims.clear()
        return entries

    @property
    def depth(self) -> QueueDepth:
        """Jobs queued per kind (withdrawn ones not yet skipped included)."""
        return QueueDepth(len(self._finals), len(self._interims))

    def __len__(self) -> int:
        return len(self._finals) + len(self._interims)

    # -- the batch choice --------------------------------------------------
    def next_batch(self, now: float, *, flush: bool = False) -> BatchChoice | None:
        """The next batch to take: its kind and when; None when nothing is queued.

        Finals when any are queued, else interims. It is due at once when
        ``flush`` is set or the kind has ``max_batch`` jobs queued, else
        ``max_wait_ms`` after the kind's oldest job was queued.
        """
        if self._finals:
            kind, count, oldest = JobKind.FINAL, len(self._finals), self._finals[0].queued_at
        elif self._interims:
            first = next(iter(self._interims.values()))
            kind, count, oldest = JobKind.INTERIM, len(self._interims), first.queued_at
        else:
            return None
        if flush or count >= self.settings.max_batch:
            return BatchChoice(kind, now)
        return BatchChoice(kind, oldest + self.max_wait_s)

    def take(self, kind: JobKind, live: Callable[[P], bool] = lambda _: True) -> Batch[P]:
        """Remove and return the next batch of ``kind``.

        Up to ``max_batch`` jobs, oldest first, that share the options of the
        oldest live one; jobs with other options keep their places. A job
        whose payload is not ``live`` (its submitter withdrew it) is removed
        and returned in ``dropped`` instead, without taking a place in the
        batch.
        """
        jobs: list[QueuedJob[P]] = []
        dropped: list[QueuedJob[P]] = []
        options: DecodeOptions | None = None
        limit = self.settings.max_batch
        if kind is JobKind.FINAL:
            skipped: list[QueuedJob[P]] = []
            while self._finals and len(jobs) < limit:
                entry = self._finals.popleft()
                if not live(entry.payload):
                    dropped.append(entry)
                    continue
                if options is None:
                    options = entry.options
                if entry.options != options:
                    skipped.append(entry)
                    continue
                jobs.append(entry)
            self._finals.extendleft(reversed(skipped))
            return Batch(kind, jobs, dropped)
        for key in list(self._interims):
            if len(jobs) >= limit:
                break
            entry = self._interims[key]
            if not live(entry.payload):
                del self._interims[key]
                dropped.append(entry)
                continue
            if options is None:
                options = entry.options
            if entry.options == options:
                del self._interims[key]
                jobs.append(entry)
        return Batch(kind, jobs, dropped)

    # -- cost and load -----------------------------------------------------
    def observe(self, kind: JobKind, size: int, seconds: float, *, now: float) -> None:
        """Learn from a successful batch of ``size`` jobs that took ``seconds``."""
        self._last_done[kind] = now
        alpha = self.settings.ewma_alpha
        for table, value in ((self._ewma_batch, seconds), (self._ewma_window, seconds / size)):
            previous = table[kind]
            table[kind] = value if previous is None else previous + alpha * (value - previous)

    @property
    def ewma_batch_seconds(self) -> dict[JobKind, float | None]:
        """Moving average of a batch's seconds per kind; None before the first."""
        return dict(self._ewma_batch)

    @property
    def ewma_window_seconds(self) -> dict[JobKind, float | None]:
        """Moving average of seconds per window per kind; None before the first."""
        return dict(self._ewma_window)

    def seconds_per_window(self, kind: JobKind) -> float:
        """The moving average of seconds per window of ``kind``
        (``prior_window_s`` until a batch of that kind has been measured)."""
        measured = self._ewma_window[kind]
        return self.settings.prior_window_s if measured is None else measured

    def estimated_wait(
        self, kind: JobKind, *, now: float, in_flight: Sequence[InFlight] = ()
    ) -> float:
        """Seconds until a job of ``kind`` queued at ``now`` would be decoded.

        ``max_wait_ms``, plus the work ahead of it shared among the
        ``workers``: the rest of each batch in flight (its expected cost less
        the time it has run, never below 0) and every queued job served before
        it (all queued finals; for an interim, all queued interims too), each
        at the seconds per window of its kind; plus its own cost. It does not
        foresee finals queued later, which go before an interim.
        """
        ahead = 0.0
        for batch in in_flight:
            if batch.size:
                expected = self.seconds_per_window(batch.kind) * batch.size
                ahead += max(0.0, expected - (now - batch.started))
        finals, interims = self.depth
        ahead += self.seconds_per_window(JobKind.FINAL) * finals
        if kind is JobKind.INTERIM:
            ahead += self.seconds_per_window(JobKind.INTERIM) * interims
        return self.max_wait_s + ahead / self.settings.workers + self.seconds_per_window(kind)

    def should_submit_interim(
        self, key: Hashable, *, now: float, in_flight: Sequence[InFlight] = ()
    ) -> bool:
        """Whether a new interim for ``key`` is worth queueing at ``now``.

        True when ``key`` already has one queued (the new one only replaces
        it); else when its estimated wait is within ``interim_max_wait_s``;
        else, as a probe so that the estimate can recover from one slow
        batch, when no interim is queued and none has been decoded for more
        than ``interim_probe_s``.
        """
        if key in self._interims:
            return True
        wait = self.estimated_wait(JobKind.INTERIM, now=now, in_flight=in_flight)
        if wait <= self.settings.interim_max_wait_s:
            return True
        # The estimate only learns from interims that run: one slow batch (a
        # cold start, a burst) must not shut interims out for good. With none
        # queued and none decoded for a while, let one through as a probe.
        idle = now - self._last_done[JobKind.INTERIM]
        return not self._interims and idle > self.settings.interim_probe_s

    def overload_reason(self, *, now: float, in_flight: Sequence[InFlight] = ()) -> str | None:
        """Why new streams should be refused at ``now``, naming the limit and
        the numbers, or None: the queue holds ``max_queue`` jobs or more, or a
        new final would wait longer than ``overload_final_wait_s``."""
        queued = len(self)
        if queued >= self.settings.max_queue:
            return (
                f"the decode queue holds {queued} jobs, its limit is "
                f"{self.settings.max_queue} (max_queue)"
            )
        wait = self.estimated_wait(JobKind.FINAL, now=now, in_flight=in_flight)
        if wait > self.settings.overload_final_wait_s:
            return (
                f"a new final would wait about {wait:.1f} s for the decoder, more than "
                f"{self.settings.overload_final_wait_s:g} s (overload_final_wait_s)"
            )
        return None
