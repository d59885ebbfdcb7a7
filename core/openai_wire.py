"""The OpenAI audio API's wire shapes that more than one endpoint needs.

Clients of ``/v1/audio/*`` and ``/v1/models`` are OpenAI SDKs: they read
errors from ``{"error": {"message", "type", "code", "param"}}``, whatever
refused the request (the endpoint itself, authentication, or the framework's
own limits). This module is the one place that shape is built.
"""

from __future__ import annotations

from typing import Any

from earshot.core.errors import EarshotError


def is_openai_path(path: str) -> bool:
    """Paths whose clients expect OpenAI's error envelope."""
    return path.startswith("/v1/audio/") or path == "/v1/models" or path.startswith("/v1/models/")


def error_type(status: int) -> str:
    """OpenAI's ``type`` for an HTTP status (what its SDKs map to exceptions)."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_envelope(
    code: str, message: str, status: int, param: str | None = None
) -> dict[str, Any]:
    """``{"error": {...}}`` for one refusal."""
    return {"error": {"message": message, "type": error_type(status), "code": code, "param": param}}


def error_body(err: EarshotError, *, status: int | None = None) -> dict[str, Any]:
    """The envelope for ``err``; ``param`` is the form field at fault."""
    param = err.details.get("field")
    return error_envelope(
        err.code,
        err.message,
        status or err.http_status,
        param if isinstance(param, str) else None,
    )
