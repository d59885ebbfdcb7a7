"""The runner through the real faster-whisper and CTranslate2 code, on
random-weight models built by the test kit."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import numpy as np
import pytest

from earshot.core.decoding import Backend, DecodeOptions, Window, default_decode_workers
from earshot.core.errors import ConfigError, InvalidRequestError
from earshot.models.runner import RunnerSettings, WhisperRunner, pick_device
from earshot.service.engine.audiofile import load_audio
from tests.kit.paths import audio_dir
from tests.kit.whisper_builder import cached_model


@pytest.fixture(scope="module")
def runner(micro_model: Path) -> WhisperRunner:
    return WhisperRunner(micro_model, RunnerSettings(device="cpu", cpu_threads=2, workers=1))


@pytest.fixture(scope="module")
def speech(testdata: Path) -> np.ndarray:
    return load_audio(audio_dir() / "librispeech" / "1089-134686-0000.flac").samples


def test_runner_is_a_backend(runner: WhisperRunner) -> None:
    assert isinstance(runner, Backend)
    assert runner.device == "cpu" and runner.compute_type == "int8"


def test_batched_decoding_equals_decoding_each_window_alone(
    runner: WhisperRunner, speech: np.ndarray
) -> None:
    sr = 16000
    windows = [
        Window(speech[: 2 * sr], language="en"),
        Window(speech[sr : 9 * sr], language="en", prompt="the stew was hot"),
        Window(speech[3 * sr : 10 * sr], language="en"),
        Window(speech[: 5 * sr], language="en", prompt="a much longer piece of previous text"),
        Window(speech[2 * sr : 4 * sr], language="en", prompt="the stew was cold"),
    ]
    options = DecodeOptions(beam_size=1)
    calls = runner.calls
    batched = runner.transcribe_batch(windows, options)
    assert runner.calls == calls + 1
    for window, hyp in zip(windows, batched, strict=True):
        alone = runner.transcribe_batch([window], options)[0]
        assert hyp.tokens == alone.tokens
        assert hyp.text == alone.text
        assert hyp.avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-3)


def test_hypothesis_fields(runner: WhisperRunner, speech: np.ndarray) -> None:
    window = Window(speech[: 6 * 16000], language="en")
    hyp = runner.transcribe_batch([window], DecodeOptions(word_timestamps=True))[0]
    assert hyp.text and hyp.language == "en"
    assert 0.0 <= hyp.no_speech_prob <= 1.0
    assert hyp.avg_logprob <= 0.0
    assert hyp.segments and hyp.segments[0].start >= 0.0
    assert hyp.segments[-1].end <= window.duration + 1e-6
    assert hyp.words, "word timings were asked for"
    assert all(0.0 <= w.start <= w.end <= window.duration + 0.02 for w in hyp.words)
    assert "".join(w.word for w in hyp.words).strip() == hyp.text


def test_language_is_detected_when_not_given(runner: WhisperRunner, speech: np.ndarray) -> None:
    hyp = runner.transcribe_batch([Window(speech[: 3 * 16000])], DecodeOptions())[0]
    assert hyp.language in (runner.capabilities.languages or ())


def test_token_budget_follows_the_window_duration(tokenizer_path: Path, speech: np.ndarray) -> None:
    long_model = cached_model("micro", 60, 0, "int8")
    runner = WhisperRunner(long_model, RunnerSettings(device="cpu"))
    window = Window(speech[:16000], language="en")
    # The model ends its first decode after 60 text tokens; with a large
    # budget the window is then continued from its last timestamp (see below).
    roomy = DecodeOptions(min_tokens=200)
    unbounded = runner.transcribe_batch([window], roomy)[0]
    assert len([t for t in unbounded.tokens if t < 50257]) >= 60
    assert len(unbounded.tokens) <= roomy.token_budget(1.0)
    options = DecodeOptions(max_tokens_per_second=4.0, min_tokens=2)
    bounded = runner.transcribe_batch([window], options)[0]
    assert len(bounded.tokens) == options.token_budget(1.0) == 6
    assert bounded.tokens == unbounded.tokens[:6]


def test_continuations_share_the_window_budget(tokenizer_path: Path, speech: np.ndarray) -> None:
    # With timestamps, a window that ends early is decoded again from its last
    # timestamp; random weights end early at random, so continuations happen,
    # but the whole window, continuations included, keeps to its budget.
    long_model = cached_model("micro", 60, 0, "int8")
    runner = WhisperRunner(long_model, RunnerSettings(device="cpu"))
    window = Window(speech[: 5 * 16000], language="en")
    for options in (DecodeOptions(), DecodeOptions(max_tokens_per_second=4.0, min_tokens=2)):
        calls = runner.calls
        hyp = runner.transcribe_batch([window], options)[0]
        assert runner.calls == calls + 1
        assert 0 < len(hyp.tokens) <= options.token_budget(window.duration)
        assert all(0.0 <= s.start <= s.end <= window.duration + 0.02 for s in hyp.segments)


def test_bad_windows_are_refused(runner: WhisperRunner) -> None:
    with pytest.raises(InvalidRequestError, match="maximum is 30 s"):
        runner.transcribe_batch([Window(np.zeros(31 * 16000, np.float32))], DecodeOptions())
    with pytest.raises(InvalidRequestError, match="not supported"):
        runner.transcribe_batch(
            [Window(np.zeros(16000, np.float32), language="xx")], DecodeOptions()
        )
    with pytest.raises(InvalidRequestError, match="non-empty"):
        runner.transcribe_batch([Window(np.zeros(0, np.float32))], DecodeOptions())
    assert runner.transcribe_batch([], DecodeOptions()) == []


def test_provenance_checksums_equal_sha256sum(runner: WhisperRunner, micro_model: Path) -> None:
    prov = runner.provenance()
    out = subprocess.run(
        ["sha256sum", str(micro_model / "model.bin")], capture_output=True, text=True, check=True
    )
    assert prov["model_sha256"] == out.stdout.split()[0]
    assert prov["compute_type"] == "int8" and prov["device"] == "cpu"
    assert prov["backend"] == "local"


def test_safe_from_a_worker_thread_while_the_loop_runs(
    runner: WhisperRunner, speech: np.ndarray
) -> None:
    async def main() -> tuple[int, int]:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        windows = [Window(speech[: 8 * 16000], language="en")] * 4
        hyps = await asyncio.to_thread(runner.transcribe_batch, windows, DecodeOptions())
        done = True
        await task
        return ticks, len(hyps)

    ticks, n = asyncio.run(main())
    assert n == 4 and ticks > 3


def test_device_selection() -> None:
    assert pick_device("cpu", "auto") == ("cpu", "int8")
    with pytest.raises(ConfigError, match="device must be"):
        pick_device("tpu", "auto")
    with pytest.raises(ConfigError, match="not supported on cpu"):
        pick_device("cpu", "float99")


def test_short_context_encodes_only_what_the_batch_needs(
    runner: WhisperRunner, speech: np.ndarray
) -> None:
    windows = [Window(speech[: 3 * 16000], language="en"), Window(speech[: 5 * 16000 - 7])]
    assert runner._features(windows, short_context=False).shape[-1] == 3000
    assert runner._features(windows, short_context=True).shape[-1] == 600  # 5 s + 1 s spare
    hyps = runner.transcribe_batch(windows, DecodeOptions(short_context=True, word_timestamps=True))
    assert all(h.text and h.words for h in hyps)
    assert all(w.end <= 5.0 + 0.02 for h in hyps for w in h.words)


@pytest.mark.parametrize(
    "device, cpus, workers",
    [("cpu", 1, 1), ("cpu", 2, 2), ("cpu", 16, 4), ("cuda", 16, 1), ("cuda:1", 2, 1)],
)
def test_default_decode_workers(device: str, cpus: int, workers: int) -> None:
    assert default_decode_workers(device, cpus) == workers


def test_the_runner_declares_its_workers_and_the_engine_keeps_that_many_in_flight(
    micro_model: Path,
) -> None:
    from earshot.models.silero import shared_model
    from earshot.service.config import load_config
    from earshot.service.engine.engine import Engine

    runner = WhisperRunner(micro_model, RunnerSettings(device="cpu", workers=2, cpu_threads=1))
    assert runner.capabilities.workers == runner.workers == 2
    engine = Engine.create(load_config(env={}), runner, vad_model=shared_model())
    assert engine.scheduler.settings.workers == 2

    windows = [Window(np.zeros(16000, np.float32), language="en") for _ in range(2)]

    async def both() -> list[list[object]]:
        return await asyncio.gather(
            *(asyncio.to_thread(runner.transcribe_batch, [w], DecodeOptions()) for w in windows)
        )

    assert [len(h) for h in asyncio.run(both())] == [1, 1]
    assert runner.calls == 2


def test_the_runner_trims_whispers_timeless_repeats(
    runner: WhisperRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from earshot.core.decoding import Hypothesis, Segment, WordTiming

    said = [(" Good", 0.7, 1.0), (" night.", 1.0, 1.4)]
    looped = [*said, (" Good", 1.4, 1.4), (" night.", 1.4, 1.4)]
    words = tuple(WordTiming(w, s, e, 0.9) for w, s, e in looped)
    hyp = Hypothesis("Good night. Good night.", (), (Segment(0, 2, "", (), words),), "en", -0.2, 0)
    monkeypatch.setattr(runner, "_transcribe_with_continuations", lambda windows, options: [hyp])
    got = runner.transcribe_batch([Window(np.zeros(16000, np.float32))], DecodeOptions())
    assert [h.text for h in got] == ["Good night."]
