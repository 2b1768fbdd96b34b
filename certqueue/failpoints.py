"""Fault injection points for the chaos and crash tests (off unless configured).

``CERTQUEUE_FAILPOINTS="validate.before_finalize=sleep:20,deploy.edge=error"`` makes the named
point sleep (so a test can SIGKILL the worker at a known moment; ``sleep:20:4``: only the first four
times it is hit in a process), raise a retryable error, or raise
one until a moment (``error_until:<unix time>``: a target that fails for a while, then recovers). The
variable is read once per process; in production it is unset and ``hit`` is a dictionary lookup.
"""

from __future__ import annotations

import os
import threading
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


_hits: dict[str, int] = {}
_hits_lock = threading.Lock()


def hit(name: str) -> None:
    action = _load().get(name)
    if not action:
        return
    if action.startswith("sleep:"):
        # sleep:<seconds>, or sleep:<seconds>:<n>: only the first n hits in this process sleep
        seconds, _, first = action[6:].partition(":")
        if first:
            with _hits_lock:
                _hits[name] = _hits.get(name, 0) + 1
                if _hits[name] > int(first):
                    return
        time.sleep(float(seconds))
    elif action == "error":
        raise RetryableError(f"failpoint {name}", reason="failpoint")
    elif action.startswith("error_until:") and time.time() < float(action[12:]):
        raise RetryableError(f"failpoint {name}", reason="failpoint")
