"""ACME account keys and account registration.

Owns the account key's life outside the database: generating it, turning it into PEM bytes (which the
caller encrypts with the keystore before storing) and back, and registering or finding the account
at a CA. The account URL and the registration JSON returned here are what the ``accounts`` row keeps;
with them a client is rebuilt without a network call (``AcmeClient(..., account_url=url)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import josepy as jose
from acme import errors as acme_errors
from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certqueue.acme.errors import mapped
from certqueue.errors import InvalidInput, PermanentError

if TYPE_CHECKING:
    from certqueue.acme.client import AcmeClient

KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")


def generate_account_key(key_type: str = "ec256") -> jose.JWK:
    """A new account key: ``ec256`` (default, ES256), ``ec384``, ``rsa2048``, ``rsa3072`` or ``rsa4096``."""
    if key_type == "ec256":
        return jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    if key_type == "ec384":
        return jose.JWKEC(key=ec.generate_private_key(ec.SECP384R1()))
    if key_type.startswith("rsa") and key_type in KEY_TYPES:
        return jose.JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:])))
    raise InvalidInput(
        f"unknown account key type {key_type!r}; one of {', '.join(KEY_TYPES)}", field="key_type"
    )


def signing_alg(key: jose.JWK) -> jose.JWASignature:
    """The JWS algorithm for an account key: ES256/ES384/ES512 by curve, RS256 for RSA."""
    if isinstance(key, jose.JWKEC):
        curve = key.key.curve  # type: ignore[union-attr]
        by_curve: dict[str, jose.JWASignature] = {
            "secp256r1": jose.ES256,
            "secp384r1": jose.ES384,
            "secp521r1": jose.ES512,
        }
        if curve.name not in by_curve:
            raise InvalidInput(f"unsupported account key curve {curve.name}", field="account_key")
        return by_curve[curve.name]
    if isinstance(key, jose.JWKRSA):
        return jose.RS256
    raise InvalidInput(f"unsupported account key type {type(key).__name__}", field="account_key")


def account_key_to_pem(key: jose.JWK) -> bytes:
    """The private key as unencrypted PKCS#8 PEM; the caller encrypts it before it is stored."""
    private = key.key
    if not isinstance(private, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        # josepy wraps keys in a Comparable* proxy; the real key is one level down
        private = getattr(private, "_wrapped", private)
    if not isinstance(private, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise InvalidInput("account key is not a private EC or RSA key", field="account_key")
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def account_key_from_pem(pem: bytes) -> jose.JWK:
    """Load an account key written by :func:`account_key_to_pem` (or any unencrypted EC/RSA PEM)."""
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        # the cause would quote nothing secret, but keep the message generic anyway
        raise InvalidInput("account key PEM cannot be loaded", field="account_key") from exc
    if isinstance(private, ec.EllipticCurvePrivateKey):
        key: jose.JWK = jose.JWKEC(key=private)
    elif isinstance(private, rsa.RSAPrivateKey):
        key = jose.JWKRSA(key=private)
    else:
        raise InvalidInput(f"unsupported account key type {type(private).__name__}", field="account_key")
    signing_alg(key)  # reject curves we cannot sign with now, not at the first order
    return key


@dataclass(frozen=True)
class Account:
    """An account at a CA: its URL (the JWS ``kid``), the registration JSON, and whether it is new."""

    url: str
    registration: dict[str, Any]
    created: bool

    @property
    def status(self) -> str | None:
        status = self.registration.get("status")
        return str(status) if status is not None else None


def _registration_json(body: messages.Registration | dict[str, Any]) -> dict[str, Any]:
    """Plain JSON data of a registration, without the echoed external account binding (useless later)."""
    data = body.to_partial_json() if isinstance(body, messages.Registration) else dict(body)
    data.pop("externalAccountBinding", None)
    plain: dict[str, Any] = json.loads(json.dumps(data, default=_jsonable))
    return plain


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, jose.JSONDeSerializable):
        return obj.to_partial_json()
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON data")


def register_account(
    client: AcmeClient,
    email: str | None = None,
    *,
    eab_kid: str | None = None,
    eab_hmac_key: str | None = None,
    agree_tos: bool = True,
) -> Account:
    """Create the account for ``client``'s key, or return the existing one (idempotent).

    ``eab_hmac_key`` is the CA's base64url HMAC key for external account binding. On success the
    client signs with the account URL from then on. A CA that already knows the key answers 200 with
    the account's URL: that is returned with ``created=False`` (a redelivered task registers twice).
    """
    if (eab_kid is None) != (eab_hmac_key is None):
        raise InvalidInput("external account binding needs both a key id and an HMAC key", field="eab_kid")
    acme = client.acme
    eab = None
    if eab_kid is not None and eab_hmac_key is not None:
        with mapped("external account binding"):
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=client.account_key.public_key(),
                kid=eab_kid,
                hmac_key=eab_hmac_key,
                directory=acme.directory,
            )
    elif acme.external_account_required():
        raise PermanentError(
            "the CA requires external account binding and none is configured",
            reason="acme:externalAccountRequired",
        )
    new_reg = messages.NewRegistration.from_data(
        email=email, terms_of_service_agreed=agree_tos, external_account_binding=eab
    )
    previous_url = client.account_url
    client.use_account(None)  # newAccount is signed with the JWK, never with a kid
    try:
        with mapped("register account"):
            try:
                regr = acme.new_account(new_reg)
            except acme_errors.ConflictError:
                regr = None  # the CA knows this key already
    except BaseException:
        client.use_account(previous_url)
        raise
    if regr is None:
        existing = find_account(client)
        if existing is None:
            raise PermanentError(
                "register account: the CA reported an existing account, then none",
                reason="acme:accountDoesNotExist",
            )
        return existing
    client.use_account(regr.uri)
    return Account(url=regr.uri, registration=_registration_json(regr.body), created=True)


def find_account(client: AcmeClient) -> Account | None:
    """The existing account for ``client``'s key (``onlyReturnExisting``), or None if there is none."""
    acme = client.acme
    previous_url = client.account_url
    client.use_account(None)  # newAccount is signed with the JWK, never with a kid
    query = messages.NewRegistration(only_return_existing=True)
    try:
        with mapped("find account"):
            response = acme._post(acme.directory["newAccount"], query)
    except PermanentError as exc:
        if exc.reason == "acme:accountDoesNotExist":
            client.use_account(previous_url)
            return None
        client.use_account(previous_url)
        raise
    url = response.headers.get("Location")
    if not url:
        raise PermanentError("find account: the CA returned no account URL", reason="acme:protocol")
    client.use_account(url)
    return Account(url=url, registration=_registration_json(response.json()), created=False)


def key_thumbprint(key: jose.JWK) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of the key's public part: names a key without it."""
    return jose.encode_b64jose(key.public_key().thumbprint())  # SHA-256


def change_key(client: AcmeClient, new_key: jose.JWK) -> None:
    """Roll the account of ``client`` over to ``new_key`` (RFC 8555 section 7.3.5).

    The inner JWS, signed by the new key with it as ``jwk``, says which account and which old key;
    the outer one is an ordinary request signed by the current key. On success the client signs with
    the new key. A CA that already holds the new key for another account answers 409 (``acme:conflict``).
    """
    from acme import jws as acme_jws

    client._require_account()
    try:
        url = client.directory["keyChange"]
    except KeyError:
        url = None
    if not url:
        raise PermanentError("the CA offers no keyChange resource", reason="acme:noKeyChange")
    payload = json.dumps(
        {"account": client.account_url, "oldKey": client.account_key.public_key().to_json()}
    ).encode()
    inner = acme_jws.JWS.sign(payload, key=new_key, alg=signing_alg(new_key), nonce=None, url=url)
    with mapped("account key rollover"):
        try:
            client.acme._post(url, inner)
        except acme_errors.ConflictError as exc:
            raise PermanentError(
                "account key rollover: the new key belongs to another account", reason="acme:conflict"
            ) from exc
    client.set_account_key(new_key)


def deactivate(client: AcmeClient) -> str:
    """Deactivate the account of ``client`` at the CA (RFC 8555 section 7.3.6); returns its status.
    For good: the CA refuses every later request signed by this account."""
    client._require_account()
    body = messages.UpdateRegistration.from_json({"status": "deactivated"})
    with mapped("account deactivation"):
        response = client.acme._post(client.account_url, body)
    status = str(response.json().get("status", ""))
    if status != "deactivated":
        raise PermanentError(
            f"account deactivation: the CA answered status {status or 'none'}", reason="acme:protocol"
        )
    return status
