"""A long upload does not delay another stream's finals (issue 12).

Voice detection over an upload costs CPU in proportion to its length (Silero
over every 32 ms frame: about 2 ms of one core per second of audio, so some
5 s for the 40 minutes sent here). Run on the event loop, it froze every live
stream of the server for that long. Here one stream speaks the tone language
in real time over /v1/listen while the official ``openai`` client posts a long
upload to /v1/audio/transcriptions on the same server; a probe that sleeps
50 ms in a loop measures how late the event loop wakes it meanwhile, and the
stream's finals must come as promptly as without the upload.

The upload is a few tone words, 40 minutes of a one-bit noise floor and a few
more words: the detector costs the same per second on it as on speech
(measured on 40 minutes: 4.9 s for this file, 4.9 s for exact zeros, 5.3 s
for tone speech), while it keeps the FLAC small (10 MB) and gives the decoder
two pieces only, so that the test measures the event loop, not how the
decoder is shared.
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from openai import AsyncOpenAI

from earshot.clients.stream import StreamTranscript, transcribe_stream
from earshot.core.decoding import SAMPLE_RATE
from tests.kit.live import running_server, tone_engine
from tests.kit.tones import make_speech, random_script

pytestmark = pytest.mark.timeout(90)

UPLOAD_QUIET_S = 40 * 60.0
"""The quiet middle of the upload (about 5 s of voice detection here)."""

PROBE_S = 0.05
"""The lag probe's sleep."""

MAX_LAG_S = 0.5
"""The most the probe may wake late while the upload is processed (on the
event loop it wakes seconds late: the whole detection)."""

MAX_FINAL_LATENCY_S = 1.5
"""The most a final of the live stream may come after its audio was sent
(endpointing and one decode: well under a second here)."""


def _long_upload() -> tuple[bytes, str]:
    """A FLAC file: words, ``UPLOAD_QUIET_S`` of a quiet noise floor, words; and its text."""
    head, head_truth = make_speech([["alpha", "bravo", "charlie"]])
    tail, tail_truth = make_speech([["kilo", "lima"]])
    # One least significant bit of noise, 10 s of it repeated: not exact
    # zeros, after a minute of which Silero misses the next words.
    rng = np.random.default_rng(12)
    floor = (rng.integers(-1, 2, 10 * SAMPLE_RATE) / 32768.0).astype(np.float32)
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", SAMPLE_RATE, 1, subtype="PCM_16", format="FLAC") as out:
        out.write(head)
        for _ in range(round(UPLOAD_QUIET_S / 10)):
            out.write(floor)
        out.write(tail)
    return buffer.getvalue(), f"{head_truth.text} {tail_truth.text}"


class LagProbe:
    """Sleeps :data:`PROBE_S` in a loop; records when it woke and how late."""

    def __init__(self) -> None:
        self.wakes: list[tuple[float, float]] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(PROBE_S)
            now = loop.time()
            self.wakes.append((now, now - before - PROBE_S))

    def worst(self, start: float, end: float) -> float:
        """The latest wake-up of a sleep that overlapped ``[start, end]``."""
        return max(
            (late for at, late in self.wakes if at >= start and at - late - PROBE_S <= end),
            default=0.0,
        )


def test_a_long_upload_does_not_delay_another_streams_finals() -> None:
    data, upload_text = _long_upload()
    script = random_script(11, (2, 3), seed=12)
    speech, truth = make_speech(script, gap_s=1.0, lead_s=0.5, tail_s=1.0)

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        probe = LagProbe()
        first_final = asyncio.Event()
        final_at: list[float] = []

        def on_message(message: dict[str, Any]) -> None:
            if message.get("type") == "Results" and message.get("is_final"):
                final_at.append(loop.time())
                first_final.set()

        engine = tone_engine()
        async with (
            running_server(engine) as url,
            AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=40.0) as client,
        ):
            probing = asyncio.create_task(probe.run())
            stream = asyncio.create_task(
                transcribe_stream(
                    url.replace("http://", "ws://") + "/v1/listen",
                    speech,
                    realtime=True,
                    interim_results=False,
                    on_message=on_message,
                )
            )
            try:
                await asyncio.wait_for(first_final.wait(), 10)
                posted = loop.time()
                upload = await client.audio.transcriptions.create(
                    file=("long.flac", data), model="whisper-1"
                )
                answered = loop.time()
                result: StreamTranscript = await asyncio.wait_for(stream, 30)
            finally:
                probing.cancel()
                stream.cancel()
                await asyncio.gather(probing, stream, return_exceptions=True)
        return {
            "upload": upload,
            "upload_s": answered - posted,
            "lag_s": probe.worst(posted, answered),
            "stream": result,
            "finals_after": sum(at > answered for at in final_at),
        }

    started = time.monotonic()
    out = asyncio.run(asyncio.wait_for(main(), 60))
    elapsed = time.monotonic() - started
    stream: StreamTranscript = out["stream"]
    latencies = stream.final_latencies()
    print(
        f"upload answered in {out['upload_s']:.2f} s; event loop lag at most "
        f"{out['lag_s']:.3f} s; stream finals {[round(x, 2) for x in latencies]} s late; "
        f"test {elapsed:.1f} s"
    )
    # Both did their work, exactly.
    assert out["upload"].text == upload_text
    assert stream.ok
    assert [" ".join(u) for u in script] == [
        m["channel"]["alternatives"][0]["transcript"] for m in stream.finals[0]
    ]
    assert len(latencies) == len(truth.utterances)
    # The stream was live through the whole upload, so its finals measure it.
    assert out["finals_after"] >= 1, "the stream ended before the upload was answered"
    # The event loop kept turning while the upload was processed...
    assert out["lag_s"] < MAX_LAG_S, f"the event loop stalled {out['lag_s']:.2f} s"
    # ... and the stream's finals came as promptly as they do without it.
    assert max(latencies) < MAX_FINAL_LATENCY_S, latencies
