"""What a reconnecting stream client must remember to resume without losing
or doubling a word: the pure bookkeeping behind ``transcribe_stream(...,
reconnect=True)`` (:mod:`earshot.clients.stream`). No I/O, no clock.

The caller's clock is the audio's own: second ``t`` is the audio that starts
``t`` seconds into the source. Each connection's stream clock restarts at 0
on the first audio that connection receives, so connection ``k``'s time
``t`` is the caller's ``offset_k + t``. :class:`ResumeState`

* keeps the audio sent since the end of the last final (:meth:`record`; the
  audio before it is final and is let go as finals arrive), bounded at
  ``max_buffer_s`` seconds: beyond that the oldest audio is dropped, and a
  later resume that would have needed it records a warning in
  :attr:`ResumeState.warnings`;
* shifts every time field of a server message from the connection's stream
  clock to the caller's (:meth:`translate`), and drops a ``Results`` that
  starts inside audio already covered by a final of its channel (a
  duplicate: the audio it was heard in had been transcribed by an earlier
  connection);
* says where the next connection starts and which audio to re-send first
  (:meth:`resume`): from the end of the last final, so what the old
  connection finalized is never re-sent and what it received but did not
  finalize is sent again, and transcribed once, by the new connection.

With several channels transcribed on their own (``multichannel``) the
resume point is the earliest of the channels' last-final ends; a channel
that is ahead drops the re-heard finals that start before its own last
final ended (a final that straddles that point is dropped whole).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["DEFAULT_MAX_BUFFER_S", "Resume", "ResumeState"]

DEFAULT_MAX_BUFFER_S: Final = 60.0
"""Audio kept for a resume: twice the server's longest utterance (at most 29 s),
so a final that is due arrives well before its audio would be dropped."""

# A final that starts this little before the end of the last one is not a
# duplicate: times are rounded to the millisecond on the wire.
_EPSILON_S: Final = 0.002

Message = dict[str, Any]


@dataclass(frozen=True)
class Resume:
    """Where a new connection starts: what :meth:`ResumeState.resume` returns."""

    offset_s: float
    """The caller's time of the new connection's stream time 0."""
    data: bytes
    """The audio to send first (as fast as the server takes it), from ``offset_s``."""
    lost_s: float
    """Seconds after the last final that had been dropped from the buffer
    (over ``max_buffer_s``) and so are not re-sent; 0 normally."""

    @property
    def resent_bytes(self) -> int:
        return len(self.data)


class ResumeState:
    """The audio and final bookkeeping of one logical stream over its connections.

    ``sample_rate`` and ``frame_bytes`` (bytes of one sample of every channel)
    describe the encoded audio; ``channels`` is how many channels are
    transcribed (the stream's channels with ``multichannel``, else 1).
    """

    def __init__(
        self,
        *,
        sample_rate: int,
        frame_bytes: int,
        channels: int = 1,
        max_buffer_s: float = DEFAULT_MAX_BUFFER_S,
    ) -> None:
        if sample_rate <= 0 or frame_bytes <= 0 or channels <= 0:
            raise ValueError("sample_rate, frame_bytes and channels must be positive")
        if not max_buffer_s > 0:
            raise ValueError(f"max_buffer_s must be positive, not {max_buffer_s}")
        self.sample_rate = sample_rate
        self.frame_bytes = frame_bytes
        self.channels = channels
        self.max_buffer_s = float(max_buffer_s)
        self._cap_bytes = max(frame_bytes, round(max_buffer_s * sample_rate) * frame_bytes)
        # Chunks as (caller byte position of their first byte, bytes).
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._start = 0  # caller byte position of the oldest byte kept
        self.end_bytes = 0
        """Bytes of source audio recorded so far (the caller clock's end)."""
        self._offset_frames = 0
        self.committed_s: list[float] = [0.0] * channels
        """Per channel: the caller time where its last final ended."""
        self.dropped_duplicates = 0
        """How many ``Results`` :meth:`translate` dropped as duplicates."""
        self.dropped_bytes = 0
        """Bytes let go over the cap before a final covered them."""
        self.warnings: list[str] = []
        """What went wrong in resuming (audio not re-sent), in order."""

    # -- audio ------------------------------------------------------------------

    @property
    def offset_s(self) -> float:
        """The caller's time of the current connection's stream time 0."""
        return self._offset_frames / self.sample_rate

    @property
    def end_s(self) -> float:
        """Seconds of source audio recorded so far."""
        return self.end_bytes / (self.frame_bytes * self.sample_rate)

    @property
    def buffered_bytes(self) -> int:
        """Bytes kept for a resume."""
        return self.end_bytes - self._start

    @property
    def buffered_s(self) -> float:
        return self.buffered_bytes / (self.frame_bytes * self.sample_rate)

    def record(self, chunk: bytes) -> None:
        """The next chunk of source audio, as it is handed to a connection.

        Record it before sending: a chunk whose send fails is re-sent too.
        """
        if not chunk:
            return
        self._chunks.append((self.end_bytes, bytes(chunk)))
        self.end_bytes += len(chunk)
        # Over the cap: drop the oldest whole chunks (the newest is always kept).
        while len(self._chunks) > 1 and self.end_bytes - self._chunks[1][0] >= self._cap_bytes:
            at, data = self._chunks.popleft()
            lost = at + len(data) - max(at, self._start)
            self.dropped_bytes += max(0, lost)
            self._start = self._chunks[0][0]

    def _release(self) -> None:
        """Let go of the audio every channel has a final for."""
        keep_from = self._byte_of(min(self.committed_s))
        while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= keep_from:
            self._chunks.popleft()
        self._start = max(self._start, min(keep_from, self.end_bytes))

    def _byte_of(self, seconds: float) -> int:
        frames = int(seconds * self.sample_rate + 1e-6)
        return min(frames * self.frame_bytes, self.end_bytes)

    # -- messages ---------------------------------------------------------------

    def translate(self, message: Mapping[str, Any]) -> Message | None:
        """``message`` of the current connection on the caller's clock (a copy),
        or None for a duplicate ``Results`` to drop. Finals move the channel's
        resume point and let go of the audio they cover."""
        kind = message.get("type")
        offset = self.offset_s
        if kind == "Results":
            out = copy.deepcopy(dict(message))
            start = _number(out.get("start")) + offset
            end = start + _number(out.get("duration"))
            out["start"] = _ms(start)
            channel = out.get("channel")
            if isinstance(channel, dict):
                for alternative in channel.get("alternatives") or []:
                    words = alternative.get("words") if isinstance(alternative, dict) else None
                    for word in words or []:
                        if isinstance(word, dict):
                            for key in ("start", "end"):
                                if isinstance(word.get(key), (int, float)):
                                    word[key] = _ms(float(word[key]) + offset)
            index = _channel_index(out)
            if index < self.channels and start < self.committed_s[index] - _EPSILON_S:
                self.dropped_duplicates += 1
                return None
            if out.get("is_final") and index < self.channels:
                self.committed_s[index] = max(self.committed_s[index], end)
                self._release()
            return out
        if kind == "SpeechStarted" and isinstance(message.get("timestamp"), (int, float)):
            out = dict(message)
            out["timestamp"] = _ms(float(message["timestamp"]) + offset)
            return out
        if kind == "UtteranceEnd" and isinstance(message.get("last_word_end"), (int, float)):
            out = dict(message)
            out["last_word_end"] = _ms(float(message["last_word_end"]) + offset)
            return out
        return dict(message)

    # -- reconnecting -------------------------------------------------------------

    def resume(self) -> Resume:
        """Start a new connection: it begins at the end of the last final (the
        earliest channel's), or at the oldest audio kept when that was dropped
        (recording a warning). Returns the audio to re-send first."""
        want = self._byte_of(min(self.committed_s))
        start = want
        if start < self._start:
            # Round up to a whole frame: the server's clock counts whole samples.
            start = -(-self._start // self.frame_bytes) * self.frame_bytes
        start = min(start, self.end_bytes)
        lost_s = (start - want) / (self.frame_bytes * self.sample_rate)
        if lost_s > 0:
            want_s = want / (self.frame_bytes * self.sample_rate)
            self.warnings.append(
                f"{lost_s:.2f} s of audio after the last final (at {want_s:.2f} s) had been "
                f"dropped from the resume buffer (max {self.max_buffer_s:g} s) and was not re-sent"
            )
        parts = []
        for at, data in self._chunks:
            if at + len(data) <= start:
                continue
            parts.append(data[max(0, start - at) :])
        self._offset_frames = start // self.frame_bytes
        return Resume(offset_s=self.offset_s, data=b"".join(parts), lost_s=lost_s)


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _ms(seconds: float) -> float:
    return round(seconds, 3)


def _channel_index(message: Mapping[str, Any]) -> int:
    index = message.get("channel_index")
    if isinstance(index, list) and index and isinstance(index[0], int):
        return index[0]
    return 0
