"""``earshot transcribe`` on the shared audio set, through the real runner,
the real Silero segmentation and a random-weight model."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from earshot.service.cli import main

NATIVE = [
    "deepspeech/LDC93S1_pcms16le_1_8000.wav",
    "librispeech/1089-134686-0001.flac",
    "ljspeech/LJ001-0001.wav",
    "jfk/jfk.flac",
]


@pytest.fixture(scope="module")
def inputs(audio_manifest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_path = {row["path"]: row for row in audio_manifest}
    rows = []
    for rel in NATIVE:
        if rel not in by_path:
            pytest.skip(f"{rel} is not in the shared audio set")
        rows.append(by_path[rel])
    assert {r["sample_rate"] for r in rows} == {8000, 16000, 22050, 44100}
    assert {r["channels"] for r in rows} == {1, 2}
    return rows


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt", "json"])
def test_every_format_for_files_at_their_native_rates(
    fmt: str,
    inputs: list[dict[str, Any]],
    micro_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = [row["abspath"] for row in inputs]
    code, _, err = run_cli(
        [
            "transcribe",
            *files,
            "--model",
            str(micro_model),
            "--format",
            fmt,
            "--output-dir",
            str(tmp_path),
            "--batch-size",
            "3",
        ],
        capsys,
    )
    assert code == 0, err
    for row in inputs:
        out = tmp_path / f"{Path(row['path']).stem}.{fmt}"
        text = out.read_text()
        assert text.strip(), f"{out} is empty"
        if fmt == "srt":
            blocks = text.strip().split("\n\n")
            for i, block in enumerate(blocks, start=1):
                lines = block.split("\n")
                assert lines[0] == str(i)
                assert re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", lines[1])
                assert lines[2].strip()
        elif fmt == "vtt":
            assert text.startswith("WEBVTT\n")
            assert re.search(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\n\S", text)
        elif fmt == "json":
            data = json.loads(text)
            assert data["duration"] == pytest.approx(row["duration_s"], abs=0.05)
            assert data["segments"] and data["text"]
            for seg in data["segments"]:
                assert 0.0 <= seg["start"] <= seg["end"] <= data["duration"] + 0.01
            digest = hashlib.sha256((micro_model / "model.bin").read_bytes()).hexdigest()
            assert data["model"]["model_sha256"] == digest
            assert data["options"]["beam_size"] == 5
            assert data["options"]["batch_size"] == 3
            assert data["options"]["vad"]["min_silence_ms"] > 0
    assert "realtime" in err


def test_word_timestamps_in_json(
    inputs: list[dict[str, Any]], micro_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        [
            "transcribe",
            inputs[1]["abspath"],
            "--model",
            str(micro_model),
            "--format",
            "json",
            "--word-timestamps",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out)
    words = [w for s in data["segments"] for w in s["words"]]
    assert words and all(w["start"] <= w["end"] for w in words)


def test_standard_input(
    inputs: list[dict[str, Any]],
    micro_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = Path(inputs[0]["abspath"]).read_bytes()
    fake = io.TextIOWrapper(io.BytesIO(data))
    monkeypatch.setattr(sys, "stdin", fake)
    code, out, _ = run_cli(["transcribe", "-", "--model", str(micro_model), "--quiet"], capsys)
    assert code == 0 and out.strip()


def test_broken_empty_and_non_audio_files(
    inputs: list[dict[str, Any]],
    micro_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("these are meeting notes, not audio\n" * 20)
    broken = tmp_path / "broken.flac"
    broken.write_bytes(Path(inputs[1]["abspath"]).read_bytes()[:200])
    missing = tmp_path / "missing.wav"
    good = inputs[1]["abspath"]
    out_dir = tmp_path / "out"
    code, _, err = run_cli(
        [
            "transcribe",
            str(empty),
            good,
            str(text),
            str(broken),
            str(missing),
            "--model",
            str(micro_model),
            "--output-dir",
            str(out_dir),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("earshot: error:")]
    assert len(lines) == 4
    assert any(str(empty) in line and "[audio_empty]" in line for line in lines)
    assert any(str(text) in line and "[audio_decode_failed]" in line for line in lines)
    assert any(str(broken) in line and "[audio_" in line for line in lines)
    assert any(str(missing) in line and "no such file" in line for line in lines)
    assert (out_dir / f"{Path(good).stem}.txt").read_text().strip()


def test_unknown_model_fails_with_the_documented_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inputs: list[dict[str, Any]]
) -> None:
    code, _, err = run_cli(
        ["--models-dir", str(tmp_path), "transcribe", inputs[0]["abspath"], "--model", "tiny"],
        capsys,
    )
    assert code == 2
    assert "[model_not_found]" in err and "earshot models pull tiny" in err
