"""certqueue.keyrotation on both backends: a few thousand encrypted rows in every table that holds
keys, rotated; a rotation that crashes halfway leaves every row readable and resumes to the end."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from certqueue import db, keyrotation
from certqueue.acme.accounts import account_aad
from certqueue.certificates import issuance_aad
from certqueue.config import Settings
from certqueue.keystore import KeyStore, rotate_key_file
from certqueue.models import Account, Certificate, Issuance, Order, utcnow
from certqueue.tasks.acme import order_key_aad

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


def test_rotate_reencrypts_every_row_and_retires_the_old_key(populated: tuple[Path, str]) -> None:
    path, old_kid = populated
    assert _check_all(KeyStore.from_file(path)) == {old_kid: TOTAL}

    report = keyrotation.rotate(path)

    assert report.new_kid and report.new_kid != old_kid
    assert report.reencrypted == TOTAL
    assert report.retired == [old_kid]
    store = KeyStore.from_file(path)
    assert store.active_kid == report.new_kid
    assert store.kids == {report.new_kid}  # the old key is gone from the file
    assert _check_all(store) == {report.new_kid: TOTAL}
    assert os.stat(path).st_mode & 0o077 == 0

    # rotating again works the same way (the previous new key is now the old one)
    again = keyrotation.rotate(path)
    assert again.retired == [report.new_kid] and again.reencrypted == TOTAL
    assert _check_all(KeyStore.from_file(path)) == {again.new_kid: TOTAL}


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
    assert report.retired == [old_kid]
    store = KeyStore.from_file(path)
    assert store.kids == {new_kid}
    assert _check_all(store) == {new_kid: TOTAL}


def test_resume_with_nothing_to_do_is_a_no_op(populated: tuple[Path, str]) -> None:
    path, old_kid = populated
    report = keyrotation.rotate(path, resume_only=True)
    assert (report.new_kid, report.reencrypted, report.retired) == (None, 0, [])
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
    result = CliRunner().invoke(main, ["keys", "rotate"], env={"CERTQUEUE_SETTINGS_DIR": str(settings_dir)})
    assert result.exit_code == 0, result.output
    settings_factory(database_url=db_url)
    store = KeyStore.from_file(path)
    assert old_kid not in store.kids
    assert _check_all(store) == {store.active_kid: TOTAL}
