"""The base task (warehouse's pattern): a fresh DB session per run, one commit, follow-up tasks sent
only after that commit, and the two error kinds mapped to what Celery should do.

Inside a step function (``def step(ctx, ...)``):

* ``ctx.session`` is the task's session; the step never commits itself.
* ``ctx.then(signature)`` queues a follow-up; it is sent only if the commit succeeded.
* ``raise Wait(seconds)`` commits what the step did, then retries the task after ``seconds`` (waiting
  on the CA or DNS is a retry with a countdown, never a sleep).
* ``ctx.nudge = True`` asks dispatch to run after the commit (capacity was freed: top-up).
* every other exception rolls back and is decided by the one failure policy
  (``certqueue.lifecycle.failure``): a transient error retries this message a few times with
  backoff, then ``on_park(ctx, exc, delay, *args)`` hands the work back to the database (never a
  failure); a permanent one runs ``on_permanent(ctx, exc, *args)`` in a new transaction (the
  failure is recorded, challenges are cleaned up); a key-store error requeues the message and
  stops this worker, leaving the certificate untouched.

Task arguments and results carry ids and stable reasons only: never keys, tokens or PEM.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Task
from celery.canvas import Signature
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from certqueue.config import get_settings
from certqueue.db import session_scope
from certqueue.errors import (
    CertqueueError,
    InvalidInput,
    KeyStoreError,
    PermanentError,
    PluginError,
    RetryableError,
)
from certqueue.lifecycle import failure
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

    #: after the commit, ask dispatch to run (this step freed capacity)
    nudge: bool = False

    #: after the commit, ask dispatch to run again in this many seconds (deferred work resumes)
    wake_after: float | None = None

    #: the caller runs the next step in this same task (``certqueue.acme.issue_batch``): a step may
    #: then leave what it holds and read (an order's lease, its challenges) in ``handoff`` for it,
    #: instead of giving it back and having the next step read and take it again
    hand_over: bool = False
    handoff: Any = None

    #: a batch's shared transaction: the orders whose HTTP-01 tokens go, deleted once for all of
    #: them by the batch (``delete_http01_tokens``); None: each step deletes its order's own
    token_orders: list[int] | None = None

    def wake(self, seconds: float) -> None:
        self.wake_after = seconds if self.wake_after is None else min(self.wake_after, seconds)

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
    if isinstance(exc, SoftTimeLimitExceeded):
        return RetryableError("the step ran past its soft time limit", reason="timeout")
    if isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return RetryableError("database unavailable", reason="database")
    if _is_redis_outage(exc):
        return RetryableError(f"Redis unavailable: {type(exc).__name__}", reason="redis")
    if _is_broker_outage(exc):
        return RetryableError(f"broker unavailable: {type(exc).__name__}", reason="broker")
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return RetryableError(f"network error: {type(exc).__name__}", reason="network")
    return PermanentError(f"internal error: {type(exc).__name__}", reason="internal")


def decide(
    kind: failure.Kind, *, retries: int, parks: int = 0, retry_after: float | None = None
) -> failure.Decision:
    """``failure.decide`` with the two schedules started where the settings say
    (``automation.transient_retry_initial_seconds``, ``automation.park_initial_seconds``)."""
    a = get_settings().automation
    return failure.decide(
        kind,
        retries=retries,
        parks=parks,
        retry_after=retry_after,
        initial=a.transient_retry_initial_seconds,
        park_initial=a.park_initial_seconds,
    )


def kind_of(exc: CertqueueError) -> failure.Kind:
    if isinstance(exc, KeyStoreError):
        return failure.Kind.KEYSTORE
    if isinstance(exc, InvalidInput):
        return failure.Kind.INVALID_INPUT
    if isinstance(exc, RetryableError):
        return failure.Kind.TRANSIENT
    return failure.Kind.PERMANENT


def _is_broker_outage(exc: BaseException) -> bool:
    """kombu's own connection errors (a publish to a broker that is down) are not OSErrors."""
    from kombu.exceptions import OperationalError as KombuOperationalError

    return isinstance(exc, KombuOperationalError)


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
    max_retries = None  # waiting is unbounded; transient errors park the work (failure policy)
    #: errors that mean "this request cannot be done" (the job fails, nothing written): a public
    #: request task names its own (an unknown certificate, a state that forbids the request)
    request_errors: tuple[type[BaseException], ...] = ()

    def on_permanent(self, ctx: StepContext, exc: CertqueueError, *args: Any) -> Any:
        """Record a permanent failure (override per task); a non-None return is the task's result."""
        return None

    def parks(self, ctx: StepContext, *args: Any) -> int:
        """How often this work was parked before (override per task: the delay grows with it)."""
        return 0

    def on_park(self, ctx: StepContext, exc: CertqueueError, delay: float, *args: Any) -> Any:
        """Hand persistent transient trouble back to the database (override per task). The default
        keeps nothing: periodic tasks (scans) simply run again at their next beat."""
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
            return self._handle(exc, transient, args)
        self._send(ctx)
        if wait is not None:
            raise self.retry(args=args, kwargs={}, countdown=failure.countdown(wait.countdown))
        if ctx.replacement is not None:
            return self.replace(ctx.replacement)
        return result

    def _handle(self, exc: BaseException, transient: int, args: tuple[Any, ...]) -> Any:
        kind = classify(exc)
        if kind is not exc:
            log.info(
                "%s: %s mapped to %s: %s",
                self.name,
                type(exc).__name__,
                kind.reason,
                scrub(str(exc).splitlines()[0] if str(exc) else ""),
            )
        retry_after = kind.retry_after if isinstance(kind, RetryableError) else None
        kind_name = failure.Kind.INVALID_INPUT if isinstance(kind, self.request_errors) else kind_of(kind)
        decision = decide(kind_name, retries=transient, retry_after=retry_after)
        if decision.action is failure.Action.RETRY:
            log.warning(
                "%s%s: retryable %s, retry %d in %.1fs",
                self.name,
                list(args),
                kind.reason,
                transient + 1,
                decision.delay,
            )
            raise self.retry(
                args=args, kwargs={"_transient": transient + 1}, countdown=decision.delay
            ) from None
        if decision.action is failure.Action.STOP_WORKER:
            log.critical(
                "%s: the key store failed (%s): stopping this worker; the message is requeued and the "
                "certificate is left as it is",
                self.name,
                kind.reason,
            )
            self._stop_worker()
            raise Reject(kind.reason, requeue=True) from None
        if decision.action is failure.Action.REJECT:
            raise kind from None  # a bad payload is a failed job that wrote nothing
        if decision.action is failure.Action.PARK:
            with session_scope() as session:
                pctx = StepContext(session=session, task=self)
                parks = self.parks(pctx, *args)
                delay = decide(kind_name, retries=transient, parks=parks, retry_after=retry_after).delay
                outcome = self.on_park(pctx, kind, delay, *args)
            self._send(pctx)
            return outcome if outcome is not None else {"status": "backing_off", "reason": kind.reason}
        log.warning("%s%s: permanent failure %s", self.name, list(args), kind.reason)
        with session_scope() as session:
            pctx = StepContext(session=session, task=self)
            outcome = self.on_permanent(pctx, kind, *args)
        self._send(pctx)
        return outcome if outcome is not None else {"status": "failed", "reason": kind.reason}

    def _stop_worker(self) -> None:
        hostname = getattr(self.request, "hostname", None)
        if not hostname:
            return
        try:
            self.app.control.shutdown(destination=[hostname])
        except Exception as exc:  # noqa: BLE001  (the requeue still happens)
            log.error("could not ask %s to stop (%s)", hostname, type(exc).__name__)

    def _send(self, ctx: StepContext) -> None:
        for sig in ctx.follow_ups:
            bound(sig, self.app).apply_async()
        send_nudges(ctx)


def bound(sig: Signature, app: Any) -> Signature:
    """``sig`` sent through ``app`` (the task's own), not whatever app is current in the thread:
    a follow-up by name must go to the broker the step's worker uses."""
    sig._app = app
    return sig


def send_nudges(ctx: StepContext) -> None:
    from certqueue import nudge

    if ctx.nudge:
        nudge.nudge()
    if ctx.wake_after is not None:
        nudge.nudge_later(ctx.wake_after)


# --- a batch's threads, kept between batches -------------------------------------------------------

_batch_threads = threading.local()


def _forget_batch_threads() -> None:
    global _batch_threads
    _batch_threads = threading.local()  # a forked child starts its own threads


os.register_at_fork(after_in_child=_forget_batch_threads)


def batch_map(fn: Callable[[Any], Any], items: list[Any], concurrency: int) -> list[Any]:
    """``fn`` over ``items`` on at most ``concurrency`` threads, results in order.

    The threads are the calling thread's own (a prefork child's main thread, or one thread of a
    threads pool) and live from batch to batch, so what a thread keeps for itself (its ACME clients
    and their kept-alive connections, ``certqueue.acme.accounts``) serves the next batch too
    instead of a new TLS handshake and a new nonce per certificate. A change of the concurrency
    (``automation.batch_concurrency`` at run time) starts a new set of threads."""
    from concurrent.futures import ThreadPoolExecutor

    if min(concurrency, len(items)) <= 1:
        return [fn(item) for item in items]
    pool: ThreadPoolExecutor | None = getattr(_batch_threads, "pool", None)
    if pool is None or getattr(_batch_threads, "size", None) != concurrency:
        if pool is not None:
            pool.shutdown(wait=False)
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="certqueue-batch")
        _batch_threads.pool, _batch_threads.size = pool, concurrency
    return list(pool.map(fn, items))
