"""Static checks of the Dockerfile (no Docker engine runs here)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from earshot.service.config import Config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", joined, re.MULTILINE)]


def test_every_copied_path_exists_and_every_package_is_copied() -> None:
    copied = []
    for args in instructions("COPY"):
        if args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        copied += sources
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path"
    # Every folder the wheel is built from (package-dir) is copied.
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    assert set(folders.values()) <= set(copied)
    assert "README.md" in copied  # pyproject's readme


def test_entrypoint_is_the_console_script_and_ports_agree() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert instructions("ENTRYPOINT") == ['["earshot"]'] and "earshot" in scripts
    assert instructions("CMD") == ['["serve"]']
    assert instructions("EXPOSE") == ["8000"]
    assert "EARSHOT_PORT=8000" in DOCKERFILE
    assert Config().port == 8000
    # Every EARSHOT_* variable set in the image is a real setting.
    names = {f.upper() for f in Config.__dataclass_fields__}
    for var in re.findall(r"EARSHOT_([A-Z_]+)=", DOCKERFILE):
        assert var in names or var == "MODELS_DIR", var


def test_runs_as_a_non_root_user_with_a_pinned_base() -> None:
    users = instructions("USER")
    assert users and users[-1] not in ("root", "0")
    for base in instructions("FROM"):
        image = base.split()[0]
        assert ":" in image and not image.endswith(":latest"), image
