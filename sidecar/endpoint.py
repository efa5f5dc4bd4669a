"""One end of a proxied connection, as the byte pump sees it.

The pump moves bytes between two endpoints without knowing which is TLS. Both kinds
answer the same few non-blocking calls; readiness is signalled by return codes, not
exceptions, because these calls run once per chunk on the hot path. (The pump's own hot
path calls the C-level calls behind them, `calls`, which raise instead; it reads only
when the source is readable, so they raise only under backpressure.)
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from functools import partial
from typing import Protocol

# Return codes of read_into/write/shutdown_write (a count is never negative).
WANT_READ = -1  # retry when the fd is readable
WANT_WRITE = -2  # retry when the fd is writable
DONE = 0
# Ends of a stream that are not a clean end: read_into never returns 0 for these, because
# a read-until-EOF protocol would take the bytes so far for the whole stream.
TRUNCATED = -3  # TLS: the peer's TCP stream ended without close_notify
RESET = -4  # the peer reset the connection

# The C-level calls behind read_into and write (Endpoint.calls).
Recv = Callable[[memoryview], int]
Send = Callable[[memoryview | bytes], int]


class Endpoint(Protocol):
    fd: int
    ktls_tx: bool  # the kernel encrypts what is written to fd (kTLS): splice may write
    ktls_rx: bool  # the kernel decrypts what is read from fd: splice may read
    # After a read_into that returned bytes: True when nothing is left in user space and
    # the read found the kernel's queue emptied, so the caller should wait for fd to be
    # readable rather than read again at once (that read would find nothing, and finding
    # nothing costs an exception). False when another read may return more now. Waiting
    # is always safe when it is True: if more came meanwhile, fd is readable.
    drained: bool

    def read_into(self, buf: memoryview) -> int:
        """Bytes read (> 0), 0 at a clean end of stream, WANT_READ / WANT_WRITE, or
        TRUNCATED / RESET when the stream was cut."""
        ...

    def write(self, data: memoryview | bytes) -> int:
        """Bytes taken (>= 0; TCP may take part), or WANT_READ / WANT_WRITE (retry with
        the same bytes: TLS keeps its place in a partly sent record)."""
        ...

    def calls(self) -> tuple[Recv | None, Send | None]:
        """The C-level calls behind read_into and write, for the pump's hot path: calling
        them straight saves a Python frame per read and per write (pump.py). None for
        either where there is no such call (a TLS read does more than one), or where a
        subclass changed read_into / write.

        recv(buf) is read_into for a source that knows no wishes but "nothing yet": the
        bytes read, 0 at a clean end, fewer than len(buf) only when the source held no
        more (so `drained` is `n < len(buf)`). send(data) is write. Both raise where
        read_into and write return a code; read_code / write_code turn the exception into
        that code, or raise it again if it is a failure."""
        ...

    def read_code(self, exc: OSError) -> int:
        """What read_into returns for the exception recv raised (WANT_READ, RESET), or
        raise it."""
        ...

    def write_code(self, exc: OSError) -> int:
        """What write returns for the exception send raised (WANT_WRITE, WANT_READ), or
        raise it."""
        ...

    def shutdown_write(self) -> int:
        """Tell the other side no more bytes follow; DONE or WANT_READ / WANT_WRITE."""
        ...

    def close(self) -> None: ...

    def reset(self) -> None:
        """Close so that the other side sees a reset, never an end of stream."""
        ...


class TcpEndpoint:
    """A plain, connected, non-blocking stream socket (TCP or Unix)."""

    __slots__ = ("drained", "fd", "sock")
    ktls_tx = False
    ktls_rx = False

    def __init__(self, sock: socket.socket) -> None:
        """`sock` must be non-blocking already (each FIONBIO is a syscall)."""
        self.sock = sock
        self.fd = sock.fileno()
        self.drained = False

    def read_into(self, buf: memoryview) -> int:
        try:
            n = self.sock.recv_into(buf)
        except OSError as exc:
            return self.read_code(exc)
        # A stream socket hands over all it holds, up to the buffer: less than a full
        # buffer means it held no more (what arrives later makes fd readable again).
        self.drained = n < len(buf)
        return n

    def write(self, data: memoryview | bytes) -> int:
        try:
            return self.sock.send(data)
        except OSError as exc:
            return self.write_code(exc)

    def calls(self) -> tuple[Recv | None, Send | None]:
        """send is os.write on the fd: the system call send() makes (no flags), minus the
        socket method's argument parsing (~400 instructions a call)."""
        cls = type(self)
        return (self.sock.recv_into if cls.read_into is TcpEndpoint.read_into else None,
                partial(os.write, self.fd) if cls.write is TcpEndpoint.write else None)

    def read_code(self, exc: OSError) -> int:
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            return WANT_READ
        if isinstance(exc, ConnectionResetError):
            return RESET
        raise exc

    def write_code(self, exc: OSError) -> int:
        if isinstance(exc, (BlockingIOError, InterruptedError)):
            return WANT_WRITE
        raise exc

    def shutdown_write(self) -> int:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone: the other flow will see the error or EOF
        return DONE

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with a TCP reset: the app must not take a cut stream for a whole one."""
        close_with_reset(self.sock)


def close_with_reset(sock: socket.socket) -> None:
    """Close a TCP socket with RST instead of FIN (unsent bytes are dropped)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # not TCP (a Unix socket), or already closed: a plain close is all there is
    sock.close()


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, timeout 0: close sends RST
