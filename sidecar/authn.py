"""Authentication: who is the peer? The verified chain in, a SPIFFE ID or a Reason out.

OpenSSL has already verified the chain against all anchors we hold. What is left is
SPIFFE's part: the leaf is a valid X.509-SVID, and the chain ended in the bundle of the
trust domain the SVID claims (a federated CA must not vouch for our own trust domain).
Authorization (policy.py) is a separate step with separate reasons.

Full handshakes bring the verified chain; a resumed one brings only the leaf. OpenSSL
verified that leaf's chain against all our anchors when the session was made, but a TLS
1.3 server sends its ticket *before* we judge the SPIFFE part, so a peer we refused (a
federated CA vouching for our trust domain) holds a ticket too. So a resumed leaf is
trusted only if this process accepted it in a full handshake, or if it is signed by an
issuer known to belong to the trust domain it claims: a CA of that domain's bundle, or an
intermediate seen in an accepted chain of that domain (our own chain's included). The
signature is checked, not just the issuer's name, which any CA can copy. Without
federation the question cannot arise (every anchor is that one domain's), so an unknown
issuer is no reason to refuse there: another worker may have made the session. The
answer is cached per leaf, so a peer that resumes often pays for this once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from sidecar import spiffe, svid
from sidecar.identity import Identity
from sidecar.reasons import Reason

# Remembered leaves of resumed peers, and issuers seen in verified chains. Bounded:
# a peer must not be able to grow our memory by presenting many certificates.
RESUMED_CACHE = 4096
KNOWN_INTERMEDIATES = 256


class AuthnError(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Peer:
    spiffe_id: spiffe.SpiffeId  # parsed once here; policy decisions take it as it is
    # The validity window of the whole verified chain, Unix time: a resumed session has no
    # verification of its own, so we check it here (and the outbound offers a session
    # no longer than this).
    not_before: float = 0.0
    not_after: float = float("inf")

    @property
    def trust_domain(self) -> str:
        return self.spiffe_id.trust_domain.name


# A validity window, Unix time: (latest notBefore, earliest notAfter) of some certificates.
Window = tuple[float, float]
# What accepting a chain taught: per intermediate, its trust domain, itself, its subject and
# the window of the chain above it.
_Learnt = tuple[tuple[str, x509.Certificate, x509.Name, Window], ...]
EVER: Window = (0.0, float("inf"))


class Authenticator:
    """Per-process caches around the pure checks; owned by the runtime."""

    def __init__(self) -> None:
        self._resumed: OrderedDict[bytes, Peer] = OrderedDict()
        # Verified chains this process accepted, with what accepting them taught it: a
        # peer that keeps making full handshakes with one SVID is parsed once, not on
        # every connection (three certificates through `cryptography` each time).
        # An answer holds for the bundles it was given under (the very mapping: a new
        # identity snapshot asks again).
        self._chains: OrderedDict[tuple[bytes, ...], tuple[Peer, _Learnt, object, int]] = \
            OrderedDict()
        self._intermediates: OrderedDict[x509.Name, None] = OrderedDict()
        # Issuers proven to belong to a trust domain, by (trust domain, subject), with the
        # validity window of the chain from them up to the anchor.
        self._issuers: OrderedDict[tuple[str, x509.Name], tuple[x509.Certificate, Window]] = \
            OrderedDict()
        self._trust: str | None = None  # the trust_version these answers were given under
        # How many intermediates and issuers were ever forgotten (evicted or cleared): while
        # it stays what it was when a chain was cached, what that chain taught is all still
        # known, and a cached full handshake skips checking (x509.Name hashes and compares
        # in Python: ~20 calls a connection).
        self._forgotten = 0

    @property
    def known_intermediates(self) -> Collection[x509.Name]:
        return self._intermediates.keys()

    def learn(self, identity: Identity) -> None:
        """A new identity snapshot: forget resumption answers given under older trust, keep
        them across a reload of our own SVID."""
        if identity.trust_version != self._trust:
            self._resumed.clear()
            self._chains.clear()
            self._issuers.clear()
            self._forgotten += 1
            self._trust = identity.trust_version
        top = identity.intermediates[-1] if identity.intermediates else identity.leaf
        above = _window(c for c in identity.own_bundle.cas if c.subject == top.issuer)
        for c in reversed(identity.intermediates):
            above = _narrow(above, c)
            self._remember_intermediate(c.subject)
            self._remember_issuer(identity.trust_domain, c, above)

    def full(self, chain: list[bytes], identity: Identity) -> Peer:
        if not chain:
            raise AuthnError(Reason.NO_CLIENT_CERT, "the peer presented no certificate")
        key = tuple(chain)
        seen = self._chains.get(key)
        if seen is not None and seen[2] is identity.bundles:
            self._chains.move_to_end(key)
            if seen[3] != self._forgotten:
                for td, issuer, subject, above in seen[1]:  # known still, however many came
                    if subject not in self._intermediates:
                        self._remember_intermediate(subject)
                    if (td, subject) not in self._issuers:
                        self._remember_issuer(td, issuer, above)
                self._chains[key] = (*seen[:3], self._forgotten)
            self._cache(chain[0], seen[0])
            return seen[0]
        try:
            leaf = x509.load_der_x509_certificate(chain[0])
        except ValueError as exc:
            raise AuthnError(Reason.INVALID_SVID, f"unparsable certificate: {exc}") from exc
        sid = _svid_id(leaf)
        bundle = identity.bundles.get(sid.trust_domain.name)
        if bundle is None:
            raise AuthnError(
                Reason.UNKNOWN_CA,
                f"no trust bundle for trust domain '{sid.trust_domain.name}' "
                "(add it under identity.federated_bundles to accept it)",
            )
        if chain[-1] not in bundle.ders:
            raise AuthnError(
                Reason.UNKNOWN_CA,
                f"the chain of {sid} ends at a CA of another trust domain, "
                f"not in the bundle of '{sid.trust_domain.name}'",
            )
        above = _window([x509.load_der_x509_certificate(chain[-1])] if len(chain) > 1 else [])
        learnt: list[tuple[str, x509.Certificate, x509.Name, Window]] = []
        for der in reversed(chain[1:-1]):  # from the anchor down: each one's window above it
            issuer = x509.load_der_x509_certificate(der)
            above = _narrow(above, issuer)
            subject = issuer.subject
            self._remember_intermediate(subject)
            self._remember_issuer(sid.trust_domain.name, issuer, above)
            learnt.append((sid.trust_domain.name, issuer, subject, above))
        peer = _peer(sid, _narrow(above, leaf))
        known = self._resumed.get(chain[0])
        if known == peer:
            peer = known  # one Peer (and SpiffeId) for all of a leaf's connections
        self._cache(chain[0], peer)
        self._chains[key] = (peer, tuple(learnt), identity.bundles, self._forgotten)
        if len(self._chains) > RESUMED_CACHE:
            self._chains.popitem(last=False)
        return peer

    def resumed(self, leaf_der: bytes | None, identity: Identity) -> Peer:
        if leaf_der is None:
            raise AuthnError(Reason.NO_CLIENT_CERT, "resumed session without a peer certificate")
        peer = self._resumed.get(leaf_der)
        if peer is not None:
            self._resumed.move_to_end(leaf_der)
            return _still_valid(peer)
        leaf = x509.load_der_x509_certificate(leaf_der)
        sid = _svid_id(leaf)
        td = sid.trust_domain.name
        bundle = identity.bundles.get(td)
        if bundle is None:
            raise AuthnError(Reason.UNKNOWN_CA, f"no trust bundle for trust domain "
                             f"'{td}' (a resumed session)")
        candidates = [(ca, _window([ca])) for ca in bundle.cas if ca.subject == leaf.issuer]
        known = self._issuers.get((td, leaf.issuer))
        if known is not None:
            candidates.append(known)
        for issuer, above in candidates:
            try:
                leaf.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            peer = _peer(sid, _narrow(above, leaf))
            self._cache(leaf_der, peer)
            return _still_valid(peer)
        if len(identity.bundles) == 1:
            # No federation: every anchor OpenSSL could have verified this leaf's chain
            # against is in this trust domain's bundle, and a session never survives a
            # change of trust (new ticket keys, a new cache). So the chain ended in the
            # right bundle, though it was verified by another worker or before this
            # process learned its intermediate: refusing would strand the peer, not make
            # it safer. Its intermediates' expiry capped the session (peerchain.py).
            peer = _peer(sid, _window([leaf]))
            self._cache(leaf_der, peer)
            return _still_valid(peer)
        raise AuthnError(Reason.UNKNOWN_CA, f"resumed session of {sid}: its issuer "
                         f"'{leaf.issuer.rfc4514_string()}' is not known to belong to "
                         f"'{td}' here; a full handshake decides")

    def _cache(self, der: bytes, peer: Peer) -> None:
        self._resumed[der] = peer
        if len(self._resumed) > RESUMED_CACHE:
            self._resumed.popitem(last=False)

    def _remember_issuer(self, trust_domain: str, cert: x509.Certificate,
                         window: Window) -> None:
        self._issuers[(trust_domain, cert.subject)] = (cert, window)
        if len(self._issuers) > KNOWN_INTERMEDIATES:
            self._issuers.popitem(last=False)
            self._forgotten += 1

    def _remember_intermediate(self, name: x509.Name) -> None:
        self._intermediates[name] = None
        if len(self._intermediates) > KNOWN_INTERMEDIATES:
            self._intermediates.popitem(last=False)
            self._forgotten += 1


def _svid_id(leaf: x509.Certificate) -> spiffe.SpiffeId:
    try:
        return svid.spiffe_id_of(leaf)
    except svid.SvidError as exc:
        raise AuthnError(Reason.INVALID_SVID, "; ".join(p.message for p in exc.problems)) from exc


def _peer(sid: spiffe.SpiffeId, window: Window) -> Peer:
    return Peer(sid, *window)


def _window(certs: Iterable[x509.Certificate]) -> Window:
    window = EVER
    for c in certs:
        window = _narrow(window, c)
    return window


def _narrow(window: Window, cert: x509.Certificate) -> Window:
    return (max(window[0], cert.not_valid_before_utc.timestamp()),
            min(window[1], cert.not_valid_after_utc.timestamp()))


def chain_window(identity: Identity) -> Window:
    """Our own chain's validity window: what a session we resume presents to the server."""
    return _window((identity.leaf, *identity.intermediates))


def _still_valid(peer: Peer) -> Peer:
    """A ticket outlives a short SVID (tickets ~2 h, SVIDs often 1 h): OpenSSL does not
    re-verify on resumption, so a chain that expired since must be caught here."""
    now = time.time()
    if now > peer.not_after:
        raise AuthnError(Reason.CERT_EXPIRED, f"{peer.spiffe_id} resumed a session, but a "
                         "certificate of its chain has expired since; a full handshake "
                         "with its current SVID decides")
    if now < peer.not_before:
        raise AuthnError(Reason.CERT_NOT_YET_VALID, f"{peer.spiffe_id}: not valid yet")
    return peer
