"""The wheel built from the working tree: one import name, and it works installed.

The top-level folders (core/, models/, service/, clients/) are installed as
earshot.core, earshot.models, earshot.service and earshot.clients through the
``package-dir`` mapping in pyproject.toml, and ``earshot`` itself is a namespace
package. The in-repo tests run against an editable install with the repository
root on sys.path, where a leftover ``import service`` or a package missing from
``packages`` still works; here the wheel is built once, its contents are
checked, and it is installed (not editable, ``--no-deps``) into a fresh venv
whose console script and modules are run from outside the repository.

The build leaves nothing in the repository: setuptools' build folder and
egg-info go to a temporary folder (``DIST_EXTRA_CONFIG``). It uses the venv's
own setuptools (``--no-build-isolation``) when that is new enough for
pyproject.toml, and an isolated build (which fetches setuptools) otherwise.
The fresh venv gets the third-party dependencies by a .pth file naming this
interpreter's site-packages, after its own; no earshot code is found there
(an editable install is a finder that such a .pth line never starts).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("core", "models", "service", "clients")
"""Source folder -> installed as earshot.<folder>."""
OLD_TOP_LEVEL = (*FOLDERS, "tests", "bench")
"""Names that must not be importable (or imported) at top level once installed."""

BUILD_TIMEOUT_S = 240
STEP_TIMEOUT_S = 60


def _source_version() -> str:
    """``__version__`` from core/__init__.py, read without importing it."""
    tree = ast.parse((REPO / "core" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    raise AssertionError("core/__init__.py assigns no __version__ string")


VERSION = _source_version()
DIST_INFO = f"earshot-{VERSION}.dist-info"


def _env(*, isolated: bool, **extra: str) -> dict[str, str]:
    """The build runs in this environment; the fresh venv sees none of its PYTHON* paths."""
    env = dict(os.environ)
    if isolated:
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(name, None)
        env["PYTHONNOUSERSITE"] = "1"
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.update(extra)
    return env


def _run(
    cmd: list[str],
    *,
    cwd: Path,
    timeout: float = STEP_TIMEOUT_S,
    isolated: bool = True,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd,
            cwd=cwd,
            env=_env(isolated=isolated, **env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{cmd} ran past {timeout} s: {exc.stdout!r} {exc.stderr!r}") from exc


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n"
        f"{proc.stderr}"
    )
    return proc.stdout


def _major(dist: str) -> int:
    try:
        return int(metadata.version(dist).split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


def _pip_version() -> tuple[int, ...]:
    return tuple(
        int(re.sub(r"\D.*", "", part) or 0) for part in metadata.version("pip").split(".")[:2]
    )


def _repo_build_leftovers() -> dict[str, int]:
    """What a setuptools build writes into the tree by default, with mtimes."""
    paths = [*REPO.glob("*.egg-info"), *REPO.glob("build/lib*"), *REPO.glob("build/bdist.*")]
    return {str(p.relative_to(REPO)): p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    (tmp / "egg").mkdir()
    extra_cfg = tmp / "setuptools-dirs.cfg"
    extra_cfg.write_text(
        f"[build]\nbuild_base = {tmp / 'build'}\n"
        f"[egg_info]\negg_base = {tmp / 'egg'}\n"
        f"[bdist_wheel]\nbdist_dir = {tmp / 'bdist'}\n",
        encoding="utf-8",
    )
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out)]
    # pyproject.toml needs setuptools>=77 (a PEP 639 license string).
    if _major("setuptools") >= 77:
        cmd.append("--no-build-isolation")
    cmd.append(str(REPO))
    before = _repo_build_leftovers()
    _ok(
        _run(
            cmd,
            cwd=tmp,
            timeout=BUILD_TIMEOUT_S,
            isolated=False,
            DIST_EXTRA_CONFIG=str(extra_cfg),
        )
    )
    assert _repo_build_leftovers() == before, "the build wrote build/ or *.egg-info into the repo"
    wheels = sorted(out.glob("*.whl"))
    assert [w.name for w in wheels] == [f"earshot-{VERSION}-py3-none-any.whl"]
    return wheels[0]


@pytest.fixture(scope="module")
def names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _read(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(name).decode("utf-8")


class Venv:
    def __init__(self, root: Path, site: Path, bridge: list[str]) -> None:
        self.root = root
        self.site = site
        self.bridge = bridge
        self.python = root / "bin" / "python"
        self.cwd = root.parent  # outside the repository: nothing importable there


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    tmp = tmp_path_factory.mktemp("venv")
    root = tmp / "venv"
    python = root / "bin" / "python"
    if _pip_version() >= (22, 3):
        # This pip installs into the venv (pip --python): no ensurepip, seconds faster.
        _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=tmp))
        pip = [sys.executable, "-m", "pip", "--python", str(python)]
    else:
        _ok(_run([sys.executable, "-m", "venv", str(root)], cwd=tmp))
        pip = [str(python), "-m", "pip"]
    _ok(_run([*pip, "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp))
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_ok(_run([str(python), "-I", "-c", purelib], cwd=tmp)).strip())
    assert (site / "earshot" / "core" / "__init__.py").is_file()
    # The dependencies (numpy, aiohttp, ...) from this interpreter, after the venv's own.
    paths = sysconfig.get_paths()
    bridge = list(dict.fromkeys([paths["purelib"], paths["platlib"]]))
    (site / "zz_earshot_test_deps.pth").write_text("\n".join(bridge) + "\n", encoding="utf-8")
    return Venv(root, site, bridge)


def _py_json(venv: Venv, script: str, *args: str) -> Any:
    out = _ok(_run([str(venv.python), "-I", "-c", script, *args], cwd=venv.cwd))
    return json.loads(out.strip().splitlines()[-1])


# -- the wheel's contents ---------------------------------------------------


def test_wheel_holds_only_the_earshot_namespace(names: list[str]) -> None:
    outside = [n for n in names if not n.startswith(("earshot/", f"{DIST_INFO}/"))]
    assert outside == [], f"files outside earshot/ and {DIST_INFO}/: {outside}"
    tops = {n.split("/")[1] for n in names if n.startswith("earshot/") and n.count("/") >= 2}
    assert tops == set(FOLDERS), tops
    assert "earshot/__init__.py" not in names, "earshot must stay a namespace package"
    compiled = [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert compiled == []
    required = [
        "earshot/core/__init__.py",
        "earshot/core/errors.py",
        "earshot/models/__init__.py",
        "earshot/service/__init__.py",
        "earshot/service/cli.py",
        "earshot/service/http/demo.py",
        "earshot/clients/__init__.py",
        *(f"earshot/{folder}/py.typed" for folder in FOLDERS),
        *(
            f"earshot/clients/web/{asset}"
            for asset in ("index.html", "app.js", "worklet.js", "style.css", "icon.svg")
        ),
    ]
    missing = [n for n in required if n not in names]
    assert missing == [], f"missing from the wheel: {missing}"


def _source_files() -> set[str]:
    """Every file of the four source folders, named as the wheel would hold it."""
    found = set()
    for folder in FOLDERS:
        for path in (REPO / folder).rglob("*"):
            rel = path.relative_to(REPO)
            if (
                path.is_file()
                and "__pycache__" not in rel.parts
                and not any(part.startswith(".") for part in rel.parts)
                and path.suffix not in (".pyc", ".pyo")
            ):
                found.add(f"earshot/{rel.as_posix()}")
    return found


def test_wheel_ships_exactly_the_source_files(names: list[str]) -> None:
    """Nothing left behind (a subpackage missing from ``packages``, a web asset the
    package-data globs miss) and nothing extra (a stale file from a build folder)."""
    shipped = {n for n in names if n.startswith("earshot/")}
    source = _source_files()
    left_behind = sorted(source - shipped)
    assert not left_behind, f"source files the wheel does not ship: {left_behind}"
    extra = sorted(shipped - source)
    assert not extra, f"files in the wheel that are not in the source: {extra}"


def test_wheel_metadata(wheel: Path, names: list[str]) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "earshot.core.__version__"
    }
    meta = _read(wheel, f"{DIST_INFO}/METADATA").splitlines()
    assert "Name: earshot" in meta
    assert f"Version: {VERSION}" in meta
    wheel_info = _read(wheel, f"{DIST_INFO}/WHEEL").splitlines()
    assert "Root-Is-Purelib: true" in wheel_info
    assert "Tag: py3-none-any" in wheel_info
    entry_points = _read(wheel, f"{DIST_INFO}/entry_points.txt")
    assert "[console_scripts]" in entry_points
    assert "earshot = earshot.service.cli:main" in entry_points.splitlines()
    top_level = f"{DIST_INFO}/top_level.txt"
    if top_level in names:
        assert _read(wheel, top_level).split() == ["earshot"]
    record = {line.split(",")[0] for line in _read(wheel, f"{DIST_INFO}/RECORD").splitlines()}
    assert record == set(names), "RECORD does not list exactly the wheel's files"


def test_wheel_code_imports_no_old_top_level_names(wheel: Path, names: list[str]) -> None:
    """``import service`` or ``from core.x import y`` anywhere (inside functions
    too) would only work from the repository root."""
    bad = []
    for name in names:
        if not name.endswith(".py"):
            continue
        tree = ast.parse(_read(wheel, name), filename=name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            bad += [
                f"{name}:{node.lineno}: {m}" for m in modules if m.split(".")[0] in OLD_TOP_LEVEL
            ]
    assert not bad, f"imports of the old top-level names: {bad}"


# -- installed in a fresh venv ----------------------------------------------


def test_console_script_prints_the_version(venv: Venv) -> None:
    # Needs the dependencies: build_parser() imports earshot.clients.stream_cli
    # (numpy) before argparse handles --version.
    script = venv.root / "bin" / "earshot"
    assert script.is_file()
    proc = _run([str(script), "--version"], cwd=venv.cwd)
    assert _ok(proc).strip() == f"earshot {VERSION}"
    assert proc.stderr == ""


_NO_DEPS_SCRIPT = """
import importlib, json, sys
bridge = set(json.loads(sys.argv[1]))
sys.path[:] = [p for p in sys.path if p not in bridge]
out = {"files": {}, "old": {}}
for name in ("earshot.core", "earshot.core.errors", "earshot.service.cli", "earshot.clients"):
    out["files"][name] = importlib.import_module(name).__file__
for name in json.loads(sys.argv[2]):
    try:
        mod = importlib.import_module(name)
        out["old"][name] = repr(getattr(mod, "__file__", None) or mod.__path__)
    except ModuleNotFoundError as exc:
        out["old"][name] = exc.name == name
from importlib.resources import files
out["index"] = (files("earshot.clients") / "web" / "index.html").is_file()
import earshot
out["earshot_path"] = list(earshot.__path__)
print(json.dumps(out))
"""


def test_installed_package_is_the_venvs_own(venv: Venv) -> None:
    """Without the dependencies on sys.path: only stdlib and the venv's site-packages."""
    old = list(OLD_TOP_LEVEL)
    out = _py_json(venv, _NO_DEPS_SCRIPT, json.dumps(venv.bridge), json.dumps(old))
    assert out["earshot_path"] == [str(venv.site / "earshot")]
    for name, file in out["files"].items():
        assert Path(file).is_relative_to(venv.site), (name, file)
    importable = {name: how for name, how in out["old"].items() if how is not True}
    assert not importable, f"old top-level names import from the venv: {importable}"
    assert out["index"] is True, "earshot.clients has no web/index.html resource"


_ALL_MODULES_SCRIPT = """
import importlib, importlib.metadata, json, sys, traceback
out = {"files": {}, "errors": {}}
for name in json.loads(sys.argv[1]):
    try:
        out["files"][name] = importlib.import_module(name).__file__
    except Exception:
        out["errors"][name] = traceback.format_exc()
out["version"] = importlib.metadata.version("earshot")
out["dist"] = str(importlib.metadata.distribution("earshot").locate_file(""))
try:
    from earshot.service.http.demo import ASSETS, WEB_DIR
    out["missing_assets"] = [f for f in ASSETS.values() if not (WEB_DIR / f).is_file()]
except Exception:
    out["missing_assets"] = traceback.format_exc()
print(json.dumps(out))
"""


def _modules(names: list[str]) -> list[str]:
    mods = []
    for name in names:
        if name.endswith(".py"):
            parts = PurePosixPath(name).with_suffix("").parts
            mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(mods)


def test_every_module_imports_from_the_venv(venv: Venv, names: list[str]) -> None:
    """With the dependencies: every module of the wheel imports, from the venv."""
    modules = _modules(names)
    out = _py_json(venv, _ALL_MODULES_SCRIPT, json.dumps(modules))
    assert not out["errors"], "modules that fail to import:\n" + "\n".join(out["errors"].values())
    for name, file in out["files"].items():
        assert Path(file).is_relative_to(venv.site), (name, file)
    assert sorted(out["files"]) == modules
    assert out["version"] == VERSION
    assert Path(out["dist"]) == venv.site
    assert out["missing_assets"] == [], f"demo assets not installed: {out['missing_assets']}"
