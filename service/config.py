"""The server's one frozen configuration, built from a TOML file, ``EARSHOT_*``
environment variables and command-line flags (later sources win).

Every setting has a name, a type, a default and a description; the same name
is used in all three sources: ``max_streams`` is ``max_streams = 64`` in the
file, ``EARSHOT_MAX_STREAMS=64`` in the environment and ``--max-streams 64``
on the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from earshot.core.errors import ConfigError
from earshot.core.values import parse_bool

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class Config:
    """Everything ``earshot serve`` needs. Build with :func:`load_config`."""

    host: str = _f("127.0.0.1", "address to listen on")
    port: int = _f(8000, "port to listen on")
    model: str = _f(
        "",
        "model folder, store name or catalogue name (empty: base where it is installed, "
        "else tiny.en)",
    )
    models_dir: str = _f("", "model store folder (default ~/.local/share/earshot/models)")
    allow_download: bool = _f(False, "download a catalogue model from the hub if missing")
    device: str = _f("auto", "auto, cpu or cuda")
    compute_type: str = _f("auto", "auto: float16 on cuda, int8 on cpu")
    cpu_threads: int = _f(0, "CTranslate2 threads per decode worker on CPU (0: automatic)")
    decode_workers: int = _f(
        0,
        "batches decoded at once, each by its own model replica (0: 1 per core up to 4; cuda 1)",
    )
    language: str = _f("en", "language when a stream names none (auto: detect)")
    max_batch: int = _f(0, "windows per decoder call (0: 1 on cpu, 16 on cuda)")
    max_wait_ms: int = _f(10, "how long a batch may wait to fill")
    max_queue: int = _f(256, "queued jobs past which the server counts as overloaded")
    max_streams: int = _f(64, "concurrent streams; more are refused with 503")
    final_beam_size: int = _f(5, "beam size of final decodes")
    interim_short_context: bool = _f(
        False,
        "encode interims over their own length, not a padded 30 s (faster; may cost accuracy)",
    )
    final_short_context: bool = _f(
        False, "encode finals over their own length, not a padded 30 s (faster; may cost accuracy)"
    )
    final_short_context_pad_s: float = _f(
        5.0, "with final_short_context: seconds of silence encoded after the speech"
    )
    interim_step_s: float = _f(0.75, "seconds of new audio between interim decodes")
    max_utterance_s: float = _f(20.0, "longest utterance; longer speech is cut at a quiet point")
    lag_warning_s: float = _f(5.0, "warn a stream this far behind real time")
    lag_limit_s: float = _f(30.0, "close a stream this far behind real time")
    max_frame_bytes: int = _f(1_048_576, "largest websocket message accepted")
    idle_timeout_s: float = _f(30.0, "close a stream with no audio and no KeepAlive this long")
    max_session_s: float = _f(
        14_400.0, "longest stream, wall-clock seconds from its start; then it is closed"
    )
    max_upload_bytes: int = _f(26_214_400, "largest file accepted by the HTTP API, bytes")
    max_audio_s: float = _f(7_200.0, "longest audio accepted by one HTTP API request, seconds")
    max_pending_messages: int = _f(
        1000, "server messages queued for a slow client before it is closed"
    )
    max_unread_s: float = _f(
        20.0, "how long a message may wait for a client that stopped reading before it is closed"
    )
    socket_send_buffer: int = _f(
        65_536, "kernel send buffer per stream, bytes (bounds memory held for slow clients)"
    )
    flush_timeout_s: float = _f(
        30.0, "at the end of a stream, how long to wait for its last finals"
    )
    shutdown_timeout_s: float = _f(
        20.0,
        "on SIGTERM/SIGINT, the longest the whole exit may take (open streams get their "
        "finals within it)",
    )
    drain_s: float = _f(
        2.0,
        "on SIGTERM/SIGINT, how long at least the listener keeps answering /readyz and new "
        "streams with 503 before it closes (so that load balancers see the drain)",
    )
    header_timeout_s: float = _f(
        10.0,
        "a connection must complete its request headers this soon after it opens or after "
        "its previous response, or it is closed (also the idle keep-alive time)",
    )
    body_timeout_s: float = _f(
        30.0, "an upload that sends no byte of its body for this long is answered 408"
    )
    max_pending_connections: int = _f(
        256,
        "connections that have not yet sent a complete request, at most; more are "
        "answered 503 and closed",
    )
    log_level: str = _f("info", "debug, info, warning or error")
    log_format: str = _f("json", "json (one object per line) or text")
    log_transcripts: bool = _f(
        False, "put transcript text in the logs (off: logs never hold what was said)"
    )
    # Authentication (service/http/auth.py, docs/auth.md). repr=False: never print keys.
    api_keys: str = field(
        default="",
        repr=False,
        metadata={"help": "comma-separated API keys (prefer EARSHOT_API_KEYS or api_keys_file)"},
    )
    api_keys_file: str = _f("", "file of API keys, one per line (# comments, blank lines ignored)")
    allowed_origins: str = _f("", "comma-separated browser Origins allowed (empty: none; *: any)")
    allow_unauthenticated_remote: bool = _f(
        False, "allow a non-loopback host with no API keys configured (unsafe)"
    )

    # Twilio Media Streams at /v1/twilio (docs/protocol.md, docs/auth.md).
    twilio_auth_token: str = field(
        default="",
        repr=False,
        metadata={
            "help": "the Twilio account's auth token: /v1/twilio then requires a valid "
            "X-Twilio-Signature (prefer EARSHOT_TWILIO_AUTH_TOKEN)"
        },
    )
    twilio_stream_url: str = _f(
        "",
        "the URL of /v1/twilio as written in the TwiML (wss://HOST/v1/twilio), which "
        "X-Twilio-Signature signs (empty: the URL the request came to, as ws:// and wss://)",
    )
    twilio_webhook_url: str = field(
        default="",
        repr=False,
        metadata={"help": "http(s) URL that every final of every Twilio call is POSTed to"},
    )
    twilio_interim_results: bool = _f(True, "send interim results of Twilio calls to subscribers")
    twilio_subscriber_wait_s: float = _f(
        30.0, "how long a call's subscriber waits for the call to start"
    )
    twilio_max_subscribers: int = _f(8, "subscribers per call, at most")
    twilio_subscriber_queue: int = _f(
        256, "messages queued for a slow subscriber before it is dropped"
    )

    # Sovereignty (docs/sovereignty.md): remote fallback, on-prem-only mode, audit.
    on_prem_only: bool = _f(
        False,
        "guarantee that nothing leaves allowed_networks: refuse remote backends outside "
        "it, hub downloads and any other outbound connection",
    )
    allowed_networks: str = _f(
        "",
        "comma-separated hosts, IP addresses and CIDRs that count as the operator's own "
        "(loopback always does); names may be *.domain",
    )
    audit_log: str = _f(
        "",
        "JSON-lines audit of outbound connections: a path, - for stderr, off; empty: "
        "~/.local/share/earshot/egress-audit.jsonl in on-prem-only mode, off otherwise",
    )
    audit_loopback: bool = _f(False, "audit connections to loopback too")
    remote_url: str = field(
        default="",
        repr=False,
        metadata={
            "help": "base URL of an OpenAI-compatible transcription API used as fallback, "
            "e.g. http://10.0.0.5:8000/v1 (empty: no remote, nothing ever goes remote)"
        },
    )
    remote_api_key: str = field(
        default="",
        repr=False,
        metadata={"help": "API key of the remote (prefer EARSHOT_REMOTE_API_KEY)"},
    )
    remote_model: str = _f("whisper-1", "model name sent to the remote")
    remote_timeout_s: float = _f(30.0, "per-request timeout of the remote")
    remote_max_retries: int = _f(2, "retries of a failed remote request (errors, 429, 5xx)")
    fallback_on: str = _f(
        "overload,failure",
        "when work may go to the remote: overload (local queue past max_queue), "
        "failure (the local model failed)",
    )
    allow_unverified_model: bool = _f(
        False, "serve a model whose files do not match its recorded checksums (unsafe)"
    )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def default_language(self) -> str | None:
        """The language of streams and requests that name none, as a lower-case
        code; None (``auto`` or empty) to detect it."""
        value = self.language.strip().lower()
        return None if value in ("auto", "") else value

    @property
    def fallback_reasons(self) -> frozenset[str]:
        return frozenset(split_list(self.fallback_on))


def _convert(name: str, kind: Any, raw: Any) -> Any:
    try:
        if kind in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            return parse_bool(str(raw))
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"setting {name} must be of type {getattr(kind, '__name__', kind)}, not {raw!r}",
            field=name,
        ) from None


_LOG_LEVELS = ("debug", "info", "warning", "error")


def split_list(value: str) -> list[str]:
    """The items of a comma-separated setting, stripped, without empty ones."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _validate(cfg: Config) -> Config:
    checks = [
        ("port", 0 <= cfg.port <= 65535, "from 0 to 65535"),
        ("max_batch", 0 <= cfg.max_batch <= 256, "from 0 to 256"),
        ("decode_workers", 0 <= cfg.decode_workers <= 16, "from 0 to 16"),
        ("max_wait_ms", 0 <= cfg.max_wait_ms <= 1000, "from 0 to 1000"),
        ("max_streams", cfg.max_streams >= 1, "at least 1"),
        ("max_queue", cfg.max_queue >= 1, "at least 1"),
        ("final_beam_size", 1 <= cfg.final_beam_size <= 16, "from 1 to 16"),
        ("interim_step_s", 0.1 <= cfg.interim_step_s <= 10, "from 0.1 to 10"),
        ("final_short_context_pad_s", 0 <= cfg.final_short_context_pad_s <= 30, "from 0 to 30"),
        ("max_utterance_s", 2 <= cfg.max_utterance_s <= 29, "from 2 to 29"),
        (
            "lag_limit_s",
            cfg.lag_warning_s < cfg.lag_limit_s <= 35,
            "above lag_warning_s, at most 35",
        ),
        ("max_frame_bytes", cfg.max_frame_bytes >= 1024, "at least 1024"),
        ("idle_timeout_s", cfg.idle_timeout_s > 0, "above 0"),
        ("max_session_s", cfg.max_session_s > 0, "above 0"),
        ("max_upload_bytes", cfg.max_upload_bytes >= 1024, "at least 1024"),
        ("max_audio_s", cfg.max_audio_s > 0, "above 0"),
        ("log_level", cfg.log_level.lower() in _LOG_LEVELS, "debug, info, warning or error"),
        ("log_format", cfg.log_format in ("json", "text"), "json or text"),
        (
            "fallback_on",
            set(split_list(cfg.fallback_on)) <= {"overload", "failure"},
            "a comma-separated list of overload, failure",
        ),
        ("remote_timeout_s", cfg.remote_timeout_s > 0, "above 0"),
        ("remote_max_retries", 0 <= cfg.remote_max_retries <= 10, "from 0 to 10"),
        ("socket_send_buffer", cfg.socket_send_buffer >= 4096, "at least 4096"),
        ("shutdown_timeout_s", cfg.shutdown_timeout_s > 0, "above 0"),
        ("max_unread_s", cfg.max_unread_s > 0, "above 0"),
        ("drain_s", 0 <= cfg.drain_s <= cfg.shutdown_timeout_s, "from 0 to shutdown_timeout_s"),
        ("header_timeout_s", cfg.header_timeout_s > 0, "above 0"),
        ("body_timeout_s", cfg.body_timeout_s > 0, "above 0"),
        ("max_pending_connections", cfg.max_pending_connections >= 1, "at least 1"),
        ("device", cfg.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
        ("twilio_subscriber_wait_s", cfg.twilio_subscriber_wait_s > 0, "above 0"),
        ("twilio_max_subscribers", cfg.twilio_max_subscribers >= 1, "at least 1"),
        ("twilio_subscriber_queue", cfg.twilio_subscriber_queue >= 8, "at least 8"),
        (
            "twilio_webhook_url",
            cfg.twilio_webhook_url == ""
            or cfg.twilio_webhook_url.lower().startswith(("http://", "https://")),
            "an http:// or https:// URL",
        ),
        (
            "twilio_stream_url",
            cfg.twilio_stream_url == ""
            or cfg.twilio_stream_url.lower().startswith(("ws://", "wss://")),
            "a ws:// or wss:// URL",
        ),
    ]
    for name, ok, allowed in checks:
        if not ok:
            raise ConfigError(
                f"setting {name} must be {allowed}, not {getattr(cfg, name)!r}", field=name
            )
    return cfg


def load_config(
    *,
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults, then the TOML ``file`` (``[earshot]`` table or top level),
    then ``EARSHOT_*`` variables of ``env``, then ``overrides`` (flags; None
    values are ignored). Raises ConfigError naming the setting on bad values
    or unknown keys in the file."""
    known = {f.name: f for f in fields(Config)}
    values: dict[str, Any] = {}
    if file:
        path = Path(file)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}", field="config") from exc
        table = data.get("earshot", data)
        for key, raw in table.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown setting {key!r} in {path}", field=key)
            values[name] = _convert(name, known[name].type, raw)
    environ = os.environ if env is None else env
    for name, f in known.items():
        raw = environ.get("EARSHOT_" + name.upper())
        if raw is not None:
            values[name] = _convert(name, f.type, raw)
    for name, raw in (overrides or {}).items():
        if raw is not None and name in known:
            values[name] = _convert(name, known[name].type, raw)
    return _validate(replace(Config(), **values))


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting. Unset flags set nothing (not even None), so
    they neither override other sources nor hide a value that a parent parser
    set under the same name (``earshot --models-dir X serve``)."""
    parser.add_argument(
        "--config",
        default=os.environ.get("EARSHOT_CONFIG"),
        help="TOML config file (or $EARSHOT_CONFIG)",
    )
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default {f.default!r})"
        if f.type in (bool, "bool"):
            parser.add_argument(
                flag,
                dest=f.name,
                default=argparse.SUPPRESS,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Config)}
    return load_config(file=args.config, overrides=overrides)
