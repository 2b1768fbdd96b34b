"""A thin, non-blocking ACME client: every method is one bounded step.

Owns the conversation with the CA for one account; owns no state between calls beyond the cached
directory. Each method makes a few HTTP requests, every one with a timeout, and returns: it never
sleeps and never polls in a loop. The caller (a Celery task) stores what comes back, and does the
waiting with retry countdowns. What a method returns is an ``acme`` value type
(``messages.OrderResource``) or a small dataclass, all of which round-trip through JSON, so a
redelivered task resumes the same order with a new client (:func:`order_to_json`,
:func:`order_from_json`).

Failures are certqueue errors (:mod:`certqueue.acme.errors`): retryable (network, 5xx, badNonce,
rateLimited with ``retry_after``) or permanent with a stable ``acme:<type>`` reason. ``badNonce`` is
retried inside the call (``bad_nonce_attempts``), since CAs may reject a share of good nonces and a
single retry is not enough.

Threads: an ``AcmeClient`` holds one ``requests`` session and one nonce pool; it is NOT safe to share
between threads. Build one per thread (or per task): construction does no network I/O, and the
directory is fetched once per process per directory URL.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import josepy as jose
import requests
from acme import challenges, crypto_util, messages
from acme import client as acme_client
from acme import errors as acme_errors
from cryptography import x509
from cryptography.x509.oid import NameOID

from certqueue.acme.account import signing_alg
from certqueue.acme.errors import (
    AcmeProblem,
    IncompleteOrder,
    mapped,
    parse_retry_after,
    problem_from_error,
)
from certqueue.acme.tlsalpn import TLSALPN01Response  # registers the tls-alpn-01 challenge type
from certqueue.errors import InvalidInput, PermanentError, RetryableError

__all__ = [
    "AcmeClient",
    "AuthzStatus",
    "ChallengeInfo",
    "clear_directory_cache",
    "order_from_json",
    "order_to_json",
    "select_chain",
]

ChallengeType = Literal["http-01", "dns-01", "tls-alpn-01"]

_VALID = messages.STATUS_VALID
_INVALID = messages.STATUS_INVALID
_PENDING = messages.STATUS_PENDING
_READY = messages.STATUS_READY
_PROCESSING = messages.STATUS_PROCESSING

#: RFC 5280 CRLReason codes accepted by ACME revocation (7 is unused)
REVOCATION_REASONS = frozenset({0, 1, 2, 3, 4, 5, 6, 8, 9, 10})

#: RFC 9773: the certificate named in ``replaces`` already has a replacement order
ALREADY_REPLACED = "acme:alreadyReplaced"

#: how far :meth:`AcmeClient.find_open_order` reads an account's order list (pages), and how many
#: of the listed orders it fetches at most: a bounded recovery path, never a scan of a whole history
ORDER_LIST_MAX_PAGES = 1000
ORDER_LIST_MAX_FETCHES = 50

_directories: dict[str, messages.Directory] = {}
_directories_lock = threading.Lock()


def clear_directory_cache() -> None:
    """Forget every cached directory (a CA moved its endpoints; tests restarting a CA on a URL)."""
    with _directories_lock:
        _directories.clear()


def order_to_json(order: messages.OrderResource) -> dict[str, Any]:
    """The order as plain JSON data, fit for a JSON column (CSR, body, authorizations, chain)."""
    data: dict[str, Any] = order.to_json()
    return data


def order_from_json(data: dict[str, Any]) -> messages.OrderResource:
    """Rebuild an order stored with :func:`order_to_json`."""
    try:
        return messages.OrderResource.from_json(data)
    except jose.DeserializationError as exc:
        raise InvalidInput(f"stored ACME order cannot be read ({type(exc).__name__})", field="order") from exc


class _NewOrder(messages.NewOrder):
    """``newOrder`` body with the ``replaces`` field of RFC 9773 (ARI), which ``acme`` does not send."""

    replaces: str | None = jose.field("replaces", omitempty=True)


#: problems a CA answers to a request signed by a key the account no longer has (Pebble and
#: Boulder: ``malformed`` "JWS verification error"; RFC 8555 suggests ``unauthorized``)
KEY_REFUSED_CODES = frozenset({"malformed", "unauthorized"})


class _NoHttpAuth(requests.auth.AuthBase):
    """ACME requests carry their own authentication (the JWS signature): no HTTP credential is
    added to them. Set as the session's ``auth``, it also stops requests from looking for one in
    ``~/.netrc`` on every request (an ``expanduser`` and a ``stat`` each: about 1% of the acme
    workers' samples)."""

    def __call__(self, r: Any) -> Any:
        return r


class _EnvReadOnceSession(requests.Session):
    """A ``requests.Session`` that reads the proxy and CA-bundle environment once per host, not on
    every request. requests' own ``merge_environment_settings`` scans ``os.environ`` twice per
    request (``getproxies_environment``, decoding every variable): 0.077 ms of CPU per request
    with 35 variables, timed on its own (a yappi profile had charged it 2 ms: a deterministic
    profiler overcharges many small calls), about 1% of a certificate's client CPU. A process's
    environment does not change under it, so the answer per (scheme, host) is kept; what
    is honoured is what requests honours (``HTTPS_PROXY``/``NO_PROXY`` and the rest,
    ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``)."""

    def __init__(self) -> None:
        super().__init__()
        self.auth = _NoHttpAuth()
        self._env_proxies: dict[tuple[str, str, str | None], dict[str, str]] = {}
        self._env_bundle: str | bool | None = False  # False: not read yet

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        if self.trust_env:
            from urllib.parse import urlsplit

            from requests.utils import get_environ_proxies

            no_proxy = proxies.get("no_proxy") if proxies is not None else None
            parts = urlsplit(str(url))
            key = (parts.scheme, parts.netloc, no_proxy)
            env_proxies = self._env_proxies.get(key)
            if env_proxies is None:
                env_proxies = self._env_proxies[key] = get_environ_proxies(str(url), no_proxy=no_proxy)
            if proxies is not None:
                for k, v in env_proxies.items():
                    proxies.setdefault(k, v)
            if verify is True or verify is None:
                if self._env_bundle is False:
                    self._env_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get(
                        "CURL_CA_BUNDLE"
                    )
                verify = self._env_bundle or verify
        return {
            "proxies": requests.sessions.merge_setting(proxies, self.proxies),
            "stream": requests.sessions.merge_setting(stream, self.stream),
            "verify": requests.sessions.merge_setting(verify, self.verify),
            "cert": requests.sessions.merge_setting(cert, self.cert),
        }


class _Network(acme_client.ClientNetwork):
    """``ClientNetwork`` that retries badNonce several times and keeps what errors need.

    Each problem document gets ``http_status`` and ``retry_after`` attributes (``acme`` drops the
    response), and the nonce an error response carries is kept, so a badNonce retry costs one request.
    """

    def __init__(
        self, *args: Any, bad_nonce_attempts: int = 10, directory_url: str = "", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        adapters = dict(self.session.adapters)
        self.session = _EnvReadOnceSession()
        for prefix, adapter in adapters.items():
            self.session.mount(prefix, adapter)
        self.bad_nonce_attempts = max(1, bad_nonce_attempts)
        self.bad_nonce_retries = 0
        self.directory_url = directory_url
        #: called once when the CA refuses a request signed by the account: True when the client
        #: now holds a newer account key (another process rolled it over), so the request is resent
        self.on_key_refused: Callable[[], bool] | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        started = time.perf_counter()
        try:
            return super()._send_request(method, url, *args, **kwargs)
        finally:  # certqueue_acme_request_duration_seconds{ca, endpoint}
            from certqueue.metrics import observe_acme_request

            observe_acme_request(self.directory_url or url, url, time.perf_counter() - started)

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if (
                    error.code in KEY_REFUSED_CODES
                    and not refreshed
                    and self.account is not None
                    and self.on_key_refused is not None
                ):
                    refreshed = True
                    if self.on_key_refused():
                        continue
                if error.code != "badNonce" or attempt >= self.bad_nonce_attempts:
                    raise
                self.bad_nonce_retries += 1

    def _post_once(
        self,
        url: str,
        obj: jose.JSONDeSerializable,
        content_type: str = acme_client.ClientNetwork.JOSE_CONTENT_TYPE,
        **kwargs: Any,
    ) -> requests.Response:
        new_nonce_url = kwargs.pop("new_nonce_url", None)
        if not self.key:
            raise acme_errors.Error("no account key to sign with")
        data = self._wrap_in_jws(obj, self._get_nonce(url, new_nonce_url), url)
        kwargs.setdefault("headers", {"Content-Type": content_type})
        response = self._send_request("POST", url, data=data, **kwargs)
        problem = self._conflict_problem(response)
        if problem is not None:
            problem.http_status = response.status_code  # type: ignore[attr-defined]
            problem.retry_after = None  # type: ignore[attr-defined]
            self._keep_nonce(response)
            raise problem
        try:
            response = self._check_response(response, content_type=content_type)
        except messages.Error as error:
            error.http_status = response.status_code  # type: ignore[attr-defined]
            error.retry_after = parse_retry_after(response.headers.get("Retry-After"))  # type: ignore[attr-defined]
            self._keep_nonce(response)
            raise
        except acme_errors.ClientError:
            self._keep_nonce(response)
            raise
        self._add_nonce(response)
        return response

    def _conflict_problem(self, response: requests.Response) -> messages.Error | None:
        """A 409 with a problem document and no Location (``alreadyReplaced``, RFC 9773): ``acme``
        would turn every 409 into ``ConflictError`` (an existing account) and drop the problem."""
        if response.status_code != 409 or response.headers.get("Location"):
            return None
        if not response.headers.get("Content-Type", "").startswith(self.JSON_ERROR_CONTENT_TYPE):
            return None
        try:
            return messages.Error.from_json(response.json())
        except (ValueError, jose.DeserializationError):
            return None

    def _keep_nonce(self, response: requests.Response) -> None:
        try:
            self._add_nonce(response)
        except acme_errors.NonceError:
            pass  # an error response without a usable nonce: the next request fetches one


@dataclass(frozen=True)
class ChallengeInfo:
    """What presenting and answering one challenge needs; JSON-serialisable (:meth:`to_json`).

    ``identifier`` is the authorization's name (for ``*.example.com`` it is ``example.com`` and
    ``wildcard`` is true). http-01: serve ``key_authorization`` at
    ``/.well-known/acme-challenge/<token>``. dns-01: publish TXT ``dns_value`` at ``dns_name``.
    The key authorization is public by design (the CA fetches it); it is kept out of the repr anyway.
    """

    type: str
    url: str
    authz_url: str
    identifier: str
    wildcard: bool
    status: str
    token: str
    key_authorization: str = field(repr=False)
    dns_name: str | None = None
    dns_value: str | None = field(default=None, repr=False)

    @property
    def http_path(self) -> str | None:
        return f"/.well-known/acme-challenge/{self.token}" if self.type == "http-01" else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChallengeInfo:
        return cls(**data)


@dataclass
class AuthzStatus:
    """Where the authorizations of an order stand, from one poll.

    ``status`` is ``"pending"``, ``"valid"`` (every authorization valid: finalize next) or
    ``"invalid"`` (the order cannot succeed; ``reason`` says why). ``identifiers`` maps each name
    (``*.example.com`` for a wildcard) to its authorization status; ``problems`` holds the CA's problem
    for each invalid one. ``order`` is the refreshed order to store.
    """

    status: Literal["pending", "valid", "invalid"]
    identifiers: dict[str, str]
    problems: dict[str, AcmeProblem]
    order: messages.OrderResource
    retry_after: float | None = None

    @property
    def reason(self) -> str | None:
        """The stable reason of the first failure (``acme:unauthorized``...), None unless invalid."""
        if self.status != "invalid":
            return None
        return next(iter(self.problems.values())).reason if self.problems else "acme:orderInvalid"


def _identifiers_of(csr_pem: bytes) -> list[messages.Identifier]:
    """The ACME identifiers (DNS names, then IP addresses) a CSR asks for."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidInput("CSR is not a PEM certificate request", field="csr") from exc
    dns_names, ips = crypto_util.get_identifiers_from_x509(csr.subject, csr.extensions)
    identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in dns_names]
    identifiers += [messages.Identifier(typ=messages.IDENTIFIER_IP, value=str(ip)) for ip in ips]
    if not identifiers:
        raise InvalidInput("CSR names no identifier", field="csr")
    return identifiers


def _identifier_set(identifiers: Iterable[messages.Identifier]) -> set[tuple[str, str]]:
    """Identifiers as a set to compare two orders by: (type, value), names case-insensitively."""
    return {(str(i.typ.name), str(i.value).lower()) for i in identifiers}


def _status(status: messages.Status | None) -> str:
    """``Status('valid')`` -> ``"valid"`` (``str()`` of an acme Status is its repr)."""
    return str(status.name) if status is not None else "unknown"


def _name_of(authz: messages.AuthorizationResource) -> str:
    body = authz.body
    return f"*.{body.identifier.value}" if body.wildcard else str(body.identifier.value)


def _failed_problem(authz: messages.AuthorizationResource) -> AcmeProblem:
    for challb in authz.body.challenges:
        if challb.error is not None:
            problem = problem_from_error(challb.error)
            return AcmeProblem(
                type=problem.type,
                detail=problem.detail,
                reason=problem.reason,
                identifier=problem.identifier or _name_of(authz),
            )
    status = _status(authz.body.status)
    return AcmeProblem(
        type=f"authorization:{status}",
        detail=f"authorization is {status}",
        reason=f"acme:authorization_{status}",
        identifier=_name_of(authz),
    )


def _order_problem(body: messages.Order) -> AcmeProblem:
    if body.error is not None:
        return problem_from_error(body.error)
    return AcmeProblem(type="order:invalid", detail="the CA gave no reason", reason="acme:orderInvalid")


def _split_pem_chain(chain_pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(chain_pem.encode())


def select_chain(chains: list[str], preferred_issuer_cn: str | None) -> str:
    """Certbot's ``--preferred-chain``: the first chain whose topmost certificate was issued by a CA
    with this common name; the first chain (the CA's default) if none matches or none is asked for.
    """
    if not chains:
        raise ValueError("no chains to choose from")
    if preferred_issuer_cn:
        for chain in chains:
            certs = _split_pem_chain(chain)
            if not certs:
                continue
            cns = certs[-1].issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
            if cns and cns[0].value == preferred_issuer_cn:
                return chain
    return chains[0]


class AcmeClient:
    """One account at one CA, speaking ACME in bounded steps. Not thread-safe (see module doc).

    ``account_key`` is the account's private JWK; ``account_url`` its URL at the CA (None until
    registered: :func:`certqueue.acme.account.register_account` sets it). ``verify`` is passed to
    ``requests`` (True, False or a CA bundle path); ``timeout`` bounds every single HTTP request.
    """

    def __init__(
        self,
        directory_url: str,
        account_key: jose.JWK,
        account_url: str | None = None,
        *,
        verify: str | bool = True,
        timeout: float = 10.0,
        user_agent: str = "certqueue/0.1",
        bad_nonce_attempts: int = 10,
    ) -> None:
        self.directory_url = directory_url
        self.account_key = account_key
        self.timeout = timeout
        self.net = _Network(
            key=account_key,
            alg=signing_alg(account_key),
            verify_ssl=verify,  # type: ignore[arg-type]  # requests takes a bundle path too
            user_agent=user_agent,
            timeout=timeout,  # type: ignore[arg-type]
            bad_nonce_attempts=bad_nonce_attempts,
            directory_url=directory_url,
        )
        self._account_url: str | None = None
        self.use_account(account_url)
        self._acme: acme_client.ClientV2 | None = None
        #: where the account's current key can be read again (``certqueue.acme.accounts``): asked
        #: when the CA refuses this client's key, because another process rolled it over
        self.key_source: Callable[[], jose.JWK | None] | None = None
        self.net.on_key_refused = self._reload_key

    def _reload_key(self) -> bool:
        if self.key_source is None:
            return False
        fresh = self.key_source()
        if fresh is None or fresh.thumbprint() == self.account_key.thumbprint():
            return False
        self.set_account_key(fresh)
        return True

    def __repr__(self) -> str:
        return f"AcmeClient(directory_url={self.directory_url!r}, account_url={self._account_url!r})"

    @property
    def bad_nonce_retries(self) -> int:
        """How many requests this client re-sent after a badNonce (for metrics and tests)."""
        return self.net.bad_nonce_retries

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def account_url(self) -> str | None:
        return self._account_url

    def use_account(self, account_url: str | None) -> None:
        """Sign requests with this account URL as ``kid`` (None: sign with the JWK, new accounts only)."""
        self._account_url = account_url
        self.net.account = (
            messages.RegistrationResource(body=messages.Registration(), uri=account_url)
            if account_url
            else None
        )

    def set_account_key(self, key: jose.JWK) -> None:
        """Sign with ``key`` from now on (after an account key rollover)."""
        self.account_key = key
        self.net.key = key
        self.net.alg = signing_alg(key)

    @property
    def directory(self) -> messages.Directory:
        """The CA's directory; fetched once per process per URL, then shared by every client."""
        with _directories_lock:
            cached = _directories.get(self.directory_url)
        if cached is None:
            with mapped("fetch directory"):
                cached = acme_client.ClientV2.get_directory(self.directory_url, self.net)
            with _directories_lock:
                cached = _directories.setdefault(self.directory_url, cached)
        return cached

    @property
    def acme(self) -> acme_client.ClientV2:
        """The underlying ``acme.client.ClientV2`` (for the account module; not for tasks)."""
        if self._acme is None:
            self._acme = acme_client.ClientV2(self.directory, self.net)
        return self._acme

    def _require_account(self) -> None:
        if self._account_url is None:
            raise PermanentError("no ACME account URL: register the account first", reason="acme:noAccount")

    def _fetch_authz(self, url: str) -> messages.AuthorizationResource:
        return self.acme._authzr_from_response(self.acme._post_as_get(url), uri=url)

    def _fetch_order_body(self, order: messages.OrderResource) -> tuple[messages.Order, requests.Response]:
        if not order.uri:
            raise InvalidInput("order has no URL", field="order")
        with mapped("fetch order"):
            response = self.acme._post_as_get(order.uri)
            return messages.Order.from_json(response.json()), response

    # -- orders -------------------------------------------------------------------------------

    def new_order(
        self,
        csr_pem: bytes,
        profile: str | None = None,
        replaces: str | None = None,
        *,
        on_already_replaced: Callable[[], None] | None = None,
        on_created: Callable[[messages.OrderResource], None] | None = None,
        fetch_authorizations: bool = True,
    ) -> messages.OrderResource:
        """Open an order for the names (and IPs) of ``csr_pem`` and fetch its authorizations.

        ``profile`` is sent only when given, and only to a CA whose directory lists it (otherwise
        PermanentError ``acme:invalidProfile``). ``replaces`` (an ARI certificate id) is sent only
        when given and the CA offers ``renewalInfo``; a CA without ARI never sees it. If the order is
        created but its authorizations cannot be fetched, :class:`IncompleteOrder` carries the order
        to store and resume with :meth:`refresh_order`.

        ``alreadyReplaced`` (RFC 9773 section 5: another order already replaces that certificate,
        e.g. one we lost track of) is answered by ordering again without ``replaces``, once. Such an
        order is no longer an ARI renewal, so the CA's rate limits apply to it:
        ``on_already_replaced`` is called first (the caller charges its budgets there, and may raise
        to wait instead; nothing has been created at the CA).

        ``on_created`` is called with the order (no authorizations yet) as soon as the CA answered,
        before the authorizations are fetched: the caller commits the order's URL there, so a crash
        while they are fetched resumes this order instead of opening another.

        ``fetch_authorizations=False`` returns the order without them, for the caller to read with
        :meth:`fetch_authorizations` once its other new orders are placed (see there).
        """
        self._require_account()
        identifiers = _identifiers_of(csr_pem)
        directory = self.directory
        if profile:
            meta = getattr(directory, "meta", None)
            offered = (getattr(meta, "profiles", None) or {}) if meta is not None else {}
            if profile not in offered:
                raise PermanentError(
                    f"the CA does not offer the profile {profile!r}", reason="acme:invalidProfile"
                )
        if replaces and "renewalInfo" not in directory.to_partial_json():
            replaces = None
        try:
            response, order_body = self._post_new_order(identifiers, profile, replaces)
        except PermanentError as exc:
            if not replaces or exc.reason != ALREADY_REPLACED:
                raise
            if on_already_replaced is not None:
                on_already_replaced()
            response, order_body = self._post_new_order(identifiers, profile, None)
        uri = response.headers.get("Location")
        if not uri:
            raise PermanentError("new order: the CA returned no order URL", reason="acme:protocol")
        order = messages.OrderResource(body=order_body, uri=uri, authorizations=[], csr_pem=csr_pem)
        if on_created is not None:
            on_created(order)
        if not fetch_authorizations:
            return order
        try:
            with mapped("fetch authorizations"):
                authzs = [self._fetch_authz(url) for url in order_body.authorizations]
        except RetryableError as exc:
            raise IncompleteOrder(
                f"order created, authorizations not fetched: {exc.message}",
                order=order,
                reason=exc.reason,
                retry_after=exc.retry_after,
            ) from exc
        return order.update(authorizations=authzs)

    def _post_new_order(
        self, identifiers: list[messages.Identifier], profile: str | None, replaces: str | None
    ) -> tuple[requests.Response, messages.Order]:
        body = _NewOrder(identifiers=identifiers, profile=profile or None, replaces=replaces or None)
        with mapped("new order"):
            response = self.acme._post(self.directory["newOrder"], body)
            return response, messages.Order.from_json(response.json())

    def fetch_authorizations(self, order: messages.OrderResource) -> messages.OrderResource:
        """The order with its authorizations, read by the URLs of its body (n requests).

        A batch that places many new orders reads their authorizations only after all of them are
        placed: Pebble 2.4.0 deadlocks (its store's lock against an authorization's, held by a
        request for that authorization) when authorization reads run beside two or more new
        orders, and a phase of only new orders, then one of only reads, never has the three.
        """
        with mapped("fetch authorizations"):
            authzs = [self._fetch_authz(url) for url in order.body.authorizations]
        return order.update(authorizations=authzs)

    def refresh_order(self, order: messages.OrderResource) -> messages.OrderResource:
        """The order and all its authorizations as the CA sees them now (1 + n requests)."""
        body, _ = self._fetch_order_body(order)
        with mapped("fetch authorizations"):
            authzs = [self._fetch_authz(url) for url in body.authorizations]
        return order.update(body=body, authorizations=authzs)

    def find_open_order(
        self,
        csr_pem: bytes,
        known: Callable[[list[str]], set[str]],
        *,
        max_pages: int = ORDER_LIST_MAX_PAGES,
        max_fetches: int = ORDER_LIST_MAX_FETCHES,
    ) -> messages.OrderResource | None:
        """An order this account has open at the CA (pending or ready) for exactly the identifiers of
        ``csr_pem``, that ``known`` does not claim; None when there is none, or when the CA does not
        list an account's orders.

        This is how an order the CA created but whose URL was never stored (the worker died between
        the CA's answer and the commit) is found again instead of ordered twice. RFC 8555 section
        7.1.2.1: the account object's ``orders`` URL lists its orders, paged by ``Link: rel="next"``
        (Pebble lists every order that is not invalid, oldest first; Boulder has no list and reuses
        an open order for the same names itself). ``known`` gets each batch of listed URLs and
        answers those already stored (another certificate's, or this one's earlier ones): only the
        rest are fetched, newest first, at most ``max_fetches``. No authorizations are fetched
        (:meth:`refresh_order` does that). The CSR is sent at finalization, not with the order, so
        an order found here is finalized with the CSR of the row that lost it.
        """
        self._require_account()
        assert self._account_url is not None
        wanted = _identifier_set(_identifiers_of(csr_pem))
        with mapped("list orders"):
            url = self.acme._post_as_get(self._account_url).json().get("orders")
            listed: list[str] = []
            pages = 0
            while url and pages < max_pages:
                response = self.acme._post_as_get(url)
                listed += [str(u) for u in response.json().get("orders") or []]
                pages += 1
                nxt = self.acme._get_links(response, "next")
                url = nxt[0] if nxt else None
        if not listed:
            return None
        claimed: set[str] = set()
        for i in range(0, len(listed), 500):
            claimed |= known(listed[i : i + 500])
        fresh = [u for u in reversed(listed) if u not in claimed][:max_fetches]
        now = time.time()
        for uri in fresh:
            body, _ = self._fetch_order_body(messages.OrderResource(uri=uri))
            if body.status not in (_PENDING, _READY):
                continue
            if body.expires is not None and body.expires.timestamp() < now + 300:
                continue  # about to expire: not worth resuming
            if _identifier_set(body.identifiers or ()) == wanted:
                return messages.OrderResource(body=body, uri=uri, authorizations=[], csr_pem=csr_pem)
        return None

    # -- challenges ---------------------------------------------------------------------------

    def challenge_for(
        self, authz: messages.AuthorizationResource, chall_type: ChallengeType
    ) -> ChallengeInfo:
        """What to present for ``authz`` with ``chall_type``; no network I/O.

        PermanentError ``acme:no_challenge`` if the CA does not offer that type for this name (e.g.
        http-01 for a wildcard).
        """
        if chall_type not in ("http-01", "dns-01", "tls-alpn-01"):
            raise InvalidInput(f"unsupported challenge type {chall_type!r}", field="challenge_type")
        body = authz.body
        name = str(body.identifier.value)
        for challb in body.challenges:
            chall = challb.chall
            if getattr(chall, "typ", None) != chall_type:
                continue
            assert isinstance(chall, challenges.KeyAuthorizationChallenge)
            info = {
                "type": chall_type,
                "url": challb.uri,
                "authz_url": authz.uri,
                "identifier": name,
                "wildcard": bool(body.wildcard),
                "status": _status(challb.status),
                "token": chall.encode("token"),
                "key_authorization": chall.key_authorization(self.account_key),
            }
            if isinstance(chall, challenges.DNS01):
                info["dns_name"] = chall.validation_domain_name(name)
                info["dns_value"] = chall.validation(self.account_key)
            return ChallengeInfo(**info)
        offered = ", ".join(sorted(str(getattr(c.chall, "typ", "?")) for c in body.challenges))
        raise PermanentError(
            f"the CA offers no {chall_type} challenge for {_name_of(authz)} (offers: {offered})",
            reason="acme:no_challenge",
        )

    def answer_challenge(self, info: ChallengeInfo) -> None:
        """Tell the CA the challenge is ready to be validated. Idempotent.

        Nothing is sent if ``info`` already says processing or valid. If the CA refuses the answer
        because the challenge is no longer pending (a redelivered task), the authorization is read:
        processing or valid is success, invalid raises PermanentError with the CA's reason.
        """
        self._require_account()
        if info.status in (_PROCESSING.name, _VALID.name):
            return
        response: challenges.ChallengeResponse
        if info.type == "http-01":
            response = challenges.HTTP01Response(key_authorization=info.key_authorization)
        elif info.type == "dns-01":
            response = challenges.DNS01Response(key_authorization=info.key_authorization)
        elif info.type == "tls-alpn-01":
            response = TLSALPN01Response(key_authorization=info.key_authorization)
        else:
            raise InvalidInput(f"unsupported challenge type {info.type!r}", field="challenge_type")
        try:
            with mapped("answer challenge"):
                self.acme._post(info.url, response)
        except PermanentError:
            with mapped("fetch authorization"):
                authz = self._fetch_authz(info.authz_url)
            if authz.body.status == _VALID:
                return
            if authz.body.status == _INVALID:
                problem = _failed_problem(authz)
                raise PermanentError(
                    f"authorization for {problem.identifier} is invalid: {problem.detail}",
                    reason=problem.reason,
                ) from None
            for challb in authz.body.challenges:
                if challb.uri == info.url and challb.status in (_PROCESSING, _VALID):
                    return
            raise

    def poll_authorizations(self, order: messages.OrderResource) -> AuthzStatus:
        """One look at the order and, unless it is already past validation, its open authorizations.

        Costs one request when the order is ready/processing/valid, else one per authorization not
        already known valid. Never waits: call again later while ``status == "pending"``.
        """
        self._require_account()
        body, response = self._fetch_order_body(order)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        known = {a.uri: a for a in order.authorizations}
        if body.status in (_READY, _PROCESSING, _VALID):
            names = {_name_of(a): "valid" for a in known.values()}
            return AuthzStatus("valid", names, {}, order.update(body=body), retry_after)
        with mapped("poll authorizations"):
            authzs = [
                known[url] if url in known and known[url].body.status == _VALID else self._fetch_authz(url)
                for url in body.authorizations
            ]
        statuses = {_name_of(a): _status(a.body.status) for a in authzs}
        problems = {
            _name_of(a): _failed_problem(a) for a in authzs if a.body.status not in (_VALID, _PENDING)
        }
        updated = order.update(body=body, authorizations=authzs)
        if body.status == _INVALID or problems:
            if not problems:
                problems = {"order": _order_problem(body)}
            return AuthzStatus("invalid", statuses, problems, updated, retry_after)
        overall: Literal["pending", "valid"] = (
            "valid" if all(a.body.status == _VALID for a in authzs) else "pending"
        )
        return AuthzStatus(overall, statuses, {}, updated, retry_after)

    # -- issuance -----------------------------------------------------------------------------

    def finalize(self, order: messages.OrderResource, csr_pem: bytes) -> messages.OrderResource:
        """Send the CSR if the order is ready; return the order without waiting for issuance.

        Idempotent: an order already processing or valid is returned refreshed, nothing is sent.
        A still pending order raises RetryableError ``acme:orderNotReady``; an invalid one
        PermanentError with the CA's reason.
        """
        self._require_account()
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise InvalidInput("CSR is not a PEM certificate request", field="csr") from exc
        body = order.body
        if body.status != _READY:
            body, _ = self._fetch_order_body(order)
        if body.status == _READY:
            try:
                with mapped("finalize"):
                    response = self.acme._post(body.finalize, messages.CertificateRequest(csr=csr))
                    return order.update(body=messages.Order.from_json(response.json()), csr_pem=csr_pem)
            except PermanentError as exc:
                if exc.reason != "acme:orderNotReady":
                    raise
                body, _ = self._fetch_order_body(order)  # finalized by an earlier attempt, or expired
        if body.status in (_PROCESSING, _VALID):
            return order.update(body=body)
        if body.status == _INVALID:
            problem = _order_problem(body)
            raise PermanentError(f"order is invalid: {problem.detail}", reason=problem.reason)
        raise RetryableError(
            f"order is {_status(body.status)}, not ready to finalize", reason="acme:orderNotReady"
        )

    def fetch_certificate(
        self, order: messages.OrderResource, preferred_chain: str | None = None
    ) -> tuple[str, list[str]]:
        """Download the certificate of a valid order: ``(fullchain_pem, alternatives)``.

        ``preferred_chain`` is an issuer common name (certbot's ``--preferred-chain``): the chain whose
        topmost certificate that CA issued is returned first; ``alternatives`` are all the other chains
        the CA offers. An order still processing raises RetryableError ``acme:orderProcessing`` (with
        the CA's Retry-After if any).
        """
        self._require_account()
        body = order.body
        if body.status != _VALID or not body.certificate:
            body, response = self._fetch_order_body(order)
            if body.status == _PROCESSING or (body.status == _VALID and not body.certificate):
                raise RetryableError(
                    "certificate not issued yet",
                    reason="acme:orderProcessing",
                    retry_after=parse_retry_after(response.headers.get("Retry-After")),
                )
            if body.status == _INVALID:
                problem = _order_problem(body)
                raise PermanentError(f"order is invalid: {problem.detail}", reason=problem.reason)
            if body.status != _VALID:
                raise PermanentError(
                    f"order is {_status(body.status)}: finalize it first", reason="acme:orderNotFinalized"
                )
        with mapped("download certificate"):
            response = self.acme._post_as_get(body.certificate)
            chains = [response.text]
            chains += [
                self.acme._post_as_get(url).text for url in self.acme._get_links(response, "alternate")
            ]
        try:
            chosen = select_chain(chains, preferred_chain)
        except ValueError as exc:
            raise PermanentError(
                "the CA returned a certificate that cannot be parsed", reason="acme:badCertificate"
            ) from exc
        return chosen, [c for c in chains if c is not chosen]

    def revoke(self, cert_pem: str, reason: int) -> None:
        """Revoke a certificate, signed by the account key. Already revoked counts as success."""
        self._require_account()
        if reason not in REVOCATION_REASONS:
            raise InvalidInput(f"revocation reason {reason} is not an RFC 5280 reason code", field="reason")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
        except ValueError as exc:
            raise InvalidInput("certificate is not PEM", field="cert_pem") from exc
        try:
            with mapped("revoke"):
                self.acme.revoke(cert, reason)
        except PermanentError as exc:
            if exc.reason != "acme:alreadyRevoked":
                raise
