"""Listening sockets, accepting on loop callbacks, and dialing the other side.

A listener stops accepting when the process is at `max_connections` (new peers then
wait in the kernel's backlog, as with HAProxy's maxconn, instead of being refused) and
starts again as soon as a connection ends. Waiting peers are no secret: while paused,
`sidecar_listener_paused` is 1 and `sidecar_listener_backlog` says how many wait.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from sidecar import poller
from sidecar.config import Address
from sidecar.observe import metrics
from sidecar.outcomes import Direction

# Kernel backlog: SOMAXCONN-sized, so a burst waits in the kernel rather than failing.
BACKLOG = 4096
# Connections accepted per readiness event before other work gets a turn.
ACCEPTS_PER_TURN = 64
# How long accepting pauses when the process is out of descriptors.
ACCEPT_BACKOFF = 0.1
# How often a paused listener's accept queue is read for the backlog gauge: a scrape
# rarely comes more often, and one getsockopt a second is nothing.
BACKLOG_SAMPLE_EVERY = 1.0
# Why a listener pauses: the `reason` label of sidecar_listener_paused.
FULL = "max_connections"
OUT_OF_DESCRIPTORS = "descriptors"

AcceptCallback = Callable[[socket.socket, str], None]


class Observer(Protocol):
    """Where `dial` reports its duration: a histogram child of metrics.py."""

    def observe(self, amount: float) -> None: ...


class Listener:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        name: str,
        direction: Direction,
        address: Address,
        on_accept: AcceptCallback,
        *,
        reuse_port: bool = False,
    ) -> None:
        self.name = name
        self.direction = direction
        self.address = address
        self._loop = loop
        self._on_accept = on_accept
        self._sock = bind(address, reuse_port=reuse_port)
        # Asked once: socket.family converts to an enum on every read (a Python-level call).
        self._family = self._sock.family
        self._tcp = self._family != socket.AF_UNIX
        self._paused = True
        self._why: str | None = None  # why it is paused, while the gauge says so
        self._sampler: asyncio.TimerHandle | None = None

    @property
    def bound(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    def resume(self) -> None:
        if self._paused and self._sock.fileno() >= 0:
            self._paused = False
            self._unshow()
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def pause(self, why: str = FULL) -> None:
        if not self._paused:
            self._paused = True
            self._loop.remove_reader(self._sock.fileno())
            self._why = why
            metrics.listener_paused.labels(self.direction, self.name, why).set(1)
            self._sample_backlog()

    def close(self) -> None:
        if not self._paused:
            self._paused = True
            self._loop.remove_reader(self._sock.fileno())
        self._unshow()
        self._sock.close()

    def _sample_backlog(self) -> None:
        metrics.listener_backlog.labels(self.direction, self.name).set(
            accept_queue(self._sock))
        self._sampler = self._loop.call_later(BACKLOG_SAMPLE_EVERY, self._sample_backlog)

    def _unshow(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        if self._why is not None:
            metrics.listener_paused.labels(self.direction, self.name, self._why).set(0)
            metrics.listener_backlog.labels(self.direction, self.name).set(0)
            self._why = None

    def _accept(self) -> None:
        accept = self._sock._accept  # type: ignore[attr-defined]  # see below
        for _ in range(ACCEPTS_PER_TURN):
            try:
                # The C-level accept, and the socket object made from its descriptor with
                # what we know of the listener: socket.accept() asks the listener's family
                # and type anew, each an enum conversion in Python, on every connection.
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Out of descriptors (EMFILE/ENFILE) or memory: the socket stays readable,
                # so waiting for the next event would spin a core. Back off instead.
                self.pause(OUT_OF_DESCRIPTORS)
                self._loop.call_later(ACCEPT_BACKOFF, self.resume)
                return
            conn = socket.socket(self._family, socket.SOCK_STREAM, 0, fd)
            try:
                conn.setblocking(False)
                if self._tcp:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                conn.close()  # reset between accept and here
                continue
            self._on_accept(conn, _peer(addr))
            if self._paused:
                return


def accept_queue(sock: socket.socket) -> int:
    """Connections waiting in a listening TCP socket's accept queue (what `ss -lt` shows
    as Recv-Q): for a socket in LISTEN, Linux reports it in TCP_INFO's tcpi_unacked, the
    fifth 32-bit field after eight one-byte ones (linux/tcp.h). 0 where unknown."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_UNACKED + 4)
    except (OSError, AttributeError):
        return 0
    if len(info) < _TCPI_UNACKED + 4:
        return 0
    queued: int = struct.unpack_from("=I", info, _TCPI_UNACKED)[0]
    return queued


_TCPI_UNACKED = 24


def bind(address: Address, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _literal(address: Address) -> list[tuple[Any, Any, Any, Any, Any]] | None:
    """An IP literal needs no resolver: skip the thread-pool round trip of getaddrinfo."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address.host)
        except OSError:
            continue
        return [(family, socket.SOCK_STREAM, 0, "", (address.host, address.port))]
    return None


def _peer(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr) or "unix"


async def dial(address: Address, timeout: float, timed: Observer | None = None) -> socket.socket:
    """Open a non-blocking stream to host:port (every address it resolves to) or unix:path.

    A timeout raises TimeoutError("timed out after 5s"): asyncio's own has no words, and
    callers log `cannot reach ADDRESS: {exc}`. `timed` observes how long a successful
    dial took."""
    try:
        started = time.monotonic()
        sock = await _dial(address, timeout)
        if timed is not None:
            timed.observe(time.monotonic() - started)
        return sock
    except TimeoutError as exc:
        if str(exc):  # the kernel's ETIMEDOUT, which says what it is
            raise
        raise TimeoutError(f"timed out after {timeout:g}s") from None


async def _dial(address: Address, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    literal = _literal(address) if address.unix is None else None
    if literal is not None:
        # An IP literal (the usual app address): connect at once, and arm the timer only
        # if the connect must be waited for; a local app is connected within the call.
        family, type_, proto, _, sockaddr = literal[0]
        sock = _open(family, type_, proto)
        try:
            err = _connect_now(sock, sockaddr)
            if err in _IN_PROGRESS:
                async with asyncio.timeout(timeout):
                    err = await _connected(loop, sock)
            if err:
                raise OSError(err, f"connect to {_peer(sockaddr)} failed: {os.strerror(err)}")
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    async with asyncio.timeout(timeout):
        if address.unix is not None:
            sock = _open(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                await loop.sock_connect(sock, address.unix)
            except BaseException:
                sock.close()
                raise
            return sock
        infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        last: OSError = OSError(f"{address} resolved to nothing")
        for family, type_, proto, _, sockaddr in infos:
            sock = _open(family, type_, proto)
            try:
                err = _connect_now(sock, sockaddr)
                if err in _IN_PROGRESS:
                    err = await _connected(loop, sock)
                if err:
                    raise OSError(err, f"connect to {_peer(sockaddr)} failed: "
                                       f"{os.strerror(err)}")
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise last


_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY)


def _open(family: int, type_: int, proto: int) -> socket.socket:
    """A non-blocking socket, made so by the call that makes it where the OS can (Linux):
    no FIONBIO after."""
    sock = socket.socket(family, type_ | _NONBLOCK, proto)
    if not _NONBLOCK:
        sock.setblocking(False)
    return sock


def _connect_now(sock: socket.socket, sockaddr: Any) -> int:
    """Start a non-blocking TCP connect to an address already resolved (not
    loop.sock_connect: uvloop's resolves the address again through its thread pool, even an
    IP literal, a thread hop on every connection to the app): 0 when connected, an errno
    otherwise (EINPROGRESS / EALREADY: wait for writability).

    A connect to a local app is usually complete when the call returns (the kernel runs
    loopback's TCP handshake within it), though the call still says "in progress": asking
    again says "connected" (0) or why not, for one system call instead of a wait."""
    err = sock.connect_ex(sockaddr)
    if err == errno.EINPROGRESS:
        err = sock.connect_ex(sockaddr)
    return 0 if err == errno.EISCONN else err


async def _connected(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> int:
    """Wait for a connect in progress to end: 0, or its errno."""
    fd = sock.fileno()
    try:
        await poller.ready(loop, fd, sock, write=True)
    finally:
        poller.of(loop).discard(fd, sock)  # the endpoint that takes the socket waits afresh
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
