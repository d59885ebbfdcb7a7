"""The real trained Whisper models (the ``models`` extra), for accuracy tests.

They are installed once into a model store of the test suite's own
(``.cache/real-models`` in the repository, or ``$EARSHOT_TEST_MODELS_DIR``)
through the same code that serves them: :meth:`ModelStore.resolve`, which
checks every file against the upstream digests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from earshot.models import pypi
from earshot.models.store import ModelStore
from tests.kit.paths import REPO_ROOT

if TYPE_CHECKING:
    from tests.kit.browser import ServerThread


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


@contextlib.contextmanager
def real_model_server(model_path: Path, **settings: Any) -> Iterator[ServerThread]:
    """A server thread on 127.0.0.1 serving the real model at ``model_path``
    (one runner, loaded once), with the real Silero endpointer."""
    from earshot.models.runner import WhisperRunner
    from earshot.models.silero import shared_model
    from earshot.service.config import load_config
    from earshot.service.engine.engine import Engine
    from tests.kit.browser import ServerThread

    runner = WhisperRunner(model_path)

    def engine(origin: str) -> Engine:
        cfg = load_config(env={}, overrides=settings)
        return Engine.create(cfg, runner, vad_model=shared_model())

    with ServerThread(engine) as live:
        yield live
