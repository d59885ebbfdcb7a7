"""Accuracy on real trained weights: every path through Earshot against
faster-whisper's own offline decode of the same files.

The reference is ``WhisperModel(folder, device="cpu", compute_type="int8")
.transcribe(audio, beam_size=5, language="en")``, one file at a time,
computed here. Each path must stay within half a point of its word error
rate on the same files (corpus WER, Whisper's English normaliser; see
``tests/kit/wer.py``), and must not cut a file short where the reference
does not (:func:`tests.kit.wer.ends_early`). The paths:

* ``earshot transcribe``: :func:`earshot.service.engine.batch.transcribe_files` as
  ``service/cli.py::cmd_transcribe`` calls it (beam 5, Silero segmenter, the
  CLI's default batch size), with ``--language en``;
* the HTTP API: ``POST /v1/audio/transcriptions`` on a real server on
  127.0.0.1, with the official ``openai`` client, four requests at a time;
* ``/v1/listen``: each file sent as fast as the connection takes it, then
  ``CloseStream`` (no interims), and a few LibriSpeech files paced in real
  time with interims; one stream at a time.

What runs (2 CPU cores; the module must stay well under 8 minutes) is
:data:`RUNS`: tiny.en on LibriSpeech through every path; base on LibriSpeech
and LJSpeech (22.05 kHz, so resampling is in play) through most.
``EARSHOT_ACCURACY=full`` runs every path on every (model, data set) pair.
``bench/accuracy.py`` measures the same table with speeds, and more paths.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from earshot.clients.stream import transcribe_stream
from earshot.core.decoding import DecodeOptions, default_max_batch
from earshot.core.voice import VadSettings, span_cutter
from earshot.models.runner import WhisperRunner
from earshot.models.silero import shared_model
from earshot.service.config import load_config
from earshot.service.engine.batch import transcribe_files
from earshot.service.engine.engine import Engine
from tests.kit.live import running_server
from tests.kit.wer import corpus_score, ends_early, normalize, score

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MARGIN = 0.005
"""How far (absolute WER) a path may be above faster-whisper on the same files."""

REFERENCE_MAX_WER = {
    # faster-whisper offline, measured on these machines (CTranslate2 4.8.5,
    # int8, 2 cores): tiny.en 2.43 % on LibriSpeech; base 3.16 % on
    # LibriSpeech and 6.68 % on LJSpeech. A reference well above these means
    # broken weights, test data or normaliser, not a fault of Earshot.
    ("tiny.en", "librispeech"): 0.03,
    ("base", "librispeech"): 0.04,
    ("base", "ljspeech"): 0.075,
}
CASES = list(REFERENCE_MAX_WER)
MODEL_FIXTURES = {"tiny.en": "tiny_en_model", "base": "base_model"}
TINY_LIBRI, BASE_LIBRI, BASE_LJ = CASES
RUNS: dict[str, list[tuple[str, str]]] = {
    # Which (model, data set) each path runs on by default: every path with
    # tiny.en; with base, the batch engine on both data sets and the streaming
    # endpointer and session on LibriSpeech, so that the module fits its time
    # (about 6 minutes here). bench/accuracy.py and EARSHOT_ACCURACY=full run
    # every path on every pair (about 9 minutes).
    "transcribe": [TINY_LIBRI, BASE_LIBRI, BASE_LJ],
    "http": [TINY_LIBRI],
    "listen_fast": [TINY_LIBRI, BASE_LIBRI],
    "listen_realtime": [TINY_LIBRI, BASE_LIBRI],
}
FULL = os.environ.get("EARSHOT_ACCURACY", "") == "full"
REALTIME_FILES = 2
"""The first files of LibriSpeech, streamed in real time one after another (14 s)."""
HTTP_CONCURRENCY = 4


@dataclass(frozen=True)
class Clip:
    name: str
    path: str
    text: str


@dataclass
class Case:
    """One model on one data set: its files, its runner and its reference."""

    model: str
    dataset: str
    clips: list[Clip]
    runner: WhisperRunner
    reference: dict[str, str] = field(default_factory=dict)
    """faster-whisper's offline transcript per file name."""


class Lab:
    """What the tests of this module share: one runner per model and one
    reference decode per (model, data set), made when first needed."""

    def __init__(self, manifest: Sequence[dict[str, Any]]) -> None:
        self.manifest = manifest
        self.runners: dict[str, WhisperRunner] = {}
        self.cases: dict[tuple[str, str], Case] = {}

    def case(self, model: str, dataset: str, folder: Path) -> Case:
        key = (model, dataset)
        if key not in self.cases:
            if model not in self.runners:
                self.runners[model] = WhisperRunner(folder, name=model)
            clips = [
                Clip(row["path"], row["abspath"], row["text"])
                for row in self.manifest
                if row["path"].startswith(f"{dataset}/")
            ]
            if not clips:
                pytest.skip(f"no {dataset} files in the test data")
            case = Case(model, dataset, clips, self.runners[model])
            case.reference = offline_reference(folder, clips)
            self.cases[key] = case
        return self.cases[key]


def offline_reference(folder: Path, clips: Sequence[Clip]) -> dict[str, str]:
    from faster_whisper import WhisperModel

    model = WhisperModel(str(folder), device="cpu", compute_type="int8")
    out = {}
    for clip in clips:
        segments, _ = model.transcribe(clip.path, beam_size=5, language="en")
        out[clip.name] = " ".join(s.text.strip() for s in segments)
    return out


@pytest.fixture(scope="module")
def lab(audio_manifest: list[dict[str, Any]]) -> Lab:
    return Lab(audio_manifest)


def case_id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.fixture(params=CASES, ids=case_id)
def case(request: pytest.FixtureRequest, lab: Lab) -> Case:
    model, dataset = request.param
    folder: Path = request.getfixturevalue(MODEL_FIXTURES[model])
    return lab.case(model, dataset, folder)


def cases_for(path: str) -> list[Any]:
    """The cases ``path`` runs on (:data:`RUNS`; with ``EARSHOT_ACCURACY=full``, all)."""
    chosen = CASES if FULL else RUNS[path]
    if path == "listen_realtime":
        chosen = [c for c in chosen if c[1] == "librispeech"]
    return [pytest.param(c, id=case_id(c)) for c in chosen]


def assert_close_to_reference(
    case: Case, path: str, clips: Sequence[Clip], hypotheses: Sequence[str]
) -> None:
    """The path's corpus WER is within :data:`MARGIN` of the reference's on
    ``clips``, and no file ends early where the reference does not. The
    per-file table (worst first) is printed, and is the failure message."""
    refs = [c.text for c in clips]
    fw = [case.reference[c.name] for c in clips]
    got, want = corpus_score(refs, hypotheses), corpus_score(refs, fw)
    early = [
        c.name
        for c, hyp, ref in zip(clips, hypotheses, fw, strict=True)
        if ends_early(c.text, hyp) and not ends_early(c.text, ref)
    ]
    rows = sorted(
        zip(clips, hypotheses, fw, strict=True),
        key=lambda r: score(r[0].text, r[2]).errors - score(r[0].text, r[1]).errors,
    )
    lines = [
        f"{case.model} on {case.dataset}, {path}: WER {100 * got.wer:.2f} % "
        f"({got.errors}/{got.words}) against faster-whisper {100 * want.wer:.2f} % "
        f"({want.errors}/{want.words}); ends early: {early or 'none'}"
    ]
    for clip, hyp, ref in rows[:6]:
        errors, fw_errors = score(clip.text, hyp).errors, score(clip.text, ref).errors
        if errors <= fw_errors and clip.name not in early:
            break
        lines += [
            f"  {clip.name}: {errors} errors (faster-whisper {fw_errors})",
            f"    truth:          {normalize(clip.text)}",
            f"    {path + ':':<15} {normalize(hyp)}",
            f"    faster-whisper: {normalize(ref)}",
        ]
    report = "\n".join(lines)
    print(report)
    assert got.wer <= want.wer + MARGIN, report
    assert not early, report


def run_async(body: Callable[[], Awaitable[list[str]]]) -> list[str]:
    return asyncio.run(asyncio.wait_for(body(), timeout=240))


async def gather_limited(jobs: Sequence[Callable[[], Awaitable[str]]], limit: int) -> list[str]:
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[str]]) -> str:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


def engine_for(case: Case) -> Engine:
    cfg = load_config(env={}, overrides={"language": "en"})
    return Engine.create(cfg, case.runner, vad_model=shared_model())


# ---------------------------------------------------------------------------


def test_faster_whisper_reference(case: Case) -> None:
    """The premise: the reference itself is as good as measured (the weights and
    the normaliser are what they should be)."""
    clips = case.clips
    got = corpus_score([c.text for c in clips], [case.reference[c.name] for c in clips])
    print(f"{case.model} on {case.dataset}: faster-whisper WER {100 * got.wer:.2f} %")
    assert got.wer <= REFERENCE_MAX_WER[(case.model, case.dataset)]


@pytest.mark.parametrize("case", cases_for("transcribe"), indirect=True)
def test_earshot_transcribe(case: Case) -> None:
    vad = VadSettings()
    by_path: dict[str, str] = {}
    for outcome in transcribe_files(
        [c.path for c in case.clips],
        case.runner,
        DecodeOptions(beam_size=5),
        span_cutter(shared_model(), vad),
        batch_size=default_max_batch(case.runner.capabilities.device, live=False),
        language="en",
    ):
        assert outcome.transcript is not None, outcome.error
        by_path[outcome.label] = outcome.transcript.text
    hyps = [by_path[c.path] for c in case.clips]
    assert_close_to_reference(case, "transcribe", case.clips, hyps)


@pytest.mark.parametrize("case", cases_for("http"), indirect=True)
def test_http_transcriptions(case: Case) -> None:
    from openai import AsyncOpenAI

    async def main() -> list[str]:
        async with (
            running_server(engine_for(case)) as url,
            AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=200.0) as client,
        ):

            def job(clip: Clip) -> Callable[[], Awaitable[str]]:
                async def post() -> str:
                    result = await client.audio.transcriptions.create(
                        file=Path(clip.path), model="whisper-1", language="en"
                    )
                    return result.text

                return post

            return await gather_limited([job(c) for c in case.clips], HTTP_CONCURRENCY)

    assert_close_to_reference(case, "http", case.clips, run_async(main))


def stream_files(case: Case, clips: Sequence[Clip], *, realtime: bool) -> list[str]:
    """Each clip over its own /v1/listen stream, one after another; the finals
    joined per clip. Every stream must end with a normal close (1000)."""

    async def main() -> list[str]:
        texts = []
        async with running_server(engine_for(case)) as url:
            for clip in clips:
                got = await transcribe_stream(
                    url.replace("http://", "ws://") + "/v1/listen",
                    clip.path,
                    language="en",
                    interim_results=realtime,
                    realtime=realtime,
                )
                assert got.ok, (clip.name, got.close_code, got.close_reason, got.errors)
                texts.append(got.text())
        return texts

    return run_async(main)


@pytest.mark.parametrize("case", cases_for("listen_fast"), indirect=True)
def test_listen_fast(case: Case) -> None:
    # One stream at a time: several fast streams of base on two cores make
    # the server refuse the next one (503 server_full, as it should when a
    # final would wait too long); bench/accuracy.py streams several at once.
    hyps = stream_files(case, case.clips, realtime=False)
    assert_close_to_reference(case, "listen fast", case.clips, hyps)


@pytest.mark.parametrize("case", cases_for("listen_realtime"), indirect=True)
def test_listen_realtime(case: Case) -> None:
    clips = case.clips[:REALTIME_FILES]
    hyps = stream_files(case, clips, realtime=True)
    assert_close_to_reference(case, "listen real time", clips, hyps)
