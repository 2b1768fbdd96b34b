"""ARI (RFC 9773) and ACME profiles end to end: a real Pebble 2.4 behind a directory that adds
``renewalInfo`` and ``meta.profiles`` (tests/fakes/acme_directory_proxy.py).

Certificates are issued by Pebble through ``AcmeClient`` reading the proxy's directory; renewal
information comes from the proxy, which answers from Pebble's own view of each certificate (valid,
revoked, unknown). In forward mode the proxy relays every ACME request to Pebble and keeps each signed
payload, which shows what the client really sent (``replaces``, ``profile``).

    .venv/bin/pytest tests/integration/test_ari_directory.py -q
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from acme import messages
from cryptography import x509

from certqueue.acme.account import generate_account_key, register_account
from certqueue.acme.ari import (
    AriUnavailable,
    ari_cert_id,
    choose_renewal_time,
    fetch_renewal_info,
    next_ari_check,
    renewal_info_url,
)
from certqueue.acme.client import AcmeClient, clear_directory_cache
from certqueue.acme.profiles import check_profile
from certqueue.errors import InvalidInput, PermanentError
from tests.conftest_pebble import PebbleStack
from tests.fakes.acme_directory_proxy import AcmeDirectoryProxy, serial_of_cert_id
from tests.integration.test_acme_client import issue, make_csr, unique_names

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LE_PROFILES = {
    "classic": "https://letsencrypt.org/docs/profiles#classic",
    "tlsserver": "https://letsencrypt.org/docs/profiles#tlsserver",
    "shortlived": "https://letsencrypt.org/docs/profiles#shortlived",
}

MakeProxy = Callable[..., AcmeDirectoryProxy]


@pytest.fixture
def make_proxy(pebble: PebbleStack, tmp_path: Path) -> Iterator[MakeProxy]:
    started: list[AcmeDirectoryProxy] = []

    def make(**kwargs: object) -> AcmeDirectoryProxy:
        proxy = AcmeDirectoryProxy(
            pebble.directory_url,
            pebble.ca_bundle,
            tmp_path / f"proxy{len(started)}",
            pebble_management_url=pebble.server.management_url,
            **kwargs,  # type: ignore[arg-type]
        )
        started.append(proxy)
        return proxy.start()

    yield make
    for proxy in started:
        proxy.stop()
    clear_directory_cache()


def client_for(proxy: AcmeDirectoryProxy) -> AcmeClient:
    client = AcmeClient(
        proxy.directory_url, generate_account_key(), verify=str(proxy.combined_ca_bundle), timeout=10
    )
    register_account(client, "ops@example.com")
    return client


def unique(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Payloads without repeats (a badNonce retry re-sends the same payload), in order."""
    out: list[dict[str, Any]] = []
    for p in payloads:
        if p not in out:
            out.append(p)
    return out


def leaf(fullchain: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(fullchain.encode())[0]


def test_issue_through_the_proxy_directory_then_renew_inside_the_window(
    pebble: PebbleStack, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy()
    client = client_for(proxy)
    directory = client.directory.to_partial_json()
    # only the directory and renewal information are the proxy's: everything else is Pebble's
    assert directory["renewalInfo"] == f"{proxy.url}/renewal-info"
    assert directory["newOrder"].startswith(pebble.directory_url.rsplit("/", 1)[0])

    fullchain, _, _ = issue(client, unique_names(2), pebble.http01)
    cert = leaf(fullchain)
    cert_id = ari_cert_id(fullchain)
    assert cert_id is not None and serial_of_cert_id(cert_id) == cert.serial_number
    url = renewal_info_url(client.directory, cert_id)
    assert url == f"{proxy.url}/renewal-info/{cert_id}"

    now = dt.datetime.now(dt.UTC)
    info = fetch_renewal_info(client, url, timeout=10)
    assert info.retry_after_seconds == 21600
    # the proxy suggests two days around two thirds of the lifetime Pebble gave the certificate
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    middle = cert.not_valid_before_utc + lifetime * 2 / 3
    assert abs((info.window_start - (middle - dt.timedelta(days=1))).total_seconds()) <= 1
    assert abs((info.window_end - (middle + dt.timedelta(days=1))).total_seconds()) <= 1
    rng = random.Random(42)
    for _ in range(200):
        when = choose_renewal_time(info, now, rng)
        assert info.window_start <= when < info.window_end
    assert next_ari_check(info, now) == now + dt.timedelta(hours=6)


def test_revoked_or_incident_window_in_the_past_renews_now(
    pebble: PebbleStack, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy()
    client = client_for(proxy)
    revoked, _, _ = issue(client, unique_names(1), pebble.http01)
    incident, _, _ = issue(client, unique_names(1), pebble.http01)

    client.revoke(revoked, 1)  # keyCompromise: the CA now wants it replaced at once
    revoked_id = ari_cert_id(revoked)
    assert revoked_id is not None
    now = dt.datetime.now(dt.UTC)
    info = fetch_renewal_info(client, f"{proxy.url}/renewal-info/{revoked_id}", timeout=10)
    assert info.window_end < now
    assert choose_renewal_time(info, now, random.Random(1)) == now

    incident_id = ari_cert_id(incident)
    assert incident_id is not None
    before = fetch_renewal_info(client, f"{proxy.url}/renewal-info/{incident_id}", timeout=10)
    assert choose_renewal_time(before, now, random.Random(1)) > now + dt.timedelta(days=1)
    proxy.mark_incident(incident_id, now)
    after = fetch_renewal_info(client, f"{proxy.url}/renewal-info/{incident_id}", timeout=10)
    assert after.explanation_url == "https://ca.test/incident/1"
    assert choose_renewal_time(after, now, random.Random(1)) == now


def test_unknown_certificate_is_a_long_term_error(make_proxy: MakeProxy) -> None:
    proxy = make_proxy()
    client = client_for(proxy)
    with pytest.raises(AriUnavailable) as err:
        fetch_renewal_info(
            client, f"{proxy.url}/renewal-info/aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE", timeout=10
        )
    assert (err.value.reason, err.value.temporary, err.value.retry_after) == ("ari:not_found", False, 21600)


def test_pebble_accepts_replaces_from_a_directory_with_renewal_info(
    pebble: PebbleStack, make_proxy: MakeProxy
) -> None:
    """Direct mode: the order goes straight to Pebble 2.4 with ``replaces`` in it, and is issued."""
    proxy = make_proxy()
    client = client_for(proxy)
    names = unique_names(1)
    first, _, _ = issue(client, names, pebble.http01)
    cert_id = ari_cert_id(first)
    assert cert_id is not None
    csr, _ = make_csr(names)
    order = client.new_order(csr, replaces=cert_id)
    assert order.uri and order.body.status == messages.STATUS_PENDING


def test_replaces_is_sent_only_when_the_directory_has_renewal_info(
    pebble: PebbleStack, make_proxy: MakeProxy
) -> None:
    with_ari = make_proxy(forward=True)
    client = client_for(with_ari)
    names = unique_names(1)
    first, _, _ = issue(client, names, pebble.http01)
    cert_id = ari_cert_id(first)
    assert cert_id is not None
    renewed, _, _ = issue_replacing(client, names, pebble, cert_id)
    assert leaf(renewed).serial_number != leaf(first).serial_number
    # Pebble rejects some nonces on purpose, so a request may be seen more than once
    payloads = unique(with_ari.new_order_payloads())
    assert len(payloads) == 2
    assert "replaces" not in payloads[0]
    assert payloads[1]["replaces"] == cert_id
    assert payloads[1]["identifiers"] == [{"type": "dns", "value": names[0]}]

    without_ari = make_proxy(forward=True, renewal_info=False)
    client2 = client_for(without_ari)
    assert "renewalInfo" not in client2.directory.to_partial_json()
    csr, _ = make_csr(names)
    client2.new_order(csr, replaces=cert_id)
    (payload,) = unique(without_ari.new_order_payloads())
    assert "replaces" not in payload


def issue_replacing(
    client: AcmeClient, names: list[str], pebble: PebbleStack, cert_id: str
) -> tuple[str, list[str], object]:
    """``issue`` with ``replaces`` on the order (the helper in test_acme_client sends none)."""
    from tests.integration.test_acme_client import present_http01, wait_authorizations, wait_certificate

    csr, key = make_csr(names)
    order = client.new_order(csr, replaces=cert_id)
    for info in present_http01(client, order, pebble.http01):
        client.answer_challenge(info)
    status = wait_authorizations(client, order)
    assert status.status == "valid", status.problems
    order = client.finalize(status.order, csr)
    fullchain, alternatives = wait_certificate(client, order)
    return fullchain, alternatives, key


def test_profiles_checked_before_the_order_and_sent_when_offered(
    pebble: PebbleStack, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy(forward=True, profiles=LE_PROFILES)
    client = client_for(proxy)
    names = unique_names(3)
    check_profile(client.directory, "shortlived", names)
    with pytest.raises(InvalidInput) as err:
        check_profile(client.directory, "shortlived", unique_names(26))
    assert err.value.reason == "profile:too_many_names"
    with pytest.raises(InvalidInput) as err:
        check_profile(client.directory, "tlsclient", names)
    assert err.value.reason == "profile:not_offered"

    csr, _ = make_csr(names)
    order = client.new_order(csr, profile="shortlived")
    assert order.uri  # Pebble 2.4 ignores the field it does not know and creates the order
    (payload,) = unique(proxy.new_order_payloads())
    assert payload["profile"] == "shortlived"


def test_a_ca_without_profiles_is_refused_before_the_order(
    pebble: PebbleStack, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy(forward=True)
    client = client_for(proxy)
    names = unique_names(1)
    with pytest.raises(InvalidInput) as err:
        check_profile(client.directory, "shortlived", names)
    assert err.value.reason == "profile:not_offered"
    csr, _ = make_csr(names)
    with pytest.raises(PermanentError) as perm:
        client.new_order(csr, profile="shortlived")
    assert perm.value.reason == "acme:invalidProfile"
    assert proxy.new_order_payloads() == []  # nothing reached the CA


def test_already_replaced_is_answered_by_ordering_again_without_replaces(
    pebble: PebbleStack, make_proxy: MakeProxy
) -> None:
    """The CA says the certificate already has a replacement (RFC 9773 ``alreadyReplaced``, the
    proxy's answer: Pebble 2.4 has no ARI): the client orders again without ``replaces``, once,
    after letting the caller charge the now non-ARI order to its budgets."""
    proxy = make_proxy(forward=True)
    client = client_for(proxy)
    names = unique_names(1)
    first, _, _ = issue(client, names, pebble.http01)
    cert_id = ari_cert_id(first)
    assert cert_id is not None
    proxy.already_replaced.add(cert_id)
    proxy.payloads.clear()
    charged: list[str] = []
    csr, _ = make_csr(names)
    order = client.new_order(csr, replaces=cert_id, on_already_replaced=lambda: charged.append("budget"))
    assert order.uri and order.body.identifiers[0].value == names[0]
    assert charged == ["budget"]
    sent = [p.get("replaces") for p in unique(proxy.new_order_payloads())]
    assert sent == [cert_id, None]  # the refused replacement, then the retry without it
    # a caller that must wait instead (over budget) raises: no second order is sent
    proxy.payloads.clear()

    def over_budget() -> None:
        raise RuntimeError("over budget")

    with pytest.raises(RuntimeError, match="over budget"):
        client.new_order(csr, replaces=cert_id, on_already_replaced=over_budget)
    assert [p.get("replaces") for p in unique(proxy.new_order_payloads())] == [cert_id]
