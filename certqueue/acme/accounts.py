"""ACME accounts in the database: one per (directory URL, contact), its key encrypted at rest.

Owns the ``accounts`` table. Registration happens the first time a (directory, contact) pair is
used; two workers racing to register both succeed at the CA, and the unique constraint keeps one row
(the other registration is an unused account, harmless). Keys and account URLs are cached per
process, so building a client per task costs no decryption and no round trip.
"""

from __future__ import annotations

import os
import threading

import josepy as jose
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from certqueue.acme.account import (
    account_key_from_pem,
    account_key_to_pem,
    generate_account_key,
    register_account,
)
from certqueue.acme.client import AcmeClient
from certqueue.certificates import keystore
from certqueue.config import Settings, get_settings
from certqueue.models import Account

_lock = threading.Lock()
_cache: dict[tuple[str, str], tuple[int, str, jose.JWK]] = {}


#: one client per (directory, contact) per thread: its HTTP session keeps the TLS connection to the CA
#: alive and its nonce between tasks (a fresh client per task paid a handshake and a newNonce each time)
_clients = threading.local()


def _reused_client(ck: tuple[str, str], key: jose.JWK, url: str, settings: Settings) -> AcmeClient:
    pool: dict[tuple[str, str, str, str], AcmeClient] = getattr(_clients, "pool", None) or {}
    _clients.pool = pool
    verify = str(_verify(settings))
    slot = (ck[0], ck[1], url, verify)
    client = pool.get(slot)
    if client is None:
        client = make_client(ck[0], key, url, settings)
        pool[slot] = client
    return client


def _forget_clients() -> None:
    global _clients
    _clients = threading.local()  # a forked child must not share the parent's sockets


os.register_at_fork(after_in_child=_forget_clients)


def account_aad(directory_url: str, contact: str) -> bytes:
    return f"accounts:{directory_url}:{contact}:key".encode()


def _verify(settings: Settings) -> str | bool:
    return str(settings.acme.ca_bundle) if settings.acme.ca_bundle else True


def make_client(
    directory_url: str, key: jose.JWK, account_url: str | None, settings: Settings | None = None
) -> AcmeClient:
    settings = settings or get_settings()
    return AcmeClient(
        directory_url,
        key,
        account_url,
        verify=_verify(settings),
        timeout=settings.acme.request_timeout_seconds,
    )


def client_for(
    session: Session, directory_url: str, contact: str | None, settings: Settings | None = None
) -> tuple[AcmeClient, int]:
    """A client signed by the account for (directory, contact), registering it on first use."""
    settings = settings or get_settings()
    contact = contact or ""
    ck = (directory_url, contact)
    cached = _cache.get(ck)
    if cached is not None:
        acct_id, url, key = cached
        return _reused_client(ck, key, url, settings), acct_id
    ks = keystore(settings)
    row = session.execute(
        select(Account).where(Account.directory_url == directory_url, Account.contact == contact)
    ).scalar_one_or_none()
    if row is not None and row.account_url:
        key = account_key_from_pem(ks.decrypt(row.key_enc, account_aad(directory_url, contact)))
        with _lock:
            _cache[ck] = (row.id, row.account_url, key)
        return make_client(directory_url, key, row.account_url, settings), row.id

    key = _configured_key(settings) or generate_account_key(settings.acme.account_key_type)
    client = make_client(directory_url, key, None, settings)
    eab_key = settings.acme.eab_hmac_key.get_secret_value() if settings.acme.eab_hmac_key else None
    acct = register_account(
        client,
        contact or None,
        eab_kid=settings.acme.eab_kid if eab_key else None,
        eab_hmac_key=eab_key,
        agree_tos=settings.acme.agree_tos,
    )
    new = Account(
        directory_url=directory_url,
        contact=contact,
        key_enc=ks.encrypt(account_key_to_pem(key), account_aad(directory_url, contact)),
        key_type=settings.acme.account_key_type,
        account_url=acct.url,
        eab_kid=settings.acme.eab_kid if eab_key else None,
    )
    nested = session.begin_nested()
    try:
        session.add(new)
        session.flush()
        nested.commit()
    except IntegrityError:
        nested.rollback()
        # another worker registered first: use its account
        row = session.execute(
            select(Account).where(Account.directory_url == directory_url, Account.contact == contact)
        ).scalar_one()
        key = account_key_from_pem(ks.decrypt(row.key_enc, account_aad(directory_url, contact)))
        new = row
        client = make_client(directory_url, key, row.account_url, settings)
    with _lock:
        _cache[ck] = (new.id, new.account_url or acct.url, key)
    return client, new.id


def _configured_key(settings: Settings) -> jose.JWK | None:
    """The guide's ``account_key_path`` (an operator-provided PEM), if set."""
    path = settings.acme.account_key_path
    if path is None:
        return None
    from certqueue.keystore import _read_private_file  # refuses files readable by others

    return account_key_from_pem(_read_private_file(path))


def forget_cache() -> None:
    with _lock:
        _cache.clear()
    _forget_clients()
