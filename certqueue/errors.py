"""The error tree of certqueue.

Two kinds decide what a task does with a failure (STYLE.md rule 6):

* ``RetryableError``: the world may change (network, 5xx, badNonce, DNS not yet visible, rate
  limited). The task retries with a countdown; ``retry_after`` is a hint in seconds.
* ``PermanentError``: retrying cannot help (unauthorized, rejectedIdentifier, caa, bad config). The
  certificate moves to FAILED with ``reason``, a short stable string fit for metrics and alerting.

Messages never carry secrets: callers pass stable reasons and identifiers, never raw key material.
"""

from __future__ import annotations


class CertqueueError(Exception):
    """Base class of every error certqueue raises on purpose."""

    #: stable machine-readable reason, e.g. ``acme:unauthorized`` or ``dns:not_visible``
    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class InvalidInput(CertqueueError, ValueError):
    """Bad input from a user or a caller: nothing was written."""

    reason = "invalid_input"

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.field = field


class ConfigError(CertqueueError):
    """Settings that cannot work: unknown key, wrong type, impossible value, missing credentials."""

    reason = "config"

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        where = ", ".join(p for p in (source and f"in {source}", key and f"at {key}") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.source = source
        self.key = key


class NotFound(CertqueueError, LookupError):
    reason = "not_found"


class InvalidTransition(CertqueueError):
    """A lifecycle transition the state machine does not allow."""

    reason = "invalid_transition"


class KeyStoreError(CertqueueError):
    """Wrong master key, tampered ciphertext, unsafe key file."""

    reason = "keystore"


class RetryableError(CertqueueError):
    """A failure worth retrying later; ``retry_after`` (seconds) is a hint from the remote side."""

    reason = "retryable"

    def __init__(self, message: str, *, reason: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class PermanentError(CertqueueError):
    """A failure that retrying cannot fix; the certificate goes to FAILED with ``reason``."""

    reason = "permanent"


class RateLimited(RetryableError):
    """Over a rate-limit budget (ours or the CA's); the work is deferred, never failed."""

    reason = "rate_limited"


class PluginError(CertqueueError):
    """Raised by a DNS provider or a deployment target; names the plugin.

    ``raise ProviderError("cloudflare", "zone not found", retryable=False) from exc``
    """

    kind = "plugin"

    def __init__(
        self,
        plugin: str,
        message: str,
        *,
        retryable: bool = False,
        reason: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{self.kind} {plugin}: {message}", reason=reason or f"{plugin}:error")
        self.plugin = plugin
        self.retryable = retryable
        self.retry_after = retry_after


class ProviderError(PluginError):
    """A DNS provider failed."""

    kind = "dns provider"


class TargetError(PluginError):
    """A deployment target failed."""

    kind = "target"
