"""The base task (warehouse's pattern): a fresh DB session per run, one commit, follow-up tasks sent
only after that commit, and the two error kinds mapped to what Celery should do.

Inside a step function (``def step(ctx, ...)``):

* ``ctx.session`` is the task's session; the step never commits itself.
* ``ctx.then(signature)`` queues a follow-up; it is sent only if the commit succeeded.
* ``raise Wait(seconds)`` commits what the step did, then retries the task after ``seconds`` (waiting
  on the CA or DNS is a retry with a countdown, never a sleep).
* a ``RetryableError`` rolls back and retries with exponential backoff (the remote ``retry_after``
  is a floor); after ``max_transient_retries`` it is treated as permanent.
* a ``PermanentError`` rolls back, then the task's ``on_permanent(ctx, exc, *args)`` runs in a new
  transaction (the failure is recorded, challenges are cleaned up).

Task arguments and results carry ids and stable reasons only: never keys, tokens or PEM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Task
from celery.canvas import Signature
from celery.exceptions import Retry
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from certqueue.db import session_scope
from certqueue.errors import CertqueueError, InvalidInput, PermanentError, PluginError, RetryableError
from certqueue.lifecycle.backoff import backoff
from certqueue.logsafe import scrub

log = logging.getLogger("certqueue.tasks")


class Wait(Exception):
    """Commit, then retry this task after ``countdown`` seconds."""

    def __init__(self, countdown: float) -> None:
        super().__init__(countdown)
        self.countdown = countdown


@dataclass
class StepContext:
    session: Session
    task: Task
    follow_ups: list[Signature] = field(default_factory=list)

    #: after the commit, the task replaces itself with this (a chord over authorizations or regions)
    replacement: Signature | None = None

    def then(self, sig: Signature) -> None:
        self.follow_ups.append(sig)

    def replace(self, sig: Signature) -> None:
        self.replacement = sig


def classify(exc: BaseException) -> CertqueueError:
    """Map any exception to one of the two kinds, with a stable reason."""
    if isinstance(exc, PluginError):
        if exc.retryable:
            return RetryableError(exc.message, reason=exc.reason, retry_after=exc.retry_after)
        return PermanentError(exc.message, reason=exc.reason)
    if isinstance(exc, CertqueueError):
        return exc
    if isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return RetryableError("database unavailable", reason="database")
    if _is_redis_outage(exc):
        return RetryableError(f"Redis unavailable: {type(exc).__name__}", reason="redis")
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return RetryableError(f"network error: {type(exc).__name__}", reason="network")
    return PermanentError(f"internal error: {type(exc).__name__}", reason="internal")


def _is_redis_outage(exc: BaseException) -> bool:
    """redis-py's connection errors do not derive from the builtin ConnectionError."""
    try:
        import redis.exceptions as rex
    except ImportError:  # pragma: no cover - redis is a dependency
        return False
    return isinstance(exc, rex.ConnectionError | rex.TimeoutError | rex.BusyLoadingError)


class CertqueueTask(Task):  # type: ignore[misc]
    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # waiting is unbounded; transient errors are bounded below
    max_transient_retries = 12
    retry_initial = 1.0
    retry_cap = 300.0

    def on_permanent(self, ctx: StepContext, exc: CertqueueError, *args: Any) -> Any:
        """Record a permanent failure (override per task); a non-None return is the task's result."""
        return None

    def run_step(self, step: Callable[..., Any], *args: Any) -> Any:
        """Run ``step(ctx, *args)`` in one transaction; see the module docstring."""
        transient = int(self.request.kwargs.get("_transient", 0) or 0) if self.request.kwargs else 0
        wait: Wait | None = None
        try:
            with session_scope() as session:
                ctx = StepContext(session=session, task=self)
                try:
                    result = step(ctx, *args)
                except Wait as w:
                    wait = w  # keep (commit) what the step wrote before it asked to wait
        except Retry:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001  (mapped to the two kinds)
            kind = classify(exc)
            if kind is not exc:
                log.info(
                    "%s: %s mapped to %s: %s",
                    self.name,
                    type(exc).__name__,
                    kind.reason,
                    scrub(str(exc).splitlines()[0] if str(exc) else ""),
                )
            if isinstance(kind, RetryableError):
                if transient < self.max_transient_retries:
                    countdown = backoff(
                        transient + 1,
                        initial=self.retry_initial,
                        cap=self.retry_cap,
                        retry_after=kind.retry_after,
                    )
                    log.warning(
                        "%s%s: retryable %s, retry %d in %.1fs",
                        self.name,
                        list(args),
                        kind.reason,
                        transient + 1,
                        countdown,
                    )
                    raise self.retry(
                        args=args, kwargs={"_transient": transient + 1}, countdown=countdown
                    ) from None
                kind = PermanentError(
                    f"gave up after {transient} retries: {kind.message}", reason=kind.reason
                )
            log.warning("%s%s: permanent failure %s", self.name, list(args), kind.reason)
            if isinstance(kind, InvalidInput):
                raise kind from None  # a bad payload is a failed job that wrote nothing
            with session_scope() as session:
                pctx = StepContext(session=session, task=self)
                outcome = self.on_permanent(pctx, kind, *args)
            self._send(pctx)
            return outcome if outcome is not None else {"status": "failed", "reason": kind.reason}
        self._send(ctx)
        if wait is not None:
            raise self.retry(args=args, kwargs={}, countdown=wait.countdown)
        if ctx.replacement is not None:
            return self.replace(ctx.replacement)
        return result

    def _send(self, ctx: StepContext) -> None:
        for sig in ctx.follow_ups:
            sig.apply_async()
