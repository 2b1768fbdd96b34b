"""Master key rotation in two phases, and the process heartbeats that make the second one safe.

Owns the ``process_heartbeats`` table and the rotation of ``key_enc`` columns (issuances, accounts,
account key rollovers, orders); the key file format is ``certqueue.keystore``'s.

1. ``certqueue keys rotate`` (``rotate``): add a new active key to the key file, keeping the old
   ones, then re-encrypt every row under it in committed batches. Nothing is removed, so a crash at
   any point leaves every row readable; ``--resume`` finishes an interrupted pass.
2. ``certqueue keys retire`` (``retire``), run later: removes the old keys from the file, and
   refuses (``KeyStoreError``, reason ``keystore:in_use``, nothing changed) while

   * any row is still under an old key (a process encrypted with it after the pass: run
     ``keys rotate --resume`` again), or
   * any live process reports, in its heartbeat, an active key other than the file's, or loaded the
     current keyring less than ``storage.key_retire_grace_seconds`` ago (an operation that started
     before its reload may still commit a row under the old key).

Every long-running process (worker pools, the API) runs ``start_heartbeat``: a daemon thread that
every ``storage.key_check_seconds`` looks at the key file (``certqueue.keystore.current`` reloads it
when it changed, so a rotation reaches running processes without a restart) and upserts its row:
process id, role, keyring id, active kid, when it loaded that keyring, when it was last seen. A row
not seen for ``storage.process_stale_seconds`` is a dead process and does not block; a clean exit
deletes its row.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

from certqueue import certificates
from certqueue import keystore as keyfile
from certqueue.config import get_settings
from certqueue.db import session_scope
from certqueue.errors import KeyStoreError
from certqueue.keystore import KeyStore, reencrypt, retire_keys, rotate_key_file
from certqueue.models import Account, Issuance, Order, ProcessHeartbeat, utcnow

log = logging.getLogger("certqueue.keyrotation")

BATCH = 500


@dataclass
class RotationReport:
    new_kid: str | None
    reencrypted: int
    #: kids other than the active one still in the key file (``keys retire`` removes them)
    old_kids: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)


def _tables() -> list[tuple[Any, Callable[[Any], bytes]]]:
    from certqueue.acme.accounts import account_aad, rollover_aad
    from certqueue.models import AccountKeyRollover

    return [
        (Issuance, lambda r: certificates.issuance_aad(r.certificate_id, r.fingerprint)),
        (Account, lambda r: account_aad(r.directory_url, r.contact)),
        (Order, lambda r: certificates.order_key_aad(r.certificate_id, r.csr_pem)),
        (AccountKeyRollover, rollover_aad),
    ]


def reencrypt_all(store: KeyStore, *, batch: int = BATCH, stop_after: int | None = None) -> int:
    """Re-encrypt rows not under the active key, committing every ``batch`` rows."""
    done = 0
    for model, aad in _tables():
        last = 0
        while True:
            with session_scope() as s:
                rows = (
                    s.execute(
                        select(model)
                        .where(model.id > last, model.key_enc.is_not(None))
                        .order_by(model.id)
                        .limit(batch)
                    )
                    .scalars()
                    .all()
                )
                if not rows:
                    break
                for row in rows:
                    new = reencrypt(store, row.key_enc, aad(row))
                    if new is not None:
                        row.key_enc = new
                        done += 1
                    if stop_after is not None and done >= stop_after:
                        return done
                last = rows[-1].id
    return done


def remaining_kids(store: KeyStore) -> set[str]:
    """Every kid some row is encrypted under."""
    kids: set[str] = set()
    for model, _ in _tables():
        with session_scope(write=False) as s:
            for (blob,) in s.execute(select(model.key_enc).where(model.key_enc.is_not(None))):
                kids.add(store.kid_of(blob))
    return kids


def _key_path(path: Path | str | None) -> Path:
    return Path(path or get_settings().storage.encryption_key_path)


def rotate(path: Path | str | None = None, *, resume_only: bool = False) -> RotationReport:
    """Phase 1: add a new active key (unless ``resume_only``) and re-encrypt every row under the
    active key. Retires nothing."""
    path = _key_path(path)
    new_kid = None if resume_only else rotate_key_file(path)
    store = KeyStore.from_file(path)
    count = reencrypt_all(store)
    certificates.forget_keystores()
    return RotationReport(
        new_kid=new_kid, reencrypted=count, old_kids=sorted(store.kids - {store.active_kid})
    )


@dataclass(frozen=True)
class ProcessView:
    process: str
    role: str
    active_kid: str
    loaded_at: dt.datetime
    seen_at: dt.datetime


def live_processes(now: dt.datetime | None = None) -> list[ProcessView]:
    """Heartbeats seen within ``storage.process_stale_seconds``."""
    now = now or utcnow()
    stale = dt.timedelta(seconds=get_settings().storage.process_stale_seconds)
    with session_scope(write=False) as s:
        rows = s.execute(select(ProcessHeartbeat).where(ProcessHeartbeat.seen_at >= now - stale)).scalars()
        return [
            ProcessView(r.process, r.role, r.active_kid, r.loaded_at, r.seen_at)
            for r in sorted(rows, key=lambda r: r.process)
        ]


def retire_blockers(store: KeyStore, now: dt.datetime | None = None) -> list[str]:
    """Why old keys may not be removed yet (empty: they may)."""
    now = now or utcnow()
    grace = dt.timedelta(seconds=get_settings().storage.key_retire_grace_seconds)
    why: list[str] = []
    for p in live_processes(now):
        if p.active_kid != store.active_kid:
            why.append(f"process {p.process} ({p.role}) still encrypts with key {p.active_kid}")
        elif p.loaded_at > now - grace:
            left = (p.loaded_at + grace - now).total_seconds()
            why.append(
                f"process {p.process} ({p.role}) loaded key {p.active_kid} only now; retry in {left:.0f}s"
            )
    old_rows = remaining_kids(store) - {store.active_kid}
    if old_rows:
        why.append(
            f"rows are still under key(s) {', '.join(sorted(old_rows))}: run `certqueue keys rotate --resume`"
        )
    return why


def retire(path: Path | str | None = None) -> list[str]:
    """Phase 2: remove every key but the active one from the key file; returns the removed kids.

    Refuses with ``KeyStoreError`` (reason ``keystore:in_use``), changing nothing, while a row or a
    live process still uses an older key."""
    path = _key_path(path)
    store = KeyStore.from_file(path)
    if store.kids == {store.active_kid}:
        return []
    why = retire_blockers(store)
    if why:
        raise KeyStoreError(
            "old keys are still in use; nothing retired:\n  " + "\n  ".join(why), reason="keystore:in_use"
        )
    removed = retire_keys(path, keep={store.active_kid})
    certificates.forget_keystores()
    return removed


# --- heartbeats -----------------------------------------------------------------------------------


class _Heartbeat:
    def __init__(self, role: str) -> None:
        self.role = role[:64]
        host = socket.gethostname()[:80]
        self.host = host
        self.pid = os.getpid()
        self.process = f"{host}:{self.pid}:{secrets.token_hex(3)}"[:128]
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="certqueue-key-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - never kill the process over a heartbeat
                # a database URL may hold a password: the class name only
                log.warning("key heartbeat failed: %s", type(exc).__name__)
            interval = get_settings().storage.key_check_seconds
            self.wake.wait(interval)
            self.wake.clear()

    def beat(self) -> None:
        settings = get_settings()
        store = certificates.keystore(settings)
        loaded = keyfile.loaded_at(settings.storage.encryption_key_path)
        loaded_at = dt.datetime.fromtimestamp(loaded, dt.UTC) if loaded else utcnow()
        values = {
            "role": self.role,
            "host": self.host,
            "pid": os.getpid(),
            "keyring_id": store.keyring_id,
            "active_kid": store.active_kid,
            "loaded_at": loaded_at,
            "seen_at": utcnow(),
        }
        with session_scope() as s:
            res = s.execute(
                update(ProcessHeartbeat).where(ProcessHeartbeat.process == self.process).values(**values)
            )
            if not getattr(res, "rowcount", 0):
                s.add(ProcessHeartbeat(process=self.process, **values))

    def remove(self) -> None:
        if os.getpid() != self.pid or self.stop.is_set():
            return  # inherited by a forked child (the row is the parent's), or already removed
        self.stop.set()
        self.wake.set()
        try:
            with session_scope() as s:
                s.execute(delete(ProcessHeartbeat).where(ProcessHeartbeat.process == self.process))
        except Exception as exc:  # noqa: BLE001 - best effort at exit; the row goes stale anyway
            log.debug("could not remove heartbeat: %s", type(exc).__name__)


def forget_processes(pids: list[int]) -> int:
    """Delete the heartbeats of processes of this host that ended without removing their own (the
    idle pool processes a worker stops, certqueue.worker_pool); returns the rows deleted."""
    if not pids:
        return 0
    host = socket.gethostname()[:80]
    with session_scope() as s:
        res = s.execute(
            delete(ProcessHeartbeat).where(ProcessHeartbeat.host == host, ProcessHeartbeat.pid.in_(pids))
        )
        return int(getattr(res, "rowcount", 0) or 0)


_current: _Heartbeat | None = None
_start_lock = threading.Lock()


def start_heartbeat(role: str) -> None:
    """Start this process's heartbeat thread (once per process; a forked child starts its own)."""
    global _current
    with _start_lock:
        if _current is not None and _current.thread.is_alive():
            return
        hb = _Heartbeat(role)
        _current = hb
        keyfile.on_reload(lambda _store: _wake())
        hb.thread.start()
        atexit.register(hb.remove)


def stop_heartbeat() -> None:
    """Stop the thread and delete this process's row (a clean shutdown)."""
    global _current
    with _start_lock:
        hb, _current = _current, None
    if hb is not None:
        atexit.unregister(hb.remove)
        hb.remove()


def _wake() -> None:
    hb = _current
    if hb is not None:
        hb.wake.set()


def _after_fork_in_child() -> None:
    global _current
    _current = None  # the parent's thread did not survive the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def install_worker_heartbeat(role: str) -> None:
    """Celery workers: every pool process (prefork children included) reports its keyring."""
    from celery import signals

    def _child(**_kw: Any) -> None:
        start_heartbeat(role)

    def _shutdown(**_kw: Any) -> None:
        stop_heartbeat()

    signals.worker_process_init.connect(_child, weak=False)
    signals.worker_ready.connect(_child, weak=False)
    signals.worker_process_shutdown.connect(_shutdown, weak=False)
    signals.worker_shutdown.connect(_shutdown, weak=False)
