"""One exception root for everything Earshot reports to a user or a client.

Every error has a machine-readable ``code`` (stable, documented, snake_case),
an HTTP status for request/response endpoints and a websocket close code for
streams. Messages name the limit or field that was broken and give the numbers.
"""

from __future__ import annotations

from typing import Any, ClassVar


class EarshotError(Exception):
    """Root of every error Earshot reports. Subclasses fix the code and statuses."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    # 1011: internal error. 4000-4999 are ours and listed in docs/protocol.md.
    ws_close_code: ClassVar[int] = 1011

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape sent to clients: ``{"code", "message", ...details}``."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        out.update(self.details)
        return out


class ConfigError(EarshotError):
    """A setting has a value Earshot cannot use."""

    code = "invalid_config"
    http_status = 500


class ModelNotFoundError(EarshotError):
    """No model could be found for the name or path given."""

    code = "model_not_found"
    http_status = 404


class ModelIntegrityError(EarshotError):
    """A model folder's files do not match their recorded checksums."""

    code = "model_checksum_mismatch"
    http_status = 500


class AudioDecodeError(EarshotError):
    """Input could not be decoded as audio."""

    code = "audio_decode_failed"
    http_status = 400
    ws_close_code = 4400


class EmptyAudioError(AudioDecodeError):
    """Input decoded to zero samples."""

    code = "audio_empty"


class InvalidRequestError(EarshotError):
    """A request or stream parameter is invalid; ``field`` names it."""

    code = "invalid_request"
    http_status = 400
    ws_close_code = 4400
