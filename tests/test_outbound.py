"""`proxy/outbound`: the app's connection is carried to the remote over mTLS, to the
server the route expects, resuming where it can, and a refusal either way is counted.

Our side is `outbound.serve` with a real Runtime, whose identity is federated with
other.org (so an issuer this process has not learned is a reason to refuse a resumed
server: authn.py). The remote is a TLS echo server on loopback with a context of
its own identity (on our engine); the app is the near end of a loopback TCP connection.
(tests/test_outbound_sessions.py covers the session cache's rules on their own.)
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from orchestrators import (
    CLIENT_ID,
    OTHER_TD,
    SERVER_ID,
    TD,
    Held,
    Trust,
    fresh_name,
    handshake_errors,
    handshakes,
    holding,
    identity,
    outbound_cfg,
    runtime,
    tcp,
    tls_read,
    tls_write,
    until,
)

from sidecar.authn import Authenticator
from sidecar.identity import Identity
from sidecar.proxy import outbound
from sidecar.proxy.connection import Record
from sidecar.proxy.runtime import Runtime
from sidecar.reasons import Reason
from sidecar.tls import contexts
from sidecar.tls.engine import TlsEndpoint
from sidecar.tools import pki

pytestmark = pytest.mark.timeout(60)

STRANGER_ID = f"spiffe://{OTHER_TD}/ns/default/sa/stranger"


@dataclass(frozen=True, slots=True)
class Ids:
    ours: Identity  # example.org, federated with other.org
    server: Identity  # example.org, from another intermediate than ours
    stranger: Identity  # other.org, which does not trust example.org


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Ids:
    t = Trust.new()
    d = tmp_path_factory.mktemp("ids")
    return Ids(
        identity(d / "ours", pki.issue_svid(t.issuer, CLIENT_ID), t.root,
                 {OTHER_TD: t.other_root}),
        identity(d / "server", pki.issue_svid(pki.new_intermediate(t.root, name="spire-2"),
                                              SERVER_ID), t.root),
        identity(d / "stranger", pki.issue_svid(t.other_issuer, STRANGER_ID), t.other_root),
    )


@dataclass(slots=True)
class Remote:
    """A TLS echo server on our engine; per connection it served: `heard` is what it
    received and `resumed` whether the handshake resumed a session. (Not asyncio's TLS
    server: on uvloop, uvloop's TLS transport with a server context from `tls.contexts`
    never delivered the app's bytes; with a plain ssl context it did.)"""

    ctx: ssl.SSLContext
    listening: socket.socket
    heard: list[bytes] = field(default_factory=list)
    resumed: list[bool] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        port: int = self.listening.getsockname()[1]
        return port

    def accept(self) -> None:
        try:
            sock, _ = self.listening.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        task = asyncio.get_running_loop().create_task(self.serve(sock))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, sock: socket.socket) -> None:
        ep = TlsEndpoint.server(self.ctx, sock)
        try:
            await ep.handshake()
            self.resumed.append(ep.resumed())
            self.heard.append(b"")
            while data := await tls_read(ep):
                self.heard[-1] += data
                await tls_write(ep, data)
            ep.shutdown_write()
        except (OSError, ValueError, EOFError):
            pass  # a refused handshake, or a peer gone
        finally:
            ep.close()


@asynccontextmanager
async def remote(ident: Identity) -> AsyncIterator[Remote]:
    loop = asyncio.get_running_loop()
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    r = Remote(contexts.build(ident).server, listening)
    loop.add_reader(listening.fileno(), r.accept)
    try:
        yield r
    finally:
        loop.remove_reader(listening.fileno())
        listening.close()
        for task in list(r.tasks):
            task.cancel()


async def call(rt: Runtime, name: str, port: int, held: Held, *,
               expect: tuple[str, ...] = (SERVER_ID,)) -> tuple[bytes, Record]:
    """One app connection through the outbound: send, read the echo (or the connection's
    end), close; returns what came back and the connection's record."""
    loop = rt.loop
    app, ours = tcp(held)
    rec = rt.tracker.open(outbound.DIRECTION, name, "test")
    task = loop.create_task(outbound.serve(rt, outbound_cfg(name, port, expect), rec, ours))
    await loop.sock_sendall(app, b"ping")
    got = b""
    try:
        while len(got) < 4 and (data := await loop.sock_recv(app, 1024)):
            got += data
    except ConnectionResetError:
        pass  # closed with our ping unread: the app reads a reset, an end as well
    await task
    app.close()
    await until(lambda: rec.finished, "the connection to end")
    return got, rec


def test_a_server_that_is_not_the_one_expected_is_refused_before_a_byte_is_sent(
    run: Callable[..., Any], ids: Ids,
) -> None:
    name = fresh_name("out-expect")

    async def body(held: Held) -> None:
        rt = runtime(ids.ours)
        async with remote(ids.server) as r:
            got, rec = await call(rt, name, r.port, held,
                                  expect=(f"spiffe://{TD}/ns/default/sa/someone-else",))
            assert got == b""
            await until(lambda: r.heard, "the server to see the connection end")
        assert r.heard == [b""]  # the app's ping never left
        assert rec.reason is Reason.SPIFFE_ID_MISMATCH and SERVER_ID in (rec.detail or "")
        assert str(rec.close) == "handshake_failed" and str(rec.peer_id) == SERVER_ID
        assert handshake_errors("outbound", name, "spiffe_id_mismatch") == 1
        assert handshakes("outbound", name, "error", False) == 1
        assert handshakes("outbound", name, "ok", False) == 0

    run(holding(body))


def test_the_next_connection_resumes_the_session_of_the_last(
    run: Callable[..., Any], ids: Ids,
) -> None:
    name = fresh_name("out-resume")

    async def body(held: Held) -> None:
        rt = runtime(ids.ours)
        async with remote(ids.server) as r:
            got, first = await call(rt, name, r.port, held)
            assert got == b"ping" and first.resumed is False
            kept = rt.sessions[name]
            got, second = await call(rt, name, r.port, held)
            assert got == b"ping" and second.resumed is True
            assert rt.sessions[name] is kept  # a resumption brings no new session
        assert r.resumed == [False, True] and r.heard == [b"ping", b"ping"]
        assert str(second.peer_id) == SERVER_ID
        assert handshakes("outbound", name, "ok", False) == 1
        assert handshakes("outbound", name, "ok", True) == 1

    run(holding(body))


def test_our_refusal_of_a_resumed_server_is_counted_and_redialed_in_full(
    run: Callable[..., Any], ids: Ids,
) -> None:
    name = fresh_name("out-redial")

    async def body(held: Held) -> None:
        rt = runtime(ids.ours)
        async with remote(ids.server) as r:
            assert (await call(rt, name, r.port, held))[0] == b"ping"
            kept = rt.sessions[name]
            # A process that has not learned the server's intermediate (another worker).
            rt.authn = Authenticator()
            rt.authn.learn(ids.ours)
            got, rec = await call(rt, name, r.port, held)
            assert got == b"ping"  # the app saw one connection, not the refused one
            assert rt.sessions[name].session is not kept.session
        assert r.resumed == [False, True, False]
        assert r.heard == [b"ping", b"", b"ping"]
        assert rec.resumed is False and rec.reason is None and str(rec.close) == "closed"
        assert rec.detail and rec.detail.startswith("resumption refused, then a full handshake")
        assert handshakes("outbound", name, "error", True) == 1
        assert handshake_errors("outbound", name, "unknown_ca") == 1
        assert handshakes("outbound", name, "ok", False) == 2

    run(holding(body))


def test_a_server_refusing_our_certificate_is_a_handshake_failure_not_an_ok(
    run: Callable[..., Any], ids: Ids,
) -> None:
    """In TLS 1.3 our handshake ends before the server reads our certificate: its refusal
    arrives as an alert on our first read, and only then is the handshake counted."""
    name = fresh_name("out-refused")

    async def body(held: Held) -> None:
        rt = runtime(ids.ours)
        async with remote(ids.stranger) as r:
            got, rec = await call(rt, name, r.port, held, expect=(STRANGER_ID,))
        assert got == b"" and r.heard == []  # its handshake failed: no connection served
        assert str(rec.close) == "handshake_failed" and rec.reason is Reason.UNKNOWN_CA
        assert rec.detail and "after our side of the TLS 1.3 handshake" in rec.detail
        assert handshake_errors("outbound", name, "unknown_ca") == 1
        assert handshakes("outbound", name, "error", False) == 1
        assert handshakes("outbound", name, "ok", False) == 0
        assert name not in rt.sessions

    run(holding(body))


def test_an_unreachable_remote_is_an_upstream_error(run: Callable[..., Any], ids: Ids) -> None:
    name = fresh_name("out-down")

    async def body(held: Held) -> None:
        rt = runtime(ids.ours)
        closed = socket.socket()  # bound, not listening: a connect is refused
        held.append(closed)
        closed.bind(("127.0.0.1", 0))
        got, rec = await call(rt, name, closed.getsockname()[1], held)
        assert got == b""
        assert (rec.reason, str(rec.close)) == (Reason.UPSTREAM_UNAVAILABLE,
                                                "upstream_unavailable")
        assert rt.tracker.active == 0

    run(holding(body))


