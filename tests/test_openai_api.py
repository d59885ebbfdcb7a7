"""The OpenAI-compatible endpoints, driven by the official ``openai`` package
against a real server on 127.0.0.1 with the tone-language backend, so that the
exact words of every transcript are known."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soundfile as sf
from openai import AsyncOpenAI

from earshot.core.decoding import SAMPLE_RATE, Capabilities, DecodeOptions, Hypothesis, Window
from earshot.service.engine.engine import Engine
from tests.kit.live import running_server, tone_engine
from tests.kit.tones import ToneBackend, make_speech, random_script

pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def openai_client(engine: Engine) -> AsyncIterator[AsyncOpenAI]:
    """Serve ``engine`` on a free loopback port; an SDK client pointed at its /v1."""
    async with (
        running_server(engine) as url,
        AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30.0) as client,
    ):
        yield client


def run(engine: Engine, body: Callable[[AsyncOpenAI], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with openai_client(engine) as client:
            return await body(client)

    return asyncio.run(asyncio.wait_for(main(), timeout=90))


def speech_file(tmp_path: Path, script: list[list[str]], name: str = "speech.wav") -> Path:
    audio, _ = make_speech(script)
    path = tmp_path / name
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return path


@pytest.fixture
def script() -> list[list[str]]:
    return random_script(3, (2, 5), seed=11)


@pytest.fixture
def wav(tmp_path: Path, script: list[list[str]]) -> Path:
    return speech_file(tmp_path, script)


def expected(script: list[list[str]]) -> str:
    return " ".join(" ".join(u) for u in script)


def test_json_gives_the_exact_words_and_the_model(wav: Path, script: list[list[str]]) -> None:
    async def body(client: AsyncOpenAI) -> Any:
        raw = await client.audio.transcriptions.with_raw_response.create(
            file=wav, model="whisper-1"
        )
        return raw.headers.get("x-earshot-model"), raw.parse()

    header, result = run(tone_engine(), body)
    assert header == "tone"
    assert result.text == expected(script)
    extra = result.model_extra or {}
    assert extra["earshot"]["model"] == "tone"
    assert extra["earshot"]["requested_model"] == "whisper-1"
    assert result.usage is not None and result.usage.type == "duration"
    assert result.usage.seconds > 0


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_text_formats(fmt: str, wav: Path, script: list[list[str]]) -> None:
    async def body(client: AsyncOpenAI) -> Any:
        return await client.audio.transcriptions.create(
            file=wav, model="gpt-4o-transcribe", response_format=fmt
        )

    out = run(tone_engine(), body)
    assert isinstance(out, str)
    utterances = [" ".join(u) for u in script]
    if fmt == "text":
        assert out.strip() == expected(script)
        return
    lines = out.splitlines()
    if fmt == "vtt":
        assert lines[0] == "WEBVTT"
        arrows = [ln for ln in lines if " --> " in ln]
        assert all("." in ln for ln in arrows)
    else:
        assert lines[0] == "1"
        arrows = [ln for ln in lines if " --> " in ln]
        assert all("," in ln for ln in arrows)
    texts = [ln for ln in lines if ln and " --> " not in ln and ln != "WEBVTT"]
    texts = [ln for ln in texts if not ln.isdigit()]
    assert " ".join(texts) == " ".join(utterances)


def test_verbose_json_with_word_and_segment_timestamps(tmp_path: Path) -> None:
    script = [["alpha", "bravo", "kilo"], ["lima", "mike"]]
    audio, truth = make_speech(script)
    path = tmp_path / "a.flac"
    sf.write(path, audio, SAMPLE_RATE)

    async def body(client: AsyncOpenAI) -> Any:
        return await client.audio.transcriptions.create(
            file=path,
            model="tone",
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            language="en",
        )

    out = run(tone_engine(), body)
    assert out.text == truth.text
    assert out.language == "english"
    assert out.duration == pytest.approx(truth.duration, abs=0.01)
    assert out.words is not None and out.segments is not None
    assert [w.word for w in out.words] == [w.word for w in truth.words]
    for got, want in zip(out.words, truth.words, strict=True):
        assert got.start == pytest.approx(want.start, abs=0.08)
        assert got.end == pytest.approx(want.end, abs=0.08)
    assert " ".join(s.text for s in out.segments) == truth.text
    seg = out.segments[0]
    assert seg.id == 0 and seg.tokens and seg.temperature == 0.0
    assert seg.start <= out.words[0].start and seg.end >= out.words[2].end
    assert 0.0 <= seg.no_speech_prob <= 1.0 and seg.compression_ratio > 0


def test_verbose_json_words_only_leaves_out_segments(wav: Path) -> None:
    async def body(client: AsyncOpenAI) -> Any:
        return await client.audio.transcriptions.create(
            file=wav,
            model="whisper-1",
            response_format="verbose_json",
            timestamp_granularities=["word"],
        )

    out = run(tone_engine(), body)
    assert out.words and out.segments is None


def test_streaming_sends_deltas_in_order_then_done(tmp_path: Path) -> None:
    # Over 25 s of speech: more than one piece, so more than one delta.
    script = random_script(10, (5, 7), seed=3)
    path = speech_file(tmp_path, script)

    async def body(client: AsyncOpenAI) -> list[Any]:
        stream = await client.audio.transcriptions.create(
            file=path, model="gpt-4o-mini-transcribe", stream=True
        )
        return [event async for event in stream]

    events = run(tone_engine(), body)
    types = [e.type for e in events]
    assert types[-1] == "transcript.text.done"
    assert set(types[:-1]) == {"transcript.text.delta"}
    assert len(types) >= 3
    deltas = "".join(e.delta for e in events[:-1])
    assert deltas == events[-1].text == expected(script)


def test_models_list_and_retrieve() -> None:
    async def body(client: AsyncOpenAI) -> Any:
        listed = [m async for m in client.models.list()]
        one = await client.models.retrieve("whisper-1")
        served = await client.models.retrieve("tone")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("large-v3")
        return listed, one, served, missing.value

    listed, one, served, missing = run(tone_engine(), body)
    ids = [m.id for m in listed]
    assert ids[0] == "tone" and "whisper-1" in ids and "gpt-4o-transcribe" in ids
    assert all(m.object == "model" and m.owned_by == "earshot" for m in listed)
    info = (one.model_extra or {})["earshot"]
    assert info["served_model"] == "tone" and info["alias"] is True
    assert info["provenance"]["kind"] == "synthetic-test-backend"
    assert "path" not in info["provenance"]
    assert info["policy"]["audio_stored"] is False
    assert (served.model_extra or {})["earshot"]["alias"] is False
    assert missing.status_code == 404
    assert missing.code == "model_not_available"


def test_another_whisper_model_is_refused(wav: Path) -> None:
    async def body(client: AsyncOpenAI) -> Any:
        with pytest.raises(openai.BadRequestError) as err:
            await client.audio.transcriptions.create(file=wav, model="large-v3")
        return err.value

    err = run(tone_engine(), body)
    assert err.status_code == 400
    assert err.code == "model_not_available"
    assert err.param == "model"
    assert err.type == "invalid_request_error"
    assert "'tone'" in err.message
    assert err.response.headers["x-earshot-model"] == "tone"


def test_broken_upload_is_audio_decode_failed(tmp_path: Path) -> None:
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)

    async def body(client: AsyncOpenAI) -> Any:
        with pytest.raises(openai.BadRequestError) as err:
            await client.audio.transcriptions.create(file=path, model="whisper-1")
        return err.value

    err = run(tone_engine(), body)
    assert err.code == "audio_decode_failed"
    assert "broken.wav" in err.message


def test_empty_upload_is_audio_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")

    async def body(client: AsyncOpenAI) -> Any:
        with pytest.raises(openai.BadRequestError) as err:
            await client.audio.transcriptions.create(file=path, model="whisper-1")
        return err.value

    assert run(tone_engine(), body).code == "audio_empty"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("response_format", {"response_format": "diarized_json"}),
        ("temperature", {"temperature": 3.0}),
        ("timestamp_granularities[]", {"timestamp_granularities": ["sentence"]}),
        ("language", {"language": "not a language"}),
    ],
)
def test_bad_fields_name_the_field(field: str, kwargs: dict[str, Any], wav: Path) -> None:
    async def body(client: AsyncOpenAI) -> Any:
        with pytest.raises(openai.BadRequestError) as err:
            await client.audio.transcriptions.create(file=wav, model="whisper-1", **kwargs)
        return err.value

    err = run(tone_engine(), body)
    assert err.code == "invalid_request"
    assert err.param == field


def test_too_large_upload_is_413_with_the_numbers(wav: Path) -> None:
    async def body(client: AsyncOpenAI) -> Any:
        with pytest.raises(openai.APIStatusError) as err:
            await client.audio.transcriptions.create(file=wav, model="whisper-1")
        return err.value

    err = run(tone_engine(max_upload_bytes=10_000), body)
    assert err.status_code == 413
    assert err.code == "upload_too_large"
    assert "10000 bytes" in err.message


class TaskRecordingTones(ToneBackend):
    """The tone backend, recording the task of every batch."""

    def __init__(self, *, multilingual: bool = True) -> None:
        super().__init__()
        self.capabilities = Capabilities(multilingual=multilingual)
        self.tasks: list[str] = []

    def transcribe_batch(
        self, windows: Sequence[Window], options: DecodeOptions
    ) -> list[Hypothesis]:
        self.tasks.append(options.task)
        return super().transcribe_batch(windows, options)


def test_translation_runs_through_the_queue_with_task_translate(wav: Path) -> None:
    backend = TaskRecordingTones()

    async def body(client: AsyncOpenAI) -> Any:
        # The SDK marks its translations call deprecated; servers still answer it.
        with pytest.warns(DeprecationWarning):
            translated = await client.audio.translations.create(
                file=wav, model="whisper-1", response_format="verbose_json"
            )
        transcribed = await client.audio.transcriptions.create(file=wav, model="whisper-1")
        return translated, transcribed

    translated, transcribed = run(tone_engine(backend), body)
    assert translated.task == "translate"
    assert translated.text == transcribed.text != ""
    assert set(backend.tasks) == {"translate", "transcribe"}
    assert backend.tasks[0] == "translate"


def test_translation_with_an_english_only_model_is_refused(wav: Path) -> None:
    backend = TaskRecordingTones(multilingual=False)

    async def body(client: AsyncOpenAI) -> Any:
        with pytest.raises(openai.BadRequestError) as err, pytest.warns(DeprecationWarning):
            await client.audio.translations.create(file=wav, model="whisper-1")
        return err.value

    err = run(tone_engine(backend), body)
    assert err.code == "translation_unavailable"
    assert "only English" in err.message
    assert backend.tasks == []


def test_silence_gives_an_empty_transcript(tmp_path: Path) -> None:
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(SAMPLE_RATE * 2, dtype=np.float32), SAMPLE_RATE)

    async def body(client: AsyncOpenAI) -> Any:
        return await client.audio.transcriptions.create(file=path, model="whisper-1")

    assert run(tone_engine(), body).text == ""


def test_overloaded_queue_is_503(wav: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tone_engine()
    monkeypatch.setattr(engine.scheduler, "is_overloaded", lambda: True)

    async def body(client: AsyncOpenAI) -> Any:
        with pytest.raises(openai.InternalServerError) as err:
            await client.audio.transcriptions.create(file=wav, model="whisper-1")
        return err.value

    err = run(engine, body)
    assert err.status_code == 503
    assert err.code == "server_full"
    assert err.response.headers["retry-after"] == "2"


def test_chunked_upload_over_the_limit_is_413(wav: Path) -> None:
    """Without a Content-Length the limit is enforced while the body streams in."""
    from aiohttp import ClientSession, ClientTimeout, FormData

    async def main() -> tuple[int, dict[str, Any]]:
        async with openai_client(tone_engine(max_upload_bytes=10_000)) as client:
            form = FormData()
            form.add_field("model", "whisper-1")
            form.add_field("file", wav.read_bytes(), filename="speech.wav")
            url = str(client.base_url).rstrip("/") + "/audio/transcriptions"
            async with (
                ClientSession(timeout=ClientTimeout(total=30)) as http,
                http.post(url, data=form, chunked=True) as resp,
            ):
                return resp.status, await resp.json()

    status, body = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert status == 413
    assert body["error"]["code"] == "upload_too_large"
    assert "10000 bytes" in body["error"]["message"]
