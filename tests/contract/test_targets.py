"""The contract every deployment target passes (run with ``-p tests.conftest_targets``).

Each test runs against every target: local files in a tmp dir, ACM on moto (behind a counting,
fault-injecting proxy), the fake Key Vault over HTTPS and the fake Certificate Manager, each driven
through its official SDK. What is live is checked in the server's own state, not only through the
target's ``fingerprint``.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from certqueue.errors import ConfigError, TargetError
from certqueue.targets.base import Bundle, load_target, target_names
from tests.conftest import skip_unless_required
from tests.conftest_targets import TARGET_NAMES, TargetHarness

pytestmark = pytest.mark.timeout(60)

Issue = Callable[..., Bundle]


def assert_no_secrets(exc: BaseException) -> None:
    """No key material in the error or anything chained to it."""
    seen: BaseException | None = exc
    while seen is not None:
        assert "PRIVATE KEY" not in str(seen) and "PRIVATE KEY" not in repr(seen)
        seen = seen.__cause__ or seen.__context__


def test_every_target_is_registered() -> None:
    assert set(TARGET_NAMES) <= set(target_names())


# -- deploy, renew, fingerprint, remove ----------------------------------------------------------


def test_first_deploy_makes_the_leaf_live(target_harness: TargetHarness, issue_bundle: Issue) -> None:
    bundle = issue_bundle()
    target = target_harness.make()
    ref = target.deploy(bundle, None)
    assert ref
    assert target_harness.live(ref) == bundle.fingerprint
    assert target.fingerprint(ref) == bundle.fingerprint


def test_renewal_keeps_the_ref_and_changes_the_fingerprint(
    target_harness: TargetHarness, issue_bundle: Issue
) -> None:
    first, renewal = issue_bundle(), issue_bundle()
    target = target_harness.make()
    ref = target.deploy(first, None)
    again = target.deploy(renewal, ref)
    assert again == ref
    assert first.fingerprint != renewal.fingerprint
    assert target.fingerprint(ref) == renewal.fingerprint
    assert target_harness.live(ref) == renewal.fingerprint


def test_deploy_again_without_a_ref_finds_the_same_place(
    target_harness: TargetHarness, issue_bundle: Issue
) -> None:
    """A task that crashed after deploying but before storing the ref retries without it."""
    first, renewal = issue_bundle(), issue_bundle()
    target = target_harness.make()
    ref = target.deploy(first, None)
    assert target.deploy(renewal, None) == ref
    assert target_harness.live(ref) == renewal.fingerprint


def test_certificates_do_not_collide(target_harness: TargetHarness, issue_bundle: Issue) -> None:
    a = issue_bundle("cert_aaa111", ("a.example.test",))
    b = issue_bundle("cert_bbb222", ("b.example.test",))
    target = target_harness.make()
    ref_a, ref_b = target.deploy(a, None), target.deploy(b, None)
    assert ref_a != ref_b
    assert target.fingerprint(ref_a) == a.fingerprint
    assert target.fingerprint(ref_b) == b.fingerprint


def test_remove_is_idempotent(target_harness: TargetHarness, issue_bundle: Issue) -> None:
    target = target_harness.make()
    ref = target.deploy(issue_bundle(), None)
    target.remove(ref)
    assert target_harness.live(ref) is None
    assert target.fingerprint(ref) is None
    target.remove(ref)
    assert target.fingerprint(ref) is None


def test_deploy_after_the_previous_ref_was_removed(
    target_harness: TargetHarness, issue_bundle: Issue
) -> None:
    target = target_harness.make()
    ref = target.deploy(issue_bundle(), None)
    target.remove(ref)
    renewal = issue_bundle()
    new_ref = target.deploy(renewal, ref)
    assert target.fingerprint(new_ref) == renewal.fingerprint
    assert target_harness.live(new_ref) == renewal.fingerprint


def test_rsa_keys_deploy_too(target_harness: TargetHarness, issue_bundle: Issue) -> None:
    bundle = issue_bundle(rsa_key=True)
    target = target_harness.make()
    assert target.fingerprint(target.deploy(bundle, None)) == bundle.fingerprint


# -- refusals and failures -----------------------------------------------------------------------


def test_key_mismatch_is_refused_before_sending(target_harness: TargetHarness, issue_bundle: Issue) -> None:
    other = issue_bundle()
    bad = issue_bundle(key_of=other)
    target = target_harness.make()
    before = target_harness.sent()
    with pytest.raises(TargetError) as info:
        target.deploy(bad, None)
    assert info.value.reason == f"{target_harness.name}:key_mismatch"
    assert not info.value.retryable
    assert target_harness.name in str(info.value)
    assert target_harness.sent() == before
    assert_no_secrets(info.value)


def test_unparsable_key_is_invalid_and_not_quoted(target_harness: TargetHarness, issue_bundle: Issue) -> None:
    good = issue_bundle()
    broken = Bundle(
        good.certificate_id, good.cert_pem, good.chain_pem, good.key_pem.replace("\n", "\n!", 3), good.domains
    )
    with pytest.raises(TargetError) as info:
        target_harness.make().deploy(broken, None)
    assert info.value.reason == f"{target_harness.name}:invalid"
    assert_no_secrets(info.value)


def test_bad_credentials_are_permanent(target_harness: TargetHarness, issue_bundle: Issue) -> None:
    if target_harness.bad_credentials is None:
        pytest.skip(f"{target_harness.name} has no credentials")
    target = target_harness.make(**target_harness.bad_credentials())
    with pytest.raises(TargetError) as info:
        target.deploy(issue_bundle(), None)
    assert info.value.reason == f"{target_harness.name}:auth"
    assert not info.value.retryable
    assert target_harness.name in str(info.value)
    assert info.value.__cause__ is not None
    assert_no_secrets(info.value)


def test_unreachable_is_retryable(target_harness: TargetHarness, issue_bundle: Issue) -> None:
    if target_harness.unreachable is None:
        pytest.skip(f"{target_harness.name} talks to no server")
    target = target_harness.make(**target_harness.unreachable)
    for call in (lambda: target.deploy(issue_bundle(), None), lambda: target.fingerprint(_some_ref(target))):
        with pytest.raises(TargetError) as info:
            call()
        assert info.value.reason == f"{target_harness.name}:unreachable"
        assert info.value.retryable
        assert_no_secrets(info.value)


@pytest.mark.parametrize("status, kind", [(503, "unavailable"), (500, "unavailable"), (429, "throttled")])
def test_server_errors_are_retryable(
    target_harness: TargetHarness, issue_bundle: Issue, status: int, kind: str
) -> None:
    if target_harness.fail_next is None:
        pytest.skip(f"{target_harness.name} talks to no server")
    target = target_harness.make()
    target_harness.fail_next(50, status)
    with pytest.raises(TargetError) as info:
        target.deploy(issue_bundle(), None)
    assert info.value.reason == f"{target_harness.name}:{kind}"
    assert info.value.retryable
    assert_no_secrets(info.value)


def test_a_transient_5xx_is_retried_within_the_call(
    target_harness: TargetHarness, issue_bundle: Issue
) -> None:
    if target_harness.fail_next is None:
        pytest.skip(f"{target_harness.name} talks to no server")
    target = target_harness.make(max_retries=1)
    bundle = issue_bundle()
    target_harness.fail_next(1, 503)
    ref = target.deploy(bundle, None)
    assert target_harness.live(ref) == bundle.fingerprint


# -- settings ------------------------------------------------------------------------------------


def test_unknown_setting_is_a_config_error(target_harness: TargetHarness) -> None:
    with pytest.raises(ConfigError) as info:
        target_harness.make(colour="blue")
    assert "colour" in str(info.value) and target_harness.name in str(info.value)
    assert info.value.key == "colour"


@pytest.mark.parametrize(
    "name, required",
    [("local", "path"), ("azure_keyvault", "key_vault_url"), ("gcp_certmanager", "project_id")],
)
def test_missing_setting_is_a_config_error(name: str, required: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_target(name, {"name": "r1", "provider": name})
    assert info.value.key == required and name in str(info.value)


@pytest.mark.parametrize("bad", ["three", True, [3]])
def test_wrong_type_is_a_config_error(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        load_target("aws_acm", {"name": "us-east-1", "max_retries": bad})
    assert info.value.key == "max_retries"


def test_a_number_written_as_text_is_read_as_one() -> None:
    # what a single environment variable or ``--set key=value`` gives
    target: Any = load_target("aws_acm", {"name": "us-east-1", "max_retries": "3", "timeout": "2.5"})
    assert target.max_retries == 3 and target.timeout == 2.5


def test_aws_region_defaults_to_the_entry_name() -> None:
    target: Any = load_target("aws_acm", {"name": "eu-west-1", "provider": "aws_acm"})
    assert target.region == "eu-west-1"


def test_secrets_stay_out_of_reprs() -> None:
    from pydantic import SecretStr

    target = load_target(
        "aws_acm",
        {"name": "us-east-1", "access_key_id": "AKIAX", "secret_access_key": SecretStr("s3cr3t-value")},
    )
    assert "s3cr3t" not in repr(target) and "s3cr3t" not in str(target)


def _some_ref(target: Any) -> str:
    if target.name == "aws_acm":
        return "arn:aws:acm:us-east-1:123456789012:certificate/00000000-0000-0000-0000-000000000000"
    if target.name == "azure_keyvault":
        return f"{target.vault_url}/certificates/cert-abc123"
    return f"{target.parent}/certificates/cert-abc123"


# -- local files specifics -----------------------------------------------------------------------


@pytest.fixture
def reload_log(tmp_path: Path) -> Path:
    return tmp_path / "reloads.log"


def _reload_command(log: Path, exit_code: int = 0) -> list[str]:
    code = f"open({str(log)!r}, 'a').write('reload\\n'); raise SystemExit({exit_code})"
    return [sys.executable, "-c", code]


def test_local_layout_and_modes(local_harness: TargetHarness, issue_bundle: Issue) -> None:
    bundle = issue_bundle()
    ref = Path(local_harness.make().deploy(bundle, None))
    assert ref.name == bundle.certificate_id
    assert sorted(p.name for p in ref.iterdir()) == ["cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"]
    assert (ref / "cert.pem").read_text() == bundle.cert_pem
    assert (ref / "chain.pem").read_text() == bundle.chain_pem
    assert (ref / "fullchain.pem").read_text() == bundle.fullchain_pem
    assert (ref / "privkey.pem").read_text() == bundle.key_pem
    assert stat.S_IMODE((ref / "privkey.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((ref / "cert.pem").stat().st_mode) == 0o644


def test_local_key_mode_setting(local_harness: TargetHarness, issue_bundle: Issue) -> None:
    ref = Path(local_harness.make(file_mode="0640").deploy(issue_bundle(), None))
    assert stat.S_IMODE((ref / "privkey.pem").stat().st_mode) == 0o640
    with pytest.raises(ConfigError):
        local_harness.make(file_mode=0o644)  # readable by others: refused


def test_local_replace_is_atomic_and_leaves_no_temp_files(
    local_harness: TargetHarness, issue_bundle: Issue
) -> None:
    target = local_harness.make()
    ref = Path(target.deploy(issue_bundle(), None))
    inode_before = (ref / "privkey.pem").stat().st_ino
    renewal = issue_bundle()
    target.deploy(renewal, str(ref))
    # a rename, not an in-place rewrite: a reader holding the old file keeps reading the old file
    assert (ref / "privkey.pem").stat().st_ino != inode_before
    assert sorted(p.name for p in ref.iterdir()) == ["cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"]
    assert (ref / "privkey.pem").read_text() == renewal.key_pem


def test_local_reload_runs_once_per_change(
    local_harness: TargetHarness, issue_bundle: Issue, reload_log: Path
) -> None:
    target = local_harness.make(reload_command=_reload_command(reload_log))
    bundle = issue_bundle()
    ref = target.deploy(bundle, None)
    assert reload_log.read_text().count("reload") == 1
    target.deploy(bundle, ref)  # unchanged: no reload
    assert reload_log.read_text().count("reload") == 1
    target.deploy(issue_bundle(), ref)
    assert reload_log.read_text().count("reload") == 2


def test_local_failed_reload_is_retried_by_the_next_deploy(
    local_harness: TargetHarness, issue_bundle: Issue, reload_log: Path
) -> None:
    bundle = issue_bundle()
    with pytest.raises(TargetError) as info:
        local_harness.make(reload_command=_reload_command(reload_log, exit_code=3)).deploy(bundle, None)
    assert info.value.reason == "local:reload_failed" and info.value.retryable
    assert "status 3" in str(info.value)
    target = local_harness.make(reload_command=_reload_command(reload_log))
    target.deploy(bundle, None)  # files unchanged, but the reload is still owed
    assert reload_log.read_text().count("reload") == 2
    target.deploy(bundle, None)  # paid: nothing more
    assert reload_log.read_text().count("reload") == 2


def test_local_reload_timeout(local_harness: TargetHarness, issue_bundle: Issue) -> None:
    target = local_harness.make(
        reload_command=[sys.executable, "-c", "import time; time.sleep(10)"], reload_timeout=0.3
    )
    with pytest.raises(TargetError) as info:
        target.deploy(issue_bundle(), None)
    assert info.value.reason == "local:reload_failed" and "0.3s" in str(info.value)


def test_local_remove_refuses_paths_outside_its_directory(
    local_harness: TargetHarness, tmp_path: Path
) -> None:
    victim = tmp_path / "precious"
    victim.mkdir()
    target = local_harness.make()
    for ref in (str(victim), str(tmp_path / "certs" / ".." / "precious"), "/"):
        with pytest.raises(TargetError) as info:
            target.remove(ref)
        assert info.value.reason == "local:invalid"
    assert victim.exists()


def test_local_refuses_unsafe_certificate_ids(local_harness: TargetHarness, test_ca: Any) -> None:
    bundle = test_ca.issue("../escape", ("a.example.test",))
    with pytest.raises(TargetError) as info:
        local_harness.make().deploy(bundle, None)
    assert info.value.reason == "local:invalid"


def test_local_owner_and_group(local_harness: TargetHarness, issue_bundle: Issue) -> None:
    if os.geteuid() != 0:
        skip_unless_required("chown to another user needs root")
    ref = Path(local_harness.make(owner="nobody", group=0).deploy(issue_bundle(), None))
    import pwd

    assert (ref / "privkey.pem").stat().st_uid == pwd.getpwnam("nobody").pw_uid


# -- cloud specifics -----------------------------------------------------------------------------


def test_acm_reimport_keeps_tags(aws_harness: TargetHarness, issue_bundle: Issue, moto_server: Any) -> None:
    import boto3

    target = aws_harness.make(tags={"team": "edge"})
    ref = target.deploy(issue_bundle(), None)
    target.deploy(issue_bundle(), ref)
    acm = boto3.client(
        "acm",
        region_name="us-east-1",
        endpoint_url=moto_server.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    tags = {t["Key"]: t["Value"] for t in acm.list_tags_for_certificate(CertificateArn=ref)["Tags"]}
    assert tags == {"team": "edge", "certqueue:certificate_id": "cert_abc123"}
    assert len(acm.list_certificates()["CertificateSummaryList"]) == 1


def test_keyvault_versions_and_content_types(
    azure_harness: TargetHarness, issue_bundle: Issue, fake_keyvault: Any
) -> None:
    pem_target = azure_harness.make()
    ref = pem_target.deploy(issue_bundle(), None)
    pem_target.deploy(issue_bundle(), ref)
    name = ref.rsplit("/", 1)[1]
    assert name == "cert-abc123"
    versions = fake_keyvault.certificates[name]
    assert len(versions) == 2 and versions[-1].content_type == "application/x-pem-file"
    assert "BEGIN CERTIFICATE" in versions[-1].secret_value  # the chain went with it
    assert versions[-1].secret_value.count("BEGIN CERTIFICATE") == 2
    pfx = azure_harness.make(content_type="pkcs12", certificate_name="pfx-{certificate_id}")
    bundle = issue_bundle()
    pfx_ref = pfx.deploy(bundle, None)
    assert pfx_ref.endswith("/certificates/pfx-cert-abc123")
    assert fake_keyvault.certificates["pfx-cert-abc123"][-1].content_type == "application/x-pkcs12"
    assert pfx.fingerprint(pfx_ref) == bundle.fingerprint


def test_keyvault_soft_deleted_name_is_a_conflict(azure_harness: TargetHarness, issue_bundle: Issue) -> None:
    target = azure_harness.make(purge=False)
    ref = target.deploy(issue_bundle(), None)
    target.remove(ref)
    target.remove(ref)
    with pytest.raises(TargetError) as info:
        target.deploy(issue_bundle(), ref)
    assert info.value.reason == "azure_keyvault:conflict" and not info.value.retryable


def test_keyvault_service_principal_through_a_configured_authority(
    azure_harness: TargetHarness, issue_bundle: Issue, fake_keyvault: Any
) -> None:
    """Settings only (what a worker process has): a service principal whose token comes from the
    Entra ID authority named by ``authority_host`` (the fake's), not login.microsoftonline.com."""
    sp = {
        "credential": None,
        "tenant_id": fake_keyvault.tenant_id,
        "client_id": fake_keyvault.client_id,
        "client_secret": fake_keyvault.client_secret,
        "authority_host": fake_keyvault.url,
    }
    target = azure_harness.make(**sp)
    bundle = issue_bundle()
    ref = target.deploy(bundle, None)
    assert target.fingerprint(ref) == bundle.fingerprint
    assert fake_keyvault.tokens_issued >= 1
    wrong = azure_harness.make(**{**sp, "client_secret": "not-the-secret"})
    with pytest.raises(TargetError) as info:
        wrong.deploy(issue_bundle(), None)
    assert info.value.reason == "azure_keyvault:auth" and not info.value.retryable
    assert "not-the-secret" not in str(info.value)
    with pytest.raises(ConfigError):
        azure_harness.make(**{**sp, "authority_host": "http://127.0.0.1:1"})


def test_keyvault_accepts_both_spellings_of_the_vault_url(azure_harness: TargetHarness) -> None:
    url = azure_harness.settings["key_vault"]
    settings = {k: v for k, v in azure_harness.settings.items() if k != "key_vault"}
    target: Any = load_target("azure_keyvault", {**settings, "key_vault_url": url})
    assert target.vault_url == url
    with pytest.raises(ConfigError):
        load_target("azure_keyvault", {**settings, "key_vault_url": url, "key_vault": url})
    with pytest.raises(ConfigError) as info:
        load_target("azure_keyvault", {**settings, "key_vault_url": url, "tenant_id": "t", "client_id": "c"})
    assert info.value.key == "client_secret"


def test_certmanager_waits_for_pending_operations(
    gcp_harness: TargetHarness, issue_bundle: Issue, fake_certmanager: Any
) -> None:
    fake_certmanager.operation_polls = 1
    bundle = issue_bundle()
    target = gcp_harness.make()
    ref = target.deploy(bundle, None)
    assert ref == "projects/example-project/locations/global/certificates/cert-abc123"
    assert fake_certmanager.certificates[ref]["labels"]["certqueue-certificate-id"] == "cert_abc123"
    polls = [path for method, path in fake_certmanager.requests if method == "GET" and "/operations/" in path]
    assert len(polls) == 2  # one 'not done' answer, then done
    assert "pemPrivateKey" not in str(target.client.get_certificate(name=ref))


def test_certmanager_ids() -> None:
    from certqueue.targets.gcp_certmanager import gcp_certificate_id

    assert gcp_certificate_id("cert_abc123") == "cert-abc123"
    assert gcp_certificate_id("9lives") == "cq-9lives"
    long_id = gcp_certificate_id("cert_" + "x" * 80)
    assert len(long_id) <= 63 and long_id[-1] != "-"
    assert gcp_certificate_id("cert_AB") != gcp_certificate_id("cert_ab")


def test_certmanager_fake_lists_by_label_and_pages(gcp_harness: TargetHarness, issue_bundle: Issue) -> None:
    """The fake's list call, through the official client (what an operator's audit would run)."""
    target: Any = gcp_harness.make()
    for i in range(3):
        target.deploy(issue_bundle(f"cert_{i}", (f"n{i}.example.test",)), None)
    client = target.client
    everything = list(client.list_certificates(request={"parent": target.parent, "page_size": 2}))
    assert len(everything) == 3
    one = list(
        client.list_certificates(
            request={"parent": target.parent, "filter": 'labels.certqueue-certificate-id="cert_1"'}
        )
    )
    assert [c.name for c in one] == [f"{target.parent}/certificates/cert-1"]
    assert all(not c.self_managed.pem_private_key for c in everything)


def test_a_ref_from_elsewhere_is_not_touched(target_harness: TargetHarness, issue_bundle: Issue) -> None:
    """fingerprint/remove refuse a ref that is not this target's; deploy starts afresh here instead."""
    target = target_harness.make()
    foreign = {
        "local": "/var/lib/elsewhere/cert_abc123",
        "aws_acm": None,  # ACM judges ARNs itself: see test_deploy_after_the_previous_ref_was_removed
        "azure_keyvault": "https://other-vault.vault.azure.net/certificates/cert-abc123",
        "gcp_certmanager": "projects/other/locations/global/certificates/cert-abc123",
    }[target_harness.name]
    if foreign is None:
        pytest.skip("ACM answers for foreign ARNs itself")
    with pytest.raises(TargetError) as info:
        target.remove(foreign)
    assert info.value.reason == f"{target_harness.name}:invalid"
    bundle = issue_bundle()
    ref = target.deploy(bundle, foreign)
    assert ref != foreign and target_harness.live(ref) == bundle.fingerprint
