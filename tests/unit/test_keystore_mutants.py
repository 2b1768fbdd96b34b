"""certqueue.keystore: behaviours ``make mutation`` found untested.

* The kid of a raw 32-byte key file is derived, and must never change: every blob stores the kid it
  was sealed under, so a different derivation would make every row written before an upgrade
  unreadable (``keystore:unknown_kid``). Pinned to a known answer.
* A malformed key file is refused with an error that names the file and says what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from certqueue.errors import KeyStoreError
from certqueue.keystore import KeyStore


def _private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def test_the_kid_of_a_raw_key_file_is_stable(tmp_path: Path) -> None:
    path = _private(tmp_path / "raw.key", bytes(range(32)))
    store = KeyStore.from_file(path)
    assert store.active_kid == "r51e9ca17cf"  # computed once by certqueue 0.1; never to change
    blob = store.encrypt(b"secret", b"aad")
    assert KeyStore.from_file(path).decrypt(blob, b"aad") == b"secret"


def test_a_malformed_key_file_error_names_the_file_and_the_problem(tmp_path: Path) -> None:
    path = _private(tmp_path / "short.key", b"x" * 31)
    with pytest.raises(KeyStoreError) as info:
        KeyStore.from_file(path)
    assert str(info.value) == (
        f"key file {path} is malformed: neither 32 raw bytes nor a 'certqueue-keyring 1' keyring"
    )
    assert info.value.reason == "keystore:bad_key_file"
