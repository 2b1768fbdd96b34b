"""certqueue.crypto: keys, CSRs, certificate parsing, chains and PKCS#12.

Certificates come from a small throwaway CA built here (root -> intermediate -> leaf, with the
extensions a web-PKI verifier wants); where the openssl CLI is installed its view of the same
objects is compared with ours.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import shutil
import subprocess
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certqueue import crypto
from certqueue.errors import InvalidInput
from tests.conftest import skip_unless_required

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
OPENSSL = shutil.which("openssl")


@pytest.fixture
def openssl_cli() -> None:
    if OPENSSL is None:
        skip_unless_required("openssl CLI not installed (apt-get install openssl)")


needs_openssl = pytest.mark.usefixtures("openssl_cli")


# --- a throwaway CA -----------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ku(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return crypto.cert_to_pem(self.cert)


def make_root(cn: str = "certqueue test root") -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ku(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key)


def make_intermediate(root: Issuer, cn: str = "certqueue test intermediate") -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1825))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ku(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), critical=False
        )
        .sign(root.key, hashes.SHA256())
    )
    return Issuer(cert, key)


def issue_leaf(
    issuer: Issuer,
    key: crypto.PrivateKey,
    names: list[str],
    *,
    days: int = 90,
    serial: int | None = None,
    cn: str | None = None,
) -> str:
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn) if cn else x509.Name([]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW - dt.timedelta(hours=1) + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=not cn)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_ku(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return crypto.cert_to_pem(cert)


@pytest.fixture(scope="module")
def pki() -> tuple[Issuer, Issuer]:
    root = make_root()
    return root, make_intermediate(root)


@pytest.fixture(scope="module")
def leaf_key() -> crypto.PrivateKey:
    return crypto.generate_private_key("ec256")


def _openssl(*args: str, stdin: bytes | None = None) -> str:
    assert OPENSSL is not None
    out = subprocess.run([OPENSSL, *args], input=stdin, capture_output=True, timeout=30, check=True)
    return out.stdout.decode()


# --- key types and keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_size", "key_type", "expected"),
    [
        (None, None, "rsa2048"),
        (2048, None, "rsa2048"),
        (4096, None, "rsa4096"),
        (None, "ec256", "ec256"),
        (None, "EC384", "ec384"),
        (3072, "rsa3072", "rsa3072"),
    ],
)
def test_key_type_from(key_size: int | None, key_type: str | None, expected: str) -> None:
    assert crypto.key_type_from(key_size=key_size, key_type=key_type) == expected


@pytest.mark.parametrize(
    ("key_size", "key_type", "field"),
    [
        (1024, None, "key_size"),
        (None, "rsa1024", "key_type"),
        (None, "ed25519", "key_type"),
        (2048, "rsa4096", "key_size"),
        (2048, "ec256", "key_size"),
    ],
)
def test_key_type_from_rejects(key_size: int | None, key_type: str | None, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        crypto.key_type_from(key_size=key_size, key_type=key_type)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("key_type", "cls", "size"),
    [
        ("ec256", ec.EllipticCurvePrivateKey, 256),
        ("ec384", ec.EllipticCurvePrivateKey, 384),
        ("rsa2048", rsa.RSAPrivateKey, 2048),
        ("rsa3072", rsa.RSAPrivateKey, 3072),
        ("rsa4096", rsa.RSAPrivateKey, 4096),
    ],
)
def test_generate_and_round_trip(key_type: str, cls: type, size: int) -> None:
    key = crypto.generate_private_key(key_type)
    assert isinstance(key, cls) and key.key_size == size
    assert crypto.key_type_of(key) == key_type
    pem = crypto.private_key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    again = crypto.load_private_key(pem.decode())
    assert crypto.private_key_to_pem(again) == pem


def test_load_traditional_forms() -> None:
    for key in (crypto.generate_private_key("ec256"), crypto.generate_private_key("rsa2048")):
        trad = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        assert b"BEGIN RSA PRIVATE KEY" in trad or b"BEGIN EC PRIVATE KEY" in trad
        assert crypto.private_key_to_pem(crypto.load_private_key(trad)) == crypto.private_key_to_pem(key)


def test_bad_private_keys_never_echo_the_key() -> None:
    key = crypto.generate_private_key("ec256")
    pem = crypto.private_key_to_pem(key).decode()
    body = pem.splitlines()[1:-1]
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    ).decode()
    damaged = pem.replace(body[0], body[0][::-1])
    ed = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    cases = {
        encrypted: "encrypted private keys",
        damaged: "does not parse",
        pem + pem: "found 2",
        "": "found 0",
        ed: "unsupported private key type ed25519",
        "caf\u00e9": "ASCII",
    }
    for text, message in cases.items():
        with pytest.raises(InvalidInput, match=message) as err:
            crypto.load_private_key(text)
        assert err.value.field == "private_key"
        assert err.value.__cause__ is None  # no library message carrying input bytes
        for line in body:
            assert line[:12] not in str(err.value)


# --- CSR ----------------------------------------------------------------------------------------


def test_csr_names_subject_and_signature(leaf_key: crypto.PrivateKey) -> None:
    pem = crypto.make_csr(
        leaf_key,
        ["*.Example.com", "Example.com", "www.example.com", "bücher.example", "example.com."],
        organization="Example Corp",
        country="us",
        state="California",
        locality="San Francisco",
    )
    csr = crypto.load_csr(pem)
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "*.example.com",
        "example.com",
        "www.example.com",
        "xn--bcher-kva.example",
    ]
    # first non-wildcard name as CN; fields in the conventional order
    assert csr.subject.rfc4514_string() == "CN=example.com,O=Example Corp,L=San Francisco,ST=California,C=US"
    assert csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == leaf_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@needs_openssl
def test_csr_verifies_with_openssl(leaf_key: crypto.PrivateKey) -> None:
    pem = crypto.make_csr(crypto.private_key_to_pem(leaf_key), ["a.example.com", "b.example.com"])
    out = _openssl("req", "-noout", "-verify", "-text", stdin=pem)
    assert "DNS:a.example.com, DNS:b.example.com" in out


def test_csr_common_name_rules(leaf_key: crypto.PrivateKey) -> None:
    def cn(names: list[str]) -> list[str]:
        csr = crypto.load_csr(crypto.make_csr(leaf_key, names))
        return [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]

    long_name = "a" * 60 + ".example.com"  # 72 characters
    assert cn(["*.example.com"]) == []
    assert cn([long_name, "short.example.com"]) == []  # first non-wildcard name too long: no CN
    assert cn(["*.example.com", "x" * 52 + ".example.com"]) == ["x" * 52 + ".example.com"]  # 64: fits
    assert cn(["example.com", "www.example.com"]) == ["example.com"]


def test_csr_ip_addresses_only_when_allowed(leaf_key: crypto.PrivateKey) -> None:
    pem = crypto.make_csr(leaf_key, ["192.0.2.1", "example.com"], allow_ip=True)
    san = crypto.load_csr(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.1")]
    assert san.get_values_for_type(x509.DNSName) == ["example.com"]


def test_csr_input_errors(leaf_key: crypto.PrivateKey) -> None:
    with pytest.raises(InvalidInput, match="IP addresses"):
        crypto.make_csr(leaf_key, ["192.0.2.1"])
    names = [f"n{i}.example.com" for i in range(100)]
    assert (
        len(
            crypto.load_csr(crypto.make_csr(leaf_key, names))
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value
        )
        == 100
    )
    with pytest.raises(InvalidInput, match="at most 100"):
        crypto.make_csr(leaf_key, [*names, "more.example.com"])
    with pytest.raises(InvalidInput) as err:
        crypto.make_csr(leaf_key, ["example.com"], country="USA")
    assert err.value.field == "country"
    with pytest.raises(InvalidInput) as err:
        crypto.make_csr(leaf_key, ["example.com"], organization="x" * 65)
    assert err.value.field == "organization"
    with pytest.raises(InvalidInput):
        crypto.make_csr(leaf_key, [])
    empty = crypto.load_csr(
        crypto.make_csr(leaf_key, ["example.com"], organization="", country="", state=None)
    )
    assert empty.subject.rfc4514_string() == "CN=example.com"  # "" from a database column means absent


def test_load_csr_rejects_bad_signature(leaf_key: crypto.PrivateKey) -> None:
    pem = crypto.make_csr(leaf_key, ["example.com"])
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    body = base64.encodebytes(bytes(der)).decode()
    forged = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(InvalidInput, match="signature does not verify"):
        crypto.load_csr(forged)
    with pytest.raises(InvalidInput, match="found 0"):
        crypto.load_csr(crypto.private_key_to_pem(leaf_key))


# --- certificates -------------------------------------------------------------------------------


def test_cert_info(pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey) -> None:
    _, inter = pki
    pem = issue_leaf(
        inter,
        leaf_key,
        ["www.example.com", "example.com", "192.0.2.7"],
        serial=0x0A0B0C,
        cn="www.example.com",
    )
    info = crypto.cert_info(pem)
    assert info.names == ("www.example.com", "example.com", "192.0.2.7")
    assert info.common_name == "www.example.com"
    assert info.serial == "a0b0c"
    assert info.not_before == NOW - dt.timedelta(hours=1)
    assert info.not_before.tzinfo is not None and info.not_before.utcoffset() == dt.timedelta(0)
    assert info.not_after - info.not_before == dt.timedelta(days=90) == info.lifetime
    assert info.issuer == "CN=certqueue test intermediate"
    assert info.key_type == "ec256"
    assert (
        info.authority_key_id
        == x509.AuthorityKeyIdentifier.from_issuer_public_key(inter.key.public_key()).key_identifier.hex()
    )
    from certqueue.targets.base import leaf_fingerprint

    assert info.fingerprint_sha256 == leaf_fingerprint(pem)
    with pytest.raises(FrozenInstanceError):
        info.serial = "0"  # type: ignore[misc]
    # a full chain parses as its leaf
    assert crypto.cert_info(pem + inter.pem) == info


@needs_openssl
def test_cert_info_agrees_with_openssl(pki: tuple[Issuer, Issuer]) -> None:
    _, inter = pki
    pem = issue_leaf(inter, crypto.generate_private_key("rsa2048"), ["example.org"])
    info = crypto.cert_info(pem)
    out = _openssl("x509", "-noout", "-serial", "-fingerprint", "-sha256", "-enddate", stdin=pem.encode())
    fields = dict(line.split("=", 1) for line in out.strip().splitlines())
    assert info.serial == fields["serial"].lower().lstrip("0")
    assert info.fingerprint_sha256 == fields["sha256 Fingerprint"].replace(":", "").lower()
    enddate = dt.datetime.strptime(fields["notAfter"], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=dt.UTC)
    assert info.not_after == enddate
    assert info.key_type == "rsa2048"
    assert info.common_name is None


def test_split_pem_chain(pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey) -> None:
    _, inter = pki
    leaf = issue_leaf(inter, leaf_key, ["example.com"])
    messy = (
        "Bag Attributes\n    friendlyName: x\nsubject=CN = x\n"
        + leaf.replace("\n", "\r\n")
        + "\n\n"
        + inter.pem
        + "trailing text"
    )
    parts = crypto.split_pem_chain(messy)
    assert parts == [leaf, inter.pem]
    assert all(p.endswith("-----END CERTIFICATE-----\n") for p in parts)
    with pytest.raises(InvalidInput, match="no PEM certificate"):
        crypto.split_pem_chain("nothing here")
    with pytest.raises(InvalidInput, match="private key"):
        crypto.split_pem_chain(leaf + crypto.private_key_to_pem(leaf_key).decode())
    broken = inter.pem.replace(inter.pem.splitlines()[3], "A" * 64)
    with pytest.raises(InvalidInput, match="certificate 2 of the bundle"):
        crypto.split_pem_chain(leaf + broken)


def test_key_matches_certificate(pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey) -> None:
    _, inter = pki
    key_pem = crypto.private_key_to_pem(leaf_key)
    leaf = issue_leaf(inter, leaf_key, ["example.com"])
    assert crypto.key_matches_certificate(key_pem, leaf)
    assert crypto.key_matches_certificate(key_pem.decode(), leaf + inter.pem)  # full chain: leaf first
    assert not crypto.key_matches_certificate(crypto.new_private_key_pem("ec256"), leaf)
    assert not crypto.key_matches_certificate(crypto.new_private_key_pem("rsa2048"), leaf)
    assert not crypto.key_matches_certificate(key_pem, inter.pem)


# --- chain verification -------------------------------------------------------------------------


def test_verify_chain_accepts_a_good_chain(pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey) -> None:
    root, inter = pki
    leaf = issue_leaf(inter, leaf_key, ["example.com", "www.example.com"])
    crypto.verify_chain(leaf, [inter.pem], [root.pem])
    crypto.verify_chain(leaf, [inter.pem], [root.pem], name="www.example.com")
    crypto.verify_chain(leaf + inter.pem, [inter.pem], [make_root("other").pem + root.pem])
    wild = issue_leaf(inter, leaf_key, ["*.example.com"])
    crypto.verify_chain(wild, [inter.pem], [root.pem])
    crypto.verify_chain(wild, [inter.pem], [root.pem], name="api.example.com")
    ip_only = issue_leaf(inter, leaf_key, ["192.0.2.9"])
    crypto.verify_chain(ip_only, [inter.pem], [root.pem])


@pytest.mark.parametrize(
    "case",
    [
        "missing_intermediate",
        "wrong_root",
        "expired",
        "not_yet_valid",
        "wrong_name",
        "wildcard_too_deep",
        "leaf_as_intermediate",
    ],
)
def test_verify_chain_rejects(pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey, case: str) -> None:
    root, inter = pki
    leaf = issue_leaf(inter, leaf_key, ["example.com"])
    chain, roots, kwargs = [inter.pem], [root.pem], {}
    if case == "missing_intermediate":
        chain = []
    elif case == "wrong_root":
        roots = [make_root("another root").pem]
    elif case == "expired":
        kwargs = {"at": NOW + dt.timedelta(days=91)}
    elif case == "not_yet_valid":
        kwargs = {"at": NOW - dt.timedelta(days=1)}
    elif case == "wrong_name":
        kwargs = {"name": "example.net"}
    elif case == "wildcard_too_deep":
        leaf = issue_leaf(inter, leaf_key, ["*.example.com"])
        kwargs = {"name": "a.b.example.com"}
    elif case == "leaf_as_intermediate":  # a leaf (CA:FALSE) signing another leaf
        not_ca_key = ec.generate_private_key(ec.SECP256R1())
        not_ca = issue_leaf(inter, not_ca_key, ["ca.example.com"], cn="not a CA")
        leaf = issue_leaf(
            Issuer(x509.load_pem_x509_certificate(not_ca.encode()), not_ca_key), leaf_key, ["example.com"]
        )
        chain = [not_ca, inter.pem]
    with pytest.raises(InvalidInput, match="does not verify") as err:
        crypto.verify_chain(leaf, chain, roots, **kwargs)  # type: ignore[arg-type]
    assert err.value.reason == "crypto:chain_untrusted"
    why = {
        "missing_intermediate": "no path to a trusted root",
        "wrong_root": "no path to a trusted root",
        "expired": "not valid at validation time",
        "not_yet_valid": "not valid at validation time",
        "wrong_name": "no matching subjectAltName",
        "wildcard_too_deep": "no matching subjectAltName",
        "leaf_as_intermediate": "basicConstraints",
    }[case]
    assert why in str(err.value)


def test_verify_chain_input_errors(pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey) -> None:
    _, inter = pki
    leaf = issue_leaf(inter, leaf_key, ["example.com"])
    with pytest.raises(InvalidInput, match="no trusted roots"):
        crypto.verify_chain(leaf, [inter.pem], [])
    with pytest.raises(InvalidInput, match="no PEM certificate"):
        crypto.verify_chain(leaf, [inter.pem], ["garbage"])


def test_verify_chain_on_devstack_tls(tmp_path: Path) -> None:
    """The loopback TLS files other tests trust must pass the same verifier."""
    from devstack.tls import make_server_tls

    files = make_server_tls(tmp_path)
    leaf, *rest = crypto.split_pem_chain(files.cert.read_text())
    crypto.verify_chain(leaf, rest, [files.ca_cert.read_text()], name="localhost")
    crypto.verify_chain(leaf, rest, [files.ca_cert.read_text()], name="127.0.0.1")
    assert crypto.key_matches_certificate(files.key.read_text(), leaf)


def test_verify_issued_by(pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey) -> None:
    root, inter = pki
    leaf = x509.load_pem_x509_certificate(issue_leaf(inter, leaf_key, ["example.com"]).encode())
    assert crypto.verify_issued_by(leaf, inter.cert)
    assert crypto.verify_issued_by(inter.cert, root.cert)
    assert not crypto.verify_issued_by(leaf, root.cert)


# --- PKCS#12 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_pkcs12_round_trip(pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey, legacy: bool) -> None:
    _, inter = pki
    key_pem = crypto.private_key_to_pem(leaf_key)
    leaf = issue_leaf(inter, leaf_key, ["example.com"])
    blob = crypto.to_pkcs12(key_pem, leaf, inter.pem, b"s3cret", friendly_name="example.com", legacy=legacy)
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(blob, b"wrong")
    key, cert, cas = pkcs12.load_key_and_certificates(blob, b"s3cret")
    assert key is not None and crypto.private_key_to_pem(key) == key_pem  # type: ignore[arg-type]
    assert cert is not None and crypto.cert_to_pem(cert) == leaf
    assert [crypto.cert_to_pem(c) for c in cas] == [inter.pem]
    parsed = pkcs12.load_pkcs12(blob, b"s3cret")
    assert parsed.cert is not None and parsed.cert.friendly_name == b"example.com"


def test_pkcs12_without_password_or_chain(pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey) -> None:
    _, inter = pki
    leaf = issue_leaf(inter, leaf_key, ["example.com"])
    blob = crypto.to_pkcs12(crypto.private_key_to_pem(leaf_key), leaf, "", None)
    key, cert, cas = pkcs12.load_key_and_certificates(blob, None)
    assert key is not None and cert is not None and cas == []


@needs_openssl
def test_pkcs12_readable_by_openssl(
    pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey, tmp_path: Path
) -> None:
    _, inter = pki
    leaf = issue_leaf(inter, leaf_key, ["example.com"])
    p12 = tmp_path / "b.p12"
    p12.write_bytes(crypto.to_pkcs12(crypto.private_key_to_pem(leaf_key), leaf, inter.pem, b"pw"))
    out = _openssl("pkcs12", "-in", str(p12), "-passin", "pass:pw", "-nokeys")
    assert crypto.split_pem_chain(out) == [leaf, inter.pem]


def test_pkcs12_refuses_a_mismatched_key(pki: tuple[Issuer, Issuer], leaf_key: crypto.PrivateKey) -> None:
    _, inter = pki
    leaf = issue_leaf(inter, leaf_key, ["example.com"])
    with pytest.raises(InvalidInput, match="does not match") as err:
        crypto.to_pkcs12(crypto.new_private_key_pem("ec256"), leaf, inter.pem, b"pw")
    assert err.value.reason == "crypto:key_mismatch"
