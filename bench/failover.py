"""Failover figures: three replicas behind haproxy, one drained, one killed.

Runs the scenario of ``tests/test_failover.py`` (:func:`tests.kit.failover.run_failover`:
three ``tests.kit.replica`` processes with the tone-language backend and the
real Silero endpointer, Debian's ``haproxy`` in front with least connections
and ``/readyz`` health checks, 12 real-time streams; SIGTERM to one replica,
later SIGKILL to another, clients reconnecting through haproxy) ``--runs``
times and writes every run's figures to ``--out``: streams moved per kill,
words lost and doubled, reconnect time p50/max (client side), time until
haproxy marked each replica DOWN, streams opened on the draining replica
after its SIGTERM, upgrades it refused that haproxy retried elsewhere.

    python bench/failover.py --runs 3 --out bench/results/failover.json

Needs the ``haproxy`` binary (``apt-get install haproxy``). About 30 s a run,
all on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.kit.balancer import haproxy_binary, haproxy_config  # noqa: E402
from tests.kit.failover import run_failover  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "failover.json"))
    args = parser.parse_args()
    binary = haproxy_binary()
    if binary is None:
        raise SystemExit("haproxy is not installed (apt-get install haproxy)")
    version = subprocess.run(
        [binary, "-v"], capture_output=True, text=True, timeout=10
    ).stdout.splitlines()[0]
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="earshot-failover-") as folder:
            run = run_failover(Path(folder), binary)
        summary = run.summary()
        print(f"run {i + 1}: {json.dumps(summary)}", flush=True)
        runs.append(run.to_dict())
    result = {
        "benchmark": "failover",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "haproxy": version,
        "haproxy_config_example": haproxy_config(
            8000, [("r0", 8001), ("r1", 8002), ("r2", 8003)], Path("/run/haproxy.sock")
        ),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
