"""One decode queue for every stream and channel of the server, in front of one backend.

Every session submits :class:`DecodeJob` s here and awaits the returned future.
A single batcher task forms batches and runs them, one at a time, through
``Backend.transcribe_batch`` in a dedicated worker thread, so the event loop
never blocks on the model.

Policy, in order of importance:

- Finals before interims. A batch holds jobs of one kind only (finals use the
  beam-search options, interims the greedy ones); within a kind the oldest go
  first. Under load interims wait (and thin out), finals keep their latency.
- Finals are never dropped or replaced. An interim still queued when a newer
  interim with the same key arrives is superseded: its future resolves to
  None at once and the newer job takes over its place in the queue (so a
  stream that keeps refreshing its interim is not pushed to the back).
- Once a kind has a job queued, the batcher waits at most ``max_wait_ms``
  (counted from when the oldest job of that kind was queued, not from when
  the batcher looked) for the batch to fill to ``max_batch``. A final that
  arrives while the batcher waits for interims takes over at once.
- The backend's measured cost (exponentially weighted, per kind) gives
  :meth:`Scheduler.estimated_wait`, :meth:`Scheduler.is_overloaded` and
  :meth:`Scheduler.should_submit_interim`, which the server uses to refuse
  new streams and to thin interims before finals suffer.

A second backend, the ``fallback`` (a remote one; see models/remote.py), is
optional and only used when configured. Reasons, each enabled separately by
``fallback_on``:

- ``"overload"``: while the local queue is past its high watermark
  (:meth:`Scheduler.is_overloaded`), a second batcher takes the oldest queued
  finals and decodes them on the fallback, in a worker thread of its own,
  alongside the local batch. Interims never go to the fallback. A batch the
  fallback fails goes back to the front of the local queue.
- ``"failure"``: a local batch that raised (anything but InvalidRequestError,
  which is the request's fault) is decoded again on the fallback.

The fallback is asked ``available()`` (when it has one, e.g. a circuit
breaker) before any work goes to it. Every hypothesis it produced carries
``info["fallback"]`` (the reason) and ``info["backend"] == "remote"``, and
the ``on_batch`` report names the backend, so that the use is visible to
clients, logs and metrics.

Everything here except the worker threads runs on the event loop that called
:meth:`Scheduler.start`; call every method from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from types import TracebackType
from typing import Any, NamedTuple

from earshot.core.decoding import (
    MAX_WINDOW_SECONDS,
    Backend,
    DecodeOptions,
    Fallback,
    Hypothesis,
    Window,
    default_max_batch,
)
from earshot.core.errors import ConfigError, InvalidRequestError, SchedulerStoppedError
from earshot.service.sovereignty import egress_reason

log = logging.getLogger("earshot.scheduler")

THREAD_NAME_PREFIX = "earshot-decode"
"""Name prefix of the scheduler's worker thread (one per running scheduler)."""

# A window may be a few ms over 30 s after resampling; the runner accepts that too.
_WINDOW_TOLERANCE_S = 0.05


FALLBACK_REASONS = ("overload", "failure")
"""Why work may go to the fallback backend (``Scheduler(fallback_on=...)``)."""


class JobKind(str, Enum):
    """What a decode is for. The value is a stable label for logs and metrics."""

    FINAL = "final"
    INTERIM = "interim"


@dataclass(frozen=True, eq=False)
class DecodeJob:
    """One window to decode for one stream and channel.

    ``key`` identifies the stream and channel (any hashable, e.g.
    ``(stream_id, channel)``); a newer INTERIM with the same key supersedes a
    queued older one. ``tag`` is the submitter's own (e.g. an utterance id)
    and is never looked at. ``submitted_at`` (``time.monotonic()`` seconds) is
    filled by :meth:`Scheduler.submit`; leave it None. ``options`` replaces
    the scheduler's options of the job's kind (e.g. ``task="translate"``);
    a batch only holds jobs with equal options. Jobs compare by identity (the
    window holds a numpy array).
    """

    key: Hashable
    kind: JobKind
    window: Window
    tag: object = None
    submitted_at: float | None = None
    options: DecodeOptions | None = None


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
    """

    max_batch: int = 4
    max_wait_ms: float = 10.0
    max_queue: int = 256
    interim_max_wait_s: float = 2.0
    overload_final_wait_s: float = 10.0
    ewma_alpha: float = 0.2
    interim_probe_s: float = 5.0
    prior_window_s: float = 0.5

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


class QueueDepth(NamedTuple):
    """Jobs waiting in the queue (not counting the batch in flight)."""

    finals: int
    interims: int


@dataclass(frozen=True)
class BatchReport:
    """What one backend call did; given to the ``on_batch`` hook after every batch.

    ``seconds`` is the time spent inside ``transcribe_batch``;
    ``queue_seconds`` how long each job waited between submit and the start
    of the call, in batch order; ``audio_seconds`` the total audio decoded.
    ``error`` is the exception the backend raised (every job of the batch got
    it), or None on success. ``backend`` is ``"local"`` or the fallback's
    name, and ``fallback_reason`` why the batch went to the fallback
    (``"overload"`` or ``"failure"``; None for local batches).
    """

    kind: JobKind
    size: int
    seconds: float
    audio_seconds: float
    queue_seconds: tuple[float, ...]
    error: BaseException | None = None
    backend: str = "local"
    fallback_reason: str | None = None


BatchHook = Callable[[BatchReport], None]


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler's counters (all monotonic since construction).

    Per kind: ``submitted`` jobs accepted by submit; ``completed`` jobs whose
    batch returned hypotheses; ``failed`` jobs whose batch raised;
    ``batches`` backend calls; ``failed_batches`` backend calls that raised.
    Overall: ``superseded`` interims replaced by a newer one (future -> None);
    ``cancelled`` queued jobs skipped because the submitter cancelled the
    future; ``aborted`` jobs failed with SchedulerStoppedError at stop;
    ``busy_seconds`` total time spent inside the backend.
    ``ewma_batch_seconds`` / ``ewma_window_seconds``: moving averages of a
    successful batch's duration and of that duration divided by the batch
    size, per kind; None before the first batch of that kind (local batches
    only). ``fallback_completed`` / ``fallback_failed``: jobs the fallback
    decoded or failed, by reason. Local counters don't include fallback work.
    """

    submitted: dict[JobKind, int]
    completed: dict[JobKind, int]
    failed: dict[JobKind, int]
    batches: dict[JobKind, int]
    failed_batches: dict[JobKind, int]
    superseded: int
    cancelled: int
    aborted: int
    busy_seconds: float
    ewma_batch_seconds: dict[JobKind, float | None]
    ewma_window_seconds: dict[JobKind, float | None]
    fallback_completed: dict[str, int] = field(default_factory=dict)
    fallback_failed: dict[str, int] = field(default_factory=dict)


class _Entry:
    """A queued job. ``queued_at`` is when its place in the queue was taken:
    a superseding interim inherits it from the job it replaces."""

    __slots__ = ("future", "job", "queued_at")

    def __init__(
        self, job: DecodeJob, future: asyncio.Future[Hypothesis | None], queued_at: float
    ) -> None:
        self.job = job
        self.future = future
        self.queued_at = queued_at


def _per_kind(value: int = 0) -> dict[JobKind, int]:
    return dict.fromkeys(JobKind, value)


def _timed_call(
    backend: Backend, windows: list[Window], options: DecodeOptions, reason: str | None = None
) -> tuple[list[Hypothesis], float]:
    """Runs in the worker thread: the call and its own duration, free of loop
    delays. ``reason`` marks the connections the call makes in the egress
    audit log (service/egress.py)."""
    started = time.perf_counter()
    if reason is None:
        hyps = backend.transcribe_batch(windows, options)
    else:
        with egress_reason(reason):
            hyps = backend.transcribe_batch(windows, options)
    return hyps, time.perf_counter() - started


def _fail(future: asyncio.Future[Hypothesis | None], exc: BaseException) -> bool:
    if future.done():
        return False
    future.set_exception(exc)
    return True


class Scheduler:
    """The server's one decode queue. See the module docstring for the policy.

    Lifecycle: construct anywhere, ``await start()`` on the serving loop,
    :meth:`submit` jobs, ``await stop()`` at shutdown (or use
    ``async with scheduler:``). A scheduler runs once; it cannot be restarted.

    ``on_batch`` is called on the event loop after every backend call (failed
    ones too) with a :class:`BatchReport`; it must be quick and must not
    block. An exception it raises is logged and otherwise ignored.
    """

    def __init__(
        self,
        backend: Backend,
        settings: SchedulerSettings,
        *,
        final_options: DecodeOptions,
        interim_options: DecodeOptions,
        on_batch: BatchHook | None = None,
        fallback: Fallback | None = None,
        fallback_on: frozenset[str] = frozenset(),
    ) -> None:
        unknown = set(fallback_on) - set(FALLBACK_REASONS)
        if unknown:
            raise ConfigError(
                f"fallback_on may hold {', '.join(FALLBACK_REASONS)}, not {sorted(unknown)}",
                field="fallback_on",
            )
        self.backend = backend
        self.fallback = fallback
        self.fallback_on = frozenset(fallback_on) if fallback is not None else frozenset()
        self.settings = settings
        self.final_options = final_options
        self.interim_options = interim_options
        self.on_batch = on_batch
        self._options = {JobKind.FINAL: final_options, JobKind.INTERIM: interim_options}

        self._finals: deque[_Entry] = deque()
        # Insertion-ordered: the first entry is the oldest place in the queue.
        self._interims: dict[Hashable, _Entry] = {}
        self._in_flight: tuple[_Entry, ...] = ()
        self._in_flight_kind = JobKind.FINAL
        self._in_flight_started = 0.0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._fallback_task: asyncio.Task[None] | None = None
        self._fallback_executor: ThreadPoolExecutor | None = None
        self._fallback_wake: asyncio.Event | None = None
        self._fallback_in_flight = 0
        self._stopping = False
        self._draining = False
        self._stopped = False

        self._submitted = _per_kind()
        self._completed = _per_kind()
        self._failed = _per_kind()
        self._batches = _per_kind()
        self._failed_batches = _per_kind()
        self._superseded = 0
        self._cancelled = 0
        self._aborted = 0
        self._busy_seconds = 0.0
        self._ewma_batch: dict[JobKind, float | None] = dict.fromkeys(JobKind)
        self._ewma_window: dict[JobKind, float | None] = dict.fromkeys(JobKind)
        self._last_done: dict[JobKind, float] = dict.fromkeys(JobKind, time.monotonic())
        self._fallback_completed: dict[str, int] = dict.fromkeys(FALLBACK_REASONS, 0)
        self._fallback_failed: dict[str, int] = dict.fromkeys(FALLBACK_REASONS, 0)

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        """Start the batcher on the running loop and create the worker thread's pool.

        Raises RuntimeError when called twice.
        """
        if self._task is not None or self._stopped:
            raise RuntimeError("a Scheduler can be started only once")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME_PREFIX)
        self._task = self._loop.create_task(self._run(), name="earshot-scheduler")
        if self.fallback is not None:
            self._fallback_wake = asyncio.Event()
            self._fallback_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=THREAD_NAME_PREFIX + "-fallback"
            )
            self._fallback_task = self._loop.create_task(
                self._run_fallback(), name="earshot-scheduler-fallback"
            )

    async def stop(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Stop accepting jobs, settle every future and end the worker thread.

        ``drain=False``: queued jobs fail at once with SchedulerStoppedError;
        the batch in flight is finished and its futures get their results.
        ``drain=True``: every queued job is still decoded (without waiting for
        batches to fill) before the scheduler ends; use it for a graceful
        shutdown where finals must reach their clients.

        ``timeout`` bounds the wait (seconds; None = no bound). When it
        passes, the remaining jobs fail with SchedulerStoppedError and stop
        returns, but a backend call already running cannot be interrupted:
        its thread finishes that call in the background and its result is
        discarded. Safe to call more than once, and before start.
        """
        if self._stopped:
            return
        self._stopping = True
        self._draining = drain
        task = self._task
        if task is None:
            self._stopped = True
            return
        if not drain:
            self._abort_queued()
        self._wake_all()
        tasks = [t for t in (task, self._fallback_task) if t is not None]
        both = asyncio.gather(*tasks)
        finished = True
        if timeout is None:
            await asyncio.shield(both)
        else:
            try:
                await asyncio.wait_for(asyncio.shield(both), timeout)
            except asyncio.TimeoutError:
                finished = False
                log.warning("scheduler did not finish within %.1f s; abandoning its work", timeout)
                for t in tasks:
                    t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*tasks, return_exceptions=True)
        self._abort_queued()
        self._stopped = True
        for executor in (self._executor, self._fallback_executor):
            if executor is not None:
                # The pool's thread is idle when the batcher finished, so waiting is a
                # prompt join; after a timeout it may be stuck in the backend, so don't.
                executor.shutdown(wait=finished, cancel_futures=True)

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        """True between start() and the beginning of stop(): submit accepts jobs."""
        return self._task is not None and not self._stopping and not self._task.done()

    # -- submitting --------------------------------------------------------
    def submit(self, job: DecodeJob) -> asyncio.Future[Hypothesis | None]:
        """Queue ``job``; the future resolves to its Hypothesis.

        The future resolves to None when the job was an INTERIM superseded by a
        newer INTERIM with the same key before it was decoded. It raises the
        backend's exception if the batch it was in failed (every job of that
        batch gets the same exception), and SchedulerStoppedError if the
        scheduler stopped before decoding it. Await it or add a done callback,
        or asyncio logs "exception was never retrieved" for failed ones.
        Cancelling the future withdraws a job that is still queued.

        Must be called on the loop that started the scheduler. Raises
        SchedulerStoppedError when the scheduler is not running, and
        InvalidRequestError for a window the backend would refuse (not mono,
        empty, or longer than 30 s), so that one bad window cannot fail a
        whole batch of other streams' jobs. A window's language is not
        checked here: validate it when the stream opens.
        """
        if not self.running:
            raise SchedulerStoppedError("the decode scheduler is not running")
        assert self._loop is not None and self._wake is not None
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("Scheduler.submit must be called on the loop that started it")
        if not isinstance(job.kind, JobKind):
            raise TypeError(f"job.kind must be a JobKind, not {job.kind!r}")
        _check_window(job.window)

        now = time.monotonic()
        job = replace(job, submitted_at=now)
        future: asyncio.Future[Hypothesis | None] = self._loop.create_future()
        self._submitted[job.kind] += 1
        if job.kind is JobKind.FINAL:
            self._finals.append(_Entry(job, future, now))
        else:
            old = self._interims.get(job.key)
            queued_at = now
            if old is not None:
                queued_at = old.queued_at
                self._supersede(old)
            # Assigning to an existing key keeps its place in insertion order.
            self._interims[job.key] = _Entry(job, future, queued_at)
        self._wake_all()
        return future

    def _wake_all(self) -> None:
        if self._wake is not None:
            self._wake.set()
        if self._fallback_wake is not None:
            self._fallback_wake.set()

    def drop_interim(self, key: Hashable) -> bool:
        """Withdraw the queued INTERIM of ``key``, if any (its future resolves None).

        Use it when the stream's utterance has closed (its final makes the
        interim moot) or the stream has gone. Returns whether one was queued.
        An interim already in flight is not affected.
        """
        entry = self._interims.pop(key, None)
        if entry is None:
            return False
        self._supersede(entry)
        return True

    def _supersede(self, entry: _Entry) -> None:
        if entry.future.done():
            self._cancelled += 1
        else:
            entry.future.set_result(None)
            self._superseded += 1

    # -- observing ---------------------------------------------------------
    @property
    def queue_depth(self) -> QueueDepth:
        """Jobs queued and not yet in a batch (futures the caller cancelled included)."""
        return QueueDepth(len(self._finals), len(self._interims))

    @property
    def in_flight(self) -> int:
        """Jobs in the batch the backend is decoding now (0 when idle)."""
        return len(self._in_flight)

    def stats(self) -> SchedulerStats:
        """A snapshot of the counters; see :class:`SchedulerStats`."""
        return SchedulerStats(
            submitted=dict(self._submitted),
            completed=dict(self._completed),
            failed=dict(self._failed),
            batches=dict(self._batches),
            failed_batches=dict(self._failed_batches),
            superseded=self._superseded,
            cancelled=self._cancelled,
            aborted=self._aborted,
            busy_seconds=self._busy_seconds,
            ewma_batch_seconds=dict(self._ewma_batch),
            ewma_window_seconds=dict(self._ewma_window),
            fallback_completed=dict(self._fallback_completed),
            fallback_failed=dict(self._fallback_failed),
        )

    def seconds_per_window(self, kind: JobKind) -> float:
        """The moving average of backend seconds per window of ``kind``
        (``prior_window_s`` until a batch of that kind has been measured)."""
        measured = self._ewma_window[kind]
        return self.settings.prior_window_s if measured is None else measured

    def estimated_wait(self, kind: JobKind) -> float:
        """Seconds until a job of ``kind`` submitted now would be decoded.

        The rest of the batch in flight, plus every queued job served before it
        (all queued finals; for an interim, all queued interims too) and
        itself, each at the moving average of seconds per window of its kind,
        plus ``max_wait_ms``. Per-window cost times job count is what batches
        cost on the CPU, and what full batches cost on a GPU, which is when
        the estimate matters. It does not foresee finals submitted later, which
        go before a waiting interim.
        """
        wait = self.settings.max_wait_ms / 1000.0
        if self._in_flight:
            expected = self.seconds_per_window(self._in_flight_kind) * len(self._in_flight)
            wait += max(0.0, expected - (time.monotonic() - self._in_flight_started))
        finals, interims = self.queue_depth
        if kind is JobKind.FINAL:
            return wait + self.seconds_per_window(JobKind.FINAL) * (finals + 1)
        return (
            wait
            + self.seconds_per_window(JobKind.FINAL) * finals
            + self.seconds_per_window(JobKind.INTERIM) * (interims + 1)
        )

    def should_submit_interim(self, key: Hashable) -> bool:
        """Whether a stream should submit an interim for ``key`` now.

        True when ``key`` already has an interim queued (the new one just
        replaces it and adds no work); otherwise True only while the estimated
        interim wait is within ``interim_max_wait_s``. False when not running.
        A stream told no should simply try again at its next interim step.
        """
        if not self.running:
            return False
        if key in self._interims:
            return True
        if self.estimated_wait(JobKind.INTERIM) <= self.settings.interim_max_wait_s:
            return True
        # The estimate only learns from interims that run: one slow batch (a
        # cold start, a burst) must not shut interims out for good. With none
        # queued and none decoded for a while, let one through as a probe.
        idle = time.monotonic() - self._last_done[JobKind.INTERIM]
        return not self._interims and idle > self.settings.interim_probe_s

    def is_overloaded(self) -> bool:
        """True when the server should refuse new streams (HTTP 503).

        The queue holds ``max_queue`` jobs or more, or a final submitted now is
        expected to take longer than ``overload_final_wait_s``.
        """
        return self.overload_reason() is not None

    def overload_reason(self) -> str | None:
        """Why the server is overloaded now, naming the limit and the numbers
        (for refusals), or None when it is not."""
        finals, interims = self.queue_depth
        if finals + interims >= self.settings.max_queue:
            return (
                f"the decode queue holds {finals + interims} jobs, its limit is "
                f"{self.settings.max_queue} (max_queue)"
            )
        wait = self.estimated_wait(JobKind.FINAL)
        if wait > self.settings.overload_final_wait_s:
            return (
                f"a new final would wait about {wait:.1f} s for the decoder, more than "
                f"{self.settings.overload_final_wait_s:g} s (overload_final_wait_s)"
            )
        return None

    def fallback_available(self, reason: str) -> bool:
        """Whether work may go to the fallback for ``reason`` now: one is
        configured, ``reason`` is in ``fallback_on`` and the fallback says it
        is available (its circuit is closed)."""
        if self.fallback is None or reason not in self.fallback_on:
            return False
        return self.fallback.available()

    def accepting(self) -> bool:
        """Whether new streams and requests should be accepted: the local queue
        is below its high watermark, or the fallback takes the overflow."""
        return not self.is_overloaded() or self.fallback_available("overload")

    # -- the batcher -------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                kind = await self._next_kind()
                if kind is None:
                    return
                batch = self._take(kind)
                if batch:
                    await self._decode(kind, batch)
        except asyncio.CancelledError:
            self._abort_queued()
            raise
        except Exception:
            # A bug here must not leave submitters waiting forever.
            log.exception("decode scheduler failed; failing every queued job")
            self._stopping = True
            self._abort_queued()

    async def _run_fallback(self) -> None:
        """The second batcher: moves queued finals to the fallback while the
        local queue is past its high watermark."""
        assert self._fallback_wake is not None
        try:
            while True:
                if self._stopping and not self._draining:
                    return
                if self._finals and self.is_overloaded() and self.fallback_available("overload"):
                    batch = self._take(JobKind.FINAL)
                    if batch:
                        await self._decode(JobKind.FINAL, batch, fallback_reason="overload")
                    continue
                if self._stopping and not self._finals:
                    return
                self._fallback_wake.clear()
                await self._fallback_wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("fallback batcher failed; the local batcher goes on alone")

    async def _next_kind(self) -> JobKind | None:
        """Wait until a batch should be formed; its kind, or None to end."""
        assert self._wake is not None
        max_wait_s = self.settings.max_wait_ms / 1000.0
        while True:
            if self._stopping and not self._draining:
                return None
            if self._finals:
                kind, count, oldest = JobKind.FINAL, len(self._finals), self._finals[0].queued_at
            elif self._interims:
                first = next(iter(self._interims.values()))
                kind, count, oldest = JobKind.INTERIM, len(self._interims), first.queued_at
            else:
                if self._stopping:
                    return None
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._stopping or count >= self.settings.max_batch:
                return kind
            remaining = oldest + max_wait_s - time.monotonic()
            if remaining <= 0.0:
                return kind
            # Any submit wakes us: the batch may be full, or a final may have
            # arrived while we waited for interims.
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def options_for(self, job: DecodeJob) -> DecodeOptions:
        """The options ``job`` is decoded with: its own, or those of its kind."""
        return job.options if job.options is not None else self._options[job.kind]

    def _take(self, kind: JobKind) -> list[_Entry]:
        """Pop up to max_batch live jobs of ``kind``, oldest first, that share
        the oldest job's options; jobs with other options keep their places."""
        batch: list[_Entry] = []
        options: DecodeOptions | None = None
        if kind is JobKind.FINAL:
            skipped: list[_Entry] = []
            while self._finals and len(batch) < self.settings.max_batch:
                entry = self._finals.popleft()
                if entry.future.done():  # the submitter cancelled it
                    self._cancelled += 1
                    continue
                wanted = self.options_for(entry.job)
                if options is None:
                    options = wanted
                if wanted != options:
                    skipped.append(entry)
                    continue
                batch.append(entry)
            self._finals.extendleft(reversed(skipped))
            return batch
        for key in list(self._interims):
            if len(batch) >= self.settings.max_batch:
                break
            entry = self._interims[key]
            if entry.future.done():
                del self._interims[key]
                self._cancelled += 1
                continue
            wanted = self.options_for(entry.job)
            if options is None:
                options = wanted
            if wanted == options:
                del self._interims[key]
                batch.append(entry)
        return batch

    async def _decode(
        self,
        kind: JobKind,
        batch: list[_Entry],
        *,
        fallback_reason: str | None = None,
        local_error: BaseException | None = None,
    ) -> None:
        """Decode ``batch`` on the local backend, or on the fallback when
        ``fallback_reason`` is given, and settle every job's future."""
        assert self._loop is not None
        remote = fallback_reason is not None
        backend = self.fallback if remote else self.backend
        executor = self._fallback_executor if remote else self._executor
        assert backend is not None and executor is not None
        windows = [entry.job.window for entry in batch]
        options = self.options_for(batch[0].job)
        started = time.monotonic()
        queue_seconds = tuple(started - (entry.job.submitted_at or started) for entry in batch)
        if remote:
            self._fallback_in_flight += len(batch)
        else:
            self._in_flight = tuple(batch)
            self._in_flight_kind, self._in_flight_started = kind, started
        error: BaseException | None = None
        hyps: list[Hypothesis] = []
        try:
            audit = f"remote fallback ({fallback_reason}), {len(batch)} windows" if remote else None
            hyps, seconds = await self._loop.run_in_executor(
                executor, _timed_call, backend, windows, options, audit
            )
            if not isinstance(hyps, list) or len(hyps) != len(batch):
                got = len(hyps) if isinstance(hyps, list) else type(hyps).__name__
                error = RuntimeError(
                    f"backend {backend.name!r} returned {got} hypotheses for {len(batch)} windows"
                )
        except Exception as exc:
            error = exc
            seconds = time.monotonic() - started
        except BaseException as exc:
            # Cancelled by stop(timeout=...), or the worker raised SystemExit and
            # the like: nobody may be left waiting.
            stopped = SchedulerStoppedError("the decode scheduler stopped during this batch")
            for entry in batch:
                if _fail(entry.future, stopped if isinstance(exc, asyncio.CancelledError) else exc):
                    self._aborted += 1
            raise
        finally:
            if remote:
                self._fallback_in_flight -= len(batch)
            else:
                self._in_flight = ()
            self._wake_all()

        retry = (
            error is not None
            and not remote
            and not isinstance(error, InvalidRequestError)
            and self.fallback_available("failure")
        )
        if remote:
            assert fallback_reason is not None
            if error is None:
                hyps = [
                    replace(
                        hyp,
                        info={
                            "backend": "remote",
                            "name": backend.name,
                            **hyp.info,
                            "fallback": fallback_reason,
                        },
                    )
                    for hyp in hyps
                ]
                self._fallback_completed[fallback_reason] += len(batch)
            else:
                self._fallback_failed[fallback_reason] += len(batch)
        else:
            self._batches[kind] += 1
            self._busy_seconds += seconds
            if error is None:
                self._completed[kind] += len(batch)
                self._observe(kind, len(batch), seconds)
            else:
                self._failed[kind] += len(batch)
                self._failed_batches[kind] += 1
        if error is None:
            for entry, hyp in zip(batch, hyps, strict=True):
                if not entry.future.done():
                    entry.future.set_result(hyp)
        else:
            log.warning(
                "%s batch of %d failed in backend %r: %s: %s%s",
                kind.value,
                len(batch),
                backend.name,
                type(error).__name__,
                error,
                "; trying the fallback" if retry else "",
            )
            if fallback_reason == "overload" and not self._stopped:
                # Overflow the remote could not take goes back to the front of
                # the local queue: late, but not lost.
                live = [entry for entry in batch if not entry.future.done()]
                self._finals.extendleft(reversed(live))
                self._wake_all()
            elif not retry:
                for entry in batch:
                    _fail(entry.future, local_error or error)
        if self.on_batch is not None:
            report = BatchReport(
                kind=kind,
                size=len(batch),
                seconds=seconds,
                audio_seconds=sum(w.duration for w in windows),
                queue_seconds=queue_seconds,
                error=error,
                backend=backend.name if remote else "local",
                fallback_reason=fallback_reason,
            )
            try:
                self.on_batch(report)
            except Exception:
                log.exception("scheduler on_batch hook failed")
        if retry:
            live = [entry for entry in batch if not entry.future.done()]
            if live:
                await self._decode(kind, live, fallback_reason="failure", local_error=error)

    def _observe(self, kind: JobKind, size: int, seconds: float) -> None:
        self._last_done[kind] = time.monotonic()
        alpha = self.settings.ewma_alpha
        for table, value in ((self._ewma_batch, seconds), (self._ewma_window, seconds / size)):
            previous = table[kind]
            table[kind] = value if previous is None else previous + alpha * (value - previous)

    def _abort_queued(self) -> None:
        """Fail every queued job with SchedulerStoppedError."""
        if not self._finals and not self._interims:
            return
        stopped = SchedulerStoppedError("the decode scheduler stopped before this job was decoded")
        entries = [*self._finals, *self._interims.values()]
        self._finals.clear()
        self._interims.clear()
        for entry in entries:
            if _fail(entry.future, stopped):
                self._aborted += 1
            else:
                self._cancelled += 1


def _check_window(window: Window) -> None:
    audio = window.audio
    if audio.ndim != 1 or len(audio) == 0:
        raise InvalidRequestError(
            f"a decode window must be non-empty mono audio, not shape {audio.shape}",
            field="audio",
        )
    if window.duration > MAX_WINDOW_SECONDS + _WINDOW_TOLERANCE_S:
        raise InvalidRequestError(
            f"a decode window is {window.duration:.2f} s long; the maximum is "
            f"{MAX_WINDOW_SECONDS:.0f} s",
            field="audio",
        )
