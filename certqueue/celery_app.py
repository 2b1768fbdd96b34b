"""The Celery application: queues, routes, reliability settings and the base task.

Queues: ``scan`` (beat's periodic work), ``acme`` (orders, HTTP-01, answering, finalize, download,
revoke), ``dns`` (DNS-01 present / visibility / cleanup), ``propagate.<region>`` (one per configured
region, so a region's credentials exist only where its pool runs). Missing queues are never created
implicitly: a task routed to an unknown region fails loudly instead of waiting forever.

Reliability: messages are acknowledged after the task ran (``acks_late``) and re-queued when the
worker process dies (``reject_on_worker_lost``); prefetch 1 so a killed worker loses at most the
task it was running; time limits stay below the broker's visibility timeout, which stays above the
longest retry countdown. The database is the truth: a lost message is found again by the reconciler.

The embedded default needs no server: certqueue's own file transport under ``var/broker``
(certqueue.embedded_broker: no consumer ever reads a half-written message) and a SQLite result
backend (chords poll it). With a Redis broker, Redis is the result backend too (chords count
in Redis).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from certqueue import embedded_broker
from certqueue.config import Settings, get_settings

PUBLIC_TASKS = ("certqueue.issue", "certqueue.renew", "certqueue.revoke", "certqueue.propagate")

#: the longest countdown any task uses (seconds); visibility timeout must exceed it
MAX_COUNTDOWN = 900
TASK_SOFT_TIME_LIMIT = 240
TASK_TIME_LIMIT = 300


def broker_urls(settings: Settings) -> tuple[str, str, dict[str, Any]]:
    """(broker url, result backend url, broker transport options)."""
    url = settings.broker.url
    opts: dict[str, Any] = {}
    if embedded_broker.is_embedded(url):  # "", filesystem:// (kept working), certqueue-fs://
        return embedded_broker.broker_urls(settings)
    else:
        opts = {"visibility_timeout": settings.broker.visibility_timeout}
        if url.startswith(("redis", "rediss")):
            opts.update(
                {
                    "socket_timeout": 15,
                    "socket_connect_timeout": 5,
                    "retry_on_timeout": True,
                    "health_check_interval": 30,
                }
            )
        backend = settings.broker.result_backend or (url if url.startswith(("redis", "rediss")) else "")
    return url, backend, opts


def region_queue(region: str) -> str:
    return f"propagate.{region}"


def make_queues(settings: Settings) -> list[Queue]:
    names = ["scan", "acme", "dns"] + [region_queue(r.name) for r in settings.multi_region.regions]
    return [Queue(n, routing_key=n) for n in names]


def configure(app: Celery, settings: Settings) -> None:
    url, backend, opts = broker_urls(settings)
    if settings.broker.visibility_timeout <= MAX_COUNTDOWN + TASK_TIME_LIMIT:
        raise ValueError("broker.visibility_timeout must exceed the longest countdown plus the time limit")
    app.conf.update(
        broker_url=url,
        result_backend=backend or None,
        broker_transport_options=opts,
        result_backend_transport_options=opts if backend.startswith("redis") else {},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_create_missing_queues=False,
        task_queues=make_queues(settings),
        task_default_queue="acme",
        task_routes={
            "certqueue.issue": {"queue": "acme"},
            "certqueue.renew": {"queue": "acme"},
            "certqueue.revoke": {"queue": "acme"},
            "certqueue.propagate": {"queue": "acme"},
            "certqueue.acme.*": {"queue": "acme"},
            "certqueue.dns.*": {"queue": "dns"},
            "certqueue.scan.*": {"queue": "scan"},
            # certqueue.propagate.deploy is sent with an explicit queue: propagate.<region>
        },
        task_soft_time_limit=TASK_SOFT_TIME_LIMIT,
        task_time_limit=TASK_TIME_LIMIT,
        # Each of these costs a Redis write per execution and buys nothing the database does not
        # record: no STARTED results, no task arguments copied into results. Task events are sent
        # only when monitoring.task_events asks for them, or while Flower runs (it broadcasts
        # enable_events to every worker); the "sent" event is the publisher's, so it follows the
        # setting alone.
        task_track_started=False,
        task_send_sent_event=settings.monitoring.task_events,
        worker_send_task_events=settings.monitoring.task_events,
        result_expires=24 * 3600,
        result_extended=False,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        timezone="UTC",
        enable_utc=True,
    )


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("certqueue", set_as_current=True)
    configure(app, settings)
    from certqueue.logconfig import connect_celery
    from certqueue.metrics import install_celery_hooks  # message send time, task run time

    connect_celery()
    install_celery_hooks()
    import certqueue.tasks.acme
    import certqueue.tasks.dns
    import certqueue.tasks.propagate
    import certqueue.tasks.scan  # noqa: F401

    return app


class _LazyApp:
    """The process-wide app, built on first use so settings are read after the CLI set them."""

    _app: Celery | None = None

    def get(self) -> Celery:
        if self._app is None:
            self._app = create_app()
        return self._app

    def reset(self) -> None:
        self._app = None


lazy_app = _LazyApp()
