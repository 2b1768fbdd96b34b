"""The Prometheus exporter: fleet values are computed from the database (and the broker) at scrape
time; task and ACME request latencies are recorded by the workers into a shared store and read here.

Owns: the latency store (Redis hashes under ``certqueue:metrics:``, or per-process files beside the
embedded filesystem broker). Reads everything else. A custom collector on a private registry (never
the process-global one, so nothing else in the process leaks into the exposition and tests see
exactly what is served). Served by ``certqueue metrics`` on its own listener
(``monitoring.bind:monitoring.prometheus_port``), never on the REST API's port: one scrape target
for the whole fleet, whatever the number of API replicas.

Names: one ``certqueue_`` prefix, base units (seconds). The guide's names (in days, without the
prefix) are Prometheus recording rules (``deploy/prometheus/recording_rules.yml``); with
``monitoring.guide_names: true`` the exporter serves them too (promtool's lint then asks for
seconds in two of them).

Counters come from the ``events`` table, so they survive restarts. Every query is bounded whatever
the fleet size:

* per-certificate series: ``ORDER BY not_after LIMIT max_certificate_series``, soonest expiry
  first, so the certificates that matter are never the ones cut off;
* everything else is one ``GROUP BY`` (or one aggregate ``SELECT``) per family; no rows are loaded.

If the database cannot be reached the scrape still answers, with ``certqueue_database_up 0`` (and
the broker families), so Prometheus can tell "exporter down" from "database down".
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, literal, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from certqueue import __version__, embedded_broker
from certqueue.brokerstate import (  # noqa: F401  (re-exported: metrics.queue_depths and friends)
    SENT_AT_HEADER,
    broker_snapshot,
    queue_depths,
    queue_names,
    redis_client,
    sent_at,
)
from certqueue.config import Settings, get_settings
from certqueue.db import epoch_seconds as _epoch
from certqueue.models import Certificate, Deployment, Event, Issuance, RateBudget, State, utcnow

log = logging.getLogger("certqueue.metrics")

DAY = 86400.0
#: states whose current issuance is (or was until it expired) being served
SERVED_STATES = (State.ACTIVE, State.RENEWING, State.EXPIRED)
#: states counted in the expiry histogram: the certificate is in service now
IN_SERVICE_STATES = (State.ACTIVE, State.RENEWING)
#: the guide's day buckets, served in seconds
EXPIRY_BUCKETS_DAYS = (0, 1, 3, 7, 14, 21, 30, 45, 60, 90)
OUTCOMES = ("success", "failure")
DEPLOYMENT_STATUSES = ("pending", "deployed", "failed")
#: latency histogram buckets (seconds): a bare ACME exchange is ~20 ms, a slow CA a few seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: every family this exporter serves by default (the Grafana and alert tests check their PromQL
#: against it, with the recording rules' names)
FAMILIES = (
    "certqueue_build_info",
    "certqueue_certificate_expiration_timestamp_seconds",
    "certqueue_certificate_not_before_timestamp_seconds",
    "certqueue_certificate_series_omitted",
    "certqueue_certificate_expiry_seconds",
    "certqueue_certificates",
    "certqueue_certificates_deferred",
    "certqueue_certificates_renewal_overdue",
    "certqueue_renewals_total",
    "certqueue_issuances_total",
    "certqueue_validation_errors_total",
    "certqueue_propagations_total",
    "certqueue_removals_total",
    "certqueue_drift_detected_total",
    "certqueue_drift_errors_total",
    "certqueue_deployments",
    "certqueue_region_pending_oldest_seconds",
    "certqueue_broker_quarantined",
    "certqueue_rate_limit_budget_remaining",
    "certqueue_task_duration_seconds",
    "certqueue_acme_request_duration_seconds",
    "certqueue_database_up",
    "certqueue_queue_depth",
    "certqueue_queue_oldest_message_age_seconds",
    "certqueue_broker_up",
    "certqueue_scrape_duration_seconds",
)
#: the guide's names (``monitoring.guide_names``; otherwise recording rules), and what they alias
GUIDE_ALIASES = {
    "certificate_days_until_expiration": (
        "(certqueue_certificate_expiration_timestamp_seconds - time()) / 86400"
    ),
    "certificate_expiration_timestamp_seconds": "certqueue_certificate_expiration_timestamp_seconds",
    "certificate_expiry_days": "certqueue_certificate_expiry_seconds (buckets and sum / 86400)",
    "certificates": "certqueue_certificates",
    "certificate_renewal_total": "certqueue_renewals_total",
    "certificate_issuance_total": "certqueue_issuances_total",
    "certificate_validation_errors_total": "certqueue_validation_errors_total",
    "certificate_propagation_total": "certqueue_propagations_total",
}


def _served_join() -> Any:
    return (Issuance.id == Certificate.current_issuance_id) & (Issuance.certificate_id == Certificate.id)


#: the reasons ``certqueue_certificates_deferred`` counts (each is always exported, 0 when none)
DEFERRAL_REASONS = ("rate_limited", "ca_rate_limited", "capacity", "other")


class CertqueueCollector(Collector):
    """Computes every certqueue family at scrape time."""

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
        started = time.perf_counter()
        settings = self._settings()
        now = self._clock()
        info = GaugeMetricFamily(
            "certqueue_build_info",
            "certqueue's version and Python version (always 1)",
            labels=["version", "python_version"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
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
        if settings.monitoring.guide_names:
            yield from guide_families(families, now)
        yield db_up
        yield from latency_families(settings)
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
        yield self._renewal_overdue(session, settings, now)
        yield self._deferred(session, now)
        yield from self._event_counters(session)
        yield from self._deployments(session, now)
        yield self._rate_budgets(session, settings, now)

    def _per_certificate(self, session: Session, settings: Settings, now: dt.datetime) -> Iterator[Metric]:
        limit = settings.monitoring.max_certificate_series
        labels = ["certificate_id", "domain"] if settings.monitoring.domain_labels else ["certificate_id"]
        stamp = GaugeMetricFamily(
            "certqueue_certificate_expiration_timestamp_seconds",
            "Expiry (notAfter) of the served certificate, seconds since the epoch",
            labels=labels,
        )
        issued = GaugeMetricFamily(
            "certqueue_certificate_not_before_timestamp_seconds",
            "Start (notBefore) of the served certificate, seconds since the epoch (lifetime: expiry - this)",
            labels=labels,
        )
        served = [s.value for s in SERVED_STATES]
        rows: Sequence[Any] = []
        if limit > 0:
            rows = session.execute(
                select(Certificate.id, Certificate.domains, Issuance.not_before, Issuance.not_after)
                .join(Issuance, _served_join())
                .where(Certificate.state.in_(served))
                .order_by(Issuance.not_after, Certificate.id)
                .limit(limit)
            ).all()
        for cid, domains, not_before, not_after in rows:
            values = [cid, str(domains[0]) if domains else ""][: len(labels)]
            stamp.add_metric(values, not_after.timestamp())
            issued.add_metric(values, not_before.timestamp())
        yield stamp
        yield issued
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
            .join(Issuance, _served_join())
            .where(Certificate.state.in_([s.value for s in IN_SERVICE_STATES]))
        ).one()
        count = int(row[-2] or 0)
        sum_seconds = float(row[-1] or 0.0) - count * now.timestamp()
        buckets: list[tuple[str, float]] = [
            (_le(b * DAY), float(row[i] or 0)) for i, b in enumerate(EXPIRY_BUCKETS_DAYS)
        ]
        buckets.append(("+Inf", float(count)))
        return HistogramMetricFamily(
            "certqueue_certificate_expiry_seconds",
            "Seconds until expiry of in-service (ACTIVE, RENEWING) certificates; the fleet expiry heatmap",
            buckets=buckets,
            sum_value=sum_seconds,
        )

    def _states(self, session: Session) -> Metric:
        counts = dict(
            session.execute(select(Certificate.state, func.count()).group_by(Certificate.state))
            .tuples()
            .all()
        )
        fam = GaugeMetricFamily("certqueue_certificates", "Certificates by lifecycle state", labels=["state"])
        for st in State:
            fam.add_metric([st.value], float(counts.get(st.value, 0)))
        return fam

    def _deferred(self, session: Session, now: dt.datetime) -> Metric:
        """Certificates whose work waits in the database until a stated time, by why: a client-side
        rate-limit budget, the CA's own rateLimited answer, or the per-CA in-flight cap. The label is
        the kind of reason (a few values), never the reason's text (it names domains)."""
        text = Certificate.waiting_reason
        kind = case(
            (text.like("capacity%"), "capacity"),
            (text.like("%the CA answered%"), "ca_rate_limited"),
            (text.like("rate limit%"), "rate_limited"),
            else_="other",
        )
        counts: dict[str, int] = dict(
            session.execute(
                select(kind, func.count())
                .where(
                    text.is_not(None),
                    Certificate.state.in_([State.REQUESTED.value, State.ISSUING.value, State.RENEWING.value]),
                    Certificate.next_attempt_at.is_not(None),
                    Certificate.next_attempt_at > now,
                )
                .group_by(kind)
            )
            .tuples()
            .all()
        )
        fam = GaugeMetricFamily(
            "certqueue_certificates_deferred",
            "Certificates waiting for a rate-limit budget, the CA's rate limit or capacity, by reason",
            labels=["reason"],
        )
        for reason in DEFERRAL_REASONS:
            fam.add_metric([reason], float(counts.get(reason, 0)))
        return fam

    def _renewal_overdue(self, session: Session, settings: Settings, now: dt.datetime) -> Metric:
        """ACTIVE auto-renewing certificates past ``renew_at`` by more than the grace, not RENEWING:
        nothing picked them up (no dispatch, no capacity, no worker)."""
        grace = dt.timedelta(minutes=settings.monitoring.renewal_overdue_grace_minutes)
        n = session.execute(
            select(func.count())
            .select_from(Certificate)
            .where(
                Certificate.state == State.ACTIVE.value,
                Certificate.auto_renew.is_(True),
                Certificate.renew_at.is_not(None),
                Certificate.renew_at <= now - grace,
            )
        ).scalar_one()
        fam = GaugeMetricFamily(
            "certqueue_certificates_renewal_overdue",
            "ACTIVE certificates past their renewal time (plus monitoring.renewal_overdue_grace_minutes) "
            "and not renewing",
        )
        fam.add_metric([], float(n))
        return fam

    def _event_counters(self, session: Session) -> Iterator[Metric]:
        outcome = dict.fromkeys((f"{k}:{o}" for k in ("renewal", "issuance") for o in OUTCOMES), 0)
        for kind, reason, n in session.execute(
            select(Event.kind, Event.reason, func.count())
            .where(Event.kind.in_(["renewal", "issuance"]))
            .group_by(Event.kind, Event.reason)
        ).tuples():
            outcome[f"{kind}:{reason or 'unknown'}"] = int(n)
        for kind, name, doc in (
            ("renewal", "certqueue_renewals", "Renewal attempts by outcome"),
            ("issuance", "certqueue_issuances", "First issuance attempts by outcome"),
        ):
            fam = CounterMetricFamily(name, doc, labels=["status"])
            for key, n in sorted(outcome.items()):
                k, _, status = key.partition(":")
                if k == kind:
                    fam.add_metric([status], n)
            yield fam

        vtype = Event.data["type"].as_string()
        verr = CounterMetricFamily(
            "certqueue_validation_errors", "ACME validation errors by challenge type", labels=["type"]
        )
        for typ, n in session.execute(
            select(vtype, func.count()).where(Event.kind == "validation_error").group_by(vtype)
        ).tuples():
            verr.add_metric([typ or "unknown"], int(n))
        yield verr

        region = Event.data["region"].as_string()
        prop = CounterMetricFamily(
            "certqueue_propagations", "Deployments to a region by outcome", labels=["region", "status"]
        )
        for reg, status, n in session.execute(
            select(region, Event.reason, func.count())
            .where(Event.kind == "propagation")
            .group_by(region, Event.reason)
        ).tuples():
            prop.add_metric([reg or "unknown", status or "unknown"], int(n))
        yield prop

        rem = CounterMetricFamily(
            "certqueue_removals",
            "Removals of a revoked or deleted certificate's copy from a region, by outcome",
            labels=["region", "status"],
        )
        for reg, status, n in session.execute(
            select(region, Event.reason, func.count())
            .where(Event.kind == "removal")
            .group_by(region, Event.reason)
        ).tuples():
            rem.add_metric([reg or "unknown", status or "unknown"], int(n))
        yield rem

        found = CounterMetricFamily(
            "certqueue_drift_detected",
            "Deployed copies found serving something else (or nothing) and redeployed",
            labels=["region"],
        )
        for reg, n in session.execute(
            select(region, func.count()).where(Event.kind == "drift").group_by(region)
        ).tuples():
            found.add_metric([reg or "unknown"], int(n))
        yield found

        errs = CounterMetricFamily(
            "certqueue_drift_errors",
            "Drift checks a target answered with an error, by region and stable reason",
            labels=["region", "reason"],
        )
        count = Event.data["count"].as_integer()
        for reg, reason, n in session.execute(
            select(region, Event.reason, func.sum(count))
            .where(Event.kind == "drift_error")
            .group_by(region, Event.reason)
        ).tuples():
            errs.add_metric([reg or "unknown", reason or "unknown"], int(n or 0))
        yield errs

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


def guide_families(families: Sequence[Metric], now: dt.datetime) -> Iterator[Metric]:
    """The guide's names for the same values (``monitoring.guide_names``): days, no prefix."""
    by_name = {f.name: f for f in families}
    stamp = by_name.get("certqueue_certificate_expiration_timestamp_seconds")
    if stamp is not None:
        labels = list(stamp.samples[0].labels) if stamp.samples else ["certificate_id"]
        days = GaugeMetricFamily(
            "certificate_days_until_expiration",
            "The guide's name: days until the served certificate expires (negative: expired)",
            labels=labels,
        )
        old = GaugeMetricFamily(
            "certificate_expiration_timestamp_seconds",
            "The guide's name of certqueue_certificate_expiration_timestamp_seconds",
            labels=labels,
        )
        for s in stamp.samples:
            values = [s.labels[k] for k in labels]
            days.add_metric(values, (s.value - now.timestamp()) / DAY)
            old.add_metric(values, s.value)
        yield days
        yield old
    hist = by_name.get("certqueue_certificate_expiry_seconds")
    if hist is not None:
        buckets = [
            (s.labels["le"] if s.labels["le"] == "+Inf" else _le(float(s.labels["le"]) / DAY), s.value)
            for s in hist.samples
            if s.name.endswith("_bucket")
        ]
        total = next(s.value for s in hist.samples if s.name.endswith("_sum"))
        yield HistogramMetricFamily(
            "certificate_expiry_days",
            "The guide's name: days until expiry",
            buckets=buckets,
            sum_value=total / DAY,
        )
    for new, old_name in (
        ("certqueue_certificates", "certificates"),
        ("certqueue_renewals", "certificate_renewal"),
        ("certqueue_issuances", "certificate_issuance"),
        ("certqueue_validation_errors", "certificate_validation_errors"),
        ("certqueue_propagations", "certificate_propagation"),
    ):
        fam = by_name.get(new)
        if fam is None:
            continue
        copy: Metric
        if fam.type == "counter":
            copy = CounterMetricFamily(old_name, f"The guide's name of {new}_total", labels=None)
        else:
            copy = GaugeMetricFamily(old_name, f"The guide's name of {new}", labels=None)
        for s in fam.samples:
            copy.add_sample(s.name.replace(new, old_name, 1), s.labels, s.value)
        yield copy


# --- latencies recorded by the workers --------------------------------------------------------------
#
# Workers are separate processes (and machines): what they time goes into a store every exporter
# reads. Redis brokers: one hash per family, fields "<labels json>\t<le>" / "\tsum" / "\tcount",
# HINCRBY'd in one pipeline (no read-modify-write, so any number of workers add safely). The
# embedded filesystem broker: each process rewrites its own JSON file beside the broker folder.
# Recording never raises into the work it measures.

_REDIS_PREFIX = "certqueue:metrics:"
_store_lock = threading.Lock()
_local_counts: dict[str, dict[str, float]] = {}
_LATENCY_DOCS = {
    "certqueue_task_duration_seconds": ("Run time of each Celery task execution", ("task",)),
    "certqueue_acme_request_duration_seconds": (
        "Time of each HTTP request to an ACME CA, by CA (directory host) and endpoint",
        ("ca", "endpoint"),
    ),
}


def _fields(labels: Sequence[str], seconds: float) -> dict[str, float]:
    key = json.dumps(list(labels), separators=(",", ":"))
    out: dict[str, float] = {f"{key}\tcount": 1, f"{key}\tsum": seconds}
    for b in LATENCY_BUCKETS:
        if seconds <= b:
            out[f"{key}\t{_le(b)}"] = 1
    return out


def _metrics_dir(settings: Settings) -> Path:
    return Path(settings.broker.filesystem_path).parent / "metrics"


#: observations are added up in the process and written at most this often (and at exit): one
#: Redis round trip per second per process instead of one per ACME request
FLUSH_SECONDS = 1.0
_pending: dict[str, dict[str, float]] = {}
_flusher_pid: int | None = None


def observe(family: str, labels: Sequence[str], seconds: float, settings: Settings | None = None) -> None:
    """Add one observation to a recorded latency histogram (``_LATENCY_DOCS``); written to the
    shared store within ``FLUSH_SECONDS`` by a background thread (or by :func:`flush`)."""
    global _flusher_pid
    try:
        if not (settings or get_settings()).monitoring.enabled:
            return
        fields = _fields(labels, max(seconds, 0.0))
        _store_target(settings or get_settings())  # resolved now: flush() may run at interpreter exit
        with _store_lock:
            counts = _pending.setdefault(family, {})
            for f, v in fields.items():
                counts[f] = counts.get(f, 0.0) + v
            if _flusher_pid != os.getpid():  # first use in this process (or in a forked child)
                _flusher_pid = os.getpid()
                threading.Thread(target=_flush_loop, name="certqueue-metrics-flush", daemon=True).start()
    except Exception as exc:  # noqa: BLE001 - a metric must never fail the work it measures
        log.debug("metrics: could not record %s (%s)", family, type(exc).__name__)


def _flush_loop() -> None:
    while True:
        time.sleep(FLUSH_SECONDS)
        flush()


def flush(settings: Settings | None = None) -> None:
    """Write what this process observed since the last flush to the shared store."""
    with _store_lock:
        batch = {fam: dict(c) for fam, c in _pending.items() if c}
        _pending.clear()
    if not batch:
        return
    try:
        kind, where = _store_target(settings or get_settings())
        if kind == "redis":
            pipe = redis_client(where).pipeline(transaction=False)
            for family, fields in batch.items():
                for f, v in fields.items():
                    if f.endswith("\tsum"):
                        pipe.hincrbyfloat(_REDIS_PREFIX + family, f, v)
                    else:
                        pipe.hincrby(_REDIS_PREFIX + family, f, int(v))
            pipe.execute()
            return
        folder = Path(where)
        with _store_lock:
            for family, fields in batch.items():
                counts = _local_counts.setdefault(family, {})
                for f, v in fields.items():
                    counts[f] = counts.get(f, 0.0) + v
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{os.getpid()}.json.tmp"
            tmp.write_text(json.dumps(_local_counts))
            os.replace(tmp, folder / f"{os.getpid()}.json")
    except Exception as exc:  # noqa: BLE001 - a metric must never fail the work it measures
        log.debug("metrics: could not write latencies (%s: %s)", type(exc).__name__, exc)


_targets: dict[tuple[str, str], tuple[str, str]] = {}


def _store_target(settings: Settings) -> tuple[str, str]:
    """("redis", broker URL) or ("dir", folder) for these settings; the Redis client is created
    here too, so that writing needs no import and no new object at interpreter exit."""
    key = (settings.broker.url, str(settings.broker.filesystem_path))
    target = _targets.get(key)
    if target is None:
        from certqueue.brokerstate import broker_urls

        url, _backend, _opts = broker_urls(settings)
        if url.startswith(("redis://", "rediss://", "unix://")):
            redis_client(url)
            target = ("redis", url)
        else:
            target = ("dir", str(_metrics_dir(settings)))
        _targets[key] = target
    return target


atexit.register(flush)


def _read_store(settings: Settings) -> dict[str, dict[str, float]] | None:
    from certqueue.brokerstate import broker_urls

    url, _backend, _opts = broker_urls(settings)
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        try:
            client = redis_client(url)
            pipe = client.pipeline(transaction=False)
            for fam in _LATENCY_DOCS:
                pipe.hgetall(_REDIS_PREFIX + fam)
            raw = pipe.execute()
        except (redis.RedisError, OSError):
            return None
        return {
            fam: {k.decode(): float(v) for k, v in data.items()}
            for fam, data in zip(_LATENCY_DOCS, raw, strict=True)
        }
    out: dict[str, dict[str, float]] = {}
    try:
        files = list(_metrics_dir(settings).glob("*.json"))
    except OSError:
        return out
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for fam, counts in data.items():
            merged = out.setdefault(fam, {})
            for k, v in counts.items():
                merged[k] = merged.get(k, 0.0) + float(v)
    return out


def latency_families(settings: Settings) -> Iterator[Metric]:
    store = _read_store(settings) or {}
    for fam, (doc, label_names) in _LATENCY_DOCS.items():
        grouped: dict[str, dict[str, float]] = {}
        for field, value in store.get(fam, {}).items():
            key, _, part = field.partition("\t")
            grouped.setdefault(key, {})[part] = value
        hist = HistogramMetricFamily(fam, doc, labels=list(label_names))
        for key in sorted(grouped):
            parts = grouped[key]
            buckets = [(_le(b), parts.get(_le(b), 0.0)) for b in LATENCY_BUCKETS]
            buckets.append(("+Inf", parts.get("count", 0.0)))
            hist.add_metric(json.loads(key), buckets, parts.get("sum", 0.0))
        yield hist


# ACME endpoints by path: the directory's own names where the URL is one of them, else the kind of
# resource (Let's Encrypt /acme/order/..., Pebble /my-order/...). Never the full URL: ids in paths
# would make a series per order.
_ENDPOINTS = (
    ("newNonce", re.compile(r"nonce", re.I)),
    ("newAccount", re.compile(r"new-?acc|new-reg|sign-me-up", re.I)),
    ("newOrder", re.compile(r"new-?order|order-plz", re.I)),
    ("revokeCert", re.compile(r"revoke", re.I)),
    ("keyChange", re.compile(r"key-?change|rollover", re.I)),
    ("renewalInfo", re.compile(r"renewal-?info", re.I)),
    ("finalize", re.compile(r"finali[sz]e", re.I)),
    ("challenge", re.compile(r"chal", re.I)),
    ("authorization", re.compile(r"authz", re.I)),
    ("certificate", re.compile(r"cert", re.I)),
    ("order", re.compile(r"order", re.I)),
    ("account", re.compile(r"acct|account", re.I)),
    ("directory", re.compile(r"dir(ectory)?/?$", re.I)),
)


def acme_endpoint(url: str) -> str:
    path = urlsplit(url).path
    for name, rx in _ENDPOINTS:
        if rx.search(path):
            return name
    return "other"


def observe_acme_request(directory_url: str, url: str, seconds: float) -> None:
    """One HTTP request to a CA (called by certqueue.acme.client's network layer)."""
    observe(
        "certqueue_acme_request_duration_seconds",
        [urlsplit(directory_url).netloc, acme_endpoint(url)],
        seconds,
    )


_task_started: dict[str, float] = {}
_hooks_installed = False


def install_celery_hooks() -> None:
    """Connect the Celery signals this module needs (idempotent; called by celery_app):
    ``task_prerun`` / ``task_postrun``, each task execution's run time. (The send time every
    message carries is stamped by ``certqueue.celery_app.stamp_sent_at``.)"""
    global _hooks_installed
    if _hooks_installed:
        return
    from celery import signals

    def _pre(task_id: str | None = None, **_kw: Any) -> None:
        if task_id:
            _task_started[task_id] = time.perf_counter()

    def _post(task_id: str | None = None, task: Any = None, **_kw: Any) -> None:
        started = _task_started.pop(task_id or "", None)
        if started is not None and task is not None:
            observe("certqueue_task_duration_seconds", [str(task.name)], time.perf_counter() - started)

    signals.task_prerun.connect(_pre, weak=False)
    signals.task_postrun.connect(_post, weak=False)
    _hooks_installed = True


# --- the broker ------------------------------------------------------------------------------------


def pool_of(queue: str) -> str:
    """The worker pool that consumes a queue (certqueue.workers.pool_spec): scan and events go to
    acme."""
    head = queue.split(".", 1)[0]
    return "acme" if head in ("scan", "events") else head


def broker_families(settings: Settings) -> Iterator[Metric]:
    snap = broker_snapshot(settings)
    up = GaugeMetricFamily("certqueue_broker_up", "1 if the broker answered this scrape, else 0")
    up.add_metric([], 0 if snap is None else 1)
    depths, oldest = snap or ({}, {})
    depth = GaugeMetricFamily(
        "certqueue_queue_depth",
        "Messages waiting in each queue, with the pool that consumes it",
        labels=["queue", "pool"],
    )
    for name, n in sorted(depths.items()):
        depth.add_metric([name, pool_of(name)], float(n))
    age = GaugeMetricFamily(
        "certqueue_queue_oldest_message_age_seconds",
        "Age of the oldest message waiting in each queue (0 when empty)",
        labels=["queue", "pool"],
    )
    now = time.time()
    for name in sorted(depths):
        sent = oldest.get(name)
        age.add_metric(
            [name, pool_of(name)], max(now - sent, 0.0) if sent is not None and depths[name] else 0.0
        )
    yield depth
    yield age
    yield up
    quarantined = GaugeMetricFamily(
        "certqueue_broker_quarantined",
        "Undecodable messages the embedded broker moved to its quarantine folder (per queue)",
        labels=["queue"],
    )
    if embedded_broker.is_embedded(settings.broker.url):  # no samples with a server broker
        counts = embedded_broker.quarantined(settings)
        for name in sorted(set(queue_names(settings)) | set(counts)):
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
    """Serve ``/metrics`` on its own listener, ``host:port`` (monitoring.bind and
    monitoring.prometheus_port by default). Returns the server when ``block`` is false."""
    from prometheus_client import start_http_server

    from certqueue.errors import ConfigError

    settings = get_settings()
    if not settings.monitoring.enabled:
        raise ConfigError("monitoring is disabled (monitoring.enabled: false)", key="monitoring.enabled")
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


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (``certqueue metrics``; main thread only). Installed
    before the port opens: as PID 1 a process without a handler ignores SIGTERM."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    return stop
