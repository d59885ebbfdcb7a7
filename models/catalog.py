"""The catalogue of Whisper models Earshot knows by name.

Each entry says where the CTranslate2 weights come from, under which licence,
what languages the model speaks, what its model card states about its
training data, and which device and compute type suit it. A model that is not
in the catalogue can still be used from a local folder or a hub repository id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
class CatalogEntry:
    """A model Earshot can fetch or recognise by name."""

    name: str
    hub_repo: str
    license: str
    languages: str
    training_data: str
    parameters: str
    suggested_device: str
    suggested_compute_type: str
    multilingual: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _entry(
    name: str,
    repo: str,
    params: str,
    data: str,
    *,
    multilingual: bool = True,
    device: str = "cpu or cuda",
    compute: str = "int8 on cpu, float16 on cuda",
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
    )


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        _entry("tiny", "Systran/faster-whisper-tiny", "39M", _MULTILINGUAL_DATA),
        _entry(
            "tiny.en", "Systran/faster-whisper-tiny.en", "39M", _ENGLISH_DATA, multilingual=False
        ),
        _entry("base", "Systran/faster-whisper-base", "74M", _MULTILINGUAL_DATA),
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


def entry_for_repo(repo: str) -> CatalogEntry | None:
    """The catalogue entry whose hub repository is ``repo``, if any."""
    return next((e for e in CATALOG.values() if e.hub_repo == repo), None)
