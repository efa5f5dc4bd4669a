"""What we know about one connection, and the set of live ones.

The record collects the access-log fields as the connection goes through its steps; the
tracker counts connections against the limits, holds the pending handshakes (oldest
first, so a storm of stalled peers evicts itself rather than good clients), and closes
idle, too-old and drained connections from one sweep a second (while there are any)
instead of one timer per connection.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.observe import logs, metrics
from sidecar.outcomes import Close, DecisionKind, Direction
from sidecar.reasons import Reason
from sidecar.spiffe import SpiffeId

_ids = itertools.count(1)
_PID = os.getpid()


class Moved(Protocol):
    @property
    def moved(self) -> int:
        """Plaintext bytes moved so far in one direction."""
        ...


class Live(Protocol):
    """What the tracker asks of a live connection: the byte pump's Duplex (pump.py), or an
    http listener's session (http.py), which hands over to a Duplex on a WebSocket."""

    idle_since: float  # kept by the sweeper
    last_moved: int
    last_queued: int

    @property
    def to_app(self) -> Moved: ...

    @property
    def from_app(self) -> Moved: ...

    @property
    def started(self) -> float: ...

    @property
    def moved(self) -> int: ...

    def queued(self) -> int: ...

    def abort(self, how: Close, exc: BaseException | None = None) -> None: ...

    def finish(self, client_is_peer: bool) -> None: ...


@dataclass(slots=True, eq=False)  # identity semantics: records key the pending table
class Record:
    direction: Direction
    listener: str
    peer_addr: str
    started: float  # time.monotonic(): uvloop's loop.time() counts whole milliseconds
    id: str = field(default_factory=lambda: f"{_PID:x}-{next(_ids):x}")
    peer_id: SpiffeId | None = None
    tls_version: str | None = None
    cipher: str | None = None
    resumed: bool | None = None
    handshake_ms: float | None = None
    handshake_cpu_ms: float | None = None
    decision: DecisionKind | None = None
    rule: str | None = None
    reason: Reason | None = None  # why it failed, when it did
    detail: str | None = None
    close: Close | None = None  # how it ended
    evicted: str | None = None  # the limit that shed this pending handshake, if one did
    finished: bool = False
    ktls_tx: bool | None = None
    ktls_rx: bool | None = None
    # An http listener's WebSocket: the (method, path) of its upgrade request, which a
    # policy recheck judges again.
    request: tuple[str, str] | None = None
    # Bytes already added to sidecar_bytes_total: the sweeper adds what moved since, so a
    # long stream shows as it flows (a metric call per moving connection a second, never
    # one per chunk).
    counted_to_app: int = 0
    counted_from_app: int = 0

    def fields(self, duplex: Live | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "direction": self.direction, "listener": self.listener,
            "peer_addr": self.peer_addr,
            "peer_id": str(self.peer_id) if self.peer_id else None,
            "tls_version": self.tls_version, "cipher": self.cipher, "resumed": self.resumed,
            "handshake_ms": self.handshake_ms, "handshake_cpu_ms": self.handshake_cpu_ms,
            "decision": self.decision, "rule": self.rule,
            "bytes_to_app": duplex.to_app.moved if duplex else 0,
            "bytes_from_app": duplex.from_app.moved if duplex else 0,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "close": self.close, "reason": str(self.reason) if self.reason else None,
            "detail": self.detail,
        }
        if self.ktls_tx is not None:
            out["ktls_tx"], out["ktls_rx"] = self.ktls_tx, self.ktls_rx
        return out


class Tracker:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        max_connections: int,
        max_pending_handshakes: int,
        idle_timeout: float,
        max_lifetime: float,
    ) -> None:
        self._loop = loop
        self.max_connections = max_connections
        self.max_pending = max_pending_handshakes
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self.active = 0
        self.pending: OrderedDict[Record, tuple[asyncio.Task[None], Callable[[], bool]]] = (
            OrderedDict())
        self.live: dict[Live, Record] = {}
        self.on_full: Callable[[], None] = lambda: None  # pause listeners
        self.on_capacity: Callable[[], None] = lambda: None  # resume paused listeners
        self.on_empty: Callable[[], None] = lambda: None  # a drain waits for this
        self.on_open: Callable[[], None] = lambda: None  # wake the sweeper and lag probe

    @property
    def full(self) -> bool:
        return self.active >= self.max_connections

    def open(self, direction: Direction, listener: str, peer_addr: str) -> Record:
        self.active += 1
        self.on_open()
        series = metrics.series(direction, listener)
        series.connections.inc()
        series.active.inc()
        if self.active >= self.max_connections and not self._evict(
                "max_connections", silent_for=SILENT_AFTER):
            # Full of real work: stop accepting; new peers wait in the kernel's backlog
            # (the listener shows them). Full of peers that have said nothing for
            # SILENT_AFTER: one of them made room above instead, or stalled peers would
            # hold every slot until their timeout. A peer accepted a moment ago has had no
            # time to speak: it is never taken for a stalled one.
            self.on_full()
        return Record(direction, listener, peer_addr, time.monotonic())

    def begin_handshake(self, rec: Record, task: asyncio.Task[None],
                        progress: Callable[[], bool]) -> None:
        """`progress()` tells whether the peer has sent its hello yet."""
        while len(self.pending) >= self.max_pending:
            self._evict("max_pending_handshakes")
        self.pending[rec] = (task, progress)

    def _evict(self, limit: str, *, silent_for: float | None = None) -> bool:
        """Close one pending handshake, counted under `limit`: the oldest that has not
        sent its hello (a stalled or slow peer) within the first EVICT_SCAN, else the
        oldest. With `silent_for`, only a peer silent that long, or none."""
        victim_rec = None
        now = time.monotonic()
        for i, (rec, (_, progress)) in enumerate(self.pending.items()):
            if i == EVICT_SCAN or (silent_for is not None and now - rec.started < silent_for):
                break  # oldest first: the rest are younger still
            if not progress():
                victim_rec = rec
                break
        if victim_rec is None:
            if silent_for is not None or not self.pending:
                return False
            victim_rec = next(iter(self.pending))
        task, _ = self.pending.pop(victim_rec)
        victim_rec.evicted = limit
        task.cancel()
        metrics.connections_rejected.labels(
            victim_rec.direction, victim_rec.listener, limit).inc()
        return True

    def end_handshake(self, rec: Record) -> None:
        self.pending.pop(rec, None)

    def attach(self, rec: Record, duplex: Live) -> None:
        self.live[duplex] = rec

    def closed(self, duplex: Live, how: Close, exc: BaseException | None) -> None:
        """The pump's close callback."""
        rec = self.live.pop(duplex)
        rec.close = rec.close or how
        if exc is not None and rec.detail is None:
            rec.detail = f"{type(exc).__name__}: {exc}"
        tally: Tally = {}
        _tally(rec, duplex, tally)
        _flush(tally)
        self.finish(rec, duplex)

    def finish(self, rec: Record, duplex: Live | None = None) -> None:
        """Every connection ends here exactly once: access log, gauges, capacity."""
        if rec.finished:
            return
        rec.finished = True
        self.active -= 1
        metrics.series(rec.direction, rec.listener).active.dec()
        logs.access(rec.fields(duplex), failed=rec.reason is not None)
        if self.active == self.max_connections - 1:
            self.on_capacity()
        if self.active == 0:
            self.on_empty()

    def sweep(self) -> bool:
        """Count the bytes moved since the last sweep; close idle and over-age
        connections. Runs once a second while there are connections. True when bytes
        moved since the last sweep or handshakes are pending: the loop has work."""
        tally: Tally = {}
        try:
            self._sweep(tally)
        finally:  # what was tallied is counted even if a close below failed
            _flush(tally)
        if self.full:
            # Paused while the peers holding the slots were too young to be taken for
            # stalled: one that has stayed silent since makes room, and the accept that
            # follows sheds the next (open) while peers wait in the backlog.
            self._evict("max_connections", silent_for=SILENT_AFTER)
        return bool(tally) or bool(self.pending)

    def _sweep(self, tally: Tally) -> None:
        now = self._loop.time()
        for duplex, rec in list(self.live.items()):
            moved = duplex.moved
            if moved != duplex.last_moved:
                duplex.last_moved = moved
                duplex.idle_since = now
                _tally(rec, duplex, tally)
            elif self.idle_timeout and now - duplex.idle_since > self.idle_timeout:
                # Asked only here, not every sweep: one ioctl per socket per idle period.
                queued = duplex.queued()
                if queued and queued != duplex.last_queued:
                    duplex.last_queued = queued  # a slow reader is draining the kernel's queue
                    duplex.idle_since = now
                else:
                    rec.close = Close.IDLE_TIMEOUT
                    duplex.abort(Close.IDLE_TIMEOUT)
                    continue
            if self.max_lifetime and now - duplex.started > self.max_lifetime:
                if rec.close is None:
                    rec.close = Close.MAX_LIFETIME
                    duplex.finish(client_is_peer=rec.direction is Direction.INBOUND)
                elif now - duplex.started > self.max_lifetime + _LIFETIME_GRACE:
                    duplex.abort(Close.MAX_LIFETIME)

    def abort_all(self, how: Close) -> None:
        for duplex, rec in list(self.live.items()):
            rec.close = rec.close or how
            duplex.abort(how)
        for rec, (task, _) in list(self.pending.items()):
            rec.close = how
            task.cancel()


# Bytes moved since they were last counted, per (direction, listener): [to_app, from_app].
# A sweep adds them up and calls the counter once per listener and flow, not once per
# connection: a Counter.inc takes a lock (~6,500 instructions under callgrind).
Tally = dict[tuple[Direction, str], list[int]]


def _tally(rec: Record, duplex: Live, tally: Tally) -> None:
    to_app, from_app = duplex.to_app.moved, duplex.from_app.moved
    sums = tally.get((rec.direction, rec.listener))
    if sums is None:
        sums = tally[(rec.direction, rec.listener)] = [0, 0]
    sums[0] += to_app - rec.counted_to_app
    sums[1] += from_app - rec.counted_from_app
    rec.counted_to_app, rec.counted_from_app = to_app, from_app


def _flush(tally: Tally) -> None:
    for (direction, listener), (to_app, from_app) in tally.items():
        series = metrics.series(direction, listener)
        if to_app:
            series.bytes_to_app.inc(to_app)
        if from_app:
            series.bytes_from_app.inc(from_app)


# Pending handshakes looked at for one that never said hello before the oldest is taken:
# enough to find a stalled peer among good ones, bounded so an eviction stays cheap.
EVICT_SCAN = 64
# At max_connections, a pending peer silent this long may be shed to make room. A client
# sends its hello right behind the TCP handshake, so it is usually queued when we accept;
# a second covers a long round trip and a busy loop with room to spare.
SILENT_AFTER = 1.0

# After a lifetime close has passed the end of stream on, how long the peers get to
# finish before the connection is cut: long enough for an in-flight response.
_LIFETIME_GRACE = 10.0
