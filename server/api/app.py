"""The FastAPI application factory: `dropfleet api` serves `create_app()` with uvicorn."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dropfleet.common.errors import DropfleetError, FlowerControlError
from dropfleet.server.api import routes_fleet, routes_health, routes_metrics, routes_models, routes_runs
from dropfleet.server.api.deps import Followers
from dropfleet.server.api.routes_metrics import make_registry
from dropfleet.server.api.settings import Settings
from dropfleet.server.api.superlink import SuperLinkView, reconcile_forever
from dropfleet.server.store import Store

STATIC = Path(__file__).with_name("static")


class BodySizeLimit:
    """Refuse request bodies over the limit early: by Content-Length, or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _too_large(self.max_bytes)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body exceeds {limit} bytes"}, status_code=413)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    store = Store(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.migrate()
        app.state.superlink = SuperLinkView(settings, queries)
        reconciler = (
            asyncio.create_task(reconcile_forever(store, app.state.superlink, settings.reconcile_seconds))
            if settings.reconcile_seconds
            else None
        )
        yield
        if reconciler is not None:
            reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconciler
        store.engine.dispose()

    app = FastAPI(
        title="dropfleet",
        version="1",
        lifespan=lifespan,
        description="Training status, fleet, metrics and published global models of dropfleet.",
    )
    app.state.settings, app.state.store = settings, store
    app.state.followers = Followers(settings.max_followers)
    app.state.registry, requests, queries = make_registry(store)
    for router in (
        routes_health.router,
        routes_runs.router,
        routes_models.router,
        routes_fleet.router,
        routes_metrics.router,
    ):
        app.include_router(router)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # noqa: ANN001, ANN202
        response = await call_next(request)
        requests.labels(request.method, str(response.status_code)).inc()
        return response

    @app.exception_handler(FlowerControlError)
    async def flower_failed(_: Request, exc: FlowerControlError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=502)

    @app.exception_handler(DropfleetError)
    async def refused(_: Request, exc: DropfleetError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/", include_in_schema=False)
    def status_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.cors_origins:  # closed unless configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
