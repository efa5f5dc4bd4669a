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

from sidecar.spiffe import SpiffePattern
from sidecar.tools.bench.failures import (
    RequestError,
    Trouble,
    connect_error,
    handshake_error,
    peer_id_error,
    response_error,
)
from sidecar.tools.bench.plan import ConnectionMode, Plan
from sidecar.tools.bench.summary import Tally, new_histogram

# A loop over a target that refuses everything would otherwise spin for the whole
# duration at tens of thousands of attempts a second; this many in a row say enough.
MAX_FUTILE_ATTEMPTS = 20


class Budget:
    """The shared --requests cap, deadline and (open loop) arrival schedule, and the stop
    signal every worker checks."""

    def __init__(self, cap: int | None, duration: float, rate: float | None = None) -> None:
        self.stop = threading.Event()
        self.succeeded = False
        # Counted without a lock: a few lost increments only delay a futile stop a little.
        self.failures = 0
        self._left = cap
        self._duration = duration
        self._interval = None if rate is None else 1.0 / rate
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        """Start the clock (again): the deadline and the open loop's schedule count from
        now, and what priming did counts for nothing."""
        self.succeeded = False
        self.failures = 0
        self._deadline = time.monotonic() + self._duration
        self._origin = time.perf_counter()
        self._due = 0  # arrivals handed out so far

    def take(self) -> float | None:
        """The time (perf_counter) the next request was due, or None when the mode is over.
        Closed loop: now. Open loop: the next arrival on the fixed schedule, waited for if
        it lies ahead; a worker that is late gets a time in the past, and the request's
        latency counts from then, as the user it stands for would have waited."""
        if self.stop.is_set() or time.monotonic() >= self._deadline:
            return None
        if not self.succeeded and self.failures >= MAX_FUTILE_ATTEMPTS:
            self.stop.set()
            return None
        with self._lock:
            if self._left is not None:
                if self._left <= 0:
                    return None
                self._left -= 1
            if self._interval is None:
                return time.perf_counter()
            due = self._origin + self._due * self._interval
            self._due += 1
        ahead = due - time.perf_counter()
        if ahead > 0 and (ahead >= self._deadline - time.monotonic() or self.stop.wait(ahead)):
            return None  # due after the deadline, or stopped while waiting for it
        return due


class Worker:
    def __init__(self, plan: Plan, ctx: ssl.SSLContext, mode: ConnectionMode,
                 budget: Budget) -> None:
        self.plan = plan
        self.ctx = ctx
        self.mode = mode
        self.budget = budget
        self.tally = Tally(histogram=new_histogram() if plan.rate is not None else None)
        self._session: ssl.SSLSession | None = None  # resume mode: the last one received
        self._served = 0  # requests on the current connection
        self.fd = -1  # the socket in use, for `abort`
        self._ids: dict[bytes, RequestError | None] = {}  # server leaf -> verdict

    def run(self) -> None:
        conn: socket.socket | None = None
        cpu = time.thread_time()
        try:
            while (due := self.budget.take()) is not None:
                try:
                    conn = self._request(conn, due)
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
            self.tally.cpu += time.thread_time() - cpu

    def _request(self, conn: socket.socket | None, due: float) -> socket.socket | None:
        """One request, on `conn` or a new connection; the connection to use next, or None
        when it is closed (the server closed it, or it carried --per-connection)."""
        if conn is None:
            conn = self._connect(self._session if self.mode is ConnectionMode.RESUME else None)
            self._served = 0
        try:
            still_open = self._exchange(conn)
        except RequestError:
            conn.close()
            raise
        self._record(time.perf_counter() - due)
        self._served += 1
        resuming = self.mode is ConnectionMode.RESUME
        if self._served == 1 and isinstance(conn, ssl.SSLSocket) and resuming:
            # Read after the response: a TLS 1.3 ticket comes with the server's first bytes.
            # Once per connection: each read copies the session into a new Python object.
            self._session = conn.session or self._session
        limit = None if self.mode is ConnectionMode.REUSE else self.plan.per_connection
        if still_open and (limit is None or self._served < limit):
            return conn
        conn.close()
        return None

    def prime(self) -> None:
        """Resume mode: one connection and request before the clock starts, uncounted, so
        that even the worker's first measured connection has a session to offer (at 1000
        requests per connection, a short run has few others)."""
        try:
            _close(self._request(None, time.perf_counter()))
        except Exception:  # the measured run meets the same failure, and counts it
            pass
        self.tally = Tally(histogram=None if self.tally.histogram is None else new_histogram())

    def _record(self, seconds: float) -> None:
        if self.tally.histogram is not None:
            self.tally.histogram.record_value(max(round(seconds * 1e6), 1))
        else:
            self.tally.latencies.append(seconds)

    def _connect(self, session: ssl.SSLSession | None) -> socket.socket:
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
        if plan.plain:
            return raw  # to a sidecar's outbound listener, which makes the handshake
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

    def _exchange(self, conn: socket.socket) -> bool:
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


def _close(conn: socket.socket | None) -> None:
    if conn is not None:
        conn.close()
