"""Sovereignty end to end: the remote fallback, on-prem-only mode and its
refusals, the audit log, the stated policy, and the model's integrity.

The "remote" is tests/kit/fake_remote.py: an OpenAI-compatible server on
127.0.0.1, written for these tests, that counts every byte it receives at
the socket. The local backend is the tone-language reader made slow, so that
a few fast streams push the local queue past its high watermark.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import soundfile as sf
from aiohttp import ClientSession, FormData
from prometheus_client.parser import text_string_to_metric_families

from earshot.clients.audio import encode_audio
from earshot.clients.stream import transcribe_stream
from earshot.core.errors import ConfigError, ModelIntegrityError
from earshot.models.remote import RemoteBackend
from earshot.models.store import ModelStore
from earshot.service.config import load_config
from earshot.service.engine.engine import Engine
from earshot.service.engine.startup import (
    build_remote,
    check_sovereignty,
    stated_policy,
    verify_model,
)
from earshot.service.sovereignty import build_guard, guarded
from tests.kit.fake_remote import FakeRemote, fake_remote
from tests.kit.live import final_texts, raw_stream, running_server, tone_engine
from tests.kit.tones import ToneBackend, make_speech, random_script

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]
CLI = (sys.executable, "-m", "earshot.service.cli")
T = TypeVar("T")

# Each local batch takes 0.4 s and holds one window; the queue counts as
# overloaded from 2 queued jobs. Four streams sent faster than real time
# queue far more finals than that.
SLOW = {"max_batch": 1, "max_queue": 2}


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(asyncio.wait_for(main(), timeout=150))


def slow_engine(
    remote: FakeRemote | None = None, *, delay_s: float = 0.4, **overrides: Any
) -> Engine:
    settings = {**SLOW, **overrides}
    if remote is not None:
        settings["remote_url"] = remote.url
    fallback = build_remote(load_config(env={}, overrides=settings))
    return tone_engine(ToneBackend(delay_s=delay_s), fallback=fallback, **settings)


def scripts(n: int) -> list[list[list[str]]]:
    # Two words at least: a lone 0.24 s word is under the endpointer's minimum speech.
    return [random_script(4, (2, 3), seed=100 + i) for i in range(n)]


async def four_streams(url: str, batch: Sequence[list[list[str]]]) -> list[Any]:
    ws = url.replace("http://", "ws://") + "/v1/listen"
    audios = [make_speech(script, 16000)[0] for script in batch]
    return list(
        await asyncio.gather(
            *(
                transcribe_stream(ws, audio, realtime=False, interim_results=False, warnings=True)
                for audio in audios
            )
        )
    )


def texts(result: Any) -> list[str]:
    return [
        m["channel"]["alternatives"][0]["transcript"]
        for m in result.finals.get(0, [])
        if m["channel"]["alternatives"][0]["transcript"]
    ]


def fallback_samples(metrics_text: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "earshot_fallback_uses_total":
                out[(s.labels["backend"], s.labels["reason"])] = s.value
    return out


def overloaded_through_the_fallback(
    remote: FakeRemote, **overrides: Any
) -> tuple[list[Any], list[list[list[str]]], str, Engine]:
    batch = scripts(4)
    engine = slow_engine(remote, **overrides)

    async def main() -> tuple[list[Any], str]:
        async with running_server(engine) as url:
            results = await four_streams(url, batch)
            async with ClientSession() as http, http.get(url + "/metrics") as resp:
                return results, await resp.text()

    results, metrics = run(main)
    return results, batch, metrics, engine


# -- the fallback in default mode ------------------------------------------------


def test_overload_goes_to_the_remote_and_every_use_is_visible() -> None:
    with fake_remote() as remote:
        results, batch, metrics, engine = overloaded_through_the_fallback(remote)
        received = remote.bytes_received
        posted = [r for r in remote.requests if r.path == "/v1/audio/transcriptions"]

    # Every word arrives, whichever backend decoded it.
    for result, script in zip(results, batch, strict=True):
        assert result.close_code == 1000
        assert texts(result) == [" ".join(u) for u in script]
    # The remote received windows, as WAV uploads.
    assert posted and received > sum(len(r.body) for r in posted) * 0.99
    assert all(r.value("response_format") == "verbose_json" for r in posted)
    remote_name = engine.scheduler.fallback.name  # type: ignore[union-attr]
    # Clients see it: in the affected Results, in a Warning, in the last Metadata.
    finals = [m for r in results for m in r.finals.get(0, [])]
    by_remote = [m for m in finals if m["earshot"]["provenance"]["backend"] == "remote"]
    local = [m for m in finals if m["earshot"]["provenance"]["backend"] == "local"]
    assert len(by_remote) == len(posted)
    for m in by_remote:
        prov = m["earshot"]["provenance"]
        assert prov["fallback"] == "overload" and prov["remote"] == remote.url
    for m in local:
        assert m["earshot"]["provenance"]["model_sha256"] == engine.client_provenance()["sha256"]
    users = [r for r in results if any(m in by_remote for m in r.finals.get(0, []))]
    for r in users:
        warnings = [m for m in r.messages if m["type"] == "Warning"]
        codes = [w["code"] for w in warnings]
        assert codes.count("remote_fallback") == 1
        assert r.messages[-1]["earshot"]["backends_used"][remote_name] >= 1
    # The metric counts it.
    assert fallback_samples(metrics)[(remote_name, "overload")] == len(posted)
    # The policy says a remote may be used, and for what.
    policy = engine.policy
    assert policy["on_prem_only"] is False
    assert policy["remote_backends"][0]["base_url"] == remote.url
    assert policy["fallback"] == {"enabled": True, "on": ["failure", "overload"]}


def test_nothing_goes_remote_without_a_remote_configured() -> None:
    with fake_remote() as remote:
        batch = scripts(2)
        engine = slow_engine(None, lag_limit_s=35.0)

        async def main() -> list[Any]:
            async with running_server(engine) as url:
                return await four_streams(url, batch)

        results = run(main)
        assert remote.bytes_received == 0
    for result, script in zip(results, batch, strict=True):
        assert texts(result) == [" ".join(u) for u in script]
        assert all(
            m["earshot"]["provenance"]["backend"] == "local" for m in result.finals.get(0, [])
        )
    assert engine.policy["remote_backends"] == [] and engine.policy["fallback"]["enabled"] is False


# -- on-prem-only mode ---------------------------------------------------------------


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "serve", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_on_prem_only_refuses_to_start_with_a_remote_outside_the_allowed_networks(
    micro_model: Path,
) -> None:
    with fake_remote() as remote:
        proc = serve(
            "--model",
            str(micro_model),
            "--on-prem-only",
            "--allowed-networks",
            "10.20.0.0/16",
            "--remote-url",
            "http://192.0.2.10:8000/v1",
            env={"EARSHOT_AUDIT_LOG": "off"},
        )
        assert remote.bytes_received == 0
    assert proc.returncode == 3, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "192.0.2.10" in line and "allowed_networks" in line and "remote_url" in line
    assert "[egress_refused]" in line


def test_on_prem_only_refuses_hub_downloads_and_says_how_to_import() -> None:
    with pytest.raises(ConfigError) as info:
        cfg = load_config(env={}, overrides={"on_prem_only": True, "allow_download": True})
        check_sovereignty(cfg)
    assert info.value.details["field"] == "allow_download"
    assert "earshot models import" in info.value.message
    proc = serve("--model", "large-v3", "--on-prem-only", "--allow-download")
    assert proc.returncode == 2 and "allow_download" in proc.stderr


def test_on_prem_only_with_the_remote_inside_the_allowed_networks_works(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with fake_remote() as remote:
        cfg = load_config(
            env={},
            overrides={"on_prem_only": True, "remote_url": remote.url, "allowed_networks": ""},
        )
        check_sovereignty(cfg)  # 127.0.0.1 is always the operator's own
        guard = build_guard(on_prem_only=True, audit_log=str(audit), audit_loopback=True)
        assert guard is not None
        try:
            with guarded(guard):
                results, batch, _, engine = overloaded_through_the_fallback(
                    remote, on_prem_only=True
                )
        finally:
            if guard.audit is not None:
                guard.audit.close()
        posted = [r for r in remote.requests if r.path == "/v1/audio/transcriptions"]
    assert posted
    for result, script in zip(results, batch, strict=True):
        assert texts(result) == [" ".join(u) for u in script]
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    port = remote.url.split(":")[2].split("/")[0]
    to_remote = [
        line for line in lines if line["event"] == "connect" and line["destination"].endswith(port)
    ]
    assert to_remote and all(line["allowed"] for line in to_remote)
    assert all("remote fallback (overload)" in line["reason"] for line in to_remote)
    assert engine.policy["on_prem_only"] is True


def test_on_prem_only_without_a_remote_under_overload_sends_nothing_anywhere() -> None:
    """The same overload with no remote: the recording server hears nothing,
    open streams get the lag warning and close code with their finals so far,
    new streams and HTTP requests get 503."""
    speech, _ = make_speech(random_script(8, (2, 3), seed=7), 16000, gap_s=0.8)
    pcm = encode_audio(speech, "linear16")
    # Live callers: 0.1 s of audio every 0.1 s (a client faster than real time
    # is held back by back-pressure instead; it is not lagging).
    chunks: list[bytes | str | float] = []
    for i in range(0, len(pcm), 3200):
        chunks += [pcm[i : i + 3200], 0.1]
    buffer = io.BytesIO()
    sf.write(buffer, speech[: 16000 * 2], 16000, format="WAV", subtype="PCM_16")
    wav = buffer.getvalue()

    with fake_remote() as remote:
        engine = slow_engine(
            None,
            delay_s=1.5,
            on_prem_only=True,
            lag_warning_s=1.0,
            lag_limit_s=4.0,
            max_queue=1,
        )

        async def main() -> Any:
            async with running_server(engine) as url:
                ws = url.replace("http://", "ws://") + "/v1/listen"
                streams = [
                    asyncio.create_task(raw_stream(ws, chunks, query=q))
                    for q in ("encoding=linear16&sample_rate=16000&warnings=true",) * 3
                ]
                refused: list[tuple[int, dict[str, Any]]] = []
                posted: list[tuple[int, dict[str, Any]]] = []
                async with ClientSession() as http:
                    for _ in range(100):
                        await asyncio.sleep(0.05)
                        async with http.get(url + "/v1/listen") as resp:
                            if resp.status != 503:
                                continue
                            refused.append((resp.status, await resp.json()))
                        # Overloaded now: an HTTP API request gets 503 as well.
                        form = FormData()
                        form.add_field("model", "whisper-1")
                        form.add_field("file", wav, filename="a.wav")
                        async with http.post(url + "/v1/audio/transcriptions", data=form) as resp:
                            posted.append((resp.status, await resp.json()))
                        break
                return await asyncio.gather(*streams), refused, posted

        outcomes, refused, posted = run(main)
        assert remote.bytes_received == 0
    assert refused and refused[0][1]["code"] == "server_full"
    assert posted[0][0] == 503 and posted[0][1]["error"]["code"] == "server_full"
    for messages, code in outcomes:
        assert code == 4429
        errors = [m for m in messages if m["type"] == "Error"]
        assert [e["code"] for e in errors] == ["stream_lagging"]
        assert any(m["type"] == "Warning" and m["code"] == "lagging" for m in messages)
        # The finals decoded before the close were delivered.
        assert final_texts(messages)
        assert all(
            m["earshot"]["provenance"]["backend"] == "local"
            for m in messages
            if m["type"] == "Results" and m["is_final"]
        )


def test_the_policy_is_stated_in_metadata_models_and_policy_endpoint() -> None:
    with fake_remote() as remote:
        engine = slow_engine(remote, on_prem_only=True)

        async def main() -> Any:
            async with running_server(engine) as url, ClientSession() as http:
                async with http.get(url + "/v1/policy") as resp:
                    policy = await resp.json()
                async with http.get(url + "/v1/models") as resp:
                    models = await resp.json()
                ws = url.replace("http://", "ws://") + "/v1/listen"
                messages, _ = await raw_stream(ws, ['{"type": "CloseStream"}'])
                async with http.get(ws.replace("ws://", "http://") + "?model=large-v3") as resp:
                    remote_only = resp.status, await resp.json()
                form = FormData()
                form.add_field("model", "large-v3")
                form.add_field("file", b"RIFF", filename="a.wav")
                async with http.post(url + "/v1/audio/transcriptions", data=form) as resp:
                    over_http = resp.status, await resp.json()
                return policy, models, messages, remote_only, over_http

        policy, models, messages, (status, body), (http_status, http_body) = run(main)
        assert remote.bytes_received == 0
    assert policy["on_prem_only"] is True
    assert policy["remote_backends"][0]["inside_allowed_networks"] is True
    assert policy["hub_downloads"] == "refused"
    assert policy["state"]["fallback_circuit"] == "closed"
    stated = {k: v for k, v in policy.items() if k != "state"}
    assert messages[0]["earshot"]["policy"] == stated
    assert all(m["earshot"]["policy"] == stated for m in models["data"])
    # A model this server would have to fetch is refused with its own code.
    assert status == 400 and body["code"] == "model_not_local"
    assert http_status == 400 and http_body["error"]["code"] == "model_not_local"


# -- the model's integrity -------------------------------------------------------------


def test_a_model_changed_by_one_byte_is_refused(micro_model: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    resolved = store.import_folder(micro_model, "micro")
    cfg = load_config(env={})
    assert verify_model(resolved.path, cfg) is True
    with (resolved.path / "model.bin").open("r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0x01]))

    verify = subprocess.run(
        [*CLI, "--models-dir", str(tmp_path / "store"), "models", "verify", "micro"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 1 and "MISMATCH" in verify.stdout
    proc = serve("--models-dir", str(tmp_path / "store"), "--model", "micro")
    assert proc.returncode == 3, proc.stderr
    assert "model_checksum_mismatch" in proc.stderr and "model.bin" in proc.stderr
    assert "allow_unverified_model" in proc.stderr
    with pytest.raises(ModelIntegrityError):
        verify_model(resolved.path, cfg)
    # Told otherwise explicitly, it is served, and the policy says so.
    unsafe = load_config(env={}, overrides={"allow_unverified_model": True})
    assert verify_model(resolved.path, unsafe) is False
    assert (
        stated_policy(unsafe, remote=None, guard=None, model_verified=False)[
            "model_record_verified"
        ]
        is False
    )
    shutil.rmtree(tmp_path / "store")


def test_remote_backend_is_built_only_when_configured() -> None:
    assert build_remote(load_config(env={})) is None
    remote = build_remote(load_config(env={}, overrides={"remote_url": "http://10.0.0.5:8000/v1"}))
    assert isinstance(remote, RemoteBackend)
    assert remote.base_url == "http://10.0.0.5:8000/v1" and remote.requests_sent == 0
    remote.close()


def test_earshot_serve_on_prem_only_serves_and_audits(
    micro_model: Path, testdata: Path, tmp_path: Path
) -> None:
    """The real process in on-prem-only mode: it starts with its guard, serves
    a stream and answers /v1/policy; nothing it did reached beyond loopback."""
    import signal
    import urllib.request

    from earshot.service.engine.audiofile import load_audio
    from tests.kit.paths import audio_dir
    from tests.test_shutdown import free_port, wait_healthy

    port = free_port()
    audit = tmp_path / "audit.jsonl"
    log = (tmp_path / "server.log").open("wb")
    flags = ["--model", str(micro_model), "--port", str(port), "--device", "cpu"]
    flags += ["--on-prem-only", "--allowed-networks", "10.20.0.0/16", "--audit-log", str(audit)]
    proc = subprocess.Popen(
        [*CLI, "serve", *flags],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(port, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/policy", timeout=10) as resp:
            policy = json.loads(resp.read())
        speech = load_audio(audio_dir() / "librispeech" / "1089-134686-0000.flac").samples
        result = asyncio.run(
            asyncio.wait_for(
                transcribe_stream(
                    f"ws://127.0.0.1:{port}/v1/listen", speech[: 16000 * 4], realtime=False
                ),
                60,
            )
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert policy["on_prem_only"] is True and policy["hub_downloads"] == "refused"
    assert policy["egress_guard"]["enforcing"] is True
    assert "10.20.0.0/16" in policy["allowed_networks"]
    assert policy["model_record_verified"] is None  # a plain folder: nothing to compare
    assert result.close_code == 1000 and result.finals[0]
    assert result.metadata is not None
    assert result.metadata["earshot"]["policy"]["on_prem_only"] is True
    # The audit log exists and records no connection outside loopback: there was none.
    assert audit.exists()
    assert audit.read_text() == ""
