"""The ``certqueue`` command line through click's CliRunner, on a temp SQLite database and a
filesystem broker in tmp (messages are files: what a command enqueued is counted, no worker runs).

Every command: its happy path, and its bad-input path (exit 2, one error line, nothing written)."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import func, select

from certqueue import certificates, crypto, events
from certqueue.celery_app import lazy_app
from certqueue.cli import main
from certqueue.config import get_settings, set_settings
from certqueue.db import dispose_all, session_scope
from certqueue.keystore import generate_key_file
from certqueue.metrics import queue_depths
from certqueue.models import ApiToken, Certificate, Event, RateBudget, RuntimeSetting, State, utcnow
from certqueue.tokens import verify_token
from tests.conftest_db import make_cert_pem


@dataclass
class Cli:
    tmp: Path
    db_url: str
    runner: CliRunner

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return self.runner.invoke(main, list(args), env=env, catch_exceptions=False)

    def ok(self, *args: str) -> Result:
        r = self(*args)
        assert r.exit_code == 0, (r.exit_code, r.output)
        return r

    def json(self, *args: str) -> Any:
        r = self.runner.invoke(main, [*args, "--json"], catch_exceptions=False)
        assert r.exit_code == 0, (r.exit_code, r.output)
        return json.loads(r.stdout)

    def depth(self, queue: str) -> int:
        depths = queue_depths(get_settings())
        assert depths is not None
        return depths[queue]

    def requests(self) -> int:
        """Open intents: requests recorded and waiting for dispatch."""
        from certqueue.intents import OPEN
        from certqueue.models import Intent

        with session_scope(write=False) as s:
            return int(
                s.execute(
                    select(func.count()).select_from(Intent).where(Intent.status.in_(OPEN))
                ).scalar_one()
            )

    def messages(self) -> int:
        depths = queue_depths(get_settings())
        assert depths is not None
        return sum(depths.values())


def rows(model: Any) -> int:
    with session_scope(write=False) as s:
        return int(s.execute(select(func.count()).select_from(model)).scalar_one())


def assert_one_line_error(r: Result, code: int, *needles: str) -> None:
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:"), lines
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], lines[0]


def cli_session(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, **extra_env: str
) -> Iterator[Cli]:
    """A CLI on ``db_url`` with its own settings folder, key file and embedded broker (no other
    CERTQUEUE_ variable from the outside); ``extra_env`` adds or overrides settings. For fixtures:
    ``yield from cli_session(...)``."""
    for var in list(os.environ):
        if var.startswith("CERTQUEUE_"):
            monkeypatch.delenv(var)
    (tmp_path / "settings").mkdir()
    key = tmp_path / "master.key"
    generate_key_file(key)
    env = {
        "CERTQUEUE_SETTINGS_DIR": str(tmp_path / "settings"),
        "CERTQUEUE_DATABASE__URL": db_url,
        "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(key),
        "CERTQUEUE_BROKER__FILESYSTEM_PATH": str(tmp_path / "broker"),
        "CERTQUEUE_ACME__EMAIL": "ops@example.com",
        "CERTQUEUE_LOGGING__LEVEL": "WARNING",
        "CERTQUEUE_RUNTIME_TTL_SECONDS": "0",
        **extra_env,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from certqueue import cli_output

    monkeypatch.setattr(cli_output, "console", cli_output._LazyConsole(width=200))  # tables unwrapped
    dispose_all()
    certificates.forget_keystores()
    lazy_app.reset()
    c = Cli(tmp=tmp_path, db_url=db_url, runner=CliRunner())
    c.ok("config", "show", "--json")  # installs the settings (configure) for the checks below
    yield c
    lazy_app.reset()
    set_settings(None)
    dispose_all()
    certificates.forget_keystores()


@pytest.fixture
def cli(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    regions = [{"name": "edge", "provider": "local", "path": str(tmp_path / "edge")}]
    yield from cli_session(
        tmp_path, sqlite_url, monkeypatch, CERTQUEUE_MULTI_REGION__REGIONS=json.dumps(regions)
    )


def active_certificate(domains: tuple[str, ...] = ("active.example.com",)) -> tuple[str, bytes]:
    """An ACME-managed certificate in ACTIVE with a served issuance (self-signed: no CA runs here)."""
    leaf, key = make_cert_pem(domains, days=90)
    with session_scope() as s:
        cert, _ = certificates.create_certificate(
            s, certificates.CertificateRequest.build(domains=list(domains)), actor="test"
        )
        events.transition(s, cert, State.ISSUING)
        iss = certificates.store_issuance(s, cert, leaf, key)
        events.transition(s, cert, State.ISSUED)
        certificates.activate(s, cert, iss, reason="test")
        return cert.id, key


def import_file(cli: Cli, domains: tuple[str, ...] = ("imported.example.com",)) -> str:
    leaf, key = make_cert_pem(domains, days=30)
    (cli.tmp / "c.pem").write_text(leaf)
    (cli.tmp / "k.pem").write_bytes(key)
    r = cli.ok("import", "--cert", str(cli.tmp / "c.pem"), "--key", str(cli.tmp / "k.pem"))
    return r.stdout.split()[-1]


# --- config ---------------------------------------------------------------------------------------


def test_config_show_json_table_and_masked_secrets(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTQUEUE_ACME__EAB_HMAC_KEY", "very-secret-hmac")
    data = cli.json("config", "show")
    assert data["automation.renewal_threshold_days"] == {"value": 30.0, "source": "default"}
    assert data["acme.email"]["source"] == "env CERTQUEUE_ACME__EMAIL"
    assert data["acme.eab_hmac_key"]["value"] == "**********"
    r = cli.ok("config", "show")
    assert "very-secret-hmac" not in r.output
    assert "automation.renewal_threshold_days" in r.output


def test_config_show_says_which_rate_limits_apply_to_each_ca(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 18: Let's Encrypt's budgets only for Let's Encrypt; another CA none unless configured."""
    monkeypatch.setenv("CERTQUEUE_ACME__DIRECTORY_URL", "https://pebble.test:14000/dir")
    monkeypatch.setenv(
        "CERTQUEUE_ACME__FALLBACK_DIRECTORY_URLS", '["https://acme-v02.api.letsencrypt.org/directory"]'
    )
    applied = cli.json("config", "show")["rate_limits.applied"]["value"]
    assert [(r["directory"], r["rules"]) for r in applied] == [
        ("https://pebble.test:14000/dir", "none"),
        ("https://acme-v02.api.letsencrypt.org/directory", "letsencrypt"),
    ]
    monkeypatch.setenv("CERTQUEUE_RATE_LIMITS__CA_RULES", '["https://pebble.test:14000/dir=letsencrypt"]')
    applied = cli.json("config", "show")["rate_limits.applied"]["value"]
    assert applied[0]["rules"] == "letsencrypt" and applied[0]["source"] == "rate_limits.ca_rules"
    assert applied[0]["limits"]["certs_per_domain"] == "50 per 7 days"
    r = cli.ok("config", "show")
    assert "client-side rate limits per CA" in r.output


def test_config_set_is_a_runtime_layer_below_the_environment(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = cli.ok("config", "set", "automation.renewal_threshold_days=45", "monitoring.alert_threshold_days=7")
    assert "automation.renewal_threshold_days = 45" in r.output
    data = cli.json("config", "show")
    assert data["automation.renewal_threshold_days"] == {"value": 45.0, "source": "runtime (database)"}
    assert data["monitoring.alert_threshold_days"]["value"] == 7.0
    monkeypatch.setenv("CERTQUEUE_AUTOMATION__RENEWAL_THRESHOLD_DAYS", "20")
    data = cli.json("config", "show")
    assert data["automation.renewal_threshold_days"]["value"] == 20.0  # the environment wins
    monkeypatch.delenv("CERTQUEUE_AUTOMATION__RENEWAL_THRESHOLD_DAYS")
    cli.ok("config", "unset", "automation")
    data = cli.json("config", "show")
    assert data["automation.renewal_threshold_days"] == {"value": 30.0, "source": "default"}
    assert data["monitoring.alert_threshold_days"]["value"] == 7.0


@pytest.mark.parametrize(
    ("assignment", "needle"),
    [
        ("database.url=sqlite:///elsewhere.db", "cannot be changed at runtime"),
        ("automation.renewal_threshold_days=-3", "automation.renewal_threshold_days"),
        ("automation.no_such_key=1", "unknown key"),
        ("acme.eab_hmac_key=abc", "credentials"),
        ("novalue", "KEY=VALUE"),
    ],
)
def test_config_set_bad_input_stores_nothing(cli: Cli, assignment: str, needle: str) -> None:
    r = cli("config", "set", "monitoring.alert_threshold_days=3", assignment)
    assert_one_line_error(r, 2, needle)
    assert rows(RuntimeSetting) == 0


def test_db_upgrade_on_a_fresh_database(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{cli.tmp / 'fresh.db'}"
    monkeypatch.setenv("CERTQUEUE_DATABASE__URL", url)
    dispose_all()
    r = cli.ok("db", "upgrade")  # the runtime layer is read before the table exists: no error
    assert "revision" in r.output
    assert cli.json("config", "show")["database.url"]["value"] == url


# --- issue, list, show ----------------------------------------------------------------------------


def test_issue_writes_the_row_and_enqueues_it(cli: Cli) -> None:
    out = cli.json("issue", "www.example.com", "example.com", "--key-type", "rsa2048")
    cid = out["certificate_id"]
    assert out["created"] is True
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        assert c is not None and c.state == State.REQUESTED and c.key_type == "rsa2048"
        assert sorted(c.domains) == ["example.com", "www.example.com"]
    assert cli.requests() == 1
    assert cli.depth("scan") == 1  # the nudge: dispatch relays the request
    again = cli.json("issue", "example.com", "www.example.com", "--key-type", "rsa2048")
    assert again == {"certificate_id": cid, "created": False}  # one certificate per set of names
    assert cli.requests() == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bad..name.example.com"], "bad..name.example.com"),
        (["*.example.com"], "dns-01"),
        (["ok.example.com", "--region", "mars"], "unknown region"),
        (["ok.example.com", "--email", "not-an-email"], "not-an-email"),
        (["ok.example.com", "--challenge", "dns-01"], "dns_provider"),
    ],
)
def test_issue_bad_input_writes_and_sends_nothing(cli: Cli, args: list[str], needle: str) -> None:
    assert_one_line_error(cli("issue", *args), 2, needle)
    assert rows(Certificate) == 0 and rows(Event) == 0
    assert cli.messages() == 0 and cli.requests() == 0


def _request_file(cli: Cli, n: int, bad: dict[int, str]) -> Path:
    lines = []
    for i in range(1, n + 1):
        lines.append(bad.get(i, f"h{i}.bulk.example.com www.h{i}.bulk.example.com --key-type ec384"))
    path = cli.tmp / "names.txt"
    path.write_text("# one certificate per line\n" + "\n".join(lines) + "\n")
    return path


BAD_LINES = {
    17: "not..a..name.bulk.example.com",
    503: "ok503.bulk.example.com --region mars",
    999: "*.wild.bulk.example.com",  # a wildcard needs dns-01
}


def test_issue_from_file_creates_the_good_lines_in_one_go_and_names_the_bad(cli: Cli) -> None:
    path = _request_file(cli, 1000, BAD_LINES)
    r = cli("issue", "--from-file", str(path), "--json")
    assert r.exit_code == 2, r.output
    out = json.loads(r.stdout)
    # the file's first line is a comment: certificate line i is file line i + 1
    assert [e["line"] for e in out["errors"]] == [n + 1 for n in sorted(BAD_LINES)]
    assert "mars" in out["errors"][1]["message"] and "dns-01" in out["errors"][2]["message"]
    assert len(out["certificates"]) == 997 and all(c["created"] for c in out["certificates"])
    assert rows(Certificate) == 997 and cli.requests() == 997
    assert cli.depth("scan") == 1  # one dispatch nudge for the whole set
    with session_scope(write=False) as s:
        assert {c.key_type for c in s.execute(select(Certificate)).scalars()} == {"ec384"}
    # the same file again: nothing new, the existing certificates are named
    again = json.loads(cli("issue", "--from-file", str(path), "--json").stdout)
    assert not any(c["created"] for c in again["certificates"]) and rows(Certificate) == 997


def test_issue_from_file_is_one_transaction(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from certqueue import certificates as certs

    real = certs.create_certificate
    calls = {"n": 0}

    def create(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("the database went away")
        return real(*args, **kw)

    monkeypatch.setattr(certs, "create_certificate", create)
    path = _request_file(cli, 50, {})
    r = cli.runner.invoke(main, ["issue", "--from-file", str(path)])
    assert r.exit_code != 0
    assert rows(Certificate) == 0 and rows(Event) == 0 and cli.requests() == 0  # all or nothing


def test_issue_from_file_bad_input(cli: Cli) -> None:
    (cli.tmp / "one.txt").write_text("a.example.com\n")
    assert_one_line_error(
        cli("issue", "x.example.com", "--from-file", str(cli.tmp / "one.txt")), 2, "not both"
    )
    assert_one_line_error(cli("issue"), 2, "--from-file")
    (cli.tmp / "opts.txt").write_text("a.example.com --colour blue\nb.example.com --region\n")
    r = cli("issue", "--from-file", str(cli.tmp / "opts.txt"))
    assert (
        r.exit_code == 2
        and "line 1: unknown option --colour" in r.output
        and "line 2: --region needs" in r.output
    )
    assert rows(Certificate) == 0


def test_list_and_show(cli: Cli) -> None:
    cid, _ = active_certificate(("shown.example.com",))
    listed = cli.json("list")
    assert [r["id"] for r in listed] == [cid] and listed[0]["state"] == "ACTIVE"
    assert cli.json("list", "--state", "revoked") == []
    assert [r["id"] for r in cli.json("list", "--domain", "shown.example.com")] == [cid]
    table = cli.ok("list").output
    assert cid in table and "ACTIVE" in table
    shown = cli.json("show", cid)
    assert shown["id"] == cid and len(shown["issuances"]) == 1
    assert [e["to"] for e in reversed(shown["events"]) if e["kind"] == "transition"] == [
        "ISSUING",
        "ISSUED",
        "ACTIVE",
    ]
    assert "PRIVATE KEY" not in cli.ok("show", cid).output


def test_show_unknown_and_malformed_ids(cli: Cli) -> None:
    assert_one_line_error(cli("show", "cert_" + "a" * 20), 3, "no certificate")
    assert_one_line_error(cli("show", "nope"), 2, "not a certificate id")


# --- import, renew, revoke, propagate, scan -------------------------------------------------------


def test_import_activates_at_once_without_regions(cli: Cli) -> None:
    cid = import_file(cli)
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        assert c is not None and c.state == State.ACTIVE and c.external and c.renew_at is None
    assert cli.messages() == 0


def test_import_mismatched_key_writes_nothing(cli: Cli) -> None:
    leaf, _ = make_cert_pem(("a.example.com",))
    _, other_key = make_cert_pem(("a.example.com",))
    (cli.tmp / "c.pem").write_text(leaf)
    (cli.tmp / "k.pem").write_bytes(other_key)
    r = cli("import", "--cert", str(cli.tmp / "c.pem"), "--key", str(cli.tmp / "k.pem"))
    assert_one_line_error(r, 2, "does not match")
    assert rows(Certificate) == 0


def test_renew_enqueues_and_refuses_what_it_cannot_renew(cli: Cli) -> None:
    cid, _ = active_certificate()
    r = cli.ok("renew", cid, "--force")
    assert "renewal requested for 1" in r.output
    assert cli.requests() == 1
    imported = import_file(cli)
    assert_one_line_error(cli("renew", imported), 2, "imported")
    assert_one_line_error(cli("renew", "cert_" + "b" * 20), 3)
    assert cli.requests() == 1


def test_tables_piped_are_tab_separated_lines_with_every_value_whole(cli: Cli) -> None:
    long_name = "a-name-long-enough-to-fold-in-a-drawn-table.example.com"
    cid, _ = active_certificate((long_name,))
    lines = cli.ok("list").output.splitlines()  # CliRunner's stdout is not a terminal
    assert lines[0] == "certificates (1)"
    assert lines[1].split("\t") == ["id", "state", "expires", "names"]
    row = lines[2].split("\t")
    assert [row[0], row[1], row[3]] == [cid, "ACTIVE", long_name]  # no markup, no folding, no box drawing
    assert not any(ch in cli.ok("list").output for ch in "│┃━─")
    setting = [line for line in cli.ok("config", "show").output.splitlines() if "renewal_threshold" in line]
    assert setting == ["automation.renewal_threshold_days\t30\tdefault"]


def test_renew_with_no_ids_renews_what_is_due(cli: Cli) -> None:
    due, _ = active_certificate(("due.example.com",))
    not_due, _ = active_certificate(("not-due.example.com",))
    manual, _ = active_certificate(("manual.example.com",))
    imported = import_file(cli, ("imported-due.example.com",))
    past = utcnow() - dt.timedelta(hours=1)
    with session_scope() as s:
        for cid in (due, manual, imported):
            c = s.get(Certificate, cid)
            assert c is not None
            c.renew_at = past
        c = s.get(Certificate, manual)
        assert c is not None
        c.auto_renew = False
    assert_one_line_error(cli("renew", "--force"), 2, "name the certificates")
    assert cli.requests() == 0
    # due: ACTIVE, renewed automatically, issued here, its time reached (what the scan claims)
    assert cli.json("renew") == {"requested": [due], "not_due": []}
    assert cli.requests() == 1
    del not_due


def test_revoke_checks_the_reason_before_sending(cli: Cli) -> None:
    cid, _ = active_certificate()
    assert_one_line_error(cli("revoke", cid, "--reason", "affiliationChanged"), 2, "does not accept")
    assert_one_line_error(cli("revoke", cid, "--reason", "because"), 2, "unknown revocation reason")
    assert cli.messages() == 0
    assert "revocation of" in cli.ok("revoke", cid, "--reason", "keyCompromise").output
    assert cli.requests() == 1


def test_propagate(cli: Cli) -> None:
    cid, _ = active_certificate()
    out = cli.json("propagate", cid, "--region", "edge")
    assert out["regions"] == ["edge"] and out["task_id"]
    assert cli.requests() == 1
    assert_one_line_error(cli("propagate", cid, "--region", "mars"), 2, "unknown region")
    assert_one_line_error(cli("propagate", cid), 2, "no regions")  # multi_region is not enabled
    assert cli.requests() == 1


def test_scan_enqueues_the_periodic_scans(cli: Cli) -> None:
    cli.ok("scan")
    assert cli.depth("scan") == 2
    out = cli.json("scan")
    assert set(out["queued"]) == {"certqueue.scan.due", "certqueue.scan.expire"}
    assert all(out["queued"].values()) and cli.depth("scan") == 4


def test_renew_revoke_and_import_answer_in_json(cli: Cli) -> None:
    cid, _ = active_certificate(("json.example.com",))
    not_due, _ = active_certificate(("json-not-due.example.com",))
    out = cli.json("renew", cid, "--force")
    assert out == {"requested": [cid], "not_due": []}
    out = cli.json("renew", not_due)
    assert out == {"requested": [], "not_due": [not_due]}
    assert cli.requests() == 1
    out = cli.json("revoke", cid, "--reason", "superseded")
    assert out["certificate_id"] == cid and out["requested"] is True and out["reason"] == "superseded"
    assert out["job_id"].startswith("intent-")
    leaf, key = make_cert_pem(("json-imported.example.com",), days=30)
    (cli.tmp / "c.pem").write_text(leaf)
    (cli.tmp / "k.pem").write_bytes(key)
    out = cli.json("import", "--cert", str(cli.tmp / "c.pem"), "--key", str(cli.tmp / "k.pem"))
    assert out["state"] == "ACTIVE" and out["regions"] == []
    with session_scope(write=False) as s:
        c = s.get(Certificate, out["certificate_id"])
        assert c is not None and c.state == State.ACTIVE and c.external


# --- export ---------------------------------------------------------------------------------------


def test_export_pem_is_private_and_holds_the_matching_key(cli: Cli) -> None:
    cid, key = active_certificate(("export.example.com",))
    out = cli.tmp / "bundle.pem"
    cli.ok("export", cid, "--format", "pem", "--out", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    text = out.read_text()
    assert crypto.private_key_to_pem(crypto.load_private_key(text)) == crypto.private_key_to_pem(
        crypto.load_private_key(key)
    )
    from cryptography import x509

    leaf = x509.load_pem_x509_certificates(text.encode())[0]
    assert crypto.key_matches_certificate(key, crypto.cert_to_pem(leaf))
    assert list(crypto.cert_info(leaf).names) == ["export.example.com"]
    # no overwrite without --force: the file is left as it was
    out.write_text("keep me")
    assert_one_line_error(cli("export", cid, "--out", str(out)), 2, "--force")
    assert out.read_text() == "keep me"
    cli.ok("export", cid, "--out", str(out), "--force")
    assert "PRIVATE KEY" in out.read_text() and stat.S_IMODE(out.stat().st_mode) == 0o600


def test_export_pkcs12_parses_with_the_password(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    cid, key = active_certificate(("pfx.example.com",))
    monkeypatch.setenv("PFX_PASSWORD", "correct horse")
    out = cli.tmp / "bundle.p12"
    cli.ok("export", cid, "--format", "pkcs12", "--out", str(out), "--password-env", "PFX_PASSWORD")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    pkey, cert, _extra = pkcs12.load_key_and_certificates(out.read_bytes(), b"correct horse")
    assert pkey is not None and cert is not None
    assert pkey.public_key() == crypto.load_private_key(key).public_key()
    assert list(crypto.cert_info(cert).names) == ["pfx.example.com"]
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(out.read_bytes(), b"wrong")


def test_export_bad_input(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    cid, _ = active_certificate()
    out = cli.tmp / "x.p12"
    monkeypatch.setenv("EMPTY_PW", "")
    assert_one_line_error(
        cli("export", cid, "--format", "pkcs12", "--out", str(out), "--password-env", "EMPTY_PW"), 2, "empty"
    )
    assert_one_line_error(cli("export", cid, "--out", str(cli.tmp / "no" / "dir.pem")), 2, "not a directory")
    assert_one_line_error(cli("export", "cert_" + "c" * 20, "--out", str(out)), 3)
    assert not out.exists()
    with session_scope() as s:
        cert, _ = certificates.create_certificate(
            s, certificates.CertificateRequest.build(domains=["pending.example.com"])
        )
        pending = cert.id
    assert_one_line_error(cli("export", pending, "--out", str(out)), 3, "no issued certificate")
    assert not out.exists()


# --- tokens ---------------------------------------------------------------------------------------


def test_tokens_round_trip(cli: Cli) -> None:
    made = cli.json("tokens", "create", "deployer", "--scope", "write")
    token, tid = made["token"], made["id"]
    assert made["scopes"] == ["write"]
    with session_scope(write=False) as s:
        assert verify_token(s, token) is not None
    listed = cli.json("tokens", "list")
    assert [t["id"] for t in listed] == [tid]
    assert token not in json.dumps(listed) and token not in cli.ok("tokens", "list").output
    plain = cli.ok("tokens", "create", "reader")
    assert plain.stdout.strip().startswith("cqt_")  # stdout holds only the token, for scripts
    assert "shown once" in plain.stderr
    cli.ok("tokens", "revoke", tid)
    with session_scope(write=False) as s:
        assert verify_token(s, token) is None
    assert [t["id"] for t in cli.json("tokens", "list")] != [tid]
    assert tid in [t["id"] for t in cli.json("tokens", "list", "--all")]


def test_tokens_bad_input(cli: Cli) -> None:
    assert_one_line_error(cli("tokens", "create", "   "), 2, "name")
    assert rows(ApiToken) == 0
    assert_one_line_error(cli("tokens", "revoke", "tok_0000"), 3, "no API token")
    r = cli("tokens", "create", "x", "--scope", "root")
    assert r.exit_code == 2 and rows(ApiToken) == 0


# --- status ---------------------------------------------------------------------------------------


def test_status(cli: Cli) -> None:
    active_certificate(("one.example.com",))
    with session_scope() as s:
        s.add(RateBudget(key="orders:acct1", window_start=utcnow(), used=3, limit=300))
        due = s.execute(select(Certificate)).scalars().one()
        due.renew_at = utcnow()
    cli.ok("scan")
    data = cli.json("status")
    assert data["states"]["ACTIVE"] == 1 and data["states"]["FAILED"] == 0
    assert data["due"] == 1
    assert data["health"]["status"] == "healthy" and data["health"]["total"] == 1
    assert data["rate_limits"] == [{"key": "orders:acct1", "used": 3, "limit": 300.0, "blocked_until": None}]
    assert data["queues"]["scan"] == 2 and data["broker"] == "up"
    text = cli.ok("status").output
    assert "orders:acct1" in text and "healthy" in text
    assert cli("status", "--due-within", "soon").exit_code == 2


# --- long-running servers -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_until(args: list[str], url: str, cwd: Path) -> httpx.Response:
    proc = subprocess.Popen(
        [sys.executable, "-m", "certqueue", *args],
        cwd=cwd,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                return httpx.get(url, timeout=2)
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        proc.stderr.read().decode() if proc.stderr else "no output"
                    ) from None
                time.sleep(0.2)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_metrics_and_serve_answer_on_loopback(cli: Cli) -> None:
    active_certificate(("metrics.example.com",))
    port = _free_port()
    r = _run_until(
        ["metrics", "--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}/metrics", cli.tmp
    )
    assert r.status_code == 200 and "certqueue_certificate_expiration_timestamp_seconds{" in r.text
    port = _free_port()
    r = _run_until(
        ["serve", "--host", "127.0.0.1", "--port", str(port)],
        f"http://127.0.0.1:{port}/health/certificates",
        cli.tmp,
    )
    assert r.status_code == 200 and r.json()["total"] == 1


def test_a_database_without_tables_says_run_db_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wrong working directory (or no migration yet): one line that says what to do, exit 2,
    not a page of SQL."""
    empty = tmp_path / "elsewhere.db"
    monkeypatch.setenv("CERTQUEUE_SETTINGS_DIR", str(tmp_path / "no-settings"))
    monkeypatch.setenv("CERTQUEUE_RUNTIME_TTL_SECONDS", "0")
    dispose_all()
    result = CliRunner().invoke(main, ["--database", f"sqlite:///{empty}", "list"])
    dispose_all()
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "has no certqueue tables: run `certqueue db upgrade`" in lines[0], (
        result.output
    )
    assert "SELECT" not in result.output
    assert not empty.exists()  # nothing left behind for the next command to trip on
    # a database file that was there before is never removed, with or without tables
    empty.write_bytes(b"")
    dispose_all()
    result = CliRunner().invoke(main, ["--database", f"sqlite:///{empty}", "list"])
    dispose_all()
    assert result.exit_code == 2 and empty.exists()


def test_every_command_and_option_says_what_it_does() -> None:
    import click

    missing: list[str] = []

    def walk(cmd: click.Command, path: str) -> None:
        if not (cmd.help or cmd.short_help):
            missing.append(path)
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden and not p.help:
                missing.append(f"{path} {p.opts[0]}")
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")

    walk(main, "certqueue")
    assert missing == []


def test_a_missing_extra_is_one_line_that_says_what_to_install(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from certqueue import inventory

    def needs_boto3(*_a: Any, **_kw: Any) -> Any:
        raise ModuleNotFoundError("No module named 'boto3'", name="boto3")

    monkeypatch.setattr(inventory, "list_certificates", needs_boto3)
    assert_one_line_error(cli("list"), 2, "pip install 'certqueue[aws]'")
