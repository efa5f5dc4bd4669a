"""The deliberately broken SVIDs of `sidecar pki issue --broken KIND`: each kind, and the
`issue_svid` overrides that break that one thing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sidecar.tools.pki.ca import CA
from sidecar.tools.pki.keys import new_key


class Broken(StrEnum):
    """`sidecar pki issue --broken KIND`: an SVID with one thing wrong, on purpose, so a user
    can watch each failure reason happen (docs/failure-reasons.md)."""

    EXPIRED = "expired"  # cert_expired
    NOT_YET_VALID = "not-yet-valid"  # cert_not_yet_valid (by 2 min: "check the clocks")
    NO_URI_SAN = "no-uri-san"  # invalid_svid
    TWO_URI_SANS = "two-uri-sans"  # invalid_svid
    CA_LEAF = "ca-leaf"  # invalid_svid
    BAD_SIGNATURE = "bad-signature"  # bad_signature
    NO_INTERMEDIATE = "no-intermediate"  # missing_intermediate
    FOREIGN_CA = "foreign-ca"  # unknown_ca: signed by a new CA nobody trusts


def broken_overrides(kind: Broken, ca: CA, spiffe_id: str) -> dict[str, object]:
    now = datetime.now(UTC)
    match kind:
        case Broken.EXPIRED:
            return {"not_before": now - timedelta(hours=2), "not_after": now - timedelta(hours=1)}
        case Broken.NOT_YET_VALID:
            return {"not_before": now + timedelta(minutes=2),
                    "not_after": now + timedelta(hours=1)}
        case Broken.NO_URI_SAN:
            return {"uris": ()}
        case Broken.TWO_URI_SANS:
            return {"extra_uris": (spiffe_id + "-twin",)}
        case Broken.CA_LEAF:
            return {"is_ca": True}
        case Broken.BAD_SIGNATURE:
            return {"issuer_key": new_key()}
        case Broken.NO_INTERMEDIATE:
            return {"include_intermediates": False}
        case Broken.FOREIGN_CA:
            return {}
    return {}
