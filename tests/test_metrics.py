"""Prometheus metrics: /metrics on a real loopback server with real streaming
clients and the tone backend, plus the calls server.py does not make yet
(session tracking, the fallback's batch reports), simulated on the Metrics object."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import ClientSession
from prometheus_client.parser import text_string_to_metric_families

from earshot.clients.stream import StreamClient, transcribe_stream
from earshot.service.engine.engine import Engine
from earshot.service.engine.scheduler import BatchReport, JobKind, QueueDepth
from earshot.service.http.app import create_app
from earshot.service.http.metrics import METRICS, Metrics, register_metrics_routes
from tests.kit.live import running_server, tone_engine
from tests.kit.tones import make_speech, random_script

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout=100))


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and every family's type by name."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape_local(metrics: Metrics) -> Samples:
    return parse(metrics.exposition().decode())[0]


@contextlib.asynccontextmanager
async def metrics_server(engine: Engine) -> AsyncIterator[tuple[str, Metrics]]:
    """Serve ``create_app(engine)`` (which adds /metrics) on a free loopback port."""
    found: list[Metrics] = []
    async with running_server(engine, lambda app: found.append(app[METRICS])) as url:
        yield url, found[0]


async def scrape(http: ClientSession, base: str) -> tuple[Samples, dict[str, str]]:
    async with http.get(base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return parse(await resp.text())


def test_two_streams_through_a_real_server() -> None:
    scripts = [random_script(3, (2, 4), seed=31), random_script(2, (2, 4), seed=32)]
    audios = [make_speech(s, 16000)[0] for s in scripts]
    engine = tone_engine()
    earlier: list[BatchReport] = []
    engine.scheduler.on_batch = earlier.append  # an existing hook must keep working

    async def main() -> tuple[Samples, Samples, Samples, dict[str, str], list[Any]]:
        async with metrics_server(engine) as (base, metrics), ClientSession() as http:
            assert metrics is not None
            before, _ = await scrape(http, base)
            ws = base.replace("http://", "ws://") + "/v1/listen"
            async with StreamClient(ws) as client:
                first = await client.receive()
                assert first is not None and first["type"] == "Metadata"
                during, _ = await scrape(http, base)
                await client.close_stream()
                async for _ in client.messages():
                    pass
            results = await asyncio.gather(
                *(transcribe_stream(ws, a, realtime=False) for a in audios)
            )
            after, types = await scrape(http, base)
            return before, during, after, types, list(results)

    before, during, after, types, results = run(main)
    assert [r.close_code for r in results] == [1000, 1000]
    for r, script in zip(results, scripts, strict=True):
        assert len([m for m in r.finals[0] if m["channel"]["alternatives"][0]["transcript"]]) == (
            len(script)
        )

    # Before any traffic: every series there, at 0.
    assert value(before, "earshot_active_streams", protocol="deepgram") == 0
    assert value(before, "earshot_streams_opened_total", protocol="deepgram") == 0
    assert value(before, "earshot_batch_decode_seconds_count", kind="final") == 0
    assert value(before, "earshot_queue_depth", kind="interim") == 0
    # While the first client is connected.
    assert value(during, "earshot_active_streams", protocol="deepgram") == 1
    assert value(during, "earshot_streams_opened_total", protocol="deepgram") == 1

    stats = engine.scheduler.stats()
    n_utterances = sum(len(s) for s in scripts)
    assert value(after, "earshot_active_streams", protocol="deepgram") == 0
    assert value(after, "earshot_streams_opened_total", protocol="deepgram") == 3
    assert value(after, "earshot_stream_closes_total", code="1000") == 3
    for kind in JobKind:
        k = kind.value
        batches = stats.batches[kind]
        jobs = stats.completed[kind] + stats.failed[kind]
        assert value(after, "earshot_batch_size_count", kind=k) == batches
        assert value(after, "earshot_batch_decode_seconds_count", kind=k) == batches
        assert value(after, "earshot_batch_size_sum", kind=k) == jobs
        assert value(after, "earshot_queue_wait_seconds_count", kind=k) == jobs
        assert value(after, "earshot_decode_failures_total", kind=k) == 0
        assert value(after, "earshot_queue_depth", kind=k) == 0
    assert stats.batches[JobKind.FINAL] >= n_utterances
    assert value(after, "earshot_batch_decode_seconds_sum", kind="final") > 0
    total_audio = sum(len(a) for a in audios) / 16000
    decoded = value(after, "earshot_audio_decoded_seconds_total", kind="final")
    assert 0 < decoded <= total_audio + 0.5
    assert value(after, "earshot_decode_in_flight") == 0
    # The hook that was there before bind still saw every batch.
    assert len(earlier) == sum(stats.batches.values())
    # Three upgrades, and the scrapes before this one.
    listen = {"route": "/v1/listen", "method": "GET", "status": "101"}
    assert value(after, "earshot_http_requests_total", **listen) == 3
    scrapes = {"route": "/metrics", "method": "GET", "status": "200"}
    assert value(after, "earshot_http_requests_total", **scrapes) == 2
    assert types["earshot_batch_size"] == "histogram"
    assert types["earshot_streams_opened"] == "counter"
    assert types["earshot_stream_lag_max_seconds"] == "gauge"
    assert types["earshot_fallback_uses"] == "counter"


def test_http_api_requests_and_refusals_are_counted() -> None:
    async def main() -> Samples:
        engine = tone_engine(max_upload_bytes=2048)
        async with metrics_server(engine) as (base, _), ClientSession() as http:
            async with http.get(base + "/v1/models") as resp:
                assert resp.status == 200
            async with http.get(base + "/v1/models/large-v3") as resp:
                assert resp.status == 404
            async with http.get(base + "/nowhere") as resp:
                assert resp.status == 404
            body = b"x" * 4096
            headers = {"Content-Type": "multipart/form-data; boundary=b"}
            url = base + "/v1/audio/transcriptions"
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == 413
            samples, _ = await scrape(http, base)
            return samples

    after = run(main)
    requests = "earshot_http_requests_total"
    assert value(after, requests, route="/v1/models", method="GET", status="200") == 1
    assert value(after, requests, route="/v1/models/{model_id}", method="GET", status="404") == 1
    assert value(after, requests, route="unmatched", method="GET", status="404") == 1
    route = "/v1/audio/transcriptions"
    assert value(after, requests, route=route, method="POST", status="413") == 1
    refused = value(after, "earshot_refusals_total", reason="upload_too_large", status="413")
    assert refused == 1


def test_registries_are_separate_and_the_route_is_registered() -> None:
    a, b = tone_engine(), tone_engine()
    app = create_app(a)
    ma = register_metrics_routes(app)
    assert app[METRICS] is ma
    mb = Metrics(b).bind()
    assert ma.registry is not mb.registry
    ma.refused("server_full", 503)
    assert (
        value(scrape_local(ma), "earshot_refusals_total", reason="server_full", status="503") == 1
    )
    assert ("earshot_refusals_total", (("reason", "server_full"), ("status", "503"))) not in (
        scrape_local(mb)
    )
    # bind twice does not hook twice
    hook = b.scheduler.on_batch
    mb.bind()
    assert b.scheduler.on_batch is hook


def test_batch_reports_failures_and_chained_hook() -> None:
    engine = tone_engine()
    seen: list[BatchReport] = []
    engine.scheduler.on_batch = seen.append
    metrics = Metrics(engine).bind()
    hook = engine.scheduler.on_batch
    assert hook is not None
    hook(BatchReport(JobKind.FINAL, 2, 0.3, 4.5, (0.01, 0.02)))
    hook(BatchReport(JobKind.INTERIM, 3, 0.1, 6.0, (0.0, 0.0, 0.2), error=RuntimeError("x")))
    s = scrape_local(metrics)
    assert len(seen) == 2
    assert value(s, "earshot_audio_decoded_seconds_total", kind="final") == pytest.approx(4.5)
    assert value(s, "earshot_audio_decoded_seconds_total", kind="interim") == 0
    assert value(s, "earshot_decode_failures_total", kind="interim") == 3
    assert value(s, "earshot_decode_failures_total", kind="final") == 0
    assert value(s, "earshot_batch_size_bucket", kind="final", le="2.0") == 1
    assert value(s, "earshot_batch_size_bucket", kind="final", le="1.0") == 0
    assert value(s, "earshot_queue_wait_seconds_count", kind="interim") == 3
    assert value(s, "earshot_batch_decode_seconds_sum", kind="interim") == pytest.approx(0.1)


class FakeSession:
    def __init__(self, received: float, lag: float) -> None:
        self.received_seconds = received
        self.lag = lag

    def lag_seconds(self) -> float:
        return self.lag


def test_scrape_time_values_sessions_and_fallback() -> None:
    scheduler = SimpleNamespace(on_batch=None, queue_depth=QueueDepth(3, 5), in_flight=2)
    open_streams = [
        SimpleNamespace(protocol="deepgram"),
        SimpleNamespace(protocol="deepgram"),
        SimpleNamespace(protocol="twilio"),
    ]
    fake = SimpleNamespace(
        scheduler=scheduler,
        active_streams=3,
        streams=open_streams,
        streams_opened=Counter({"deepgram": 7, "twilio": 1}),
        closes=Counter({1000: 4, 1011: 1}),
    )
    metrics = Metrics(cast(Engine, fake)).bind()
    s = scrape_local(metrics)
    assert value(s, "earshot_queue_depth", kind="final") == 3
    assert value(s, "earshot_queue_depth", kind="interim") == 5
    assert value(s, "earshot_decode_in_flight") == 2
    assert value(s, "earshot_active_streams", protocol="deepgram") == 2
    assert value(s, "earshot_active_streams", protocol="twilio") == 1
    assert value(s, "earshot_active_streams", protocol="openai_realtime") == 0
    assert value(s, "earshot_streams_opened_total", protocol="deepgram") == 7
    assert value(s, "earshot_streams_opened_total", protocol="twilio") == 1
    assert value(s, "earshot_streams_opened_total", protocol="openai_realtime") == 0
    assert value(s, "earshot_stream_closes_total", code="1011") == 1
    assert value(s, "earshot_stream_lag_max_seconds") == 0
    assert value(s, "earshot_audio_received_seconds_total") == 0
    assert not [k for k in s if k[0].startswith("earshot_fallback_uses")]

    one, two = FakeSession(2.0, 0.5), FakeSession(3.0, 1.25)
    metrics.stream_started(one)
    metrics.stream_started(two)
    s = scrape_local(metrics)
    assert value(s, "earshot_stream_lag_max_seconds") == 1.25
    assert value(s, "earshot_audio_received_seconds_total") == 5.0
    two.received_seconds = 4.0
    metrics.stream_ended(two)
    metrics.stream_ended(two)  # twice: counted once
    s = scrape_local(metrics)
    assert value(s, "earshot_stream_lag_max_seconds") == 0.5
    assert value(s, "earshot_audio_received_seconds_total") == 6.0

    report = BatchReport(
        JobKind.FINAL, 3, 0.2, 4.5, (0.0, 0.1, 0.1), backend="remote:x", fallback_reason="overload"
    )
    metrics.observe_batch(report)
    fallback = value(
        scrape_local(metrics), "earshot_fallback_uses_total", backend="remote:x", reason="overload"
    )
    assert fallback == 3
