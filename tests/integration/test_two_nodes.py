"""Scale across machines, shown (docs/operations.md, "Two nodes"): two independent worker groups,
each a separate set of processes with its own working directory, settings folder, key file copy
and local deployment directory, share only the broker (Redis) and the database (PostgreSQL).
Node A runs the HTTP-01 responder, an acme pool and region us-east-1's propagate pool; node B an
acme pool and region eu-west-1's propagate pool. Certificates requested once reach both regions,
each deployed by the node that holds that region."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from certqueue.db import session_scope
from certqueue.models import Certificate, Deployment, Issuance
from devstack.stack import Stack
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pipeline, Stack, Path, Path]]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    root = tmp_path_factory.mktemp("two-nodes")
    live_a, live_b = root / "node-a-live", root / "node-b-live"
    regions = [
        {"name": "us-east-1", "provider": "local", "path": str(live_a)},
        {"name": "eu-west-1", "provider": "local", "path": str(live_b)},
    ]
    a = build_pipeline(root / "node-a", backend="postgres", regions=regions, pools=("acme",))
    try:
        a.stack.start_worker("propagate", regions=("us-east-1",), name="node-a-propagate-us-east-1")
        # node B: another working directory, its own settings folder and copy of the master key
        # (as an operator copies it to a new host); the same database and broker URLs
        b_dir = root / "node-b"
        (b_dir / "settings").mkdir(parents=True)
        shutil.copy(a.env["CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH"], b_dir / "master.key")
        os.chmod(b_dir / "master.key", 0o600)
        b_env = {
            **a.env,
            "CERTQUEUE_SETTINGS_DIR": str(b_dir / "settings"),
            "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(b_dir / "master.key"),
        }
        b = Stack(workdir=b_dir, env=b_env)
        a.cleanups.append(b.stop_all)
        b.start_worker("acme", name="node-b-acme")
        b.start_worker("propagate", regions=("eu-west-1",), name="node-b-propagate-eu-west-1")
    except BaseException:
        teardown_pipeline(a)
        raise
    yield a, b, live_a, live_b
    teardown_pipeline(a)


def test_certificates_flow_to_both_regions_through_both_nodes(
    nodes: tuple[Pipeline, Stack, Path, Path],
) -> None:
    a, b, live_a, live_b = nodes
    cids = [a.request([f"n{i}.two-nodes.example.test"]) for i in range(6)]
    for cid in cids:
        a.wait_state(cid, "ACTIVE", timeout=180)
    with session_scope(write=False) as s:
        deps = list(s.execute(select(Deployment).where(Deployment.certificate_id.in_(cids))).scalars())
        served = {c.id: s.get(Issuance, c.current_issuance_id) for c in s.execute(
            select(Certificate).where(Certificate.id.in_(cids))).scalars()}  # fmt: skip
    assert {(d.certificate_id, d.region) for d in deps} == {
        (c, r) for c in cids for r in ("us-east-1", "eu-west-1")
    }
    for d in deps:
        assert d.status == "deployed", (d.certificate_id, d.region, d.error)
        where = Path(d.remote_ref)
        # each region's files are written by the node that holds that region, and only there
        assert where.is_relative_to(live_a if d.region == "us-east-1" else live_b), where
        issuance = served[d.certificate_id]
        assert issuance is not None and (where / "cert.pem").read_text().strip() == issuance.cert_pem.strip()
    # each node's propagate pool did its own region's work
    assert "succeeded" in b.log("node-b-propagate-eu-west-1")
    assert "succeeded" in a.stack.log("node-a-propagate-us-east-1")
