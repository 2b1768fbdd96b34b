"""Named issuers: which ACME CA a certificate uses, with which account and which defaults. Owns no
state; reads the settings (``issuers[]``, and the ``acme:`` section as the issuer ``default``).

A certificate stores the directory URLs it may use (``directory_url``, ``directory_urls`` for CA
fallback); everything else an issuer says (account contact, account key type, EAB pair, CA bundle,
rate-limit rules) is found again from the URL when an account is needed (``for_directory``), so
the pipeline passes URLs and never needs to know about issuers. A directory URL named by no issuer
(a request that gave a URL) gets the ``acme:`` section's account settings, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from certqueue.config import Settings
from certqueue.errors import InvalidInput

DEFAULT = "default"


@dataclass(frozen=True)
class Issuer:
    name: str
    directory_url: str
    email: str | None
    account_key_type: str
    #: (kid, HMAC key) or None; the key is kept out of repr
    eab_kid: str | None
    profile: str | None
    key_type: str
    preferred_chain: str | None
    ca_bundle: Path | None
    rate_limits: str | None
    ip_identifier_profiles: tuple[str, ...]
    fallback: tuple[str, ...]

    def eab_hmac_key(self, settings: Settings) -> str | None:
        if self.name == DEFAULT:
            key = settings.acme.eab_hmac_key
        else:
            key = next(i.eab_hmac_key for i in settings.issuers if i.name == self.name)
        return key.get_secret_value() if key is not None else None


def _default(settings: Settings) -> Issuer:
    a = settings.acme
    return Issuer(
        name=DEFAULT,
        directory_url=a.directory,
        email=a.email,
        account_key_type=a.account_key_type,
        eab_kid=a.eab_kid,
        profile=a.profile,
        key_type=a.key_type,
        preferred_chain=a.preferred_chain,
        ca_bundle=a.ca_bundle,
        rate_limits=None,
        ip_identifier_profiles=tuple(a.ip_identifier_profiles),
        fallback=(),
    )


def all_issuers(settings: Settings) -> list[Issuer]:
    """``default`` first, then the named issuers in the order configured."""
    a = settings.acme
    out = [_default(settings)]
    for i in settings.issuers:
        out.append(
            Issuer(
                name=i.name,
                directory_url=i.directory_url,
                email=i.email or a.email,
                account_key_type=i.account_key_type or a.account_key_type,
                eab_kid=i.eab_kid,
                profile=i.profile if i.profile is not None else a.profile,
                key_type=i.key_type or a.key_type,
                preferred_chain=i.preferred_chain if i.preferred_chain is not None else a.preferred_chain,
                ca_bundle=i.ca_bundle or a.ca_bundle,
                rate_limits=i.rate_limits,
                ip_identifier_profiles=tuple(
                    i.ip_identifier_profiles
                    if i.ip_identifier_profiles is not None
                    else a.ip_identifier_profiles
                ),
                fallback=tuple(i.fallback),
            )
        )
    return out


def get(settings: Settings, name: str) -> Issuer:
    for i in all_issuers(settings):
        if i.name == name:
            return i
    known = ", ".join(i.name for i in all_issuers(settings))
    raise InvalidInput(f"unknown issuer {name!r} (configured: {known})", field="issuer")


def for_directory(settings: Settings, directory_url: str) -> Issuer:
    """The issuer of a directory URL: a named one that has it, else ``default`` (whose account
    settings apply to any URL no issuer names)."""
    for i in settings.issuers:
        if i.directory_url == directory_url:
            return next(x for x in all_issuers(settings) if x.name == i.name)
    return _default(settings)


def fallback_urls(settings: Settings, issuer: Issuer) -> list[str]:
    """The directory URLs of an issuer's fallback list, in order, without repeats or itself."""
    out: list[str] = []
    for name in issuer.fallback:
        url = get(settings, name).directory_url
        if url != issuer.directory_url and url not in out:
            out.append(url)
    return out


def ca_rules(settings: Settings) -> list[str]:
    """Rate-limit assignments the issuers add to ``rate_limits.ca_rules`` (which win when both
    name a directory)."""
    return [f"{i.directory_url}={i.rate_limits}" for i in settings.issuers if i.rate_limits]
