"""The TLS engine: one non-blocking `ssl.SSLSocket` per connection, driven by the loop.

General theory of operation
---------------------------
asyncio's own SSL transport (stdlib and uvloop alike) runs OpenSSL over memory BIOs:
the loop reads ciphertext from the socket, feeds it to an `SSLObject`, and writes what
comes out. That design can never use kTLS (the kernel needs OpenSSL to own a real socket
BIO) and costs a 256 KiB read buffer per connection on the stdlib loop. So here OpenSSL
owns the socket: `SSLContext.wrap_socket()` on a non-blocking socket, and every call
either completes or raises "want read" / "want write", meaning "call me again, with the
same arguments, once the fd is readable / writable". Three rules follow:

1. Any call may want either direction. A read can need to write (a TLS 1.3 KeyUpdate
   reply) and a handshake step wants both in turn. So callers wait on whatever the last
   call asked for, never on a fixed direction. `read_into`/`write` return the wish as a
   code (see endpoint.py) instead of raising, because they run once per chunk.
2. A write that wants a retry must be retried with the same bytes: OpenSSL may already
   have sent part of the record. (Python sets SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, so the
   bytes may move in memory; their content must not change.)
3. OpenSSL can hold decrypted bytes the kernel no longer shows as readable. `read_into`
   keeps reading records until OpenSSL holds no more (SSL_has_pending, with the reach)
   or wants more from the socket, so nothing is left behind in OpenSSL when the pump
   goes back to waiting on the fd.

Half-close sends close_notify with a single SSL_shutdown (openssl.py says why unwrap()
cannot be used); without the private reach, the public shutdown runs once nothing is left
to read (_shutdown_public). Only a close_notify from the peer is a clean end: a bare FIN
reads as TRUNCATED and a reset as RESET (endpoint.py), and the pump turns either into a
reset towards the app. The hot path calls the C-level object behind the SSLSocket directly
(openssl.inner): it is the same object the public methods call, minus a Python-level frame
per chunk.

Handshake CPU is measured here, per step, with `time.thread_time()`: the sum over the
steps of one handshake is the CPU this process spent on it, whatever the loop did in
between.

A resumed TLS 1.3 handshake would end with a fresh ticket, and making one costs the
server a re-encoding of the whole session, client certificate included (~20% of a
resumed handshake's CPU, measured). The server knows it resumed once the client's first
flight is in, before the last step, so it skips the new ticket then: the client keeps
using the ticket it has until that one expires (OpenSSL's stateless tickets may be reused;
the price is that an observer can link connections that share a ticket, which inside a
mesh shows nothing the connections' addresses do not).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import ssl
import sys
import termios
import time
from collections.abc import Callable
from typing import Any

from sidecar import poller
from sidecar.endpoint import (
    DONE,
    RESET,
    TRUNCATED,
    WANT_READ,
    WANT_WRITE,
    Recv,
    Send,
    close_with_reset,
)
from sidecar.tls import openssl

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)  # Linux's value where Python lacks the name
_NAMES: dict[str, str] = {}  # TLS versions and cipher suites: a handful per process
_READ_ROOM = 16 * 1024  # one TLS record's plaintext: read more only if a record fits
_RECORD = 16 * 1024  # a full record's plaintext: a sender with more to say fills them
# SSL_has_pending, called straight (the hot path); asked only with a pointer, so only with
# the reach. Without it, "it may hold more": read on.
_has_pending: Callable[[int], int] = openssl.has_pending or (lambda _ptr: 1)


class TlsEndpoint:
    """A TLS connection over a socket it owns."""

    # peer_certificates and the sidecar_* are the handshake hooks' notes (the hooks get
    # the endpoint as their connection: openssl.wrap), in slots, not a dict per connection.
    __slots__ = ("__weakref__", "_deferred", "_obj", "_ptr", "_shut", "cpu_seconds",
                 "drained", "fd", "keep_session", "ktls_rx", "ktls_tx", "peer_certificates",
                 "server_side", "sidecar_server_name", "sidecar_verdict", "sock")

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket, *, server_side: bool,
                 server_name: str | None = None,
                 session: ssl.SSLSession | None = None) -> None:
        """`sock`: connected and non-blocking already (each FIONBIO is a syscall)."""
        _require_non_blocking(sock)
        self.server_side = server_side
        self.peer_certificates: list[bytes] | None = None  # peerchain.ATTRIBUTE
        self.sidecar_server_name: str | None = None  # _SERVER_NAME
        self.sidecar_verdict: Any = None  # proxy/handshake.py's pending count
        self._obj, self.sock = openssl.wrap(ctx, sock, server_side=server_side,
                                            server_name=server_name, session=session,
                                            owner=self)
        self.fd = sock.fileno()
        self._ptr: int | None = openssl.connection_pointer(self._obj, self.sock, ctx)
        self._shut = False
        self._deferred = 0  # see _shutdown_public
        self.cpu_seconds = 0.0
        self.ktls_tx = self.ktls_rx = False  # set by ktls() once the handshake is done
        self.drained = False  # see Endpoint.drained
        # Set once the peer is authenticated, when the server keeps sessions in memory: its
        # session stays resumable however the connection ends (openssl.keep_session).
        self.keep_session = False

    @classmethod
    def server(cls, ctx: ssl.SSLContext, raw: socket.socket, *,
               http1: bool = False) -> TlsEndpoint:
        """`raw` must be non-blocking already (each FIONBIO is a syscall). `http1`: the
        connection agrees on ALPN http/1.1 only (openssl.offer_http1)."""
        ep = cls(ctx, raw, server_side=True)
        if http1 and ep._ptr is not None:
            openssl.mark_http1(ep._ptr)
        return ep

    @classmethod
    def client(
        cls,
        ctx: ssl.SSLContext,
        raw: socket.socket,
        server_name: str | None,
        session: ssl.SSLSession | None = None,
    ) -> TlsEndpoint:
        return cls(ctx, raw, server_side=False, server_name=server_name, session=session)

    @property
    def ssl_pointer(self) -> int | None:
        """The connection's `SSL *` (openssl.py), or None without the reach."""
        return self._ptr

    def step(self) -> None:
        """One handshake step, as `ssl.SSLSocket.do_handshake` takes it: raises
        SSLWantReadError / SSLWantWriteError until the handshake is done."""
        self._obj.do_handshake()

    async def handshake(self) -> None:
        """Run the handshake to completion; raises ssl.SSLError / OSError on failure."""
        loop = asyncio.get_running_loop()
        obj = self._obj
        tickets_settled = not self.server_side or self._ptr is None
        while True:
            started = time.thread_time()
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                if not tickets_settled and obj.session_reused:
                    assert self._ptr is not None
                    openssl.no_new_tickets(self._ptr)
                    # No certificate comes in a resumption: the hook (peerchain.py) has
                    # nothing to see in what is left of the handshake.
                    openssl.stop_message_callback(self._ptr)
                    self._ack_at_once()
                    tickets_settled = True
                self.cpu_seconds += time.thread_time() - started
                await poller.ready(loop, self.fd, self)
            except ssl.SSLWantWriteError:
                self.cpu_seconds += time.thread_time() - started
                await poller.ready(loop, self.fd, self, write=True)
            else:
                self.cpu_seconds += time.thread_time() - started
                self.after_handshake()
                return

    def _ack_at_once(self) -> None:
        """Without a ticket, nothing of ours follows the client's Finished, and the kernel
        would hold back its ACK (delayed ACK: up to 40 ms on Linux). A client that leaves
        Nagle on (Python's and Java's default) sends its first request only once the
        Finished is acknowledged, so every resumed connection would wait that long. Quick-ACK
        mode, set now that our flight is out, acknowledges the Finished when it comes: one
        system call, against a ticket's encryption and a write (measured in
        bench/handshake_table.py)."""
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass  # not TCP (a test's socket pair), or gone: nothing to hold back

    def drop_peer_chains(self) -> None:
        """Once the peer is authenticated, its chain is dead weight (openssl.py says how
        much). verified_chain() is empty from here on; peer_leaf() still answers."""
        if self._ptr is not None:
            openssl.drop_peer_chains(self._ptr)

    def hello_seen(self) -> bool:
        """Has the peer's first flight arrived (a cipher is chosen)? A peer that connected
        and never got this far is the first to go when handshakes must be shed."""
        return self._obj.cipher() is not None

    def after_handshake(self) -> None:
        """Drop per-handshake state that would otherwise stay for the connection's life."""
        self.peer_certificates = None
        if self._ptr is not None:
            openssl.stop_message_callback(self._ptr)

    def read_into(self, buf: memoryview) -> int:
        obj = self._obj
        room = len(buf)
        try:
            n: int = obj.read(room, buf)
        except ssl.SSLWantReadError:
            return WANT_READ
        except ssl.SSLWantWriteError:
            return WANT_WRITE
        except ssl.SSLZeroReturnError:
            return self._end()
        except ssl.SSLEOFError:
            return TRUNCATED  # a bare FIN: a killed peer, or a cut
        except ConnectionResetError:
            return RESET
        ptr = self._ptr
        if n < _RECORD:
            if n == 0:
                return self._end()
            # A short record: the sender paused, most likely. If OpenSSL holds nothing
            # more (read-ahead may have taken the next records off the socket already:
            # then it says so), the socket is the one to wait for: reading on would raise
            # "want read" to find that out, which costs more than this question.
            if ptr is not None and not _has_pending(ptr):
                self.drained = True
                return n
        got = n
        # Keep reading records while a whole one still fits: bulk moves four to a call.
        while room - got >= _READ_ROOM:
            try:
                n = obj.read(room - got, buf[got:])
            except ssl.SSLWantReadError:
                self.drained = True  # OpenSSL wants the socket: it holds nothing
                return got
            except (ssl.SSLWantWriteError, ssl.SSLZeroReturnError, ssl.SSLEOFError,
                    ConnectionResetError):
                self.drained = False  # the next call meets it again and says so
                return got
            if n == 0:
                self.drained = False
                return got
            got += n
            if n < _RECORD and ptr is not None and not _has_pending(ptr):
                self.drained = True
                return got
        self.drained = False
        return got

    def read_some(self, buf: memoryview) -> int:
        """`read_into` for a reader that parses what it reads (an http listener): after a
        record, OpenSSL is asked whether it holds more (SSL_has_pending) rather than read
        again, so a small request costs no SSLWantReadError (~10k instructions, most of
        a small request's TLS read). Rule 3 holds: nothing is left in OpenSSL unread.
        Without the private reach it is `read_into`."""
        ptr = self._ptr
        if ptr is None:
            return self.read_into(buf)
        obj = self._obj
        got = 0
        room = len(buf)
        while True:
            try:
                n: int = obj.read(room - got, buf[got:] if got else buf)
            except ssl.SSLWantReadError:
                return got or WANT_READ
            except ssl.SSLWantWriteError:
                return got or WANT_WRITE
            except ssl.SSLZeroReturnError:
                return got or self._end()
            except ssl.SSLEOFError:
                return got or TRUNCATED
            except ConnectionResetError:
                return got or RESET
            if n == 0:
                return got or self._end()
            got += n
            if room - got < _READ_ROOM or not _has_pending(ptr):
                return got

    def _end(self) -> int:
        """0 for a close_notify, the clean end; TRUNCATED for a bare FIN that
        OP_IGNORE_UNEXPECTED_EOF (the in-memory session store) made look like one."""
        if self._ptr is not None and openssl.read_hit_eof(self._ptr):
            return TRUNCATED
        return 0

    def write(self, data: memoryview | bytes) -> int:
        try:
            n: int = self._obj.write(data)
            return n
        except ssl.SSLWantWriteError:
            return WANT_WRITE
        except ssl.SSLWantReadError:
            return WANT_READ

    def calls(self) -> tuple[Recv | None, Send | None]:
        """No recv: a read asks OpenSSL whether it holds more (read_into). The send is the
        C-level write that write() calls."""
        return None, (self._obj.write if type(self).write is TlsEndpoint.write else None)

    def read_code(self, exc: OSError) -> int:
        raise exc  # there is no recv to have raised it

    def write_code(self, exc: OSError) -> int:
        if isinstance(exc, ssl.SSLWantWriteError):
            return WANT_WRITE
        if isinstance(exc, ssl.SSLWantReadError):
            return WANT_READ
        raise exc

    def shutdown_write(self) -> int:
        if self._shut:
            return DONE
        if self._ptr is None:
            return self._shutdown_public()
        rc = openssl.shutdown_once(self._ptr)
        if rc == DONE:
            self._shut = True
            return DONE
        if rc is not None:
            return rc  # WANT_WRITE / WANT_READ: the retry sends it
        # OpenSSL refused a close_notify (e.g. a connection in a post-handshake step): end
        # the stream the TCP way; the peer reads it as a truncation, not a clean end.
        self._shut = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return DONE

    def _shutdown_public(self) -> int:
        """close_notify without the private reach, through the public shutdown (the call
        behind unwrap()). It calls SSL_shutdown twice, and the second call reads: a data
        record of the peer's already in the socket would be lost there, and OpenSSL would
        fail the connection (APPLICATION_DATA_AFTER_CLOSE_NOTIFY). So the kernel is told
        to hold back what arrives meanwhile (openssl.incoming_held), and the call runs only once
        nothing is waiting to be read: until then it asks for "readable", and by the time
        it runs again the other direction has taken what was there. A peer that keeps the
        socket readable because the app does not read has it run after _DEFER_LIMIT tries
        anyway; a record lost then fails the connection, and the pump resets both sides."""
        with openssl.incoming_held(self.sock):
            if self._deferred < _DEFER_LIMIT and (self._obj.pending() or _inq(self.fd)):
                self._deferred += 1
                return WANT_READ
            try:
                self._obj.shutdown()
            except ssl.SSLWantWriteError:
                return WANT_WRITE  # close_notify not out yet: the retry sends it
            except ssl.SSLWantReadError:
                pass  # sent; the peer's close_notify comes later, through read_into
            except (ssl.SSLError, OSError):
                # A record lost, or the peer gone: OpenSSL failed the connection and every
                # read from now on says TRUNCATED. Ending our reading side makes the
                # socket readable, so the pump learns that at once.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self.sock, socket.SHUT_RD)
        self._shut = True
        return DONE

    # What the connection negotiated, for authentication, logs and metrics. The names are
    # shared (_NAMES) rather than a fresh string for every connection that holds them.
    def version(self) -> str | None:
        v: str | None = self._obj.version()
        return v if v is None else _NAMES.setdefault(v, v)

    def cipher(self) -> str | None:
        c = self._obj.cipher()
        return _NAMES.setdefault(c[0], c[0]) if c else None

    def resumed(self) -> bool:
        return bool(self._obj.session_reused)

    def server_name(self) -> str | None:
        """The SNI the client sent (a server's view): asked of OpenSSL, or, without the
        private reach, what remember_server_name kept during the handshake."""
        if self._ptr is not None:
            return openssl.server_name(self._ptr)
        return self.sidecar_server_name

    def alpn(self) -> str | None:
        """The application protocol the handshake negotiated, if any."""
        proto: str | None = self._obj.selected_alpn_protocol()
        return proto

    def new_session(self) -> ssl.SSLSession | None:
        """The session to resume with next time, when this client connection brought one;
        else None, without asking. CPython 3.13.0's session getter leaks a copy of the
        session on every call (gh-116810: ~6 KiB with a certificate), so it is asked only
        when a ticket has arrived since a full handshake. A resumed connection brings
        nothing from our own servers (no ticket follows a resumption, see above); a foreign
        server's fresh ticket is left: the session offered keeps resuming until it expires
        or is refused, and a refusal is a full handshake, whose ticket is taken. Without the
        private reach every full handshake asks (the leak is then bounded by those)."""
        if self.server_side or self._obj.session_reused:
            return None
        if self._ptr is not None and not self.ticket_arrived():
            return None
        s: ssl.SSLSession | None = self._obj.session
        return s

    def ticket_arrived(self) -> bool:
        """Has the server sent a session ticket (TLS 1.3: only once it has read our
        certificate)? Asked of OpenSSL, never of the leaking getter; without the private
        reach there is no answer, and it says False."""
        return self._ptr is not None and openssl.has_ticket(self._ptr)

    def verified_chain(self) -> list[bytes]:
        """DER certificates leaf first, as OpenSSL verified them; empty when resumed."""
        return openssl.der_certificates(self._obj.get_verified_chain())

    def peer_leaf(self) -> bytes | None:
        der: bytes | None = self._obj.getpeercert(True)
        return der

    def ktls(self) -> tuple[bool, bool]:
        """(tx, rx): did the kernel take over sending / receiving on this connection?"""
        if self._ptr is not None:
            self.ktls_tx, self.ktls_rx = openssl.ktls_state(self._ptr)
        return self.ktls_tx, self.ktls_rx

    def presented_chain(self) -> list[bytes] | None:
        return self.peer_certificates

    def forget_session(self) -> None:
        """A server-side session cache must not keep this connection's session."""
        self.keep_session = False
        if self.server_side and self._ptr is not None:
            openssl.forget_session(self._ptr)

    def close(self) -> None:
        self._keep_session()
        poller.forget(self.fd, self)
        self.sock.close()

    def reset(self) -> None:
        """End with a TCP reset and no close_notify: the peer must not read a cut stream
        as a whole one."""
        self._keep_session()
        poller.forget(self.fd, self)
        close_with_reset(self.sock)

    def _keep_session(self) -> None:
        if self.keep_session and not self._shut and self._ptr is not None:
            openssl.keep_session(self._ptr)


_SERVER_NAME = "sidecar_server_name"  # where remember_server_name keeps it on the socket


def remember_server_name(conn: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
    """A server context's sni_callback where OpenSSL cannot be asked afterwards (contexts.py
    installs it only then: it is a Python call in every handshake that sends SNI). `conn`
    is the connection's owner: an endpoint, or an ssl.SSLSocket elsewhere."""
    if name is not None:
        setattr(conn, _SERVER_NAME, name)


def _inq(fd: int) -> int:
    """Bytes the kernel holds for reading on fd."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)


# How often the public shutdown waits for the socket to be drained first: enough for the
# other direction to take what the peer had in flight; bounded, because a socket whose
# reader is blocked on the app stays readable and each wait is one loop turn.
_DEFER_LIMIT = 1000


def _require_non_blocking(sock: socket.socket) -> None:
    # A blocking socket here would stall the whole loop inside OpenSSL, silently.
    if sock.gettimeout() != 0.0:
        raise ValueError("the engine needs a non-blocking socket (setblocking(False))")
