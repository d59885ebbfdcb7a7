"""Shared fixtures. Test data is found through ``EARSHOT_TESTDATA``
(default ``../shared/testdata``); tests that need it skip where it is absent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.kit.paths import audio_dir, testdata_dir, tokenizer_dir


@pytest.fixture(scope="session")
def testdata() -> Path:
    path = testdata_dir()
    if not path.is_dir():
        pytest.skip(f"test data not found at {path} (set EARSHOT_TESTDATA)")
    return path


@pytest.fixture(scope="session")
def tokenizer_path(testdata: Path) -> Path:
    path = tokenizer_dir()
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"Whisper tokenizer not found at {path}")
    return path


@pytest.fixture(scope="session")
def audio_manifest(testdata: Path) -> list[dict[str, Any]]:
    manifest = audio_dir() / "manifest.jsonl"
    if not manifest.is_file():
        pytest.skip(f"audio manifest not found at {manifest}")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for row in rows:
        row["abspath"] = str(audio_dir() / row["path"])
    return rows


@pytest.fixture(scope="session")
def micro_model(tokenizer_path: Path) -> Path:
    """Folder of a random-weight "micro" Whisper model in CTranslate2 format that
    faster-whisper loads and that decodes any audio to exactly 8 text tokens
    (see ``tests/kit/whisper_builder.py``). Built once into the model cache and
    shared: tests must not write into it."""
    from tests.kit.whisper_builder import cached_model

    return cached_model("micro", tokens=8, seed=0, quantization="int8")


@pytest.fixture(scope="session")
def tiny_en_model() -> Path:
    """The real tiny.en model (English only), verified against upstream digests."""
    from tests.kit.real_models import real_model

    return real_model("tiny.en")


@pytest.fixture(scope="session")
def base_model() -> Path:
    """The real base model (multilingual), verified against upstream digests."""
    from tests.kit.real_models import real_model

    return real_model("base")
