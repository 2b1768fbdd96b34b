"""What more than one CLI command does besides printing: who is acting, asking dispatch to run, and
which certificates are due for renewal. Imported by certqueue.cli and the certqueue.cli_* modules;
imports none of them.

(``due_for_renewal`` belongs in certqueue.operations, beside ``request_renew``, once the API wants
the same "renew what is due" request; it is here until then.)"""

from __future__ import annotations

import os
from typing import Any


def cli_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


def nudge() -> None:
    """The request is committed (durable); ask dispatch to run, waiting at most a second for the
    broker (beat's dispatch picks the work up anyway)."""
    from certqueue import nudge as nudging

    nudging.nudge()
    nudging.flush(1.0)


def due_for_renewal(session: Any) -> list[str]:
    """The certificates due for renewal now: ACTIVE, renewed automatically, issued here, their
    renewal time reached (what beat's scan would claim next)."""
    from certqueue import dispatch
    from certqueue.models import utcnow

    return list(dispatch.due_ids(session, utcnow()))
