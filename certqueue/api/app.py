"""The REST API application (FastAPI): certificates, jobs, health and metrics.

``create_app()`` builds the app; ``serve(host, port)`` runs it under uvicorn (``certqueue serve``).
OpenAPI is published at ``/openapi.json``, interactive docs at ``/docs``. The docs page loads Swagger
UI from the ``fastapi-offline`` package's bundled assets when it is installed (hosts without Internet
access, like most servers running this), and from FastAPI's default CDN otherwise.

Errors have one shape per kind: bad input is 422 with FastAPI's ``{"detail": [{"loc": [...], "msg":
..., "type": ...}]}`` naming the field (``certqueue.errors.InvalidInput`` included), an unknown id is
404, a request the certificate's state forbids is 409, and anything unexpected is a 500 that says
nothing about the internals (the log has the class name; never key material).

Limits, enforced by ``RequestLimits`` before routing (so before authentication, and without
reading a body it refuses): a body above ``api.max_body_bytes`` (1 MiB; ``api.max_import_bytes``,
512 KiB, for ``POST /v1/certificates/import``) is a 413, from its ``Content-Length`` at once, or, for
a streamed (chunked) body, as soon as the chunks counted pass the limit; more than
``api.max_concurrency`` requests in progress is a 503 with ``Retry-After``. Every string field of the
request schemas has a length limit (``certqueue.api.schemas``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from certqueue import __version__ as _version
from certqueue.api import routes_certificates, routes_health, routes_jobs
from certqueue.errors import InvalidInput, InvalidTransition, NotFound

log = logging.getLogger("certqueue.api")

DESCRIPTION = """Fleet TLS certificates over ACME: request, renew, revoke, propagate, import; job status;
health and Prometheus metrics. Authenticate with `Authorization: Bearer <token>`
(`certqueue tokens create`); scopes read ⊆ write ⊆ admin."""


def _input_location(request: Request, field: str | None) -> list[Any]:
    if field and field in request.path_params:
        return ["path", field]
    if field and field in request.query_params:
        return ["query", field]
    return ["body", field] if field else ["body"]


async def _invalid_input(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidInput)
    loc = _input_location(request, exc.field)
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": [{"loc": loc, "msg": exc.message, "type": exc.reason}]},
    )


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotFound)
    return JSONResponse(status_code=status.HTTP_404_NOT_FOUND, content={"detail": exc.message})


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidTransition)
    return JSONResponse(status_code=status.HTTP_409_CONFLICT, content={"detail": exc.message})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path[:256])
    return JSONResponse(
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR, content={"detail": "internal error"}
    )


class RequestLimits:
    """ASGI middleware, outermost: request body size and requests in progress.

    A refused body is never read: a ``Content-Length`` over the limit is answered before the
    application runs; a streamed body is counted chunk by chunk as the application receives it,
    and the first chunk past the limit ends the request with 413 (the application sees a
    disconnect, its own reply is dropped)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        max_import: int,
        max_concurrency: int,
        import_path: str = "/v1/certificates/import",
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.max_import = max_import
        self.import_path = import_path
        self.max_concurrency = max_concurrency
        self._in_progress = 0

    def limit_for(self, scope: Scope) -> int:
        path = str(scope.get("path", "")).rstrip("/")
        return self.max_import if path == self.import_path else self.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        length = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _reply(send, 400, "Content-Length is not a number")
                    return
                if length < 0:
                    await _reply(send, 400, "Content-Length is not a number")
                    return
        if length is not None and length > limit:
            await _reply(send, 413, f"request body larger than {limit} bytes")
            return
        if self._in_progress >= self.max_concurrency:
            await _reply(send, 503, "too many requests in progress", headers=[(b"retry-after", b"1")])
            return
        self._in_progress += 1
        received = 0
        refused = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _reply(send, 413, f"request body larger than {limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; whatever the application says now is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # the application saw a disconnect in the middle of the body: expected, not an error
        finally:
            self._in_progress -= 1


async def _reply(
    send: Send, status_code: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


DOCS_ASSETS_URL = "/docs-assets"


def _docs_assets() -> Path | None:
    """The folder holding swagger-ui-bundle.js and swagger-ui.css, if a package ships them."""
    try:
        import fastapi_offline  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    ok = (folder / "swagger-ui-bundle.js").is_file() and (folder / "swagger-ui.css").is_file()
    return folder if ok else None


def _self_hosted_docs(app: FastAPI, assets: Path) -> None:
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
        )


def create_app() -> FastAPI:
    """The API. Settings, the database and the broker are read per request (``get_settings()``),
    so the CLI's or a test's ``set_settings`` applies; the request limits are read here, once."""
    from certqueue.config import get_settings

    api = get_settings().api
    assets = _docs_assets()
    app = FastAPI(
        title="certqueue",
        version=_version,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None if assets else "/docs",
        redoc_url=None,
    )
    if assets:
        _self_hosted_docs(app, assets)
    app.add_exception_handler(InvalidInput, _invalid_input)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(InvalidTransition, _conflict)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(routes_certificates.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_health.router)
    app.add_middleware(
        RequestLimits,  # type: ignore[arg-type]
        max_body=api.max_body_bytes,
        max_import=api.max_import_bytes,
        max_concurrency=api.max_concurrency,
    )
    return app


def serve(host: str | None = None, port: int | None = None) -> None:
    """Run the API under uvicorn until interrupted (api.host / api.port by default)."""
    import uvicorn

    from certqueue import logsafe
    from certqueue.config import get_settings
    from certqueue.keyrotation import start_heartbeat

    settings = get_settings()
    config = uvicorn.Config(
        create_app(),
        host=host or settings.api.host,
        port=port or settings.api.port,
        log_level=settings.logging.level.lower(),
        log_config=None,  # uvicorn's loggers go through certqueue.logconfig (text or JSON)
        access_log=True,
        server_header=False,
        # connections and tasks at once; above it uvicorn answers 503 (RequestLimits counts requests)
        limit_concurrency=settings.api.max_concurrency * 2,
        h11_max_incomplete_event_size=64 * 1024,
    )
    logsafe.install_uvicorn()  # uvicorn.Config set up its loggers, which do not reach the root's
    start_heartbeat("api")  # the API encrypts imported keys: it reports its keyring
    uvicorn.Server(config).run()
