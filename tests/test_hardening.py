"""Malformed and hostile input through the real server on 127.0.0.1: every
case gets a coded answer, the stream or server goes on, and nothing already
transcribed is lost. The tone-language backend keeps the words exact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientSession, WSServerHandshakeError

from earshot.clients.audio import encode_audio
from earshot.models.runner import WhisperRunner
from earshot.models.silero import shared_model
from earshot.service.config import load_config
from earshot.service.engine.engine import Engine
from tests.kit.live import (
    final_texts,
    masked_frame,
    non_reading_websocket,
    raw_stream,
    running_server,
    tone_engine,
)
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
            frames: list[bytes | str | float] = [
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


# -- the HTTP level ---------------------------------------------------------------


async def raw_http(url: str, data: bytes, *, read_timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh TCP connection to the server; its answer (one
    response, read by its Content-Length), or b"" if it closes without one."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                return buf
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    finally:
        writer.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return status, headers, json.loads(body) if body else None


def code_of(body: dict[str, Any]) -> str:
    return str(body["error"]["code"] if "error" in body else body["code"])


MULTIPART = "multipart/form-data; boundary="


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (MULTIPART + "XyZ", b"not a multipart body"),
        (MULTIPART, b"--\r\n\r\n"),
        ("multipart/form-data", b"--abc\r\ncontent-disposition: form-data; name=file\r\n\r\nx"),
        (MULTIPART + "b" * 300, b"--" + b"b" * 300 + b"\r\n"),
        (
            MULTIPART + "abc",
            b'--abc\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF',
        ),
    ],
)
def test_malformed_multipart_gets_a_coded_400_not_a_500(content_type: str, body: bytes) -> None:
    async def main() -> tuple[int, dict[str, Any], int]:
        async with running_server(tone_engine(body_timeout_s=2.0)) as url, ClientSession() as http:
            headers = {"Content-Type": content_type}
            async with http.post(
                url + "/v1/audio/transcriptions", data=body, headers=headers
            ) as resp:
                answer = resp.status, await resp.json()
            async with http.get(url + "/healthz") as resp:
                return (*answer, resp.status)

    status, answer, health = run(main)
    assert status == 400 and health == 200
    assert answer["error"]["code"] == "invalid_multipart", answer
    assert answer["error"]["type"] == "invalid_request_error"


def test_the_frameworks_own_refusals_are_json_with_codes() -> None:
    async def main() -> dict[str, tuple[int, dict[str, str], Any]]:
        out = {}
        async with running_server(tone_engine()) as url:
            requests = {
                "404": b"GET /no/such/path HTTP/1.1\r\nHost: x\r\n\r\n",
                "404-openai": b"GET /v1/audio/nothing HTTP/1.1\r\nHost: x\r\n\r\n",
                "405": b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
                "426": b"GET /v1/listen HTTP/1.1\r\nHost: x\r\n\r\n",
                "400-line": b"GET /\x00bad HTTP/1.1\r\nHost: x\r\n\r\n",
                "400-garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
                "431-long": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
                + b"a" * 20_000
                + b"\r\n\r\n",
                "431-many": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
                + b"\r\n",
            }
            for name, data in requests.items():
                out[name] = parse_response(await raw_http(url, data, read_timeout=5))
        return out

    answers = run(main)
    expected = {
        "404": (404, "not_found"),
        "404-openai": (404, "not_found"),
        "405": (405, "method_not_allowed"),
        "426": (426, "websocket_required"),
        "400-line": (400, "bad_request"),
        "400-garbage": (400, "bad_request"),
        "431-long": (431, "request_header_too_large"),
        "431-many": (431, "request_header_too_large"),
    }
    for name, (status, code) in expected.items():
        got_status, headers, body = answers[name]
        assert (got_status, code_of(body)) == (status, code), (name, body)
        assert headers["content-type"].startswith("application/json"), name
        assert body.get("message") or body["error"]["message"], name
    assert "error" in answers["404-openai"][2]  # OpenAI's envelope under /v1/audio
    assert "allow" in answers["405"][1]


def test_query_string_secrets_never_reach_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    secrets = {"token": "sk-tok-123", "api_key": "sk-api-456", "key": "sk-k-789"}
    secrets["access_token"] = "sk-acc-000"

    async def main() -> None:
        engine = tone_engine(api_keys="the-real-key")
        async with running_server(engine) as url, ClientSession() as http:
            for name, value in secrets.items():
                async with http.get(f"{url}/v1/listen?{name}={value}&encoding=linear16") as r:
                    assert r.status == 401

    with caplog.at_level("INFO", logger="earshot.access"):
        run(main)
    lines = [r for r in caplog.records if r.name == "earshot.access"]
    assert len(lines) == len(secrets)
    text = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in lines)
    for value in secrets.values():
        assert value not in text
    assert text.count("REDACTED") >= len(secrets) and "encoding=linear16" in text


def test_incomplete_requests_are_closed_after_the_header_timeout() -> None:
    async def main() -> tuple[float, bytes, float, int, dict[str, Any]]:
        engine = tone_engine(header_timeout_s=0.5, body_timeout_s=0.5)
        async with running_server(engine) as url:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            # Headers that never finish (slowloris): closed, nothing answered.
            partial = await raw_http(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n")
            header_s = loop.time() - t0
            # A body shorter than its Content-Length: 408 body_timeout.
            t0 = loop.time()
            head = (
                b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=abc\r\nContent-Length: 100000\r\n\r\n"
                b'--abc\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            )
            answer = await raw_http(url, head)
            body_s = loop.time() - t0
            status, _, body = parse_response(answer)
            return header_s, partial, body_s, status, body

    header_s, partial, body_s, status, body = run(main)
    assert partial == b"" and 0.4 < header_s < 3.0
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert 0.4 < body_s < 3.0


def test_connections_without_a_request_are_bounded() -> None:
    async def main() -> tuple[int, dict[str, Any], int]:
        engine = tone_engine(max_pending_connections=3, header_timeout_s=30.0)
        async with running_server(engine) as url:
            host, port = url.removeprefix("http://").split(":")
            idle = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
            await asyncio.sleep(0.2)
            refused = parse_response(await raw_http(url, b"", read_timeout=5))
            for _, writer in idle:
                writer.close()
            await asyncio.sleep(0.2)
            async with ClientSession() as http, http.get(url + "/healthz") as resp:
                return refused[0], refused[2], resp.status

    status, body, after = run(main)
    assert status == 503 and body["code"] == "too_many_connections"
    assert "max_pending_connections" in body["message"]
    assert after == 200  # once the idle ones are gone, requests are served again


async def read_server_frames(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    """Every (opcode, payload) the server sends until it closes (server frames
    are unmasked)."""
    frames: list[tuple[int, bytes]] = []
    while True:
        try:
            head = await asyncio.wait_for(reader.readexactly(2), 10)
        except asyncio.IncompleteReadError:
            return frames
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        frames.append((head[0] & 0x0F, await reader.readexactly(n)))
        if frames[-1][0] == 0x8:
            return frames


def test_an_unmasked_client_frame_closes_the_stream_with_1002() -> None:
    import base64
    import os

    async def main() -> tuple[bytes, list[tuple[int, bytes]]]:
        async with running_server(tone_engine()) as url:
            host, port = url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                (
                    "GET /v1/listen?encoding=linear16&sample_rate=16000 HTTP/1.1\r\n"
                    f"Host: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            handshake = await reader.readuntil(b"\r\n\r\n")
            writer.write(masked_frame(0x2, b"\x00\x00" * 1600))  # masked: fine
            writer.write(masked_frame(0x2, b"\x00\x00" * 1600, masked=False))
            await writer.drain()
            frames = await read_server_frames(reader)
            writer.close()
            return handshake, frames

    handshake, frames = run(main)
    assert handshake.startswith(b"HTTP/1.1 101")
    close = [payload for opcode, payload in frames if opcode == 0x8]
    assert close and int.from_bytes(close[0][:2], "big") == 1002, frames


def test_abrupt_disconnects_are_not_counted_as_normal_closes() -> None:
    pcm = speech_pcm(random_script(1, (2, 3), seed=33))

    async def main() -> dict[int, int]:
        engine = tone_engine()
        async with running_server(engine) as url, ClientSession() as http:
            ws_url = url.replace("http://", "ws://") + "/v1/listen"
            # 1. a normal end; 2. the client's own close frame, 4000;
            # 3. the connection dropped without a close frame, three times.
            await raw_stream(ws_url, [pcm, '{"type": "CloseStream"}'])
            async with http.ws_connect(ws_url) as ws:
                await ws.send_bytes(pcm[:3200])
                await ws.close(code=4000)
            for _ in range(3):
                ws = await http.ws_connect(ws_url)
                await ws.send_bytes(pcm[:3200])
                await ws.receive()  # Metadata: the stream is open
                transport = ws._response.connection.transport  # type: ignore[union-attr]
                assert transport is not None
                transport.abort()
            for _ in range(100):
                if sum(engine.closes.values()) == 5:
                    break
                await asyncio.sleep(0.05)
            async with http.get(url + "/metrics") as resp:
                metrics = await resp.text()
            assert 'earshot_stream_closes_total{code="1006"} 3.0' in metrics, metrics
            return dict(engine.closes)

    assert run(main) == {1000: 1, 4000: 1, 1006: 3}


def test_a_client_that_stops_reading_is_closed_by_time_too() -> None:
    script = random_script(30, (3, 6), seed=3)
    audio, _ = make_speech(script, 16000, gap_s=0.7)
    pcm = encode_audio(np.repeat(audio[:, None], 8, axis=1), "linear16")
    # The count limit is out of reach: only the time limit can close it.
    engine = tone_engine(
        max_pending_messages=100_000, max_unread_s=1.0, interim_step_s=0.1, socket_send_buffer=4096
    )

    async def main() -> tuple[float, dict[int, int]]:
        async with running_server(engine) as url:
            query = "channels=8&multichannel=true&interim_results=true&vad_events=true"
            sock = await non_reading_websocket(url, query)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:  # audio at about real time, never reading a byte
                for i in range(0, len(pcm), 8 * 2 * 1600):
                    frame = masked_frame(0x2, pcm[i : i + 8 * 2 * 1600])
                    await asyncio.wait_for(loop.sock_sendall(sock, frame), 5)
                    await asyncio.sleep(0.1)
                    if engine.closes:
                        break
            except (OSError, asyncio.TimeoutError):
                pass
            took = loop.time() - t0
            for _ in range(200):
                if engine.active_streams == 0:
                    break
                await asyncio.sleep(0.05)
            sock.close()
            return took, dict(engine.closes)

    took, closes = run(main)
    assert closes == {4430: 1}
    assert took < 30  # not the whole minute of audio
