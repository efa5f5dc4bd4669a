"""This workload's identity from disk: SVID, key and trust bundles -> one immutable snapshot.

A snapshot is only built from a set of files that agree with each other: the key matches
the certificate, the certificate is a valid X.509-SVID, its chain leads to our own
bundle, and it is inside its validity window. spiffe-helper rewrites the three files in
place one after another, so a reader can catch a new certificate with the old key; such a
set is refused here, and the caller (reload) keeps the previous snapshot and retries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar import files, spiffe, svid
from sidecar.problems import Problem, ProblemsError

MIN_RSA_BITS = 2048  # SPEC: "RSA >= 2048"


@dataclass(frozen=True, slots=True)
class Bundle:
    """The trust anchors of one trust domain, never mixed with another's."""

    trust_domain: str
    cas: tuple[x509.Certificate, ...]
    ders: frozenset[bytes]  # for "did the verified chain end in this bundle?"
    pem: bytes

    @property
    def earliest_expiry(self) -> dt.datetime:
        return min(c.not_valid_after_utc for c in self.cas)


@dataclass(frozen=True, slots=True)
class Identity:
    spiffe_id: spiffe.SpiffeId
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    chain_pem: bytes  # leaf then intermediates, as OpenSSL wants it
    key_pem: bytes = field(repr=False)  # never in a log or a repr
    bundles: Mapping[str, Bundle]  # by trust domain: ours and the federated ones
    version: str  # short digest of the material, to tell snapshots apart
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    crls_pem: bytes = b""

    @property
    def trust_version(self) -> str:
        """Digest of what decides whom we trust: bundles and CRLs, not our own SVID."""
        digest = hashlib.sha256(self.all_cas_pem() + self.crls_pem)
        return digest.hexdigest()[:12]

    @property
    def trust_domain(self) -> str:
        return self.spiffe_id.trust_domain.name

    @property
    def own_bundle(self) -> Bundle:
        return self.bundles[self.trust_domain]

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    def all_cas_pem(self) -> bytes:
        return b"".join(b.pem for b in self.bundles.values())


def changed_parts(old: object, new: object) -> tuple[str, ...]:
    """What differs between two snapshots, as the `kind` labels of sidecar_reloads_total:
    our SVID (chain or key), a trust bundle, a CRL. Objects only so that sources/watch.py can
    call it on any snapshot."""
    assert isinstance(old, Identity) and isinstance(new, Identity)
    parts = []
    if old.chain_pem != new.chain_pem or old.key_pem != new.key_pem:
        parts.append("svid")
    if old.all_cas_pem() != new.all_cas_pem():
        parts.append("bundle")
    if old.crls_pem != new.crls_pem:
        parts.append("crl")
    return tuple(parts)


def load_identity(
    cert: Path,
    key: Path,
    bundle: Path,
    federated: Mapping[str, Path] | None = None,
    crls: tuple[Path, ...] = (),
    *,
    now: dt.datetime | None = None,
) -> Identity:
    """Read and cross-check the files; ProblemsError names each file and what is wrong."""
    try:
        return _load_identity(cert, key, bundle, federated, crls, now)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if isinstance(exc, ProblemsError):
            raise
        # cryptography parses certificates lazily: a damaged field (subject, public key)
        # only fails when it is first read, deep in the checks (found by fuzzing).
        raise ProblemsError([Problem(str(cert), f"a malformed certificate or key: {exc}")]
                            ) from exc


def _load_identity(
    cert: Path,
    key: Path,
    bundle: Path,
    federated: Mapping[str, Path] | None,
    crls: tuple[Path, ...],
    now: dt.datetime | None,
) -> Identity:
    now = now or dt.datetime.now(dt.UTC)
    problems: list[Problem] = []
    chain = _read_certs(cert, problems)
    key_obj, key_pem = _read_key(key, problems)
    own = _read_bundle(bundle, None, problems)
    if problems or not chain or key_obj is None or own is None:
        raise ProblemsError(problems)
    leaf, intermediates = chain[0], tuple(chain[1:])
    sid = _check_leaf(cert, leaf, key_obj, now, problems)
    if sid is None:
        raise ProblemsError(problems)
    td = sid.trust_domain.name
    own = Bundle(td, own.cas, own.ders, own.pem)
    _check_chain(cert, chain, own, problems)
    bundles: dict[str, Bundle] = {td: own}
    for fed_td, path in (federated or {}).items():
        try:
            fed_td = spiffe.TrustDomain.parse(fed_td).name
        except spiffe.SpiffeIdError as exc:
            problems.append(Problem(str(path), f"federated bundle key: {exc}"))
            continue
        if fed_td == td:
            problems.append(Problem(str(path), f"federates our own trust domain {td}"))
            continue
        fb = _read_bundle(path, fed_td, problems)
        if fb is not None:
            bundles[fed_td] = fb
    issuers = [ca for b in bundles.values() for ca in b.cas] + list(intermediates)
    crl_list = [c for path in crls for c in _read_crl(path, issuers, now, problems)]
    if problems:
        raise ProblemsError(problems)
    crls_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crl_list)
    digest = hashlib.sha256(crls_pem)
    for part in (*(c.public_bytes(serialization.Encoding.DER) for c in chain), key_pem,
                 *(b.pem for b in bundles.values())):
        digest.update(part)
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return Identity(sid, leaf, intermediates, chain_pem, key_pem,
                    MappingProxyType(bundles), digest.hexdigest()[:12], tuple(crl_list), crls_pem)


def _read(path: Path, problems: list[Problem]) -> bytes | None:
    try:
        data = files.read_regular(path)
    except FileNotFoundError:
        problems.append(Problem(str(path), "file not found"))
        return None
    except OSError as exc:
        problems.append(Problem(str(path), f"cannot read: {exc.strerror}"))
        return None
    if not data.strip():
        problems.append(Problem(str(path), "file is empty (still being written?)"))
        return None
    return data


def _read_certs(path: Path, problems: list[Problem]) -> list[x509.Certificate]:
    data = _read(path, problems)
    if data is None:
        return []
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        problems.append(Problem(str(path), f"not a PEM certificate list ({exc}); "
                                           "a truncated or half-written file?"))
        return []
    # cryptography skips a block cut off at the end of the file: a bundle caught mid-write
    # would silently lose a CA. Every block that begins must have become a certificate.
    begun = data.count(b"-----BEGIN CERTIFICATE-----")
    if begun != len(certs):
        problems.append(Problem(str(path), f"{begun} certificate blocks begin but only "
                                           f"{len(certs)} are whole: cut off mid-write?"))
        return []
    return certs


def _read_key(path: Path, problems: list[Problem]) -> tuple[object | None, bytes]:
    data = _read(path, problems)
    if data is None:
        return None, b""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # The message of cryptography never includes key material; keep it that way.
        problems.append(Problem(str(path), f"not an unencrypted PEM private key ({exc})"))
        return None, b""
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        problems.append(Problem(str(path), f"RSA key of {key.key_size} bits; at least "
                                           f"{MIN_RSA_BITS} are required"))
        return None, b""
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
                      | rsa.RSAPrivateKey):
        problems.append(Problem(str(path), f"unsupported key type {type(key).__name__}: "
                                           "use ECDSA P-256/P-384, Ed25519 or RSA"))
        return None, b""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return key, pem


def _read_bundle(path: Path, td: str | None, problems: list[Problem]) -> Bundle | None:
    certs = _read_certs(path, problems)
    if not certs:
        return None
    bad = [p for c in certs for p in svid.ca_problems(c)]
    for p in bad:
        problems.append(Problem(str(path), f"not a CA certificate: {p.message}"))
    if bad:
        return None
    ders = frozenset(c.public_bytes(serialization.Encoding.DER) for c in certs)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return Bundle(td or "", tuple(certs), ders, pem)


def _read_crl(
    path: Path, cas: list[x509.Certificate], now: dt.datetime, problems: list[Problem]
) -> list[x509.CertificateRevocationList]:
    """One PEM CRL per file, signed by a CA we know (a bundle CA, or an intermediate of our
    own chain: leaves are usually revoked by the intermediate that issued them), and not
    past its nextUpdate.

    A stale CRL would make OpenSSL refuse every peer of that CA, so it is refused here
    and the previous CRL stays in force (reload keeps the old snapshot).
    """
    data = _read(path, problems)
    if data is None:
        return []
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        problems.append(Problem(str(path), f"not a PEM CRL ({exc})"))
        return []
    issuers = [ca for ca in cas if ca.subject == crl.issuer]
    if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):  # type: ignore[arg-type]
        problems.append(Problem(str(path), f"CRL issuer '{crl.issuer.rfc4514_string()}' is "
                                           "neither a CA of our trust bundles nor an "
                                           "intermediate of our SVID chain, or the signature "
                                           "does not verify"))
        return []
    nxt = crl.next_update_utc
    if nxt is not None and nxt < now:
        problems.append(Problem(str(path), f"CRL is stale: nextUpdate {nxt:%Y-%m-%dT%H:%M:%SZ}"
                                           " has passed; is the CA still publishing it?"))
        return []
    return [crl]


def _check_leaf(
    path: Path, leaf: x509.Certificate, key: object, now: dt.datetime, problems: list[Problem]
) -> spiffe.SpiffeId | None:
    pub = leaf.public_key()
    if pub.public_bytes(serialization.Encoding.DER,
                        serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        problems.append(Problem(str(path), "the private key does not match this certificate "
                                           "(a rotation caught halfway: cert and key differ)"))
    if now < leaf.not_valid_before_utc:
        problems.append(Problem(str(path), f"not valid before "
                                           f"{leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"))
    if now > leaf.not_valid_after_utc:
        problems.append(Problem(str(path), f"expired at "
                                           f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}; "
                                           "is the SVID issuer still rotating?"))
    try:
        return svid.spiffe_id_of(leaf)
    except svid.SvidError as exc:
        for p in exc.problems:
            problems.append(Problem(str(path), f"not a valid X.509-SVID: {p.message}"))
        return None


def _check_chain(
    path: Path, chain: list[x509.Certificate], bundle: Bundle, problems: list[Problem]
) -> None:
    """Our own chain must lead to our own bundle: a linear walk over our own file."""
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, Exception) as exc:  # InvalidSignature and friends
            problems.append(Problem(str(path), f"certificate '{child.subject.rfc4514_string()}'"
                                               f" is not signed by the next one in the file "
                                               f"({type(exc).__name__})"))
            return
    top = chain[-1]
    for ca in bundle.cas:
        if ca.subject != top.issuer:
            continue
        try:
            top.verify_directly_issued_by(ca)
            return
        except Exception:
            continue
    problems.append(Problem(str(path), f"the chain does not lead to the trust bundle: "
                                       f"'{top.issuer.rfc4514_string()}' is not in it "
                                       "(missing intermediate, or bundle from another CA)"))
