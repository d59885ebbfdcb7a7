"""Twilio Media Streams at /v1/twilio end to end: a real server on 127.0.0.1,
a simulated Twilio client playing a two-track µ-law call in the tone language
(different words on each track), subscribers at /v1/calls/{callSid}/events,
webhooks on loopback and the egress guard in on-prem-only mode."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, WSServerHandshakeError, web

from earshot.core.errors import EgressRefusedError
from earshot.service.config import load_config
from earshot.service.engine.startup import check_sovereignty
from earshot.service.http.twilio import CALLS, CallHub, webhook_refusal
from earshot.service.sovereignty import build_guard, guarded
from tests.kit.live import running_server, tone_engine
from tests.kit.tones import make_speech
from tests.kit.twilio import Followed, TwilioCall, mulaw_tracks, play, read_all

pytestmark = pytest.mark.timeout(120)

INBOUND = [["alpha", "bravo", "charlie"], ["delta", "echo"]]
OUTBOUND = [["mike", "november"], ["oscar", "papa"]]


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout=100))


def texts(script: list[list[str]]) -> list[str]:
    return [" ".join(u) for u in script]


def two_track_call(*, tail_s: float = 1.0, **kwargs: Any) -> TwilioCall:
    """About 4 s: the customer (inbound) and the agent (outbound) say different
    words, partly at the same time. ``tail_s`` is the silence after the
    inbound track's last word (the call's end)."""
    inbound, _ = make_speech(INBOUND, 8000, lead_s=0.3, gap_s=0.9, tail_s=tail_s)
    outbound, _ = make_speech(OUTBOUND, 8000, lead_s=0.8, gap_s=0.9, tail_s=0.2)
    a, b = mulaw_tracks(inbound, outbound)
    return TwilioCall({"inbound": a, "outbound": b}, **kwargs)


class Server:
    def __init__(self, url: str, app: web.Application) -> None:
        self.http_url = url
        self.ws_url = url.replace("http://", "ws://")
        self.app = app

    @property
    def twilio(self) -> str:
        return self.ws_url + "/v1/twilio"

    def events(self, call_sid: str) -> str:
        return f"{self.ws_url}/v1/calls/{call_sid}/events"

    @property
    def hub(self) -> CallHub:
        return self.app[CALLS]


@contextlib.asynccontextmanager
async def serve(**overrides: Any) -> AsyncIterator[Server]:
    apps: list[web.Application] = []
    async with running_server(tone_engine(**overrides), configure=apps.append) as url:
        yield Server(url, apps[0])


async def subscribe(http: ClientSession, url: str, **kwargs: Any) -> asyncio.Task[Followed]:
    """A subscriber connected now (before the call starts), read in a task."""
    ws = await http.ws_connect(url, **kwargs)

    async def reader() -> Followed:
        async with ws:
            messages = await read_all(ws)
        return Followed(messages, ws.close_code)

    return asyncio.create_task(reader())


async def play_call(
    http: ClientSession,
    server: Server,
    call: TwilioCall,
    *,
    realtime: bool = True,
    headers: dict[str, str] | None = None,
    between: Callable[[int], list[str]] | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Play ``call`` on /v1/twilio (``between(i)`` adds messages after tick
    i); what Twilio's socket received, and its close code."""
    async with http.ws_connect(server.twilio, headers=headers) as ws:
        received = asyncio.create_task(read_all(ws))
        await ws.send_str(call.connected())
        await ws.send_str(call.start())
        ticks = call.ticks()
        if between is not None:
            ticks = [tick + between(i) for i, tick in enumerate(ticks)]
        await play(ws, ticks, realtime=realtime)
        await ws.send_str(call.stop())
        messages = await asyncio.wait_for(received, 60)
        return messages, ws.close_code


# -- the call ---------------------------------------------------------------------


def test_two_tracks_reach_subscribers_as_two_channels() -> None:
    # The call ends 0.15 s after the customer's last word: that utterance is
    # still open at `stop`, whose flush must deliver it before CallEnded.
    call = two_track_call(tail_s=0.15, parameters={"token": "t0ken", "queue": "sales"})

    async def main() -> tuple[Followed, Followed, list[dict[str, Any]], int | None, CallHub]:
        async with serve() as server, ClientSession() as http:
            early = await subscribe(http, server.events(call.call_sid))
            late: list[asyncio.Task[asyncio.Task[Followed]]] = []

            def join_late(i: int) -> list[str]:
                if i == 60:  # 1.2 s into the call: a second subscriber joins
                    late.append(asyncio.create_task(subscribe(http, server.events(call.call_sid))))
                return []

            twilio, code = await play_call(http, server, call, between=join_late)
            first = await asyncio.wait_for(early, 30)
            second = await asyncio.wait_for(await asyncio.wait_for(late[0], 5), 30)
            return first, second, twilio, code, server.hub

    first, second, twilio, code, hub = run(main)
    assert code == 1000
    assert twilio == []  # Twilio's socket gets nothing but errors
    assert first.close_code == 1000
    started = first.messages[0]
    assert started["type"] == "CallStarted"
    assert started["call_sid"] == call.call_sid and started["stream_sid"] == call.stream_sid
    assert started["tracks"] == ["inbound", "outbound"]
    assert started["custom_parameters"] == {"queue": "sales"}  # no token
    assert started["earshot"]["policy"]["audio_stored"] is False
    assert started["earshot"]["settings"]["channels"] == 2
    assert first.messages[-1] == {"type": "CallEnded", "call_sid": call.call_sid, "reason": "stop"}
    # Exactly the customer's words on channel 0, the agent's on channel 1.
    assert first.texts(0) == texts(INBOUND)
    assert first.texts(1) == texts(OUTBOUND)
    for channel, track, _ in first.finals():
        assert track == ("inbound", "outbound")[channel]
    results = [m for m in first.messages if m["type"] == "Results"]
    assert all(m["channel_index"][1] == 2 for m in results)
    assert any(not m["is_final"] for m in results), "interim results are on by default"
    # The last inbound words were still being spoken at `stop`.
    last = [m for m in results if m["is_final"] and m["channel_index"][0] == 0][-1]
    assert last["earshot"]["provenance"]["backend"] == "local"
    # The subscriber that joined during the call: CallStarted first, then the
    # rest of the call, CallEnded last.
    assert second.messages[0] == started
    assert second.messages[-1]["type"] == "CallEnded" and second.close_code == 1000
    assert second.texts(0)[-1] == texts(INBOUND)[-1]
    assert hub.calls == {}


@pytest.mark.parametrize("stop", [True, False])
def test_finals_reach_subscribers_when_twilio_hangs_up_at_once(stop: bool) -> None:
    # Twilio closes its socket right after `stop` (or drops it without one):
    # the words said just before are still decoded for the subscribers.
    call = two_track_call(tail_s=0.15)

    async def main() -> Followed:
        async with serve() as server, ClientSession() as http:
            sub = await subscribe(http, server.events(call.call_sid))
            ws = await http.ws_connect(server.twilio)
            await ws.send_str(call.connected())
            await ws.send_str(call.start())
            await play(ws, call.ticks(), realtime=False)
            if stop:
                await ws.send_str(call.stop())
            await ws.close()
            return await asyncio.wait_for(sub, 30)

    followed = run(main)
    assert followed.texts(0) == texts(INBOUND)
    assert followed.texts(1) == texts(OUTBOUND)
    ended = followed.messages[-1]
    assert ended["type"] == "CallEnded" and ended["reason"] == ("stop" if stop else "disconnected")
    assert followed.close_code == 1000


def test_a_one_track_call() -> None:
    inbound, _ = make_speech([["golf", "hotel"]], 8000, lead_s=0.3, tail_s=0.8)
    call = TwilioCall({"inbound": mulaw_tracks(inbound)[0]})

    async def main() -> Followed:
        async with serve() as server, ClientSession() as http:
            sub = await subscribe(http, server.events(call.call_sid))
            _, code = await play_call(http, server, call, realtime=False)
            assert code == 1000
            return await asyncio.wait_for(sub, 30)

    followed = run(main)
    assert followed.messages[0]["tracks"] == ["inbound"]
    assert followed.finals() == [(0, "inbound", "golf hotel")]


# -- bad input --------------------------------------------------------------------


def test_malformed_messages_are_errors_and_lose_nothing() -> None:
    call = two_track_call()

    def junk(i: int) -> list[str]:
        if i == 10:
            return [call.raw_media("inbound", 10, "%%% not base64 %%%")]
        if i == 20:
            return [call.media("outbound", 20).replace('"outbound"', '"bystander"')]
        if i == 30:
            return ["this is not json"]
        if i == 40:  # an event Twilio may add one day: ignored, no error
            return [json.dumps({"event": "transcription", "streamSid": call.stream_sid})]
        return []

    async def main() -> tuple[Followed, list[dict[str, Any]], int | None]:
        async with serve() as server, ClientSession() as http:
            sub = await subscribe(http, server.events(call.call_sid))
            twilio, code = await play_call(http, server, call, realtime=False, between=junk)
            return await asyncio.wait_for(sub, 30), twilio, code

    followed, twilio, code = run(main)
    assert code == 1000
    expected = ["twilio_invalid_media", "twilio_unknown_track", "twilio_invalid_message"]
    assert [m["code"] for m in twilio] == expected
    assert all(m["type"] == "Error" and m["message"] for m in twilio)
    assert twilio[1]["track"] == "bystander" and twilio[1]["allowed"] == ["inbound", "outbound"]
    assert followed.codes("Error") == expected
    assert followed.texts(0) == texts(INBOUND)
    assert followed.texts(1) == texts(OUTBOUND)
    assert followed.messages[-1]["reason"] == "stop"


def test_media_before_start_then_a_second_start() -> None:
    call = two_track_call()

    async def main() -> tuple[Followed, list[dict[str, Any]], int | None]:
        async with serve() as server, ClientSession() as http:
            sub = await subscribe(http, server.events(call.call_sid))
            async with http.ws_connect(server.twilio) as ws:
                received = asyncio.create_task(read_all(ws))
                await ws.send_str(call.connected())
                await ws.send_str(call.media("inbound", 0))  # before start
                await ws.send_str(call.start())
                # The whole call, then a second start instead of stop.
                await play(ws, call.ticks(), realtime=False)
                await ws.send_str(call.start(streamSid="MZother"))
                twilio = await asyncio.wait_for(received, 30)
                code = ws.close_code
            return await asyncio.wait_for(sub, 30), twilio, code

    followed, twilio, code = run(main)
    assert [m["code"] for m in twilio] == ["twilio_not_started", "twilio_duplicate_start"]
    assert code == 4400
    # Everything said before the second start was transcribed and delivered.
    assert followed.texts(0) == texts(INBOUND)
    assert followed.texts(1) == texts(OUTBOUND)
    assert followed.codes("Error") == ["twilio_duplicate_start"]  # before start: nobody
    assert followed.messages[-1]["type"] == "CallEnded"
    assert followed.messages[-1]["reason"] == "twilio_duplicate_start"


def test_a_socket_that_never_starts_is_closed() -> None:
    call = two_track_call()

    async def main() -> tuple[list[dict[str, Any]], int | None]:
        async with serve() as server, ClientSession() as http, http.ws_connect(server.twilio) as ws:
            await ws.send_str(call.connected())
            await ws.send_str("not json")
            await ws.send_bytes(b"\x00" * 160)
            for i in range(60):
                await ws.send_str(call.media("inbound", i))
            return await asyncio.wait_for(read_all(ws), 30), ws.close_code

    twilio, close = run(main)
    codes = [m["code"] for m in twilio]
    assert codes[:2] == ["twilio_invalid_message", "twilio_invalid_message"]
    assert codes[2:] == ["twilio_not_started"] * 49  # 50 refused and go on; the 51st ends it
    assert twilio[-1]["message"].startswith("51 messages and no 'start'")
    assert close == 4400


@pytest.mark.parametrize(
    ("override", "code"),
    [
        ({"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1}},
         "twilio_unsupported_media_format"),
        ({"tracks": ["both_tracks"]}, "twilio_unsupported_media_format"),
        ({"callSid": 7}, "twilio_invalid_message"),
    ],
)  # fmt: skip
def test_a_start_that_cannot_be_served_ends_the_stream(override: dict[str, Any], code: str) -> None:
    call = two_track_call()

    async def main() -> tuple[list[dict[str, Any]], int | None]:
        async with serve() as server, ClientSession() as http, http.ws_connect(server.twilio) as ws:
            await ws.send_str(call.connected())
            await ws.send_str(call.start(**override))
            return await asyncio.wait_for(read_all(ws), 30), ws.close_code

    twilio, close = run(main)
    assert [m["code"] for m in twilio] == [code]
    assert close == 4400


def test_one_live_stream_per_call() -> None:
    call = two_track_call()

    async def main() -> tuple[list[dict[str, Any]], int | None]:
        async with (
            serve() as server,
            ClientSession() as http,
            http.ws_connect(server.twilio) as first,
        ):
            await first.send_str(call.start())
            await first.send_str(call.media("inbound", 0))
            for _ in range(100):
                if call.call_sid in server.hub.calls:
                    break
                await asyncio.sleep(0.02)
            async with http.ws_connect(server.twilio) as second:
                await second.send_str(call.start())
                return await asyncio.wait_for(read_all(second), 30), second.close_code

    twilio, close = run(main)
    assert [m["code"] for m in twilio] == ["twilio_call_in_use"]
    assert close == 4400


def test_a_subscriber_waits_for_the_call_only_so_long() -> None:
    async def main() -> Followed:
        async with serve(twilio_subscriber_wait_s=0.3) as server, ClientSession() as http:
            sub = await subscribe(http, server.events("CAnever"))
            followed = await asyncio.wait_for(sub, 10)
            assert server.hub.calls == {}
            return followed

    followed = run(main)
    assert followed.codes("Error") == ["call_not_started"]
    assert followed.close_code == 4404


def test_subscribers_are_bounded_and_a_slow_one_is_dropped() -> None:
    async def main() -> None:
        hub = CallHub(max_calls=2, max_subscribers=2, queue_size=8)
        slow, fast = hub.subscribe("CA1"), hub.subscribe("CA1")
        with pytest.raises(Exception) as info:
            hub.subscribe("CA1")
        assert getattr(info.value, "code", None) == "server_full"
        hub.subscribe("CA2")
        with pytest.raises(Exception) as info:
            hub.subscribe("CA3")
        assert getattr(info.value, "code", None) == "server_full"
        for i in range(12):  # nobody reads `slow`; `fast` is read at once
            hub.publish("CA1", {"type": "Results", "n": i})
            assert fast.queue.get_nowait() == {"type": "Results", "n": i}
        assert slow.dropped.is_set() and slow not in hub.calls["CA1"].subscribers
        assert fast in hub.calls["CA1"].subscribers
        assert hub.counts["subscribers_dropped"] == 1

    run(main)


def test_a_slow_subscriber_is_dropped_and_does_not_stall_the_call() -> None:
    call = two_track_call()

    async def main() -> tuple[Followed, CallHub, bytes]:
        loop = asyncio.get_running_loop()
        async with serve(twilio_subscriber_queue=8, socket_send_buffer=4096) as server:
            # A subscriber that never reads, on a socket with a 4 KiB receive buffer.
            host, port = server.http_url.removeprefix("http://").split(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, int(port)))
            key = base64.b64encode(b"0123456789abcdef").decode()
            handshake = (
                f"GET /v1/calls/{call.call_sid}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await loop.sock_sendall(sock, handshake.encode())
            assert await loop.sock_recv(sock, 12) == b"HTTP/1.1 101"
            async with ClientSession() as http:
                good = await subscribe(http, server.events(call.call_sid))
                for _ in range(100):
                    entry = server.hub.calls.get(call.call_sid)
                    if entry is not None and len(entry.subscribers) == 2:
                        break
                    await asyncio.sleep(0.01)
                # 400 kB of messages for the call's subscribers: far more than
                # the slow one's buffers and queue hold.
                for i in range(200):
                    server.hub.publish(call.call_sid, {"type": "Padding", "n": i, "x": "a" * 2000})
                    await asyncio.sleep(0.002)
                _, code = await play_call(http, server, call, realtime=False)
                assert code == 1000
                followed = await asyncio.wait_for(good, 30)
            # What the slow subscriber was sent ends with the close 4430, or the
            # connection is cut.
            tail = b""
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
                    tail = (tail + chunk)[-64:]
            sock.close()
            return followed, server.hub, tail

    followed, hub, tail = run(main)
    assert hub.counts["subscribers_dropped"] == 1
    assert [m["n"] for m in followed.messages if m["type"] == "Padding"] == list(range(200))
    assert followed.texts(0) == texts(INBOUND) and followed.texts(1) == texts(OUTBOUND)
    assert followed.messages[-1]["type"] == "CallEnded"
    if tail:  # a close frame: opcode 8, then the code and the reason
        assert (4430).to_bytes(2, "big") + b"subscriber_not_reading" in tail


# -- authentication ---------------------------------------------------------------


def _signature(token: str, url: str) -> str:
    # HMAC-SHA1 over the URL, base64: computed here, not with the server's code.
    return base64.b64encode(hmac.new(token.encode(), url.encode(), hashlib.sha1).digest()).decode()


def test_x_twilio_signature_is_checked_when_an_auth_token_is_set() -> None:
    token = "twilio-auth-token"
    call = two_track_call()

    async def main() -> list[Any]:
        out: list[Any] = []
        async with serve(twilio_auth_token=token) as server, ClientSession() as http:
            for headers in ({}, {"X-Twilio-Signature": _signature("wrong", server.twilio)}):
                with pytest.raises(WSServerHandshakeError) as info:
                    await http.ws_connect(server.twilio, headers=headers)
                out.append(info.value.status)
            async with http.get(server.http_url + "/v1/twilio") as response:
                out.append((response.status, (await response.json())["code"]))
            # Signed as Twilio signs it: wss:// and the host, as in the TwiML.
            public = server.twilio.replace("ws://", "wss://")
            sub = await subscribe(http, server.events(call.call_sid))
            _, code = await play_call(
                http,
                server,
                call,
                realtime=False,
                headers={"X-Twilio-Signature": _signature(token, public)},
            )
            out.append(code)
            out.append((await asyncio.wait_for(sub, 30)).texts(0))
        # Behind a proxy: the configured public URL is the one signed.
        public = "wss://asr.example.com/v1/twilio"
        async with (
            serve(twilio_auth_token=token, twilio_stream_url=public) as server,
            ClientSession() as http,
        ):
            with pytest.raises(WSServerHandshakeError) as info:
                await http.ws_connect(
                    server.twilio,
                    headers={"X-Twilio-Signature": _signature(token, server.twilio)},
                )
            out.append(info.value.status)
            async with http.ws_connect(
                server.twilio, headers={"X-Twilio-Signature": _signature(token, public)}
            ) as ws:
                await ws.send_str(call.stop())
                await read_all(ws)
                out.append(ws.close_code)
        return out

    statuses = run(main)
    assert statuses[:2] == [401, 401]
    assert statuses[2] == (401, "twilio_signature_invalid")
    assert statuses[3] == 1000 and statuses[4] == texts(INBOUND)
    assert statuses[5:] == [401, 1000]


def test_an_api_key_in_the_start_parameters(caplog: pytest.LogCaptureFixture) -> None:
    key = "k-secret-1"

    async def start_with(server: Server, http: ClientSession, params: dict[str, str]) -> Any:
        call = two_track_call(parameters=params)
        async with http.ws_connect(server.twilio) as ws:  # no Authorization: Twilio has none
            await ws.send_str(call.connected())
            await ws.send_str(call.start())
            await ws.send_str(call.stop())
            return [m["code"] for m in await read_all(ws)], ws.close_code

    async def main() -> list[Any]:
        out: list[Any] = []
        async with serve(api_keys=key) as server, ClientSession() as http:
            out.append(await start_with(server, http, {}))
            out.append(await start_with(server, http, {"token": "wrong"}))
            out.append(await start_with(server, http, {"token": key}))
            # The subscriber endpoint takes the key as every endpoint does.
            with pytest.raises(WSServerHandshakeError) as info:
                await http.ws_connect(server.events("CA1"))
            out.append(info.value.status)
            call = two_track_call(parameters={"token": key})
            sub = await subscribe(
                http, server.events(call.call_sid), headers={"Authorization": f"Token {key}"}
            )
            _, code = await play_call(http, server, call, realtime=False)
            followed = await asyncio.wait_for(sub, 30)
            out.append((code, followed.texts(1), followed.messages[0]["custom_parameters"]))
        return out

    with caplog.at_level(logging.DEBUG):
        out = run(main)
    assert out[0] == (["unauthorized"], 4401)
    assert out[1] == (["unauthorized"], 4401)
    assert out[2] == ([], 1000)
    assert out[3] == 401
    assert out[4] == (1000, texts(OUTBOUND), {})
    # The key is never logged, in a message or a field.
    assert any(r.getMessage().startswith("stream error unauthorized") for r in caplog.records)
    for record in caplog.records:
        assert key not in record.getMessage()
        assert all(key not in str(v) for v in vars(record).values())


# -- webhooks ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/hook", received
    finally:
        await runner.cleanup()


def test_finals_are_posted_to_a_webhook_on_loopback() -> None:
    async def main() -> tuple[list[dict[str, Any]], Followed, CallHub, str]:
        async with webhook_receiver() as (url, received), serve() as server:
            call = two_track_call(parameters={"earshot_webhook": url})
            async with ClientSession() as http:
                sub = await subscribe(http, server.events(call.call_sid))
                _, code = await play_call(http, server, call, realtime=False)
                assert code == 1000
                followed = await asyncio.wait_for(sub, 30)
                async with http.get(server.http_url + "/metrics") as response:
                    metrics = await response.text()
            return received, followed, server.hub, metrics

    received, followed, hub, metrics = run(main)
    delivered = f'earshot_twilio_events_total{{event="webhook_delivered"}} {len(received)}.0'
    assert delivered in metrics, metrics
    assert 'earshot_streams_opened_total{protocol="twilio"} 1.0' in metrics
    assert all(m["type"] == "Results" and m["is_final"] for m in received)
    posted = [
        (m["earshot"]["track"], m["channel"]["alternatives"][0]["transcript"])
        for m in received
        if m["channel"]["alternatives"][0]["transcript"]
    ]
    assert [t for track, t in posted if track == "inbound"] == texts(INBOUND)
    assert [t for track, t in posted if track == "outbound"] == texts(OUTBOUND)
    assert {m["call_sid"] for m in received} == {"CA0123456789abcdef0123456789abcdef"}
    assert hub.counts["webhook_delivered"] == len(received)
    assert "earshot_webhook" not in followed.messages[0]["custom_parameters"]
    assert followed.codes("Warning") == []


def test_a_webhook_outside_allowed_networks_is_refused_and_audited(tmp_path: Path) -> None:
    audit = tmp_path / "egress.jsonl"
    # 10.255.255.1 is outside allowed_networks: the guard refuses the
    # connection before the system call, so nothing leaves loopback.
    url = "http://10.255.255.1:9/hook"
    guard = build_guard(on_prem_only=True, allowed_networks="10.20.0.0/16", audit_log=str(audit))
    assert guard is not None

    async def main() -> tuple[Followed, CallHub]:
        call = two_track_call(parameters={"earshot_webhook": url})
        with guarded(guard):
            async with (
                serve(on_prem_only=True, allowed_networks="10.20.0.0/16") as server,
                ClientSession() as http,
            ):
                sub = await subscribe(http, server.events(call.call_sid))
                _, code = await play_call(http, server, call, realtime=False)
                assert code == 1000
                return await asyncio.wait_for(sub, 30), server.hub

    try:
        followed, hub = run(main)
    finally:
        assert guard.audit is not None
        guard.audit.close()
    assert followed.codes("Warning") == ["webhook_refused"]
    warning = next(m for m in followed.messages if m["type"] == "Warning")
    assert "10.255.255.1" in warning["message"] and warning["reason"] == "egress_refused"
    assert hub.counts["webhook_refused"] == 1 and hub.counts["webhook_delivered"] == 0
    assert guard.refused >= 1
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    refused = [r for r in records if r["event"] == "refused"]
    assert refused and all(r["destination"].startswith("10.255.255.1") for r in refused)
    assert refused[0]["reason"] == "twilio webhook" and refused[0]["session"]
    # The call went on: every final reached the subscriber.
    assert followed.texts(0) == texts(INBOUND) and followed.texts(1) == texts(OUTBOUND)


def test_without_a_guard_on_prem_only_mode_still_refuses_a_webhook() -> None:
    engine = tone_engine(on_prem_only=True, allowed_networks="10.20.0.0/16")
    assert webhook_refusal(engine, "http://10.20.1.2/hook") is None
    why = webhook_refusal(engine, "https://hooks.example.com/x?secret=1")
    assert why is not None and "hooks.example.com" in why and "secret" not in why
    assert webhook_refusal(engine, "ftp://10.20.1.2/x") is not None
    assert webhook_refusal(tone_engine(), "https://hooks.example.com/x") is None


def test_on_prem_only_mode_refuses_a_configured_webhook_outside_allowed_networks() -> None:
    cfg = load_config(
        env={},
        overrides={
            "on_prem_only": True,
            "allowed_networks": "10.20.0.0/16",
            "twilio_webhook_url": "https://hooks.example.com/calls?key=abc",
        },
    )
    with pytest.raises(EgressRefusedError) as info:
        check_sovereignty(cfg)
    assert info.value.details["setting"] == "twilio_webhook_url"
    assert "hooks.example.com" in info.value.message and "abc" not in info.value.message
    check_sovereignty(
        load_config(
            env={},
            overrides={
                "on_prem_only": True,
                "allowed_networks": "10.20.0.0/16",
                "twilio_webhook_url": "http://10.20.0.7/hook",
            },
        )
    )
    assert "twilio_webhook_url" not in repr(cfg) and "twilio_auth_token" not in repr(cfg)


# -- the real model ---------------------------------------------------------------

REAL_WER_LIMIT = 0.15
"""tiny.en on the first two LibriSpeech test-clean utterances of the shared
set, one per track, as 8 kHz µ-law: measured 5.6 % (2 errors in 36 words;
faster-whisper's own offline decode of 16 kHz audio scores about 4 % on the
shared set). The limit leaves room for a word or three more."""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_speech_on_both_tracks_with_tiny_en(
    tiny_en_model: Path, audio_manifest: list[dict[str, Any]]
) -> None:
    import numpy as np
    import soundfile

    from earshot.models.runner import WhisperRunner
    from tests.kit.tones import resample
    from tests.kit.wer import corpus_wer

    rows = [r for r in audio_manifest if r.get("subset") == "test-clean"][:2]
    assert len(rows) == 2
    tracks = []
    for row in rows:
        audio, rate = soundfile.read(row["abspath"], dtype="float32")
        tracks.append(np.concatenate([np.zeros(4000, np.float32), resample(audio, rate, 8000)]))
    inbound, outbound = mulaw_tracks(*tracks)
    call = TwilioCall({"inbound": inbound, "outbound": outbound})
    engine = tone_engine(WhisperRunner(tiny_en_model), twilio_interim_results=False)

    async def main() -> Followed:
        async with running_server(engine) as url, ClientSession() as http:
            server = Server(url, web.Application())
            sub = await subscribe(http, server.events(call.call_sid))
            _, code = await play_call(http, server, call, realtime=False)
            assert code == 1000
            return await asyncio.wait_for(sub, 200)

    followed = asyncio.run(asyncio.wait_for(main(), 280))
    hypotheses = [" ".join(followed.texts(channel)) for channel in (0, 1)]
    wer = corpus_wer([r["text"] for r in rows], hypotheses)
    assert wer < REAL_WER_LIMIT, (wer, hypotheses)
