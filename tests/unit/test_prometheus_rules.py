"""Alerting rules: ``promtool check rules``, ``promtool test rules`` (a firing and a non-firing case
for every alert), ``promtool check config``, and the rules' expressions use served metric names."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.test_grafana import promql_names, served  # noqa: F401  (served is a fixture)

PROM = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
GUIDE_ALERTS = {
    "CertificateExpired": ("certificate_days_until_expiration < 0", "critical", "0m"),
    "CertificateExpiringSoon": ("certificate_days_until_expiration < 30", "warning", "1h"),
    "CertificateRenewalFailure": (
        'rate(certificate_renewal_total{status="failure"}[5m]) > 0',
        "critical",
        "5m",
    ),
}
OURS = {
    "CertificateRegionStalled",
    "CertificateQueueBacklog",
    "CertificateBrokerDown",
    "CertificateValidationErrors",
}


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
    for name, (expr, severity, for_) in GUIDE_ALERTS.items():
        assert found[name]["expr"] == expr
        assert found[name]["labels"]["severity"] == severity
        assert found[name]["for"] == for_
        assert (
            "{{ $labels.domain }}" in found[name]["annotations"]["summary"]
            or name == "CertificateRenewalFailure"
        )


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
    assert "SUCCESS: 7 rules found" in res.stdout


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
