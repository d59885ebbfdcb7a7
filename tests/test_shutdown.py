"""Graceful shutdown of a real ``earshot serve`` process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from earshot.clients.audio import encode_audio
from earshot.clients.stream import StreamClient, StreamRefusedError
from earshot.service.engine.audiofile import load_audio
from tests.kit.paths import audio_dir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(port: int, proc: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited at startup"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                if conn.recv(64).split(b" ")[1:2] == [b"200"]:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not start")


def test_sigterm_during_eight_streams(micro_model: Path, testdata: Path, tmp_path: Path) -> None:
    import subprocess

    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    env = {**os.environ, "EARSHOT_SHUTDOWN_TIMEOUT_S": "15"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "earshot.service.cli",
            "serve",
            "--model",
            str(micro_model),
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(port, proc)
        speech = load_audio(audio_dir() / "librispeech" / "1089-134686-0000.flac").samples
        pcm = encode_audio(speech[: 16000 * 3], "linear16")  # 3 s: mid-utterance
        url = f"ws://127.0.0.1:{port}/v1/listen"

        async def one(i: int, started: asyncio.Event, go: asyncio.Event) -> dict[str, Any]:
            finals: list[dict[str, Any]] = []
            errors: list[str] = []
            async with StreamClient(url, interim_results=False) as client:
                for j in range(0, len(pcm), 3200):
                    await client.send_audio(pcm[j : j + 3200])
                started.set()
                async for m in client.messages():
                    if m.get("type") == "Results" and m["is_final"]:
                        finals.append(m)
                    elif m.get("type") == "Error":
                        errors.append(m["code"])
            return {"finals": finals, "errors": errors, "code": client.close_code}

        async def main() -> tuple[list[dict[str, Any]], float, int | None]:
            flags = [asyncio.Event() for _ in range(8)]
            go = asyncio.Event()
            tasks = [asyncio.create_task(one(i, flags[i], go)) for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 30)
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            # New streams are refused while it shuts down, or cannot connect at all.
            refused: int | None = None
            try:
                async with StreamClient(url, open_timeout=2):
                    refused = 0
            except StreamRefusedError as exc:
                refused = exc.status
            except Exception:
                refused = -1  # already gone
            return results, t0, refused

        results, t0, refused = asyncio.run(main())
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    server_log = (tmp_path / "server.log").read_text()
    # The log is JSON lines, with the stream's id on every line about a stream,
    # and without what was said.
    lines = [json.loads(line) for line in server_log.splitlines() if line.strip()]
    assert lines[-1]["message"] == "stopped", server_log
    opened = {line["session"] for line in lines if line["message"] == "stream opened"}
    closed = {line["session"]: line for line in lines if line["message"] == "stream closed"}
    sessions = {r["finals"][0]["metadata"]["request_id"] for r in results}
    assert opened == sessions == set(closed)
    assert {line["close_code"] for line in closed.values()} == {1001}
    for r in results:
        for final in r["finals"]:
            text = final["channel"]["alternatives"][0]["transcript"].strip()
            assert text not in server_log or len(text) < 4
    assert code == 0
    assert elapsed < 15 + 10
    for r in results:
        assert r["code"] == 1001, r
        assert r["errors"] == ["server_shutting_down"]
        assert r["finals"], "every stream gets a final for the speech it sent"
        last = r["finals"][-1]
        assert last["start"] + last["duration"] >= 2.5
        assert last["channel"]["alternatives"][0]["transcript"]
    assert refused in (503, -1)


def test_sigterm_drains_with_503_and_exits_on_time_despite_stalled_uploads(
    micro_model: Path, tmp_path: Path
) -> None:
    """A load balancer sees a draining backend, not a dead one: after SIGTERM
    the listener answers /readyz and new streams with 503 and Retry-After for
    at least drain_s, and the process exits within shutdown_timeout_s even
    though 30 uploads have stopped sending their bodies."""
    import subprocess

    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    env = {
        **os.environ,
        "EARSHOT_SHUTDOWN_TIMEOUT_S": "6",
        "EARSHOT_DRAIN_S": "2",
        "EARSHOT_BODY_TIMEOUT_S": "120",
    }
    argv = [sys.executable, "-m", "earshot.service.cli", "serve", "--model", str(micro_model)]
    proc = subprocess.Popen(
        [*argv, "--port", str(port), "--device", "cpu"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stalled: list[socket.socket] = []

    def ask(request: bytes) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
            conn.sendall(request)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        return int(answer.split(b" ")[1]), answer

    try:
        wait_healthy(port, proc)
        head = (
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=abc\r\nContent-Length: 1000000\r\n\r\n"
            b'--abc\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'
        )
        for _ in range(30):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(head)
            stalled.append(conn)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready, ready_answer = ask(b"GET /readyz HTTP/1.0\r\n\r\n")
        listen, listen_answer = ask(b"GET /v1/listen HTTP/1.0\r\n\r\n")
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        for conn in stalled:
            conn.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert ready == 503 and b'"ready": false' in ready_answer
    assert listen == 503 and b"server_shutting_down" in listen_answer
    assert b"Retry-After: 5" in listen_answer
    assert code == 0
    assert 2.0 <= elapsed <= 6 + 1.0, elapsed
    lines = (tmp_path / "server.log").read_text().splitlines()
    assert json.loads(lines[-1])["message"] == "stopped"
