"""Where the shared test data lives: one setting, ``EARSHOT_TESTDATA``."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def testdata_dir() -> Path:
    """``$EARSHOT_TESTDATA``, else ``../shared/testdata`` beside the repository."""
    env = os.environ.get("EARSHOT_TESTDATA")
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "testdata").resolve()


def tokenizer_dir() -> Path:
    return testdata_dir() / "whisper-tokenizer"


def audio_dir() -> Path:
    return testdata_dir() / "audio"
