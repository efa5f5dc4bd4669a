"""What a Workload API response means, as pure functions: which SVID to take, the parts
the identity is built from, and why a stream failed. No gRPC here (sources/workload_api.py
holds the stream); the response is read by its fields, as the spec's proto names them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sidecar.identity import Material
from sidecar.outcomes import StreamFailure
from sidecar.problems import Problem, ProblemsError
from sidecar.spiffe import SpiffeId, SpiffeIdError

WHERE: Final = "workload API"


@dataclass(frozen=True, slots=True)
class Offer:
    """One SVID of a response, as the agent offers it: its SPIFFE ID as written, SPIRE's
    hint, and the material an identity is built from (with the response's federated
    bundles and CRLs, which every SVID of it shares)."""

    spiffe_id: str
    hint: str
    material: Material = field(repr=False)  # holds the key

    def __str__(self) -> str:
        return offer_words(self.spiffe_id, self.hint)


def offer_words(spiffe_id: str, hint: str) -> str:
    """An offered SVID as problems and `sidecar inspect` name it."""
    return f"{spiffe_id} (hint {hint!r})" if hint else spiffe_id


def offers(response: Any) -> tuple[Offer, ...]:
    """Every SVID of one `X509SVIDResponse`, in the agent's order."""
    federated = {td: bytes(der) for td, der in response.federated_bundles.items()}
    crls = tuple(bytes(c) for c in response.crl)
    return tuple(
        Offer(s.spiffe_id, s.hint, Material(
            where=f"{WHERE}: SVID {s.spiffe_id}", chain=bytes(s.x509_svid),
            key=bytes(s.x509_svid_key), bundle=bytes(s.bundle), federated=federated,
            crls=crls))
        for s in response.svids)


def choose(offered: Sequence[Offer], wanted: SpiffeId | None,
           asked_by: str = "identity.spiffe_id") -> Offer:
    """The first SVID, or the one `wanted` names (`asked_by` says who asked, for the
    problem). ProblemsError when there is none to take."""
    if not offered:
        raise ProblemsError([Problem(WHERE, "the response holds no SVID")])
    if wanted is None:
        return offered[0]
    matching = [o for o in offered if _same_id(o.spiffe_id, wanted)]
    if not matching:
        raise ProblemsError([Problem(WHERE, f"no SVID for {asked_by} {wanted}; the agent "
                                            f"offers {', '.join(map(str, offered))}")])
    return matching[0]


def material_of(response: Any, wanted: SpiffeId | None) -> Material:
    """The parts of our identity in one `X509SVIDResponse`: the first SVID, or the one
    `wanted` names; every federated bundle under its own trust domain; the CRLs.
    ProblemsError when the response has no SVID we can take."""
    return choose(offers(response), wanted).material


def _same_id(text: str, wanted: SpiffeId) -> bool:
    try:
        return SpiffeId.parse(text) == wanted
    except SpiffeIdError:
        return False


def classify(code: str, details: str, socket_missing: bool) -> StreamFailure:
    """Why a stream failed, from the gRPC status code's name and its details."""
    match code:
        case "PERMISSION_DENIED":
            return StreamFailure.PERMISSION_DENIED
        case "INVALID_ARGUMENT":
            return StreamFailure.INVALID_ARGUMENT
        case "UNAVAILABLE":
            if socket_missing:
                return StreamFailure.SOCKET_MISSING
            lowered = details.lower()
            if "connection refused" in lowered or "failed to connect" in lowered:
                return StreamFailure.REFUSED
            return StreamFailure.UNAVAILABLE
        case "OK":
            return StreamFailure.ENDED
    return StreamFailure.OTHER


# What to do about each failure, for the log line and /readyz.
ADVICE: Final = {
    StreamFailure.SOCKET_MISSING: "is the SPIRE agent running, and its socket mounted here?",
    StreamFailure.REFUSED: "the socket exists but nobody accepts: is the agent restarting?",
    StreamFailure.PERMISSION_DENIED: "no registration entry matches this workload (yet): "
                                     "check the entry's selectors",
    StreamFailure.UNAVAILABLE: "the agent dropped the stream; reconnecting",
    StreamFailure.ENDED: "the agent ended the stream; reconnecting",
    StreamFailure.STALLED: "the agent accepted the call but sent nothing in time",
    StreamFailure.INVALID_ARGUMENT: "the agent refused our request",
    StreamFailure.OTHER: "an unexpected gRPC failure",
}


@dataclass(slots=True)
class Backoff:
    """Delays between attempts: doubling from `first` up to `cap`, each drawn from its
    upper half at random so that the sidecars of a node do not all redial a restarted
    agent in the same instant (AWS's "equal jitter")."""

    first: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        ceiling = min(self.cap, self.first * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0

