"""The REST API application (FastAPI): certificates, jobs, health and metrics.

``create_app()`` builds the app; ``serve(host, port)`` runs it under uvicorn (``certqueue serve``).
OpenAPI is published at ``/openapi.json``, interactive docs at ``/docs``. The docs page loads Swagger
UI from the ``fastapi-offline`` package's bundled assets when it is installed (hosts without Internet
access, like most servers running this), and from FastAPI's default CDN otherwise.

Errors have one shape per kind: bad input is 422 with FastAPI's ``{"detail": [{"loc": [...], "msg":
..., "type": ...}]}`` naming the field (``certqueue.errors.InvalidInput`` included), an unknown id is
404, a request the certificate's state forbids is 409, and anything unexpected is a 500 that says
nothing about the internals (the log has the class name; never key material).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

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
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
    return JSONResponse(
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR, content={"detail": "internal error"}
    )


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
    so the CLI's or a test's ``set_settings`` applies."""
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
    return app


def serve(host: str | None = None, port: int | None = None) -> None:
    """Run the API under uvicorn until interrupted (api.host / api.port by default)."""
    import uvicorn

    from certqueue.config import get_settings

    settings = get_settings()
    uvicorn.run(
        create_app(),
        host=host or settings.api.host,
        port=port or settings.api.port,
        log_level=settings.logging.level.lower(),
        log_config=None,  # uvicorn's loggers go through certqueue.logconfig (text or JSON)
        access_log=True,
        server_header=False,
    )
