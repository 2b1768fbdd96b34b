"""A last line of defence: log records are scrubbed of private key material and bearer secrets.

The code never logs keys on purpose (tasks carry ids only); this filter makes a mistake in a
dependency or a future change visible as ``[REDACTED]`` instead of a leaked key.
"""

from __future__ import annotations

import logging
import re

_PEM_KEY = re.compile(
    r"-----BEGIN (?:[A-Z ]+ )?PRIVATE KEY-----.*?(?:-----END (?:[A-Z ]+ )?PRIVATE KEY-----|$)", re.DOTALL
)
_SECRETS = re.compile(
    r"(?i)(authorization:\s*bearer\s+|\"?(?:api_token|client_secret|secret_access_key|"
    r"tsig_secret|hmac_key|password)\"?\s*[:=]\s*\"?)([^\s\"',}]+)"
)


def scrub(text: str) -> str:
    text = _PEM_KEY.sub("[REDACTED PRIVATE KEY]", text)
    return _SECRETS.sub(lambda m: m.group(1) + "[REDACTED]", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        clean = scrub(msg)
        if clean != msg:
            record.msg = clean
            record.args = None
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Attach the filter to every handler of ``logger`` (root by default)."""
    target = logger or logging.getLogger()
    flt = RedactingFilter()
    for h in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(flt)
