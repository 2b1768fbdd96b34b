"""Deploy hooks end to end: a real propagate worker deploys to local files, then runs the hook a
region entry configures (a small script written here) on its own node, with the documented
environment; a hook that fails makes that deployment fail retryably, with a reason naming its exit
code, and the retry runs it again."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from certqueue import certificates, crypto
from certqueue.db import session_scope
from certqueue.models import Certificate, Deployment, Issuance
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration

WORKER_SECRET = "worker-secret-the-hook-must-not-see"

RECORD = textwrap.dedent(
    """\
    import json, os, sys
    out, fail_first = sys.argv[1], sys.argv[2] == "fail-first"
    attempts = out + ".attempts"
    n = (int(open(attempts).read()) if os.path.exists(attempts) else 0) + 1
    open(attempts, "w").write(str(n))
    if fail_first and n == 1:
        print("first attempt refused")
        sys.exit(3)
    with open(out, "w") as f:
        json.dump({"env": dict(os.environ), "argv": sys.argv[1:], "cwd": os.getcwd()}, f)
    print("recorded", n)
    """
)


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pipeline, Path, str]]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("hooks")
    script = tmp / "record_hook.py"
    script.write_text(RECORD)
    regions = [
        {
            "name": "edge",
            "provider": "local",
            "path": str(tmp / "edge"),
            "deploy_hook": [sys.executable, str(script), str(tmp / "edge.json"), "once"],
        },
        {
            "name": "flaky",
            "provider": "local",
            "path": str(tmp / "flaky"),
            "deploy_hook": [sys.executable, str(script), str(tmp / "flaky.json"), "fail-first"],
            "deploy_hook_timeout": 20,
        },
    ]
    p = build_pipeline(
        tmp,
        backend="postgres",
        pools=("acme",),
        regions=regions,
        extra_env={"CERTQUEUE_AUTOMATION__DISPATCH_INTERVAL_SECONDS": "1"},
    )
    try:
        # credentials in the deploying worker's environment: the hook must not inherit them
        worker = p.stack.start_worker(
            "propagate",
            regions=("edge", "flaky"),
            concurrency=1,
            extra_env={"AWS_SECRET_ACCESS_KEY": WORKER_SECRET, "CERTQUEUE_TEST_TOKEN": WORKER_SECRET},
        )
        p.stack.start_beat()
        yield p, tmp, worker
    finally:
        teardown_pipeline(p)


def _deployment(cid: str, region: str) -> Deployment | None:
    with session_scope(write=False) as s:
        d = s.execute(
            select(Deployment).where(Deployment.certificate_id == cid, Deployment.region == region)
        ).scalar_one_or_none()
        if d is not None:
            s.expunge(d)
        return d


def test_hook_runs_after_the_files_with_the_documented_environment(hooked) -> None:
    p, tmp, worker = hooked
    cid = p.request(["hook.example.test", "www.hook.example.test"])
    # the flaky region's hook exits 3 on its first run: a retryable failure of that deployment only
    p.wait_for(
        lambda: (d := _deployment(cid, "flaky")) is not None and d.last_error == "local:deploy_hook_exit_3",
        timeout=90,
        what="the failing hook recorded on its deployment",
    )
    assert (tmp / "flaky.json.attempts").read_text() == "1" and not (tmp / "flaky.json").exists()
    # ...and the retry (the files already current) runs it again; then the certificate is ACTIVE
    p.wait_state(cid, "ACTIVE", timeout=120)
    assert (tmp / "flaky.json.attempts").read_text() == "2"
    assert (tmp / "edge.json.attempts").read_text() == "1"  # the other region's hook ran once

    with session_scope(write=False) as s:
        cert = s.get_one(Certificate, cid)
        iss = s.get_one(Issuance, cert.current_issuance_id)
        key_pem = certificates.decrypt_key(iss).decode()
    info = crypto.cert_info(iss.cert_pem)
    seen = json.loads((tmp / "edge.json").read_text())
    env = seen["env"]
    directory = tmp / "edge" / cid
    assert env["CERTQUEUE_CERTIFICATE_ID"] == cid
    assert env["CERTQUEUE_NAMES"] == "hook.example.test www.hook.example.test"
    assert env["CERTQUEUE_PRIMARY_NAME"] == "hook.example.test"
    assert env["CERTQUEUE_REGION"] == "edge"
    assert env["CERTQUEUE_TARGET"] == "local"
    assert env["CERTQUEUE_TARGET_REF"] == str(directory)
    assert env["CERTQUEUE_SERIAL"] == info.serial == iss.serial
    assert env["CERTQUEUE_NOT_AFTER"] == info.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert env["CERTQUEUE_CERT_PATH"] == str(directory / "cert.pem")
    assert env["CERTQUEUE_CHAIN_PATH"] == str(directory / "chain.pem")
    assert env["CERTQUEUE_FULLCHAIN_PATH"] == str(directory / "fullchain.pem")
    assert env["CERTQUEUE_KEY_PATH"] == str(directory / "privkey.pem")
    # certbot's names, so an existing certbot deploy hook works unchanged
    assert env["RENEWED_LINEAGE"] == str(directory)
    assert env["RENEWED_DOMAINS"] == "hook.example.test www.hook.example.test"
    assert seen["argv"] == [str(tmp / "edge.json"), "once"]
    # the files were in place when the hook ran (it is run after them), the key 0600
    assert Path(env["CERTQUEUE_CERT_PATH"]).read_text() == iss.cert_pem
    assert stat.S_IMODE(os.stat(env["CERTQUEUE_KEY_PATH"]).st_mode) == 0o600
    # nothing of the worker's own environment beyond the harmless few: no database or broker URL,
    # no settings, no key; and no PEM anywhere
    assert not [k for k in env if k.startswith("CERTQUEUE_") and k not in _DOCUMENTED]
    passed_on = {"PATH", "HOME", "LANG", "LC_ALL", "TZ"}
    # LC_CTYPE: the Python the hook script runs in sets it itself when it coerces a C locale
    assert set(env) - _DOCUMENTED - {"RENEWED_LINEAGE", "RENEWED_DOMAINS"} <= passed_on | {"LC_CTYPE"}
    blob = json.dumps(env)
    assert "PRIVATE KEY" not in blob and "BEGIN CERTIFICATE" not in blob
    assert key_pem.strip().splitlines()[1] not in blob and WORKER_SECRET not in blob
    # the hook's output is in the worker's log; the key never is
    log = p.stack.log(worker)
    assert "recorded 1" in log and "first attempt refused" in log
    assert "PRIVATE KEY" not in log and key_pem.strip().splitlines()[1] not in log


_DOCUMENTED = {
    "CERTQUEUE_CERTIFICATE_ID",
    "CERTQUEUE_NAMES",
    "CERTQUEUE_PRIMARY_NAME",
    "CERTQUEUE_REGION",
    "CERTQUEUE_TARGET",
    "CERTQUEUE_TARGET_REF",
    "CERTQUEUE_SERIAL",
    "CERTQUEUE_NOT_AFTER",
    "CERTQUEUE_CERT_PATH",
    "CERTQUEUE_CHAIN_PATH",
    "CERTQUEUE_FULLCHAIN_PATH",
    "CERTQUEUE_KEY_PATH",
}
