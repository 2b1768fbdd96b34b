"""certqueue.validation: table tests for each rule, property tests for the domain rules."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from certqueue.errors import InvalidInput
from certqueue.validation import (
    REVOCATION_REASONS,
    new_certificate_id,
    normalize_domain,
    normalize_domains,
    public_suffixes,
    revocation_reason_code,
    validate_certificate_id,
    validate_country,
    validate_email,
    validate_key_size,
    validate_pem,
    validate_subject_field,
)

# What a normalized name must look like, written independently of the module's own checks.
_LABEL = r"(?!-)(?!..--)[a-z0-9-]{1,63}(?<!-)"
_XN_LABEL = r"xn--[a-z0-9-]{1,59}(?<!-)"
_NORMALIZED = re.compile(rf"(\*\.)?(?:(?:{_XN_LABEL}|{_LABEL})\.)+(?:{_XN_LABEL}|{_LABEL})")


def _well_formed(name: str) -> bool:
    return (
        bool(_NORMALIZED.fullmatch(name))
        and len(name) <= 253
        and name.isascii()
        and not name.rsplit(".", 1)[-1].isdigit()
    )


# --- IDNA and normalization tables --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Bücher.example", "xn--bcher-kva.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("*.Bücher.example", "*.xn--bcher-kva.example"),
        ("münchen.de", "xn--mnchen-3ya.de"),
        ("faß.de", "xn--fa-hia.de"),  # IDNA 2008 non-transitional: ß is kept, not mapped to ss
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("例え。テスト", "xn--r8jz45g.xn--zckzah"),  # ideographic full stop is a dot
        ("\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com", "example.com"),  # fullwidth EXAMPLE maps to ASCII
        ("EXAMPLE.Com", "example.com"),
        ("example.com.", "example.com"),
        ("*.example.com", "*.example.com"),
        ("*.EXAMPLE.com.", "*.example.com"),
        ("a-b.example.com", "a-b.example.com"),
        ("xn--mnchen-3ya.de", "xn--mnchen-3ya.de"),
        ("123.example.com", "123.example.com"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_normalize_domain_accepts(raw: str, expected: str) -> None:
    assert normalize_domain(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        "localhost",  # one label
        "com.",
        "*",
        "*.",
        "*.com",  # wildcard over a single label
        "a*.example.com",
        "*a.example.com",
        "*.*.example.com",
        "foo.*.example.com",
        "example.*",
        "a_b.example.com",
        "-a.example.com",
        "a-.example.com",
        "ab--cd.example.com",  # reserved R-LDH label that is not an A-label
        "xn--abc.example",  # A-label that does not decode to a valid U-label
        "xn--.example",
        "example..com",
        ".example.com",
        "example.com..",
        "ex ample.com",
        " example.com",
        "example.com\n",
        "exa\x00mple.com",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4),  # 255 characters
        "example.123",  # numeric TLD
        "1.2.3.4",
        "::1",
        "[::1]",
        "2001:db8::1",
        "http://example.com",
        "example.com/path",
        "user@example.com",
        "example.com:443",
        "\u2603.example.com\u0301",  # combining mark at a label start is not valid IDNA
    ],
)
def test_normalize_domain_rejects(raw: str) -> None:
    with pytest.raises(InvalidInput) as err:
        normalize_domain(raw)
    assert err.value.field == "domains"


def test_total_length_limit_is_253() -> None:
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    assert normalize_domain(name) == name
    with pytest.raises(InvalidInput, match="253"):
        normalize_domain(name + "d")


def test_wildcard_counts_toward_the_length() -> None:
    base = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 60])  # 252
    assert normalize_domain("*." + base[:-1]) == "*." + base[:-1]
    with pytest.raises(InvalidInput):
        normalize_domain("*." + base)


def test_ip_addresses_only_when_allowed() -> None:
    assert normalize_domains(["192.0.2.1", "2001:DB8:0::1", "[::1]"], allow_ip=True) == [
        "192.0.2.1",
        "2001:db8::1",
        "::1",
    ]
    with pytest.raises(InvalidInput, match="IP addresses"):
        normalize_domains(["example.com", "192.0.2.1"])


def test_normalize_domains_dedupes_in_order() -> None:
    assert normalize_domains(["www.example.com", "Example.com", "WWW.example.com.", "example.com"]) == [
        "www.example.com",
        "example.com",
    ]


def test_normalize_domains_empty_and_string_refused() -> None:
    with pytest.raises(InvalidInput, match="at least one"):
        normalize_domains([])
    with pytest.raises(InvalidInput, match="not a single string"):
        normalize_domains("example.com")
    with pytest.raises(InvalidInput, match="text"):
        normalize_domains([b"example.com"])  # type: ignore[list-item]


def test_normalize_domains_limit_counts_after_dedup() -> None:
    names = [f"n{i}.example.com" for i in range(100)]
    assert len(normalize_domains(names + names)) == 100
    with pytest.raises(InvalidInput, match="at most 100"):
        normalize_domains([*names, "one-more.example.com"])
    assert normalize_domains(names[:5], max_names=5) == names[:5]
    with pytest.raises(InvalidInput, match="at most 5"):
        normalize_domains(names[:6], max_names=5)


def test_error_message_quotes_input_truncated() -> None:
    with pytest.raises(InvalidInput) as err:
        normalize_domain("x" * 500 + "_.com")
    assert len(str(err.value)) < 200


# --- property tests for the domain rules --------------------------------------------------------

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True).filter(lambda s: s[2:4] != "--")
_tld = _label.filter(lambda s: not s.isdigit())


@st.composite
def valid_names(draw: st.DrawFn, wildcard: bool | None = None) -> str:
    labels = draw(st.lists(_label, min_size=1, max_size=4))
    name = ".".join([*labels, draw(_tld)])
    use_wildcard = draw(st.booleans()) if wildcard is None else wildcard
    if use_wildcard:
        name = "*." + name
    if len(name) > 253:
        name = name[-253:].lstrip(".-")  # hypothesis rarely gets here; keep it a valid name
    assume(_well_formed(name))
    # a wildcard over a public suffix is refused on purpose (``*.0.ck``: ``*.ck`` is a suffix rule)
    assume(not (name.startswith("*.") and public_suffixes().is_public(name[2:])))
    return name


def _random_case(draw: st.DrawFn, s: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s)))
    return "".join(c.upper() if f else c for c, f in zip(s, flips, strict=True))


@settings(max_examples=300, deadline=None)
@given(valid_names())
def test_valid_names_are_fixed_points(name: str) -> None:
    assert normalize_domain(name) == name


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_case_and_final_dot_do_not_matter(data: st.DataObject) -> None:
    name = data.draw(valid_names())
    variant = _random_case(data.draw, name) + data.draw(st.sampled_from(["", "."]))
    assert normalize_domain(variant) == name


_mixed_alphabet = st.sampled_from(
    [*"abcxyzABZ0159-.*_ üßÖé例。\uff21ǅΣ\u0301\u200d", "xn--", "xn--bcher-kva"]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_mixed_alphabet, min_size=1, max_size=30).map("".join))
def test_normalization_is_idempotent_and_well_formed(raw: str) -> None:
    try:
        out = normalize_domain(raw)
    except InvalidInput:
        return
    assert _well_formed(out), out
    assert normalize_domain(out) == out


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_arbitrary_text_never_crashes(raw: str) -> None:
    try:
        out = normalize_domain(raw)
    except InvalidInput:
        return
    assert _well_formed(out)
    assert normalize_domain(out) == out


_bad_ascii = st.sampled_from(
    [c for c in (chr(i) for i in range(0x21, 0x7F)) if not (c.isalnum() or c in ".-*")]
    + [" ", "\t", "\x00", "\x7f"]
)


@settings(max_examples=300, deadline=None)
@given(valid_names(wildcard=False), _bad_ascii, st.data())
def test_a_bad_character_anywhere_is_rejected(name: str, bad: str, data: st.DataObject) -> None:
    pos = data.draw(st.integers(min_value=0, max_value=len(name)))
    with pytest.raises(InvalidInput):
        normalize_domain(name[:pos] + bad + name[pos:])


@settings(max_examples=200, deadline=None)
@given(valid_names(wildcard=False), st.integers(min_value=64, max_value=200), st.data())
def test_an_overlong_label_is_rejected(name: str, length: int, data: st.DataObject) -> None:
    labels = name.split(".")
    i = data.draw(st.integers(min_value=0, max_value=len(labels) - 1))
    labels[i] = ("a" * length) if i < len(labels) - 1 else ("z" * length)
    with pytest.raises(InvalidInput):
        normalize_domain(".".join(labels))


@settings(max_examples=200, deadline=None)
@given(valid_names(wildcard=False), st.data())
def test_an_empty_label_is_rejected(name: str, data: st.DataObject) -> None:
    labels = name.split(".")
    # an empty label after the last one is the allowed final dot: insert before the last label
    i = data.draw(st.integers(min_value=0, max_value=len(labels) - 1))
    labels.insert(i, "")
    with pytest.raises(InvalidInput):
        normalize_domain(".".join(labels))


@settings(max_examples=300, deadline=None)
@given(valid_names(wildcard=False), st.data())
def test_wildcard_anywhere_but_the_whole_leftmost_label_is_rejected(name: str, data: st.DataObject) -> None:
    labels = name.split(".")
    i = data.draw(st.integers(min_value=0, max_value=len(labels) - 1))
    label = labels[i]
    how = data.draw(st.sampled_from(["replace", "prefix", "suffix"]))
    if how == "replace":
        if i == 0:  # "*" as the whole leftmost label is the one allowed form: put it further right
            labels.insert(1, "*")
        else:
            labels[i] = "*"
    elif how == "prefix":
        labels[i] = "*" + label
    else:
        labels[i] = label + "*"
    prefix = data.draw(st.sampled_from(["", "*."]))
    with pytest.raises(InvalidInput):
        normalize_domain(prefix + ".".join(labels))


@settings(max_examples=50, deadline=None)
@given(
    st.integers(min_value=101, max_value=250), valid_names(wildcard=False), st.randoms(use_true_random=False)
)
def test_more_than_100_distinct_names_are_rejected(count: int, base: str, rnd: object) -> None:
    assume(len(base) <= 240)
    names = [f"h{i}.{base}" for i in range(count)]
    # plus duplicates, some only equal after case folding
    names = [n.upper() if i % 3 else n for i, n in enumerate(names)] + names[:50]
    rnd.shuffle(names)  # type: ignore[attr-defined]
    with pytest.raises(InvalidInput, match="at most 100"):
        normalize_domains(names)
    distinct = list(dict.fromkeys(n.lower() for n in names))
    assert normalize_domains(distinct[:100] + [n.upper() for n in distinct[:100]]) == distinct[:100]


# --- email --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("admin@example.com", "admin@example.com"),
        ("Admin.Ops+certs@Example.COM", "Admin.Ops+certs@example.com"),
        ("ops@bücher.example", "ops@xn--bcher-kva.example"),
        ("a!#$%&'*+/=?^_`{|}~-z@example.org", "a!#$%&'*+/=?^_`{|}~-z@example.org"),
    ],
)
def test_validate_email_accepts(raw: str, expected: str) -> None:
    assert validate_email(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "admin",
        "@example.com",
        "admin@",
        "a@b@example.com",
        "Admin <admin@example.com>",
        '"quoted"@example.com',
        ".admin@example.com",
        "admin.@example.com",
        "ad..min@example.com",
        "ad min@example.com",
        "admin@localhost",
        "admin@192.0.2.1",
        "admin@*.example.com",
        "admin@exa_mple.com",
        "x" * 65 + "@example.com",
        "a@" + ".".join(["b" * 60] * 5) + ".com",
        "jörg@example.com",
    ],
)
def test_validate_email_rejects(raw: str) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_email(raw)
    assert err.value.field == "email"


# --- ids, sizes, countries, subject fields, reasons ---------------------------------------------


def test_new_certificate_ids_are_valid_and_distinct() -> None:
    ids = {new_certificate_id() for _ in range(2000)}
    assert len(ids) == 2000
    for cid in ids:
        assert re.fullmatch(r"cert_[a-z2-7]{20}", cid)
        assert validate_certificate_id(cid) == cid


@pytest.mark.parametrize("good", ["cert_" + "a" * 16, "cert_" + "0" * 32, "cert_abc123def456ghi7"])
def test_validate_certificate_id_accepts(good: str) -> None:
    assert validate_certificate_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "cert_",
        "cert_abc123",
        "cert_" + "a" * 33,
        "CERT_" + "a" * 20,
        "cert_" + "A" * 20,
        "cert-" + "a" * 20,
        "cert_" + "a" * 19 + "_",
        "cert_" + "a" * 20 + "\n",
        "x" + "a" * 24,
        42,
    ],
)
def test_validate_certificate_id_rejects(bad: object) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_certificate_id(bad)  # type: ignore[arg-type]
    assert err.value.field == "certificate_id"


def test_validate_key_size() -> None:
    assert [validate_key_size(n) for n in (2048, 3072, 4096)] == [2048, 3072, 4096]
    for bad in (1024, 2047, 8192, 0, -2048, True, "2048", 2048.0, None):
        with pytest.raises(InvalidInput):
            validate_key_size(bad)  # type: ignore[arg-type]


def test_validate_country() -> None:
    assert validate_country("US") == "US"
    assert validate_country("de") == "DE"
    for bad in ("", "U", "USA", "U1", "Ü1", "ÜS", "  ", None, 12):
        with pytest.raises(InvalidInput) as err:
            validate_country(bad)  # type: ignore[arg-type]
        assert err.value.field == "country"


def test_validate_subject_field() -> None:
    assert validate_subject_field("  Example Corp ", field="organization") == "Example Corp"
    assert validate_subject_field("São Paulo", field="locality") == "São Paulo"
    assert validate_subject_field("x" * 64, field="organization") == "x" * 64
    for bad in ("", "   ", "x" * 65, "a\nb", "a\x00b"):
        with pytest.raises(InvalidInput) as err:
            validate_subject_field(bad, field="organization")
        assert err.value.field == "organization"
    assert validate_subject_field("y" * 128, field="state") == "y" * 128
    with pytest.raises(InvalidInput):
        validate_subject_field("y" * 129, field="state")


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("unspecified", 0),
        ("keyCompromise", 1),
        ("cACompromise", 2),
        ("affiliationChanged", 3),
        ("superseded", 4),
        ("cessationOfOperation", 5),
        ("certificateHold", 6),
        ("removeFromCRL", 8),
        ("privilegeWithdrawn", 9),
        ("aACompromise", 10),
        ("key_compromise", 1),
        ("KEYCOMPROMISE", 1),
        ("cessation-of-operation", 5),
    ],
)
def test_revocation_reason_code(name: str, code: int) -> None:
    assert revocation_reason_code(name) == code


def test_revocation_reasons_table_is_rfc5280() -> None:
    assert sorted(REVOCATION_REASONS.values()) == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]
    for bad in ("", "compromised", "7", "keyCompromise2", None):
        with pytest.raises(InvalidInput, match="revocation reason") as err:
            revocation_reason_code(bad)  # type: ignore[arg-type]
        assert err.value.field == "reason"


# --- PEM ----------------------------------------------------------------------------------------


def _pem_fixtures() -> dict[str, str]:
    from certqueue import crypto

    key = crypto.generate_private_key("ec256")
    csr = crypto.make_csr(key, ["example.com"]).decode()
    return {"key": crypto.private_key_to_pem(key).decode(), "csr": csr}


def test_validate_pem_private_key_normalizes_to_pkcs8() -> None:
    from cryptography.hazmat.primitives import serialization

    from certqueue import crypto

    key = crypto.generate_private_key("ec256")
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    assert "BEGIN EC PRIVATE KEY" in sec1
    out = validate_pem("junk before\r\n" + sec1.replace("\n", "\r\n") + "junk after", "private_key")
    assert out == crypto.private_key_to_pem(key).decode()


def test_validate_pem_kinds_and_errors(tmp_path: object) -> None:
    from devstack.tls import make_server_tls

    files = make_server_tls(tmp_path / "tls")  # type: ignore[operator]
    fullchain = files.cert.read_text()
    fx = _pem_fixtures()
    certs = validate_pem(fullchain, "chain")
    assert certs.count("BEGIN CERTIFICATE") == 2
    one = validate_pem(files.ca_cert.read_text(), "certificate")
    assert one.count("BEGIN CERTIFICATE") == 1
    assert "BEGIN CERTIFICATE REQUEST" in validate_pem(fx["csr"].encode(), "csr")

    with pytest.raises(InvalidInput, match="expected one certificate, found 2"):
        validate_pem(fullchain, "certificate")
    with pytest.raises(InvalidInput, match="private key was found"):
        validate_pem(fullchain + fx["key"], "chain")
    with pytest.raises(InvalidInput, match="no PEM certificate"):
        validate_pem("hello", "certificate")
    with pytest.raises(InvalidInput):
        validate_pem(fx["csr"], "certificate")
    with pytest.raises(InvalidInput, match="expected one PEM private key"):
        validate_pem(fullchain, "private_key")
    with pytest.raises(InvalidInput, match="larger than"):
        validate_pem("A" * (300 * 1024), "chain")
    with pytest.raises(InvalidInput, match="unknown PEM kind"):
        validate_pem(fullchain, "pkcs12")  # type: ignore[arg-type]

    # a damaged key: the error must not repeat any of its base64 lines
    body = fx["key"].splitlines()
    damaged = "\n".join([body[0], body[1][:10] + "!!" + body[1][12:], *body[2:]]) + "\n"
    with pytest.raises(InvalidInput) as err:
        validate_pem(damaged, "private_key")
    for line in body[1:-1]:
        assert line[:16] not in str(err.value)


@pytest.mark.parametrize("name", ["*.co.uk", "*.github.io", "*.CO.UK.", "*.com.au"])
def test_a_wildcard_over_a_public_suffix_is_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="public suffix") as info:
        normalize_domain(name)
    assert info.value.field == "domains"


@pytest.mark.parametrize("name", ["*.example.co.uk", "*.example.com", "*.me.github.io", "co.uk.example.com"])
def test_a_wildcard_under_a_registered_domain_is_fine(name: str) -> None:
    assert normalize_domain(name) == name


def test_unknown_dns_providers_are_refused() -> None:
    from certqueue.validation import validate_dns_provider

    assert validate_dns_provider("rfc2136") == "rfc2136"
    with pytest.raises(InvalidInput, match="unknown DNS provider 'nosuchdns'; known: azure, cloudflare"):
        validate_dns_provider("nosuchdns")


def test_request_field_rules_are_one_copy_importable_from_validation_and_crypto() -> None:
    """The rules crypto needs live in certqueue.csr_fields (no crypto <-> validation cycle, issue
    16); validation and crypto hand out the same objects, so every old import path still works."""
    from certqueue import crypto, csr_fields, validation

    names = ["normalize_domains", "normalize_domain", "public_suffixes", "key_type_from",
             "validate_key_size", "validate_country", "validate_subject_field", "KEY_TYPES",
             "KEY_SIZES", "DEFAULT_KEY_TYPE", "MAX_NAMES", "MAX_NAME_LENGTH", "MAX_LABEL_LENGTH"]  # fmt: skip
    for name in names:
        assert getattr(validation, name) is getattr(csr_fields, name), name
    assert crypto.KEY_TYPES is csr_fields.KEY_TYPES
    assert validation.public_suffixes() is csr_fields.public_suffixes()
