"""One worker thread: opens connections, handshakes, sends requests, counts what happened.

Why worker threads with blocking stdlib `ssl` sockets rather than asyncio: CPython's ssl
module releases the GIL inside OpenSSL's handshake, read and write calls, so N workers run
N handshakes' crypto in parallel, and `time.thread_time()` around `do_handshake()` is
exactly this client's CPU for that handshake: a blocked thread burns none, and no other
connection's work lands inside the measurement, as it would on an event loop that
interleaves every connection in one thread. A blocking worker is also the plainest
request -> response line to read. The cost: Python's per-request overhead (tens of
microseconds) is small next to a handshake but not next to a 64-byte request, so reuse
mode's requests/s at high concurrency measures this client as much as the target.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time

from sidecar.loadgen.failures import (
    RequestError,
    Trouble,
    connect_error,
    handshake_error,
    peer_id_error,
    response_error,
)
from sidecar.loadgen.plan import Mode, Plan
from sidecar.loadgen.summary import Tally
from sidecar.spiffe import SpiffePattern

# A loop over a target that refuses everything would otherwise spin for the whole
# duration at tens of thousands of attempts a second; this many in a row say enough.
MAX_FUTILE_ATTEMPTS = 20


class Budget:
    """The shared --requests cap and deadline, and the stop signal every worker checks."""

    def __init__(self, cap: int | None, deadline: float) -> None:
        self.stop = threading.Event()
        self.succeeded = False
        # Counted without a lock: a few lost increments only delay a futile stop a little.
        self.failures = 0
        self._left = cap
        self._deadline = deadline
        self._lock = threading.Lock()

    def take(self) -> bool:
        if self.stop.is_set() or time.monotonic() >= self._deadline:
            return False
        if not self.succeeded and self.failures >= MAX_FUTILE_ATTEMPTS:
            self.stop.set()
            return False
        if self._left is None:
            return True
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            return True


class Worker:
    def __init__(self, plan: Plan, ctx: ssl.SSLContext, mode: Mode, budget: Budget) -> None:
        self.plan = plan
        self.ctx = ctx
        self.mode = mode
        self.budget = budget
        self.tally = Tally()
        self.fd = -1  # the socket in use, for `abort`
        self._ids: dict[bytes, RequestError | None] = {}  # server leaf -> verdict

    def run(self) -> None:
        session: ssl.SSLSession | None = None
        conn: ssl.SSLSocket | None = None
        try:
            while self.budget.take():
                try:
                    if self.mode is Mode.REUSE:
                        conn = self._reuse(conn)
                    else:
                        session = self._fresh(session if self.mode is Mode.RESUME else None)
                except RequestError as exc:
                    self.budget.failures += 1
                    self.tally.errors[exc.kind, exc.detail] += 1
                    _close(conn)
                    conn = None
                except Exception as exc:  # never a traceback: count it and go on
                    self.budget.failures += 1
                    self.tally.errors[Trouble.OTHER, f"{type(exc).__name__}: {exc}"] += 1
                    _close(conn)
                    conn = None
        finally:
            _close(conn)

    def _fresh(self, session: ssl.SSLSession | None) -> ssl.SSLSession | None:
        started = time.perf_counter()
        conn = self._connect(session)
        try:
            self._exchange(conn)
            self.tally.latencies.append(time.perf_counter() - started)
            # Read after the response: a TLS 1.3 ticket comes with the server's first bytes.
            return conn.session or session
        finally:
            conn.close()

    def _reuse(self, conn: ssl.SSLSocket | None) -> ssl.SSLSocket | None:
        if conn is None:
            conn = self._connect(None)
        started = time.perf_counter()
        try:
            still_open = self._exchange(conn)
        except RequestError:
            conn.close()
            raise
        self.tally.latencies.append(time.perf_counter() - started)
        if still_open:
            return conn
        conn.close()
        return None

    def _connect(self, session: ssl.SSLSession | None) -> ssl.SSLSocket:
        plan = self.plan
        try:
            raw = socket.create_connection((plan.host, plan.port), timeout=plan.timeout)
        except OSError as exc:
            raise connect_error(exc, plan.target, plan.timeout) from None
        self.fd = raw.fileno()
        # Without it, Nagle holds the request behind the client's last handshake flight
        # until the server's delayed ACK (40 ms on Linux): latency would measure timers.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if raw.getsockname() == raw.getpeername():
            # TCP simultaneous open: a connect to an unused port in the local ephemeral
            # range can pick that very port as its source and "connect" to itself.
            raw.close()
            raise connect_error(ConnectionRefusedError(), plan.target, plan.timeout)
        self.tally.connections += 1
        try:
            conn = self.ctx.wrap_socket(raw, server_hostname=plan.server_name,
                                        session=session, do_handshake_on_connect=False)
        except Exception:
            raw.close()
            raise
        try:
            cpu = time.thread_time()
            conn.do_handshake()
            cpu = time.thread_time() - cpu
        except (OSError, ValueError) as exc:  # SSLError is an OSError
            conn.close()
            raise handshake_error(exc) from None
        self._count_handshake(conn, cpu)
        if plan.expect_id is not None:
            self._check_id(conn, plan.expect_id)
        return conn

    def abort(self) -> None:
        """Wake this worker from a socket call it is stuck in past the mode's hard stop
        (a server trickling a byte per timeout). Shutting down a duplicate of the descriptor
        ends the blocked call without touching the SSLSocket another thread owns."""
        with contextlib.suppress(OSError):
            dup = socket.socket(fileno=os.dup(self.fd))
            try:
                dup.shutdown(socket.SHUT_RDWR)
            finally:
                dup.close()

    def _count_handshake(self, conn: ssl.SSLSocket, cpu: float) -> None:
        self.tally.handshakes += 1
        if conn.session_reused:
            self.tally.resumed += 1
            self.tally.cpu_resumed += cpu
        else:
            self.tally.cpu_full += cpu

    def _check_id(self, conn: ssl.SSLSocket, expect: SpiffePattern) -> None:
        # Resumed sessions still give the leaf; its verdict is cached per certificate.
        der = conn.getpeercert(binary_form=True)
        key = der or b""
        if key not in self._ids:
            self._ids[key] = peer_id_error(der, expect)
        problem = self._ids[key]
        if problem is not None:
            conn.close()
            raise problem

    def _exchange(self, conn: ssl.SSLSocket) -> bool:
        """Send the request, read the response; False when the server closed after it."""
        plan = self.plan
        deadline = time.monotonic() + plan.timeout
        got = bytearray()
        try:
            conn.sendall(plan.payload)
            while len(got) < plan.response_bytes:
                # Each recv waits at most --timeout; this bounds a server that trickles
                # bytes to twice that per request, without a settimeout syscall per read.
                if got and time.monotonic() > deadline:
                    raise TimeoutError
                chunk = conn.recv(plan.response_bytes - len(got))
                if not chunk:
                    break
                got += chunk
        except (OSError, ValueError) as exc:
            raise response_error(exc, plan.timeout) from None
        if not got:
            raise RequestError(Trouble.CLOSED_BEFORE_RESPONSE,
                               "the server closed the connection before answering: it may "
                               "have refused our certificate or SPIFFE ID (TLS 1.3 says so "
                               "only after the handshake), or its app is down")
        if len(got) < plan.response_bytes and plan.echo:
            raise RequestError(Trouble.SHORT_RESPONSE,
                               f"the server closed after {len(got)} of "
                               f"{plan.response_bytes} bytes")
        if plan.echo and got != plan.payload:
            raise RequestError(Trouble.ECHO_MISMATCH,
                               "the response differs from the request: the target does not "
                               "echo; pass --no-echo")
        self.tally.requests += 1
        self.budget.succeeded = True
        return len(got) == plan.response_bytes


def _close(conn: ssl.SSLSocket | None) -> None:
    if conn is not None:
        conn.close()
