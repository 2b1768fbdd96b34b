"""The Celery app for Flower: ``celery -A certqueue.flower_app flower``.

Celery's ``-A`` wants a module attribute holding the app; certqueue builds its app lazily (after
settings are read), so this module builds it at import, from the same layered settings
(``settings/``, ``CERTQUEUE_*``) every worker reads. Flower then watches the configured broker.
"""

from __future__ import annotations

from celery import Celery

from certqueue.celery_app import lazy_app

app: Celery = lazy_app.get()
