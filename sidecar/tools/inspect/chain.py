"""Following issuers from a file's first certificate to a bundle CA (pure, bounded).

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from sidecar.reasons import Reason
from sidecar.tools.inspect.certview import describe
from sidecar.tools.inspect.findings import Finding

# Real SVID chains are 1-3 certificates (SPIRE: leaf, maybe an intermediate or two). This
# bounds the walk at MAX_CHAIN steps, whatever a hostile file holds.
MAX_CHAIN = 20


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
    if any(ca.subject == top.issuer for ca in anchors):
        # Issued under a trusted CA's name, and yet no CA of the bundle signed it: a rogue
        # CA copying the name (its key identifier or signature gave it away).
        signer = "this root is a different CA" if view.self_issued else \
            f"{label} was not signed by it"
        return Finding(Reason.UNKNOWN_CA, f"a CA named '{issuer}' is trusted, but {signer} "
                       "(different key): a CA that copies a trusted one's name",
                       Reason.UNKNOWN_CA)
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
