"""Egress control for on-prem-only mode: which hosts count as the operator's
own, a start-up check of configured destinations, and a process-wide guard
that refuses and audits outbound network use at run time.

Three layers:

* :class:`AllowedNetworks` is the operator's list (setting ``allowed_networks``):
  IPv4/IPv6 addresses, CIDR networks, exact host names and ``*.suffix``
  wildcards. Loopback (``127.0.0.0/8``, ``::1``, ``localhost``) is always in it.
* :func:`check_destination` is called at start-up for every configured remote
  destination (a remote backend URL, say) and raises
  :class:`EgressRefusedError` when its host is outside the list, so that the
  server refuses to start rather than failing later.
* :class:`EgressGuard`, made current with :func:`activate`, is consulted by one
  audit hook (:func:`sys.addaudithook`) installed once per process. The hook
  sees the ``socket.connect``, ``socket.sendto``, ``socket.sendmsg``,
  ``socket.getaddrinfo``, ``socket.gethostbyname`` (also raised by
  ``gethostbyname_ex``), ``socket.gethostbyaddr`` and ``socket.getnameinfo``
  events, which CPython raises before the system call. In enforcing mode a destination outside the
  list makes the call raise :class:`EgressBlockedError` (a
  :class:`PermissionError`, so HTTP clients report it as an ordinary connection
  error whose message starts with ``egress refused``). Every outbound event is
  written to an :class:`AuditLog` (JSON lines).

Host names. A name is inside the list if and only if it is listed (exactly or
by a wildcard); what it resolves to does not make it so. DNS answers change
after start-up, the hook cannot resolve names (it runs inside the lookup it
guards), and looking up an unlisted name already tells the resolver about it.
So in enforcing mode a lookup of an unlisted name is refused before any DNS
query is sent, and a connection is allowed when its address is in a listed
network or is an address of a listed exact name as resolved by
:meth:`EgressGuard.resolve_listed_names` (call it at start-up; a name whose
address changes later is refused until it is called again). Wildcards allow
lookups of the names they match; list the networks those hosts live in too.

Loopback. Connections and lookups that stay on this host (loopback addresses,
``localhost``, the unspecified address, AF_UNIX and AF_NETLINK sockets) are
always allowed and are not audited unless ``audit_loopback`` is on: the
server's own loopback traffic and its test clients would otherwise flood the
log. Other address families (AF_PACKET, AF_VSOCK, Bluetooth...) are refused in
enforcing mode.

Reasons and sessions. Audit lines carry the reason and the session id set with
:func:`egress_reason` and :func:`egress_session` (context variables). Threads
started by ``ThreadPoolExecutor.submit`` or ``loop.run_in_executor`` do not
inherit context variables: wrap the function with :func:`in_current_context`,
use ``asyncio.to_thread`` (which copies the context), or enter
``egress_reason`` inside the worker. Lookups that asyncio runs in its own
executor therefore have no reason; the connection that follows does.

Limits. The guard sees only what goes through Python's :mod:`socket` module:
native code that opens its own sockets (C extensions, libuv/uvloop, c-ares),
subprocesses, and code that calls libc through :mod:`ctypes` are not covered;
nor are the DNS queries libc sends for *allowed* lookups (they go to the
system resolver, wherever it is), nor connections opened before the guard was
activated, nor what an allowed host (a forwarding proxy, for example) does
next. Audit hooks are a safety net against accidental egress by trusted code,
not a sandbox; pair on-prem-only mode with network policy for a hard boundary.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import ipaddress
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TypeAlias, TypeVar
from urllib.parse import urlsplit

from earshot.core.errors import ConfigError, EgressBlockedError, EgressRefusedError

IPAddress: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address"
IPNetwork: TypeAlias = "ipaddress.IPv4Network | ipaddress.IPv6Network"

FIELD = "allowed_networks"

LOOPBACK_ENTRIES: tuple[str, ...] = ("127.0.0.0/8", "::1/128", "localhost")
_LOOPBACK_NAMES = frozenset({"localhost"})

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")

# Families whose connections never leave this host.
_LOCAL_FAMILIES = frozenset(
    f for f in (getattr(socket, "AF_UNIX", None), getattr(socket, "AF_NETLINK", None)) if f
)
_IP_FAMILIES = frozenset(
    f for f in (socket.AF_INET, getattr(socket, "AF_INET6", None)) if f is not None
)

_T = TypeVar("_T")


# ---------------------------------------------------------------- errors


def is_egress_refusal(exc: BaseException | None) -> bool:
    """True if ``exc`` or an exception it was raised from (``__cause__`` /
    ``__context__``, as HTTP clients wrap socket errors) is an
    :class:`EgressBlockedError`: a refusal that retrying cannot cure."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, EgressBlockedError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


# ---------------------------------------------------------------- the list


def _parse_ip(text: str) -> IPAddress | None:
    """An IP literal (``[v6]`` brackets and ``%scope`` allowed), IPv4-mapped
    IPv6 addresses turned into IPv4; None when ``text`` is not one."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _normalize_name(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _valid_name(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        return False  # a mistyped IPv4 address, not a name
    return all(_LABEL.match(label) for label in labels)


def _bad_entry(entry: str, why: str) -> ConfigError:
    return ConfigError(
        f"setting {FIELD}: entry {entry!r} {why}; entries are IP addresses, CIDR "
        "networks (10.0.0.0/8), host names (asr2.corp.example) or wildcards "
        "(*.corp.example), separated by commas",
        field=FIELD,
        entry=entry,
    )


class AllowedNetworks:
    """The hosts and networks that count as the operator's own.

    Built from a comma-separated string or a list of entries; raises
    ConfigError (``field="allowed_networks"``) naming the first bad entry.
    Loopback is always included. Immutable: :meth:`with_resolved` returns a
    new list.
    """

    def __init__(self, entries: str | Iterable[str] | None = None) -> None:
        if entries is None:
            items: list[str] = []
        elif isinstance(entries, str):
            items = entries.split(",")
        else:
            items = [part for entry in entries for part in str(entry).split(",")]
        networks: list[IPNetwork] = []
        names: set[str] = set()
        suffixes: set[str] = set()
        listed: list[str] = []
        for raw in (*LOOPBACK_ENTRIES, *items):
            entry = raw.strip()
            if not entry:
                continue
            kind, value = self._parse_entry(entry)
            if kind == "network":
                assert isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                if value not in networks:
                    networks.append(value)
                    listed.append(str(value))
            elif kind == "name":
                assert isinstance(value, str)
                if value not in names:
                    names.add(value)
                    listed.append(value)
            else:
                assert isinstance(value, str)
                if value not in suffixes:
                    suffixes.add(value)
                    listed.append("*" + value)
        self._networks: tuple[IPNetwork, ...] = tuple(networks)
        self._names = frozenset(names)
        self._suffixes = tuple(sorted(suffixes))
        self._listed = tuple(listed)
        self._resolved: dict[IPAddress, str] = {}

    @staticmethod
    def _parse_entry(entry: str) -> tuple[str, IPNetwork | str]:
        if "://" in entry:
            raise _bad_entry(entry, "is a URL; list its host name only")
        if entry.startswith("*"):
            suffix = _normalize_name(entry[1:])
            if not entry.startswith("*.") or not _valid_name(suffix[1:]):
                raise _bad_entry(entry, "is not a valid wildcard (write *.corp.example)")
            return "suffix", suffix
        if "/" in entry:
            try:
                net = ipaddress.ip_network(entry, strict=True)
            except ValueError as exc:
                if "host bits set" in str(exc):
                    loose = ipaddress.ip_network(entry, strict=False)
                    raise _bad_entry(
                        entry, f"has host bits set (did you mean {loose} or a single address?)"
                    ) from None
                raise _bad_entry(entry, "is not a valid CIDR network") from None
            if net.prefixlen == 0:
                raise _bad_entry(entry, "allows every address, which on-prem-only mode cannot mean")
            return "network", net
        ip = _parse_ip(entry)
        if ip is not None:
            return "network", ipaddress.ip_network(ip)
        name = _normalize_name(entry)
        if ":" in name:
            raise _bad_entry(entry, "is not an IP address, and a host name has no port")
        if not _valid_name(name):
            raise _bad_entry(entry, "is not a valid IP address, network or host name")
        return "name", name

    # -- queries

    def contains_ip(self, ip: IPAddress) -> bool:
        """True if ``ip`` is in a listed network or is a resolved listed name."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip in self._resolved:
            return True
        return any(ip.version == net.version and ip in net for net in self._networks)

    def contains_address(self, ip: str) -> bool:
        """True if the IP literal ``ip`` is inside; False for anything that is
        not an IP literal (names are checked with :meth:`contains_host`)."""
        parsed = _parse_ip(ip)
        return parsed is not None and self.contains_ip(parsed)

    def contains_name(self, name: str) -> bool:
        """True if the host name is listed exactly or matches a wildcard. No DNS."""
        name = _normalize_name(name)
        if name in self._names:
            return True
        return any(name.endswith(suffix) for suffix in self._suffixes)

    def contains_host(self, host: str) -> bool:
        """An IP literal is checked by network, a name by the list of names
        (see the module docstring for why a name's addresses do not count)."""
        ip = _parse_ip(host)
        if ip is not None:
            return self.contains_ip(ip)
        return self.contains_name(host)

    # -- resolved names

    @property
    def exact_names(self) -> list[str]:
        """Listed exact host names other than ``localhost``, sorted."""
        return sorted(self._names - _LOOPBACK_NAMES)

    def with_resolved(self, addresses: Mapping[str, Iterable[str]]) -> AllowedNetworks:
        """A copy that also allows the given addresses of listed exact names
        (``{name: [ip, ...]}``); names not listed are ignored."""
        out = AllowedNetworks.__new__(AllowedNetworks)
        out.__dict__.update(self.__dict__)
        resolved: dict[IPAddress, str] = {}
        for name, ips in addresses.items():
            norm = _normalize_name(name)
            if norm not in self._names:
                continue
            for text in ips:
                ip = _parse_ip(text)
                if ip is not None:
                    resolved.setdefault(ip, norm)
        out._resolved = resolved
        return out

    @property
    def resolved(self) -> dict[str, str]:
        """``{ip: name}`` of the addresses learned for listed names."""
        return {str(ip): name for ip, name in self._resolved.items()}

    def describe(self) -> list[str]:
        """The entries, loopback first, normalized, for the policy endpoint."""
        out = list(self._listed)
        out.extend(f"{name} = {ip}" for ip, name in sorted(self.resolved.items()))
        return out

    def __repr__(self) -> str:
        return f"AllowedNetworks({', '.join(self._listed)!r})"


def _split_destination(url_or_host: str) -> tuple[str, int | None]:
    text = url_or_host.strip()
    if "://" not in text:
        text = "//" + text
    try:
        parts = urlsplit(text)
        host = parts.hostname
        port = parts.port
    except ValueError:
        host, port = None, None
    if not host:
        raise EgressRefusedError(
            f"cannot find a host in destination {url_or_host!r}",
            field=FIELD,
            destination=url_or_host,
        )
    return host, port


def check_destination(
    url_or_host: str, allowed: AllowedNetworks, *, setting: str | None = None
) -> str:
    """Start-up check of one configured destination (a URL, ``host:port`` or a
    host). Returns its host; raises EgressRefusedError when the host is outside
    ``allowed``. ``setting`` names the setting that holds the destination.
    The error names the host only, never the full URL (it may hold secrets)."""
    host, _port = _split_destination(url_or_host)
    if allowed.contains_host(host):
        return host
    source = f" (setting {setting})" if setting else ""
    if _parse_ip(host) is not None:
        fix = f"add {host} or its network (CIDR) to {FIELD}"
    else:
        fix = (
            f"add the host name {host} (or a *.domain wildcard matching it) to {FIELD}; "
            "names must be listed, the networks they resolve to are not enough"
        )
    raise EgressRefusedError(
        f"on-prem-only mode: destination host {host}{source} is outside {FIELD} "
        f"({', '.join(allowed.describe())}). If {host} is one of your hosts, {fix}; "
        "otherwise remove that destination from the configuration",
        field=FIELD,
        host=host,
        **({"setting": setting} if setting else {}),
    )


# ---------------------------------------------------------------- context

_reason: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "earshot_egress_reason", default=None
)
_session: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "earshot_egress_session", default=None
)


@contextlib.contextmanager
def egress_reason(reason: str) -> Iterator[None]:
    """Audit lines written inside the block carry ``reason`` (this thread or
    task and what it awaits; see :func:`in_current_context` for threads)."""
    token = _reason.set(reason)
    try:
        yield
    finally:
        _reason.reset(token)


@contextlib.contextmanager
def egress_session(session_id: str) -> Iterator[None]:
    """Audit lines written inside the block carry ``session`` = ``session_id``."""
    token = _session.set(session_id)
    try:
        yield
    finally:
        _session.reset(token)


def in_current_context(fn: Callable[..., _T]) -> Callable[..., _T]:
    """``fn`` wrapped to run in a copy of the caller's context variables (the
    egress reason and session among them), for ``ThreadPoolExecutor.submit``
    and ``loop.run_in_executor``, which do not carry them into the thread.
    Each call runs in its own copy, so the wrapper may run in many threads."""
    ctx = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> _T:
        return ctx.copy().run(fn, *args, **kwargs)

    return run


# ---------------------------------------------------------------- audit log


def default_audit_path() -> Path:
    """``$XDG_DATA_HOME/earshot/egress-audit.jsonl``, else
    ``~/.local/share/earshot/egress-audit.jsonl``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "earshot" / "egress-audit.jsonl"


class AuditLog:
    """Append-only JSON lines, one per event, flushed per line, thread-safe.

    ``path`` ``"-"`` writes to standard error. Raises ConfigError
    (``field="audit_log"``) when the file cannot be opened. Write failures are
    counted in :attr:`errors` and re-raised as OSError.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self.errors = 0
        if self.path == "-":
            return
        try:
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self._file = open(Path(self.path).expanduser(), "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(
                f"cannot open the egress audit log {self.path}: {exc}", field="audit_log"
            ) from exc

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True) + "\n"
        with self._lock:
            stream = self._file if self._file is not None else sys.stderr
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError) as exc:
                self.errors += 1
                raise OSError(f"cannot write the egress audit log {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# ---------------------------------------------------------------- the guard


@dataclass(frozen=True)
class _Verdict:
    op: str
    destination: str
    local: bool
    inside: bool
    lookup: bool


def _host_text(host: object) -> str | None:
    if isinstance(host, str):
        return host
    if isinstance(host, (bytes, bytearray)):
        return bytes(host).decode("ascii", "replace")
    return None


def _join(host: str, port: object) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


class EgressGuard:
    """The policy the audit hook applies while it is current (:func:`activate`).

    ``enforce``: refuse what is outside ``allowed`` (on-prem-only mode); when
    False the guard only audits. ``audit``: where lines go (None: nowhere).
    ``audit_loopback``: also audit traffic that stays on this host.
    """

    def __init__(
        self,
        allowed: AllowedNetworks,
        *,
        enforce: bool = True,
        audit: AuditLog | None = None,
        audit_loopback: bool = False,
    ) -> None:
        self.allowed = allowed
        self.enforce = enforce
        self.audit = audit
        self.audit_loopback = audit_loopback
        self.refused = 0

    def describe(self) -> dict[str, Any]:
        """For the policy endpoint (no file paths)."""
        return {
            "enforcing": self.enforce,
            "allowed_networks": self.allowed.describe(),
            "audit": self.audit is not None,
            "audit_loopback": self.audit_loopback,
        }

    def resolve_listed_names(
        self, resolver: Callable[[str], Iterable[str]] | None = None
    ) -> list[str]:
        """Look up the listed exact names and allow their addresses (see the
        module docstring). ``resolver`` maps a name to IP strings (default:
        ``socket.getaddrinfo``). Returns the names that could not be resolved."""
        resolve = resolver or _system_resolve
        found: dict[str, list[str]] = {}
        failed: list[str] = []
        with egress_reason("resolve_allowed_names"):
            for name in self.allowed.exact_names:
                try:
                    found[name] = list(resolve(name))
                except OSError:
                    failed.append(name)
        self.allowed = self.allowed.with_resolved(found)
        return failed

    # -- the decision, pure and cheap (no I/O, no DNS)

    def _judge_ip_address(self, op: str, address: object) -> _Verdict:
        if not isinstance(address, tuple) or len(address) < 2:
            return _Verdict(op, repr(address)[:200], False, False, False)
        host = _host_text(address[0])
        port = address[1]
        if host is None:
            return _Verdict(op, repr(address)[:200], False, False, False)
        if host == "<broadcast>":
            host = "255.255.255.255"
        ip = _parse_ip(host) if host else ipaddress.ip_address("0.0.0.0")
        if ip is not None:
            local = ip.is_loopback or ip.is_unspecified
            inside = local or self.allowed.contains_ip(ip)
            return _Verdict(op, _join(str(ip), port), local, inside, False)
        # A name: the C socket code resolves it before raising the event.
        local = _normalize_name(host) in _LOOPBACK_NAMES
        inside = local or self.allowed.contains_name(host)
        return _Verdict(op, _join(host, port), local, inside, False)

    def _judge_lookup(self, op: str, host: object, port: object) -> _Verdict | None:
        text = _host_text(host)
        if text is None or text == "":
            return None  # no name: passive or local lookups
        ip = _parse_ip(text)
        if ip is not None:
            if op in ("gethostbyaddr", "getnameinfo"):  # reverse lookups query DNS
                local = ip.is_loopback or ip.is_unspecified
                inside = local or self.allowed.contains_ip(ip)
                return _Verdict(op, _join(str(ip), port), local, inside, True)
            return None  # a literal: no DNS query
        local = _normalize_name(text) in _LOOPBACK_NAMES
        inside = local or self.allowed.contains_name(text)
        return _Verdict(op, _join(text, port), local, inside, True)

    def judge(self, event: str, args: tuple[Any, ...]) -> _Verdict | None:
        """The verdict on one audit event, or None when it is not egress."""
        op = event.removeprefix("socket.")
        if op in ("connect", "sendto", "sendmsg"):
            sock, address = args[0], args[1]
            if address is None:
                return None  # sendmsg on a connected socket: checked at connect
            family = int(getattr(sock, "family", -1))
            if family in _LOCAL_FAMILIES:
                return None
            if family in _IP_FAMILIES:
                return self._judge_ip_address(op, address)
            return _Verdict(op, f"family {family} {address!r}"[:200], False, False, False)
        if op == "getaddrinfo":
            return self._judge_lookup(op, args[0], args[1])
        if op in ("gethostbyname", "gethostbyaddr"):  # gethostbyname_ex raises the former
            return self._judge_lookup(op, args[0], None)
        if op == "getnameinfo":
            sa = args[0]
            if isinstance(sa, tuple) and len(sa) >= 2:
                return self._judge_lookup(op, sa[0], sa[1])
            return None
        return None

    def check(self, event: str, args: tuple[Any, ...], *, audit: bool = True) -> None:
        """Apply the policy to one event: audit it and raise EgressBlockedError
        when it is refused. Called by the hook; callable directly in tests."""
        verdict = self.judge(event, args)
        if verdict is None:
            return
        refuse = self.enforce and not verdict.inside
        if refuse:
            self.refused += 1
        if audit and self.audit is not None and (not verdict.local or self.audit_loopback):
            record: dict[str, Any] = {
                "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z",
                "event": "refused" if refuse else ("lookup" if verdict.lookup else "connect"),
                "op": verdict.op,
                "destination": verdict.destination,
                "allowed": not refuse,
                "inside": verdict.inside,
                "reason": _reason.get(),
                "pid": os.getpid(),
            }
            session = _session.get()
            if session is not None:
                record["session"] = session
            try:
                self.audit.write(record)
            except OSError as exc:
                if self.enforce and not refuse:
                    self.refused += 1
                    raise EgressBlockedError(
                        f"egress refused: {verdict.op} to {verdict.destination} could not "
                        f"be recorded in the audit log ({exc})",
                        destination=verdict.destination,
                        op=verdict.op,
                    ) from exc
        if refuse:
            what = "lookup of" if verdict.lookup else f"{verdict.op} to"
            raise EgressBlockedError(
                f"egress refused: {what} {verdict.destination} is outside {FIELD} "
                "(on-prem-only mode); if that host is one of yours, add it or its "
                f"network to {FIELD}",
                destination=verdict.destination,
                op=verdict.op,
                field=FIELD,
            )


def _system_resolve(name: str) -> list[str]:
    infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


# ---------------------------------------------------------------- the hook

EGRESS_EVENTS = frozenset(
    {
        "socket.connect",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "socket.getnameinfo",
    }
)

_current: EgressGuard | None = None
_installed = False
_install_lock = threading.Lock()
_local = threading.local()


def _dispatch(event: str, args: tuple[Any, ...]) -> None:
    if event not in EGRESS_EVENTS:
        return
    guard = _current
    if guard is None:
        return
    # Re-entry (an event raised while auditing one, on this thread): decide,
    # but do not audit again.
    nested = getattr(_local, "busy", False)
    _local.busy = True
    try:
        guard.check(event, args, audit=not nested)
    except EgressBlockedError:
        raise
    except Exception as exc:  # a bug in the guard must not open the door
        if guard.enforce:
            raise EgressBlockedError(
                f"egress refused: {event} could not be checked ({type(exc).__name__}: {exc})",
                op=event,
            ) from exc
    finally:
        _local.busy = nested


def install() -> None:
    """Install the process-wide audit hook (once; later calls do nothing).
    Audit hooks cannot be removed: the hook stays and does nothing while no
    guard is current."""
    global _installed
    with _install_lock:
        if not _installed:
            sys.addaudithook(_dispatch)
            _installed = True


def activate(guard: EgressGuard) -> None:
    """Make ``guard`` the current guard of the process (installing the hook)."""
    global _current
    install()
    _current = guard


def deactivate() -> EgressGuard | None:
    """Clear the current guard; returns the one that was current."""
    global _current
    old, _current = _current, None
    return old


def current_guard() -> EgressGuard | None:
    return _current


@contextlib.contextmanager
def guarded(guard: EgressGuard) -> Iterator[EgressGuard]:
    """Make ``guard`` current for the block, then restore the previous one."""
    global _current
    install()
    previous = _current
    _current = guard
    try:
        yield guard
    finally:
        _current = previous


def build_guard(
    *,
    on_prem_only: bool,
    allowed_networks: str | Sequence[str] = "",
    audit_log: str = "",
    audit_loopback: bool = False,
) -> EgressGuard | None:
    """The guard for a configuration, or None when there is nothing to do.

    On-prem-only: an enforcing guard; ``audit_log`` ``""`` is
    :func:`default_audit_path`, ``"off"`` is no audit log, ``"-"`` standard
    error, anything else a file. Otherwise: an audit-only guard when
    ``audit_log`` names somewhere to write, else None.
    """
    allowed = AllowedNetworks(allowed_networks)
    target = audit_log.strip()
    if target == "" and on_prem_only:
        target = str(default_audit_path())
    if target.lower() == "off":
        target = ""
    if not on_prem_only and not target:
        return None
    audit = AuditLog(target) if target else None
    return EgressGuard(allowed, enforce=on_prem_only, audit=audit, audit_loopback=audit_loopback)


__all__ = [
    "EGRESS_EVENTS",
    "AllowedNetworks",
    "AuditLog",
    "EgressGuard",
    "activate",
    "build_guard",
    "check_destination",
    "current_guard",
    "deactivate",
    "default_audit_path",
    "egress_reason",
    "egress_session",
    "guarded",
    "in_current_context",
    "install",
    "is_egress_refusal",
]
