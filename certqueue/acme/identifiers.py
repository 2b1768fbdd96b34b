"""IP-address identifiers (RFC 8738): whether a certificate may name IP addresses, and how they are
validated. Pure: no I/O, no state.

A CA issues for IP addresses only under some profiles (Let's Encrypt: ``shortlived`` only, since
January 2026), and validates them only with ``http-01`` or ``tls-alpn-01`` (RFC 8738 section 7:
there is no DNS name to put a TXT record under, so never ``dns-01``). ``acme.ip_identifier_profiles``
says which profiles of the CA allow them: ``*`` any (also no profile: Pebble, most private CAs), an
empty list none. A request that breaks either rule fails before anything is written.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from certqueue.errors import InvalidInput

#: challenge types an IP identifier can be validated with (RFC 8738 section 7)
IP_CHALLENGE_TYPES = ("http-01", "tls-alpn-01")
ANY_PROFILE = "*"


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check_ip_identifiers(
    names: Sequence[str],
    *,
    profile: str | None,
    allowed_profiles: Sequence[str],
    challenge_type: str,
    challenge_map: Mapping[str, str],
) -> None:
    """Raise :class:`InvalidInput` if ``names`` holds an IP address the CA cannot be asked for
    (reason ``ip:profile``), or one set to a challenge type that cannot validate it (``ip:challenge``)."""
    ips = [n for n in names if is_ip(n)]
    if not ips:
        return
    if ANY_PROFILE not in allowed_profiles and (profile is None or profile not in allowed_profiles):
        allowed = ", ".join(allowed_profiles) or "none"
        which = f"profile {profile!r}" if profile else "the CA's default profile"
        raise InvalidInput(
            f"{ips[0]}: IP address certificates are not issued under {which} "
            f"(acme.ip_identifier_profiles allows: {allowed})",
            field="domains",
            reason="ip:profile",
        )
    for ip in ips:
        typ = challenge_map.get(ip, challenge_type)
        if typ not in IP_CHALLENGE_TYPES:
            raise InvalidInput(
                f"{ip}: an IP address is validated with {' or '.join(IP_CHALLENGE_TYPES)}, not {typ} "
                "(RFC 8738)",
                field="challenge_type",
                reason="ip:challenge",
            )
