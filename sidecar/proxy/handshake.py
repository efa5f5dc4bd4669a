"""One handshake plus authentication, shared by inbound and outbound: bounded, measured,
classified and counted.

Two things make "the handshake failed" less simple than an exception:

- A refused client must not get a TCP reset. OpenSSL has written its alert when it
  raises, but a client whose flight spans segments (refused on its Certificate while
  its CertificateVerify and Finished are still on the way) is still sending: a closed
  socket answers those segments with a reset, and the client's next send fails
  (EPIPE, ECONNRESET) before it reads the alert. So a refused peer gets the alert,
  then our FIN, and we read and drop what it still sends,
  for at most LINGER_SECONDS and LINGER_BYTES, before closing. The connection stays
  counted (limits.max_connections) while it lingers, but no longer holds a pending
  handshake slot (limits.max_pending_handshakes): lingering peers never crowd out new
  handshakes. (Outbound, the app waits on the outcome: the sidecar closes at once.)
- In TLS 1.3 a client's handshake ends before the server has read the client's
  certificate; a server that refuses it says so with an alert on the client's first
  read. So an outbound TLS 1.3 handshake is counted only once the server has judged:
  its first record that is not an alert (data, a session ticket, the end of the stream)
  counts it ok, an alert before any of those counts it as the failure the alert names.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Callable, Collection

from cryptography import x509

from sidecar import poller
from sidecar.authn import AuthnError, Peer
from sidecar.identity import Identity
from sidecar.observe import metrics
from sidecar.outcomes import Close, KtlsState
from sidecar.proxy.connection import Record
from sidecar.proxy.runtime import Runtime
from sidecar.reasons import Reason
from sidecar.spiffe import SpiffePattern
from sidecar.tls.classify import classify, skew_note
from sidecar.tls.engine import TlsEndpoint

# A peer that read our alert closes at once (one round trip); these bound one that does
# not. A second covers a slow link's last segments; 64 KiB is more than any honest
# flight after a refused certificate (CertificateVerify and Finished: < 1 KiB).
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024
_DRAIN_CHUNK = 16 * 1024

class ResumptionRefused(Exception):
    """Our re-check refused a resumed session: the peer may still pass a full handshake.
    Raised instead of finishing the record when the caller can redial (secure's
    `retry_resumed`); the failed handshake is counted and its endpoint closed."""


async def secure(
    rt: Runtime, rec: Record, ep: TlsEndpoint, identity: Identity, *,
    expect: Collection[SpiffePattern] | None = None, retry_resumed: bool = False,
) -> Peer | None:
    """Handshake and authenticate against `identity`, the snapshot whose contexts made
    `ep`; on failure close ep, count, finish rec, return None (or, for a resumed session
    with `retry_resumed`, raise ResumptionRefused and leave rec open)."""
    task = asyncio.current_task()
    assert task is not None
    rt.tracker.begin_handshake(rec, task, ep.hello_seen)
    refused: tuple[Reason, str] | None = None
    try:
        async with asyncio.timeout(rt.limits.handshake_timeout):
            await ep.handshake()
    except asyncio.CancelledError:
        if rec.evicted:
            await _fail(rt, rec, ep, Reason.HANDSHAKE_TIMEOUT,
                        f"evicted: {rec.evicted} reached, pending handshakes closed (those "
                        "with no hello first) to make room", linger=False)
        else:
            await _fail(rt, rec, ep, None, "shutting down", linger=False)
        return None
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        presented = ep.presented_chain()
        f = classify(exc, presented=presented, known_intermediates=rt.authn.known_intermediates,
                     trusted_names=_trusted_names(rt.contexts.identity),
                     trust_domains=rt.contexts.identity.bundles.keys())
        detail = f.detail
        if f.reason in (Reason.CERT_EXPIRED, Reason.CERT_NOT_YET_VALID) and not f.by_peer:
            detail += skew_note(presented, rt.clock_skew_hint)
        refused = (f.reason, detail)
    finally:
        rt.tracker.end_handshake(rec)
    if refused is not None:
        # A timed-out peer was sent nothing and is silent: nothing to linger for.
        linger = ep.server_side and refused[0] is not Reason.HANDSHAKE_TIMEOUT
        await _fail(rt, rec, ep, *refused, linger=linger)
        return None
    resumed = ep.resumed()
    rec.resumed = resumed
    rec.tls_version = ep.version()
    rec.cipher = ep.cipher()
    try:
        if resumed:
            peer = rt.authn.resumed(ep.peer_leaf(), identity)
        else:
            peer = rt.authn.full(ep.verified_chain(), identity)
        rec.peer_id = peer.spiffe_id
        if expect is not None and not any(p.matches(peer.spiffe_id) for p in expect):
            raise AuthnError(
                Reason.SPIFFE_ID_MISMATCH,
                f"the server is {peer.spiffe_id}, expected {', '.join(map(str, expect))}")
    except AuthnError as exc:
        ep.forget_session()  # its next connection must prove itself in full
        ep.shutdown_write()  # a close_notify rather than a bare reset, where it can
        if resumed and retry_resumed:
            _count_failure(rec, ep, exc.reason, resumed=True)
            ep.close()
            raise ResumptionRefused(exc.detail) from exc
        await _fail(rt, rec, ep, exc.reason, exc.detail, resumed=resumed,
                    linger=ep.server_side)
        return None
    rec.peer_id = peer.spiffe_id
    if not resumed:  # a resumption verified nothing, and its session carries no chain
        ep.drop_peer_chains()
    _count_ktls(rt, rec, ep)
    elapsed = time.monotonic() - rec.started
    rec.handshake_ms = round(elapsed * 1000, 3)
    rec.handshake_cpu_ms = round(ep.cpu_seconds * 1000, 3)
    if not ep.server_side and rec.tls_version == "TLSv1.3":
        _await_verdict(ep, lambda: _count_ok(rec, ep, resumed, elapsed))
    else:
        _count_ok(rec, ep, resumed, elapsed)
    return peer


# The subjects of every bundle CA, for classify(): they change only with the identity.
_trusted: tuple[Identity, frozenset[x509.Name]] | None = None


def _trusted_names(identity: Identity) -> frozenset[x509.Name]:
    global _trusted
    if _trusted is None or _trusted[0] is not identity:
        _trusted = (identity, frozenset(
            ca.subject for b in identity.bundles.values() for ca in b.cas))
    return _trusted[1]


def _count_ok(rec: Record, ep: TlsEndpoint, resumed: bool, elapsed: float) -> None:
    series = metrics.series(rec.direction, rec.listener)
    series.ok[resumed].inc()
    series.duration[resumed].observe(elapsed)
    series.cpu[resumed].inc(ep.cpu_seconds)


# --- the server's verdict on an outbound TLS 1.3 handshake ---------------------------------


class _AwaitingVerdict(TlsEndpoint):
    """A TLS 1.3 client endpoint whose server has not judged our certificate yet.

    The endpoint is of this class only until the server's first record: then it is a
    plain TlsEndpoint again, and the pump's hot path pays nothing for the wait. (The
    layout is the base class's, so the class can change in place; the pending count
    lives in the endpoint's sidecar_verdict.)"""

    __slots__ = ()

    def read_into(self, buf: memoryview) -> int:
        n = TlsEndpoint.read_into(self, buf)  # the server's alert raises: see judged()
        if n >= 0 or _has_ticket(self):
            count: Callable[[], None] | None = self.sidecar_verdict
            self.sidecar_verdict = None
            object.__setattr__(self, "__class__", TlsEndpoint)
            if count is not None:
                count()
        return n


def _has_ticket(ep: TlsEndpoint) -> bool:
    """A session ticket is the server's yes: it is sent after our certificate was read."""
    return ep.ticket_arrived()  # not ep.session: CPython 3.13.0's getter leaks (engine.py)


def _await_verdict(ep: TlsEndpoint, count_ok: Callable[[], None]) -> None:
    ep.sidecar_verdict = count_ok
    object.__setattr__(ep, "__class__", _AwaitingVerdict)


def judged(rec: Record, ep: TlsEndpoint, exc: BaseException | None) -> None:
    """At the end of an outbound connection: if the server never judged our handshake
    before, this end is its verdict. An alert (an SSLError naming the peer's alert)
    means it refused our certificate: a handshake failure with the alert's reason."""
    count_ok: Callable[[], None] | None = ep.sidecar_verdict
    ep.sidecar_verdict = None
    if count_ok is None:
        return  # counted already
    if isinstance(exc, ssl.SSLError):
        f = classify(exc)
        if f.by_peer:
            rec.reason, rec.close = f.reason, Close.HANDSHAKE_FAILED
            rec.detail = f"{f.detail}, after our side of the TLS 1.3 handshake had finished"
            _count_failure(rec, ep, f.reason, resumed=bool(rec.resumed))
            return
    count_ok()


# --- failure --------------------------------------------------------------------------------


def _count_ktls(rt: Runtime, rec: Record, ep: TlsEndpoint) -> None:
    if rt.ktls is None:
        return
    if rt.ktls is KtlsState.UNAVAILABLE:
        metrics.count_ktls(rec.direction, "tx", KtlsState.UNAVAILABLE)
        metrics.count_ktls(rec.direction, "rx", KtlsState.UNAVAILABLE)
        return
    rec.ktls_tx, rec.ktls_rx = ep.ktls()
    metrics.count_ktls(rec.direction, "tx", KtlsState.ENABLED if rec.ktls_tx else KtlsState.FAILED)
    metrics.count_ktls(rec.direction, "rx", KtlsState.ENABLED if rec.ktls_rx else KtlsState.FAILED)


async def _fail(
    rt: Runtime, rec: Record, ep: TlsEndpoint, reason: Reason | None, detail: str,
    *, resumed: bool = False, linger: bool,
) -> None:
    rec.detail = detail
    if reason is not None:
        rec.reason = reason
        rec.close = Close.HANDSHAKE_FAILED
        _count_failure(rec, ep, reason, resumed=resumed)
    else:
        rec.close = rec.close or Close.SHUTDOWN
    try:
        if linger:
            await _linger(ep)
    finally:
        ep.close()
        rt.tracker.finish(rec)


def _count_failure(rec: Record, ep: TlsEndpoint, reason: Reason, *, resumed: bool) -> None:
    metrics.count_failure(rec.direction, rec.listener, reason, resumed=resumed,
                          cpu_seconds=ep.cpu_seconds)


async def _linger(ep: TlsEndpoint) -> None:
    """Our alert is out: send FIN after it, then read and drop what the peer still sends
    until it closes, LINGER_BYTES have come, or LINGER_SECONDS have passed. The bytes
    are read from the socket itself: the TLS connection has failed and reads nothing."""
    ep.shutdown_write()
    loop = asyncio.get_running_loop()
    left = LINGER_BYTES
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            while left > 0:
                try:
                    data = os.read(ep.fd, min(left, _DRAIN_CHUNK))
                except (BlockingIOError, InterruptedError):
                    await poller.ready(loop, ep.fd, ep)
                    continue
                if not data:
                    return
                left -= len(data)
    except (TimeoutError, OSError):
        pass  # a peer that keeps sending or stays open, or one already gone
