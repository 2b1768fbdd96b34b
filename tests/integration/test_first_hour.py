"""The first hour of a new user (issue 18): 60 certificates under one registered domain, asked for
on the embedded default (SQLite, the filesystem broker, one `certqueue worker --pool all`) against a
private ACME CA (Pebble), with the shipped rate-limit settings.

Let's Encrypt's 50 certificates per registered domain apply to Let's Encrypt's directories only:
here every certificate becomes ACTIVE and nothing is deferred. Most are asked for in one command
(`issue --from-file`), a few one by one (`certqueue issue`), as a shell loop would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from certqueue.db import session_scope
from certqueue.models import Certificate, Event
from tests.conftest_stack import Pipeline, build_pipeline, teardown_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

N = 60
ONE_BY_ONE = 5


@pytest.fixture
def first_hour(tmp_path: Path) -> Iterator[Pipeline]:
    # the shipped budgets, not the test stack's raised ones: what a new user runs with
    shipped = {
        "CERTQUEUE_RATE_LIMITS__CERTIFICATES_PER_REGISTERED_DOMAIN": "50",
        "CERTQUEUE_RATE_LIMITS__DUPLICATE_CERTIFICATES": "5",
        "CERTQUEUE_RATE_LIMITS__NEW_ORDERS_PER_ACCOUNT": "300",
    }
    p = build_pipeline(tmp_path, backend="sqlite", pools=("all",), extra_env=shipped)
    try:
        p.stack.start_beat()  # the embedded default as documented: one worker for every queue, and beat
        yield p
    finally:
        teardown_pipeline(p)


def test_sixty_certificates_under_one_domain_all_active_none_deferred(first_hour: Pipeline) -> None:
    p = first_hour
    names = [f"app{i}.firsthour.example.test" for i in range(N)]
    lines = "\n".join(f"{n} www.{n}" for n in names[ONE_BY_ONE:]) + "\n"
    listing = p.stack.workdir / "names.txt"
    listing.write_text(lines)
    out = p.stack.cli("issue", "--from-file", str(listing))
    assert out.returncode == 0, out.stderr
    for n in names[:ONE_BY_ONE]:
        one = p.stack.cli("issue", n)
        assert one.returncode == 0 and "requested" in one.stdout, (one.stdout, one.stderr)
    with session_scope(write=False) as s:
        ids = [c.id for c in s.execute(select(Certificate)).scalars()]
    assert len(ids) == N
    p.wait_for(
        lambda: all(p.state(cid) == "ACTIVE" for cid in ids), timeout=400, what="60 certificates ACTIVE"
    )
    assert p.count(Event, Event.kind == "deferred") == 0
    listed = json.loads(p.stack.cli("list", "--json", "--limit", "100").stdout)
    assert len(listed) == N and all(row["waiting"] is None for row in listed)
