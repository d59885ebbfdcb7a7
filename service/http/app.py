"""The aiohttp application: every route, the middleware, start and stop.

The routes come from the modules of the shell (listen, openai, metrics, demo,
auth); this module puts them on one application around one
:class:`~earshot.service.engine.engine.Engine` and ties the engine's
scheduler to the application's lifetime.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from earshot.core import __version__
from earshot.service.engine.engine import Engine
from earshot.service.http.auth import register_auth
from earshot.service.http.context import ENGINE
from earshot.service.http.demo import register_demo_routes
from earshot.service.http.listen import handle_listen
from earshot.service.http.metrics import register_metrics_routes
from earshot.service.http.openai import register_openai_routes
from earshot.service.http.realtime import register_realtime_routes
from earshot.service.http.serving import error_middleware
from earshot.service.http.twilio import register_twilio_routes


async def handle_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def handle_policy(request: web.Request) -> web.Response:
    """``GET /v1/policy``: the sovereignty policy in force, and its state now."""
    return web.json_response(request.app[ENGINE].live_policy())


async def handle_ready(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    ready = not engine.shutting_down and engine.scheduler.accepting()
    return web.json_response(
        {"ready": ready, "active_streams": engine.active_streams},
        status=200 if ready else 503,
    )


def create_app(engine: Engine) -> web.Application:
    """The aiohttp application for ``engine``; starts and stops its scheduler."""
    app = web.Application(middlewares=[error_middleware])
    app[ENGINE] = engine

    async def lifecycle(app: web.Application) -> Any:
        await engine.scheduler.start()
        yield
        await engine.scheduler.stop()
        if engine.scheduler.fallback is not None:
            await asyncio.to_thread(engine.scheduler.fallback.close)

    app.cleanup_ctx.append(lifecycle)

    async def on_shutdown(app: web.Application) -> None:
        await engine.shut_down()

    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/v1/listen", handle_listen)
    app.router.add_get("/healthz", handle_health)
    app.router.add_get("/readyz", handle_ready)
    app.router.add_get("/v1/policy", handle_policy)
    register_metrics_routes(app)
    register_openai_routes(app)
    register_realtime_routes(app)
    register_twilio_routes(app)
    register_demo_routes(app)
    register_auth(app)
    return app
