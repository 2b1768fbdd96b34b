"""The DNS provider contract: every provider passes the same suite (cert-manager's conformance idea).

rfc2136 runs against a real BIND9, route53 against moto in server mode, cloudflare and azure against
the fakes in tests/fakes driven through their official SDKs. What each backend holds is read back
from the backend itself (a direct DNS query to BIND, the Route53 API, the fakes' state), never from
the provider under test.

Route53 error paths use a tiny stub that answers every call with AWS's own XML error document,
because moto does not check credentials (TEST-SERVERS.md: do not rely on moto for error paths).

Run: .venv/bin/python -m pytest tests/contract/test_dns_providers.py -q -p tests.conftest_dns
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from pydantic import SecretStr

from certqueue.dns.azure import AzureDNSProvider
from certqueue.dns.base import DNSProvider, load_provider, provider_names
from certqueue.dns.cloudflare import CloudflareProvider
from certqueue.dns.propagation import check_visible, query_txt
from certqueue.dns.rfc2136 import RFC2136Provider
from certqueue.dns.route53 import Route53Provider
from certqueue.dns.zones import Resolver
from certqueue.errors import ConfigError, ProviderError
from devstack.bind import BindServer
from devstack.ports import free_port
from tests.fakes import FakeServer, Request, Response

PROVIDERS = ["rfc2136", "route53", "cloudflare", "azure"]
CLASSES: dict[str, type[DNSProvider]] = {
    "rfc2136": RFC2136Provider,
    "route53": Route53Provider,
    "cloudflare": CloudflareProvider,
    "azure": AzureDNSProvider,
}


class AWSErrorStub(FakeServer):
    """Answers every Route53 call with one AWS error document (what AWS sends, parsed by botocore)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__()
        self.status, self.code, self.message = status, code, message

    def handle(self, req: Request) -> Response:
        body = (
            '<?xml version="1.0"?>\n<ErrorResponse xmlns="https://route53.amazonaws.com/doc/2013-04-01/">'
            f"<Error><Type>Sender</Type><Code>{self.code}</Code><Message>{self.message}</Message></Error>"
            "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
        ).encode()
        return Response(self.status, body, {"Content-Type": "text/xml"})


@dataclass
class Case:
    """One provider wired to its backend."""

    name: str
    config: dict[str, Any]
    secret_key: str  # the credential setting: dropped for the missing-credential test, never leaked
    read_values: Callable[[str], set[str]]  # the backend's TXT values at a name, read independently
    bad_credentials: Callable[[], dict[str, Any]]  # config whose credentials the backend rejects
    transient: Callable[[], dict[str, Any]]  # config (and backend state) for a failure that may pass
    resolver: Resolver  # where the core zone lookup asks (BIND serves example.test)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def provider(self, **overrides: Any) -> DNSProvider:
        return self.build({**self.config, **overrides})

    def build(self, config: dict[str, Any]) -> DNSProvider:
        return CLASSES[self.name](config, resolver=self.resolver)


def _stub(case_cleanups: list[Callable[[], None]], status: int, code: str, message: str) -> str:
    stub = AWSErrorStub(status, code, message).start()
    case_cleanups.append(stub.stop)
    return stub.url


@pytest.fixture(params=PROVIDERS)
def case(request: pytest.FixtureRequest, bind_resolver: Resolver) -> Iterator[Case]:
    name = request.param
    if name == "rfc2136":
        bind: BindServer = request.getfixturevalue("bind")

        def bind_values(fqdn: str) -> set[str]:
            values, error = query_txt(fqdn, "127.0.0.1", bind.port, timeout=2.0)
            assert error is None, error
            return set(values)

        c = Case(
            name,
            bind.provider_config(),
            "tsig_secret",
            bind_values,
            bad_credentials=lambda: bind.provider_config(
                tsig_secret="c2VjcmV0LXRoYXQtYmluZC1kb2VzLW5vdC1rbm93"
            ),
            # nothing listens there: connection refused, as when the primary restarts
            transient=lambda: bind.provider_config(
                nameserver=f"127.0.0.1:{free_port()}", zone="example.test", timeout=2
            ),
            resolver=bind_resolver,
        )
    elif name == "route53":
        moto = request.getfixturevalue("dns_moto")
        zone_id = request.getfixturevalue("route53_zone")
        client = boto3.client(
            "route53",
            endpoint_url=moto.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="AKIDTESTING",
            aws_secret_access_key="testing",
        )

        def r53_values(fqdn: str) -> set[str]:
            rrsets = client.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
            return {
                r["Value"].strip('"')
                for s in rrsets
                if s["Type"] == "TXT" and s["Name"].rstrip(".") == fqdn
                for r in s["ResourceRecords"]
            }

        base = {
            "access_key_id": "AKIDTESTING",
            "secret_access_key": "route53-test-secret",
            "endpoint_url": moto.endpoint_url,
            "region": "us-east-1",
            "max_retries": 0,
        }
        cleanups: list[Callable[[], None]] = []
        c = Case(
            name,
            base,
            "secret_access_key",
            r53_values,
            bad_credentials=lambda: {
                **base,
                "endpoint_url": _stub(
                    cleanups,
                    403,
                    "InvalidClientTokenId",
                    "The security token included in the request is invalid.",
                ),
            },
            transient=lambda: {
                **base,
                "endpoint_url": _stub(
                    cleanups, 503, "ServiceUnavailable", "Service is unavailable, try again later."
                ),
            },
            resolver=bind_resolver,
            cleanups=cleanups,
        )
    elif name == "cloudflare":
        cf = request.getfixturevalue("cloudflare_api")
        base = {"api_token": cf.token, "base_url": cf.base_url, "max_retries": 0, "timeout": 5}

        def cf_transient() -> dict[str, Any]:
            cf.fail_next(1, 429, {"Retry-After": "2"})
            return base

        c = Case(
            name,
            base,
            "api_token",
            cf.values,
            bad_credentials=lambda: {**base, "api_token": "not-the-token"},
            transient=cf_transient,
            resolver=bind_resolver,
        )
    else:
        az = request.getfixturevalue("azure_dns_api")
        base = {**_azure_config(az), "zone_name": "example.test"}

        def az_values(fqdn: str) -> set[str]:
            return az.values("example.test", fqdn.removesuffix(".example.test"))

        def az_transient() -> dict[str, Any]:
            az.fail_next(1, 503)
            return base

        c = Case(
            name,
            base,
            "client_secret",
            az_values,
            bad_credentials=lambda: {**base, "client_secret": "not-the-secret"},
            transient=az_transient,
            resolver=bind_resolver,
        )
    try:
        yield c
    finally:
        for stop in c.cleanups:
            stop()


def _azure_config(az: Any) -> dict[str, Any]:
    """Service-principal settings against the fake: azure-identity's real ClientSecretCredential
    fetches its token from the fake's Entra endpoint (authority_host), then calls the fake ARM."""
    return {
        "subscription_id": az.subscription_id,
        "resource_group": az.resource_group,
        "tenant_id": az.tenant_id,
        "client_id": az.client_id,
        "client_secret": az.client_secret,
        "base_url": az.url,
        "authority_host": az.url,
        "connection_verify": az.ca_cert,
        "max_retries": 0,
        "timeout": 5,
    }


def _value() -> str:
    """A value shaped like a real DNS-01 key authorization digest (43 base64url characters)."""
    return secrets.token_urlsafe(32)


def _roundtrip(handle: dict[str, Any]) -> dict[str, Any]:
    """What another worker gets back from the challenges table."""
    out = json.loads(json.dumps(handle))
    assert isinstance(out, dict)
    return out


# -- the contract ------------------------------------------------------------------------------


def test_present_publishes_the_value(case: Case, challenge_name: str, request: pytest.FixtureRequest) -> None:
    provider = case.provider()
    value = _value()
    handle = provider.present(challenge_name, value)
    assert _roundtrip(handle) == handle
    assert case.read_values(challenge_name) == {value}
    if case.name == "rfc2136":  # the one backend a propagation check can reach
        result = check_visible(challenge_name, value, resolver_cfg=request.getfixturevalue("bind_resolver"))
        assert result.visible, result.reason
        assert result.zone == "example.test"
    provider.cleanup(challenge_name, value, handle)
    assert case.read_values(challenge_name) == set()


def test_two_values_at_one_name_and_cleanup_keeps_the_other(case: Case, challenge_name: str) -> None:
    # a wildcard and its base name (*.example.test + example.test) validate at the same TXT name
    provider = case.provider()
    v1, v2 = _value(), _value()
    h1 = _roundtrip(provider.present(challenge_name, v1))
    h2 = _roundtrip(provider.present(challenge_name, v2))
    assert case.read_values(challenge_name) == {v1, v2}

    provider.cleanup(challenge_name, v1, h1)
    assert case.read_values(challenge_name) == {v2}
    provider.cleanup(challenge_name, v1, h1)  # twice is fine
    assert case.read_values(challenge_name) == {v2}

    # another worker, a fresh instance, with the stored handle
    case.provider().cleanup(challenge_name, v2, h2)
    assert case.read_values(challenge_name) == set()
    case.provider().cleanup(challenge_name, v2, h2)
    assert case.read_values(challenge_name) == set()


def test_cleanup_without_handle(case: Case, challenge_name: str) -> None:
    provider = case.provider()
    keep, drop = _value(), _value()
    provider.present(challenge_name, keep)
    provider.present(challenge_name, drop)
    case.provider().cleanup(challenge_name, drop, None)
    assert case.read_values(challenge_name) == {keep}
    case.provider().cleanup(challenge_name, keep, None)
    case.provider().cleanup(challenge_name, keep, None)
    assert case.read_values(challenge_name) == set()


def test_present_twice_is_harmless(case: Case, challenge_name: str) -> None:
    # a redelivered task presents the same value again
    provider = case.provider()
    value = _value()
    provider.present(challenge_name, value)
    handle = provider.present(challenge_name, value)
    assert case.read_values(challenge_name) == {value}
    provider.cleanup(challenge_name, value, handle)
    assert case.read_values(challenge_name) == set()


def test_cleanup_of_a_value_never_presented(case: Case, challenge_name: str) -> None:
    provider = case.provider()
    value = _value()
    provider.present(challenge_name, value)
    provider.cleanup(challenge_name, _value(), None)
    assert case.read_values(challenge_name) == {value}
    provider.cleanup(challenge_name, value, None)


def test_bad_credentials_are_permanent_and_name_the_provider(case: Case, challenge_name: str) -> None:
    config = case.bad_credentials()
    provider = case.build(config)
    with pytest.raises(ProviderError) as info:
        provider.present(challenge_name, _value())
    err = info.value
    assert err.retryable is False
    assert err.reason == f"{case.name}:auth"
    assert err.plugin == case.name and case.name in str(err)
    assert err.__cause__ is not None  # the SDK error is chained, not swallowed
    bad_secret = str(config[case.secret_key])
    assert bad_secret not in str(err) and bad_secret not in repr(err)
    assert case.read_values(challenge_name) == set()


def test_transient_failure_is_retryable(case: Case, challenge_name: str) -> None:
    provider = case.build(case.transient())
    with pytest.raises(ProviderError) as info:
        provider.present(challenge_name, _value())
    assert info.value.retryable is True
    assert info.value.reason.startswith(f"{case.name}:")
    assert info.value.reason != f"{case.name}:auth"
    assert info.value.__cause__ is not None


def test_missing_credential_is_a_config_error(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = next(s for s in CLASSES[case.name].settings if s.key == case.secret_key)
    assert spec.secret
    for var in spec.env:  # the environment fallback must not hide the missing key
        monkeypatch.delenv(var, raising=False)
    config = {k: v for k, v in case.config.items() if k != case.secret_key}
    with pytest.raises(ConfigError) as info:
        case.build(config)
    assert case.name in str(info.value) and case.secret_key in str(info.value)
    with pytest.raises(ConfigError):
        case.build({**case.config, case.secret_key: ""})


def test_credential_from_the_environment(
    case: Case, challenge_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key left out of the settings is read from its variable (lego's names), and works."""
    spec = next(s for s in CLASSES[case.name].settings if s.key == case.secret_key)
    monkeypatch.setenv(spec.env[0], str(case.config[case.secret_key]))
    provider = case.build({k: v for k, v in case.config.items() if k != case.secret_key})
    value = _value()
    handle = provider.present(challenge_name, value)
    assert case.read_values(challenge_name) == {value}
    provider.cleanup(challenge_name, value, handle)


def test_unknown_setting_is_a_config_error(case: Case) -> None:
    with pytest.raises(ConfigError) as info:
        case.build({**case.config, "api_tokne": "typo"})
    assert case.name in str(info.value) and "api_tokne" in str(info.value)


def test_secret_str_accepted_and_never_shown(
    case: Case, challenge_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # SDK debug logging included
    secret = case.config[case.secret_key]
    provider = case.provider(**{case.secret_key: SecretStr(secret)})
    assert secret not in repr(provider) and secret not in repr(vars(provider))
    value = _value()
    handle = provider.present(challenge_name, value)
    assert case.read_values(challenge_name) == {value}
    assert secret not in json.dumps(handle)
    provider.cleanup(challenge_name, value, handle)
    if case.name != "rfc2136":  # dnspython does not log
        assert caplog.records  # the SDKs did log at debug level...
    assert secret not in caplog.text  # ...but never the secret


def test_timeout_defaults_and_override(case: Case) -> None:
    timeout, interval = case.provider().timeout()
    assert timeout > interval > 0
    assert case.provider(propagation_timeout=33, polling_interval=3).timeout() == (33.0, 3.0)


# -- registry (entry points) -------------------------------------------------------------------


def test_registry_lists_all_four() -> None:
    assert set(PROVIDERS) <= set(provider_names())


def test_load_provider_builds_each(case: Case) -> None:
    provider = load_provider(case.name, case.config, resolver=case.resolver)
    assert isinstance(provider, CLASSES[case.name])
    assert provider.name == case.name


@pytest.mark.parametrize("name", PROVIDERS)
def test_load_provider_misconfigured(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in CLASSES[name].settings:
        for var in spec.env:
            monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError) as info:
        load_provider(name, {})
    assert name in str(info.value)


def test_load_provider_unknown_name() -> None:
    with pytest.raises(ConfigError) as info:
        load_provider("gandi-but-misspelt", {})
    assert "gandi-but-misspelt" in str(info.value)
    assert "rfc2136" in str(info.value)  # the message lists what is known


# -- provider-specific behaviour behind the contract --------------------------------------------


def test_rfc2136_zone_from_the_core_lookup_or_settings_and_foreign_names(
    bind: BindServer, bind_resolver: Resolver, challenge_name: str
) -> None:
    value = _value()
    explicit = RFC2136Provider(bind.provider_config(zone="example.test"))
    handle = explicit.present(challenge_name, value)
    assert handle["zone"] == "example.test"
    found = RFC2136Provider(bind.provider_config(), resolver=bind_resolver)
    found.cleanup(challenge_name, value, None)  # zone found by the core lookup (SOA walk)
    assert query_txt(challenge_name, "127.0.0.1", bind.port, timeout=2)[0] == ()

    with pytest.raises(ProviderError) as info:
        found.present("_acme-challenge.www.not-served.test", value)
    assert info.value.reason == "rfc2136:zone_not_found" and not info.value.retryable
    assert info.value.plugin == "rfc2136" and info.value.__cause__ is not None
    # the key may not write outside its zone: the server refuses, permanently
    with pytest.raises(ProviderError) as info:
        RFC2136Provider(bind.provider_config(zone="validation.test")).present(challenge_name, value)
    assert info.value.reason == "rfc2136:refused" and not info.value.retryable


def test_zone_lookup_that_cannot_answer_is_retryable_and_names_the_provider(bind: BindServer) -> None:
    nowhere = Resolver(nameservers=(f"127.0.0.1:{free_port()}",), timeout=0.3, lifetime=0.6)
    provider = RFC2136Provider(bind.provider_config(), resolver=nowhere)
    with pytest.raises(ProviderError) as info:
        provider.present("_acme-challenge.www.example.test", "x")
    assert info.value.retryable and info.value.reason == "rfc2136:zone_lookup_failed"
    assert "rfc2136" in str(info.value) and info.value.__cause__ is not None


def test_providers_use_the_core_zone_lookup(
    monkeypatch: pytest.MonkeyPatch, bind: BindServer, bind_resolver: Resolver, challenge_name: str
) -> None:
    """No provider has a zone walk of its own: with the core lookup answering another zone, the
    rfc2136 provider updates that zone (the server refuses it: the key may not write there)."""
    import certqueue.dns.base as base

    asked: list[str] = []

    def elsewhere(fqdn: str, resolver: Resolver) -> str:
        asked.append(fqdn)
        return "validation.test"

    monkeypatch.setattr(base, "find_zone", elsewhere)
    with pytest.raises(ProviderError) as info:
        RFC2136Provider(bind.provider_config(), resolver=bind_resolver).present(challenge_name, "x")
    assert info.value.reason == "rfc2136:refused"
    assert asked == [challenge_name]


def test_rfc2136_unknown_key_name_is_auth(bind: BindServer, challenge_name: str) -> None:
    provider = RFC2136Provider(bind.provider_config(tsig_key_name="someone-else", zone="example.test"))
    with pytest.raises(ProviderError) as info:
        provider.present(challenge_name, _value())
    assert info.value.reason == "rfc2136:auth"


def test_rfc2136_hmac_sha512() -> None:
    with BindServer(algorithm="hmac-sha512", extra_zones=()) as server:
        provider = RFC2136Provider(server.provider_config(zone="example.test"))
        provider.present("_acme-challenge.www.example.test", "sha512-value")
        assert query_txt("_acme-challenge.www.example.test", "127.0.0.1", server.port, timeout=2)[0] == (
            "sha512-value",
        )
        with pytest.raises(ProviderError) as info:  # the algorithm is part of the key
            RFC2136Provider(
                server.provider_config(tsig_algorithm="hmac-sha256", zone="example.test")
            ).present("_acme-challenge.www.example.test", "x")
        assert info.value.reason == "rfc2136:auth"


@pytest.mark.parametrize(
    "bad",
    [{"tsig_secret": "not base64!"}, {"tsig_algorithm": "hmac-md5"}, {"nameserver": "127.0.0.1:notaport"}],
)
def test_rfc2136_invalid_settings(bad: dict[str, str]) -> None:
    config = {"nameserver": "127.0.0.1:53", "tsig_key_name": "k", "tsig_secret": "c2VjcmV0", **bad}
    with pytest.raises(ConfigError) as info:
        RFC2136Provider(config)
    assert next(iter(bad)) in str(info.value)


def test_route53_writes_into_the_hosted_zone_of_the_zone_found(
    dns_moto: Any, route53_zone: str, bind_resolver: Resolver
) -> None:
    client = boto3.client(
        "route53",
        endpoint_url=dns_moto.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="AKIDTESTING",
        aws_secret_access_key="testing",
    )
    # BIND serves validation.test as a zone of its own; a private zone of that name is skipped
    client.create_hosted_zone(
        Name="validation.test.",
        CallerReference="private",
        HostedZoneConfig={"PrivateZone": True},
        VPC={"VPCRegion": "us-east-1", "VPCId": "vpc-12345678"},
    )
    public = client.create_hosted_zone(Name="validation.test.", CallerReference="v")["HostedZone"]["Id"]
    provider = Route53Provider(
        {"access_key_id": "AKIDTESTING", "secret_access_key": "x", "endpoint_url": dns_moto.endpoint_url},
        resolver=bind_resolver,
    )
    handle = provider.present("_acme-challenge.www.validation.test", "in-validation")
    assert handle["hosted_zone_id"] == public.rsplit("/", 1)[-1]
    assert handle["change_id"]
    assert provider.present("_acme-challenge.www.example.test", "x")["hosted_zone_id"] == route53_zone
    with pytest.raises(ProviderError) as info:  # no zone in DNS
        provider.present("_acme-challenge.elsewhere.test", "x")
    assert info.value.reason == "route53:zone_not_found"


def test_cloudflare_zone_id_setting_skips_lookup(
    cloudflare_api: Any, challenge_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import certqueue.dns.base as base

    monkeypatch.setattr(base, "find_zone", lambda *a: pytest.fail("zone looked up"))
    provider = CloudflareProvider(
        {
            "api_token": cloudflare_api.token,
            "base_url": cloudflare_api.base_url,
            "zone_id": cloudflare_api.zones["example.test"],
            "max_retries": 0,
        }
    )
    provider.present(challenge_name, "direct")
    assert not any(r.path.endswith("/zones") for r in cloudflare_api.requests)
    assert cloudflare_api.values(challenge_name) == {"direct"}


def test_cloudflare_5xx_is_retryable(
    cloudflare_api: Any, challenge_name: str, bind_resolver: Resolver
) -> None:
    provider = CloudflareProvider(
        {"api_token": cloudflare_api.token, "base_url": cloudflare_api.base_url, "max_retries": 0},
        resolver=bind_resolver,
    )
    cloudflare_api.fail_next(1, 502)
    with pytest.raises(ProviderError) as info:
        provider.present(challenge_name, "x")
    assert info.value.retryable and info.value.reason == "cloudflare:unavailable"
    # the SDK's own retry absorbs a short blip when allowed to
    cloudflare_api.fail_next(1, 503, {"Retry-After": "0"})
    retrying = CloudflareProvider(
        {"api_token": cloudflare_api.token, "base_url": cloudflare_api.base_url, "max_retries": 1},
        resolver=bind_resolver,
    )
    retrying.present(challenge_name, "after-blip")
    assert cloudflare_api.values(challenge_name) == {"after-blip"}


def test_azure_concurrent_writer_is_not_lost(
    azure_dns_api: Any, challenge_name: str, bind_resolver: Resolver
) -> None:
    relative = challenge_name.removesuffix(".example.test")
    provider = AzureDNSProvider(_azure_config(azure_dns_api), resolver=bind_resolver)
    provider.present(challenge_name, "ours")
    # between our GET and our PUT another worker adds its value: If-Match fails, we re-read, both stay
    azure_dns_api.race_next_write("example.test", relative, "theirs")
    provider.present(challenge_name, "ours-too")
    assert azure_dns_api.values("example.test", relative) == {"ours", "theirs", "ours-too"}
    azure_dns_api.race_next_write("example.test", relative, "late")
    provider.cleanup(challenge_name, "ours", None)
    assert azure_dns_api.values("example.test", relative) == {"theirs", "ours-too", "late"}
    assert any(r.headers.get("if-match") for r in azure_dns_api.requests if r.method == "PUT")


def test_azure_zone_from_the_core_lookup(azure_dns_api: Any, bind_resolver: Resolver) -> None:
    # no zone_name: the core lookup finds example.test
    provider = AzureDNSProvider(_azure_config(azure_dns_api), resolver=bind_resolver)
    handle = provider.present("_acme-challenge.example.test", "apex")
    assert handle["relative"] == "_acme-challenge"
    assert azure_dns_api.values("example.test", "_acme-challenge") == {"apex"}
    with pytest.raises(ProviderError) as info:
        provider.present("_acme-challenge.other.test", "x")
    assert info.value.reason == "azure:zone_not_found"
