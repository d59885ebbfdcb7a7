"""The pure decode queue (service/engine/queue.py): table tests over scripted submissions.

No threads, no sleeps, no event loop: every time is a number given to the
queue. A submission is ``(kind, key, at)`` plus a name; the name is the
entry's payload, so batches are compared as lists of names.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest

from earshot.core.decoding import DecodeOptions
from earshot.service.engine.queue import (
    BatchChoice,
    DecodeQueue,
    InFlight,
    JobKind,
    QueueDepth,
    SchedulerSettings,
)

F = JobKind.FINAL
I = JobKind.INTERIM  # noqa: E741
BEAM = DecodeOptions(beam_size=5)
GREEDY = DecodeOptions(beam_size=1)
TRANSLATE = DecodeOptions(beam_size=5, task="translate")


class Sub(NamedTuple):
    """One scripted submission: ``name`` is the payload; the key defaults to it."""

    kind: JobKind
    name: str
    at: float = 0.0
    key: str | None = None
    options: DecodeOptions | None = None


def queue(**settings: Any) -> DecodeQueue[str]:
    """A queue at time 0 with ``settings`` (``max_wait_ms`` 0 unless given)."""
    settings.setdefault("max_wait_ms", 0.0)
    return DecodeQueue(SchedulerSettings(**settings), now=0.0)


def push_all(q: DecodeQueue[str], subs: list[Sub]) -> list[str]:
    """Submit ``subs`` in order; the names of the interims they superseded."""
    superseded = []
    for sub in subs:
        options = sub.options or (BEAM if sub.kind is F else GREEDY)
        old = q.push(sub.key or sub.name, sub.kind, options, sub.name, now=sub.at)
        if old is not None:
            superseded.append(old.payload)
    return superseded


def drain(q: DecodeQueue[str]) -> list[tuple[JobKind, list[str]]]:
    """Take every batch the queue would give, in order, without waiting."""
    batches = []
    while (choice := q.next_batch(100.0, flush=True)) is not None:
        batch = q.take(choice.kind)
        batches.append((choice.kind, [entry.payload for entry in batch.jobs]))
    return batches


# -- the batch choice: which kind, and when ------------------------------------


@pytest.mark.parametrize(
    "settings, subs, now, flush, expected",
    [
        pytest.param({}, [], 0.0, False, None, id="empty: nothing to take"),
        pytest.param(
            {"max_wait_ms": 10.0, "max_batch": 4},
            [Sub(F, "f", at=1.0)],
            1.0,
            False,
            (F, 1.01),
            id="lone final waits until its queue time + max_wait",
        ),
        pytest.param(
            {"max_wait_ms": 10.0, "max_batch": 4},
            [Sub(F, "f0", at=1.0), Sub(F, "f1", at=1.008)],
            1.009,
            False,
            (F, 1.01),
            id="the wait counts from the oldest job, not the newest",
        ),
        pytest.param(
            {"max_wait_ms": 10.0, "max_batch": 2},
            [Sub(F, "f0", at=1.0), Sub(F, "f1", at=1.002)],
            1.003,
            False,
            (F, 1.003),
            id="full batch is due at once",
        ),
        pytest.param(
            {"max_wait_ms": 10.0, "max_batch": 4},
            [Sub(F, "f", at=1.0)],
            1.5,
            False,
            (F, 1.01),
            id="past its deadline: due",
        ),
        pytest.param(
            {"max_wait_ms": 5000.0, "max_batch": 4},
            [Sub(F, "f", at=1.0), Sub(I, "i", at=1.0)],
            1.2,
            True,
            (F, 1.2),
            id="flush (draining stop) takes at once",
        ),
        pytest.param(
            {"max_wait_ms": 0.0, "max_batch": 4},
            [Sub(I, "i", at=3.0)],
            3.0,
            False,
            (I, 3.0),
            id="max_wait 0 never waits",
        ),
        pytest.param(
            {"max_wait_ms": 10.0, "max_batch": 4},
            [Sub(I, "i0", at=1.0), Sub(I, "i1", at=1.001), Sub(F, "f", at=1.005)],
            1.006,
            False,
            (F, 1.015),
            id="a final takes over from waiting interims, with its own deadline",
        ),
        pytest.param(
            {"max_wait_ms": 10.0, "max_batch": 2},
            [Sub(F, "f", at=1.0), Sub(I, "i0", at=1.0), Sub(I, "i1", at=1.0)],
            1.001,
            False,
            (F, 1.01),
            id="fullness counts the chosen kind only",
        ),
        pytest.param(
            {"max_wait_ms": 10.0, "max_batch": 4},
            [Sub(I, "a1", at=1.0, key="s"), Sub(I, "a2", at=1.008, key="s")],
            1.009,
            False,
            (I, 1.01),
            id="a superseding interim inherits the queue time of the one it replaced",
        ),
    ],
)
def test_next_batch(
    settings: dict[str, Any],
    subs: list[Sub],
    now: float,
    flush: bool,
    expected: tuple[JobKind, float] | None,
) -> None:
    q = queue(**settings)
    push_all(q, subs)
    choice = q.next_batch(now, flush=flush)
    if expected is None:
        assert choice is None
        return
    assert choice is not None
    assert choice.kind is expected[0]
    assert choice.take_at == pytest.approx(expected[1])
    assert choice.due(now) is (expected[1] <= now)


def test_batch_choice_is_due_at_and_after_its_time() -> None:
    choice = BatchChoice(F, 2.0)
    assert [choice.due(t) for t in (1.999, 2.0, 2.5)] == [False, True, True]


# -- the batches: finals first, oldest first, max_batch, options -----------------


@pytest.mark.parametrize(
    "max_batch, subs, batches",
    [
        pytest.param(
            3,
            [Sub(F, f"f{i}", at=i) for i in range(10)],
            [
                (F, ["f0", "f1", "f2"]),
                (F, ["f3", "f4", "f5"]),
                (F, ["f6", "f7", "f8"]),
                (F, ["f9"]),
            ],
            id="max_batch cuts, oldest first",
        ),
        pytest.param(
            4,
            [Sub(I, "i0"), Sub(I, "i1"), Sub(I, "i2"), Sub(F, "f0", at=1), Sub(F, "f1", at=2)],
            [(F, ["f0", "f1"]), (I, ["i0", "i1", "i2"])],
            id="finals before interims queued earlier",
        ),
        pytest.param(
            2,
            [Sub(I, "i0"), Sub(F, "f0"), Sub(I, "i1"), Sub(F, "f1"), Sub(F, "f2"), Sub(I, "i2")],
            [(F, ["f0", "f1"]), (F, ["f2"]), (I, ["i0", "i1"]), (I, ["i2"])],
            id="every final before any interim, each kind oldest first",
        ),
        pytest.param(
            4,
            [
                Sub(F, "f0"),
                Sub(F, "t0", options=TRANSLATE),
                Sub(F, "f1"),
                Sub(F, "t1", options=TRANSLATE),
                Sub(F, "f2"),
                Sub(I, "i0"),
                Sub(I, "i1", options=TRANSLATE),
            ],
            [(F, ["f0", "f1", "f2"]), (F, ["t0", "t1"]), (I, ["i0"]), (I, ["i1"])],
            id="a batch holds equal options; others keep their places",
        ),
        pytest.param(
            8,
            [
                Sub(I, "a1", key="s1/0"),
                Sub(I, "b1", key="s1/1"),
                Sub(I, "a2", key="s1/0"),
            ],
            [(I, ["a2", "b1"])],
            id="a superseding interim takes the old one's place",
        ),
        pytest.param(
            2,
            [s for i in range(3) for s in (Sub(F, f"f{i}", key="s"), Sub(I, f"i{i}", key="s"))],
            [(F, ["f0", "f1"]), (F, ["f2"]), (I, ["i2"])],
            id="finals of a key are never replaced, its interims are",
        ),
    ],
)
def test_batches_in_order(
    max_batch: int, subs: list[Sub], batches: list[tuple[JobKind, list[str]]]
) -> None:
    q = queue(max_batch=max_batch)
    push_all(q, subs)
    assert drain(q) == batches
    assert q.depth == (0, 0) and len(q) == 0


@pytest.mark.parametrize(
    "kind, subs, withdrawn, jobs, dropped, depth",
    [
        pytest.param(
            F,
            [Sub(F, "f0"), Sub(F, "f1"), Sub(F, "f2"), Sub(F, "f3")],
            {"f0"},
            ["f1", "f2"],
            ["f0"],
            (1, 0),
            id="a withdrawn final is dropped and takes no place",
        ),
        pytest.param(
            I,
            [Sub(I, "i0"), Sub(I, "i1"), Sub(I, "i2"), Sub(I, "i3")],
            {"i1", "i2"},
            ["i0", "i3"],
            ["i1", "i2"],
            (0, 0),
            id="withdrawn interims are dropped on the way",
        ),
        pytest.param(
            F,
            [Sub(F, "t0", options=TRANSLATE), Sub(F, "f0"), Sub(F, "f1"), Sub(I, "i")],
            {"t0"},
            ["f0", "f1"],
            ["t0"],
            (0, 1),
            id="the batch's options are the oldest live job's",
        ),
        pytest.param(
            I,
            [Sub(F, "f"), Sub(I, "i")],
            set(),
            ["i"],
            [],
            (1, 0),
            id="take takes the kind it is asked for",
        ),
    ],
)
def test_take(
    kind: JobKind,
    subs: list[Sub],
    withdrawn: set[str],
    jobs: list[str],
    dropped: list[str],
    depth: tuple[int, int],
) -> None:
    q = queue(max_batch=2)
    push_all(q, subs)
    batch = q.take(kind, lambda name: name not in withdrawn)
    assert batch.kind is kind
    assert [e.payload for e in batch.jobs] == jobs
    assert [e.payload for e in batch.dropped] == dropped
    assert {e.options for e in batch.jobs} <= {batch.jobs[0].options}
    assert q.depth == depth


# -- superseding, dropping, depth -------------------------------------------------


@pytest.mark.parametrize(
    "subs, superseded, depth, order",
    [
        pytest.param(
            [Sub(I, "a1", key="a"), Sub(I, "a2", key="a"), Sub(I, "a3", key="a")],
            ["a1", "a2"],
            (0, 1),
            ["a3"],
            id="each newer interim supersedes the queued one",
        ),
        pytest.param(
            [Sub(I, "a1", key="a"), Sub(I, "b1", key="b"), Sub(I, "c1", key="c")],
            [],
            (0, 3),
            ["a1", "b1", "c1"],
            id="not across keys",
        ),
        pytest.param(
            [Sub(F, "f1", key="a"), Sub(F, "f2", key="a"), Sub(I, "i", key="a")],
            [],
            (2, 1),
            ["f1", "f2", "i"],
            id="finals never supersede or get superseded",
        ),
        pytest.param(
            [
                Sub(I, "a1", key="a"),
                Sub(I, "b1", key="b"),
                Sub(F, "f", key="a"),
                Sub(I, "a2", key="a"),
            ],
            ["a1"],
            (1, 2),
            ["f", "a2", "b1"],
            id="a final between does not stop superseding",
        ),
    ],
)
def test_push_supersedes_interims_of_the_same_key(
    subs: list[Sub], superseded: list[str], depth: tuple[int, int], order: list[str]
) -> None:
    q = queue(max_batch=8)
    assert push_all(q, subs) == superseded
    assert q.depth == QueueDepth(*depth)
    assert len(q) == sum(depth)
    assert [name for _, names in drain(q) for name in names] == order


@pytest.mark.parametrize(
    "subs, key, dropped, depth",
    [
        pytest.param([Sub(I, "a1", key="a"), Sub(I, "b1", key="b")], "a", "a1", (0, 1), id="one"),
        pytest.param([Sub(I, "b1", key="b")], "a", None, (0, 1), id="none queued for the key"),
        pytest.param([Sub(F, "f", key="a")], "a", None, (1, 0), id="finals are not interims"),
    ],
)
def test_drop_interim(
    subs: list[Sub], key: str, dropped: str | None, depth: tuple[int, int]
) -> None:
    q = queue()
    push_all(q, subs)
    had = q.has_interim(key)
    entry = q.drop_interim(key)
    assert (None if entry is None else entry.payload) == dropped
    assert had is (dropped is not None)
    assert not q.has_interim(key)
    assert q.depth == depth


def test_put_back_returns_finals_to_the_front_and_clear_empties() -> None:
    q = queue(max_batch=2)
    push_all(q, [Sub(F, "f0"), Sub(F, "f1"), Sub(F, "f2"), Sub(I, "i")])
    taken = q.take(F).jobs
    assert [e.payload for e in taken] == ["f0", "f1"]
    q.put_back(taken)
    assert q.depth == (3, 1)
    with pytest.raises(ValueError, match="finals"):
        q.put_back(q.take(I).jobs)
    push_all(q, [Sub(I, "j")])
    assert [e.payload for e in q.clear()] == ["f0", "f1", "f2", "j"]
    assert q.depth == (0, 0) and q.next_batch(0.0) is None


# -- cost and load ---------------------------------------------------------------


def test_observe_keeps_moving_averages_per_kind() -> None:
    q = queue(ewma_alpha=0.5, prior_window_s=0.25)
    assert q.ewma_window_seconds == {F: None, I: None}
    assert q.seconds_per_window(F) == 0.25
    q.observe(F, 2, 1.0, now=1.0)
    assert q.ewma_batch_seconds == {F: 1.0, I: None}
    assert q.ewma_window_seconds == {F: 0.5, I: None}
    q.observe(F, 1, 1.5, now=2.0)
    assert q.ewma_batch_seconds[F] == pytest.approx(1.25)
    assert q.seconds_per_window(F) == pytest.approx(1.0)
    assert q.seconds_per_window(I) == 0.25


@pytest.mark.parametrize(
    "depth, in_flight, now, final, interim",
    [
        # max_wait 0.01 s, 0.5 s per final window, 0.25 s per interim window.
        pytest.param((0, 0), None, 0.0, 0.51, 0.26, id="idle: itself only"),
        pytest.param((3, 0), None, 0.0, 2.01, 1.76, id="queued finals go first for both"),
        pytest.param((0, 4), None, 0.0, 0.51, 1.26, id="queued interims only delay interims"),
        pytest.param((2, 2), InFlight(F, 2, 10.0), 10.4, 2.11, 2.36, id="rest of the batch"),
        pytest.param((0, 0), InFlight(I, 2, 10.0), 11.0, 0.51, 0.26, id="overdue batch adds 0"),
    ],
)
def test_estimated_wait(
    depth: tuple[int, int], in_flight: InFlight | None, now: float, final: float, interim: float
) -> None:
    q = queue(max_wait_ms=10.0, max_batch=64)
    q.observe(F, 1, 0.5, now=0.0)
    q.observe(I, 1, 0.25, now=0.0)
    push_all(q, [Sub(F, f"f{i}") for i in range(depth[0])])
    push_all(q, [Sub(I, f"i{i}") for i in range(depth[1])])
    flights = () if in_flight is None else (in_flight,)
    assert q.estimated_wait(F, now=now, in_flight=flights) == pytest.approx(final)
    assert q.estimated_wait(I, now=now, in_flight=flights) == pytest.approx(interim)


@pytest.mark.parametrize(
    "finals, queued_keys, key, last_interim_at, now, expected",
    [
        # 0.5 s per window (the prior), interim_max_wait_s 2, interim_probe_s 5.
        pytest.param(0, [], "s", None, 0.0, True, id="idle queue: yes"),
        pytest.param(3, [], "s", None, 1.0, True, id="wait 2.0 s: within the limit"),
        pytest.param(4, [], "s", None, 1.0, False, id="wait 2.5 s: over the limit"),
        pytest.param(9, ["s"], "s", None, 1.0, True, id="it only replaces a queued one"),
        pytest.param(9, [], "s", None, 5.5, True, id="probe: no interim done for 5.5 s"),
        pytest.param(9, [], "s", 1.0, 5.5, False, id="no probe: one done 4.5 s ago"),
        pytest.param(9, ["t"], "s", None, 6.0, False, id="no probe while interims queue"),
    ],
)
def test_should_submit_interim(
    finals: int,
    queued_keys: list[str],
    key: str,
    last_interim_at: float | None,
    now: float,
    expected: bool,
) -> None:
    q = DecodeQueue[str](
        SchedulerSettings(
            max_wait_ms=0.0, prior_window_s=0.5, interim_max_wait_s=2.0, interim_probe_s=5.0
        ),
        now=0.0,
    )
    if last_interim_at is not None:
        q.observe(I, 1, 0.5, now=last_interim_at)
    push_all(q, [Sub(F, f"f{i}") for i in range(finals)])
    push_all(q, [Sub(I, k, key=k) for k in queued_keys])
    assert q.should_submit_interim(key, now=now) is expected


@pytest.mark.parametrize(
    "depth, in_flight, now, reason",
    [
        # max_queue 7, overload_final_wait_s 3.5, 0.5 s per window (the prior).
        pytest.param((0, 0), None, 0.0, None, id="idle"),
        pytest.param((5, 1), None, 0.0, None, id="6 queued, final wait 3.0 s"),
        pytest.param((5, 2), None, 0.0, "holds 7 jobs, its limit is 7 (max_queue)", id="full"),
        pytest.param((0, 7), None, 0.0, "(max_queue)", id="interims count toward max_queue"),
        pytest.param((6, 0), None, 0.0, None, id="final wait 3.5 s: at the limit, not over"),
        pytest.param(
            (6, 0),
            InFlight(F, 1, 0.0),
            0.2,
            "about 3.8 s for the decoder, more than 3.5 s (overload_final_wait_s)",
            id="the batch in flight tips it over",
        ),
    ],
)
def test_overload_reason(
    depth: tuple[int, int], in_flight: InFlight | None, now: float, reason: str | None
) -> None:
    q = DecodeQueue[str](
        SchedulerSettings(
            max_wait_ms=0.0, prior_window_s=0.5, max_queue=7, overload_final_wait_s=3.5
        ),
        now=0.0,
    )
    push_all(q, [Sub(F, f"f{i}") for i in range(depth[0])])
    push_all(q, [Sub(I, f"i{i}") for i in range(depth[1])])
    got = q.overload_reason(now=now, in_flight=() if in_flight is None else (in_flight,))
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


@pytest.mark.parametrize(
    "workers, depth, in_flight, final, interim",
    [
        # 0.5 s per final, 0.25 s per interim, max_wait 10 ms; the work ahead is
        # shared among the workers, the job's own cost is not.
        pytest.param(1, (2, 0), [], 0.01 + 1.0 + 0.5, 0.01 + 1.0 + 0.25, id="1 worker"),
        pytest.param(2, (2, 0), [], 0.01 + 0.5 + 0.5, 0.01 + 0.5 + 0.25, id="2 workers share"),
        pytest.param(
            2,
            (0, 2),
            [InFlight(F, 1, 0.0), InFlight(I, 2, 0.0)],
            0.01 + (0.5 + 0.5) / 2 + 0.5,
            0.01 + (0.5 + 0.5 + 0.5) / 2 + 0.25,
            id="two batches in flight",
        ),
        pytest.param(4, (4, 0), [], 0.01 + 0.5 + 0.5, 0.01 + 0.5 + 0.25, id="4 workers, 4 finals"),
    ],
)
def test_estimated_wait_with_workers(
    workers: int,
    depth: tuple[int, int],
    in_flight: list[InFlight],
    final: float,
    interim: float,
) -> None:
    q = queue(max_wait_ms=10.0, max_batch=64, workers=workers)
    q.observe(F, 1, 0.5, now=0.0)
    q.observe(I, 1, 0.25, now=0.0)
    push_all(q, [Sub(F, f"f{i}") for i in range(depth[0])])
    push_all(q, [Sub(I, f"i{i}") for i in range(depth[1])])
    assert q.estimated_wait(F, now=0.0, in_flight=in_flight) == pytest.approx(final)
    assert q.estimated_wait(I, now=0.0, in_flight=in_flight) == pytest.approx(interim)
