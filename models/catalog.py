"""The catalogue of Whisper models Earshot knows by name.

Each entry says where the CTranslate2 weights come from, under which licence,
what languages the model speaks, what its model card states about its
training data, and which device and compute type suit it. A model that is not
in the catalogue can still be used from a local folder or a hub repository id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

_MULTILINGUAL_DATA = (
    "680,000 hours of labelled audio collected from the web: 65% English, "
    "18% non-English audio with English transcripts, 17% non-English audio with "
    "transcripts in 98 languages (OpenAI Whisper model card)."
)
_ENGLISH_DATA = (
    "The English part of Whisper's 680,000 hours of web audio: about 438,000 hours "
    "of English audio with English transcripts (OpenAI Whisper model card)."
)
_V3_DATA = (
    "1 million hours of weakly labelled audio and 4 million hours of audio "
    "pseudo-labelled with large-v2, in about 100 languages (OpenAI Whisper large-v3 model card)."
)


@dataclass(frozen=True)
class UpstreamFile:
    """A file as the upstream repository publishes it at the entry's revision."""

    sha256: str
    size: int


@dataclass(frozen=True)
class CatalogEntry:
    """A model Earshot can fetch or recognise by name.

    ``revision`` and ``upstream_files`` are what the upstream repository
    publishes for one revision (the sha256 and size of every file). Where they
    are known, a copy from any transport (a PyPI package, a USB stick) is
    trusted only if its bytes match them.
    """

    name: str
    hub_repo: str
    license: str
    languages: str
    training_data: str
    parameters: str
    suggested_device: str
    suggested_compute_type: str
    multilingual: bool
    revision: str | None = None
    upstream_files: Mapping[str, UpstreamFile] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["upstream_files"] = {n: asdict(f) for n, f in self.upstream_files.items()}
        return out


def _entry(
    name: str,
    repo: str,
    params: str,
    data: str,
    *,
    multilingual: bool = True,
    device: str = "cpu or cuda",
    compute: str = "int8 on cpu, float16 on cuda",
    revision: str | None = None,
    files: Mapping[str, UpstreamFile] | None = None,
) -> CatalogEntry:
    return CatalogEntry(
        name=name,
        hub_repo=repo,
        license="MIT",
        languages="99 languages" if multilingual else "English only",
        training_data=data,
        parameters=params,
        suggested_device=device,
        suggested_compute_type=compute,
        multilingual=multilingual,
        revision=revision,
        upstream_files=dict(files or {}),
    )


# Published by the upstream repositories for these revisions (the hub's
# "sha256" of each LFS file and the git blob contents of the small ones).
_TINY_EN_REVISION = "0d3d19a32d3338f10357c0889762bd8d64bbdeba"
_TINY_EN_FILES = {
    "config.json": UpstreamFile(
        "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 2_317
    ),
    "model.bin": UpstreamFile(
        "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", 75_537_502
    ),
    "tokenizer.json": UpstreamFile(
        "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df", 2_128_466
    ),
    "vocabulary.txt": UpstreamFile(
        "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf", 422_309
    ),
}
_BASE_REVISION = "ebe41f70d5b6dfa9166e2c581c45c9c0cfc57b66"
_BASE_FILES = {
    "config.json": UpstreamFile(
        "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a", 2_309
    ),
    "model.bin": UpstreamFile(
        "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9", 145_217_532
    ),
    "tokenizer.json": UpstreamFile(
        "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab", 2_203_239
    ),
    "vocabulary.txt": UpstreamFile(
        "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913", 459_861
    ),
}


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        _entry("tiny", "Systran/faster-whisper-tiny", "39M", _MULTILINGUAL_DATA),
        _entry(
            "tiny.en",
            "Systran/faster-whisper-tiny.en",
            "39M",
            _ENGLISH_DATA,
            multilingual=False,
            revision=_TINY_EN_REVISION,
            files=_TINY_EN_FILES,
        ),
        _entry(
            "base",
            "Systran/faster-whisper-base",
            "74M",
            _MULTILINGUAL_DATA,
            revision=_BASE_REVISION,
            files=_BASE_FILES,
        ),
        _entry(
            "base.en", "Systran/faster-whisper-base.en", "74M", _ENGLISH_DATA, multilingual=False
        ),
        _entry("small", "Systran/faster-whisper-small", "244M", _MULTILINGUAL_DATA),
        _entry(
            "small.en",
            "Systran/faster-whisper-small.en",
            "244M",
            _ENGLISH_DATA,
            multilingual=False,
        ),
        _entry(
            "medium",
            "Systran/faster-whisper-medium",
            "769M",
            _MULTILINGUAL_DATA,
            device="cuda (cpu is slow)",
            compute="float16 on cuda, int8 on cpu",
        ),
        _entry(
            "large-v3",
            "Systran/faster-whisper-large-v3",
            "1550M",
            _V3_DATA,
            device="cuda",
            compute="float16 (int8_float16 to save memory)",
        ),
        _entry(
            "large-v3-turbo",
            "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
            "809M",
            "large-v3 with its decoder pruned from 32 to 4 layers, then fine-tuned on "
            "large-v3's transcription data (OpenAI large-v3-turbo model card).",
            device="cuda",
            compute="float16",
        ),
        _entry(
            "distil-large-v3",
            "Systran/faster-distil-whisper-large-v3",
            "756M",
            "Distilled from large-v3 on about 22,000 hours of pseudo-labelled English "
            "audio from 9 open datasets (distil-whisper model card).",
            multilingual=False,
            device="cuda",
            compute="float16",
        ),
    )
}


def lookup(name: str) -> CatalogEntry | None:
    """The catalogue entry for ``name``, or None if Earshot does not know it."""
    return CATALOG.get(name)


def entries_with_upstream_digests() -> list[CatalogEntry]:
    """Entries whose upstream files are known by digest."""
    return [e for e in CATALOG.values() if e.upstream_files]


def entry_for_repo(repo: str) -> CatalogEntry | None:
    """The catalogue entry whose hub repository is ``repo``, if any."""
    return next((e for e in CATALOG.values() if e.hub_repo == repo), None)
