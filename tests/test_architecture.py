"""The import contracts hold, with no exceptions, and docs/architecture.md
matches the tree.

The contracts (``[tool.importlinter]`` in pyproject.toml) say that the
layers point one way, that the core does no I/O and loads no model runtime,
and that clients use only the core; ``lint-imports`` checks them, imports
inside functions included.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LINTER = PYPROJECT["tool"]["importlinter"]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def tree_modules() -> set[str]:
    """Every module of the four packages, by its installed name."""
    folders = PYPROJECT["tool"]["setuptools"]["package-dir"]
    out: set[str] = set()
    for name, folder in folders.items():
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "__init__.py" or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("")
            out.add(".".join((name, *rel.parts)))
    return out


def test_the_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, "import-linter is not installed (the test extra has it)"
    run = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    kept = re.findall(r"^(.*) KEPT$", report, re.MULTILINE)
    assert len(kept) == len(LINTER["contracts"]), report
    assert "BROKEN" not in report


def test_the_contracts_have_no_exceptions_and_cover_every_package() -> None:
    contracts = {c["id"]: c for c in LINTER["contracts"]}
    for contract in contracts.values():
        assert "ignore_imports" not in contract, contract["id"]
        assert not contract.get("allow_indirect_imports"), contract["id"]
    assert set(LINTER["root_packages"]) == set(PYPROJECT["tool"]["setuptools"]["package-dir"])
    layers = contracts["layers"]["layers"]
    assert layers[0] == "earshot.service.cli" and layers[-1] == "earshot.core"
    assert "earshot.models" in layers
    pure = contracts["pure-core"]
    assert pure["source_modules"] == ["earshot.core"]
    for runtime in ("asyncio", "threading", "socket", "aiohttp", "ctranslate2", "faster_whisper"):
        assert runtime in pure["forbidden_modules"], runtime
    clients = contracts["clients"]
    assert clients["source_modules"] == ["earshot.clients"]
    assert set(clients["forbidden_modules"]) == {"earshot.models", "earshot.service"}


def test_every_module_of_the_tree_is_on_the_map_and_nothing_else() -> None:
    # The module tables of docs/architecture.md: rows "| `earshot.x.y` | ... |".
    documented = set(re.findall(r"^\| `(earshot\.[a-z_.]+)` \|", DOC, re.MULTILINE))
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"])
    documented -= folders  # the table of packages
    modules = tree_modules()
    assert modules - documented == set(), "modules missing from docs/architecture.md"
    assert documented - modules == set(), "docs/architecture.md names modules that do not exist"


def test_the_map_names_the_layers_in_the_contracts_order() -> None:
    diagram = DOC[DOC.index("## The layers") : DOC.index("The contracts, in")]
    positions = []
    for layer in LINTER["contracts"][0]["layers"]:
        first = layer.split("|")[0].strip()
        assert first in diagram, first
        positions.append(diagram.index(first))
    assert positions == sorted(positions), "the diagram's layers are out of order"
