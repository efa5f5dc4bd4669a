"""Waiting on connection sockets while they connect and shake hands: one epoll set for all
of them, watched by the loop as one fd. (An established connection's pump watches its
sockets through the loop itself: sidecar/proxy/pump.py says why.)

Why not `loop.add_reader` per socket: uvloop gives every fd it watches a libuv poll handle
of its own, and its life costs system calls: creating one checks the fd with an epoll ADD
and DEL and sets O_NONBLOCK again (ioctl), every start or change of interest removes the
fd from epoll and adds it back, and every stop removes it two or three times over. A
mTLS connection waits on its sockets five to ten times, so that was 18-23 epoll_ctl calls
per connection (strace), against HAProxy's 3. Here a socket is added to the set once, its
interest changes with one call when it must (a write wait, rare), and a closed socket
leaves the set by itself (the kernel drops a closed file from every epoll set), so a
connection costs one epoll_ctl per socket. The price is one epoll_wait per wake-up of
the set (the loop's own returns only "the set is ready").

Interest in reading is dropped lazily: a reader that got its event and wants the next one
(a handshake step after another) pays nothing, and a socket that
turns readable while nobody waits on it has its interest dropped then, so a level-
triggered event never spins. Interest in writing is dropped at once: a socket is writable
almost always.

A socket is known by its number and its owner (the endpoint or socket object that
waits on it): a closed socket's number comes back with the next accept, under a new
owner, and must then be added to the set anew. An owner waits on its socket until it
closes it, and says so (`forget`) where it can.
Callbacks run inside the loop's callback for the set; one that raises is reported to the
loop's exception handler, as the loop does for its own callbacks.
"""

from __future__ import annotations

import asyncio
import errno
import select
import weakref
from collections.abc import Callable

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_FAIL = select.EPOLLERR | select.EPOLLHUP
# Events read per wake-up: more stay ready in the set and come at the next loop turn.
MAX_EVENTS = 64

Callback = Callable[[], None]


class _Watch:
    """One socket in the set: what the kernel watches for, and who waits."""

    __slots__ = ("mask", "owner", "reader", "writer")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.mask: int | None = None  # the events the kernel watches for; None: not in the set
        self.reader: Callback | None = None
        self.writer: Callback | None = None


class Poller:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the loop holds this poller (its callback), and the poller must not keep a
        # closed loop alive (tests make one loop after another).
        self._loop = weakref.ref(loop)
        self._ep = select.epoll()
        self._watches: dict[int, _Watch] = {}
        loop.add_reader(self._ep.fileno(), self._dispatch)

    # -- interest ------------------------------------------------------------------------

    def add_reader(self, fd: int, owner: object, callback: Callback) -> None:
        w = self._watch(fd, owner)
        w.reader = callback
        if w.mask is None or not w.mask & _IN:
            self._set(w, fd, (w.mask or 0) | _IN)

    def remove_reader(self, fd: int, owner: object) -> None:
        w = self._watches.get(fd)
        if w is not None and w.owner is owner:
            w.reader = None  # the kernel's interest goes at the next event, if one comes

    def add_writer(self, fd: int, owner: object, callback: Callback) -> None:
        w = self._watch(fd, owner)
        w.writer = callback
        if w.mask is None or not w.mask & _OUT:
            self._set(w, fd, (w.mask or 0) | _OUT)

    def remove_writer(self, fd: int, owner: object) -> None:
        w = self._watches.get(fd)
        if w is not None and w.owner is owner:
            w.writer = None
            if w.mask is not None and w.mask & _OUT:
                self._set(w, fd, w.mask & ~_OUT)

    def forget(self, fd: int, owner: object) -> None:
        """The owner is about to close the socket: stop waiting on it. Its place in the
        kernel's set goes with the close; the entry goes now."""
        w = self._watches.get(fd)
        if w is not None and w.owner is owner:
            del self._watches[fd]

    def discard(self, fd: int, owner: object) -> None:
        """The owner hands the open socket on (a dialed socket to its endpoint): take it
        out of the kernel's set too, so that the next owner starts afresh."""
        w = self._watches.get(fd)
        if w is not None and w.owner is owner:
            del self._watches[fd]
            if w.mask is not None:
                self._drop(w, fd)

    def release(self, fd: int) -> None:
        """The socket open under fd leaves the poller for good (a connection's pump
        watches it through the loop now), whoever waited on it: out of the kernel's set
        too, or its events would still wake the set."""
        w = self._watches.pop(fd, None)
        if w is not None and w.mask is not None:
            self._drop(w, fd)

    def close(self) -> None:
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._ep.fileno())
        self._ep.close()
        self._watches.clear()

    # -- the kernel's side ---------------------------------------------------------------

    def _watch(self, fd: int, owner: object) -> _Watch:
        if fd < 0:
            raise ValueError("cannot wait on a closed socket")
        w = self._watches.get(fd)
        if w is None or w.owner is not owner:
            # New, or a new socket under the number of a closed one: the kernel dropped
            # the closed one's place, so this one starts outside the set.
            w = self._watches[fd] = _Watch(owner)
        return w

    def _set(self, w: _Watch, fd: int, mask: int) -> None:
        try:
            if w.mask is None:
                self._ep.register(fd, mask)
            else:
                self._ep.modify(fd, mask)
        except FileExistsError:  # in the set under this number still (it is open)
            self._ep.modify(fd, mask)
        except FileNotFoundError:  # its place went with a close we did not see
            self._ep.register(fd, mask)
        w.mask = mask

    def _drop(self, w: _Watch, fd: int) -> None:
        try:
            self._ep.unregister(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBADF):
                raise
        w.mask = None

    def _dispatch(self) -> None:
        try:
            events = self._ep.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        for fd, ev in events:
            w = self._watches.get(fd)
            if w is None:  # forgotten, but still open: stop hearing of it
                try:
                    self._ep.unregister(fd)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.EBADF):
                        raise
                continue
            reader, writer = w.reader, w.writer
            if reader is not None and ev & (_IN | _FAIL):
                self._run(reader)
            if writer is not None and ev & (_OUT | _FAIL) and self._watches.get(fd) is w:
                self._run(writer)
            # An event nobody waited for leaves the kernel's interest now: it is
            # level-triggered, and would come again on every turn. (One that was handed
            # over keeps it, though its taker may wait again only a turn later.)
            if ((reader is not None or not ev & (_IN | _FAIL))
                    and (writer is not None or not ev & _OUT)):
                continue
            if self._watches.get(fd) is not w or w.mask is None:
                continue  # forgotten by a callback, or out of the set already
            wanted = (_IN if w.reader is not None else 0) | (_OUT if w.writer is not None else 0)
            try:
                if not wanted:
                    self._drop(w, fd)
                elif w.mask != wanted:
                    self._set(w, fd, wanted)
            except OSError as exc:  # closed by a callback without forget(): nothing left
                if exc.errno != errno.EBADF:
                    raise
                del self._watches[fd]

    def _run(self, callback: Callback) -> None:
        try:
            callback()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            loop = self._loop()
            if loop is not None:
                loop.call_exception_handler({
                    "message": "exception in a socket callback", "exception": exc,
                    "callback": callback})


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = (
    weakref.WeakKeyDictionary())
# The same pollers, for forget(), which runs on every close: iterating the weak mapping
# is a Python-level generator; this list is pruned as its pollers go.
_every: list[weakref.ref[Poller]] = []


def of(loop: asyncio.AbstractEventLoop) -> Poller:
    """The loop's poller, made at its first use."""
    p = _pollers.get(loop)
    if p is None:
        p = _pollers[loop] = Poller(loop)
        _every[:] = [r for r in _every if r() is not None]
        _every.append(weakref.ref(p))
    return p


def forget(fd: int, owner: object) -> None:
    """`owner` is about to close `fd`: every loop's poller stops waiting on it."""
    for r in _every:
        p = r()
        if p is not None:
            p.forget(fd, owner)


def ready(loop: asyncio.AbstractEventLoop, fd: int, owner: object, *,
          write: bool = False) -> asyncio.Future[None]:
    """A future that completes once fd is readable (or writable); cancelling it stops the
    wait."""
    p = of(loop)
    fut: asyncio.Future[None] = loop.create_future()
    remove = p.remove_writer if write else p.remove_reader

    def fire() -> None:
        remove(fd, owner)
        if not fut.done():
            fut.set_result(None)

    def done(f: asyncio.Future[None]) -> None:
        if f.cancelled():
            remove(fd, owner)

    (p.add_writer if write else p.add_reader)(fd, owner, fire)
    fut.add_done_callback(done)
    return fut
