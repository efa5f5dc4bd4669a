"""`proxy/handshake.secure`: what one inbound handshake records, counts and does when it fails.

Our side runs `secure` with a real Runtime on one end of a loopback TCP connection; the
peer is a TLS client on the other end (a sidecar's client context, or a plain one
presenting whatever a case needs).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from orchestrators import (
    CLIENT_ID,
    TD,
    Held,
    Trust,
    accept,
    client_ctx,
    fresh_name,
    handshake_errors,
    handshakes,
    holding,
    peer_says,
    runtime,
    sample,
    tcp,
    tls_peer,
    tls_read,
    tls_write,
    until,
)
from tls_pairs import client_context

from sidecar.config.schema import Limits
from sidecar.identity import Identity
from sidecar.reasons import Reason
from sidecar.tools import pki

pytestmark = pytest.mark.timeout(60)


def test_a_handshake_records_the_peer_and_counts_full_then_resumed(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    name = fresh_name("hs-ok")

    async def body(held: Held) -> None:
        rt = runtime(ours)
        ctx = client_ctx(caller)
        session = None
        for resumed in (False, True):
            near, far = tcp(held)
            srv = accept(rt, far, name)
            cli = tls_peer(held, near, ctx, session)
            await cli.handshake()
            peer = await srv.task
            assert peer is not None
            await tls_write(srv.ep, b"!")  # the ticket goes out before it
            assert await tls_read(cli) == b"!"
            session = cli.new_session()
            rec = srv.rec
            assert (str(peer.spiffe_id), str(rec.peer_id)) == (CLIENT_ID, CLIENT_ID)
            assert rec.resumed is resumed
            assert rec.tls_version == "TLSv1.3" and rec.cipher
            assert rec.handshake_ms is not None and rec.handshake_ms > 0
            assert rec.handshake_cpu_ms is not None and rec.handshake_cpu_ms > 0
            assert not rec.finished and rec.reason is None  # the pump's to finish
            assert rec not in rt.tracker.pending
            srv.ep.close()
        assert handshakes("inbound", name, "ok", False) == 1
        assert handshakes("inbound", name, "ok", True) == 1
        assert sample("sidecar_handshake_cpu_seconds_total", direction="inbound",
                      listener=name, resumed="false") > 0
        assert handshakes("inbound", name, "error", False) == 0

    run(holding(body))


CASES = ["unknown-ca", "invalid-svid", "no-client-cert", "timeout"]


@pytest.mark.parametrize("case", CASES)
def test_each_failure_counts_its_reason(
    run: Callable[..., Any], ours: Identity, trust: Trust, tmp_path: Path,
    case: str,
) -> None:
    name = fresh_name(f"hs-{case}")
    reason = {"unknown-ca": Reason.UNKNOWN_CA, "invalid-svid": Reason.INVALID_SVID,
              "no-client-cert": Reason.NO_CLIENT_CERT,
              "timeout": Reason.HANDSHAKE_TIMEOUT}[case]

    async def body(held: Held) -> None:
        # 0.2 s for the silent peer; the refusals get 10 s: a loaded machine's stall of
        # 0.2 s during their handshake would end it as a timeout, not their reason.
        rt = runtime(ours, limits=Limits(handshake_timeout=0.2 if case == "timeout" else 10))
        near, far = tcp(held)
        srv = accept(rt, far, name)
        if case == "timeout":  # a peer that connects and says nothing
            assert await srv.task is None
        else:
            if case == "unknown-ca":
                svid = pki.issue_svid(pki.new_intermediate(pki.new_root(TD)), CLIENT_ID)
            elif case == "invalid-svid":  # OpenSSL verifies it; the SVID rules refuse it
                svid = pki.issue_svid(trust.issuer, CLIENT_ID,
                                      extra_uris=[f"spiffe://{TD}/second"])
            ctx = client_context(None if case == "no-client-cert" else svid,
                                 [trust.root.cert], tmp_path)
            cli = tls_peer(held, near, ctx)
            said = await peer_says(cli)
            if case == "invalid-svid":  # refused after TLS: a close_notify, not an alert
                assert said == b""
            else:
                assert isinstance(said, OSError), said  # the peer read our alert
            cli.close()  # ... and hangs up, which ends our linger
            assert await srv.task is None
        rec = srv.rec
        assert rec.reason is reason, (rec.reason, rec.detail)
        assert rec.detail
        assert str(rec.close) == "handshake_failed"
        assert rec.finished and rt.tracker.active == 0 and not rt.tracker.pending
        assert handshake_errors("inbound", name, str(reason)) == 1
        assert handshakes("inbound", name, "error", False) == 1
        assert handshakes("inbound", name, "ok", False) == 0

    run(holding(body))


def test_a_refused_peer_gets_a_linger_that_holds_its_connection_not_a_pending_slot(
    run: Callable[..., Any], ours: Identity, tmp_path: Path, trust: Trust,
) -> None:
    """After the alert, our FIN; we read what the peer still sends until it closes."""
    name = fresh_name("hs-linger")

    async def body(held: Held) -> None:
        rt = runtime(ours)
        near, far = tcp(held)
        srv = accept(rt, far, name)
        stranger = pki.issue_svid(pki.new_intermediate(pki.new_root(TD)), CLIENT_ID)
        cli = tls_peer(held, near, client_context(stranger, [trust.root.cert], tmp_path))
        assert isinstance(await peer_says(cli), OSError)
        # Refused and counted, yet still open: lingering for the peer to hang up.
        assert srv.rec.reason is Reason.UNKNOWN_CA
        assert not srv.task.done() and not srv.rec.finished
        assert rt.tracker.active == 1 and srv.rec not in rt.tracker.pending
        # Our FIN follows the alert: the raw stream ends, and what we are sent is drained.
        raw = socket.socket(fileno=os.dup(cli.fd))  # the same TCP connection, without TLS
        held.append(raw)
        raw.setblocking(False)
        assert await rt.loop.sock_recv(raw, 4096) == b""
        await rt.loop.sock_sendall(raw, b"the rest of a flight" * 100)
        assert not srv.task.done()
        raw.shutdown(socket.SHUT_WR)
        assert await srv.task is None
        assert srv.rec.finished and rt.tracker.active == 0

    run(holding(body))


def test_an_evicted_pending_handshake_is_counted_as_a_timeout_under_its_limit(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    name = fresh_name("hs-evict")

    async def body(held: Held) -> None:
        rt = runtime(ours, limits=Limits(max_pending_handshakes=1))
        _, far = tcp(held)
        silent = accept(rt, far, name)
        await until(lambda: silent.rec in rt.tracker.pending, "the first to be pending")
        near, far = tcp(held)
        good = accept(rt, far, name)
        cli = tls_peer(held, near, client_ctx(caller))
        await cli.handshake()
        assert await good.task is not None  # room was made for it
        assert await silent.task is None
        assert silent.rec.evicted == "max_pending_handshakes"
        assert silent.rec.reason is Reason.HANDSHAKE_TIMEOUT
        assert silent.rec.detail and "evicted: max_pending_handshakes" in silent.rec.detail
        assert silent.rec.finished
        assert sample("sidecar_connections_rejected_total", direction="inbound",
                      listener=name, limit="max_pending_handshakes") == 1
        assert handshake_errors("inbound", name, "handshake_timeout") == 1
        good.ep.close()

    run(holding(body))


def test_a_handshake_cancelled_at_shutdown_is_no_failure(
    run: Callable[..., Any], ours: Identity,
) -> None:
    name = fresh_name("hs-shutdown")

    async def body(held: Held) -> None:
        rt = runtime(ours)
        _, far = tcp(held)
        srv = accept(rt, far, name)
        await until(lambda: srv.rec in rt.tracker.pending, "a pending handshake")
        srv.task.cancel()
        assert await srv.task is None
        assert str(srv.rec.close) == "shutdown" and srv.rec.reason is None
        assert srv.rec.finished and rt.tracker.active == 0
        assert handshakes("inbound", name, "error", False) == 0

    run(holding(body))
