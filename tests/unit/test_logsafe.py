"""The redaction filter (certqueue.logsafe) and the masking of URL passwords wherever settings are
shown (issue 13, finding 3: `certqueue config show` printed the PostgreSQL and Redis passwords)."""

from __future__ import annotations

import base64
import io
import json
import logging

import pytest
from click.testing import CliRunner

from certqueue import crypto, logsafe
from certqueue.cli import main
from certqueue.config import load_settings, masked_dump

PG_PW = "Pg5ecretPassw0rd"
REDIS_PW = "Red1sSecretPassw0rd"
PG_URL = f"postgresql+psycopg://certqueue:{PG_PW}@127.0.0.1:1/certqueue"
REDIS_URL = f"redis://:{REDIS_PW}@127.0.0.1:1/0"


def _logger() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test.logsafe.{id(out)}")
    logger.propagate = False
    logger.addHandler(handler)
    logsafe.install(logger)
    return logger, out


def test_url_passwords_are_masked_in_config_show(tmp_path) -> None:
    (tmp_path / "settings").mkdir()
    env = {
        "CERTQUEUE_SETTINGS_DIR": str(tmp_path / "settings"),
        "CERTQUEUE_DATABASE__URL": PG_URL,
        "CERTQUEUE_BROKER__URL": REDIS_URL,
        "CERTQUEUE_BROKER__RESULT_BACKEND": REDIS_URL,
        "CERTQUEUE_ACME__FALLBACK_DIRECTORY_URLS": json.dumps([f"https://u:{PG_PW}@ca.example/dir"]),
    }
    for args in (["config", "show"], ["config", "show", "--json"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 0, result.output
        assert PG_PW not in result.output and REDIS_PW not in result.output
        assert "****" in result.output.replace("\n", "")
    loaded = load_settings(directory=tmp_path / "settings", environ=env)
    dump = masked_dump(loaded)
    assert dump["database.url"]["value"] == "postgresql+psycopg://certqueue:****@127.0.0.1:1/certqueue"
    assert dump["broker.url"]["value"] == "redis://:****@127.0.0.1:1/0"
    assert PG_PW not in repr(loaded.settings) and REDIS_PW not in repr(loaded.settings)


def test_log_lines_and_tracebacks_with_password_urls_are_masked() -> None:
    logger, out = _logger()
    logger.warning("connecting to %s and %s", PG_URL, REDIS_URL)
    try:
        raise RuntimeError(f"could not connect to {PG_URL}")
    except RuntimeError:
        logger.exception("failed")
    text = out.getvalue()
    assert PG_PW not in text and REDIS_PW not in text
    assert "certqueue:****@127.0.0.1" in text and "Traceback" in text


@pytest.mark.parametrize("key_type", ["ec256", "rsa2048"])
def test_keys_without_pem_headers_are_redacted(key_type: str) -> None:
    pem = crypto.new_private_key_pem(key_type)
    body = "".join(pem.decode().splitlines()[1:-1])  # the base64 DER alone
    der_b64 = base64.b64encode(base64.b64decode(body)).decode()
    logger, out = _logger()
    logger.error("key material: %s", body)
    try:
        raise ValueError(f"bad blob {der_b64}")
    except ValueError:
        logger.exception("oops")
    text = out.getvalue()
    assert body[40:80] not in text and "[REDACTED PRIVATE KEY]" in text
    # a certificate (public) is left alone
    cert_pem, _ = __import__("tests.conftest_db", fromlist=["make_cert_pem"]).make_cert_pem()
    cert_b64 = "".join(cert_pem.splitlines()[1:-1])
    assert logsafe.scrub(cert_b64) == cert_b64


def test_uvicorn_loggers_get_the_filter() -> None:
    import uvicorn

    from certqueue.api.app import create_app

    uvicorn.Config(create_app(), log_level="info")  # configures uvicorn's own loggers and handlers
    logsafe.install_uvicorn()
    for name in ("uvicorn", "uvicorn.access"):
        handlers = logging.getLogger(name).handlers
        assert handlers and all(
            any(isinstance(f, logsafe.RedactingFilter) for f in h.filters) for h in handlers
        ), name


@pytest.mark.parametrize("unit", ["a-", "a.", "a+", "x_token-", "ab "])
def test_scrubbing_is_linear_in_the_length_of_a_line(unit: str) -> None:
    """A long line of short words joined by scheme or name characters: a pattern that rescans from
    every word boundary took minutes on 100 kB (URL passwords: 6 s at 40 kB, 10x per 3x longer)."""
    import time

    text = unit * (100_000 // len(unit))
    started = time.perf_counter()
    assert "[REDACTED]" not in logsafe.scrub(text) or "token" in unit
    assert time.perf_counter() - started < 5.0


def test_secret_names_inside_longer_words_and_hyphenated_headers() -> None:
    line = 'x-api-key: k1 DB_PASSWORD=k2 "client_secret": "k3" authorization: Bearer k4'
    out = logsafe.scrub(line)
    for secret in ("k1", "k2", "k3", "k4"):
        assert secret not in out, out
    assert logsafe.scrub("x_postgresql://u:pw@h/db") == "x_postgresql://u:****@h/db"
