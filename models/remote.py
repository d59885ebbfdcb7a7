"""A backend that sends windows to a remote OpenAI-compatible transcription API.

:class:`RemoteBackend` implements :class:`earshot.core.decoding.Backend` by posting
every window, as a 16-bit PCM WAV file, to ``POST {base_url}/audio/transcriptions``
(OpenAI's API, or another Earshot server's ``/v1``) and mapping the
``verbose_json`` answer back to a :class:`~earshot.core.decoding.Hypothesis`.

It is built to be a well-behaved fallback:

- every request has a connect timeout and a per-request timeout;
- connection errors, timeouts, 429 and 5xx answers are retried a bounded
  number of times with exponential backoff (honouring ``Retry-After`` up to a
  cap); other 4xx answers are never retried;
- a circuit breaker opens after ``breaker_failures`` consecutive failed
  windows: while it is open every call fails at once with
  :class:`RemoteCircuitOpenError` and nothing is sent; after
  ``breaker_reset_s`` one trial window is let through (half-open), and its
  outcome closes or re-opens the circuit;
- the windows of one batch are sent in parallel, at most ``max_concurrency``
  at a time;
- ``on_request(destination, reason)`` is called before every HTTP request so
  that an audit log can record where audio went.

The API key is never part of a repr, a log line, provenance or an error
message.
"""

from __future__ import annotations

import contextvars
import email.utils
import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httpx
import numpy as np
import soundfile as sf

from earshot.core.decoding import (
    SAMPLE_RATE,
    Capabilities,
    DecodeOptions,
    Hypothesis,
    Window,
    check_windows,
)
from earshot.core.errors import (
    ConfigError,
    RemoteBadResponseError,
    RemoteCircuitOpenError,
    RemoteError,
    RemoteRejectedError,
    RemoteUnavailableError,
)
from earshot.core.openai_wire import hypothesis_from_verbose
from earshot.models.breaker import CircuitBreaker

log = logging.getLogger("earshot.remote")

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
"""Largest answer accepted from a remote (a 30 s window's verbose_json is a few KiB)."""

_USER_AGENT = "earshot-remote-backend/0.1"


# --- errors -------------------------------------------------------------------


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# --- settings -----------------------------------------------------------------


@dataclass(frozen=True)
class RemoteSettings:
    """Where the remote is and how hard to try. Validated on construction
    (:class:`ConfigError` whose ``field`` names the bad setting).

    ``base_url`` is the API root, e.g. ``http://10.0.0.5:8000/v1``; requests
    go to ``{base_url}/audio/transcriptions``. It must not carry credentials:
    the key goes in ``api_key`` (sent as ``Authorization: Bearer KEY``).
    """

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    model: str = "whisper-1"
    connect_timeout_s: float = 3.0
    timeout_s: float = 30.0
    max_retries: int = 2
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    max_concurrency: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", _check_base_url(self.base_url))
        key = self.api_key
        if key is not None:
            if not isinstance(key, str):
                raise ConfigError("remote setting api_key must be a string", field="api_key")
            if key == "":
                object.__setattr__(self, "api_key", None)
            elif any(c.isspace() for c in key) or not key.isprintable():
                raise ConfigError(
                    "remote setting api_key must not contain spaces or control characters",
                    field="api_key",
                )
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(
                f"remote setting model must be a non-empty string, not {self.model!r}",
                field="model",
            )
        _check_number("connect_timeout_s", self.connect_timeout_s, low=0.0, open_low=True)
        _check_number("timeout_s", self.timeout_s, low=0.0, open_low=True)
        _check_number("backoff_s", self.backoff_s, low=0.0)
        _check_number("max_backoff_s", self.max_backoff_s, low=0.0)
        _check_number("breaker_reset_s", self.breaker_reset_s, low=0.0, open_low=True)
        _check_int("max_retries", self.max_retries, 0, 10)
        _check_int("breaker_failures", self.breaker_failures, 1, 1000)
        _check_int("max_concurrency", self.max_concurrency, 1, 64)
        if self.max_backoff_s < self.backoff_s:
            raise ConfigError(
                f"remote setting max_backoff_s ({self.max_backoff_s:g}) must not be below "
                f"backoff_s ({self.backoff_s:g})",
                field="max_backoff_s",
            )

    @property
    def destination(self) -> str:
        """``host:port`` of the remote, as an audit log records it."""
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{host}:{port}"


def _check_base_url(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError("remote setting base_url must be a non-empty URL", field="base_url")
    url = raw.strip()
    parts = urlsplit(url)
    shown = redact_url(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"remote setting base_url must start with http:// or https://, not {shown!r}",
            field="base_url",
        )
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"remote setting base_url must not carry credentials ({shown!r}); "
            "give the key as api_key",
            field="base_url",
        )
    if not parts.hostname:
        raise ConfigError(f"remote setting base_url has no host: {shown!r}", field="base_url")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(
            f"remote setting base_url has an invalid port: {shown!r}", field="base_url"
        ) from None
    if parts.query or parts.fragment:
        raise ConfigError(
            f"remote setting base_url must not have a query or fragment: {shown!r}",
            field="base_url",
        )
    return url.rstrip("/")


def _check_number(name: str, value: object, *, low: float, open_low: bool = False) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        if math.isfinite(v) and (v > low or (v == low and not open_low)):
            return
    bound = f"above {low:g}" if open_low else f"at least {low:g}"
    raise ConfigError(
        f"remote setting {name} must be a finite number {bound}, not {value!r}", field=name
    )


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return
    raise ConfigError(
        f"remote setting {name} must be an integer from {low} to {high}, not {value!r}",
        field=name,
    )


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part (for messages and logs)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=host).geturl()


_SETTING_TYPES: dict[str, type] = {
    "model": str,
    "connect_timeout_s": float,
    "timeout_s": float,
    "max_retries": int,
    "backoff_s": float,
    "max_backoff_s": float,
    "breaker_failures": int,
    "breaker_reset_s": float,
    "max_concurrency": int,
}


def parse_remote(url: str, options: Mapping[str, object] | None = None) -> RemoteSettings:
    """:class:`RemoteSettings` from a URL string and options.

    The URL may carry the key as its user part (``https://KEY@host/v1`` or
    ``https://user:KEY@host/v1``) and settings as its query string
    (``http://10.0.0.5:8000/v1?model=whisper-1&timeout_s=10``); ``options``
    (setting names to values, strings are converted) win over the query
    string. ``api_key`` may be given in ``options`` but not in the query
    string, and not both there and in the URL. Raises :class:`ConfigError`
    naming the bad setting.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("the remote URL must be a non-empty string", field="base_url")
    parts = urlsplit(url.strip())
    values: dict[str, object] = {}
    for name, raw in parse_qsl(parts.query, keep_blank_values=True):
        if name == "api_key":
            raise ConfigError(
                "the remote URL must not carry api_key in its query string "
                "(it would end up in logs); put it in the URL's user part or in the options",
                field="api_key",
            )
        if name not in _SETTING_TYPES:
            raise ConfigError(
                f"unknown remote setting {name!r} in the URL's query string", field=name
            )
        values[name] = raw
    url_key: str | None = None
    if parts.username is not None or parts.password is not None:
        url_key = unquote(parts.password or parts.username or "") or None
    opts = dict(options or {})
    opt_key = opts.pop("api_key", None)
    if opt_key is not None and not isinstance(opt_key, str):
        raise ConfigError("remote setting api_key must be a string", field="api_key")
    if url_key and opt_key:
        raise ConfigError(
            "the remote key is given twice (in the URL and in api_key); give it once",
            field="api_key",
        )
    for name, value in opts.items():
        if name not in _SETTING_TYPES:
            raise ConfigError(f"unknown remote setting {name!r}", field=name)
        values[name] = value
    converted = {name: _convert(name, raw) for name, raw in values.items()}
    base = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query="", fragment="")
    return RemoteSettings(
        base_url=base.geturl(),
        api_key=opt_key or url_key,
        **converted,  # type: ignore[arg-type]
    )


def _convert(name: str, raw: object) -> object:
    kind = _SETTING_TYPES[name]
    if not isinstance(raw, str):
        if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        return raw  # checked by RemoteSettings
    text = raw.strip()
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ConfigError(
            f"remote setting {name} must be {noun}, not {raw!r}", field=name
        ) from None


class _Aborted(Exception):
    """A window of a batch that had already failed was not sent."""


# --- the backend --------------------------------------------------------------


class RemoteBackend:
    """A :class:`earshot.core.decoding.Backend` served by a remote OpenAI-compatible API.

    Thread-safe: several threads may call :meth:`transcribe_batch` at once
    (they share the connection pool, the ``max_concurrency`` workers and the
    circuit breaker). ``on_request(destination, reason)`` is called, from the
    thread that sends it, before every HTTP request (each retry included)
    with ``host:port`` and ``"transcription"``; if it raises, nothing is sent
    and the exception propagates. Worker threads run in a copy of the calling
    thread's :mod:`contextvars` context.
    """

    def __init__(
        self,
        settings: RemoteSettings,
        *,
        on_request: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._on_request = on_request
        self._clock = clock
        self._breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s, clock)
        self._destination = settings.destination
        self._name = f"remote:{settings.model}@{self._destination}"
        headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        t = settings.timeout_s
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(t, connect=min(settings.connect_timeout_s, t)),
            limits=httpx.Limits(
                max_connections=settings.max_concurrency,
                max_keepalive_connections=settings.max_concurrency,
            ),
            follow_redirects=False,
            # Proxies from the environment would send audio somewhere the
            # settings and the audit log do not name.
            trust_env=False,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="earshot-remote"
        )
        self._closed = False
        self._lock = threading.Lock()
        # One event per batch in progress: set when the batch fails or the
        # backend is closed, so that nothing more of it is sent.
        self._aborts: set[threading.Event] = set()
        self.requests_sent = 0
        """HTTP requests sent (every attempt counts)."""
        self.capabilities = Capabilities(device="remote")
        """The remote service decides its languages; it may translate."""

    def __repr__(self) -> str:
        return f"RemoteBackend({self._name!r}, base_url={self.settings.base_url!r})"

    # -- Backend interface -------------------------------------------------
    @property
    def name(self) -> str:
        """``remote:MODEL@HOST:PORT``."""
        return self._name

    @property
    def model(self) -> str:
        """The model the remote serves, by the name it was configured with."""
        return self.settings.model

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    @property
    def circuit_state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        return self._breaker.state()

    def provenance(self) -> dict[str, Any]:
        return {
            "backend": "remote",
            "name": self._name,
            "base_url": self.settings.base_url,
            "model": self.settings.model,
        }

    def available(self) -> bool:
        """False while the circuit is open (or its one trial is in flight), or
        after :meth:`close`. Cheap: no network traffic."""
        return not self._closed and self._breaker.available()

    def transcribe_batch(
        self, windows: Sequence[Window], options: DecodeOptions
    ) -> list[Hypothesis]:
        """Send every window (up to ``max_concurrency`` at once); one hypothesis
        per window, in order. All windows succeed or the call raises.

        Raises InvalidRequestError (nothing sent) for an empty, non-mono or
        over-30 s window or an unknown task; RemoteCircuitOpenError (nothing
        sent) while the circuit is open; RemoteUnavailableError when the remote
        cannot be reached or answers 429/5xx after every retry;
        RemoteRejectedError for another 4xx; RemoteBadResponseError for an
        answer that is not verbose_json.
        """
        if not windows:
            return []
        items = list(windows)
        check_windows(items, options)
        if self._closed:
            raise self._closed_error()
        if not self._breaker.available():
            raise self._circuit_open()
        abort = threading.Event()
        with self._lock:
            self._aborts.add(abort)
        try:
            results: list[Hypothesis | None] = [None] * len(items)
            first = 0
            if len(items) == 1 or self._breaker.state() != "closed":
                # Half-open: the first window is the one trial; the rest
                # follow only if it closes the circuit.
                results[0] = self._window(items[0], options, abort)
                first = 1
            if first < len(items):
                self._parallel(items, options, first, results, abort)
        except _Aborted:
            raise self._closed_error() from None
        finally:
            with self._lock:
                self._aborts.discard(abort)
        return [h for h in results if h is not None]

    def close(self) -> None:
        """Stop the workers and close the connection pool. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for abort in self._aborts:
                abort.set()
        # Queued windows see their batch aborted and return at once; those in
        # flight finish (each bounded by its timeout) before the pool closes.
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------
    def _closed_error(self) -> RemoteUnavailableError:
        return RemoteUnavailableError(
            f"the remote backend for {self.settings.base_url} is closed",
            remote=self.settings.base_url,
        )

    def _parallel(
        self,
        items: list[Window],
        options: DecodeOptions,
        first: int,
        results: list[Hypothesis | None],
        abort: threading.Event,
    ) -> None:
        futures: dict[Future[Hypothesis], int] = {}
        try:
            for i in range(first, len(items)):
                # Each worker runs in a copy of the caller's context, so that
                # context variables (an audit log's session and reason) follow.
                ctx = contextvars.copy_context()
                futures[self._pool.submit(ctx.run, self._window, items[i], options, abort)] = i
        except RuntimeError:  # the pool was shut down by close()
            abort.set()
            wait(futures)
            raise self._closed_error() from None
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        if pending:
            # A window failed: send no more, and let those in flight finish
            # (each bounded by its timeout) so that nothing outlives the call.
            abort.set()
            for fut in pending:
                fut.cancel()
            wait(pending)
        failures: list[tuple[int, int, BaseException]] = []
        for fut, i in futures.items():
            if fut.cancelled():
                continue
            exc = fut.exception()
            if exc is None:
                results[i] = fut.result()
            elif not isinstance(exc, _Aborted):
                # The cause first: a refusal by the breaker is a consequence.
                failures.append((isinstance(exc, RemoteCircuitOpenError), i, exc))
        if failures:
            raise min(failures, key=lambda f: (f[0], f[1]))[2]
        if any(r is None for r in results[first:]):  # aborted by close()
            raise self._closed_error()

    def _window(self, window: Window, options: DecodeOptions, abort: threading.Event) -> Hypothesis:
        if abort.is_set():
            raise _Aborted()
        trial = self._breaker.admit()
        if trial is None:
            raise self._circuit_open()
        ok: bool | None = None
        try:
            hyp = self._send(window, options, abort)
            ok = True
            return hyp
        except RemoteError as exc:
            ok = not exc.breaker_failure
            raise
        finally:
            if self._breaker.record(trial, ok):
                log.warning(
                    "remote %s: circuit opened after %d consecutive failed windows; "
                    "next trial in %.1f s",
                    self.settings.base_url,
                    self._breaker.consecutive_failures,
                    self.settings.breaker_reset_s,
                )

    def _circuit_open(self) -> RemoteCircuitOpenError:
        retry_in = round(self._breaker.retry_in(), 3)
        return RemoteCircuitOpenError(
            f"the circuit to remote {self.settings.base_url} is open after "
            f"{self._breaker.consecutive_failures} consecutive failed windows "
            f"(limit {self.settings.breaker_failures}); the next trial is allowed in "
            f"{retry_in:.1f} s",
            remote=self.settings.base_url,
            consecutive_failures=self._breaker.consecutive_failures,
            retry_in_s=retry_in,
        )

    def _send(self, window: Window, options: DecodeOptions, abort: threading.Event) -> Hypothesis:
        s = self.settings
        translate = options.task == "translate"
        url = f"{s.base_url}/audio/{'translations' if translate else 'transcriptions'}"
        files = {"file": ("window.wav", _wav_bytes(window), "audio/wav")}
        data = _form_fields(window, options, s.model, translate)
        attempts = s.max_retries + 1
        last = ""
        last_status: int | None = None
        for attempt in range(1, attempts + 1):
            if abort.is_set():
                raise _Aborted()
            if self._on_request is not None:
                self._on_request(self._destination, "transcription")
            with self._lock:
                self.requests_sent += 1
            delay = self._backoff(attempt)
            try:
                status, headers, body = self._post(url, files, data)
            except httpx.TransportError as exc:
                last, last_status = _describe(exc, s), None
            except RuntimeError:
                if self._closed:  # the client was closed by close() meanwhile
                    raise _Aborted() from None
                raise
            else:
                if 200 <= status < 300:
                    return self._hypothesis(body, headers, window, attempt)
                message = self._remote_message(body)
                if status != 429 and status < 500:
                    raise self._rejected(status, message, attempt)
                last, last_status = f"HTTP {status}{message}", status
                delay = max(delay, self._retry_after(headers.get("retry-after")))
            if attempt < attempts:
                log.warning(
                    "remote %s: attempt %d of %d failed (%s); retrying in %.2f s",
                    s.base_url,
                    attempt,
                    attempts,
                    last,
                    delay,
                )
                if abort.wait(delay):
                    raise _Aborted()
        raise RemoteUnavailableError(
            f"remote {s.base_url} failed {attempts} attempt"
            f"{'s' if attempts != 1 else ''} (connect timeout {s.connect_timeout_s:g} s, "
            f"timeout {s.timeout_s:g} s per request): {last}",
            remote=s.base_url,
            attempts=attempts,
            timeout_s=s.timeout_s,
            connect_timeout_s=s.connect_timeout_s,
            status=last_status,
        )

    def _post(
        self, url: str, files: dict[str, tuple[str, bytes, str]], data: dict[str, Any]
    ) -> tuple[int, httpx.Headers, bytes]:
        """One request; the whole answer must arrive within ``timeout_s``."""
        deadline = self._clock() + self.settings.timeout_s
        with self._client.stream("POST", url, files=files, data=data) as resp:
            chunks: list[bytes] = []
            size = 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise RemoteBadResponseError(
                        f"remote {self.settings.base_url} sent an answer over "
                        f"{MAX_RESPONSE_BYTES} bytes",
                        remote=self.settings.base_url,
                        limit_bytes=MAX_RESPONSE_BYTES,
                    )
                chunks.append(chunk)
                if self._clock() > deadline:
                    raise httpx.ReadTimeout("the answer did not arrive within the timeout")
            return resp.status_code, resp.headers, b"".join(chunks)

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return float(min(s.max_backoff_s, s.backoff_s * (2 ** (attempt - 1))))

    def _retry_after(self, value: str | None) -> float:
        """``Retry-After`` (seconds or an HTTP date) in seconds, capped at max_backoff_s."""
        if not value:
            return 0.0
        seconds: float | None
        try:
            seconds = float(value.strip())
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return 0.0
            seconds = when.timestamp() - time.time()
        if not math.isfinite(seconds):
            return 0.0
        return min(self.settings.max_backoff_s, max(0.0, seconds))

    def _remote_message(self, body: bytes) -> str:
        """The remote's own error message (OpenAI's ``{"error": {"message"}}``),
        short and without the key, as ``": message"``; empty if none."""
        text = ""
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if isinstance(parsed, dict):
            err = parsed.get("error")
            if isinstance(err, dict) and isinstance(err.get("message"), str):
                text = err["message"]
            elif isinstance(err, str):
                text = err
            elif isinstance(parsed.get("message"), str):
                text = parsed["message"]
        text = " ".join(text.split())[:300]
        key = self.settings.api_key
        if key:
            text = text.replace(key, "***")
        return f": {text}" if text else ""

    def _rejected(self, status: int, message: str, attempt: int) -> RemoteRejectedError:
        config_shaped = status in (401, 403, 404, 405) or 300 <= status < 400
        hint = ""
        if status in (401, 403):
            hint = " (check the remote's api_key)"
        elif status in (404, 405) or 300 <= status < 400:
            hint = " (check the remote's base_url; requests go to {base_url}/audio/...)"
        return RemoteRejectedError(
            f"remote {self.settings.base_url} rejected the request with HTTP {status}"
            f"{message}{hint}",
            breaker_failure=config_shaped,
            remote=self.settings.base_url,
            status=status,
            attempts=attempt,
        )

    def _hypothesis(
        self, body: bytes, headers: httpx.Headers, window: Window, attempts: int
    ) -> Hypothesis:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if not isinstance(parsed, dict):
            raise RemoteBadResponseError(
                f"remote {self.settings.base_url} answered with a body that is not a "
                f"JSON object ({len(body)} bytes)",
                remote=self.settings.base_url,
            )
        model = headers.get("x-earshot-model") or _str(parsed.get("model"))
        info = {
            "backend": "remote",
            "remote": self.settings.base_url,
            "remote_model": model or self.settings.model,
            "remote_attempts": attempts,
        }
        try:
            return hypothesis_from_verbose(parsed, window, info)
        except (TypeError, ValueError, KeyError) as exc:
            raise RemoteBadResponseError(
                f"remote {self.settings.base_url} answered with a body that is not a "
                f"verbose_json transcription: {exc}",
                remote=self.settings.base_url,
            ) from None


def _describe(exc: httpx.TransportError, s: RemoteSettings) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection within {s.connect_timeout_s:g} s"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {s.timeout_s:g} s"
    detail = " ".join(str(exc).split())[:200]
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed ({detail or 'refused or unreachable'})"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _wav_bytes(window: Window) -> bytes:
    buf = io.BytesIO()
    audio = np.clip(np.asarray(window.audio, dtype=np.float32), -1.0, 1.0)
    sf.write(buf, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def remote_prompt(window: Window, options: DecodeOptions) -> str | None:
    """The ``prompt`` field for ``window``: its hotwords, then its previous
    text cut to its last ``max_prompt_tokens`` words (the remote's tokenizer
    is unknown here, so words stand in for tokens)."""
    previous = (window.prompt or "").split()
    n = options.max_prompt_tokens
    previous = previous[-n:] if n > 0 else []
    parts = [p for p in ((window.hotwords or "").strip(), " ".join(previous)) if p]
    return " ".join(parts) or None


def _form_fields(
    window: Window, options: DecodeOptions, model: str, translate: bool
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": model,
        "response_format": "verbose_json",
        "temperature": f"{options.temperature:g}",
    }
    if window.language and not translate:
        data["language"] = window.language
    prompt = remote_prompt(window, options)
    if prompt:
        data["prompt"] = prompt
    if options.word_timestamps and not translate:
        data["timestamp_granularities[]"] = ["word", "segment"]
    return data


__all__ = [
    "MAX_RESPONSE_BYTES",
    "RemoteBackend",
    "RemoteSettings",
    "parse_remote",
    "redact_url",
    "remote_prompt",
]
