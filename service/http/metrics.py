"""Prometheus metrics for one :class:`~earshot.service.engine.engine.Engine`, at ``GET /metrics``.

Every :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(never the process-wide default one), so several apps, and tests, can live in
one process without their metrics clashing.

Where the numbers come from:

- The scheduler's ``on_batch`` hook (wired by :meth:`Metrics.bind`, chained
  in front of any hook already set): batch size, decode seconds and queue
  wait histograms, decoded audio seconds and decode failures, all by kind.
- Read from the engine and its scheduler at scrape time (a custom
  collector, so nothing can drift out of step with the engine's own
  counters): active streams and streams opened by wire protocol
  (``Engine.streams``, ``Engine.streams_opened``), stream closes by
  websocket close code (``Engine.closes``), queue depth by kind and jobs in
  flight.
- Calls the server makes: :meth:`Metrics.refused` for a refusal before the
  websocket upgrade, :meth:`Metrics.stream_started` / :meth:`Metrics.stream_ended`
  around a stream's session (they feed audio received and the lag gauge),
  and the fallback's batches (``BatchReport.fallback_reason``) feed
  ``earshot_fallback_uses_total``.

Lag is a gauge, ``earshot_stream_lag_max_seconds``: the largest
``StreamSession.lag_seconds()`` over the streams open at scrape time (0 with
none open). A gauge of the current worst lag is what an alert wants ("some
stream is more than N s behind now"); a histogram observed at stream end
would mostly see the lag after the last finals were flushed, which is 0.

Everything here runs on the event loop that serves the app (the hook, the
server calls and the scrape handler); none of it blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from earshot.core.protocol import STREAM_PROTOCOLS
from earshot.service.engine.engine import Engine
from earshot.service.engine.scheduler import BatchHook, BatchReport, JobKind
from earshot.service.http.context import ENGINE

NAMESPACE = "earshot"

BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
"""Buckets of ``earshot_batch_size`` (jobs per backend call; max_batch is 1 to 16)."""

SECONDS_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Buckets of the decode and queue-wait histograms, in seconds."""


class LiveSession(Protocol):
    """What the metrics read from an open stream's session (``StreamSession`` fits)."""

    @property
    def received_seconds(self) -> float: ...

    def lag_seconds(self) -> float: ...


class _EngineCollector(Collector):
    """Scrape-time values read from the engine, its scheduler and the open sessions."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        # Registration must not need a running engine: say nothing in advance.
        return []

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        engine = m.engine
        scheduler = engine.scheduler

        active = GaugeMetricFamily(
            f"{NAMESPACE}_active_streams",
            "Websocket streams open now, by wire protocol.",
            labels=["protocol"],
        )
        open_now: dict[str, int] = {}
        for stream in engine.streams:
            open_now[stream.protocol] = open_now.get(stream.protocol, 0) + 1
        opened = CounterMetricFamily(
            f"{NAMESPACE}_streams_opened",
            "Websocket streams accepted (upgraded) since the server started, by wire protocol.",
            labels=["protocol"],
        )
        for protocol in sorted({*STREAM_PROTOCOLS, *engine.streams_opened}):
            active.add_metric([protocol], open_now.get(protocol, 0))
            opened.add_metric([protocol], engine.streams_opened[protocol])
        yield active
        yield opened
        closes = CounterMetricFamily(
            f"{NAMESPACE}_stream_closes",
            "Streams ended, by close code: the one the server sent, the client's own, "
            "or 1006 for a connection that dropped without a close frame.",
            labels=["code"],
        )
        for code, count in sorted(engine.closes.items()):
            closes.add_metric([str(code)], count)
        yield closes

        depth = scheduler.queue_depth
        queued = GaugeMetricFamily(
            f"{NAMESPACE}_queue_depth",
            "Decode jobs waiting in the scheduler's queue (not yet in a batch), by kind.",
            labels=["kind"],
        )
        queued.add_metric([JobKind.FINAL.value], depth.finals)
        queued.add_metric([JobKind.INTERIM.value], depth.interims)
        yield queued
        yield GaugeMetricFamily(
            f"{NAMESPACE}_decode_in_flight",
            "Decode jobs in the batch the backend is running now.",
            value=scheduler.in_flight,
        )

        sessions = list(m._sessions.values())
        received = m._ended_audio_seconds + sum(s.received_seconds for s in sessions)
        yield CounterMetricFamily(
            f"{NAMESPACE}_audio_received_seconds",
            "Seconds of audio received from clients (per stream, not per channel).",
            value=received,
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_stream_lag_max_seconds",
            "Largest lag of an open stream now: how long ago, in stream time, its oldest "
            "closed but untranscribed utterance ended (0 with no stream open).",
            value=max((s.lag_seconds() for s in sessions), default=0.0),
        )


class Metrics:
    """The Prometheus metrics of one engine, in a registry of their own.

    Construct with the engine (nothing is wired yet), then call :meth:`bind`
    once to hook the scheduler; :func:`register_metrics_routes` does both.
    """

    def __init__(self, engine: Engine, registry: CollectorRegistry | None = None) -> None:
        self.engine = engine
        self.registry = registry if registry is not None else CollectorRegistry()
        self._sessions: dict[int, LiveSession] = {}
        self._ended_audio_seconds = 0.0
        self._bound = False

        r = self.registry
        ns = NAMESPACE
        self.refusals = Counter(
            "refusals",
            "Requests refused (streams before the websocket upgrade, HTTP API requests), "
            "by error code and HTTP status.",
            ["reason", "status"],
            namespace=ns,
            registry=r,
        )
        self.batch_size = Histogram(
            "batch_size",
            "Jobs per backend call, by kind (failed calls included).",
            ["kind"],
            namespace=ns,
            registry=r,
            buckets=BATCH_SIZE_BUCKETS,
        )
        self.batch_seconds = Histogram(
            "batch_decode_seconds",
            "Seconds spent inside one backend call, by kind (failed calls included).",
            ["kind"],
            namespace=ns,
            registry=r,
            buckets=SECONDS_BUCKETS,
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "Seconds a decode job waited between submit and the start of its batch, by kind.",
            ["kind"],
            namespace=ns,
            registry=r,
            buckets=SECONDS_BUCKETS,
        )
        self.decode_failures = Counter(
            "decode_failures",
            "Decode jobs whose backend call raised, by kind.",
            ["kind"],
            namespace=ns,
            registry=r,
        )
        self.audio_decoded = Counter(
            "audio_decoded_seconds",
            "Seconds of audio in successfully decoded windows, by kind (every channel "
            "counts; interims re-decode the audio of an open utterance).",
            ["kind"],
            namespace=ns,
            registry=r,
        )
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests answered, by route (its pattern, e.g. /v1/models/{model_id}), "
            "method and status; websocket streams count once, at their upgrade.",
            ["route", "method", "status"],
            namespace=ns,
            registry=r,
        )
        self.fallback_uses = Counter(
            "fallback_uses",
            "Decode jobs sent to the remote fallback backend, by backend and reason "
            "(overload, failure); failed attempts included.",
            ["backend", "reason"],
            namespace=ns,
            registry=r,
        )
        for kind in JobKind:
            # Every kind shows from the first scrape, at 0.
            self.batch_size.labels(kind.value)
            self.batch_seconds.labels(kind.value)
            self.queue_wait.labels(kind.value)
            self.decode_failures.labels(kind.value)
            self.audio_decoded.labels(kind.value)
        r.register(_EngineCollector(self))

    # -- wiring ----------------------------------------------------------------

    def bind(self) -> Metrics:
        """Hook the engine's scheduler (once; later calls do nothing). The hook
        already set, if any, is still called, after this one. Returns self."""
        if self._bound:
            return self
        self._bound = True
        scheduler = self.engine.scheduler
        previous: BatchHook | None = scheduler.on_batch

        def on_batch(report: BatchReport) -> None:
            try:
                self.observe_batch(report)
            finally:
                if previous is not None:
                    previous(report)

        scheduler.on_batch = on_batch
        return self

    def observe_batch(self, report: BatchReport) -> None:
        """Record one backend call (what the scheduler hook does)."""
        kind = report.kind.value
        self.batch_size.labels(kind).observe(report.size)
        self.batch_seconds.labels(kind).observe(report.seconds)
        wait = self.queue_wait.labels(kind)
        for seconds in report.queue_seconds:
            wait.observe(seconds)
        if report.fallback_reason is not None:
            self.fallback_uses.labels(report.backend, report.fallback_reason).inc(report.size)
        if report.error is None:
            self.audio_decoded.labels(kind).inc(report.audio_seconds)
        else:
            self.decode_failures.labels(kind).inc(report.size)

    # -- calls the server makes ---------------------------------------------------

    def refused(self, reason: str, status: int) -> None:
        """A stream request refused before the upgrade: ``reason`` is the error
        code sent (e.g. ``server_full``), ``status`` the HTTP status."""
        self.refusals.labels(reason, str(status)).inc()

    def stream_started(self, session: LiveSession) -> None:
        """A stream's session is open: its audio and lag count from now on."""
        self._sessions[id(session)] = session

    def stream_ended(self, session: LiveSession) -> None:
        """The stream is over: its audio received is kept in the total and it
        leaves the lag gauge. Safe to call twice or for an unknown session."""
        if self._sessions.pop(id(session), None) is not None:
            self._ended_audio_seconds += session.received_seconds

    # -- exposition ----------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (:data:`CONTENT_TYPE_LATEST`)."""
        return _generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)
"""Where :func:`register_metrics_routes` leaves the app's :class:`Metrics`."""


async def handle_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def register_metrics_routes(app: web.Application) -> Metrics:
    """Add ``GET /metrics`` to an app made by ``create_app(engine)``.

    Creates the engine's :class:`Metrics`, binds it to the scheduler, stores
    it under :data:`METRICS` and returns it (the server's calls go to it).
    Call before the app is started (its router freezes then); a second call
    returns the same :class:`Metrics` and adds nothing.
    """
    if METRICS in app:
        return app[METRICS]
    metrics = Metrics(app[ENGINE]).bind()
    app[METRICS] = metrics
    app.router.add_get("/metrics", handle_metrics)
    app.middlewares.append(_count_requests)
    return metrics


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request by its route's pattern (bounded label values: an
    unknown path counts as ``unmatched``) and final status."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[METRICS].http_requests.labels(route, request.method, str(status)).inc()
