"""Failover behind a load balancer: three replicas, Debian's haproxy, 12 streams.

Three replica processes (``tests.kit.replica``: ``earshot serve``'s serving
code with the tone-language backend and the real Silero endpointer) behind
haproxy (least connections, health checks on ``/readyz``). Twelve streams of
the tone language go through haproxy in real time; mid-load one replica gets
SIGTERM (it drains: finals, then close 1001) and later another gets SIGKILL
(its connections just drop). Each client reconnects through haproxy and
resends the audio that no final covers yet. Every stream's finals, joined,
must be its script exactly: no word lost, none doubled.

The scripts are laid out on one grid in wall-clock time (every stream's
utterances start together; each stream's lead silence makes up for its
staggered start), and both kills fall in the middle of a silence between
utterances. A drain cuts the utterance in progress; a word cut near its
middle is then heard whole by neither replica, which is the drain's
behaviour and not what this test is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from earshot.clients.stream import (
    StreamClient,
    StreamClosedError,
    StreamConnectError,
    is_final,
    transcript_of,
)
from tests.kit.balancer import CHECK_FALL, CHECK_INTER_MS, Haproxy, haproxy_binary
from tests.kit.replica import ReplicaProcess, free_port, http_get, metric
from tests.kit.tones import (
    DEFAULT_WORD_GAP_S,
    DEFAULT_WORD_S,
    VOCABULARY,
    make_speech,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

STREAMS = 12
PROBES = 2
"""Fresh streams opened just after the SIGTERM, before haproxy can know."""
WORDS = 4
"""Words per utterance (all utterances have the same length: one grid)."""
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
MAX_CONNECTIONS = 6
"""Connection attempts per stream, refused ones included."""

UTTERANCE_S = WORDS * DEFAULT_WORD_S + (WORDS - 1) * DEFAULT_WORD_GAP_S
PERIOD_S = UTTERANCE_S + GAP_S
TERM_AFTER = 1
"""SIGTERM in the silence after this utterance (0-based) ..."""
KILL_AFTER = 3
"""... and SIGKILL in the silence after this one."""
DEEPGRAM = "deepgram"


# ---------------------------------------------------------------------------
# The client: real-time streaming that reconnects and resends what no final covers


@dataclass
class Outcome:
    finals: list[str] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    """The close code of each connection, in order."""
    reconnect_s: list[float] = field(default_factory=list)
    """From noticing a close to the next connection being open."""
    refused: int = 0
    """Connection attempts refused or failed."""
    request_ids: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(t for t in self.finals if t)

    @property
    def reconnects(self) -> int:
        return len(self.close_codes) - 1


async def resilient_stream(url: str, pcm: bytes, start_at: float) -> Outcome:
    """Stream 16 kHz linear16 ``pcm`` to ``url`` paced on the loop clock from
    ``start_at`` (chunk ``j`` at ``start_at + j * CHUNK_S`` at the earliest);
    when the server closes before the end (1001, 1006...) reconnect and resend
    from the end of the last final. At most :data:`MAX_CONNECTIONS` attempts."""
    loop = asyncio.get_running_loop()
    chunk_bytes = round(CHUNK_S * 16000) * 2
    n_chunks = math.ceil(len(pcm) / chunk_bytes)
    out = Outcome()
    covered_s = 0.0
    closed_at: float | None = None
    attempts = 0
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    while True:
        attempts += 1
        if attempts > MAX_CONNECTIONS:
            raise AssertionError(f"gave up after {MAX_CONNECTIONS} attempts: {out}")
        first = int(covered_s / CHUNK_S + 1e-9)
        base_s = first * CHUNK_S
        client = StreamClient(
            url, endpointing=ENDPOINTING_MS, interim_results=False, warnings=False
        )
        try:
            await client.connect()
        except StreamConnectError:
            out.refused += 1
            await asyncio.sleep(0.05 * attempts)
            continue
        if closed_at is not None:
            out.reconnect_s.append(loop.time() - closed_at)
        sent_all = False

        async def send(client: StreamClient = client, first: int = first) -> None:
            nonlocal sent_all
            with contextlib.suppress(StreamClosedError):
                for j in range(first, n_chunks):
                    delay = start_at + j * CHUNK_S - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await client.send_audio(pcm[j * chunk_bytes : (j + 1) * chunk_bytes])
                await client.close_stream()
                sent_all = True

        sender = asyncio.create_task(send())
        try:
            async for message in client.messages():
                if message.get("type") == "Metadata" and message.get("request_id"):
                    rid = str(message["request_id"])
                    if rid not in out.request_ids:
                        out.request_ids.append(rid)
                if message.get("type") == "Results" and is_final(message):
                    end = base_s + float(message["start"]) + float(message["duration"])
                    covered_s = max(covered_s, end)
                    out.finals.append(transcript_of(message))
        finally:
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await client.close()
        out.close_codes.append(client.close_code)
        if client.close_code == 1000 and sent_all:
            return out
        closed_at = loop.time()


# ---------------------------------------------------------------------------
# The test


def _script(seed: int, utterances: int) -> list[list[str]]:
    rng = np.random.default_rng(1000 + seed)
    return [
        [VOCABULARY[int(i)] for i in rng.integers(0, len(VOCABULARY), WORDS)]
        for _ in range(utterances)
    ]


def _pcm(audio: np.ndarray) -> bytes:
    return bytes((np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())


def _opened(replica: ReplicaProcess) -> float:
    return metric(replica.metrics(), "earshot_streams_opened_total", protocol=DEEPGRAM)


def _active(replica: ReplicaProcess) -> float:
    return metric(replica.metrics(), "earshot_active_streams", protocol=DEEPGRAM)


def _opened_after(log_path: Path, wall: float) -> list[str]:
    """The sessions a replica's log says it opened at or after ``wall``."""
    sessions = []
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message") == "stream opened":
                at = datetime.fromisoformat(entry["ts"]).timestamp()
                if at >= wall:
                    sessions.append(str(entry.get("session")))
    return sessions


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _scenario(
    lb: Haproxy, replicas: list[ReplicaProcess], names: list[str]
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    url = f"ws://127.0.0.1:{lb.port}/v1/listen"
    t0 = loop.time() + 0.3
    # Utterance k of every stream starts at grid + k * PERIOD_S.
    grid = t0 + (STREAMS - 1) * STAGGER_S + LEAD_S
    scripts, tasks = [], []
    for i in range(STREAMS):
        script = _script(i, UTTERANCES)
        start = t0 + i * STAGGER_S
        audio, truth = make_speech(script, lead_s=grid - start, gap_s=GAP_S, tail_s=TAIL_S)
        scripts.append(truth.text)
        tasks.append(asyncio.create_task(resilient_stream(url, _pcm(audio), start)))
    term_at = grid + TERM_AFTER * PERIOD_S + UTTERANCE_S + GAP_S / 2
    kill_at = grid + KILL_AFTER * PERIOD_S + UTTERANCE_S + GAP_S / 2
    term, kill, survivor = replicas[1], replicas[2], replicas[0]
    figures: dict[str, Any] = {}
    try:
        await asyncio.sleep(term_at - 0.4 - loop.time())
        before = [await asyncio.to_thread(_active, r) for r in replicas]
        figures["streams_per_replica_before"] = dict(zip(names, before, strict=True))
        assert all(n >= 1 for n in before), f"leastconn left a replica idle: {before}"
        assert sum(before) == STREAMS, before
        opened_before_term = await asyncio.to_thread(_opened, term)

        # -- SIGTERM: drain -------------------------------------------------
        await asyncio.sleep(term_at - loop.time())
        term_wall = time.time()
        term_t = loop.time()
        term.signal(signal.SIGTERM)
        down_term = asyncio.create_task(asyncio.to_thread(lb.wait_states, {names[1]: "DOWN"}, 10.0))
        # Fresh streams right away, while haproxy still thinks the drainer is UP.
        await asyncio.sleep(0.2)
        probe_grid = grid + (TERM_AFTER + 1) * PERIOD_S
        probe_scripts, probe_tasks = [], []
        for p in range(PROBES):
            script = _script(100 + p, 1)
            start = loop.time() + 0.05 * p
            audio, truth = make_speech(script, lead_s=probe_grid - start, tail_s=TAIL_S)
            probe_scripts.append(truth.text)
            probe_tasks.append(asyncio.create_task(resilient_stream(url, _pcm(audio), start)))
        await asyncio.sleep(max(0.0, term_t + 1.8 - loop.time()))
        # Still listening (drain_s): its own counters say what it accepted.
        draining = await asyncio.to_thread(term.metrics)
        figures["term_opened_during_drain"] = (
            metric(draining, "earshot_streams_opened_total", protocol=DEEPGRAM) - opened_before_term
        )
        figures["term_refused_during_drain"] = metric(
            draining, "earshot_refusals_total", reason="server_shutting_down"
        )
        figures["haproxy_down_after_sigterm_s"] = round(await down_term, 3)
        term_exit = await asyncio.to_thread(term.wait, SHUTDOWN_TIMEOUT_S + 5)
        figures["sigterm_exit_s"] = round(loop.time() - term_t, 2)
        assert term_exit == 0, f"the drained replica exited {term_exit}:\n{term.log_tail()}"
        figures["term_sessions_opened_after_sigterm"] = _opened_after(term.log_path, term_wall)

        probes = await asyncio.gather(*probe_tasks)

        # -- SIGKILL: abrupt ------------------------------------------------
        await asyncio.sleep(max(0.0, kill_at - loop.time()))
        kill_t = loop.time()
        kill.signal(signal.SIGKILL)
        figures["haproxy_down_after_sigkill_s"] = round(
            await asyncio.to_thread(lb.wait_states, {names[2]: "DOWN"}, 10.0), 3
        )
        assert await asyncio.to_thread(kill.wait, 5.0) == -signal.SIGKILL
        await asyncio.sleep(max(0.0, kill_t + 2.5 - loop.time()))
        figures["survivor_active_after_sigkill"] = await asyncio.to_thread(_active, survivor)

        outcomes = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    figures["states_at_end"] = await asyncio.to_thread(lb.server_states)
    figures["survivor_ready_at_end"] = (
        await asyncio.to_thread(http_get, f"{survivor.url}/readyz")
    )[0]
    figures["outcomes"] = outcomes
    figures["scripts"] = scripts
    figures["probes"] = probes
    figures["probe_scripts"] = probe_scripts
    figures["survivor_opened"] = await asyncio.to_thread(_opened, survivor)
    return figures


def test_failover_behind_haproxy(tmp_path: Path) -> None:
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed (Debian package haproxy; .ci/run installs it)")
    names = ["r0", "r1", "r2"]
    settings = [
        "--drain-s",
        str(DRAIN_S),
        "--shutdown-timeout-s",
        str(SHUTDOWN_TIMEOUT_S),
        "--log-level",
        "info",
    ]
    replicas = [ReplicaProcess(free_port(), tmp_path / f"{name}.log", settings) for name in names]
    lb = Haproxy(
        binary,
        tmp_path / "haproxy",
        free_port(),
        [(name, r.port) for name, r in zip(names, replicas, strict=True)],
    )
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready(60.0)
        lb.start()
        lb.wait_states(dict.fromkeys(names, "UP"), 10.0)
        figures = asyncio.run(asyncio.wait_for(_scenario(lb, replicas, names), timeout=150))
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

    outcomes: list[Outcome] = figures["outcomes"]
    scripts: list[str] = figures["scripts"]
    moved_term = sum(1 for o in outcomes if 1001 in o.close_codes)
    moved_kill = sum(1 for o in outcomes if any(c not in (1000, 1001) for c in o.close_codes))
    reconnect = [s for o in outcomes + figures["probes"] for s in o.reconnect_s]
    lost = doubled = 0
    for o, want in zip(outcomes, scripts, strict=True):
        got, expected = o.text.split(), want.split()
        lost += max(0, len(expected) - len(got))
        doubled += max(0, len(got) - len(expected))
    summary = {
        "streams": STREAMS,
        "streams_per_replica_before": figures["streams_per_replica_before"],
        "moved_by_sigterm": moved_term,
        "moved_by_sigkill": moved_kill,
        "finals_words_lost": lost,
        "finals_words_doubled": doubled,
        "reconnect_s_p50": round(statistics.median(reconnect), 3) if reconnect else None,
        "reconnect_s_max": round(max(reconnect), 3) if reconnect else None,
        "refused_attempts": sum(o.refused for o in outcomes + figures["probes"]),
        "haproxy_down_after_sigterm_s": figures["haproxy_down_after_sigterm_s"],
        "haproxy_down_after_sigkill_s": figures["haproxy_down_after_sigkill_s"],
        "sigterm_exit_s": figures["sigterm_exit_s"],
        "term_opened_during_drain": figures["term_opened_during_drain"],
        "term_refused_during_drain": figures["term_refused_during_drain"],
        "survivor_active_after_sigkill": figures["survivor_active_after_sigkill"],
        "states_at_end": figures["states_at_end"],
    }
    print("failover:", json.dumps(summary, indent=2))

    for i, (o, want) in enumerate(zip(outcomes, scripts, strict=True)):
        assert o.text == want, f"stream {i}: {o.close_codes}\n got  {o.text}\n want {want}"
    for o, want in zip(figures["probes"], figures["probe_scripts"], strict=True):
        assert o.text == want
        assert o.close_codes[-1] == 1000
    # The drained replica's streams got 1001, the killed one's dropped (1006).
    assert moved_term == figures["streams_per_replica_before"]["r1"]
    assert moved_kill >= 1
    assert all(o.close_codes[-1] == 1000 for o in outcomes)
    # No stream landed on the draining replica after its SIGTERM.
    assert figures["term_opened_during_drain"] == 0
    assert figures["term_sessions_opened_after_sigterm"] == []
    # haproxy saw both go within the checks' reach (fall x inter, plus one
    # interval of phase and the check timeout).
    reach = (CHECK_FALL + 1) * CHECK_INTER_MS / 1000 + 1.0
    assert figures["haproxy_down_after_sigterm_s"] <= reach
    assert figures["haproxy_down_after_sigkill_s"] <= reach
    assert figures["states_at_end"] == {"r0": "UP", "r1": "DOWN", "r2": "DOWN"}
    # The survivor took every stream.
    assert figures["survivor_active_after_sigkill"] == STREAMS
    assert figures["survivor_ready_at_end"] == 200
