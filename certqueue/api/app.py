"""The REST API application (FastAPI): certificates, jobs, health and metrics.

``create_app()`` builds the app; ``serve(host, port)`` runs it under uvicorn (``certqueue serve``).
OpenAPI is published at ``/openapi.json``, interactive docs at ``/docs``.

Errors have one shape per kind: bad input is 422 with FastAPI's ``{"detail": [{"loc": [...], "msg":
..., "type": ...}]}`` naming the field (``certqueue.errors.InvalidInput`` included), an unknown id is
404, a request the certificate's state forbids is 409, and anything unexpected is a 500 that says
nothing about the internals (the log has the class name; never key material).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

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


def create_app() -> FastAPI:
    """The API. Settings, the database and the broker are read per request (``get_settings()``),
    so the CLI's or a test's ``set_settings`` applies."""
    app = FastAPI(
        title="certqueue",
        version=_version,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
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
        access_log=True,
        server_header=False,
    )
