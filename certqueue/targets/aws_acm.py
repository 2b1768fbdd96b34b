"""The ``aws_acm`` target: imported certificates in AWS Certificate Manager.

Owns the ACM certificates it imported (tagged ``certqueue:certificate_id``). A renewal is re-imported
on the same ARN, so load balancers and CloudFront keep pointing at it; ACM refuses tags on a
re-import (and moto drops them), so tags are applied again after it. If the previous ARN is gone
(deleted by hand), the certificate is imported fresh and the new ARN returned.

Error reasons: ``aws_acm:auth`` (permanent), ``aws_acm:not_found``, ``aws_acm:invalid``,
``aws_acm:in_use``, ``aws_acm:key_mismatch`` (permanent); ``aws_acm:throttled``,
``aws_acm:unavailable`` (5xx), ``aws_acm:unreachable`` (retryable).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from certqueue import plugins
from certqueue.errors import ConfigError, TargetError
from certqueue.plugins import Setting
from certqueue.targets._shared import (
    check_bundle,
    error,
    non_negative,
    read_settings,
    safe_detail,
    secret_value,
)
from certqueue.targets.base import Bundle, Target, leaf_fingerprint

NAME = "aws_acm"
TAG_CERTIFICATE_ID = "certqueue:certificate_id"

SETTINGS: plugins.Table = (
    Setting("region", (str,), "AWS region of the ACM endpoint (the region entry's name when it is one)"),
    Setting("endpoint_url", (str,), "API endpoint (moto in tests)"),
    Setting("access_key_id", (str,), "AWS access key id (else boto3's own credential chain)", secret=True),
    Setting("secret_access_key", (str,), "AWS secret access key", secret=True),
    Setting("session_token", (str,), "AWS session token (temporary credentials)", secret=True),
    Setting("tags", (dict,), "extra tags on the imported certificate"),
    Setting("timeout", (int, float), "seconds per HTTP request", default=30.0),
    Setting("max_retries", (int,), "botocore retries of throttling and 5xx", default=2),
    Setting(
        "acm_enabled", (bool,), "the guide's flag; whether to deploy is the caller's decision", default=True
    ),
)

_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredTokenException",
        "MissingAuthenticationToken",
        "IncompleteSignature",
    }
)
_THROTTLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "LimitExceededException",
    }
)
_INVALID_CODES = frozenset(
    {
        "ValidationException",
        "InvalidParameterException",
        "InvalidArnException",
        "InvalidTagException",
        "TagPolicyException",
        "TooManyTagsException",
        "RequestInProgressException",
        "InvalidStateException",
    }
)

_KEY_TYPES = ["RSA_1024", "RSA_2048", "RSA_3072", "RSA_4096", "EC_prime256v1", "EC_secp384r1", "EC_secp521r1"]

T = TypeVar("T")


class AWSACMTarget(Target):
    name = NAME
    settings = SETTINGS

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        s = read_settings(NAME, config, SETTINGS)
        non_negative(NAME, s, "timeout", "max_retries")
        self.region = s["region"] or config.get("name")
        if not self.region:
            raise ConfigError(
                f"target {NAME}: missing required setting 'region' (or the region's 'name')",
                source=f"target {NAME}",
                key="region",
            )
        if (s["access_key_id"] is None) != (s["secret_access_key"] is None):
            missing = "secret_access_key" if s["secret_access_key"] is None else "access_key_id"
            raise ConfigError(
                f"target {NAME}: access_key_id and secret_access_key go together",
                source=f"target {NAME}",
                key=missing,
            )
        self.endpoint_url: str | None = s["endpoint_url"]
        self.tags = {str(k): str(v) for k, v in (s["tags"] or {}).items()}
        self._access_key_id: str | None = s["access_key_id"]
        self._secret_access_key = s["secret_access_key"]
        self._session_token = s["session_token"]
        self.timeout = float(s["timeout"])
        self.max_retries = int(s["max_retries"])
        self._client: Any = None

    def __repr__(self) -> str:
        return f"AWSACMTarget(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def client(self) -> Any:
        """The boto3 ACM client, made on first use (credentials: settings, else boto's default chain)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session(
                aws_access_key_id=self._access_key_id,
                aws_secret_access_key=secret_value(self._secret_access_key),
                aws_session_token=secret_value(self._session_token),
                region_name=self.region,
            )
            config = Config(
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                retries={"max_attempts": self.max_retries + 1, "mode": "standard"},
            )
            self._client = session.client("acm", endpoint_url=self.endpoint_url, config=config)
        return self._client

    # -- interface -------------------------------------------------------------------------------

    def deploy(self, bundle: Bundle, previous_ref: str | None) -> str:
        parsed = check_bundle(NAME, bundle)
        # no ARN known: a previous attempt may have imported and crashed before its ARN was stored
        arn = previous_ref or self._find_imported(bundle.certificate_id, _names(parsed.leaf))
        return self.import_pem(bundle.certificate_id, bundle.cert_pem, bundle.key_pem, bundle.chain_pem, arn)

    def _find_imported(self, certificate_id: str, names: set[str]) -> str | None:
        """The ARN of an imported certificate tagged with ``certificate_id``, or None.

        Only certificates whose DomainName is one of the leaf's names are asked for their tags, so
        this costs one call per certificate of the same name, not one per certificate in the region.
        """
        what = f"certificate {certificate_id}"
        summaries: list[dict[str, Any]] = []
        params: dict[str, Any] = {"Includes": {"keyTypes": _KEY_TYPES}}
        while True:
            page = self._call(what, functools.partial(self.client.list_certificates, **params))
            summaries.extend(page.get("CertificateSummaryList", []))
            if not page.get("NextToken"):
                break
            params["NextToken"] = page["NextToken"]
        for summary in summaries:
            if summary.get("DomainName") not in names or summary.get("Type", "IMPORTED") != "IMPORTED":
                continue
            arn = summary["CertificateArn"]
            try:
                tags = self._call(
                    what, functools.partial(self.client.list_tags_for_certificate, CertificateArn=arn)
                )
            except TargetError as exc:
                if exc.reason == f"{NAME}:not_found":
                    continue
                raise
            if {"Key": TAG_CERTIFICATE_ID, "Value": certificate_id} in tags.get("Tags", []):
                return str(arn)
        return None

    def import_pem(
        self, certificate_id: str | None, cert_pem: str, key_pem: str, chain_pem: str | None, arn: str | None
    ) -> str:
        """Import (or re-import on ``arn``) and tag; returns the ARN. The key was checked by the caller."""
        params: dict[str, Any] = {"Certificate": cert_pem.encode(), "PrivateKey": key_pem.encode()}
        if chain_pem and chain_pem.strip():
            params["CertificateChain"] = chain_pem.encode()
        tags = dict(self.tags)
        if certificate_id:
            tags[TAG_CERTIFICATE_ID] = certificate_id
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
        what = f"certificate {certificate_id or '(adapter)'}"
        if arn:
            try:
                new_arn = str(
                    self._call(what, lambda: self.client.import_certificate(CertificateArn=arn, **params))[
                        "CertificateArn"
                    ]
                )
            except TargetError as exc:
                if exc.reason != f"{NAME}:not_found":
                    raise
                arn = None  # deleted behind our back: import fresh below
            else:
                if tag_list:
                    self._call(
                        what,
                        lambda: self.client.add_tags_to_certificate(CertificateArn=new_arn, Tags=tag_list),
                    )
                return new_arn
        extra = {"Tags": tag_list} if tag_list else {}
        return str(
            self._call(what, lambda: self.client.import_certificate(**params, **extra))["CertificateArn"]
        )

    def fingerprint(self, ref: str) -> str | None:
        try:
            response = self._call(ref, lambda: self.client.get_certificate(CertificateArn=ref))
        except TargetError as exc:
            if exc.reason == f"{NAME}:not_found":
                return None
            raise
        # moto appends its own root to CertificateChain; only the leaf counts
        return leaf_fingerprint(response["Certificate"])

    def remove(self, ref: str) -> None:
        try:
            self._call(ref, lambda: self.client.delete_certificate(CertificateArn=ref))
        except TargetError as exc:
            if exc.reason != f"{NAME}:not_found":
                raise

    # -- errors ----------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            ParamValidationError,
            PartialCredentialsError,
        )

        try:
            return fn()
        except ClientError as exc:
            raise _client_error(what, exc) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise error(NAME, "auth", f"{what}: no usable AWS credentials", retryable=False) from exc
        except (ConnectionError, HTTPClientError) as exc:
            raise error(
                NAME,
                "unreachable",
                f"{what}: cannot reach ACM in {self.region} ({type(exc).__name__})",
                retryable=True,
            ) from exc
        except ParamValidationError:
            # its text quotes parameter values, the private key among them: the cause is dropped
            raise error(
                NAME,
                "invalid",
                f"{what}: request refused by the client (ParamValidationError)",
                retryable=False,
            ) from None
        except BotoCoreError as exc:
            raise error(NAME, "error", f"{what}: {type(exc).__name__}", retryable=False) from exc


def _names(leaf: Any) -> set[str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    names = {str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        names.update(
            leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName
            )
        )
    except x509.ExtensionNotFound:
        pass
    return names


def _client_error(what: str, exc: Any) -> TargetError:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", "Unknown"))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    detail = f"{what}: {code} ({status}): {safe_detail(err.get('Message'))}"
    if code in _AUTH_CODES or status in (401, 403):
        return error(NAME, "auth", detail, retryable=False)
    if code in _THROTTLE_CODES or status == 429:
        return error(NAME, "throttled", detail, retryable=True)
    if code == "ResourceNotFoundException":
        return error(NAME, "not_found", detail, retryable=False)
    if code == "ResourceInUseException":
        return error(NAME, "in_use", detail, retryable=False)
    if status >= 500 or code in ("InternalFailure", "ServiceUnavailable", "InternalServerError"):
        return error(NAME, "unavailable", detail, retryable=True)
    if code in _INVALID_CODES or 400 <= status < 500:
        return error(NAME, "invalid", detail, retryable=False)
    return error(NAME, "error", detail, retryable=False)
