"""What /status and /readyz say about an identity snapshot (sidecar/run/status.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from sidecar.identity import Identity, load_identity
from sidecar.run import status
from sidecar.tools import pki

TD = "example.org"
ID = f"spiffe://{TD}/ns/default/sa/payments"


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    root = pki.new_root(TD)
    svid = pki.issue_svid(pki.new_intermediate(root), ID)
    out = tmp_path_factory.mktemp("svid")
    files = pki.write_svid(out, svid, [root.cert])
    return load_identity(out / files.cert, out / files.key, out / files.bundle)


def test_a_valid_svid_is_no_problem(identity: Identity) -> None:
    assert status.identity_problem(identity, dt.datetime.now(dt.UTC)) is None


def test_an_expired_svid_says_when_it_expired(identity: Identity) -> None:
    later = identity.not_after + dt.timedelta(seconds=1)
    problem = status.identity_problem(identity, later)
    expired = identity.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert problem == (f"the SVID {ID} expired at {expired} and no valid one has been "
                       "loaded since")


def test_an_svid_not_valid_yet_points_at_the_clock(identity: Identity) -> None:
    earlier = identity.leaf.not_valid_before_utc - dt.timedelta(seconds=1)
    assert status.identity_problem(identity, earlier) == (
        "the SVID is not valid yet (check the clock)")


def test_the_identity_is_described_with_its_bundle(identity: Identity) -> None:
    described = status.describe_identity(identity)
    assert described["spiffe_id"] == ID
    assert described["svid"]["serial"] == f"{identity.serial:x}"
    assert described["svid"]["not_after"] == identity.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert list(described["bundles"]) == [TD] and len(described["bundles"][TD]) == 1
    assert described["crls"] == []


def test_workers_reports_combine_into_one_status() -> None:
    def report(active: int, policy: str, reload_at: str, result: str) -> dict[str, object]:
        return {"policy": {"version": policy}, "connections": {"active": active,
                                                               "pending_handshakes": 1},
                "ktls": {"mode": "auto", "available": False},
                "sessions": {"store": "memory", "cached": active, "hits": 2},
                "reloads": {"policy": {"result": result, "at": reload_at}}}

    combined = status.combine([report(3, "a1", "2026-12-07T04:00:00Z", "ok"),
                               report(4, "a1", "2026-12-07T03:00:00Z", "error")])
    assert combined["connections"] == {"active": 7, "pending_handshakes": 2}
    assert combined["policy"] == {"version": "a1"}
    assert combined["ktls"] == {"mode": "auto", "available": False}
    assert combined["sessions"] == {"store": "memory", "cached": 7, "hits": 4}
    assert combined["reloads"]["policy"]["result"] == "error"  # any worker's failure shows
    mixed = status.combine([report(1, "a1", "x", "ok"), report(1, "b2", "x", "ok")])
    assert mixed["policy"] == {"differs_by_worker": [{"version": "a1"}, {"version": "b2"}]}
