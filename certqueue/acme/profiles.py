"""ACME profiles (draft-aaron-acme-profiles): what a CA offers, and the checks made before an order.

Owns no state. A CA lists its profiles in the directory's ``meta.profiles`` (name -> description);
an order may name one. Let's Encrypt's profiles (letsencrypt.org/docs/profiles), the defaults here:

============  =============  =========  ================
profile       validity       max names  identifier types
============  =============  =========  ================
classic       90 days        100        DNS
tlsserver     45 days        25         DNS
shortlived    160 hours      25         DNS, IP
============  =============  =========  ================

:func:`check_profile` refuses, before anything is sent, an order whose profile the CA does not offer
or whose names exceed that profile's limit (``acme.profile_max_names``), so a bad request fails at
once as invalid input instead of as a CA rejection after spending a new-order budget. Short-lived
certificates need nothing special afterwards: the renewal policy
(:func:`certqueue.lifecycle.renewal.renewal_window`) renews any lifetime under 10 days at half of it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from certqueue.errors import InvalidInput

__all__ = [
    "DEFAULT_MAX_NAMES",
    "PROFILE_VALIDITY",
    "check_profile",
    "offered_profiles",
]

#: Let's Encrypt's "Max Names" per profile
DEFAULT_MAX_NAMES: Mapping[str, int] = {"classic": 100, "tlsserver": 25, "shortlived": 25}

#: Let's Encrypt's validity per profile (documentation, and the tests of the renewal policy)
PROFILE_VALIDITY: Mapping[str, dt.timedelta] = {
    "classic": dt.timedelta(days=90),
    "tlsserver": dt.timedelta(days=45),
    "shortlived": dt.timedelta(hours=160),
}


def offered_profiles(directory: Any) -> dict[str, str]:
    """The directory's ``meta.profiles`` (name -> description); empty when the CA offers none.

    ``directory`` is an ``acme.messages.Directory`` (``AcmeClient.directory``) or its JSON as a mapping.
    """
    if isinstance(directory, Mapping):
        meta: Any = directory.get("meta") or {}
        profiles = meta.get("profiles") if isinstance(meta, Mapping) else None
    else:
        meta = getattr(directory, "meta", None)
        profiles = getattr(meta, "profiles", None) if meta is not None else None
    if not isinstance(profiles, Mapping):
        return {}
    return {str(k): str(v) for k, v in profiles.items()}


def check_profile(
    directory: Any,
    profile: str | None,
    names: Sequence[str],
    max_names: Mapping[str, int] | None = None,
) -> None:
    """Raise :class:`InvalidInput` (``field="profile"``) if an order for ``names`` with ``profile``
    cannot be accepted: the CA does not offer the profile (reason ``profile:not_offered``), or there
    are more names than the profile allows (reason ``profile:too_many_names``).

    ``profile`` None (the CA's default) checks nothing here: certqueue.validation already caps a
    certificate at 100 names. ``max_names`` defaults to :data:`DEFAULT_MAX_NAMES` (pass
    ``settings.acme.profile_name_limits``); a profile it does not list has no limit of its own.
    """
    if not profile:
        return
    offered = offered_profiles(directory)
    if profile not in offered:
        shown = ", ".join(sorted(offered)) or "none"
        raise InvalidInput(
            f"the CA does not offer the ACME profile {profile!r} (offered: {shown})",
            field="profile",
            reason="profile:not_offered",
        )
    limits = DEFAULT_MAX_NAMES if max_names is None else max_names
    limit = limits.get(profile)
    count = len({n.strip().rstrip(".").lower() for n in names})
    if limit is not None and count > limit:
        raise InvalidInput(
            f"the ACME profile {profile!r} allows at most {limit} names; this certificate has {count}",
            field="profile",
            reason="profile:too_many_names",
        )
