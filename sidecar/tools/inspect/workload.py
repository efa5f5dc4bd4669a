"""One Workload API answer in, an `AnswerReport` out (pure): what the agent hands out, with
the same findings `examine` gives a file.

An `X509SVIDResponse` holds one or more SVIDs (each with its chain, key, our trust
domain's bundle and SPIRE's hint), the federated bundles by trust domain, and CRLs. Each
SVID is examined as svid.pem would be against bundle.pem (report.py), each bundle as a CA
file, every bundle on its own: a federated bundle never vouches for our SVID, as in `run`.
And each SVID is also put through `identity_from_der`, the check `run` makes before it
takes an answer, so the report says whether `run` would take it and, if not, why (a key
that does not match its certificate shows only there: `examine` never decodes a key).

The response is read through sources/workload_response.py (`offers`, `choose`) and its
certificates through identity.py (`der_certs`): one home for reading the agent's answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from cryptography import x509

from sidecar.identity import der_certs, identity_from_der
from sidecar.problems import Problem, ProblemsError
from sidecar.sources.workload_response import Offer, choose, offers
from sidecar.spiffe import SpiffeId, SpiffeIdError, TrustDomain
from sidecar.tools.inspect.pem import PemContents
from sidecar.tools.inspect.report import BundleFile, FileReport, examine, intermediates_seen


class AnswerProblem(StrEnum):
    """What can be wrong with an answer beyond its certificates' findings."""

    RUN_REFUSES = "run_refuses"  # `run` would not take the chosen SVID (see `refused`)


@dataclass(frozen=True, slots=True)
class SvidReport:
    spiffe_id: str  # as the agent wrote it
    hint: str
    chosen: bool  # the one `run` takes: the first, or the one --spiffe-id names
    report: FileReport  # as for svid.pem against this SVID's bundle
    refused: tuple[str, ...]  # why `run` would not take this SVID; () when it would


@dataclass(frozen=True, slots=True)
class BundleReport:
    trust_domain: str
    federated: bool
    report: FileReport  # as for a bundle.pem


@dataclass(frozen=True, slots=True)
class CrlView:
    issuer: str | None  # None: not a DER CRL (`problem` says why)
    last_update: datetime | None
    next_update: datetime | None
    revoked: int
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class AnswerReport:
    address: str
    wanted: str | None  # --spiffe-id or identity.spiffe_id, when given
    wanted_by: str  # which of them, for the words
    offered: tuple[tuple[str, str], ...]  # (SPIFFE ID, hint) of every SVID, in order
    svids: tuple[SvidReport, ...]  # every SVID, or only the one `wanted` names
    bundles: tuple[BundleReport, ...]  # ours first, then the federated ones by name
    crls: tuple[CrlView, ...]

    @property
    def chosen(self) -> SvidReport:
        return next(s for s in self.svids if s.chosen)

    @property
    def problems(self) -> list[str]:
        """What is wrong, by name, without duplicates: the findings of every SVID and
        bundle shown, and `run_refuses` when `run` would not take the chosen SVID (a CRL
        it cannot read or trust is among those reasons)."""
        reports = [s.report for s in self.svids] + [b.report for b in self.bundles]
        names = [n for r in reports for n in r.problems]
        if self.chosen.refused:
            names.append(AnswerProblem.RUN_REFUSES)
        return list(dict.fromkeys(names))


def examine_answer(
    response: Any, address: str, wanted: SpiffeId | None, asked_by: str, *,
    now: datetime, skew: timedelta,
) -> AnswerReport:
    """Everything the agent handed out, examined at `now`. ProblemsError when the answer
    holds no SVID, or none that `wanted` names (saying which it offers)."""
    offered = offers(response)
    chosen = choose(offered, wanted, asked_by)
    svids = tuple(_svid_report(o, len(offered), n, o is chosen, now, skew)
                  for n, o in enumerate(offered, 1) if wanted is None or o is chosen)
    return AnswerReport(address, str(wanted) if wanted else None, asked_by,
                        tuple((o.spiffe_id, o.hint) for o in offered), svids,
                        _bundles(offered, now, skew), _crls(chosen.material.crls))


def _contents(where: str, der: bytes) -> PemContents:
    """DER certificates as `examine` reads a file: a damaged one is named, never skipped."""
    problems: list[Problem] = []
    certs = der_certs(where, der, problems)
    return PemContents(tuple(certs), 0, tuple(p.message for p in problems), (), len(der))


def _own_trust_domain(offer: Offer) -> str:
    try:
        return SpiffeId.parse(offer.spiffe_id).trust_domain.name
    except SpiffeIdError:
        return offer.spiffe_id  # named as written; examine says what is wrong with it


def _svid_report(offer: Offer, count: int, n: int, chosen: bool, now: datetime,
                 skew: timedelta) -> SvidReport:
    td = _own_trust_domain(offer)
    label = f"the agent's bundle for {td}"
    cas = _contents(label, offer.material.bundle).certs
    bundle = BundleFile(label, cas) if cas else None
    source = f"SVID {n} of {count}: {offer}" + (" (the one `run` takes)" if chosen else "")
    contents = _contents(source, offer.material.chain)
    report = examine(source, contents, now=now, skew=skew, bundle=bundle,
                     known_intermediates=intermediates_seen(bundle, {source: contents}))
    try:
        identity_from_der(offer.material, now=now)
        refused: tuple[str, ...] = ()
    except ProblemsError as exc:
        refused = tuple(str(p) for p in exc.problems)
    return SvidReport(offer.spiffe_id, offer.hint, chosen, report, refused)


def _bundles(offered: Sequence[Offer], now: datetime, skew: timedelta
             ) -> tuple[BundleReport, ...]:
    """Our trust domain's bundle (each distinct one, should SVIDs disagree), then every
    federated bundle under its own name: never merged."""
    found: list[BundleReport] = []
    seen: set[tuple[str, bytes]] = set()
    for offer in offered:
        key = (_own_trust_domain(offer), offer.material.bundle)
        if key not in seen:
            seen.add(key)
            found.append(_bundle(key[0], key[1], False, now, skew))
    federated = offered[0].material.federated if offered else {}
    for name, der in sorted(federated.items(), key=lambda item: _td_name(item[0])):
        found.append(_bundle(_td_name(name), der, True, now, skew))
    return tuple(found)


def _td_name(key: str) -> str:
    """A bundle map key (`spiffe://other.org`) as the trust domain's name."""
    try:
        return TrustDomain.parse(key).name
    except SpiffeIdError:
        return key  # `refused` names what is wrong with it


def _bundle(td: str, der: bytes, federated: bool, now: datetime, skew: timedelta
            ) -> BundleReport:
    source = f"bundle for {td} ({'federated' if federated else 'ours'})"
    return BundleReport(td, federated, examine(source, _contents(source, der), now=now,
                                               skew=skew, bundle_only=True))


def _crls(ders: Sequence[bytes]) -> tuple[CrlView, ...]:
    views = []
    for der in ders:
        try:
            crl = x509.load_der_x509_crl(der)
        except ValueError as exc:
            views.append(CrlView(None, None, None, 0, f"not a DER CRL ({exc})"))
            continue
        views.append(CrlView(crl.issuer.rfc4514_string(), crl.last_update_utc,
                             crl.next_update_utc, len(crl), None))
    return tuple(views)
