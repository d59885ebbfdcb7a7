"""One exception root for everything Earshot reports to a user or a client.

Every error has a machine-readable ``code`` (stable, documented, snake_case),
an HTTP status for request/response endpoints and a websocket close code for
streams. Messages name the limit or field that was broken and give the numbers.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# ----------------------------------------------------------------- close codes
# Websocket close codes (docs/protocol.md, "Close codes"). 1000-1011 are the
# RFC's; 4000-4999 are ours, built as 4000 + the HTTP status of the same fault.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # server shutting down
CLOSE_PROTOCOL_ERROR = 1002  # e.g. an unmasked client frame
CLOSE_ABNORMAL = 1006  # never sent: the connection dropped without a close frame
CLOSE_INVALID_PAYLOAD = 1007  # a text frame (or close reason) that is not UTF-8
CLOSE_INTERNAL = 1011
CLOSE_INVALID = 4400  # bad parameters or bad audio
CLOSE_UNAUTHORIZED = 4401  # no valid API key
CLOSE_FORBIDDEN = 4403  # a browser page from an origin that is not allowed
CLOSE_NOT_FOUND = 4404  # a call's subscriber: the call did not start in time
CLOSE_IDLE = 4408  # no audio and no KeepAlive for too long
CLOSE_SESSION_LIMIT = 4409  # the stream reached max_session_s
CLOSE_TOO_LARGE = 4413  # a frame over the size limit
CLOSE_LAGGING = 4429  # the stream fell too far behind real time
CLOSE_CLIENT_NOT_READING = 4430  # the client stopped reading its messages
CLOSE_OVERLOADED = 4503


class EarshotError(Exception):
    """Root of every error Earshot reports. Subclasses fix the code and statuses."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    ws_close_code: ClassVar[int] = CLOSE_INTERNAL

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
    ws_close_code = CLOSE_INVALID


class EmptyAudioError(AudioDecodeError):
    """Input decoded to zero samples."""

    code = "audio_empty"


class InvalidRequestError(EarshotError):
    """A request or stream parameter is invalid; ``field`` names it."""

    code = "invalid_request"
    http_status = 400
    ws_close_code = CLOSE_INVALID


# --------------------------------------------------- the /v1/listen protocol


class UnknownParameterError(InvalidRequestError):
    code = "unknown_parameter"


class InvalidParameterError(InvalidRequestError):
    code = "invalid_parameter"


class UnsupportedParameterError(InvalidRequestError):
    """A Deepgram parameter whose effect a client relies on (redaction, a
    callback, diarization...) and that Earshot does not implement: refused,
    never silently ignored."""

    code = "unsupported_parameter"


class InvalidMessageError(InvalidRequestError):
    """A text frame that is not a JSON control message we know. Not fatal."""

    code = "invalid_message"


class ModelUnavailableError(InvalidRequestError):
    code = "model_not_available"


# ------------------------------------------- the OpenAI-compatible endpoints


class UploadTooLargeError(EarshotError):
    code = "upload_too_large"
    http_status = 413


class AudioTooLongError(EarshotError):
    code = "audio_too_long"
    http_status = 413


class TranslationUnavailableError(EarshotError):
    code = "translation_unavailable"
    http_status = 400


class DecodeFailedError(EarshotError):
    code = "decode_failed"
    http_status = 500


class MalformedUploadError(InvalidRequestError):
    """The body is not the multipart form it claims to be."""

    code = "invalid_multipart"


class BodyTimeoutError(EarshotError):
    """The client stopped sending its body."""

    code = "body_timeout"
    http_status = 408


# -------------------------------------------- OpenAI Realtime (/v1/realtime)
# Each is answered with an OpenAI-shaped ``error`` event; none ends the stream.


class RealtimeInvalidEventError(InvalidRequestError):
    """A text frame that is not a JSON object with a string ``type``, or a
    binary frame (the protocol sends audio as base64 in JSON)."""

    code = "invalid_event"


class RealtimeUnknownEventError(InvalidRequestError):
    """A client event ``type`` that the Realtime API does not define."""

    code = "unknown_event"


class RealtimeUnsupportedError(InvalidRequestError):
    """A Realtime feature Earshot does not implement (responses, conversation
    items, tools, output audio, ``session.type`` ``realtime``...): refused,
    naming it, never silently ignored."""

    code = "unsupported_feature"


class RealtimeInvalidAudioError(InvalidRequestError):
    """``input_audio_buffer.append`` whose ``audio`` is not base64, or not whole
    samples of the session's format."""

    code = "invalid_audio"


class RealtimeSessionLockedError(InvalidRequestError):
    """A ``session.update`` that changes a setting after audio began: settings
    (the audio format first of all) are fixed once audio has arrived."""

    code = "session_locked"


class RealtimeCommitEmptyError(InvalidRequestError):
    """``input_audio_buffer.commit`` with no audio appended since the last commit."""

    code = "input_audio_buffer_commit_empty"


# ---------------------------------------------------------- the decode queue


class SchedulerStoppedError(EarshotError):
    """The scheduler is not running (not started yet, stopping or stopped).

    Raised by :meth:`Scheduler.submit`, and set on the futures of jobs that
    were still queued (or whose batch was abandoned) when the scheduler stopped.
    """

    code = "server_shutting_down"
    http_status = 503
    ws_close_code = CLOSE_GOING_AWAY


# ------------------------------------------------------------ authentication


class UnauthorizedError(EarshotError):
    """No API key, or one that is not configured."""

    code = "unauthorized"
    http_status = 401
    ws_close_code = CLOSE_UNAUTHORIZED


class ForbiddenOriginError(EarshotError):
    """A browser ``Origin`` that is not in ``allowed_origins``."""

    code = "forbidden_origin"
    http_status = 403
    ws_close_code = CLOSE_FORBIDDEN


# ------------------------------------------------------------------- streams


class LaggingError(EarshotError):
    """The stream fell further behind real time than the limit allows."""

    code = "stream_lagging"
    http_status = 503
    ws_close_code = CLOSE_LAGGING


# --------------------------------------------------------------------- audio


class UnsupportedEncodingError(InvalidRequestError):
    """``encoding`` is missing or not one Earshot decodes."""

    code = "unsupported_encoding"


class InvalidSampleRateError(InvalidRequestError):
    """``sample_rate`` is missing, not an integer, or outside the allowed range."""

    code = "invalid_sample_rate"


class InvalidChannelsError(InvalidRequestError):
    """``channels`` is not an integer or outside the allowed range."""

    code = "invalid_channels"


class PartialFrameError(AudioDecodeError):
    """The stream ended with bytes that do not make up a whole frame.

    ``tail`` holds the 16 kHz audio that :meth:`StreamAudio.finish` flushed
    before raising (empty when raised by :meth:`FrameDecoder.finish`), so a
    caller can warn the client and still use every whole frame it sent.
    """

    code = "audio_partial_frame"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.tail: list[npt.NDArray[np.float32]] = []


class AudioAfterFinishError(InvalidRequestError):
    """Audio arrived for a stream that was already finished."""

    code = "audio_after_finish"


class AudioRangeError(EarshotError):
    """A ring-buffer read asked for a range that is negative or reversed.

    Ring-buffer errors are internal (HTTP 500, websocket 1011): they mean the
    code reading the buffer is wrong, or that a stream fell further behind
    than the buffer holds, which the lag limit exists to prevent.
    """

    code = "audio_range_invalid"


class AudioRangeOverwrittenError(AudioRangeError):
    """The range starts before the oldest sample the ring buffer still holds."""

    code = "audio_range_overwritten"


class AudioRangeNotReceivedError(AudioRangeError):
    """The range ends after the newest sample appended so far."""

    code = "audio_range_not_received"


# -------------------------------------------------------- the remote backend


class RemoteError(EarshotError):
    """Root of the errors of a remote backend; ``remote`` names it (no credentials)."""

    code = "remote_error"
    http_status = 502
    breaker_failure: bool = True
    """Whether this failure counts towards opening the circuit breaker."""


class RemoteUnavailableError(RemoteError):
    """The remote refused the connection, did not answer in time or answered
    429/5xx, on every attempt."""

    code = "remote_unavailable"
    http_status = 503
    ws_close_code = CLOSE_INTERNAL


class RemoteCircuitOpenError(RemoteUnavailableError):
    """The circuit breaker is open: the call failed at once, nothing was sent."""

    code = "remote_circuit_open"


class RemoteRejectedError(RemoteError):
    """The remote answered 4xx (other than 429): the request itself was refused."""

    code = "remote_rejected"
    http_status = 502

    def __init__(self, message: str, *, breaker_failure: bool = False, **details: Any) -> None:
        super().__init__(message, **details)
        # 401, 403, 404, 405 and redirects say the remote is unusable as
        # configured (wrong key or URL): they count towards the breaker. A 400
        # or 413 is about one request and does not.
        self.breaker_failure = breaker_failure


class RemoteBadResponseError(RemoteError):
    """The remote answered 2xx with a body that is not a verbose_json transcription."""

    code = "remote_bad_response"
    http_status = 502


# --------------------------------------------------------------- sovereignty


class EgressRefusedError(EarshotError):
    """A destination is outside ``allowed_networks`` in on-prem-only mode."""

    code = "egress_refused"
    http_status = 503


class EgressBlockedError(EgressRefusedError, PermissionError):
    """Raised by the audit hook from inside a socket call that the guard refuses.

    A :class:`PermissionError` (``errno`` EACCES, ``strerror`` the message), so
    that socket users (httpx, aiohttp, urllib, asyncio) treat it as a failed
    connection and keep the message; also an :class:`EgressRefusedError`.
    """

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.errno = errno.EACCES
        self.strerror = message


# --------------------------------------------------- streams and connections


class FrameTooLargeError(EarshotError):
    code = "frame_too_large"
    http_status = 413
    ws_close_code = CLOSE_TOO_LARGE


class IdleTimeoutError(EarshotError):
    code = "idle_timeout"
    http_status = 408
    ws_close_code = CLOSE_IDLE


class SessionTooLongError(EarshotError):
    code = "session_too_long"
    http_status = 408
    ws_close_code = CLOSE_SESSION_LIMIT


class ClientNotReadingError(EarshotError):
    code = "client_not_reading"
    http_status = 400
    ws_close_code = CLOSE_CLIENT_NOT_READING


class ModelNotLocalError(EarshotError):
    """On-prem-only mode: the model asked for would have to come from elsewhere."""

    code = "model_not_local"
    http_status = 400
    ws_close_code = CLOSE_INVALID


class ServerFullError(EarshotError):
    code = "server_full"
    http_status = 503


class InvalidHandshakeError(EarshotError):
    """Upgrade headers that do not make a websocket handshake."""

    code = "invalid_handshake"
    http_status = 400


class WebsocketRequiredError(EarshotError):
    """A plain HTTP request to the websocket endpoint."""

    code = "websocket_required"
    http_status = 426


# ------------------------------------------------ Twilio Media Streams (/v1/twilio)


class TwilioMessageError(InvalidRequestError):
    """A Twilio message that is not JSON, or a known event without the fields
    it must have. Not fatal, except for a malformed ``start``."""

    code = "twilio_invalid_message"


class TwilioMediaError(TwilioMessageError):
    """A ``media`` message whose payload is not base64 (the chunk is dropped;
    its span is silence). Not fatal."""

    code = "twilio_invalid_media"


class TwilioNotStartedError(TwilioMessageError):
    """``media`` (or another event of a call) before ``start``. Not fatal,
    until too many such messages arrive."""

    code = "twilio_not_started"


class TwilioUnknownTrackError(TwilioMessageError):
    """``media`` of a track that ``start`` did not announce. Not fatal."""

    code = "twilio_unknown_track"


class TwilioDuplicateStartError(TwilioMessageError):
    """A second ``start`` on the same websocket. Fatal."""

    code = "twilio_duplicate_start"


class TwilioMediaFormatError(TwilioMessageError):
    """``start`` announces a media format other than 8 kHz mono µ-law, or
    tracks other than ``inbound`` and ``outbound``. Fatal."""

    code = "twilio_unsupported_media_format"


class TwilioCallInUseError(TwilioMessageError):
    """``start`` names a ``callSid`` that another live stream already has. Fatal."""

    code = "twilio_call_in_use"


class TwilioSignatureError(UnauthorizedError):
    """``X-Twilio-Signature`` is missing or does not sign the stream's URL with
    the configured ``twilio_auth_token``."""

    code = "twilio_signature_invalid"


class CallNotStartedError(EarshotError):
    """A call's subscriber waited ``twilio_subscriber_wait_s`` and the call did
    not start."""

    code = "call_not_started"
    http_status = 404
    ws_close_code = CLOSE_NOT_FOUND


class SubscriberNotReadingError(ClientNotReadingError):
    """A call's subscriber let ``twilio_subscriber_queue`` messages pile up:
    it is dropped, the call goes on."""

    code = "subscriber_not_reading"
