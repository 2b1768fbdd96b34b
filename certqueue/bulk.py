"""Many certificates in one request: ``certqueue issue --from-file`` and ``POST /v1/certificates/bulk``.

A request file has one certificate per line: its names separated by spaces, then optional options
of the ``issue`` command (``--challenge dns-01 --dns-provider route53 --key-type rsa2048 --region
eu-west --profile shortlived --no-auto-renew --email ops@example.com``). Blank lines and lines
starting with ``#`` are ignored. Every line is checked before anything is written; the good ones are
created in one transaction with one dispatch, and each bad line is reported with its number and the
reason (nothing is written for it).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from certqueue.certificates import CertificateRequest
from certqueue.config import Settings
from certqueue.errors import InvalidInput

#: the per-line options and the request parameter each sets
LINE_OPTIONS = {
    "--challenge": "challenge_type",
    "--dns-provider": "dns_provider",
    "--key-type": "key_type",
    "--profile": "profile",
    "--email": "email",
    "--region": "targets",
}
LINE_FLAGS = {"--no-auto-renew": ("auto_renew", False)}
#: the most certificates one request may carry
MAX_ITEMS = 10_000


@dataclass(frozen=True)
class BadLine:
    line: int
    message: str
    field: str | None = None


def parse_line(text: str) -> dict[str, Any]:
    """The request parameters of one line (not yet validated); InvalidInput for a malformed line."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError as exc:
        raise InvalidInput(f"cannot parse the line: {exc}", field="line") from None
    params: dict[str, Any] = {"domains": []}
    i = 0
    while i < len(words):
        w = words[i]
        if w in LINE_FLAGS:
            key, value = LINE_FLAGS[w]
            params[key] = value
            i += 1
        elif w in LINE_OPTIONS:
            if i + 1 >= len(words) or words[i + 1].startswith("--"):
                raise InvalidInput(f"{w} needs a value", field=LINE_OPTIONS[w])
            key = LINE_OPTIONS[w]
            if key == "targets":
                params.setdefault("targets", []).append(words[i + 1])
            else:
                params[key] = words[i + 1]
            i += 2
        elif w.startswith("--"):
            known = ", ".join(sorted([*LINE_OPTIONS, *LINE_FLAGS]))
            raise InvalidInput(f"unknown option {w} (known: {known})", field="line")
        else:
            params["domains"].append(w)
            i += 1
    return params


def build(
    lines: Iterable[tuple[int, dict[str, Any]]], settings: Settings
) -> tuple[list[tuple[int, CertificateRequest]], list[BadLine]]:
    """Validated requests (with their line or index) and the bad ones, each with its reason."""
    good: list[tuple[int, CertificateRequest]] = []
    bad: list[BadLine] = []
    for number, params in lines:
        try:
            good.append((number, CertificateRequest.build(settings, **params)))
        except InvalidInput as exc:
            bad.append(BadLine(number, exc.message, exc.field))
    return good, bad


def parse_file(text: str, settings: Settings) -> tuple[list[tuple[int, CertificateRequest]], list[BadLine]]:
    parsed: list[tuple[int, dict[str, Any]]] = []
    bad: list[BadLine] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            parsed.append((number, parse_line(raw)))
        except InvalidInput as exc:
            bad.append(BadLine(number, exc.message, exc.field))
    if len(parsed) + len(bad) > MAX_ITEMS:
        raise InvalidInput(f"at most {MAX_ITEMS} certificates per request file", field="from_file")
    good, invalid = build(parsed, settings)
    return good, sorted([*bad, *invalid], key=lambda b: b.line)
