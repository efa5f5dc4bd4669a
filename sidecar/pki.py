"""A development PKI: root and intermediate CAs, X.509-SVIDs, CRLs, and the on-disk layouts.

Three users share it. The CLI (`sidecar pki init|issue|rotate`) and the demo need good
certificates. The test suite needs deliberately bad ones, so `issue_svid` has a keyword for
every X.509-SVID rule a test may want to break (expired, not yet valid, no URI SAN, two URI
SANs, a CA leaf, no digitalSignature, a forged signature, a missing intermediate). Nothing
here checks the SVID rules: that is `spiffe.py`'s job, and this module must be able to
build what that one rejects.

Chains. A `CA` carries `chain`: the intermediates *above* it, nearest first, never the
root. A root and an intermediate signed by the root both have `chain == ()`; an
intermediate under that one has `chain == (parent,)`. `CA.intermediates` is what a
certificate issued by the CA sends after itself (the CA and its chain; nothing for a root),
so `Svid.chain_pem()` is always leaf, then intermediates, never the root: a root sent on
the wire is at best ignored and at worst trusted by a careless peer.

Files. `write_svid` reproduces the three layouts the proxy must accept, including the way
each one updates, because the proxy's reload code is tested against exactly those races.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

type PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# Every certificate starts this far in the past: hosts' clocks differ, and a certificate
# that is "not yet valid" on a peer whose clock lags by a few seconds fails the handshake.
# SPIRE backdates by 10 s; 5 min also covers a VM that just resumed from suspend.
CLOCK_SKEW_BACKDATE = timedelta(minutes=5)

DEFAULT_ROOT_TTL = timedelta(days=365)
DEFAULT_INTERMEDIATE_TTL = timedelta(days=90)
# An hour, as SPIRE's default X509-SVID TTL: short enough that rotation is exercised.
DEFAULT_SVID_TTL = timedelta(hours=1)

# Leaves carry O=SPIFFE rather than an empty subject: an empty subject forces the SAN
# extension to be critical (RFC 5280 4.2.1.6), and some tools print empty subjects badly.
SVID_SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])

# RFC 5280 caps a commonName at 64 characters; cryptography enforces it.
_MAX_COMMON_NAME = 64


class PkiError(Exception):
    """A dev-PKI operation failed; the message says what to do next."""


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    ED25519 = "ed25519"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"


class KeyFormat(StrEnum):
    PKCS8 = "pkcs8"
    # OpenSSL's "traditional" form: SEC1 (`EC PRIVATE KEY`) for EC, PKCS#1 for RSA.
    SEC1 = "sec1"


class Layout(StrEnum):
    SPIFFE_HELPER = "spiffe-helper"
    CSI = "csi"
    K8S = "k8s"

    @property
    def files(self) -> LayoutFiles:
        if self is Layout.CSI:
            return LayoutFiles(cert="tls.crt", key="tls.key", bundle="ca.crt")
        return LayoutFiles(cert="svid.pem", key="svid_key.pem", bundle="bundle.pem")


@dataclass(frozen=True, slots=True)
class LayoutFiles:
    """The visible file names of a layout."""

    cert: str  # leaf followed by intermediates
    key: str
    bundle: str  # trust anchors


def new_key(kind: KeyType = KeyType.EC_P256) -> PrivateKey:
    match kind:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.ED25519:
            return ed25519.Ed25519PrivateKey.generate()
        case KeyType.RSA_2048:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case KeyType.RSA_3072:
            return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def new_serial() -> int:
    """A random positive 128-bit serial (RFC 5280 allows 20 octets; CAB BR want 64+ bits)."""
    return secrets.randbits(127) | (1 << 127)


def key_pem(key: PrivateKey, fmt: KeyFormat | str = KeyFormat.PKCS8) -> bytes:
    match KeyFormat(fmt):
        case KeyFormat.PKCS8:
            form = serialization.PrivateFormat.PKCS8
        case KeyFormat.SEC1:
            if isinstance(key, ed25519.Ed25519PrivateKey):
                raise ValueError("Ed25519 keys have no SEC1/traditional form; use pkcs8")
            form = serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def certs_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def make_key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """A KeyUsage with only the named bits, for tests that need an unusual one."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True, slots=True)
class CA:
    """A CA certificate with its key.

    `chain`: the intermediates above this CA, nearest first, excluding the root (so `()` for
    a root and for an intermediate signed by the root). `root`: the root it chains to, or
    None when this CA is the root.
    """

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()
    root: x509.Certificate | None = None

    @property
    def is_root(self) -> bool:
        return self.root is None

    @property
    def trust_anchor(self) -> x509.Certificate:
        """The root to put in a bundle for anything this CA issues."""
        return self.cert if self.root is None else self.root

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """What a certificate issued by this CA sends after itself."""
        return () if self.is_root else (self.cert, *self.chain)

    @property
    def trust_domain(self) -> str:
        return trust_domain_of(self.cert)

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc


@dataclass(frozen=True, slots=True)
class Svid:
    cert: x509.Certificate
    key: PrivateKey
    intermediates: tuple[x509.Certificate, ...] = ()

    def chain_pem(self) -> bytes:
        """Leaf then intermediates: what `svid.pem` holds."""
        return certs_pem((self.cert, *self.intermediates))

    def key_pem(self, format: KeyFormat | str = KeyFormat.PKCS8) -> bytes:
        return key_pem(self.key, format)

    @property
    def spiffe_id(self) -> str:
        """The first spiffe:// URI SAN, or "" when there is none (a deliberately bad SVID)."""
        uris = _uri_sans(self.cert)
        return next((u for u in uris if u.lower().startswith("spiffe://")), "")

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc


def trust_domain_of(cert: x509.Certificate) -> str:
    """The trust domain of the cert's spiffe:// URI SAN, lowercased; "" when it has none."""
    for uri in _uri_sans(cert):
        parts = urlsplit(uri)
        if parts.scheme.lower() == "spiffe" and parts.hostname:
            return parts.hostname.lower()
    return ""


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


# --- issuing ---------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # Ed25519 hashes internally; cryptography requires None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()  # match the hash strength to the curve (RFC 5480 4)
    return hashes.SHA256()


def _aki_for(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_name(trust_domain: str, role: str, name: str | None) -> x509.Name:
    if name is None:
        # A random tag keeps two dev CAs from ever sharing a subject: OpenSSL finds
        # issuers by subject name first, and a test with a "foreign" CA of the same trust
        # domain should fail as unknown_ca, not on a lookup that picked the wrong one.
        tag = secrets.token_hex(4)
        name = f"{trust_domain} {role} CA {tag}"
        if len(name) > _MAX_COMMON_NAME:
            name = f"{role} CA {tag}"
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )


def _check_trust_domain(trust_domain: str) -> None:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789.-_")
    if not trust_domain or len(trust_domain) > 255 or not set(trust_domain) <= allowed:
        raise ValueError(
            f"bad trust domain {trust_domain!r}: use lowercase letters, digits, '.', '-' and "
            "'_' only, without spiffe:// or a path (e.g. example.org)"
        )


def _sign_ca(
    *,
    subject: x509.Name,
    key: PrivateKey,
    issuer: CA | None,
    trust_domain: str,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None,
) -> x509.Certificate:
    issuer_name = subject if issuer is None else issuer.cert.subject
    signer = key if issuer is None else issuer.key
    ku = make_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        # SPIRE puts the trust domain ID on its CAs; load_ca_dir reads it back from here.
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    if issuer is not None:
        builder = builder.add_extension(_aki_for(issuer.cert), critical=False)
    else:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        builder = builder.add_extension(aki, critical=False)
    return builder.sign(signer, _hash_for(signer))


def new_root(
    trust_domain: str,
    *,
    key_type: KeyType = KeyType.EC_P256,
    ttl: timedelta = DEFAULT_ROOT_TTL,
    now: datetime | None = None,
    name: str | None = None,
) -> CA:
    _check_trust_domain(trust_domain)
    now = now or _utcnow()
    key = new_key(key_type)
    cert = _sign_ca(
        subject=_ca_name(trust_domain, "root", name),
        key=key,
        issuer=None,
        trust_domain=trust_domain,
        not_before=now - CLOCK_SKEW_BACKDATE,
        not_after=now + ttl,
        path_length=None,
    )
    return CA(cert=cert, key=key)


def new_intermediate(
    parent: CA,
    *,
    key_type: KeyType = KeyType.EC_P256,
    ttl: timedelta = DEFAULT_INTERMEDIATE_TTL,
    now: datetime | None = None,
    name: str | None = None,
    path_length: int | None = 0,
) -> CA:
    """An intermediate under `parent`; its notAfter never outlives the parent's.

    pathLen 0 (the default) lets it sign only leaves; nest intermediates by giving the
    upper one `path_length=1` (or None for unlimited).
    """
    now = now or _utcnow()
    td = parent.trust_domain
    key = new_key(key_type)
    cert = _sign_ca(
        subject=_ca_name(td, "intermediate", name),
        key=key,
        issuer=parent,
        trust_domain=td,
        not_before=now - CLOCK_SKEW_BACKDATE,
        not_after=min(now + ttl, parent.cert.not_valid_after_utc),
        path_length=path_length,
    )
    return CA(cert=cert, key=key, chain=parent.intermediates, root=parent.trust_anchor)


_EKU_NAMES: dict[str, x509.ObjectIdentifier] = {
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
}


def _eku(names: Sequence[str | x509.ObjectIdentifier]) -> x509.ExtendedKeyUsage:
    oids: list[x509.ObjectIdentifier] = []
    for n in names:
        if isinstance(n, x509.ObjectIdentifier):
            oids.append(n)
        elif n in _EKU_NAMES:
            oids.append(_EKU_NAMES[n])
        else:
            raise ValueError(f"unknown EKU {n!r}: use 'server', 'client' or an ObjectIdentifier")
    return x509.ExtendedKeyUsage(oids)


def _leaf_key_usage(key: PrivateKey) -> x509.KeyUsage:
    # RSA key exchange (TLS 1.2 RSA kx) needs keyEncipherment; ECDHE suites never do.
    return make_key_usage(
        digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey)
    )


def issue_svid(
    ca: CA,
    spiffe_id: str,
    *,
    ttl: timedelta = DEFAULT_SVID_TTL,
    dns: Sequence[str] = (),
    key_type: KeyType = KeyType.EC_P256,
    key: PrivateKey | None = None,
    now: datetime | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extra_uris: Sequence[str] = (),
    uris: Sequence[str] | None = None,
    is_ca: bool = False,
    key_usage: x509.KeyUsage | None = None,
    include_key_usage: bool = True,
    eku: Sequence[str | x509.ObjectIdentifier] | None = ("server", "client"),
    include_intermediates: bool = True,
    issuer_key: PrivateKey | None = None,
) -> Svid:
    """Issue an X.509-SVID from `ca`; the defaults make a valid one.

    Overrides, each for a deliberately bad SVID: `not_before`/`not_after` (absolute times;
    without `not_after`, notAfter is now+ttl capped at the CA's notAfter), `uris` (replaces
    every URI SAN, so `()` means none), `extra_uris` (adds to the SPIFFE ID), `is_ca`,
    `key_usage`/`include_key_usage`, `eku` (None: no EKU extension), `include_intermediates`
    (False: the leaf alone), `issuer_key` (sign with another key while naming `ca` as the
    issuer: a bad signature), `key` (reuse a key, e.g. a cert that no longer matches).
    """
    now = now or _utcnow()
    key = key or new_key(key_type)
    signer = issuer_key or ca.key
    nb = not_before if not_before is not None else now - CLOCK_SKEW_BACKDATE
    na = not_after if not_after is not None else min(now + ttl, ca.cert.not_valid_after_utc)
    uri_list = tuple(uris) if uris is not None else (spiffe_id, *extra_uris)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uri_list]
    names += [x509.DNSName(d) for d in dns]

    builder = (
        x509.CertificateBuilder()
        .subject_name(SVID_SUBJECT)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(_aki_for(ca.cert), critical=False)
    )
    if include_key_usage:
        builder = builder.add_extension(
            key_usage if key_usage is not None else _leaf_key_usage(key), critical=True
        )
    if eku is not None:
        builder = builder.add_extension(_eku(eku), critical=False)
    if names:  # an empty SAN extension is invalid (RFC 5280): leave it out instead
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signer, _hash_for(signer))
    return Svid(cert=cert, key=key, intermediates=ca.intermediates if include_intermediates else ())


def issue_crl(
    ca: CA,
    revoked_serials: Iterable[int],
    *,
    next_update: timedelta = timedelta(hours=1),
    now: datetime | None = None,
    number: int | None = None,
) -> x509.CertificateRevocationList:
    """A CRL from `ca` listing `revoked_serials`.

    `number` (the CRLNumber, RFC 5280 5.2.3, which must grow) defaults to the Unix time, so
    CRLs issued later by the same CA always carry larger numbers.
    """
    now = now or _utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW_BACKDATE)  # same clock-skew reason as certificates
        .next_update(now + next_update)
        .add_extension(_aki_for(ca.cert), critical=False)
        .add_extension(x509.CRLNumber(int(now.timestamp()) if number is None else number), False)
    )
    for serial in revoked_serials:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - CLOCK_SKEW_BACKDATE)
            .build()
        )
        builder = builder.add_revoked_certificate(revoked)
    return builder.sign(ca.key, _hash_for(ca.key))


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    _write_atomic(path, crl_pem(crl), 0o644)


# --- writing files ---------------------------------------------------------------------


def _write_in_place(path: Path, data: bytes, mode: int) -> None:
    """Truncate and rewrite the same inode, as spiffe-helper does (readers see the gap)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask narrowed a new file; an old one kept its mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a temp file beside `path` and rename it over: readers see old or new, whole."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # a crash after the rename must not leave an empty file behind it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_K8S_DATA = "..data"
_K8S_DATA_TMP = "..data_tmp"


def _new_timestamped_dir(out: Path) -> Path:
    # kubelet's AtomicWriter names them `..2006_01_02_15_04_05.<random digits>`.
    for _ in range(100):
        stamp = _utcnow().strftime("..%Y_%m_%d_%H_%M_%S.")
        path = out / f"{stamp}{secrets.randbelow(10**9):09d}"
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            continue
        path.chmod(0o755)
        return path
    raise PkiError(f"{out}: could not create a fresh timestamped directory")


def _write_k8s(out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Update like kubelet: new dir, then one atomic rename of the `..data` symlink."""
    for name in files:  # check before touching anything
        visible = out / name
        if visible.exists(follow_symlinks=False) and not visible.is_symlink():
            raise PkiError(
                f"{visible} is a regular file; the k8s layout makes every name a symlink into "
                "..data/, so write it to a directory of its own"
            )
    data_link = out / _K8S_DATA
    old = os.readlink(data_link) if data_link.is_symlink() else None
    new_dir = _new_timestamped_dir(out)
    for name, (content, mode) in files.items():
        _write_in_place(new_dir / name, content, mode)  # no reader can see this dir yet
    tmp_link = out / _K8S_DATA_TMP
    tmp_link.unlink(missing_ok=True)  # left over from an interrupted update
    tmp_link.symlink_to(new_dir.name)
    os.replace(tmp_link, data_link)  # the one atomic step: every name flips at once
    for name in files:
        visible = out / name
        if not visible.is_symlink():
            visible.symlink_to(f"{_K8S_DATA}/{name}")
    # Only ever delete a sibling `..` dir we could have made, never what a link points to.
    if old and old != new_dir.name and "/" not in old and old.startswith(".."):
        shutil.rmtree(out / old, ignore_errors=True)


def write_svid(
    out: Path,
    svid: Svid,
    bundle: Sequence[x509.Certificate],
    layout: Layout = Layout.SPIFFE_HELPER,
    *,
    key_format: KeyFormat | str = KeyFormat.PKCS8,
) -> LayoutFiles:
    """Write the SVID, its key (mode 0600) and the bundle into `out`, the layout's way.

    spiffe-helper: each file truncated and rewritten in place, cert, then key, then bundle.
    csi: each file atomically (temp + rename). k8s: a new timestamped dir and an atomic
    swap of the `..data` symlink, the old dir removed after.
    """
    out.mkdir(parents=True, exist_ok=True)
    names = layout.files
    files = {
        names.cert: (svid.chain_pem(), 0o644),
        names.key: (svid.key_pem(key_format), 0o600),
        names.bundle: (certs_pem(bundle), 0o644),
    }
    if layout is Layout.K8S:
        _write_k8s(out, files)
    else:
        write = _write_in_place if layout is Layout.SPIFFE_HELPER else _write_atomic
        for name, (content, mode) in files.items():
            write(out / name, content, mode)
    return names


# --- the on-disk dev CA ----------------------------------------------------------------

ROOT_CERT = "root.pem"
ROOT_KEY = "root_key.pem"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate_key.pem"
_CA_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY)


def _init_hint(directory: Path) -> str:
    return f"run `sidecar pki init --dir {directory} --trust-domain TD` first"


def init_ca_dir(
    directory: Path,
    trust_domain: str,
    *,
    key_type: KeyType = KeyType.EC_P256,
    force: bool = False,
    now: datetime | None = None,
) -> tuple[CA, CA]:
    """Create a root and an intermediate in `directory`; returns (root, intermediate).

    A directory this creates gets mode 0700 (it holds CA keys); an existing one keeps its
    mode, since it may be the user's working directory.
    """
    present = [n for n in _CA_FILES if (directory / n).exists(follow_symlinks=False)]
    if present and not force:
        raise PkiError(
            f"{directory} already holds a CA ({', '.join(present)}); refusing to overwrite it, "
            "since every SVID it issued would stop verifying. Use --force to replace it."
        )
    root = new_root(trust_domain, key_type=key_type, now=now)
    intermediate = new_intermediate(root, key_type=key_type, now=now)
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        directory.chmod(0o700)  # mkdir's mode is narrowed by the umask, never widened
    # Keys first: a crash in between leaves keys without certs, which load_ca_dir reports,
    # never a certificate whose key is lost.
    _write_atomic(directory / ROOT_KEY, key_pem(root.key), 0o600)
    _write_atomic(directory / INTERMEDIATE_KEY, key_pem(intermediate.key), 0o600)
    _write_atomic(directory / ROOT_CERT, certs_pem([root.cert]), 0o644)
    _write_atomic(directory / INTERMEDIATE_CERT, certs_pem([intermediate.cert]), 0o644)
    return root, intermediate


def _load_pair(
    directory: Path, cert_name: str, key_name: str
) -> tuple[x509.Certificate, PrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / cert_name).read_bytes())
    except ValueError as e:
        raise PkiError(f"{directory / cert_name}: not a PEM certificate ({e})") from e
    try:
        key = serialization.load_pem_private_key((directory / key_name).read_bytes(), None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"{directory / key_name}: not an unencrypted PEM private key ({e})") from e
    supported = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
    if not isinstance(key, supported):
        raise PkiError(f"{directory / key_name}: unsupported key type {type(key).__name__}")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise PkiError(f"{directory / key_name} is not the key of {directory / cert_name}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PkiError(f"{directory / cert_name} is not a CA certificate (no cA=true)")
    return cert, key


def load_ca_dir(directory: Path) -> tuple[CA, CA]:
    """Load (root, intermediate) written by `init_ca_dir`, with errors that say what to do."""
    if not directory.is_dir():
        raise PkiError(f"{directory} is not a directory; {_init_hint(directory)}")
    missing = [n for n in _CA_FILES if not (directory / n).is_file()]
    if missing:
        raise PkiError(
            f"{directory} is not a CA directory (missing {', '.join(missing)}); "
            f"{_init_hint(directory)}"
        )
    root_cert, root_key = _load_pair(directory, ROOT_CERT, ROOT_KEY)
    int_cert, int_key = _load_pair(directory, INTERMEDIATE_CERT, INTERMEDIATE_KEY)
    if not trust_domain_of(root_cert):
        raise PkiError(
            f"{directory / ROOT_CERT} has no spiffe:// URI SAN, so its trust domain is "
            "unknown; re-create the CA with `sidecar pki init --force`"
        )
    try:
        int_cert.verify_directly_issued_by(root_cert)
    except Exception as e:  # ValueError, TypeError or InvalidSignature: all mean "not ours"
        raise PkiError(
            f"{directory / INTERMEDIATE_CERT} was not issued by {directory / ROOT_CERT}; "
            "the directory mixes two CAs: re-create it with `sidecar pki init --force`"
        ) from e
    root = CA(cert=root_cert, key=root_key)
    return root, CA(cert=int_cert, key=int_key, chain=(), root=root_cert)


# --- command functions (the CLI parses arguments and calls these) ----------------------


def _fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _id_problem(spiffe_id: str, trust_domain: str) -> str | None:
    """A light check so the dev CA never issues another trust domain's ID.

    The full SPIFFE-ID grammar lives in spiffe.py; this only stops the mistakes a user of
    `pki issue` makes.
    """
    if not spiffe_id.lower().startswith("spiffe://"):
        return f"{spiffe_id!r} is not a SPIFFE ID: it must start with spiffe://"
    authority, _, path = spiffe_id[len("spiffe://") :].partition("/")
    if authority.lower() != trust_domain:
        return (
            f"{spiffe_id} belongs to trust domain {authority!r}, but this CA is for "
            f"{trust_domain!r}; issue spiffe://{trust_domain}/... or use that domain's CA"
        )
    if not path:
        return (
            f"{spiffe_id} names the trust domain, not a workload; add a path, e.g. "
            f"spiffe://{trust_domain}/ns/default/sa/web"
        )
    return None


def _error(command: str, message: str) -> int:
    print(f"sidecar pki {command}: error: {message}", file=sys.stderr)
    return 1


def cmd_init(dir: Path, trust_domain: str, *, force: bool = False) -> int:
    try:
        root, intermediate = init_ca_dir(dir, trust_domain, force=force)
    except (PkiError, ValueError, OSError) as e:
        return _error("init", str(e))
    print(f"created a dev CA for trust domain {trust_domain} in {dir}")
    print(f"  root:         {dir / ROOT_CERT} (not after {_fmt_time(root.not_after)})")
    print(
        f"  intermediate: {dir / INTERMEDIATE_CERT} (not after {_fmt_time(intermediate.not_after)})"
    )
    print(f"  give peers {dir / ROOT_CERT} as their bundle; keep the *_key.pem files private")
    return 0


def _prepare(command: str, dir: Path, spiffe_id: str) -> CA | int:
    try:
        _, intermediate = load_ca_dir(dir)
    except (PkiError, OSError) as e:
        return _error(command, str(e))
    problem = _id_problem(spiffe_id, intermediate.trust_domain)
    if problem:
        return _error(command, problem)
    return intermediate


class Broken(StrEnum):
    """`sidecar pki issue --broken KIND`: an SVID with one thing wrong, on purpose, so a user
    can watch each failure reason happen (README, "When a handshake fails")."""

    EXPIRED = "expired"  # cert_expired
    NOT_YET_VALID = "not-yet-valid"  # cert_not_yet_valid (by 2 min: "check the clocks")
    NO_URI_SAN = "no-uri-san"  # invalid_svid
    TWO_URI_SANS = "two-uri-sans"  # invalid_svid
    CA_LEAF = "ca-leaf"  # invalid_svid
    BAD_SIGNATURE = "bad-signature"  # bad_signature
    NO_INTERMEDIATE = "no-intermediate"  # missing_intermediate
    FOREIGN_CA = "foreign-ca"  # unknown_ca: signed by a new CA nobody trusts


def _broken_overrides(kind: Broken, ca: CA, spiffe_id: str) -> dict[str, object]:
    now = datetime.now(UTC)
    match kind:
        case Broken.EXPIRED:
            return {"not_before": now - timedelta(hours=2), "not_after": now - timedelta(hours=1)}
        case Broken.NOT_YET_VALID:
            return {"not_before": now + timedelta(minutes=2),
                    "not_after": now + timedelta(hours=1)}
        case Broken.NO_URI_SAN:
            return {"uris": ()}
        case Broken.TWO_URI_SANS:
            return {"extra_uris": (spiffe_id + "-twin",)}
        case Broken.CA_LEAF:
            return {"is_ca": True}
        case Broken.BAD_SIGNATURE:
            return {"issuer_key": new_key()}
        case Broken.NO_INTERMEDIATE:
            return {"include_intermediates": False}
        case Broken.FOREIGN_CA:
            return {}
    return {}


def _issue_into(
    ca: CA, spiffe_id: str, out: Path, ttl: timedelta, dns: Sequence[str], layout: Layout,
    broken: Broken | None = None,
) -> Svid:
    bundle = [ca.trust_anchor]
    if broken is Broken.FOREIGN_CA:
        td = trust_domain_of(ca.trust_anchor)
        ca = new_intermediate(new_root(td))  # the bundle written stays the real one
    overrides = _broken_overrides(broken, ca, spiffe_id) if broken else {}
    svid = issue_svid(ca, spiffe_id, ttl=ttl, dns=dns, **overrides)  # type: ignore[arg-type]
    write_svid(out, svid, bundle, layout)
    return svid


def cmd_issue(
    dir: Path,
    spiffe_id: str,
    out: Path,
    ttl: timedelta,
    dns: Sequence[str],
    layout: Layout = Layout.SPIFFE_HELPER,
    broken: Broken | None = None,
) -> int:
    ca = _prepare("issue", dir, spiffe_id)
    if isinstance(ca, int):
        return ca
    try:
        svid = _issue_into(ca, spiffe_id, out, ttl, dns, layout, broken)
    except (PkiError, ValueError, OSError) as e:
        return _error("issue", str(e))
    f = layout.files
    print(
        f"issued {spiffe_id} serial {svid.serial:#x} not after {_fmt_time(svid.not_after)} "
        f"into {out} ({f.cert}, {f.key}, {f.bundle})"
        + (f", broken on purpose: {broken}" if broken else "")
    )
    return 0


def cmd_rotate(
    dir: Path,
    spiffe_id: str,
    out: Path,
    every: float,
    ttl: timedelta,
    dns: Sequence[str],
    layout: Layout = Layout.SPIFFE_HELPER,
    count: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Issue now, then again every `every` seconds with a fresh key each time.

    Stops after `count` rotations, when `stop` is set, or on Ctrl-C (exit 0 in all three).
    """
    if every <= 0 or (count is not None and count < 1):
        return _error("rotate", "--every must be positive and the count at least 1")
    ca = _prepare("rotate", dir, spiffe_id)
    if isinstance(ca, int):
        return ca
    stop = stop or threading.Event()
    done = 0
    try:
        while True:
            svid = _issue_into(ca, spiffe_id, out, ttl, dns, layout)
            done += 1
            print(
                f"rotation {done}: {spiffe_id} serial {svid.serial:#x} "
                f"not after {_fmt_time(svid.not_after)}",
                flush=True,  # the demo and tests read this line as it happens
            )
            if (count is not None and done >= count) or stop.wait(every):
                break
    except KeyboardInterrupt:
        print(f"stopped after {done} rotations")
    except (PkiError, ValueError, OSError) as e:
        return _error("rotate", str(e))
    return 0
