"""``certqueue adopt`` (certqueue.adopt): reading certbot directories and kubectl's JSON (no
database), then the command through click's CliRunner on SQLite and PostgreSQL: rows written,
ACTIVE, renewal scheduled, the key stored encrypted and equal to the original, bad items named and
written for nothing, ``--dry-run`` writing nothing."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from certqueue import adopt, certificates, crypto
from certqueue.cli import main
from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.errors import InvalidInput
from certqueue.lifecycle import renewal
from certqueue.models import Certificate, Event, Intent, Issuance, State
from tests.conftest_db import make_cert_pem
from tests.unit.cli.test_cli import Cli, cli_session, rows
from tests.unit.test_certificates import _ca, _signed_leaf

LE = "https://acme-v02.api.letsencrypt.org/directory"
PEBBLE = "https://pebble.test:14000/dir"

WEBROOT_CONF = """\
# renew_before_expiry = 30 days
version = 2.11.0
archive_dir = {d}/archive/{name}
cert = {d}/live/{name}/cert.pem
privkey = {d}/live/{name}/privkey.pem
chain = {d}/live/{name}/chain.pem
fullchain = {d}/live/{name}/fullchain.pem

# Options used in the renewal process
[renewalparams]
account = 0123456789abcdef0123456789abcdef
authenticator = webroot
webroot_path = /var/www/html,
server = {server}
key_type = ecdsa
elliptic_curve = secp256r1
[[webroot_map]]
{name} = /var/www/html
"""

DNS_CONF = """\
version = 2.11.0
archive_dir = {d}/archive/{name}
cert = {d}/live/{name}/cert.pem
privkey = {d}/live/{name}/privkey.pem
chain = {d}/live/{name}/chain.pem
fullchain = {d}/live/{name}/fullchain.pem

[renewalparams]
account = 0123456789abcdef0123456789abcdef
authenticator = dns-cloudflare
dns_cloudflare_credentials = /root/.secrets/cloudflare.ini
server = {server}
key_type = rsa
rsa_key_size = 2048
reuse_key = True
"""


def add_lineage(
    d: Path, name: str, conf: str, cert_pem: str, key_pem: str | bytes, chain_pem: str = "", server: str = LE
) -> None:
    """A lineage as certbot writes it: archive/<name>/*1.pem, live/<name>/* relative symlinks."""
    archive, live = d / "archive" / name, d / "live" / name
    archive.mkdir(parents=True)
    live.mkdir(parents=True)
    (d / "renewal").mkdir(exist_ok=True)
    key_text = key_pem.decode() if isinstance(key_pem, bytes) else key_pem
    files = {"cert": cert_pem, "chain": chain_pem, "fullchain": cert_pem + chain_pem, "privkey": key_text}
    for kind, text in files.items():
        (archive / f"{kind}1.pem").write_text(text)
        (live / f"{kind}.pem").symlink_to(Path("..", "..", "archive", name, f"{kind}1.pem"))
    (d / "renewal" / f"{name}.conf").write_text(conf.format(d=d, name=name, server=server))


def tls_secret(
    name: str, cert_pem: str, key_pem: str | bytes, annotations: dict[str, str] | None = None
) -> Any:
    key = key_pem if isinstance(key_pem, bytes) else key_pem.encode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": "shop", "annotations": annotations or {}},
        "data": {
            "tls.crt": base64.b64encode(cert_pem.encode()).decode(),
            "tls.key": base64.b64encode(key).decode(),
        },
    }


def kubectl_list(*items: Any) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(items), "metadata": {}})


# --- reading certbot (no database) --------------------------------------------------------------


def test_read_certbot_follows_live_symlinks_and_maps_webroot_and_dns_cloudflare(tmp_path: Path) -> None:
    ca, chain = _ca("Test Intermediate")
    leaf, key = _signed_leaf(("example.com", "www.example.com"), ca)
    wild, wild_key = _signed_leaf(("*.example.org", "example.org"), ca, rsa_bits=2048)
    add_lineage(tmp_path, "example.com", WEBROOT_CONF, leaf, key, chain)
    add_lineage(tmp_path, "example.org", DNS_CONF, wild, wild_key, chain)
    assert (tmp_path / "live" / "example.com" / "fullchain.pem").is_symlink()

    web, dns = adopt.read_certbot(tmp_path)  # name order

    assert (web.name, web.error) == ("example.com", None)
    assert web.fullchain_pem == leaf + chain and web.key_pem == key
    assert (web.challenge_type, web.dns_provider, web.directory_url) == ("http-01", None, LE)
    assert web.key_type == "ec256" and web.reuse_key is False
    assert any("webroot authenticator -> http-01" in n for n in web.notes)
    assert (dns.challenge_type, dns.dns_provider, dns.key_type, dns.reuse_key) == (
        "dns-01",
        "cloudflare",
        "rsa2048",
        True,
    )
    assert dns.notes == ("certbot plugin dns-cloudflare -> dns-01 with DNS provider cloudflare",)


def test_renewal_conf_reads_top_level_keys_params_and_the_webroot_map(tmp_path: Path) -> None:
    parsed = adopt.parse_renewal_conf(WEBROOT_CONF.format(d="/etc/letsencrypt", name="a.example", server=LE))
    assert parsed[""]["fullchain"] == "/etc/letsencrypt/live/a.example/fullchain.pem"
    assert parsed["renewalparams"]["authenticator"] == "webroot"
    assert parsed["renewalparams"]["server"] == LE
    assert parsed["webroot_map"] == {"a.example": "/var/www/html"}


@pytest.mark.parametrize(
    ("authenticator", "params", "challenge", "provider"),
    [
        ("webroot", {}, "http-01", None),
        ("standalone", {}, "http-01", None),
        ("nginx", {}, "http-01", None),
        ("apache", {}, "http-01", None),
        ("dns-cloudflare", {}, "dns-01", "cloudflare"),
        ("dns-route53", {}, "dns-01", "route53"),
        ("dns-rfc2136", {}, "dns-01", "rfc2136"),
        ("certbot-dns-route53:dns-route53", {}, "dns-01", "route53"),
        ("dns-ovh", {}, "dns-01", None),
        ("manual", {"pref_challs": "dns-01,"}, "dns-01", None),
        ("manual", {}, "http-01", None),
    ],
)
def test_challenge_for_each_certbot_authenticator(
    authenticator: str, params: dict[str, str], challenge: str, provider: str | None
) -> None:
    typ, prov, notes = adopt.challenge_for_authenticator(authenticator, params)
    assert (typ, prov) == (challenge, provider)
    assert notes
    if authenticator == "dns-ovh":
        assert "dns-ovh has no certqueue DNS provider" in notes[0]


def test_unknown_authenticator_and_unreadable_files_are_the_lineages_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="'fancy' has no certqueue equivalent"):
        adopt.challenge_for_authenticator("fancy", {})
    leaf, key = make_cert_pem(("gone.example.com",))
    add_lineage(tmp_path, "gone.example.com", WEBROOT_CONF, leaf, key)
    (tmp_path / "archive" / "gone.example.com" / "privkey1.pem").unlink()  # a dangling symlink now
    (cand,) = adopt.read_certbot(tmp_path)
    assert cand.error is not None and "cannot read privkey" in cand.error
    assert "privkey.pem (a link to ../../archive/gone.example.com/privkey1.pem)" in cand.error
    with pytest.raises(InvalidInput, match="names no authenticator"):
        adopt.challenge_for_authenticator("", {})
    with pytest.raises(InvalidInput, match="no certbot lineage"):
        adopt.read_certbot(tmp_path / "nothing-here")


# --- reading kubectl JSON (no database) ---------------------------------------------------------


def test_kubectl_list_with_a_good_and_a_bad_secret(tmp_path: Path) -> None:
    leaf, key = make_cert_pem(("shop.example.com",))
    good = tls_secret("shop-tls", leaf, key, {"cert-manager.io/issuer-name": "letsencrypt-prod"})
    bad = tls_secret("broken-tls", leaf, key)
    bad["data"]["tls.key"] = "not base64 at all!"
    first, second = adopt.read_kubectl_json(kubectl_list(good, bad))
    assert (first.name, first.error, first.challenge_type) == ("shop/shop-tls", None, "http-01")
    assert first.fullchain_pem == leaf and first.key_pem == key.decode()
    assert first.issuer_name == "letsencrypt-prod"
    assert second.name == "shop/broken-tls" and second.error == "data['tls.key'] is not base64 PEM"
    (single,) = adopt.read_kubectl_json(json.dumps(good))  # one Secret, not a List
    assert single.name == "shop/shop-tls"
    opaque = {**good, "type": "Opaque"}
    assert "not a kubernetes.io/tls Secret" in (adopt.read_kubectl_json(json.dumps(opaque))[0].error or "")
    with pytest.raises(InvalidInput, match="not JSON"):
        adopt.read_kubectl_json("apiVersion: v1")


@pytest.mark.parametrize(
    ("annotations", "challenge", "provider"),
    [
        ({}, "http-01", None),
        ({"acme.cert-manager.io/http01-ingress-class": "nginx"}, "http-01", None),
        ({"certqueue.io/challenge": "dns-01", "certqueue.io/dns-provider": "route53"}, "dns-01", "route53"),
        ({"certqueue.io/challenge": "tls-alpn-01"}, "tls-alpn-01", None),
    ],
)
def test_challenge_from_secret_annotations(
    annotations: dict[str, str], challenge: str, provider: str | None
) -> None:
    assert adopt.challenge_from_annotations(annotations)[:2] == (challenge, provider)


def test_unknown_challenge_annotation_is_refused() -> None:
    with pytest.raises(InvalidInput, match=re.escape("certqueue.io/challenge='dns-02'")):
        adopt.challenge_from_annotations({"certqueue.io/challenge": "dns-02"})


# --- plan: the checks before anything is written ------------------------------------------------


@pytest.fixture
def plan_settings(sqlite_url: str, settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory(
        database_url=sqlite_url,
        acme={"email": "ops@example.com", "directory_url": PEBBLE},
        issuers=[{"name": "letsencrypt", "directory_url": LE}],
    )


def test_plan_maps_the_server_to_a_configured_issuer_or_the_default_with_a_note(
    plan_settings: Settings,
) -> None:
    leaf, key = make_cert_pem(("plan.example.com",))
    cand = adopt.Candidate("certbot", "plan", leaf, key.decode(), "http-01", directory_url=LE + "/")
    p = adopt.plan(cand, plan_settings)
    assert (p.ca, p.request.directory_url, p.request.issuer) == ("letsencrypt", LE, "letsencrypt")
    other = adopt.plan(
        adopt.Candidate(
            "certbot", "plan", leaf, key.decode(), "http-01", directory_url="https://ca.test/dir"
        ),
        plan_settings,
    )
    assert other.ca == "default" and other.request.directory_url == PEBBLE
    assert any("https://ca.test/dir" in n and PEBBLE in n for n in other.notes)


def test_plan_refuses_wildcards_without_dns01_expired_and_mismatched_certificates(
    plan_settings: Settings,
) -> None:
    leaf, key = make_cert_pem(("*.wild.example.com",))
    with pytest.raises(InvalidInput, match=r"\*.wild.example.com: wildcard names need dns-01"):
        adopt.plan(adopt.Candidate("cert-manager", "ns/w", leaf, key.decode(), "http-01"), plan_settings)
    old, old_key = make_cert_pem(
        ("old.example.com",), days=30, not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    )
    with pytest.raises(InvalidInput, match="expired"):
        adopt.plan(adopt.Candidate("certbot", "old", old, old_key.decode(), "http-01"), plan_settings)
    _, other_key = make_cert_pem(("old.example.com",))
    with pytest.raises(InvalidInput, match="does not match"):
        adopt.plan(adopt.Candidate("certbot", "mix", leaf, other_key.decode(), "dns-01"), plan_settings)
    bad, bad_key = make_cert_pem(("bad_name!.example.com",))
    with pytest.raises(InvalidInput, match="bad_name"):
        adopt.plan(adopt.Candidate("certbot", "bad", bad, bad_key.decode(), "http-01"), plan_settings)
    no_provider = adopt.Candidate(
        "certbot",
        "ovh",
        leaf,
        key.decode(),
        "dns-01",
        notes=("certbot plugin dns-ovh has no certqueue DNS provider",),
    )
    with pytest.raises(InvalidInput, match=r"dns-01 needs a dns_provider.*dns-ovh"):
        adopt.plan(no_provider, plan_settings)


# --- the command, on both databases -------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """tests/unit/cli/test_cli.py's CLI on ``db_url`` (SQLite and PostgreSQL), renewal jitter off."""
    yield from cli_session(
        tmp_path,
        db_url,
        monkeypatch,
        CERTQUEUE_ACME__DIRECTORY_URL=PEBBLE,
        CERTQUEUE_ISSUERS=json.dumps([{"name": "letsencrypt", "directory_url": LE}]),
        CERTQUEUE_AUTOMATION__RENEWAL_JITTER="0",
    )


def certbot_dir(tmp: Path) -> tuple[Path, dict[str, str]]:
    """Two good lineages (webroot; dns-cloudflare with a wildcard), one whose key is another's,
    one expired. Returns the directory and the good lineages' keys by first name."""
    d = tmp / "letsencrypt"
    ca, chain = _ca("Test Intermediate")
    leaf, key = _signed_leaf(("example.com", "www.example.com"), ca)
    wild, wild_key = _signed_leaf(("*.example.org", "example.org"), ca, rsa_bits=2048)
    add_lineage(d, "example.com", WEBROOT_CONF, leaf, key, chain)
    add_lineage(d, "example.org", DNS_CONF, wild, wild_key, chain, server="https://other-ca.test/dir")
    mixed, _ = _signed_leaf(("mixed.example.net",), ca)
    add_lineage(d, "mixed.example.net", WEBROOT_CONF, mixed, key, chain)
    old, old_key = make_cert_pem(
        ("old.example.net",), days=30, not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    )
    add_lineage(d, "old.example.net", WEBROOT_CONF, old, old_key)
    return d, {"example.com": key, "*.example.org": wild_key}


def test_adopt_certbot_stores_active_renewable_certificates_and_names_the_bad_lineages(cli: Cli) -> None:
    d, keys = certbot_dir(cli.tmp)
    r = cli("adopt", "certbot", str(d))
    assert r.exit_code == 1, r.output
    assert "error: certbot mixed.example.net: the private key does not match the certificate" in r.stderr
    assert "error: certbot old.example.net: the certificate has already expired" in r.stderr
    assert "certbot plugin dns-cloudflare -> dns-01 with DNS provider cloudflare" in r.stderr
    assert "https://other-ca.test/dir is no configured issuer's directory" in r.stderr
    lines = r.stdout.splitlines()  # piped: the table as tab-separated lines
    assert lines[0] == "adopted (2 of 4)"
    # id, expiry, then names (the first and +N; -o wide has every one), then how it renews
    assert lines[1].split("\t") == ["id", "expires", "names", "challenge", "CA"]
    assert lines[2].split("\t")[2:] == ["example.com +1", "http-01", "letsencrypt"]
    assert lines[3].split("\t")[3:] == ["dns-01 (cloudflare)", "default"]

    assert rows(Certificate) == 2 and rows(Issuance) == 2
    assert rows(Intent) == 0  # nothing to issue: the current certificate is served as it is
    with session_scope(write=False) as s:
        certs = s.execute(select(Certificate).order_by(Certificate.created_at)).scalars().all()
        by_name = {c.domains[0]: c for c in certs}
        assert set(by_name) == {"example.com", "*.example.org"}
        for first, c in by_name.items():
            assert c.state == State.ACTIVE and c.auto_renew and not c.external
            iss = s.get_one(Issuance, c.current_issuance_id)
            assert c.not_after == iss.not_after
            assert c.renew_at == renewal.renew_at(iss.not_before, iss.not_after, 30, jitter=0)
            original = crypto.private_key_to_pem(crypto.load_private_key(keys[first]))
            stored = crypto.private_key_to_pem(crypto.load_private_key(certificates.decrypt_key(iss)))
            assert stored == original and keys[first].encode() not in (iss.key_enc or b"")
            assert iss.chain_pem.count("BEGIN CERTIFICATE") == 1
        web, dns = by_name["example.com"], by_name["*.example.org"]
        assert (web.challenge_type, web.dns_provider, web.directory_url, web.key_type) == (
            "http-01",
            None,
            LE,
            "ec256",
        )
        assert (dns.challenge_type, dns.dns_provider, dns.key_type, dns.reuse_key) == (
            "dns-01",
            "cloudflare",
            "rsa2048",
            True,
        )
        adopted = s.execute(select(Event).where(Event.kind == "adopted")).scalars().all()
        assert sorted(e.certificate_id for e in adopted) == sorted(c.id for c in certs)


def test_adopt_again_refuses_the_names_already_managed_and_writes_nothing(cli: Cli) -> None:
    d, _ = certbot_dir(cli.tmp)
    cli("adopt", "certbot", str(d))
    before = rows(Certificate), rows(Issuance), rows(Event)
    r = cli("adopt", "certbot", str(d), "--json")
    assert r.exit_code == 1
    items = {i["name"]: i for i in json.loads(r.stdout)["items"]}
    assert {i["status"] for i in items.values()} == {"failed"}
    assert "example.com is already managed (cert_" in items["example.com"]["error"]
    assert (rows(Certificate), rows(Issuance), rows(Event)) == before


def test_adopt_dry_run_says_what_would_be_adopted_and_writes_nothing(cli: Cli) -> None:
    d, _ = certbot_dir(cli.tmp)
    r = cli("adopt", "certbot", str(d), "--dry-run")
    assert r.exit_code == 1  # the two bad lineages
    assert r.stdout.splitlines()[0] == "would adopt (2 of 4)"
    assert "(dry run)" in r.stdout
    assert (rows(Certificate), rows(Issuance), rows(Event), rows(Intent)) == (0, 0, 0, 0)
    out = json.loads(cli("adopt", "certbot", str(d), "--dry-run", "--json").stdout)
    good = [i for i in out["items"] if i["status"] == "would adopt"]
    assert out["dry_run"] is True and len(good) == 2
    assert all(i["state"] == "ACTIVE" and i["renew_at"] and i["certificate_id"] is None for i in good)
    assert rows(Certificate) == 0


def test_adopt_cert_manager_from_stdin_adopts_the_good_secret_and_names_the_bad_one(cli: Cli) -> None:
    leaf, key = make_cert_pem(("shop.example.com", "www.shop.example.com"), days=60)
    other, _ = make_cert_pem(("broken.example.com",))
    doc = kubectl_list(
        tls_secret("shop-tls", leaf, key, {"cert-manager.io/issuer-name": "letsencrypt"}),
        tls_secret("broken-tls", other, key),
    )
    r = cli.runner.invoke(main, ["adopt", "cert-manager", "-", "--json"], input=doc, catch_exceptions=False)
    assert r.exit_code == 1, r.output
    shop, broken = json.loads(r.stdout)["items"]
    assert shop["status"] == "adopted" and shop["ca"] == "letsencrypt" and shop["challenge"] == "http-01"
    assert shop["domains"] == ["shop.example.com", "www.shop.example.com"]
    assert broken["status"] == "failed" and broken["name"] == "shop/broken-tls"
    assert broken["error"] == "the private key does not match the certificate"
    assert rows(Certificate) == 1
    with session_scope(write=False) as s:
        c = s.get_one(Certificate, shop["certificate_id"])
        assert c.state == State.ACTIVE and c.renew_at is not None and c.directory_url == LE
        iss = s.get_one(Issuance, c.current_issuance_id)
        assert crypto.private_key_to_pem(crypto.load_private_key(certificates.decrypt_key(iss))) == (
            crypto.private_key_to_pem(crypto.load_private_key(key))
        )


def test_adopt_of_an_empty_directory_is_one_error_line(cli: Cli) -> None:
    r = cli("adopt", "certbot", str(cli.tmp / "empty"))
    assert r.exit_code == 2 and r.stderr.startswith("error: no certbot lineage in")
    assert rows(Certificate) == 0


def test_adopt_with_regions_is_issued_and_deployed_as_an_issued_certificate_would_be(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERTQUEUE_MULTI_REGION__ENABLED", "true")
    monkeypatch.setenv(
        "CERTQUEUE_MULTI_REGION__REGIONS",
        json.dumps([{"name": "edge", "provider": "local", "path": str(cli.tmp / "edge")}]),
    )
    leaf, key = make_cert_pem(("edge.example.com",))
    doc = kubectl_list(tls_secret("edge-tls", leaf, key))
    r = cli.runner.invoke(main, ["adopt", "cert-manager", "-", "--json"], input=doc, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (item,) = json.loads(r.stdout)["items"]
    assert item["state"] == "ISSUED" and item["propagating"] is True and item["renew_at"] is None
    with session_scope(write=False) as s:
        c = s.get_one(Certificate, item["certificate_id"])
        assert c.pending_issuance_id is not None and c.current_issuance_id is None
        (intent,) = s.execute(select(Intent)).scalars().all()
        assert (intent.kind, intent.certificate_id) == ("propagate", c.id)
