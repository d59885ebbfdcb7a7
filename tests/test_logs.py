"""Structured logs: JSON lines with the session id, and no transcript text
unless the operator turns ``log_transcripts`` on."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from earshot.clients.audio import encode_audio
from earshot.service.logs import JsonFormatter, TextFormatter, configure_logging
from tests.kit.live import final_texts, raw_stream, running_server, tone_engine
from tests.kit.tones import make_speech

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every record of the ``earshot`` loggers, as JSON lines, at debug level."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("earshot")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def stream_once(log_transcripts: bool) -> tuple[list[dict[str, Any]], str]:
    engine = tone_engine(log_transcripts=log_transcripts)
    audio, _ = make_speech([["november", "oscar"], ["papa"]], 16000)

    async def main() -> tuple[list[dict[str, Any]], int | None]:
        async with running_server(engine) as url:
            ws = url.replace("http://", "ws://") + "/v1/listen"
            return await raw_stream(ws, [encode_audio(audio, "linear16"), '{"type":"CloseStream"}'])

    messages, code = asyncio.run(asyncio.wait_for(main(), 60))
    assert code == 1000 and final_texts(messages) == ["november oscar", "papa"]
    return messages, messages[0]["request_id"]


def records(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_stream_lines_carry_the_session_and_never_the_words(captured: io.StringIO) -> None:
    _, session = stream_once(log_transcripts=False)
    lines = records(captured)
    by_message = {line["message"]: line for line in lines}
    opened, closed = by_message["stream opened"], by_message["stream closed"]
    assert opened["session"] == closed["session"] == session
    assert (opened["encoding"], opened["sample_rate"], opened["channels"]) == ("linear16", 16000, 1)
    assert opened["peer"] == "127.0.0.1"
    assert closed["close_code"] == 1000 and closed["finals"] == 2
    assert closed["audio_s"] > 1.0
    finals = [line for line in lines if line["message"] == "final"]
    assert [f["transcript_chars"] for f in finals] == [len("november oscar"), len("papa")]
    assert all(f["session"] == session for f in finals)
    text = captured.getvalue()
    for word in ("november", "oscar", "papa"):
        assert word not in text
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= set(line)


def test_transcripts_are_logged_only_when_turned_on(captured: io.StringIO) -> None:
    _, session = stream_once(log_transcripts=True)
    finals = [line for line in records(captured) if line["message"] == "final"]
    assert [f["transcript"] for f in finals] == ["november oscar", "papa"]
    assert all(f["session"] == session for f in finals)


def test_formatters() -> None:
    record = logging.LogRecord("earshot.x", logging.WARNING, "f.py", 1, "a %s", ("b",), None)
    record.session = "s-1"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "a b" and entry["session"] == "s-1"
    assert entry["level"] == "warning" and entry["logger"] == "earshot.x"
    assert entry["ts"].endswith("+00:00")
    line = TextFormatter().format(record)
    assert "WARNING earshot.x a b session=s-1" in line
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exc"]


def test_configure_logging_replaces_the_root_handlers() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    out = io.StringIO()
    try:
        configure_logging("warning", "json", stream=out)
        logging.getLogger("earshot.test").info("hidden")
        logging.getLogger("earshot.test").warning("shown", extra={"code": "x"})
        [line] = out.getvalue().splitlines()
        assert json.loads(line)["code"] == "x"
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
