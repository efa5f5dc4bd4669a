"""Outbound: local app (plaintext on loopback) -> dial the remote -> mTLS with our SVID ->
check the server's SPIFFE ID against the route -> pump.

The server is authenticated by SPIFFE ID, not DNS name: an SVID need not carry one.
Sessions are cached per route so the next connection resumes; in TLS 1.3 the ticket
arrives after the handshake, so the session is taken when the connection ends.

A failed resumption never strands a route: a session is offered only while the chains it
proved are valid (resumption.py), and a session that fails is never offered again. When
our own re-check refuses the resumed server, nothing has reached the app yet, so we redial
at once with a full handshake, unseen by the app. When the server refuses us after a
resumed handshake (TLS 1.3 lets it do so only after our side has finished), the connection
ends without a byte from the server: that session is dropped, and the next connection
makes a full handshake. (A server that never speaks costs a full handshake per connection
that way; a route that stays down costs more.)
"""

from __future__ import annotations

import socket
import ssl
import time

from sidecar import authn
from sidecar.authn import Peer
from sidecar.config import OutboundListener
from sidecar.endpoint import TcpEndpoint
from sidecar.observe import metrics
from sidecar.outcomes import Close, Direction
from sidecar.proxy.connection import Record
from sidecar.proxy.handshake import ResumptionRefused, judged, secure
from sidecar.proxy.listener import AcceptCallback, dial
from sidecar.proxy.pump import Duplex
from sidecar.proxy.runtime import Runtime
from sidecar.reasons import Reason
from sidecar.tls import resumption
from sidecar.tls.contexts import Contexts
from sidecar.tls.engine import TlsEndpoint

DIRECTION = Direction.OUTBOUND


def acceptor(rt: Runtime, cfg: OutboundListener) -> AcceptCallback:
    def on_accept(sock: socket.socket, peer_addr: str) -> None:
        rec = rt.tracker.open(DIRECTION, cfg.name, peer_addr)
        rt.spawn(serve(rt, cfg, rec, sock), rec)

    return on_accept


async def serve(rt: Runtime, cfg: OutboundListener, rec: Record, app: socket.socket) -> None:
    contexts = rt.contexts
    offered = _session_to_offer(rt, cfg.name, contexts)
    try:
        link = await _connect(rt, cfg, rec, contexts, offered)
    except ResumptionRefused as exc:
        _drop_session(rt, cfg.name, offered)
        link = await _connect(rt, cfg, rec, contexts, None, why=str(exc))
    if link is None:
        app.close()
        return
    ep, peer, own_until = link
    resumed = offered if offered is not None and ep.resumed() else None

    def closed(duplex: Duplex, how: Close, exc: BaseException | None) -> None:
        judged(rec, ep, exc)  # TLS 1.3: a server that refused us says so only now
        _after_connection(rt, cfg.name, contexts, ep, peer, resumed, own_until, duplex)
        rt.tracker.closed(duplex, how, exc)

    duplex = Duplex(rt.loop, TcpEndpoint(app), ep, closed)
    rt.tracker.attach(rec, duplex)
    duplex.start()


async def _connect(
    rt: Runtime, cfg: OutboundListener, rec: Record, contexts: Contexts,
    session: ssl.SSLSession | None, *, why: str | None = None,
) -> tuple[TlsEndpoint, Peer, float] | None:
    """Dial, handshake (resuming `session` if given), authenticate: the endpoint, the
    server, and when our own chain presented in it expires; None once rec is finished."""
    try:
        raw = await dial(cfg.connect_to, rt.limits.connect_timeout,
                         metrics.series(DIRECTION, cfg.name).dial)
    except (OSError, TimeoutError) as exc:
        metrics.upstream_errors.labels(DIRECTION, cfg.name).inc()
        rec.reason, rec.close = Reason.UPSTREAM_UNAVAILABLE, Close.UPSTREAM_UNAVAILABLE
        rec.detail = f"cannot reach {cfg.connect_to}: {exc or 'timed out'}"
        rt.tracker.finish(rec)
        return None
    # The client context presents the SVID loaded last: rt's, not necessarily the snapshot's.
    own_until = authn.chain_window(rt.contexts.identity)[1]
    try:
        ep = TlsEndpoint.client(contexts.client, raw, cfg.server_name or None, session)
    except OSError as exc:
        raw.close()
        rec.close, rec.detail = Close.ERROR, str(exc)
        rt.tracker.finish(rec)
        return None
    peer = await secure(rt, rec, ep, contexts.identity, expect=cfg.expect_ids,
                        retry_resumed=session is not None)
    if peer is None:
        if session is not None:
            _drop_session(rt, cfg.name, session)  # whatever failed, it is not offered again
        return None
    if why is not None:
        rec.detail = f"resumption refused, then a full handshake: {why}"
    return ep, peer, own_until


# -- the route's session cache ------------------------------------------------------------


def _session_to_offer(rt: Runtime, route: str, contexts: Contexts) -> ssl.SSLSession | None:
    if not rt.session_resumption:
        return None
    return resumption.to_offer(rt.sessions.get(route), contexts.client, time.time())


def _drop_session(rt: Runtime, route: str, session: ssl.SSLSession | None) -> None:
    kept = rt.sessions.get(route)
    if kept is not None and kept.session is session:
        del rt.sessions[route]


def _after_connection(
    rt: Runtime, route: str, contexts: Contexts, ep: TlsEndpoint, peer: Peer,
    resumed: ssl.SSLSession | None, own_until: float, duplex: Duplex,
) -> None:
    """Keep the ticket of a full handshake; drop a `resumed` session the server refused.

    A resumption brings no new ticket from a sidecar (and the session it would bring
    holds the same certificates): the kept session stays as it is.
    """
    if not rt.session_resumption:
        return
    if resumed is not None:
        if duplex.to_app.moved == 0:  # refused after the handshake, or a silent server
            _drop_session(rt, route, resumed)
        return
    s = ep.new_session()  # None unless a ticket came: the getter leaks (engine.py)
    if s is not None and s.has_ticket:
        rt.sessions[route] = resumption.ClientSession(
            contexts.client, s, min(peer.not_after, own_until))
