"""The worker's prefork pool and timer thread, changed in one respect: an idle worker stops at once.

Owns nothing in the database except, at an idle stop, the heartbeat rows of the pool processes it
ended (``keyrotation.forget_processes``). Celery's warm shutdown of the prefork pool is correct but
slow when there is nothing to wait for, because billiard waits on fixed sleeps (measured on celery
5.7 / billiard 4.x, each one sequential): every pool process sleeps 1 s after it has said goodbye
(``Worker._do_exit``), the pool's supervisor thread is joined out of a 0.8 s sleep, the result
handler out of a 1 s poll (again at exit, from the pool's finalizer), celery's prefork ``on_stop``
joins a helper out of a 0.5 s sleep, and the timer thread of the blocking loop is joined out of a
1 s wait. An idle worker took 5-8 s to stop on SIGTERM.

What a warm shutdown must keep (acks_late): a task a pool process is running finishes and is acked,
a message the worker holds but has not started goes back to the broker. So:

* ``TaskPool.on_close``/``on_stop``: when the pool holds no job (nothing running, nothing handed to
  a pool process) the pool processes are idle; they are killed (SIGKILL) and reaped, the pool's threads
  (daemon threads) are left to die with the process, and billiard's exit finalizer, which would join
  them, is cancelled. The consumer has stopped before the pool step runs (the blueprint stops in
  reverse order) and the main thread is the only one handing out jobs, so no job can arrive between
  the check and the stop. Messages the worker reserved but did not start (an ETA, a rate limit) are
  unacked and go back when the broker connection closes, as in any warm shutdown. A pool that holds
  a job stops exactly as celery's does: the job finishes first.
* ``Timer.stop`` (the timer thread of the blocking loop: the embedded broker) wakes the thread and
  waits for it briefly instead of out of its sleep; the thread is a daemon and runs no entry after
  the stop flag is set.

The pool processes keep their signal handling: a revoke with terminate, a cold shutdown and a
process manager's kill behave as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any

from billiard.pool import CLOSE, RUN
from celery.concurrency import prefork
from celery.utils import timer2
from kombu.asynchronous import get_event_loop

log = logging.getLogger("certqueue.workers")

#: how long the shutdown waits for killed idle pool processes to be gone (they take ~10 ms)
IDLE_EXIT_SECONDS = 2.0
#: how long ``Timer.stop`` waits for the woken timer thread
TIMER_JOIN_SECONDS = 0.05

POOL = f"{__name__}:TaskPool"
TIMER = f"{__name__}:Timer"


class TaskPool(prefork.TaskPool):
    """celery's prefork pool; an idle pool stops without billiard's fixed sleeps (module docstring)."""

    # the blueprint closes the pool (billiard joins its supervisor thread there) before it stops it
    def on_close(self) -> None:
        if self._idle():
            self._stop_idle(self._pool)
            return
        super().on_close()

    def on_stop(self) -> None:
        if self._idle():
            self._stop_idle(self._pool)
            return
        super().on_stop()

    def _idle(self) -> bool:
        pool = self._pool
        return pool is not None and pool._state == RUN and not pool._cache

    def _stop_idle(self, pool: Any) -> None:
        # no replacement processes from here on: the supervisor thread checks both states
        pool._state = CLOSE
        pool._worker_handler.close()
        procs = [p for p in pool._pool if p._popen is not None]
        # SIGKILL: an idle pool process holds nothing, and on SIGTERM billiard's handler takes its
        # exit path, with the 1 s sleep
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        left = _reap(procs, IDLE_EXIT_SECONDS)
        if left:  # pragma: no cover - only a process stuck in the kernel outlives SIGKILL
            log.warning("pool processes %s still running after SIGKILL", [p.pid for p in left])
        pool._terminate.cancel()  # it would join the pool's threads, each out of a 1 s poll
        self._pool = None
        hub = get_event_loop()
        if hub is not None:  # acks of tasks that finished just before (acks_late), as celery does
            prefork._run_ready_callbacks(hub)
        _forget_pool_processes([p.pid for p in procs])


def _reap(procs: list[Any], seconds: float) -> list[Any]:
    """Wait for the processes to end; returns those still running. Polled: the async pool's
    process sentinels did not report an exit here (a join waited out its whole timeout)."""
    deadline = time.monotonic() + seconds
    left = list(procs)
    while left and time.monotonic() < deadline:
        left = [p for p in left if not _ended(p)]
        if left:
            time.sleep(0.01)
    return left


def _ended(p: Any) -> bool:
    if p._popen.poll() is not None:
        return True
    try:  # reaped by another thread (billiard's supervisor): poll() cannot tell
        os.kill(p.pid, 0)
    except ProcessLookupError:
        return True
    return False


def _forget_pool_processes(pids: list[int]) -> None:
    """The ended processes ran no shutdown hook: remove their key heartbeats here (best effort)."""
    from certqueue.keyrotation import forget_processes

    try:
        forget_processes(pids)
    except Exception as exc:  # noqa: BLE001 - a stale row only ages out (storage.process_stale_seconds)
        log.debug("could not remove pool heartbeats: %s", type(exc).__name__)


#: how often the event loop (the Redis transport) wakes to look for a pending SIGTERM
SHUTDOWN_TICK_SECONDS = 0.1


def install_shutdown_tick() -> None:
    """Celery's event loop sees a warm-shutdown request only when its poll returns, and an idle
    poll may wait a second or more for the broker socket or the next timer: a timer entry every
    ``SHUTDOWN_TICK_SECONDS`` bounds that. Connected to ``worker_ready`` (the loop's hub exists
    then); the blocking loop (the embedded broker) has no hub and needs none (its waits are
    bounded by the transport)."""
    from celery import signals

    signals.worker_ready.connect(_start_tick, weak=False)


def _start_tick(**_kw: Any) -> None:
    hub = get_event_loop()
    if hub is not None:
        hub.call_repeatedly(SHUTDOWN_TICK_SECONDS, _tick)


def _tick() -> None:
    """Nothing to do: the wake-up itself is the point."""


class Timer(timer2.Timer):
    """celery's timer thread; ``stop`` does not wait out the thread's current sleep (up to 1 s)."""

    def stop(self) -> None:
        self._Timer__is_shutdown.set()  # type: ignore[attr-defined]
        with self.not_empty:
            self.not_empty.notify_all()
        if getattr(self, "running", False):
            self._Timer__is_stopped.wait(TIMER_JOIN_SECONDS)  # type: ignore[attr-defined]
            self.running = False
