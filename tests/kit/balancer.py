"""Debian's haproxy in front of server replicas, for failover tests.

:class:`Haproxy` writes a configuration for websocket streams (least
connections, health checks on ``/readyz``, a tunnel timeout for long-lived
streams, a retry elsewhere when a replica refuses or cannot be reached) into
a folder, runs ``haproxy`` in the foreground on a loopback port and reads
the servers' states from its stats socket (``show stat``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

CHECK_INTER_MS = 500
"""Health check interval of every server."""

CHECK_FALL = 2
"""Failed checks in a row that mark a server DOWN."""

CHECK_RISE = 2
"""Passed checks in a row that mark a server UP again."""


def haproxy_binary() -> str | None:
    """The path of ``haproxy`` (PATH, then /usr/sbin), or None."""
    found = shutil.which("haproxy")
    if found:
        return found
    for candidate in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy"):
        if Path(candidate).is_file():
            return candidate
    return None


def haproxy_config(port: int, servers: Sequence[tuple[str, int]], stats_socket: Path) -> str:
    """The configuration: frontend on 127.0.0.1:``port``, one backend of
    ``servers`` (name, port on 127.0.0.1)."""
    lines = [
        "global",
        f"    stats socket {stats_socket} mode 600 level admin",
        "    stats timeout 10s",
        "    maxconn 1000",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 30s",
        "    timeout server 30s",
        # Once upgraded, a websocket is a tunnel: this is its idle limit.
        "    timeout tunnel 1h",
        "    timeout check 1s",
        # A replica that refuses the connection (killed) or answers 503
        # (draining, full) before the upgrade: try another one.
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response response-timeout 503",
        "",
        "frontend streams",
        f"    bind 127.0.0.1:{port}",
        "    default_backend replicas",
        "",
        "backend replicas",
        # Streams last minutes: balance what is open, not requests.
        "    balance leastconn",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        f"    default-server inter {CHECK_INTER_MS}ms fall {CHECK_FALL} rise {CHECK_RISE}",
    ]
    lines += [f"    server {name} 127.0.0.1:{p} check" for name, p in servers]
    return "\n".join(lines) + "\n"


class Haproxy:
    """``haproxy -db -f CONFIG`` on 127.0.0.1:``port`` in front of ``servers``.

    Use as a context manager: the process is stopped on exit (SIGTERM, then
    SIGKILL)."""

    def __init__(
        self, binary: str, folder: Path, port: int, servers: Sequence[tuple[str, int]]
    ) -> None:
        self.binary = binary
        self.folder = folder
        self.port = port
        self.servers = list(servers)
        self.stats_socket = folder / "haproxy.sock"
        self.config_path = folder / "haproxy.cfg"
        self.log_path = folder / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Haproxy:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(haproxy_config(self.port, self.servers, self.stats_socket))
        check = subprocess.run(
            [self.binary, "-c", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise AssertionError(f"haproxy refused its configuration:\n{check.stderr}")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [self.binary, "-db", "-f", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def __enter__(self) -> Haproxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    def command(self, line: str, timeout_s: float = 2.0) -> str:
        """One command on the stats socket, its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(self.stats_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """``status`` of each server of the backend (``UP``, ``DOWN``, ``UP 1/2``...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row.get("pxname") == "replicas" and row.get("svname") not in ("BACKEND", "FRONTEND")
        }

    def wait_states(self, want: dict[str, str], timeout_s: float, poll_s: float = 0.02) -> float:
        """Poll until every server in ``want`` has that status; the seconds it
        took. AssertionError with the states seen when the time runs out."""
        assert self.proc is not None
        start = time.monotonic()
        states: dict[str, str] = {}
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                states = self.server_states()
                if all(states.get(name) == status for name, status in want.items()):
                    return time.monotonic() - start
            time.sleep(poll_s)
        raise AssertionError(f"haproxy states {states}, not {want} within {timeout_s:g} s")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""
