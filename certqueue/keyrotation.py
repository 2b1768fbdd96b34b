"""``certqueue keys rotate``: re-encrypt every stored key under a new master key without losing one.

Protocol (see ``certqueue.keystore``): add a new active key to the keyring file, re-encrypt rows in
committed batches, and retire old keys only when no row is left under them. A crash at any point
leaves every row readable, because the keyring still holds every key a row can be under; running
the command again finishes the job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from certqueue import certificates
from certqueue.acme.accounts import account_aad
from certqueue.config import get_settings
from certqueue.db import session_scope
from certqueue.keystore import KeyStore, reencrypt, retire_keys, rotate_key_file
from certqueue.models import Account, Issuance, Order
from certqueue.tasks.acme import order_key_aad

BATCH = 500


@dataclass
class RotationReport:
    new_kid: str | None
    reencrypted: int
    retired: list[str]


def _tables() -> list[tuple[Any, Callable[[Any], bytes]]]:
    return [
        (Issuance, lambda r: certificates.issuance_aad(r.certificate_id, r.fingerprint)),  # type: ignore[attr-defined]
        (Account, lambda r: account_aad(r.directory_url, r.contact)),  # type: ignore[attr-defined]
        (Order, lambda r: order_key_aad(r.certificate_id, r.csr_pem)),  # type: ignore[attr-defined]
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
                        .where(model.id > last, model.key_enc.is_not(None))  # type: ignore[attr-defined]
                        .order_by(model.id)
                        .limit(batch)
                    )
                    .scalars()
                    .all()
                )  # type: ignore[attr-defined]
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
    kids: set[str] = set()
    for model, _ in _tables():
        with session_scope(write=False) as s:
            for (blob,) in s.execute(select(model.key_enc).where(model.key_enc.is_not(None))):  # type: ignore[attr-defined]
                kids.add(store.kid_of(blob))
    return kids


def rotate(path: Path | None = None, *, resume_only: bool = False) -> RotationReport:
    path = Path(path or get_settings().storage.encryption_key_path)
    new_kid = None if resume_only else rotate_key_file(path)
    certificates.forget_keystores()
    store = KeyStore.from_file(path)
    count = reencrypt_all(store)
    used = remaining_kids(store) | {store.active_kid}
    retired = retire_keys(path, keep=used)
    certificates.forget_keystores()
    return RotationReport(new_kid=new_kid, reencrypted=count, retired=retired)
