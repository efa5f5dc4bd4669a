"""One handshake plus authentication, shared by inbound and outbound: bounded, measured,
classified and counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection

from sidecar import metrics
from sidecar.authn import AuthnError, Peer, matches_expected
from sidecar.identity import Identity
from sidecar.proxy.connection import Record
from sidecar.proxy.runtime import Runtime
from sidecar.reasons import Reason
from sidecar.tls.classify import classify, skew_note
from sidecar.tls.engine import TlsEndpoint


class ResumptionRefused(Exception):
    """Our re-check refused a resumed session: the peer may still pass a full handshake.
    Raised instead of finishing the record when the caller can redial (secure's
    `retry_resumed`); the failed handshake is counted and its endpoint closed."""


async def secure(
    rt: Runtime, rec: Record, ep: TlsEndpoint, identity: Identity, *,
    expect: Collection[str] | None = None, retry_resumed: bool = False,
) -> Peer | None:
    """Handshake and authenticate against `identity`, the snapshot whose contexts made
    `ep`; on failure close ep, count, finish rec, return None (or, for a resumed session
    with `retry_resumed`, raise ResumptionRefused and leave rec open)."""
    task = asyncio.current_task()
    assert task is not None
    rt.tracker.begin_handshake(rec, task, ep.hello_seen)
    try:
        async with asyncio.timeout(rt.limits.handshake_timeout):
            await ep.handshake()
    except asyncio.CancelledError:
        if rec.evicted:
            _fail(rt, rec, ep, Reason.HANDSHAKE_TIMEOUT,
                  "evicted: max_pending_handshakes reached, oldest pending handshake closed")
        else:
            _fail(rt, rec, ep, None, "shutting down")
        return None
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        presented = ep.presented_chain()
        f = classify(exc, presented=presented, known_intermediates=rt.authn.known_intermediates)
        detail = f.detail
        if f.reason in (Reason.CERT_EXPIRED, Reason.CERT_NOT_YET_VALID) and not f.by_peer:
            detail += skew_note(presented, rt.clock_skew_hint)
        _fail(rt, rec, ep, f.reason, detail)
        return None
    finally:
        rt.tracker.end_handshake(rec)
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
        if expect is not None and not matches_expected(peer.spiffe_id, expect):
            raise AuthnError(
                Reason.SPIFFE_ID_MISMATCH,
                f"the server is {peer.spiffe_id}, expected {', '.join(expect)}")
    except AuthnError as exc:
        ep.forget_session()  # its next connection must prove itself in full
        ep.shutdown_write()  # a close_notify rather than a bare reset, where it can
        if resumed and retry_resumed:
            _count_failure(rec, ep, exc.reason, resumed=True)
            ep.close()
            raise ResumptionRefused(exc.detail) from exc
        _fail(rt, rec, ep, exc.reason, exc.detail, resumed=resumed)
        return None
    rec.peer_id = peer.spiffe_id
    if not resumed:  # a resumption verified nothing, and its session carries no chain
        ep.drop_peer_chains()
    _count_ktls(rt, rec, ep)
    elapsed = time.monotonic() - rec.started
    rec.handshake_ms = round(elapsed * 1000, 3)
    rec.handshake_cpu_ms = round(ep.cpu_seconds * 1000, 3)
    series = metrics.series(rec.direction, rec.listener)
    series.ok[resumed].inc()
    series.duration[resumed].observe(elapsed)
    series.cpu[resumed].inc(ep.cpu_seconds)
    return peer


def _count_ktls(rt: Runtime, rec: Record, ep: TlsEndpoint) -> None:
    if rt.ktls == "off":
        return
    if rt.ktls == "unavailable":
        metrics.count_ktls(rec.direction, "tx", "unavailable")
        metrics.count_ktls(rec.direction, "rx", "unavailable")
        return
    rec.ktls_tx, rec.ktls_rx = ep.ktls()
    metrics.count_ktls(rec.direction, "tx", "enabled" if rec.ktls_tx else "failed")
    metrics.count_ktls(rec.direction, "rx", "enabled" if rec.ktls_rx else "failed")


def _fail(
    rt: Runtime, rec: Record, ep: TlsEndpoint, reason: Reason | None, detail: str,
    *, resumed: bool = False,
) -> None:
    ep.close()
    rec.detail = detail
    if reason is not None:
        rec.reason = reason
        rec.close = "handshake_failed"
        _count_failure(rec, ep, reason, resumed=resumed)
    else:
        rec.close = rec.close or "shutdown"
    rt.tracker.finish(rec)


def _count_failure(rec: Record, ep: TlsEndpoint, reason: Reason, *, resumed: bool) -> None:
    r = "true" if resumed else "false"
    metrics.handshakes.labels(rec.direction, rec.listener, "error", r).inc()
    metrics.handshake_errors.labels(rec.direction, rec.listener, str(reason)).inc()
    metrics.handshake_cpu.labels(rec.direction, rec.listener, r).inc(ep.cpu_seconds)
