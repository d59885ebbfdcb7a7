"""Every limit of service/config.py at its edge, on a real server on 127.0.0.1.

For each limit: a request just under it succeeds, the one just over it gets
its documented error with the numbers, and the same server goes on serving
the next request. Streams use the tone-language backend and the real Silero
endpointer, so the finals delivered before a limit closes a stream are known
word for word.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
import soundfile as sf
from aiohttp import ClientSession

from earshot.clients.audio import encode_audio
from earshot.clients.stream import StreamClient
from earshot.core.decoding import SAMPLE_RATE
from tests.kit.live import final_texts, raw_stream, running_server, tone_engine
from tests.kit.tones import make_speech

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(asyncio.wait_for(main(), timeout=100))


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://") + "/v1/listen"


def speech_pcm(*utterances: str) -> bytes:
    audio, _ = make_speech([u.split() for u in utterances], SAMPLE_RATE)
    return encode_audio(audio, "linear16")


def frames_of(pcm: bytes, size: int) -> list[bytes | str | float]:
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def errors(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "Error"]


CLOSE = '{"type": "CloseStream"}'
KEEPALIVE = '{"type": "KeepAlive"}'


# -- streams -----------------------------------------------------------------


def test_max_streams() -> None:
    pcm = speech_pcm("alpha bravo")

    async def main() -> Any:
        async with running_server(tone_engine(max_streams=2)) as url:
            first, second = StreamClient(ws_url(url)), StreamClient(ws_url(url))
            await first.connect()
            await second.connect()  # at the limit: accepted
            async with ClientSession() as http:
                resp = await http.get(ws_url(url).replace("ws://", "http://"))
                refused = resp.status, await resp.json()
            results = []
            for client in (first, second):
                await client.send_audio(pcm)
                await client.close_stream()
                messages = [m async for m in client.messages()]
                results.append((messages, client.close_code))
            # Both streams are gone: a new one is served again.
            after = await raw_stream(ws_url(url), [pcm, CLOSE])
            return refused, results, after

    (status, body), results, (messages, code) = run(main)
    assert status == 503
    assert body["code"] == "server_full"
    assert body["limit"] == 2 and "2 streams" in body["message"]
    for messages, close_code in results:
        assert close_code == 1000 and final_texts(messages) == ["alpha bravo"]
    assert code == 1000 and final_texts(messages) == ["alpha bravo"]


def test_max_frame_bytes() -> None:
    limit = 4096
    pcm = speech_pcm("charlie delta", "echo")

    async def main() -> Any:
        async with running_server(tone_engine(max_frame_bytes=limit)) as url:
            at_limit = await raw_stream(ws_url(url), [*frames_of(pcm, limit), CLOSE])
            over = await raw_stream(ws_url(url), [*frames_of(pcm, limit), b"\0" * (limit + 2)])
            after = await raw_stream(ws_url(url), [*frames_of(pcm, limit), CLOSE])
            return at_limit, over, after

    (ok, ok_code), (bad, bad_code), (again, again_code) = run(main)
    assert ok_code == 1000 and not errors(ok)
    assert final_texts(ok) == ["charlie delta", "echo"]
    assert bad_code == 4413
    [err] = errors(bad)
    assert err["code"] == "frame_too_large"
    assert (err["size"], err["limit"]) == (limit + 2, limit)
    assert f"{limit + 2} bytes" in err["message"] and f"{limit} bytes" in err["message"]
    assert final_texts(bad) == ["charlie delta", "echo"]  # nothing already sent is lost
    assert again_code == 1000 and final_texts(again) == ["charlie delta", "echo"]


def test_idle_timeout() -> None:
    pcm = speech_pcm("foxtrot golf")

    async def main() -> Any:
        async with running_server(tone_engine(idle_timeout_s=0.8)) as url:
            # Quiet for 2 s in all, but a KeepAlive every 0.4 s: under the limit.
            kept = await raw_stream(ws_url(url), [pcm, *[0.4, KEEPALIVE] * 5, CLOSE])
            # The same speech, then nothing: closed after 0.8 s.
            started = asyncio.get_running_loop().time()
            idle = await raw_stream(ws_url(url), [pcm])
            waited = asyncio.get_running_loop().time() - started
            after = await raw_stream(ws_url(url), [pcm, CLOSE])
            return kept, idle, waited, after

    (ok, ok_code), (bad, bad_code), waited, (again, again_code) = run(main)
    assert ok_code == 1000 and not errors(ok)
    assert final_texts(ok) == ["foxtrot golf"]
    assert bad_code == 4408
    [err] = errors(bad)
    assert err["code"] == "idle_timeout" and err["limit_s"] == 0.8
    assert "0.8 s" in err["message"]
    assert final_texts(bad) == ["foxtrot golf"]
    assert 0.8 <= waited < 10
    assert again_code == 1000 and final_texts(again) == ["foxtrot golf"]


def test_max_session_s() -> None:
    pcm = speech_pcm("hotel india")

    async def main() -> Any:
        async with running_server(tone_engine(max_session_s=2.0, idle_timeout_s=1.0)) as url:
            short = await raw_stream(ws_url(url), [pcm, 0.5, KEEPALIVE, CLOSE])
            # KeepAlives keep it from idling out; the session limit still ends it.
            long = await raw_stream(ws_url(url), [pcm, *[0.5, KEEPALIVE] * 8])
            after = await raw_stream(ws_url(url), [pcm, CLOSE])
            return short, long, after

    (ok, ok_code), (bad, bad_code), (again, again_code) = run(main)
    assert ok_code == 1000 and final_texts(ok) == ["hotel india"]
    assert bad_code == 4409
    [err] = errors(bad)
    assert err["code"] == "session_too_long" and err["limit_s"] == 2.0
    assert "2 s" in err["message"] and "max_session_s" in err["message"]
    assert final_texts(bad) == ["hotel india"]
    assert again_code == 1000 and final_texts(again) == ["hotel india"]


# -- the HTTP API --------------------------------------------------------------


def wav_bytes(*utterances: str, seconds: float | None = None) -> bytes:
    audio, _ = make_speech([u.split() for u in utterances], SAMPLE_RATE)
    if seconds is not None:
        audio = np.pad(audio, (0, max(0, int(seconds * SAMPLE_RATE) - len(audio))))
    buf = io.BytesIO()
    sf.write(buf, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def multipart(audio: bytes, filler: int = 0) -> tuple[bytes, str]:
    """An OpenAI transcription form whose exact size is known; ``filler``
    pads the prompt field to tune the size byte by byte."""
    boundary = "earshot-limit-test"
    parts = [
        ("model", b"whisper-1"),
        ("response_format", b"json"),
        ("prompt", b"x" * filler),
    ]
    body = b""
    for name, value in parts:
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    body += (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + audio
        + b"\r\n"
    )
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def post(url: str, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    async with (
        ClientSession() as http,
        http.post(
            f"{url}/v1/audio/transcriptions", data=body, headers={"Content-Type": content_type}
        ) as resp,
    ):
        return resp.status, await resp.json()


def test_max_upload_bytes() -> None:
    audio = wav_bytes("juliett kilo")
    small, content_type = multipart(audio)
    limit = len(small) + 10
    at_limit, _ = multipart(audio, filler=10)
    over, _ = multipart(audio, filler=11)
    assert (len(at_limit), len(over)) == (limit, limit + 1)

    async def main() -> Any:
        async with running_server(tone_engine(max_upload_bytes=limit)) as url:
            return [await post(url, body, content_type) for body in (at_limit, over, at_limit)]

    (ok_status, ok), (bad_status, bad), (again_status, again) = run(main)
    assert ok_status == 200 and ok["text"] == "juliett kilo"
    assert bad_status == 413
    assert bad["error"]["code"] == "upload_too_large"
    assert f"{limit + 1} bytes" in bad["error"]["message"]
    assert f"limit is {limit} bytes" in bad["error"]["message"]
    assert again_status == 200 and again["text"] == "juliett kilo"


def test_max_audio_s() -> None:
    under = wav_bytes("lima mike", seconds=4.9)
    over = wav_bytes("lima mike", seconds=5.1)

    async def main() -> Any:
        async with running_server(tone_engine(max_audio_s=5.0)) as url:
            return [await post(url, *multipart(wav)) for wav in (under, over, under)]

    (ok_status, ok), (bad_status, bad), (again_status, again) = run(main)
    assert ok_status == 200 and ok["text"] == "lima mike"
    assert bad_status == 413
    assert bad["error"]["code"] == "audio_too_long"
    assert "5.1 s" in bad["error"]["message"] and "limit is 5 s" in bad["error"]["message"]
    assert again_status == 200 and again["text"] == "lima mike"
