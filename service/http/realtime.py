"""Placeholder: filled in by the realtime adapter work (issue 14)."""

from __future__ import annotations

from aiohttp import web


def register_realtime_routes(app: web.Application) -> None:
    """Add the realtime endpoints to ``app``."""
