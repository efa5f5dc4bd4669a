"""Inbound: remote workload -> mTLS -> authenticate -> authorize -> dial the app -> pump.

A denied caller is closed before the app is dialed: the app never sees it (Envoy's
network RBAC decides on the first byte, after the upstream is already open).

With `proxy_protocol: true` the app's first bytes are a PROXY v2 header (proxy_header.py
says what it holds): built before the dial from what the handshake learnt, written to the
fresh app socket before the pump exists, so it precedes every byte of the peer whichever
way the pump then moves them (through Python, or socket to socket with splice under kTLS),
and is written once.
"""

from __future__ import annotations

import asyncio
import socket

from sidecar.authn import Peer
from sidecar.config import InboundListener
from sidecar.endpoint import TcpEndpoint, close_with_reset
from sidecar.identity import Identity
from sidecar.modes import ListenerProtocol, SessionStore
from sidecar.observe import metrics
from sidecar.outcomes import Close, Direction
from sidecar.policy import Policy
from sidecar.proxy import authorize, http, proxy_header
from sidecar.proxy.connection import Record
from sidecar.proxy.handshake import secure
from sidecar.proxy.listener import AcceptCallback, dial
from sidecar.proxy.pump import Duplex
from sidecar.proxy.runtime import Runtime
from sidecar.reasons import Reason
from sidecar.tls.engine import TlsEndpoint

DIRECTION = Direction.INBOUND


def acceptor(rt: Runtime, cfg: InboundListener) -> AcceptCallback:
    def on_accept(sock: socket.socket, peer_addr: str) -> None:
        rec = rt.tracker.open(DIRECTION, cfg.name, peer_addr)
        rt.spawn(serve(rt, cfg, rec, sock), rec)

    return on_accept


async def serve(rt: Runtime, cfg: InboundListener, rec: Record, sock: socket.socket) -> None:
    contexts = rt.contexts
    try:
        ep = TlsEndpoint.server(contexts.server, sock,
                                http1=cfg.protocol is ListenerProtocol.HTTP)
    except OSError as exc:  # the peer reset between accept and wrap
        sock.close()
        rec.close, rec.detail = Close.ERROR, str(exc)
        rt.tracker.finish(rec)
        return
    peer = await secure(rt, rec, ep, contexts.identity)
    if peer is None:
        return
    ep.keep_session = contexts.session_store is SessionStore.MEMORY
    if cfg.protocol is ListenerProtocol.HTTP:
        http.serve(rt, cfg, rec, ep, peer.spiffe_id)  # decided request by request
        return
    policy = rt.policy
    if not authorize.admit(policy, peer.spiffe_id, rec).allowed:
        ep.shutdown_write()  # a close_notify: the caller reads an end, not a reset
        ep.close()
        rec.close = Close.DENIED
        rt.tracker.finish(rec)
        return
    header = None
    if cfg.proxy_protocol:
        try:
            header = proxy_header.encode(origin(ep, peer, rec, contexts.identity))
        except OSError as exc:  # the peer is gone already: it has no address any more
            ep.close()
            rec.close, rec.detail = Close.PEER_RESET, f"before the app was dialed: {exc}"
            rt.tracker.finish(rec)
            return
    try:
        app = await dial(cfg.forward_to, rt.limits.connect_timeout,
                         metrics.series(DIRECTION, cfg.name).dial)
    except (OSError, TimeoutError) as exc:
        ep.close()
        metrics.upstream_errors.labels(DIRECTION, cfg.name).inc()
        rec.reason, rec.close = Reason.UPSTREAM_UNAVAILABLE, Close.UPSTREAM_UNAVAILABLE
        rec.detail = f"cannot reach the app at {cfg.forward_to}: {exc or 'timed out'}"
        rt.tracker.finish(rec)
        return
    if header is not None:
        try:
            await send_all(rt.loop, app, header, rt.limits.connect_timeout)
        except (OSError, TimeoutError) as exc:
            close_with_reset(app)
            ep.close()
            rec.close = Close.APP_RESET if isinstance(exc, ConnectionError) else Close.ERROR
            rec.detail = (f"cannot send the PROXY header to the app at {cfg.forward_to}: "
                          f"{exc or 'timed out'}")
            rt.tracker.finish(rec)
            return
    # The policy changed while we dialed (or sent the header): a recheck could not see
    # this connection yet.
    if rt.policy is not policy:
        denial = authorize.recheck(rt.policy, peer.spiffe_id, cfg.name)
        if denial is not None:
            authorize.revoke(rt.policy, rec, denial)
            app.close()
            ep.close()
            rt.tracker.finish(rec)
            return
    duplex = Duplex(rt.loop, TcpEndpoint(app), ep, rt.tracker.closed)
    rt.tracker.attach(rec, duplex)
    duplex.start()


def origin(ep: TlsEndpoint, peer: Peer, rec: Record, identity: Identity
           ) -> proxy_header.Origin:
    """What the PROXY header tells the app of this connection, from its sockets and its
    handshake. OSError when the peer is gone (no address to give)."""
    source = ep.sock.getpeername()
    destination = ep.sock.getsockname()
    leaf = ep.peer_leaf()
    cn = proxy_header.common_name_of(leaf) if leaf else None
    sig_alg, key_alg = _own_algorithms(identity)
    tls = proxy_header.TlsFacts(
        version=rec.tls_version or "", cipher=rec.cipher, resumed=bool(rec.resumed),
        common_name=cn, sig_alg=sig_alg, key_alg=key_alg)
    alpn = ep.alpn()
    return proxy_header.Origin(
        source=(source[0], source[1]), destination=(destination[0], destination[1]),
        spiffe_id=str(peer.spiffe_id), tls=tls, authority=ep.server_name(),
        alpn=alpn.encode() if alpn else None, unique_id=rec.id)


# Our own certificate's algorithms change only with the identity snapshot: named once.
_own: tuple[Identity, tuple[str | None, str | None]] | None = None


def _own_algorithms(identity: Identity) -> tuple[str | None, str | None]:
    global _own
    if _own is None or _own[0] is not identity:
        _own = (identity, proxy_header.own_algorithms(identity.leaf))
    return _own[1]


async def send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes,
                   timeout: float) -> None:
    """Write all of `data` to a non-blocking socket within `timeout` seconds. A fresh
    connection's send buffer is empty, so a header goes in the first send, with no timer
    armed; the rest, when there is a rest, is the loop's sock_sendall (the socket goes to
    the loop's own registrations next anyway: the pump's)."""
    try:
        sent = sock.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    if sent < len(data):
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, memoryview(data)[sent:])


def recheck_live(rt: Runtime, policy: Policy) -> int:
    """Close the live inbound connections `policy` denies (Envoy decides only once); how
    many it closed."""
    closed = 0
    for duplex, rec in list(rt.tracker.live.items()):
        if rec.direction != DIRECTION or isinstance(duplex, http.Session):
            continue  # an http session asks the policy in force at each request
        denial = authorize.recheck(policy, rec.peer_id, rec.listener, rec.request)
        if denial is None:
            continue
        authorize.revoke(policy, rec, denial)
        duplex.abort(Close.POLICY_RECHECK)
        closed += 1
    return closed
