"""One file's report: its certificates, a bundle and `now` in, a `FileReport` of findings out.

No I/O. Each finding is named by a `Reason` (with its explanation and fix from
reasons.py), an `SvidRule`, or a `FileProblem`.

How a file is read. If its first certificate can sign certificates (cA=true and
keyUsage keyCertSign) the file is a CA file (root.pem, intermediate.pem, bundle.pem) and
every certificate in it must follow the CA rules; otherwise the first certificate is the
leaf of a chain (svid.pem) and must be an X.509-SVID. A pki-made "CA leaf" (cA=true, no
keyCertSign) is therefore read as a leaf and reported as `leaf_is_ca`. Private-key
blocks are counted and never decoded, so no key material can reach the output.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from sidecar import svid
from sidecar.reasons import Reason
from sidecar.tools.inspect.certview import CertView, describe
from sidecar.tools.inspect.chain import MAX_CHAIN, Walk, walk_chain
from sidecar.tools.inspect.findings import FileProblem, Finding
from sidecar.tools.inspect.pem import PemContents
from sidecar.tools.inspect.validity import Validity, iso, span, validity

DEFAULT_CLOCK_SKEW_HINT = timedelta(minutes=5)  # SPEC: clock_skew_hint default


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
    bundle_only: bool = False,
) -> FileReport:
    """Everything wrong with one file's certificates at `now`; no I/O. `bundle_only`: the
    certificates are a trust bundle (the agent says so), read as a CA file whatever the
    first one looks like."""
    findings = [Finding(FileProblem.MALFORMED_PEM, d) for d in contents.damage]
    notes = [f"a {label} block, ignored" for label in contents.other_blocks]
    if contents.private_keys:
        notes.append(f"{contents.private_keys} private key block(s) ignored; never shown")
    certs = contents.certs
    if not certs:
        findings.append(Finding(FileProblem.NO_CERTIFICATE, no_certificate(contents)))
        return FileReport(source, None, (), bundle.source if bundle else None, None,
                          tuple(findings), tuple(notes), contents.private_keys)
    views = [describe(c) for c in certs]
    kind = "ca" if bundle_only or views[0].can_sign else "svid"
    labels = [("the leaf" if kind == "svid" else "certificate 1") if i == 0
              else f"certificate {i + 1} ('{v.subject}')" for i, v in enumerate(views)]
    walk = walk_chain(certs, bundle.cas if bundle else None, known_intermediates or {}, labels)
    in_chain = set(walk.order)
    checked = [i for i in range(len(certs)) if kind == "ca" or i in in_chain]
    rules = [(i, p) for i in checked for p in
             (svid.svid_problems(certs[i]) if kind == "svid" and i == 0
              else svid.ca_problems(certs[i]))]
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


def no_certificate(contents: PemContents) -> str:
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


def intermediates_seen(
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
