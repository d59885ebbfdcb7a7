"""One decode queue for every stream and channel of the server, in front of one backend.

Every session submits :class:`DecodeJob` s here and awaits the returned future.
A single batcher task forms batches and runs them, one at a time, through
``Backend.transcribe_batch`` in a dedicated worker thread, so the event loop
never blocks on the model.

The batching policy is the pure :class:`DecodeQueue` of service/engine/queue.py,
where each rule is written down once: finals before interims (finals use the
beam-search options, interims the greedy ones), oldest first, at most
``max_batch`` jobs with equal options, a newer interim superseding a queued
one of the same key, ``max_wait_ms`` for a batch to fill, and the estimates
behind :meth:`Scheduler.estimated_wait`, :meth:`Scheduler.is_overloaded` and
:meth:`Scheduler.should_submit_interim`, which the server uses to refuse new
streams and to thin interims before finals suffer. This module runs that
policy: it reads the clock, holds the futures (a superseded interim's future
resolves to None at once, a final that arrives while the batcher waits for
interims wakes it), and runs the batches in a worker thread.

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
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import NamedTuple

from earshot.core.decoding import (
    Backend,
    DecodeOptions,
    Fallback,
    Hypothesis,
    Window,
    check_window,
)
from earshot.core.errors import ConfigError, InvalidRequestError, SchedulerStoppedError
from earshot.service.engine.queue import DecodeQueue, InFlight, QueuedJob
from earshot.service.engine.queue import JobKind as JobKind
from earshot.service.engine.queue import QueueDepth as QueueDepth
from earshot.service.engine.queue import SchedulerSettings as SchedulerSettings
from earshot.service.sovereignty import egress_reason

log = logging.getLogger("earshot.scheduler")

THREAD_NAME_PREFIX = "earshot-decode"
"""Name prefix of the scheduler's worker thread (one per running scheduler)."""


FALLBACK_REASONS = ("overload", "failure")
"""Why work may go to the fallback backend (``Scheduler(fallback_on=...)``)."""


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


class _Ticket(NamedTuple):
    """What the scheduler attaches to a queued job: the job and its future."""

    job: DecodeJob
    future: asyncio.Future[Hypothesis | None]


_Entry = QueuedJob[_Ticket]


def _live(ticket: _Ticket) -> bool:
    """A queued job is withdrawn once its future is done (the submitter cancelled it)."""
    return not ticket.future.done()


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

        self._queue: DecodeQueue[_Ticket] = DecodeQueue(settings, now=time.monotonic())
        self._in_flight: list[InFlight] = []
        self._decoding: set[asyncio.Task[None]] = set()

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
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.workers, thread_name_prefix=THREAD_NAME_PREFIX
        )
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
        check_window(job.window)

        now = time.monotonic()
        job = replace(job, submitted_at=now)
        future: asyncio.Future[Hypothesis | None] = self._loop.create_future()
        self._submitted[job.kind] += 1
        superseded = self._queue.push(
            job.key, job.kind, self.options_for(job), _Ticket(job, future), now=now
        )
        if superseded is not None:
            self._supersede(superseded)
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
        entry = self._queue.drop_interim(key)
        if entry is None:
            return False
        self._supersede(entry)
        return True

    def _supersede(self, entry: _Entry) -> None:
        future = entry.payload.future
        if future.done():
            self._cancelled += 1
        else:
            future.set_result(None)
            self._superseded += 1

    # -- observing ---------------------------------------------------------
    @property
    def queue_depth(self) -> QueueDepth:
        """Jobs queued and not yet in a batch (futures the caller cancelled included)."""
        return self._queue.depth

    @property
    def in_flight(self) -> int:
        """Jobs in the batch the backend is decoding now (0 when idle)."""
        return sum(batch.size for batch in self._in_flight)

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
            ewma_batch_seconds=self._queue.ewma_batch_seconds,
            ewma_window_seconds=self._queue.ewma_window_seconds,
            fallback_completed=dict(self._fallback_completed),
            fallback_failed=dict(self._fallback_failed),
        )

    def seconds_per_window(self, kind: JobKind) -> float:
        """The moving average of backend seconds per window of ``kind``
        (``prior_window_s`` until a batch of that kind has been measured)."""
        return self._queue.seconds_per_window(kind)

    def estimated_wait(self, kind: JobKind) -> float:
        """Seconds until a job of ``kind`` submitted now would be decoded.

        The rest of the batch in flight, plus every queued job served before it
        (all queued finals; for an interim, all queued interims too) and
        itself, each at the moving average of seconds per window of its kind,
        plus ``max_wait_ms`` (:meth:`DecodeQueue.estimated_wait`). Per-window
        cost times job count is what batches cost on the CPU, and what full
        batches cost on a GPU, which is when the estimate matters. It does not
        foresee finals submitted later, which go before a waiting interim.
        """
        return self._queue.estimated_wait(kind, now=time.monotonic(), in_flight=self._in_flight)

    def should_submit_interim(self, key: Hashable) -> bool:
        """Whether a stream should submit an interim for ``key`` now.

        True when ``key`` already has an interim queued (the new one just
        replaces it and adds no work); otherwise True only while the estimated
        interim wait is within ``interim_max_wait_s``, or as a probe after
        ``interim_probe_s`` without a decoded interim
        (:meth:`DecodeQueue.should_submit_interim`). False when not running.
        A stream told no should simply try again at its next interim step.
        """
        if not self.running:
            return False
        return self._queue.should_submit_interim(
            key, now=time.monotonic(), in_flight=self._in_flight
        )

    def is_overloaded(self) -> bool:
        """True when the server should refuse new streams (HTTP 503).

        The queue holds ``max_queue`` jobs or more, or a final submitted now is
        expected to take longer than ``overload_final_wait_s``.
        """
        return self.overload_reason() is not None

    def overload_reason(self) -> str | None:
        """Why the server is overloaded now, naming the limit and the numbers
        (for refusals), or None when it is not."""
        return self._queue.overload_reason(now=time.monotonic(), in_flight=self._in_flight)

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
                await self._free_worker()
                kind = await self._next_kind()
                if kind is None:
                    if self._decoding:
                        await asyncio.wait(self._decoding)
                    return
                batch = self._take(kind)
                if batch:
                    task = asyncio.ensure_future(self._decode(kind, batch))
                    self._decoding.add(task)
                    task.add_done_callback(self._decoding.discard)
        except asyncio.CancelledError:
            for task in self._decoding:
                task.cancel()
            if self._decoding:
                await asyncio.wait(self._decoding)
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
                finals = self._queue.depth.finals
                if finals and self.is_overloaded() and self.fallback_available("overload"):
                    batch = self._take(JobKind.FINAL)
                    if batch:
                        await self._decode(JobKind.FINAL, batch, fallback_reason="overload")
                    continue
                if self._stopping and not finals:
                    return
                self._fallback_wake.clear()
                await self._fallback_wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("fallback batcher failed; the local batcher goes on alone")

    async def _free_worker(self) -> None:
        """Wait until fewer than ``workers`` local batches are decoding."""
        while len(self._decoding) >= self.settings.workers:
            await asyncio.wait(self._decoding, return_when=asyncio.FIRST_COMPLETED)

    async def _next_kind(self) -> JobKind | None:
        """Wait until a batch should be formed; its kind, or None to end."""
        assert self._wake is not None
        while True:
            if self._stopping and not self._draining:
                return None
            now = time.monotonic()
            # Draining: take what is queued without waiting for batches to fill.
            choice = self._queue.next_batch(now, flush=self._stopping)
            if choice is None:
                if self._stopping:
                    return None
                self._wake.clear()
                await self._wake.wait()
                continue
            if choice.due(now):
                return choice.kind
            # Any submit wakes us: the batch may be full, or a final may have
            # arrived while we waited for interims.
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), choice.take_at - now)

    def options_for(self, job: DecodeJob) -> DecodeOptions:
        """The options ``job`` is decoded with: its own, or those of its kind."""
        return job.options if job.options is not None else self._options[job.kind]

    def _take(self, kind: JobKind) -> list[_Entry]:
        """Take the next batch of ``kind`` from the queue (:meth:`DecodeQueue.take`),
        counting the withdrawn jobs it skipped."""
        batch = self._queue.take(kind, _live)
        self._cancelled += len(batch.dropped)
        return batch.jobs

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
        windows = [entry.payload.job.window for entry in batch]
        options = batch[0].options
        started = time.monotonic()
        queue_seconds = tuple(
            started - (entry.payload.job.submitted_at or started) for entry in batch
        )
        if remote:
            self._fallback_in_flight += len(batch)
        else:
            flight = InFlight(kind, len(batch), started)
            self._in_flight.append(flight)
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
            failure = stopped if isinstance(exc, asyncio.CancelledError) else exc
            for entry in batch:
                if _fail(entry.payload.future, failure):
                    self._aborted += 1
            raise
        finally:
            if remote:
                self._fallback_in_flight -= len(batch)
            else:
                self._in_flight.remove(flight)
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
                self._queue.observe(kind, len(batch), seconds, now=time.monotonic())
            else:
                self._failed[kind] += len(batch)
                self._failed_batches[kind] += 1
        if error is None:
            for entry, hyp in zip(batch, hyps, strict=True):
                if not entry.payload.future.done():
                    entry.payload.future.set_result(hyp)
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
                self._queue.put_back(entry for entry in batch if _live(entry.payload))
                self._wake_all()
            elif not retry:
                for entry in batch:
                    _fail(entry.payload.future, local_error or error)
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
            live = [entry for entry in batch if _live(entry.payload)]
            if live:
                await self._decode(kind, live, fallback_reason="failure", local_error=error)

    def _abort_queued(self) -> None:
        """Fail every queued job with SchedulerStoppedError."""
        if not len(self._queue):
            return
        stopped = SchedulerStoppedError("the decode scheduler stopped before this job was decoded")
        for entry in self._queue.clear():
            if _fail(entry.payload.future, stopped):
                self._aborted += 1
            else:
                self._cancelled += 1
