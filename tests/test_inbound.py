"""`proxy/inbound`: a listener's accepted peer is authenticated, authorized, then (only
then) the app is dialed and the bytes pumped.

Each test runs a real `Listener` with the inbound's acceptor on loopback, a caller using a
sidecar's client context, and "the app" as a listening socket the test owns, so what the
app saw (or that it saw nothing) is read from its accept queue.
"""

from __future__ import annotations

import socket
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
    records_of,
    runtime,
    sample,
    tls_peer,
    tls_read,
    tls_write,
    until,
)

from sidecar.config.schema import Address, InboundListener
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

    async def call(self, held: Held, ctx: Any) -> TlsEndpoint:
        near = socket.socket()
        held.append(near)
        near.setblocking(False)
        await self.rt.loop.sock_connect(near, ("127.0.0.1", self.listener.port))
        return tls_peer(held, near, ctx)


@asynccontextmanager
async def serving(ours: Identity, forward_to: int, *, allow: bool) -> AsyncIterator[Inbound]:
    """An inbound listener whose policy lets CLIENT_ID in (`allow`) or nobody."""
    name = fresh_name("in")
    policy = allowing(CLIENT_ID, name) if allow else DENY_ALL
    side = Inbound(runtime(ours, policy=policy), inbound_cfg(name, forward_to))
    try:
        yield side
    finally:
        side.listener.close()


def app_listening(held: Held) -> socket.socket:
    app = socket.create_server(("127.0.0.1", 0))
    held.append(app)
    app.setblocking(False)
    return app


def test_a_denied_caller_is_closed_before_the_app_is_dialed(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    async def body(held: Held) -> None:
        app = app_listening(held)
        async with serving(ours, app.getsockname()[1], allow=False) as side:
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
