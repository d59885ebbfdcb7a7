"""Logging for ``earshot serve``: one JSON object per line, or plain text.

Every record may carry structured fields through ``extra=``: ``session`` (the
stream's or request's id, the same ``request_id`` its client sees), ``code``,
``close_code`` and so on; the JSON formatter writes each as its own key.

What was said never reaches the logs unless the operator turns on
``log_transcripts``: code that would log a transcript passes it through
:func:`transcript_fields`, which gives only its length otherwise. Audio is
never logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def transcript_fields(text: str, log_transcripts: bool) -> dict[str, Any]:
    """Fields for a log record about ``text``: the text itself only when the
    operator turned on ``log_transcripts``, otherwise its length."""
    if log_transcripts:
        return {"transcript": text}
    return {"transcript_chars": len(text)}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields, "exc"?}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger message key=value ...``: for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")
        ]
        return " ".join([line, *fields]) if fields else line


def configure_logging(
    level: str = "info",
    fmt: str = "json",
    *,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stderr) in ``fmt``.

    Replaces the root logger's handlers, so calling it again reconfigures.
    Returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
