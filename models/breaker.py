"""The remote backend's circuit breaker: stop sending to a remote that keeps
failing, and try it again, once, after a pause.

Thread-safe (the remote backend's workers share one); the clock is injected,
so the tests step time instead of sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class CircuitBreaker:
    """Consecutive failed windows open the circuit; after ``reset_s`` one
    trial is let through (half-open), and its outcome closes or re-opens it."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float]) -> None:
        self._lock = threading.Lock()
        self._limit = failures
        self._reset_s = reset_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._consecutive

    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (a trial may go, or is in flight)."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._trial or self._clock() - self._opened_at >= self._reset_s:
                return "half_open"
            return "open"

    def available(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            return not self._trial and self._clock() - self._opened_at >= self._reset_s

    def retry_in(self) -> float:
        """Seconds until a trial may go (0 when closed or due)."""
        with self._lock:
            if self._opened_at is None:
                return 0.0
            return max(0.0, self._reset_s - (self._clock() - self._opened_at))

    def admit(self) -> bool | None:
        """None: refused. False: an ordinary call. True: the half-open trial."""
        with self._lock:
            if self._opened_at is None:
                return False
            if self._trial or self._clock() - self._opened_at < self._reset_s:
                return None
            self._trial = True
            return True

    def record(self, trial: bool, ok: bool | None) -> bool:
        """Record one window's outcome (None: no outcome, e.g. it was aborted).
        True when this outcome opened the circuit."""
        with self._lock:
            if trial:
                self._trial = False
            if ok is None:
                return False
            if ok:
                self._consecutive = 0
                self._opened_at = None
                return False
            self._consecutive += 1
            if trial or (self._opened_at is None and self._consecutive >= self._limit):
                self._opened_at = self._clock()
                return True
            return False
