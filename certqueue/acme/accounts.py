"""ACME accounts in the database: one per (directory URL, contact), its key encrypted at rest.

Owns the ``accounts`` and ``account_key_rollovers`` tables. Registration happens the first time a
(directory, contact) pair is used; two workers racing to register both succeed at the CA, and the
unique constraint keeps one row (the other registration is an unused account, harmless). Keys and
account URLs are cached per process, so building a client per task costs no decryption and no round
trip.

An account's key can roll over (``rollover``, ``certqueue accounts rollover``) and an account can be
deactivated (``deactivate_account``); a process that cached the old key learns the new one when the
CA first refuses the old (``AcmeClient.key_source``, ``current_key``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import josepy as jose
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from certqueue.acme.account import (
    account_key_from_pem,
    account_key_to_pem,
    change_key,
    deactivate,
    find_account,
    generate_account_key,
    key_thumbprint,
    register_account,
)
from certqueue.acme.client import AcmeClient
from certqueue.certificates import keystore
from certqueue.config import Settings, get_settings
from certqueue.errors import InvalidInput, NotFound, PermanentError
from certqueue.issuers import DEFAULT, Issuer, for_directory
from certqueue.models import Account, AccountKeyRollover, utcnow

_lock = threading.Lock()
_cache: dict[tuple[str, str], tuple[int, str, jose.JWK]] = {}


#: one client per (directory, contact) per thread: its HTTP session keeps the TLS connection to the CA
#: alive and its nonce between tasks (a fresh client per task paid a handshake and a newNonce each time)
_clients = threading.local()


def _reused_client(ck: tuple[str, str], key: jose.JWK, url: str, settings: Settings) -> AcmeClient:
    pool: dict[tuple[str, str, str, str], AcmeClient] = getattr(_clients, "pool", None) or {}
    _clients.pool = pool
    verify = str(_verify(settings, ck[0]))
    slot = (ck[0], ck[1], url, verify)
    client = pool.get(slot)
    if client is None:
        client = make_client(ck[0], key, url, settings, ck[1])
        pool[slot] = client
    return client


def _forget_clients() -> None:
    global _clients
    _clients = threading.local()  # a forked child must not share the parent's sockets


os.register_at_fork(after_in_child=_forget_clients)


def account_aad(directory_url: str, contact: str) -> bytes:
    return f"accounts:{directory_url}:{contact}:key".encode()


def _verify(settings: Settings, directory_url: str | None = None) -> str | bool:
    bundle = for_directory(settings, directory_url).ca_bundle if directory_url else settings.acme.ca_bundle
    return str(bundle) if bundle else True


def make_client(
    directory_url: str,
    key: jose.JWK,
    account_url: str | None,
    settings: Settings | None = None,
    contact: str | None = None,
) -> AcmeClient:
    settings = settings or get_settings()
    client = AcmeClient(
        directory_url,
        key,
        account_url,
        verify=_verify(settings, directory_url),
        timeout=settings.acme.request_timeout_seconds,
    )
    if contact is not None:
        client.key_source = lambda: current_key(directory_url, contact)
    return client


def current_key(directory_url: str, contact: str) -> jose.JWK | None:
    """The account's key as stored now (after a rollover by another process), refreshing this
    process's cache; None if there is no account. A deactivated account is a permanent error."""
    from certqueue.db import session_scope

    with session_scope(write=False) as s:
        row = s.execute(
            select(Account).where(Account.directory_url == directory_url, Account.contact == contact)
        ).scalar_one_or_none()
        if row is None or not row.account_url:
            return None
        _refuse_deactivated(row)
        key = account_key_from_pem(keystore().decrypt(row.key_enc, account_aad(directory_url, contact)))
        with _lock:
            _cache[(directory_url, contact)] = (row.id, row.account_url, key)
        return key


def _refuse_deactivated(row: Account) -> None:
    if row.status == "deactivated":
        raise PermanentError(
            f"ACME account {row.id} at {row.directory_url} is deactivated; the CA refuses it for good",
            reason="acme:accountDeactivated",
        )


def client_for(
    session: Session, directory_url: str, contact: str | None, settings: Settings | None = None
) -> tuple[AcmeClient, int]:
    """A client signed by the account for (directory, contact), registering it on first use. A named
    issuer's own contact, account key type and EAB pair apply to its directory (certqueue.issuers)."""
    settings = settings or get_settings()
    issuer = for_directory(settings, directory_url)
    if issuer.name != DEFAULT and issuer.email:
        contact = issuer.email  # the account contact at this CA is the issuer's
    contact = contact or ""
    ck = (directory_url, contact)
    cached = _cache.get(ck)
    if cached is not None:
        acct_id, url, key = cached
        client = _reused_client(ck, key, url, settings)
        if client.account_key is not key and client.account_key.thumbprint() != key.thumbprint():
            client.set_account_key(key)  # this process learned of a rollover since
        return client, acct_id
    ks = keystore(settings)
    row = session.execute(
        select(Account).where(Account.directory_url == directory_url, Account.contact == contact)
    ).scalar_one_or_none()
    if row is not None and row.account_url:
        _refuse_deactivated(row)
        key = account_key_from_pem(ks.decrypt(row.key_enc, account_aad(directory_url, contact)))
        with _lock:
            _cache[ck] = (row.id, row.account_url, key)
        return make_client(directory_url, key, row.account_url, settings, contact), row.id

    # first use: the key is created once, in a row of its own committed before the CA is asked, so
    # workers racing here all register the same key and the CA answers them with one account
    # (newAccount for a known key returns it); then the account URL is stored
    row_id, key = _claim_key(session, directory_url, contact, issuer, settings)
    client = make_client(directory_url, key, None, settings, contact)
    eab_key = issuer.eab_hmac_key(settings)
    try:
        acct = register_account(
            client,
            contact or None,
            eab_kid=issuer.eab_kid if eab_key else None,
            eab_hmac_key=eab_key,
            agree_tos=settings.acme.agree_tos,
        )
    except PermanentError:
        _forget_unregistered(session, row_id)  # the CA refused us: no account row stays behind
        raise
    row = session.get_one(Account, row_id)
    if row.account_url != acct.url:
        row.account_url = acct.url
    with _lock:
        _cache[ck] = (row_id, acct.url, key)
    return client, row_id


def _forget_unregistered(session: Session, row_id: int) -> None:
    """Delete a key row the CA never accepted (PostgreSQL: it was committed on its own; SQLite: the
    task's rollback removes it anyway)."""
    from sqlalchemy import delete

    from certqueue.db import is_postgres, session_scope

    if not is_postgres(session):
        return
    with session_scope() as own:
        own.execute(delete(Account).where(Account.id == row_id, Account.account_url.is_(None)))


def _claim_key(
    session: Session, directory_url: str, contact: str, issuer: Issuer, settings: Settings
) -> tuple[int, jose.JWK]:
    """The account row of (directory, contact) with its key: the existing one (a registration that
    did not finish, or another worker's), else a new one. On PostgreSQL the new row commits in a
    transaction of its own, so racing workers see it; SQLite has one writer at a time anyway."""
    from certqueue.db import is_postgres, session_scope

    ks = keystore(settings)
    aad = account_aad(directory_url, contact)

    def existing(s: Session) -> tuple[int, jose.JWK] | None:
        row = s.execute(
            select(Account).where(Account.directory_url == directory_url, Account.contact == contact)
        ).scalar_one_or_none()
        if row is None:
            return None
        _refuse_deactivated(row)
        return row.id, account_key_from_pem(ks.decrypt(row.key_enc, aad))

    found = existing(session)
    if found is not None:
        return found
    key = (_configured_key(settings) if issuer.name == DEFAULT else None) or generate_account_key(
        issuer.account_key_type
    )
    new = Account(
        directory_url=directory_url,
        contact=contact,
        key_enc=ks.encrypt(account_key_to_pem(key), aad),
        key_type=issuer.account_key_type,
        account_url=None,
        eab_kid=issuer.eab_kid if issuer.eab_hmac_key(settings) else None,
    )
    if is_postgres(session):
        try:
            with session_scope() as own:
                own.add(new)
                own.flush()
                new_id = new.id
        except IntegrityError:
            found = existing(session)  # READ COMMITTED: the winner's row is visible now
            assert found is not None
            return found
        return new_id, key
    nested = session.begin_nested()
    try:
        session.add(new)
        session.flush()
        nested.commit()
    except IntegrityError:
        nested.rollback()
        found = existing(session)
        assert found is not None
        return found
    return new.id, key


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


# --- key rollover and deactivation (RFC 8555 sections 7.3.5 and 7.3.6) ------------------------------


def rollover_aad(row: AccountKeyRollover) -> bytes:
    return f"account_key_rollovers:{row.account_id}:{row.new_thumbprint}:key".encode()


def forget_account(directory_url: str, contact: str) -> None:
    """Drop this process's cached key of one account (the next client reads the database)."""
    with _lock:
        _cache.pop((directory_url, contact), None)


@dataclass(frozen=True)
class RolloverResult:
    account_id: int
    rollover_id: int
    old_thumbprint: str
    new_thumbprint: str
    #: an interrupted rollover was finished rather than a new one started
    resumed: bool


def _load_account(session: Session, account_id: int, *, lock: bool = False) -> Account:
    # the lock (PostgreSQL; SQLite's write transaction is one already) makes two rollovers started
    # at once share one pending key; it is released before the CA is asked
    acct = session.get(Account, account_id, with_for_update=lock)
    if acct is None:
        raise NotFound(f"no ACME account {account_id}", reason="account:not_found")
    if acct.status != "valid":
        raise InvalidInput(f"ACME account {account_id} is {acct.status}", field="account")
    if not acct.account_url:
        raise InvalidInput(f"ACME account {account_id} is not registered", field="account")
    return acct


@dataclass(frozen=True)
class PendingRollover:
    """Step 1's result: what steps 2 and 3 need (keys stay in memory, never in logs)."""

    account_id: int
    rollover_id: int
    directory_url: str
    contact: str
    account_url: str
    old_key: jose.JWK
    new_key: jose.JWK
    key_type: str
    old_thumbprint: str
    new_thumbprint: str
    resumed: bool


def begin_rollover(account_id: int, *, key_type: str | None = None, actor: str = "cli") -> PendingRollover:
    """Step 1 of ``rollover``: the pending rollover of this account (the one left by an interrupted
    run, or a new one with a new key), committed before the CA is asked."""
    from certqueue.db import session_scope

    settings = get_settings()
    ks = keystore(settings)
    with session_scope() as s:
        acct = _load_account(s, account_id, lock=True)
        directory_url, contact, account_url = acct.directory_url, acct.contact, str(acct.account_url)
        old_key = account_key_from_pem(ks.decrypt(acct.key_enc, account_aad(directory_url, contact)))
        old_tp = key_thumbprint(old_key)
        pending = (
            s.execute(
                select(AccountKeyRollover)
                .where(AccountKeyRollover.account_id == account_id, AccountKeyRollover.status == "pending")
                .order_by(AccountKeyRollover.id.desc())
            )
            .scalars()
            .first()
        )
        resumed = pending is not None and pending.key_enc is not None and pending.old_thumbprint == old_tp
        if pending is not None and not resumed:
            pending.status, pending.finished_at = "failed", utcnow()
            pending.error, pending.key_enc = "superseded", None
        if resumed:
            assert pending is not None and pending.key_enc is not None
            new_key = account_key_from_pem(ks.decrypt(pending.key_enc, rollover_aad(pending)))
            new_type = pending.key_type
        else:
            new_type = key_type or acct.key_type
            new_key = generate_account_key(new_type)
            pending = AccountKeyRollover(
                account_id=account_id,
                key_type=new_type,
                old_thumbprint=old_tp,
                new_thumbprint=key_thumbprint(new_key),
                status="pending",
                actor=actor[:128],
            )
            pending.key_enc = ks.encrypt(account_key_to_pem(new_key), rollover_aad(pending))
            s.add(pending)
            s.flush()
        rollover_id, new_tp = pending.id, pending.new_thumbprint

    return PendingRollover(
        account_id,
        rollover_id,
        directory_url,
        contact,
        account_url,
        old_key,
        new_key,
        new_type,
        old_tp,
        new_tp,
        resumed,
    )


def rollover(account_id: int, *, key_type: str | None = None, actor: str = "cli") -> RolloverResult:
    """Give the account a new key at its CA, then in the database.

    Three steps, no row lock across the CA call: (1) the new key is stored encrypted in a pending
    ``account_key_rollovers`` row and committed; (2) the CA is asked (keyChange); (3) the new key
    becomes ``accounts.key_enc``. Run again after a failure, it finishes the pending rollover: if the
    CA had switched already (its answer was lost), the new key finds the account and step 3 runs.
    Orders in flight are unaffected (they belong to the account, not to the key); other processes
    pick the new key up when the CA first refuses the old one (``AcmeClient.key_source``).
    """
    from certqueue import events
    from certqueue.db import session_scope

    settings = get_settings()
    ks = keystore(settings)
    p = begin_rollover(account_id, key_type=key_type, actor=actor)
    directory_url, contact, account_url = p.directory_url, p.contact, p.account_url
    old_key, new_key, new_type = p.old_key, p.new_key, p.key_type
    rollover_id, old_tp, new_tp, resumed = p.rollover_id, p.old_thumbprint, p.new_thumbprint, p.resumed

    client = make_client(directory_url, old_key, account_url, settings)
    try:
        change_key(client, new_key)
    except PermanentError as exc:
        # did the CA switch already (an earlier run's answer lost)? Ask with the new key; an error
        # here leaves the rollover pending (its key kept) for the next run
        found = find_account(make_client(directory_url, new_key, None, settings))
        if found is None or found.url != account_url:
            with session_scope() as s:
                row = s.get_one(AccountKeyRollover, rollover_id)
                row.status, row.error, row.key_enc, row.finished_at = "failed", exc.reason, None, utcnow()
            raise

    with session_scope() as s:
        acct = s.get_one(Account, account_id)
        row = s.get_one(AccountKeyRollover, rollover_id)
        acct.key_enc = ks.encrypt(account_key_to_pem(new_key), account_aad(directory_url, contact))
        acct.key_type = new_type
        acct.key_changed_at = utcnow()
        row.status, row.key_enc, row.finished_at, row.error = "done", None, utcnow(), None
        events.record(
            s,
            None,
            "account",
            reason="key_rollover",
            actor=actor[:128],
            data={"account": account_id, "old_key": old_tp, "new_key": new_tp},
        )
    forget_account(directory_url, contact)
    return RolloverResult(account_id, rollover_id, old_tp, new_tp, resumed)


def deactivate_account(account_id: int, *, actor: str = "cli") -> str:
    """Deactivate the account at its CA (for good), then mark it in the database. Certificates
    that use it fail their next ACME step with ``acme:accountDeactivated``."""
    from certqueue import events
    from certqueue.db import session_scope

    settings = get_settings()
    with session_scope(write=False) as s:
        acct = _load_account(s, account_id)
        directory_url, contact, account_url = acct.directory_url, acct.contact, str(acct.account_url)
        key = account_key_from_pem(
            keystore(settings).decrypt(acct.key_enc, account_aad(directory_url, contact))
        )
    status = deactivate(make_client(directory_url, key, account_url, settings))
    with session_scope() as s:
        acct = s.get_one(Account, account_id)
        acct.status, acct.deactivated_at = "deactivated", utcnow()
        events.record(
            s, None, "account", reason="deactivated", actor=actor[:128], data={"account": account_id}
        )
    forget_account(directory_url, contact)
    return status
