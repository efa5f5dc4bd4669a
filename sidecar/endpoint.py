"""One end of a proxied connection, as the byte pump sees it.

The pump moves bytes between two endpoints without knowing which is TLS. Both kinds
answer the same few non-blocking calls; readiness is signalled by return codes, not
exceptions, because these calls run once per chunk on the hot path.
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

# Return codes of read_into/write/shutdown_write (a count is never negative).
WANT_READ = -1  # retry when the fd is readable
WANT_WRITE = -2  # retry when the fd is writable
DONE = 0
# Ends of a stream that are not a clean end: read_into never returns 0 for these, because
# a read-until-EOF protocol would take the bytes so far for the whole stream.
TRUNCATED = -3  # TLS: the peer's TCP stream ended without close_notify
RESET = -4  # the peer reset the connection


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
        except (BlockingIOError, InterruptedError):
            return WANT_READ
        except ConnectionResetError:
            return RESET
        # A stream socket hands over all it holds, up to the buffer: less than a full
        # buffer means it held no more (what arrives later makes fd readable again).
        self.drained = n < len(buf)
        return n

    def write(self, data: memoryview | bytes) -> int:
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return WANT_WRITE

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
