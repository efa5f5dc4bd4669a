"""After a refused handshake: the alert, FIN, then a bounded drain (proxy/handshake.py).

Real TCP sockets over loopback and a real TlsEndpoint; the drain is run on its own, so
each bound (EOF, bytes, time) is seen apart from a sidecar's timing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from tls_pairs import closed_on_exit, tcp_pair

from sidecar.proxy import handshake
from sidecar.tls.engine import TlsEndpoint

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[TlsEndpoint, socket.socket]]:
    """(our server endpoint, the peer's raw socket), connected over TCP."""
    with closed_on_exit() as held:
        ours, theirs = tcp_pair()
        held.append(theirs)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ep = TlsEndpoint.server(ctx, ours)
        held.append(ep)
        yield ep, theirs


def _unread(fd: int) -> int:
    """Bytes still queued on a non-blocking fd."""
    n = 0
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return n
        if not data:
            return n
        n += len(data)


async def test_ends_at_the_peers_eof_and_sends_ours(
    pair: tuple[TlsEndpoint, socket.socket],
) -> None:
    ep, theirs = pair
    theirs.sendall(b"the rest of a flight")
    theirs.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    await handshake._linger(ep)
    assert time.monotonic() - started < handshake.LINGER_SECONDS / 2
    theirs.setblocking(True)
    theirs.settimeout(5)
    assert theirs.recv(10) == b"", "no FIN from our side"


async def test_reads_at_most_linger_bytes(pair: tuple[TlsEndpoint, socket.socket]) -> None:
    ep, theirs = pair
    sent = 4 * handshake.LINGER_BYTES
    theirs.setblocking(True)
    theirs.sendall(bytes(sent))  # fits in loopback's socket buffers
    await handshake._linger(ep)
    assert _unread(ep.fd) == sent - handshake.LINGER_BYTES


async def test_a_peer_that_stays_open_is_left_after_linger_seconds(
    pair: tuple[TlsEndpoint, socket.socket], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handshake, "LINGER_SECONDS", 0.2)
    ep, _ = pair  # connected, silent, never closes
    started = time.monotonic()
    async with asyncio.timeout(5):
        await handshake._linger(ep)
    took = time.monotonic() - started
    assert 0.15 <= took < 2.0, took
