"""What ``earshot serve`` checks and builds before it opens its port.

In order, each a refusal with a message naming the setting at fault:

1. the bind policy (service/http/auth.py): no keys, no listening beyond loopback;
2. the sovereignty policy: in on-prem-only mode no hub downloads
   (``allow_download``) and no remote backend or webhook outside
   ``allowed_networks`` (``remote_url``, ``twilio_webhook_url``);
3. the model: a folder with a record (``earshot-model.json``) must match it,
   byte for byte (every recorded file is hashed again), unless
   ``allow_unverified_model``.

:func:`stated_policy` is the policy as clients read it in every stream's
``Metadata``, in ``GET /v1/models`` and in ``GET /v1/policy``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from earshot.core.decoding import Backend
from earshot.core.errors import ConfigError, ModelIntegrityError
from earshot.models.provenance import ChecksumCache, verify_folder
from earshot.models.remote import RemoteBackend, RemoteSettings, parse_remote
from earshot.service.config import Config
from earshot.service.sovereignty import (
    AllowedNetworks,
    EgressGuard,
    build_guard,
    check_destination,
    egress_reason,
)

log = logging.getLogger("earshot.startup")


def check_sovereignty(cfg: Config) -> AllowedNetworks:
    """Refuse a configuration that on-prem-only mode forbids; the allowed networks."""
    allowed = AllowedNetworks(cfg.allowed_networks)
    if not cfg.on_prem_only:
        return allowed
    if cfg.allow_download:
        raise ConfigError(
            "on_prem_only forbids allow_download: models must already be on this host. "
            "Copy the model folder here and run `earshot models import FOLDER --name NAME`, "
            "then serve it with --model NAME",
            field="allow_download",
        )
    if cfg.remote_url:
        check_destination(remote_settings(cfg).base_url, allowed, setting="remote_url")
    if cfg.twilio_webhook_url:
        check_destination(cfg.twilio_webhook_url, allowed, setting="twilio_webhook_url")
    return allowed


def remote_settings(cfg: Config) -> RemoteSettings:
    """The remote backend's settings from the configuration (``remote_url`` set)."""
    options: dict[str, object] = {
        "model": cfg.remote_model,
        "timeout_s": cfg.remote_timeout_s,
        "max_retries": cfg.remote_max_retries,
    }
    if cfg.remote_api_key:
        options["api_key"] = cfg.remote_api_key
    try:
        return parse_remote(cfg.remote_url, options)
    except ConfigError as exc:
        raise ConfigError(f"remote_url: {exc.message}", field="remote_url") from None


def build_remote(cfg: Config) -> RemoteBackend | None:
    """The remote fallback backend, or None when ``remote_url`` is empty.
    Nothing is ever sent anywhere without it."""
    if not cfg.remote_url:
        return None
    return RemoteBackend(remote_settings(cfg))


def verify_model(folder: Path, cfg: Config) -> bool | None:
    """Hash every recorded file of ``folder`` again and compare with its record.

    True when it matches, None when the folder has no record (a plain local
    folder: nothing to compare with). A mismatch raises ModelIntegrityError,
    unless ``allow_unverified_model``, which logs it and returns False."""
    # Every byte is read; the digests go into the checksum cache, where the
    # runner's provenance finds them instead of reading the model again.
    result = verify_folder(folder, cache=ChecksumCache())
    if not result.recorded:
        return None
    if result.ok:
        return True
    message = (
        f"the model's files do not match their record: {result.describe()}. "
        "Restore the model from a trusted copy (`earshot models pull` or "
        "`earshot models import`), or start with allow_unverified_model to serve it anyway"
    )
    if cfg.allow_unverified_model:
        log.warning("serving an unverified model: %s", message, extra={"path": str(folder)})
        return False
    raise ModelIntegrityError(
        message,
        field="model",
        mismatched=list(result.mismatched),
        missing=list(result.missing),
    )


def build_egress_guard(cfg: Config) -> EgressGuard | None:
    """The process's egress guard for ``cfg`` (enforcing in on-prem-only mode,
    audit-only with an ``audit_log``), with the addresses of its listed host
    names resolved; None when there is nothing to guard or audit."""
    guard = build_guard(
        on_prem_only=cfg.on_prem_only,
        allowed_networks=cfg.allowed_networks,
        audit_log=cfg.audit_log,
        audit_loopback=cfg.audit_loopback,
    )
    if guard is not None:
        with egress_reason("startup: resolve allowed_networks names"):
            unresolved = guard.resolve_listed_names()
        for name in unresolved:
            log.warning(
                "allowed_networks name %s does not resolve; connections to it will be refused",
                name,
                extra={"host": name},
            )
    return guard


def stated_policy(
    cfg: Config,
    *,
    remote: Backend | None,
    guard: EgressGuard | None,
    model_verified: bool | None,
) -> dict[str, Any]:
    """The sovereignty policy in force, as clients and auditors read it.

    ``remote`` is the fallback backend (its provenance names it),
    ``model_verified`` whether the model's files matched their record (None:
    no record)."""
    allowed = AllowedNetworks(cfg.allowed_networks)
    remotes: list[dict[str, Any]] = []
    if remote is not None:
        prov = remote.provenance()
        host = urlsplit(str(prov.get("base_url", ""))).hostname
        remotes.append(
            {
                "name": remote.name,
                "base_url": prov.get("base_url"),
                "model": prov.get("model"),
                "inside_allowed_networks": allowed.contains_host(host) if host else None,
                "used_for": sorted(cfg.fallback_reasons),
            }
        )
    reasons = sorted(cfg.fallback_reasons) if remote is not None else []
    return {
        "on_prem_only": cfg.on_prem_only,
        "allowed_networks": allowed.describe(),
        "remote_backends": remotes,
        "fallback": {"enabled": bool(reasons), "on": reasons},
        "hub_downloads": (
            "refused" if cfg.on_prem_only else "allowed" if cfg.allow_download else "off"
        ),
        "egress_guard": guard.describe() if guard is not None else None,
        "model_record_verified": model_verified,
        "audio_stored": False,
        "transcripts_stored": False,
        "transcripts_in_logs": cfg.log_transcripts,
    }
