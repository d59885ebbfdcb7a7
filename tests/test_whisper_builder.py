"""Tests of the random-weight Whisper builder (``tests/kit/whisper_builder.py``),
through the real faster-whisper and CTranslate2: the models load, every
decoding path emits exactly the planned number of text tokens and then stops,
and builds are reproducible and cached safely."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np
import numpy.typing as npt
import pytest
from faster_whisper import BatchedInferencePipeline, WhisperModel, decode_audio
from faster_whisper.transcribe import Segment

from tests.kit import whisper_builder
from tests.kit.whisper_builder import (
    MANIFEST_NAME,
    MAX_TOKENS,
    build_whisper_model,
    cached_model,
    model_cache_dir,
    read_manifest,
)

Audio = npt.NDArray[np.float32]
TOKENS = 8  # what the micro_model fixture decodes to


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def text_tokens(segment: Segment, eot: int) -> list[int]:
    return [t for t in segment.tokens if t < eot]


def check_segments(segments: Iterable[Segment], manifest: dict[str, Any]) -> list[Segment]:
    """Every segment holds exactly the planned text tokens, each one of the
    candidates of its position; returns the segments."""
    result = list(segments)
    assert result, "no segment"
    for segment in result:
        tokens = text_tokens(segment, manifest["eot_id"])
        assert len(tokens) == manifest["tokens"], segment
        for token, candidates in zip(tokens, manifest["candidate_ids"], strict=True):
            assert token in candidates
        assert 0.0 <= segment.no_speech_prob < 0.01
        assert segment.avg_logprob > -1.0
        assert segment.temperature == 0.0  # no fallback to sampling was needed
    return result


@pytest.fixture(scope="module")
def manifest(micro_model: Path) -> dict[str, Any]:
    return read_manifest(micro_model)


@pytest.fixture(scope="module")
def whisper(micro_model: Path) -> WhisperModel:
    return WhisperModel(str(micro_model), device="cpu", compute_type="int8", cpu_threads=2)


@pytest.fixture(scope="module")
def speech(audio_manifest: list[dict[str, Any]]) -> Audio:
    """About 10 s of real speech at 16 kHz."""
    row = next(r for r in audio_manifest if r["path"].startswith("librispeech/"))
    audio: Audio = decode_audio(row["abspath"])
    return audio


@pytest.fixture(scope="module")
def long_speech(audio_manifest: list[dict[str, Any]]) -> Audio:
    """More than 30 s of speech: several windows, the later ones prompted with
    the earlier ones' text."""
    rows = [r for r in audio_manifest if r["path"].startswith("librispeech/")][:6]
    audio: Audio = np.concatenate([decode_audio(r["abspath"]) for r in rows])
    assert len(audio) > 35 * 16000
    return audio


def test_folder_holds_what_faster_whisper_reads(
    micro_model: Path, manifest: dict[str, Any]
) -> None:
    for name in ("model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (micro_model / name).is_file(), name
    config = json.loads((micro_model / "config.json").read_text())
    assert config["alignment_heads"] == [[1, h] for h in range(4)]
    assert len(config["lang_ids"]) == 99
    assert 50362 in config["suppress_ids"]  # <|nocaptions|>
    assert config["suppress_ids_begin"] == [220, 50257]
    vocabulary = json.loads((micro_model / "vocabulary.json").read_text())
    assert len(vocabulary) == manifest["vocabulary_size"] == 51865
    assert vocabulary[50364] == "<|0.00|>" and vocabulary[-1] == "<|30.00|>"
    assert manifest["tokens"] == TOKENS and len(manifest["candidate_ids"]) == TOKENS


def test_model_loads(whisper: WhisperModel) -> None:
    assert whisper.model.is_multilingual
    assert whisper.model.n_mels == 80
    assert whisper.feature_extractor.n_samples == 480000


@pytest.mark.parametrize(
    "options",
    [
        {"language": "en", "without_timestamps": True},
        {"language": "en"},  # timestamps: one segment covers the window
        {"language": "de", "without_timestamps": True},
        {"language": "fr", "task": "translate"},
        {},  # language detection
    ],
    ids=["no-timestamps", "timestamps", "other-language", "translate", "detect"],
)
def test_greedy_emits_exactly_the_planned_tokens(
    whisper: WhisperModel, speech: Audio, manifest: dict[str, Any], options: dict[str, Any]
) -> None:
    segments, info = whisper.transcribe(speech, beam_size=1, **options)
    (segment,) = check_segments(segments, manifest)
    assert segment.start == 0.0
    assert segment.end == pytest.approx(len(speech) / 16000, abs=0.02)
    assert segment.text.strip() and segment.text == segment.text.lower()
    if "language" not in options:
        assert info.language == "en" and info.language_probability > 0.9


def test_primary_words_are_readable(manifest: dict[str, Any]) -> None:
    words = manifest["primary_text"].split()
    assert len(words) == TOKENS
    assert all(w.isalpha() and w.islower() for w in words)


def test_previous_text_and_initial_prompt(
    whisper: WhisperModel, long_speech: Audio, manifest: dict[str, Any]
) -> None:
    segments, _ = whisper.transcribe(
        long_speech, language="en", beam_size=1, initial_prompt="Earlier, somebody said this."
    )
    assert len(check_segments(segments, manifest)) >= 2


def test_beam_search_and_sampling(
    whisper: WhisperModel, speech: Audio, manifest: dict[str, Any]
) -> None:
    beam, _ = whisper.transcribe(speech, language="en", beam_size=5)
    greedy, _ = whisper.transcribe(speech, language="en", beam_size=1)
    assert [s.tokens for s in check_segments(beam, manifest)] == [
        s.tokens for s in check_segments(greedy, manifest)
    ]
    sampled, _ = whisper.transcribe(speech, language="en", temperature=1.0, best_of=3)
    for segment in sampled:
        assert len(text_tokens(segment, manifest["eot_id"])) == TOKENS


def test_word_timestamps(whisper: WhisperModel, speech: Audio, manifest: dict[str, Any]) -> None:
    segments, _ = whisper.transcribe(speech, language="en", beam_size=1, word_timestamps=True)
    duration = len(speech) / 16000
    last_end = 0.0
    for segment in check_segments(segments, manifest):
        assert segment.words is not None and len(segment.words) == TOKENS
        for word in segment.words:
            assert last_end - 0.01 <= word.start <= word.end <= duration + 0.01
            assert 0.0 <= word.probability <= 1.0
            last_end = word.end


def test_vad_filter_and_batched_pipeline(
    whisper: WhisperModel, speech: Audio, manifest: dict[str, Any]
) -> None:
    segments, _ = whisper.transcribe(speech, language="en", beam_size=1, vad_filter=True)
    check_segments(segments, manifest)
    batched = BatchedInferencePipeline(whisper)
    segments, _ = batched.transcribe(speech, language="en", batch_size=4, beam_size=1)
    check_segments(segments, manifest)


def test_same_arguments_give_the_same_bytes(
    tokenizer_path: Path, micro_model: Path, tmp_path: Path
) -> None:
    built = build_whisper_model(tmp_path / "again", size="micro", tokens=TOKENS, seed=0)
    assert sha256(built / "model.bin") == sha256(micro_model / "model.bin")
    assert (built / "config.json").read_bytes() == (micro_model / "config.json").read_bytes()


def test_other_tokens_and_seed(
    tokenizer_path: Path, micro_model: Path, speech: Audio, tmp_path: Path
) -> None:
    built = build_whisper_model(tmp_path / "three", tokens=3, seed=1)
    assert sha256(built / "model.bin") != sha256(micro_model / "model.bin")
    manifest = read_manifest(built)
    assert manifest["primary_text"] != read_manifest(micro_model)["primary_text"]
    model = WhisperModel(str(built), device="cpu", compute_type="int8", cpu_threads=2)
    segments, _ = model.transcribe(speech, language="en", beam_size=1)
    (segment,) = check_segments(segments, manifest)
    assert len(text_tokens(segment, manifest["eot_id"])) == 3


def test_cli_builds_an_english_only_model(
    tokenizer_path: Path, speech: Audio, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "en"
    assert whisper_builder.main([str(out), "--tokens", "5", "--english-only"]) == 0
    assert "model.bin" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["vocabulary_size"] == 51864 and manifest["eot_id"] == 50256
    model = WhisperModel(str(out), device="cpu", compute_type="int8", cpu_threads=2)
    assert not model.model.is_multilingual
    segments, info = model.transcribe(speech, beam_size=1)
    check_segments(segments, manifest)
    assert info.language == "en"
    assert whisper_builder.main([str(out)]) == 2  # refuses a folder that is not empty


def test_rejects_bad_arguments(tokenizer_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        build_whisper_model(tmp_path / "a", size="huge")
    with pytest.raises(ValueError, match="unknown quantization"):
        build_whisper_model(tmp_path / "a", quantization="int3")
    for tokens in (0, MAX_TOKENS + 1):
        with pytest.raises(ValueError, match="tokens must be"):
            build_whisper_model(tmp_path / "a", tokens=tokens)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        build_whisper_model(tmp_path / "full")


def test_cache_builds_once_across_threads(
    tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EARSHOT_TEST_MODEL_CACHE", str(tmp_path / "cache"))
    assert model_cache_dir() == tmp_path / "cache"
    builds: list[Path] = []
    real_build = whisper_builder.build_whisper_model

    def counting_build(out_dir: Path, **kwargs: Any) -> Path:
        builds.append(out_dir)
        return real_build(out_dir, **kwargs)

    monkeypatch.setattr(whisper_builder, "build_whisper_model", counting_build)
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(cached_model("micro", 2, 0, "int8")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(set(paths)) == 1 and len(paths) == 3
    (path,) = set(paths)
    assert (path / MANIFEST_NAME).is_file() and path.parent == tmp_path / "cache"
    assert cached_model("micro", 2, 0, "int8") == path and len(builds) == 1
    leftovers = [p.name for p in path.parent.iterdir() if p.is_dir() and p != path]
    assert leftovers == []


@pytest.mark.slow
def test_tiny_architecture_loads(tokenizer_path: Path, tmp_path: Path) -> None:
    built = build_whisper_model(tmp_path / "tiny", size="tiny", tokens=4)
    assert 55e6 < (built / "model.bin").stat().st_size < 65e6
    model = ctranslate2.models.Whisper(str(built), device="cpu", compute_type="int8")
    assert model.is_multilingual and model.n_mels == 80
    features = ctranslate2.StorageView.from_array(np.zeros((1, 80, 3000), dtype=np.float32))
    encoded = model.encode(features)
    assert encoded.shape == [1, 1500, 384]
    result = model.generate(encoded, [[50258, 50259, 50359, 50363]], beam_size=1)[0]
    assert len(result.sequences_ids[0]) == 4


@pytest.mark.slow
def test_max_tokens_fit_behind_the_longest_prompt(
    tokenizer_path: Path, speech: Audio, tmp_path: Path
) -> None:
    built = build_whisper_model(tmp_path / "max", tokens=MAX_TOKENS)
    manifest = read_manifest(built)
    # Computed in float32: with int8 activations the positional "state" that
    # ends decoding after 200 tokens drifts at positions past about 400 on
    # some CPUs (an AMD EPYC here decoded 221 tokens), and quantization is not
    # what this test is about (the planned tokens fitting behind the prompt).
    model = WhisperModel(str(built), device="cpu", compute_type="float32", cpu_threads=2)
    # faster-whisper keeps the last 223 tokens of a prompt this long.
    prompt = " ".join(["again"] * 400)
    segments, _ = model.transcribe(speech, language="en", beam_size=1, initial_prompt=prompt)
    check_segments(segments, manifest)
