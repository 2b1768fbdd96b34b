"""Account key rollover and deactivation (RFC 8555 sections 7.3.5, 7.3.6) against Pebble, with a real
worker process that cached the old key.

* ``certqueue accounts rollover``: the CA takes the new key, the database stores it encrypted, an
  order opened with the old key carries on with the new one, a renewal by the running worker (which
  had the old key cached) succeeds, and Pebble refuses the old key from then on;
* a rollover whose answer was lost (the CA switched, the database did not) is finished by running
  it again;
* ``certqueue accounts deactivate``: Pebble refuses the account, and a new certificate for it fails
  with a clear reason instead of registering behind the operator's back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from acme import messages
from sqlalchemy import select

from certqueue import crypto
from certqueue.acme.account import account_key_from_pem, change_key, find_account, key_thumbprint
from certqueue.acme.accounts import account_aad, begin_rollover, make_client
from certqueue.certificates import keystore
from certqueue.db import session_scope
from certqueue.errors import PermanentError
from certqueue.models import Account, AccountKeyRollover, Certificate, Event, Issuance
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def p(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    why = services_available()
    if why:
        pytest.fail(why)
    pipeline = build_pipeline(tmp_path_factory.mktemp("rollover"), backend="postgres", pools=("acme",))
    yield pipeline
    teardown_pipeline(pipeline)


def _account() -> Account:
    with session_scope(write=False) as s:
        (acct,) = s.execute(select(Account)).scalars().all()
        s.expunge(acct)
        return acct


def _key(acct: Account):
    return account_key_from_pem(
        keystore().decrypt(acct.key_enc, account_aad(acct.directory_url, acct.contact))
    )


def _serial(cid: str) -> str:
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        return s.get(Issuance, c.current_issuance_id).serial


def _refused(client) -> PermanentError:
    """A signed request (POST to the account URL) from ``client``: the CA's refusal."""
    with pytest.raises(PermanentError) as info:
        from certqueue.acme.errors import mapped

        with mapped("probe"):
            client.acme._post(client.account_url, messages.UpdateRegistration())
    return info.value


def test_rollover_then_renewal_with_the_new_key_and_the_old_key_refused(p: Pipeline) -> None:
    cid = p.request(["rollover.example.test"])
    p.wait_state(cid, "ACTIVE")  # the worker registered the account and cached its key
    first_serial = _serial(cid)
    acct = _account()
    old_key = _key(acct)

    # an order opened with the old key, in flight across the rollover
    old_client = make_client(acct.directory_url, old_key, acct.account_url)
    csr = crypto.make_csr(crypto.new_private_key_pem(), ["inflight.example.test"])
    order = old_client.new_order(csr)

    out = p.stack.cli("accounts", "rollover", str(acct.id), "--key-type", "ec384", "--json")
    result = json.loads(out.stdout)
    assert result["old_key_thumbprint"] == key_thumbprint(old_key) and not result["resumed"]
    after = _account()
    new_key = _key(after)
    assert key_thumbprint(new_key) == result["new_key_thumbprint"] != result["old_key_thumbprint"]
    assert after.key_type == "ec384" and after.key_changed_at is not None
    assert after.account_url == acct.account_url  # the same account, a new key
    assert b"PRIVATE KEY" not in after.key_enc
    with session_scope(write=False) as s:
        row = s.get(AccountKeyRollover, result["rollover_id"])
        assert row.status == "done" and row.key_enc is None  # the key moved into accounts.key_enc
        ev = s.execute(select(Event).where(Event.kind == "account")).scalars().one()
        assert ev.reason == "key_rollover" and ev.data["new_key"] == result["new_key_thumbprint"]

    # the CA: the old key is refused, for signed requests and for finding the account
    assert _refused(old_client).reason in ("acme:malformed", "acme:unauthorized")
    assert find_account(make_client(acct.directory_url, old_key, None)) is None
    found = find_account(make_client(acct.directory_url, new_key, None))
    assert found is not None and found.url == acct.account_url

    # the in-flight order carries on, read with the new key
    new_client = make_client(acct.directory_url, new_key, acct.account_url)
    again = new_client.refresh_order(order)
    assert again.uri == order.uri and len(again.authorizations) == 1

    # the running worker cached the old key: its renewal is refused once, reloads, and succeeds
    p.send("certqueue.renew", {"v": 1, "certificate_id": cid, "force": True})
    p.wait_for(lambda: p.state(cid) == "ACTIVE" and _serial(cid) != first_serial, what="renewal", timeout=90)
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        assert c.last_error is None


def test_a_rollover_whose_answer_was_lost_is_finished_by_running_it_again(p: Pipeline) -> None:
    acct = _account()
    pending = begin_rollover(acct.id)  # step 1 committed: the new key is stored, pending
    # the CA switches (as if the answer to step 2 never came back)
    change_key(make_client(acct.directory_url, pending.old_key, acct.account_url), pending.new_key)
    assert key_thumbprint(_key(_account())) == pending.old_thumbprint  # the database lags behind

    out = json.loads(p.stack.cli("accounts", "rollover", str(acct.id), "--json").stdout)
    assert out["resumed"] and out["rollover_id"] == pending.rollover_id
    assert out["new_key_thumbprint"] == pending.new_thumbprint == key_thumbprint(_key(_account()))


def test_bad_account_ids_are_refused_and_nothing_written(p: Pipeline) -> None:
    before = p.count(AccountKeyRollover)
    r = p.stack.cli("accounts", "rollover", "999999", check=False)
    assert r.returncode == 3 and "no ACME account 999999" in r.stderr
    r = p.stack.cli("accounts", "deactivate", str(_account().id), check=False)
    assert r.returncode == 2 and "--yes" in r.stderr
    assert p.count(AccountKeyRollover) == before and _account().status == "valid"


def test_deactivation_is_final_at_the_ca_and_in_certqueue(p: Pipeline) -> None:
    acct = _account()
    key = _key(acct)
    out = p.stack.cli("accounts", "deactivate", str(acct.id), "--yes")
    assert "deactivated" in out.stdout
    assert _account().status == "deactivated"
    assert _refused(make_client(acct.directory_url, key, acct.account_url)).reason == "acme:unauthorized"
    listed = json.loads(p.stack.cli("accounts", "list", "--json").stdout)
    assert [(a["id"], a["status"]) for a in listed] == [(acct.id, "deactivated")]
    r = p.stack.cli("accounts", "rollover", str(acct.id), check=False)
    assert r.returncode == 2 and "deactivated" in r.stderr

    # a new certificate for this CA and contact: a clear failure, no silent second account
    cid = p.request(["after-deactivation.example.test"])
    p.wait_state(cid, "FAILED", timeout=90)
    with session_scope(write=False) as s:
        assert s.get(Certificate, cid).last_error == "acme:accountDeactivated"
    assert p.count(Account) == 1
