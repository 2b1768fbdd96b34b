"""certqueue.keyrotation on both backends: a few thousand encrypted rows in every table that holds
keys, rotated; a rotation that crashes halfway leaves every row readable and resumes to the end;
retiring the old key is a separate step, refused while a row or a live process still uses it."""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from certqueue import certificates, db, keyrotation
from certqueue import keystore as keyfile
from certqueue.acme.accounts import account_aad
from certqueue.certificates import issuance_aad, order_key_aad
from certqueue.config import Settings
from certqueue.errors import KeyStoreError
from certqueue.keystore import KeyStore, rotate_key_file
from certqueue.models import Account, Certificate, Issuance, Order, ProcessHeartbeat, utcnow

ISSUANCES = 2500
ACCOUNTS = 20
ORDERS = 300
TOTAL = ISSUANCES + ACCOUNTS + ORDERS


def _plain(kind: str, i: int) -> bytes:
    """A distinct plaintext per row, so a blob moved between rows would be caught too."""
    return f"-----BEGIN PRIVATE KEY-----\n{kind}-{i}\n-----END PRIVATE KEY-----\n".encode()


def _populate(store: KeyStore, n_certs: int = 50) -> None:
    """Rows inserted in bulk with blobs encrypted exactly as certqueue writes them (same AAD)."""
    now = utcnow()
    certs = [
        {
            "id": f"cert_rot{i:016d}",
            "domains": [f"r{i}.example.com"],
            "dedupe_key": f"rot{i}",
            "state": "ACTIVE",
            "key_type": "ec256",
            "challenge_type": "http-01",
            "challenge_map": {},
            "directory_url": "https://acme.example/dir",
            "targets": [],
            "created_at": now,
            "updated_at": now,
        }
        for i in range(n_certs)
    ]
    issuances = []
    for i in range(ISSUANCES):
        cid, fp = certs[i % n_certs]["id"], secrets.token_hex(32)
        issuances.append(
            {
                "certificate_id": cid,
                "serial": f"{i:x}",
                "not_before": now,
                "not_after": now,
                "cert_pem": "x",
                "chain_pem": "",
                "key_type": "ec256",
                "fingerprint": fp,
                "issuer": "",
                "created_at": now,
                "key_enc": store.encrypt(_plain("iss", i), issuance_aad(cid, fp)),
            }
        )
    accounts = [
        {
            "directory_url": "https://acme.example/dir",
            "contact": f"mailto:a{i}@example.com",
            "key_type": "ec256",
            "created_at": now,
            "key_enc": store.encrypt(
                _plain("acct", i), account_aad("https://acme.example/dir", f"mailto:a{i}@example.com")
            ),
        }
        for i in range(ACCOUNTS)
    ]
    orders = []
    for i in range(ORDERS):
        cid, csr = certs[i % n_certs]["id"], f"csr-{i}"
        orders.append(
            {
                "certificate_id": cid,
                "purpose": "issue",
                "csr_pem": csr,
                "status": "valid",
                "polls": 0,
                "created_at": now,
                "updated_at": now,
                "key_enc": store.encrypt(_plain("ord", i), order_key_aad(cid, csr)),
            }
        )
    with db.session_scope() as s:
        s.execute(insert(Certificate), certs)
        s.execute(insert(Issuance), issuances)
        s.execute(insert(Account), accounts)
        s.execute(insert(Order), orders)


def _check_all(store: KeyStore) -> dict[str, int]:
    """Decrypt every row with ``store`` (and check its plaintext); returns blobs per kid."""
    kids: dict[str, int] = {}

    def seen(blob: bytes) -> None:
        kid = store.kid_of(blob)
        kids[kid] = kids.get(kid, 0) + 1

    with db.session_scope(write=False) as s:
        for r in s.execute(select(Issuance).order_by(Issuance.id)).scalars():
            assert r.key_enc is not None
            assert store.decrypt(r.key_enc, issuance_aad(r.certificate_id, r.fingerprint)) == _plain(
                "iss", int(r.serial, 16)
            )
            seen(r.key_enc)
        for a in s.execute(select(Account)).scalars():
            i = int(a.contact.split("@")[0][len("mailto:a") :])
            assert store.decrypt(a.key_enc, account_aad(a.directory_url, a.contact)) == _plain("acct", i)
            seen(a.key_enc)
        for o in s.execute(select(Order)).scalars():
            assert store.decrypt(o.key_enc, order_key_aad(o.certificate_id, o.csr_pem)) == _plain(
                "ord", int(o.csr_pem.split("-")[1])
            )
            seen(o.key_enc)
    return kids


@pytest.fixture
def populated(db_settings: Settings) -> tuple[Path, str]:
    path = Path(db_settings.storage.encryption_key_path)
    store = KeyStore.from_file(path)
    _populate(store)
    return path, store.active_kid


def test_rotate_reencrypts_every_row_and_retire_removes_the_old_key(populated: tuple[Path, str]) -> None:
    path, old_kid = populated
    assert _check_all(KeyStore.from_file(path)) == {old_kid: TOTAL}

    report = keyrotation.rotate(path)

    assert report.new_kid and report.new_kid != old_kid
    assert report.reencrypted == TOTAL
    assert report.old_kids == [old_kid]
    store = KeyStore.from_file(path)
    assert store.active_kid == report.new_kid
    assert store.kids == {old_kid, report.new_kid}  # rotate retires nothing
    assert _check_all(store) == {report.new_kid: TOTAL}

    assert keyrotation.retire(path) == [old_kid]
    store = KeyStore.from_file(path)
    assert store.kids == {report.new_kid}  # the old key is gone from the file
    assert _check_all(store) == {report.new_kid: TOTAL}
    assert os.stat(path).st_mode & 0o077 == 0
    assert keyrotation.retire(path) == []  # nothing left to retire

    # rotating again works the same way (the previous new key is now the old one)
    again = keyrotation.rotate(path)
    assert again.reencrypted == TOTAL and keyrotation.retire(path) == [report.new_kid]
    assert _check_all(KeyStore.from_file(path)) == {again.new_kid: TOTAL}


def test_retire_refuses_while_a_row_is_under_an_old_key(populated: tuple[Path, str]) -> None:
    path, old_kid = populated
    new_kid = rotate_key_file(path)
    keyrotation.reencrypt_all(KeyStore.from_file(path), stop_after=10)  # an interrupted pass
    before = path.read_bytes()
    with pytest.raises(KeyStoreError, match=f"rows are still under key.*{old_kid}.*--resume") as exc:
        keyrotation.retire(path)
    assert exc.value.reason == "keystore:in_use"
    assert path.read_bytes() == before  # nothing changed
    keyrotation.rotate(path, resume_only=True)
    assert keyrotation.retire(path) == [old_kid]
    assert _check_all(KeyStore.from_file(path)) == {new_kid: TOTAL}


def _heartbeat(process: str, kid: str, *, seen_ago: float = 0.0, loaded_ago: float = 3600.0) -> None:
    now = utcnow()
    with db.session_scope() as s:
        s.add(
            ProcessHeartbeat(
                process=process,
                role="worker:acme",
                host="h",
                pid=1,
                keyring_id="kr0",
                active_kid=kid,
                loaded_at=now - dt.timedelta(seconds=loaded_ago),
                seen_at=now - dt.timedelta(seconds=seen_ago),
            )
        )


def test_retire_refuses_while_a_live_process_encrypts_with_an_old_key(
    populated: tuple[Path, str], settings_factory: Callable[..., Settings], db_url: str
) -> None:
    path, old_kid = populated
    settings_factory(database_url=db_url, **{"storage.process_stale_seconds": 60})
    report = keyrotation.rotate(path)
    _heartbeat("dead:1", old_kid, seen_ago=600)  # gone for ten minutes: does not block
    _heartbeat("live:2", old_kid, seen_ago=5)
    before = path.read_bytes()
    with pytest.raises(KeyStoreError, match=f"live:2.*still encrypts with key {old_kid}") as exc:
        keyrotation.retire(path)
    assert "dead:1" not in exc.value.message
    assert path.read_bytes() == before
    # the process reloads the file and reports the new key, but only just now: the grace period
    with db.session_scope() as s:
        s.query(ProcessHeartbeat).filter_by(process="live:2").delete()
    _heartbeat("live:2", str(report.new_kid), loaded_ago=1)
    with pytest.raises(KeyStoreError, match=r"loaded key .* only now"):
        keyrotation.retire(path)
    with db.session_scope() as s:
        s.query(ProcessHeartbeat).filter_by(process="live:2").delete()
    _heartbeat("live:2", str(report.new_kid), loaded_ago=3600)
    assert keyrotation.retire(path) == [old_kid]


def test_a_running_process_reloads_a_changed_key_file(
    key_file: Path, settings_factory: Callable[..., Settings], db_url: str
) -> None:
    """No restart: the next keystore() after a rotation encrypts under the new key, and the heartbeat
    thread reports it."""
    settings = settings_factory(database_url=db_url, **{"storage.key_check_seconds": 0.05})
    first = certificates.keystore(settings)
    keyrotation.start_heartbeat("test")
    try:
        new_kid = rotate_key_file(key_file)
        store = certificates.keystore(settings)
        assert store is not first and store.active_kid == new_kid
        assert store.kid_of(store.encrypt(b"x", b"aad")) == new_kid
        assert certificates.keystore(settings) is store  # unchanged file: no reload
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = [p for p in keyrotation.live_processes() if p.active_kid == new_kid]
            if rows:
                break
            time.sleep(0.05)
        assert rows and rows[0].role == "test"
    finally:
        keyrotation.stop_heartbeat()
    assert keyrotation.live_processes() == []  # a clean stop removes the row


def test_a_key_file_that_stops_loading_keeps_the_keyring_in_force(
    key_file: Path, settings_factory: Callable[..., Settings]
) -> None:
    settings = settings_factory()
    store = certificates.keystore(settings)
    key_file.write_bytes(b"certqueue-keyring 1\nnot a key line\n")
    assert certificates.keystore(settings) is store
    assert keyfile.current(key_file) is store


@pytest.mark.parametrize("stop_after", [1, 1234, TOTAL - 1])
def test_a_crash_halfway_loses_nothing_and_resume_finishes(
    populated: tuple[Path, str], stop_after: int
) -> None:
    path, old_kid = populated
    # the first steps of rotate(), then a "crash" after stop_after rows (each batch is committed)
    new_kid = rotate_key_file(path)
    done = keyrotation.reencrypt_all(KeyStore.from_file(path), batch=500, stop_after=stop_after)
    assert done == stop_after
    db.dispose_all()  # the process is gone; a new one starts from the files and the database

    store = KeyStore.from_file(path)
    assert store.kids == {old_kid, new_kid} and store.active_kid == new_kid
    assert _check_all(store) == {new_kid: stop_after, old_kid: TOTAL - stop_after}
    assert keyrotation.remaining_kids(store) == {old_kid, new_kid}

    report = keyrotation.rotate(path, resume_only=True)
    assert report.new_kid is None  # no further key added
    assert report.reencrypted == TOTAL - stop_after
    assert keyrotation.retire(path) == [old_kid]
    store = KeyStore.from_file(path)
    assert store.kids == {new_kid}
    assert _check_all(store) == {new_kid: TOTAL}


def test_resume_with_nothing_to_do_is_a_no_op(populated: tuple[Path, str]) -> None:
    path, old_kid = populated
    report = keyrotation.rotate(path, resume_only=True)
    assert (report.new_kid, report.reencrypted, report.old_kids) == (None, 0, [])
    assert keyrotation.retire(path) == []
    assert KeyStore.from_file(path).kids == {old_kid}
    assert _check_all(KeyStore.from_file(path)) == {old_kid: TOTAL}


def test_keys_rotate_cli(
    populated: tuple[Path, str], tmp_path: Path, db_url: str, settings_factory: Callable[..., Settings]
) -> None:
    """``certqueue keys rotate`` end to end (settings from a settings directory, as an operator runs it)."""
    from click.testing import CliRunner

    from certqueue.cli import main

    path, old_kid = populated
    settings_dir = tmp_path / "cli-settings"
    settings_dir.mkdir()
    (settings_dir / "certqueue.yaml").write_text(
        f"storage:\n  encryption_key_path: {path}\ndatabase:\n  url: {db_url}\n"
    )
    env = {"CERTQUEUE_SETTINGS_DIR": str(settings_dir)}
    result = CliRunner().invoke(main, ["keys", "rotate"], env=env)
    assert result.exit_code == 0, result.output
    assert old_kid in KeyStore.from_file(path).kids and "keys retire" in result.output
    result = CliRunner().invoke(main, ["keys", "retire"], env=env)
    assert result.exit_code == 0, result.output
    settings_factory(database_url=db_url)
    store = KeyStore.from_file(path)
    assert old_kid not in store.kids
    assert _check_all(store) == {store.active_kid: TOTAL}


def test_forget_processes_deletes_only_the_named_pids_of_this_host(db_settings: Settings) -> None:
    """An idle worker kills its pool processes (certqueue.worker_pool) and removes their heartbeats
    by pid: another host's process with the same pid, and this host's other pids, stay."""
    import socket

    here = socket.gethostname()[:80]
    now = utcnow()
    rows = [("a", here, 101), ("b", here, 102), ("c", here, 103), ("d", "elsewhere", 101)]
    with db.session_scope() as s:
        for process, host, pid in rows:
            s.add(
                ProcessHeartbeat(
                    process=process,
                    role="worker:dns",
                    host=host,
                    pid=pid,
                    keyring_id="kr0",
                    active_kid="k1",
                    loaded_at=now,
                    seen_at=now,
                )
            )
    assert keyrotation.forget_processes([101, 102]) == 2
    assert keyrotation.forget_processes([]) == 0
    with db.session_scope(write=False) as s:
        left = sorted(s.execute(select(ProcessHeartbeat.process)).scalars())
    assert left == ["c", "d"]


# --- the heartbeat, step by step (no thread started: each method called as the thread would) --------


class _RecordingEvent:
    """Stands in for the heartbeat's wake event: records each wait's timeout and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False

    def clear(self) -> None:
        pass

    def set(self) -> None:
        pass


def test_a_heartbeat_names_its_process_by_host_pid_and_a_short_random_tag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    long_host = "h" * 100
    monkeypatch.setattr("socket.gethostname", lambda: long_host)
    hb = keyrotation._Heartbeat("r" * 70)
    assert hb.role == "r" * 64  # the column widths: role 64, host 80
    assert hb.host == "h" * 80
    assert hb.pid == os.getpid()
    assert re.fullmatch(rf"h{{80}}:{os.getpid()}:[0-9a-f]{{6}}", hb.process)
    assert hb.thread.name == "certqueue-key-heartbeat"
    assert hb.thread.daemon is True  # never keeps a process from exiting


def test_a_failing_heartbeat_is_logged_by_class_name_and_retried_after_the_check_interval(
    settings_factory: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings_factory(**{"storage.key_check_seconds": 7.5})
    hb = keyrotation._Heartbeat("test")
    hb.wake = _RecordingEvent()  # type: ignore[assignment]
    beats = 0

    def beat() -> None:
        nonlocal beats
        beats += 1
        if beats == 2:
            hb.stop.set()
        raise RuntimeError("postgresql://certqueue:secret@db/certqueue refused")

    hb.beat = beat  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="certqueue.keyrotation"):
        hb._run()
    assert beats == 2
    assert hb.wake.waits == [7.5, 7.5]  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records] == ["key heartbeat failed: RuntimeError"] * 2


@pytest.mark.parametrize("loaded", [1_000_000_000.0, None])
def test_a_heartbeat_reports_when_its_keyring_was_loaded(
    db_settings: Settings, monkeypatch: pytest.MonkeyPatch, loaded: float | None
) -> None:
    """The load time of the keyring held (the retire grace period counts from it); a process that
    holds none reports the time of the beat."""
    monkeypatch.setattr(keyfile, "loaded_at", lambda _path: loaded)
    hb = keyrotation._Heartbeat("worker:test")
    before = utcnow()
    hb.beat()
    after = utcnow()
    (view,) = keyrotation.live_processes()
    assert (view.process, view.role, view.active_kid) == (
        hb.process,
        "worker:test",
        certificates.keystore(db_settings).active_kid,
    )
    assert before <= view.seen_at <= after
    if loaded is None:
        assert before <= view.loaded_at <= after
    else:
        assert view.loaded_at == dt.datetime.fromtimestamp(loaded, dt.UTC)
    hb.beat()  # a second beat updates the row, it adds none
    assert [p.process for p in keyrotation.live_processes()] == [hb.process]


def test_forget_processes_matches_a_long_host_name_as_stored(
    db_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "h" * 100)
    hb = keyrotation._Heartbeat("worker:test")
    hb.beat()
    assert keyrotation.forget_processes([hb.pid + 1]) == 0  # no such pid here: nothing deleted
    assert keyrotation.forget_processes([hb.pid]) == 1
    assert keyrotation.live_processes() == []


def test_a_forked_child_forgets_the_parents_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    parent = keyrotation._Heartbeat("test")
    monkeypatch.setattr(keyrotation, "_current", parent)
    keyrotation._after_fork_in_child()
    keyrotation._wake()  # nothing to wake in the child
    keyrotation.stop_heartbeat()  # and nothing to stop: the parent's row is the parent's
    assert not parent.wake.is_set() and not parent.stop.is_set()


def test_a_celery_worker_starts_a_heartbeat_in_each_pool_process_and_stops_it_at_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    from celery import signals
    from celery.utils.dispatch import Signal

    names = ("worker_process_init", "worker_ready", "worker_process_shutdown", "worker_shutdown")
    for name in names:  # fresh signals: only what install_worker_heartbeat connects is called
        monkeypatch.setattr(signals, name, Signal(name=name))
    calls: list[tuple[str, str | None]] = []
    monkeypatch.setattr(keyrotation, "start_heartbeat", lambda role: calls.append(("start", role)))
    monkeypatch.setattr(keyrotation, "stop_heartbeat", lambda: calls.append(("stop", None)))

    keyrotation.install_worker_heartbeat("worker:acme")
    gc.collect()  # the receivers are held strongly: they outlive the call that connected them
    for name in names:
        getattr(signals, name).send(sender=None)
    assert calls == [("start", "worker:acme"), ("start", "worker:acme"), ("stop", None), ("stop", None)]


def test_a_heartbeat_removed_twice_or_in_a_forked_child_deletes_nothing(db_settings: Settings) -> None:
    hb = keyrotation._Heartbeat("worker:test")
    hb.beat()
    real_pid = hb.pid
    hb.pid = real_pid + 1  # as a forked child sees the parent's heartbeat object
    hb.remove()
    assert not hb.stop.is_set()
    assert [p.process for p in keyrotation.live_processes()] == [hb.process]  # the parent's row stays
    hb.pid = real_pid
    hb.remove()
    assert hb.stop.is_set() and keyrotation.live_processes() == []


def test_a_heartbeat_that_cannot_remove_its_row_logs_the_class_name_only(
    settings_factory: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings_factory()
    hb = keyrotation._Heartbeat("worker:test")

    def broken_session(**_kw: object) -> None:
        raise RuntimeError("postgresql://certqueue:secret@db/certqueue refused")

    monkeypatch.setattr(keyrotation, "session_scope", broken_session)
    with caplog.at_level("DEBUG", logger="certqueue.keyrotation"):
        hb.remove()
    assert hb.stop.is_set() and hb.wake.is_set()  # the thread is told to stop regardless
    assert [r.getMessage() for r in caplog.records] == ["could not remove heartbeat: RuntimeError"]


def test_a_key_file_reload_wakes_the_heartbeat(
    key_file: Path, settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_heartbeat hooks the keyring reload, so a rotation is reported without waiting for the
    next check (the heartbeat's thread is a no-op here: only the wake is looked at)."""
    import threading

    class Idle(keyrotation._Heartbeat):
        def __init__(self, role: str) -> None:
            super().__init__(role)
            self.thread = threading.Thread(target=lambda: None)

    settings = settings_factory()
    certificates.keystore(settings)
    monkeypatch.setattr(keyfile, "_reload_hooks", [])
    monkeypatch.setattr(keyrotation, "_Heartbeat", Idle)
    keyrotation.start_heartbeat("test")
    try:
        hb = keyrotation._current
        assert isinstance(hb, Idle) and not hb.wake.is_set()
        rotate_key_file(key_file)
        certificates.keystore(settings)  # the changed file is reloaded: the hooks run
        assert hb.wake.is_set()
    finally:
        keyrotation.stop_heartbeat()
    keyrotation._wake()  # no heartbeat any more: nothing to wake, no error


def test_retire_checks_read_while_a_worker_holds_the_sqlite_write_lock(
    sqlite_url: str, settings_factory: Callable[..., Settings], key_file: Path
) -> None:
    """``keys retire`` only reads to decide: it answers while a worker holds the write lock."""
    import sqlite3

    settings_factory(database_url=sqlite_url)
    _heartbeat("live:1", "k1")
    store = KeyStore.from_file(key_file)
    writer = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=1)
    try:
        writer.execute("BEGIN IMMEDIATE")  # the database's write lock, held
        assert [p.process for p in keyrotation.live_processes()] == ["live:1"]
        assert keyrotation.remaining_kids(store) == set()
    finally:
        writer.rollback()
        writer.close()


def _heartbeat_at(process: str, kid: str, *, seen_at: dt.datetime, loaded_at: dt.datetime) -> None:
    with db.session_scope() as s:
        s.add(ProcessHeartbeat(process=process, role="worker:acme", host="h", pid=1, keyring_id="kr0",
                               active_kid=kid, loaded_at=loaded_at, seen_at=seen_at))  # fmt: skip


def test_a_process_seen_exactly_the_stale_time_ago_is_still_live(
    db_url: str, settings_factory: Callable[..., Settings]
) -> None:
    settings_factory(database_url=db_url, **{"storage.process_stale_seconds": 60})
    now = utcnow().replace(microsecond=0)
    _heartbeat_at("edge", "k1", seen_at=now - dt.timedelta(seconds=60), loaded_at=now)
    _heartbeat_at("gone", "k1", seen_at=now - dt.timedelta(seconds=61), loaded_at=now)
    assert [p.process for p in keyrotation.live_processes(now)] == ["edge"]


def test_retire_blockers_judge_processes_at_the_time_given(
    db_url: str, settings_factory: Callable[..., Settings], key_file: Path
) -> None:
    settings_factory(
        database_url=db_url, **{"storage.process_stale_seconds": 60, "storage.key_retire_grace_seconds": 300}
    )
    store = KeyStore.from_file(key_file)
    kid = store.active_kid
    now = utcnow().replace(microsecond=0)
    _heartbeat_at("old:1", "k-old", seen_at=now, loaded_at=now - dt.timedelta(hours=1))
    _heartbeat_at("fresh:2", kid, seen_at=now, loaded_at=now - dt.timedelta(seconds=10))
    _heartbeat_at("edge:3", kid, seen_at=now, loaded_at=now - dt.timedelta(seconds=300))  # grace just over
    assert keyrotation.retire_blockers(store, now) == [
        f"process fresh:2 (worker:acme) loaded key {kid} only now; retry in 290s",
        "process old:1 (worker:acme) still encrypts with key k-old",
    ]
    # an hour later (as given) none of them has been seen for the stale time: nothing blocks
    assert keyrotation.retire_blockers(store, now + dt.timedelta(hours=1)) == []


def test_retire_names_every_old_key_rows_are_still_under(db_settings: Settings) -> None:
    path = Path(db_settings.storage.encryption_key_path)
    kids = []
    with db.session_scope() as s:
        for i in range(2):
            store = KeyStore.from_file(path)
            kids.append(store.active_kid)
            contact = f"mailto:k{i}@example.com"
            blob = store.encrypt(b"k", account_aad("https://acme.example/dir", contact))
            s.add(Account(directory_url="https://acme.example/dir", contact=contact, key_type="ec256",
                          created_at=utcnow(), key_enc=blob))  # fmt: skip
            rotate_key_file(path)
    store = KeyStore.from_file(path)
    assert keyrotation.retire_blockers(store) == [
        f"rows are still under key(s) {', '.join(sorted(kids))}: run `certqueue keys rotate --resume`"
    ]


def _issuances_in_reverse_id_order(store: KeyStore, n: int, *, keyless: int) -> None:
    """``n`` issuances of one certificate written from the highest id down (the table's physical order
    is not the id order), the one with id ``keyless`` holding no key (a key kept elsewhere)."""
    now = utcnow()
    cert = "cert_rev000000000000001"
    with db.session_scope() as s:
        s.add(Certificate(id=cert, domains=["rev.example.com"], dedupe_key="rev", state="ACTIVE",
                          key_type="ec256", challenge_type="http-01", challenge_map={},
                          directory_url="https://acme.example/dir", targets=[], created_at=now,
                          updated_at=now))  # fmt: skip
    for i in range(n, 0, -1):  # one commit each: the rows are laid down in this order
        fp = f"{i:064x}"
        blob = None if i == keyless else store.encrypt(_plain("iss", i), issuance_aad(cert, fp))
        with db.session_scope() as s:
            s.add(Issuance(id=i, certificate_id=cert, serial=f"{i:x}", not_before=now, not_after=now,
                           cert_pem="x", key_type="ec256", fingerprint=fp, key_enc=blob))  # fmt: skip


def _issuance_kids(store: KeyStore) -> dict[int, str | None]:
    with db.session_scope(write=False) as s:
        return {
            r.id: (store.kid_of(r.key_enc) if r.key_enc is not None else None)
            for r in s.execute(select(Issuance)).scalars()
        }


def test_reencrypt_all_walks_every_row_in_id_order_and_skips_rows_without_a_key(
    db_settings: Settings,
) -> None:
    path = Path(db_settings.storage.encryption_key_path)
    _issuances_in_reverse_id_order(KeyStore.from_file(path), 10, keyless=4)
    new_kid = rotate_key_file(path)
    assert keyrotation.reencrypt_all(KeyStore.from_file(path), batch=3) == 9
    kids = _issuance_kids(KeyStore.from_file(path))
    assert kids == {i: (None if i == 4 else new_kid) for i in range(1, 11)}


def test_a_pass_that_fails_halfway_keeps_the_batches_it_committed(
    db_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Path(db_settings.storage.encryption_key_path)
    old_kid = KeyStore.from_file(path).active_kid
    _issuances_in_reverse_id_order(KeyStore.from_file(path), 5, keyless=0)
    new_kid = rotate_key_file(path)
    real = keyrotation.reencrypt
    calls = 0

    def fails_on_the_fourth_row(store: KeyStore, blob: bytes, aad: bytes) -> bytes | None:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("the database went away")
        return real(store, blob, aad)

    monkeypatch.setattr(keyrotation, "reencrypt", fails_on_the_fourth_row)
    with pytest.raises(RuntimeError):
        keyrotation.reencrypt_all(KeyStore.from_file(path), batch=2)
    # the first batch (ids 1, 2) was committed; the second (3, 4) rolled back with the failure
    assert _issuance_kids(KeyStore.from_file(path)) == {
        1: new_kid,
        2: new_kid,
        3: old_kid,
        4: old_kid,
        5: old_kid,
    }


def test_rotate_and_retire_work_on_the_key_file_given(db_settings: Settings, tmp_path: Path) -> None:
    configured = Path(db_settings.storage.encryption_key_path)
    before = configured.read_bytes()
    other = tmp_path / "other.key"
    keyfile.generate_key_file(other)
    first = KeyStore.from_file(other).active_kid
    report = keyrotation.rotate(other)
    assert KeyStore.from_file(other).kids == {first, report.new_kid}
    assert keyrotation.retire(other) == [first]
    assert KeyStore.from_file(other).kids == {report.new_kid}
    assert configured.read_bytes() == before  # the configured key file was not touched


def test_a_refused_retire_lists_each_reason_on_its_own_line(
    db_url: str, settings_factory: Callable[..., Settings], key_file: Path
) -> None:
    settings_factory(database_url=db_url, **{"storage.process_stale_seconds": 60})
    old_kid = KeyStore.from_file(key_file).active_kid
    keyrotation.rotate(key_file)
    _heartbeat("a:1", old_kid)
    _heartbeat("b:2", old_kid)
    with pytest.raises(KeyStoreError) as exc:
        keyrotation.retire(key_file)
    assert exc.value.message == (
        "old keys are still in use; nothing retired:\n"
        f"  process a:1 (worker:acme) still encrypts with key {old_kid}\n"
        f"  process b:2 (worker:acme) still encrypts with key {old_kid}"
    )
