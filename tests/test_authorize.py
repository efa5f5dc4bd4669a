"""proxy/authorize.py: the first decision and the recheck, over plain values."""

from __future__ import annotations

import time

from sidecar.observe import metrics
from sidecar.outcomes import Close
from sidecar.policy import DENY_ALL, DecisionKind, parse_policy
from sidecar.proxy import authorize
from sidecar.proxy.connection import Record
from sidecar.spiffe import SpiffeId

FRONTEND = SpiffeId.parse("spiffe://example.org/ns/web/sa/frontend")
BATCH = SpiffeId.parse("spiffe://example.org/ns/jobs/sa/batch")
POLICY = parse_policy("""\
mode: enforce
default: deny
rules:
  - name: frontend
    action: allow
    from: ["spiffe://example.org/ns/web/sa/frontend"]
""", "policy.yaml")
AUDIT = parse_policy("""\
mode: audit
default: deny
rules: []
""", "audit.yaml")


def record(listener: str = "app") -> Record:
    return Record("inbound", listener, "127.0.0.1:5555", time.monotonic())


def decisions(kind: str, rule: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "sidecar_authz_decisions_total",
        {"listener": "app", "decision": kind, "rule": rule}) or 0.0


def test_a_peer_the_policy_still_allows_stays() -> None:
    assert authorize.recheck(POLICY, FRONTEND, "app") is None


def test_a_peer_the_new_policy_denies_gets_the_denial() -> None:
    denial = authorize.recheck(POLICY, BATCH, "app")
    assert denial is not None and denial.kind is DecisionKind.DENY
    assert authorize.recheck(DENY_ALL, FRONTEND, "app") is not None


def test_a_connection_without_a_peer_is_left_alone() -> None:
    assert authorize.recheck(DENY_ALL, None, "app") is None


def test_audit_mode_never_closes_a_live_connection() -> None:
    assert authorize.recheck(AUDIT, BATCH, "app") is None


def test_admit_records_and_counts_allow_and_deny() -> None:
    before = decisions("deny", "default")
    rec = record()
    assert not authorize.admit(POLICY, BATCH, rec).allowed
    assert (rec.decision, rec.rule, rec.close) == ("deny", "default", None)
    assert decisions("deny", "default") == before + 1
    rec = record()
    assert authorize.admit(POLICY, FRONTEND, rec).allowed
    assert (rec.decision, rec.rule) == ("allow", "frontend")


def test_revoke_records_the_recheck_as_how_it_closed() -> None:
    rec = record()
    denial = authorize.recheck(POLICY, BATCH, "app")
    assert denial is not None
    before = decisions("deny", "default")
    authorize.revoke(POLICY, rec, denial)
    assert (rec.decision, rec.rule, rec.close) == ("deny", "default", Close.POLICY_RECHECK)
    assert decisions("deny", "default") == before + 1
