"""What the browser demo's tests need: Debian's Chromium, fake microphone
audio, and a real server running beside a synchronous Playwright.

Playwright's sync API must not run inside an asyncio loop, so the server runs
in a thread of its own with its own loop (:class:`ServerThread`), and the
test drives the browser from the main thread. Nothing is downloaded: the
browser is the system's Chromium (``apt-get install chromium``), found by
:func:`find_chromium`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import soundfile as sf
from aiohttp import web

from earshot.service.engine.engine import Engine
from earshot.service.http.app import create_app
from tests.kit.paths import REPO_ROOT

T = TypeVar("T")

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")
"""Where Debian's ``chromium`` package puts the browser (the wrapper script first)."""

ARTIFACTS_DIR = REPO_ROOT / ".artifacts" / "browser"
"""Screenshots of the browser tests (git-ignored)."""


def find_chromium() -> str | None:
    """``$EARSHOT_CHROMIUM``, else Debian's Chromium, else ``chromium`` on the
    PATH; None when there is none."""
    env = os.environ.get("EARSHOT_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


FOREIGN_HOST = "foreign.earshot.test"
"""A host name Chromium resolves to 127.0.0.1 (see chromium_args): a page
opened under it has an origin that is not the server's own."""


def chromium_args(fake_audio: Path, *, loop: bool = False) -> list[str]:
    """Command-line flags for a headless, quiet Chromium whose microphone is
    granted without asking and plays ``fake_audio`` (a WAV file).

    Chromium loops the file unless its path ends with ``%noloop``; each new
    capture (each ``getUserMedia``) starts it from the beginning again."""
    suffix = "" if loop else "%noloop"
    return [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_audio}{suffix}",
        # A second name for the test server, as another site would have it.
        f"--host-resolver-rules=MAP {FOREIGN_HOST} 127.0.0.1",
    ]


def write_wav(path: Path, audio: npt.ArrayLike, sample_rate: int) -> Path:
    """``audio`` (float, mono or frames x channels) as a 16-bit PCM WAV file."""
    data = np.asarray(audio, dtype=np.float32)
    sf.write(str(path), data, sample_rate, subtype="PCM_16")
    return path


class ServerThread:
    """An :class:`Engine` served on a free 127.0.0.1 port from a background
    thread with its own event loop.

    ``make_engine`` is called in that thread with the server's origin
    (``http://127.0.0.1:PORT``), so that the engine's configuration can allow
    the page served at that origin. Use as a context manager; :attr:`url` is
    the origin and :attr:`engine` the engine."""

    def __init__(self, make_engine: Callable[[str], Engine], start_timeout: float = 30.0) -> None:
        self._make_engine = make_engine
        self._start_timeout = start_timeout
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.loop = asyncio.new_event_loop()
        self._engine: Engine | None = None
        self._runner: web.AppRunner | None = None
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="earshot-test-server", daemon=True)

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "the server has not started"
        return self._engine

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:
            self._ready.set_exception(exc)
            self.loop.close()
            return
        self._ready.set_result(None)
        try:
            self.loop.run_forever()
        finally:
            if self._runner is not None:
                self.loop.run_until_complete(self._runner.cleanup())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _start(self) -> None:
        self._engine = self._make_engine(self.url)
        self._runner = web.AppRunner(create_app(self._engine), handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.result(timeout=self._start_timeout)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
        self._sock.close()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """``fn()`` run in the server's loop (to read its state safely)."""

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the server has no open stream (the last one has fully
        closed on the server's side). Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while self.call(lambda: self.engine.active_streams) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server still has open streams after {timeout} s")
            time.sleep(0.05)

    def listen_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/listen"


def screenshot_path(name: str) -> Path:
    """``.artifacts/browser/NAME.png`` (the folder is created)."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR / f"{name}.png"
