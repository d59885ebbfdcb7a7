"""Model store, resolution and provenance: checksums, records, verification."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from earshot.core.errors import EarshotError, ModelNotFoundError
from earshot.models.provenance import (
    RECORD_NAME,
    ChecksumCache,
    folder_provenance,
    read_record,
    verify_folder,
)
from earshot.models.store import ModelStore
from earshot.service.cli import main


def fake_model(folder: Path, payload: bytes = b"weights" * 1000) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(payload)
    (folder / "config.json").write_text('{"alignment_heads": []}')
    (folder / "tokenizer.json").write_text('{"model": {}}')
    (folder / "preprocessor_config.json").write_text('{"feature_size": 80}')
    return folder


def sha256sum(path: Path) -> str:
    out = subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, text=True)
    return out.stdout.split()[0]


def test_provenance_checksums_equal_sha256sum(tmp_path: Path) -> None:
    folder = fake_model(tmp_path / "m")
    prov = folder_provenance(folder, cache=ChecksumCache(tmp_path / "cache.json"))
    assert set(prov.files) == {
        "model.bin",
        "config.json",
        "tokenizer.json",
        "preprocessor_config.json",
    }
    for name, digest in prov.files.items():
        assert digest == sha256sum(folder / name)
    assert prov.model_sha256 == sha256sum(folder / "model.bin")
    assert prov.verified is None  # no record yet


def test_checksum_cache_reuses_and_notices_changes(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"a" * 100)
    cache = ChecksumCache(tmp_path / "cache.json")
    first = cache.sha256(target)
    # A fresh cache object reads the file written by the first one.
    cache2 = ChecksumCache(tmp_path / "cache.json")
    assert (tmp_path / "cache.json").is_file()
    assert cache2.sha256(target) == first
    target.write_bytes(b"b" * 101)
    assert cache2.sha256(target) == hashlib.sha256(b"b" * 101).hexdigest() != first


def test_checksum_cache_is_keyed_by_size_and_mtime(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"a" * 100)
    cache = ChecksumCache(tmp_path / "cache.json")
    first = cache.sha256(target)
    st = target.stat()
    # Same size and mtime: the cached value is used without reading the bytes.
    target.write_bytes(b"c" * 100)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.sha256(target) == first
    # Verification never trusts the cache.
    assert hashlib.sha256(target.read_bytes()).hexdigest() != first


def test_import_records_and_verify_detects_one_changed_byte(tmp_path: Path) -> None:
    src = fake_model(tmp_path / "src")
    store = ModelStore(tmp_path / "store")
    resolved = store.import_folder(src, "mymodel")
    assert resolved.path == tmp_path / "store" / "mymodel"
    record = read_record(resolved.path)
    assert record is not None and record.name == "mymodel"
    assert record.files["model.bin"].sha256 == sha256sum(src / "model.bin")
    assert verify_folder(resolved.path).ok

    data = bytearray((resolved.path / "model.bin").read_bytes())
    data[123] ^= 0x01
    (resolved.path / "model.bin").write_bytes(bytes(data))
    result = verify_folder(resolved.path)
    assert not result.ok and result.mismatched == ("model.bin",)
    assert "MISMATCH" in result.describe()

    (resolved.path / "tokenizer.json").unlink()
    assert verify_folder(resolved.path).missing == ("tokenizer.json",)


def test_verify_reads_every_byte_and_leaves_its_digests_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import earshot.models.provenance as provenance

    store = ModelStore(tmp_path / "store")
    folder = store.import_folder(fake_model(tmp_path / "src"), "m").path
    model_bin = folder / "model.bin"
    st = model_bin.stat()
    cache = ChecksumCache(tmp_path / "cache.json")
    stale = "0" * 64
    cache.remember(model_bin, stale, st)  # a wrong cached value is never trusted
    assert verify_folder(folder, cache=cache).ok
    # What verification computed is now cached: loading reads nothing again.
    monkeypatch.setattr(provenance, "sha256_file", lambda path: pytest.fail(f"read {path}"))
    fresh = ChecksumCache(tmp_path / "cache.json")
    assert fresh.sha256(model_bin) == sha256sum(model_bin) != stale


def test_verify_without_record_is_not_ok(tmp_path: Path) -> None:
    folder = fake_model(tmp_path / "m")
    result = verify_folder(folder)
    assert not result.recorded and not result.ok
    assert "earshot models import" in result.describe()


def test_import_refuses_non_model_and_duplicates(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no model\.bin"):
        store.import_folder(tmp_path / "empty")
    src = fake_model(tmp_path / "src")
    store.import_folder(src, "x")
    with pytest.raises(EarshotError, match="already in the store"):
        store.import_folder(src, "x")


def test_resolution_order_path_then_store(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    src = fake_model(tmp_path / "folder")
    by_path = store.resolve(str(src))
    assert by_path.how == "path" and by_path.path == src
    store.import_folder(src, "named")
    by_name = store.resolve("named")
    assert by_name.how == "store" and by_name.path == tmp_path / "store" / "named"


def test_offline_resolution_lists_what_was_tried(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelNotFoundError) as info:
        store.resolve("tiny")
    message = info.value.message
    assert info.value.code == "model_not_found"
    assert "local folder tiny: does not exist" in message
    assert f"model store {tmp_path / 'store' / 'tiny'}: not there" in message
    assert "hub download: not attempted" in message
    assert "earshot models pull tiny" in message
    assert "earshot models import PATH --name tiny" in message


def test_offline_download_failure_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelNotFoundError) as info:
        store.resolve("tiny", allow_download=True)
    message = info.value.message
    assert "hub download: could not download Systran/faster-whisper-tiny" in message
    assert "earshot models import PATH" in message
    assert not any(p.name.startswith(".pulling") for p in (tmp_path / "store").glob("*"))


def test_unknown_name_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelNotFoundError, match="not a catalogue name"):
        store.resolve("no-such-model", allow_download=True)


def test_cli_models_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = tmp_path / "store"
    src = fake_model(tmp_path / "src")
    assert main(["--models-dir", str(store_dir), "models", "import", str(src), "--name", "m"]) == 0
    assert (store_dir / "m" / RECORD_NAME).is_file()
    assert main(["--models-dir", str(store_dir), "models", "verify", "m"]) == 0
    assert "OK" in capsys.readouterr().out
    with (store_dir / "m" / "model.bin").open("r+b") as fh:
        fh.seek(10)
        fh.write(b"X")
    assert main(["--models-dir", str(store_dir), "models", "verify", "m"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["--models-dir", str(store_dir), "models", "verify", "absent"]) == 2
    assert "model_not_found" in capsys.readouterr().err


def test_cli_models_list_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = tmp_path / "store"
    main(
        [
            "--models-dir",
            str(store_dir),
            "models",
            "import",
            str(fake_model(tmp_path / "s")),
            "--name",
            "small",
        ]
    )
    capsys.readouterr()
    assert main(["--models-dir", str(store_dir), "models", "list"]) == 0
    out = capsys.readouterr().out
    assert "large-v3-turbo" in out and "Systran/faster-whisper-small" in out
    assert main(["--models-dir", str(store_dir), "models", "show", "small"]) == 0
    out = capsys.readouterr().out
    assert sha256sum(store_dir / "small" / "model.bin") in out
    assert '"license": "MIT"' in out
