"""The byte pump: a Duplex between a real app socket and a real peer, on a real loop.

The app side is a TCP connection over 127.0.0.1; the peer side is either a TLS connection
(TlsEndpoint on both ends, as the proxy runs) or a plain TCP one (TcpEndpoint, for the pump
alone). The test holds the far end of each: `app` plays the local app, `remote` the
remote workload. Every test runs on the stdlib loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import select
import socket
import ssl
import struct
import termios
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tls_pairs import ready, tcp_pair

from sidecar.endpoint import (
    DONE,
    RESET,
    WANT_READ,
    WANT_WRITE,
    Endpoint,
    TcpEndpoint,
    close_with_reset,
)
from sidecar.identity import load_identity
from sidecar.outcomes import Close
from sidecar.proxy.pump import CHUNK, Duplex, Flow
from sidecar.tls import contexts, openssl
from sidecar.tls.contexts import Contexts
from sidecar.tls.engine import TlsEndpoint
from sidecar.tools import pki

pytestmark = pytest.mark.timeout(60)

TD = "example.org"
TIMEOUT = 20.0
MIB = 1024 * 1024

type Run = Callable[..., Any]

# `run` (tests/conftest.py): runs a coroutine on the stdlib loop and on uvloop, bounded.


# --- PKI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Contexts, Contexts]:
    """(proxy's contexts, remote's contexts), both from load_identity as in production."""
    root = pki.new_root(TD)
    inter = pki.new_intermediate(root)

    def build(name: str) -> Contexts:
        d: Path = tmp_path_factory.mktemp(name)
        files = pki.write_svid(d, pki.issue_svid(inter, f"spiffe://{TD}/{name}"), [root.cert])
        return contexts.build(load_identity(d / files.cert, d / files.key, d / files.bundle))

    return build("proxy"), build("remote")


# --- sockets and the rig ----------------------------------------------------------------------


def _ioctl_int(fd: int, request: int) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]
    return value


def inq(fd: int) -> int:
    """Bytes waiting in the kernel's receive queue of fd (SIOCINQ)."""
    return _ioctl_int(fd, termios.FIONREAD)


def outq(fd: int) -> int:
    """Bytes in the kernel's send queue of fd, not yet acknowledged (SIOCOUTQ)."""
    return _ioctl_int(fd, termios.TIOCOUTQ)


@dataclass
class Rig:
    duplex: Duplex
    app: TcpEndpoint  # the test plays the local app here
    remote: Endpoint  # ...and the remote workload here
    app_side: TcpEndpoint  # the Duplex's endpoints
    peer_side: Endpoint
    closes: list[tuple[str, BaseException | None]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def peer_fd(self) -> int:
        return self.peer_side.fd

    async def wait_closed(self) -> tuple[str, BaseException | None]:
        await self.closed.wait()
        assert len(self.closes) == 1, self.closes
        return self.closes[0]


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for r in made:
        for ep in (r.app, r.remote, r.app_side, r.peer_side):
            ep.close()


class CountingTcp(TcpEndpoint):
    """A TcpEndpoint that keeps what each read_into returned."""

    __slots__ = ("reads",)

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.reads: list[int] = []

    def read_into(self, buf: memoryview) -> int:
        n = super().read_into(buf)
        self.reads.append(n)
        return n


class CountingTls(TlsEndpoint):
    """A TlsEndpoint that keeps what each read_into returned."""

    __slots__ = ("reads",)

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket, *, server_side: bool,
                 server_name: str | None = None,
                 session: ssl.SSLSession | None = None) -> None:
        super().__init__(ctx, sock, server_side=server_side, server_name=server_name,
                         session=session)
        self.reads: list[int] = []

    def read_into(self, buf: memoryview) -> int:
        n = super().read_into(buf)
        self.reads.append(n)
        return n


async def open_rig(kind: str, tls: tuple[Contexts, Contexts], made: list[Rig], *,
                   counting: bool = False) -> Rig:
    """`counting`: the Duplex's endpoints keep what each of their reads returned."""
    loop = asyncio.get_running_loop()
    app, app_side_sock = tcp_pair()
    remote_sock, peer_sock = tcp_pair()
    peer_side: Endpoint
    remote: Endpoint
    tcp = CountingTcp if counting else TcpEndpoint
    if kind.startswith("tls"):
        proxy_ctx, remote_ctx = tls
        if kind == "tls-memory":  # the in-memory session store ignores unexpected EOFs
            proxy_ctx = contexts.build(proxy_ctx.identity, session_cache_size=4)
            assert proxy_ctx.session_store == "memory"
        peer_side = (CountingTls if counting else TlsEndpoint).server(proxy_ctx.server,
                                                                      peer_sock)
        remote = TlsEndpoint.client(remote_ctx.client, remote_sock, None)
        await asyncio.gather(peer_side.handshake(), remote.handshake())
        if kind == "tls-public":
            public_api_only(peer_side, remote)
    else:
        peer_side, remote = tcp(peer_sock), TcpEndpoint(remote_sock)
    app_side = tcp(app_side_sock)
    rig: Rig

    def on_close(d: Duplex, reason: str, exc: BaseException | None) -> None:
        assert d is rig.duplex
        rig.closes.append((reason, exc))
        rig.closed.set()

    rig = Rig(Duplex(loop, app_side, peer_side, on_close), TcpEndpoint(app), remote,
              app_side, peer_side)
    made.append(rig)
    rig.duplex.start()
    return rig


def public_api_only(*eps: TlsEndpoint) -> None:
    """Make endpoints run as where the private OpenSSL reach is unavailable (openssl.py):
    what SIDECAR_NO_OPENSSL_REACH=1 does for a whole process."""
    for ep in eps:
        ep._ptr = None


# --- driving endpoints from the test ----------------------------------------------------------


async def send_all(ep: Endpoint, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        piece = view[start : start + CHUNK]
        while piece:
            n = ep.write(piece)  # a wish is retried with the very same bytes
            if n < 0:
                await ready(ep.fd, write=n == WANT_WRITE)
            else:
                piece = piece[n:]


async def end(ep: Endpoint) -> None:
    while (rc := ep.shutdown_write()) != DONE:
        await ready(ep.fd, write=rc == WANT_WRITE)


async def recv(ep: Endpoint, limit: int | None = None) -> bytes:
    """Read to the (clean) end of the stream, or until `limit` bytes have come."""
    buf = memoryview(bytearray(CHUNK))
    got = bytearray()
    while limit is None or len(got) < limit:
        n = ep.read_into(buf)
        if n in (WANT_READ, WANT_WRITE):
            await ready(ep.fd, write=n == WANT_WRITE)
        elif n < 0:
            raise ConnectionResetError(f"the stream was cut ({n}) after {len(got)} bytes")
        elif n == 0:
            break
        else:
            got += buf[:n]
    return bytes(got)


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` holds (the run fixture bounds the wait)."""
    while not condition():
        await asyncio.sleep(0.001)


async def settles(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether `condition` comes to hold within `within` seconds."""
    try:
        async with asyncio.timeout(within):
            await until(condition)
    except TimeoutError:
        return False
    return True


async def turns(n: int = 20) -> None:
    """Give the loop n iterations: time for a misbehaving pump to show itself."""
    for _ in range(n):
        await asyncio.sleep(0)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def assert_close_notify(remote: Endpoint) -> None:
    """The TLS end came as close_notify, not as a bare TCP FIN (a truncation)."""
    assert isinstance(remote, TlsEndpoint)
    buf = memoryview(bytearray(1))
    while (n := remote.read_into(buf)) == WANT_READ:
        await ready(remote.fd)
    assert n == 0, n  # 0: close_notify; a bare FIN reads as TRUNCATED, data as a count


KINDS = ["tls", "tcp"]


# --- moving bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_both_ways_intact(run: Run, rigs: list[Rig], tls: tuple[Contexts, Contexts],
                                kind: str) -> None:
    up, down = payload(4 * MIB + 12345, 1), payload(3 * MIB + 777, 2)

    async def body() -> None:
        rig = await open_rig(kind, tls, rigs)

        async def app_sends() -> None:
            await send_all(rig.app, up)
            await end(rig.app)

        async def remote_sends() -> None:
            await send_all(rig.remote, down)
            await end(rig.remote)

        _, _, at_remote, at_app = await asyncio.gather(
            app_sends(), remote_sends(), recv(rig.remote), recv(rig.app))
        assert len(at_remote) == len(up) and at_remote == up
        assert len(at_app) == len(down) and at_app == down
        assert await rig.wait_closed() == ("closed", None)
        assert rig.duplex.from_app.moved == len(up)
        assert rig.duplex.to_app.moved == len(down)
        assert rig.duplex.moved == len(up) + len(down)
        assert rig.duplex.closed

    run(body())


@pytest.mark.parametrize("kind", [*KINDS, "tls-public"])
def test_a_request_and_its_answer_are_read_once_each(
        run: Run, rigs: list[Rig], tls: tuple[Contexts, Contexts], kind: str) -> None:
    """On a kept-alive connection each message costs one read per side: once a read has
    drained its source, the pump waits for the loop instead of reading again (a read that
    finds nothing raises an exception: dear in Python). (Without the private OpenSSL reach
    the TLS side cannot ask what read-ahead holds: its read_into reads on, inside, until
    OpenSSL wants more; the pump still calls it once.)"""
    async def body() -> None:
        rig = await open_rig(kind, tls, rigs, counting=True)
        app_reads = rig.app_side.reads  # type: ignore[attr-defined]
        peer_reads = rig.peer_side.reads  # type: ignore[attr-defined]
        app_reads.clear()  # start() tried both sides once, before anything was sent
        peer_reads.clear()
        for _ in range(3):
            await send_all(rig.app, b"request")
            assert await recv(rig.remote, 7) == b"request"
            await send_all(rig.remote, b"answer")
            assert await recv(rig.app, 6) == b"answer"
        assert app_reads == [7, 7, 7]
        assert peer_reads == [6, 6, 6]

    run(body())


def test_records_that_arrive_together_all_reach_the_app(
        run: Run, rigs: list[Rig], tls: tuple[Contexts, Contexts]) -> None:
    """OpenSSL's read-ahead can take several records off the socket in one read(); the
    pump must pass on every one of them before it waits for the socket again."""
    async def body() -> None:
        rig = await open_rig("tls", tls, rigs)
        for i in range(20):
            parts = [f"{i}-{j};".encode() for j in range(5)]
            for part in parts:  # five records, sent in one go, before the pump runs
                assert rig.remote.write(part) == len(part)
            assert await recv(rig.app, len(b"".join(parts))) == b"".join(parts)

    run(body())


# --- backpressure -------------------------------------------------------------------------------


class Filler:
    """Writes random bytes into an endpoint, without blocking, until the kernel takes no
    more; the data grows as needed, since socket buffers differ from host to host."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.data = bytearray()
        self.sent = 0
        self.piece: memoryview | None = None  # a TLS write that wants retrying, as it was

    def fill(self) -> None:
        while True:
            if self.piece is None:
                if len(self.data) < self.sent + CHUNK:
                    self.data += os.urandom(MIB)
                self.piece = memoryview(bytes(self.data[self.sent : self.sent + CHUNK]))
            n = self.ep.write(self.piece)
            if n < 0:
                return
            self.sent += n
            self.piece = None if n == len(self.piece) else self.piece[n:]

    async def finish(self) -> None:
        """Complete the write under way (a TLS write must be), then end the stream."""
        while self.piece is not None:
            n = self.ep.write(self.piece)
            if n < 0:
                await ready(self.ep.fd, write=n == WANT_WRITE)
                continue
            self.sent += n
            self.piece = None if n == len(self.piece) else self.piece[n:]
        await end(self.ep)

    @property
    def delivered(self) -> bytes:
        return bytes(self.data[: self.sent])


async def block(flow: Flow, source: Filler) -> None:
    """Fill the source until the flow is stuck on its destination and the source is full."""
    while flow.wait != (flow.dst, True):
        source.fill()
        await turns(1)  # the pump sees the source readable...
        await until(lambda: flow.wait is not None)  # ...and settles, one way or the other
    source.fill()  # whatever room the pump made before it stopped reading
    await turns()


@pytest.mark.parametrize("kind", KINDS)
def test_backpressure_holds_one_chunk_and_stops_reading(
    run: Run, rigs: list[Rig], tls: tuple[Contexts, Contexts], kind: str
) -> None:
    async def body() -> None:
        rig = await open_rig(kind, tls, rigs)
        d = rig.duplex
        from_app, to_app = Filler(rig.app), Filler(rig.remote)
        # Nobody reads: the app never reads what the remote sends, and the other way round.
        await block(d.from_app, from_app)
        await block(d.to_app, to_app)

        for flow in (d.from_app, d.to_app):
            assert flow.wait == (flow.dst, True)
            assert flow.pending is not None
            assert 0 < len(flow.pending) <= CHUNK
        snapshot = [(f.moved, bytes(f.pending or b"")) for f in (d.from_app, d.to_app)]
        queued_app, queued_peer = inq(rig.app_side.fd), inq(rig.peer_fd)
        # The sources' kernel buffers hold the rest: the pump stopped reading them.
        assert queued_app > 0 and queued_peer > 0
        await turns()
        assert [(f.moved, bytes(f.pending or b"")) for f in (d.from_app, d.to_app)] == snapshot
        assert (inq(rig.app_side.fd), inq(rig.peer_fd)) == (queued_app, queued_peer)
        # Every byte the app wrote is already moved, in the pump's one pending chunk, or
        # still in a kernel queue; none is anywhere else. (The kernel's counts settle
        # once delayed ACKs are out: received-but-unacked bytes count on both sides.)
        held = len(d.from_app.pending or b"")
        assert await settles(lambda: from_app.sent == d.from_app.moved + held
                             + inq(rig.app_side.fd) + outq(rig.app.fd)), (
            from_app.sent, d.from_app.moved, held, inq(rig.app_side.fd), outq(rig.app.fd))
        assert await settles(lambda: d.to_app.moved == inq(rig.app.fd)
                             + outq(rig.app_side.fd)), (
            d.to_app.moved, inq(rig.app.fd), outq(rig.app_side.fd))
        assert not d.closed and rig.closes == []

        # Reading again releases everything, in order.
        results = await asyncio.gather(from_app.finish(), to_app.finish(),
                                       recv(rig.remote), recv(rig.app))
        assert results[2] == from_app.delivered
        assert results[3] == to_app.delivered
        assert await rig.wait_closed() == ("closed", None)

    run(body(), timeout=40)


class KtlsLikeWriter(TcpEndpoint):
    """A TCP endpoint that writes the way OpenSSL does on a kTLS socket: straight from the
    caller's buffer, and after WANT_WRITE, from that first buffer again, whatever the
    retry passes (OpenSSL 3.0, do_ssl3_write with BIO_get_ktls_send: the record buffer
    is set to the caller's data; ssl3_write_pending resumes from it)."""

    __slots__ = ("held",)
    ktls_tx = True

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.held: tuple[memoryview | bytes, int] | None = None  # (first buffer, sent)

    def write(self, data: memoryview | bytes) -> int:
        first, sent = self.held if self.held is not None else (data, 0)
        try:
            while sent < len(first):
                sent += self.sock.send(first[sent:])
        except BlockingIOError:
            self.held = (first, sent)
            return WANT_WRITE
        self.held = None
        return len(first)


def test_a_ktls_destination_is_retried_with_bytes_no_other_flow_can_touch() -> None:
    """Between a WANT_WRITE and its retry, another flow's read reuses the shared buffer; a
    write OpenSSL resumes from the first buffer must not send that flow's bytes."""
    app, app_far = socket.socketpair()
    remote, remote_far = socket.socketpair()
    other, other_far = socket.socketpair()
    socks = (app, app_far, remote, remote_far, other, other_far)
    for sk in socks:
        sk.setblocking(False)
    try:
        flow = Flow(TcpEndpoint(app), KtlsLikeWriter(remote))
        bystander = Flow(TcpEndpoint(other), TcpEndpoint(other_far))
        sent = bytearray()
        while flow.wait != (flow.dst, True):  # until the remote's buffer is full
            chunk = os.urandom(CHUNK)
            app_far.sendall(chunk)
            sent += chunk
            flow.run()
        other_far.sendall(b"\xee" * CHUNK)
        bystander.read_once()  # fills the shared buffer with its own bytes

        got = bytearray()
        for _ in range(10_000):  # bounded: each round drains the remote and retries
            try:
                got += remote_far.recv(1 << 20)
            except BlockingIOError:
                pass
            flow.run()
            if len(got) == len(sent):
                break
        assert len(got) == len(sent)
        assert bytes(got) == bytes(sent), "bytes of another flow went out on this one"
    finally:
        for sk in socks:
            sk.close()


class RecordingWriter(TcpEndpoint):
    """A TCP endpoint whose write keeps what it was given (not kTLS: no copy of its own)."""

    __slots__ = ("writes",)

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.writes: list[bytes] = []

    def write(self, data: memoryview | bytes) -> int:
        self.writes.append(bytes(data))
        return super().write(data)


def test_an_endpoint_that_changes_read_into_or_write_is_called_through_them() -> None:
    """The pump calls the sockets' own recv_into / send where an endpoint has nothing to
    add (Endpoint.calls); a subclass that changed read_into or write must still see every
    chunk."""
    app, app_far = socket.socketpair()
    remote, remote_far = socket.socketpair()
    socks = (app, app_far, remote, remote_far)
    for sk in socks:
        sk.setblocking(False)
    try:
        src, dst = CountingTcp(app), RecordingWriter(remote)
        assert src.calls()[0] is None and src.calls()[1] is not None
        assert dst.calls()[0] == remote.recv_into and dst.calls()[1] is None
        flow = Flow(src, dst)
        app_far.sendall(b"hello")
        assert flow.run()
        assert src.reads == [5]
        assert dst.writes == [b"hello"]
        assert remote_far.recv(100) == b"hello"
    finally:
        for sk in socks:
            sk.close()


def test_the_c_level_calls_raise_what_read_into_and_write_return() -> None:
    """recv / send raise where read_into / write return a code; read_code / write_code
    give that same code, and raise anything that is a failure."""
    near, far = tcp_pair()
    try:
        ep = TcpEndpoint(near)
        recv, send = ep.calls()
        assert recv is not None and send is not None
        buf = memoryview(bytearray(CHUNK))
        with pytest.raises(BlockingIOError) as nothing:
            recv(buf)
        assert ep.read_code(nothing.value) == WANT_READ
        assert ep.read_into(buf) == WANT_READ
        with pytest.raises(BlockingIOError) as full:  # nobody reads far: the buffers fill
            while True:
                send(buf)
        assert ep.write_code(full.value) == WANT_WRITE
        assert ep.write(buf) == WANT_WRITE
        gone = BrokenPipeError(32, "Broken pipe")
        with pytest.raises(BrokenPipeError):
            ep.write_code(gone)
        with pytest.raises(BrokenPipeError):
            ep.read_code(gone)
        close_with_reset(far)
        assert select.select([near], [], [], TIMEOUT)[0], "the reset never arrived"
        with pytest.raises(ConnectionResetError) as reset:
            recv(buf)
        assert ep.read_code(reset.value) == RESET
    finally:
        near.close()
        far.close()


# --- half-close ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*KINDS, "tls-public", "tls-memory"])
@pytest.mark.parametrize("first", ["app", "remote"])
def test_half_close_is_carried_through(run: Run, rigs: list[Rig], tls: tuple[Contexts, Contexts],
                                       kind: str, first: str) -> None:
    async def body() -> None:
        rig = await open_rig(kind, tls, rigs)
        closer, other = (rig.app, rig.remote) if first == "app" else (rig.remote, rig.app)
        await send_all(closer, b"request")
        await end(closer)
        if first == "app" and kind != "tcp":
            assert await recv(other, 7) == b"request"
            await assert_close_notify(other)
        else:
            assert await recv(other) == b"request"  # and then the end
        # The other direction still works, in full, after the first one ended.
        reply = payload(MIB, 5)
        await send_all(other, reply)
        assert await recv(closer, len(reply)) == reply
        assert rig.closes == []
        await end(other)
        assert await recv(closer) == b""
        assert await rig.wait_closed() == ("closed", None)
        assert (rig.duplex.from_app.moved, rig.duplex.to_app.moved) == (
            (7, MIB) if first == "app" else (MIB, 7))

    run(body())


# --- errors and the end -------------------------------------------------------------------------


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def read_end(ep: Endpoint) -> int:
    """How the stream read through `ep` ends: 0 (clean), TRUNCATED or RESET."""
    buf = memoryview(bytearray(CHUNK))
    while True:
        n = ep.read_into(buf)
        if n in (WANT_READ, WANT_WRITE):
            await ready(ep.fd, write=n == WANT_WRITE)
        elif n <= 0:
            return n


@pytest.mark.parametrize("kind", KINDS)
def test_app_reset_aborts_once_and_resets_the_remote(
        run: Run, rigs: list[Rig], tls: tuple[Contexts, Contexts], kind: str) -> None:
    async def body() -> None:
        rig = await open_rig(kind, tls, rigs)
        await send_all(rig.app, b"hello")
        assert await recv(rig.remote, 5) == b"hello"
        _reset(rig.app.sock)
        assert await rig.wait_closed() == (Close.APP_RESET, None)
        # No close_notify (nor FIN): the remote cannot take the cut for an end.
        assert await read_end(rig.remote) == RESET
        await after_abort(rig)

    run(body())


@pytest.mark.parametrize(("kind", "cut", "how"), [
    ("tls", "fin", Close.TRUNCATED), ("tls", "rst", Close.PEER_RESET),
    ("tls-memory", "fin", Close.TRUNCATED), ("tcp", "rst", Close.PEER_RESET)])
def test_a_remote_cut_short_resets_the_app(run: Run, rigs: list[Rig],
                                           tls: tuple[Contexts, Contexts],
                                           kind: str, cut: str, how: Close) -> None:
    """A peer killed mid-transfer ends its TCP stream without close_notify (or resets
    it): the app must see a reset, never the end of a complete stream."""
    async def body() -> None:
        rig = await open_rig(kind, tls, rigs)
        await send_all(rig.remote, b"part of a body")
        assert await recv(rig.app, 14) == b"part of a body"
        remote = rig.remote.sock  # type: ignore[attr-defined]
        if cut == "fin":
            socket.socket.shutdown(remote, socket.SHUT_WR)  # a bare FIN: no close_notify
        else:
            _reset(remote)
        assert await rig.wait_closed() == (how, None)
        assert await read_end(rig.app) == RESET
        await after_abort(rig)

    run(body())


def test_a_clean_remote_end_is_a_fin_with_every_byte(
        run: Run, rigs: list[Rig], tls: tuple[Contexts, Contexts]) -> None:
    async def body() -> None:
        rig = await open_rig("tls", tls, rigs)
        body_ = payload(MIB, 7)
        await send_all(rig.remote, body_)
        await end(rig.remote)  # close_notify
        got = await recv(rig.app)
        assert got == body_
        assert await read_end(rig.app) == 0

    run(body())


@contextlib.asynccontextmanager
async def public_pair(tls: tuple[Contexts, Contexts]) -> AsyncIterator[tuple[TlsEndpoint,
                                                                             TlsEndpoint]]:
    """(ours, theirs): a connected TLS pair on the public API alone; closed on exit."""
    proxy_ctx, remote_ctx = tls
    a, b = tcp_pair()
    ours = TlsEndpoint.server(proxy_ctx.server, a)
    theirs = TlsEndpoint.client(remote_ctx.client, b, None)
    try:
        await asyncio.gather(ours.handshake(), theirs.handshake())
        public_api_only(ours, theirs)
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def test_public_close_notify_waits_for_the_peers_bytes(
        run: Run, tls: tuple[Contexts, Contexts]) -> None:
    """Without the private reach, close_notify goes through the public shutdown, whose
    second SSL_shutdown would swallow (and fail on) a record already in the socket: it
    waits until that record is read, and the record arrives whole."""
    async def body() -> None:
        async with public_pair(tls) as (ours, theirs):
            await send_all(theirs, b"in flight")
            await until(lambda: inq(ours.fd) > 0)
            assert ours.shutdown_write() == WANT_READ  # the record first
            assert await recv(ours, 9) == b"in flight"
            await end(ours)
            assert await read_end(theirs) == 0  # close_notify, a clean end
            await send_all(theirs, b"the answer")
            await end(theirs)
            assert await recv(ours) == b"the answer"

    run(body())


def test_public_close_notify_loses_no_record_that_arrives_meanwhile(
        run: Run, tls: tuple[Contexts, Contexts]) -> None:
    """A record of the peer's that reaches the socket while the public shutdown runs is
    held back by the kernel (and sent again), not read and lost by its second
    SSL_shutdown."""
    async def body() -> None:
        async with public_pair(tls) as (ours, theirs):
            with openssl.incoming_held(ours.sock):  # "meanwhile", made to last
                await send_all(theirs, b"meanwhile")
                assert inq(ours.fd) == 0
                assert ours.shutdown_write() == DONE
            assert await recv(ours, 9) == b"meanwhile"  # once the peer sends it again
            assert await read_end(theirs) == 0

    run(body())


def test_tls_garbage_from_remote_aborts_once(run: Run, rigs: list[Rig],
                                             tls: tuple[Contexts, Contexts]) -> None:
    async def body() -> None:
        rig = await open_rig("tls", tls, rigs)
        await send_all(rig.remote, b"hello")
        assert await recv(rig.app, 5) == b"hello"
        # An application-data record whose authentication tag cannot verify.
        os.write(rig.remote.fd, b"\x17\x03\x03\x00\x20" + os.urandom(32))
        reason, exc = await rig.wait_closed()
        assert reason == Close.ERROR
        assert isinstance(exc, ssl.SSLError)
        assert await read_end(rig.app) == RESET
        await after_abort(rig)

    run(body())


async def after_abort(rig: Rig) -> None:
    """Both of the Duplex's sockets are closed, and nothing calls on_close again."""
    assert rig.duplex.closed
    assert rig.app_side.sock.fileno() == -1
    peer_sock = rig.peer_side.sock  # type: ignore[attr-defined]
    assert peer_sock.fileno() == -1
    rig.duplex.abort("error", RuntimeError("again"))
    rig.duplex.finish(client_is_peer=True)
    await turns()
    assert len(rig.closes) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_finish_ends_both_directions_gracefully(run: Run, rigs: list[Rig],
                                                tls: tuple[Contexts, Contexts],
                                                kind: str) -> None:
    async def body() -> None:
        rig = await open_rig(kind, tls, rigs)
        await send_all(rig.app, b"up")
        await send_all(rig.remote, b"down")
        assert await recv(rig.remote, 2) == b"up"
        assert await recv(rig.app, 4) == b"down"
        # The app is the client (outbound): its direction ends first, with a clean end...
        rig.duplex.finish(client_is_peer=False)
        if kind == "tls":
            await assert_close_notify(rig.remote)
        else:
            assert await recv(rig.remote) == b""
        # ...and the remote's answers still reach the app until the remote ends too.
        await send_all(rig.remote, b"late")
        assert await recv(rig.app, 4) == b"late"
        await end(rig.remote)
        assert await recv(rig.app) == b""  # a FIN, not a reset
        assert await rig.wait_closed() == ("closed", None)
        assert (rig.duplex.from_app.moved, rig.duplex.to_app.moved) == (2, 8)

    run(body())


@pytest.mark.parametrize("kind", KINDS)
def test_finish_flushes_the_held_chunk(run: Run, rigs: list[Rig], tls: tuple[Contexts, Contexts],
                                       kind: str) -> None:
    async def body() -> None:
        rig = await open_rig(kind, tls, rigs)
        flow = rig.duplex.from_app
        filler = Filler(rig.app)
        await block(flow, filler)
        assert flow.pending is not None
        will_arrive = flow.moved + len(flow.pending)
        rig.duplex.finish(client_is_peer=False)
        got = await recv(rig.remote)  # the remote reads again: what was held, then the end
        assert len(got) == will_arrive
        assert got == filler.delivered[:will_arrive]
        await end(rig.remote)
        assert await recv(rig.app) == b""
        assert await rig.wait_closed() == ("closed", None)
        assert flow.moved == will_arrive

    run(body(), timeout=40)
