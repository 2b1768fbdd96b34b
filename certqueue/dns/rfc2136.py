"""DNS-01 through RFC 2136 dynamic updates signed with TSIG (BIND, Knot, PowerDNS, Windows DNS...).

Owns the TXT values it adds at ``_acme-challenge`` names on one primary nameserver. ``present`` adds
one value to the TXT rrset (the other values stay: a wildcard and its base name share one name);
``cleanup`` deletes that one value, and nothing else. Both are idempotent at the protocol level.

Credentials: a TSIG key (name, base64 secret, algorithm ``hmac-sha256`` or ``hmac-sha512``; also
``hmac-sha384`` and ``hmac-sha224``). Generate one with ``tsig-keygen -a hmac-sha256 certqueue``.

Permissions on the server: the key may update TXT records under the zone, nothing more. BIND::

    zone "example.com" { type primary; file "..."; update-policy { grant certqueue zonesub TXT; }; };

Settings (``nameserver`` is the primary's address, ``ip[:port]`` or ``host[:port]``; ``zone`` is
optional, found by the core lookup (an SOA walk through ``challenges.dns_resolvers``) when absent;
lego's ``RFC2136_*`` variables are read for keys the settings leave out)::

    rfc2136:
      nameserver: "192.0.2.53:53"
      tsig_key_name: certqueue
      tsig_secret: "<base64>"          # SecretStr or str; else env RFC2136_TSIG_SECRET
      tsig_algorithm: hmac-sha256
      zone: example.com                # optional
      ttl: 60
      timeout: 10                      # seconds per DNS exchange
      propagation_timeout: 120
      polling_interval: 2

Errors: bad key or signature -> ``rfc2136:auth``; REFUSED / NOTAUTH / NOTZONE -> ``rfc2136:refused``
(permanent: the key may not change that name); timeouts and SERVFAIL -> ``rfc2136:network`` /
``rfc2136:servfail`` (retryable).
"""

from __future__ import annotations

import base64
import binascii
import socket
from typing import Any, ClassVar

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.tsigkeyring
import dns.update

from certqueue import plugins
from certqueue.dns.base import DNSProvider, Handle
from certqueue.dns.zones import parse_hostport
from certqueue.errors import ConfigError, ProviderError
from certqueue.plugins import Setting, secret_value

NAME = "rfc2136"

_ALGORITHMS = {
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}
SETTINGS: plugins.Table = (
    Setting(
        "nameserver",
        (str,),
        "the primary's address, ip[:port] or host[:port]",
        required=True,
        env=("RFC2136_NAMESERVER",),
    ),
    Setting("tsig_key_name", (str,), "TSIG key name", required=True, env=("RFC2136_TSIG_KEY",)),
    Setting(
        "tsig_secret",
        (str,),
        "TSIG secret (base64)",
        required=True,
        secret=True,
        env=("RFC2136_TSIG_SECRET",),
    ),
    Setting(
        "tsig_algorithm",
        (str,),
        "hmac-sha256, hmac-sha512, hmac-sha384 or hmac-sha224",
        default="hmac-sha256",
        env=("RFC2136_TSIG_ALGORITHM",),
    ),
    Setting("zone", (str,), "skip the zone lookup: update this zone"),
    Setting("timeout", (int, float), "seconds per DNS exchange", default=10.0),
)


class _TSIGKey(dns.tsig.Key):
    """dnspython's Key prints its secret in repr(); this one does not (tracebacks, debuggers)."""

    def __repr__(self) -> str:
        return f"<TSIG key {self.name} {self.algorithm} secret=***>"


class RFC2136Provider(DNSProvider):
    name: ClassVar[str] = NAME
    default_timeout: ClassVar[tuple[float, float]] = (120.0, 2.0)

    settings: ClassVar[plugins.Table] = SETTINGS

    def configure(self, s: dict[str, Any]) -> None:
        try:
            self._host, self._port = _split_nameserver(str(s["nameserver"]))
        except ValueError as exc:
            raise ConfigError(
                f"dns provider {NAME}: nameserver must be host[:port]", key=f"{NAME}.nameserver"
            ) from exc
        algorithm = str(s["tsig_algorithm"]).lower()
        if algorithm not in _ALGORITHMS:
            raise ConfigError(
                f"dns provider {NAME}: tsig_algorithm must be one of {', '.join(_ALGORITHMS)}",
                key=f"{NAME}.tsig_algorithm",
            )
        try:
            raw = base64.b64decode(secret_value(s["tsig_secret"]) or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(
                f"dns provider {NAME}: tsig_secret is not base64", key=f"{NAME}.tsig_secret"
            ) from exc
        if not raw:
            raise ConfigError(f"dns provider {NAME}: tsig_secret is empty", key=f"{NAME}.tsig_secret")
        # the secret lives only in the key object
        self._key = _TSIGKey(str(s["tsig_key_name"]), raw, _ALGORITHMS[algorithm])
        self._zone = str(s["zone"]).rstrip(".").lower() if s["zone"] else None
        self._timeout = float(s["timeout"])

    def __repr__(self) -> str:
        return f"RFC2136Provider(nameserver={self._host}:{self._port}, key={self._key.name})"

    # -- interface ---------------------------------------------------------------------------

    def present(self, fqdn: str, value: str) -> Handle:
        name = _absolute(fqdn)
        zone = self._zone or self.zone_of(fqdn)
        update = self._update(zone)
        update.add(name, self.ttl, _txt(value))
        self._send(update, fqdn)
        return {"provider": NAME, "zone": zone, "fqdn": name.to_text(omit_final_dot=True)}

    def cleanup(self, fqdn: str, value: str, handle: Handle | None) -> None:
        name = _absolute(fqdn)
        zone = (handle or {}).get("zone") or self._zone or self.zone_of(fqdn)
        update = self._update(zone)
        update.delete(name, _txt(value))  # one rdata; deleting an absent one is a no-op (RFC 2136 3.4.2.4)
        self._send(update, fqdn)

    # -- internals ---------------------------------------------------------------------------

    def _address(self) -> str:
        try:
            parse_hostport(self._host)
            return self._host
        except ValueError:
            pass
        try:
            return str(socket.getaddrinfo(self._host, self._port, proto=socket.IPPROTO_TCP)[0][4][0])
        except OSError as exc:
            raise ProviderError(
                NAME, f"cannot resolve nameserver {self._host}", retryable=True, reason=f"{NAME}:network"
            ) from exc

    def _update(self, zone: str) -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(
            zone + ".", keyring=self._key, keyname=self._key.name, keyalgorithm=self._key.algorithm
        )

    def _send(self, update: dns.update.UpdateMessage, fqdn: str) -> None:
        address = self._address()
        try:
            response = dns.query.tcp(update, address, port=self._port, timeout=self._timeout)
        except dns.tsig.PeerError as exc:  # BADSIG, BADKEY, BADTIME
            raise ProviderError(
                NAME, f"TSIG key {self._key.name} rejected by {self._host}: {exc}", reason=f"{NAME}:auth"
            ) from exc
        except dns.exception.Timeout as exc:
            raise ProviderError(
                NAME,
                f"no answer from {self._host}:{self._port} within {self._timeout:g}s",
                retryable=True,
                reason=f"{NAME}:network",
            ) from exc
        except (OSError, EOFError) as exc:
            raise ProviderError(
                NAME,
                f"cannot reach {self._host}:{self._port}: {type(exc).__name__}",
                retryable=True,
                reason=f"{NAME}:network",
            ) from exc
        except dns.exception.DNSException as exc:
            raise ProviderError(
                NAME,
                f"bad response from {self._host}: {type(exc).__name__}",
                retryable=True,
                reason=f"{NAME}:bad_response",
            ) from exc
        rcode = response.rcode()
        if rcode == dns.rcode.NOERROR:
            return
        text = dns.rcode.to_text(rcode)
        if rcode in (dns.rcode.SERVFAIL,):
            raise ProviderError(
                NAME, f"update of {fqdn} failed: {text}", retryable=True, reason=f"{NAME}:servfail"
            )
        raise ProviderError(
            NAME, f"update of {fqdn} in zone {update.origin} refused: {text}", reason=f"{NAME}:refused"
        )


def _split_nameserver(text: str) -> tuple[str, int]:
    text = text.strip()
    if not text:
        raise ValueError("empty")
    try:
        return parse_hostport(text)
    except ValueError:
        pass
    host, sep, port = text.rpartition(":")
    if sep and host and ":" not in host:
        return host, int(port)
    if ":" in text:
        raise ValueError(text)
    return text, 53


def _absolute(fqdn: str) -> dns.name.Name:
    return dns.name.from_text(fqdn.rstrip(".") + ".")


def _txt(value: str) -> dns.rdtypes.ANY.TXT.TXT:
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode()])
