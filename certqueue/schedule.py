"""Beat's schedule: what runs periodically, on the ``scan`` queue."""

from __future__ import annotations

from typing import Any

from certqueue.config import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    a = settings.automation
    scan_every = min(a.scan_interval_seconds, a.check_interval_hours * 3600)
    return {
        "dispatch": {
            "task": "certqueue.scan.dispatch",
            "schedule": min(a.dispatch_interval_seconds, scan_every),
            "options": {"queue": "scan", "expires": max(a.dispatch_interval_seconds * 4, 30.0)},
        },
        "scan-due": {"task": "certqueue.scan.due", "schedule": scan_every, "options": {"queue": "scan"}},
        "scan-expire": {
            "task": "certqueue.scan.expire",
            "schedule": max(scan_every, 300.0),
            "options": {"queue": "scan"},
        },
        "reconcile": {
            "task": "certqueue.scan.reconcile",
            # it resends lost work (past ``stuck_after_seconds``) and resumes parked work (past its
            # park delay): often enough for both, so a 60 s parking is not a five-minute one
            "schedule": max(min(a.stuck_after_seconds / 3, a.park_initial_seconds / 2, 300), 1),
            "options": {"queue": "scan"},
        },
        "ari": {
            "task": "certqueue.scan.ari",
            "schedule": max(scan_every, 60.0),
            "options": {"queue": "scan"},
        },
        "drift": {"task": "certqueue.scan.drift", "schedule": 3600.0, "options": {"queue": "scan"}},
        "events-deliver": {
            "task": "certqueue.events.deliver",
            "schedule": settings.events.deliver_interval_seconds,
            "options": {
                "queue": "events",
                "expires": max(settings.events.deliver_interval_seconds * 4, 30.0),
            },
        },
        "events-expiring": {
            "task": "certqueue.events.expiring",
            "schedule": settings.events.expiring_check_seconds,
            "options": {"queue": "events"},
        },
    }
