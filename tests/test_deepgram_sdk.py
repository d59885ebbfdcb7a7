"""The official Deepgram Python SDK (``deepgram-sdk``) against a real Earshot server.

Earshot's protocol is modelled on Deepgram's live streaming API so that
software written for Deepgram can point at it. These tests take the SDK's own
live client, point it at a server on 127.0.0.1 through the SDK's environment
option (``DeepgramClientEnvironment``, whose ``production`` URL is the
websocket base of ``listen.v1.connect``), stream a tone-language script with
the tone backend (whose words are known exactly), close the stream the SDK's
way (``send_close_stream``) and check what arrives through the SDK's typed
messages (``ListenV1Metadata``, ``ListenV1Results``): the async client through
its event callbacks, the sync client (the README's) through its iterator.

``test_server_messages_are_sdk_types`` parses every kind of message Earshot
sends with the parser the SDK's socket client uses, and validates it against
the SDK's model for its type; ``test_every_sdk_model_name_is_accepted`` opens
a stream with every model name the SDK's ``ListenV1Model`` offers.

The SDK imports deprecated parts of ``websockets`` (the legacy asyncio client
and ``InvalidStatusCode``, in ``deepgram/listen/v1/socket_client.py`` and
``deepgram/core/websocket_compat.py``); those two deprecation warnings, and
only those, are filtered here.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from earshot.core.audio import AudioFormat
from earshot.core.errors import InvalidMessageError
from earshot.core.protocol import (
    SpeechStartedEvent,
    StreamParams,
    TranscriptEvent,
    UtteranceEndEvent,
    Word,
    error_message,
    event_message,
    metadata_message,
)
from tests.kit.live import running_server, tone_engine
from tests.kit.tones import make_speech, random_script

try:
    from deepgram import AsyncDeepgramClient, DeepgramClient, DeepgramClientEnvironment
    from deepgram.core.api_error import ApiError
    from deepgram.core.events import EventType
    from deepgram.core.pydantic_utilities import parse_obj_as
    from deepgram.listen.v1.types import (
        ListenV1Error,
        ListenV1Metadata,
        ListenV1Results,
        ListenV1SpeechStarted,
        ListenV1UtteranceEnd,
    )
    from deepgram.types.listen_v1model import ListenV1Model
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"the Deepgram SDK is not installed (pip install deepgram-sdk): {exc}",
        allow_module_level=True,
    )

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings(
        "ignore:websockets.legacy is deprecated:DeprecationWarning",
    ),
    pytest.mark.filterwarnings(
        "ignore:websockets.exceptions.InvalidStatusCode is deprecated:DeprecationWarning",
    ),
]

SAMPLE_RATE = 16000
CHUNK_BYTES = SAMPLE_RATE // 10 * 2  # 100 ms of 16-bit mono
CHUNK_PAUSE_S = 0.02  # five times faster than real time
API_KEY = "earshot-test-key"  # any string: the SDK requires one, Earshot does not check it
TIMEOUT_S = 60.0


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout=TIMEOUT_S + 30))


def linear16(audio: np.ndarray) -> bytes:
    return bytes((np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes())


def chunks(pcm: bytes) -> list[bytes]:
    return [pcm[i : i + CHUNK_BYTES] for i in range(0, len(pcm), CHUNK_BYTES)]


def local_environment(http_url: str) -> DeepgramClientEnvironment:
    """The SDK's environment for a server at ``http://127.0.0.1:PORT``."""
    ws_url = http_url.replace("http://", "ws://")
    return DeepgramClientEnvironment(
        base=http_url, production=ws_url, agent=ws_url, agent_rest=http_url
    )


@asynccontextmanager
async def local_server() -> AsyncIterator[DeepgramClientEnvironment]:
    async with running_server(tone_engine()) as url:
        assert url.startswith("http://127.0.0.1:")
        yield local_environment(url)


# Options as a Deepgram user passes them to ``listen.v1.connect`` (``model`` is required).
STREAM_OPTIONS: dict[str, Any] = {
    "model": "nova-3",
    "encoding": "linear16",
    "sample_rate": SAMPLE_RATE,
    "channels": 1,
    "interim_results": True,
}


def tone_script(seed: int) -> tuple[list[str], bytes, float]:
    """A few utterances (5 to 12 s of audio): their texts, linear16 audio, duration."""
    script = random_script(4, (2, 5), seed=seed)
    audio, truth = make_speech(script, SAMPLE_RATE)
    assert 5.0 <= truth.duration <= 12.0
    return truth.texts, linear16(audio), truth.duration


def transcript(result: ListenV1Results) -> str:
    return result.channel.alternatives[0].transcript


def check_stream(messages: list[Any], texts: list[str], duration: float) -> None:
    """What a Deepgram client must see for one tone-language stream, in SDK types."""
    kinds = [type(m).__name__ for m in messages]
    assert all(m is not None for m in messages), f"the SDK could not parse a message: {kinds}"
    assert isinstance(messages[0], ListenV1Metadata), f"Metadata must come first: {kinds}"
    assert isinstance(messages[-1], ListenV1Metadata), f"Metadata must come last: {kinds}"
    opening, closing = messages[0], messages[-1]
    assert opening.type == "Metadata"
    assert opening.request_id and opening.created
    assert opening.channels == 1
    assert closing.request_id == opening.request_id
    assert closing.duration == pytest.approx(duration, abs=0.01)
    # Earshot's additions come through the SDK's model as extra fields.
    assert getattr(opening, "earshot")["settings"]["interim_results"] is True  # noqa: B009

    results = [m for m in messages if isinstance(m, ListenV1Results)]
    assert len(results) == len(messages) - 2, f"unexpected message types: {kinds}"
    finals = [r for r in results if r.is_final and transcript(r)]
    interims = [r for r in results if not r.is_final]
    assert [transcript(r) for r in finals] == texts
    assert interims, "interim results were asked for and none arrived"
    for r in interims:
        said = transcript(r).split()
        assert any(t.split()[: len(said)] == said for t in texts), transcript(r)
    for r in results:
        assert r.type == "Results"
        assert r.channel_index == [0, 1]
        assert r.metadata.request_id == opening.request_id
        assert r.metadata.model_info.name == "tone"
    ends = [0.0]
    for r in finals:
        words = r.channel.alternatives[0].words
        assert [w.word for w in words] == transcript(r).split()
        assert all(isinstance(w.start, float) and w.start < w.end for w in words)
        assert r.start <= words[0].start and words[-1].end <= r.start + r.duration + 0.01
        assert words[0].start >= ends[-1]
        ends.append(words[-1].end)
    assert ends[-1] <= duration


@dataclass
class Received:
    messages: list[Any] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


def test_async_client_streams_through_event_callbacks() -> None:
    texts, pcm, duration = tone_script(seed=3)

    async def main() -> Received:
        got = Received()
        async with local_server() as environment:
            client = AsyncDeepgramClient(api_key=API_KEY, environment=environment)
            async with client.listen.v1.connect(**STREAM_OPTIONS) as connection:
                connection.on(EventType.OPEN, lambda _: got.events.append("open"))
                connection.on(EventType.MESSAGE, got.messages.append)
                connection.on(EventType.ERROR, got.errors.append)
                connection.on(EventType.CLOSE, lambda _: got.events.append("close"))
                listening = asyncio.create_task(connection.start_listening())
                for chunk in chunks(pcm):
                    await connection.send_media(chunk)
                    await asyncio.sleep(CHUNK_PAUSE_S)
                await connection.send_close_stream()
                # The server sends the last finals and Metadata, then closes with 1000,
                # which ends start_listening.
                await asyncio.wait_for(listening, timeout=TIMEOUT_S)
        return got

    got = run(main)
    assert got.errors == []
    assert got.events == ["open", "close"]
    check_stream(got.messages, texts, duration)


def test_sync_client_streams_through_its_iterator() -> None:
    """The README's synchronous client, in a thread; the server runs on this loop."""
    texts, pcm, duration = tone_script(seed=5)
    got = Received()

    def stream(environment: DeepgramClientEnvironment) -> None:
        client = DeepgramClient(api_key=API_KEY, environment=environment)
        with client.listen.v1.connect(**STREAM_OPTIONS) as connection:

            def send() -> None:
                try:
                    for chunk in chunks(pcm):
                        connection.send_media(chunk)
                        time.sleep(CHUNK_PAUSE_S)
                    connection.send_close_stream()
                except Exception as exc:
                    got.errors.append(exc)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            got.messages.extend(connection)  # ends when the server closes
            sender.join(timeout=TIMEOUT_S)

    def guarded(environment: DeepgramClientEnvironment) -> None:
        try:
            stream(environment)
        except Exception as exc:
            got.errors.append(exc)

    async def main() -> None:
        async with local_server() as environment:
            # A daemon thread, not the loop's executor, so that a hung client
            # cannot keep asyncio.run from returning.
            worker = threading.Thread(target=guarded, args=(environment,), daemon=True)
            worker.start()
            await asyncio.to_thread(worker.join, TIMEOUT_S)
            assert not worker.is_alive(), f"the sync client did not finish in {TIMEOUT_S} s"

    run(main)
    assert got.errors == []
    check_stream(got.messages, texts, duration)


def test_refused_parameters_raise_api_error() -> None:
    """A stream Earshot refuses before the upgrade (HTTP 400) is the SDK's ApiError."""

    async def main() -> ApiError:
        async with local_server() as environment:
            client = AsyncDeepgramClient(api_key=API_KEY, environment=environment)
            with pytest.raises(ApiError) as caught:
                async with client.listen.v1.connect(model="nova-3", encoding="opus"):
                    pass
            return caught.value

    err = run(main)
    assert err.status_code == 400


def test_every_sdk_model_name_is_accepted() -> None:
    """``model`` is required by the SDK; every name its ListenV1Model lists must open a stream."""
    names = [str(n) for n in typing.get_args(typing.get_args(ListenV1Model)[0])]
    assert "nova-3" in names

    async def main() -> dict[str, int | None]:
        refused: dict[str, int | None] = {}
        async with local_server() as environment:
            client = AsyncDeepgramClient(api_key=API_KEY, environment=environment)
            for name in names:
                try:
                    async with client.listen.v1.connect(model=name) as connection:
                        await connection.send_close_stream()
                        async for _ in connection:
                            pass
                except ApiError as exc:
                    refused[name] = exc.status_code
        return refused

    refused = run(main)
    assert refused == {}, f"model names the SDK offers that Earshot refuses: {refused}"


# -- every message Earshot sends, through the SDK's parser --------------------


def _server_messages() -> dict[str, tuple[dict[str, Any], type[Any] | None]]:
    """One of each message Earshot sends (from earshot.core.protocol) and the SDK's type for it.

    The SDK has no type for ``Warning`` (None).
    """
    params = StreamParams(audio=AudioFormat.parse("linear16", "16000", "1"), interim_results=True)
    word = Word("alpha", 0.5, 0.74, 0.9, "alpha")
    result = TranscriptEvent(0, 1, 0.4, 0.6, "alpha", 0.9, (word,), True, True)
    interim = TranscriptEvent(0, 1, 0.4, 0.3, "alpha", 0.8, (word,), False, False)
    metadata = metadata_message(
        request_id="r",
        created="2024-01-01T00:00:00.000+00:00",
        params=params,
        provenance={"name": "tone", "model_sha256": "0" * 64},
        policy={},
        decoding={},
        duration=1.5,
    )
    return {
        "Metadata": (metadata, ListenV1Metadata),
        "Results (final)": (event_message(result, "r", "tone"), ListenV1Results),
        "Results (interim)": (event_message(interim, "r", "tone"), ListenV1Results),
        "SpeechStarted": (
            event_message(SpeechStartedEvent(0, 1, 0.5), "r", "tone"),
            ListenV1SpeechStarted,
        ),
        "UtteranceEnd": (
            event_message(UtteranceEndEvent(0, 1, 0.74), "r", "tone"),
            ListenV1UtteranceEnd,
        ),
        "Error": (error_message(InvalidMessageError("bad message", field="type")), ListenV1Error),
    }


@pytest.mark.parametrize("kind", list(_server_messages()))
def test_server_messages_are_sdk_types(kind: str) -> None:
    """Each message parses, as the SDK's socket client parses it, into a valid SDK model.

    The parser is ``construct_type(type_=V1SocketClientResponse, ...)``, the call in
    ``deepgram/listen/v1/socket_client.py`` (``__aiter__``, ``start_listening``, ``recv``)
    whose result goes to MESSAGE callbacks and iterators. It does not validate (missing
    fields become None), so the result is validated again against its own model.
    """
    # Imported here: the module imports websockets.legacy (filtered above).
    from deepgram.core.unchecked_base_model import construct_type
    from deepgram.listen.v1.socket_client import V1SocketClientResponse

    message, expected = _server_messages()[kind]
    raw = json.loads(json.dumps(message))
    parsed = construct_type(type_=typing.cast(Any, V1SocketClientResponse), object_=raw)
    assert parsed is not None, (
        f"the SDK parses Earshot's {message['type']!r} message to None and hands None to "
        f"MESSAGE callbacks and iterators; its message types are {V1SocketClientResponse}"
    )
    assert expected is not None, f"the SDK has no type for {kind}, yet parsed it as {parsed!r}"
    assert isinstance(parsed, expected), type(parsed)
    try:
        parse_obj_as(expected, raw)
    except Exception as exc:
        pytest.fail(f"Earshot's {kind} message is not a valid {expected.__name__}: {exc}")
