"""The Grafana dashboard: valid JSON, the guide's panels present, and every PromQL expression refers
only to series the exporter actually serves (names taken from a real scrape of a populated database)."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from certqueue import events, metrics, migrate
from certqueue.config import load_settings, set_settings
from certqueue.db import dispose_all, session_scope
from certqueue.models import Certificate, Deployment, Issuance, RateBudget, utcnow
from tests.conftest_redis import process_redis_url

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "CertificateMonitoring.json"
RECORDING_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "recording_rules.yml"

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def promql_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions, keywords, labels, durations removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def test_promql_names() -> None:
    assert promql_names('sum by (le) (rate(x_bucket{le="1", a=~"b|c"}[5m])) / ignoring(le) y') == {
        "x_bucket",
        "y",
    }
    assert promql_names("bottomk(25, certificate_days_until_expiration) < 3 and on(region) z offset 5m") == {
        "certificate_days_until_expiration",
        "z",
    }
    assert promql_names("rate(m_total[$__rate_interval]) * 1e3") == {"m_total"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Every sample name of a scrape in which every family has data."""
    tmp = tmp_path_factory.mktemp("grafana")
    url = f"sqlite:///{tmp / 'g.db'}"
    set_settings(
        load_settings(
            overrides={"database.url": url, "broker.url": process_redis_url()}, directory=tmp, environ={}
        ).settings
    )
    migrate.upgrade(url)
    now = utcnow()
    with session_scope() as s:
        s.add(
            Certificate(
                id="cert_grafanaaaaaaaaaaaaa",
                domains=["g.example.com"],
                dedupe_key="g",
                state="ACTIVE",
                directory_url="",
            )
        )
        s.flush()
        s.add(
            Issuance(
                id=1,
                certificate_id="cert_grafanaaaaaaaaaaaaa",
                serial="1",
                not_before=now,
                not_after=now + dt.timedelta(days=9),
                cert_pem="",
                key_type="ec256",
                fingerprint="f",
            )
        )
        s.flush()
        s.get_one(Certificate, "cert_grafanaaaaaaaaaaaaa").current_issuance_id = 1
        s.add(
            Deployment(
                certificate_id="cert_grafanaaaaaaaaaaaaa",
                region="eu-west",
                provider="local",
                status="pending",
            )
        )
        s.add(RateBudget(key="orders:1", window_start=now, used=1, limit=300))
        for kind, data in (
            ("renewal", None),
            ("issuance", None),
            ("validation_error", {"type": "dns-01"}),
            ("propagation", {"region": "eu-west"}),
            ("removal", {"region": "eu-west"}),
            ("drift", {"region": "eu-west"}),
            ("drift_error", {"region": "eu-west", "count": 2}),
        ):
            events.record(s, "cert_grafanaaaaaaaaaaaaa", kind, reason="success", data=data)
    metrics.observe("certqueue_task_duration_seconds", ["certqueue.grafana"], 0.1)
    metrics.observe_acme_request("https://ca.example.test/dir", "https://ca.example.test/new-order", 0.1)
    metrics.flush()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.CertqueueCollector())
    text = generate_latest(registry).decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert "certqueue_queue_depth" in names  # the broker (real Redis) answered
    # what Prometheus adds: the recording rules' series (the guide's names) and the scrape's `up`
    recording = yaml.safe_load((RECORDING_RULES).read_text())
    names |= {r["record"] for g in recording["groups"] for r in g["rules"]} | {"up"}
    yield names
    dispose_all()
    set_settings(None)


def _panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in items:
        yield p
        yield from _panels(p.get("panels", []))


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] == "Certificate Monitoring" and dash["uid"]
    panels = list(_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in (
        "days until expiration",
        "renewal",
        "validation errors",
        "propagation",
        "inventory",
        "queue depth",
    ):
        assert wanted in titles, wanted
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0


def test_every_expression_uses_served_metrics(served: set[str]) -> None:
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for p in _panels(dash["panels"]):
        for t in p["targets"]:
            names = promql_names(t["expr"])
            assert names, (p["title"], t["expr"])
            unknown = names - served
            assert not unknown, (
                f"panel {p['title']!r} uses {sorted(unknown)} which the exporter does not serve"
            )
            used |= names
    # the guide's families are all on the dashboard, by their certqueue_ names
    assert {
        "certqueue_certificate_expiration_timestamp_seconds",
        "certqueue_renewals_total",
        "certqueue_validation_errors_total",
        "certqueue_propagations_total",
        "certqueue_certificates",
        "certqueue_queue_depth",
    } <= used


def test_job_and_region_variables_and_a_fleet_expiry_heatmap() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "job", "region"} <= set(variables)
    assert "certqueue_build_info" in variables["job"]["definition"]
    panels = list(_panels(dash["panels"]))
    for p in panels:  # every query is scoped to the chosen jobs
        for t in p["targets"]:
            assert 'job=~"$job"' in t["expr"], (p["title"], t["expr"])
    regional = [t["expr"] for p in panels for t in p["targets"] if "region" in t["expr"]]
    assert regional and all('region=~"$region"' in e for e in regional if "by (region" in e or "oldest" in e)
    (heat,) = [p for p in panels if p["type"] == "heatmap"]
    assert heat["targets"][0]["format"] == "heatmap"
    assert promql_names(heat["targets"][0]["expr"]) == {"certqueue_certificate_expiry_seconds_bucket"}


def test_a_typo_would_be_caught(served: set[str]) -> None:
    assert promql_names("certificate_days_until_expiry") - served == {"certificate_days_until_expiry"}
