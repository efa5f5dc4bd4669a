"""The dev PKI: certificate shapes, real mTLS handshakes from the written files, layouts.

Handshakes run over `socket.socketpair()` with Python's `ssl` and OpenSSL in charge of
verification, exactly as the proxy will be, so "this override makes a bad SVID" is checked
against the verifier that matters, not against our own reading of the certificate.
"""

from __future__ import annotations

import re
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.tools import pki
from sidecar.tools.pki import CA, KeyType, Layout, PkiError, Svid

TD = "example.org"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/server"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"

# OpenSSL X509_V_ERR_* codes, as carried by ssl.SSLCertVerificationError.verify_code.
CERT_SIGNATURE_FAILURE = 7
CERT_NOT_YET_VALID = 9
CERT_HAS_EXPIRED = 10
UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
CERT_REVOKED = 23
UNSUITABLE_PURPOSE = 26


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def cas() -> tuple[CA, CA]:
    root = pki.new_root(TD)
    return root, pki.new_intermediate(root)


@pytest.fixture
def root(cas: tuple[CA, CA]) -> CA:
    return cas[0]


@pytest.fixture
def inter(cas: tuple[CA, CA]) -> CA:
    return cas[1]


def ext[T: x509.ExtensionType](cert: x509.Certificate, kind: type[T]) -> x509.Extension[T]:
    return cert.extensions.get_extension_for_class(kind)


def uris_of(cert: x509.Certificate) -> list[str]:
    try:
        san = ext(cert, x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def written(out: Path, layout: Layout) -> tuple[Path, Path, Path]:
    f = layout.files
    return out / f.cert, out / f.key, out / f.bundle


def context(
    files: tuple[Path, Path, Path], *, server: bool, crl: Path | None = None
) -> ssl.SSLContext:
    cert, key, bundle = files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SVIDs need no DNS SAN; the proxy checks the SPIFFE ID
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # our certs must pass the strict checks
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(bundle)
    if crl is not None:
        ctx.load_verify_locations(crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


@dataclass
class Outcome:
    server_error: Exception | None = None
    client_error: Exception | None = None
    server_saw: tuple[str, ...] = ()  # URI SANs of the verified client
    client_saw: tuple[str, ...] = ()
    echoed: bytes = b""

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None and self.echoed == b"PING"


def _peer_uris(tls: ssl.SSLSocket) -> tuple[str, ...]:
    peer = tls.getpeercert()
    assert peer is not None
    sans = cast(tuple[tuple[str, str], ...], peer.get("subjectAltName", ()))
    return tuple(v for k, v in sans if k == "URI")


def mtls(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Outcome:
    """One full TLS 1.3 mTLS round trip; the client's first read is where TLS 1.3 reports
    the server's rejection of the client certificate."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    out = Outcome()

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as tls:
                out.server_saw = _peer_uris(tls)
                tls.sendall(tls.recv(4).upper())
        except (ssl.SSLError, OSError) as e:
            out.server_error = e
        finally:
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b) as tls:
            out.client_saw = _peer_uris(tls)
            tls.sendall(b"ping")
            out.echoed = tls.recv(4)
    except (ssl.SSLError, OSError) as e:
        out.client_error = e
    finally:
        b.close()
        thread.join(15)
    return out


def pair(
    tmp_path: Path,
    server: Svid,
    client: Svid,
    bundle: list[x509.Certificate],
    *,
    layout: Layout = Layout.SPIFFE_HELPER,
    crl: Path | None = None,
) -> Outcome:
    """Write both SVIDs as a sidecar would find them, then handshake from the files."""
    pki.write_svid(tmp_path / "server", server, bundle, layout)
    pki.write_svid(tmp_path / "client", client, bundle, layout)
    server_ctx = context(written(tmp_path / "server", layout), server=True, crl=crl)
    client_ctx = context(written(tmp_path / "client", layout), server=False)
    return mtls(server_ctx, client_ctx)


def verify_code(error: Exception | None) -> int | None:
    assert isinstance(error, ssl.SSLCertVerificationError), repr(error)
    return error.verify_code


# --- certificate shapes -----------------------------------------------------------------


def test_default_svid_is_a_valid_x509_svid(inter: CA) -> None:
    now = datetime.now(UTC)
    svid = pki.issue_svid(inter, SERVER_ID, now=now)
    cert = svid.cert

    assert uris_of(cert) == [SERVER_ID]
    assert svid.spiffe_id == SERVER_ID
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert not ku.value.key_encipherment  # an EC key never does key transport
    assert set(ext(cert, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(inter.cert, x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(svid.key.public_key())
    )
    assert cert.not_valid_before_utc == now.replace(microsecond=0) - pki.CLOCK_SKEW_BACKDATE
    assert cert.not_valid_after_utc == now.replace(microsecond=0) + timedelta(hours=1)
    assert 0 < svid.serial < 2**128 and svid.serial.bit_length() > 64
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "SPIFFE"
    assert isinstance(svid.key, ec.EllipticCurvePrivateKey) and svid.key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(inter.cert)


def test_dns_names_go_beside_the_single_uri(inter: CA) -> None:
    svid = pki.issue_svid(inter, SERVER_ID, dns=["server.default.svc", "localhost"])
    san = ext(svid.cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.default.svc", "localhost"]
    assert uris_of(svid.cert) == [SERVER_ID]


def test_ca_certificates(root: CA, inter: CA) -> None:
    for ca, path_length in ((root, None), (inter, 0)):
        bc = ext(ca.cert, x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == path_length
        ku = ext(ca.cert, x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        assert uris_of(ca.cert) == [f"spiffe://{TD}"]
        assert ca.trust_domain == TD
        assert ca.cert.not_valid_before_utc < datetime.now(UTC)
    assert root.is_root and root.cert.subject == root.cert.issuer
    root.cert.verify_directly_issued_by(root.cert)
    inter.cert.verify_directly_issued_by(root.cert)
    assert inter.trust_anchor == root.cert and root.trust_anchor == root.cert
    assert root.chain == () and inter.chain == ()
    assert inter.cert.not_valid_after_utc <= root.cert.not_valid_after_utc


def test_chain_pem_is_leaf_then_intermediates_never_the_root(tmp_path: Path, root: CA) -> None:
    upper = pki.new_intermediate(root, path_length=1)
    lower = pki.new_intermediate(upper)
    assert lower.chain == (upper.cert,)
    server = pki.issue_svid(lower, SERVER_ID)
    chain = x509.load_pem_x509_certificates(server.chain_pem())
    assert chain == [server.cert, lower.cert, upper.cert]
    assert root.cert not in chain
    assert len(x509.load_pem_x509_certificates(pki.issue_svid(root, SERVER_ID).chain_pem())) == 1

    client = pki.issue_svid(lower, CLIENT_ID)
    assert pair(tmp_path, server, client, [root.cert]).ok


def test_svid_ttl_never_outlives_its_ca(inter: CA) -> None:
    svid = pki.issue_svid(inter, SERVER_ID, ttl=timedelta(days=10_000))
    assert svid.not_after == inter.not_after


def test_chain_verifies_with_cryptography_client_verifier(root: CA, inter: CA) -> None:
    svid = pki.issue_svid(inter, CLIENT_ID)
    verifier = (
        verification.PolicyBuilder().store(verification.Store([root.cert])).build_client_verifier()
    )
    verified = verifier.verify(svid.cert, list(svid.intermediates))
    assert verified.subjects == [x509.UniformResourceIdentifier(CLIENT_ID)]
    assert verified.chain == [svid.cert, inter.cert, root.cert]


def test_ca_names_are_distinct_and_bounded() -> None:
    a, b = pki.new_root(TD), pki.new_root(TD)
    assert a.cert.subject != b.cert.subject
    long_td = "a" * 60 + ".example"
    assert pki.new_root(long_td).trust_domain == long_td
    assert (
        pki.new_root(TD, name="Acme Dev Root")
        .cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
        .value
        == "Acme Dev Root"
    )


@pytest.mark.parametrize("bad", ["", "Example.org", "spiffe://example.org", "a/b", "a:8080"])
def test_new_root_refuses_a_bad_trust_domain(bad: str) -> None:
    with pytest.raises(ValueError, match="trust domain"):
        pki.new_root(bad)


# --- real handshakes --------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(Layout))
def test_mtls_handshake_from_written_files(
    tmp_path: Path, root: CA, inter: CA, layout: Layout
) -> None:
    server = pki.issue_svid(inter, SERVER_ID)
    client = pki.issue_svid(inter, CLIENT_ID)
    out = pair(tmp_path, server, client, [root.cert], layout=layout)
    assert out.ok, out
    assert out.server_saw == (CLIENT_ID,)
    assert out.client_saw == (SERVER_ID,)


@pytest.mark.parametrize("kind", list(KeyType))
def test_every_key_type_issues_a_working_svid(tmp_path: Path, kind: KeyType) -> None:
    root = pki.new_root(TD, key_type=kind)
    inter = pki.new_intermediate(root, key_type=kind)
    server = pki.issue_svid(inter, SERVER_ID, key_type=kind)
    client = pki.issue_svid(inter, CLIENT_ID, key_type=kind)
    ku = ext(server.cert, x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_encipherment is isinstance(server.key, rsa.RSAPrivateKey)
    out = pair(tmp_path, server, client, [root.cert])
    assert out.ok, out


@pytest.mark.parametrize("kind", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_keys_load_in_pkcs8_and_sec1(tmp_path: Path, root: CA, inter: CA, kind: KeyType) -> None:
    svid = pki.issue_svid(inter, SERVER_ID, key_type=kind)
    pkcs8, sec1 = svid.key_pem("pkcs8"), svid.key_pem(pki.KeyFormat.SEC1)
    assert pkcs8.startswith(b"-----BEGIN PRIVATE KEY-----")
    header = b"EC PRIVATE KEY" if kind != KeyType.RSA_2048 else b"RSA PRIVATE KEY"
    assert sec1.startswith(b"-----BEGIN " + header)
    public = svid.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for pem in (pkcs8, sec1):
        loaded = serialization.load_pem_private_key(pem, None)
        assert (
            loaded.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            == public
        )

    # And OpenSSL takes the SEC1 form from disk for a real handshake.
    for name, s in (("server", svid), ("client", pki.issue_svid(inter, CLIENT_ID))):
        pki.write_svid(tmp_path / name, s, [root.cert], key_format="sec1")
    assert (tmp_path / "server" / "svid_key.pem").read_bytes() == sec1
    out = mtls(
        context(written(tmp_path / "server", Layout.SPIFFE_HELPER), server=True),
        context(written(tmp_path / "client", Layout.SPIFFE_HELPER), server=False),
    )
    assert out.ok, out


def test_ed25519_has_no_sec1_form(inter: CA) -> None:
    svid = pki.issue_svid(inter, SERVER_ID, key_type=KeyType.ED25519)
    assert svid.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    with pytest.raises(ValueError, match="pkcs8"):
        svid.key_pem("sec1")


# --- deliberately bad SVIDs -------------------------------------------------------------


def test_expired(tmp_path: Path, root: CA, inter: CA) -> None:
    now = datetime.now(UTC)
    bad = pki.issue_svid(
        inter, CLIENT_ID, not_before=now - timedelta(hours=2), not_after=now - timedelta(hours=1)
    )
    assert bad.not_after < now
    out = pair(tmp_path, pki.issue_svid(inter, SERVER_ID), bad, [root.cert])
    assert verify_code(out.server_error) == CERT_HAS_EXPIRED
    assert not out.ok


def test_not_yet_valid(tmp_path: Path, root: CA, inter: CA) -> None:
    now = datetime.now(UTC)
    bad = pki.issue_svid(inter, SERVER_ID, not_before=now + timedelta(minutes=2))
    assert bad.cert.not_valid_before_utc > now
    out = pair(tmp_path, bad, pki.issue_svid(inter, CLIENT_ID), [root.cert])
    assert verify_code(out.client_error) == CERT_NOT_YET_VALID


def test_no_uri_san(inter: CA) -> None:
    bad = pki.issue_svid(inter, SERVER_ID, uris=())
    assert uris_of(bad.cert) == [] and bad.spiffe_id == ""
    with pytest.raises(x509.ExtensionNotFound):  # an empty SAN extension would be invalid
        ext(bad.cert, x509.SubjectAlternativeName)
    with_dns = pki.issue_svid(inter, SERVER_ID, uris=(), dns=["server"])
    assert uris_of(with_dns.cert) == []


def test_two_uri_sans(inter: CA) -> None:
    other = f"spiffe://{TD}/ns/default/sa/other"
    bad = pki.issue_svid(inter, SERVER_ID, extra_uris=[other])
    assert uris_of(bad.cert) == [SERVER_ID, other]
    replaced = pki.issue_svid(inter, SERVER_ID, uris=["https://example.org/x"])
    assert uris_of(replaced.cert) == ["https://example.org/x"] and replaced.spiffe_id == ""


def test_ca_leaf(inter: CA) -> None:
    bad = pki.issue_svid(inter, SERVER_ID, is_ca=True)
    assert ext(bad.cert, x509.BasicConstraints).value.ca is True


def test_key_usage_overrides(inter: CA) -> None:
    no_ds = pki.issue_svid(
        inter, SERVER_ID, key_usage=pki.make_key_usage(key_encipherment=True)
    ).cert
    assert not ext(no_ds, x509.KeyUsage).value.digital_signature
    assert ext(no_ds, x509.KeyUsage).value.key_encipherment
    signer = pki.issue_svid(
        inter, SERVER_ID, key_usage=pki.make_key_usage(digital_signature=True, key_cert_sign=True)
    ).cert
    assert ext(signer, x509.KeyUsage).value.key_cert_sign
    with pytest.raises(x509.ExtensionNotFound):
        ext(pki.issue_svid(inter, SERVER_ID, include_key_usage=False).cert, x509.KeyUsage)


def test_eku_overrides(inter: CA) -> None:
    with pytest.raises(x509.ExtensionNotFound):
        ext(pki.issue_svid(inter, SERVER_ID, eku=None).cert, x509.ExtendedKeyUsage)
    server_only = pki.issue_svid(inter, SERVER_ID, eku=["server"]).cert
    assert list(ext(server_only, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(ValueError, match="unknown EKU"):
        pki.issue_svid(inter, SERVER_ID, eku=["sever"])


def test_bad_signature(tmp_path: Path, root: CA, inter: CA) -> None:
    bad = pki.issue_svid(inter, CLIENT_ID, issuer_key=pki.new_key())
    assert bad.cert.issuer == inter.cert.subject  # names the right issuer...
    with pytest.raises(InvalidSignature):  # ...but its key did not sign it
        bad.cert.verify_directly_issued_by(inter.cert)
    out = pair(tmp_path, pki.issue_svid(inter, SERVER_ID), bad, [root.cert])
    assert verify_code(out.server_error) == CERT_SIGNATURE_FAILURE


def test_missing_intermediate_fails_a_real_handshake(tmp_path: Path, root: CA, inter: CA) -> None:
    bad = pki.issue_svid(inter, CLIENT_ID, include_intermediates=False)
    assert bad.intermediates == ()
    assert x509.load_pem_x509_certificates(bad.chain_pem()) == [bad.cert]
    out = pair(tmp_path, pki.issue_svid(inter, SERVER_ID), bad, [root.cert])
    assert verify_code(out.server_error) == UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    assert not out.ok  # TLS 1.3: the client learns only on its first read


def test_foreign_root_is_not_trusted(tmp_path: Path, root: CA, inter: CA) -> None:
    foreign = pki.new_intermediate(pki.new_root(TD))
    out = pair(
        tmp_path, pki.issue_svid(foreign, SERVER_ID), pki.issue_svid(inter, CLIENT_ID), [root.cert]
    )
    assert verify_code(out.client_error) == UNABLE_TO_GET_ISSUER_CERT_LOCALLY


@pytest.mark.parametrize(
    "override",
    [
        {"is_ca": True},
        {"uris": ()},
        {"extra_uris": [f"spiffe://{TD}/ns/default/sa/other"]},
        {"include_key_usage": False},
        {"eku": None},
    ],
    ids=["ca-leaf", "no-uri", "two-uris", "no-key-usage", "no-eku"],
)
def test_svid_rule_breakers_still_pass_openssl(
    tmp_path: Path, root: CA, inter: CA, override: dict[str, Any]
) -> None:
    """Each of these breaks only an X.509-SVID rule: the chain verifies, OpenSSL (strict)
    completes the handshake both ways, so the proxy's own SVID check must catch them."""
    server = pki.issue_svid(inter, SERVER_ID, **override)
    client = pki.issue_svid(inter, CLIENT_ID, **override)
    assert pair(tmp_path, server, client, [root.cert]).ok


def test_openssl_catches_some_key_usage_breakers(tmp_path: Path, root: CA, inter: CA) -> None:
    """Without digitalSignature, OpenSSL refuses the cert as a TLS client but takes it as a
    server (keyEncipherment suits its TLS-server purpose): only half caught by OpenSSL."""
    no_ds = pki.make_key_usage(key_encipherment=True)
    server, client = pki.issue_svid(inter, SERVER_ID), pki.issue_svid(inter, CLIENT_ID)
    as_client = pair(
        tmp_path / "a", server, pki.issue_svid(inter, CLIENT_ID, key_usage=no_ds), [root.cert]
    )
    assert verify_code(as_client.server_error) == UNSUITABLE_PURPOSE
    as_server = pair(
        tmp_path / "b", pki.issue_svid(inter, SERVER_ID, key_usage=no_ds), client, [root.cert]
    )
    assert as_server.ok


def test_a_reused_key_makes_a_mismatched_pair(inter: CA) -> None:
    old = pki.issue_svid(inter, SERVER_ID)
    renewed = pki.issue_svid(inter, SERVER_ID, key=old.key)
    assert renewed.key is old.key and renewed.serial != old.serial


# --- CRLs -------------------------------------------------------------------------------


def test_crl_lists_the_serials_and_revokes_in_a_handshake(
    tmp_path: Path, root: CA, inter: CA
) -> None:
    revoked = pki.issue_svid(inter, CLIENT_ID)
    kept = pki.issue_svid(inter, CLIENT_ID)
    crl = pki.issue_crl(inter, [revoked.serial, 12345])
    assert crl.is_signature_valid(inter.cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == inter.cert.subject
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(12345) is not None
    assert crl.get_revoked_certificate_by_serial_number(kept.serial) is None
    assert crl.next_update_utc is not None and crl.next_update_utc > datetime.now(UTC)
    later = pki.issue_crl(inter, [], now=datetime.now(UTC) + timedelta(seconds=2))
    assert ext_number(later) > ext_number(crl), "CRLNumber must grow with time"

    path = tmp_path / "crl.pem"
    pki.write_crl(path, crl)
    assert x509.load_pem_x509_crl(path.read_bytes()) == crl

    server = pki.issue_svid(inter, SERVER_ID)
    out = pair(tmp_path / "a", server, revoked, [root.cert], crl=path)
    assert verify_code(out.server_error) == CERT_REVOKED
    assert pair(tmp_path / "b", server, kept, [root.cert], crl=path).ok


def ext_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


# --- layouts ----------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("layout", "names"),
    [
        (Layout.SPIFFE_HELPER, ("svid.pem", "svid_key.pem", "bundle.pem")),
        (Layout.CSI, ("tls.crt", "tls.key", "ca.crt")),
        (Layout.K8S, ("svid.pem", "svid_key.pem", "bundle.pem")),
    ],
)
def test_layout_names_modes_and_content(
    tmp_path: Path, root: CA, inter: CA, layout: Layout, names: tuple[str, str, str]
) -> None:
    svid = pki.issue_svid(inter, SERVER_ID)
    files = pki.write_svid(tmp_path, svid, [root.cert], layout)
    assert (files.cert, files.key, files.bundle) == names
    cert, key, bundle = (tmp_path / n for n in names)
    assert cert.read_bytes() == svid.chain_pem()
    assert key.read_bytes() == svid.key_pem()
    assert x509.load_pem_x509_certificates(bundle.read_bytes()) == [root.cert]
    assert mode(key) == 0o600  # follows the k8s symlink to the real file
    assert mode(cert) == 0o644 and mode(bundle) == 0o644
    visible = {p.name for p in tmp_path.iterdir() if not p.name.startswith("..")}
    assert visible == set(names)  # no temp files left behind


def test_spiffe_helper_layout_rewrites_in_place(tmp_path: Path, root: CA, inter: CA) -> None:
    names = written(tmp_path, Layout.SPIFFE_HELPER)
    pki.write_svid(tmp_path, pki.issue_svid(inter, SERVER_ID), [root.cert])
    inodes = [p.stat().st_ino for p in names]
    (tmp_path / "svid_key.pem").chmod(0o644)  # a loosened key file is narrowed again
    new = pki.issue_svid(inter, SERVER_ID)
    pki.write_svid(tmp_path, new, [root.cert])
    assert [p.stat().st_ino for p in names] == inodes
    assert names[0].read_bytes() == new.chain_pem()
    assert mode(names[1]) == 0o600


def test_csi_layout_replaces_each_file_atomically(tmp_path: Path, root: CA, inter: CA) -> None:
    names = written(tmp_path, Layout.CSI)
    pki.write_svid(tmp_path, pki.issue_svid(inter, SERVER_ID), [root.cert], Layout.CSI)
    inodes = [p.stat().st_ino for p in names]
    new = pki.issue_svid(inter, SERVER_ID)
    pki.write_svid(tmp_path, new, [root.cert], Layout.CSI)
    assert all(p.stat().st_ino != i for p, i in zip(names, inodes, strict=True))
    assert names[0].read_bytes() == new.chain_pem()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]


K8S_DIR = re.compile(r"^\.\.\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}\.\d{9}$")


def k8s_dirs(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if K8S_DIR.match(p.name)]


def test_k8s_layout_swaps_data_symlink_atomically(tmp_path: Path, root: CA, inter: CA) -> None:
    first = pki.issue_svid(inter, SERVER_ID)
    pki.write_svid(tmp_path, first, [root.cert], Layout.K8S)
    data = tmp_path / "..data"
    assert data.is_symlink()
    old_dir = data.readlink().name
    assert K8S_DIR.match(old_dir) and k8s_dirs(tmp_path) == [old_dir]
    for name in ("svid.pem", "svid_key.pem", "bundle.pem"):
        visible = tmp_path / name
        assert visible.is_symlink() and str(visible.readlink()) == f"..data/{name}"
        assert (tmp_path / old_dir / name).is_file()
    link_inodes = [(tmp_path / n).lstat().st_ino for n in ("svid.pem", "svid_key.pem")]

    second = pki.issue_svid(inter, SERVER_ID)
    pki.write_svid(tmp_path, second, [root.cert], Layout.K8S)
    new_dir = data.readlink().name
    assert new_dir != old_dir and k8s_dirs(tmp_path) == [new_dir]  # the old dir is gone
    assert not (tmp_path / "..data_tmp").exists(follow_symlinks=False)
    assert (tmp_path / "svid.pem").read_bytes() == second.chain_pem()
    assert (tmp_path / "svid_key.pem").read_bytes() == second.key_pem()
    # The visible links were not touched: only `..data` moved, which is why a watch on
    # the file path alone misses the update.
    assert [(tmp_path / n).lstat().st_ino for n in ("svid.pem", "svid_key.pem")] == link_inodes


def test_k8s_layout_refuses_a_directory_with_regular_files(
    tmp_path: Path, root: CA, inter: CA
) -> None:
    svid = pki.issue_svid(inter, SERVER_ID)
    pki.write_svid(tmp_path, svid, [root.cert])  # spiffe-helper: regular files
    with pytest.raises(PkiError, match="symlink"):
        pki.write_svid(tmp_path, svid, [root.cert], Layout.K8S)
    assert not (tmp_path / "..data").exists(follow_symlinks=False)


# --- the on-disk CA ---------------------------------------------------------------------


def test_init_writes_a_private_ca_dir_and_loads_back(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    root, inter = pki.init_ca_dir(d, TD)
    assert mode(d) == 0o700
    assert mode(d / "root_key.pem") == 0o600 and mode(d / "intermediate_key.pem") == 0o600
    assert mode(d / "root.pem") == 0o644
    loaded_root, loaded_inter = pki.load_ca_dir(d)
    assert loaded_root.cert == root.cert and loaded_inter.cert == inter.cert
    assert loaded_inter.trust_domain == TD and loaded_root.trust_domain == TD
    assert loaded_inter.trust_anchor == root.cert and loaded_inter.chain == ()
    svid = pki.issue_svid(loaded_inter, SERVER_ID)
    svid.cert.verify_directly_issued_by(inter.cert)


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    root, _ = pki.init_ca_dir(tmp_path, TD)
    with pytest.raises(PkiError, match="refusing to overwrite"):
        pki.init_ca_dir(tmp_path, TD)
    assert pki.load_ca_dir(tmp_path)[0].cert == root.cert
    new_root, _ = pki.init_ca_dir(tmp_path, "other.test", force=True)
    assert pki.load_ca_dir(tmp_path)[0].cert == new_root.cert != root.cert
    assert pki.load_ca_dir(tmp_path)[1].trust_domain == "other.test"


def test_load_ca_dir_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"not a directory.*sidecar pki init --dir"):
        pki.load_ca_dir(tmp_path / "missing")
    with pytest.raises(PkiError, match=r"not a CA directory \(missing root.pem.*sidecar pki init"):
        pki.load_ca_dir(tmp_path)


def test_load_ca_dir_rejects_a_mixed_or_broken_dir(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    pki.init_ca_dir(a, TD)
    pki.init_ca_dir(b, TD)
    (a / "intermediate.pem").write_bytes((b / "intermediate.pem").read_bytes())
    with pytest.raises(PkiError, match="is not the key of"):
        pki.load_ca_dir(a)
    (a / "intermediate_key.pem").write_bytes((b / "intermediate_key.pem").read_bytes())
    with pytest.raises(PkiError, match="not issued by"):
        pki.load_ca_dir(a)
    (a / "root.pem").write_text("garbage")
    with pytest.raises(PkiError, match="not a PEM certificate"):
        pki.load_ca_dir(a)


# --- command functions ------------------------------------------------------------------


def test_cmd_init_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, out = tmp_path / "ca", tmp_path / "out"
    assert pki.cmd_init(d, TD) == 0
    assert "trust domain example.org" in capsys.readouterr().out
    assert pki.cmd_init(d, TD) == 1
    assert "refusing to overwrite" in capsys.readouterr().err

    assert pki.cmd_issue(d, SERVER_ID, out, timedelta(minutes=30), ["server.local"]) == 0
    said = capsys.readouterr().out
    cert = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    assert f"serial {cert.serial_number:#x}" in said
    assert uris_of(cert) == [SERVER_ID]
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "server.local"
    ]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(minutes=30) + pki.CLOCK_SKEW_BACKDATE
    root = x509.load_pem_x509_certificate((d / "root.pem").read_bytes())
    assert x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes()) == [root]

    assert pki.cmd_issue(d, SERVER_ID, tmp_path / "csi", timedelta(hours=1), [], Layout.CSI) == 0
    assert (tmp_path / "csi" / "tls.crt").is_file()


@pytest.mark.parametrize(
    ("spiffe_id", "message"),
    [
        ("spiffe://other.org/ns/default/sa/x", "belongs to trust domain 'other.org'"),
        ("https://example.org/x", "must start with spiffe://"),
        ("spiffe://example.org", "add a path"),
    ],
)
def test_cmd_issue_refuses_ids_it_must_not_issue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spiffe_id: str, message: str
) -> None:
    pki.init_ca_dir(tmp_path / "ca", TD)
    assert pki.cmd_issue(tmp_path / "ca", spiffe_id, tmp_path / "out", timedelta(hours=1), []) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cmd_issue_without_a_ca_says_to_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pki.cmd_issue(tmp_path / "nope", SERVER_ID, tmp_path / "o", timedelta(hours=1), []) == 1
    assert "sidecar pki init --dir" in capsys.readouterr().err


def rotation_serials(text: str) -> list[int]:
    return [int(m, 16) for m in re.findall(r"^rotation \d+: .* serial (0x[0-9a-f]+)", text, re.M)]


def test_cmd_rotate_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki.init_ca_dir(tmp_path / "ca", TD)
    out = tmp_path / "out"
    rc = pki.cmd_rotate(
        tmp_path / "ca", SERVER_ID, out, every=0.01, ttl=timedelta(hours=1), dns=[], count=3
    )
    assert rc == 0
    serials = rotation_serials(capsys.readouterr().out)
    assert len(serials) == 3 and len(set(serials)) == 3
    on_disk = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    assert on_disk.serial_number == serials[-1]


def test_cmd_rotate_k8s_keeps_one_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki.init_ca_dir(tmp_path / "ca", TD)
    out = tmp_path / "out"
    assert (
        pki.cmd_rotate(
            tmp_path / "ca", SERVER_ID, out, 0.01, timedelta(hours=1), [], Layout.K8S, count=3
        )
        == 0
    )
    assert len(k8s_dirs(out)) == 1
    assert len(rotation_serials(capsys.readouterr().out)) == 3


def test_cmd_rotate_stops_on_event(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki.init_ca_dir(tmp_path / "ca", TD)
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    try:
        rc = pki.cmd_rotate(
            tmp_path / "ca", SERVER_ID, tmp_path / "out", 0.02, timedelta(hours=1), [], stop=stop
        )
    finally:
        timer.cancel()
    assert rc == 0
    assert len(rotation_serials(capsys.readouterr().out)) >= 2


def test_cmd_rotate_rejects_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki.init_ca_dir(tmp_path / "ca", TD)
    hour = timedelta(hours=1)
    assert pki.cmd_rotate(tmp_path / "ca", SERVER_ID, tmp_path / "o", 0, hour, []) == 1
    assert "positive" in capsys.readouterr().err
    other = "spiffe://other.org/x"
    assert pki.cmd_rotate(tmp_path / "ca", other, tmp_path / "o", 1, hour, []) == 1
    assert "other.org" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, leaked
