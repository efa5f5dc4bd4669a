"""Outbound: local app (plaintext on loopback) -> dial the remote -> mTLS with our SVID ->
check the server's SPIFFE ID against the route -> pump.

The server is authenticated by SPIFFE ID, not DNS name: an SVID need not carry one.
Sessions are cached per route so the next connection resumes; in TLS 1.3 the ticket
arrives after the handshake, so the session is taken when the connection ends.
"""

from __future__ import annotations

import socket

from sidecar import metrics
from sidecar.config import OutboundListener
from sidecar.endpoint import TcpEndpoint
from sidecar.proxy.connection import Record
from sidecar.proxy.handshake import secure
from sidecar.proxy.listener import AcceptCallback, dial
from sidecar.proxy.pump import Duplex
from sidecar.proxy.runtime import Runtime
from sidecar.reasons import Reason
from sidecar.tls.engine import TlsEndpoint

DIRECTION = "outbound"


def acceptor(rt: Runtime, cfg: OutboundListener) -> AcceptCallback:
    def on_accept(sock: socket.socket, peer_addr: str) -> None:
        rec = rt.tracker.open(DIRECTION, cfg.name, peer_addr)
        rt.spawn(serve(rt, cfg, rec, sock), rec)

    return on_accept


async def serve(rt: Runtime, cfg: OutboundListener, rec: Record, app: socket.socket) -> None:
    contexts = rt.contexts
    try:
        raw = await dial(cfg.connect_to, rt.limits.connect_timeout)
    except (OSError, TimeoutError) as exc:
        app.close()
        metrics.upstream_errors.labels(DIRECTION, cfg.name).inc()
        rec.reason, rec.close = Reason.UPSTREAM_UNAVAILABLE, "upstream_unavailable"
        rec.detail = f"cannot reach {cfg.connect_to}: {exc or 'timed out'}"
        rt.tracker.finish(rec)
        return
    cached = rt.sessions.get(cfg.name) if rt.session_resumption else None
    # A session made under an identity or trust we no longer hold must not resume.
    session = cached[1] if cached and cached[0] is contexts.client else None
    try:
        ep = TlsEndpoint.client(contexts.client, raw, cfg.server_name or None, session)
    except OSError as exc:
        raw.close()
        app.close()
        rec.close, rec.detail = "error", str(exc)
        rt.tracker.finish(rec)
        return
    peer = await secure(rt, rec, ep, contexts.identity, expect=cfg.expect_ids)
    if peer is None:
        app.close()
        return

    def closed(duplex: Duplex, how: str, exc: BaseException | None) -> None:
        s = ep.new_session() if rt.session_resumption else None  # never idly: it leaks
        if s is not None and s.has_ticket:
            rt.sessions[cfg.name] = (contexts.client, s)
        rt.tracker.closed(duplex, how, exc)

    duplex = Duplex(rt.loop, TcpEndpoint(app), ep, closed)
    rt.tracker.attach(rec, duplex)
    duplex.start()
