"""Inbound: remote workload -> mTLS -> authenticate -> authorize -> dial the app -> pump.

A denied caller is closed before the app is dialed: the app never sees it (Envoy's
network RBAC decides on the first byte, after the upstream is already open).
"""

from __future__ import annotations

import socket

from sidecar.config import InboundListener
from sidecar.endpoint import TcpEndpoint
from sidecar.modes import ListenerProtocol, SessionStore
from sidecar.observe import metrics
from sidecar.outcomes import Close, Direction
from sidecar.policy import Policy
from sidecar.proxy import authorize, http
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
    # The policy changed while we dialed: a recheck could not see this connection yet.
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
