"""The Workload API identity source against the dev agent on a real unix socket: every way
an agent fails (missing socket, refused connection, PermissionDenied, a stream that ends or
aborts, silence, a restart), and what a response carries (rotation, several SVIDs and the
hint, federated bundles, CRLs). Each wait is bounded by `until`, each agent and source is
stopped by its test."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from agent_fixtures import (  # noqa: F401  (fixtures, found by pytest)
    ID_DB,
    ID_WEB,
    ca_fixture,
    other_root_fixture,
    root_fixture,
    sock_fixture,
    two_agent,
    web_agent,
)
from cryptography import x509

from sidecar.identity import Identity
from sidecar.observe import metrics
from sidecar.outcomes import StreamFailure, StreamState, UpdateResult
from sidecar.problems import Problem, ProblemsError
from sidecar.sources.workload_api import WorkloadApiSource, fetch_once
from sidecar.sources.workload_response import Backoff, classify
from sidecar.spiffe import SpiffeId
from sidecar.tools.pki import CA
from sidecar.tools.pki.agent import Agent, Drop
from sidecar.workload_endpoint import WorkloadAddress

pytestmark = pytest.mark.timeout(60)

WAIT = 15.0


@pytest.fixture
def agent(ca: CA, sock: Path) -> Iterator[Agent]:
    a = web_agent(ca, sock)  # each test starts it when it wants it up
    yield a
    a.close()


class Recorder:
    """A source and what it applied, on the test's loop."""

    def __init__(self, sock: Path, wanted: str | None = None, first_timeout: float = 30.0):
        self.applied: list[Identity] = []
        self.source = WorkloadApiSource(
            WorkloadAddress(unix=sock), SpiffeId.parse(wanted) if wanted else None,
            asyncio.get_running_loop(), self.applied.append,
            first_response_timeout=first_timeout, backoff=Backoff(first=0.05, cap=0.2))

    async def until(self, cond: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(WAIT):
            while not cond():
                await asyncio.sleep(0.01)
        assert cond(), what

    def failed_with(self, failure: StreamFailure) -> bool:
        last = self.source.last_failure
        return last is not None and last[0] is failure


@pytest.fixture
async def rec(sock: Path) -> AsyncIterator[Recorder]:
    r = Recorder(sock)
    yield r
    r.source.stop()


def _count(failure: StreamFailure) -> float:
    return metrics.workload_api_stream_failures.labels(failure)._value.get()


def _updates(result: UpdateResult) -> float:
    return metrics.workload_api_updates.labels(result)._value.get()


async def test_first_identity_is_the_agents_svid(agent: Agent, rec: Recorder) -> None:
    agent.start()
    applied = _updates(UpdateResult.APPLIED)
    rec.source.start()
    await rec.until(lambda: rec.source.first.is_set(), "a first identity")
    ident = rec.applied[0]
    assert str(ident.spiffe_id) == ID_WEB
    assert ident.serial == agent.current[0].cert.serial_number
    assert rec.source.state is StreamState.STREAMING
    assert rec.source.not_ready() is None
    assert _updates(UpdateResult.APPLIED) == applied + 1
    status = rec.source.status()
    assert status["state"] == "streaming" and status["last_update"] is not None


async def test_rotation_swaps_a_new_identity(agent: Agent, rec: Recorder) -> None:
    agent.start()
    rec.source.start()
    await rec.until(lambda: len(rec.applied) == 1, "a first identity")
    agent.rotate()
    await rec.until(lambda: len(rec.applied) == 2, "the rotated identity")
    assert rec.applied[1].serial == agent.current[0].cert.serial_number
    assert rec.applied[1].serial != rec.applied[0].serial
    assert rec.source.identity is rec.applied[1]


async def test_missing_socket_is_retried_until_the_agent_appears(
        agent: Agent, rec: Recorder, sock: Path) -> None:
    before = _count(StreamFailure.SOCKET_MISSING)
    rec.source.start()
    await rec.until(lambda: rec.failed_with(StreamFailure.SOCKET_MISSING), "socket_missing")
    why = rec.source.not_ready()
    assert why is not None and f"{sock} does not exist" in why
    assert "is the SPIRE agent running" in why
    assert _count(StreamFailure.SOCKET_MISSING) > before
    agent.start()
    await rec.until(lambda: rec.source.first.is_set(), "the identity once the agent is up")
    assert rec.source.attempts >= 2


async def test_refused_connection_is_retried(agent: Agent, rec: Recorder, sock: Path) -> None:
    # A socket file nobody listens on: what a crashed agent leaves behind.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    try:
        rec.source.start()
        await rec.until(lambda: rec.failed_with(StreamFailure.REFUSED), "refused")
        assert "is the agent restarting" in (rec.source.not_ready() or "")
    finally:
        dead.close()
    agent.start()  # unlinks the stale socket and binds
    await rec.until(lambda: rec.source.first.is_set(), "the identity after the restart")


async def test_permission_denied_until_the_entry_exists(agent: Agent, rec: Recorder) -> None:
    agent.refuse()
    agent.start()
    rec.source.start()
    await rec.until(lambda: rec.failed_with(StreamFailure.PERMISSION_DENIED),
                    "permission_denied")
    why = rec.source.not_ready() or ""
    assert "no identity issued" in why and "registration entry" in why
    assert not rec.applied
    agent.serve()
    await rec.until(lambda: rec.source.first.is_set(), "the identity once served")


@pytest.mark.parametrize(("drop", "failure"), [(Drop.END, StreamFailure.ENDED),
                                                (Drop.UNAVAILABLE, StreamFailure.UNAVAILABLE)])
async def test_a_dropped_stream_is_redialed_and_the_identity_kept(
        agent: Agent, rec: Recorder, drop: Drop, failure: StreamFailure) -> None:
    agent.start()
    rec.source.start()
    await rec.until(lambda: rec.source.first.is_set(), "a first identity")
    unchanged = _updates(UpdateResult.UNCHANGED)
    agent.drop(drop)
    await rec.until(lambda: rec.failed_with(failure), str(failure))
    # The new stream starts with the same SVID: counted, not swapped again.
    await rec.until(lambda: _updates(UpdateResult.UNCHANGED) > unchanged, "unchanged")
    assert len(rec.applied) == 1
    assert rec.source.not_ready() is None  # served the whole time


async def test_silence_at_first_is_a_stall_and_is_redialed(agent: Agent, sock: Path) -> None:
    agent.stall()
    agent.start()
    rec = Recorder(sock, first_timeout=0.3)
    try:
        rec.source.start()
        await rec.until(lambda: rec.failed_with(StreamFailure.STALLED), "stalled")
        assert "sent nothing in time" in (rec.source.not_ready() or "")
        agent.serve()
        await rec.until(lambda: rec.source.first.is_set(), "the identity once served")
    finally:
        rec.source.stop()


async def test_agent_restart_keeps_the_identity_and_resumes(agent: Agent, rec: Recorder) -> None:
    agent.start()
    rec.source.start()
    await rec.until(lambda: rec.source.first.is_set(), "a first identity")
    agent.stop()
    await rec.until(lambda: rec.source.state is StreamState.BACKOFF, "backoff")
    assert rec.source.identity is rec.applied[0]
    agent.start()
    agent.rotate()
    await rec.until(lambda: len(rec.applied) == 2, "the identity after the restart")


async def test_spiffe_id_picks_among_several_svids(ca: CA, sock: Path) -> None:
    with two_agent(ca, sock):
        rec = Recorder(sock, wanted=ID_DB)
        try:
            rec.source.start()
            await rec.until(lambda: rec.source.first.is_set(), "the db identity")
            assert str(rec.applied[0].spiffe_id) == ID_DB
        finally:
            rec.source.stop()


async def test_first_svid_is_taken_by_default(ca: CA, sock: Path) -> None:
    with two_agent(ca, sock):
        ident = fetch_once(WorkloadAddress(unix=sock), None)
        assert str(ident.spiffe_id) == ID_WEB


async def test_a_wanted_id_the_agent_lacks_is_rejected_and_named(agent: Agent,
                                                                sock: Path) -> None:
    agent.start()
    rec = Recorder(sock, wanted="spiffe://example.org/nobody")
    try:
        rejected = _updates(UpdateResult.REJECTED)
        rec.source.start()
        await rec.until(lambda: _updates(UpdateResult.REJECTED) > rejected, "rejected")
        why = rec.source.not_ready() or ""
        assert "no SVID for identity.spiffe_id spiffe://example.org/nobody" in why
        assert ID_WEB in why
        assert not rec.applied
    finally:
        rec.source.stop()


async def test_federated_bundles_come_and_go_with_the_stream(
        agent: Agent, rec: Recorder, other_root: x509.Certificate) -> None:
    agent.start()
    rec.source.start()
    await rec.until(lambda: rec.source.first.is_set(), "a first identity")
    assert set(rec.applied[-1].bundles) == {"example.org"}
    agent.federate("other.org", [other_root])
    await rec.until(lambda: "other.org" in rec.applied[-1].bundles, "federated")
    assert rec.applied[-1].bundles["other.org"].cas == (other_root,)
    agent.unfederate("other.org")
    await rec.until(lambda: "other.org" not in rec.applied[-1].bundles, "unfederated")


async def test_crls_in_the_response_are_honoured(agent: Agent, rec: Recorder) -> None:
    agent.start()
    rec.source.start()
    await rec.until(lambda: rec.source.first.is_set(), "a first identity")
    agent.revoke(12345)
    await rec.until(lambda: bool(rec.applied[-1].crls), "a CRL")
    assert rec.applied[-1].crls[0].get_revoked_certificate_by_serial_number(12345)


async def test_stop_ends_the_stream(agent: Agent, rec: Recorder) -> None:
    agent.start()
    rec.source.start()
    await rec.until(lambda: rec.source.first.is_set(), "a first identity")
    rec.source.stop()
    assert rec.source.state is StreamState.STOPPED
    assert rec.source._thread is not None
    await asyncio.to_thread(rec.source._thread.join, WAIT)
    assert not rec.source._thread.is_alive()


async def test_what_the_thread_saw_before_stop_is_not_acted_on(rec: Recorder) -> None:
    rejected = _updates(UpdateResult.REJECTED)
    rec.source.stop()
    # As the thread does when a response it was checking turns out refused after stop:
    rec.source._post(rec.source._on_rejected, ProblemsError([Problem("workload API", "x")]))
    loop = asyncio.get_running_loop()
    after = loop.create_future()
    loop.call_soon_threadsafe(after.set_result, None)  # the loop runs them in order
    await after
    assert rec.source.state is StreamState.STOPPED
    assert rec.source.last_rejected is None
    assert _updates(UpdateResult.REJECTED) == rejected


def test_fetch_once_says_why_without_an_agent(sock: Path) -> None:
    with pytest.raises(ProblemsError) as caught:
        fetch_once(WorkloadAddress(unix=sock), None, timeout=2.0)
    assert f"socket_missing: {sock} does not exist" in str(caught.value)


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    b = Backoff(first=1.0, cap=8.0)
    delays = [b.next() for _ in range(6)]
    for delay, ceiling in zip(delays, (1, 2, 4, 8, 8, 8), strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # drawn, not fixed
    b.reset()
    assert b.next() <= 1.0


@pytest.mark.parametrize(("code", "details", "missing", "failure"), [
    ("PERMISSION_DENIED", "no identity issued", False, StreamFailure.PERMISSION_DENIED),
    ("UNAVAILABLE", "failed to connect to all addresses", True, StreamFailure.SOCKET_MISSING),
    ("UNAVAILABLE", "failed to connect to all addresses; Connection refused", False,
     StreamFailure.REFUSED),
    ("UNAVAILABLE", "Socket closed", False, StreamFailure.UNAVAILABLE),
    ("INVALID_ARGUMENT", "security header missing", False, StreamFailure.INVALID_ARGUMENT),
    ("INTERNAL", "", False, StreamFailure.OTHER),
])
def test_classify(code: str, details: str, missing: bool, failure: StreamFailure) -> None:
    assert classify(code, details, missing) is failure
