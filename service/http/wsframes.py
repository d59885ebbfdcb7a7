"""A check of the websocket frames a client sends (pure: bytes in, verdict out).

RFC 6455 section 5.1: a client must mask every frame it sends, and a server
must close the connection (1002, protocol error) on an unmasked one. The
websocket library parses frames without checking this; :class:`MaskCheck`
reads the same bytes before it does and finds the first unmasked frame.
"""

from __future__ import annotations

_HEADER, _EXTENDED, _PAYLOAD = 0, 1, 2


class MaskCheck:
    """Follows frame boundaries in a byte stream and notes unmasked frames."""

    def __init__(self) -> None:
        self._state = _HEADER
        self._header = bytearray()
        self._need = 2
        self._skip = 0
        self.violation = False

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Take the next bytes; False from the first unmasked frame on."""
        view = memoryview(data)
        while view.nbytes and not self.violation:
            if self._state == _PAYLOAD:
                step = min(self._skip, view.nbytes)
                self._skip -= step
                view = view[step:]
                if self._skip == 0:
                    self._start_header()
                continue
            take = min(self._need - len(self._header), view.nbytes)
            self._header += view[:take]
            view = view[take:]
            if len(self._header) < self._need:
                continue
            self._header_done()
        return not self.violation

    def _start_header(self) -> None:
        self._state, self._header, self._need = _HEADER, bytearray(), 2

    def _header_done(self) -> None:
        masked = bool(self._header[1] & 0x80)
        if self._state == _HEADER:
            if not masked:
                self.violation = True
                return
            length = self._header[1] & 0x7F
            extra = {126: 2, 127: 8}.get(length, 0)
            self._state = _EXTENDED
            self._need = 2 + extra + 4  # extended length, then the masking key
            if len(self._header) >= self._need:
                self._header_done()
            return
        length = self._header[1] & 0x7F
        if length == 126:
            length = int.from_bytes(self._header[2:4], "big")
        elif length == 127:
            length = int.from_bytes(self._header[2:10], "big")
        self._skip = length
        self._state = _PAYLOAD
        if self._skip == 0:
            self._start_header()
