"""Soak: a real server under hours of churn, and memory after disconnect storms.

Starts ``earshot serve`` with the real tiny.en model (from the test suite's
model store, ``tests.kit.real_models.real_model_store()``) as a subprocess on
127.0.0.1, and keeps ``--streams`` client slots busy for ``--minutes``. Each
slot opens a stream, streams real LibriSpeech speech in real time (whole
recordings joined by 1.2 to 1.6 s of silence), ends it, pauses briefly and
reconnects. A share of the streams misbehave:

* ``normal``: speech, ``CloseStream``, reads everything;
* ``slow_reader``: the same, but sleeps 0.2 to 0.8 s before each read;
* ``never_reader``: never reads a message (small receive buffer), streams for
  ``--never-reader-s`` and then drops the TCP connection;
* ``drop``: drops the TCP connection (no close frame) in the middle of an
  utterance;
* ``odd_bytes``: audio in frames of odd byte counts, and one stray byte at the
  end (a non-fatal ``audio_partial_frame`` Error);
* ``bad_json``: invalid text frames between the audio (non-fatal
  ``invalid_message`` Errors);
* ``oversized``: a binary frame just over ``max_frame_bytes`` (closed 4413),
  or one over four times it (closed 1009 by the websocket layer).

The streams that end with ``CloseStream`` (``normal``, ``slow_reader``,
``odd_bytes``, ``bad_json``) must get every utterance back: a stream loses
``max(utterances - finals with text, utterances no final with text overlaps)``
finals, and every utterance of such a stream that did not close with 1000.
The server's resident memory (VmRSS of /proc/PID/status) is sampled every
``--sample-s``; after the load it is sampled again after ``--idle-s`` of
idleness, and once more after asking the server to ``malloc_trim(0)``.

``--storms K`` instead runs K storms of ``--storm-clients`` clients that each
open a stream, send ``--storm-audio-s`` of speech in real time and drop the
TCP connection, with ``--idle-s`` of idleness after each storm, and samples
the RSS throughout. The server runs inside a small wrapper (this file,
``--serve-wrapped``) that answers SIGUSR1 with ``malloc_trim(0)`` and SIGUSR2
with a snapshot (live objects by type, the engine's streams, glibc's
``mallinfo2``, ``tracemalloc``'s top allocations when ``SOAK_TRACEMALLOC`` is
set) written to a JSON file; ``SOAK_TRIM_S=N`` makes it trim every N s. Any
``--env NAME=VALUE`` (e.g. ``MALLOC_ARENA_MAX=2``) goes to the server's
environment, so allocator experiments need no code change
(``SOAK_MALLOPT_MMAP_THRESHOLD=N`` makes the wrapper call ``mallopt`` itself):

    python bench/soak.py --minutes 30                      # 6 slots (0.8 x 8)
    python bench/soak.py --minutes 5 --out bench/results/soak.json
    python bench/soak.py --storms 4 --label baseline
    python bench/soak.py --storms 4 --label arena2 --env MALLOC_ARENA_MAX=2
    python bench/soak.py --storms 4 --label trim --trim-after-storm
    python bench/soak.py --storms 4 --label tracemalloc --env SOAK_TRACEMALLOC=25

By default the server runs with short contexts (``--interim-short-context
--final-short-context``), the configuration the README's table measured at 8
streams kept in real time on this CPU (``--server-defaults`` drops them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import random
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.streams import (  # noqa: E402
    BYTES_PER_SECOND,
    SAMPLE_RATE,
    ServerProcess,
    free_port,
    load_utterances,
    log_problems,
    machine_info,
)
from earshot.clients.stream import StreamClient, encode_audio  # noqa: E402

Message = dict[str, Any]

CHECKED = ("normal", "slow_reader", "odd_bytes", "bad_json")
"""Behaviours that end with CloseStream: each must get every utterance back as a final."""
BEHAVIOURS = ("normal", "slow_reader", "never_reader", "drop", "odd_bytes", "bad_json", "oversized")
DEFAULT_MIX = (
    "normal=40,slow_reader=10,never_reader=5,drop=15,odd_bytes=10,bad_json=10,oversized=10"
)
SHORT_CONTEXT = ["--interim-short-context", "--final-short-context"]
MAX_FRAME_BYTES = 1_048_576  # service/config.py's default max_frame_bytes
BAD_TEXT_FRAMES = (
    "{not json",
    "[1, 2, 3]",
    '{"type": "Bogus"}',
    '{"type": 7}',
    "\u00ff\u00fe" * 20,
)
LEAD_SILENCE_S = 0.5
GAP_S = (1.2, 1.6)  # silence after each recording: well past the 500 ms endpointing


# ---------------------------------------------------------------------------
# The server inside a wrapper that can trim and describe its own memory


def _rss_kb(pid: int | str = "self") -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo(libc: Any) -> dict[str, float]:
    """glibc's totals over every arena, in MB (counts as they are)."""
    with contextlib.suppress(AttributeError):
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        mb = 1024.0 * 1024.0
        return {
            "heap_mb": round(info.arena / mb, 1),  # sbrk'd + arena heaps
            "mmapped_mb": round(info.hblkhd / mb, 1),
            "mmapped_chunks": float(info.hblks),
            "in_use_mb": round(info.uordblks / mb, 1),
            "free_in_heap_mb": round(info.fordblks / mb, 1),
            "free_chunks": float(info.ordblks),
            "trimmable_top_mb": round(info.keepcost / mb, 1),
        }
    return {}


def _snapshot(libc: Any, previous: list[Any]) -> dict[str, Any]:
    """What the server process holds now (runs inside it, from a signal handler)."""
    import tracemalloc

    from earshot.service.http.livestream import LiveStream

    gc.collect()
    objects = gc.get_objects()
    by_type = Counter(type(o).__name__ for o in objects)
    streams = sum(1 for o in objects if isinstance(o, LiveStream))
    interesting = (
        "LiveStream",
        "StreamSession",
        "StreamingVad",
        "RingBuffer",
        "_Channel",
        "WebSocketResponse",
        "DecodeJob",
        "_Entry",
        "Task",
        "Future",
        "Request",
        "RequestHandler",
        "_ConnectionHandler",
    )
    out: dict[str, Any] = {
        "rss_mb": round((_rss_kb() or 0) / 1024.0, 1),
        "gc_objects": len(objects),
        # Streams of every protocol are subclasses of LiveStream.
        "live": {
            name: by_type.get(name, 0) if name != "LiveStream" else streams for name in interesting
        },
        "top_types": by_type.most_common(20),
        "mallinfo2": _mallinfo(libc),
    }
    for o in objects:
        if type(o).__name__ == "Engine" and hasattr(o, "scheduler"):
            sched = o.scheduler
            out["engine"] = {
                "active_streams": o.active_streams,
                "streams": len(o.streams),
                "streams_total": sum(o.streams_opened.values()),
                "closes": {str(k): v for k, v in o.closes.items()},
                "queued_finals": sched.queue_depth.finals,
                "queued_interims": sched.queue_depth.interims,
            }
        elif type(o).__name__ == "Metrics" and hasattr(o, "_sessions"):
            out["metrics_sessions"] = len(o._sessions)
    del objects
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        traced, peak = tracemalloc.get_traced_memory()
        out["tracemalloc"] = {
            "traced_mb": round(traced / 2**20, 1),
            "peak_mb": round(peak / 2**20, 1),
            "top": [
                {"where": str(s.traceback[0]), "kb": round(s.size / 1024), "count": s.count}
                for s in snap.statistics("lineno")[:15]
            ],
        }
        if previous:
            out["tracemalloc"]["growth_since_last"] = [
                {
                    "where": str(d.traceback[0]),
                    "kb": round(d.size_diff / 1024),
                    "count": d.count_diff,
                }
                for d in snap.compare_to(previous[0], "lineno")[:15]
            ]
        previous[:] = [snap]
    return out


def serve_wrapped(argv: list[str]) -> int:
    """``earshot serve ARGV`` with SIGUSR1 = malloc_trim(0), SIGUSR2 = snapshot
    to ``$SOAK_SNAPSHOT_DIR/snapshot-N.json``."""
    import tracemalloc

    libc = ctypes.CDLL("libc.so.6")
    frames = int(os.environ.get("SOAK_TRACEMALLOC", "0") or 0)
    if frames > 0:
        tracemalloc.start(frames)
    out_dir = Path(os.environ.get("SOAK_SNAPSHOT_DIR", "."))
    count = [0]
    previous: list[Any] = []

    def trim(_sig: int, _frame: object) -> None:
        before = _rss_kb() or 0
        started = time.perf_counter()
        released = libc.malloc_trim(0)
        after = _rss_kb() or 0
        print(
            f"SOAK malloc_trim(0) -> {released}: RSS {before / 1024:.1f} -> "
            f"{after / 1024:.1f} MB in {time.perf_counter() - started:.3f} s",
            file=sys.stderr,
            flush=True,
        )

    def snapshot(_sig: int, _frame: object) -> None:
        count[0] += 1
        # glibc's per-arena figures, into the server log (stderr).
        print(f"SOAK malloc_stats at snapshot {count[0]}:", file=sys.stderr, flush=True)
        libc.malloc_stats()
        path = out_dir / f"snapshot-{count[0]}.json"
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps(_snapshot(libc, previous), indent=1))
        tmp.rename(path)

    threshold = int(os.environ.get("SOAK_MALLOPT_MMAP_THRESHOLD", "0") or 0)
    if threshold > 0:
        # What the recommended fix would do in cmd_serve: M_MMAP_THRESHOLD (-3)
        # fixed, which also turns off glibc's dynamic raising of it.
        ok = libc.mallopt(-3, threshold)
        print(f"SOAK mallopt(M_MMAP_THRESHOLD, {threshold}) -> {ok}", file=sys.stderr)
    signal.signal(signal.SIGUSR1, trim)
    signal.signal(signal.SIGUSR2, snapshot)
    every = float(os.environ.get("SOAK_TRIM_S", "0") or 0)
    if every > 0:

        def trimmer() -> None:
            while True:
                time.sleep(every)
                libc.malloc_trim(0)

        threading.Thread(target=trimmer, name="soak-malloc-trim", daemon=True).start()
    from earshot.service.cli import main as cli_main

    return cli_main(["serve", *argv])


class WrappedServer(ServerProcess):
    """bench/streams.py's ServerProcess, run through :func:`serve_wrapped`
    with extra environment."""

    def __init__(
        self, args: list[str], port: int, log_path: Path, env: dict[str, str], snap_dir: Path
    ) -> None:
        super().__init__(args, port, log_path)
        self.env = env
        self.snap_dir = snap_dir
        self._snaps = 0

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--serve-wrapped", *self.args]

    def __enter__(self) -> WrappedServer:
        self.snap_dir.mkdir(parents=True, exist_ok=True)
        for old in self.snap_dir.glob("snapshot-*.json"):
            old.unlink()
        self.spawn(
            self.command,
            env={**os.environ, **self.env, "SOAK_SNAPSHOT_DIR": str(self.snap_dir)},
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return int(self.proc.pid)

    def rss_mb(self) -> float | None:
        kb = _rss_kb(self.pid)
        return None if kb is None else kb / 1024.0

    def threads(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        return None

    async def trim(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)
        await asyncio.sleep(1.0)

    async def snapshot(self, timeout_s: float = 60.0) -> dict[str, Any]:
        self._snaps += 1
        path = self.snap_dir / f"snapshot-{self._snaps}.json"
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.exists():
                data: dict[str, Any] = json.loads(path.read_text())
                return data
            await asyncio.sleep(0.2)
        return {"error": f"no snapshot within {timeout_s:g} s"}

    def trim_lines(self) -> list[str]:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return [line for line in text.splitlines() if line.startswith("SOAK ")]
        return []


def active_streams(port: int) -> int | None:
    """``active_streams`` of ``/readyz`` (answered 200 or 503)."""
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=2.0) as reply:
            return int(json.loads(reply.read())["active_streams"])
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(Exception):
            return int(json.loads(exc.read())["active_streams"])
    except (OSError, ValueError, KeyError):
        pass
    return None


# ---------------------------------------------------------------------------
# Speech


@dataclass(frozen=True)
class Script:
    """What one stream sends: linear16 ``pcm`` and, for each recording in it,
    its ``(start, end)`` in seconds on the stream clock."""

    pcm: bytes
    utterances: tuple[tuple[float, float], ...]
    names: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return len(self.pcm) / BYTES_PER_SECOND


class Speech:
    """The shared LibriSpeech recordings, encoded once."""

    def __init__(self) -> None:
        utterances, self.names = load_utterances()
        self.recordings = [encode_audio(u, "linear16") for u in utterances]

    def script(self, rng: random.Random, count: int, min_seconds: float = 0.0) -> Script:
        """``count`` consecutive recordings (more while under ``min_seconds``)
        from a random one on, each followed by a gap of silence."""
        first = rng.randrange(len(self.recordings))
        parts = [_silence(LEAD_SILENCE_S)]
        spans: list[tuple[float, float]] = []
        names: list[str] = []
        at = LEAD_SILENCE_S
        i = 0
        while i < count or at < min_seconds:
            rec = self.recordings[(first + i) % len(self.recordings)]
            names.append(self.names[(first + i) % len(self.recordings)])
            gap = _silence(rng.uniform(*GAP_S))
            spans.append((at, at + len(rec) / BYTES_PER_SECOND))
            parts += [rec, gap]
            at += (len(rec) + len(gap)) / BYTES_PER_SECOND
            i += 1
        return Script(b"".join(parts), tuple(spans), tuple(names))

    def opening(self, index: int, seconds: float) -> bytes:
        """The first ``seconds`` of recording ``index`` (mod F), after 0.3 s of silence."""
        rec = self.recordings[index % len(self.recordings)]
        need = round(seconds * SAMPLE_RATE) * 2
        return _silence(0.3) + rec[:need]


def _silence(seconds: float) -> bytes:
    return bytes(round(seconds * SAMPLE_RATE) * 2)


# ---------------------------------------------------------------------------
# One client


@dataclass
class SessionResult:
    behaviour: str
    slot: int
    started: float
    outcome: str = "closed"
    """closed (the server closed), dropped (we dropped it), refused:CODE,
    connect, timeout, server_dropped, exception:TYPE."""
    close_code: int | None = None
    close_reason: str = ""
    seconds: float = 0.0
    audio_sent_s: float = 0.0
    utterances: int = 0
    finals: int = 0
    finals_text: int = 0
    uncovered: int = 0
    uncovered_empty: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    detail: str = ""

    @property
    def lost(self) -> int:
        """Finals lost (streams that end with CloseStream only)."""
        if self.behaviour not in CHECKED or self.outcome.startswith(("refused", "connect")):
            return 0
        return max(self.utterances - self.finals_text, self.uncovered)


class Collector:
    """The messages of one stream."""

    def __init__(self) -> None:
        self.finals: list[tuple[float, float]] = []
        self.all_finals: list[tuple[float, float, str]] = []
        self.finals_text = 0
        self.finals_total = 0
        self.errors: Counter[str] = Counter()
        self.messages = 0

    def add(self, raw: str | bytes) -> None:
        self.messages += 1
        try:
            m = json.loads(raw)
        except ValueError:
            self.errors["non_json_from_server"] += 1
            return
        kind = m.get("type")
        if kind == "Error":
            self.errors[str(m.get("code"))] += 1
        elif kind == "Warning":
            self.errors[f"warning:{m.get('code')}"] += 1
        elif kind == "Results" and m.get("is_final"):
            self.finals_total += 1
            alt = (m.get("channel", {}).get("alternatives") or [{}])[0]
            start = float(m.get("start", 0.0))
            end = start + float(m.get("duration", 0.0))
            self.all_finals.append((round(start, 2), round(end, 2), str(alt.get("transcript"))))
            if str(alt.get("transcript", "")).strip():
                self.finals_text += 1
                start = float(m.get("start", 0.0))
                self.finals.append((start, start + float(m.get("duration", 0.0))))

    def uncovered(self, spans: Sequence[tuple[float, float]]) -> int:
        return sum(1 for s, e in spans if not any(fs < e and fe > s for fs, fe in self.finals))

    def uncovered_but_empty(self, spans: Sequence[tuple[float, float]]) -> int:
        """Utterances with no final with text but an empty final over them
        (the server decoded them and dropped the text: a hallucination guard)."""
        empty = [(fs, fe) for fs, fe, text in self.all_finals if not text.strip()]
        return sum(
            1
            for s, e in spans
            if not any(fs < e and fe > s for fs, fe in self.finals)
            and any(fs < e and fe > s for fs, fe in empty)
        )


@dataclass(frozen=True)
class ClientSettings:
    url: str
    chunk_ms: float
    never_reader_s: float
    max_frame_bytes: int


def _stream_url(base: str) -> str:
    return StreamClient(base, interim_results=True, warnings=True).url


async def _connect(
    url: str, *, max_queue: int = 16, rcvbuf: int | None = None, pings: bool = True
) -> Any:
    from websockets.asyncio.client import connect

    sock: socket.socket | None = None
    kwargs: dict[str, Any] = {}
    if rcvbuf is not None:
        host_port = url.split("//", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        kwargs["sock"] = sock
    try:
        return await connect(
            url,
            compression=None,
            proxy=None,
            open_timeout=10.0,
            close_timeout=5.0,
            max_queue=max_queue,
            ping_interval=20.0 if pings else None,
            **kwargs,
        )
    except BaseException:
        if sock is not None:
            sock.close()
        raise


def _refused(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    code: object = None
    with contextlib.suppress(Exception):
        code = json.loads(bytes(response.body or b""))["code"]  # type: ignore[union-attr]
    return f"refused:{code or status}"


async def _read(ws: Any, into: Collector, rng: random.Random | None) -> None:
    from websockets.exceptions import ConnectionClosed

    with contextlib.suppress(ConnectionClosed):
        while True:
            if rng is not None:
                await asyncio.sleep(rng.uniform(0.2, 0.8))
            into.add(await ws.recv())


async def _send_paced(
    ws: Any,
    pcm: bytes,
    chunk_bytes: int,
    *,
    until: int | None = None,
    sizes: Callable[[], int] | None = None,
    inject: dict[int, str | bytes] | None = None,
) -> float:
    """Send ``pcm[:until]`` in real time; ``sizes`` gives each frame's length,
    ``inject`` frames to send once that many bytes are out. Returns the
    seconds sent; stops quietly when the connection closes."""
    from websockets.exceptions import ConnectionClosed

    loop = asyncio.get_running_loop()
    end = len(pcm) if until is None else min(until, len(pcm))
    pending = sorted((inject or {}).items())
    start = loop.time()
    sent = 0
    with contextlib.suppress(ConnectionClosed):
        while sent < end:
            size = sizes() if sizes is not None else chunk_bytes
            frame = pcm[sent : min(end, sent + size)]
            await ws.send(frame)
            sent += len(frame)
            while pending and pending[0][0] <= sent:
                await ws.send(pending.pop(0)[1])
            wait = start + sent / BYTES_PER_SECOND - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
    return sent / BYTES_PER_SECOND


def _abort(ws: Any) -> None:
    transport = getattr(ws, "transport", None)
    if transport is not None:
        transport.abort()


async def run_session(
    cs: ClientSettings, speech: Speech, behaviour: str, slot: int, rng: random.Random
) -> SessionResult:
    loop = asyncio.get_running_loop()
    result = SessionResult(behaviour, slot, loop.time())
    chunk = max(2, round(BYTES_PER_SECOND * cs.chunk_ms / 1000.0) // 2 * 2)
    if behaviour == "never_reader":
        script = speech.script(rng, 1, min_seconds=cs.never_reader_s)
    elif behaviour in ("drop", "oversized"):
        script = speech.script(rng, rng.randint(1, 2))
    else:
        script = speech.script(rng, rng.randint(1, 3))
    budget = script.seconds + 60.0
    try:
        await asyncio.wait_for(_behave(cs, script, behaviour, rng, result, chunk), budget)
    except asyncio.TimeoutError:
        result.outcome = "timeout"
    except Exception as exc:
        from websockets.exceptions import InvalidStatus

        if isinstance(exc, InvalidStatus):
            result.outcome = _refused(exc)
        elif isinstance(exc, (OSError, asyncio.TimeoutError)) or "Handshake" in type(exc).__name__:
            result.outcome = "connect"
        else:
            result.outcome = f"exception:{type(exc).__name__}"
        result.detail = str(exc)[:200]
    result.seconds = loop.time() - result.started
    return result


async def _behave(
    cs: ClientSettings,
    script: Script,
    behaviour: str,
    rng: random.Random,
    result: SessionResult,
    chunk: int,
) -> None:
    never = behaviour == "never_reader"
    ws = await _connect(
        cs.url, max_queue=1 if never else 16, rcvbuf=4096 if never else None, pings=not never
    )
    collector = Collector()
    reader: asyncio.Task[None] | None = None
    if not never:
        reader = asyncio.create_task(
            _read(ws, collector, rng if behaviour == "slow_reader" else None)
        )
    try:
        if behaviour in CHECKED:
            result.utterances = len(script.utterances)
            sizes: Callable[[], int] | None = None
            inject: dict[int, str | bytes] = {}
            pcm = script.pcm
            if behaviour == "odd_bytes":
                odd = [chunk - 1, chunk + 1, chunk // 2 + 1, 3 * chunk // 2 - 1]

                def sizes() -> int:
                    return rng.choice(odd)

                pcm = pcm + b"\x01"  # one stray byte: audio_partial_frame at the end
            elif behaviour == "bad_json":
                for text in rng.sample(BAD_TEXT_FRAMES, 3):
                    inject[rng.randrange(len(pcm) // 2) * 2] = text
            result.audio_sent_s = await _send_paced(ws, pcm, chunk, sizes=sizes, inject=inject)
            from websockets.exceptions import ConnectionClosed

            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "CloseStream"}))
            assert reader is not None
            await reader  # until the server closes (the session's budget bounds it)
            result.outcome = "closed"
        elif behaviour == "drop":
            s, e = rng.choice(script.utterances)
            cut = round(rng.uniform(s + 0.3, max(s + 0.4, e - 0.3)) * SAMPLE_RATE) * 2
            result.audio_sent_s = await _send_paced(ws, script.pcm, chunk, until=cut)
            result.outcome = "dropped" if ws.close_code is None else "closed"
            _abort(ws)
        elif behaviour == "never_reader":
            until = round(cs.never_reader_s * SAMPLE_RATE) * 2
            result.audio_sent_s = await _send_paced(ws, script.pcm, chunk, until=until)
            sent_all = result.audio_sent_s * BYTES_PER_SECOND >= until - 1
            result.outcome = "dropped" if sent_all else "server_dropped"
            _abort(ws)
        elif behaviour == "oversized":
            huge = rng.random() < 0.25
            size = (4 * cs.max_frame_bytes if huge else cs.max_frame_bytes) + 2
            at = round(rng.uniform(0.8, 3.0) * SAMPLE_RATE) * 2
            result.audio_sent_s = await _send_paced(
                ws, script.pcm, chunk, until=at, inject={at: bytes(size)}
            )
            assert reader is not None
            await asyncio.wait_for(reader, 30.0)
            result.outcome = "closed"
        else:
            raise ValueError(f"unknown behaviour {behaviour!r}")
    finally:
        if reader is not None and not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if result.close_code is None and result.outcome != "dropped":
            # (A stream we dropped has no close code of its own; the server counts 1006.)
            code = ws.close_code
            result.close_code = None if code is None else int(code)
            result.close_reason = str(ws.close_reason or "")
        if ws.close_code is None:
            _abort(ws)
        result.finals = collector.finals_total
        result.finals_text = collector.finals_text
        if behaviour in CHECKED:
            result.uncovered = collector.uncovered(script.utterances)
            result.uncovered_empty = collector.uncovered_but_empty(script.utterances)
        result.errors = dict(collector.errors)
        if result.lost:
            # What went missing, to tell a lost final from an empty one.
            result.detail = json.dumps(
                {
                    "recordings": list(zip(script.names, script.utterances, strict=True)),
                    "finals": collector.all_finals,
                }
            )


# ---------------------------------------------------------------------------
# The soak


@dataclass
class Sample:
    t: float
    rss_mb: float | None
    threads: int | None
    active_streams: int | None
    server_cpu_s: float
    phase: str


async def sampler(
    server: WrappedServer, t0: float, every_s: float, samples: list[Sample], phase: list[str]
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        active = await asyncio.to_thread(active_streams, server.port)
        samples.append(
            Sample(
                round(loop.time() - t0, 1),
                _round(server.rss_mb()),
                server.threads(),
                active,
                round(server.cpu_seconds(), 1),
                phase[0],
            )
        )
        await asyncio.sleep(every_s)


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        name = name.strip()
        if name not in BEHAVIOURS:
            raise SystemExit(f"--mix: unknown behaviour {name!r} (known: {', '.join(BEHAVIOURS)})")
        mix[name] = float(weight)
    if sum(mix.values()) <= 0:
        raise SystemExit("--mix: the weights must add up to more than 0")
    return mix


async def slot_loop(
    slot: int,
    cs: ClientSettings,
    speech: Speech,
    mix: dict[str, float],
    deadline: float,
    max_sessions: int,
    results: list[SessionResult],
    seed: int,
) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed * 1000 + slot)
    names, weights = list(mix), list(mix.values())
    await asyncio.sleep(rng.uniform(0.0, 2.0))
    for _ in range(max_sessions):
        if loop.time() >= deadline:
            return
        behaviour = rng.choices(names, weights)[0]
        result = await run_session(cs, speech, behaviour, slot, rng)
        results.append(result)
        pause = rng.uniform(0.2, 1.5)
        if result.outcome.startswith(("refused", "connect")):
            pause = 2.0 + rng.uniform(0.0, 1.0)
        await asyncio.sleep(pause)


def slope_mb_per_min(samples: Sequence[Sample]) -> float | None:
    pts = [(s.t, s.rss_mb) for s in samples if s.rss_mb is not None]
    if len(pts) < 3:
        return None
    t = np.array([p[0] for p in pts]) / 60.0
    y = np.array([p[1] for p in pts])
    return float(np.polyfit(t, y, 1)[0])


def summarize_sessions(results: list[SessionResult]) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    for b in BEHAVIOURS:
        mine = [r for r in results if r.behaviour == b]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "sessions": len(mine),
            "outcomes": dict(Counter(r.outcome for r in mine)),
            "close_codes": dict(Counter(str(r.close_code or "-") for r in mine)),
            "server_errors": dict(sum((Counter(r.errors) for r in mine), Counter())),
            "audio_s": round(sum(r.audio_sent_s for r in mine), 1),
        }
        if b in CHECKED:
            ran = [r for r in mine if not r.outcome.startswith(("refused", "connect"))]
            entry.update(
                {
                    "utterances": sum(r.utterances for r in ran),
                    "finals_with_text": sum(r.finals_text for r in ran),
                    "finals_lost": sum(r.lost for r in ran),
                    "lost_as_empty_final": sum(r.uncovered_empty for r in ran),
                    "not_closed_1000": sum(1 for r in ran if r.close_code != 1000),
                }
            )
        per[b] = entry
    return per


def expected_close(behaviour: str) -> str:
    return {
        "normal": "1000",
        "slow_reader": "1000",
        "odd_bytes": "1000 + audio_partial_frame",
        "bad_json": "1000 + invalid_message x3",
        "oversized": "4413 (frame_too_large) or 1009 (4x over)",
        "drop": "client drops (server logs 1006)",
        "never_reader": "client drops after --never-reader-s (or the server, 4430)",
    }[behaviour]


def server_args(args: argparse.Namespace, port: int, extra: Sequence[str] = ()) -> list[str]:
    from tests.kit.real_models import real_model_store

    out = [
        "--model",
        args.model,
        "--models-dir",
        str(real_model_store().root),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-format",
        "text",
    ]
    if not args.server_defaults:
        out += SHORT_CONTEXT
    out += list(extra)
    for item in args.server_arg:
        out += shlex.split(item)
    return out


def server_env(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--env takes NAME=VALUE, not {item!r}")
        env[name] = value
    return env


async def warm(url: str, speech: Speech) -> None:
    from earshot.clients.stream import transcribe_stream

    pcm = speech.script(random.Random(0), 1).pcm
    transcript = await asyncio.wait_for(
        transcribe_stream(url, pcm, interim_results=True, realtime=False), 120.0
    )
    if not transcript.ok:
        raise SystemExit(f"the warm-up stream closed with {transcript.close_code}")


async def soak(args: argparse.Namespace, server: WrappedServer, speech: Speech) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    base = f"ws://127.0.0.1:{server.port}/v1/listen"
    cs = ClientSettings(_stream_url(base), args.chunk_ms, args.never_reader_s, MAX_FRAME_BYTES)
    await warm(base, speech)
    samples: list[Sample] = []
    phase = ["load"]
    t0 = loop.time()
    sampling = asyncio.create_task(sampler(server, t0, args.sample_s, samples, phase))
    results: list[SessionResult] = []
    deadline = t0 + args.minutes * 60.0
    mix = parse_mix(args.mix)
    max_sessions = int(args.minutes * 60.0) + 10
    slots = [
        slot_loop(i, cs, speech, mix, deadline, max_sessions, results, args.seed)
        for i in range(args.streams)
    ]
    await asyncio.gather(*slots)
    load_s = loop.time() - t0
    end_rss = server.rss_mb()
    phase[0] = "idle"
    print(f"load done after {load_s:.0f} s; idle {args.idle_s:g} s", flush=True)
    await asyncio.sleep(args.idle_s)
    idle_rss = server.rss_mb()
    snap_idle = await server.snapshot()
    phase[0] = "trimmed"
    await server.trim()
    trimmed_rss = server.rss_mb()
    snap_trim = await server.snapshot()
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    load = [s for s in samples if s.phase == "load" and s.rss_mb is not None]
    start_rss = load[0].rss_mb if load else None
    second_half = [s for s in load if s.t >= load_s / 2]
    cpu = None
    if len(load) >= 2 and load[-1].t > load[0].t:
        cpu = (load[-1].server_cpu_s - load[0].server_cpu_s) / (load[-1].t - load[0].t)
    return {
        "load_s": round(load_s, 1),
        "server_cpu_cores": _round(cpu, 2),
        "rss_mb": {
            "start": start_rss,
            "peak_sampled": max((s.rss_mb or 0.0 for s in load), default=None),
            "end": _round(end_rss),
            "drift": _round(end_rss - start_rss) if end_rss and start_rss else None,
            "slope_second_half_mb_per_min": _round(slope_mb_per_min(second_half), 3),
            "slope_all_mb_per_min": _round(slope_mb_per_min(load), 3),
            "after_idle": _round(idle_rss),
            "after_malloc_trim": _round(trimmed_rss),
            "peak_vmhwm": _round(server.peak_rss_mb()),
        },
        "sessions": summarize_sessions(results),
        "sessions_total": len(results),
        "finals_lost": sum(r.lost for r in results if r.behaviour == "normal"),
        "finals_lost_all_checked": sum(r.lost for r in results),
        "snapshot_after_idle": snap_idle,
        "snapshot_after_trim": snap_trim,
        "samples": [asdict(s) for s in samples],
        "lossy_sessions": [asdict(r) | {"lost": r.lost} for r in results if r.lost][:30],
        "odd_sessions": [
            asdict(r) for r in results if r.outcome.startswith(("timeout", "exception", "connect"))
        ][:30],
    }


def print_soak(report: dict[str, Any]) -> None:
    rss = report["rss_mb"]
    print()
    print(f"server RSS (MB), load of {report['load_s']:.0f} s:")
    print(
        f"  start {rss['start']}  peak {rss['peak_sampled']} (VmHWM {rss['peak_vmhwm']})  "
        f"end {rss['end']}  drift {rss['drift']:+}"
        if rss["drift"] is not None
        else f"  {rss}"
    )
    print(
        f"  slope over the second half {rss['slope_second_half_mb_per_min']} MB/min "
        f"(whole run {rss['slope_all_mb_per_min']} MB/min)"
    )
    print(
        f"  after {report['idle_s']:g} s idle {rss['after_idle']}  after malloc_trim(0) "
        f"{rss['after_malloc_trim']}"
    )
    print(f"server CPU under load: {report['server_cpu_cores']} cores")
    print()
    print(f"{report['sessions_total']} sessions:")
    print(
        f"  {'behaviour':<13} {'n':>4}  {'close codes (-: we dropped)':<34} "
        "outcomes / server errors"
    )
    for name, e in report["sessions"].items():
        codes = " ".join(f"{k}x{v}" for k, v in sorted(e["close_codes"].items()))
        outcomes = " ".join(f"{k}x{v}" for k, v in sorted(e["outcomes"].items()))
        errs = " ".join(f"{k}x{v}" for k, v in sorted(e["server_errors"].items()))
        print(f"  {name:<13} {e['sessions']:>4}  {codes:<34} {outcomes}  {errs}")
        if "utterances" in e:
            print(
                f"  {'':<13} {'':>4}  utterances {e['utterances']}, finals with text "
                f"{e['finals_with_text']}, lost {e['finals_lost']} "
                f"({e['lost_as_empty_final']} as an empty final), not closed 1000: "
                f"{e['not_closed_1000']}"
            )
    print()
    print(
        f"finals lost (normal streams): {report['finals_lost']}; "
        f"all CloseStream streams: {report['finals_lost_all_checked']}"
    )
    snap = report.get("snapshot_after_idle", {})
    if "live" in snap:
        live = snap["live"]
        print(
            f"after idle: LiveStream {live.get('LiveStream')}, StreamSession "
            f"{live.get('StreamSession')}, engine {snap.get('engine')}"
        )


# ---------------------------------------------------------------------------
# Storms


async def storm_client(url: str, pcm: bytes, chunk: int, delay: float) -> str:
    """Open a stream, send ``pcm`` in real time, drop the TCP connection."""
    from websockets.exceptions import InvalidStatus

    await asyncio.sleep(delay)
    try:
        ws = await _connect(url)
    except InvalidStatus as exc:
        return _refused(exc)
    except Exception as exc:
        return f"connect:{type(exc).__name__}"
    try:
        await _send_paced(ws, pcm, chunk)
        return "dropped" if ws.close_code is None else f"closed:{ws.close_code}"
    finally:
        _abort(ws)


async def wait_idle(port: int, timeout_s: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < timeout_s:
        if await asyncio.to_thread(active_streams, port) == 0:
            break
        await asyncio.sleep(0.5)
    return loop.time() - start


async def storms(args: argparse.Namespace, server: WrappedServer, speech: Speech) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    base = f"ws://127.0.0.1:{server.port}/v1/listen"
    url = _stream_url(base)
    chunk = max(2, round(BYTES_PER_SECOND * args.chunk_ms / 1000.0) // 2 * 2)
    await warm(base, speech)
    await asyncio.sleep(3.0)
    t0 = loop.time()
    trace: list[dict[str, Any]] = []

    def note(label: str) -> float | None:
        rss = _round(server.rss_mb())
        trace.append({"t": round(loop.time() - t0, 1), "rss_mb": rss, "at": label})
        return rss

    rows: list[dict[str, Any]] = [{"storm": 0, "rss_after_idle_mb": note("after warm-up")}]
    print(f"  after warm-up: RSS {rows[0]['rss_after_idle_mb']} MB", flush=True)
    snapshots = [await server.snapshot()]
    rng = random.Random(args.seed)
    for k in range(1, args.storms + 1):
        clients = [
            storm_client(
                url,
                speech.opening(i + k, args.storm_audio_s),
                chunk,
                rng.uniform(0.0, args.storm_spread_s),
            )
            for i in range(args.storm_clients)
        ]
        peak = 0.0
        cpu_before = server.cpu_seconds()
        running = asyncio.ensure_future(asyncio.gather(*clients))
        mid_due = loop.time() + args.storm_spread_s + args.storm_audio_s * 0.75
        mid: dict[str, Any] | None = None
        while not running.done():
            peak = max(peak, server.rss_mb() or 0.0)
            if args.mid_storm_snapshot and mid is None and loop.time() >= mid_due:
                mid = await server.snapshot()
            await asyncio.wait({running}, timeout=0.5)
        outcomes = Counter(running.result())
        cpu_storm = server.cpu_seconds() - cpu_before
        drained_s = await wait_idle(server.port, 60.0)
        at_end = note(f"storm {k} drained")
        idle_trace = []
        for _ in range(max(1, round(args.idle_s))):
            await asyncio.sleep(1.0)
            idle_trace.append(note(f"storm {k} idle"))
            peak = max(peak, idle_trace[-1] or 0.0)
        row: dict[str, Any] = {
            "storm": k,
            "outcomes": dict(outcomes),
            "drained_s": round(drained_s, 1),
            "server_cpu_s": round(cpu_storm, 1),
            "rss_peak_mb": round(peak, 1),
            "rss_drained_mb": at_end,
            "rss_after_idle_mb": idle_trace[-1],
        }
        if mid is not None:
            row["mid_storm_snapshot"] = mid
        if args.trim_after_storm:
            await server.trim()
            row["rss_after_trim_mb"] = note(f"storm {k} trimmed")
        rows.append(row)
        extra = f", after trim {row['rss_after_trim_mb']}" if "rss_after_trim_mb" in row else ""
        print(
            f"  storm {k}: {dict(outcomes)}, server CPU {cpu_storm:.1f} s; RSS peak "
            f"{row['rss_peak_mb']}, drained "
            f"{at_end}, after {args.idle_s:g} s idle {row['rss_after_idle_mb']}{extra}",
            flush=True,
        )
    snapshots.append(await server.snapshot())
    await server.trim()
    final_trim = note("final malloc_trim")
    snapshots.append(await server.snapshot())
    return {
        "rows": rows,
        "rss_after_final_trim_mb": final_trim,
        "trim_log": server.trim_lines(),
        "snapshots": {
            "after_warm_up": snapshots[0],
            "after_storms": snapshots[1],
            "after_final_trim": snapshots[2],
        },
        "trace": trace,
    }


def print_storms(report: dict[str, Any]) -> None:
    rows = report["rows"]
    base = rows[0]["rss_after_idle_mb"] or 0.0
    print()
    print(f"{'storm':>5} {'peak':>7} {'drained':>8} {'idle':>7} {'vs start':>8} {'trim':>7}")
    for r in rows[1:]:
        trim = r.get("rss_after_trim_mb")
        print(
            f"{r['storm']:>5} {r['rss_peak_mb']:>7.1f} {r['rss_drained_mb'] or 0:>8.1f} "
            f"{r['rss_after_idle_mb'] or 0:>7.1f} {(r['rss_after_idle_mb'] or 0) - base:>+8.1f} "
            f"{trim if trim is not None else '-':>7}"
        )
    print(f"after the last storm and malloc_trim(0): {report['rss_after_final_trim_mb']} MB")
    for r in rows[1:]:
        mid = r.get("mid_storm_snapshot")
        if not mid or "live" not in mid:
            continue
        live = {k: v for k, v in mid["live"].items() if v}
        print(f"  storm {r['storm']}, streams open: RSS {mid['rss_mb']} MB, live {live}")
        print(f"    mallinfo2 {mid['mallinfo2']}")
        for row in mid.get("tracemalloc", {}).get("top", [])[:6]:
            print(f"      {row['kb']:>8} KB {row['count']:>7}  {row['where']}")
    for label, snap in report["snapshots"].items():
        if "live" not in snap:
            continue
        live = {k: v for k, v in snap["live"].items() if v}
        print(f"  {label}: RSS {snap['rss_mb']} MB, live {live}")
        print(f"    mallinfo2 {snap['mallinfo2']}")
        if "engine" in snap:
            print(f"    engine {snap['engine']}, metrics sessions {snap.get('metrics_sessions')}")
        tm = snap.get("tracemalloc")
        if tm:
            print(f"    tracemalloc traced {tm['traced_mb']} MB (peak {tm['peak_mb']} MB)")
            for row in tm.get("growth_since_last", [])[:8]:
                print(f"      {row['kb']:>+8} KB {row['count']:>+7}  {row['where']}")


# ---------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=30.0, help="soak length (load only)")
    p.add_argument("--capacity", type=int, default=8, help="streams the server keeps in real time")
    p.add_argument("--load", type=float, default=80.0, help="percent of --capacity to run")
    p.add_argument("--streams", type=int, default=0, help="client slots (default: load x capacity)")
    p.add_argument("--model", default="tiny.en", help="a model of the test suite's real store")
    p.add_argument("--mix", default=DEFAULT_MIX, help="behaviour weights, NAME=W,...")
    p.add_argument("--never-reader-s", type=float, default=25.0)
    p.add_argument("--chunk-ms", type=float, default=20.0, help="audio per frame")
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    p.add_argument("--idle-s", type=float, default=15.0, help="idle time after load / storms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storms", type=int, default=0, help="run K disconnect storms instead")
    p.add_argument("--storm-clients", type=int, default=100)
    p.add_argument("--storm-audio-s", type=float, default=2.0)
    p.add_argument("--storm-spread-s", type=float, default=1.0, help="clients start over this")
    p.add_argument("--trim-after-storm", action="store_true", help="SIGUSR1 after each storm")
    p.add_argument(
        "--mid-storm-snapshot",
        action="store_true",
        help="also snapshot the server while each storm's streams are open",
    )
    p.add_argument("--label", default="baseline", help="storm experiment name (for --out)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--server-defaults", action="store_true", help="no short-context flags")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARGS")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not args.streams:
        args.streams = max(1, int(args.capacity * args.load / 100.0))
    if args.out is None:
        name = f"soak-storms-{args.label}.json" if args.storms else "soak.json"
        args.out = str(ROOT / "bench" / "results" / name)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["--serve-wrapped"]:
        return serve_wrapped(raw[1:])
    args = parse_args(raw)
    out = Path(args.out)
    log_dir = out.parent / f"{out.stem}-logs"
    speech = Speech()
    port = free_port()
    extra = ["--max-streams", str(max(64, args.storm_clients + 8))] if args.storms else []
    cli = server_args(args, port, extra)
    env = server_env(args)
    report: dict[str, Any] = {
        "benchmark": "soak-storms" if args.storms else "soak",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info("cpu"),
        "settings": {k: v for k, v in vars(args).items()},
        "server_command": ["python", "-m", "earshot.service.cli", "serve", *cli],
        "server_env": env,
        "idle_s": args.idle_s,
    }
    if args.storms:
        print(
            f"{args.storms} storms of {args.storm_clients} clients x {args.storm_audio_s:g} s "
            f"of speech then a TCP drop; {args.idle_s:g} s idle after each; env {env or '{}'}"
        )
    else:
        mix = parse_mix(args.mix)
        print(
            f"soak: {args.streams} client slots ({args.load:g} % of {args.capacity}) for "
            f"{args.minutes:g} min, model {args.model}, mix {mix}"
        )
        for name in mix:
            print(f"  {name:<13} expected: {expected_close(name)}")
    print(f"server: {' '.join(cli)}", flush=True)
    with WrappedServer(cli, port, log_dir / "server.log", env, log_dir / "snapshots") as server:
        server.wait_healthy(args.start_timeout)
        report["rss_mb_healthy"] = _round(server.rss_mb())
        try:
            if args.storms:
                report.update(asyncio.run(storms(args, server, speech)))
            else:
                report.update(asyncio.run(soak(args, server, speech)))
        finally:
            alive = server.proc is not None and server.proc.poll() is None
    problems = log_problems(server.log_path)
    report["server_alive_at_end"] = alive
    report["server_log_problem_count"] = len(problems)
    report["server_log_problems"] = problems[:20]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.storms:
        print_storms(report)
    else:
        print_soak(report)
    print(f"server alive at the end: {alive}; log problems: {len(problems)} ({server.log_path})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
