"""Hallucination on the real trained models: a minute of silence, of noise and of
music-like tones gives no text through any path (the batch CLI, the stream
and the OpenAI-compatible HTTP API), with tiny.en and with base.

The signals are made here with numpy (16 kHz, 60 s each, fixed seeds) and
written to 16-bit WAV files. Whisper alone invents text for all of them
("you", "Thank you very much.", "I'm sorry, I'm sorry, ..."); what keeps it
out is voice activity (no decode without voice, DESIGN.md "Streaming
policy") and then the guards of core/guards.py. So besides the empty
transcripts the tests check that the server's one decode queue ran no job at
all for these signals, and the CLI decoded no window, and, so that "no
text" means something, that the same paths do transcribe real speech
(``jfk/jfk.flac`` from the shared test data).

When a path does give text, the failure message carries the voice-activity
spans of the signal and what the model says about each (no-speech
probability, average log-probability, compression ratio, guard verdict), so
that the cause can be read from the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from openai import AsyncOpenAI

from earshot.clients.stream import transcribe_stream, transcript_of
from earshot.core.decoding import SAMPLE_RATE, Window
from earshot.core.guards import compression_ratio, drop_reason
from earshot.core.voice import StreamingVad, VadSettings, segment_speech
from earshot.models.runner import WhisperRunner
from earshot.models.silero import shared_model
from earshot.service.cli import main as cli_main
from earshot.service.config import load_config
from earshot.service.engine.audiofile import load_audio
from earshot.service.engine.engine import Engine, final_options
from earshot.service.engine.scheduler import JobKind, SchedulerStats
from tests.kit.live import running_server
from tests.kit.paths import audio_dir

pytestmark = pytest.mark.slow

Audio = npt.NDArray[np.float32]

SECONDS = 60
N = SECONDS * SAMPLE_RATE
SPEECH = "jfk/jfk.flac"


# --------------------------------------------------------------------------- signals


def _at_level(x: npt.NDArray[np.float64], dbfs: float) -> Audio:
    """``x`` without DC, scaled to an RMS of ``dbfs`` (0 dBFS: a full-scale RMS of 1)."""
    x = x - x.mean()
    out: Audio = (x * (10.0 ** (dbfs / 20.0) / np.sqrt(np.mean(x**2)))).astype(np.float32)
    assert np.abs(out).max() < 1.0, "the signal would clip"
    return out


def _white(seed: int) -> npt.NDArray[np.float64]:
    return np.random.default_rng(seed).standard_normal(N)


def _shaped(seed: int, gain: Callable[[npt.NDArray[Any]], Any]) -> npt.NDArray[np.float64]:
    """White noise through the amplitude response ``gain(frequency_hz)``."""
    spectrum = np.fft.rfft(_white(seed))
    freqs = np.fft.rfftfreq(N, 1.0 / SAMPLE_RATE)
    return np.asarray(np.fft.irfft(spectrum * gain(freqs), n=N), np.float64)


def _hz(midi: int) -> float:
    return float(440.0 * 2.0 ** ((midi - 69) / 12.0))


def _note(freq: float, seconds: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A sustained tone with five harmonics, attack, release and a slow swell."""
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = sum(
        0.6**k * np.sin(2 * np.pi * freq * (k + 1) * t + rng.uniform(0, 2 * np.pi))
        for k in range(5)
    )
    attack, release = min(0.08, seconds / 4), min(0.3, seconds / 3)
    envelope = np.clip(np.minimum(t / attack, (seconds - t) / release), 0.0, 1.0)
    envelope *= 1.0 + 0.2 * np.sin(2 * np.pi * 0.5 * t)
    return np.asarray(tone * envelope)


def _sequence(seed: int, next_sound: Callable[[np.random.Generator, int], Any]) -> Audio:
    """Sounds of 0.5 to 2 s back to back for a minute; ``next_sound(rng, i)``
    gives the i-th, its length chosen by the caller."""
    rng = np.random.default_rng(seed)
    out = np.zeros(N)
    pos, i = 0, 0
    while pos < N:
        sound = np.asarray(next_sound(rng, i))
        n = min(len(sound), N - pos)
        out[pos : pos + n] += sound[:n]
        pos, i = pos + n, i + 1
    return _at_level(out, -20.0)


def chords() -> Audio:
    """I-vi-IV-V triads around middle C, 1 to 2 s each."""
    progression = [(60, 64, 67), (57, 60, 64), (53, 57, 60), (55, 59, 62)]

    def chord(rng: np.random.Generator, i: int) -> Any:
        seconds = float(rng.choice([1.0, 1.5, 2.0]))
        return sum(_note(_hz(m), seconds, rng) for m in progression[i % 4])

    return _sequence(5, chord)


def melody() -> Audio:
    """A random walk on the C major scale with an octave below, notes of 0.5 to 2 s."""
    scale = [60, 62, 64, 65, 67, 69, 71, 72]

    def note(rng: np.random.Generator, i: int) -> Any:
        seconds = float(rng.choice([0.5, 0.75, 1.0, 2.0]))
        m = scale[int(rng.integers(len(scale)))]
        return _note(_hz(m), seconds, rng) + 0.5 * _note(_hz(m - 12), seconds, rng)

    return _sequence(6, note)


SIGNALS: dict[str, Callable[[], Audio]] = {
    "digital_silence": lambda: np.zeros(N, np.float32),
    "near_silence": lambda: _at_level(_white(1), -70.0),
    "white_noise": lambda: _at_level(_white(2), -25.0),
    "pink_noise": lambda: _at_level(_shaped(3, lambda f: 1.0 / np.sqrt(np.maximum(f, 20))), -25.0),
    "telephone_noise": lambda: _at_level(_shaped(4, lambda f: (f >= 300) & (f <= 3400)), -25.0),
    "chords": chords,
    "melody": melody,
}
"""Each signal: 60 s at 16 kHz, deterministic. Noise at -25 dBFS RMS, tones at -20."""


@pytest.fixture(scope="module")
def signal_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("signals")
    files = {}
    for name, make in SIGNALS.items():
        audio = make()
        assert audio.shape == (N,)
        files[name] = folder / f"{name}.wav"
        sf.write(files[name], audio, SAMPLE_RATE, subtype="PCM_16")
    return files


@pytest.fixture(scope="module")
def speech_file(testdata: Path) -> Path:
    path = audio_dir() / SPEECH
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


# --------------------------------------------------------------------------- models


class Model(NamedTuple):
    name: str
    path: Path


@pytest.fixture(scope="module", params=["tiny.en", "base"])
def model(request: pytest.FixtureRequest) -> Model:
    fixture = {"tiny.en": "tiny_en_model", "base": "base_model"}[request.param]
    return Model(request.param, request.getfixturevalue(fixture))


@pytest.fixture(scope="module")
def runner(model: Model) -> WhisperRunner:
    return WhisperRunner(model.path)


def explain(runner: WhisperRunner, wav: Path) -> str:
    """What voice activity finds in ``wav`` and what the model makes of each
    span (decoded with the server's final options), for a failure message."""
    options = final_options(load_config(env={}))
    audio = load_audio(str(wav)).samples
    vad = StreamingVad(shared_model(), VadSettings(history_s=SECONDS + 1))
    vad.feed(audio)
    _, probs = vad.frame_probabilities()
    spans = segment_speech(audio, model=shared_model())
    lines = [f"{wav.name}: voice probability max {probs.max():.3f}, spans {len(spans)}"]
    for span in spans[:8]:
        piece = audio[span.start_sample : span.end_sample][: 30 * SAMPLE_RATE]
        (hyp,) = runner.transcribe_batch([Window(piece, language="en")], options)
        lines.append(
            f"  {span.start:.2f}-{span.end:.2f} s: {hyp.text!r} no_speech_prob "
            f"{hyp.no_speech_prob:.3f} avg_logprob {hyp.avg_logprob:.3f} compression "
            f"{compression_ratio(hyp.text):.2f} guard {drop_reason(hyp)}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


@dataclass
class CliRun:
    code: int
    outputs: dict[str, dict[str, Any]]
    """The JSON transcript of each file, by file stem."""
    windows: int
    """Windows decoded, from the CLI's summary line."""
    stderr: str


def run_cli(files: list[Path], model_path: Path) -> CliRun:
    out, err = io.StringIO(), io.StringIO()
    args = ["transcribe", *map(str, files), "--model", str(model_path)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([*args, "--format", "json", "--no-progress"])
    outputs = {}
    for line in out.getvalue().splitlines():
        data = json.loads(line)
        outputs[Path(data["source"]).stem] = data
    summary = re.search(r"(\d+) windows in \d+ batches", err.getvalue())
    assert summary, err.getvalue()
    return CliRun(code, outputs, int(summary.group(1)), err.getvalue())


@pytest.fixture(scope="module")
def cli_signals(model: Model, signal_files: dict[str, Path]) -> CliRun:
    """One CLI run over every signal."""
    return run_cli(list(signal_files.values()), model.path)


@pytest.fixture(scope="module")
def cli_speech(model: Model, speech_file: Path) -> CliRun:
    return run_cli([speech_file], model.path)


# --------------------------------------------------------------------------- server


def _jobs(stats: SchedulerStats) -> tuple[int, int]:
    """Jobs submitted and completed, both kinds."""
    return sum(stats.submitted.values()), sum(stats.completed.values())


@dataclass
class Outcome:
    """What one path gave for one file."""

    texts: list[str]
    """Every non-empty text: transcripts of stream Results (finals and
    interims), HTTP ``text`` and segment texts."""
    submitted: int
    """Decode jobs the server's scheduler accepted for it."""
    completed_finals: int = 0
    detail: list[Any] = field(default_factory=list)
    """Raw evidence for a failure message (Results, verbose segments)."""


@dataclass
class Served:
    stream: dict[str, Outcome]
    http: dict[str, Outcome]


async def _stream(engine: Engine, url: str, wav: Path) -> Outcome:
    before = engine.scheduler.stats()
    result = await transcribe_stream(f"{url}/v1/listen", wav, sample_rate=16000, realtime=False)
    after = engine.scheduler.stats()
    assert result.ok, (result.close_code, result.close_reason, result.errors)
    results = [m for m in result.messages if m.get("type") == "Results"]
    texts = [transcript_of(m) for m in results if transcript_of(m).strip()]
    finals = after.completed[JobKind.FINAL] - before.completed[JobKind.FINAL]
    return Outcome(texts, _jobs(after)[0] - _jobs(before)[0], finals, results)


async def _http(engine: Engine, client: AsyncOpenAI, wav: Path) -> Outcome:
    before = engine.scheduler.stats()
    plain = await client.audio.transcriptions.create(file=wav, model="whisper-1")
    verbose = await client.audio.transcriptions.create(
        file=wav, model="whisper-1", response_format="verbose_json"
    )
    after = engine.scheduler.stats()
    segments = [s.model_dump() for s in verbose.segments or []]
    texts = [t for t in (plain.text, verbose.text) if t.strip()]
    texts += [s["text"] for s in segments if s["text"].strip()]
    finals = after.completed[JobKind.FINAL] - before.completed[JobKind.FINAL]
    return Outcome(texts, _jobs(after)[0] - _jobs(before)[0], finals, segments)


@pytest.fixture(scope="module")
def served(
    model: Model, runner: WhisperRunner, signal_files: dict[str, Path], speech_file: Path
) -> Served:
    """One engine and server for the model; every signal and the speech file
    streamed (as fast as the server takes them) and posted to the HTTP API."""
    engine = Engine.create(load_config(env={}, overrides={}), runner, vad_model=shared_model())
    files = {**signal_files, "speech": speech_file}

    async def main() -> Served:
        stream, http = {}, {}
        async with (
            running_server(engine) as url,
            AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120) as client,
        ):
            ws = "ws" + url.removeprefix("http")
            for name, wav in files.items():
                stream[name] = await _stream(engine, ws, wav)
                http[name] = await _http(engine, client, wav)
        return Served(stream, http)

    return asyncio.run(asyncio.wait_for(main(), timeout=250))


# --------------------------------------------------------------------------- tests


@pytest.fixture(params=list(SIGNALS))
def signal(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_cli_gives_no_text(
    signal: str,
    model: Model,
    cli_signals: CliRun,
    signal_files: dict[str, Path],
    runner: WhisperRunner,
) -> None:
    assert cli_signals.code == 0, cli_signals.stderr
    data = cli_signals.outputs[signal]
    assert data["duration"] == pytest.approx(SECONDS, abs=0.01)
    said = [s["text"] for s in data["segments"] if s["text"].strip()]
    assert not data["text"] and not said, (
        f"{model.name} CLI heard {data['text']!r} in {signal}:\n"
        + explain(runner, signal_files[signal])
    )


def test_cli_decodes_no_window_for_any_signal(model: Model, cli_signals: CliRun) -> None:
    assert set(cli_signals.outputs) == set(SIGNALS)
    assert cli_signals.windows == 0, cli_signals.stderr


def test_stream_gives_no_text(
    signal: str,
    model: Model,
    served: Served,
    signal_files: dict[str, Path],
    runner: WhisperRunner,
) -> None:
    outcome = served.stream[signal]
    assert not outcome.texts, (
        f"{model.name} stream heard {outcome.texts!r} in {signal}:\n"
        + explain(runner, signal_files[signal])
    )
    # No decode runs on audio without voice: not one job reached the queue.
    assert outcome.submitted == 0


def test_http_gives_no_text(
    signal: str,
    model: Model,
    served: Served,
    signal_files: dict[str, Path],
    runner: WhisperRunner,
) -> None:
    outcome = served.http[signal]
    assert not outcome.texts, (
        f"{model.name} HTTP API heard {outcome.texts!r} in {signal} "
        f"(verbose segments {outcome.detail}):\n" + explain(runner, signal_files[signal])
    )
    assert outcome.submitted == 0


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


JFK_WORDS = {"ask", "not", "what", "your", "country", "can", "do", "for", "you"}


def _heard_speech(text: str) -> bool:
    return set(_words(text)) >= JFK_WORDS


def test_cli_transcribes_speech(model: Model, cli_speech: CliRun) -> None:
    assert cli_speech.code == 0, cli_speech.stderr
    (data,) = cli_speech.outputs.values()
    assert _heard_speech(data["text"]), data["text"]
    assert data["segments"] and cli_speech.windows > 0


def test_stream_transcribes_speech(model: Model, served: Served) -> None:
    outcome = served.stream["speech"]
    finals = [transcript_of(m) for m in outcome.detail if m["is_final"]]
    assert _heard_speech(" ".join(finals)), finals
    # What the no-text tests look at does see text when there is some.
    assert outcome.texts and outcome.completed_finals > 0


def test_http_transcribes_speech(model: Model, served: Served) -> None:
    outcome = served.http["speech"]
    assert outcome.texts and all(_heard_speech(t) for t in outcome.texts[:2]), outcome.texts
    assert outcome.detail, "verbose_json has no segments"
    assert outcome.completed_finals > 0


def test_signals_are_what_they_claim() -> None:
    """The generated signals: length, level and (for the shaped noise) spectrum."""

    def dbfs(x: Audio) -> float:
        return float(20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-12))

    made = {name: make() for name, make in SIGNALS.items()}
    assert not made["digital_silence"].any()
    assert dbfs(made["near_silence"]) == pytest.approx(-70.0, abs=0.1)
    for name in ("white_noise", "pink_noise", "telephone_noise"):
        assert dbfs(made[name]) == pytest.approx(-25.0, abs=0.1)
    for name in ("chords", "melody"):
        assert dbfs(made[name]) == pytest.approx(-20.0, abs=0.1)

    def band_share(x: Audio, lo: float, hi: float) -> float:
        power = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(len(x), 1.0 / SAMPLE_RATE)
        return float(power[(f >= lo) & (f < hi)].sum() / power.sum())

    assert band_share(made["telephone_noise"], 300, 3401) > 0.999
    assert band_share(made["pink_noise"], 0, 1000) > 0.5 > band_share(made["white_noise"], 0, 1000)
    # The same every time.
    assert np.array_equal(SIGNALS["melody"](), made["melody"])
