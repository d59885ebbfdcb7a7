"""Failover behind a load balancer: three replica processes, Debian's haproxy,
12 real-time streams; one replica drained (SIGTERM), another killed (SIGKILL).

The scenario is :func:`tests.kit.failover.run_failover` (its docstring tells
the layout); here, what must hold: every stream's finals, joined, are its
script exactly (no word lost, none doubled), through both kills; nothing
lands on the draining replica after its SIGTERM; haproxy marks both replicas
DOWN within reach of its health checks; the one replica left serves every
stream. The figures are printed past pytest's capture, so every run (CI's
included) shows them.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.kit.balancer import CHECK_FALL, CHECK_INTER_MS, haproxy_binary
from tests.kit.failover import STREAMS, UTTERANCE_S, run_failover

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def test_failover_behind_haproxy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed (Debian package haproxy; .ci/run installs it)")
    run = run_failover(tmp_path, binary)
    with capsys.disabled():
        print("\nfailover:", json.dumps(run.summary(), indent=2))

    for i, o in enumerate(run.outcomes + run.probes):
        assert o.text == o.script, f"stream {i}: {o.close_codes}\n got  {o.text}\n want {o.script}"
        assert o.close_codes[-1] == 1000, (i, o.close_codes)
    assert run.words_lost_and_doubled() == (0, 0)
    # leastconn spread the streams; the drained replica's streams all got
    # 1001 and moved; the killed one's (some had moved to it) dropped.
    assert all(n >= 1 for n in run.streams_before.values()), run.streams_before
    assert sum(run.streams_before.values()) == STREAMS
    assert run.moved_by_term == run.streams_before["r1"]
    assert run.moved_by_kill >= run.streams_before["r2"]
    assert run.term_exit == 0
    assert run.kill_exit == -signal.SIGKILL
    # Killed mid-utterance: the dropped streams re-sent at least the half
    # utterance the dead replica had heard and not finalized.
    resent = run.resent_after_kill_s()
    assert len(resent) == run.moved_by_kill
    assert min(resent) >= UTTERANCE_S / 2
    # Nothing landed on the draining replica after its SIGTERM: reconnections
    # and fresh streams it was offered before haproxy knew were refused (503)
    # and retried elsewhere.
    assert run.term_opened_during_drain == 0
    assert run.term_sessions_after_signal == []
    assert run.term_sessions_logged == run.streams_before["r1"]
    # haproxy saw both go within the checks' reach (fall x inter, one more
    # interval of phase, and the check timeout).
    reach = (CHECK_FALL + 1) * CHECK_INTER_MS / 1000 + 1.0
    assert run.down_after_term_s <= reach
    assert run.down_after_kill_s <= reach
    assert run.states_at_end == {"r0": "UP", "r1": "DOWN", "r2": "DOWN"}
    # The one replica left serves every stream.
    assert run.survivor_active_after_kill == STREAMS
    assert run.survivor_ready_at_end == 200
