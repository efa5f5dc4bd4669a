"""The byte pump: both directions of one proxied connection, on loop callbacks.

Each direction (a Flow) is a tiny state machine: read a chunk from its source into the
one buffer the whole process shares, write it straight to its destination, repeat. When
the destination cannot take it all, the rest is copied aside, the flow stops reading
(backpressure: a slow reader never makes us buffer more than one chunk per direction)
and waits for the destination to be writable. When the source ends, the end is passed on
with `shutdown_write` and the other direction keeps going (half-close).

Why callbacks and not a coroutine per direction: a held, idle connection then costs no
task, no coroutine frame and no buffer: only this object, its two flows, and the loop's
registration of the fds it waits on. That is what keeps memory per connection near
OpenSSL's own.

Both flows may wait on the same fd (a TLS write can want a read), and the loop keeps one
callback per fd and event, so the Duplex owns the registrations and asks each flow what
it waits for after every step.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from sidecar.endpoint import WANT_WRITE, Endpoint

# 64 KiB: four full TLS records per read or write call, so the Python cost per MiB is
# 16 calls a direction rather than 64; larger gains little (socket buffers are ~200 KiB).
CHUNK = 64 * 1024
# Chunks a flow may move per loop turn before it lets other connections run.
ROUNDS_PER_TURN = 16

_buffer = memoryview(bytearray(CHUNK))


class Flow:
    """One direction: src -> dst."""

    __slots__ = ("done", "dst", "eof", "moved", "pending", "src", "wait")

    def __init__(self, src: Endpoint, dst: Endpoint) -> None:
        self.src = src
        self.dst = dst
        self.pending: memoryview | None = None
        self.eof = False
        self.done = False
        self.moved = 0
        # What the flow waits for: (endpoint, want_write), or None (running / done).
        self.wait: tuple[Endpoint, bool] | None = None

    def run(self) -> bool:
        """Move bytes until blocked; False when the turn ran out and must be resumed."""
        rounds = 0
        while True:
            if self.pending is not None:
                n = self.dst.write(self.pending)
                if n < 0:
                    self.wait = (self.dst, n == WANT_WRITE)
                    return True
                self.moved += n
                if n < len(self.pending):
                    self.pending = self.pending[n:]
                    self.wait = (self.dst, True)
                    return True
                self.pending = None
            if self.eof:
                rc = self.dst.shutdown_write()
                if rc < 0:
                    self.wait = (self.dst, rc == WANT_WRITE)
                    return True
                self.done = True
                self.wait = None
                return True
            if rounds == ROUNDS_PER_TURN:
                self.wait = None
                return False
            rounds += 1
            n = self.src.read_into(_buffer)
            if n < 0:
                self.wait = (self.src, n == WANT_WRITE)
                return True
            if n == 0:
                self.eof = True
                continue
            data = _buffer[:n]
            w = self.dst.write(data)
            if w == n:
                self.moved += n
                continue
            if w >= 0:
                self.moved += w
                self.pending = memoryview(bytes(data[w:]))
                self.wait = (self.dst, True)
            else:
                self.pending = memoryview(bytes(data))
                self.wait = (self.dst, w == WANT_WRITE)
            return True


CloseCallback = Callable[["Duplex", str, BaseException | None], None]


class Duplex:
    """Both flows of one connection between the local app and the remote peer."""

    __slots__ = (
        "_loop", "_on_close", "_reg", "app", "closed", "from_app", "idle_since", "last_moved",
        "peer", "started", "to_app",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app: Endpoint,
        peer: Endpoint,
        on_close: CloseCallback,
    ) -> None:
        self._loop = loop
        self.app = app
        self.peer = peer
        self.to_app = Flow(peer, app)
        self.from_app = Flow(app, peer)
        self._on_close = on_close
        # Registered interest: app read, app write, peer read, peer write.
        self._reg = [False, False, False, False]
        self.closed = False
        self.started = loop.time()
        self.idle_since = self.started  # kept by the sweeper, not by the hot path
        self.last_moved = 0

    def start(self) -> None:
        self._step((self.to_app, self.from_app))

    @property
    def moved(self) -> int:
        return self.to_app.moved + self.from_app.moved

    def finish(self) -> None:
        """Close gracefully: stop reading, flush what is held, pass the end on both ways."""
        for flow in (self.to_app, self.from_app):
            if not flow.done:
                flow.eof = True
        self._step((self.to_app, self.from_app))

    def abort(self, reason: str, exc: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        for i, on in enumerate(self._reg):
            if on:
                self._unregister(i)
        self.app.close()
        self.peer.close()
        self._on_close(self, reason, exc)

    # -- loop callbacks -----------------------------------------------------------------

    def _app_readable(self) -> None:
        self._step(self._waiting(self.app, False))

    def _app_writable(self) -> None:
        self._step(self._waiting(self.app, True))

    def _peer_readable(self) -> None:
        self._step(self._waiting(self.peer, False))

    def _peer_writable(self) -> None:
        self._step(self._waiting(self.peer, True))

    def _resume(self, flow: Flow) -> None:
        if not self.closed:
            self._step((flow,))

    # -- the one place that runs flows and keeps registrations in step ------------------

    def _waiting(self, ep: Endpoint, write: bool) -> tuple[Flow, ...]:
        return tuple(f for f in (self.to_app, self.from_app) if f.wait == (ep, write))

    def _step(self, flows: tuple[Flow, ...]) -> None:
        if self.closed:
            return
        try:
            for flow in flows:
                if not flow.done and not flow.run():
                    self._loop.call_soon(self._resume, flow)
        except (OSError, ssl.SSLError) as exc:
            self.abort("error", exc)
            return
        if self.to_app.done and self.from_app.done:
            self.abort("closed")
            return
        want = [False, False, False, False]
        for flow in (self.to_app, self.from_app):
            if flow.wait is not None:
                ep, write = flow.wait
                want[(0 if ep is self.app else 2) + write] = True
        for i in range(4):
            if want[i] != self._reg[i]:
                self._register(i) if want[i] else self._unregister(i)

    def _register(self, i: int) -> None:
        ep = self.app if i < 2 else self.peer
        callbacks = (self._app_readable, self._app_writable,
                     self._peer_readable, self._peer_writable)
        if i % 2:
            self._loop.add_writer(ep.fd, callbacks[i])
        else:
            self._loop.add_reader(ep.fd, callbacks[i])
        self._reg[i] = True

    def _unregister(self, i: int) -> None:
        ep = self.app if i < 2 else self.peer
        if i % 2:
            self._loop.remove_writer(ep.fd)
        else:
            self._loop.remove_reader(ep.fd)
        self._reg[i] = False
