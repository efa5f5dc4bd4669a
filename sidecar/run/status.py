"""What /status and /readyz say about a snapshot, as pure functions over plain values."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from sidecar.config import IdentityConfig
from sidecar.identity import Identity
from sidecar.policy import Policy
from sidecar.times import rfc3339


def identity_problem(identity: Identity, now: dt.datetime) -> str | None:
    """Why this SVID cannot serve now (expired, or not valid yet), or None."""
    if identity.not_after <= now:
        expired = rfc3339(identity.not_after)
        return (f"the SVID {identity.spiffe_id} expired at {expired} and no valid one "
                "has been loaded since")
    if identity.leaf.not_valid_before_utc > now:
        return "the SVID is not valid yet (check the clock)"
    return None


def describe_identity(identity: Identity) -> dict[str, Any]:
    """The SVID, the bundles per trust domain and the CRLs in force."""
    return {
        "spiffe_id": str(identity.spiffe_id),
        "svid": {"serial": f"{identity.serial:x}", "not_after": rfc3339(identity.not_after),
                 "not_before": rfc3339(identity.leaf.not_valid_before_utc),
                 "version": identity.version},
        "bundles": {td: [{"subject": ca.subject.rfc4514_string(),
                          "not_after": rfc3339(ca.not_valid_after_utc)} for ca in b.cas]
                    for td, b in identity.bundles.items()},
        "crls": [{"issuer": c.issuer.rfc4514_string(),
                  "next_update": rfc3339(c.next_update_utc) if c.next_update_utc else None}
                 for c in identity.crls],
    }


def describe_policy(policy: Policy) -> dict[str, Any]:
    return {"version": policy.version, "mode": str(policy.mode), "source": policy.source}


def serving(
    policy: Policy, *, active: int, pending: int, ktls: Mapping[str, Any],
    sessions: Mapping[str, Any], reloads: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """What only a serving process knows (a worker sends it to its supervisor): the policy
    in force, its connections, kTLS, session resumption, and each reload kind's last."""
    return {
        "policy": describe_policy(policy),
        "connections": {"active": active, "pending_handshakes": pending},
        "ktls": dict(ktls),
        "sessions": dict(sessions),
        "reloads": dict(reloads),
    }


def file_source(ident: IdentityConfig) -> dict[str, Any]:
    """Where the identity comes from, for /status, when files are the source."""
    return {"kind": "files", "cert": str(ident.cert), "key": str(ident.key),
            "bundle": str(ident.bundle),
            "federated_bundles": {td: str(p) for td, p in ident.federated_bundles.items()},
            "crl": [str(p) for p in ident.crl]}


def waiting(source: Mapping[str, Any], *, draining: bool, pid: int) -> dict[str, Any]:
    """/status while there is no identity yet (the Workload API has not answered): nothing
    listens, and the source says what it waits for."""
    return {"spiffe_id": None, "svid": None, "identity_source": dict(source),
            "listeners": [], "draining": draining, "workers": [{"pid": pid}]}


def single(
    identity: Identity, source: Mapping[str, Any], listeners: Sequence[Mapping[str, Any]],
    served: Mapping[str, Any], *, draining: bool, pid: int,
) -> dict[str, Any]:
    """/status of a single process: its identity and where it came from, its listeners
    and what it serves."""
    return {
        **describe_identity(identity),
        "identity_source": dict(source),
        "listeners": list(listeners),
        **served,
        "draining": draining,
        "workers": [{"pid": pid}],
    }


def combine(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`workers: N`: one /status from what each worker reported (Server.serving), so the
    same keys mean the same as with one process. Counts are summed; a value the workers
    should share (policy, kTLS) is shown once when they agree, else per worker; for each
    reload kind a failure in any worker wins (that worker kept its old files)."""
    if not reports:
        return {"policy": None, "connections": None, "ktls": None, "sessions": None,
                "reloads": {}}
    return {
        "policy": _agreed([r.get("policy") for r in reports]),
        "connections": _summed([r.get("connections") or {} for r in reports]),
        "ktls": _agreed([r.get("ktls") for r in reports]),
        "sessions": _sessions([r.get("sessions") or {} for r in reports]),
        "reloads": _reloads([r.get("reloads") or {} for r in reports]),
    }


def _agreed(values: list[Any]) -> Any:
    if all(v == values[0] for v in values):
        return values[0]
    return {"differs_by_worker": values}


def _summed(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
    return out


def _sessions(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    words = _agreed([{k: v for k, v in p.items() if isinstance(v, str)} for p in parts])
    return {**(words if "differs_by_worker" not in words else {"store": words}),
            **_summed(parts)}


def _reloads(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for kind, last in part.items():
            held = out.get(kind)
            # Failures first, then the latest: RFC 3339 strings in UTC sort by time.
            if held is None or (last["result"] == "error", last["at"]) > (
                    held["result"] == "error", held["at"]):
                out[kind] = last
    return out
