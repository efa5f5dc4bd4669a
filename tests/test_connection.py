"""`proxy/connection.Tracker`: the limits it keeps and how every connection ends once.

Pending handshakes are real ones (`secure` on loopback TCP, peers silent or stalled after
their hello); live connections are real `Duplex` pumps between two loopback TCP
connections, one standing for the app and one for the peer. The sweeps that `run` makes
once a second are called here by hand.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from orchestrators import (
    Held,
    accept,
    client_ctx,
    fresh_name,
    holding,
    read_all,
    runtime,
    sample,
    tcp,
    tls_peer,
    until,
)

from sidecar.config.schema import Limits
from sidecar.endpoint import TcpEndpoint
from sidecar.identity import Identity
from sidecar.outcomes import Direction
from sidecar.proxy.connection import SILENT_AFTER, Record, Tracker
from sidecar.proxy.pump import Duplex
from sidecar.proxy.runtime import Runtime

pytestmark = pytest.mark.timeout(60)


class Calls:
    """The tracker's callbacks, as the listeners and the drain would receive them."""

    def __init__(self, tracker: Tracker) -> None:
        self.full = self.capacity = self.empty = 0
        tracker.on_full = lambda: setattr(self, "full", self.full + 1)
        tracker.on_capacity = lambda: setattr(self, "capacity", self.capacity + 1)
        tracker.on_empty = lambda: setattr(self, "empty", self.empty + 1)


def test_at_max_connections_accepting_stops_until_one_ends_and_each_ends_once(
    run: Callable[..., Any], ours: Identity,
) -> None:
    name = fresh_name("conn-max")

    async def body(held: Held) -> None:
        rt = runtime(ours, limits=Limits(max_connections=2))
        calls = Calls(rt.tracker)
        first = rt.tracker.open(Direction.INBOUND, name, "a")
        assert (calls.full, rt.tracker.full) == (0, False)
        second = rt.tracker.open(Direction.INBOUND, name, "b")
        assert (calls.full, rt.tracker.full) == (1, True)  # nothing pending to shed
        rt.tracker.finish(first)
        assert (calls.capacity, calls.empty) == (1, 0)
        rt.tracker.finish(first)  # a second finish of the same record changes nothing
        assert rt.tracker.active == 1 and calls.capacity == 1
        rt.tracker.finish(second)
        assert rt.tracker.active == 0 and calls.empty == 1
        assert sample("sidecar_connections_active", direction="inbound", listener=name) == 0
        assert sample("sidecar_connections_total", direction="inbound", listener=name) == 2

    run(holding(body))


def test_at_max_connections_a_peer_silent_for_long_makes_room_a_young_one_does_not(
    run: Callable[..., Any], ours: Identity,
) -> None:
    name = fresh_name("conn-silent")

    async def body(held: Held) -> None:
        rt = runtime(ours, limits=Limits(max_connections=2))
        calls = Calls(rt.tracker)
        _, far = tcp(held)
        silent = accept(rt, far, name)
        await until(lambda: silent.rec in rt.tracker.pending, "a pending handshake")
        young = rt.tracker.open(Direction.INBOUND, name, "young")
        assert calls.full == 1 and silent.rec.evicted is None  # accepted a moment ago
        rt.tracker.finish(young)
        await until(lambda: rt.loop.time() - silent.rec.started > SILENT_AFTER,
                    "the pending peer to be silent for long", budget=SILENT_AFTER + 2)
        newer = rt.tracker.open(Direction.INBOUND, name, "newer")
        assert calls.full == 1  # room was made instead of pausing
        assert await silent.task is None
        assert silent.rec.evicted == "max_connections"
        assert sample("sidecar_connections_rejected_total", direction="inbound",
                      listener=name, limit="max_connections") == 1
        rt.tracker.finish(newer)

    run(holding(body))


def test_over_max_pending_the_oldest_peer_without_a_hello_goes_first(
    run: Callable[..., Any], ours: Identity, caller: Identity,
) -> None:
    name = fresh_name("conn-pending")

    async def body(held: Held) -> None:
        rt = runtime(ours, limits=Limits(max_pending_handshakes=2))
        # The oldest has sent its hello and stalls; the next never said anything.
        near, far = tcp(held)
        hello = accept(rt, far, name)
        stalled = tls_peer(held, near, client_ctx(caller))
        with pytest.raises(ssl.SSLWantReadError):
            stalled.step()  # the hello goes out; the rest never follows
        await until(hello.ep.hello_seen, "the first peer's hello to be read")
        _, far = tcp(held)
        silent = accept(rt, far, name)
        await until(lambda: silent.rec in rt.tracker.pending, "the second to be pending")
        _, far = tcp(held)
        third = accept(rt, far, name)
        assert await silent.task is None
        assert silent.rec.evicted == "max_pending_handshakes"
        assert hello.rec.evicted is None and not hello.task.done()
        assert list(rt.tracker.pending) == [hello.rec, third.rec]
        for a in (hello, third):
            a.task.cancel()
            await a.task

    run(holding(body))


# --- live connections: the sweep -------------------------------------------------------------


class Pumped:
    """A Duplex between an app connection and a peer connection, tracked as inbound."""

    def __init__(self, rt: Runtime, held: Held, name: str, *, rcvbuf: int | None = None,
                 sndbuf: int | None = None) -> None:
        self.app, app_far = tcp(held)
        self.peer, peer_far = tcp(held, rcvbuf=rcvbuf, sndbuf=sndbuf)
        self.rec: Record = rt.tracker.open(Direction.INBOUND, name, "test")
        self.duplex = Duplex(rt.loop, TcpEndpoint(app_far), TcpEndpoint(peer_far),
                             rt.tracker.closed)
        rt.tracker.attach(self.rec, self.duplex)
        self.duplex.start()


def test_an_idle_connection_is_closed_unless_its_send_queue_drains(
    run: Callable[..., Any], ours: Identity,
) -> None:
    """A reader slower than the socket buffers: our writes are done, the kernel's queue
    still drains. That is progress; a queue that stands still is not."""
    name = fresh_name("conn-idle")
    idle = 0.05
    sent = 512 * 1024

    async def body(held: Held) -> None:
        rt = runtime(ours, limits=Limits(idle_timeout=idle))
        loop = rt.loop
        c = Pumped(rt, held, name, rcvbuf=4096, sndbuf=2 * sent)

        async def idle_for_long() -> None:
            since = c.duplex.idle_since
            await until(lambda: loop.time() - since > idle, "the idle timeout to pass")

        await loop.sock_sendall(c.app, b"x" * sent)
        await until(lambda: c.duplex.from_app.moved == sent, "the pump to take all of it")
        rt.tracker.sweep()  # counts the bytes: they moved since the last look
        assert c.duplex.queued() > 0
        await idle_for_long()
        rt.tracker.sweep()  # the first look at the queue: it is news
        assert not c.rec.finished and c.duplex.last_queued > 0
        for _ in range(3):  # the reader takes some; the kernel sends more
            before = c.duplex.queued()
            await loop.sock_recv(c.peer, 65536)
            await until(lambda: c.duplex.queued() != before, "the queue to move")  # noqa: B023
            await idle_for_long()
            rt.tracker.sweep()
            assert not c.rec.finished
        # The reader stops. (The queue may still shift a little as the kernel fills the
        # reader's buffer: a few sweeps, until it stands still between two of them.)
        for _ in range(20):
            await idle_for_long()
            rt.tracker.sweep()
            if c.rec.close is not None:
                break
        await until(lambda: c.rec.finished, "the idle close")
        assert str(c.rec.close) == "idle_timeout"

        quiet = Pumped(rt, held, name)  # nothing queued at all
        since = quiet.duplex.idle_since
        await until(lambda: loop.time() - since > idle, "the idle timeout to pass")
        rt.tracker.sweep()
        await until(lambda: quiet.rec.finished, "the idle close")
        assert str(quiet.rec.close) == "idle_timeout"

    run(holding(body))


def test_a_connection_past_its_lifetime_ends_the_clients_direction_first(
    run: Callable[..., Any], ours: Identity,
) -> None:
    name = fresh_name("conn-life")
    lifetime = 0.05

    async def body(held: Held) -> None:
        rt = runtime(ours, limits=Limits(max_connection_lifetime=lifetime))
        loop = rt.loop
        c = Pumped(rt, held, name)
        await loop.sock_sendall(c.peer, b"request")
        assert await loop.sock_recv(c.app, 64) == b"request"
        await until(lambda: loop.time() - c.duplex.started > lifetime, "the lifetime to pass")
        rt.tracker.sweep()
        assert str(c.rec.close) == "max_lifetime" and not c.rec.finished
        # The app reads the end of requests and may still answer; then it ends too.
        assert await read_all(loop, c.app) == b""
        await loop.sock_sendall(c.app, b"answer")
        c.app.shutdown(socket.SHUT_WR)
        assert await read_all(loop, c.peer) == b"answer"
        c.peer.shutdown(socket.SHUT_WR)
        await until(lambda: c.rec.finished, "the connection to end")
        assert str(c.rec.close) == "max_lifetime"
        fields = c.rec.fields(c.duplex)
        assert (fields["bytes_to_app"], fields["bytes_from_app"]) == (7, 6)

    run(holding(body))


def test_a_clean_end_is_closed_and_its_bytes_are_counted(
    run: Callable[..., Any], ours: Identity,
) -> None:
    name = fresh_name("conn-end")

    async def body(held: Held) -> None:
        rt = runtime(ours)
        loop = rt.loop
        calls = Calls(rt.tracker)
        c = Pumped(rt, held, name)
        await loop.sock_sendall(c.peer, b"ping")
        assert await loop.sock_recv(c.app, 64) == b"ping"
        await loop.sock_sendall(c.app, b"pong!")
        c.app.shutdown(socket.SHUT_WR)
        assert await read_all(loop, c.peer) == b"pong!"
        c.peer.shutdown(socket.SHUT_WR)
        await until(lambda: c.rec.finished, "the connection to end")
        assert str(c.rec.close) == "closed" and c.rec.reason is None
        assert rt.tracker.active == 0 and not rt.tracker.live and calls.empty == 1
        assert sample("sidecar_bytes_total", direction="inbound", listener=name,
                      flow="to_app") == 4
        assert sample("sidecar_bytes_total", direction="inbound", listener=name,
                      flow="from_app") == 5

    run(holding(body))
