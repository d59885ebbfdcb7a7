"""The decode scheduler: batching policy, superseding, failures, shutdown, estimates.

Each test runs its own event loop with ``asyncio.run`` (no plugin needed) and
a fake backend defined here. A batch is held "in flight" with a threading gate
so that what is queued behind it is known exactly; timings are only asserted
where the behaviour is about time (max_wait_ms), with generous bounds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import pytest

from earshot.core.decoding import DecodeOptions, Hypothesis, Window, default_max_batch
from earshot.core.errors import ConfigError, InvalidRequestError, SchedulerStoppedError
from earshot.service.engine.scheduler import (
    BatchReport,
    DecodeJob,
    JobKind,
    Scheduler,
    SchedulerSettings,
)

T = TypeVar("T")

FINAL_OPTIONS = DecodeOptions(beam_size=5)
INTERIM_OPTIONS = DecodeOptions(beam_size=1)
FINAL = JobKind.FINAL
INTERIM = JobKind.INTERIM


class FakeBackend:
    """Records every call; answers each window with its prompt as the text.

    ``gate``: when set, calls block until it is opened (``release()``), which
    holds a batch in flight. ``delay``: seconds each call sleeps. A window
    whose prompt starts with "boom" makes the whole call raise ValueError.
    """

    name = "fake"

    def __init__(self, *, delay: float = 0.0, gated: bool = False) -> None:
        self.delay = delay
        self.calls: list[tuple[list[str], DecodeOptions]] = []
        self.threads: set[int] = set()
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name}

    def release(self) -> None:
        self.gate.set()

    def transcribe_batch(
        self, windows: Sequence[Window], options: DecodeOptions
    ) -> list[Hypothesis]:
        self.threads.add(threading.get_ident())
        prompts = [w.prompt or "" for w in windows]
        self.calls.append((prompts, options))
        self.entered.set()
        self.gate.wait(timeout=5.0)
        if self.delay:
            time.sleep(self.delay)
        if any(p.startswith("boom") for p in prompts):
            raise ValueError("boom")
        return [
            Hypothesis(
                text=p, tokens=(), segments=(), language="en", avg_logprob=0.0, no_speech_prob=0.0
            )
            for p in prompts
        ]

    @property
    def batches(self) -> list[list[str]]:
        return [prompts for prompts, _ in self.calls]


def window(prompt: str, seconds: float = 0.1) -> Window:
    return Window(audio=np.zeros(int(16000 * seconds), dtype=np.float32), prompt=prompt)


def job(kind: JobKind, prompt: str, key: object = None) -> DecodeJob:
    return DecodeJob(key=key if key is not None else prompt, kind=kind, window=window(prompt))


def make(
    backend: FakeBackend,
    on_batch: Callable[[BatchReport], None] | None = None,
    *,
    fallback: FakeBackend | None = None,
    fallback_on: frozenset[str] = frozenset(),
    **settings: Any,
) -> Scheduler:
    settings.setdefault("max_wait_ms", 0.0)
    return Scheduler(
        backend,
        SchedulerSettings(**settings),
        final_options=FINAL_OPTIONS,
        interim_options=INTERIM_OPTIONS,
        on_batch=on_batch,
        fallback=fallback,
        fallback_on=fallback_on,
    )


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout=10.0)

    return asyncio.run(bounded())


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def hold_first_batch(sched: Scheduler, backend: FakeBackend) -> asyncio.Future[Any]:
    """Submit one interim and wait until the backend is blocked on it."""
    fut = sched.submit(job(INTERIM, "first", key="holder"))
    await until(backend.entered.is_set)
    return fut


def backend_threads_alive(backend: FakeBackend) -> bool:
    return any(t.ident in backend.threads for t in threading.enumerate())


def text(result: Hypothesis | None) -> str | None:
    return None if result is None else result.text


# -- settings ---------------------------------------------------------------


def test_default_max_batch_by_device() -> None:
    assert default_max_batch("cpu", live=True) == 1
    assert default_max_batch("cpu", live=False) == 4
    assert default_max_batch("cuda", live=True) == 16
    assert default_max_batch("cuda:1", live=False) == 16
    with pytest.raises(ConfigError):
        default_max_batch("auto", live=True)
    cpu = SchedulerSettings.for_device("cpu")
    assert (cpu.max_batch, cpu.max_wait_ms) == (1, 0.0)
    gpu = SchedulerSettings.for_device("cuda", max_queue=10)
    assert (gpu.max_batch, gpu.max_wait_ms, gpu.max_queue) == (16, 10.0, 10)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_batch", 0),
        ("max_wait_ms", -1.0),
        ("max_queue", 0),
        ("interim_max_wait_s", 0.0),
        ("overload_final_wait_s", -1.0),
        ("ewma_alpha", 0.0),
        ("ewma_alpha", 1.5),
        ("prior_window_s", float("nan")),
    ],
)
def test_settings_are_validated(field: str, value: float) -> None:
    overrides: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError) as info:
        SchedulerSettings(**overrides)
    assert info.value.details["field"] == field
    assert field in str(info.value)


# -- batching policy ---------------------------------------------------------


def test_batches_never_exceed_max_batch_and_go_oldest_first() -> None:
    async def main() -> None:
        backend = FakeBackend(gated=True)
        async with make(backend, max_batch=3) as sched:
            await hold_first_batch(sched, backend)
            futs = [sched.submit(job(FINAL, f"f{i}")) for i in range(10)]
            assert sched.queue_depth == (10, 0)
            assert sched.in_flight == 1
            backend.release()
            results = await asyncio.gather(*futs)
        assert [text(r) for r in results] == [f"f{i}" for i in range(10)]
        assert backend.batches[1:] == [
            ["f0", "f1", "f2"],
            ["f3", "f4", "f5"],
            ["f6", "f7", "f8"],
            ["f9"],
        ]
        assert all(len(b) <= 3 for b in backend.batches)

    run(main())


def test_finals_go_before_interims_queued_earlier_with_their_own_options() -> None:
    async def main() -> None:
        backend = FakeBackend(gated=True)
        async with make(backend, max_batch=4) as sched:
            await hold_first_batch(sched, backend)
            interims = [sched.submit(job(INTERIM, f"i{i}")) for i in range(3)]
            finals = [sched.submit(job(FINAL, f"f{i}")) for i in range(2)]
            backend.release()
            await asyncio.gather(*interims, *finals)
        assert backend.calls[1:] == [
            (["f0", "f1"], FINAL_OPTIONS),
            (["i0", "i1", "i2"], INTERIM_OPTIONS),
        ]
        assert backend.calls[0] == (["first"], INTERIM_OPTIONS)
        stats = sched.stats()
        assert stats.batches == {FINAL: 1, INTERIM: 2}
        assert stats.completed == {FINAL: 2, INTERIM: 4}

    run(main())


def test_a_batch_holds_only_jobs_with_equal_options_and_others_keep_their_place() -> None:
    translate = DecodeOptions(beam_size=5, task="translate")

    async def main() -> None:
        backend = FakeBackend(gated=True)
        async with make(backend, max_batch=4) as sched:
            await hold_first_batch(sched, backend)
            futs = [
                sched.submit(job(FINAL, "f0")),
                sched.submit(DecodeJob("t0", FINAL, window("t0"), options=translate)),
                sched.submit(job(FINAL, "f1")),
                sched.submit(DecodeJob("t1", FINAL, window("t1"), options=translate)),
                sched.submit(job(FINAL, "f2")),
                sched.submit(job(INTERIM, "i0")),
                sched.submit(DecodeJob("i1", INTERIM, window("i1"), options=translate)),
            ]
            backend.release()
            results = await asyncio.gather(*futs)
        assert [text(r) for r in results] == ["f0", "t0", "f1", "t1", "f2", "i0", "i1"]
        assert backend.calls[1:] == [
            (["f0", "f1", "f2"], FINAL_OPTIONS),
            (["t0", "t1"], translate),
            (["i0"], INTERIM_OPTIONS),
            (["i1"], translate),
        ]

    run(main())


def test_newer_interim_replaces_queued_one_of_same_key_only() -> None:
    async def main() -> None:
        backend = FakeBackend(gated=True)
        async with make(backend, max_batch=8) as sched:
            await hold_first_batch(sched, backend)
            a1 = sched.submit(job(INTERIM, "a1", key=("s1", 0)))
            b1 = sched.submit(job(INTERIM, "b1", key=("s1", 1)))
            a2 = sched.submit(job(INTERIM, "a2", key=("s1", 0)))
            # Superseded at once, not after the backend frees up.
            assert a1.done() and a1.result() is None
            assert not b1.done()
            assert sched.queue_depth == (0, 2)
            backend.release()
            assert text(await a2) == "a2"
            assert text(await b1) == "b1"
        # a2 took a1's place in the queue, ahead of b1.
        assert backend.batches[1:] == [["a2", "b1"]]
        assert sched.stats().superseded == 1

    run(main())


def test_interim_in_flight_is_not_replaced() -> None:
    async def main() -> None:
        backend = FakeBackend(gated=True)
        async with make(backend) as sched:
            first = await hold_first_batch(sched, backend)
            newer = sched.submit(job(INTERIM, "second", key="holder"))
            assert not first.done()
            backend.release()
            assert text(await first) == "first"
            assert text(await newer) == "second"
        assert sched.stats().superseded == 0

    run(main())


def test_finals_are_never_dropped_or_replaced() -> None:
    async def main() -> None:
        backend = FakeBackend(gated=True)
        async with make(backend, max_batch=2) as sched:
            await hold_first_batch(sched, backend)
            finals = []
            for i in range(5):
                finals.append(sched.submit(job(FINAL, f"f{i}", key="s")))
                sched.submit(job(INTERIM, f"i{i}", key="s"))
            assert sched.drop_interim("s") is True
            assert sched.drop_interim("s") is False
            backend.release()
            results = await asyncio.gather(*finals)
        assert [text(r) for r in results] == [f"f{i}" for i in range(5)]
        stats = sched.stats()
        assert stats.superseded == 5
        assert stats.completed[FINAL] == 5
        assert not any(p.startswith("i") for b in backend.batches for p in b)

    run(main())


def test_max_wait_lets_a_batch_fill() -> None:
    async def main() -> None:
        backend = FakeBackend()
        async with make(backend, max_batch=4, max_wait_ms=300.0) as sched:
            futs = [sched.submit(job(INTERIM, "a"))]
            await asyncio.sleep(0.02)
            futs.append(sched.submit(job(INTERIM, "b")))
            await asyncio.sleep(0.02)
            futs.append(sched.submit(job(INTERIM, "c")))
            await asyncio.gather(*futs)
        assert backend.batches == [["a", "b", "c"]]

    run(main())


def test_lone_job_waits_about_max_wait_and_full_batch_does_not_wait() -> None:
    async def main() -> None:
        backend = FakeBackend()
        async with make(backend, max_batch=2, max_wait_ms=60.0) as sched:
            started = time.monotonic()
            await sched.submit(job(FINAL, "alone"))
            alone = time.monotonic() - started
        assert 0.04 <= alone < 0.5
        async with make(backend, max_batch=2, max_wait_ms=5000.0) as sched:
            started = time.monotonic()
            await asyncio.gather(sched.submit(job(FINAL, "x")), sched.submit(job(FINAL, "y")))
            full = time.monotonic() - started
        assert full < 1.0

    run(main())


def test_final_arriving_during_an_interim_wait_goes_first() -> None:
    async def main() -> None:
        backend = FakeBackend()
        async with make(backend, max_batch=4, max_wait_ms=100.0) as sched:
            interim = sched.submit(job(INTERIM, "i"))
            await asyncio.sleep(0.03)
            started = time.monotonic()
            final = sched.submit(job(FINAL, "f"))
            await final
            assert time.monotonic() - started < 0.6
            await interim
        assert backend.calls == [(["f"], FINAL_OPTIONS), (["i"], INTERIM_OPTIONS)]

    run(main())


# -- failures and cancellation -----------------------------------------------


def test_backend_exception_fails_only_its_batch() -> None:
    async def main() -> None:
        reports: list[BatchReport] = []
        backend = FakeBackend(gated=True)
        async with make(backend, on_batch=reports.append, max_batch=2) as sched:
            await hold_first_batch(sched, backend)
            bad = sched.submit(job(FINAL, "boom"))
            same_batch = sched.submit(job(FINAL, "ok1"))
            later = sched.submit(job(FINAL, "ok2"))
            backend.release()
            with pytest.raises(ValueError, match="boom"):
                await bad
            with pytest.raises(ValueError, match="boom"):
                await same_batch
            assert text(await later) == "ok2"
            assert sched.running
            assert text(await sched.submit(job(INTERIM, "after"))) == "after"
        stats = sched.stats()
        assert stats.failed == {FINAL: 2, INTERIM: 0}
        assert stats.failed_batches == {FINAL: 1, INTERIM: 0}
        assert [(r.kind, r.size, r.error is None) for r in reports] == [
            (INTERIM, 1, True),
            (FINAL, 2, False),
            (FINAL, 1, True),
            (INTERIM, 1, True),
        ]

    run(main())


def test_failing_hook_and_wrong_hypothesis_count_do_not_stop_the_scheduler() -> None:
    class ShortBackend(FakeBackend):
        def transcribe_batch(
            self, windows: Sequence[Window], options: DecodeOptions
        ) -> list[Hypothesis]:
            return super().transcribe_batch(windows, options)[:-1]

    def hook(report: BatchReport) -> None:
        raise RuntimeError("metrics are broken")

    async def main() -> None:
        async with make(ShortBackend(), on_batch=hook) as sched:
            with pytest.raises(RuntimeError, match="returned 0 hypotheses for 1 windows"):
                await sched.submit(job(FINAL, "x"))
            assert sched.running

    run(main())


def test_cancelled_job_is_not_decoded() -> None:
    async def main() -> None:
        backend = FakeBackend(gated=True)
        async with make(backend) as sched:
            await hold_first_batch(sched, backend)
            gone = sched.submit(job(FINAL, "gone"))
            kept = sched.submit(job(FINAL, "kept"))
            gone.cancel()
            backend.release()
            assert text(await kept) == "kept"
        assert backend.batches[1:] == [["kept"]]
        assert sched.stats().cancelled == 1

    run(main())


def test_bad_windows_are_refused_at_submit() -> None:
    async def main() -> None:
        backend = FakeBackend()
        sched = make(backend)
        with pytest.raises(SchedulerStoppedError):
            sched.submit(job(FINAL, "early"))
        async with sched:
            too_long = DecodeJob(key="k", kind=FINAL, window=window("long", seconds=31.0))
            with pytest.raises(InvalidRequestError):
                sched.submit(too_long)
            stereo = Window(audio=np.zeros((2, 1600), dtype=np.float32))
            with pytest.raises(InvalidRequestError):
                sched.submit(DecodeJob(key="k", kind=FINAL, window=stereo))
        assert backend.calls == []

    run(main())


# -- threads, loop and shutdown -------------------------------------------------


def test_backend_runs_in_one_worker_thread_and_loop_stays_responsive() -> None:
    async def main() -> None:
        backend = FakeBackend(delay=0.3)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async with make(backend, max_batch=1) as sched:
            task = asyncio.create_task(ticker())
            await asyncio.gather(sched.submit(job(FINAL, "a")), sched.submit(job(FINAL, "b")))
            task.cancel()
        assert ticks >= 20  # 0.6 s of backend work, ticking every 10 ms
        assert len(backend.threads) == 1
        assert threading.get_ident() not in backend.threads

    run(main())


def test_stop_settles_every_future_and_ends_the_thread() -> None:
    async def main() -> None:
        backend = FakeBackend(gated=True)
        sched = make(backend)
        await sched.start()
        first = await hold_first_batch(sched, backend)
        queued = [sched.submit(job(FINAL, "f")), sched.submit(job(INTERIM, "i"))]
        stopping = asyncio.create_task(sched.stop())
        await asyncio.sleep(0.01)
        # Queued jobs fail at once; the batch in flight is finished.
        for fut in queued:
            assert fut.done()
            with pytest.raises(SchedulerStoppedError):
                fut.result()
        assert not sched.running
        with pytest.raises(SchedulerStoppedError):
            sched.submit(job(FINAL, "late"))
        backend.release()
        await stopping
        assert text(first.result()) == "first"
        assert not backend_threads_alive(backend)
        assert sched.stats().aborted == 2
        await sched.stop()  # idempotent

    run(main())


def test_stop_with_drain_decodes_what_is_queued_without_waiting() -> None:
    async def main() -> None:
        backend = FakeBackend()
        sched = make(backend, max_batch=2, max_wait_ms=5000.0)
        await sched.start()
        futs = [sched.submit(job(FINAL, f"f{i}")) for i in range(3)]
        futs.append(sched.submit(job(INTERIM, "i")))
        started = time.monotonic()
        await sched.stop(drain=True)
        assert time.monotonic() - started < 1.0  # f2 and i did not wait to fill a batch
        assert [text(f.result()) for f in futs] == ["f0", "f1", "f2", "i"]
        assert backend.batches == [["f0", "f1"], ["f2"], ["i"]]
        assert not backend_threads_alive(backend)

    run(main())


def test_stop_timeout_abandons_a_stuck_batch() -> None:
    async def main() -> None:
        backend = FakeBackend(gated=True)
        sched = make(backend)
        await sched.start()
        first = await hold_first_batch(sched, backend)
        queued = sched.submit(job(FINAL, "f"))
        started = time.monotonic()
        await sched.stop(timeout=0.1)
        assert time.monotonic() - started < 1.0
        for fut in (first, queued):
            with pytest.raises(SchedulerStoppedError):
                fut.result()
        backend.release()  # let the abandoned call end
        await until(lambda: not backend_threads_alive(backend))

    run(main())


# -- estimates and load --------------------------------------------------------


def test_estimates_grow_with_queue_depth_and_drive_the_load_knobs() -> None:
    async def main() -> None:
        backend = FakeBackend(gated=True)
        sched = make(
            backend,
            prior_window_s=0.5,
            interim_max_wait_s=2.0,
            max_queue=7,
            overload_final_wait_s=10.0,
        )
        async with sched:
            idle_final = sched.estimated_wait(FINAL)
            assert idle_final == pytest.approx(0.5)
            assert sched.should_submit_interim("s0")
            await hold_first_batch(sched, backend)
            depths = []
            for i in range(5):
                sched.submit(job(FINAL, f"f{i}"))
                depths.append(sched.estimated_wait(FINAL))
            assert depths == sorted(depths) and depths[-1] > depths[0] > idle_final
            assert sched.estimated_wait(INTERIM) > sched.estimated_wait(FINAL)
            # 5 finals ahead at 0.5 s each: a new interim would wait > 2 s.
            assert not sched.should_submit_interim("s0")
            sched.submit(job(INTERIM, "queued", key="s1"))
            assert sched.should_submit_interim("s1")  # it would only replace
            assert not sched.is_overloaded()  # 6 queued, final wait 3.5 s
            sched.submit(job(INTERIM, "more", key="s2"))  # 7: the watermark
            assert sched.is_overloaded()
            backend.release()
            await until(lambda: sched.queue_depth == (0, 0) and sched.in_flight == 0)
            stats = sched.stats()
            measured = stats.ewma_window_seconds[FINAL]
            assert measured is not None and measured < 0.5  # measured, not the prior
            assert sched.estimated_wait(FINAL) < idle_final
            assert not sched.is_overloaded()

    run(main())


def test_overload_by_estimated_final_wait() -> None:
    async def main() -> None:
        backend = FakeBackend(gated=True)
        async with make(backend, prior_window_s=1.0, overload_final_wait_s=3.5) as sched:
            first = await hold_first_batch(sched, backend)
            futs = [first, sched.submit(job(FINAL, "f0"))]
            assert not sched.is_overloaded()  # about 1 s in flight + 2 s
            futs += [sched.submit(job(FINAL, "f1")), sched.submit(job(FINAL, "f2"))]
            assert sched.is_overloaded()
            backend.release()
            await asyncio.gather(*futs)

    run(main())


def test_interims_recover_after_one_slow_batch() -> None:
    """A cold first batch must not shut interims out for good."""

    async def main() -> list[bool]:
        backend = _ProbeBackend()
        sched = Scheduler(
            backend,
            SchedulerSettings(max_batch=1, interim_max_wait_s=0.5, interim_probe_s=0.2),
            final_options=DecodeOptions(beam_size=2),
            interim_options=DecodeOptions(),
        )
        await sched.start()
        try:
            backend.delay = 1.0  # the cold start
            await sched.submit(DecodeJob("a", JobKind.INTERIM, _window()))
            backend.delay = 0.0
            answers = [sched.should_submit_interim("b")]  # estimate: 1 s > 0.5 s
            await asyncio.sleep(0.3)
            answers.append(sched.should_submit_interim("b"))  # probe after 0.2 s idle
            await sched.submit(DecodeJob("b", JobKind.INTERIM, _window()))
            return answers
        finally:
            await sched.stop()

    assert asyncio.run(main()) == [False, True]


class _ProbeBackend:
    name = "probe"
    delay = 0.0

    def provenance(self) -> dict[str, object]:
        return {}

    def transcribe_batch(self, windows: Any, options: DecodeOptions) -> list[Hypothesis]:
        time.sleep(self.delay)
        return [Hypothesis("x", (), (), "en", 0.0, 0.0) for _ in windows]


def _window() -> Window:
    return Window(np.zeros(1600, np.float32))


# -- the fallback ---------------------------------------------------------------


class FallbackBackend(FakeBackend):
    """A FakeBackend with a circuit breaker's ``available()`` switch."""

    name = "remote:fake"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.up = True

    def available(self) -> bool:
        return self.up

    def transcribe_batch(
        self, windows: Sequence[Window], options: DecodeOptions
    ) -> list[Hypothesis]:
        # Unlike the local fake, it decodes "boom" windows fine.
        renamed = [replace(w, prompt=(w.prompt or "").replace("boom", "BOOM")) for w in windows]
        hyps = super().transcribe_batch(renamed, options)
        return [replace(h, text=h.text.replace("BOOM", "boom")) for h in hyps]


BOTH = frozenset({"overload", "failure"})


def make_with_fallback(
    local: FakeBackend,
    fallback: FakeBackend,
    fallback_on: frozenset[str] = BOTH,
    reports: list[BatchReport] | None = None,
    **settings: Any,
) -> Scheduler:
    hook = None if reports is None else reports.append
    return make(local, hook, fallback=fallback, fallback_on=fallback_on, **settings)


def test_overflow_goes_to_the_fallback_finals_only_and_is_marked() -> None:
    async def main() -> None:
        local, remote = FakeBackend(gated=True), FallbackBackend()
        reports: list[BatchReport] = []
        async with make_with_fallback(
            local, remote, reports=reports, max_batch=2, max_queue=3
        ) as sched:
            await hold_first_batch(sched, local)
            interims = [sched.submit(job(INTERIM, f"i{i}")) for i in range(2)]
            finals = [sched.submit(job(FINAL, f"f{i}")) for i in range(4)]
            # Queue: 2 interims + 4 finals, past max_queue 3: finals overflow
            # to the fallback until the queue is back under the watermark.
            await until(lambda: not sched.is_overloaded())
            local.release()
            results = await asyncio.gather(*finals, *interims)
        remote_prompts = [p for prompts, _ in remote.calls for p in prompts]
        assert remote_prompts == ["f0", "f1", "f2", "f3"][: len(remote_prompts)]
        assert 1 <= len(remote_prompts) <= 4
        assert not any(p.startswith("i") for p in remote_prompts)
        by_text = {r.text: r for r in results if r is not None}
        for p in remote_prompts:
            info = by_text[p].info
            assert info["fallback"] == "overload" and info["backend"] == "remote"
            assert info["name"] == "remote:fake"
        for r in results:
            if r is not None and r.text not in remote_prompts:
                assert "fallback" not in r.info
        stats = sched.stats()
        assert stats.fallback_completed["overload"] == len(remote_prompts)
        assert stats.completed[FINAL] == 4 - len(remote_prompts)
        fallback_reports = [r for r in reports if r.fallback_reason == "overload"]
        assert sum(r.size for r in fallback_reports) == len(remote_prompts)
        assert {r.backend for r in fallback_reports} == {"remote:fake"}

    run(main())


def test_no_fallback_while_it_is_unavailable_or_not_enabled() -> None:
    async def main(remote: FallbackBackend, fallback_on: frozenset[str]) -> Scheduler:
        local = FakeBackend(gated=True)
        async with make_with_fallback(
            local, remote, fallback_on, max_batch=2, max_queue=1
        ) as sched:
            await hold_first_batch(sched, local)
            finals = [sched.submit(job(FINAL, f"f{i}")) for i in range(3)]
            await asyncio.sleep(0.1)
            assert sched.is_overloaded() and not sched.accepting()
            local.release()
            await asyncio.gather(*finals)
        return sched

    down = FallbackBackend()
    down.up = False
    run(main(down, frozenset({"overload"})))
    assert down.calls == []
    unused = FallbackBackend()
    run(main(unused, frozenset({"failure"})))
    assert unused.calls == []


def test_a_failed_local_batch_is_decoded_again_on_the_fallback() -> None:
    async def main() -> tuple[list[Any], Scheduler]:
        local, remote = FakeBackend(), FallbackBackend()
        async with make_with_fallback(local, remote, frozenset({"failure"})) as sched:
            results = await asyncio.gather(sched.submit(job(FINAL, "boom-1")))
        return list(results), sched

    results, sched = run(main())
    assert results[0].text == "boom-1"  # the fake answers with the prompt
    assert results[0].info["fallback"] == "failure"
    stats = sched.stats()
    assert stats.failed[FINAL] == 1 and stats.fallback_completed["failure"] == 1


def test_when_the_fallback_fails_too_the_local_error_is_reported() -> None:
    class Broken(FallbackBackend):
        def transcribe_batch(
            self, windows: Sequence[Window], options: DecodeOptions
        ) -> list[Hypothesis]:
            self.calls.append(([w.prompt or "" for w in windows], options))
            raise ConnectionError("remote down")

    async def main() -> Scheduler:
        local, remote = FakeBackend(), Broken()
        async with make_with_fallback(local, remote, frozenset({"failure"})) as sched:
            with pytest.raises(ValueError, match="boom"):
                await sched.submit(job(FINAL, "boom-2"))
        assert len(remote.calls) == 1
        return sched

    sched = run(main())
    assert sched.stats().fallback_failed["failure"] == 1


def test_fallback_reasons_are_checked() -> None:
    with pytest.raises(ConfigError, match="fallback_on"):
        make_with_fallback(FakeBackend(), FallbackBackend(), frozenset({"always"}))


def test_overflow_the_fallback_fails_goes_back_to_the_local_queue() -> None:
    class Down(FallbackBackend):
        def transcribe_batch(
            self, windows: Sequence[Window], options: DecodeOptions
        ) -> list[Hypothesis]:
            self.calls.append(([w.prompt or "" for w in windows], options))
            self.up = False  # as a circuit breaker would open
            raise ConnectionError("remote down")

    async def main() -> tuple[list[Any], Down, Scheduler]:
        local, remote = FakeBackend(gated=True), Down()
        async with make_with_fallback(local, remote, max_batch=1, max_queue=2) as sched:
            await hold_first_batch(sched, local)
            finals = [sched.submit(job(FINAL, f"f{i}")) for i in range(3)]
            await until(lambda: len(remote.calls) == 1)
            local.release()
            results = await asyncio.gather(*finals)
        return list(results), remote, sched

    results, remote, sched = run(main())
    assert [r.text for r in results] == ["f0", "f1", "f2"]
    assert all("fallback" not in r.info for r in results)
    assert remote.calls[0][0] == ["f0"]
    stats = sched.stats()
    assert stats.fallback_failed["overload"] == 1 and stats.completed[FINAL] == 3


# -- decode workers -------------------------------------------------------------


class _CountingBackend(FakeBackend):
    """Records the most batches that were inside the backend at once."""

    def __init__(self) -> None:
        super().__init__(gated=True)
        self._inside = 0
        self.most_inside = 0
        self._count = threading.Lock()

    def transcribe_batch(
        self, windows: Sequence[Window], options: DecodeOptions
    ) -> list[Hypothesis]:
        with self._count:
            self._inside += 1
            self.most_inside = max(self.most_inside, self._inside)
        try:
            return super().transcribe_batch(windows, options)
        finally:
            with self._count:
                self._inside -= 1


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_decode_that_many_batches_at_once(workers: int) -> None:
    backend = _CountingBackend()

    async def main() -> list[Hypothesis | None]:
        async with make(backend, max_batch=1, workers=workers) as sched:
            futures = [sched.submit(job(JobKind.FINAL, f"f{i}")) for i in range(4)]
            # Every free worker takes a batch; the rest stay queued behind the gate.
            await until(lambda: len(backend.calls) == workers)
            await asyncio.sleep(0.05)
            assert len(backend.calls) == workers
            assert sched.in_flight == workers
            assert sched.queue_depth.finals == 4 - workers
            backend.release()
            return list(await asyncio.gather(*futures))

    hyps = run(main())
    assert [h.text for h in hyps if h is not None] == ["f0", "f1", "f2", "f3"]
    assert backend.most_inside == workers
    assert len(backend.threads) == min(workers, 4)
