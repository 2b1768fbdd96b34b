"""Master key rotation on a running fleet (issue 13, finding 1): a real acme worker keeps issuing
from Pebble while ``certqueue keys rotate`` runs in another process; the worker picks up the new key
file without a restart; ``certqueue keys retire`` refuses while the worker (frozen with SIGSTOP, so it
cannot have reloaded) still reports the old key, and succeeds once it has reloaded. At the end every
stored private key, account key and order key decrypts with the one key left in the file."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from certqueue import keyrotation
from certqueue.db import session_scope
from certqueue.keystore import KeyStore
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration

WORKER = "worker-acme"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    env = {
        "CERTQUEUE_STORAGE__KEY_CHECK_SECONDS": "0.3",
        # a frozen worker stays "live" for the whole test: only its reload may unblock retire
        "CERTQUEUE_STORAGE__PROCESS_STALE_SECONDS": "600",
        "CERTQUEUE_STORAGE__KEY_RETIRE_GRACE_SECONDS": "0",
    }
    p = build_pipeline(
        tmp_path_factory.mktemp("rotation"), backend="postgres", extra_env=env, pools=("acme",)
    )
    yield p
    teardown_pipeline(p)


def _kids_reported(p: Pipeline) -> set[str]:
    return {v.active_kid for v in keyrotation.live_processes() if v.role == "worker:acme"}


def _wait_reported(p: Pipeline, kid: str) -> None:
    p.wait_for(lambda: _kids_reported(p) == {kid}, timeout=60, what=f"every worker process reporting {kid}")


def _decrypt_everything(store: KeyStore) -> int:
    n = 0
    for model, aad in keyrotation._tables():
        with session_scope(write=False) as s:
            for row in s.execute(select(model).where(model.key_enc.is_not(None))).scalars():
                assert store.decrypt(row.key_enc, aad(row))
                n += 1
    return n


def test_rotation_while_issuing_loses_no_key_and_retire_waits_for_the_worker(fleet: Pipeline) -> None:
    p = fleet
    key_path = p.stack.workdir / "master.key"
    k0 = KeyStore.from_file(key_path).active_kid
    p.wait_for(lambda: _kids_reported(p) == {k0}, timeout=60, what="worker heartbeats")
    # main + pool: the pool child writes its first heartbeat a moment after the main process
    p.wait_for(
        lambda: len([v for v in keyrotation.live_processes() if v.role == "worker:acme"]) >= 2,
        timeout=60,
        what="heartbeats of the worker's main and pool processes",
    )

    # 1. rotate while the worker is issuing; keep requesting after the rotation too
    first = [p.request([f"rot{i}.example.test"]) for i in range(6)]
    p.wait_for(lambda: p.state(first[0]) == "ACTIVE", timeout=90, what="first certificate")
    out = p.stack.cli("keys", "rotate")
    assert "keys retire" in out.stdout
    k1 = KeyStore.from_file(key_path).active_kid
    assert k1 != k0 and KeyStore.from_file(key_path).kids == {k0, k1}  # nothing retired yet
    after = [p.request([f"rot-after{i}.example.test"]) for i in range(4)]
    for cid in first + after:
        p.wait_state(cid, "ACTIVE", timeout=120)
    _wait_reported(p, k1)  # reloaded without a restart

    # 2. freeze the worker (idle, so it holds no lock), rotate again: retire must refuse
    proc = p.stack.procs[WORKER]
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        p.stack.cli("keys", "rotate")
        k2 = KeyStore.from_file(key_path).active_kid
        refused = p.stack.cli("keys", "retire", check=False)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"still encrypts with key {k1}" in refused.stderr
        assert KeyStore.from_file(key_path).kids == {k0, k1, k2}  # nothing removed
    finally:
        os.killpg(proc.pid, signal.SIGCONT)

    # 3. the worker reloads by itself; then retire goes through (after re-encrypting any row the
    # worker wrote under the old key in between, which retire reports rather than drops)
    _wait_reported(p, k2)
    for _attempt in range(5):
        done = p.stack.cli("keys", "retire", check=False)
        if done.returncode == 0:
            break
        assert "rows are still under" in done.stderr, done.stderr
        p.stack.cli("keys", "rotate", "--resume")
        time.sleep(0.2)
    assert done.returncode == 0, done.stderr
    final = KeyStore.from_file(key_path)
    assert final.kids == {k2}

    # 4. the fleet goes on issuing with the one key left, and every stored key decrypts with it
    last = p.request(["rot-last.example.test"])
    p.wait_state(last, "ACTIVE", timeout=90)
    assert _decrypt_everything(final) >= 12  # 11 issuances (at least) and the account key
    assert "keystore:unknown_kid" not in p.stack.all_logs()
