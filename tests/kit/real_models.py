"""The real trained Whisper models (the ``models`` extra), for accuracy tests.

They are installed once into a model store of the test suite's own
(``.cache/real-models`` in the repository, or ``$EARSHOT_TEST_MODELS_DIR``)
through the same code that serves them: :meth:`ModelStore.resolve`, which
checks every file against the upstream digests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models import pypi
from models.store import ModelStore
from tests.kit.paths import REPO_ROOT


def real_model_store() -> ModelStore:
    env = os.environ.get("EARSHOT_TEST_MODELS_DIR")
    return ModelStore(Path(env) if env else REPO_ROOT / ".cache" / "real-models")


def real_model(name: str) -> Path:
    """The folder of catalogue model ``name`` (tiny.en or base), installed from
    its PyPI package; skips the test where the package is not installed."""
    missing = pypi.missing_distributions(pypi.DELIVERIES[name])
    if missing:
        pytest.skip(f"real model {name} needs {', '.join(missing)} (pip install '.[models]')")
    return real_model_store().resolve(name).path
