"""The splice path of the pump (kTLS: the kernel encrypts, Python never sees the bytes).

kTLS itself needs a kernel with the `tls` module (tests/vm); the splice mechanics do not:
a plain TCP socket pretending to be kernel-encrypted goes through exactly the same
socket -> pipe -> socket code, so it is proven here on every machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time

import pytest

from sidecar.endpoint import TcpEndpoint
from sidecar.proxy.pump import CHUNK, Duplex, SpliceFlow

pytestmark = pytest.mark.timeout(30)


class KernelTls(TcpEndpoint):
    """A TCP endpoint the pump treats as kTLS in both directions."""

    __slots__ = ()
    ktls_tx = True
    ktls_rx = True


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


async def test_both_directions_splice_and_arrive_intact() -> None:
    loop = asyncio.get_running_loop()
    app_side, app_far = tcp_pair()
    peer_side, peer_far = tcp_pair()
    closed: list[str] = []
    duplex = Duplex(loop, TcpEndpoint(app_side), KernelTls(peer_side),
                    lambda d, how, exc: closed.append(how))
    assert isinstance(duplex.from_app, SpliceFlow) and isinstance(duplex.to_app, SpliceFlow)
    duplex.start()
    up, down = os.urandom(8 * 2**20), os.urandom(8 * 2**20)

    async def pump(src: socket.socket, data: bytes, dst: socket.socket) -> bytes:
        send = loop.create_task(loop.sock_sendall(src, data))
        got = bytearray()
        while len(got) < len(data):
            got += await loop.sock_recv(dst, 1 << 20)
        await send
        return bytes(got)

    async with asyncio.timeout(20):
        got_up, got_down = await asyncio.gather(pump(app_far, up, peer_far),
                                                pump(peer_far, down, app_far))
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert duplex.from_app.moved == len(up) and duplex.to_app.moved == len(down)
    # Half-close both ways: each end passes through, then the duplex closes itself.
    app_far.shutdown(socket.SHUT_WR)
    async with asyncio.timeout(5):
        assert await loop.sock_recv(peer_far, 10) == b""
    peer_far.shutdown(socket.SHUT_WR)
    async with asyncio.timeout(5):
        assert await loop.sock_recv(app_far, 10) == b""
        while not closed:
            await asyncio.sleep(0.01)
    assert closed == ["closed"]
    for s in (app_far, peer_far):
        s.close()


async def test_a_destination_that_does_not_read_holds_at_most_one_chunk() -> None:
    loop = asyncio.get_running_loop()
    app_side, app_far = tcp_pair()
    peer_side, peer_far = tcp_pair()
    peer = KernelTls(peer_side)
    duplex = Duplex(loop, TcpEndpoint(app_side), peer, lambda *a: None)
    duplex.start()
    sent = 0
    chunk = os.urandom(CHUNK)
    # The peer never reads: send until our writes block AND the pump waits on the peer.
    async with asyncio.timeout(10):
        while True:
            try:
                sent += app_far.send(chunk)
            except BlockingIOError:
                if duplex.from_app.wait == (peer, True):
                    break
                await asyncio.sleep(0)  # one loop turn: the pump moves what it can
    pending = duplex.from_app.pending
    assert pending is None or len(pending) <= CHUNK
    assert sent < 64 * 2**20  # backpressure reached the sender: kernel buffers, no more
    # Now the peer reads everything: every byte arrives, in order.
    got = bytearray()
    app_far.shutdown(socket.SHUT_WR)
    async with asyncio.timeout(10):
        while True:
            data = await loop.sock_recv(peer_far, 1 << 20)
            if not data:
                break
            got += data
    assert len(got) == sent
    duplex.abort("test")
    for s in (app_far, peer_far):
        s.close()


def test_a_failed_write_leaves_nothing_in_the_shared_pipe_for_the_next_connection() -> None:
    """One pipe serves every connection: bytes of a connection whose destination reset
    must never come out of another connection's splice."""
    a_src_peer, a_src = tcp_pair()
    a_dst, a_dst_peer = tcp_pair()
    a_dst_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a_dst_peer.close()  # a reset: the next write to a_dst fails
    a_src_peer.setblocking(True)
    a_src_peer.sendall(b"SECRET-OF-CONNECTION-A")
    flow_a = SpliceFlow(TcpEndpoint(a_src), TcpEndpoint(a_dst))
    deadline = time.monotonic() + 5
    with pytest.raises(OSError):  # the reset surfaces on a write (bounded retries)
        while time.monotonic() < deadline:
            flow_a.run()
    b_src_peer, b_src = tcp_pair()
    b_dst, b_dst_peer = tcp_pair()
    b_src_peer.setblocking(True)
    b_src_peer.sendall(b"b-data")
    b_src_peer.shutdown(socket.SHUT_WR)
    flow_b = SpliceFlow(TcpEndpoint(b_src), TcpEndpoint(b_dst))
    while not flow_b.done and time.monotonic() < deadline:
        flow_b.run()
    b_dst_peer.setblocking(True)
    b_dst_peer.settimeout(5)
    assert recv_all_plain(b_dst_peer) == b"b-data"
    for s in (a_src_peer, a_src, a_dst, b_src_peer, b_src, b_dst, b_dst_peer):
        s.close()


def recv_all_plain(sock: socket.socket) -> bytes:
    got = bytearray()
    while data := sock.recv(65536):
        got += data
    return bytes(got)
