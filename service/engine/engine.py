"""The engine: what every stream and request of one server shares.

One :class:`Engine` holds the configuration, the one backend, the one
scheduler in front of it, the voice model, the stated policy and the live
counters (streams open, how they closed). It knows nothing of HTTP: the shell
(:mod:`earshot.service.http`) keeps it in the aiohttp application and hands
it every stream it opens.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from earshot.core.decoding import (
    SAMPLE_RATE,
    Backend,
    DecodeOptions,
    Fallback,
    Window,
    default_max_batch,
)
from earshot.core.errors import ModelNotLocalError, ModelUnavailableError
from earshot.core.session import SessionSettings
from earshot.core.voice import FrameModel, StreamingVad, VadSettings
from earshot.models.catalog import lookup
from earshot.service.config import Config
from earshot.service.engine.scheduler import Scheduler, SchedulerSettings
from earshot.service.engine.startup import stated_policy


class Stream(Protocol):
    """An open stream as the engine sees it (the shell's websocket handler)."""

    @property
    def finished(self) -> asyncio.Event:
        """Set once the stream has sent its last message and closed."""
        ...

    @property
    def protocol(self) -> str:
        """The wire protocol's label (``deepgram``, ``openai_realtime``, ``twilio``)."""
        ...

    def stop(self) -> None:
        """End as at a server shutdown: finals of the speech sent, then 1001."""
        ...


def final_options(cfg: Config) -> DecodeOptions:
    return DecodeOptions(
        beam_size=cfg.final_beam_size,
        without_timestamps=True,
        word_timestamps=True,
        short_context=cfg.final_short_context,
        short_context_pad_s=cfg.final_short_context_pad_s,
    )


def interim_options(cfg: Config) -> DecodeOptions:
    return DecodeOptions(
        beam_size=1,
        without_timestamps=True,
        word_timestamps=False,
        short_context=cfg.interim_short_context,
    )


@dataclass
class Engine:
    """What every stream shares: the configuration, the backend and its queue."""

    config: Config
    backend: Backend
    scheduler: Scheduler
    vad_model: FrameModel
    vad_factory: Callable[[VadSettings], StreamingVad] | None = None
    session_settings: SessionSettings = field(default_factory=SessionSettings)
    policy: dict[str, Any] = field(default_factory=dict)
    active_streams: int = 0
    # Streams accepted since the start, by wire protocol (also for metrics).
    streams_opened: Counter[str] = field(default_factory=Counter)
    # How streams ended, by websocket close code (also for metrics).
    closes: Counter[int] = field(default_factory=Counter)
    streams: set[Stream] = field(default_factory=set)
    shutting_down: bool = False

    async def shut_down(self, deadline: float | None = None) -> None:
        """Graceful shutdown: refuse new streams, end every open one (each gets
        the finals of the speech it sent, then close code 1001), by the loop
        time ``deadline`` (default: ``shutdown_timeout_s`` from now)."""
        self.shutting_down = True
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.config.shutdown_timeout_s
        streams = list(self.streams)
        for stream in streams:
            stream.stop()
        if streams:
            await asyncio.wait(
                [asyncio.ensure_future(s.finished.wait()) for s in streams],
                timeout=max(0.0, deadline - loop.time()),
            )

    @classmethod
    def create(
        cls,
        config: Config,
        backend: Backend,
        *,
        vad_model: FrameModel,
        vad_factory: Callable[[VadSettings], StreamingVad] | None = None,
        fallback: Fallback | None = None,
        policy: dict[str, Any] | None = None,
    ) -> Engine:
        """The engine for ``backend``; ``fallback`` (a remote backend) takes
        work for the reasons in ``config.fallback_on``. ``policy`` is the
        sovereignty policy clients are told; by default the one
        :func:`earshot.service.engine.startup.stated_policy` states for ``config`` (``earshot
        serve`` passes its own, with its egress guard and its model check)."""
        settings = SchedulerSettings(
            max_batch=config.max_batch or default_max_batch(backend.capabilities.device, live=True),
            max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue,
            workers=backend.capabilities.workers,
        )
        scheduler = Scheduler(
            backend,
            settings,
            final_options=final_options(config),
            interim_options=interim_options(config),
            fallback=fallback,
            fallback_on=config.fallback_reasons if fallback is not None else frozenset(),
        )
        session_settings = SessionSettings(
            interim_step_s=config.interim_step_s,
            max_utterance_s=config.max_utterance_s,
            lag_warning_s=config.lag_warning_s,
            lag_limit_s=config.lag_limit_s,
        )
        return cls(
            config,
            backend,
            scheduler,
            vad_model=vad_model,
            vad_factory=vad_factory,
            session_settings=session_settings,
            policy=policy
            if policy is not None
            else stated_policy(
                config,
                remote=fallback,
                guard=None,
                model_verified=backend.provenance().get("record_verified"),
            ),
        )

    @property
    def model_name(self) -> str:
        return self.backend.name

    def client_provenance(self) -> dict[str, Any]:
        """The model's provenance as clients see it (no server file paths)."""
        return {k: v for k, v in self.backend.provenance().items() if k != "path"}

    def result_provenance(self, info: dict[str, Any]) -> dict[str, Any]:
        """What produced one final: the backend, the model by name and sha256,
        and the options (by name: the ``decoding`` of the stream's Metadata).
        ``info`` is the hypothesis' ``info`` (a remote's says which remote)."""
        if info.get("backend") == "remote":
            return {
                "backend": "remote",
                "remote": info.get("remote") or info.get("name"),
                "model": info.get("remote_model"),
                "fallback": info.get("fallback"),
                "decoding": "final",
            }
        return self._local_result_provenance

    @functools.cached_property
    def _local_result_provenance(self) -> dict[str, Any]:
        # The served model does not change: asked once, not for every final.
        prov = self.backend.provenance()
        return {
            "backend": "local",
            "model": self.model_name,
            "model_sha256": prov.get("model_sha256") or prov.get("sha256"),
            "decoding": "final",
        }

    def live_policy(self) -> dict[str, Any]:
        """The stated policy plus the fallback's state now (``GET /v1/policy``)."""
        state: dict[str, Any] = {"accepting": self.scheduler.accepting()}
        fallback = self.scheduler.fallback
        if fallback is not None:
            state["fallback_available"] = self.scheduler.fallback_available("overload") or (
                self.scheduler.fallback_available("failure")
            )
            state["fallback_circuit"] = fallback.circuit_state
            stats = self.scheduler.stats()
            state["fallback_jobs"] = stats.fallback_completed
        return {**self.policy, "state": state}

    def warm_up(self) -> float:
        """Decode one second of silence with the interim and the final options,
        so that the first stream does not pay for one-time start-up costs
        (CUDA kernels, memory pools). Returns the seconds it took."""
        start = time.monotonic()
        window = Window(np.zeros(SAMPLE_RATE, np.float32), language="en")
        for options in (self.scheduler.interim_options, self.scheduler.final_options):
            self.backend.transcribe_batch([window], options)
        return time.monotonic() - start

    def decoding(self) -> dict[str, Any]:
        return {
            "final": self.scheduler.final_options.to_dict(),
            "interim": self.scheduler.interim_options.to_dict(),
            "max_batch": self.scheduler.settings.max_batch,
        }


def check_model_name(
    engine: Engine, name: str | None, aliases: Collection[str], hint: str = ""
) -> str:
    """The served model's name for a requested model ``name``.

    None, the served model's own name, ``aliases`` (a client protocol's own
    names for "the model", e.g. Deepgram's tiers or ``whisper-1``) and names
    Earshot does not know mean the served model. Another Whisper model of the
    catalogue, or the remote fallback's model, is refused rather than
    silently answered by a different one: ``model_not_local`` in on-prem-only
    mode, ``model_not_available`` otherwise (``hint`` is added to its message).
    """
    served = engine.model_name
    if name is None or name == served or name in aliases:
        return served
    fallback = engine.scheduler.fallback
    remote = fallback.model if fallback is not None else None
    if lookup(name) is None and name != remote:
        return served
    if engine.config.on_prem_only:
        raise ModelNotLocalError(
            f"model {name!r} is not on this server, and on-prem-only mode neither "
            f"downloads models nor sends audio to a remote one; this server runs {served!r}",
            field="model",
            served=served,
        )
    raise ModelUnavailableError(
        f"model {name!r} is not served here; this server runs {served!r}{hint}",
        field="model",
        served=served,
    )


def backend_label(info: dict[str, Any]) -> str:
    """Which backend produced a hypothesis, from its ``info``: ``"local"``, or
    the remote fallback's name."""
    if info.get("backend") == "remote":
        return str(info.get("name") or "remote")
    return "local"
