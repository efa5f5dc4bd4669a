"""Authorization of an inbound connection: the decision when its peer is known, and again
when a new policy arrives while it lives.

One home for both: the first decision (inbound.py), the re-decision of a connection whose
app was being dialed when the policy changed (inbound.py), and the live recheck of
`policy_recheck` (server.py) all go through here, so they cannot drift apart.
"""

from __future__ import annotations

from sidecar.observe import metrics
from sidecar.outcomes import Close
from sidecar.policy import Decision, Policy
from sidecar.proxy.connection import Record
from sidecar.spiffe import SpiffeId


def admit(policy: Policy, peer_id: SpiffeId, rec: Record) -> Decision:
    """The first decision on an authenticated peer, recorded and counted, allowed or not."""
    decision = policy.decide(peer_id, rec.listener)
    rec.decision, rec.rule = decision.kind, decision.rule
    metrics.count_decision(policy, rec.listener, decision.kind, decision.rule)
    return decision


def recheck(policy: Policy, peer_id: SpiffeId | None, listener: str,
            request: tuple[str, str] | None = None) -> Decision | None:
    """What a new policy says of a live connection (of an http listener's WebSocket: of
    its upgrade `request`, method and path): its denial, or None when the connection may
    stay (or never got as far as a peer). Pure."""
    if peer_id is None:
        return None
    if request is not None:
        decision = policy.for_peer(peer_id, listener).decide(*request)
    else:
        decision = policy.decide(peer_id, listener)
    return None if decision.allowed else decision


def revoke(policy: Policy, rec: Record, denial: Decision) -> None:
    """Record and count a recheck's denial; the caller closes the connection."""
    metrics.count_decision(policy, rec.listener, denial.kind, denial.rule)
    rec.decision, rec.rule, rec.close = denial.kind, denial.rule, Close.POLICY_RECHECK
