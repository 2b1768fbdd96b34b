"""Drift checking over a region's deployments, a batch at a time: pure policy. Owns no state.

The region's drift task (``certqueue.tasks.drift``) walks the region's deployments in id order from
its cursor. These functions decide what a check means and where the cursor goes:

* :func:`is_drift`: the target serves something other than what we deployed there (or nothing).
* :func:`error_action`: an error of the target on one deployment either ends this run for the
  region (``stop``: bad credentials or settings fail every call alike, so the cursor stays where it
  is and the next run starts there again) or skips that deployment (``skip``: it is checked again in
  the next pass). Either way the error is recorded (events and a metric), never only logged.
* :func:`advance`: the cursor after a run. A run that checked a full batch, or stopped, continues
  from the last id it checked; a run that saw fewer rows than a batch reached the end: the pass is
  complete and the next one starts from the beginning.
"""

from __future__ import annotations

from dataclasses import dataclass

#: reasons (``<target>:<kind>``) whose kind means "every call of this region will fail alike"
STOP_KINDS = frozenset({"auth", "config", "forbidden"})


def is_drift(deployed: str | None, live: str | None) -> bool:
    """Whether the copy at a target differs from what was deployed there (``live`` None: gone)."""
    return deployed is not None and live != deployed


def error_action(reason: str) -> str:
    """``stop`` (the region's run ends here) or ``skip`` (go on with the next deployment)."""
    kind = reason.rsplit(":", 1)[-1] if ":" in reason else reason
    return "stop" if kind in STOP_KINDS else "skip"


@dataclass(frozen=True)
class Advance:
    after_id: int
    pass_complete: bool


def advance(after_id: int, last_checked: int | None, rows: int, batch: int, *, stopped: bool) -> Advance:
    """Where the cursor goes after a run that looked at ``rows`` deployments (``last_checked``: the
    id of the last one it finished, None when it finished none)."""
    if stopped:
        return Advance(last_checked if last_checked is not None else after_id, False)
    if rows >= batch:
        return Advance(last_checked if last_checked is not None else after_id, False)
    return Advance(0, True)
