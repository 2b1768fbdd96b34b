"""``/v1/jobs/{job_id}``: the state of a queued Celery task, read from the result backend."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, status

from certqueue.api.auth import Principal, require
from certqueue.api.schemas import JobStatus

log = logging.getLogger("certqueue.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


@router.get("/{job_id}", response_model=JobStatus)
def job_status(
    job_id: Annotated[str, Path(pattern=JOB_ID, max_length=128)],
    principal: Annotated[Principal, Depends(require("read"))],
) -> JobStatus:
    """A job's state. ``intent-<n>`` (what the certificate endpoints answer) is read from the
    database: PENDING (waiting for capacity), STARTED (dispatched), SUCCESS or FAILURE, with the
    outcome. Any other id is a Celery task id read from the result backend (an id it has never seen
    reads as PENDING; results expire after a day)."""
    from celery.result import AsyncResult

    if job_id.startswith("intent-"):
        return _intent_status(job_id)

    from certqueue.celery_app import lazy_app

    res = AsyncResult(job_id, app=lazy_app.get())
    try:
        state = str(res.state)
        ready = res.ready()
        outcome = res.result if ready else None
    except Exception as exc:  # noqa: BLE001  (any backend failure: redis, sqlite, network)
        log.warning("result backend unreachable (%s)", type(exc).__name__)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail="the result backend is unreachable"
        ) from None
    out = JobStatus(job_id=job_id, state=state, ready=ready)
    if ready:
        out.successful = state == "SUCCESS"
        if isinstance(outcome, BaseException):
            out.error = f"{type(outcome).__name__}: {outcome}"[:512]
        else:
            out.result = _jsonable(outcome)
    return out


_INTENT_STATES = {"pending": "PENDING", "dispatched": "STARTED", "done": "SUCCESS", "failed": "FAILURE"}


def _intent_status(job_id: str) -> JobStatus:
    from certqueue.db import session_scope
    from certqueue.models import Intent

    try:
        intent_id = int(job_id.removeprefix("intent-"))
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id}") from None
    with session_scope(write=False) as session:
        intent = session.get(Intent, intent_id)
        if intent is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id}")
        state = _INTENT_STATES.get(intent.status, "PENDING")
        ready = intent.status in ("done", "failed")
        out = JobStatus(job_id=job_id, state=state, ready=ready)
        if ready:
            out.successful = intent.status == "done"
            result = {"kind": intent.kind, "certificate_id": intent.certificate_id, "outcome": intent.outcome}
            if intent.status == "failed":
                out.error = intent.outcome
            out.result = result
        return out
