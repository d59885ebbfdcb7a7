"""On-prem-only egress control (service/sovereignty.py): the allowed list, the
start-up destination check, and the process-wide audit hook with its log.

Audit hooks are permanent, so every test here leaves no guard current (the
autouse fixture). No test contacts a host outside loopback: a refused
destination is refused by the hook before any packet or DNS query is sent, and
where a non-loopback destination would be allowed the guard is called directly
instead of through a socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from earshot.core.errors import ConfigError, EarshotError, EgressBlockedError, EgressRefusedError
from earshot.service import sovereignty as egress
from earshot.service.sovereignty import (
    AllowedNetworks,
    AuditLog,
    EgressGuard,
    activate,
    build_guard,
    check_destination,
    current_guard,
    deactivate,
    egress_reason,
    egress_session,
    guarded,
    in_current_context,
    is_egress_refusal,
)

BLOCKED_V4 = "192.0.2.1"  # TEST-NET-1: documentation only, never routed
BLOCKED_V6 = "2001:db8::1"  # documentation prefix
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_guard_left() -> Iterator[None]:
    assert current_guard() is None, "a guard was left current by an earlier test"
    try:
        yield
    finally:
        deactivate()


@pytest.fixture
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loopback proxy would be allowed and could forward to the world."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "egress.jsonl"


@pytest.fixture
def guard(audit_path: Path) -> Iterator[EgressGuard]:
    """Enforcing, loopback only, auditing to ``audit_path``."""
    log = AuditLog(audit_path)
    yield EgressGuard(AllowedNetworks(), enforce=True, audit=log)
    log.close()


@pytest.fixture
def listener() -> Iterator[tuple[str, int]]:
    """A listening TCP socket on 127.0.0.1 (connections are never accepted:
    the kernel's backlog completes them)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        yield srv.getsockname()
    finally:
        srv.close()


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def fake_socket(family: int) -> Any:
    """Stands in for the socket an event names, without opening one."""

    class Fake:
        pass

    fake = Fake()
    fake.family = family  # type: ignore[attr-defined]
    return fake


# ---------------------------------------------------------------- parsing


def test_loopback_is_always_allowed() -> None:
    allowed = AllowedNetworks("")
    assert allowed.describe() == ["127.0.0.0/8", "::1/128", "localhost"]
    for host in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost", "LOCALHOST."):
        assert allowed.contains_host(host), host
    assert allowed.contains_address("::ffff:127.0.0.1")
    assert not allowed.contains_host(BLOCKED_V4)
    assert not allowed.contains_host("example.com")


def test_parse_good_entries() -> None:
    allowed = AllowedNetworks(
        " 10.0.0.0/8, 192.168.1.20 ,ASR2.Corp.Example., *.lab.example, 2001:db8:5::/48, [fd00::7],"
    )
    assert allowed.describe() == [
        "127.0.0.0/8",
        "::1/128",
        "localhost",
        "10.0.0.0/8",
        "192.168.1.20/32",
        "asr2.corp.example",
        "*.lab.example",
        "2001:db8:5::/48",
        "fd00::7/128",
    ]
    # A list works the same, and entries may hold commas.
    assert AllowedNetworks(["10.0.0.0/8", "a.example,b.example"]).describe()[3:] == [
        "10.0.0.0/8",
        "a.example",
        "b.example",
    ]


def test_contains_checks() -> None:
    allowed = AllowedNetworks("10.0.0.0/8, asr2.corp.example, *.lab.example, 2001:db8:5::/48")
    assert allowed.contains_address("10.200.3.4")
    assert allowed.contains_address("::ffff:10.1.1.1")  # IPv4-mapped
    assert not allowed.contains_address("11.0.0.1")
    assert not allowed.contains_address("::ffff:11.0.0.1")
    assert allowed.contains_address("2001:db8:5:1::9")
    assert allowed.contains_address("[2001:db8:5::1]")
    assert not allowed.contains_address(BLOCKED_V6)
    assert not allowed.contains_address("asr2.corp.example")  # not an address
    assert allowed.contains_host("asr2.corp.example")
    assert allowed.contains_host("Asr2.CORP.example.")
    assert not allowed.contains_host("asr3.corp.example")
    assert not allowed.contains_host("corp.example")
    assert allowed.contains_host("gpu1.lab.example")
    assert allowed.contains_host("a.b.lab.example")
    assert not allowed.contains_host("lab.example")  # list it too if it is yours
    assert not allowed.contains_host("evil-lab.example")
    assert not allowed.contains_host("lab.example.evil.com")
    assert allowed.contains_host("10.9.9.9")


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("10.0.0.1/8", "host bits set"),
        ("0.0.0.0/0", "every address"),
        ("::/0", "every address"),
        ("*", "wildcard"),
        ("*corp.example", "wildcard"),
        ("*.", "wildcard"),
        ("https://asr2.corp.example", "URL"),
        ("asr2.corp.example:8443", "port"),
        ("300.1.1.1", "not a valid"),
        ("10.0.0", "not a valid"),
        ("a..b", "not a valid"),
        ("-bad.example", "not a valid"),
        ("10.0.0.0/33", "CIDR"),
        ("2001:db8::/129", "CIDR"),
    ],
)
def test_parse_bad_entries(entry: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        AllowedNetworks(f"10.0.0.0/8, {entry}")
    err = info.value
    assert err.details["field"] == "allowed_networks"
    assert err.details["entry"] == entry
    assert repr(entry) in err.message
    assert says in err.message


def test_resolved_names_allow_their_addresses() -> None:
    guard = EgressGuard(AllowedNetworks("asr2.corp.example, *.lab.example"))
    asked: list[str] = []

    def resolver(name: str) -> list[str]:
        asked.append(name)
        if name == "asr2.corp.example":
            return ["10.1.2.3", "fd00::3"]
        raise socket.gaierror("no such name")

    assert guard.resolve_listed_names(resolver) == []
    assert asked == ["asr2.corp.example"]  # wildcards cannot be resolved
    assert guard.allowed.contains_address("10.1.2.3")
    assert guard.allowed.contains_address("fd00::3")
    assert not guard.allowed.contains_address("10.1.2.4")
    assert "asr2.corp.example = 10.1.2.3" in guard.allowed.describe()
    sock = fake_socket(socket.AF_INET)
    guard.check("socket.connect", (sock, ("10.1.2.3", 443)))
    with pytest.raises(EgressBlockedError):
        guard.check("socket.connect", (sock, ("10.1.2.4", 443)))

    failing = EgressGuard(AllowedNetworks("gone.corp.example"))
    assert failing.resolve_listed_names(resolver) == ["gone.corp.example"]


# ---------------------------------------------------------------- start-up check


def test_check_destination_allows_listed_hosts() -> None:
    allowed = AllowedNetworks("10.0.0.0/8, asr2.corp.example, *.lab.example, fd00::/8")
    assert check_destination("https://asr2.corp.example:8443/v1/listen", allowed) == (
        "asr2.corp.example"
    )
    assert check_destination("ws://10.4.5.6:9000", allowed) == "10.4.5.6"
    assert check_destination("gpu7.lab.example:443", allowed) == "gpu7.lab.example"
    assert check_destination("[fd00::9]:443", allowed) == "fd00::9"
    assert check_destination("http://[fd00::9]/x", allowed) == "fd00::9"
    assert check_destination("localhost", allowed) == "localhost"
    assert check_destination("asr2.corp.example", allowed) == "asr2.corp.example"


def test_check_destination_refuses_outside_hosts() -> None:
    allowed = AllowedNetworks("10.0.0.0/8")
    with pytest.raises(EgressRefusedError) as info:
        check_destination(
            "https://user:secret@api.example.com/v1?key=abc", allowed, setting="remote_url"
        )
    err = info.value
    assert not isinstance(err, OSError)  # a start-up error, not a socket failure
    assert err.code == "egress_refused"
    assert err.http_status == 503
    assert "api.example.com" in err.message
    assert "allowed_networks" in err.message
    assert "remote_url" in err.message
    assert "add the host name api.example.com" in err.message
    assert "secret" not in err.message and "key=abc" not in err.message
    assert err.to_dict()["host"] == "api.example.com"
    assert err.to_dict()["field"] == "allowed_networks"

    with pytest.raises(EgressRefusedError) as info:
        check_destination(f"{BLOCKED_V4}:8000", allowed)
    assert f"add {BLOCKED_V4} or its network" in info.value.message

    with pytest.raises(EgressRefusedError, match="cannot find a host"):
        check_destination("https://", allowed)


def test_error_types() -> None:
    err = EgressBlockedError("egress refused: x", destination="192.0.2.1:9")
    assert isinstance(err, PermissionError)
    assert isinstance(err, EgressRefusedError)
    assert isinstance(err, EarshotError)
    assert err.errno == 13
    assert err.strerror == "egress refused: x"
    assert "egress refused: x" in str(err)
    assert err.to_dict() == {
        "code": "egress_refused",
        "message": "egress refused: x",
        "destination": "192.0.2.1:9",
    }


def test_is_egress_refusal_follows_the_chain() -> None:
    def wrapped() -> BaseException:
        try:
            try:
                raise EgressBlockedError("egress refused: x")
            except OSError as exc:
                raise ConnectionError("could not connect") from exc
        except ConnectionError as outer:
            try:
                raise RuntimeError("while handling") from None
            except RuntimeError as top:
                top.__context__ = outer
                return top

    assert is_egress_refusal(wrapped())
    assert not is_egress_refusal(ConnectionRefusedError(111, "refused"))
    assert not is_egress_refusal(None)
    assert not is_egress_refusal(EgressRefusedError("start-up refusal"))


# ---------------------------------------------------------------- the live hook


def test_refuses_before_connecting_and_audits(guard: EgressGuard, audit_path: Path) -> None:
    with guarded(guard), egress_reason("remote_fallback"), egress_session("sess-42"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        start = time.monotonic()
        with sock, pytest.raises(EgressBlockedError) as info:
            sock.connect((BLOCKED_V4, 9))
        assert time.monotonic() - start < 1.0  # no packet was sent, nothing waited
    assert isinstance(info.value, PermissionError)
    assert f"{BLOCKED_V4}:9" in str(info.value)
    assert "allowed_networks" in str(info.value)
    (line,) = lines(audit_path)
    assert line["event"] == "refused"
    assert line["op"] == "connect"
    assert line["destination"] == f"{BLOCKED_V4}:9"
    assert line["allowed"] is False
    assert line["reason"] == "remote_fallback"
    assert line["session"] == "sess-42"
    assert line["pid"] == os.getpid()
    assert line["ts"].endswith("Z")
    assert guard.refused == 1


def test_loopback_is_allowed_and_not_audited(
    guard: EgressGuard, audit_path: Path, listener: tuple[str, int]
) -> None:
    with guarded(guard):
        with socket.create_connection(listener, timeout=2):
            pass
        with socket.create_connection(("localhost", listener[1]), timeout=2):
            pass
        assert socket.getaddrinfo("localhost", 80)
        assert socket.getaddrinfo(BLOCKED_V4, 80)  # a literal: no DNS, nothing sent
    assert lines(audit_path) == []


def test_audit_loopback_option(audit_path: Path, listener: tuple[str, int]) -> None:
    log = AuditLog(audit_path)
    guard = EgressGuard(AllowedNetworks(), audit=log, audit_loopback=True)
    with guarded(guard), egress_reason("self_test"), socket.create_connection(listener, timeout=2):
        pass
    log.close()
    ours = [line for line in lines(audit_path) if line["destination"] == f"127.0.0.1:{listener[1]}"]
    assert ours and ours[0]["event"] == "connect"
    assert ours[0]["allowed"] is True and ours[0]["reason"] == "self_test"


def test_udp_and_ipv6_are_refused(guard: EgressGuard, audit_path: Path) -> None:
    with guarded(guard):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            with pytest.raises(EgressBlockedError):
                udp.sendto(b"payload", (BLOCKED_V4, 53))
            with pytest.raises(EgressBlockedError):
                udp.sendmsg([b"payload"], [], 0, (BLOCKED_V4, 53))
            with pytest.raises(EgressBlockedError):
                udp.sendto(b"payload", ("<broadcast>", 53))
        try:
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError:
            v6 = None
        if v6 is not None:
            with v6, pytest.raises(EgressBlockedError):
                v6.connect((BLOCKED_V6, 443, 0, 0))
            with pytest.raises(EgressBlockedError):
                guard.check(
                    "socket.connect", (fake_socket(socket.AF_INET6), (f"::ffff:{BLOCKED_V4}", 80))
                )
    got = lines(audit_path)
    assert [line["op"] for line in got[:3]] == ["sendto", "sendmsg", "sendto"]
    assert got[2]["destination"] == "255.255.255.255:53"
    assert all(line["event"] == "refused" for line in got)
    assert "payload" not in audit_path.read_text()
    if v6 is not None:
        assert got[3]["destination"] == f"[{BLOCKED_V6}]:443"


def test_unix_sockets_are_local(guard: EgressGuard, audit_path: Path, tmp_path: Path) -> None:
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("no AF_UNIX")
    path = str(tmp_path / "s")
    if len(path) > 100:
        pytest.skip("temporary path too long for a unix socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)
        with guarded(guard), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as cli:
            cli.settimeout(2)
            cli.connect(path)
    assert lines(audit_path) == []


def test_lookups_of_unlisted_names_are_refused(guard: EgressGuard, audit_path: Path) -> None:
    with guarded(guard), egress_reason("model_download"):
        for call in (
            lambda: socket.getaddrinfo("not-listed.invalid", 443),
            lambda: socket.gethostbyname("not-listed.invalid"),
            lambda: socket.gethostbyname_ex("not-listed.invalid"),
            lambda: socket.gethostbyaddr(BLOCKED_V4),
            lambda: socket.getnameinfo((BLOCKED_V4, 80), 0),
        ):
            with pytest.raises(EgressBlockedError, match="egress refused: lookup of"):
                call()
    got = lines(audit_path)
    assert [line["op"] for line in got] == [
        "getaddrinfo",
        "gethostbyname",
        "gethostbyname",  # CPython raises the same event for gethostbyname_ex
        "gethostbyaddr",
        "getnameinfo",
    ]
    assert got[0]["destination"] == "not-listed.invalid:443"
    assert all(line["event"] == "refused" and line["reason"] == "model_download" for line in got)


def test_decisions_for_names_and_other_families(audit_path: Path) -> None:
    """Cases that a real socket call would send to DNS or to a host: the guard
    is asked directly."""
    log = AuditLog(audit_path)
    guard = EgressGuard(AllowedNetworks("asr2.corp.example, *.lab.example, 10.0.0.0/8"), audit=log)
    inet = fake_socket(socket.AF_INET)
    guard.check("socket.getaddrinfo", ("ASR2.corp.example", 443, 0, 0, 0))
    guard.check("socket.getaddrinfo", (b"gpu1.lab.example", "https", 0, 0, 0))
    guard.check("socket.connect", (inet, ("10.3.3.3", 443)))
    guard.check("socket.connect", (inet, ("asr2.corp.example", 443)))  # a name tuple
    guard.check("socket.getaddrinfo", (None, 8000, 0, 0, 0))  # passive bind
    guard.check("socket.getaddrinfo", ("0.0.0.0", 8000, 0, 0, 0))
    guard.check("socket.sendmsg", (inet, None))  # connected socket
    guard.check("socket.bind", (inet, ("0.0.0.0", 0)))  # not egress
    with pytest.raises(EgressBlockedError):
        guard.check("socket.connect", (inet, ("other.corp.example", 443)))
    with pytest.raises(EgressBlockedError):
        guard.check("socket.connect", (inet, ("3221225985", 80)))  # 192.0.2.1 as an integer
    packet = getattr(socket, "AF_PACKET", 17)
    with pytest.raises(EgressBlockedError):
        guard.check("socket.sendto", (fake_socket(packet), ("eth0", 0x0800)))
    log.close()
    got = lines(audit_path)
    assert [(line["event"], line["destination"]) for line in got[:4]] == [
        ("lookup", "ASR2.corp.example:443"),
        ("lookup", "gpu1.lab.example:https"),
        ("connect", "10.3.3.3:443"),
        ("connect", "asr2.corp.example:443"),
    ]
    assert [line["event"] for line in got[4:]] == ["refused"] * 3


def test_audit_only_mode_lets_everything_through(audit_path: Path) -> None:
    log = AuditLog(audit_path)
    guard = EgressGuard(AllowedNetworks(), enforce=False, audit=log)
    with egress_reason("remote_fallback"):
        guard.check("socket.connect", (fake_socket(socket.AF_INET), (BLOCKED_V4, 443)))
        guard.check("socket.getaddrinfo", ("api.example.com", 443, 0, 0, 0))
    log.close()
    first, second = lines(audit_path)
    assert first["event"] == "connect" and first["allowed"] is True
    assert first["inside"] is False and first["reason"] == "remote_fallback"
    assert second["event"] == "lookup" and second["inside"] is False


def test_enforcing_guard_refuses_when_the_audit_cannot_be_written(
    audit_path: Path,
) -> None:
    log = AuditLog(audit_path)
    log.close()  # writes now fail
    guard = EgressGuard(AllowedNetworks("10.0.0.0/8"), audit=log)
    log._file = audit_path.open("r")  # a file that cannot be written
    try:
        with pytest.raises(EgressBlockedError, match="audit log"):
            guard.check("socket.connect", (fake_socket(socket.AF_INET), ("10.0.0.1", 443)))
    finally:
        log.close()
    assert log.errors == 1


def test_deactivated_guard_is_back_to_normal(
    guard: EgressGuard, audit_path: Path, listener: tuple[str, int]
) -> None:
    activate(guard)
    assert current_guard() is guard
    with pytest.raises(EgressBlockedError):
        socket.getaddrinfo("not-listed.invalid", 80)
    assert deactivate() is guard
    assert current_guard() is None
    before = audit_path.read_text()
    with socket.create_connection(listener, timeout=2):
        pass
    assert socket.getaddrinfo(BLOCKED_V4, 9)
    egress.install()  # idempotent: still one hook, still inactive
    with socket.create_connection(listener, timeout=2):
        pass
    assert audit_path.read_text() == before


def test_guarded_restores_the_previous_guard(guard: EgressGuard) -> None:
    other = EgressGuard(AllowedNetworks(), enforce=False)
    with guarded(guard):
        with guarded(other):
            assert current_guard() is other
        assert current_guard() is guard
    assert current_guard() is None


# ---------------------------------------------------------------- context and threads


def test_reason_reaches_threads_only_when_carried(guard: EgressGuard, audit_path: Path) -> None:
    def attempt() -> str:
        try:
            socket.getaddrinfo("not-listed.invalid", 80)
        except EgressBlockedError as exc:
            return exc.code
        return "not refused"

    with guarded(guard), egress_reason("worker"), ThreadPoolExecutor(2) as pool:
        assert pool.submit(attempt).result(timeout=5) == "egress_refused"
        assert pool.submit(in_current_context(attempt)).result(timeout=5) == "egress_refused"
    assert [line["reason"] for line in lines(audit_path)] == [None, "worker"]


def test_audit_lines_are_valid_json_under_concurrency(guard: EgressGuard, audit_path: Path) -> None:
    def worker(n: int) -> None:
        with egress_reason(f"thread-{n}"):
            for _ in range(25):
                with pytest.raises(EgressBlockedError):
                    socket.getaddrinfo(f"host{n}.invalid", 80)

    with guarded(guard):
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    raw = audit_path.read_text().splitlines()
    assert len(raw) == 200
    for text in raw:
        line = json.loads(text)
        assert set(line) >= {"ts", "event", "destination", "reason", "allowed", "pid"}
        assert line["destination"] == f"host{line['reason'].split('-')[1]}.invalid:80"


# ---------------------------------------------------------------- HTTP clients


def test_urllib_fails_naming_egress(guard: EgressGuard, no_proxies: None) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with guarded(guard), pytest.raises(urllib.error.URLError) as info:
        opener.open(f"http://{BLOCKED_V4}:9/", timeout=2)
    assert "egress refused" in str(info.value)
    assert isinstance(info.value.reason, EgressBlockedError)


def test_urllib_by_name_is_refused_before_dns(guard: EgressGuard, no_proxies: None) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with guarded(guard), pytest.raises(urllib.error.URLError, match="egress refused"):
        opener.open("http://telemetry.invalid/", timeout=2)


def test_httpx_fails_naming_egress(guard: EgressGuard, no_proxies: None) -> None:
    httpx = pytest.importorskip("httpx")
    client = httpx.Client(trust_env=False, timeout=2)
    with guarded(guard), egress_reason("remote_fallback"), client:
        with pytest.raises(httpx.ConnectError) as info:
            client.get(f"http://{BLOCKED_V4}:9/")
        assert "egress refused" in str(info.value)
        assert is_egress_refusal(info.value)
        with pytest.raises(httpx.ConnectError, match="egress refused: lookup of"):
            client.get("https://api.invalid/v1")


def test_aiohttp_fails_naming_egress(
    guard: EgressGuard, audit_path: Path, no_proxies: None
) -> None:
    import aiohttp

    async def fetch(url: str) -> BaseException:
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                async with session.get(url):
                    pass
            except aiohttp.ClientError as exc:
                return exc
        raise AssertionError("the request went through")

    with guarded(guard), egress_reason("webhook"):
        by_ip = asyncio.run(fetch(f"http://{BLOCKED_V4}:9/"))
        by_name = asyncio.run(fetch("http://hooks.invalid/"))
    for exc in (by_ip, by_name):
        assert isinstance(exc, aiohttp.ClientConnectorError)
        assert "egress refused" in str(exc)
        assert is_egress_refusal(exc.os_error)
    connects = [line for line in lines(audit_path) if line["op"] == "connect"]
    assert connects and connects[0]["reason"] == "webhook"  # the task's context


def test_hub_download_is_stopped_by_the_guard(
    guard: EgressGuard,
    audit_path: Path,
    tmp_path: Path,
    no_proxies: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """models/store.py's hub download fails with the refusal, not a DNS error:
    the guard refuses the lookup of the hub's host before any query is sent."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    from earshot.core.errors import ModelNotFoundError
    from earshot.models.store import ModelStore

    with guarded(guard), egress_reason("model_download"):
        start = time.monotonic()
        with pytest.raises(ModelNotFoundError) as info:
            ModelStore(tmp_path / "store").pull("someone/not-a-real-model")
        assert time.monotonic() - start < 5
    assert "egress refused" in info.value.message
    assert is_egress_refusal(info.value)
    refused = lines(audit_path)
    assert refused and all(line["event"] == "refused" for line in refused)
    assert refused[0]["op"] == "getaddrinfo" and refused[0]["reason"] == "model_download"


# ---------------------------------------------------------------- configuration


def test_build_guard(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert build_guard(on_prem_only=False) is None
    assert build_guard(on_prem_only=False, audit_log="off") is None

    onprem = build_guard(on_prem_only=True, allowed_networks="10.0.0.0/8")
    assert onprem is not None and onprem.enforce
    assert onprem.audit is not None
    assert onprem.audit.path == str(tmp_path / "data" / "earshot" / "egress-audit.jsonl")
    assert Path(onprem.audit.path).parent.is_dir()
    assert onprem.describe() == {
        "enforcing": True,
        "allowed_networks": ["127.0.0.0/8", "::1/128", "localhost", "10.0.0.0/8"],
        "audit": True,
        "audit_loopback": False,
    }
    onprem.audit.close()

    quiet = build_guard(on_prem_only=True, audit_log="off")
    assert quiet is not None and quiet.enforce and quiet.audit is None

    stderr = build_guard(on_prem_only=True, audit_log="-")
    assert stderr is not None and stderr.audit is not None and stderr.audit.path == "-"

    watch = build_guard(on_prem_only=False, audit_log=str(tmp_path / "a.jsonl"))
    assert watch is not None and not watch.enforce and watch.audit is not None
    watch.audit.close()

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as info:
        build_guard(on_prem_only=True, audit_log=str(tmp_path / "file" / "audit.jsonl"))
    assert info.value.details["field"] == "audit_log"
    with pytest.raises(ConfigError) as info:
        build_guard(on_prem_only=True, allowed_networks="0.0.0.0/0")
    assert info.value.details["field"] == "allowed_networks"


def test_stderr_audit_log(capsys: pytest.CaptureFixture[str]) -> None:
    guard = EgressGuard(AllowedNetworks(), audit=AuditLog("-"))
    with pytest.raises(EgressBlockedError):
        guard.check("socket.connect", (fake_socket(socket.AF_INET), (BLOCKED_V4, 9)))
    line = json.loads(capsys.readouterr().err)
    assert line["destination"] == f"{BLOCKED_V4}:9"
