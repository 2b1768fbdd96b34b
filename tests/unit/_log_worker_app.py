"""A Celery app for tests/unit/test_logconfig.py's real worker process: certqueue's logging set up
as the CLI does it, and one task that logs the way certqueue's tasks do (ids in arguments)."""

from __future__ import annotations

import logging
import os

from celery import Celery

from certqueue.config import configure
from certqueue.logconfig import configure_logging

configure_logging(configure({}).settings)
app = Celery("logtest", broker=os.environ["LOGTEST_BROKER"])
app.conf.update(task_default_queue=os.environ["LOGTEST_QUEUE"], worker_hijack_root_logger=True)
log = logging.getLogger("certqueue.tasks.logtest")


@app.task(name="logtest.deploy", bind=True)
def deploy(self: object, certificate_id: str, region: str, issuance_id: int) -> str:
    log.info("deploying issuance %s", issuance_id)
    log.warning("leaked -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END PRIVATE KEY----- here")
    return "ok"
