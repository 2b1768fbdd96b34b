"""The Celery app for Flower: ``celery -A certqueue.flower_app flower``, shipped read-only.

Celery's ``-A`` wants a module attribute holding the app; certqueue builds its app lazily (after
settings are read), so this module builds it at import, from the same layered settings
(``settings/``, ``CERTQUEUE_*``) every worker reads. Flower then watches the configured broker.

Flower is for watching. Its HTTP API can also send any task by name (``/api/task/async-apply``,
``send-task``, ``apply``), revoke, abort, change rate and time limits and shut workers down; any
Flower user could then revoke or deploy any certificate without the REST API's scopes (issue 13).
So before Flower builds its routes, every one of those endpoints is replaced by a handler that
answers 403, and Flower's own ``read_only`` option is forced on (it hides the buttons and refuses
the control endpoints as well). Writes go through the REST API (scoped tokens) or the CLI.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from certqueue.celery_app import lazy_app

#: Flower routes that change something: sending tasks, revoking, worker and pool control
BLOCKED_ROUTES = (
    r"/api/worker/shutdown/(.+)",
    r"/api/worker/pool/restart/(.+)",
    r"/api/worker/pool/grow/(.+)",
    r"/api/worker/pool/shrink/(.+)",
    r"/api/worker/pool/autoscale/(.+)",
    r"/api/worker/queue/add-consumer/(.+)",
    r"/api/worker/queue/cancel-consumer/(.+)",
    r"/api/task/apply/(.+)",
    r"/api/task/async-apply/(.+)",
    r"/api/task/send-task/(.+)",
    r"/api/task/abort/(.+)",
    r"/api/task/timeout/(.+)",
    r"/api/task/rate-limit/(.+)",
    r"/api/task/revoke/(.+)",
)
READ_ONLY_MESSAGE = (
    "certqueue's Flower is read-only: send work through the REST API (scoped tokens) or the CLI"
)


def block_task_api() -> int:
    """Replace Flower's mutating routes with a 403 handler, in place (before Flower starts);
    returns how many routes were replaced."""
    try:
        import flower.urls
        from tornado.web import RequestHandler
    except ImportError:  # Flower not installed: nothing to guard
        return 0

    class ReadOnly(RequestHandler):
        def _refuse(self, *_args: Any, **_kw: Any) -> None:
            self.set_status(403)
            self.finish({"error": READ_ONLY_MESSAGE})

        get = post = put = delete = patch = _refuse

        def check_xsrf_cookie(self) -> None:  # the answer is 403 whatever the cookie
            return None

    replaced = 0
    for i, handler in enumerate(flower.urls.handlers):
        pattern = handler.regex.pattern.rstrip("$") if hasattr(handler, "regex") else handler[0]
        if pattern in BLOCKED_ROUTES:
            flower.urls.handlers[i] = (pattern, ReadOnly)
            replaced += 1
    return replaced


os.environ["FLOWER_READ_ONLY"] = "true"  # Flower reads FLOWER_<OPTION> from the environment
block_task_api()

app: Celery = lazy_app.get()
