"""API-key authentication and origin checks (service/http/auth.py), against a real
server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from earshot.clients.stream import StreamClient, StreamRefusedError
from earshot.core.errors import ConfigError
from earshot.service.config import load_config
from earshot.service.http.app import create_app
from earshot.service.http.auth import (
    auth_middleware,
    check_bind_policy,
    is_loopback_host,
    key_matches,
    load_api_keys,
    parse_keys_text,
    register_auth,
)
from tests.kit.live import running_server, tone_engine

KEY = "sk-earshot-right"
OTHER = "sk-earshot-other"
TIMEOUT = aiohttp.ClientTimeout(total=20)


@contextlib.asynccontextmanager
async def auth_server(**overrides: Any) -> AsyncIterator[str]:
    """create_app(engine), which adds the auth middleware, on a free loopback
    port; yields ``http://127.0.0.1:PORT``."""
    async with running_server(tone_engine(**overrides)) as url:
        yield url


def run(body: Callable[[str], Awaitable[Any]], **overrides: Any) -> Any:
    async def main() -> Any:
        async with auth_server(**overrides) as url:
            return await body(url)

    return asyncio.run(asyncio.wait_for(main(), timeout=60))


def ws(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/listen"


async def open_and_close(url: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Open a stream with StreamClient, end it at once, return its messages."""
    async with StreamClient(ws(url), open_timeout=10, **kwargs) as client:
        await client.close_stream()
        return [m async for m in client.messages()]


# --- keys and policy (no server) ---------------------------------------------------


def test_keys_file_parsing(tmp_path: Path) -> None:
    text = "# operators\nkey-one\n\n  key-two  # ci\n#key-off\n   \nkey-one\n"
    assert parse_keys_text(text) == ["key-one", "key-two", "key-one"]
    path = tmp_path / "keys"
    path.write_text(text)
    cfg = load_config(
        env={"EARSHOT_API_KEYS": " env-a, ,env-b,key-two", "EARSHOT_API_KEYS_FILE": str(path)}
    )
    assert load_api_keys(cfg) == ("env-a", "env-b", "key-two", "key-one")
    assert KEY not in repr(load_config(env={"EARSHOT_API_KEYS": KEY}))


def test_unreadable_keys_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = load_config(env={}, overrides={"api_keys_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError) as info:
        load_api_keys(cfg)
    assert info.value.details["field"] == "api_keys_file"


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # what earshot.service.http.auth calls
    keys = ["first", "second", "third", "fourth"]
    assert key_matches("first", keys)  # a match on the first key...
    assert len(calls) == 4  # ...still compares against every key
    calls.clear()
    assert not key_matches("nope", keys)
    assert len(calls) == 4
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    assert key_matches("fourth", keys) and not key_matches("", keys)
    assert not key_matches("fourt", keys) and not key_matches("ключ", keys)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)
    check_bind_policy(load_config(env={}, overrides={"host": host}))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.5", "example.org"])
def test_bind_policy_refuses_remote_host_without_keys(host: str, tmp_path: Path) -> None:
    assert not is_loopback_host(host)
    with pytest.raises(ConfigError) as info:
        check_bind_policy(load_config(env={}, overrides={"host": host}))
    message = str(info.value)
    for name in ("api_keys", "api_keys_file", "allow_unauthenticated_remote"):
        assert name in message
    # Allowed with a key, a keys file or the explicit opt-out.
    check_bind_policy(load_config(env={"EARSHOT_API_KEYS": KEY}, overrides={"host": host}))
    (tmp_path / "k").write_text(KEY + "\n")
    check_bind_policy(
        load_config(env={}, overrides={"host": host, "api_keys_file": str(tmp_path / "k")})
    )
    check_bind_policy(
        load_config(env={"EARSHOT_ALLOW_UNAUTHENTICATED_REMOTE": "true"}, overrides={"host": host})
    )


def test_bind_policy_refuses_empty_keys_file(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("# nobody yet\n")
    cfg = load_config(env={}, overrides={"host": "0.0.0.0", "api_keys_file": str(tmp_path / "k")})
    with pytest.raises(ConfigError):
        check_bind_policy(cfg)


def test_register_auth_is_idempotent() -> None:
    app = create_app(tone_engine(api_keys=KEY))
    before = len(app.middlewares)  # the JSON errors', auth's and the metrics' request counter
    register_auth(app)
    register_auth(app)
    assert len(app.middlewares) == before == 3
    assert callable(auth_middleware(load_config(env={})))


# --- HTTP ------------------------------------------------------------------------


def test_openai_sdk_wrong_missing_and_right_key() -> None:
    async def body(url: str) -> None:
        async with AsyncOpenAI(
            base_url=url + "/v1", api_key=OTHER, max_retries=0, timeout=20.0
        ) as wrong:
            with pytest.raises(openai.AuthenticationError) as info:
                await wrong.models.list()
            err = info.value
            assert err.status_code == 401 and err.code == "unauthorized"
            assert err.response.headers["WWW-Authenticate"].startswith("Bearer")
            with pytest.raises(openai.AuthenticationError):
                await wrong.audio.transcriptions.create(model="base", file=b"RIFF")
        async with AsyncOpenAI(
            base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=20.0
        ) as right:
            models = await right.models.list()
            assert [m.id async for m in models]

    run(body, api_keys=f"{OTHER}-not,{KEY}")


def test_http_refusal_shapes_and_open_paths() -> None:
    async def body(url: str) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.get(url + "/v1/models") as r:
                assert r.status == 401
                assert "WWW-Authenticate" in r.headers
                assert (await r.json())["error"]["code"] == "unauthorized"
            async with s.get(url + "/metrics") as r:
                assert r.status == 401
                data = await r.json()
                assert data["type"] == "Error" and data["code"] == "unauthorized"
            async with s.get(url + "/metrics", headers={"Authorization": f"Token {KEY}"}) as r:
                assert r.status == 200
            async with s.get(url + "/v1/models", headers={"Authorization": f"Basic {KEY}"}) as r:
                assert r.status == 401
            for path in ("/healthz", "/readyz"):
                async with s.get(url + path) as r:
                    assert r.status == 200
            async with s.get(
                url + "/v1/models",
                headers={"Authorization": f"Bearer {KEY}", "Origin": "https://evil.example"},
            ) as r:
                assert r.status == 403
                assert (await r.json())["error"]["code"] == "forbidden_origin"

    run(body, api_keys=KEY)


def test_no_keys_means_open_but_origins_still_checked() -> None:
    async def body(url: str) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.get(url + "/v1/models") as r:
                assert r.status == 200
            port = int(url.rsplit(":", 1)[1])
            # DNS rebinding: a page of another site whose name now points at
            # 127.0.0.1 sends its own origin, and a Host header to match it.
            rebound = f"http://evil.example:{port}"
            headers = {"Origin": rebound, "Host": f"evil.example:{port}"}
            async with s.get(url + "/v1/models", headers=headers) as r:
                assert r.status == 403
            # Another page on this host (another port) is not this server's.
            headers = {"Origin": f"http://127.0.0.1:{port + 1}"}
            async with s.get(url + "/v1/models", headers=headers) as r:
                assert r.status == 403
            # The server's own page, opened on loopback, is allowed.
            for own in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
                async with s.get(url + "/v1/models", headers={"Origin": own}) as r:
                    assert r.status == 200, own

    run(body)


# --- websocket ---------------------------------------------------------------------


def test_stream_client_refused_without_or_with_wrong_key() -> None:
    async def body(url: str) -> None:
        for kwargs in ({}, {"api_key": OTHER}):
            with pytest.raises(StreamRefusedError) as info:
                await open_and_close(url, **kwargs)
            err = info.value
            assert err.status == 401 and err.code == "unauthorized"
            assert err.body is not None and err.body["type"] == "Error"
        headers = {"Authorization": f"Bearer {KEY}"}
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
            s.get(url + "/metrics", headers=headers) as r,
        ):
            text = await r.text()
        assert 'reason="unauthorized"' in text

    run(body, api_keys=KEY)


def test_stream_client_accepted_with_key() -> None:
    async def body(url: str) -> list[dict[str, Any]]:
        return await open_and_close(url, api_key=KEY)

    messages = run(body, api_keys=f"{OTHER},{KEY}")
    assert messages and messages[-1]["type"] == "Metadata"


def test_bearer_header_and_subprotocol_token_on_websocket() -> None:
    async def body(url: str) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.ws_connect(
                ws(url),
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=aiohttp.ClientWSTimeout(ws_close=10),
            ) as conn:
                await conn.send_str('{"type": "CloseStream"}')
                msg = await conn.receive(timeout=20)
                assert msg.type == aiohttp.WSMsgType.TEXT
            async with s.ws_connect(ws(url), protocols=["token", KEY]) as conn:
                assert conn.protocol == "token"
                await conn.send_str('{"type": "CloseStream"}')
                msg = await conn.receive(timeout=20)
                assert msg.type == aiohttp.WSMsgType.TEXT
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(ws(url), protocols=["token", OTHER])
            assert info.value.status == 401
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(ws(url), protocols=[KEY])
            assert info.value.status == 401

    run(body, api_keys=KEY)


def test_forbidden_origin_on_websocket() -> None:
    async def body(url: str) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(ws(url), protocols=["token", KEY], origin="https://evil.example")
            assert info.value.status == 403
            async with s.ws_connect(
                ws(url), protocols=["token", KEY], origin="https://app.example"
            ) as conn:
                assert conn.protocol == "token"
                await conn.send_str('{"type": "CloseStream"}')
                assert (await conn.receive(timeout=20)).type == aiohttp.WSMsgType.TEXT

    run(body, api_keys=KEY, allowed_origins="https://app.example/, https://other.example")
