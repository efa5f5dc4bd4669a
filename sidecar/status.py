"""What /status and /readyz say about a snapshot, as pure functions over plain values."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sidecar.identity import Identity
from sidecar.policy import Policy


def identity_problem(identity: Identity, now: dt.datetime) -> str | None:
    """Why this SVID cannot serve now (expired, or not valid yet), or None."""
    if identity.not_after <= now:
        expired = identity.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        return (f"the SVID {identity.spiffe_id} expired at {expired} and no valid one "
                "has been loaded since")
    if identity.leaf.not_valid_before_utc > now:
        return "the SVID is not valid yet (check the clock)"
    return None


def describe_identity(identity: Identity) -> dict[str, Any]:
    """The SVID, the bundles per trust domain and the CRLs in force."""
    return {
        "spiffe_id": str(identity.spiffe_id),
        "svid": {"serial": f"{identity.serial:x}", "not_after": identity.not_after,
                 "not_before": identity.leaf.not_valid_before_utc,
                 "version": identity.version},
        "bundles": {td: [{"subject": ca.subject.rfc4514_string(),
                          "not_after": ca.not_valid_after_utc} for ca in b.cas]
                    for td, b in identity.bundles.items()},
        "crls": [{"issuer": c.issuer.rfc4514_string(), "next_update": c.next_update_utc}
                 for c in identity.crls],
    }


def describe_policy(policy: Policy) -> dict[str, Any]:
    return {"version": policy.version, "mode": str(policy.mode), "source": policy.source}
