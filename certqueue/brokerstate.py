"""The broker, read without Celery: its URLs and transport options (``broker_urls``), the queues
certqueue uses, the messages waiting in each, and the send time of the oldest.

Read by ``certqueue status``, the metrics scrape and dispatch (the acme queue's depth bounds what
it claims). It imports neither Celery nor the metrics stack, so a CLI command that shows queue
depths does not pay for them; Redis's client is imported only for a Redis broker, and the embedded
broker's folders are read by ``certqueue.embedded_broker``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from certqueue import embedded_broker

if TYPE_CHECKING:
    from certqueue.config import Settings

log = logging.getLogger("certqueue.metrics")

#: the header every published task message carries (certqueue.celery_app stamps it): the age of a
#: queue's oldest message
SENT_AT_HEADER = "certqueue_sent_at"
#: kombu's Redis transport keeps one list per priority step: "<queue>", "<queue>\x06\x163", ...
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
BROKER_TIMEOUT_SECONDS = 1.0


def region_queue(region: str) -> str:
    return f"propagate.{region}"


def queue_names(settings: Settings) -> list[str]:
    """Every queue certqueue's workers consume: scan, acme, dns, events and one per region."""
    return ["scan", "acme", "dns", "events"] + [region_queue(r.name) for r in settings.multi_region.regions]


_redis_lock = threading.Lock()
_redis_clients: dict[str, Any] = {}


def redis_client(url: str) -> Any:
    """The process's one client (a connection pool) for ``url``, with short timeouts."""
    import redis

    with _redis_lock:
        client = _redis_clients.get(url)
        if client is None:
            client = redis.Redis.from_url(
                url, socket_timeout=BROKER_TIMEOUT_SECONDS, socket_connect_timeout=BROKER_TIMEOUT_SECONDS
            )
            _redis_clients[url] = client
        return client


def sent_at(raw: bytes | None) -> float | None:
    """The send time a raw kombu message carries, or None."""
    if not raw:
        return None
    try:
        msg = json.loads(raw)
        value = msg.get("headers", {}).get(SENT_AT_HEADER)
        return float(value) if value is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def broker_snapshot(
    settings: Settings, *, ages: bool = True
) -> tuple[dict[str, int], dict[str, float]] | None:
    """(messages waiting per queue, send time of the oldest waiting message per queue), or None when
    the broker cannot be reached (or is not supported). ``ages=False``: depths only (LLEN alone, for
    dispatch, which asks often)."""
    from certqueue import embedded_broker

    names = queue_names(settings)
    url = settings.broker.url
    if embedded_broker.is_embedded(url):
        embedded_broker.broker_urls(settings)  # its folders, as the workers would make them
        found = embedded_broker.queue_depths(settings, names)
        return None if found is None else (found, {})
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        keys = [
            (name, name if pri == 0 else f"{name}{KOMBU_PRIORITY_SEP}{pri}")
            for name in names
            for pri in KOMBU_PRIORITY_STEPS
        ]
        try:
            pipe = redis_client(url).pipeline(transaction=False)
            for _name, key in keys:
                pipe.llen(key)
                if ages:
                    pipe.lindex(key, -1)  # kombu LPUSHes and BRPOPs: the oldest is last
            replies = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: broker unreachable (%s)", type(exc).__name__)
            return None
        depths = dict.fromkeys(names, 0)
        oldest: dict[str, float] = {}
        step = 2 if ages else 1
        for i, (name, _key) in enumerate(keys):
            depths[name] += int(replies[step * i])
            sent = sent_at(replies[step * i + 1]) if ages else None
            if sent is not None:
                oldest[name] = min(sent, oldest.get(name, sent))
        return depths, oldest
    return None


def queue_depths(settings: Settings) -> dict[str, int] | None:
    """Messages waiting per queue, or None when the broker cannot be reached (or is not supported)."""
    snap = broker_snapshot(settings, ages=False)
    return None if snap is None else snap[0]


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
                    # kombu sets its BRPOP timeout from this (default 1 s); closing the channel at
                    # a warm shutdown reads the BRPOP in flight, so this bounds an idle stop
                    "polling_interval": 0.25,
                }
            )
        backend = settings.broker.result_backend or (url if url.startswith(("redis", "rediss")) else "")
    return url, backend, opts
