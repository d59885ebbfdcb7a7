"""Malformed and hostile input through the real server on 127.0.0.1: every
case gets a coded answer, the stream or server goes on, and nothing already
transcribed is lost. The tone-language backend keeps the words exact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, WSServerHandshakeError

from clients.stream import encode_audio
from models.runner import WhisperRunner
from models.vad import shared_model
from service.config import load_config
from service.server import Engine
from tests.kit.live import final_texts, raw_stream, running_server, tone_engine
from tests.kit.tones import make_speech, random_script

pytestmark = pytest.mark.timeout(120)


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout=100))


def speech_pcm(script: list[list[str]]) -> bytes:
    audio, _ = make_speech(script, 16000)
    return encode_audio(audio, "linear16")


def test_deeply_nested_json_is_a_non_fatal_invalid_message() -> None:
    script = random_script(2, (2, 4), seed=31)
    pcm = speech_pcm(script)
    half = len(pcm) // 2 // 2 * 2

    async def main() -> Any:
        async with running_server(tone_engine()) as url:
            ws = url.replace("http://", "ws://") + "/v1/listen"
            frames = [
                pcm[:half],
                "[" * 100_000,
                '{"a":' * 50_000,
                pcm[half:],
                '{"type": "CloseStream"}',
            ]
            return await raw_stream(ws, frames)

    messages, code = run(main)
    assert code == 1000
    errors = [m for m in messages if m["type"] == "Error"]
    assert [e["code"] for e in errors] == ["invalid_message", "invalid_message"]
    assert final_texts(messages) == [" ".join(u) for u in script]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("redact=pci", "redact"),
        ("redact=true&redact=ssn", "redact"),
        ("callback=http%3A%2F%2Fexample.com%2Fhook", "callback"),
        ("diarize=true", "diarize"),
        ("search=refund", "search"),
        ("replace=foo%3Abar", "replace"),
    ],
)
def test_parameters_a_client_relies_on_are_refused_before_the_upgrade(
    query: str, field: str
) -> None:
    async def main() -> tuple[int, dict[str, Any]]:
        async with running_server(tone_engine()) as url, ClientSession() as http:
            ws = url.replace("http://", "ws://") + "/v1/listen?" + query
            with pytest.raises(WSServerHandshakeError) as info:
                await http.ws_connect(ws)
            async with http.get(url + "/v1/listen?" + query) as resp:
                body = await resp.json()
            return info.value.status, body

    status, body = run(main)
    assert status == 400
    assert body["code"] == "unsupported_parameter" and body["field"] == field
    assert field in body["message"]


def test_deepgram_detect_language_and_harmless_values_are_accepted() -> None:
    script = random_script(1, (2, 3), seed=32)
    query = (
        "encoding=linear16&sample_rate=16000&detect_language=true&measurements=true"
        "&redact=false&diarize=false&smart_format=true"
    )

    async def main() -> Any:
        async with running_server(tone_engine()) as url:
            ws = url.replace("http://", "ws://") + "/v1/listen"
            return await raw_stream(ws, [speech_pcm(script), '{"type": "CloseStream"}'], query)

    messages, code = run(main)
    assert code == 1000
    meta = messages[0]
    assert meta["earshot"]["settings"]["language"] == "auto"
    assert set(meta["earshot"]["ignored_parameters"]) == {
        "measurements",
        "redact",
        "diarize",
        "smart_format",
    }
    assert final_texts(messages) == [" ".join(u) for u in script]


def test_clients_never_learn_the_servers_file_system(micro_model: Path) -> None:
    engine = Engine.create(
        load_config(env={}, overrides={}), WhisperRunner(micro_model), vad_model=shared_model()
    )

    async def main() -> Any:
        async with running_server(engine) as url, ClientSession() as http:
            ws = url.replace("http://", "ws://") + "/v1/listen"
            messages, _ = await raw_stream(ws, ['{"type": "CloseStream"}'])
            async with http.get(url + "/v1/models") as resp:
                models = await resp.text()
            async with http.get(url + "/v1/policy") as resp:
                policy = await resp.text()
            return messages, models, policy

    messages, models, policy = run(main)
    shown = json.dumps(messages) + models + policy
    folder = str(micro_model.resolve())
    assert messages[0]["type"] == "Metadata"
    assert folder not in shown and str(micro_model.parent) not in shown
    provenance = messages[0]["earshot"]["model"]
    assert provenance["model_sha256"] and "path" not in provenance
