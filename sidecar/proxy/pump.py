"""The byte pump: both directions of one proxied connection, on loop callbacks.

Each direction (a Flow) is a tiny state machine: read a chunk from its source into the
one buffer the whole process shares, write it straight to its destination, repeat. When
the destination cannot take it all, the rest is copied aside, the flow stops reading
(backpressure: a slow reader never makes us buffer more than one chunk per direction)
and waits for the destination to be writable. When the source ends, the end is passed on
with `shutdown_write` and the other direction keeps going (half-close). Only a clean end
is passed on so: a source cut short (a TLS stream without close_notify, a reset) resets
both sides (Close says how it ended).

Why callbacks and not a coroutine per direction: a held, idle connection then costs no
task, no coroutine frame and no buffer: only this object, its two flows, and the loop's
registrations of the fds it waits on. That is what keeps memory per connection near
OpenSSL's own.

Why the loop's own registrations (add_reader / add_writer) and not the poller the
handshake waits through (sidecar/poller.py): the poller's set wakes the loop as one fd,
and each wake-up then costs an epoll_wait more and a Python dispatch, ~12 k
instructions per process per round trip (bench/request_cost.py: 111 k counted both
processes, 87 k with the loop's registrations). The price is paid once per connection
instead: uvloop's poll handle for each socket costs ~11 epoll_ctl over its life
(bench/handshake_table.py: 13 per connection against 2). Duplex.start takes the
peer's socket out of the poller's set (Poller.release).

Both flows may wait on the same fd (a TLS write can want a read), and the loop keeps
one callback per fd and event, so the Duplex owns the registrations and asks each flow what
it waits for after every step. A registration stays while a flow keeps waiting for the
same thing: a connection that carries requests back and forth makes no epoll_ctl call.
A read no longer wanted stays too, until it fires with nobody waiting (_update).

The cost per request (bench/request_cost.py) is the cost of a loop callback that reads,
writes and goes back to waiting, so the steady state avoids what Python makes dear:
a read that finds nothing raises an exception (~7,000 instructions for a socket, ~11,000
for TLS, against ~2,000 for a read that gets 64 bytes). The source says after each read
whether it is drained (`Endpoint.drained`): then the flow waits for the loop to call it
back instead of trying again, and the loop's level-triggered epoll calls it as soon as
more has come, even if that happened in between. The usual event, "readable, one read,
one write, wait again", is written out in one callback (Duplex._readable), which calls
the sockets' and OpenSSL's C-level read and write straight where an endpoint has them
(`Endpoint.calls`) and writes from views of the shared buffer made once per size.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import termios
from collections.abc import Callable

from sidecar import poller
from sidecar.endpoint import RESET, WANT_READ, WANT_WRITE, Endpoint
from sidecar.outcomes import Close


class Cut(Exception):
    """A source's stream ended without a clean end (read_into said TRUNCATED or RESET)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code

# 64 KiB: four full TLS records per read or write call, so the Python cost per MiB is
# 16 calls a direction rather than 64; larger gains little (socket buffers are ~200 KiB).
CHUNK = 64 * 1024
# Chunks a flow may move per loop turn before it lets other connections run.
ROUNDS_PER_TURN = 16

_buffer = memoryview(bytearray(CHUNK))
# Views of the shared buffer's first n bytes for small n, each made once: a slice is a
# new memoryview (~600 instructions to make and free per write), and a connection's
# message sizes recur. At most _SMALL views (~200 bytes each) per process.
_SMALL = 2048
_heads: list[memoryview | None] = [None] * _SMALL


def _view(n: int) -> memoryview:
    """The shared buffer's first n bytes (the hot paths look in _heads first)."""
    if n < _SMALL:
        view = _heads[n]
        if view is None:
            view = _heads[n] = _buffer[:n]
        return view
    return _buffer if n == CHUNK else _buffer[:n]


# What a flow waits for (Flow.waiting): nothing (it runs, or is done), or its source /
# destination to be readable / writable.
NOTHING, SRC_READ, SRC_WRITE, DST_READ, DST_WRITE = 0, 1, 2, 3, 4


class Flow:
    """One direction: src -> dst."""

    __slots__ = ("done", "dst", "eof", "moved", "own_copy", "pending", "recv", "send", "src",
                 "waiting")

    def __init__(self, src: Endpoint, dst: Endpoint) -> None:
        self.src = src
        self.dst = dst
        # OpenSSL writes to a kTLS socket straight from the caller's buffer, and after
        # WANT_WRITE it resumes from the buffer it was first given, whatever the retry
        # passes (ACCEPT_MOVING_WRITE_BUFFER only relaxes the check). The shared buffer
        # holds the next read of any flow by then: such a destination is written from a
        # copy of its own, and retried with that very copy.
        self.own_copy = dst.ktls_tx
        # The endpoints' C-level read and write, where they have them (Endpoint.calls):
        # called straight, they save a Python frame each per chunk. A destination written
        # from a copy goes through forward().
        self.recv = src.calls()[0]
        self.send = None if self.own_copy else dst.calls()[1]
        self.pending: memoryview | None = None
        self.eof = False
        self.done = False
        self.moved = 0
        self.waiting = NOTHING  # a small int: no tuple to build per wait, none to keep

    @property
    def wait(self) -> tuple[Endpoint, bool] | None:
        """What the flow waits for: (endpoint, for writing?), or None."""
        w = self.waiting
        if w == NOTHING:
            return None
        return (self.src if w <= SRC_WRITE else self.dst), w in (SRC_WRITE, DST_WRITE)

    def run(self) -> bool:
        """Move bytes until blocked; False when the turn ran out and must be resumed."""
        rounds = 0
        src = self.src
        recv, send = self.recv, self.send
        while True:
            if (self.pending is not None or self.eof) and self._flush():
                return True
            if rounds == ROUNDS_PER_TURN:
                self.waiting = NOTHING
                return False
            rounds += 1
            # read_once and forward, written out: this loop is the cost of a request, and
            # a Python call is a few hundred instructions. (Duplex._readable has the first
            # round of the usual event written out once more.)
            if recv is not None:
                try:
                    n = recv(_buffer)
                except OSError as exc:
                    n = src.read_code(exc)
                drained = n < CHUNK
            else:
                n = src.read_into(_buffer)
                drained = src.drained
            if n <= 0:
                if n == 0:
                    self.eof = True
                    continue
                if n < WANT_WRITE:
                    raise Cut(n)
                self.waiting = SRC_READ if n == WANT_READ else SRC_WRITE
                return True
            if send is None:
                if not self.forward(n):
                    return True
            else:
                view = _heads[n] if n < _SMALL else None
                if view is None:
                    view = _view(n)
                try:
                    w = send(view)
                except OSError as exc:
                    w = self.dst.write_code(exc)
                if w != n:
                    self._held(view, w)
                    return True
                self.moved += n
            if drained:
                # Reading again would most likely raise and catch "nothing yet": let the
                # loop say when there is more.
                self.waiting = SRC_READ
                return True

    def _flush(self) -> bool:
        """Write what is held, then pass the end on if it came; True when the flow must
        now wait (or is done)."""
        if self.pending is not None:
            n = self.dst.write(self.pending)
            if n < 0:
                self.waiting = DST_WRITE if n == WANT_WRITE else DST_READ
                return True
            self.moved += n
            if n < len(self.pending):
                self.pending = self.pending[n:]
                self.waiting = DST_WRITE
                return True
            self.pending = None
        if self.eof:
            rc = self.dst.shutdown_write()
            if rc < 0:
                self.waiting = DST_WRITE if rc == WANT_WRITE else DST_READ
                return True
            self.done = True
            self.waiting = NOTHING
            return True
        return False

    def read_once(self) -> bool:
        """Read one chunk through the source endpoint and pass it on; False when the flow
        must now wait (nothing more to read, or the destination held some back)."""
        src = self.src
        n = src.read_into(_buffer)
        if n <= 0:
            if n == 0:
                self.eof = True
                return True
            if n < WANT_WRITE:
                raise Cut(n)
            self.waiting = SRC_READ if n == WANT_READ else SRC_WRITE
            return False
        if not self.forward(n):
            return False
        if src.drained:
            # Trying again would most likely raise and catch "nothing yet": let the loop
            # say when there is more.
            self.waiting = SRC_READ
            return False
        return True

    def forward(self, n: int) -> bool:
        """Write the n bytes just read into the shared buffer; False when the destination
        held some back (they are copied aside and the flow waits)."""
        data = memoryview(bytes(_buffer[:n])) if self.own_copy else _view(n)
        w = self.dst.write(data)
        if w == n:
            self.moved += n
            return True
        self._held(data, w)
        return False

    def _held(self, data: memoryview, w: int) -> None:
        """The destination took w of data (w < len(data); a wish if negative): keep the
        rest, in a copy unless it is one already, and wait."""
        if w >= 0:
            self.moved += w
            self.pending = memoryview(bytes(data[w:]))  # nothing of it is OpenSSL's now
            self.waiting = DST_WRITE
        else:
            self.pending = data if self.own_copy else memoryview(bytes(data))
            self.waiting = DST_WRITE if w == WANT_WRITE else DST_READ


class SpliceFlow(Flow):
    """A direction whose TLS side the kernel handles (kTLS): bytes go socket -> pipe ->
    socket with os.splice and never enter Python.

    One pipe serves the whole process: each chunk is spliced in and straight out again,
    so the pipe is empty between calls. When the destination cannot take all of a chunk,
    the rest is read out of the pipe into `pending` (one copy, only under backpressure)
    and written the ordinary way, which for a kTLS socket is still the kernel's
    encryption. A kTLS receive socket hands non-data records (alerts, a KeyUpdate, a
    ticket) to no splice: those make splice fail, and OpenSSL's own read, which uses
    recvmsg and knows record types, takes that record.
    """

    __slots__ = ()

    def run(self) -> bool:
        rounds = 0
        pipe_r, pipe_w = _shared_pipe()
        while True:
            if self.pending is not None or self.eof:
                return super().run()  # flush what is held, or pass the end on
            if rounds == ROUNDS_PER_TURN:
                self.waiting = NOTHING
                return False
            rounds += 1
            try:
                n = os.splice(self.src.fd, pipe_w, CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self.waiting = SRC_READ
                return True
            except OSError as exc:
                if exc.errno not in _NOT_DATA:
                    raise
                # A control record on a kTLS receive socket: OpenSSL reads it.
                if not self.read_once():
                    return True
                continue
            if n == 0:
                # OpenSSL tells a close_notify (seen first, as a non-data record) from a
                # bare FIN, which is a truncation.
                if not self.read_once():
                    return True
                continue
            try:
                out = os.splice(pipe_r, self.dst.fd, n, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                out = 0
            except OSError:
                # The pipe is shared by every connection: never leave this one's bytes in
                # it for the next connection's splice to deliver.
                _read_exactly(pipe_r, n)
                raise
            self.moved += out
            if out < n:
                self.pending = memoryview(_read_exactly(pipe_r, n - out))
                self.waiting = DST_WRITE
                return True


_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# What splice says when the next record on a kTLS receive socket is not application data.
_NOT_DATA = frozenset({errno.EIO, errno.EINVAL, errno.EBADMSG})
_pipe: tuple[int, int] | None = None


def _shared_pipe() -> tuple[int, int]:
    global _pipe
    if _pipe is None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A pipe holds 64 KiB by default; make sure one CHUNK always fits.
        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK)
        _pipe = (r, w)
    return _pipe


def _read_exactly(fd: int, n: int) -> bytes:
    parts = []
    while n > 0:
        part = os.read(fd, n)
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _unsent(fd: int) -> int:
    """SIOCOUTQ (TIOCOUTQ on Linux): a TCP socket's bytes not yet acknowledged by the
    receiver, a unix socket's bytes not yet read by it. 0 where it cannot be asked."""
    try:
        out = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    queued: int = struct.unpack("i", out)[0]
    return queued


def can_splice() -> bool:
    return hasattr(os, "splice")


CloseCallback = Callable[["Duplex", Close, BaseException | None], None]

# The loop registrations of a Duplex, one bit each: app readable, app writable, peer
# readable, peer writable.
APP_READ, APP_WRITE, PEER_READ, PEER_WRITE = 1, 2, 4, 8
# Flow.waiting -> registration bit, for each flow (indexed by NOTHING .. DST_WRITE).
_TO_APP_BITS = (0, PEER_READ, PEER_WRITE, APP_READ, APP_WRITE)
_FROM_APP_BITS = (0, APP_READ, APP_WRITE, PEER_READ, PEER_WRITE)
_WRITES = APP_WRITE | PEER_WRITE


class Duplex:
    """Both flows of one connection between the local app and the remote peer."""

    __slots__ = (
        "_loop", "_on_close", "_reg", "app", "closed", "from_app",
        "idle_since", "last_moved", "last_queued", "peer", "started", "to_app",
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
        # With kTLS the kernel holds the record keys, and a direction can bypass Python.
        splice = can_splice()
        self.to_app = (SpliceFlow if splice and peer.ktls_rx else Flow)(peer, app)
        self.from_app = (SpliceFlow if splice and peer.ktls_tx else Flow)(app, peer)
        self._on_close = on_close
        self._reg = 0  # the registration bits the loop holds
        self.closed = False
        self.started = loop.time()
        self.idle_since = self.started  # kept by the sweeper, not by the hot path
        self.last_moved = 0
        self.last_queued = 0  # queued() when the sweeper last looked

    def start(self) -> None:
        # The handshake waited on the peer's socket through the poller (no epoll_ctl per
        # wait there); from here on the loop watches it itself (the module docstring says
        # why), so the poller lets it go. The app's socket is not in the poller's set: an
        # accepted one never was, a dialed one left it when connected (listener._connected).
        poller.of(self._loop).release(self.peer.fd)
        self._step(self.to_app, self.from_app)

    @property
    def moved(self) -> int:
        return self.to_app.moved + self.from_app.moved

    def queued(self) -> int:
        """Bytes the kernel still holds on their way out of either socket. Behind a reader
        slower than the socket buffers are large, these drain for a long while with no
        write of ours: that is progress too, and the idle sweeper asks for it."""
        return _unsent(self.app.fd) + _unsent(self.peer.fd)

    def finish(self, client_is_peer: bool) -> None:
        """Close gracefully: end the client's direction only (no more requests), and let
        the answers flow until the server side ends too (the sweeper cuts it after a
        grace period). Inbound the client is the remote peer; outbound it is the app."""
        flow = self.to_app if client_is_peer else self.from_app
        if not flow.done:
            flow.eof = True
            self._step(flow)

    def abort(self, how: Close, exc: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        # The loop must stop watching an fd before it is closed (its number comes back
        # with the next accept).
        if self._reg:
            self._unregister(self._reg)
        if how is Close.CLOSED:
            self.app.close()
            self.peer.close()
        else:
            # Cut short (a cut or an error on either side, idle, drain, recheck): both
            # sides see a reset, not an end they could take for a complete stream; the TLS
            # peer gets no close_notify.
            self.app.reset()
            self.peer.reset()
        self._on_close(self, how, exc)

    # -- loop callbacks -----------------------------------------------------------------

    def _resume(self, flow: Flow) -> None:
        if not self.closed:
            self._step(flow)

    # -- the one place that runs flows and keeps registrations in step ------------------

    def _ready(self, bit: int) -> None:
        """The poller's callback for every registration (`bit` says which): run the flows
        that wait for it (none: a stale wake-up, which only brings the registrations in
        step)."""
        to_app, from_app = self.to_app, self.from_app
        if _TO_APP_BITS[to_app.waiting] == bit:
            if _FROM_APP_BITS[from_app.waiting] == bit:
                self._step(to_app, from_app)
                return
            flow = to_app
        elif _FROM_APP_BITS[from_app.waiting] == bit:
            flow = from_app
        else:
            # Nobody waits for it: a read kept registered after its flow stopped wanting
            # it (_update says why). It is level-triggered, so it goes now.
            if not self.closed:
                self._unregister(bit)
                self._step(None)
            return
        if self.closed or flow.done:
            self._step(flow)
            return
        # One flow, one event: the usual case, and _step written out for it (a Python
        # call fewer per request).
        try:
            if not flow.run():
                self._loop.call_soon(self._resume, flow)
        except (Cut, OSError) as exc:  # ssl.SSLError is an OSError
            self._broke(flow, exc)
            return
        self._settle()

    def _readable(self, bit: int) -> None:
        """The loop's callback for a readable socket whose reader moves bytes through
        Python (not a SpliceFlow, not a copy): the usual event of a request. One read
        and one write, then back to waiting on the same registrations: that is _ready
        and the first round of Flow.run written out here, a Python call, a loop and the
        registration bookkeeping less per event. Anything else goes the general way."""
        if bit == PEER_READ:
            flow, other = self.to_app, self.from_app
        else:
            flow, other = self.from_app, self.to_app
        if flow.waiting != SRC_READ or other.waiting == DST_READ or self.closed:
            self._ready(bit)  # the other flow waits for it too, or the flow is elsewhere
            return
        try:
            recv = flow.recv
            if recv is not None:
                try:
                    n = recv(_buffer)
                except OSError as exc:
                    n = flow.src.read_code(exc)
                drained = n < CHUNK
            else:
                src = flow.src
                n = src.read_into(_buffer)
                drained = src.drained
            if n > 0:
                view = _heads[n] if n < _SMALL else None
                if view is None:
                    view = _view(n)
                send = flow.send
                assert send is not None  # _on_read registers no other flow here
                try:
                    w = send(view)
                except OSError as exc:
                    w = flow.dst.write_code(exc)
                if w == n:
                    flow.moved += n
                    if drained:
                        return  # waits for the next read, as registered: nothing to change
                    if not flow.run():
                        self._loop.call_soon(self._resume, flow)
                else:
                    flow._held(view, w)
            elif n == 0:
                flow.eof = True
                if not flow.run():  # passes the end on
                    self._loop.call_soon(self._resume, flow)
            elif n < WANT_WRITE:
                raise Cut(n)
            elif n == WANT_WRITE:
                flow.waiting = SRC_WRITE
            else:
                return  # nothing to read after all (a stale readiness): wait again
        except (Cut, OSError) as exc:  # ssl.SSLError is an OSError
            self._broke(flow, exc)
            return
        self._settle()

    def _broke(self, flow: Flow | None, exc: Cut | OSError) -> None:
        """A flow's read or write raised: a cut stream ends as its code says, any other
        error aborts the pair."""
        if isinstance(exc, Cut):
            self._cut(flow, exc.code)
        else:
            self.abort(self._failed(flow, exc), exc)

    def _settle(self) -> None:
        """After flows ran: close when both are done, else bring the registrations in
        step with what the flows wait for."""
        to_app, from_app = self.to_app, self.from_app
        if to_app.done and from_app.done:
            self.abort(Close.CLOSED)
            return
        want = _TO_APP_BITS[to_app.waiting] | _FROM_APP_BITS[from_app.waiting]
        if want != self._reg:
            self._update(want)

    def _on_read(self, flow: Flow) -> Callable[[int], None]:
        """The callback for the registration of `flow`'s source for reading."""
        if isinstance(flow, SpliceFlow) or flow.send is None:
            return self._ready
        return self._readable

    def _step(self, first: Flow | None, second: Flow | None = None) -> None:
        if self.closed:
            return
        flow = first
        try:
            if first is not None and not first.done and not first.run():
                self._loop.call_soon(self._resume, first)
            if second is not None:
                flow = second
                if not second.done and not second.run():
                    self._loop.call_soon(self._resume, second)
        except (Cut, OSError) as exc:  # ssl.SSLError is an OSError
            self._broke(flow, exc)
            return
        self._settle()

    def _cut(self, flow: Flow | None, code: int) -> None:
        """A flow's source ended without a clean end: reset both sides, saying whose."""
        if flow is not self.to_app:
            self.abort(Close.APP_RESET)
        else:
            self.abort(Close.PEER_RESET if code == RESET else Close.TRUNCATED)

    def _failed(self, flow: Flow | None, exc: BaseException) -> Close:
        """A write that met a reset (reads report theirs as codes) names the flow's
        destination; anything else is an error."""
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)) and flow is not None:
            return Close.APP_RESET if flow.dst is self.app else Close.PEER_RESET
        return Close.ERROR

    def _update(self, want: int) -> None:
        """Register and unregister with the loop until it holds `want`, but for reads no
        longer wanted: each change is an epoll_ctl or more with uvloop, and a flow that
        stops reading for a moment (its turn ran out, or its destination is full) mostly
        reads again soon. Such a read stays until it fires unwanted (_ready drops it then).
        """
        reg = self._reg
        add = want & ~reg
        drop = reg & ~want & _WRITES
        if drop:
            self._unregister(drop)
        if add:
            loop, ready, app_fd, peer_fd = self._loop, self._ready, self.app.fd, self.peer.fd
            if add & APP_READ:
                loop.add_reader(app_fd, self._on_read(self.from_app), APP_READ)
            if add & APP_WRITE:
                loop.add_writer(app_fd, ready, APP_WRITE)
            if add & PEER_READ:
                loop.add_reader(peer_fd, self._on_read(self.to_app), PEER_READ)
            if add & PEER_WRITE:
                loop.add_writer(peer_fd, ready, PEER_WRITE)
            self._reg |= add

    def _unregister(self, bits: int) -> None:
        loop = self._loop
        if bits & APP_READ:
            loop.remove_reader(self.app.fd)
        if bits & APP_WRITE:
            loop.remove_writer(self.app.fd)
        if bits & PEER_READ:
            loop.remove_reader(self.peer.fd)
        if bits & PEER_WRITE:
            loop.remove_writer(self.peer.fd)
        self._reg &= ~bits
