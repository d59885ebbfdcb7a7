"""``earshot call`` (clients/call.py): a two-channel recording played as a
phone call to a live server on 127.0.0.1, over each protocol, with the tone
language so that each party's exact words are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from earshot.clients.call import (
    CALL_RATE,
    CHUNK_MS,
    EXIT_OK,
    EXIT_USAGE,
    PROTOCOLS,
    call_audio,
    twilio_messages,
    ws_base,
)
from earshot.service.cli import main
from tests.kit.browser import ServerThread
from tests.kit.live import tone_engine
from tests.kit.tones import g711_decode, make_speech, random_script

pytestmark = pytest.mark.timeout(120)

CUSTOMER = random_script(2, (2, 4), seed=41)
AGENT = random_script(2, (2, 4), seed=42)


def stereo_call(path: Path) -> Path:
    """Customer on channel 0, agent on channel 1, taking turns, at 16 kHz."""
    a, _ = make_speech(CUSTOMER, 16000, lead_s=0.5, gap_s=1.6, tail_s=1.0)
    b, _ = make_speech(AGENT, 16000, lead_s=1.4, gap_s=1.6, tail_s=1.0)
    n = max(len(a), len(b))
    stereo = np.zeros((n, 2), np.float32)
    stereo[: len(a), 0] = a
    stereo[: len(b), 1] = b
    sf.write(path, stereo, 16000)
    return path


def said(script: list[list[str]]) -> list[str]:
    return [" ".join(u) for u in script]


def finals_of(output: str, party: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in output.splitlines() if line.startswith(f"[{party} ")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_each_party_gets_its_own_exact_words(
    protocol: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wav = stereo_call(tmp_path / "call.wav")
    with ServerThread(lambda origin: tone_engine()) as server:
        code = main(["call", str(wav), "--protocol", protocol, "--server", server.url, "--fast"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert finals_of(out, "customer") == said(CUSTOMER), out
    assert finals_of(out, "agent") == said(AGENT), out


def test_the_call_is_telephone_audio() -> None:
    x = np.sin(np.linspace(0, 200, 16000, dtype=np.float32)) * 0.3
    stereo = np.stack([x, x * 0.5], axis=1)
    parties = call_audio(stereo, 16000)
    assert [len(p) for p in parties] == [CALL_RATE, CALL_RATE]  # 1 s of 8 kHz µ-law each
    back = g711_decode(parties[0])
    assert abs(float(np.max(np.abs(back))) - 0.3) < 0.02


def test_twilio_messages_are_shaped_as_twilio_sends_them() -> None:
    parties = [b"\x00" * (CALL_RATE // 10), b"\x01" * (CALL_RATE // 10)]  # 100 ms each
    messages = twilio_messages(parties, call_sid="CA1", stream_sid="MZ1", token="k")
    assert [m["event"] for m in messages[:2]] == ["connected", "start"]
    start = messages[1]["start"]
    assert start["tracks"] == ["inbound", "outbound"]
    assert start["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert start["customParameters"] == {"token": "k"}
    media = messages[2:-1]
    assert len(media) == 2 * (100 // CHUNK_MS)
    assert [m["media"]["track"] for m in media[:2]] == ["inbound", "outbound"]
    assert [m["media"]["timestamp"] for m in media[::2]] == ["0", "20", "40", "60", "80"]
    seq = [int(m["sequenceNumber"]) for m in messages[1:]]
    assert seq == list(range(1, len(messages)))
    assert messages[-1]["event"] == "stop"
    assert messages[-1]["stop"]["callSid"] == "CA1"


def test_bad_usage_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    three = tmp_path / "three.wav"
    sf.write(three, np.zeros((800, 3), np.float32), 8000)
    assert main(["call", str(three)]) == EXIT_USAGE
    assert "at most two channels" in capsys.readouterr().err
    assert main(["call", str(tmp_path / "missing.wav")]) == EXIT_USAGE
    assert main(["call", str(three), "--server", "ftp://x"]) == EXIT_USAGE
    with pytest.raises(ValueError):
        ws_base("ftp://host")
    assert ws_base("https://h:1/x?y") == "wss://h:1"
