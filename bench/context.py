"""Accuracy and cost of the finals by encoder context: Whisper's padded 30 s
against ``short_context`` with some seconds of silence after the speech.

Decodes every LibriSpeech utterance of the shared test data once per context
with the server's final options (beam 5, word timestamps), on a real model
(tiny.en by default), from two worker threads as the server does on two
cores, and prints corpus WER (tests/kit/wer.py's normaliser) and windows per
second. The offline reference is faster-whisper's own transcribe of the same
files (beam 5).

    python bench/context.py                    # tiny.en; pads 1, 3, 5, 10 s and full
    python bench/context.py --model base --pads 1 5

Writes ``bench/results/context-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.decode_workers import decode_concurrently  # noqa: E402
from earshot.core.decoding import DecodeOptions, Window  # noqa: E402
from earshot.models.runner import RunnerSettings, WhisperRunner, usable_cpus  # noqa: E402
from earshot.models.store import ModelStore  # noqa: E402
from tests.kit.wer import corpus_score  # noqa: E402

FINAL = DecodeOptions(beam_size=5, without_timestamps=True, word_timestamps=True)


def recordings() -> list[tuple[str, Any, str]]:
    import soundfile as sf

    from tests.kit.paths import audio_dir

    folder = audio_dir()
    out = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["path"].startswith("librispeech/") and row["duration_s"] <= 29.5:
            audio, rate = sf.read(folder / row["path"], dtype="float32")
            assert rate == 16000
            out.append((row["path"], audio, row["text"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--pads", nargs="+", type=float, default=[1.0, 3.0, 5.0, 10.0])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / f"context-{args.model}.json"

    model = ModelStore().resolve(args.model)
    clips = recordings()
    refs = [text for _, _, text in clips]
    windows = [Window(audio, language="en") for _, audio, _ in clips]
    audio_s = sum(len(w.audio) for w in windows) / 16000

    from faster_whisper import WhisperModel

    offline_model = WhisperModel(str(model.path), device="cpu", compute_type="int8")
    offline = [
        " ".join(
            s.text.strip() for s in offline_model.transcribe(audio, beam_size=5, language="en")[0]
        )
        for _, audio, _ in clips
    ]
    del offline_model
    offline_wer = corpus_score(refs, offline).wer
    head = f"{args.model}: {len(clips)} utterances, {audio_s:.0f} s"
    print(f"{head}; offline WER {100 * offline_wer:.2f} %")

    runner = WhisperRunner(model.path, RunnerSettings(device="cpu"), name=args.model)
    runner.transcribe_batch(windows[:1], FINAL)
    rows = []
    print(f"{'context':<12} {'WER %':>6} {'diff':>6} {'win/s':>6}")
    for pad in [None, *args.pads]:
        options = (
            FINAL if pad is None else replace(FINAL, short_context=True, short_context_pad_s=pad)
        )
        texts, wall, _ = decode_concurrently(runner, windows, options, runner.workers)
        wer = corpus_score(refs, texts).wer
        label = "full 30 s" if pad is None else f"len + {pad:g} s"
        diff = 100 * (wer - offline_wer)
        rate = len(windows) / wall
        print(f"{label:<12} {100 * wer:>6.2f} {diff:>+6.2f} {rate:>6.2f}", flush=True)
        rows.append(
            {
                "context": "full" if pad is None else "short",
                "pad_s": pad,
                "wer": round(wer, 5),
                "wer_diff_points": round(100 * (wer - offline_wer), 2),
                "windows_per_s": round(len(windows) / wall, 3),
                "wall_s": round(wall, 2),
                "texts": texts,
            }
        )
    result = {
        "benchmark": "context",
        "command": " ".join(["bench/context.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "cpus": usable_cpus()},
        "model": args.model,
        "workers": runner.workers,
        "utterances": [path for path, _, _ in clips],
        "audio_s": round(audio_s, 1),
        "offline_wer": round(offline_wer, 5),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
