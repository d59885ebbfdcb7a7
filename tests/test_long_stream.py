"""A long recording sent faster than real time with ``earshot stream --fast``,
on the real tiny.en model: every final comes back and the stream closes 1000.

The recording is the 20 LibriSpeech utterances of the test data and the
first LJSpeech clips, joined with 0.8 s pauses into more than three minutes.
The client is the real ``earshot stream`` command in its own process; the
server runs in this one (tests/kit/browser.ServerThread).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from earshot.core.decoding import SAMPLE_RATE
from earshot.service.engine.audiofile import load_audio
from tests.kit.browser import ServerThread
from tests.kit.real_models import real_model_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(280)]

# Corpus word error rate of the joined finals against the references:
# measured 3.0 % (606 words). The threshold leaves room for run-to-run
# noise, not for lost words (a lost utterance of the 25 costs 2 to 7 points).
MAX_WER = 0.05


@pytest.fixture(scope="module")
def long_recording(
    audio_manifest: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str]]:
    rows = [r for r in audio_manifest if r["path"].startswith("librispeech/")]
    rows += [r for r in audio_manifest if r["path"].startswith("ljspeech/")][:5]
    pause = np.zeros(int(0.8 * SAMPLE_RATE), np.float32)
    pieces = [pause]
    for row in rows:
        pieces += [load_audio(row["abspath"]).samples, pause]
    audio = np.concatenate(pieces)
    assert len(audio) / SAMPLE_RATE >= 180
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return path, [str(r["text"]) for r in rows]


@pytest.fixture(scope="module")
def server(tiny_en_model: Path) -> Iterator[ServerThread]:
    with real_model_server(tiny_en_model) as live:
        yield live


def test_earshot_stream_fast_of_three_minutes_gets_every_final(
    server: ServerThread, long_recording: tuple[Path, list[str]]
) -> None:
    from tests.kit.wer import corpus_wer

    path, references = long_recording
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "earshot.service.cli",
            "stream",
            str(path),
            "--url",
            server.listen_url(),
            "--fast",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr  # 0 only on close code 1000
    messages = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert not [m for m in messages if m["type"] in ("Error", "Warning")], messages
    finals = [m for m in messages if m["type"] == "Results" and m["is_final"]]
    said = " ".join(m["channel"]["alternatives"][0]["transcript"] for m in finals)
    # The whole recording, to its last words.
    assert messages[-1]["type"] == "Metadata" and messages[-1]["duration"] >= 180
    error = corpus_wer([" ".join(references)], [said])
    assert error <= MAX_WER, said
