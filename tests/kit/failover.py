"""The failover scenario: three replicas behind haproxy, 12 streams, SIGTERM and SIGKILL.

Three replica processes (:mod:`tests.kit.replica`: ``earshot serve``'s
serving code with the tone-language backend and the real Silero endpointer)
behind Debian's haproxy (:mod:`tests.kit.balancer`: least connections,
health checks on ``/readyz``). :data:`STREAMS` streams of the tone language
go through haproxy in real time; mid-load replica ``r1`` gets SIGTERM (it
drains: finals, then close 1001), :data:`PROBES` fresh streams open right
after it, and later replica ``r2`` gets SIGKILL (its connections just drop).
Each client (``transcribe_stream(..., reconnect=True)``) reconnects through
haproxy and resends the audio no final covers yet. :func:`run_failover`
returns what happened; ``tests/test_failover.py`` asserts on it and
``bench/failover.py`` records it.

The scripts lie on one grid in wall-clock time (every stream's utterances
start together; each stream's lead silence makes up for its staggered
start). The SIGTERM falls in the middle of a silence between utterances: a
drain cuts the utterance in progress, and a word cut near its middle is
heard whole by neither replica, which is the drain's behaviour and not what
the scenario measures. The SIGKILL falls in the middle of an utterance: the
words of it that the killed replica heard come back only through the
client's re-sent audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from earshot.clients.stream import transcribe_stream, transcript_of
from earshot.core.decoding import AudioArray
from tests.kit.balancer import Haproxy
from tests.kit.replica import ReplicaProcess, free_port, http_get, metric
from tests.kit.tones import DEFAULT_WORD_GAP_S, DEFAULT_WORD_S, VOCABULARY, make_speech

STREAMS = 12
PROBES = 2
"""Fresh streams opened just after the SIGTERM, before haproxy can know."""
WORDS = 4
"""Words per utterance (all utterances are as long: one grid)."""
UTTERANCES = 6
GAP_S = 2.0
"""Silence between utterances; the kills fall in its middle."""
STAGGER_S = 0.25
"""Between the starts of two streams."""
LEAD_S = 0.5
"""Lead silence of the last stream to start."""
TAIL_S = 1.0
CHUNK_S = 0.02
ENDPOINTING_MS = 300
DRAIN_S = 3.0
SHUTDOWN_TIMEOUT_S = 15.0
MAX_RECONNECTS = 5
"""Reconnection attempts in a row per stream."""
RECONNECT_BACKOFF_S = 0.05
"""The client's first wait before reconnecting (doubling, with jitter)."""

UTTERANCE_S = WORDS * DEFAULT_WORD_S + (WORDS - 1) * DEFAULT_WORD_GAP_S
PERIOD_S = UTTERANCE_S + GAP_S
TERM_AFTER = 1
"""SIGTERM in the middle of the silence after this utterance (0-based) ..."""
KILL_AFTER = 3
"""... and SIGKILL in the middle of this one."""
NAMES = ("r0", "r1", "r2")
"""r0 survives, r1 gets SIGTERM, r2 SIGKILL."""
DEEPGRAM = "deepgram"


# ---------------------------------------------------------------------------
# The client: earshot.clients.stream.transcribe_stream(..., reconnect=True)


@dataclass
class Outcome:
    """One stream, over all its connections."""

    script: str
    finals: list[str] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    """The close code of each connection, in order."""
    resent_s: list[float] = field(default_factory=list)
    """Audio re-sent on opening each connection (not yet in a final)."""
    reconnect_s: list[float] = field(default_factory=list)
    """From the client noticing a close to the next connection being open."""
    refused: int = 0
    """Reconnection attempts refused by the server or the balancer."""
    request_ids: list[str | None] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    """What the client said at each reconnection step."""
    reconnect_error: str | None = None

    @property
    def text(self) -> str:
        return " ".join(t for t in self.finals if t)


async def reconnecting_stream(url: str, pcm: bytes, start_at: float, script: str) -> Outcome:
    """Stream 16 kHz linear16 ``pcm`` to ``url`` in real time from the loop
    time ``start_at``, through :func:`transcribe_stream` with ``reconnect=True``
    (at most :data:`MAX_RECONNECTS` attempts in a row)."""
    loop = asyncio.get_running_loop()
    out = Outcome(script)
    lost_at: float | None = None

    def on_reconnect(line: str) -> None:
        nonlocal lost_at
        now = loop.time()
        out.notices.append(f"{now - start_at:.3f} {line}")
        if line.startswith("the connection closed") and lost_at is None:
            lost_at = now
        elif line.startswith("refused") or "refused (" in line:
            out.refused += 1
        elif line.startswith("reconnected") and lost_at is not None:
            out.reconnect_s.append(now - lost_at)
            lost_at = None

    await asyncio.sleep(max(0.0, start_at - loop.time()))
    result = await transcribe_stream(
        url,
        pcm,
        endpointing=ENDPOINTING_MS,
        interim_results=False,
        warnings=False,
        chunk_ms=CHUNK_S * 1000,
        reconnect=True,
        max_reconnects=MAX_RECONNECTS,
        reconnect_backoff_s=RECONNECT_BACKOFF_S,
        on_reconnect=on_reconnect,
    )
    out.finals = [transcript_of(m) for m in result.finals.get(0, [])]
    out.close_codes = [c.close_code for c in result.connections]
    out.resent_s = [round(c.resent_s, 3) for c in result.connections]
    out.request_ids = [c.request_id for c in result.connections]
    out.reconnect_error = result.reconnect_error
    return out


# ---------------------------------------------------------------------------
# The scenario


def _script(seed: int, utterances: int) -> list[list[str]]:
    rng = np.random.default_rng(1000 + seed)
    return [
        [VOCABULARY[int(i)] for i in rng.integers(0, len(VOCABULARY), WORDS)]
        for _ in range(utterances)
    ]


def _pcm(audio: AudioArray) -> bytes:
    return bytes((np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())


def _opened(replica: ReplicaProcess) -> float:
    return metric(replica.metrics(), "earshot_streams_opened_total", protocol=DEEPGRAM)


def _active(replica: ReplicaProcess) -> float:
    return metric(replica.metrics(), "earshot_active_streams", protocol=DEEPGRAM)


def opened_after(log_path: Path, wall: float) -> list[str]:
    """The sessions a replica's log says it opened at or after ``wall`` (time.time())."""
    sessions = []
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            opened = entry.get("message") == "stream opened"
            if opened and datetime.fromisoformat(entry["ts"]).timestamp() >= wall:
                sessions.append(str(entry.get("session")))
    return sessions


@dataclass
class FailoverRun:
    """What :func:`run_failover` saw."""

    outcomes: list[Outcome]
    probes: list[Outcome]
    streams_before: dict[str, float]
    """Streams open on each replica just before the SIGTERM."""
    term_opened_during_drain: float
    """``earshot_streams_opened_total`` of r1 during its drain, minus before."""
    term_refused_during_drain: float
    """Upgrades r1 refused with ``server_shutting_down`` during its drain."""
    term_sessions_after_signal: list[str]
    """Streams r1's log says it opened after its SIGTERM."""
    term_sessions_logged: int
    """Streams r1's log says it opened in all (the log is read right)."""
    term_exit: int
    term_exit_s: float
    kill_exit: int
    down_after_term_s: float
    """From the SIGTERM until haproxy's ``show stat`` said DOWN."""
    down_after_kill_s: float
    survivor_active_after_kill: float
    """Streams open on r0 2.5 s after the SIGKILL."""
    states_at_end: dict[str, str]
    survivor_ready_at_end: int

    @property
    def moved_by_term(self) -> int:
        return sum(1 for o in self.outcomes if 1001 in o.close_codes)

    @property
    def moved_by_kill(self) -> int:
        return sum(1 for o in self.outcomes if any(c not in (1000, 1001) for c in o.close_codes))

    def resent_after_kill_s(self) -> list[float]:
        """Audio re-sent on the connection that followed each dropped one."""
        return [
            o.resent_s[k + 1]
            for o in self.outcomes
            for k, code in enumerate(o.close_codes[:-1])
            if code not in (1000, 1001)
        ]

    def words_lost_and_doubled(self) -> tuple[int, int]:
        """Words missing from, and words added to, the finals (a word
        replaced by another counts once in each)."""
        import difflib

        lost = doubled = 0
        for o in self.outcomes + self.probes:
            want, got = o.script.split(), o.text.split()
            matcher = difflib.SequenceMatcher(a=want, b=got, autojunk=False)
            for tag, i1, i2, j1, j2 in matcher.get_opcodes():
                if tag != "equal":
                    lost += i2 - i1
                    doubled += j2 - j1
        return lost, doubled

    def summary(self) -> dict[str, Any]:
        reconnect = [s for o in self.outcomes + self.probes for s in o.reconnect_s]
        lost, doubled = self.words_lost_and_doubled()
        return {
            "streams": len(self.outcomes),
            "probe_streams_after_sigterm": len(self.probes),
            "streams_per_replica_before": self.streams_before,
            "moved_by_sigterm": self.moved_by_term,
            "moved_by_sigkill": self.moved_by_kill,
            "words_lost": lost,
            "words_doubled": doubled,
            "close_codes": dict(
                sorted(Counter(str(c) for o in self.outcomes for c in o.close_codes).items())
            ),
            "resent_s_after_sigkill_min": min(self.resent_after_kill_s(), default=None),
            "resent_s_after_sigkill_max": max(self.resent_after_kill_s(), default=None),
            "reconnects": len(reconnect),
            "reconnect_s_p50": round(statistics.median(reconnect), 3) if reconnect else None,
            "reconnect_s_max": round(max(reconnect), 3) if reconnect else None,
            "client_refused_attempts": sum(o.refused for o in self.outcomes + self.probes),
            "haproxy_down_after_sigterm_s": round(self.down_after_term_s, 3),
            "haproxy_down_after_sigkill_s": round(self.down_after_kill_s, 3),
            "sigterm_exit_s": round(self.term_exit_s, 2),
            "streams_opened_on_drainer_after_sigterm": self.term_opened_during_drain,
            "upgrades_refused_by_drainer_and_retried": self.term_refused_during_drain,
            "survivor_active_after_sigkill": self.survivor_active_after_kill,
            "states_at_end": self.states_at_end,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), **asdict(self)}


async def _scenario(lb: Haproxy, replicas: list[ReplicaProcess]) -> FailoverRun:
    loop = asyncio.get_running_loop()
    url = f"ws://127.0.0.1:{lb.port}/v1/listen"
    t0 = loop.time() + 0.3
    # Utterance k of every stream starts at grid + k * PERIOD_S.
    grid = t0 + (STREAMS - 1) * STAGGER_S + LEAD_S
    tasks = []
    for i in range(STREAMS):
        start = t0 + i * STAGGER_S
        audio, truth = make_speech(
            _script(i, UTTERANCES), lead_s=grid - start, gap_s=GAP_S, tail_s=TAIL_S
        )
        tasks.append(asyncio.create_task(reconnecting_stream(url, _pcm(audio), start, truth.text)))
    term_at = grid + TERM_AFTER * PERIOD_S + UTTERANCE_S + GAP_S / 2
    # Mid-utterance: what the killed replica heard of it was never finalized,
    # and only the client's re-sent audio brings those words back.
    kill_at = grid + KILL_AFTER * PERIOD_S + UTTERANCE_S / 2
    survivor, term, kill = replicas
    probe_tasks: list[asyncio.Task[Outcome]] = []
    try:
        await asyncio.sleep(term_at - 0.4 - loop.time())
        before = [await asyncio.to_thread(_active, r) for r in replicas]
        opened_before_term = await asyncio.to_thread(_opened, term)

        # -- SIGTERM: drain -------------------------------------------------
        await asyncio.sleep(term_at - loop.time())
        term_wall, term_t = time.time(), loop.time()
        term.signal(signal.SIGTERM)
        down_term = asyncio.create_task(asyncio.to_thread(lb.wait_states, {NAMES[1]: "DOWN"}, 10.0))
        # Fresh streams at once, while haproxy still takes the drainer for UP;
        # their one utterance lies on the grid too.
        await asyncio.sleep(0.2)
        probe_grid = grid + (TERM_AFTER + 1) * PERIOD_S
        for p in range(PROBES):
            start = loop.time() + 0.05 * p
            audio, truth = make_speech(
                _script(100 + p, 1), lead_s=probe_grid - start, tail_s=TAIL_S
            )
            probe_tasks.append(
                asyncio.create_task(reconnecting_stream(url, _pcm(audio), start, truth.text))
            )
        # Still listening (drain_s): its own counters say what it accepted.
        await asyncio.sleep(max(0.0, term_t + 1.8 - loop.time()))
        draining = await asyncio.to_thread(term.metrics)
        down_after_term = await down_term
        term_exit = await asyncio.to_thread(term.wait, SHUTDOWN_TIMEOUT_S + 5)
        term_exit_s = loop.time() - term_t
        probes = await asyncio.gather(*probe_tasks)

        # -- SIGKILL: abrupt ------------------------------------------------
        await asyncio.sleep(max(0.0, kill_at - loop.time()))
        kill_t = loop.time()
        kill.signal(signal.SIGKILL)
        down_after_kill = await asyncio.to_thread(lb.wait_states, {NAMES[2]: "DOWN"}, 10.0)
        kill_exit = await asyncio.to_thread(kill.wait, 5.0)
        await asyncio.sleep(max(0.0, kill_t + 2.5 - loop.time()))
        survivor_active = await asyncio.to_thread(_active, survivor)

        outcomes = await asyncio.gather(*tasks)
    finally:
        for task in [*tasks, *probe_tasks]:
            task.cancel()
        await asyncio.gather(*tasks, *probe_tasks, return_exceptions=True)

    return FailoverRun(
        outcomes=list(outcomes),
        probes=list(probes),
        streams_before=dict(zip(NAMES, before, strict=True)),
        term_opened_during_drain=(
            metric(draining, "earshot_streams_opened_total", protocol=DEEPGRAM) - opened_before_term
        ),
        term_refused_during_drain=metric(
            draining, "earshot_refusals_total", reason="server_shutting_down"
        ),
        term_sessions_after_signal=opened_after(term.log_path, term_wall),
        term_sessions_logged=len(opened_after(term.log_path, 0.0)),
        term_exit=term_exit,
        term_exit_s=term_exit_s,
        kill_exit=kill_exit,
        down_after_term_s=down_after_term,
        down_after_kill_s=down_after_kill,
        survivor_active_after_kill=survivor_active,
        states_at_end=await asyncio.to_thread(lb.server_states),
        survivor_ready_at_end=(await asyncio.to_thread(http_get, f"{survivor.url}/readyz"))[0],
    )


def run_failover(folder: Path, haproxy: str, timeout_s: float = 150.0) -> FailoverRun:
    """Start the replicas and haproxy (logs and configuration in ``folder``),
    run the scenario, stop everything (SIGKILL whatever is left on failure).
    On failure the logs' tails are printed."""
    settings = [
        "--drain-s",
        str(DRAIN_S),
        "--shutdown-timeout-s",
        str(SHUTDOWN_TIMEOUT_S),
        "--log-level",
        "info",
    ]
    replicas = [ReplicaProcess(free_port(), folder / f"{name}.log", settings) for name in NAMES]
    lb = Haproxy(
        haproxy,
        folder / "haproxy",
        free_port(),
        [(name, r.port) for name, r in zip(NAMES, replicas, strict=True)],
    )
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready(60.0)
        lb.start()
        lb.wait_states(dict.fromkeys(NAMES, "UP"), 10.0)
        return asyncio.run(asyncio.wait_for(_scenario(lb, replicas), timeout=timeout_s))
    except BaseException:
        for r in replicas:
            print(f"--- {r.log_path.name}\n{r.log_tail(15)}")
        print(f"--- haproxy\n{lb.log()[-3000:]}")
        raise
    finally:
        lb.stop()
        for r in replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.kill()
            r.stop()
