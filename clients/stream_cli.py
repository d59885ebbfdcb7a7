"""``earshot stream``: stream a file (or standard input) to a running server.

Interim results are shown on one line that is rewritten in place when
standard output is a terminal (they are not shown otherwise); finals are
printed as lines, prefixed with ``[ch N]`` when the stream has several
channels. ``--json`` writes every server message as one JSON line instead.

A stream whose server goes away (1001), fails (1011) or drops the
connection is reconnected to the same URL and resumed where its finals
stopped (no word lost or doubled; see ``transcribe_stream`` and
docs/protocol.md, "Reconnecting"); ``--no-reconnect`` turns this off.

Exit codes: 0 the server closed the stream normally (1000), after
reconnecting or not; 1 the server refused the stream, closed it with an
error, or could not be reached (or reached again); 2 bad usage or an
unreadable input file.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import shutil
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any, TextIO

from earshot.clients.audio import BYTES_PER_SAMPLE, ENCODINGS, read_audio_file
from earshot.clients.stream import (
    CLOSE_NORMAL,
    DEFAULT_URL,
    AudioSource,
    StreamConnectError,
    StreamRefusedError,
    StreamTranscript,
    channel_of,
    transcribe_stream,
    transcript_of,
)

EXIT_OK = 0
EXIT_STREAM_FAILED = 1
EXIT_USAGE = 2

# A file whose rate the server would refuse is resampled to this rate.
_FALLBACK_RATE = 16000
_SERVER_RATES = (8000, 48000)

_CLEAR_LINE = "\r\x1b[K"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text}")
    return value


def _endpointing(text: str) -> int | bool:
    if text.strip().lower() in ("false", "off"):
        return False
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected milliseconds or 'false', not {text!r}"
        ) from None


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


def add_stream_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register ``earshot stream`` (with ``func=cmd_stream``) and return its parser."""
    p = subparsers.add_parser(
        "stream",
        help="stream a file or standard input to a server and print the transcript",
        description=(
            "Stream audio to an Earshot server's /v1/listen websocket and print "
            "interim and final results as they arrive. A FILE is read with "
            "libsndfile (WAV, FLAC, OGG, MP3, ...), resampled if needed and encoded "
            "as --encoding; '-' reads raw audio from standard input, which must "
            "already be in --encoding at --sample-rate with --channels."
        ),
    )
    p.add_argument("file", metavar="FILE|-", help="audio file, or - for raw audio on stdin")
    p.add_argument(
        "--url",
        default=os.environ.get("EARSHOT_URL", DEFAULT_URL),
        help=f"the server's streaming endpoint (default: $EARSHOT_URL or {DEFAULT_URL})",
    )
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime",
        dest="realtime",
        action="store_true",
        default=True,
        help="send audio at the pace it would be spoken (default)",
    )
    pace.add_argument(
        "--fast", dest="realtime", action="store_false", help="send audio as fast as possible"
    )
    p.add_argument(
        "--encoding",
        default="linear16",
        choices=ENCODINGS,
        help="encoding of the audio sent (default: linear16)",
    )
    p.add_argument(
        "--sample-rate",
        type=_positive_int,
        default=None,
        help="sample rate sent, Hz (default: the file's own rate; 16000 for stdin)",
    )
    p.add_argument(
        "--channels",
        type=_positive_int,
        default=None,
        help="channels sent (default: the file's own channels; 1 for stdin)",
    )
    p.add_argument(
        "--multichannel",
        action="store_true",
        help="transcribe each channel on its own instead of a mix",
    )
    p.add_argument(
        "--language", default=None, help="language code, or auto (default: the server's)"
    )
    p.add_argument("--no-interim", action="store_true", help="ask for final results only")
    p.add_argument(
        "--endpointing",
        type=_endpointing,
        default=None,
        metavar="MS|false",
        help="silence that ends an utterance, in ms, or false (default: the server's)",
    )
    p.add_argument(
        "--keyterm",
        action="append",
        default=[],
        metavar="TERM",
        help="a word or phrase to favour (repeatable)",
    )
    p.add_argument(
        "--param",
        action="append",
        type=_param,
        default=[],
        metavar="KEY=VALUE",
        help="another query parameter, sent as given (repeatable)",
    )
    p.add_argument(
        "--chunk-ms",
        type=_positive_float,
        default=20.0,
        help="milliseconds of audio per websocket frame (default: 20)",
    )
    p.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help=(
            "end when the connection is lost; by default the stream reconnects after "
            "a server going away (1001), an internal error (1011) or a dropped "
            "connection, and re-sends the audio not yet in a final"
        ),
    )
    p.add_argument(
        "--max-reconnects",
        type=_non_negative_int,
        default=5,
        metavar="N",
        help="reconnection attempts in a row before giving up (default: 5)",
    )
    p.add_argument("--json", action="store_true", help="write every server message as a JSON line")
    p.add_argument(
        "--api-key",
        default=os.environ.get("EARSHOT_API_KEY"),
        help="sent as 'Authorization: Token KEY' (default: $EARSHOT_API_KEY)",
    )
    p.set_defaults(func=cmd_stream)
    return p


# -- output -------------------------------------------------------------------


class _Display:
    """Writes server messages as they arrive; holds Error messages for the summary."""

    def __init__(self, out: TextIO, err: TextIO, *, as_json: bool, tty: bool) -> None:
        self.out = out
        self.err = err
        self.as_json = as_json
        self.tty = tty
        self._interim_shown = False
        self._metadata_seen = False
        self.errors: list[dict[str, Any]] = []

    def _clear_interim(self) -> None:
        if self._interim_shown:
            self.out.write(_CLEAR_LINE)
            self.out.flush()
            self._interim_shown = False

    def _prefix(self, message: dict[str, Any]) -> str:
        index = message.get("channel_index")
        several = isinstance(index, list) and len(index) > 1 and index[1] > 1
        return f"[ch {channel_of(message)}] " if several else ""

    def info(self, text: str) -> None:
        self._clear_interim()
        print(f"earshot: {text}", file=self.err, flush=True)

    def message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "Error":
            self.errors.append(message)
        if self.as_json:
            self.out.write(json.dumps(message, ensure_ascii=False) + "\n")
            self.out.flush()
            return
        if kind == "Metadata" and not self._metadata_seen:
            self._metadata_seen = True
            model = ", ".join(str(m) for m in message.get("models", [])) or "unknown model"
            self.info(f"streaming to {model} (request {message.get('request_id', '?')})")
        elif kind == "Results":
            text = self._prefix(message) + transcript_of(message)
            if message.get("is_final"):
                self._clear_interim()
                if transcript_of(message):
                    self.out.write(text + "\n")
                    self.out.flush()
            elif self.tty:
                width = max(20, shutil.get_terminal_size().columns - 1)
                if len(text) > width:
                    text = "…" + text[-(width - 1) :]
                self.out.write(_CLEAR_LINE + text)
                self.out.flush()
                self._interim_shown = True
        elif kind == "Warning":
            self.info(f"warning: {message.get('message', '')} [{message.get('code', '?')}]")

    def reconnecting(self, text: str) -> None:
        """A step of reconnecting: the errors of the connection that ended are
        shown now (they do not end the stream), then the step."""
        for error in self.errors:
            self.info(_error_line(error))
        self.errors.clear()
        self.info(text)

    def finish(self) -> None:
        self._clear_interim()


def _error_line(error: dict[str, Any]) -> str:
    return f"error: {error.get('message', '')} [{error.get('code', 'unknown')}]"


# -- running ------------------------------------------------------------------


async def _stdin_chunks(chunk_bytes: int) -> AsyncIterator[bytes]:
    """Raw chunks of standard input as they arrive.

    A daemon thread does the blocking reads, so a stream the server ends
    early does not wait for the next bytes on stdin.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
    stdin = sys.stdin.buffer

    def reader() -> None:
        while True:
            try:
                data = stdin.read(chunk_bytes)
            except (OSError, ValueError):
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            except (RuntimeError, concurrent.futures.CancelledError):  # the loop has gone
                return
            if not data:
                return

    threading.Thread(target=reader, name="earshot-stdin", daemon=True).start()
    while True:
        data = await queue.get()
        if not data:
            return
        yield data


def cmd_stream(args: argparse.Namespace) -> int:
    """Run ``earshot stream`` with parsed arguments; returns the exit code."""
    err: TextIO = sys.stderr
    out: TextIO = sys.stdout
    source: AudioSource
    audio_rate: int | None = None
    if args.file == "-":
        rate = args.sample_rate or _FALLBACK_RATE
        channels = args.channels or 1
        frame = BYTES_PER_SAMPLE[args.encoding] * channels
        chunk = max(1, round(rate * args.chunk_ms / 1000.0)) * frame
        source = _stdin_chunks(chunk)
    else:
        try:
            samples, audio_rate = read_audio_file(args.file)
        except (OSError, RuntimeError) as exc:
            print(f"earshot: error: cannot read {args.file}: {exc}", file=err)
            return EXIT_USAGE
        file_rate_ok = _SERVER_RATES[0] <= audio_rate <= _SERVER_RATES[1]
        rate = args.sample_rate or (audio_rate if file_rate_ok else _FALLBACK_RATE)
        channels = args.channels or samples.shape[1]
        if channels != samples.shape[1] and channels != 1 and samples.shape[1] != 1:
            print(
                f"earshot: error: {args.file} has {samples.shape[1]} channels; "
                f"--channels {channels} needs a mono file (or use --channels 1 or "
                f"{samples.shape[1]})",
                file=err,
            )
            return EXIT_USAGE
        source = samples

    display = _Display(out, err, as_json=args.json, tty=out.isatty() and not args.json)
    try:
        result: StreamTranscript = asyncio.run(
            transcribe_stream(
                args.url,
                source,
                encoding=args.encoding,
                sample_rate=rate,
                channels=channels,
                multichannel=args.multichannel,
                language=args.language,
                interim_results=not args.no_interim,
                endpointing=args.endpointing,
                keyterms=args.keyterm,
                api_key=args.api_key or None,
                extra_params=args.param,
                chunk_ms=args.chunk_ms,
                realtime=args.realtime,
                audio_sample_rate=audio_rate,
                on_message=display.message,
                reconnect=args.reconnect,
                max_reconnects=args.max_reconnects,
                on_reconnect=display.reconnecting,
            )
        )
    except StreamRefusedError as exc:
        display.finish()
        line = f"error: the server refused the stream: HTTP {exc.status}"
        line += f" [{exc.code}]" if exc.code else ""
        line += f": {exc.message}" if exc.message else ""
        if exc.retry_after is not None:
            line += f" (retry after {exc.retry_after:g} s)"
        print(f"earshot: {line}", file=err)
        return EXIT_STREAM_FAILED
    except StreamConnectError as exc:
        display.finish()
        print(f"earshot: error: {exc}", file=err)
        return EXIT_STREAM_FAILED
    except ValueError as exc:  # audio that cannot be fitted to the stream's format
        display.finish()
        print(f"earshot: error: {exc}", file=err)
        return EXIT_USAGE
    display.finish()
    code = result.close_code
    errors = display.errors
    if code == CLOSE_NORMAL:
        for error in errors:
            print(f"earshot: {_error_line(error)}", file=err)
        return EXIT_OK
    for error in errors[:-1]:
        print(f"earshot: {_error_line(error)}", file=err)
    if errors:
        line = f"{_error_line(errors[-1])} (connection closed with code {code})"
    elif code == 1006 or code is None:
        line = "error: the connection to the server was lost before the stream ended"
    else:
        reason = f": {result.close_reason}" if result.close_reason else ""
        line = f"error: the server closed the stream with code {code}{reason}"
    print(f"earshot: {line}", file=err)
    return EXIT_STREAM_FAILED
