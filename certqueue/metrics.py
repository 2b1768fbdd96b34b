"""The Prometheus exporter: every value is computed from the database (and the broker) at scrape time.

Owns nothing; it only reads. A custom collector on a private registry (never the process-global one,
so nothing else in the process leaks into the exposition and tests see exactly what is served).

Counters come from the ``events`` table, so they survive restarts and are the same whichever API
replica is scraped. Every query is bounded whatever the fleet size:

* per-certificate series (``certificate_days_until_expiration``,
  ``certificate_expiration_timestamp_seconds``): ``ORDER BY not_after LIMIT max_certificate_series``,
  soonest expiry first, so the certificates that matter are never the ones cut off;
* everything else is one ``GROUP BY`` (or one aggregate ``SELECT``) per family; no rows are loaded.

If the database cannot be reached the scrape still answers, with ``certqueue_database_up 0`` (and
the broker families), so Prometheus can tell "exporter down" from "database down".
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, literal, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from certqueue import embedded_broker
from certqueue.config import Settings, get_settings
from certqueue.models import Certificate, Deployment, Event, Issuance, RateBudget, State, utcnow

log = logging.getLogger("certqueue.metrics")

#: states whose current issuance is (or was until it expired) being served
SERVED_STATES = (State.ACTIVE, State.RENEWING, State.EXPIRED)
#: states counted in the expiry histogram: the certificate is in service now
IN_SERVICE_STATES = (State.ACTIVE, State.RENEWING)
EXPIRY_BUCKETS_DAYS = (0, 1, 3, 7, 14, 21, 30, 45, 60, 90)
OUTCOMES = ("success", "failure")
DEPLOYMENT_STATUSES = ("pending", "deployed", "failed")
#: kombu's Redis transport keeps one list per priority step: "<queue>", "<queue>\x06\x163", ...
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
BROKER_TIMEOUT_SECONDS = 1.0

#: every family this exporter can serve (the Grafana and alert tests check their PromQL against it)
FAMILIES = (
    "certificate_days_until_expiration",
    "certificate_expiration_timestamp_seconds",
    "certificate_renewal_total",
    "certificate_issuance_total",
    "certificate_validation_errors_total",
    "certificate_propagation_total",
    "certificates",
    "certificate_expiry_days",
    "certqueue_certificate_series_omitted",
    "certqueue_deployments",
    "certqueue_region_pending_oldest_seconds",
    "certqueue_queue_depth",
    "certqueue_broker_up",
    "certqueue_broker_quarantined",
    "certqueue_rate_limit_budget_remaining",
    "certqueue_database_up",
    "certqueue_scrape_duration_seconds",
)


def _epoch(col: Any, dialect: str) -> ColumnElement[Any]:
    """Seconds since the epoch of a UTCDateTime column, in SQL (naive UTC text on SQLite)."""
    if dialect == "sqlite":
        return (func.julianday(col) - 2440587.5) * 86400.0
    return func.extract("epoch", col)


class CertqueueCollector(Collector):
    """Computes every certqueue family from the database at scrape time."""

    def __init__(
        self,
        *,
        settings: Callable[[], Settings] = get_settings,
        clock: Callable[[], dt.datetime] = utcnow,
        session_factory: Callable[[], Any] | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._session_factory = session_factory

    def describe(self) -> Iterator[Metric]:
        # nothing at registration time: describing would need the database
        return iter(())

    def _session(self) -> Any:
        if self._session_factory is not None:
            return self._session_factory()
        from certqueue.db import session_scope

        return session_scope(write=False)

    def collect(self) -> Iterator[Metric]:
        import time

        started = time.perf_counter()
        settings = self._settings()
        now = self._clock()
        db_up = GaugeMetricFamily("certqueue_database_up", "1 if the database answered this scrape, else 0")
        families: list[Metric] = []
        try:
            with self._session() as session:
                families = list(self._from_database(session, settings, now))
            db_up.add_metric([], 1)
        except SQLAlchemyError as exc:
            # the URL may hold a password: log the class only
            log.warning("metrics: database unreachable (%s)", type(exc).__name__)
            db_up.add_metric([], 0)
        yield from families
        yield db_up
        yield from broker_families(settings)
        duration = GaugeMetricFamily(
            "certqueue_scrape_duration_seconds", "Time this exporter took to compute the scrape"
        )
        duration.add_metric([], time.perf_counter() - started)
        yield duration

    # --- database families ---------------------------------------------------------------------

    def _from_database(self, session: Session, settings: Settings, now: dt.datetime) -> Iterator[Metric]:
        dialect = session.get_bind().dialect.name
        yield from self._per_certificate(session, settings, now)
        yield self._expiry_histogram(session, now, dialect)
        yield self._states(session)
        yield from self._event_counters(session)
        yield from self._deployments(session, now)
        yield self._rate_budgets(session, settings, now)

    def _per_certificate(self, session: Session, settings: Settings, now: dt.datetime) -> Iterator[Metric]:
        limit = settings.monitoring.max_certificate_series
        days = GaugeMetricFamily(
            "certificate_days_until_expiration",
            "Days until the served certificate expires (negative: expired)",
            labels=["certificate_id", "domain"],
        )
        stamp = GaugeMetricFamily(
            "certificate_expiration_timestamp_seconds",
            "Expiry (notAfter) of the served certificate, seconds since the epoch",
            labels=["certificate_id", "domain"],
        )
        served = [s.value for s in SERVED_STATES]
        rows: Sequence[Any] = []
        if limit > 0:
            rows = session.execute(
                select(Certificate.id, Certificate.domains, Issuance.not_after)
                .join(
                    Issuance,
                    (Issuance.id == Certificate.current_issuance_id)
                    & (Issuance.certificate_id == Certificate.id),
                )
                .where(Certificate.state.in_(served))
                .order_by(Issuance.not_after, Certificate.id)
                .limit(limit)
            ).all()
        for cid, domains, not_after in rows:
            domain = str(domains[0]) if domains else ""
            days.add_metric([cid, domain], (not_after - now).total_seconds() / 86400.0)
            stamp.add_metric([cid, domain], not_after.timestamp())
        yield days
        yield stamp
        omitted = GaugeMetricFamily(
            "certqueue_certificate_series_omitted",
            "Served certificates without a per-certificate series (monitoring.max_certificate_series)",
        )
        if len(rows) < limit:
            omitted.add_metric([], 0)
        else:
            total = session.execute(
                select(func.count())
                .select_from(Certificate)
                .where(Certificate.state.in_(served), Certificate.current_issuance_id.is_not(None))
            ).scalar_one()
            omitted.add_metric([], max(int(total) - len(rows), 0))
        yield omitted

    def _expiry_histogram(self, session: Session, now: dt.datetime, dialect: str) -> Metric:
        cols: list[Any] = [
            func.sum(case((Issuance.not_after <= now + dt.timedelta(days=b), 1), else_=0))
            for b in EXPIRY_BUCKETS_DAYS
        ]
        cols.append(func.count())
        cols.append(func.coalesce(func.sum(_epoch(Issuance.not_after, dialect)), literal(0.0)))
        row = session.execute(
            select(*cols)
            .select_from(Certificate)
            .join(
                Issuance,
                (Issuance.id == Certificate.current_issuance_id)
                & (Issuance.certificate_id == Certificate.id),
            )
            .where(Certificate.state.in_([s.value for s in IN_SERVICE_STATES]))
        ).one()
        count = int(row[-2] or 0)
        sum_days = (float(row[-1] or 0.0) - count * now.timestamp()) / 86400.0
        buckets: list[tuple[str, float]] = [
            (_le(b), float(row[i] or 0)) for i, b in enumerate(EXPIRY_BUCKETS_DAYS)
        ]
        buckets.append(("+Inf", float(count)))
        hist = HistogramMetricFamily(
            "certificate_expiry_days",
            "Days until expiry of in-service (ACTIVE, RENEWING) certificates",
            buckets=buckets,
            sum_value=sum_days,
        )
        return hist

    def _states(self, session: Session) -> Metric:
        counts = dict(
            session.execute(select(Certificate.state, func.count()).group_by(Certificate.state))
            .tuples()
            .all()
        )
        fam = GaugeMetricFamily("certificates", "Certificates by lifecycle state", labels=["state"])
        for st in State:
            fam.add_metric([st.value], float(counts.get(st.value, 0)))
        return fam

    def _event_counters(self, session: Session) -> Iterator[Metric]:
        outcome = dict.fromkeys((f"{k}:{o}" for k in ("renewal", "issuance") for o in OUTCOMES), 0)
        for kind, reason, n in session.execute(
            select(Event.kind, Event.reason, func.count())
            .where(Event.kind.in_(["renewal", "issuance"]))
            .group_by(Event.kind, Event.reason)
        ).tuples():
            outcome[f"{kind}:{reason or 'unknown'}"] = int(n)
        for kind, doc in (
            ("renewal", "Renewal attempts by outcome"),
            ("issuance", "First issuance attempts by outcome"),
        ):
            fam = CounterMetricFamily(f"certificate_{kind}_total", doc, labels=["status"])
            for key, n in sorted(outcome.items()):
                k, _, status = key.partition(":")
                if k == kind:
                    fam.add_metric([status], n)
            yield fam

        vtype = Event.data["type"].as_string()
        verr = CounterMetricFamily(
            "certificate_validation_errors_total", "ACME validation errors by challenge type", labels=["type"]
        )
        for typ, n in session.execute(
            select(vtype, func.count()).where(Event.kind == "validation_error").group_by(vtype)
        ).tuples():
            verr.add_metric([typ or "unknown"], int(n))
        yield verr

        region = Event.data["region"].as_string()
        prop = CounterMetricFamily(
            "certificate_propagation_total", "Deployments to a region by outcome", labels=["region", "status"]
        )
        for reg, status, n in session.execute(
            select(region, Event.reason, func.count())
            .where(Event.kind == "propagation")
            .group_by(region, Event.reason)
        ).tuples():
            prop.add_metric([reg or "unknown", status or "unknown"], int(n))
        yield prop

    def _deployments(self, session: Session, now: dt.datetime) -> Iterator[Metric]:
        fam = GaugeMetricFamily(
            "certqueue_deployments", "Deployments by region and status", labels=["region", "status"]
        )
        seen: dict[str, dict[str, int]] = {}
        for reg, status, n in session.execute(
            select(Deployment.region, Deployment.status, func.count()).group_by(
                Deployment.region, Deployment.status
            )
        ).tuples():
            seen.setdefault(reg, {})[status] = int(n)
        for reg in sorted(seen):
            for status in sorted(set(DEPLOYMENT_STATUSES) | set(seen[reg])):
                fam.add_metric([reg, status], float(seen[reg].get(status, 0)))
        yield fam
        oldest = GaugeMetricFamily(
            "certqueue_region_pending_oldest_seconds",
            "Age of the oldest pending deployment per region (a region with no worker keeps growing)",
            labels=["region"],
        )
        for reg, first in session.execute(
            select(Deployment.region, func.min(Deployment.updated_at))
            .where(Deployment.status == "pending")
            .group_by(Deployment.region)
        ).tuples():
            if first is not None:
                oldest.add_metric([reg], max((now - first).total_seconds(), 0.0))
        yield oldest

    def _rate_budgets(self, session: Session, settings: Settings, now: dt.datetime) -> Metric:
        fam = GaugeMetricFamily(
            "certqueue_rate_limit_budget_remaining",
            "Requests left in a shared rate-limit budget (0 while blocked)",
            labels=["key"],
        )
        remaining = case(
            (RateBudget.blocked_until.is_not(None) & (RateBudget.blocked_until > now), literal(0.0)),
            else_=RateBudget.limit - RateBudget.used,
        )
        rows = session.execute(
            select(RateBudget.key, remaining)
            .order_by(remaining, RateBudget.key)
            .limit(max(settings.monitoring.max_certificate_series, 1))
        ).tuples()
        for key, left in rows:
            fam.add_metric([key], max(float(left or 0.0), 0.0))
        return fam


def _le(bound: float) -> str:
    return f"{float(bound)}"


# --- the broker ------------------------------------------------------------------------------------

_redis_lock = threading.Lock()
_redis_clients: dict[str, Any] = {}


def _redis_client(url: str) -> Any:
    import redis

    with _redis_lock:
        client = _redis_clients.get(url)
        if client is None:
            client = redis.Redis.from_url(
                url, socket_timeout=BROKER_TIMEOUT_SECONDS, socket_connect_timeout=BROKER_TIMEOUT_SECONDS
            )
            _redis_clients[url] = client
        return client


def queue_depths(settings: Settings) -> dict[str, int] | None:
    """Messages waiting per queue, or None when the broker cannot be reached (or is not supported)."""
    from certqueue.celery_app import broker_urls, make_queues

    names = [q.name for q in make_queues(settings)]
    url, _backend, _opts = broker_urls(settings)
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        try:
            client = _redis_client(url)
            pipe = client.pipeline(transaction=False)
            for name in names:
                for pri in _KOMBU_PRIORITY_STEPS:
                    pipe.llen(name if pri == 0 else f"{name}{_KOMBU_PRIORITY_SEP}{pri}")
            lengths = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: broker unreachable (%s)", type(exc).__name__)
            return None
        steps = len(_KOMBU_PRIORITY_STEPS)
        return {name: int(sum(lengths[i * steps : (i + 1) * steps])) for i, name in enumerate(names)}
    if embedded_broker.is_embedded(url):
        return embedded_broker.queue_depths(settings, names)
    return None


def broker_families(settings: Settings) -> Iterator[Metric]:
    depths = queue_depths(settings)
    up = GaugeMetricFamily("certqueue_broker_up", "1 if the broker answered this scrape, else 0")
    up.add_metric([], 0 if depths is None else 1)
    depth = GaugeMetricFamily("certqueue_queue_depth", "Messages waiting in each queue", labels=["queue"])
    for name, n in sorted((depths or {}).items()):
        depth.add_metric([name], float(n))
    yield depth
    yield up
    quarantined = GaugeMetricFamily(
        "certqueue_broker_quarantined",
        "Undecodable messages the embedded broker moved to its quarantine folder (per queue)",
        labels=["queue"],
    )
    if embedded_broker.is_embedded(settings.broker.url):  # no samples with a server broker
        from certqueue.celery_app import make_queues

        counts = embedded_broker.quarantined(settings)
        for name in sorted({q.name for q in make_queues(settings)} | set(counts)):
            quarantined.add_metric([name], float(counts.get(name, 0)))
    yield quarantined


# --- exposition -------------------------------------------------------------------------------------

REGISTRY = CollectorRegistry(auto_describe=False)
COLLECTOR = CertqueueCollector()
REGISTRY.register(COLLECTOR)


def render_metrics(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The text exposition (Prometheus format 0.0.4) of every certqueue family."""
    return generate_latest(registry)


def serve_metrics(host: str | None = None, port: int | None = None, *, block: bool = True) -> Any:
    """Serve ``/metrics`` alone (without the REST API) on ``host:port`` (monitoring.bind and
    monitoring.prometheus_port by default). Returns the server when ``block`` is false."""
    from prometheus_client import start_http_server

    settings = get_settings()
    server, thread = start_http_server(
        port or settings.monitoring.prometheus_port, addr=host or settings.monitoring.bind, registry=REGISTRY
    )
    if not block:
        return server
    try:
        thread.join()
    finally:
        server.shutdown()
    return server
