"""docs/operations.md against the code: every limit setting and every metric
the server exports is documented, with the defaults the code has."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from earshot.service.config import Config
from earshot.service.http.app import create_app
from earshot.service.http.metrics import METRICS
from tests.kit.live import tone_engine

DOC = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()

LIMITS = (
    "max_streams",
    "max_frame_bytes",
    "idle_timeout_s",
    "max_session_s",
    "max_upload_bytes",
    "max_audio_s",
    "max_queue",
    "lag_limit_s",
    "max_pending_messages",
    "max_unread_s",
    "header_timeout_s",
    "body_timeout_s",
    "max_pending_connections",
)


def table_rows(heading: str) -> list[list[str]]:
    section = DOC.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_every_limit_is_documented_with_its_default() -> None:
    defaults = {f.name: f.default for f in fields(Config)}
    rows = {row[0].strip("`"): row for row in table_rows("Limits")}
    assert set(rows) == set(LIMITS)
    for name in LIMITS:
        documented = rows[name][1].split()[0]
        assert float(documented) == float(defaults[name]), name


def test_every_metric_is_documented() -> None:
    # The whole app's metrics: the Twilio call hub adds its own to the registry.
    app = create_app(tone_engine())
    text = app[METRICS].exposition().decode()
    exported = set()
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):  # prometheus-client's timestamps
            continue
        suffix = "_total" if family.type == "counter" else ""
        exported.add(family.name + suffix)
    documented = {row[0].strip("`") for row in table_rows("Metrics")}
    assert exported == documented


def test_documented_log_fields_are_real_settings() -> None:
    for name in re.findall(r"`(log_[a-z_]+)", DOC):
        assert name in {f.name for f in fields(Config)}, name
