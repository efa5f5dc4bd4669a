"""load_identity: a good set of files becomes one snapshot; every bad one names its file.

The files are real, written by `pki.write_svid` in the layouts the proxy must accept, and
broken the way they break in the field (a half-written file, a rotation caught between
the certificate and the key).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.identity import Identity, load_identity
from sidecar.problems import Problem, ProblemsError
from sidecar.tools import pki
from sidecar.tools.pki import CA, KeyFormat, KeyType, Layout, LayoutFiles, Svid

pytestmark = pytest.mark.timeout(30)

TD = "example.org"
OTHER_TD = "other.org"
WORKLOAD = f"spiffe://{TD}/ns/default/sa/payments"


@pytest.fixture(scope="module")
def cas() -> tuple[CA, CA]:
    root = pki.new_root(TD)
    return root, pki.new_intermediate(root)


@pytest.fixture(scope="module")
def other_root() -> CA:
    return pki.new_root(OTHER_TD)


class Files:
    def __init__(self, directory: Path, names: LayoutFiles) -> None:
        self.cert = directory / names.cert
        self.key = directory / names.key
        self.bundle = directory / names.bundle

    def load(self, **kwargs: object) -> Identity:
        return load_identity(self.cert, self.key, self.bundle, **kwargs)  # type: ignore[arg-type]


def write(directory: Path, svid: Svid, bundle: list[x509.Certificate],
          layout: Layout = Layout.SPIFFE_HELPER, key_format: KeyFormat = KeyFormat.PKCS8) -> Files:
    return Files(directory, pki.write_svid(directory, svid, bundle, layout,
                                           key_format=key_format))


@pytest.fixture
def svid(cas: tuple[CA, CA]) -> Svid:
    return pki.issue_svid(cas[1], WORKLOAD)


@pytest.fixture
def files(tmp_path: Path, svid: Svid, cas: tuple[CA, CA]) -> Files:
    return write(tmp_path / "svid", svid, [cas[0].cert])


def problems_of(files: Files, **kwargs: object) -> tuple[Problem, ...]:
    with pytest.raises(ProblemsError) as caught:
        files.load(**kwargs)
    assert caught.value.problems, "ProblemsError without a problem"
    for p in caught.value.problems:
        assert p.where in str(caught.value)  # str() lists every one with its file
    return caught.value.problems


def only_about(problems: tuple[Problem, ...], path: Path) -> Problem:
    """The problems name `path`, and only it; returns the first."""
    assert {p.where for p in problems} == {str(path)}, problems
    return problems[0]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _now() -> datetime:
    return datetime.now(UTC)


# --- a good set ---------------------------------------------------------------------------


def test_good_set_loads(files: Files, svid: Svid, cas: tuple[CA, CA]) -> None:
    root, inter = cas
    identity = files.load()
    assert str(identity.spiffe_id) == WORKLOAD
    assert identity.trust_domain == TD
    assert identity.serial == svid.serial
    assert identity.not_after == svid.not_after
    assert identity.leaf == svid.cert
    assert identity.intermediates == (inter.cert,)
    assert x509.load_pem_x509_certificates(identity.chain_pem) == [svid.cert, inter.cert]
    assert list(identity.bundles) == [TD]
    assert identity.own_bundle.trust_domain == TD
    assert identity.own_bundle.cas == (root.cert,)
    assert identity.own_bundle.ders == {der(root.cert)}
    # The key is the SVID's key, usable as is...
    key = serialization.load_pem_private_key(identity.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.private_numbers() == svid.key.private_numbers()  # type: ignore[union-attr]
    # ...and never shown.
    shown = repr(identity) + str(identity)
    assert "PRIVATE KEY" not in shown
    assert identity.key_pem.decode() not in shown


def test_version_tells_snapshots_apart(files: Files, cas: tuple[CA, CA]) -> None:
    first, again = files.load(), files.load()
    assert first.version == again.version
    write(files.cert.parent, pki.issue_svid(cas[1], WORKLOAD), [cas[0].cert])
    assert files.load().version != first.version


@pytest.mark.parametrize("key_format", [KeyFormat.PKCS8, KeyFormat.SEC1])
@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_key_formats_load(tmp_path: Path, cas: tuple[CA, CA], key_format: KeyFormat,
                          key_type: KeyType) -> None:
    svid = pki.issue_svid(cas[1], WORKLOAD, key_type=key_type)
    files = write(tmp_path, svid, [cas[0].cert], key_format=key_format)
    marker = {KeyFormat.PKCS8: b"-----BEGIN PRIVATE KEY-----",
              KeyFormat.SEC1: (b"-----BEGIN RSA PRIVATE KEY-----" if key_type is KeyType.RSA_2048
                               else b"-----BEGIN EC PRIVATE KEY-----")}[key_format]
    assert files.key.read_bytes().startswith(marker)  # the format under test is on disk
    identity = files.load()
    assert identity.serial == svid.serial
    loaded = serialization.load_pem_private_key(identity.key_pem, None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert loaded.public_key().public_bytes(serialization.Encoding.DER, spki) == \
        svid.cert.public_key().public_bytes(serialization.Encoding.DER, spki)


def test_ed25519_key_loads(tmp_path: Path, cas: tuple[CA, CA]) -> None:
    svid = pki.issue_svid(cas[1], WORKLOAD, key_type=KeyType.ED25519)
    assert write(tmp_path, svid, [cas[0].cert]).load().serial == svid.serial


@pytest.mark.parametrize("layout", [Layout.K8S, Layout.CSI])
def test_other_layouts_load(tmp_path: Path, svid: Svid, cas: tuple[CA, CA],
                            layout: Layout) -> None:
    files = write(tmp_path, svid, [cas[0].cert], layout)
    if layout is Layout.K8S:
        # Every visible name is a symlink through ..data into a timestamped directory.
        for path in (files.cert, files.key, files.bundle):
            assert path.is_symlink()
            assert str(path.readlink()).startswith("..data/")
        assert (tmp_path / "..data").is_symlink()
    assert files.load().serial == svid.serial


def test_k8s_data_swap_loads_the_new_set(tmp_path: Path, svid: Svid, cas: tuple[CA, CA]) -> None:
    files = write(tmp_path, svid, [cas[0].cert], Layout.K8S)
    assert files.load().serial == svid.serial
    rotated = pki.issue_svid(cas[1], WORKLOAD)
    write(tmp_path, rotated, [cas[0].cert], Layout.K8S)
    identity = files.load()
    assert identity.serial == rotated.serial  # key and cert of the same new set
    assert identity.leaf == rotated.cert


# --- a bad file, named ----------------------------------------------------------------------

FILE_ROLES = ["cert", "key", "bundle"]


@pytest.mark.parametrize("role", FILE_ROLES)
def test_missing_file(files: Files, role: str) -> None:
    path: Path = getattr(files, role)
    path.unlink()
    problem = only_about(problems_of(files), path)
    assert "not found" in problem.message


@pytest.mark.parametrize("role", FILE_ROLES)
@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["empty", "blank"])
def test_empty_file(files: Files, role: str, content: bytes) -> None:
    path: Path = getattr(files, role)
    path.write_bytes(content)
    problem = only_about(problems_of(files), path)
    assert "empty" in problem.message


def test_every_bad_file_is_reported_at_once(files: Files) -> None:
    files.key.write_bytes(b"")
    files.bundle.unlink()
    problems = problems_of(files)
    assert {p.where for p in problems} == {str(files.key), str(files.bundle)}


@pytest.mark.parametrize("role", FILE_ROLES)
def test_truncated_pem(files: Files, role: str) -> None:
    path: Path = getattr(files, role)
    data = path.read_bytes()
    first_block = data.index(b"-----END ")
    path.write_bytes(data[: first_block // 2])  # half of the first PEM block
    only_about(problems_of(files), path)


def test_cert_file_cut_inside_the_intermediate(files: Files) -> None:
    data = files.cert.read_bytes()
    end_of_leaf = data.index(b"-----END CERTIFICATE-----\n") + 26
    files.cert.write_bytes(data[: end_of_leaf + (len(data) - end_of_leaf) // 2])
    only_about(problems_of(files), files.cert)


def test_bundle_cut_inside_its_second_ca(tmp_path: Path, svid: Svid, cas: tuple[CA, CA]) -> None:
    second = pki.new_root(TD)  # e.g. a CA rotation: old and new root in one bundle
    files = write(tmp_path, svid, [cas[0].cert, second.cert])
    assert len(files.load().own_bundle.cas) == 2
    data = files.bundle.read_bytes()
    files.bundle.write_bytes(data[: len(data) * 3 // 4])
    only_about(problems_of(files), files.bundle)


def test_new_cert_with_old_key(tmp_path: Path, files: Files, cas: tuple[CA, CA]) -> None:
    # spiffe-helper rewrites svid.pem first: a reader sees the new cert with the old key.
    rotated = pki.issue_svid(cas[1], WORKLOAD)
    files.cert.write_bytes(rotated.chain_pem())
    problems = problems_of(files)
    assert {p.where for p in problems} <= {str(files.cert), str(files.key)}, problems
    assert any("key" in p.message for p in problems)
    # Once the key follows, the set loads again.
    files.key.write_bytes(rotated.key_pem())
    assert files.load().serial == rotated.serial


def test_expired_cert(tmp_path: Path, cas: tuple[CA, CA]) -> None:
    svid = pki.issue_svid(cas[1], WORKLOAD, not_before=_now() - timedelta(hours=2),
                          not_after=_now() - timedelta(hours=1))
    files = write(tmp_path, svid, [cas[0].cert])
    assert "expired" in only_about(problems_of(files), files.cert).message


def test_expiry_is_judged_at_now(files: Files, svid: Svid) -> None:
    assert files.load(now=svid.not_after - timedelta(seconds=1)).serial == svid.serial
    problem = only_about(problems_of(files, now=svid.not_after + timedelta(seconds=1)),
                         files.cert)
    assert "expired" in problem.message


def test_not_yet_valid_cert(tmp_path: Path, cas: tuple[CA, CA]) -> None:
    svid = pki.issue_svid(cas[1], WORKLOAD, not_before=_now() + timedelta(hours=1))
    files = write(tmp_path, svid, [cas[0].cert])
    assert "not valid before" in only_about(problems_of(files), files.cert).message


@pytest.mark.parametrize("how", ["foreign-ca", "missing-intermediate", "bad-signature"])
def test_chain_that_does_not_lead_to_the_bundle(tmp_path: Path, cas: tuple[CA, CA],
                                                 how: str) -> None:
    root, inter = cas
    if how == "foreign-ca":
        svid = pki.issue_svid(pki.new_intermediate(pki.new_root(TD)), WORKLOAD)
    elif how == "missing-intermediate":
        svid = pki.issue_svid(inter, WORKLOAD, include_intermediates=False)
    else:
        svid = pki.issue_svid(inter, WORKLOAD, issuer_key=pki.new_key())
    files = write(tmp_path, svid, [root.cert])
    only_about(problems_of(files), files.cert)


@pytest.mark.parametrize(
    "override",
    [
        {"extra_uris": [f"spiffe://{TD}/second"]},
        {"uris": ()},
        {"uris": ["https://example.org/web"]},
        {"uris": [f"spiffe://{TD}"]},
        {"is_ca": True},
        {"include_key_usage": False},
        {"key_usage": pki.make_key_usage(key_encipherment=True)},
        {"key_usage": pki.make_key_usage(digital_signature=True, key_cert_sign=True)},
        {"eku": ["server"]},
    ],
    ids=["two-uris", "no-uri", "https-uri", "no-path", "ca-leaf", "no-key-usage",
         "no-digital-signature", "key-cert-sign", "server-auth-only"],
)
def test_leaf_breaking_svid_rules(tmp_path: Path, cas: tuple[CA, CA],
                                  override: dict[str, object]) -> None:
    svid = pki.issue_svid(cas[1], WORKLOAD, **override)  # type: ignore[arg-type]
    files = write(tmp_path, svid, [cas[0].cert])
    assert "X.509-SVID" in only_about(problems_of(files), files.cert).message


def test_rsa_1024_key(tmp_path: Path, cas: tuple[CA, CA]) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    files = write(tmp_path, pki.issue_svid(cas[1], WORKLOAD, key=weak), [cas[0].cert])
    assert "1024" in only_about(problems_of(files), files.key).message


def test_encrypted_key(files: Files, svid: Svid) -> None:
    files.key.write_bytes(svid.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    only_about(problems_of(files), files.key)


def test_bundle_with_a_non_ca_certificate(tmp_path: Path, svid: Svid, cas: tuple[CA, CA]) -> None:
    files = write(tmp_path, svid, [cas[0].cert, pki.issue_svid(cas[1], WORKLOAD).cert])
    assert "not a CA" in only_about(problems_of(files), files.bundle).message


# --- federation ------------------------------------------------------------------------------


def test_federated_bundles_are_kept_per_trust_domain(
    tmp_path: Path, files: Files, cas: tuple[CA, CA], other_root: CA
) -> None:
    third = pki.new_root("third.org")
    (tmp_path / "other.pem").write_bytes(pki.certs_pem([other_root.cert]))
    (tmp_path / "third.pem").write_bytes(pki.certs_pem([third.cert]))
    identity = files.load(federated={OTHER_TD: tmp_path / "other.pem",
                                     "third.org": tmp_path / "third.pem"})
    assert set(identity.bundles) == {TD, OTHER_TD, "third.org"}
    assert identity.bundles[TD].cas == (cas[0].cert,)
    assert identity.bundles[OTHER_TD].cas == (other_root.cert,)
    assert identity.bundles[OTHER_TD].trust_domain == OTHER_TD
    assert identity.bundles["third.org"].ders == {der(third.cert)}
    # Never merged: our trust domain's bundle holds only our anchors.
    assert identity.own_bundle.ders == {der(cas[0].cert)}
    # OpenSSL's one store gets all of them (authn keeps them apart).
    assert set(x509.load_pem_x509_certificates(identity.all_cas_pem())) == \
        {cas[0].cert, other_root.cert, third.cert}


def test_bad_federated_bundle_is_named(tmp_path: Path, files: Files, svid: Svid) -> None:
    bad = tmp_path / "other.pem"
    bad.write_bytes(pki.certs_pem([svid.cert]))  # a leaf is no trust anchor
    only_about(problems_of(files, federated={OTHER_TD: bad}), bad)
    bad.unlink()
    only_about(problems_of(files, federated={OTHER_TD: bad}), bad)


def test_federating_our_own_trust_domain_is_refused(
    tmp_path: Path, files: Files, other_root: CA
) -> None:
    path = tmp_path / "fed.pem"
    path.write_bytes(pki.certs_pem([other_root.cert]))
    problem = only_about(problems_of(files, federated={TD: path}), path)
    assert TD in problem.message


def test_federating_our_own_trust_domain_in_capitals_is_refused(
    tmp_path: Path, files: Files, other_root: CA
) -> None:
    path = tmp_path / "fed.pem"
    path.write_bytes(pki.certs_pem([other_root.cert]))
    only_about(problems_of(files, federated={TD.upper(): path}), path)
