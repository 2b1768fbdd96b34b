"""Alerting rules: ``promtool check rules``, ``promtool test rules`` (a firing and a non-firing case
for every alert), ``promtool check config``, and the rules' expressions use served metric names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from certqueue import metrics
from tests.unit.test_grafana import promql_names, served  # noqa: F401  (served is a fixture)

PROM = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
#: the guide's alerts: names and severities kept; expressions on the certqueue_ names (seconds)
GUIDE_ALERTS = {
    "CertificateExpired": ("critical", "0m"),
    "CertificateExpiringSoon": ("warning", "1h"),
    "CertificateRenewalFailure": ("critical", "5m"),
}
OURS = {
    "CertificateRenewalOverdue",
    "CertificateRegionStalled",
    "CertificateQueueBacklog",
    "CertificateQueueStalled",
    "CertificateBrokerDown",
    "CertificateDatabaseDown",
    "CertificateValidationErrors",
    "CertificateExporterDown",
    "CertificateDriftCheckFailing",
    "CertificateRemovalFailing",
}
RUNBOOKS = PROM.parents[1] / "docs" / "runbooks.md"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CERTQUEUE_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def rules() -> dict[str, dict]:
    doc = yaml.safe_load((PROM / "alerting_rules.yml").read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_guide_alerts_are_kept() -> None:
    found = rules()
    assert set(found) == set(GUIDE_ALERTS) | OURS
    for name, (severity, for_) in GUIDE_ALERTS.items():
        assert found[name]["labels"]["severity"] == severity
        assert found[name]["for"] == for_
    # the guide's "< 30 days" fired for every healthy 45- and 6-day certificate: a lifetime share now
    assert "certqueue_certificate_not_before_timestamp_seconds" in found["CertificateExpiringSoon"]["expr"]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def test_every_alert_links_a_runbook_section() -> None:
    anchors = _anchors(RUNBOOKS.read_text())
    for name, rule in rules().items():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/runbooks.md", f"{name}: {url}"
        assert anchor == name.lower() and anchor in anchors, (
            f"{name}: no section #{anchor} in docs/runbooks.md"
        )


def test_recording_rules_give_the_guide_names() -> None:
    doc = yaml.safe_load((PROM / "recording_rules.yml").read_text())
    recorded = {r["record"] for g in doc["groups"] for r in g["rules"]}
    assert recorded == set(metrics.GUIDE_ALIASES) - {"certificate_expiry_days"}
    res = subprocess.run(
        [promtool(), "check", "rules", str(PROM / "recording_rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    doc = yaml.safe_load((PROM / "alerting_rules_test.yml").read_text())
    firing, quiet = set(), set()
    for t in doc["tests"]:
        for case in t["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert firing == quiet == set(rules())


def test_rule_expressions_use_served_metrics(served: set[str]) -> None:  # noqa: F811
    for name, rule in rules().items():
        unknown = promql_names(rule["expr"]) - served
        assert not unknown, f"{name} uses {sorted(unknown)}"


def test_promtool_check_rules() -> None:
    res = subprocess.run(
        [promtool(), "check", "rules", str(PROM / "alerting_rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules())} rules found" in res.stdout


def test_promtool_test_rules() -> None:
    res = subprocess.run(
        [promtool(), "test", "rules", "alerting_rules_test.yml"],
        cwd=PROM,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_check_config() -> None:
    res = subprocess.run(
        [promtool(), "check", "config", "prometheus.yml"],
        cwd=PROM,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_broken_rules_fail_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests can fail: a changed threshold breaks them."""
    for f in ("alerting_rules.yml", "alerting_rules_test.yml"):
        shutil.copy(PROM / f, tmp_path / f)
    rules_file = tmp_path / "alerting_rules.yml"
    rules_file.write_text(
        rules_file.read_text().replace("certqueue_broker_up == 0", "certqueue_broker_up == 1")
    )
    res = subprocess.run(
        [promtool(), "test", "rules", "alerting_rules_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "CertificateBrokerDown" in res.stdout + res.stderr
