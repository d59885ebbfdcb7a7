"""Batch throughput of the runner: audio seconds transcribed per wall second.

For each model architecture (random weights, real compute cost) and batch
size, the same windows of real speech are decoded in batches of that size.
Each configuration runs in its own process so that its peak memory is its
own. Prints a table and writes JSON.

    python bench/batch_throughput.py                       # tiny and base, CPU int8
    python bench/batch_throughput.py --device cuda --sizes tiny base small

The models emit ``--tokens`` text tokens per window (about 3 per second of
speech for the default 25 s windows), so decoding costs what real speech costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def speech_windows(count: int, seconds: float) -> list[Any]:
    """``count`` windows of ``seconds`` of real speech from the shared test data."""
    import numpy as np

    from earshot.core.decoding import Window
    from earshot.service.engine.audiofile import load_audio
    from tests.kit.paths import audio_dir

    files = sorted((audio_dir() / "librispeech").glob("*.flac"))
    if not files:
        raise SystemExit(f"no speech found under {audio_dir()} (set EARSHOT_TESTDATA)")
    speech = np.concatenate([load_audio(f).samples for f in files])
    n = int(seconds * 16000)
    return [
        Window(np.ascontiguousarray(speech[(i * n) % (len(speech) - n) :][:n]), language="en")
        for i in range(count)
    ]


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    from earshot.core.decoding import DecodeOptions
    from earshot.models.runner import RunnerSettings, WhisperRunner
    from tests.kit.whisper_builder import cached_model

    path = cached_model(args.size, args.tokens, 0, args.quantization)
    runner = WhisperRunner(
        path,
        RunnerSettings(
            device=args.device,
            compute_type=args.compute_type,
            cpu_threads=args.cpu_threads,
            workers=1,
        ),
    )
    windows = speech_windows(args.windows, args.window_s)
    options = DecodeOptions(beam_size=args.beam_size, without_timestamps=True)
    runner.transcribe_batch(windows[: args.batch], options)  # warm-up
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        for i in range(0, len(windows), args.batch):
            runner.transcribe_batch(windows[i : i + args.batch], options)
        best = min(best, time.perf_counter() - start)
    audio = sum(w.duration for w in windows)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "size": args.size,
        "batch": args.batch,
        "device": runner.device,
        "compute_type": runner.compute_type,
        "windows": len(windows),
        "audio_s": round(audio, 2),
        "wall_s": round(best, 3),
        "audio_s_per_wall_s": round(audio / best, 2),
        "wall_s_per_window": round(best / len(windows), 4),
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute-type", default="auto")
    p.add_argument("--quantization", default="int8", help="weights as saved (int8, float16)")
    p.add_argument("--cpu-threads", type=int, default=0)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window-s", type=float, default=25.0)
    p.add_argument("--tokens", type=int, default=75)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "batch_throughput.json"))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        print(json.dumps(run_one(args)))
        return 0

    rows: list[dict[str, Any]] = []
    header = f"{'model':<6} {'batch':>5} {'audio s/wall s':>15} {'s/window':>9} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for batch in args.batches:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                "--size",
                size,
                "--batch",
                str(batch),
                "--device",
                args.device,
                "--compute-type",
                args.compute_type,
                "--quantization",
                args.quantization,
                "--cpu-threads",
                str(args.cpu_threads),
                "--windows",
                str(args.windows),
                "--window-s",
                str(args.window_s),
                "--tokens",
                str(args.tokens),
                "--beam-size",
                str(args.beam_size),
                "--repeat",
                str(args.repeat),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{size:<6} {batch:>5} {row['audio_s_per_wall_s']:>15.1f} "
                f"{row['wall_s_per_window']:>9.3f} {row['peak_rss_mb']:>8.0f}",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "batch_throughput",
                "command": " ".join(sys.argv),
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpus": os.cpu_count(),
                },
                "settings": {
                    k: v for k, v in vars(args).items() if k not in ("one", "size", "batch")
                },
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
