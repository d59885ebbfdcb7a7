"""``earshot call``: play a two-channel recording to a server as a phone call.

Channel 0 of the file is the customer, channel 1 the agent (a mono file is a
customer alone). The audio is sent the way a telephone system would send it:
8 kHz G.711 µ-law in 20 ms chunks, in real time unless ``--fast``, over one of
the protocols call-center software speaks:

``deepgram``  one ``/v1/listen`` stream, ``channels=2&multichannel=true``;
``openai``    one OpenAI Realtime transcription session per party
              (``/v1/realtime``, ``audio/pcmu``, server voice detection);
``twilio``    a Twilio Media Streams call on ``/v1/twilio`` (the customer on
              the inbound track, the agent on the outbound one), its
              transcripts read from ``/v1/calls/{callSid}/events``.

Each final is printed as it arrives, ``[customer]`` or ``[agent]`` first.
Exit codes as for ``earshot stream``: 0 the call ended normally, 1 the server
refused it or ended it with an error, 2 bad usage or an unreadable file.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from earshot.clients.audio import encode_audio, fit_audio, read_audio_file
from earshot.clients.stream import channel_of, is_final, transcript_of

PROTOCOLS = ("deepgram", "openai", "twilio")
PARTIES = ("customer", "agent")
"""Who speaks on each channel: 0 the customer (Twilio's inbound track), 1 the agent."""

CALL_RATE = 8000
CHUNK_MS = 20
_CHUNK_BYTES = CALL_RATE * CHUNK_MS // 1000  # µ-law: one byte a sample

DEFAULT_SERVER = "http://127.0.0.1:8000"
EXIT_OK = 0
EXIT_CALL_FAILED = 1
EXIT_USAGE = 2

# How long the end of a call may take: the server's last finals.
_END_TIMEOUT_S = 60.0


FinalHook = Callable[[int, str], None]
"""Called with (channel, text) for each final as it arrives."""


class CallError(Exception):
    """The server refused the call or could not be reached."""


@dataclass
class CallTranscript:
    """What one call produced: each party's finals in order, and the errors."""

    finals: list[tuple[int, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def text(self, channel: int) -> str:
        return " ".join(t for ch, t in self.finals if ch == channel and t).strip()

    def add_final(self, channel: int, text: str, on_final: FinalHook | None) -> None:
        text = text.strip()
        if not text:
            return
        self.finals.append((channel, text))
        if on_final is not None:
            on_final(channel, text)


def ws_base(server: str) -> str:
    """``server`` (http, https, ws or wss; any path dropped) as a ws(s) origin."""
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"--server must be an http(s) or ws(s) URL, not {server!r}")
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def call_audio(samples: npt.NDArray[Any], rate: int) -> list[bytes]:
    """Each party's audio as 8 kHz µ-law (a mono file: the customer alone)."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.shape[1] > 2:
        raise ValueError(
            f"a call has at most two channels (customer, agent), this file has {x.shape[1]}"
        )
    mono = fit_audio(x, rate, CALL_RATE, x.shape[1])
    return [encode_audio(mono[:, ch], "mulaw") for ch in range(mono.shape[1])]


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + _CHUNK_BYTES] for i in range(0, len(data), _CHUNK_BYTES)]


async def _paced(n: int, realtime: bool) -> Any:
    """Yield 0..n-1, one every 20 ms of wall time when ``realtime``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        if realtime:
            delay = start + i * CHUNK_MS / 1000.0 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        elif i % 50 == 0:
            await asyncio.sleep(0)
        yield i


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _open(url: str, api_key: str | None) -> ClientConnection:
    try:
        return await connect(url, additional_headers=_headers(api_key), max_size=2**22)
    except InvalidStatus as exc:
        body = exc.response.body.decode("utf-8", "replace") if exc.response.body else ""
        raise CallError(
            f"the server refused {url}: HTTP {exc.response.status_code} {body}"
        ) from None
    except (OSError, WebSocketException, asyncio.TimeoutError) as exc:
        raise CallError(f"cannot connect to {url}: {exc}") from None


def _error_text(message: Mapping[str, Any]) -> str:
    inner = message.get("error")
    if isinstance(inner, Mapping):  # OpenAI's shape
        return f"[{inner.get('code') or inner.get('type')}] {inner.get('message', '')}"
    code = message.get("code") or message.get("variant") or "error"
    return f"[{code}] {message.get('message') or message.get('description') or ''}"


# -- Deepgram -------------------------------------------------------------------


async def call_deepgram(
    server: str,
    parties: list[bytes],
    *,
    api_key: str | None = None,
    realtime: bool = True,
    on_final: FinalHook | None = None,
) -> CallTranscript:
    """One ``/v1/listen`` stream with a channel per party."""
    result = CallTranscript()
    n = len(parties)
    query = f"encoding=mulaw&sample_rate={CALL_RATE}&channels={n}&multichannel=true"
    ws = await _open(f"{ws_base(server)}/v1/listen?{query}&interim_results=false", api_key)
    frames = np.stack([np.frombuffer(p, dtype=np.uint8) for p in _equal(parties)], axis=1)
    interleaved = frames.tobytes()
    step = _CHUNK_BYTES * n

    async def send() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for i in _paced((len(interleaved) + step - 1) // step, realtime):
                await ws.send(interleaved[i * step : (i + 1) * step])
            await ws.send(json.dumps({"type": "CloseStream"}))

    sender = asyncio.create_task(send())
    try:
        async for raw in ws:
            message = json.loads(raw)
            if is_final(message):
                result.add_final(channel_of(message), transcript_of(message), on_final)
            elif message.get("type") == "Error":
                result.errors.append(_error_text(message))
    except ConnectionClosed:
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    _check_close(ws, result)
    return result


def _equal(parties: list[bytes]) -> list[bytes]:
    longest = max(len(p) for p in parties)
    return [p + b"\xff" * (longest - len(p)) for p in parties]  # 0xFF: µ-law silence


def _check_close(ws: ClientConnection, result: CallTranscript) -> None:
    code = ws.close_code
    if code not in (1000, None) and not result.errors:
        reason = ws.close_reason or ""
        result.errors.append(f"the server closed the stream with code {code} {reason}".strip())


# -- OpenAI Realtime ------------------------------------------------------------


async def _realtime_party(
    server: str,
    channel: int,
    audio: bytes,
    *,
    api_key: str | None,
    realtime: bool,
    result: CallTranscript,
    on_final: FinalHook | None,
) -> None:
    url = f"{ws_base(server)}/v1/realtime?intent=transcription"
    ws = await _open(url, api_key)
    session = {
        "type": "transcription",
        "audio": {
            "input": {
                "format": {"type": "audio/pcmu"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
            }
        },
    }
    committed: set[str] = set()
    completed: set[str] = set()
    stopped: set[str] = set()  # items the server's voice detection ended
    sent_all = asyncio.Event()
    end_commit_answered = asyncio.Event()

    async def send() -> None:
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        async for i in _paced(len(_chunks(audio)), realtime):
            chunk = audio[i * _CHUNK_BYTES : (i + 1) * _CHUNK_BYTES]
            event = {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}
            await ws.send(json.dumps(event))
        sent_all.set()  # before the commit: its answer may come at once
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "end_of_call"}))

    async def receive() -> None:
        async for raw in ws:
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "input_audio_buffer.speech_stopped":
                stopped.add(str(message.get("item_id")))
            elif kind == "input_audio_buffer.committed":
                item = str(message.get("item_id"))
                committed.add(item)
                if sent_all.is_set() and item not in stopped:
                    # Not ended by voice detection: the answer to our last commit.
                    end_commit_answered.set()
            elif kind == "conversation.item.input_audio_transcription.completed":
                completed.add(str(message.get("item_id")))
                result.add_final(channel, str(message.get("transcript", "")), on_final)
            elif kind == "error":
                inner = message.get("error") or {}
                if sent_all.is_set() and inner.get("event_id") == "end_of_call":
                    end_commit_answered.set()  # nothing left uncommitted
                else:
                    result.errors.append(f"{PARTIES[channel]}: {_error_text(message)}")
            if end_commit_answered.is_set() and committed <= completed:
                return

    sender = asyncio.create_task(send())
    try:
        await asyncio.wait_for(receive(), timeout=len(audio) / CALL_RATE + _END_TIMEOUT_S)
    except ConnectionClosed:
        pass
    except asyncio.TimeoutError:
        result.errors.append(f"{PARTIES[channel]}: the last transcripts did not arrive in time")
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await sender
        await ws.close()


async def call_openai(
    server: str,
    parties: list[bytes],
    *,
    api_key: str | None = None,
    realtime: bool = True,
    on_final: FinalHook | None = None,
) -> CallTranscript:
    """One OpenAI Realtime transcription session per party, side by side."""
    result = CallTranscript()
    await asyncio.gather(
        *(
            _realtime_party(
                server,
                ch,
                audio,
                api_key=api_key,
                realtime=realtime,
                result=result,
                on_final=on_final,
            )
            for ch, audio in enumerate(parties)
        )
    )
    return result


# -- Twilio Media Streams -------------------------------------------------------


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def twilio_messages(
    parties: list[bytes], *, call_sid: str, stream_sid: str, token: str | None = None
) -> list[dict[str, Any]]:
    """The messages Twilio would send for this call, in order (without pacing):
    ``connected``, ``start``, a ``media`` per track every 20 ms, ``stop``."""
    tracks = ["inbound", "outbound"][: len(parties)]
    account = _sid("AC")
    start: dict[str, Any] = {
        "accountSid": account,
        "streamSid": stream_sid,
        "callSid": call_sid,
        "tracks": tracks,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": CALL_RATE, "channels": 1},
        "customParameters": {"token": token} if token else {},
    }
    out: list[dict[str, Any]] = [
        {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        {"event": "start", "sequenceNumber": "1", "start": start, "streamSid": stream_sid},
    ]
    chunks = [_chunks(p) for p in _equal(parties)]
    seq = 2
    for i in range(len(chunks[0])):
        for track, track_chunks in zip(tracks, chunks, strict=True):
            out.append(
                {
                    "event": "media",
                    "sequenceNumber": str(seq),
                    "media": {
                        "track": track,
                        "chunk": str(i + 1),
                        "timestamp": str(i * CHUNK_MS),
                        "payload": base64.b64encode(track_chunks[i]).decode(),
                    },
                    "streamSid": stream_sid,
                }
            )
            seq += 1
    out.append(
        {
            "event": "stop",
            "sequenceNumber": str(seq),
            "stop": {"accountSid": account, "callSid": call_sid},
            "streamSid": stream_sid,
        }
    )
    return out


async def call_twilio(
    server: str,
    parties: list[bytes],
    *,
    api_key: str | None = None,
    realtime: bool = True,
    on_final: FinalHook | None = None,
) -> CallTranscript:
    """Play the call as Twilio would and read its transcripts as a subscriber."""
    result = CallTranscript()
    base = ws_base(server)
    call_sid, stream_sid = _sid("CA"), _sid("MZ")
    # Subscribe first, as a dashboard would: the call's first words are not missed.
    subscriber = await _open(f"{base}/v1/calls/{call_sid}/events", api_key)
    twilio = await _open(f"{base}/v1/twilio", None)
    messages = twilio_messages(parties, call_sid=call_sid, stream_sid=stream_sid, token=api_key)
    per_tick = len(parties)

    async def play() -> None:
        with contextlib.suppress(ConnectionClosed):
            for m in messages[:2]:
                await twilio.send(json.dumps(m))
            media = messages[2:-1]
            async for i in _paced(len(media) // per_tick, realtime):
                for m in media[i * per_tick : (i + 1) * per_tick]:
                    await twilio.send(json.dumps(m))
            await twilio.send(json.dumps(messages[-1]))

    async def twilio_errors() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in twilio:
                message = json.loads(raw)
                if message.get("type") == "Error" or message.get("event") == "error":
                    result.errors.append(f"twilio stream: {_error_text(message)}")

    async def subscribe() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in subscriber:
                message = json.loads(raw)
                if is_final(message):
                    result.add_final(channel_of(message), transcript_of(message), on_final)
                elif message.get("type") == "CallEnded":
                    return
                elif message.get("type") == "Error":
                    result.errors.append(_error_text(message))

    player = asyncio.create_task(play())
    reader = asyncio.create_task(twilio_errors())
    try:
        duration = len(parties[0]) / CALL_RATE
        await asyncio.wait_for(subscribe(), timeout=duration + _END_TIMEOUT_S)
    except asyncio.TimeoutError:
        result.errors.append("the call's last transcripts did not arrive in time")
    finally:
        for task in (player, reader):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await twilio.close()
        await subscriber.close()
    return result


CALLERS = {"deepgram": call_deepgram, "openai": call_openai, "twilio": call_twilio}


# -- the command ----------------------------------------------------------------


def add_call_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register ``earshot call`` (with ``func=cmd_call``) and return its parser."""
    p = subparsers.add_parser(
        "call",
        help="play a two-channel recording to a server as a phone call",
        description=(
            "Play FILE (channel 0 the customer, channel 1 the agent) to an Earshot "
            "server as a phone call: 8 kHz µ-law in 20 ms chunks over the Deepgram, "
            "OpenAI Realtime or Twilio Media Streams protocol, and print each party's "
            "final transcripts as they arrive."
        ),
    )
    p.add_argument("file", metavar="FILE", help="audio file with one or two channels")
    p.add_argument("--protocol", choices=PROTOCOLS, default="twilio", help="default: twilio")
    p.add_argument(
        "--server",
        default=os.environ.get("EARSHOT_SERVER", DEFAULT_SERVER),
        help=f"the server (default: $EARSHOT_SERVER or {DEFAULT_SERVER})",
    )
    p.add_argument("--fast", action="store_true", help="send as fast as possible, not real time")
    p.add_argument(
        "--api-key",
        default=os.environ.get("EARSHOT_API_KEY"),
        help="the server's API key (default: $EARSHOT_API_KEY); on Twilio, sent as the "
        "start message's token parameter",
    )
    p.set_defaults(func=cmd_call)
    return p


def cmd_call(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``earshot call``; returns the exit code."""
    out = out or sys.stdout
    err = sys.stderr
    try:
        samples, rate = read_audio_file(args.file)
        parties = call_audio(samples, rate)
        ws_base(args.server)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"earshot: error: {exc}", file=err)
        return EXIT_USAGE
    started = time.monotonic()

    def show(channel: int, text: str) -> None:
        print(
            f"[{PARTIES[channel]} {time.monotonic() - started:6.1f} s] {text}", file=out, flush=True
        )

    caller = CALLERS[args.protocol]
    try:
        result = asyncio.run(
            caller(
                args.server,
                parties,
                api_key=args.api_key or None,
                realtime=not args.fast,
                on_final=show,
            )
        )
    except CallError as exc:
        print(f"earshot: error: {exc}", file=err)
        return EXIT_CALL_FAILED
    for line in result.errors:
        print(f"earshot: error: {line}", file=err)
    return EXIT_CALL_FAILED if result.errors else EXIT_OK
