"""Fault injection points for the chaos and crash tests (off unless configured).

``CERTQUEUE_FAILPOINTS="validate.before_finalize=sleep:20,deploy.edge=error"`` makes the named
point sleep (so a test can SIGKILL the worker at a known moment), raise a retryable error, or raise
one until a moment (``error_until:<unix time>``: a target that fails for a while, then recovers). The
variable is read once per process; in production it is unset and ``hit`` is a dictionary lookup.
"""

from __future__ import annotations

import os
import time

from certqueue.errors import RetryableError

_points: dict[str, str] | None = None


def _load() -> dict[str, str]:
    global _points
    if _points is None:
        raw = os.environ.get("CERTQUEUE_FAILPOINTS", "")
        _points = {}
        for item in raw.split(","):
            if "=" in item:
                k, v = item.split("=", 1)
                _points[k.strip()] = v.strip()
    return _points


def hit(name: str) -> None:
    action = _load().get(name)
    if not action:
        return
    if action.startswith("sleep:"):
        time.sleep(float(action[6:]))
    elif action == "error":
        raise RetryableError(f"failpoint {name}", reason="failpoint")
    elif action.startswith("error_until:") and time.time() < float(action[12:]):
        raise RetryableError(f"failpoint {name}", reason="failpoint")
