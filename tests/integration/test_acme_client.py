"""certqueue.acme against a real Pebble 2.4 with pebble-challtestsrv as its DNS.

The test is the driver here: it calls the step methods in a bounded loop with tiny sleeps, where
production Celery tasks retry with countdowns. Run with:

    .venv/bin/pytest tests/integration/test_acme_client.py -q -p tests.conftest_pebble
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time

import pytest
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from certqueue.acme.account import (
    account_key_from_pem,
    account_key_to_pem,
    find_account,
    generate_account_key,
    register_account,
)
from certqueue.acme.client import (
    AcmeClient,
    AuthzStatus,
    ChallengeInfo,
    order_from_json,
    order_to_json,
)
from certqueue.acme.errors import map_exception, parse_retry_after, problem_from_error
from certqueue.errors import InvalidInput, PermanentError, RateLimited, RetryableError
from devstack.pebble import PebbleServer
from tests.conftest_pebble import Http01Responder, PebbleStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

_counter = iter(range(1_000_000))


def unique_names(n: int, suffix: str = "example.com") -> list[str]:
    """Fresh names per call, so no two tests share an identifier."""
    tag = f"t{time.monotonic_ns() % 10**10}x{next(_counter)}"
    return [f"h{i}.{tag}.{suffix}" for i in range(n)]


def make_csr(names: list[str]) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM), key


def new_account_client(server: PebbleServer | PebbleStack, **kwargs: object) -> AcmeClient:
    client = AcmeClient(server.directory_url, generate_account_key(), verify=str(server.ca_bundle), **kwargs)  # type: ignore[arg-type]
    register_account(client, "ops@example.com")
    return client


def present_http01(
    client: AcmeClient, order: messages.OrderResource, responder: Http01Responder
) -> list[ChallengeInfo]:
    infos = [client.challenge_for(a, "http-01") for a in order.authorizations]
    for info in infos:
        responder.tokens[info.token] = info.key_authorization
    return infos


def wait_authorizations(
    client: AcmeClient, order: messages.OrderResource, limit: float = 30.0
) -> AuthzStatus:
    deadline = time.monotonic() + limit
    while True:
        status = client.poll_authorizations(order)
        if status.status != "pending":
            return status
        assert time.monotonic() < deadline, f"authorizations still pending: {status.identifiers}"
        order = status.order
        time.sleep(0.02)


def wait_certificate(
    client: AcmeClient, order: messages.OrderResource, preferred_chain: str | None = None, limit: float = 30.0
) -> tuple[str, list[str]]:
    deadline = time.monotonic() + limit
    while True:
        try:
            return client.fetch_certificate(order, preferred_chain=preferred_chain)
        except RetryableError as exc:
            assert exc.reason == "acme:orderProcessing", exc.reason
            assert time.monotonic() < deadline, "certificate never issued"
            time.sleep(0.02)


def issue(
    client: AcmeClient, names: list[str], responder: Http01Responder, preferred_chain: str | None = None
) -> tuple[str, list[str], ec.EllipticCurvePrivateKey]:
    """The whole HTTP-01 flow through the step methods."""
    csr_pem, key = make_csr(names)
    order = client.new_order(csr_pem)
    infos = present_http01(client, order, responder)
    for info in infos:
        client.answer_challenge(info)
    status = wait_authorizations(client, order)
    assert status.status == "valid", status.problems
    order = client.finalize(status.order, csr_pem)
    assert order.body.status in (messages.STATUS_PROCESSING, messages.STATUS_VALID)
    fullchain, alternatives = wait_certificate(client, order, preferred_chain)
    return fullchain, alternatives, key


def same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def verify_chain(fullchain: str, roots_pem: str, name: str) -> list[x509.Certificate]:
    """Path-build the leaf to Pebble's root with strict RFC 5280 checks; returns the built chain."""
    certs = x509.load_pem_x509_certificates(fullchain.encode())
    store = verification.Store(x509.load_pem_x509_certificates(roots_pem.encode()))
    verifier = verification.PolicyBuilder().store(store).build_server_verifier(verification.DNSName(name))
    return verifier.verify(certs[0], certs[1:])


# -- accounts ---------------------------------------------------------------------------------


def test_register_then_reuse_account(pebble: PebbleStack) -> None:
    key = generate_account_key()
    client = AcmeClient(pebble.directory_url, key, verify=pebble.ca_bundle)
    assert find_account(client) is None
    assert client.account_url is None

    account = register_account(client, "ops@example.com")
    assert account.created and account.status == "valid"
    assert account.url.startswith(pebble.directory_url.rsplit("/", 1)[0])
    assert account.registration["contact"] == ["mailto:ops@example.com"]
    assert client.account_url == account.url
    json.dumps(account.registration)  # storable as is

    # the key goes to the database as PEM and comes back; registration is idempotent
    pem = account_key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    reloaded = account_key_from_pem(pem)
    assert reloaded.thumbprint() == key.thumbprint()
    again = register_account(AcmeClient(pebble.directory_url, reloaded, verify=pebble.ca_bundle))
    assert (again.created, again.url) == (False, account.url)
    found_client = AcmeClient(pebble.directory_url, reloaded, verify=pebble.ca_bundle)
    found = find_account(found_client)
    assert found_client.directory is client.directory  # fetched once per process, not per client
    assert found is not None and found.url == account.url

    # a client rebuilt from the stored URL works without any account lookup
    rebuilt = AcmeClient(pebble.directory_url, reloaded, account.url, verify=pebble.ca_bundle)
    order = rebuilt.new_order(make_csr(unique_names(1))[0])
    assert order.body.status == messages.STATUS_PENDING and order.uri


def test_rsa_account_key_and_bad_pem() -> None:
    rsa_key = generate_account_key("rsa2048")
    assert account_key_from_pem(account_key_to_pem(rsa_key)).thumbprint() == rsa_key.thumbprint()
    with pytest.raises(InvalidInput):
        generate_account_key("dsa1024")
    with pytest.raises(InvalidInput) as err:
        account_key_from_pem(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    assert "not a key" not in str(err.value)


def test_external_account_binding(make_pebble) -> None:  # type: ignore[no-untyped-def]
    hmac_key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    server = make_pebble(eab_keys={"kid-1": hmac_key})
    client = AcmeClient(server.directory_url, generate_account_key(), verify=str(server.ca_bundle))
    with pytest.raises(PermanentError) as err:
        register_account(client, "ops@example.com")
    assert err.value.reason == "acme:externalAccountRequired"
    with pytest.raises(PermanentError) as err:
        register_account(client, eab_kid="kid-1", eab_hmac_key="AAAA" + hmac_key[4:])
    assert err.value.reason.startswith("acme:")
    assert hmac_key[4:] not in str(err.value)
    account = register_account(client, "ops@example.com", eab_kid="kid-1", eab_hmac_key=hmac_key)
    assert account.created and client.account_url == account.url


# -- issuance ---------------------------------------------------------------------------------


def test_issue_single_name_chain_verifies_against_pebble_roots(pebble: PebbleStack) -> None:
    client = new_account_client(pebble)
    (name,) = unique_names(1)
    fullchain, alternatives, key = issue(client, [name], pebble.http01)
    assert alternatives == []
    chain = verify_chain(fullchain, pebble.server.roots_pem(), name)
    leaf = chain[0]
    assert same_key(leaf, key)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [name]
    # the chain the CA sent ends with Pebble's intermediate, which the management interface confirms
    intermediate = x509.load_pem_x509_certificate(pebble.server.intermediates_pem().encode())
    assert chain[1] == intermediate


def test_issue_fifty_names(pebble: PebbleStack) -> None:
    client = new_account_client(pebble)
    names = unique_names(50)
    fullchain, _, _ = issue(client, names, pebble.http01)
    chain = verify_chain(fullchain, pebble.server.roots_pem(), names[37])
    sans = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(names)


def test_unserved_token_makes_the_order_invalid_with_a_stable_reason(pebble: PebbleStack) -> None:
    client = new_account_client(pebble)
    csr_pem, _ = make_csr(unique_names(1))
    order = client.new_order(csr_pem)
    info = client.challenge_for(order.authorizations[0], "http-01")
    assert info.token not in pebble.http01.tokens  # nothing is served: the responder answers 404
    client.answer_challenge(info)
    status = wait_authorizations(client, order)
    assert status.status == "invalid"
    assert status.reason in ("acme:unauthorized", "acme:connection")
    (problem,) = status.problems.values()
    assert problem.identifier == info.identifier and problem.detail
    assert f"/.well-known/acme-challenge/{info.token}" in pebble.http01.requests
    # the order is dead: answering again is a permanent failure with the same reason, finalize too
    with pytest.raises(PermanentError) as err:
        client.answer_challenge(dataclasses.replace(info, status="pending"))
    assert err.value.reason == status.reason
    with pytest.raises(PermanentError):
        client.finalize(status.order, csr_pem)


def test_order_json_round_trip_resumes_with_a_new_client(pebble: PebbleStack) -> None:
    key = generate_account_key()
    first = AcmeClient(pebble.directory_url, key, verify=pebble.ca_bundle)
    account = register_account(first, "ops@example.com")
    names = unique_names(2)
    csr_pem, cert_key = make_csr(names)
    order = first.new_order(csr_pem)
    stored = json.dumps(order_to_json(order))
    infos = [first.challenge_for(a, "http-01") for a in order.authorizations]
    stored_infos = json.dumps([i.to_json() for i in infos])

    # the worker died; another one reloads everything from the database with a new client
    pem = account_key_to_pem(key)
    second = AcmeClient(pebble.directory_url, account_key_from_pem(pem), account.url, verify=pebble.ca_bundle)
    resumed = order_from_json(json.loads(stored))
    assert resumed.uri == order.uri and resumed.csr_pem == csr_pem
    infos2 = [ChallengeInfo.from_json(d) for d in json.loads(stored_infos)]
    assert infos2 == infos
    for info in infos2:
        pebble.http01.tokens[info.token] = info.key_authorization
        second.answer_challenge(info)
        second.answer_challenge(dataclasses.replace(info, status="pending"))  # redelivered: no error
    status = wait_authorizations(second, resumed)
    assert status.status == "valid" and set(status.identifiers) == set(names)

    # and once more across finalize: the stored order resumes, finalize twice is harmless
    after_poll = order_from_json(json.loads(json.dumps(order_to_json(status.order))))
    finalized = second.finalize(after_poll, csr_pem)
    third = AcmeClient(pebble.directory_url, account_key_from_pem(pem), account.url, verify=pebble.ca_bundle)
    again = third.finalize(order_from_json(json.loads(json.dumps(order_to_json(after_poll)))), csr_pem)
    assert again.uri == finalized.uri == order.uri
    fullchain, _ = wait_certificate(third, order_from_json(order_to_json(again)))
    leaf = x509.load_pem_x509_certificates(fullchain.encode())[0]
    assert same_key(leaf, cert_key)
    refreshed = third.refresh_order(resumed)
    assert refreshed.body.status == messages.STATUS_VALID
    assert all(a.body.status == messages.STATUS_VALID for a in refreshed.authorizations)


def test_finalize_before_validation_is_retryable(pebble: PebbleStack) -> None:
    client = new_account_client(pebble)
    csr_pem, _ = make_csr(unique_names(1))
    order = client.new_order(csr_pem)
    with pytest.raises(RetryableError) as err:
        client.finalize(order, csr_pem)
    assert err.value.reason == "acme:orderNotReady"
    with pytest.raises(PermanentError) as perm:
        client.fetch_certificate(order)
    assert perm.value.reason == "acme:orderNotFinalized"


def test_finalize_with_a_csr_for_other_names_is_permanent(pebble: PebbleStack) -> None:
    client = new_account_client(pebble)
    csr_pem, _ = make_csr(unique_names(1))
    order = client.new_order(csr_pem)
    for info in present_http01(client, order, pebble.http01):
        client.answer_challenge(info)
    assert wait_authorizations(client, order).status == "valid"
    with pytest.raises(PermanentError) as err:
        client.finalize(order, make_csr(unique_names(1))[0])
    assert err.value.reason in ("acme:badCSR", "acme:unauthorized")  # Pebble 2.4 says unauthorized
    assert "BEGIN" not in str(err.value) and "eyJ" not in str(err.value)


def test_wildcard_needs_dns01_and_validates_through_challtestsrv(pebble: PebbleStack) -> None:
    client = new_account_client(pebble)
    base = unique_names(1)[0]
    csr_pem, _ = make_csr([f"*.{base}"])
    order = client.new_order(csr_pem)
    (authz,) = order.authorizations
    with pytest.raises(PermanentError) as err:
        client.challenge_for(authz, "http-01")
    assert err.value.reason == "acme:no_challenge"
    info = client.challenge_for(authz, "dns-01")
    assert (info.identifier, info.wildcard, info.dns_name) == (base, True, f"_acme-challenge.{base}")
    assert info.dns_value and info.token and info.dns_name
    pebble.dns.set_txt(info.dns_name, info.dns_value)
    try:
        client.answer_challenge(info)
        status = wait_authorizations(client, order)
    finally:
        pebble.dns.clear_txt(info.dns_name)
    assert status.status == "valid" and status.identifiers == {f"*.{base}": "valid"}
    fullchain, _ = wait_certificate(client, client.finalize(status.order, csr_pem))
    verify_chain(fullchain, pebble.server.roots_pem(), f"x.{base}")


def test_profiles_and_replaces_on_a_ca_without_them(pebble: PebbleStack) -> None:
    client = new_account_client(pebble)
    csr_pem, _ = make_csr(unique_names(1))
    with pytest.raises(PermanentError) as err:
        client.new_order(csr_pem, profile="shortlived")
    assert err.value.reason == "acme:invalidProfile"
    # Pebble 2.4 has no ARI: replaces is not sent and the order is an ordinary one
    order = client.new_order(csr_pem, replaces="aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE")
    assert order.body.status == messages.STATUS_PENDING


# -- revocation -------------------------------------------------------------------------------


def test_revoke_key_compromise_shows_in_pebble(pebble: PebbleStack) -> None:
    client = new_account_client(pebble)
    fullchain, _, _ = issue(client, unique_names(1), pebble.http01)
    leaf = x509.load_pem_x509_certificates(fullchain.encode())[0]
    serial = format(leaf.serial_number, "x")
    assert pebble.server.cert_status(serial)["Status"] == "Valid"
    client.revoke(fullchain, 1)  # keyCompromise
    status = pebble.server.cert_status(serial)
    assert status["Status"] == "Revoked" and status["Reason"] == 1
    client.revoke(fullchain, 1)  # already revoked: success
    with pytest.raises(InvalidInput):
        client.revoke(fullchain, 7)


# -- faults -----------------------------------------------------------------------------------


def test_thirty_percent_bad_nonces_still_issue(make_pebble, pebble: PebbleStack) -> None:  # type: ignore[no-untyped-def]
    server = make_pebble(env={"PEBBLE_WFE_NONCEREJECT": "30"})
    assert "reject 30% of good nonces" in server.log_text()
    client = new_account_client(server)
    for _ in range(2):
        fullchain, _, _ = issue(client, unique_names(3), pebble.http01)
        verify_chain(
            fullchain,
            server.roots_pem(),
            x509.load_pem_x509_certificates(fullchain.encode())[0]
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value.get_values_for_type(x509.DNSName)[0],
        )
    assert client.bad_nonce_retries > 0  # the CA did reject nonces, and the calls retried them


def test_single_badnonce_attempt_surfaces_as_retryable(make_pebble) -> None:  # type: ignore[no-untyped-def]
    server = make_pebble(env={"PEBBLE_WFE_NONCEREJECT": "100"})
    client = AcmeClient(
        server.directory_url, generate_account_key(), verify=str(server.ca_bundle), bad_nonce_attempts=3
    )
    with pytest.raises(RetryableError) as err:
        register_account(client, "ops@example.com")
    assert err.value.reason == "acme:badNonce"


def test_preferred_chain_picks_the_alternate_root(make_pebble, pebble: PebbleStack) -> None:  # type: ignore[no-untyped-def]
    server = make_pebble(env={"PEBBLE_ALTERNATE_ROOTS": "1"})
    client = new_account_client(server)
    names = unique_names(1)
    default_chain, alternatives, _ = issue(client, names, pebble.http01)
    assert len(alternatives) == 1
    alt_top_issuer = x509.load_pem_x509_certificates(alternatives[0].encode())[-1].issuer
    alt_cn = alt_top_issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(alt_cn, str)
    default_top_issuer = x509.load_pem_x509_certificates(default_chain.encode())[-1].issuer
    assert default_top_issuer != alt_top_issuer

    chosen, others = wait_certificate(
        client, _valid_order_for(client, names, pebble.http01), preferred_chain=alt_cn
    )
    top = x509.load_pem_x509_certificates(chosen.encode())[-1]
    assert top.issuer == alt_top_issuer and len(others) == 1
    verify_chain(chosen, server.roots_pem(1), names[0])
    verify_chain(others[0], server.roots_pem(0), names[0])
    unknown, _ = wait_certificate(
        client, _valid_order_for(client, names, pebble.http01), preferred_chain="Nope CA"
    )
    assert x509.load_pem_x509_certificates(unknown.encode())[-1].issuer == default_top_issuer


def _valid_order_for(
    client: AcmeClient, names: list[str], responder: Http01Responder
) -> messages.OrderResource:
    csr_pem, _ = make_csr(names)
    order = client.new_order(csr_pem)
    for info in present_http01(client, order, responder):
        client.answer_challenge(info)
    status = wait_authorizations(client, order)
    return client.finalize(status.order, csr_pem)


def test_unreachable_ca_is_a_retryable_network_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        client = AcmeClient(
            f"https://127.0.0.1:{port}/dir", generate_account_key(), "https://x/acct/1", timeout=2.0
        )
        with pytest.raises(RetryableError) as err:
            client.new_order(make_csr(unique_names(1))[0])
    assert err.value.reason == "acme:network"
    assert "PRIVATE KEY" not in str(err.value)


def test_client_repr_and_messages_hold_no_key_material(pebble: PebbleStack) -> None:
    key = generate_account_key()
    client = AcmeClient(pebble.directory_url, key, verify=pebble.ca_bundle)
    account = register_account(client)
    text = repr(client)
    assert account.url in text
    d = key.key.private_numbers().private_value  # type: ignore[union-attr]
    assert str(d) not in text and format(d, "x") not in text
    bogus = dataclasses.replace(
        client.challenge_for(client.new_order(make_csr(unique_names(1))[0]).authorizations[0], "http-01"),
        url=pebble.directory_url.replace("/dir", "/chalZ/nope"),
    )
    with pytest.raises(PermanentError) as err:
        client.answer_challenge(bogus)
    assert "eyJ" not in str(err.value)  # no JWS (base64url JSON) in messages
    assert bogus.key_authorization not in repr(bogus)


# -- rough throughput -------------------------------------------------------------------------


def test_sequential_issuance_rate(pebble: PebbleStack, capsys: pytest.CaptureFixture[str]) -> None:
    client = new_account_client(pebble)
    count = 10
    start = time.perf_counter()
    for _ in range(count):
        fullchain, _, _ = issue(client, unique_names(1), pebble.http01)
        assert "BEGIN CERTIFICATE" in fullchain
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(
            f"\n[acme client] {count} sequential single-name certificates in {elapsed:.2f}s: "
            f"{count / elapsed:.1f} certs/s"
        )


# -- error mapping (pure; the CA cannot be made to send these) -------------------------------


def _problem(code: str, *, status: int = 400, retry_after: str | None = None, **kw: object) -> messages.Error:
    error = messages.Error.with_code(code, **kw)
    error.http_status = status  # type: ignore[attr-defined]  # as certqueue's network layer attaches
    error.retry_after = parse_retry_after(retry_after)  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize(
    ("code", "status", "kind", "reason"),
    [
        ("rateLimited", 429, RateLimited, "acme:rateLimited"),
        ("serverInternal", 500, RetryableError, "acme:server"),
        ("badNonce", 400, RetryableError, "acme:badNonce"),
        ("malformed", 503, RetryableError, "acme:server"),
        ("unauthorized", 403, PermanentError, "acme:unauthorized"),
        ("rejectedIdentifier", 400, PermanentError, "acme:rejectedIdentifier"),
        ("caa", 403, PermanentError, "acme:caa"),
        ("dns", 400, PermanentError, "acme:dns"),
        ("connection", 400, PermanentError, "acme:connection"),
        ("badCSR", 400, PermanentError, "acme:badCSR"),
        ("accountDoesNotExist", 400, PermanentError, "acme:accountDoesNotExist"),
        ("unsupportedIdentifier", 400, PermanentError, "acme:unsupportedIdentifier"),
        ("badRevocationReason", 400, PermanentError, "acme:badRevocationReason"),
        ("alreadyRevoked", 400, PermanentError, "acme:alreadyRevoked"),
    ],
)
def test_problem_documents_map_to_stable_reasons(code: str, status: int, kind: type, reason: str) -> None:
    mapped_error = map_exception(_problem(code, status=status, detail="for a.example.com"), action="step")
    assert type(mapped_error) is kind and mapped_error.reason == reason
    assert "a.example.com" in str(mapped_error)


def test_rate_limited_carries_retry_after_and_compound_takes_the_first_subproblem() -> None:
    limited = map_exception(_problem("rateLimited", status=429, retry_after="120"), action="new order")
    assert isinstance(limited, RateLimited) and limited.retry_after == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    compound = messages.Error.from_json(
        {
            "type": "urn:ietf:params:acme:error:compound",
            "detail": "several",
            "subproblems": [
                {
                    "type": "urn:ietf:params:acme:error:caa",
                    "detail": "CAA forbids",
                    "identifier": {"type": "dns", "value": "b.example.com"},
                }
            ],
        }
    )
    problem = problem_from_error(compound)
    assert (problem.reason, problem.identifier) == ("acme:caa", "b.example.com")
    foreign = messages.Error.from_json({"type": "about:blank", "detail": "x"})
    assert map_exception(foreign, action="step").reason == "acme:error"
