"""`sidecar inspect FILE... [--bundle FILE] [--json]`: explain certificates on disk.

The analysis is pure: `read_pem` turns bytes into certificates, and `examine` turns
certificates, an optional bundle and `now` into a `FileReport` of findings, each named by
a `Reason` (with its explanation and fix from reasons.py), an `SvidRule`, or a
`FileProblem`. Reading files and printing live in `main` and nowhere else.

How a file is read. If its first certificate can sign certificates (cA=true and
keyUsage keyCertSign) the file is a CA file (root.pem, intermediate.pem, bundle.pem) and
every certificate in it must follow the CA rules; otherwise the first certificate is the
leaf of a chain (svid.pem) and must be an X.509-SVID. A pki-made "CA leaf" (cA=true, no
keyCertSign) is therefore read as a leaf and reported as `leaf_is_ca`. Private-key
blocks are counted and never decoded, so no key material can reach the output.

The chain walk. cryptography's path builder is never used (NOTES.md: it can spin for an
hour on a hostile chain). From the first certificate, each step looks for the current
certificate's issuer: first in the bundle, then among the file's certificates not yet
used. A candidate must carry the issuer name (and, when both sides have them, the
AKI must equal its SKI, as OpenSSL requires); the first candidate whose key verifies the
signature (`verify_directly_issued_by`) is taken. Every file certificate is used at most
once and at most `MAX_CHAIN` are looked at, so the walk makes at most MAX_CHAIN steps of
at most MAX_CHAIN + len(bundle) checks, whatever the input. The walk ends:
- at a bundle CA: the chain verifies (its time window is checked too, as OpenSSL does);
- at candidates whose signatures all fail: `bad_signature` (reported with or without a
  bundle: the file contradicts itself);
- with no candidate at all: without a bundle that is simply the top of the file; with a
  bundle the reason is chosen by this rule, evidence first:
  1. the top certificate is self-issued (a root the bundle does not hold): `unknown_ca`;
  2. its SPIFFE trust domain is not one any bundle CA names: `unknown_ca` (wrong bundle);
  3. its issuer name is a known intermediate (a non-root CA in the bundle file or in
     another file of the same run): `missing_intermediate`, naming where it was seen;
  4. the file holds the leaf alone: `missing_intermediate`, the textbook case of a leaf
     sent without the intermediate that signed it. The file cannot prove the missing
     issuer chains to the bundle, so the message says which other reading is possible;
  5. otherwise (the file carries intermediates and still does not reach the bundle):
     `unknown_ca`, the two sides trust different CAs.
A handshake makes the same call with its own intermediates as the known ones
(tls/classify.py), so the tool and the metric use the same words for the same case.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
import textwrap
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar import spiffe
from sidecar.reasons import Reason

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
# Mozilla's whole CA bundle is ~220 KB; a larger file is not a certificate file, and
# reading it whole would only let a wrong path (a log, a disk image) eat memory.
MAX_FILE_BYTES = 4 * 1024 * 1024
# Real SVID chains are 1-3 certificates (SPIRE: leaf, maybe an intermediate or two). This
# bounds the walk at MAX_CHAIN steps, whatever a hostile file holds.
MAX_CHAIN = 20
DEFAULT_CLOCK_SKEW_HINT = timedelta(minutes=5)  # SPEC: clock_skew_hint default
_WRAP = 100


class FileProblem(StrEnum):
    """What can be wrong with a file before any certificate rule applies."""

    FILE_NOT_FOUND = "file_not_found"
    FILE_UNREADABLE = "file_unreadable"
    NO_CERTIFICATE = "no_certificate"
    MALFORMED_PEM = "malformed_pem"


@dataclass(frozen=True, slots=True)
class Finding:
    name: str  # a Reason, SvidRule or FileProblem value
    message: str  # about this file: what is wrong, concretely
    reason: Reason | None = None  # the SPEC reason it falls under, for its explanation and fix


# --- reading PEM (pure: bytes in) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PemContents:
    certs: tuple[x509.Certificate, ...]
    private_keys: int  # counted, never decoded
    damage: tuple[str, ...]  # truncated or unparsable blocks
    other_blocks: tuple[str, ...]  # labels of blocks that are neither (CRL, PUBLIC KEY...)
    size: int


_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64})-----")


def read_pem(data: bytes) -> PemContents:
    """Every certificate of a PEM file (or of one DER certificate), in file order."""
    certs: list[x509.Certificate] = []
    damage: list[str] = []
    others: list[str] = []
    keys = 0
    pos = 0
    count = 0
    while (begin := _BEGIN.search(data, pos)) is not None:
        count += 1
        label = begin.group(1).decode()
        end_line = b"-----END " + begin.group(1) + b"-----"
        # A body never holds five dashes, so a truncated block cannot swallow the next one.
        body_end = data.find(b"-----", begin.end())
        if body_end == -1 or not data.startswith(end_line, body_end):
            damage.append(f"block {count} ({label}) has no END line: the file is truncated "
                          "(half-written, or cut when copied)")
            pos = begin.end()
            continue
        pos = body_end + len(end_line)
        if "PRIVATE KEY" in label:
            keys += 1
        elif label != "CERTIFICATE":
            others.append(label)
        else:
            cert = _certificate_from_base64(data[begin.end() : body_end])
            if isinstance(cert, str):
                damage.append(f"block {count} (CERTIFICATE) {cert}")
            else:
                certs.append(cert)
    if count == 0 and data[:1] == b"\x30":  # no PEM at all: maybe one DER certificate
        try:
            certs.append(x509.load_der_x509_certificate(data))
        except ValueError:
            pass  # reported as "no certificate" by examine
    return PemContents(tuple(certs), keys, tuple(damage), tuple(others), len(data))


def _certificate_from_base64(body: bytes) -> x509.Certificate | str:
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        return "is not valid base64: the file is damaged"
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return f"is not a valid certificate ({str(exc)[:120]})"


# --- describing one certificate --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyInfo:
    type: str  # "EC", "RSA", "Ed25519", ...
    bits: int | None
    description: str  # "EC P-256", "RSA 2048", "Ed25519"


@dataclass(frozen=True, slots=True)
class CertView:
    """What a person wants to read about one certificate, computed once."""

    subject: str
    issuer: str
    serial: str  # hex: 128-bit serials do not survive a JSON number
    not_before: datetime
    not_after: datetime
    spiffe_id: str | None  # the single URI SAN, when it is a valid SPIFFE ID
    sans: Mapping[str, tuple[str, ...]]  # uri, dns, ip, email
    key: KeyInfo
    key_usage: tuple[str, ...] | None  # None: no keyUsage extension
    key_usage_critical: bool
    eku: tuple[str, ...] | None  # None: no extendedKeyUsage extension
    is_ca: bool
    path_length: int | None
    can_sign: bool  # cA=true and keyCertSign
    self_issued: bool
    trust_domain: str | None


_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_KU_BITS = (
    ("digital_signature", "digitalSignature"), ("content_commitment", "contentCommitment"),
    ("key_encipherment", "keyEncipherment"), ("data_encipherment", "dataEncipherment"),
    ("key_agreement", "keyAgreement"), ("key_cert_sign", "keyCertSign"),
    ("crl_sign", "cRLSign"),
)
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def key_info(cert: x509.Certificate) -> KeyInfo:
    try:
        pub = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return KeyInfo("unknown", None, "a key type this tool cannot read")
    if isinstance(pub, ec.EllipticCurvePublicKey):
        curve = _CURVES.get(pub.curve.name, pub.curve.name)
        return KeyInfo("EC", pub.curve.key_size, f"EC {curve}")
    if isinstance(pub, rsa.RSAPublicKey):
        return KeyInfo("RSA", pub.key_size, f"RSA {pub.key_size}")
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return KeyInfo("Ed25519", 256, "Ed25519")
    if isinstance(pub, ed448.Ed448PublicKey):
        return KeyInfo("Ed448", 456, "Ed448")
    if isinstance(pub, dsa.DSAPublicKey):
        return KeyInfo("DSA", pub.key_size, f"DSA {pub.key_size}")
    return KeyInfo(type(pub).__name__, None, type(pub).__name__)


def _usage_names(ku: x509.KeyUsage) -> tuple[str, ...]:
    names = [name for attr, name in _KU_BITS if getattr(ku, attr)]
    if ku.key_agreement:  # the two below raise unless keyAgreement is set
        names += [n for n, on in (("encipherOnly", ku.encipher_only),
                                  ("decipherOnly", ku.decipher_only)) if on]
    return tuple(names)


def describe(cert: x509.Certificate) -> CertView:
    sans: dict[str, tuple[str, ...]] = {"uri": (), "dns": (), "ip": (), "email": ()}
    usage: tuple[str, ...] | None = None
    usage_critical = can_sign = is_ca = False
    eku: tuple[str, ...] | None = None
    path_length: int | None = None
    try:
        extensions = list(cert.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        extensions = []  # svid_problems reports malformed_extensions
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            sans = {
                "uri": tuple(value.get_values_for_type(x509.UniformResourceIdentifier)),
                "dns": tuple(value.get_values_for_type(x509.DNSName)),
                "ip": tuple(str(ip) for ip in value.get_values_for_type(x509.IPAddress)),
                "email": tuple(value.get_values_for_type(x509.RFC822Name)),
            }
        elif isinstance(value, x509.KeyUsage):
            usage, usage_critical = _usage_names(value), ext.critical
            can_sign = value.key_cert_sign
        elif isinstance(value, x509.ExtendedKeyUsage):
            eku = tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in value)
        elif isinstance(value, x509.BasicConstraints):
            is_ca, path_length = value.ca, value.path_length
    spiffe_id: spiffe.SpiffeId | None = None
    if len(sans["uri"]) == 1:
        try:
            spiffe_id = spiffe.SpiffeId.parse(sans["uri"][0])
        except spiffe.SpiffeIdError:
            pass  # svid_problems names the broken rule
    return CertView(
        subject=cert.subject.rfc4514_string() or "(empty)",
        issuer=cert.issuer.rfc4514_string() or "(empty)",
        serial=f"{cert.serial_number:#x}",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        spiffe_id=str(spiffe_id) if spiffe_id else None,
        sans=sans,
        key=key_info(cert),
        key_usage=usage,
        key_usage_critical=usage_critical,
        eku=eku,
        is_ca=is_ca,
        path_length=path_length,
        can_sign=is_ca and can_sign,
        self_issued=cert.subject == cert.issuer,
        trust_domain=spiffe_id.trust_domain.name if spiffe_id else None,
    )


# --- validity --------------------------------------------------------------------------


def span(seconds: float) -> str:
    """A duration the way a person says it: "41 min", "3 h", "12 days"."""
    s = abs(seconds)
    if s < 90:
        return f"{round(s)} s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    if s < 48 * 3600:
        return f"{round(s / 3600)} h"
    return f"{round(s / 86400)} days"


@dataclass(frozen=True, slots=True)
class Validity:
    seconds_left: int  # until notAfter; negative once expired
    early_by: float  # > 0: notBefore is this far in the future
    late_by: float  # > 0: notAfter passed this long ago
    skew_suspected: bool  # outside the window by less than the clock-skew hint

    @property
    def words(self) -> str:
        if self.early_by > 0:
            hint = ": check the clocks" if self.skew_suspected else ""
            return f"not yet valid for {span(self.early_by)}{hint}"
        if self.late_by > 0:
            hint = ": check the clocks, or whether the issuer still rotates" \
                if self.skew_suspected else ""
            return f"expired {span(self.late_by)} ago{hint}"
        return f"expires in {span(self.seconds_left)}"


def validity(view: CertView, now: datetime, skew: timedelta) -> Validity:
    early = (view.not_before - now).total_seconds()
    late = (now - view.not_after).total_seconds()
    gap = max(early, late)
    return Validity(int((view.not_after - now).total_seconds()), max(early, 0.0),
                    max(late, 0.0), 0 < gap <= skew.total_seconds())


def _validity_finding(label: str, view: CertView, v: Validity) -> Finding | None:
    if v.early_by > 0:
        skew = (f"; this host's clock is probably about {span(v.early_by)} behind the "
                "issuer's: check the clocks (NTP) on both" if v.skew_suspected else "")
        return Finding(Reason.CERT_NOT_YET_VALID, f"{label} is not valid for another "
                       f"{span(v.early_by)} (not before {iso(view.not_before)}){skew}",
                       Reason.CERT_NOT_YET_VALID)
    if v.late_by > 0:
        skew = (f"; so recent that the clocks may differ by about {span(v.late_by)}: check "
                "them, and whether the issuer still rotates" if v.skew_suspected else "")
        return Finding(Reason.CERT_EXPIRED, f"{label} expired {span(v.late_by)} ago "
                       f"(not after {iso(view.not_after)}){skew}", Reason.CERT_EXPIRED)
    return None


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the chain walk (see the module docstring) -----------------------------------------


@dataclass(frozen=True, slots=True)
class Walk:
    order: tuple[int, ...]  # file indices in chain order, first certificate first
    anchor: x509.Certificate | None  # the bundle CA the chain verified against
    failure: Finding | None


def _key_id(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_class(kind).value
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        return None
    key_id = getattr(value, "key_identifier" if kind is x509.AuthorityKeyIdentifier else "digest")
    return key_id if isinstance(key_id, bytes) else None


def _could_issue(child: x509.Certificate, parent: x509.Certificate) -> bool:
    if child.issuer != parent.subject:
        return False
    aki = _key_id(child, x509.AuthorityKeyIdentifier)
    ski = _key_id(parent, x509.SubjectKeyIdentifier)
    return aki is None or ski is None or aki == ski


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def walk_chain(
    certs: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate] | None,
    known_intermediates: Mapping[x509.Name, str],
    labels: Sequence[str],
) -> Walk:
    """Follow issuers from certs[0] to a bundle CA; bounded, linear, never backtracking."""
    remaining = list(range(1, min(len(certs), MAX_CHAIN)))
    order = [0]
    anchor_ders = {ca.public_bytes(Encoding.DER) for ca in anchors or ()}
    while True:
        cert = certs[order[-1]]
        if cert.public_bytes(Encoding.DER) in anchor_ders:
            return Walk(tuple(order), cert, None)  # the file carries the bundle CA itself
        named = [ca for ca in anchors or () if _could_issue(cert, ca)]
        anchor = next((ca for ca in named if _signed_by(cert, ca)), None)
        if anchor is not None:
            return Walk(tuple(order), anchor, None)
        candidates = [j for j in remaining if _could_issue(cert, certs[j])]
        parent = next((j for j in candidates if _signed_by(cert, certs[j])), None)
        if parent is not None:
            remaining.remove(parent)
            order.append(parent)
            continue
        label = labels[order[-1]]
        if named or candidates:
            where = "the bundle" if named else f"certificate {candidates[0] + 1} of the file"
            return Walk(tuple(order), None, Finding(
                Reason.BAD_SIGNATURE, f"{label} names '{cert.issuer.rfc4514_string()}' as "
                f"its issuer, but the signature does not verify with the key of that CA in "
                f"{where}", Reason.BAD_SIGNATURE))
        if anchors is None:
            return Walk(tuple(order), None, None)
        return Walk(tuple(order), None,
                    _not_anchored(cert, label, len(order), anchors, known_intermediates))


def _not_anchored(
    top: x509.Certificate, label: str, depth: int, anchors: Sequence[x509.Certificate],
    known_intermediates: Mapping[x509.Name, str],
) -> Finding:
    view = describe(top)
    issuer = view.issuer
    bundle_tds = sorted({td for ca in anchors if (td := describe(ca).trust_domain)})
    if view.self_issued:
        return Finding(Reason.UNKNOWN_CA, f"the chain ends at the root '{view.subject}', "
                       "which is not in the bundle: the trust stores differ", Reason.UNKNOWN_CA)
    if view.trust_domain and bundle_tds and view.trust_domain not in bundle_tds:
        return Finding(Reason.UNKNOWN_CA, f"{label} is from trust domain {view.trust_domain}, "
                       f"but the bundle's CAs are for {', '.join(bundle_tds)}: the wrong bundle,"
                       " or a federated peer whose bundle is not loaded", Reason.UNKNOWN_CA)
    if top.issuer in known_intermediates:
        return Finding(Reason.MISSING_INTERMEDIATE, f"{label} is issued by '{issuer}', an "
                       f"intermediate CA found {known_intermediates[top.issuer]}, but this "
                       "file does not carry it after the leaf", Reason.MISSING_INTERMEDIATE)
    if depth == 1 and not view.is_ca:
        return Finding(Reason.MISSING_INTERMEDIATE, f"the file holds the leaf alone and its "
                       f"issuer '{issuer}' is not in the bundle: most likely the intermediate "
                       "that belongs after the leaf is missing (if that issuer is not your CA "
                       "at all, the trust stores differ instead)", Reason.MISSING_INTERMEDIATE)
    return Finding(Reason.UNKNOWN_CA, f"the chain ends at {label}, issued by '{issuer}', which "
                   "is neither in the file nor in the bundle: the two sides trust different "
                   "CAs", Reason.UNKNOWN_CA)


# --- one file's report ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BundleFile:
    source: str
    cas: tuple[x509.Certificate, ...]


@dataclass(frozen=True, slots=True)
class ChainEntry:
    view: CertView
    role: str  # leaf, intermediate, root, ca, or unrelated (not in the leaf's chain)
    validity: Validity


@dataclass(frozen=True, slots=True)
class FileReport:
    source: str
    kind: str | None  # "svid", "ca", or None when the file holds no certificate
    chain: tuple[ChainEntry, ...]  # file order, first certificate first
    bundle: str | None  # the --bundle file, when one was given
    anchor: str | None  # subject of the bundle CA the chain verified against
    findings: tuple[Finding, ...]
    notes: tuple[str, ...]
    private_keys: int = 0

    @property
    def problems(self) -> list[str]:
        """Reason names first, each followed by the rules it covers; no duplicates."""
        names: list[str] = []
        for f in self.findings:
            for name in (f.reason, f.name):
                if name is not None and name not in names:
                    names.append(str(name))
        return names

    @property
    def verified(self) -> bool | None:
        return None if self.bundle is None else self.anchor is not None


def unreadable(source: str, problem: FileProblem, message: str) -> FileReport:
    return FileReport(source, None, (), None, None, (Finding(problem, message),), ())


def examine(
    source: str,
    contents: PemContents,
    *,
    now: datetime,
    skew: timedelta = DEFAULT_CLOCK_SKEW_HINT,
    bundle: BundleFile | None = None,
    known_intermediates: Mapping[x509.Name, str] | None = None,
) -> FileReport:
    """Everything wrong with one file's certificates at `now`; no I/O."""
    findings = [Finding(FileProblem.MALFORMED_PEM, d) for d in contents.damage]
    notes = [f"a {label} block, ignored" for label in contents.other_blocks]
    if contents.private_keys:
        notes.append(f"{contents.private_keys} private key block(s) ignored; never shown")
    certs = contents.certs
    if not certs:
        findings.append(Finding(FileProblem.NO_CERTIFICATE, _no_certificate(contents)))
        return FileReport(source, None, (), bundle.source if bundle else None, None,
                          tuple(findings), tuple(notes), contents.private_keys)
    views = [describe(c) for c in certs]
    kind = "ca" if views[0].can_sign else "svid"
    labels = [("the leaf" if kind == "svid" else "certificate 1") if i == 0
              else f"certificate {i + 1} ('{v.subject}')" for i, v in enumerate(views)]
    walk = walk_chain(certs, bundle.cas if bundle else None, known_intermediates or {}, labels)
    in_chain = set(walk.order)
    checked = [i for i in range(len(certs)) if kind == "ca" or i in in_chain]
    rules = [(i, p) for i in checked for p in
             (spiffe.svid_problems(certs[i]) if kind == "svid" and i == 0
              else spiffe.ca_problems(certs[i]))]
    findings += [Finding(p.rule, f"{labels[i]}: {p.message}" if i else p.message,
                         Reason.INVALID_SVID) for i, p in rules]
    validities = [validity(v, now, skew) for v in views]
    findings += [f for i in checked if (f := _validity_finding(labels[i], views[i],
                                                               validities[i]))]
    if walk.anchor is not None and walk.anchor not in certs:
        anchor_view = describe(walk.anchor)
        f = _validity_finding(f"the bundle CA '{anchor_view.subject}'", anchor_view,
                              validity(anchor_view, now, skew))
        findings += [f] if f else []
    if walk.failure is not None:
        findings.append(walk.failure)
    notes += _chain_notes(kind, views, walk, len(certs))
    chain = tuple(ChainEntry(v, _role(kind, i, v, in_chain), validities[i])
                  for i, v in enumerate(views))
    return FileReport(source, kind, chain, bundle.source if bundle else None,
                      walk.anchor.subject.rfc4514_string() if walk.anchor else None,
                      tuple(findings), tuple(notes), contents.private_keys)


def _no_certificate(contents: PemContents) -> str:
    if contents.private_keys and not contents.damage:
        return (f"holds {contents.private_keys} private key(s) and no certificate: this is a "
                "key file; inspect the certificate file (svid.pem, tls.crt) instead")
    if contents.size == 0 or contents.damage:
        return ("no complete certificate: the file is empty or cut short (still being "
                "written? a rotation in progress?)" if not contents.damage
                else "no certificate could be read from the file")
    return "no certificate: neither a PEM CERTIFICATE block nor a DER certificate"


def _role(kind: str, i: int, view: CertView, in_chain: set[int]) -> str:
    if kind == "svid" and i == 0:
        return "leaf"
    if kind == "svid" and i not in in_chain:
        return "unrelated"
    return "root" if view.self_issued else "intermediate" if view.is_ca else "other"


def _chain_notes(kind: str, views: Sequence[CertView], walk: Walk, count: int) -> list[str]:
    notes: list[str] = []
    if count > MAX_CHAIN:
        notes.append(f"only the first {MAX_CHAIN} certificates were walked")
    if kind != "svid":
        return notes  # a CA file may be a set of roots, not a chain
    if list(walk.order) != sorted(walk.order):
        notes.append("the chain is out of order in the file; write the leaf, then its "
                     "issuer, then that one's issuer")
    for i in range(1, min(count, MAX_CHAIN)):
        if i not in walk.order:
            notes.append(f"certificate {i + 1} ('{views[i].subject}') is not in the leaf's "
                         "chain; peers ignore it")
        elif views[i].self_issued:
            notes.append(f"the file carries the root '{views[i].subject}'; a peer never "
                         "trusts a root it is sent, so keep roots in the bundle only")
    return notes


# --- output -----------------------------------------------------------------------------


def to_json(report: FileReport) -> dict[str, Any]:
    leaf = report.chain[0] if report.chain else None
    return {
        "file": report.source,
        "kind": report.kind,
        "spiffe_id": leaf.view.spiffe_id if leaf else None,
        "not_before": iso(leaf.view.not_before) if leaf else None,
        "not_after": iso(leaf.view.not_after) if leaf else None,
        "seconds_left": leaf.validity.seconds_left if leaf else None,
        "validity": leaf.validity.words if leaf else None,
        "clock_skew_suspected": leaf.validity.skew_suspected if leaf else False,
        "subject": leaf.view.subject if leaf else None,
        "issuer": leaf.view.issuer if leaf else None,
        "sans": dict(leaf.view.sans) if leaf else None,
        "key": ({"type": leaf.view.key.type, "bits": leaf.view.key.bits,
                 "description": leaf.view.key.description} if leaf else None),
        "key_usage": list(leaf.view.key_usage) if leaf and leaf.view.key_usage is not None
        else None,
        "extended_key_usage": list(leaf.view.eku) if leaf and leaf.view.eku is not None
        else None,
        "basic_constraints": ({"ca": leaf.view.is_ca, "path_length": leaf.view.path_length}
                              if leaf else None),
        "chain": [{"subject": e.view.subject, "issuer": e.view.issuer, "serial": e.view.serial,
                   "not_before": iso(e.view.not_before), "not_after": iso(e.view.not_after),
                   "role": e.role, "key": e.view.key.description, "spiffe_id": e.view.spiffe_id}
                  for e in report.chain],
        "bundle": (None if report.bundle is None else
                   {"file": report.bundle, "verified": report.verified, "anchor": report.anchor}),
        "problems": report.problems,
        "details": [{"problem": f.name, "reason": f.reason, "message": f.message,
                     "explanation": f.reason.explanation if f.reason else None,
                     "fix": f.reason.fix if f.reason else None} for f in report.findings],
        "notes": list(report.notes),
    }


def _line(label: str, text: str, indent: int = 2) -> str:
    head = " " * indent + f"{label:<12} "
    return textwrap.fill(text, _WRAP, initial_indent=head,
                         subsequent_indent=" " * len(head), break_on_hyphens=False)


def render_text(report: FileReport) -> str:
    problems = list(dict.fromkeys(str(f.reason or f.name) for f in report.findings))
    lines = [f"{report.source}: " + (f"PROBLEM: {', '.join(problems)}" if problems else "OK")]
    if report.chain:
        lines += _describe_lines(report)
    for note in report.notes:
        lines.append(_line("note", note))
    lines += _problem_lines(report.findings)
    return "\n".join(lines)


def _describe_lines(report: FileReport) -> list[str]:
    leaf = report.chain[0]
    v = leaf.view
    sans = "; ".join(f"{kind.upper()} {value}" for kind, values in v.sans.items()
                     for value in values) or "none"
    basic = (f"yes (cA=true{'' if v.path_length is None else f', pathLen {v.path_length}'})"
             if v.is_ca else "no (cA=false)")
    lines = [
        _line("SPIFFE ID", v.spiffe_id or "none (see the problems below)"),
        _line("subject", v.subject),
        _line("issuer", v.issuer),
        _line("SANs", sans),
        _line("validity", f"{leaf.validity.words} ({iso(v.not_before)} to {iso(v.not_after)})"),
        _line("key", v.key.description),
        _line("key usage", "absent" if v.key_usage is None else
              (", ".join(v.key_usage) or "empty") + (" (critical)" if v.key_usage_critical
                                                     else " (not critical)")),
        _line("EKU", "absent (any use)" if v.eku is None else ", ".join(v.eku) or "empty"),
        _line("CA", basic),
        _line("chain", f"{len(report.chain)} certificate(s) in the file, in file order"),
    ]
    pad = " " * 15
    for n, e in enumerate(report.chain, 1):
        lines += [f"{pad}{n}. {e.role}: {e.view.subject}",
                  f"{pad}   serial {e.view.serial}, {e.view.key.description}, "
                  f"{e.validity.words} (not after {iso(e.view.not_after)})",
                  f"{pad}   issued by {e.view.issuer}"]
    if report.bundle is not None:
        lines.append(_line("bundle", f"{report.bundle}: " + (
            f"verifies, up to '{report.anchor}'" if report.anchor else
            "does NOT verify (see the problem below)")))
    return lines


def _problem_lines(findings: Sequence[Finding]) -> list[str]:
    lines: list[str] = []
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(str(f.reason or f.name), []).append(f)
    for name, group in groups.items():
        lines.append(_line("problem", name))
        for f in group:
            rule = f"{f.name}: " if f.name != name else ""
            lines.append(textwrap.fill(f"- {rule}{f.message}", _WRAP, initial_indent=" " * 4,
                                       subsequent_indent=" " * 6, break_on_hyphens=False))
        reason = group[0].reason
        if reason is not None:
            lines.append(_line("means", reason.explanation, indent=4))
            lines.append(_line("fix", reason.fix, indent=4))
    return lines


# --- the command (all I/O is here) ------------------------------------------------------


def _read(path: str) -> bytes | tuple[FileProblem, str]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return FileProblem.FILE_NOT_FOUND, "file not found: check the path (and the volume mount)"
    except IsADirectoryError:
        return FileProblem.FILE_UNREADABLE, "is a directory; name the certificate file in it"
    except OSError as exc:
        return FileProblem.FILE_UNREADABLE, f"cannot read: {exc.strerror}"
    if len(data) > MAX_FILE_BYTES:
        return FileProblem.FILE_UNREADABLE, (f"larger than {MAX_FILE_BYTES} bytes: not a "
                                             "certificate file")
    return data


def _load_bundle(path: str) -> BundleFile | str:
    data = _read(path)
    if isinstance(data, tuple):
        return data[1]
    contents = read_pem(data)
    if contents.damage:
        return "; ".join(contents.damage)
    if not contents.certs:
        return _no_certificate(contents)
    for n, cert in enumerate(contents.certs, 1):
        for p in spiffe.ca_problems(cert):
            return f"certificate {n} is not a usable CA ({p.message}); sidecar refuses this bundle"
    return BundleFile(path, contents.certs)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace | int:
    from sidecar.config import parse_duration

    def duration(text: str) -> timedelta:
        try:
            return timedelta(seconds=parse_duration(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    p = argparse.ArgumentParser(prog="sidecar inspect", description="Explain certificates: "
                                "SPIFFE ID, SANs, chain, validity, key, and every problem.")
    p.add_argument("files", nargs="+", metavar="FILE", help="PEM files (certs; keys ignored)")
    p.add_argument("--bundle", metavar="FILE", help="check each chain against these CAs")
    p.add_argument("--json", action="store_true", help="one JSON object per file, in a list")
    p.add_argument("--clock-skew-hint", type=duration, default=DEFAULT_CLOCK_SKEW_HINT,
                   metavar="DURATION", help="say 'check the clocks' within this gap (5m)")
    try:
        return p.parse_args(list(argv))
    except SystemExit as exc:  # argparse exits 2 on a usage error, 0 after --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    if isinstance(args, int):
        return args
    bundle: BundleFile | None = None
    if args.bundle is not None:
        loaded = _load_bundle(args.bundle)
        if isinstance(loaded, str):
            print(f"sidecar inspect: --bundle {args.bundle}: {loaded}", file=sys.stderr)
            return EXIT_PROBLEM
        bundle = loaded
    now = datetime.now(UTC)
    read = {path: _read(path) for path in dict.fromkeys(args.files)}
    parsed = {path: read_pem(d) for path, d in read.items() if isinstance(d, bytes)}
    known = _known_intermediates(bundle, parsed)
    reports = [
        unreadable(path, *d) if isinstance(d, tuple) else
        examine(path, parsed[path], now=now, skew=args.clock_skew_hint, bundle=bundle,
                known_intermediates=known)
        for path, d in read.items()
    ]
    if args.json:
        print(json.dumps([to_json(r) for r in reports], indent=2))
    else:
        print("\n\n".join(render_text(r) for r in reports))
        if len(reports) > 1:
            bad = sum(1 for r in reports if r.problems)
            print(f"\n{len(reports)} files, {bad} with problems")
    return EXIT_PROBLEM if any(r.problems for r in reports) else EXIT_OK


def _known_intermediates(
    bundle: BundleFile | None, parsed: Mapping[str, PemContents]
) -> dict[x509.Name, str]:
    """Non-root CAs seen in the bundle or in any inspected file, by subject: where seen."""
    sources: list[tuple[str, Collection[x509.Certificate]]] = [
        (f"in {path}", c.certs) for path, c in parsed.items()]
    if bundle is not None:
        sources.insert(0, (f"in the bundle {bundle.source}", bundle.cas))
    known: dict[x509.Name, str] = {}
    for where, certs in sources:
        for cert in certs:
            view = describe(cert)
            if view.can_sign and not view.self_issued:
                known.setdefault(cert.subject, where)
    return known
