"""Which deployed copies of a revoked or deleted certificate to remove, and when to try again: pure
policy (no ORM, no queue, no I/O). Owns no state.

* :func:`copies_to_remove`: every copy that has a remote reference (something was uploaded there,
  even if a newer deploy is pending or failed), in a region that is still configured and whose
  setting for this reason (``remove_on_revoke`` / ``remove_on_delete``) is on. A region removed
  from the settings is skipped: no worker holds its credentials any more.
* :func:`after_attempt`: the targets left after one round of ``Target.remove`` calls, and when to
  try the rest again. Each region keeps its own attempt count; the delay is the deploys' backoff
  (10 s doubling, capped at 30 min) on the largest count, so one stuck region does not speed up or
  slow down the others' first tries.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from certqueue.lifecycle.backoff import backoff

WHY = ("revoke", "delete")
#: the same table as a failed deploy's retry (tasks.propagate): first retry after about 10 s
RETRY_INITIAL_SECONDS = 10.0
RETRY_CAP_SECONDS = 1800.0
#: a region's result that ends its removal: the copy is gone (or was never there)
DONE = frozenset({"removed", "absent"})


@dataclass(frozen=True)
class DeployedCopy:
    region: str
    provider: str
    ref: str | None
    status: str


def copies_to_remove(
    copies: Iterable[DeployedCopy], policy: Mapping[str, bool], why: str
) -> list[DeployedCopy]:
    """The copies to remove because the certificate was revoked or deleted (``why``)."""
    if why not in WHY:
        raise ValueError(f"unknown removal reason {why!r}; known: {', '.join(WHY)}")
    return [c for c in copies if c.ref and c.status != "removed" and policy.get(c.region, False)]


def after_attempt(
    targets: Mapping[str, Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    now: dt.datetime,
    *,
    rng: random.Random | None = None,
) -> tuple[dict[str, dict[str, Any]], dt.datetime | None]:
    """(targets still to remove, when to try them again; None when nothing is left).

    ``results`` are the per-region outcomes (``{"region", "status", "reason"}``); a region with no
    result this round (its message was lost) stays with its attempt count unchanged.
    """
    left = {region: dict(entry) for region, entry in targets.items()}
    for res in results:
        region = str(res.get("region"))
        if region not in left:
            continue
        if res.get("status") in DONE:
            del left[region]
        else:
            left[region]["attempts"] = int(left[region].get("attempts") or 0) + 1
            left[region]["error"] = str(res.get("reason") or "unknown")[:128]
    if not left:
        return {}, None
    worst = max(int(e.get("attempts") or 0) for e in left.values())
    delay = backoff(max(worst, 1), initial=RETRY_INITIAL_SECONDS, cap=RETRY_CAP_SECONDS, rng=rng)
    return left, now + dt.timedelta(seconds=delay)
