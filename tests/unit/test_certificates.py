"""certqueue.certificates on both database backends: request validation that writes nothing, the
de-duplication of live requests (also under concurrency), issuance storage with the key encrypted,
and the import of externally issued certificates."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select, text

from certqueue import certificates, db, operations
from certqueue.certificates import CertificateRequest, create_certificate, decrypt_key, store_issuance
from certqueue.config import Settings
from certqueue.errors import InvalidInput
from certqueue.keystore import KeyStore
from certqueue.models import Certificate, Event, Issuance, State
from tests.conftest_db import count_rows, make_cert_pem

REGIONS = {
    "multi_region": {
        "regions": [
            {"name": "us-east-1", "provider": "aws"},
            {"name": "web1", "provider": "local", "path": "/srv/tls"},
        ]
    }
}


@pytest.fixture
def settings(db_url: str, settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory(database_url=db_url, acme={"email": "ops@example.com"}, **REGIONS)


def _counts() -> tuple[int, int, int]:
    return count_rows(Certificate), count_rows(Event), count_rows(Issuance)


# --- CertificateRequest.build --------------------------------------------------------------------

# (kwargs, the field the error names)
BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"domains": []}, "domains"),
    ({"domains": "example.com"}, "domains"),  # a string, not a list
    ({"domains": ["bad_name.example.com"]}, "domains"),
    ({"domains": ["example"]}, "domains"),  # one label
    ({"domains": ["*.*.example.com"]}, "domains"),
    ({"domains": ["www.*.example.com"], "challenge_type": "dns-01", "dns_provider": "rfc2136"}, "domains"),
    ({"domains": ["192.0.2.1"]}, "domains"),  # IPs only when asked
    ({"domains": ["a" * 64 + ".example.com"]}, "domains"),
    ({"domains": [f"h{i}.example.com" for i in range(101)]}, "domains"),
    ({"domains": ["example.com"], "email": "not-an-address"}, "email"),
    ({"domains": ["example.com"], "email": "a@b@example.com"}, "email"),
    ({"domains": ["example.com"], "email": "ops@localhost"}, "email"),
    ({"domains": ["example.com"], "key_size": 1024}, "key_size"),
    ({"domains": ["example.com"], "key_size": "abc"}, "key_size"),
    ({"domains": ["example.com"], "key_size": 2048, "key_type": "ec256"}, "key_size"),
    ({"domains": ["example.com"], "key_type": "dsa1024"}, "key_type"),
    ({"domains": ["example.com"], "challenge_type": "dns-persist-01"}, "challenge_type"),
    ({"domains": ["*.example.com"]}, "challenge_type"),  # wildcard with the default http-01
    (
        {"domains": ["*.example.com"], "challenge_type": "http-01", "dns_provider": "rfc2136"},
        "challenge_type",
    ),
    (
        {
            "domains": ["*.example.com", "example.com"],
            "challenge_type": "dns-01",
            "dns_provider": "rfc2136",
            "challenge_map": {"*.example.com": "http-01"},
        },
        "challenge_type",
    ),
    ({"domains": ["example.com"], "challenge_map": {"other.example.com": "dns-01"}}, "challenge_map"),
    ({"domains": ["example.com"], "challenge_map": {"example.com": "dns-persist-01"}}, "challenge_map"),
    ({"domains": ["example.com"], "challenge_map": ["example.com"]}, "challenge_map"),
    ({"domains": ["example.com"], "challenge_type": "dns-01"}, "dns_provider"),  # no provider anywhere
    ({"domains": ["example.com"], "challenge_map": {"example.com": "dns-01"}}, "dns_provider"),
    # issue 13, finding 7: a provider that does not exist is refused now, not in a worker later
    ({"domains": ["example.com"], "challenge_type": "dns-01", "dns_provider": "nosuchdns"}, "dns_provider"),
    ({"domains": ["*.co.uk"], "challenge_type": "dns-01", "dns_provider": "rfc2136"}, "domains"),
    ({"domains": ["example.com"], "targets": ["mars-1"]}, "targets"),
    ({"domains": ["example.com"], "country": "USA"}, "country"),
    ({"domains": ["example.com"], "organization": "Evil\nCorp"}, "organization"),
    ({"domains": ["example.com"], "locality": "x" * 129}, "locality"),
    ({"domains": ["example.com"], "directory_url": "ftp://ca.example/dir"}, "directory_url"),
    ({"domains": ["example.com"], "validity_days": 90}, "validity_days"),  # unknown parameter
    ({"domains": ["example.com"], "domain": "example.com"}, "domain"),
]


@pytest.mark.parametrize(
    ("kwargs", "field"), BAD_REQUESTS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_REQUESTS)]
)
def test_bad_request_is_refused_and_writes_nothing(
    settings: Settings, kwargs: dict[str, Any], field: str
) -> None:
    before = _counts()
    with pytest.raises(InvalidInput) as info, db.session_scope() as s:
        create_certificate(s, CertificateRequest.build(**kwargs))
    assert info.value.field == field, info.value
    assert _counts() == before


def test_build_normalizes_and_fills_defaults(settings: Settings) -> None:
    req = CertificateRequest.build(
        domains=["WWW.Example.COM.", "bücher.example", "www.example.com"],
        key_size=2048,
        targets=["web1"],
        country="de",
    )
    assert req.domains == ["www.example.com", "xn--bcher-kva.example"]
    assert req.key_type == "rsa2048"
    assert req.email == "ops@example.com"  # acme.email
    assert req.challenge_type == "http-01"
    assert req.directory_url == settings.acme.directory
    assert req.country == "DE"
    assert req.auto_renew is True


def test_build_accepts_wildcards_with_dns01(settings: Settings) -> None:
    req = CertificateRequest.build(
        domains=["*.example.com", "example.com"],
        challenge_type="http-01",
        challenge_map={"*.Example.com": "dns-01"},
        dns_provider="rfc2136",
    )
    assert req.challenge_map == {"*.example.com": "dns-01"}
    req = CertificateRequest.build(domains=["*.example.com"], challenge_type="dns-01", dns_provider="route53")
    assert (req.challenge_type, req.dns_provider) == ("dns-01", "route53")


def test_dns_provider_may_come_from_settings(db_url: str, settings_factory: Callable[..., Settings]) -> None:
    settings_factory(database_url=db_url, challenges={"dns_provider": "cloudflare"})
    req = CertificateRequest.build(domains=["*.example.com"], challenge_type="dns-01")
    assert req.dns_provider == "cloudflare"


# --- create_certificate ---------------------------------------------------------------------------


def test_same_names_in_another_order_give_the_same_row(settings: Settings) -> None:
    with db.session_scope() as s:
        first, created = create_certificate(
            s, CertificateRequest.build(domains=["a.example.com", "b.example.com"])
        )
        assert created
    with db.session_scope() as s:
        again, created_again = create_certificate(
            s, CertificateRequest.build(domains=["B.example.com", "a.example.com"])
        )
    assert not created_again and again.id == first.id
    # a different key type or a different name set is a different certificate
    with db.session_scope() as s:
        rsa, c1 = create_certificate(
            s, CertificateRequest.build(domains=["a.example.com", "b.example.com"], key_type="rsa2048")
        )
        more, c2 = create_certificate(s, CertificateRequest.build(domains=["a.example.com"]))
    assert c1 and c2 and len({first.id, rsa.id, more.id}) == 3
    assert count_rows(Certificate) == 3
    with db.session_scope(write=False) as s:
        kinds = [e.kind for e in s.execute(select(Event).where(Event.certificate_id == first.id)).scalars()]
    assert kinds == ["requested"]  # the duplicate request wrote no event


def test_a_failed_certificate_does_not_block_a_new_request(settings: Settings) -> None:
    req = CertificateRequest.build(domains=["retry.example.com"])
    with db.session_scope() as s:
        cert, _ = create_certificate(s, req)
        cert.state = State.FAILED  # not live any more
    with db.session_scope() as s:
        new, created = create_certificate(s, req)
    assert created and new.id != cert.id


@pytest.mark.parametrize("threads", [8])
def test_concurrent_requests_give_one_row(settings: Settings, threads: int) -> None:
    for round_ in range(3):
        names = [f"r{round_}.example.com", f"www.r{round_}.example.com"]
        barrier = threading.Barrier(threads)
        results: list[tuple[str, bool]] = []
        errors: list[BaseException] = []

        def worker(i: int, names: list[str] = names, barrier: threading.Barrier = barrier) -> None:
            try:
                req = CertificateRequest.build(domains=names if i % 2 else list(reversed(names)))
                barrier.wait(timeout=10)
                with db.session_scope() as s:
                    cert, created = create_certificate(s, req)
                    results.append((cert.id, created))
            except BaseException as exc:
                errors.append(exc)

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in pool)
        assert errors == []
        assert len(results) == threads
        assert len({cid for cid, _ in results}) == 1
        assert sum(created for _, created in results) == 1
    assert count_rows(Certificate) == 3
    assert count_rows(Event) == 3  # one "requested" event per certificate


# --- store_issuance / decrypt_key ----------------------------------------------------------------


def _new_cert(names: list[str]) -> Certificate:
    with db.session_scope() as s:
        cert, _ = create_certificate(s, CertificateRequest.build(domains=names))
    return cert


def test_store_issuance_encrypts_the_key(settings: Settings) -> None:
    cert = _new_cert(["store.example.com"])
    cert_pem, key_pem = make_cert_pem(("store.example.com",), days=90)
    with db.session_scope() as s:
        iss = store_issuance(s, s.get(Certificate, cert.id), cert_pem, key_pem, order_url="https://ca/o/1")
        iss_id = iss.id
    with db.session_scope(write=False) as s:
        stored = s.get(Issuance, iss_id)
        assert stored is not None
        assert stored.key_enc is not None
        assert key_pem not in stored.key_enc and b"PRIVATE KEY" not in stored.key_enc
        body = key_pem.split(b"\n")[1]
        assert body not in stored.key_enc
        assert decrypt_key(stored) == key_pem
        assert stored.cert_pem.strip() == cert_pem.strip()
        assert stored.order_url == "https://ca/o/1"
        assert stored.not_after - stored.not_before == dt.timedelta(days=90)
        assert stored.key_type == "ec256"
        # the blob is bound to its row: under another row's associated data it does not open
        ks = KeyStore.from_file(settings.storage.encryption_key_path)
        with pytest.raises(Exception, match="cannot decrypt"):
            ks.decrypt(
                stored.key_enc, certificates.issuance_aad("cert_other0000000000000000", stored.fingerprint)
            )


def test_store_issuance_refuses_a_mismatched_key(settings: Settings) -> None:
    cert = _new_cert(["mismatch.example.com"])
    cert_pem, _ = make_cert_pem(("mismatch.example.com",))
    _, wrong_key = make_cert_pem(("mismatch.example.com",))
    before = _counts()
    with pytest.raises(InvalidInput) as info, db.session_scope() as s:
        store_issuance(s, s.get(Certificate, cert.id), cert_pem, wrong_key)
    assert info.value.field == "private_key_pem"
    assert "PRIVATE KEY" not in str(info.value)
    assert _counts() == before


def test_store_issuance_refuses_no_certificate(settings: Settings) -> None:
    cert = _new_cert(["empty.example.com"])
    with pytest.raises(InvalidInput), db.session_scope() as s:
        store_issuance(s, s.get(Certificate, cert.id), "not a pem", None)
    assert count_rows(Issuance) == 0


# --- import_certificate --------------------------------------------------------------------------


def _ca(name: str = "Example EV CA", *, ca: bool = True) -> tuple[Any, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (key, subject), cert.public_bytes(serialization.Encoding.PEM).decode()


def _signed_leaf(
    names: tuple[str, ...], ca: tuple[Any, Any], *, rsa_bits: int | None = None
) -> tuple[str, str]:
    """(leaf PEM, key PEM) for ``names`` signed by ``ca`` (from ``_ca``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    ca_key, ca_name = ca
    key: Any = (
        rsa.generate_private_key(65537, rsa_bits) if rsa_bits else ec.generate_private_key(ec.SECP256R1())
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def test_import_of_a_fullchain_splits_the_leaf_from_its_chain(settings: Settings) -> None:
    """certbot's fullchain.pem (leaf, then chain, one file) imports as the leaf with that chain; the
    same file with a chain given as well is refused, with nothing written."""
    ca, chain_pem = _ca()
    cert_pem, key_text = _signed_leaf(("full.example.com",), ca)
    fullchain = cert_pem + chain_pem
    with db.session_scope() as s:
        cid = operations.import_certificate(
            s, certificate_pem=fullchain, private_key_pem=key_text, actor="pytest"
        )[0].id
    with db.session_scope() as s:
        cert = s.get_one(Certificate, cid)
        iss = s.get_one(Issuance, cert.current_issuance_id or cert.pending_issuance_id)
        assert iss.cert_pem.strip() == cert_pem.strip()
        assert iss.chain_pem.strip() == chain_pem.strip()
    other_pem, other_key = _signed_leaf(("twice.example.com",), ca)
    with pytest.raises(InvalidInput, match="fullchain") as err, db.session_scope() as s:
        certificates.store_external(
            s, certificate_pem=other_pem + chain_pem, private_key_pem=other_key, chain_pem=chain_pem
        )
    assert err.value.field == "chain_pem"
    with db.session_scope() as s:
        assert [c.domains for c in s.execute(select(Certificate)).scalars()] == [["full.example.com"]]


def test_import_is_external_and_never_renewed(settings: Settings) -> None:
    ca, chain_pem = _ca()
    cert_pem, key_text = _signed_leaf(("ev.example.com", "www.ev.example.com"), ca)
    key_pem = key_text.encode()
    with db.session_scope() as s:
        cert, _intent = operations.import_certificate(
            s,
            certificate_pem=cert_pem,
            private_key_pem=key_pem.decode(),
            chain_pem=chain_pem,
            targets=["us-east-1"],
            actor="pytest",
        )
        cid = cert.id
    with db.session_scope() as s:
        cert = s.get(Certificate, cid)
        assert cert is not None
        assert cert.external is True and cert.auto_renew is False
        assert cert.state == State.ISSUED
        assert cert.domains == ["ev.example.com", "www.ev.example.com"]
        assert cert.targets == ["us-east-1"]
        iss = s.get(Issuance, cert.pending_issuance_id)
        assert iss is not None and decrypt_key(iss) == key_pem
        assert iss.chain_pem.strip() == chain_pem.strip()
        certificates.activate(s, cert, iss, reason="propagated")
    with db.session_scope(write=False) as s:
        cert = s.get(Certificate, cid)
        assert cert is not None
        assert cert.state == State.ACTIVE and cert.renew_at is None and cert.current_issuance_id == iss.id
        # the due scan (DESIGN.md) never sees it, however far in the future it runs
        far = dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)
        due = (
            s.execute(
                select(Certificate.id).where(Certificate.state == State.ACTIVE, Certificate.renew_at <= far)
            )
            .scalars()
            .all()
        )
        assert cid not in due
        moves = [
            (e.from_state, e.to_state)
            for e in s.execute(
                select(Event)
                .where(Event.certificate_id == cid, Event.kind == "transition")
                .order_by(Event.id)
            ).scalars()
        ]
    assert moves == [("REQUESTED", "ISSUING"), ("ISSUING", "ISSUED"), ("ISSUED", "ACTIVE")]


def test_an_issued_certificate_is_scheduled_for_renewal(settings: Settings) -> None:
    """The contrast to the import: an ordinary certificate gets renew_at from the renewal policy."""
    cert = _new_cert(["sched.example.com"])
    cert_pem, key_pem = make_cert_pem(("sched.example.com",), days=90)
    with db.session_scope() as s:
        row = db.lock_certificate(s, cert.id)
        assert row is not None
        from certqueue import events

        events.transition(s, row, State.ISSUING)
        iss = store_issuance(s, row, cert_pem, key_pem)
        events.transition(s, row, State.ISSUED)
        certificates.activate(s, row, iss, reason="issued")
    with db.session_scope(write=False) as s:
        row = s.get(Certificate, cert.id)
        assert row is not None and row.renew_at is not None
        window = iss.not_after - row.renew_at
        assert dt.timedelta(days=30) <= window <= dt.timedelta(days=33)  # threshold 30, jitter 0.1


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("expired", "certificate_pem"),
        ("mismatch", "private_key_pem"),
        ("garbage", "certificate"),
        ("bad_region", "targets"),
        ("ip_only", "domains"),
        # issue 13, finding 7: weak keys and chains that do not verify
        ("rsa1024", "certificate_pem"),
        ("rsa1024_key_only", "private_key_pem"),
        ("unrelated_chain", "chain_pem"),
        ("chain_not_a_ca", "chain_pem"),
    ],
)
def test_import_refusals_write_nothing(settings: Settings, case: str, field: str) -> None:
    cert_pem, key_pem = make_cert_pem(("imp.example.com",))
    kwargs: dict[str, Any] = {"certificate_pem": cert_pem, "private_key_pem": key_pem.decode()}
    if case == "expired":
        old = dt.datetime.now(dt.UTC) - dt.timedelta(days=100)
        kwargs["certificate_pem"], k = make_cert_pem(("imp.example.com",), days=90, not_before=old)
        kwargs["private_key_pem"] = k.decode()
    elif case == "mismatch":
        kwargs["private_key_pem"] = make_cert_pem(("imp.example.com",))[1].decode()
    elif case == "garbage":
        kwargs["certificate_pem"] = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    elif case == "bad_region":
        kwargs["targets"] = ["mars-1"]
    elif case == "ip_only":
        kwargs["certificate_pem"], k = make_cert_pem(("192.0.2.1",))  # no DNS name to manage
        kwargs["private_key_pem"] = k.decode()
    elif case == "rsa1024":
        ca, chain = _ca()
        kwargs["certificate_pem"], kwargs["private_key_pem"] = _signed_leaf(
            ("imp.example.com",), ca, rsa_bits=1024
        )
        kwargs["chain_pem"] = chain
    elif case == "rsa1024_key_only":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        weak = rsa.generate_private_key(65537, 1024)
        kwargs["private_key_pem"] = weak.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
    elif case == "unrelated_chain":
        ca, _ = _ca("Issuer")
        _, other_chain = _ca("Someone else")
        kwargs["certificate_pem"], kwargs["private_key_pem"] = _signed_leaf(("imp.example.com",), ca)
        kwargs["chain_pem"] = other_chain
    elif case == "chain_not_a_ca":
        ca, chain = _ca("Not a CA", ca=False)
        kwargs["certificate_pem"], kwargs["private_key_pem"] = _signed_leaf(("imp.example.com",), ca)
        kwargs["chain_pem"] = chain
    before = _counts()
    with pytest.raises(InvalidInput) as info, db.session_scope() as s:
        certificates.store_external(s, **kwargs)
    assert info.value.field == field, info.value
    assert "PRIVATE KEY" not in str(info.value)
    assert _counts() == before


def test_importing_the_same_certificate_twice_is_refused(settings: Settings) -> None:
    cert_pem, key_pem = make_cert_pem(("twice.example.com",))
    with db.session_scope() as s:
        certificates.store_external(s, certificate_pem=cert_pem, private_key_pem=key_pem.decode())
    before = _counts()
    with pytest.raises(InvalidInput, match="already imported"), db.session_scope() as s:
        certificates.store_external(s, certificate_pem=cert_pem, private_key_pem=key_pem.decode())
    assert _counts() == before
    # the database is still usable afterwards (the failed flush did not poison the next session)
    with db.session_scope(write=False) as s:
        assert s.execute(text("SELECT count(*) FROM certificates")).scalar_one() == 1


# --- issuance_in_hand: what follows a stored issuance, for the pipeline, import and adopt ---------

# (targets, strategy) -> (ACTIVE now, a propagate intent recorded)
IN_HAND = [
    ([], "sync", True, False),
    ([], "async", True, False),
    (["web1"], "sync", False, True),
    (["web1"], "async", True, True),
]


@pytest.mark.parametrize(("targets", "strategy", "active", "propagates"), IN_HAND)
def test_an_issuance_in_hand_is_served_or_propagated_by_the_one_rule(
    db_url: str,
    settings_factory: Callable[..., Settings],
    targets: list[str],
    strategy: str,
    active: bool,
    propagates: bool,
) -> None:
    from certqueue.events import transition
    from certqueue.models import Intent

    regions = {"multi_region": {**REGIONS["multi_region"], "propagation_strategy": strategy}}
    s_ = settings_factory(database_url=db_url, acme={"email": "ops@example.com"}, **regions)
    leaf, key = make_cert_pem(("hand.example.com",), days=90)
    with db.session_scope() as s:
        cert, _ = create_certificate(
            s, CertificateRequest.build(s_, domains=["hand.example.com"], targets=targets), actor="t"
        )
        transition(s, cert, State.ISSUING)
        iss = store_issuance(s, cert, leaf, key)
        transition(s, cert, State.ISSUED)
        now_active, intent = certificates.issuance_in_hand(
            s, cert, iss, reason="issued", actor="t", settings=s_
        )
        cid, iid = cert.id, iss.id
    assert now_active is active and (intent is not None) is propagates
    with db.session_scope(write=False) as s:
        row = s.get_one(Certificate, cid)
        assert row.state == (State.ACTIVE if active else State.ISSUED)
        # served: the current issuance; waiting for its regions: the pending one
        assert (row.current_issuance_id, row.pending_issuance_id) == ((iid, None) if active else (None, iid))
        kinds = [i.kind for i in s.execute(select(Intent).where(Intent.certificate_id == cid)).scalars()]
        assert kinds == (["propagate"] if propagates else [])


def test_an_import_with_regions_waits_for_them_even_with_async_propagation(
    db_url: str, settings_factory: Callable[..., Settings]
) -> None:
    regions = {"multi_region": {**REGIONS["multi_region"], "propagation_strategy": "async"}}
    settings_factory(database_url=db_url, acme={"email": "ops@example.com"}, **regions)
    leaf, key = make_cert_pem(("imp.example.com",), days=90)
    with db.session_scope() as s:
        cert, intent = operations.import_certificate(
            s, certificate_pem=leaf, private_key_pem=key.decode(), targets=["web1"], actor="t"
        )
        assert intent is not None and intent.kind == "propagate"
        assert cert.state == State.ISSUED and cert.pending_issuance_id is not None
