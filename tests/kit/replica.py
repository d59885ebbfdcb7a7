"""One server replica as its own process, reading the tone language.

``python -m tests.kit.replica --port N [any earshot serve setting flag]``
serves exactly as ``earshot serve`` does (the same configuration sources and
checks, logging, application and :func:`earshot.service.http.serving.serve`
with its SIGTERM/SIGINT drain), but the engine decodes with
:class:`tests.kit.tones.ToneBackend` instead of a Whisper model, with the
real Silero endpointer. It starts in a second or two and costs next to no
CPU, so several replicas fit on a small machine for failover tests, where
SIGTERM and SIGKILL need real processes.

:class:`ReplicaProcess` starts one from a test and stops it (SIGTERM, then
SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.kit.processes import LoggedProcess


def main(argv: Sequence[str] | None = None) -> int:
    import asyncio
    import logging

    from earshot.models.silero import shared_model
    from earshot.service.config import add_config_flags, config_from_args
    from earshot.service.engine.engine import Engine
    from earshot.service.http.app import create_app
    from earshot.service.http.auth import check_bind_policy
    from earshot.service.http.serving import serve
    from earshot.service.logs import configure_logging
    from tests.kit.tones import ToneBackend

    parser = argparse.ArgumentParser(
        prog="python -m tests.kit.replica",
        description="earshot serve with the tone-language backend (tests only)",
    )
    add_config_flags(parser)
    cfg = config_from_args(parser.parse_args(argv))
    check_bind_policy(cfg)
    configure_logging(cfg.log_level, cfg.log_format)
    log = logging.getLogger("earshot")
    engine = Engine.create(cfg, ToneBackend(), vad_model=shared_model())
    log.info("model warmed up in %.1f s", engine.warm_up())
    log.info(
        "serving the tone backend on %s:%d (pid %d)",
        cfg.host,
        cfg.port,
        os.getpid(),
        extra={"host": cfg.host, "port": cfg.port, "pid": os.getpid()},
    )
    asyncio.run(serve(create_app(engine), cfg, drain=engine.shut_down))
    log.info("stopped")
    return 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """Status and body of a GET (an HTTP error status included); raises OSError
    when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` in Prometheus text ``text`` whose labels
    include ``labels`` (0 when there is none): ``metric(text,
    "earshot_streams_opened_total", protocol="deepgram")``."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


class ReplicaProcess(LoggedProcess):
    """``python -m tests.kit.replica`` on 127.0.0.1:``port``, its log in ``log_path``.

    ``settings`` are extra flags (``["--drain-s", "3"]``). Use as a context
    manager: on exit a process still running gets SIGTERM, then SIGKILL after
    ``stop_timeout_s``."""

    def __init__(
        self,
        port: int,
        log_path: Path,
        settings: Sequence[str] = (),
        stop_timeout_s: float = 25.0,
    ) -> None:
        super().__init__(log_path, stop_timeout_s)
        self.port = port
        self.settings = list(settings)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ReplicaProcess:
        self.spawn(
            [
                sys.executable,
                "-m",
                "tests.kit.replica",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self.settings,
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return self

    def __enter__(self) -> ReplicaProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll ``/readyz`` until it answers 200; AssertionError with the log's
        tail if the process ends or the time runs out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"replica on port {self.port} exited with {self.proc.returncode}:\n"
                    + self.log_tail()
                )
            with contextlib.suppress(OSError):
                if http_get(f"{self.url}/readyz", timeout=1.0)[0] == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(
            f"replica on port {self.port} not ready within {timeout_s:g} s:\n{self.log_tail()}"
        )

    def metrics(self) -> str:
        return http_get(f"{self.url}/metrics")[1]

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """The exit status; raises subprocess.TimeoutExpired."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)


if __name__ == "__main__":
    raise SystemExit(main())
