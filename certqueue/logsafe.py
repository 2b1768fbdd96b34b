"""A last line of defence: log records are scrubbed of private key material, URL passwords and
bearer secrets.

The code never logs keys on purpose (tasks carry ids only); this filter makes a mistake in a
dependency or a future change visible as ``[REDACTED]`` instead of a leaked key. It scrubs the
message, the traceback (formatted here, before any handler formats it) and the stack info. Keys
are caught as PEM and as bare base64 DER (no PEM headers); URL passwords (``postgresql://u:pw@h``)
become ``****``. ``install()`` puts it on the root logger's handlers; ``install_uvicorn()`` on
uvicorn's own loggers, which do not propagate to the root.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re

from certqueue.settings_keys import SECRET_NAME_PATTERN

_PEM_KEY = re.compile(
    r"-----BEGIN (?:[A-Z ]+ )?PRIVATE KEY-----.*?(?:-----END (?:[A-Z ]+ )?PRIVATE KEY-----|$)", re.DOTALL
)
#: a bearer token, or the value after ``name=`` / ``"name": `` where the name holds a secret word
#: (``certqueue.settings_keys.SECRET_WORDS``, the list ``config show`` masks by)
_SECRETS = re.compile(
    r"(?i)(authorization:\s*bearer\s+|" + SECRET_NAME_PATTERN + r"\"?\s*[:=]\s*\"?)([^\s\"',}&\[]+)"
)
#: scheme://user:PASSWORD@host; the user part may be empty (redis://:pw@host). The scheme starts
#: where no scheme character stands before it (not at a word boundary: in ``a-a-a-...`` every ``-``
#: is one, and scanning on from each was quadratic in the line's length)
_URL_PASSWORD = re.compile(r"(?i)(?<![a-z0-9+.\-])([a-z][a-z0-9+.\-]*://[^\s:/@'\"]*:)([^\s@/'\"]+)(@)")
#: certqueue's own API tokens, wherever they appear (a query string in an access log line)
_API_TOKEN = re.compile(r"\bcqt_[A-Za-z0-9_-]{20,}")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{100,}={0,2}")
MASK = "****"


def mask_url_password(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` with the password replaced by ``****``."""
    return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text)


def _der_key(match: re.Match[str]) -> str:
    run = match.group(0)
    try:
        data = base64.b64decode(run + "=" * (-len(run) % 4))
    except (binascii.Error, ValueError):
        return run
    if not data.startswith(b"\x30"):
        return run
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    try:
        load_der_private_key(data, password=None)
    except (ValueError, TypeError):
        return run
    except Exception:  # noqa: BLE001 - unsupported algorithms and the like: still key-shaped DER
        return "[REDACTED DER]"
    return "[REDACTED PRIVATE KEY]"


def scrub(text: str) -> str:
    text = _PEM_KEY.sub("[REDACTED PRIVATE KEY]", text)
    text = _BASE64_RUN.sub(_der_key, text)
    text = mask_url_password(text)
    text = _API_TOKEN.sub("[REDACTED TOKEN]", text)
    return _SECRETS.sub(lambda m: m.group(1) + "[REDACTED]", text)


_formatter = logging.Formatter()


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
        if record.exc_info and not record.exc_text:
            # handlers format the traceback after the filters ran: format it now, scrubbed, and
            # the formatter uses this text instead of formatting the exception again
            record.exc_text = _formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Attach the filter to every handler of ``logger`` (root by default)."""
    target = logger or logging.getLogger()
    flt = RedactingFilter()
    for h in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(flt)


UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def install_uvicorn() -> None:
    """The filter on uvicorn's loggers (call after uvicorn configured its logging)."""
    for name in UVICORN_LOGGERS:
        install(logging.getLogger(name))
    install()


_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.S)


def safe_detail(text: object, limit: int = 200) -> str:
    """Remote error text fit for a message: PEM blocks removed, one line, bounded length."""
    cleaned = _PEM_BLOCK.sub("[pem removed]", str(text or ""))
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
