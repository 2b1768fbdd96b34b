"""Map ACME failures onto certqueue's two error kinds, with stable reasons.

Owns the translation from what the ``acme`` library and the network raise (problem documents of type
``urn:ietf:params:acme:error:*``, ``requests`` exceptions, ``acme.errors``) to
:class:`~certqueue.errors.RetryableError`, :class:`~certqueue.errors.RateLimited` and
:class:`~certqueue.errors.PermanentError`. Reasons are ``acme:<problem type>`` (``acme:unauthorized``,
``acme:caa``...), ``acme:server`` for 5xx and ``serverInternal``, ``acme:network`` for connection
failures and timeouts. Messages carry the CA's ``detail`` (which names identifiers, never keys) and
never a JWS body or a raw response.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
from acme import errors as acme_errors
from acme import messages

from certqueue.errors import CertqueueError, PermanentError, RateLimited, RetryableError

ERROR_PREFIX = "urn:ietf:params:acme:error:"

#: problem codes where waiting and asking again can succeed
RETRYABLE_CODES = frozenset({"badNonce", "serverInternal", "rateLimited"})

#: longest detail kept in a message; CA details are short, anything longer is not useful in a log
_MAX_DETAIL = 300


@dataclass(frozen=True)
class AcmeProblem:
    """An ACME problem document reduced to what is safe to store and show."""

    type: str
    detail: str
    reason: str
    identifier: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "detail": self.detail,
            "reason": self.reason,
            "identifier": self.identifier,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AcmeProblem:
        return cls(
            type=data["type"],
            detail=data.get("detail", ""),
            reason=data["reason"],
            identifier=data.get("identifier"),
        )


class IncompleteOrder(RetryableError):
    """The CA created the order but fetching its authorizations failed.

    ``order`` (an ``OrderResource`` with ``uri`` and ``body``, no authorizations) is what the caller
    stores before retrying with ``AcmeClient.refresh_order``, so the retry resumes this order instead of
    opening a second one.
    """

    def __init__(
        self, message: str, *, order: messages.OrderResource, reason: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message, reason=reason, retry_after=retry_after)
        self.order = order


def problem_code(typ: str | None) -> str | None:
    """``urn:ietf:params:acme:error:caa`` -> ``caa``; None for types outside the ACME namespace."""
    if typ and typ.startswith(ERROR_PREFIX):
        code = typ[len(ERROR_PREFIX) :]
        if code and code.replace("-", "").replace("_", "").isalnum():
            return code
    return None


def problem_reason(typ: str | None) -> str:
    """A stable reason for a problem type: ``acme:<code>``, or ``acme:error`` for a foreign type."""
    code = problem_code(typ)
    return f"acme:{code}" if code else "acme:error"


def _clip(text: str | None) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."


def problem_from_error(error: messages.Error) -> AcmeProblem:
    """Reduce a problem document; a ``compound`` problem takes the type of its first subproblem."""
    typ = str(error.typ)
    detail = _clip(error.detail or error.title)
    identifier = error.identifier.value if error.identifier is not None else None
    if problem_code(typ) == "compound" and error.subproblems:
        first = error.subproblems[0]
        sub_ident = first.identifier.value if first.identifier is not None else identifier
        return AcmeProblem(
            type=str(first.typ),
            detail=_clip(first.detail or detail),
            reason=problem_reason(first.typ),
            identifier=sub_ident,
        )
    return AcmeProblem(type=typ, detail=detail, reason=problem_reason(typ), identifier=identifier)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


def from_problem(error: messages.Error, *, action: str) -> CertqueueError:
    """The certqueue error for a problem document the CA returned while doing ``action``.

    ``http_status`` and ``retry_after`` are read from the attributes our network layer attaches to
    the error (``acme``'s ``Error`` objects do not carry the response).
    """
    problem = problem_from_error(error)
    code = problem_code(problem.type)
    status: int | None = getattr(error, "http_status", None)
    retry_after: float | None = getattr(error, "retry_after", None)
    message = f"{action}: {problem.type}: {problem.detail}" if problem.detail else f"{action}: {problem.type}"
    if code == "rateLimited":
        return RateLimited(message, reason="acme:rateLimited", retry_after=retry_after)
    if code == "serverInternal" or (status is not None and status >= 500):
        return RetryableError(message, reason="acme:server", retry_after=retry_after)
    if code == "badNonce":
        return RetryableError(message, reason="acme:badNonce", retry_after=retry_after)
    return PermanentError(message, reason=problem.reason)


def map_exception(exc: BaseException, *, action: str) -> CertqueueError:
    """The certqueue error for any exception raised by an ACME call (``action`` names the step)."""
    if isinstance(exc, CertqueueError):
        return exc
    if isinstance(exc, messages.Error):
        return from_problem(exc, action=action)
    if isinstance(exc, requests.Timeout):
        return RetryableError(f"{action}: timed out talking to the CA", reason="acme:network")
    if isinstance(exc, requests.ConnectionError):
        return RetryableError(
            f"{action}: cannot connect to the CA ({type(exc).__name__})", reason="acme:network"
        )
    if isinstance(exc, requests.RequestException):
        return RetryableError(f"{action}: HTTP failure ({type(exc).__name__})", reason="acme:network")
    if isinstance(exc, acme_errors.TimeoutError):
        return RetryableError(f"{action}: the CA did not finish in time", reason="acme:timeout")
    if isinstance(exc, acme_errors.NonceError):
        # a missing or undecodable nonce is a CA (or proxy) fault, not ours
        return RetryableError(f"{action}: the CA sent no usable nonce", reason="acme:badNonce")
    if isinstance(exc, acme_errors.ConflictError):
        return PermanentError(f"{action}: conflict with an existing resource", reason="acme:conflict")
    if isinstance(exc, acme_errors.ClientError):
        return _from_client_error(exc, action=action)
    if isinstance(exc, acme_errors.Error):
        return PermanentError(f"{action}: {type(exc).__name__}", reason="acme:error")
    if isinstance(exc, ValueError):
        # a response that is not the JSON the protocol promises (proxy error page, truncated body)
        return RetryableError(f"{action}: unreadable response from the CA", reason="acme:server")
    return PermanentError(f"{action}: unexpected {type(exc).__name__}", reason="acme:error")


def _from_client_error(exc: acme_errors.ClientError, *, action: str) -> CertqueueError:
    # acme raises ClientError(response) for a non-JSON error response; never show the response itself
    response = next((a for a in exc.args if isinstance(a, requests.Response)), None)
    if response is None and exc.args and isinstance(exc.args[0], tuple):
        response = next((a for a in exc.args[0] if isinstance(a, requests.Response)), None)
    if response is not None:
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status == 429:
            return RateLimited(
                f"{action}: HTTP 429 from the CA", reason="acme:rateLimited", retry_after=retry_after
            )
        if status >= 500:
            return RetryableError(
                f"{action}: HTTP {status} from the CA", reason="acme:server", retry_after=retry_after
            )
        return PermanentError(f"{action}: HTTP {status} from the CA", reason="acme:protocol")
    return PermanentError(f"{action}: protocol error ({type(exc).__name__})", reason="acme:protocol")


@contextmanager
def mapped(action: str) -> Iterator[None]:
    """Run an ACME call and re-raise any failure as a certqueue error, chaining the cause."""
    try:
        yield
    except CertqueueError:
        raise
    except Exception as exc:
        raise map_exception(exc, action=action) from exc
