"""The live fuzz of ``tests/test_fuzz.py`` at scale.

Serves the tone-language backend in-process on 127.0.0.1 (or fuzzes a server
that is already running, ``--url``) and sends it random websocket text and
binary frames, websocket protocol oddities, query strings (plain GETs and
upgrades), multipart uploads, methods, paths and raw TCP bytes from a few
concurrent workers, while well-behaved tone-language streams with a known
script run one after another alongside. Every input comes from a generator
seeded by the run's seed and the input's number (``tests/kit/fuzz.py``), so
any one can be sent again alone with ``--replay``.

    python bench/fuzz.py                         # 100,000 inputs, seed 0
    python bench/fuzz.py --count 20000 --seed 3
    python bench/fuzz.py --kinds multipart tcp_garbage --count 5000
    python bench/fuzz.py --seed 3 --replay 1234 99  # inputs 1234 and 99 of seed 3, alone
    python bench/fuzz.py --url http://127.0.0.1:8000   # a running `earshot serve`

Prints the inputs per kind, the outcomes per kind (HTTP status, websocket
close code), each well-behaved stream's finals (expected vs got), what the
server logged at ERROR (in-process only) and the rule violations grouped by
cause with the shortest reproducer of each; writes it all to
``bench/results/fuzz.json``. The exit status is 1 when a rule was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import sys
import time
import warnings
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam  # noqa: E402

from tests.kit.fuzz import CASES, FuzzReport, ServerLogTrap, replay, run_fuzz  # noqa: E402
from tests.kit.live import running_server, tone_engine  # noqa: E402
from tests.kit.tones import random_script  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "fuzz.json"


@contextlib.asynccontextmanager
async def server(url: str | None) -> AsyncIterator[str]:
    if url:
        yield url.rstrip("/")
        return
    async with running_server(tone_engine()) as local:
        yield local


async def main_async(args: argparse.Namespace) -> int:
    kinds = args.kinds or None
    async with server(args.url) as url:
        if args.replay:
            broken = 0
            for index in args.replay:
                trap = ServerLogTrap()
                with trap.installed():
                    res = await replay(url, args.seed, index, kinds)
                    await asyncio.sleep(0.5)  # what the server logs once the client is gone
                print(f"input {index} of seed {args.seed}: {res.kind}, {res.outcome}")
                for v in res.violations:
                    print(f"  {v.rule} (status {v.status}): {v.detail[:300]!r}")
                    print(f"  input: {v.reproducer}")
                for r in trap.records:
                    print(f"  server log: {r.line()}")
                broken += bool(res.violations) or any(not r.protocol for r in trap.records)
            return 1 if broken else 0

        step = max(1, args.count // 10)
        marks = iter(range(step, args.count + step, step))
        next_mark = next(marks)
        t0 = time.monotonic()

        def progress(done: int) -> None:
            nonlocal next_mark
            if done >= next_mark:
                rate = done / max(1e-9, time.monotonic() - t0)
                print(f"  ... {done} inputs ({rate:.0f}/s)", file=sys.stderr, flush=True)
                next_mark = next(marks, args.count * 10)

        script = random_script(8, (2, 5), seed=args.seed + 11)
        report: FuzzReport = await run_fuzz(
            url,
            count=args.count,
            seed=args.seed,
            concurrency=args.concurrency,
            script=script,
            repeat_well_behaved=True,
            speed=args.speed,
            kinds=kinds,
            progress=progress,
        )
    print("\n".join(report.lines(examples=args.examples)))
    if args.url:
        print("(external server: its log is not seen here)")
    out = {
        "bench": "fuzz",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "server": args.url or "in-process, tone-language backend (tests/kit/live.py)",
        "count": args.count,
        "concurrency": args.concurrency,
        "well_behaved_speed": args.speed,
        "kinds": kinds or sorted(CASES),
        "inputs_per_s": round(report.inputs / max(1e-9, report.elapsed_s), 1),
        **report.to_json(),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    wb_ok = all(wb.ok for wb in report.well_behaved)
    return 0 if not report.violations and wb_ok and report.health_status == 200 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="inputs to send")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent fuzz workers")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="well-behaved streams' pace, times real time"
    )
    parser.add_argument("--kinds", nargs="*", choices=sorted(CASES), help="only these kinds")
    parser.add_argument("--url", help="fuzz this running server instead of an in-process one")
    parser.add_argument(
        "--replay", type=int, nargs="+", help="send only these inputs of --seed, one by one"
    )
    parser.add_argument("--examples", type=int, default=2, help="reproducers shown per group")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    # aiohttp warns about each malformed Content-Disposition it reads, and
    # the fuzz sends thousands: the answers are what is judged here.
    warnings.filterwarnings("ignore", category=BadContentDispositionHeader)
    warnings.filterwarnings("ignore", category=BadContentDispositionParam)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
