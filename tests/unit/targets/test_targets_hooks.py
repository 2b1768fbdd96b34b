"""The deploy hook runner (certqueue.targets.hooks) and the target wrapper that runs it."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from certqueue.errors import ConfigError, TargetError
from certqueue.targets import hooks
from certqueue.targets.base import Bundle, HookedTarget, load_target
from certqueue.targets.hooks import DeployHook
from certqueue.targets.local import LocalFilesTarget

RECORD = (
    "import json, os, sys; json.dump({'env': dict(os.environ), 'argv': sys.argv[1:]}, open(sys.argv[1], 'w'))"
)


def _env(bundle: Bundle, **kw: Any) -> dict[str, str]:
    args: dict[str, Any] = {
        "certificate_id": bundle.certificate_id,
        "names": bundle.domains,
        "cert_pem": bundle.cert_pem,
        "target": "local",
        "region": "edge",
        "ref": "/srv/certs/" + bundle.certificate_id,
        "parent": {"PATH": "/usr/bin:/bin", "HOME": "/home/cq"},
    }
    return hooks.environment(**{**args, **kw})


# -- the environment -----------------------------------------------------------------------------


def test_environment_carries_the_documented_variables(issue_bundle: Callable[..., Bundle]) -> None:
    bundle = issue_bundle(domains=("www.example.test", "example.test"))
    leaf = x509.load_pem_x509_certificate(bundle.cert_pem.encode())
    env = _env(bundle, files={"CERTQUEUE_KEY_PATH": "/srv/certs/x/privkey.pem"})
    assert env["CERTQUEUE_CERTIFICATE_ID"] == bundle.certificate_id
    assert env["CERTQUEUE_NAMES"] == env["RENEWED_DOMAINS"] == "www.example.test example.test"
    assert env["CERTQUEUE_PRIMARY_NAME"] == "www.example.test"
    assert env["CERTQUEUE_REGION"] == "edge" and env["CERTQUEUE_TARGET"] == "local"
    assert env["CERTQUEUE_SERIAL"] == format(leaf.serial_number, "x")
    assert env["CERTQUEUE_NOT_AFTER"] == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert env["CERTQUEUE_KEY_PATH"] == "/srv/certs/x/privkey.pem"
    assert env["PATH"] == "/usr/bin:/bin" and env["HOME"] == "/home/cq"


def test_environment_takes_nothing_else_from_the_worker(issue_bundle: Callable[..., Bundle]) -> None:
    bundle = issue_bundle()
    parent = {
        "PATH": "/bin",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "CERTQUEUE_DATABASE__URL": "postgresql://u:db-password@h/db",
        "CERTQUEUE_CHALLENGES__RFC2136__TSIG_SECRET": "tsig-secret",
    }
    env = _env(bundle, parent=parent)
    blob = json.dumps(env)
    for secret in ("aws-secret", "db-password", "tsig-secret", "PRIVATE KEY", bundle.key_pem.splitlines()[1]):
        assert secret not in blob
    assert "BEGIN CERTIFICATE" not in blob  # paths and facts, never PEM


# -- the runner ----------------------------------------------------------------------------------


def test_argv_is_run_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "seen.json"
    evil = f"; touch {tmp_path / 'pwned'}"
    hook = DeployHook((sys.executable, "-c", RECORD, str(out), evil, "$HOME"))
    hooks.run(hook, "local", "cert_x", {"PATH": "/usr/bin:/bin", "CERTQUEUE_REGION": "edge"})
    seen = json.loads(out.read_text())
    assert seen["argv"] == [str(out), evil, "$HOME"]  # passed literally: no shell expanded them
    assert not (tmp_path / "pwned").exists()
    assert seen["env"]["CERTQUEUE_REGION"] == "edge"
    assert set(seen["env"]) <= {"PATH", "CERTQUEUE_REGION", "LC_CTYPE"}  # exactly what it was given


def test_a_shell_string_only_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "region"
    hook = DeployHook.from_settings("local", {"deploy_hook_shell": f'echo "$CERTQUEUE_REGION" > {out}'})
    assert hook is not None and hook.via_shell
    hooks.run(hook, "local", "cert_x", {"PATH": "/usr/bin:/bin", "CERTQUEUE_REGION": "edge"})
    assert out.read_text() == "edge\n"


def test_non_zero_exit_is_retryable_and_names_the_code(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="certqueue.targets.hooks")
    hook = DeployHook(("/bin/sh", "-c", "echo reload refused; exit 7"))
    with pytest.raises(TargetError) as info:
        hooks.run(hook, "local", "cert_x", {"PATH": "/usr/bin:/bin"})
    err = info.value
    assert err.retryable and err.reason == "local:deploy_hook_exit_7" and err.plugin == "local"
    assert "status 7" in str(err) and "cert_x" in str(err)
    assert "reload refused" in caplog.text  # the output is logged


def test_timeout_kills_the_hook_and_what_it_started() -> None:
    hook = DeployHook(("sleep 30; echo never",), via_shell=True, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TargetError) as info:
        hooks.run(hook, "aws_acm", "cert_x", {"PATH": "/usr/bin:/bin"})
    assert time.monotonic() - started < 5  # the shell's sleep died with it: no wait for the pipe
    assert info.value.retryable and info.value.reason == "aws_acm:deploy_hook_timeout"
    assert "0.5s" in str(info.value)


def test_a_hook_that_cannot_start_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(TargetError) as info:
        hooks.run(DeployHook((str(tmp_path / "missing"),)), "local", "cert_x", {"PATH": "/bin"})
    assert not info.value.retryable and info.value.reason == "local:deploy_hook_not_run"
    assert info.value.__cause__ is not None


def test_output_is_logged_bounded_and_without_pem(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="certqueue.targets.hooks")
    script = (
        "print('-----BEGIN PRIVATE KEY-----'); print('c2VjcmV0a2V5'); print('-----END PRIVATE KEY-----');"
        "print('x' * 50000)"
    )
    hooks.run(DeployHook((sys.executable, "-c", script)), "local", "cert_x", {"PATH": "/usr/bin:/bin"})
    (record,) = [r for r in caplog.records if r.name == "certqueue.targets.hooks"]
    text = record.getMessage()
    assert "succeeded" in text and "c2VjcmV0a2V5" not in text and "PRIVATE KEY" not in text
    assert len(text) < hooks.OUTPUT_LIMIT + 200


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, key, words",
    [
        ({"deploy_hook": "systemctl reload nginx"}, "deploy_hook", "deploy_hook_shell"),
        ({"deploy_hook": ["/bin/true"], "deploy_hook_shell": "true"}, "deploy_hook", "exclude"),
        ({"deploy_hook": []}, "deploy_hook", "non-empty"),
        ({"deploy_hook": ["/bin/true", 3]}, "deploy_hook", "strings"),
        ({"deploy_hook": ["/bin/true"], "deploy_hook_timeout": 0}, "deploy_hook_timeout", "more than 0"),
        ({"deploy_hook": ["/bin/true"], "deploy_hook_timeout": 301}, "deploy_hook_timeout", "300"),
        ({"deploy_hook_timeout": 5}, "deploy_hook", "without a hook"),
        ({"deploy_hook_shell": "  "}, "deploy_hook_shell", "empty"),
    ],
)
def test_bad_hook_settings_are_config_errors(settings: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        DeployHook.from_settings("local", settings)
    assert info.value.key == key and words in str(info.value) and "local" in str(info.value)


def test_hook_settings() -> None:
    assert DeployHook.from_settings("local", {"path": "/x"}) is None
    hook = DeployHook.from_settings(
        "local", {"deploy_hook": ["/usr/bin/reload", "-q"], "deploy_hook_timeout": "12"}
    )
    assert hook == DeployHook(("/usr/bin/reload", "-q"), timeout=12.0)


# -- the wrapper load_target puts around a target ------------------------------------------------


def test_load_target_runs_the_hook_after_the_files(
    tmp_path: Path, issue_bundle: Callable[..., Bundle]
) -> None:
    out = tmp_path / "seen.json"
    check = (
        "import json, os, sys; p = os.environ['CERTQUEUE_CERT_PATH'];"
        "json.dump({'cert': open(p).read(), 'env': dict(os.environ)}, open(sys.argv[1], 'w'))"
    )
    config = {
        "name": "edge",
        "provider": "local",
        "path": str(tmp_path / "certs"),
        "deploy_hook": [sys.executable, "-c", check, str(out)],
    }
    target: Any = load_target("local", config)
    assert isinstance(target, HookedTarget) and isinstance(target.inner, LocalFilesTarget)
    assert target.name == "local" and target.root == tmp_path / "certs"  # the target's own attributes
    bundle = issue_bundle()
    ref = target.deploy(bundle, None)
    seen = json.loads(out.read_text())
    assert seen["cert"] == bundle.cert_pem  # the file was in place when the hook ran
    assert seen["env"]["RENEWED_LINEAGE"] == ref == str(tmp_path / "certs" / bundle.certificate_id)
    assert seen["env"]["CERTQUEUE_FULLCHAIN_PATH"] == ref + "/fullchain.pem"
    assert seen["env"]["CERTQUEUE_REGION"] == "edge"
    assert target.fingerprint(ref) == bundle.fingerprint


def test_a_failing_hook_fails_the_deploy_and_the_retry_runs_it_again(
    tmp_path: Path, issue_bundle: Callable[..., Bundle]
) -> None:
    marker = tmp_path / "runs"
    script = f"n=$(cat {marker} 2>/dev/null || echo 0); echo $((n+1)) > {marker}; [ $n -ge 1 ]"
    target = load_target("local", {"name": "edge", "path": str(tmp_path / "c"), "deploy_hook_shell": script})
    bundle = issue_bundle()
    with pytest.raises(TargetError) as info:
        target.deploy(bundle, None)
    assert info.value.retryable and info.value.reason == "local:deploy_hook_exit_1"
    ref = target.deploy(bundle, None)  # the files are current; the hook runs again and passes
    assert marker.read_text() == "2\n" and target.fingerprint(ref) == bundle.fingerprint


def test_no_hook_no_wrapper(tmp_path: Path) -> None:
    assert type(load_target("local", {"name": "edge", "path": str(tmp_path)})) is LocalFilesTarget
