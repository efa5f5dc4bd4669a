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


@dataclass(frozen=True, slots=True)
class Material:
    """An identity as parsed DER, before any check: what a Workload API response carries
    (SVID chain and PKCS#8 key, our bundle, federated bundles by trust domain, CRLs), and
    `where` each part came from, for the problems."""

    where: str  # the SVID and its key
    chain: bytes  # DER certificates, leaf first, concatenated
    key: bytes  # PKCS#8 DER
    bundle: bytes  # DER CA certificates, concatenated
    federated: Mapping[str, bytes] = field(default_factory=dict)  # trust domain -> DER CAs
    crls: tuple[bytes, ...] = ()  # DER


def identity_from_der(material: Material, *, now: dt.datetime | None = None) -> Identity:
    """The same checks as files get, on DER; ProblemsError says what is wrong where."""
    where = material.where
    try:
        problems: list[Problem] = []
        chain = der_certs(where, material.chain, problems)
        own = der_certs(f"{where}: bundle", material.bundle, problems)
        try:
            key_obj = serialization.load_der_private_key(material.key, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            problems.append(Problem(where, f"not a PKCS#8 DER private key ({exc})"))
            key_obj = None
        if problems or key_obj is None:
            raise ProblemsError(problems)
        federated = {td: der_certs(f"{where}: federated bundle {td}", der, problems)
                     for td, der in material.federated.items()}
        crls: list[tuple[str, x509.CertificateRevocationList]] = []
        for i, der in enumerate(material.crls):
            try:
                crls.append((f"{where}: crl[{i}]", x509.load_der_x509_crl(der)))
            except ValueError as exc:
                problems.append(Problem(f"{where}: crl[{i}]", f"not a DER CRL ({exc})"))
        if problems:
            raise ProblemsError(problems)
        return _assemble(where, chain, where, key_obj, f"{where}: bundle", own,
                         {td: (f"{where}: federated bundle {td}", certs)
                          for td, certs in federated.items()}, crls,
                         now or dt.datetime.now(dt.UTC))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if isinstance(exc, ProblemsError):
            raise
        raise ProblemsError([Problem(where, f"a malformed certificate or key: {exc}")]
                            ) from exc


def der_certs(where: str, data: bytes, problems: list[Problem]) -> list[x509.Certificate]:
    """Concatenated DER certificates (the Workload API's encoding) -> certificates; [] and
    a problem at `where` when any is not whole DER (`sidecar inspect` reads the agent's
    answer with it too)."""
    certs: list[x509.Certificate] = []
    rest = data
    while rest:
        size = _der_length(rest)
        if size is None or size > len(rest):
            problems.append(Problem(where, f"certificate {len(certs) + 1} is not whole DER "
                                           f"({len(rest)} bytes left)"))
            return []
        try:
            certs.append(x509.load_der_x509_certificate(rest[:size]))
        except ValueError as exc:
            problems.append(Problem(where, f"certificate {len(certs) + 1}: not DER ({exc})"))
            return []
        rest = rest[size:]
    if not certs:
        problems.append(Problem(where, "no certificate"))
    return certs


def _der_length(data: bytes) -> int | None:
    """The whole length of the DER SEQUENCE at the start of `data` (a certificate), or
    None. cryptography reads one certificate per call and refuses trailing bytes, so the
    concatenation is cut at the outer SEQUENCE's length (X.690 8.1.3)."""
    if len(data) < 2 or data[0] != 0x30:
        return None
    first = data[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4 or len(data) < 2 + count:
        return None
    return 2 + count + int.from_bytes(data[2:2 + count], "big")


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
    key_obj = _read_key(key, problems)
    own = _read_certs(bundle, problems)
    if problems or not chain or key_obj is None or not own:
        raise ProblemsError(problems)
    fed: dict[str, tuple[str, list[x509.Certificate]]] = {}
    for fed_td, path in (federated or {}).items():
        certs = _read_certs(path, problems)
        if certs:
            fed[fed_td] = (str(path), certs)
    crl_list: list[tuple[str, x509.CertificateRevocationList]] = []
    for path in crls:
        data = _read(path, problems)
        if data is None:
            continue
        try:
            crl_list.append((str(path), x509.load_pem_x509_crl(data)))
        except ValueError as exc:
            problems.append(Problem(str(path), f"not a PEM CRL ({exc})"))
    if problems:
        raise ProblemsError(problems)
    return _assemble(str(cert), chain, str(key), key_obj, str(bundle), own, fed, crl_list, now)


def _assemble(
    where: str,
    chain: list[x509.Certificate],
    key_where: str,
    key_obj: object,
    bundle_where: str,
    own_cas: list[x509.Certificate],
    federated: Mapping[str, tuple[str, list[x509.Certificate]]],
    crls: list[tuple[str, x509.CertificateRevocationList]],
    now: dt.datetime,
) -> Identity:
    """Cross-check parsed material, wherever it came from, into one snapshot."""
    problems: list[Problem] = []
    key_pem = _check_key(key_where, key_obj, problems)
    own = _bundle_of(bundle_where, own_cas, "", problems)
    if problems or own is None:
        raise ProblemsError(problems)
    leaf, intermediates = chain[0], tuple(chain[1:])
    sid = _check_leaf(where, key_where, leaf, key_obj, now, problems)
    if sid is None:
        raise ProblemsError(problems)
    td = sid.trust_domain.name
    own = Bundle(td, own.cas, own.ders, own.pem)
    _check_chain(where, chain, own, problems)
    bundles: dict[str, Bundle] = {td: own}
    for fed_td, (fed_where, certs) in federated.items():
        try:
            fed_td = spiffe.TrustDomain.parse(fed_td).name
        except spiffe.SpiffeIdError as exc:
            problems.append(Problem(fed_where, f"federated bundle key: {exc}"))
            continue
        if fed_td == td:
            problems.append(Problem(fed_where, f"federates our own trust domain {td}"))
            continue
        fb = _bundle_of(fed_where, certs, fed_td, problems)
        if fb is not None:
            bundles[fed_td] = fb
    issuers = [ca for b in bundles.values() for ca in b.cas] + list(intermediates)
    crl_list = [crl for crl_where, crl in crls
                if _check_crl(crl_where, crl, issuers, now, problems)]
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


def _read_key(path: Path, problems: list[Problem]) -> object | None:
    data = _read(path, problems)
    if data is None:
        return None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # The message of cryptography never includes key material; keep it that way.
        problems.append(Problem(str(path), f"not an unencrypted PEM private key ({exc})"))
        return None


def _check_key(where: str, key: object, problems: list[Problem]) -> bytes:
    """The key as PKCS#8 PEM (what OpenSSL loads), if it is a kind and size we accept."""
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        problems.append(Problem(where, f"RSA key of {key.key_size} bits; at least "
                                       f"{MIN_RSA_BITS} are required"))
        return b""
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
                      | rsa.RSAPrivateKey):
        problems.append(Problem(where, f"unsupported key type {type(key).__name__}: "
                                       "use ECDSA P-256/P-384, Ed25519 or RSA"))
        return b""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _bundle_of(where: str, certs: list[x509.Certificate], td: str,
               problems: list[Problem]) -> Bundle | None:
    bad = [p for c in certs for p in svid.ca_problems(c)]
    for p in bad:
        problems.append(Problem(where, f"not a CA certificate: {p.message}"))
    if bad:
        return None
    ders = frozenset(c.public_bytes(serialization.Encoding.DER) for c in certs)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    return Bundle(td, tuple(certs), ders, pem)


def _check_crl(
    where: str, crl: x509.CertificateRevocationList, cas: list[x509.Certificate],
    now: dt.datetime, problems: list[Problem],
) -> bool:
    """A CRL is honoured only when signed by a CA we know (a bundle CA, or an intermediate
    of our own chain: leaves are usually revoked by the intermediate that issued them), and
    not past its nextUpdate.

    A stale CRL would make OpenSSL refuse every peer of that CA, so it is refused here
    and the previous CRL stays in force (reload keeps the old snapshot).
    """
    issuers = [ca for ca in cas if ca.subject == crl.issuer]
    if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):  # type: ignore[arg-type]
        problems.append(Problem(where, f"CRL issuer '{crl.issuer.rfc4514_string()}' is "
                                       "neither a CA of our trust bundles nor an "
                                       "intermediate of our SVID chain, or the signature "
                                       "does not verify"))
        return False
    nxt = crl.next_update_utc
    if nxt is not None and nxt < now:
        problems.append(Problem(where, f"CRL is stale: nextUpdate {nxt:%Y-%m-%dT%H:%M:%SZ}"
                                       " has passed; is the CA still publishing it?"))
        return False
    return True


def _check_leaf(
    where: str, key_where: str, leaf: x509.Certificate, key: object, now: dt.datetime,
    problems: list[Problem],
) -> spiffe.SpiffeId | None:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    ours = key.public_key().public_bytes(serialization.Encoding.DER, spki)  # type: ignore[attr-defined]
    if leaf.public_key().public_bytes(serialization.Encoding.DER, spki) != ours:
        # Blamed on the key: the certificate is usually the file a person checked.
        problems.append(Problem(key_where, f"this private key does not match the "
                                f"certificate in {where}: both must come from the same "
                                "issuance (the key of another SVID, or a rotation caught "
                                "between writing one and the other)"))
    if now < leaf.not_valid_before_utc:
        problems.append(Problem(where, f"not valid before "
                                           f"{leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"))
    if now > leaf.not_valid_after_utc:
        problems.append(Problem(where, f"expired at "
                                           f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}; "
                                           "is the SVID issuer still rotating?"))
    try:
        return svid.spiffe_id_of(leaf)
    except svid.SvidError as exc:
        for p in exc.problems:
            problems.append(Problem(where, f"not a valid X.509-SVID: {p.message}"))
        return None


def _check_chain(
    where: str, chain: list[x509.Certificate], bundle: Bundle, problems: list[Problem]
) -> None:
    """Our own chain must lead to our own bundle: a linear walk over our own file."""
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, Exception) as exc:  # InvalidSignature and friends
            problems.append(Problem(where, f"certificate '{child.subject.rfc4514_string()}'"
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
    problems.append(Problem(where, f"the chain does not lead to the trust bundle: "
                                       f"'{top.issuer.rfc4514_string()}' is not in it "
                                       "(missing intermediate, or bundle from another CA)"))
