"""The outbound's session cache (issue 15): a failed resumption never strands a route.

The outbound's `serve` runs in this process against a real TLS echo server on loopback
(asyncio's own SSL, so the server side is not ours), with the app's end a real socket
pair. Our side is a federated identity, so an issuer this process has not learned is a
reason to refuse a resumed server (without federation it is not: authn.py).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from sidecar.authn import Authenticator
from sidecar.config.schema import Address, Limits, OutboundListener
from sidecar.identity import Identity, load_identity
from sidecar.policy.model import DENY_ALL
from sidecar.proxy import outbound
from sidecar.proxy.connection import Tracker
from sidecar.proxy.runtime import Runtime
from sidecar.spiffe import SpiffePattern
from sidecar.tls import contexts, resumption
from sidecar.tools import pki
from sidecar.tools.pki import CA

pytestmark = pytest.mark.timeout(30)

TD = "example.org"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/payments"
CLIENT_ID = f"spiffe://{TD}/ns/web/sa/frontend"
BUDGET = 5.0


@pytest.fixture(scope="module")
def root() -> CA:
    return pki.new_root(TD)


def _identity(d: Path, svid: pki.Svid, root: CA) -> Identity:
    files = pki.write_svid(d, svid, [root.cert])
    (d / "other.pem").write_bytes(pki.certs_pem([pki.new_root("other.org").cert]))
    return load_identity(d / files.cert, d / files.key, d / files.bundle,
                         {"other.org": d / "other.pem"})


@pytest.fixture
def ours(root: CA, tmp_path: Path) -> Identity:
    return _identity(tmp_path, pki.issue_svid(pki.new_intermediate(root), CLIENT_ID), root)


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _refuse_resumed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """As a server refusing a resumed peer after the handshake: close, say nothing."""
    obj = writer.get_extra_info("ssl_object")
    if obj is not None and obj.session_reused:
        writer.close()
        return
    await _echo(reader, writer)


Start = Callable[[Serve], Awaitable[int]]


@pytest.fixture
async def upstream(root: CA, tmp_path: Path) -> AsyncIterator[Start]:
    """Starts TLS servers with an SVID from a second intermediate of our root."""
    d = tmp_path / "server"
    d.mkdir()
    server_id = _identity(d, pki.issue_svid(pki.new_intermediate(root, name="spire-2"),
                                            SERVER_ID), root)
    servers: list[asyncio.Server] = []

    async def start(handler: Serve) -> int:
        srv = await asyncio.start_server(handler, "127.0.0.1", 0,  # type: ignore[arg-type]
                                         ssl=contexts.build(server_id).server)
        servers.append(srv)
        port: int = srv.sockets[0].getsockname()[1]
        return port

    yield start
    for srv in servers:
        srv.close()
        await srv.wait_closed()


@pytest.fixture
def apps() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for s in held:
        s.close()


def _runtime(ours: Identity) -> Runtime:
    loop = asyncio.get_running_loop()
    tracker = Tracker(loop, max_connections=100, max_pending_handshakes=100,
                      idle_timeout=60.0, max_lifetime=0.0)
    rt = Runtime(loop, contexts.build(ours), DENY_ALL, Limits(), tracker)
    rt.authn.learn(ours)
    return rt


async def _call(rt: Runtime, cfg: OutboundListener, apps: list[socket.socket]) -> bytes:
    """One app connection through the outbound: send, read the echo (or the end), close.
    (No half-close: asyncio's SSL server ends the whole connection at a close_notify.)"""
    near, far = socket.socketpair()
    apps += [near, far]
    near.setblocking(False)
    far.setblocking(False)
    rec = rt.tracker.open(outbound.DIRECTION, cfg.name, "test")
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(BUDGET):
        task = loop.create_task(outbound.serve(rt, cfg, rec, far))
        await loop.sock_sendall(near, b"ping")
        got = b""
        while len(got) < 4 and (data := await loop.sock_recv(near, 1024)):
            got += data
        await task
        near.close()
        while not rec.finished:  # the pump's close callback keeps the session
            await asyncio.sleep(0.01)
    return got


async def _route(upstream: Start, handler: Serve, ours: Identity,
                 apps: list[socket.socket]) -> tuple[Runtime, OutboundListener]:
    """A route to a server running `handler`, with a session kept from a first call."""
    port = await upstream(handler)
    rt = _runtime(ours)
    cfg = OutboundListener("out", Address("127.0.0.1", 0), Address("127.0.0.1", port), "",
                           (SpiffePattern.parse(SERVER_ID),))
    assert await _call(rt, cfg, apps) == b"ping"
    assert "out" in rt.sessions
    return rt, cfg


async def test_our_refusal_of_a_resumed_server_is_redialed_unseen_by_the_app(
    ours: Identity, upstream: Start, apps: list[socket.socket],
) -> None:
    rt, cfg = await _route(upstream, _echo, ours, apps)
    kept = rt.sessions["out"]
    # A process that has not learned the server's intermediate (another worker, say).
    rt.authn = Authenticator()
    rt.authn.learn(ours)
    assert await _call(rt, cfg, apps) == b"ping"  # unseen: a full handshake followed
    assert rt.sessions["out"].session is not kept.session
    assert await _call(rt, cfg, apps) == b"ping"


async def test_a_resumed_session_the_server_refused_is_not_offered_again(
    ours: Identity, upstream: Start, apps: list[socket.socket],
) -> None:
    rt, cfg = await _route(upstream, _refuse_resumed, ours, apps)
    assert await _call(rt, cfg, apps) == b""  # refused after the handshake: one call lost
    assert "out" not in rt.sessions  # ... and only one: the next one is a full handshake
    assert await _call(rt, cfg, apps) == b"ping"


def test_a_session_is_offered_only_while_what_it_proved_is_valid(ours: Identity) -> None:
    ctx = contexts.build(ours).client
    other = contexts.build(ours).client
    session = object()
    now = time.time()
    kept = resumption.ClientSession(ctx, session, now + 60)  # type: ignore[arg-type]
    assert resumption.to_offer(kept, ctx, now) is session
    assert resumption.to_offer(kept, other, now) is None  # made under another trust
    assert resumption.to_offer(kept, ctx, now + 60 - resumption.OFFER_MARGIN) is None
    assert resumption.to_offer(None, ctx, now) is None
