"""A child process with its output in a log file, stopped in order.

What the benchmarks' server processes (bench/streams.py, bench/soak.py) and
the failover test's replicas (tests/kit/replica.py) share: start with stdout
and stderr in one log file, in a session of its own (a Ctrl-C in the terminal
reaches only the parent, whose ``finally`` stops the child in order); stop
with SIGTERM, then SIGKILL after ``stop_timeout_s``; read the log's tail for
error messages.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]


class LoggedProcess:
    """A child process whose output goes to ``log_path``."""

    def __init__(self, log_path: Path, stop_timeout_s: float) -> None:
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def spawn(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``command`` in the repository's root, its output in the log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended after ``stop_timeout_s``."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                print(f"  process {proc.pid} ignored SIGTERM; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""
