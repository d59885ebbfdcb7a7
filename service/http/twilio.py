"""Placeholder: filled in by the twilio adapter work (issue 14)."""

from __future__ import annotations

from aiohttp import web


def register_twilio_routes(app: web.Application) -> None:
    """Add the twilio endpoints to ``app``."""
