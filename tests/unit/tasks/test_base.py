"""The failure policy as the base task wires it (tasks/base.py), on a real database (SQLite and
PostgreSQL) and the embedded broker: what a step wrote is committed or rolled back, what follows is
sent only after the commit, and each error kind ends where the policy says (retry this message,
park the work, record a permanent failure, refuse the request, requeue and stop the worker).

A task of the test's own runs ``run_step`` as a worker would (a request pushed, not called
directly), so a retry is a real message in the broker folder, read back here."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Reject, Retry
from sqlalchemy import select

from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.embedded_broker import decode_message
from certqueue.errors import InvalidInput, KeyStoreError, NotFound, PermanentError, RetryableError
from certqueue.lifecycle import failure
from certqueue.models import RuntimeSetting
from certqueue.tasks.base import CertqueueTask, StepContext, Wait
from certqueue.tasks.pipeline import task as follow_up


@pytest.fixture
def settings(db_url: str, settings_factory: Callable[..., Settings], tmp_path: Path) -> Settings:
    return settings_factory(database_url=db_url, broker={"filesystem_path": str(tmp_path / "broker")})


def _write(ctx: StepContext, key: str) -> None:
    ctx.session.add(RuntimeSetting(key=key, value=1))


def _keys() -> list[str]:
    with session_scope(write=False) as s:
        return sorted(s.execute(select(RuntimeSetting.key)).scalars())


class _Probe(CertqueueTask):
    """Hooks that leave a trace in the database (what a real task records instead)."""

    abstract = True
    request_errors = (NotFound,)  # a public request task names its own
    earlier_parks = 0

    def on_permanent(self, ctx: StepContext, exc: Any, *args: Any) -> Any:
        _write(ctx, f"failed:{exc.reason}")
        ctx.then(follow_up("certqueue.dns.cleanup", "cert_x", 1))
        return None

    def parks(self, ctx: StepContext, *args: Any) -> int:
        return self.earlier_parks

    def on_park(self, ctx: StepContext, exc: Any, delay: float, *args: Any) -> Any:
        _write(ctx, f"parked:{exc.reason}:{delay:.0f}")
        ctx.then(follow_up("certqueue.scan.dispatch"))  # e.g. give the capacity back
        return None


@pytest.fixture
def probe(settings: Settings) -> Iterator[Any]:
    from certqueue.celery_app import create_app

    # an app of this test's own settings (its broker folder): the process-wide one may have been
    # built by an earlier test's module fixtures
    app: Celery = create_app(settings)

    @app.task(bind=True, base=_Probe, name="tests.tasks.probe", shared=False)
    def probe_task(self: Any, *_args: Any, **_kw: Any) -> None:  # never run: run_step is driven
        return None

    yield probe_task
    app.tasks.pop("tests.tasks.probe", None)


def _run(probe: Any, step: Callable[..., Any], *args: Any, transient: int = 0) -> Any:
    probe.push_request(
        id="req-1", args=list(args), kwargs={"_transient": transient}, called_directly=False, hostname=None
    )
    try:
        return probe.run_step(step, *args)
    finally:
        probe.pop_request()


def _messages(settings: Settings) -> list[dict[str, Any]]:
    """The messages in the embedded broker's ready folder: task name, args, kwargs, eta."""
    out = []
    for path in sorted((Path(settings.broker.filesystem_path) / "out").iterdir()):
        env = decode_message(path.read_bytes())
        body = json.loads(__import__("base64").b64decode(env["body"]))
        out.append(
            {"task": env["headers"]["task"], "args": body[0], "kwargs": body[1], "eta": env["headers"]["eta"]}
        )
    return out


def test_success_commits_the_step_and_then_sends_its_follow_ups(settings: Settings, probe: Any) -> None:
    def step(ctx: StepContext, key: str) -> str:
        _write(ctx, key)
        ctx.then(follow_up("certqueue.propagate.start", {"certificate_id": "cert_a"}))
        return "done"

    assert _run(probe, step, "ok") == "done"
    assert _keys() == ["ok"]
    assert [(m["task"], m["args"]) for m in _messages(settings)] == [
        ("certqueue.propagate.start", [{"certificate_id": "cert_a"}])
    ]


def test_wait_commits_what_the_step_wrote_and_retries_the_message_later(
    settings: Settings, probe: Any
) -> None:
    def step(ctx: StepContext) -> None:
        _write(ctx, "polled")
        ctx.then(follow_up("certqueue.propagate.start", {"certificate_id": "cert_a"}))
        raise Wait(30)

    with pytest.raises(Retry):
        _run(probe, step)
    assert _keys() == ["polled"]
    sent = _messages(settings)
    # the follow-up is sent (the commit happened) and the task itself comes back with a countdown
    assert sorted(m["task"] for m in sent) == ["certqueue.propagate.start", "tests.tasks.probe"]
    again = next(m for m in sent if m["task"] == "tests.tasks.probe")
    assert again["eta"] is not None
    assert again["kwargs"] == {}  # a wait is not a failure: the transient count starts again


def test_a_transient_error_rolls_back_and_retries_with_the_count_raised(
    settings: Settings, probe: Any
) -> None:
    def step(ctx: StepContext, key: str) -> None:
        _write(ctx, key)
        ctx.then(follow_up("certqueue.propagate.start", {"certificate_id": "cert_a"}))
        raise RetryableError("CA busy", reason="acme:busy")

    with pytest.raises(Retry):
        _run(probe, step, "never", transient=1)
    assert _keys() == []  # rolled back
    sent = _messages(settings)
    assert [(m["task"], m["args"], m["kwargs"]) for m in sent] == [
        ("tests.tasks.probe", ["never"], {"_transient": 2})
    ]
    assert sent[0]["eta"] is not None


def test_transient_errors_give_up_after_the_policy_s_retries_and_park_the_work(
    settings: Settings, probe: Any
) -> None:
    def step(ctx: StepContext) -> None:
        _write(ctx, "never")
        raise RetryableError("CA busy", reason="acme:busy")

    probe.earlier_parks = 2
    out = _run(probe, step, transient=failure.TRANSIENT_IN_TASK_RETRIES)
    assert out == {"status": "backing_off", "reason": "acme:busy"}
    (parked,) = _keys()
    assert parked.startswith("parked:acme:busy:")
    # the third parking of the same work: PARK_INITIAL doubled twice, within the 20 % jitter
    delay = float(parked.rsplit(":", 1)[1])
    assert failure.PARK_INITIAL * 4 * 0.8 - 1 <= delay <= failure.PARK_INITIAL * 4 * 1.2 + 1
    # no retry message (the database holds the work now); what the park handler asked for is sent
    assert [m["task"] for m in _messages(settings)] == ["certqueue.scan.dispatch"]


def test_the_last_quick_retry_is_still_a_retry(settings: Settings, probe: Any) -> None:
    def step(ctx: StepContext) -> None:
        raise RetryableError("CA busy", reason="acme:busy")

    with pytest.raises(Retry):
        _run(probe, step, transient=failure.TRANSIENT_IN_TASK_RETRIES - 1)
    assert [m["kwargs"] for m in _messages(settings)] == [{"_transient": failure.TRANSIENT_IN_TASK_RETRIES}]


def test_a_permanent_error_rolls_back_the_step_and_records_the_failure(
    settings: Settings, probe: Any
) -> None:
    def step(ctx: StepContext) -> None:
        _write(ctx, "never")
        ctx.then(follow_up("certqueue.propagate.start", {"certificate_id": "cert_a"}))
        raise PermanentError("order invalid", reason="acme:invalid")

    assert _run(probe, step) == {"status": "failed", "reason": "acme:invalid"}
    assert _keys() == ["failed:acme:invalid"]
    # only what the failure handler asked for is sent, not the failed step's follow-up
    assert [m["task"] for m in _messages(settings)] == ["certqueue.dns.cleanup"]


def test_an_unexpected_exception_is_a_permanent_internal_failure(settings: Settings, probe: Any) -> None:
    def step(ctx: StepContext) -> None:
        raise KeyError("bug")

    assert _run(probe, step) == {"status": "failed", "reason": "internal"}
    assert _keys() == ["failed:internal"]


@pytest.mark.parametrize(
    "error",
    [
        InvalidInput("bad payload", field="certificate_id"),
        NotFound("no such certificate"),  # one of this task's request errors, not a permanent failure
    ],
)
def test_a_request_error_fails_the_job_and_writes_nothing(
    settings: Settings, probe: Any, error: Exception
) -> None:
    def step(ctx: StepContext) -> None:
        _write(ctx, "never")
        raise error

    with pytest.raises(type(error)):
        _run(probe, step)
    assert _keys() == []  # no "failed:..." row: the request was refused, no work failed
    assert _messages(settings) == []


def test_a_key_store_error_requeues_the_message_and_leaves_everything_as_it_was(
    settings: Settings, probe: Any
) -> None:
    def step(ctx: StepContext) -> None:
        _write(ctx, "never")
        raise KeyStoreError("key file unreadable", reason="keystore:unreadable")

    with pytest.raises(Reject) as info:
        _run(probe, step)
    assert info.value.requeue is True
    assert _keys() == []
    assert _messages(settings) == []
