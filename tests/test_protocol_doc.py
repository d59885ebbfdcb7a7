"""docs/protocol.md against the code, so that the protocol document cannot drift silently.

Every ```json block must parse and be marked with who sends it; the message
examples must have the shape the serialisers in core/protocol.py produce;
and the tables of query parameters, error codes, warning codes and close
codes must list exactly what service/ defines, with the same numbers.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import earshot.core.audio as audio_mod
import earshot.core.errors as errors_mod
import earshot.core.protocol as protocol_mod
import earshot.core.realtime as realtime_mod
import earshot.core.session as session_mod
import earshot.core.twilio as twilio_mod
import earshot.service.engine.scheduler as scheduler_mod
import earshot.service.http.listen as server_mod
import earshot.service.http.livestream as livestream_mod
import earshot.service.http.realtime as realtime_server_mod
import earshot.service.http.twilio as twilio_server_mod
from earshot.core.audio import (
    ENCODINGS,
    MAX_CHANNELS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioFormat,
)
from earshot.core.errors import EarshotError
from earshot.core.protocol import (
    CONTROL_TYPES,
    DEFAULT_ENDPOINTING_MS,
    IGNORED_PARAMETERS,
    KNOWN_PARAMETERS,
    MAX_ENDPOINTING_MS,
    MIN_ENDPOINTING_MS,
    PROTOCOL_VERSION,
    UNSUPPORTED_PARAMETERS,
    SpeechStartedEvent,
    TranscriptEvent,
    UtteranceEndEvent,
    WarningEvent,
    Word,
    configure_failure,
    error_message,
    event_message,
    metadata_message,
    parse_control,
    parse_params,
)
from earshot.models.silero import shared_model
from earshot.service.config import load_config
from earshot.service.engine.engine import Engine
from tests.kit.tones import ToneBackend

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
ERROR_MODULES: tuple[ModuleType, ...] = (
    errors_mod,
    audio_mod,
    protocol_mod,
    session_mod,
    server_mod,
    livestream_mod,
    scheduler_mod,
    realtime_mod,
    realtime_server_mod,
    twilio_mod,
    twilio_server_mod,
)

_FENCE = re.compile(r"^```json[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARKER = re.compile(
    r"<!--\s*example:\s*((?:(?:realtime|twilio)\s+)?client|(?:(?:realtime|twilio)\s+)?server"
    r"|http\s+(\d{3}))\s*-->"
)


@dataclass(frozen=True)
class Example:
    line: int
    direction: str  # client, server, http, realtime- or twilio-client or -server
    status: int | None
    data: Any


@cache
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


@cache
def examples() -> tuple[Example, ...]:
    text = doc_text()
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        try:
            data = json.loads(match.group(1))
        except ValueError as exc:
            raise AssertionError(f"docs/protocol.md line {line}: invalid JSON: {exc}") from None
        before = text[: match.start()].rstrip().splitlines()
        marker = _MARKER.fullmatch(before[-1].strip()) if before else None
        assert marker, f"docs/protocol.md line {line}: no <!-- example: ... --> marker"
        words = marker.group(1).split()
        direction = "-".join(words) if words[0] in ("realtime", "twilio") else words[0]
        status = int(marker.group(2)) if marker.group(2) else None
        found.append(Example(line, direction, status, data))
    return tuple(found)


def section(title: str) -> str:
    """The text of the section whose heading is ``title`` (up to the next heading
    of the same or a higher level)."""
    text = doc_text()
    match = re.search(rf"^(#+) {re.escape(title)}[ \t]*$", text, re.MULTILINE)
    assert match, f"docs/protocol.md has no section {title!r}"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def table(title: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table in a section, header excluded."""
    rows: list[list[str]] = []
    for line in section(title).splitlines():
        if line.strip().startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break  # the first table only
    assert len(rows) > 2, f"no table in section {title!r}"
    return rows[2:]  # header and separator


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# -- what the code defines ------------------------------------------------------


def error_classes() -> dict[str, type[EarshotError]]:
    """Every EarshotError subclass defined in the protocol's modules, by code."""
    names = {m.__name__ for m in ERROR_MODULES}
    out: dict[str, type[EarshotError]] = {}
    pending: list[type[EarshotError]] = [EarshotError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__ in names and "code" in vars(cls):
            assert out.get(cls.code, cls) is cls, f"code {cls.code!r} is defined twice"
            out[cls.code] = cls
    return out


def warning_codes() -> set[str]:
    """The codes of every WarningEvent the session and server create."""
    codes: set[str] = set()
    for module in (session_mod, server_mod, livestream_mod, scheduler_mod, twilio_server_mod):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "WarningEvent"
            ):
                first = node.args[0] if node.args else None
                for kw in node.keywords:
                    if kw.arg == "code":
                        first = kw.value
                assert isinstance(first, ast.Constant), "WarningEvent codes must be literals"
                codes.add(str(first.value))
    return codes


def close_constants() -> dict[int, str]:
    return {
        value: name
        for name, value in vars(errors_mod).items()
        if name.startswith("CLOSE_") and isinstance(value, int)
    }


def sample_messages() -> dict[str, dict[str, Any]]:
    """One message of every type, made by the code's own serialisers."""
    params = parse_params([("interim_results", "true")])
    word = Word("hi", 0.1, 0.3, 0.9, "Hi.")
    # The server adds each final's provenance (LiveStream._emit).
    engine = Engine.create(load_config(env={}), ToneBackend(), vad_model=shared_model())
    final_extra = {"kind": "final", "provenance": engine.result_provenance({})}
    results = event_message(
        TranscriptEvent(
            0, 1, 0.0, 0.5, "Hi.", 0.9, (word,), True, True, language="en", extra=final_extra
        ),
        "req",
        "base",
    )
    interim = event_message(
        TranscriptEvent(
            0,
            1,
            0.0,
            0.5,
            "Hi.",
            0.9,
            (word,),
            False,
            False,
            language="en",
            extra={"kind": "interim"},
        ),
        "req",
        "base",
    )
    return {
        "Metadata": metadata_message(
            request_id="req",
            created="2026-01-01T00:00:00.000+00:00",
            params=params,
            provenance={"name": "base"},
            policy={},
            decoding={},
        ),
        "Results": results,
        "Results-interim": interim,
        "SpeechStarted": event_message(SpeechStartedEvent(0, 1, 0.1), "req", "base"),
        "UtteranceEnd": event_message(UtteranceEndEvent(0, 1, 0.3), "req", "base"),
        "Warning": event_message(WarningEvent("lagging", "behind"), "req", "base"),
        "Error": error_message(EarshotError("boom")),
        "ConfigureFailure": configure_failure("req"),
    }


def shape(value: Any) -> Any:
    """The structure of a JSON value: dict keys (recursively) and list element shapes."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value and isinstance(value[0], (dict, list)) else []
    return None


# -- the examples ---------------------------------------------------------------


def test_every_json_block_parses_and_is_marked() -> None:
    found = examples()
    assert len(found) >= 10
    assert {e.direction for e in found} == {
        "client",
        "server",
        "http",
        "realtime-client",
        "realtime-server",
        "twilio-client",
        "twilio-server",
    }
    assert len(_FENCE.findall(doc_text())) == len(found)
    # No other fenced block claims to be JSON under another spelling.
    assert not re.search(r"^```(JSON|js|javascript)\s*$", doc_text(), re.MULTILINE)


def test_protocol_version() -> None:
    assert f"**protocol version {PROTOCOL_VERSION}**" in doc_text()
    assert f'`PROTOCOL_VERSION = "{PROTOCOL_VERSION}"`' in doc_text()
    for e in examples():
        if e.direction == "server" and e.data["type"] == "Metadata":
            assert e.data["earshot"]["protocol_version"] == PROTOCOL_VERSION
            for info in e.data["model_info"].values():
                assert info["version"] == PROTOCOL_VERSION
        if e.direction == "server" and e.data["type"] == "Results":
            assert e.data["metadata"]["model_info"]["version"] == PROTOCOL_VERSION


def test_client_examples_are_control_messages() -> None:
    kinds = [parse_control(json.dumps(e.data)) for e in examples() if e.direction == "client"]
    assert sorted(kinds) == sorted(CONTROL_TYPES)
    for kind in CONTROL_TYPES:
        assert f"`{kind}`" in section("Control messages (client to server)")


def test_server_message_types_are_documented() -> None:
    types = {name.split("-")[0] for name in sample_messages()}
    headings = set(re.findall(r"^### (\w+)\s*$", section("Server messages"), re.MULTILINE))
    assert headings == types
    shown = {e.data["type"] for e in examples() if e.direction == "server"}
    assert shown == types


@pytest.mark.parametrize("kind", ["Results", "SpeechStarted", "UtteranceEnd"])
def test_event_examples_have_the_serialised_shape(kind: str) -> None:
    samples = sample_messages()
    docs = [e for e in examples() if e.direction == "server" and e.data["type"] == kind]
    assert docs
    for e in docs:
        name = kind if e.data.get("is_final", True) else f"{kind}-interim"
        assert shape(e.data) == shape(samples[name]), f"docs/protocol.md line {e.line}"


def test_results_examples_are_consistent() -> None:
    for e in examples():
        if e.direction != "server" or e.data["type"] != "Results":
            continue
        m = e.data
        alternative = m["channel"]["alternatives"][0]
        assert m["speech_final"] <= m["is_final"]
        assert m["earshot"]["kind"] == ("final" if m["is_final"] else "interim")
        assert 0 <= m["channel_index"][0] < m["channel_index"][1]
        words = alternative["words"]
        assert [w["punctuated_word"] for w in words] == alternative["transcript"].split()
        for w in words:
            assert m["start"] <= w["start"] <= w["end"] <= m["start"] + m["duration"] + 1e-6
        if m["is_final"]:
            assert m["earshot"]["stable_words"] == len(words)


def test_metadata_examples_have_the_serialised_shape() -> None:
    expected = sample_messages()["Metadata"]
    docs = [e for e in examples() if e.direction == "server" and e.data["type"] == "Metadata"]
    assert len(docs) >= 2
    for i, e in enumerate(docs):
        assert set(e.data) == set(expected), f"line {e.line}"
        # Only the last Metadata of a stream counts decodes per backend.
        extra = {"backends_used"} if i > 0 else set()
        assert set(e.data["earshot"]) == set(expected["earshot"]) | extra, f"line {e.line}"
        settings = e.data["earshot"]["settings"]
        assert set(settings) == set(expected["earshot"]["settings"]), f"line {e.line}"
        assert settings["encoding"] in ENCODINGS
        assert e.data["channels"] == settings["channels"]
        assert set(e.data["earshot"]["ignored_parameters"]) <= IGNORED_PARAMETERS
    assert docs[0].data["duration"] == 0.0  # the first one is sent at the start


def test_warning_and_error_examples_use_defined_codes() -> None:
    errors = error_classes()
    for e in examples():
        if e.direction in ("client", "twilio-client"):
            continue
        kind = e.data["type"]
        if kind == "Warning":
            assert e.data["code"] in warning_codes(), f"line {e.line}"
        if kind in ("Warning", "Error"):
            assert isinstance(e.data["message"], str) and e.data["message"]
        if kind == "Error":
            assert e.data["code"] in errors, f"line {e.line}: unknown code {e.data['code']!r}"
        if e.direction == "http":
            assert kind == "Error"
            assert errors[e.data["code"]].http_status == e.status, f"line {e.line}"


def test_http_error_examples_match_the_real_errors() -> None:
    # The 400 examples are exactly what parse_params answers for that input.
    for e in examples():
        if e.direction != "http" or e.status != 400:
            continue
        field = e.data["field"]
        value = e.data.get("value", "1")
        with pytest.raises(EarshotError) as info:
            parse_params([(field, value)])
        assert error_message(info.value) == e.data, f"line {e.line}"


def test_invalid_message_example_matches_parse_control() -> None:
    (doc,) = [
        e.data
        for e in examples()
        if e.direction == "server" and e.data.get("code") == "invalid_message"
    ]
    with pytest.raises(EarshotError) as info:
        parse_control("not json")
    assert error_message(info.value) == doc


# -- the tables -----------------------------------------------------------------


def test_query_parameter_table() -> None:
    rows = {ticked(row[0])[0]: row for row in table("Query parameters")}
    assert set(rows) == set(KNOWN_PARAMETERS)
    encoding = " ".join(rows["encoding"])
    for name in [*ENCODINGS, "float", "float32"]:
        assert f"`{name}`" in encoding
        AudioFormat.parse(name, 16000, 1)
    assert f"{MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}" in rows["sample_rate"][3]
    assert f"1 to {MAX_CHANNELS}" in rows["channels"][3]
    assert rows["endpointing"][2] == f"`{DEFAULT_ENDPOINTING_MS}`"
    assert f"0 to {MAX_ENDPOINTING_MS}" in rows["endpointing"][3]
    raised = f"under {MIN_ENDPOINTING_MS} are raised to {MIN_ENDPOINTING_MS}"
    assert raised in rows["endpointing"][3]
    max_keyterms = inspect.signature(parse_params).parameters["max_keyterms"].default
    assert f"up to {max_keyterms}" in rows["keyterm"][3]


def test_query_parameter_defaults_and_ranges_behave_as_documented() -> None:
    p = parse_params([])
    assert (p.audio.encoding, p.audio.sample_rate, p.audio.channels) == ("linear16", 16000, 1)
    assert not p.multichannel and not p.interim_results and not p.vad_events
    assert p.endpointing_ms == DEFAULT_ENDPOINTING_MS and p.utterance_end_ms is None
    assert p.words and p.keyterms == () and p.model is None
    assert parse_params([("endpointing", "10")]).endpointing_ms == MIN_ENDPOINTING_MS
    assert parse_params([("endpointing", "false")]).endpointing_ms is None
    assert parse_params([("endpointing", "off")]).endpointing_ms is None
    assert parse_params([("language", "en-US")]).language == "en"
    for raw in ("auto", "multi", ""):
        assert parse_params([("language", raw)]).language is None
    rows = {ticked(row[0])[0]: row for row in table("Query parameters")}
    low, high = (int(n) for n in re.findall(r"\d+", rows["utterance_end_ms"][3])[:2])
    assert parse_params([("utterance_end_ms", str(low))]).utterance_end_ms == low
    assert parse_params([("utterance_end_ms", str(high))]).utterance_end_ms == high
    for bad in (low - 1, high + 1):
        with pytest.raises(EarshotError):
            parse_params([("utterance_end_ms", str(bad))])
    with pytest.raises(EarshotError):
        parse_params([("endpointing", str(MAX_ENDPOINTING_MS + 1))])
    for value in ("true", "1", "yes", "on", "TRUE"):
        assert parse_params([("vad_events", value)]).vad_events
    for value in ("false", "0", "no", "off"):
        assert not parse_params([("interim_results", value)]).interim_results
    assert parse_params([("keyterm", "a"), ("keyterm", "b")]).keyterms == ("a", "b")
    with pytest.raises(EarshotError) as info:
        parse_params([("language", "en"), ("language", "de")])
    assert info.value.code == "invalid_parameter"


def test_ignored_and_unknown_parameters() -> None:
    listed = set(ticked(section("Accepted and ignored").split(":", 1)[1].strip().split("\n\n")[0]))
    assert listed == set(IGNORED_PARAMETERS)
    p = parse_params([(name, "x") for name in sorted(listed)])
    assert set(p.ignored) == listed


def test_parameters_whose_effect_is_not_implemented_are_refused() -> None:
    rows = table("Refused: effects Earshot does not implement")
    documented = {name for row in rows for name in ticked(row[0])}
    assert documented == set(UNSUPPORTED_PARAMETERS)
    for name in sorted(documented):
        with pytest.raises(EarshotError) as info:
            parse_params([(name, "pci" if name == "redact" else "2")])
        assert info.value.code == "unsupported_parameter"
        assert info.value.details["field"] == name and name in info.value.message
        # Asking for nothing is accepted, and listed as ignored.
        value = "1" if name == "alternatives" else "false"
        assert parse_params([(name, value)]).ignored == (name,)
    assert "`unsupported_parameter`" in section("Refused: effects Earshot does not implement")


def test_deepgram_spellings_of_language_detection_and_keywords() -> None:
    assert parse_params([("detect_language", "true")]).language is None
    assert parse_params([("detect_language", "false")]).language == "en"
    assert parse_params([("detect_language", "true"), ("language", "auto")]).language is None
    with pytest.raises(EarshotError) as info:
        parse_params([("detect_language", "true"), ("language", "de")])
    assert info.value.code == "invalid_parameter"
    assert parse_params([("keywords", "Earshot:2"), ("keyterm", "Twilio")]).keyterms == (
        "Earshot",
        "Twilio",
    )
    with pytest.raises(EarshotError) as info:
        parse_params([("no_such_parameter", "1")])
    assert info.value.code == "unknown_parameter"
    assert "`unknown_parameter`" in section("Anything else")


def test_encoding_table() -> None:
    rows = {ticked(row[0])[0]: int(row[1]) for row in table("Audio: binary frames")}
    assert rows == ENCODINGS


def test_error_code_table_matches_the_error_classes() -> None:
    classes = error_classes()
    rows = table("Error codes")
    documented = [ticked(row[0])[0] for row in rows]
    assert len(documented) == len(set(documented)), "a code is listed twice"
    assert set(documented) == set(classes)
    for row in rows:
        cls = classes[ticked(row[0])[0]]
        assert int(row[1]) == cls.http_status, f"{cls.code}: HTTP status"
        assert int(row[2]) == cls.ws_close_code, f"{cls.code}: close code"
        assert row[3], f"{cls.code}: no explanation"


def test_refusal_table_matches_the_error_classes() -> None:
    classes = error_classes()
    for row in table("Refusals before the upgrade"):
        for code in ticked(row[2]):
            assert classes[code].http_status == int(row[0]), code


def test_warning_code_table() -> None:
    documented = {ticked(row[0])[0] for row in table("Warning codes")}
    assert documented == warning_codes()


def test_close_code_table() -> None:
    constants = close_constants()
    rows = table("Close codes")
    documented = {int(row[0]): ticked(row[1])[0] for row in rows}
    assert documented == constants
    used = {cls.ws_close_code for cls in error_classes().values()}
    assert used <= set(documented), f"close codes used but not documented: {used - set(documented)}"
    # Every error's close code is named in the close-code row of that code.
    for cls in error_classes().values():
        if cls.ws_close_code not in (1011, 4400):  # those rows describe whole families
            row = next(r for r in rows if int(r[0]) == cls.ws_close_code)
            assert f"`{cls.code}`" in row[2], f"{cls.code} not named for {cls.ws_close_code}"


# -- OpenAI Realtime --------------------------------------------------------------

REALTIME_SERVER_EVENTS = {
    "session.created",
    "session.updated",
    "transcription_session.created",
    "transcription_session.updated",
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    "input_audio_buffer.cleared",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.completed",
    "error",
}


def test_realtime_examples() -> None:
    """The client examples are events the server reads (and settings it takes);
    the server examples are events it sends, with defined error codes."""
    text = section("OpenAI Realtime (`/v1/realtime`)")
    client = [e for e in examples() if e.direction == "realtime-client"]
    server = [e for e in examples() if e.direction == "realtime-server"]
    assert client and server
    config = realtime_mod.default_config("base", threshold=0.5, prefix_padding_ms=200)
    for e in client:
        ev = realtime_mod.parse_client_event(json.dumps(e.data))
        if ev.session is not None:
            beta = ev.type == "transcription_session.update"
            config = realtime_mod.apply_update(config, ev.session, beta_event=beta)
    shown = {e.data["type"] for e in client}
    assert shown == set(realtime_mod.SUPPORTED_EVENTS)
    for kind in (*realtime_mod.SUPPORTED_EVENTS, *realtime_mod.UNSUPPORTED_EVENTS):
        assert f"`{kind}`" in text, kind
    for e in server:
        assert e.data["type"] in REALTIME_SERVER_EVENTS, f"line {e.line}"
        assert isinstance(e.data["event_id"], str)
        if e.data["type"] == "error":
            assert set(e.data["error"]) == {"type", "code", "message", "param", "event_id"}
            assert e.data["error"]["code"] in error_classes(), f"line {e.line}"
    assert {e.data["type"] for e in server} >= REALTIME_SERVER_EVENTS - {
        "transcription_session.created",
        "transcription_session.updated",
    }


TWILIO_SERVER_MESSAGES = frozenset({"CallStarted", "CallEnded", "Results", "Warning", "Error"})


def test_twilio_examples() -> None:
    """The Twilio client examples are messages the server reads; the server
    examples are what the subscriber endpoint sends, in the serialisers' shapes."""
    text = section("Twilio Media Streams (`/v1/twilio`)")
    client = [e for e in examples() if e.direction == "twilio-client"]
    server = [e for e in examples() if e.direction == "twilio-server"]
    read = [twilio_mod.parse_message(json.dumps(e.data)) for e in client]
    assert {type(m).__name__ for m in read} == {
        "Connected", "Start", "Media", "Mark", "Dtmf", "Stop"
    }  # fmt: skip
    for event in twilio_mod.KNOWN_EVENTS:
        assert f"`{event}`" in text, event
    shown = {e.data["type"] for e in server}
    assert shown == TWILIO_SERVER_MESSAGES
    results = shape(sample_messages()["Results"])
    for e in server:
        kind = e.data["type"]
        if kind == "Results":
            data = json.loads(json.dumps(e.data))  # examples() is cached: not in place
            assert data["earshot"].pop("track") in twilio_mod.TRACKS
            assert shape(data) == results, f"line {e.line}"
        if kind in ("Warning", "Error"):
            codes = warning_codes() if kind == "Warning" else set(error_classes())
            assert e.data["code"] in codes, f"line {e.line}"
        if kind == "CallStarted":
            assert set(e.data) == {
                "type", "call_sid", "stream_sid", "tracks", "custom_parameters", "earshot"
            }  # fmt: skip
            assert e.data["custom_parameters"] == twilio_mod.public_parameters(
                e.data["custom_parameters"]
            )
        if kind == "CallEnded":
            assert set(e.data) == {"type", "call_sid", "reason"}
