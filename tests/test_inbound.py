"""`proxy/inbound`: a listener's accepted peer is authenticated, authorized, then (only
then) the app is dialed and the bytes pumped.

Each test runs a real `Listener` with the inbound's acceptor on loopback, a caller using a
sidecar's client context, and "the app" as a listening socket the test owns, so what the
app saw (or that it saw nothing) is read from its accept queue.

With `proxy_protocol: true` the app's stream is read back by the `proxy-protocol` package
from PyPI (its asyncio reader), which must find a v2 header first and then exactly the
peer's bytes.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import socket
import sys
import termios
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from orchestrators import (
    CLIENT_ID,
    Held,
    allowing,
    client_ctx,
    fresh_name,
    holding,
    inbound_cfg,
    peer_says,
    read_all,
    records_of,
    runtime,
    sample,
    tcp,
    tls_peer,
    tls_read,
    tls_write,
    until,
)
from proxyprotocol.reader import ProxyProtocolReader
from proxyprotocol.result import ProxyResult
from proxyprotocol.v2 import ProxyProtocolV2

from sidecar.config.schema import Address, InboundListener
from sidecar.endpoint import close_with_reset
from sidecar.identity import Identity
from sidecar.policy.model import DENY_ALL
from sidecar.proxy import inbound
from sidecar.proxy.listener import Listener
from sidecar.proxy.runtime import Runtime
from sidecar.tls.engine import TlsEndpoint

pytestmark = pytest.mark.timeout(60)


class Inbound:
    """A Runtime with one inbound listener; `records` are its connections, as opened."""

    def __init__(self, rt: Runtime, cfg: InboundListener) -> None:
        self.rt, self.cfg = rt, cfg
        self.records = records_of(rt)
        on_accept = inbound.acceptor(rt, cfg)
        self.listener = Listener(rt.loop, cfg.name, inbound.DIRECTION, cfg.listen, on_accept)
        self.listener.resume()

    async def call(self, held: Held, ctx: Any, *, server_name: str | None = None,
                   session: Any = None) -> TlsEndpoint:
        host = self.cfg.listen.host
        near = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        held.append(near)
        near.setblocking(False)
        await self.rt.loop.sock_connect(near, (host, self.listener.port))
        return tls_peer(held, near, ctx, session, server_name)


@asynccontextmanager
async def serving(ours: Identity, forward_to: int, *, allow: bool, host: str = "127.0.0.1",
                  proxy_protocol: bool = False) -> AsyncIterator[Inbound]:
    """An inbound listener whose policy lets CLIENT_ID in (`allow`) or nobody."""
    name = fresh_name("in")
    policy = allowing(CLIENT_ID, name) if allow else DENY_ALL
    cfg = inbound_cfg(name, forward_to, host=host, proxy_protocol=proxy_protocol)
    side = Inbound(runtime(ours, policy=policy), cfg)
    try:
        yield side
    finally:
        side.listener.close()


def app_listening(held: Held) -> socket.socket:
    app = socket.create_server(("127.0.0.1", 0))
    held.append(app)
    app.setblocking(False)
    return app


@asynccontextmanager
async def serving_app(held: Held, ours: Identity, **kw: Any
                      ) -> AsyncIterator[tuple[Inbound, socket.socket]]:
    """`serving` in front of a listening app socket (which `held` closes)."""
    app = app_listening(held)
    async with serving(ours, app.getsockname()[1], **kw) as side:
        yield side, app


def test_a_denied_caller_is_closed_before_the_app_is_dialed(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    async def body(held: Held) -> None:
        async with serving_app(held, ours, allow=False) as (side, app):
            said = await peer_says(await side.call(held, client_ctx(caller)))
            assert said == b""  # a close_notify: an end, not a reset
            await until(lambda: side.records and side.records[0].finished, "the end")
            rec = side.records[0]
            assert (str(rec.peer_id), rec.decision, str(rec.close)) == (CLIENT_ID, "deny", "denied")
            assert sample("sidecar_authz_decisions_total", listener=side.cfg.name,
                          decision="deny", rule="no_policy") == 1
        with pytest.raises(BlockingIOError):
            app.accept()  # the app's accept queue is empty: it never saw the caller

    run(holding(body))


def test_an_allowed_caller_reaches_the_app_both_ways(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    async def body(held: Held) -> None:
        app = app_listening(held)
        port = app.getsockname()[1]
        async with serving(ours, port, allow=True) as side:
            loop = side.rt.loop
            cli = await side.call(held, client_ctx(caller))
            await cli.handshake()
            await tls_write(cli, b"hello app")
            conn, _ = await loop.sock_accept(app)
            held.append(conn)
            got = b""
            while len(got) < 9:
                got += await loop.sock_recv(conn, 64)
            assert got == b"hello app"
            await loop.sock_sendall(conn, b"hello peer")
            conn.shutdown(socket.SHUT_WR)
            got = b""
            while data := await tls_read(cli):
                got += data
            assert got == b"hello peer"
            cli.shutdown_write()
            await until(lambda: side.records[0].finished, "the connection to end")
            rec = side.records[0]
            assert (rec.decision, rec.rule, str(rec.close)) == ("allow", "let-in", "closed")
            fields = rec.fields(None)
            assert fields["peer_id"] == CLIENT_ID
            assert sample("sidecar_bytes_total", direction="inbound", listener=side.cfg.name,
                          flow="to_app") == 9
            assert sample("sidecar_bytes_total", direction="inbound", listener=side.cfg.name,
                          flow="from_app") == 10

    run(holding(body))


def test_an_unreachable_app_is_an_upstream_error(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    async def body(held: Held) -> None:
        closed = socket.socket()  # bound, not listening: a connect is refused
        held.append(closed)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        async with serving(ours, port, allow=True) as side:
            said = await peer_says(await side.call(held, client_ctx(caller)))
            assert isinstance(said, EOFError) or said == b"", said  # an end, no app
            await until(lambda: side.records and side.records[0].finished, "the end")
            rec = side.records[0]
            assert (rec.decision, str(rec.reason), str(rec.close)) == (
                "allow", "upstream_unavailable", "upstream_unavailable")
            assert rec.detail and str(Address("127.0.0.1", port)) in rec.detail
            assert sample("sidecar_upstream_errors_total", direction="inbound",
                          listener=side.cfg.name) == 1
            assert sample("sidecar_handshakes_total", direction="inbound",
                          listener=side.cfg.name, result="ok", resumed="false") == 1

    run(holding(body))


# --- proxy_protocol: true ---------------------------------------------------------------------


async def proxied(raw: bytes) -> tuple[ProxyResult, bytes]:
    """The app's whole stream read by the PyPI parser: its header, and what follows."""
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    result = await ProxyProtocolReader(ProxyProtocolV2()).read(reader)
    return result, await reader.read()


async def one_call(side: Inbound, held: Held, app: socket.socket, cli: TlsEndpoint,
                   payload: bytes) -> bytes:
    """The caller sends `payload` and its end right after the handshake, before the app
    has accepted; what the app then reads, whole. The app then ends its side too."""
    await cli.handshake()
    await tls_write(cli, payload)
    cli.shutdown_write()
    conn, _ = await side.rt.loop.sock_accept(app)
    held.append(conn)
    got = await read_all(side.rt.loop, conn)
    conn.shutdown(socket.SHUT_WR)
    return got


async def proxied_call(side: Inbound, held: Held, app: socket.socket, cli: TlsEndpoint,
                       payload: bytes) -> tuple[ProxyResult, bytes]:
    """`one_call`, its stream read by the PyPI parser (`proxied`)."""
    return await proxied(await one_call(side, held, app, cli, payload))


def test_the_app_reads_a_proxy_header_first_and_then_only_the_peers_bytes(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    async def body(held: Held) -> None:
        async with serving_app(held, ours, allow=True, proxy_protocol=True) as (side, app):
            cli = await side.call(held, client_ctx(caller))
            caller_addr = cli.sock.getsockname()
            raw = await one_call(side, held, app, cli, b"hello app")
            result, rest = await proxied(raw)
            assert rest == b"hello app"  # the header came once, before every peer byte
            assert result.source == (ipaddress.ip_address(caller_addr[0]), caller_addr[1])
            assert result.dest == (ipaddress.ip_address("127.0.0.1"), side.listener.port)
            tlv = result.tlv
            assert tlv[0xE0] == CLIENT_ID.encode()
            await until(lambda: side.records and side.records[0].finished, "the end")
            rec = side.records[0]
            assert tlv.unique_id == rec.id.encode()
            assert tlv.authority is None and tlv.alpn is None  # none was sent
            ssl = tlv.ssl
            assert (ssl.has_ssl, ssl.has_cert_conn, ssl.has_cert_sess, ssl.verify) == (
                True, True, True, 0)
            assert (ssl.version, ssl.cipher) == ("TLSv1.3", rec.cipher)
            assert (ssl.sig_alg, ssl.key_alg) == ("SHA256", "EC256")  # our P-256 SVID
            assert ssl.cn is None  # the dev SVIDs carry no Common Name
            assert sample("sidecar_bytes_total", direction="inbound", listener=side.cfg.name,
                          flow="to_app") == len(b"hello app")  # the peer's bytes only

    run(holding(body))


def test_an_ipv6_caller_is_told_as_ipv6(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    async def body(held: Held) -> None:
        async with serving_app(held, ours, allow=True, host="::1",
                               proxy_protocol=True) as (side, app):
            cli = await side.call(held, client_ctx(caller))
            caller_port = cli.sock.getsockname()[1]
            result, rest = await proxied_call(side, held, app, cli, b"six")
            assert rest == b"six"
            assert result.source == (ipaddress.IPv6Address("::1"), caller_port)
            assert result.dest == (ipaddress.IPv6Address("::1"), side.listener.port)
            assert result.tlv[0xE0] == CLIENT_ID.encode()

    run(holding(body))


def test_the_sni_and_alpn_the_caller_negotiated_reach_the_app(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    async def body(held: Held) -> None:
        async with serving_app(held, ours, allow=True, proxy_protocol=True) as (side, app):
            # Our server negotiates no ALPN of its own (a TCP proxy does not know the app's
            # protocols); a server context that does shows what the header then carries.
            side.rt.contexts.server.set_alpn_protocols(["h2"])
            ctx = client_ctx(caller)
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            cli = await side.call(held, ctx, server_name="payments.default.svc")
            result, rest = await proxied_call(side, held, app, cli, b"x")
            assert rest == b"x"
            assert result.tlv.authority == "payments.default.svc"
            assert result.tlv.alpn == b"h2"

    run(holding(body))


def test_a_resumed_caller_sent_its_certificate_with_the_session_not_this_connection(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    async def body(held: Held) -> None:
        async with serving_app(held, ours, allow=True, proxy_protocol=True) as (side, app):
            ctx = client_ctx(caller)
            session = None
            for resumed in (False, True):
                cli = await side.call(held, ctx, session=session)
                result, _ = await proxied_call(side, held, app, cli, b"r")
                while await tls_read(cli):  # to the end: the ticket comes on the way
                    pass
                session = cli.new_session()
                assert session is not None or resumed
                ssl = result.tlv.ssl
                assert (ssl.has_cert_conn, ssl.has_cert_sess, ssl.verify) == (
                    not resumed, True, 0)
                assert result.tlv[0xE0] == CLIENT_ID.encode()
            await until(lambda: len(side.records) == 2 and side.records[1].finished, "both")
            assert [r.resumed for r in side.records] == [False, True]

    run(holding(body))


def test_a_denied_caller_causes_no_dial_so_no_header(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    async def body(held: Held) -> None:
        async with serving_app(held, ours, allow=False, proxy_protocol=True) as (side, app):
            said = await peer_says(await side.call(held, client_ctx(caller)))
            assert said == b""
            await until(lambda: side.records and side.records[0].finished, "the end")
            assert str(side.records[0].close) == "denied"
        with pytest.raises(BlockingIOError):
            app.accept()

    run(holding(body))


def test_without_proxy_protocol_the_app_reads_only_the_peers_bytes(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    async def body(held: Held) -> None:
        async with serving_app(held, ours, allow=True) as (side, app):
            cli = await side.call(held, client_ctx(caller))
            assert await one_call(side, held, app, cli, b"just this") == b"just this"

    run(holding(body))


# --- send_all: the header's write to the app ------------------------------------------------


def test_send_all_writes_what_the_socket_takes_later_once_the_reader_drains(
    run: Callable[..., Any],
) -> None:
    async def body(held: Held) -> None:
        near, far = tcp(held, rcvbuf=4096, sndbuf=4096)
        loop = asyncio.get_running_loop()
        data = bytes(range(256)) * 4096  # 1 MiB: far more than the buffers hold
        task = loop.create_task(inbound.send_all(loop, far, data, 5.0))
        await until(lambda: _unsent(far) > 0, "the send buffer to fill")
        assert not task.done()  # it waits for the socket, not a busy loop
        assert await read_all(loop, near, len(data)) == data
        await task

    run(holding(body))


def test_send_all_gives_up_after_its_timeout(run: Callable[..., Any]) -> None:
    async def body(held: Held) -> None:
        _, far = tcp(held, rcvbuf=4096, sndbuf=4096)  # a reader that never reads
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await inbound.send_all(loop, far, bytes(8 << 20), 0.2)

    run(holding(body))


def test_send_all_to_a_reset_app_raises_a_connection_error(run: Callable[..., Any]) -> None:
    async def body(held: Held) -> None:
        near, far = tcp(held)
        close_with_reset(near)  # on loopback the reset has reached far when this returns
        with pytest.raises(ConnectionError):
            await inbound.send_all(asyncio.get_running_loop(), far, b"header", 1.0)

    run(holding(body))


def _unsent(sock: socket.socket) -> int:
    """Bytes queued in sock's send buffer (SIOCOUTQ)."""
    out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(out, sys.byteorder)
