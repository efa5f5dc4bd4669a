"""Bytes through an outbound sidecar (A) and an inbound sidecar (B) to an echo app.

    client --plaintext--> A (outbound, FRONTEND) ==mTLS==> B (inbound, PAYMENTS) --> app
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.tls import openssl

from .conftest import (
    BATCH,
    FRONTEND,
    IO_TIMEOUT,
    LOOPS,
    PAYMENTS,
    EchoApp,
    Sidecar,
    SidecarFactory,
    plain_roundtrip,
    sha,
    wait_for,
)

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


def start_pair(
    sidecar: SidecarFactory, app: EchoApp, loop: str = "uvloop",
    b_tls: dict[str, object] | None = None,
) -> tuple[Sidecar, Sidecar]:
    """B in front of `app`, and A routing to B expecting B's SPIFFE ID."""
    b = sidecar("b", spiffe_id=PAYMENTS, loop=loop, tls=b_tls,
                inbound=[{"name": "in", "forward_to": app.address}])
    a = sidecar("a", spiffe_id=FRONTEND, loop=loop,
                outbound=[{"name": "out", "connect_to": f"127.0.0.1:{b.port('in')}",
                           "expect_ids": [PAYMENTS]}])
    return a, b


def status(sc: Sidecar) -> dict[str, Any]:
    url = f"http://127.0.0.1:{sc.port('admin')}/status"
    with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def assert_clean(line: dict[str, object], *, moved: int, peer_id: str) -> None:
    assert line["reason"] is None, line
    assert line["peer_id"] == peer_id, line
    assert line["tls_version"] == "TLSv1.3", line
    assert line["bytes_to_app"] == moved, line
    assert line["bytes_from_app"] == moved, line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", LOOPS)
def test_one_mib_each_way_arrives_intact(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp], loop: str
) -> None:
    app = echo_app()
    a, b = start_pair(sidecar, app, loop)
    payload = secrets.token_bytes(MIB)

    r = plain_roundtrip(a.port("out"), payload, timeout=30)

    assert r.eof, "the echo ended with a reset, not an end of stream"
    assert len(r.received) == MIB
    assert sha(r.received) == sha(payload)
    assert_clean(a.connection(peer_addr=r.local), moved=MIB, peer_id=PAYMENTS)
    [inbound] = b.wait_connections(1, listener="in")
    assert_clean(inbound, moved=MIB, peer_id=FRONTEND)
    assert inbound["decision"] == "allow", inbound
    assert app.bytes_received == MIB


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", LOOPS)
def test_half_close_still_receives_the_full_echo(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp], loop: str
) -> None:
    # The app answers only after it has seen EOF: the client's shutdown must travel
    # A -> close_notify -> B -> app while the way back stays open.
    app = echo_app(hold=True)
    a, b = start_pair(sidecar, app, loop)
    payload = secrets.token_bytes(64 * 1024)

    with socket.create_connection(("127.0.0.1", a.port("out")), timeout=IO_TIMEOUT) as sock:
        local = "{}:{}".format(*sock.getsockname()[:2])
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):  # raises (fails the test) on a reset or timeout
            chunks.append(data)
    received = b"".join(chunks)

    assert sha(received) == sha(payload), f"got {len(received)} of {len(payload)} bytes"
    wait_for(lambda: app.finished == 1, IO_TIMEOUT, "the app to finish its half-closed echo")
    assert_clean(a.connection(peer_addr=local), moved=len(payload), peer_id=PAYMENTS)
    [inbound] = b.wait_connections(1, listener="in")
    assert_clean(inbound, moved=len(payload), peer_id=FRONTEND)


@pytest.mark.timeout(90)
async def test_200_concurrent_connections(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp]
) -> None:
    app = echo_app()
    a, b = start_pair(sidecar, app)
    port = a.port("out")
    n, size = 200, 16 * 1024

    async def one() -> tuple[bytes, bytes]:
        payload = secrets.token_bytes(size)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            return payload, await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)

    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} connections failed, e.g. {failures[0]!r}"
    wrong = [r for r in results if isinstance(r, tuple) and r[0] != r[1]]
    assert not wrong, f"{len(wrong)} of {n} echoes came back wrong"
    out_lines = a.wait_connections(n, timeout=30, listener="out")
    assert [ln for ln in out_lines if ln["reason"] is not None] == []
    assert all(ln["bytes_to_app"] == size for ln in out_lines)
    in_lines = b.wait_connections(n, timeout=30, listener="in")
    assert [ln for ln in in_lines if ln["reason"] is not None or ln["decision"] != "allow"] == []
    assert app.accepted == n


# What only the private OpenSSL reach provides (README: "Workers, kTLS, and where it
# runs"); CI runs this file again with the reach switched off.
NO_REACH = os.environ.get(openssl.FORCE_FALLBACK_ENV) == "1"
needs_reach = pytest.mark.skipif(
    NO_REACH, reason="the in-memory session store and ticket key rotation need the reach")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("store", [pytest.param("memory", marks=needs_reach), "tickets"])
def test_second_connection_resumes(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp], store: str
) -> None:
    app = echo_app()
    a, b = start_pair(sidecar, app, b_tls={"session_store": store})

    first = plain_roundtrip(a.port("out"), b"first")
    assert first.received == b"first"
    line1 = a.connection(peer_addr=first.local)  # the session is kept when this one ends
    second = plain_roundtrip(a.port("out"), b"second")
    assert second.received == b"second"
    line2 = a.connection(peer_addr=second.local)

    assert line1["resumed"] is False, line1
    assert line2["resumed"] is True, line2
    assert line2["peer_id"] == PAYMENTS and line2["reason"] is None, line2
    # B authorizes the resumed caller too, and says it resumed.
    inbound = b.wait_connections(2, listener="in")
    assert sorted(ln["resumed"] for ln in inbound) == [False, True], inbound
    assert all(ln["peer_id"] == FRONTEND and ln["decision"] == "allow" for ln in inbound)
    sessions = status(b)["sessions"]
    assert sessions["store"] == store, sessions
    if store == "memory":
        assert sessions["cached"] == 1 and sessions["hits"] == 1, sessions


@needs_reach
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("store", "event"), [("memory", "session cache flushed"),
                                              ("tickets", "session ticket keys rotated")])
def test_sessions_end_at_a_rotation_boundary(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp], store: str, event: str
) -> None:
    app = echo_app()
    a, b = start_pair(sidecar, app,
                      b_tls={"session_store": store, "session_ticket_rotation": "1s"})
    first = plain_roundtrip(a.port("out"), b"first")
    assert a.connection(peer_addr=first.local)["resumed"] is False

    def boundaries() -> int:
        return sum(1 for ln in list(b.lines) if ln.get("msg") == event)

    # Two more: a line read late may belong to a boundary from before the session.
    seen = boundaries()
    b.wait_line(lambda _: boundaries() >= seen + 2, timeout=10, what=f"two '{event}' lines")
    second = plain_roundtrip(a.port("out"), b"second")
    assert second.received == b"second"
    line = a.connection(peer_addr=second.local)
    assert line["resumed"] is False and line["reason"] is None, line


@pytest.mark.timeout(60)
def test_denied_caller_gets_nothing_through(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp]
) -> None:
    app = echo_app()
    a, b = start_pair(sidecar, app)
    c = sidecar("c", spiffe_id=BATCH,
                outbound=[{"name": "out", "connect_to": f"127.0.0.1:{b.port('in')}",
                           "expect_ids": [PAYMENTS]}])

    denied = plain_roundtrip(c.port("out"), b"transfer 1000 to batch")

    assert denied.received == b""
    line = b.connection(peer_id=BATCH)
    assert line["decision"] == "deny", line
    assert line["close"] == "denied", line
    assert line["reason"] is None, line  # authorization, not a handshake error
    assert line["bytes_to_app"] == 0 and line["bytes_from_app"] == 0, line
    c.connection(peer_addr=denied.local)  # C's side is finished too
    assert app.accepted == 0, "the app saw a connection from a denied caller"
    assert app.bytes_received == 0

    good = plain_roundtrip(a.port("out"), b"hello")
    assert good.received == b"hello"
    assert b.connection(peer_id=FRONTEND)["decision"] == "allow"
    assert app.accepted == 1


@pytest.mark.timeout(60)
def test_unix_socket_forward_to(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp], short_dir: object
) -> None:
    app = echo_app(unix_path=f"{short_dir}/app.sock")
    a, b = start_pair(sidecar, app)
    payload = secrets.token_bytes(100_000)

    r = plain_roundtrip(a.port("out"), payload)

    assert r.eof
    assert sha(r.received) == sha(payload)
    assert_clean(a.connection(peer_addr=r.local), moved=len(payload), peer_id=PAYMENTS)
    [inbound] = b.wait_connections(1, listener="in")
    assert_clean(inbound, moved=len(payload), peer_id=FRONTEND)
    assert app.accepted == 1
