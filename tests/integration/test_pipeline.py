"""The issuance pipeline end to end: Pebble, PostgreSQL, Redis, real worker processes."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery import _state as celery_state
from sqlalchemy import select

from certqueue import certificates, crypto
from certqueue.celery_app import lazy_app
from certqueue.db import session_scope
from certqueue.models import Certificate, Challenge, Event, Http01Token, Issuance

pytestmark = pytest.mark.integration


def _issuance(cid: str) -> Issuance:
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        assert c is not None and c.current_issuance_id is not None
        iss = s.get(Issuance, c.current_issuance_id)
        assert iss is not None
        return iss


def _verify(pipeline, cid: str, names: list[str]) -> Issuance:
    iss = _issuance(cid)
    info = crypto.cert_info(iss.cert_pem)
    assert sorted(info.names) == sorted(names)
    chain = crypto.split_pem_chain(iss.chain_pem)
    crypto.verify_chain(iss.cert_pem, chain, [pipeline.pebble.roots_pem()], name=names[0])
    with session_scope(write=False) as s:
        key = certificates.decrypt_key(s.get(Issuance, iss.id))
    assert crypto.key_matches_certificate(key, iss.cert_pem)
    assert b"PRIVATE KEY" not in iss.key_enc
    return iss


def test_single_name_certificate(pg_pipeline):
    cid = pg_pipeline.request(["single.example.test"])
    pg_pipeline.wait_state(cid, "ACTIVE")
    _verify(pg_pipeline, cid, ["single.example.test"])
    with session_scope(write=False) as s:
        transitions = [
            (e.from_state, e.to_state)
            for e in s.execute(
                select(Event)
                .where(Event.certificate_id == cid, Event.kind == "transition")
                .order_by(Event.id)
            ).scalars()
        ]
        c = s.get(Certificate, cid)
        assert c.renew_at is not None
    assert transitions == [("REQUESTED", "ISSUING"), ("ISSUING", "ISSUED"), ("ISSUED", "ACTIVE")]
    # tokens are gone after validation, the challenge rows say cleaned
    assert pg_pipeline.count(Http01Token, Http01Token.certificate_id == cid) == 0
    assert pg_pipeline.count(Challenge, Challenge.certificate_id == cid, Challenge.status != "cleaned") == 0


def test_fifty_names(pg_pipeline):
    names = [f"n{i:02d}.fifty.example.test" for i in range(50)]
    cid = pg_pipeline.request(names)
    pg_pipeline.wait_state(cid, "ACTIVE", timeout=120)
    _verify(pg_pipeline, cid, names)
    assert len(pg_pipeline.orders(cid)) == 1


def test_renewal_keeps_old_issuance_and_rotates_key(pg_pipeline):
    cid = pg_pipeline.request(["renew.example.test"])
    pg_pipeline.wait_state(cid, "ACTIVE")
    first = _issuance(cid)
    pg_pipeline.send("certqueue.renew", {"v": 1, "certificate_id": cid, "force": True})
    pg_pipeline.wait_for(
        lambda: _issuance(cid).id != first.id and pg_pipeline.state(cid) == "ACTIVE", what="renewal"
    )
    second = _verify(pg_pipeline, cid, ["renew.example.test"])
    assert second.serial != first.serial
    assert crypto.cert_info(second.cert_pem).fingerprint_sha256 != first.fingerprint
    with session_scope(write=False) as s:
        old = s.get(Issuance, first.id)
        assert old is not None  # kept for audit and revocation
        k1 = certificates.decrypt_key(old)
        k2 = certificates.decrypt_key(s.get(Issuance, second.id))
    assert k1 != k2  # a fresh key on renewal
    assert [o.purpose for o in pg_pipeline.orders(cid)] == ["issue", "renew"]
    assert (
        pg_pipeline.count(
            Event, Event.certificate_id == cid, Event.kind == "renewal", Event.reason == "success"
        )
        == 1
    )


def test_renew_not_due_does_nothing(pg_pipeline):
    cid = pg_pipeline.request(["notdue.example.test"])
    pg_pipeline.wait_state(cid, "ACTIVE")
    task_id = pg_pipeline.send("certqueue.renew", {"v": 1, "certificate_id": cid})
    from certqueue.celery_app import lazy_app

    assert lazy_app.get().AsyncResult(task_id).get(timeout=30)["status"] == "not_due"
    assert len(pg_pipeline.orders(cid)) == 1


def test_revocation_reaches_the_ca(pg_pipeline):
    cid = pg_pipeline.request(["revoke.example.test"])
    pg_pipeline.wait_state(cid, "ACTIVE")
    iss = _issuance(cid)
    pg_pipeline.send("certqueue.revoke", {"v": 1, "certificate_id": cid, "reason": "keyCompromise"})
    pg_pipeline.wait_state(cid, "REVOKED")
    status = pg_pipeline.pebble.cert_status(iss.serial)
    assert status["Status"].lower() == "revoked"
    assert int(status.get("Reason", -1)) == 1


def test_revocation_reason_the_ca_refuses_sends_nothing(pg_pipeline):
    cid = pg_pipeline.request(["badreason.example.test"])
    pg_pipeline.wait_state(cid, "ACTIVE")
    task_id = pg_pipeline.send(
        "certqueue.revoke", {"v": 1, "certificate_id": cid, "reason": "affiliationChanged"}
    )
    from certqueue.celery_app import lazy_app

    with pytest.raises(Exception, match="does not accept revocation reason"):
        lazy_app.get().AsyncResult(task_id).get(timeout=30)
    assert pg_pipeline.state(cid) == "ACTIVE"
    iss = _issuance(cid)
    assert pg_pipeline.pebble.cert_status(iss.serial)["Status"].lower() == "valid"


def test_redelivered_issue_message_gives_one_order(pg_pipeline):
    with session_scope() as s:
        req = certificates.CertificateRequest.build(domains=["twice.example.test"])
        cert, _ = certificates.create_certificate(s, req)
        cid = cert.id
    for _ in range(3):
        pg_pipeline.send("certqueue.issue", {"v": 1, "certificate_id": cid})
    pg_pipeline.wait_state(cid, "ACTIVE")
    orders = pg_pipeline.orders(cid)
    assert len(orders) == 1
    assert pg_pipeline.count(Issuance, Issuance.certificate_id == cid) == 1


def test_concurrent_duplicate_requests_give_one_certificate(pg_pipeline):
    payload = {"v": 1, "request": {"domains": ["dup.example.test", "www.dup.example.test"]}}
    ids = [pg_pipeline.send("certqueue.issue", payload) for _ in range(4)]
    from certqueue.celery_app import lazy_app

    results = [lazy_app.get().AsyncResult(i).get(timeout=60) for i in ids]
    cids = {r["certificate_id"] for r in results if isinstance(r, dict) and "certificate_id" in r}
    assert len(cids) == 1, results
    cid = cids.pop()
    pg_pipeline.wait_state(cid, "ACTIVE")
    assert len(pg_pipeline.orders(cid)) == 1
    with session_scope(write=False) as s:
        rows = s.execute(select(Certificate).where(Certificate.domains.is_not(None))).scalars().all()
        assert sum(1 for c in rows if sorted(c.domains) == ["dup.example.test", "www.dup.example.test"]) == 1


def test_bad_payload_is_a_failed_job_that_writes_nothing(pg_pipeline):
    from certqueue.celery_app import lazy_app

    before = pg_pipeline.count(Certificate)
    for payload in (
        {"v": 1, "request": {"domains": ["bad..example.test"]}},
        {"v": 2, "certificate_id": "cert_aaaaaaaaaaaaaaaaaaaa"},
        {"v": 1, "request": {"domains": ["ok.example.test"], "bogus": 1}},
        "not a dict",
    ):
        task_id = pg_pipeline.send("certqueue.issue", payload)
        with pytest.raises(Exception):
            lazy_app.get().AsyncResult(task_id).get(timeout=30)
        assert lazy_app.get().AsyncResult(task_id).state == "FAILURE"
    assert pg_pipeline.count(Certificate) == before


def test_rejected_challenge_fails_with_stable_reason_and_cleans_up(pg_pipeline):
    # the CA resolves this name to an address where nothing listens: validation fails
    pg_pipeline.dns._post("/add-a", {"host": "unreachable.example.test", "addresses": ["127.0.0.3"]})
    cid = pg_pipeline.request(["unreachable.example.test"])
    pg_pipeline.wait_state(cid, "FAILED", timeout=90)
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        assert c.last_error in ("acme:connection", "acme:unauthorized")
        ev = (
            s.execute(select(Event).where(Event.certificate_id == cid, Event.kind == "validation_error"))
            .scalars()
            .one()
        )
        assert ev.data["type"] == "http-01"
    assert pg_pipeline.count(Http01Token, Http01Token.certificate_id == cid) == 0
    assert pg_pipeline.count(Challenge, Challenge.certificate_id == cid, Challenge.status != "cleaned") == 0
    assert pg_pipeline.orders(cid)[0].status == "invalid"


def test_sigkill_of_acme_worker_mid_order_resumes_same_order(pg_pipeline):
    """The failpoint holds validate after the order is stored and before finalize; SIGKILL of the
    pool process then makes the worker re-queue the message (reject_on_worker_lost), and the new
    run resumes the stored order instead of opening a second one."""
    stack = pg_pipeline.stack
    stack.stop("worker-acme")
    slow = stack.start_worker(
        "acme",
        name="worker-acme-slow",
        # the killed step's lease on the order runs out after 10 s (shipped: 60), then the new run
        # takes the order over
        extra_env={
            "CERTQUEUE_FAILPOINTS": "validate.before_finalize=sleep:60",
            "CERTQUEUE_AUTOMATION__ORDER_LEASE_SECONDS": "10",
        },
    )
    try:
        cid = pg_pipeline.request(["killed.example.test"])
        # the order is "ready" at the CA once validation passed; validate then sleeps in the failpoint
        pg_pipeline.wait_for(lambda: _order_ready_at_ca(pg_pipeline, cid), timeout=60, what="order ready")
        order_url = pg_pipeline.orders(cid)[0].order_url
        assert pg_pipeline.state(cid) == "ISSUING"
        assert stack.kill_children(slow), "no pool process to kill"
    finally:
        stack.stop(slow)
    stack.start_worker("acme")
    pg_pipeline.wait_state(cid, "ACTIVE", timeout=90)
    assert [o.order_url for o in pg_pipeline.orders(cid)] == [order_url]
    assert pg_pipeline.count(Issuance, Issuance.certificate_id == cid) == 1


def _order_ready_at_ca(pipeline, cid: str) -> bool:
    orders = pipeline.orders(cid)
    if not orders or not orders[0].order_url:
        return False
    from certqueue.acme.accounts import client_for

    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        client, _ = client_for(s, c.directory_url, c.email)
    from certqueue.acme.client import order_from_json

    body, _ = client._fetch_order_body(order_from_json(orders[0].order_json))
    return str(getattr(body.status, "name", body.status)) == "ready"


def private_fragments(key_pem: bytes) -> list[str]:
    """Encodings of the private scalar (never the public key, which CSRs carry legitimately)."""
    import base64

    key = crypto.load_private_key(key_pem)
    numbers = key.private_numbers()
    secret = getattr(numbers, "private_value", None) or getattr(numbers, "d")
    raw = secret.to_bytes((secret.bit_length() + 7) // 8, "big")
    return [
        raw.hex()[:32],
        base64.b64encode(raw).decode()[:24],
        base64.urlsafe_b64encode(raw).decode().rstrip("=")[:24],
    ]


def test_no_private_key_in_logs(pg_pipeline):
    cid = pg_pipeline.request(["logs.example.test"])
    pg_pipeline.wait_state(cid, "ACTIVE")
    logs = pg_pipeline.stack.all_logs()
    assert "PRIVATE KEY" not in logs
    checked = 0
    with session_scope(write=False) as s:
        for iss in s.execute(select(Issuance)).scalars():
            for frag in private_fragments(certificates.decrypt_key(iss)):
                assert frag not in logs, f"private key material of issuance {iss.id} in logs"
            checked += 1
    assert checked >= 1
    # the logs are DEBUG and did record the pipeline (so the scan above looked at something)
    assert re.search(r"certqueue\.acme\.issue_batch\[.*\] succeeded", logs)
    assert "JWS payload" in logs


def test_parallel_requests_all_complete(pg_pipeline):
    """Ten requests from ten threads at once: every request returns (a thread's exception fails the
    test, it is not lost in the thread), ten distinct certificates exist, and each one is ACTIVE with
    exactly one order and one issuance (no request was dropped, merged or ordered twice)."""
    n = 10
    names = [f"p{i}.parallel.example.test" for i in range(n)]
    start = threading.Barrier(n)

    def one(name: str) -> str:
        start.wait(timeout=30)  # really at once
        return pg_pipeline.request([name])

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(one, name) for name in names]
        ids = [f.result(timeout=120) for f in futures]  # re-raises whatever a thread raised
    assert len(ids) == n and len(set(ids)) == n
    for cid in ids:
        pg_pipeline.wait_state(cid, "ACTIVE", timeout=120)
    with session_scope(write=False) as s:
        rows = s.execute(select(Certificate).where(Certificate.id.in_(ids))).scalars().all()
        assert sorted(r.domains[0] for r in rows) == names
        assert {r.state for r in rows} == {"ACTIVE"}
    for cid in ids:
        assert len(pg_pipeline.orders(cid)) == 1, f"{cid} was ordered more than once"
        assert pg_pipeline.count(Issuance, Issuance.certificate_id == cid) == 1


def test_a_batch_validates_its_new_order_without_reading_or_leasing_it_again(pg_pipeline):
    """``issue_batch`` run in this process (the acme worker stopped), every SQL statement counted:
    the start step leaves its order's lease and what it read to the validation that follows in the
    same task, so the order is leased once (its row is inserted leased), the certificate row locked
    three times (the start, the start's write-back after newOrder, the validation's write-back, each
    write-back reading the order in the same statement) and each challenge row written
    once after its insert; the certificate ends ACTIVE with one order."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from certqueue.tasks.acme import issue_batch

    stack = pg_pipeline.stack
    stack.stop("worker-acme")
    statements: list[tuple[str, object]] = []
    lock = threading.Lock()

    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        with lock:
            statements.append((" ".join(statement.split()), parameters))

    try:
        with session_scope() as s:
            req = certificates.CertificateRequest.build(
                domains=["handoff.example.test", "www.handoff.example.test"]
            )
            cert, _ = certificates.create_certificate(s, req, actor="test")
            cid = cert.id
        event.listen(Engine, "before_cursor_execute", count)
        try:
            out = issue_batch.run([{"certificate_id": cid, "purpose": "issue"}])
        finally:
            event.remove(Engine, "before_cursor_execute", count)
        assert out == {"certificates": 1, "outcomes": {"active": 1}}
    finally:
        stack.start_worker("acme")
    assert pg_pipeline.state(cid) == "ACTIVE"
    assert len(pg_pipeline.orders(cid)) == 1

    def taken(params: object) -> bool:
        return isinstance(params, dict) and params.get("lease_token") is not None

    # the new order's row is inserted with its lease: no UPDATE takes it afterwards
    inserted_leased = [p for sql, p in statements if sql.startswith("INSERT INTO orders") and taken(p)]
    assert len(inserted_leased) == 1, [
        sql[:80] for sql, _ in statements if sql.startswith("INSERT INTO orders")
    ]
    lease_takes = [p for sql, p in statements if sql.startswith("UPDATE orders") and taken(p)]
    assert lease_takes == [], [sql[:80] for sql, _ in statements if sql.startswith("UPDATE orders")]
    import sys

    for sql, _ in statements:
        print(sql[:150], file=sys.stderr)
    locks = [
        sql
        for sql, _ in statements
        if sql.startswith("SELECT") and "FROM certificates" in sql and "FOR UPDATE" in sql
    ]
    assert len(locks) == 3, locks

    def rows(prefix: str) -> int:  # a flush of several rows may be one executemany
        return sum(
            len(p) if isinstance(p, list | tuple) else 1 for sql, p in statements if sql.startswith(prefix)
        )

    def count(prefix: str) -> int:
        return sum(1 for sql, _ in statements if sql.startswith(prefix))

    # both challenges in one INSERT (ids returned), both tokens in one more; order rows: written
    # with the URL, with the challenges, and with the issuance (the lease rides on those)
    assert count("INSERT INTO challenges") == 1
    assert count("INSERT INTO http01_tokens") == 1
    assert count("UPDATE orders") == 3, [sql[:80] for sql, _ in statements if sql.startswith("UPDATE orders")]
    # the order read on its own once (is there an open one?); the write-backs read it in their lock
    assert count("SELECT orders.") == 1
    # inserted as presented, then written once: cleaned (never presented -> answered -> valid -> cleaned)
    assert rows("UPDATE challenges") == 2
    with session_scope(write=False) as s:
        chs = s.execute(select(Challenge).where(Challenge.certificate_id == cid)).scalars().all()
        assert {c.status for c in chs} == {"cleaned"}
    assert pg_pipeline.count(Http01Token, Http01Token.certificate_id == cid) == 0
    _verify(pg_pipeline, cid, ["handoff.example.test", "www.handoff.example.test"])


def _run_batch_counted(pg_pipeline, jobs: list[dict]) -> tuple[dict, list[tuple[str, object]]]:
    """``issue_batch`` with its shared phases (``automation.batch_phases``) in this process (the
    acme worker stopped meanwhile), every SQL statement it sends recorded."""
    from unittest import mock

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from certqueue.tasks import acme as acme_tasks

    def issue_batch_run(jobs: list[dict]) -> dict:
        with mock.patch.object(acme_tasks, "_phased", lambda: True):
            return acme_tasks.issue_batch.run(jobs)

    statements: list[tuple[str, object]] = []
    lock = threading.Lock()

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        with lock:
            statements.append((" ".join(statement.split()), parameters))

    # what the batch sends goes to the pipeline's broker, as from a worker (the current app's)
    previous = celery_state.get_current_app()
    lazy_app.get().set_current()
    pg_pipeline.stack.stop("worker-acme")
    try:
        event.listen(Engine, "before_cursor_execute", record)
        try:
            out = issue_batch_run(jobs)
        finally:
            event.remove(Engine, "before_cursor_execute", record)
    finally:
        previous.set_current()
        pg_pipeline.stack.start_worker("acme")
    return out, statements


def _new_certificates(prefix: str, n: int) -> list[str]:
    ids = []
    with session_scope() as s:
        for i in range(n):
            req = certificates.CertificateRequest.build(
                domains=[f"{prefix}{i}.example.test", f"www.{prefix}{i}.example.test"]
            )
            cert, _ = certificates.create_certificate(s, req, actor="test")
            ids.append(cert.id)
    return ids


def _count(statements: list[tuple[str, object]], prefix: str) -> int:
    return sum(1 for sql, _ in statements if sql.startswith(prefix))


def _cert_locks(statements: list[tuple[str, object]]) -> int:
    return sum(
        1
        for sql, _ in statements
        if sql.startswith("SELECT") and "FROM certificates" in sql and "FOR UPDATE" in sql
    )


def test_a_batch_starts_its_new_orders_together(pg_pipeline):
    """Four new HTTP-01 certificates and one unknown id in one batch: the four are started in two
    shared transactions and their issuances recorded in a third (their rows locked by one statement
    in each; their orders, challenges, tokens and issuances written by one INSERT each for the whole
    batch);
    the unknown id takes the single-certificate start and is reported gone."""
    ids = _new_certificates("together", 4)
    jobs = [{"certificate_id": cid, "purpose": "issue"} for cid in ids]
    jobs.insert(2, {"certificate_id": "cert_aaaaaaaaaaaaaaaaaaaa", "purpose": "issue"})
    out, statements = _run_batch_counted(pg_pipeline, jobs)
    assert out == {"certificates": 5, "outcomes": {"active": 4, "gone": 1}}, out
    for i, cid in enumerate(ids):
        assert pg_pipeline.state(cid) == "ACTIVE"
        assert len(pg_pipeline.orders(cid)) == 1
        _verify(pg_pipeline, cid, [f"together{i}.example.test", f"www.together{i}.example.test"])
    # one INSERT of the four orders, one of their eight challenges, one of their tokens
    assert _count(statements, "INSERT INTO orders") == 1
    assert _count(statements, "INSERT INTO challenges") == 1
    assert _count(statements, "INSERT INTO http01_tokens") == 1
    # the batch's three shared locks (Pebble validates at once: no order is left to go on alone),
    # and the unknown id's own start
    assert _cert_locks(statements) == 3 + 1
    # the four orders' challenges read once, by the shared write-back, which stores their four
    # issuances with one INSERT and deletes their tokens with one DELETE
    assert _count(statements, "SELECT challenges.") == 1
    assert _count(statements, "INSERT INTO issuances") == 1
    assert _count(statements, "DELETE FROM http01_tokens") == 1
    # the open orders at the CA counted once for the batch, not once per certificate
    assert _count(statements, "SELECT count(*)") <= 1
    # their issue requests answered by one UPDATE
    with session_scope(write=False) as s:
        from certqueue.models import Intent

        open_ = s.execute(select(Intent).where(Intent.certificate_id.in_(ids), Intent.status != "done"))
        assert open_.scalars().all() == []


def _batch_failing_at(pg_pipeline, monkeypatch, point: str, prefix: str):
    """Two new certificates through ``issue_batch`` with the failpoint ``point`` raising in this
    process: their ids, the batch's answer and its statements."""
    from certqueue import failpoints

    monkeypatch.setattr(failpoints, "_points", {point: "error"})
    ids = _new_certificates(prefix, 2)
    out, statements = _run_batch_counted(
        pg_pipeline, [{"certificate_id": c, "purpose": "issue"} for c in ids]
    )
    return ids, out, statements


def test_a_batch_whose_shared_start_fails_starts_each_certificate_alone(pg_pipeline, monkeypatch):
    """The shared first transaction fails after every order was prepared: it is rolled back
    (nothing of it written) and each certificate is started on its own, once."""
    ids, out, statements = _batch_failing_at(pg_pipeline, monkeypatch, "batch.prepare", "alone")
    assert out == {"certificates": 2, "outcomes": {"active": 2}}, out
    for cid in ids:
        assert pg_pipeline.state(cid) == "ACTIVE"
        assert len(pg_pipeline.orders(cid)) == 1  # the rolled-back rows left nothing behind
    # the shared transaction failed before its one flush; then each certificate's own start
    assert _count(statements, "INSERT INTO orders") == 2
    assert _cert_locks(statements) == 1 + 2 * 3  # the shared lock; each start, write-back, validation


def test_a_batch_whose_record_fails_starts_each_placed_order_alone(pg_pipeline, monkeypatch):
    """The CA created the orders and their URLs are stored, then the shared write of the
    challenges fails: it is rolled back, each lease is given back, and each certificate takes the
    single start step in the same task, which resumes the same order (none is ordered twice)."""
    ids, out, statements = _batch_failing_at(pg_pipeline, monkeypatch, "batch.record", "handed")
    assert out == {"certificates": 2, "outcomes": {"active": 2}}, out
    for cid in ids:
        assert pg_pipeline.state(cid) == "ACTIVE"
        (order,) = pg_pipeline.orders(cid)  # resumed, not ordered again
        assert order.order_url and order.lease_token is None
    assert _count(statements, "INSERT INTO orders") == 1  # the shared one; the resumes add none
    assert pg_pipeline.count(Http01Token, Http01Token.certificate_id.in_(ids)) == 0


def test_a_batch_whose_shared_write_back_fails_validates_each_certificate_alone(pg_pipeline, monkeypatch):
    """The CA issued every order, then the shared write of the issuances fails: it is rolled back,
    every lease is given back, and each certificate's validation runs alone (the order is valid at
    the CA: it is downloaded and stored), once."""
    ids, out, statements = _batch_failing_at(pg_pipeline, monkeypatch, "batch.write", "written")
    assert out == {"certificates": 2, "outcomes": {"active": 2}}, out
    for i, cid in enumerate(ids):
        assert pg_pipeline.state(cid) == "ACTIVE"
        (order,) = pg_pipeline.orders(cid)
        assert order.lease_token is None
        assert pg_pipeline.count(Issuance, Issuance.certificate_id == cid) == 1
        _verify(pg_pipeline, cid, [f"written{i}.example.test", f"www.written{i}.example.test"])
    # the failed shared write-back, then each validation's own read and write-back
    assert _cert_locks(statements) == 3 + 2 * 2


def test_embedded_default_pipeline(embedded_pipeline):
    cid = embedded_pipeline.request(["embedded.example.test", "www.embedded.example.test"])
    embedded_pipeline.wait_state(cid, "ACTIVE", timeout=90)
    _verify(embedded_pipeline, cid, ["embedded.example.test", "www.embedded.example.test"])
    embedded_pipeline.send("certqueue.renew", {"v": 1, "certificate_id": cid, "force": True})
    embedded_pipeline.wait_for(
        lambda: (
            embedded_pipeline.count(Issuance, Issuance.certificate_id == cid) == 2
            and embedded_pipeline.state(cid) == "ACTIVE"
        ),
        timeout=90,
        what="renewal",
    )
    embedded_pipeline.send("certqueue.revoke", {"v": 1, "certificate_id": cid, "reason": "superseded"})
    embedded_pipeline.wait_state(cid, "REVOKED", timeout=60)
