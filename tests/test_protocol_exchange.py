"""docs/protocol.md's "A complete exchange", replayed against the live server."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from earshot.clients.audio import encode_audio
from tests.kit.live import tone_engine
from tests.kit.tones import make_speech
from tests.test_stream_e2e import listen_url, run

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()


def exchange_section() -> str:
    return DOC[DOC.index("## A complete exchange") :]


def test_the_documented_exchange_happens_as_written() -> None:
    section = exchange_section()
    query = re.search(r"^GET /v1/listen\?(\S+)$", section, re.MULTILINE)
    assert query, "the exchange names its request"
    blocks = re.findall(r"```json\n(.*?)```", section, re.DOTALL)
    documented_end = json.loads(blocks[-1])
    assert "320 bytes" in section

    agent, _ = make_speech([["alpha", "bravo"], ["charlie"]], 8000)
    customer, _ = make_speech([["delta", "echo", "foxtrot"]], 8000, lead_s=1.2)
    n = max(len(agent), len(customer))
    call = np.zeros((n, 2), np.float32)
    call[: len(agent), 0] = agent
    call[: len(customer), 1] = customer
    audio = encode_audio(call, "mulaw")

    async def main() -> tuple[list[dict[str, Any]], int | None]:
        from aiohttp import ClientSession, WSMsgType

        messages: list[dict[str, Any]] = []
        async with (
            listen_url(tone_engine()) as url,
            ClientSession() as http,
            http.ws_connect(f"{url}?{query.group(1)}") as ws,
        ):
            for i in range(0, len(audio), 320):  # 20 ms frames, as documented
                await ws.send_bytes(audio[i : i + 320])
                if i % 32000 == 0:
                    await asyncio.sleep(0)
            await ws.send_str('{"type": "CloseStream"}')
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    messages.append(json.loads(msg.data))
            return messages, ws.close_code

    messages, code = run(main)
    assert code == 1000
    assert messages[0]["type"] == "Metadata" and messages[-1]["type"] == "Metadata"
    finals = {0: [], 1: []}  # type: dict[int, list[str]]
    for m in messages:
        if m["type"] == "Results" and m["is_final"]:
            finals[m["channel_index"][0]].append(m["channel"]["alternatives"][0]["transcript"])
    assert finals == {0: ["alpha bravo", "charlie"], 1: ["delta echo foxtrot"]}
    last = messages[-1]
    assert set(last) == set(documented_end)
    assert set(last["earshot"]) == set(documented_end["earshot"])
    assert last["earshot"]["settings"] == documented_end["earshot"]["settings"]
    assert last["channels"] == documented_end["channels"]
    assert last["duration"] > 0


def test_earshot_stream_prints_the_finals(tmp_path: Path) -> None:
    import sys

    import soundfile as sf

    script = [["golf", "hotel"], ["india", "juliett", "kilo"]]
    audio, _ = make_speech(script, 22050)
    wav = tmp_path / "call.wav"
    sf.write(wav, audio, 22050, subtype="PCM_16")

    async def main(*extra: str) -> tuple[int, str, str]:
        async with listen_url(tone_engine()) as url:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "earshot.service.cli",
                "stream",
                str(wav),
                "--url",
                url,
                "--fast",
                *extra,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=Path(__file__).resolve().parents[1],
            )
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

    code, out, err = run(main)
    assert code == 0, err
    assert out.splitlines() == ["golf hotel", "india juliett kilo"]

    code, out, err = run(lambda: main("--json"))
    assert code == 0, err
    messages = [json.loads(line) for line in out.splitlines()]
    assert messages[0]["type"] == "Metadata"
    assert messages[0]["earshot"]["settings"]["sample_rate"] == 22050
    finals = [m for m in messages if m["type"] == "Results" and m["is_final"]]
    assert [f["channel"]["alternatives"][0]["transcript"] for f in finals] == [
        "golf hotel",
        "india juliett kilo",
    ]


def test_earshot_stream_reports_a_refusal(tmp_path: Path) -> None:
    import sys

    async def main() -> tuple[int, str]:
        async with listen_url(tone_engine()) as url:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "earshot.service.cli",
                "stream",
                "-",
                "--url",
                url,
                "--encoding",
                "mulaw",
                "--sample-rate",
                "4000",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=Path(__file__).resolve().parents[1],
            )
            _, err = await asyncio.wait_for(proc.communicate(b"\xff" * 800), timeout=60)
            assert proc.returncode is not None
            return proc.returncode, err.decode()

    code, err = run(main)
    assert code == 1
    assert "[invalid_sample_rate]" in err and "400" in err
