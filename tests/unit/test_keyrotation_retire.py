"""Key rotation never removes a key that a stored row is still encrypted under (SQLite, PostgreSQL).

The case the other rotation tests cannot reach: a row is written under the OLD key after the
re-encryption pass (a worker that loaded its keyring before the rotation, issue 13's scenario). A
rotation that retired every key but the active one, without looking at which keys rows still use,
would make that row unreadable for good. Rotation may keep the key (and retire it on a later run,
once the row is re-encrypted); it may never drop it.

The stale worker is simulated by writing that row right after the re-encryption pass returns: the
only point where it can be observed deterministically.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from certqueue import db, keyrotation
from certqueue.certificates import order_key_aad
from certqueue.config import Settings
from certqueue.errors import KeyStoreError
from certqueue.keystore import KeyStore
from certqueue.models import Certificate, Order, utcnow

CERT = "cert_retiretest0000001"


def _plain(i: int) -> bytes:
    return f"-----BEGIN PRIVATE KEY-----\norder-{i}\n-----END PRIVATE KEY-----\n".encode()


def _add_order(store: KeyStore, i: int) -> None:
    csr = f"csr-{i}"
    now = utcnow()
    with db.session_scope() as s:
        s.add(
            Order(
                certificate_id=CERT,
                purpose="issue",
                csr_pem=csr,
                status="pending",
                polls=0,
                created_at=now,
                updated_at=now,
                key_enc=store.encrypt(_plain(i), order_key_aad(CERT, csr)),
            )
        )


def _read_all(store: KeyStore) -> dict[str, int]:
    """Decrypt every order with ``store``; blobs per kid."""
    kids: dict[str, int] = {}
    with db.session_scope(write=False) as s:
        for o in s.execute(select(Order)).scalars():
            assert o.key_enc is not None
            i = int(o.csr_pem.split("-")[1])
            assert store.decrypt(o.key_enc, order_key_aad(o.certificate_id, o.csr_pem)) == _plain(i)
            kid = store.kid_of(o.key_enc)
            kids[kid] = kids.get(kid, 0) + 1
    return kids


@pytest.fixture
def keyring(db_settings: Settings) -> tuple[Path, KeyStore]:
    path = Path(db_settings.storage.encryption_key_path)
    store = KeyStore.from_file(path)
    now = utcnow()
    with db.session_scope() as s:
        s.add(
            Certificate(
                id=CERT,
                domains=["retire.example.com"],
                dedupe_key="retire",
                state="ISSUING",
                key_type="ec256",
                challenge_type="http-01",
                challenge_map={},
                directory_url="https://acme.example/dir",
                targets=[],
                created_at=now,
                updated_at=now,
            )
        )
    for i in range(3):
        _add_order(store, i)
    return path, store


def test_a_row_written_under_the_old_key_during_rotation_keeps_that_key(
    keyring: tuple[Path, KeyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, stale_store = keyring  # the keyring a worker loaded before the rotation
    old_kid = stale_store.active_kid
    real_pass = keyrotation.reencrypt_all

    def pass_then_stale_write(store: KeyStore, **kw: object) -> int:
        done = real_pass(store, **kw)  # type: ignore[arg-type]
        _add_order(stale_store, 99)  # the stale worker's new order key, under the old key
        return done

    monkeypatch.setattr(keyrotation, "reencrypt_all", pass_then_stale_write)
    report = keyrotation.rotate(path)  # phase 1: add the new key, make it active, re-encrypt

    assert report.reencrypted == 3 and report.retired == []
    store = KeyStore.from_file(path)
    assert old_kid in store.kids  # still there: a row needs it
    assert _read_all(store) == {report.new_kid: 3, old_kid: 1}  # every row still readable
    # phase 2 refuses while a row is under the old key, and changes nothing
    with pytest.raises(KeyStoreError, match="rows are still under key"):
        keyrotation.retire(path)
    assert old_kid in KeyStore.from_file(path).kids

    # a resumed pass re-encrypts the straggler; only then may the old key go
    monkeypatch.setattr(keyrotation, "reencrypt_all", real_pass)
    again = keyrotation.rotate(path, resume_only=True)
    assert again.reencrypted == 1
    assert keyrotation.retire(path) == [old_kid]
    store = KeyStore.from_file(path)
    assert old_kid not in store.kids
    assert _read_all(store) == {report.new_kid: 4}
