"""The guide's adapters against the same servers as the target contract suite
(run with ``-p tests.conftest_targets``): moto for ACM, the fake Key Vault, the fake Certificate Manager."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import boto3
import pytest

from certqueue.adapters import AWSACMAdapter, AzureKeyVaultAdapter, GCPCertificateManagerAdapter
from certqueue.errors import ConfigError, InvalidInput, TargetError
from certqueue.targets.base import Bundle, leaf_fingerprint
from tests.conftest_targets import FaultProxy, gcp_credentials
from tests.fakes.azure_keyvault_api import StaticTokenCredential

pytestmark = pytest.mark.timeout(60)

Issue = Callable[..., Bundle]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- AWS ACM -------------------------------------------------------------------------------------


@pytest.fixture
def acm(acm_proxy: FaultProxy) -> AWSACMAdapter:
    return AWSACMAdapter(
        region="us-east-1",
        endpoint_url=acm_proxy.url,
        access_key_id="testing",
        secret_access_key="testing",
        max_retries=0,
    )


def _acm_client(moto_server: Any) -> Any:
    return boto3.client(
        "acm",
        region_name="us-east-1",
        endpoint_url=moto_server.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def test_acm_import_and_reimport_on_the_same_arn(
    acm: AWSACMAdapter, issue_bundle: Issue, moto_server: Any
) -> None:
    first, second = issue_bundle(), issue_bundle()
    arn = run(
        acm.import_certificate(
            certificate_pem=first.cert_pem, private_key_pem=first.key_pem, certificate_chain=first.chain_pem
        )
    )
    assert arn.startswith("arn:aws:acm:us-east-1:")
    again = run(
        acm.import_certificate(second.cert_pem, second.key_pem, second.chain_pem, certificate_arn=arn)
    )
    assert again == arn
    live = _acm_client(moto_server).get_certificate(CertificateArn=arn)["Certificate"]
    assert leaf_fingerprint(live) == second.fingerprint


def test_acm_splits_a_fullchain_given_as_the_certificate(
    acm: AWSACMAdapter, issue_bundle: Issue, moto_server: Any
) -> None:
    bundle = issue_bundle()
    arn = run(acm.import_certificate(bundle.fullchain_pem, bundle.key_pem))
    got = _acm_client(moto_server).get_certificate(CertificateArn=arn)
    assert leaf_fingerprint(got["Certificate"]) == bundle.fingerprint
    assert bundle.chain_pem.strip() in got["CertificateChain"]


def test_acm_refuses_a_mismatched_key_before_sending(
    acm: AWSACMAdapter, acm_proxy: FaultProxy, issue_bundle: Issue
) -> None:
    bundle, other = issue_bundle(), issue_bundle()
    with pytest.raises(TargetError) as info:
        run(acm.import_certificate(bundle.cert_pem, other.key_pem))
    assert info.value.reason == "aws_acm:key_mismatch"
    assert acm_proxy.requests == 0
    assert "PRIVATE KEY" not in str(info.value)


def test_acm_throttling_is_retryable(acm: AWSACMAdapter, acm_proxy: FaultProxy, issue_bundle: Issue) -> None:
    bundle = issue_bundle()
    acm_proxy.fail_next(5, 429)
    with pytest.raises(TargetError) as info:
        run(acm.import_certificate(bundle.cert_pem, bundle.key_pem))
    assert info.value.reason == "aws_acm:throttled" and info.value.retryable


def test_acm_settings_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        AWSACMAdapter(region="us-east-1", acces_key_id="typo")
    assert info.value.key == "acces_key_id"


# -- Azure Key Vault -----------------------------------------------------------------------------


@pytest.fixture
def key_vault(fake_keyvault: Any) -> AzureKeyVaultAdapter:
    return AzureKeyVaultAdapter(
        vault_url=fake_keyvault.url,
        credential=StaticTokenCredential(fake_keyvault.token),
        connection_verify=fake_keyvault.ca_file,
        max_retries=0,
    )


def test_keyvault_import_returns_the_versioned_id(
    key_vault: AzureKeyVaultAdapter, fake_keyvault: Any, issue_bundle: Issue
) -> None:
    first, second = issue_bundle(), issue_bundle()
    id1 = run(
        key_vault.import_certificate(
            certificate_pem=first.cert_pem,
            private_key_pem=first.key_pem,
            name="example-com-cert",
            certificate_chain=first.chain_pem,
        )
    )
    id2 = run(key_vault.import_certificate(second.cert_pem, second.key_pem, "example-com-cert"))
    assert id1.startswith(f"{fake_keyvault.url}/certificates/example-com-cert/")
    assert id2.rsplit("/", 1)[0] == id1.rsplit("/", 1)[0] and id1 != id2
    versions = fake_keyvault.certificates["example-com-cert"]
    assert [v.version for v in versions] == [id1.rsplit("/", 1)[1], id2.rsplit("/", 1)[1]]
    assert hashlib.sha256(versions[-1].der).hexdigest() == second.fingerprint


def test_keyvault_rejects_bad_names_and_wrong_tokens(fake_keyvault: Any, issue_bundle: Issue) -> None:
    bundle = issue_bundle()
    wrong = AzureKeyVaultAdapter(
        vault_url=fake_keyvault.url,
        credential=StaticTokenCredential("nope"),
        connection_verify=fake_keyvault.ca_file,
        max_retries=0,
    )
    with pytest.raises(InvalidInput):
        run(wrong.import_certificate(bundle.cert_pem, bundle.key_pem, "bad_name"))
    with pytest.raises(TargetError) as info:
        run(wrong.import_certificate(bundle.cert_pem, bundle.key_pem, "good-name"))
    assert info.value.reason == "azure_keyvault:auth" and not info.value.retryable
    assert fake_keyvault.certificates == {}


# -- GCP Certificate Manager ---------------------------------------------------------------------


@pytest.fixture
def cert_manager(fake_certmanager: Any) -> GCPCertificateManagerAdapter:
    return GCPCertificateManagerAdapter(
        project_id="example-project",
        api_endpoint=fake_certmanager.endpoint,
        credentials=gcp_credentials(),
        max_retries=0,
    )


def test_certmanager_create_then_update(
    cert_manager: GCPCertificateManagerAdapter, fake_certmanager: Any, issue_bundle: Issue
) -> None:
    first, second = issue_bundle(), issue_bundle()
    name = run(
        cert_manager.import_certificate(
            first.cert_pem, first.key_pem, "example-com", certificate_chain=first.chain_pem
        )
    )
    assert name == "projects/example-project/locations/global/certificates/example-com"
    assert run(cert_manager.import_certificate(second.cert_pem, second.key_pem, "example-com")) == name
    stored = fake_certmanager.certificates[name]
    assert leaf_fingerprint(stored["pemCertificate"]) == second.fingerprint
    methods = [
        m
        for m, path in fake_certmanager.requests
        if path.endswith("/certificates") or path.endswith("/example-com")
    ]
    assert methods == ["POST", "POST", "PATCH"]  # the second create met 409 and updated


def test_certmanager_rejects_bad_ids(cert_manager: GCPCertificateManagerAdapter, issue_bundle: Issue) -> None:
    bundle = issue_bundle()
    with pytest.raises(InvalidInput):
        run(cert_manager.import_certificate(bundle.cert_pem, bundle.key_pem, "Example_Com"))
