"""`sidecar bench`: what a full mTLS handshake costs, what resumption saves, and what
keeping connections open saves, measured from the outside against any mTLS server.

Modes, run one after the other with `--mode all` (the default):
- `full`: a new TCP connection and a full handshake per request, no session offered;
- `resume`: a new TCP connection per request, offering the session of the same worker's
  previous connection. In TLS 1.3 the ticket arrives after the handshake, with the
  server's first bytes, so the session is taken after the response has been read;
- `reuse`: one connection per worker, every request on it (a handshake only at the start,
  or after the server closed it).

Why worker threads with blocking stdlib `ssl` sockets rather than asyncio: CPython's ssl
module releases the GIL inside OpenSSL's handshake, read and write calls, so N workers run
N handshakes' crypto in parallel, and `time.thread_time()` around `do_handshake()` is
exactly this client's CPU for that handshake: a blocked thread burns none, and no other
connection's work lands inside the measurement, as it would on an event loop that
interleaves every connection in one thread. A blocking worker is also the plainest
request -> response line to read. The cost: Python's per-request overhead (tens of
microseconds) is small next to a handshake but not next to a 64-byte request, so reuse
mode's requests/s at high concurrency measures this client as much as the target.

The request is a line that reads the same backwards, so the default echo check also passes
against `openssl s_server -rev` (which answers each line reversed; keep --request-bytes
under its 16 KiB buffer). `--no-echo` is for any other server: read until --response-bytes
arrived or the server closed, and compare nothing; in reuse mode such a server must answer
each request with exactly --response-bytes (or close), or requests would read each other's
leftovers. Echo is the default because it is what sits behind a sidecar in a test, and
because it catches a proxy that loses or mangles bytes.

Server CPU per handshake comes from the target sidecar's own counters (`--metrics`), read
before and after each mode: the delta of `sidecar_handshake_cpu_seconds_total` over the
delta of `sidecar_handshakes_total{result="ok"}`, inbound only, split by `resumed`. Other
traffic to the target during the run is counted too, and the CPU counter includes failed
handshakes: run it against an otherwise idle target, without errors.

Always bounded: every socket call waits at most --timeout, and a response trickling in is
cut at twice that; a mode stops taking requests at --duration (or after --requests), and
at its hard stop (--duration plus JOIN_STEPS timeouts) any worker still blocked is woken by
shutting its socket down. A mode in which nothing has succeeded after MAX_FUTILE_ATTEMPTS
attempts stops at once: hammering a target that refuses everything teaches nothing more.
Failures are counted by kind, each with one line that says what happened; the exit code
is 1 only when no request succeeded at all.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib
import importlib.util
import json
import math
import os
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, TextIO

from cryptography import x509

from sidecar import metrics, spiffe
from sidecar.authn import matches_expected
from sidecar.config import parse_address, parse_duration
from sidecar.reasons import Reason
from sidecar.tls.classify import classify

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# A loop over a target that refuses everything would otherwise spin for the whole
# duration at tens of thousands of attempts a second; this many in a row say enough.
MAX_FUTILE_ATTEMPTS = 20
PROGRESS_EVERY = 0.25  # seconds between progress-line updates (and abort checks)
# After the deadline, a request in flight may still spend connect + handshake + read
# timeouts; joining waits that long (plus slack) and then reports stragglers.
JOIN_STEPS = 3

_ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"


class Mode(StrEnum):
    FULL = "full"
    RESUME = "resume"
    REUSE = "reuse"


class Trouble(StrEnum):
    """Failures of a request that are not handshake reasons (those come from Reason)."""

    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECT_FAILED = "connect_failed"
    CLOSED_BEFORE_RESPONSE = "closed_before_response"
    SHORT_RESPONSE = "short_response"
    RESPONSE_TIMEOUT = "response_timeout"
    CONNECTION_RESET = "connection_reset"
    ECHO_MISMATCH = "echo_mismatch"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a run needs, parsed and checked once."""

    host: str
    port: int
    server_name: str
    modes: tuple[Mode, ...]
    concurrency: int
    duration: float
    requests: int | None
    payload: bytes
    response_bytes: int
    echo: bool
    expect_id: str | None
    metrics_url: str | None
    timeout: float
    as_json: bool
    plot: str | None
    progress: bool

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class RequestError(Exception):
    """One failed request: `kind` is a Reason or Trouble value, `detail` one plain line."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


# --- the request -----------------------------------------------------------------------


def request_payload(size: int) -> bytes:
    """`size` bytes ending in a newline whose line reads the same backwards."""
    body = size - 1
    half = bytes(_ALPHABET[i % len(_ALPHABET)] for i in range((body + 1) // 2))
    return half + half[: body // 2][::-1] + b"\n"


def connect_error(exc: OSError, target: str, timeout: float) -> RequestError:
    if isinstance(exc, ConnectionRefusedError):
        return RequestError(Trouble.CONNECT_REFUSED,
                            f"{target} refused the connection: nothing listens there")
    if isinstance(exc, TimeoutError):
        return RequestError(Trouble.CONNECT_TIMEOUT,
                            f"no answer from {target} within {timeout:g}s: the host is down "
                            "or a firewall drops the packets")
    hint = ""
    if exc.errno == 99:  # EADDRNOTAVAIL: every local port is in TIME_WAIT
        hint = " (out of local ports: lower --concurrency or --duration)"
    return RequestError(Trouble.CONNECT_FAILED,
                        f"cannot connect to {target}: {exc.strerror or exc}{hint}")


# Reasons whose explanation says more than OpenSSL's words ("wrong version number").
_SELF_EXPLAINED = frozenset({Reason.NOT_TLS, Reason.PEER_CLOSED, Reason.HANDSHAKE_TIMEOUT,
                             Reason.PROTOCOL_VERSION, Reason.NO_SHARED_CIPHER})


def handshake_error(exc: BaseException) -> RequestError:
    failure = classify(exc)
    reason = failure.reason
    if failure.by_peer:
        return RequestError(reason, f"the server refused us: {failure.detail}")
    words = reason.explanation if reason in _SELF_EXPLAINED else failure.detail
    return RequestError(reason, f"handshake failed: {words}; {reason.fix}")


def response_error(exc: BaseException, timeout: float) -> RequestError:
    """A failure after the handshake; in TLS 1.3 that is where a rejected client
    certificate shows up, since the client finishes before the server has judged it."""
    if isinstance(exc, TimeoutError):
        return RequestError(Trouble.RESPONSE_TIMEOUT,
                            f"no complete response within {timeout:g}s: the target must "
                            "answer each request (an echo app, `openssl s_server -rev`)")
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
        failure = classify(exc)
        who = "the server refused us after the handshake" if failure.by_peer else "TLS error"
        return RequestError(failure.reason, f"{who}: {failure.detail}")
    if isinstance(exc, ConnectionError | ssl.SSLEOFError):
        return RequestError(Trouble.CONNECTION_RESET,
                            "the server reset the connection: it may have refused our "
                            "certificate (see its logs)")
    return RequestError(Trouble.OTHER, f"{type(exc).__name__}: {exc}")


def peer_id_error(der: bytes | None, expect: str) -> RequestError | None:
    """None when the server's leaf is an SVID whose SPIFFE ID matches `expect`."""
    if der is None:
        return RequestError(Reason.INVALID_SVID, "the server presented no certificate")
    try:
        found = spiffe.spiffe_id_of(x509.load_der_x509_certificate(der))
    except (spiffe.SvidError, ValueError) as exc:
        return RequestError(Reason.INVALID_SVID,
                            f"the server's certificate is not an X.509-SVID: {exc}")
    if not matches_expected(str(found), [expect]):
        return RequestError(Reason.SPIFFE_ID_MISMATCH,
                            f"the server is {found}, expected {expect}")
    return None


# --- one worker ------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """One worker's counts. Only its worker writes it; the progress line reads it racily."""

    connections: int = 0
    handshakes: int = 0
    resumed: int = 0
    requests: int = 0
    cpu_full: float = 0.0
    cpu_resumed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


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

    def _check_id(self, conn: ssl.SSLSocket, expect: str) -> None:
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


# --- the target's metrics --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeCost:
    """The target's inbound handshake counters at one moment (or a difference of two)."""

    ok_full: float = 0.0
    ok_resumed: float = 0.0
    cpu_full: float = 0.0
    cpu_resumed: float = 0.0

    def __sub__(self, other: HandshakeCost) -> HandshakeCost:
        return HandshakeCost(self.ok_full - other.ok_full,
                             self.ok_resumed - other.ok_resumed,
                             self.cpu_full - other.cpu_full,
                             self.cpu_resumed - other.cpu_resumed)

    @property
    def handshakes(self) -> int:
        return round(self.ok_full + self.ok_resumed)


def _family(collector: Any) -> str:
    # The names live in metrics.py only; a counter's family name lacks the `_total`.
    return str(collector.describe()[0].name)


def handshake_cost(text: str) -> HandshakeCost:
    """Sum the inbound handshake counters of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {_family(metrics.handshakes): "ok", _family(metrics.handshake_cpu): "cpu"}
    sums = {f"{w}_{r}": 0.0 for w in ("ok", "cpu") for r in ("full", "resumed")}
    for family in text_string_to_metric_families(text):
        what = wanted.get(family.name)
        if what is None:
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name != family.name + "_total" or labels.get("direction") != "inbound":
                continue
            if what == "ok" and labels.get("result") != "ok":
                continue
            resumed = "resumed" if labels.get("resumed") == "true" else "full"
            sums[f"{what}_{resumed}"] += sample.value
    return HandshakeCost(sums["ok_full"], sums["ok_resumed"],
                         sums["cpu_full"], sums["cpu_resumed"])


def scrape(url: str, timeout: float) -> HandshakeCost | str:
    """The target's counters, or one line saying why they could not be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return f"cannot read {url}: {why}"
    try:
        return handshake_cost(text)
    except Exception as exc:  # the parser raises several kinds on malformed text
        return f"{url} is not Prometheus text: {exc}"


# --- one mode --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorKind:
    kind: str
    count: int
    detail: str


@dataclass(frozen=True, slots=True)
class ModeResult:
    mode: str
    seconds: float
    concurrency: int
    connections: int
    handshakes: int
    resumed: int
    requests: int
    errors: int
    connections_per_s: float
    handshakes_per_s: float
    requests_per_s: float
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    client_cpu_per_handshake_ms: float | None
    client_cpu_per_full_handshake_ms: float | None
    client_cpu_per_resumed_handshake_ms: float | None
    server_cpu_per_handshake_ms: float | None
    server_cpu_per_full_handshake_ms: float | None
    server_cpu_per_resumed_handshake_ms: float | None
    server_handshakes: int | None
    resumption_ratio: float | None
    error_kinds: tuple[ErrorKind, ...]


def percentile_ms(ordered: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of sorted seconds, in ms."""
    if not ordered:
        return None
    rank = max(math.ceil(p / 100 * len(ordered)), 1)
    return round(ordered[rank - 1] * 1000, 3)


def _per_ms(seconds: float, count: float) -> float | None:
    return round(seconds / count * 1000, 4) if count > 0 else None


def summarize(mode: Mode, tallies: Sequence[Tally], seconds: float,
              server: HandshakeCost | None) -> ModeResult:
    """Merge the workers' tallies (and the target's counter delta) into one row."""
    total = Tally()
    for t in tallies:
        total.connections += t.connections
        total.handshakes += t.handshakes
        total.resumed += t.resumed
        total.requests += t.requests
        total.cpu_full += t.cpu_full
        total.cpu_resumed += t.cpu_resumed
        total.latencies.extend(t.latencies)
        total.errors.update(t.errors)
    total.latencies.sort()
    elapsed = max(seconds, 1e-9)
    full = total.handshakes - total.resumed
    kinds: Counter[str] = Counter()
    detail: dict[str, str] = {}
    for (kind, text), n in total.errors.most_common():
        kinds[kind] += n
        detail.setdefault(kind, text)  # the most frequent wording of each kind
    return ModeResult(
        mode=str(mode),
        seconds=round(seconds, 3),
        concurrency=len(tallies),
        connections=total.connections,
        handshakes=total.handshakes,
        resumed=total.resumed,
        requests=total.requests,
        errors=total.error_count,
        connections_per_s=round(total.connections / elapsed, 1),
        handshakes_per_s=round(total.handshakes / elapsed, 1),
        requests_per_s=round(total.requests / elapsed, 1),
        latency_p50_ms=percentile_ms(total.latencies, 50),
        latency_p90_ms=percentile_ms(total.latencies, 90),
        latency_p99_ms=percentile_ms(total.latencies, 99),
        client_cpu_per_handshake_ms=_per_ms(total.cpu_full + total.cpu_resumed,
                                            total.handshakes),
        client_cpu_per_full_handshake_ms=_per_ms(total.cpu_full, full),
        client_cpu_per_resumed_handshake_ms=_per_ms(total.cpu_resumed, total.resumed),
        server_cpu_per_handshake_ms=None if server is None else _per_ms(
            server.cpu_full + server.cpu_resumed, server.ok_full + server.ok_resumed),
        server_cpu_per_full_handshake_ms=None if server is None else _per_ms(
            server.cpu_full, server.ok_full),
        server_cpu_per_resumed_handshake_ms=None if server is None else _per_ms(
            server.cpu_resumed, server.ok_resumed),
        server_handshakes=None if server is None else server.handshakes,
        resumption_ratio=(round(total.resumed / total.handshakes, 4)
                          if total.handshakes else None),
        error_kinds=tuple(ErrorKind(k, n, detail[k]) for k, n in kinds.most_common()),
    )


def run_mode(
    plan: Plan, ctx: ssl.SSLContext, mode: Mode, err: TextIO
) -> tuple[ModeResult, bool]:
    """Run one mode; the flag says it was interrupted (Ctrl-C) and no more should run."""
    before = scrape(plan.metrics_url, plan.timeout) if plan.metrics_url else None
    started = time.monotonic()
    budget = Budget(plan.requests, started + plan.duration)
    workers = [Worker(plan, ctx, mode, budget) for _ in range(plan.concurrency)]
    # Daemons: a worker that outlives even `abort` must not keep the process alive.
    threads = [threading.Thread(target=w.run, name=f"bench-{mode}-{i}", daemon=True)
               for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    interrupted = False
    try:
        _watch(plan, mode, started, workers, threads, budget, err)
    except KeyboardInterrupt:
        interrupted = True
        budget.stop.set()
        _watch(plan, mode, started, workers, threads, budget, err)
    seconds = time.monotonic() - started
    stragglers = sum(t.is_alive() for t in threads)
    if stragglers:
        print(f"sidecar bench: {mode}: {stragglers} workers were still blocked after their "
              "timeouts; their counts so far are included", file=err)
    server: HandshakeCost | None = None
    if plan.metrics_url:
        after = scrape(plan.metrics_url, plan.timeout)
        if isinstance(before, HandshakeCost) and isinstance(after, HandshakeCost):
            server = after - before
        else:
            why = before if isinstance(before, str) else after
            print(f"sidecar bench: {mode}: no server CPU: {why}", file=err)
    return summarize(mode, [w.tally for w in workers], seconds, server), interrupted


def _watch(plan: Plan, mode: Mode, started: float, workers: Sequence[Worker],
           threads: Sequence[threading.Thread], budget: Budget, err: TextIO) -> None:
    """Wait for the workers, drawing the progress line; end stragglers at the hard stop."""
    hard_stop = started + plan.duration + JOIN_STEPS * plan.timeout + 1.0
    shown = 0  # the widest progress line drawn so far
    while alive := [t for t in threads if t.is_alive()]:
        if time.monotonic() >= hard_stop:
            budget.stop.set()
            for w, t in zip(workers, threads, strict=True):
                if t.is_alive():
                    w.abort()
            for t in alive:
                t.join(1.0)
            break
        alive[0].join(PROGRESS_EVERY)  # returns early when the workers are done
        if plan.progress:
            tallies = [w.tally for w in workers]
            done = sum(t.requests for t in tallies)
            elapsed = time.monotonic() - started
            line = (f"{mode:<6} {elapsed:5.1f}s  {done} requests "
                    f"({done / max(elapsed, 1e-9):.0f}/s)  "
                    f"{sum(t.handshakes for t in tallies)} handshakes  "
                    f"{sum(t.error_count for t in tallies)} errors")
            err.write("\r" + line.ljust(shown))
            err.flush()
            shown = max(shown, len(line))
    if shown:  # blank the line (no escape codes: --progress may write to a log file)
        err.write("\r" + " " * shown + "\r")
        err.flush()


# --- output ----------------------------------------------------------------------------

# (heading, ModeResult field, width, format of a number)
_COLUMNS = (
    ("mode", "mode", 6, ""),
    ("conn/s", "connections_per_s", 9, ".1f"),
    ("hs/s", "handshakes_per_s", 9, ".1f"),
    ("req/s", "requests_per_s", 9, ".1f"),
    ("p50 ms", "latency_p50_ms", 8, ".2f"),
    ("p90 ms", "latency_p90_ms", 8, ".2f"),
    ("p99 ms", "latency_p99_ms", 8, ".2f"),
    ("cli CPU/hs ms", "client_cpu_per_handshake_ms", 14, ".3f"),
    ("srv CPU/hs ms", "server_cpu_per_handshake_ms", 14, ".3f"),
    ("resumed", "resumption_ratio", 8, ".2f"),
    ("errors", "errors", 7, ""),
)


def table(results: Iterable[ModeResult]) -> str:
    lines = [" ".join(name.ljust(w) if key == "mode" else name.rjust(w)
                      for name, key, w, _ in _COLUMNS)]
    for r in results:
        cells = []
        for _, key, w, fmt in _COLUMNS:
            value = getattr(r, key)
            text = "-" if value is None else format(value, fmt)
            cells.append(text.ljust(w) if key == "mode" else text.rjust(w))
        lines.append(" ".join(cells))
    return "\n".join(line.rstrip() for line in lines)


def cost_note(results: Sequence[ModeResult]) -> str | None:
    """The one sentence the bench exists for: full vs resumed server CPU."""
    full = next((r.server_cpu_per_full_handshake_ms for r in results
                 if r.mode == Mode.FULL and r.server_cpu_per_full_handshake_ms), None)
    resumed = next((r.server_cpu_per_resumed_handshake_ms for r in results
                    if r.mode == Mode.RESUME and r.server_cpu_per_resumed_handshake_ms), None)
    if full is None or resumed is None:
        return None
    return (f"server CPU per handshake: full {full:.3f} ms, resumed {resumed:.3f} ms "
            f"({full / resumed:.1f}x less when resumed)")


def report_errors(results: Sequence[ModeResult], err: TextIO) -> None:
    for r in results:
        for e in r.error_kinds:
            print(f"{r.mode}: {e.count} x {e.kind}: {e.detail}", file=err)


def plot(results: Sequence[ModeResult], path: str) -> None:
    """Two bar charts: handshakes and requests per second, and CPU per handshake."""
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")  # no display needed, and none may exist
    plt = importlib.import_module("matplotlib.pyplot")
    modes = [r.mode for r in results]
    xs = range(len(modes))
    fig, (rate, cpu) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.38
    rate.bar([x - width / 2 for x in xs], [r.handshakes_per_s for r in results], width,
             label="handshakes/s")
    rate.bar([x + width / 2 for x in xs], [r.requests_per_s for r in results], width,
             label="requests/s")
    rate.set_title("rate")
    cpu.bar([x - width / 2 for x in xs], [r.client_cpu_per_handshake_ms or 0 for r in results],
            width, label="client")
    cpu.bar([x + width / 2 for x in xs], [r.server_cpu_per_handshake_ms or 0 for r in results],
            width, label="server (from --metrics)")
    cpu.set_title("CPU per handshake (ms)")
    for ax in (rate, cpu):
        ax.set_xticks(list(xs), modes)
        ax.legend()
    fig.suptitle("sidecar bench")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- arguments -------------------------------------------------------------------------


class UsageError(Exception):
    pass


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be longer than 0")
    return seconds


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar bench",
        description="Handshake and resumption load generator against any mTLS server.")
    p.add_argument("--target", required=True, help="HOST:PORT of the mTLS server")
    p.add_argument("--cert", help="client SVID: leaf followed by intermediates (PEM)")
    p.add_argument("--key", help="the client SVID's private key (PEM)")
    p.add_argument("--bundle", help="trust anchors for the server; without: not verified")
    p.add_argument("--expect-id", help="the server's SPIFFE ID (or spiffe://TD/*)")
    p.add_argument("--server-name", help="SNI (default: the target's host)")
    p.add_argument("--mode", choices=[*Mode, "all"], default="all",
                   help="full, resume, reuse, or all three one after the other (default)")
    p.add_argument("--concurrency", type=_positive, default=8, help="workers (default 8)")
    p.add_argument("--duration", type=_duration, default=10.0,
                   help="per mode (default 10s)")
    p.add_argument("--requests", type=_positive, help="stop a mode after N requests")
    p.add_argument("--request-bytes", type=_positive, default=64,
                   help="bytes per request (default 64)")
    p.add_argument("--response-bytes", type=_positive,
                   help="bytes to read back (default: --request-bytes)")
    p.add_argument("--no-echo", action="store_true",
                   help="the target does not echo: read until --response-bytes or close")
    p.add_argument("--metrics", help="the target sidecar's /metrics URL, for server CPU")
    p.add_argument("--timeout", type=_duration, default=5.0,
                   help="per connect, handshake and response (default 5s)")
    p.add_argument("--tls-min", choices=["1.2", "1.3"], default="1.3")
    p.add_argument("--tls-max", choices=["1.2", "1.3"], default="1.3")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the modes")
    p.add_argument("--progress", action="store_true",
                   help="progress line on stderr even when it is not a terminal")
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    try:
        address = parse_address(args.target)
    except ValueError as exc:
        raise UsageError(f"--target: {exc}") from None
    if args.expect_id is not None:
        try:
            spiffe.SpiffeId.parse(args.expect_id.removesuffix("/*"))
        except ValueError as exc:
            raise UsageError(f"--expect-id: {exc}") from None
    response_bytes = args.response_bytes or args.request_bytes
    if not args.no_echo and response_bytes != args.request_bytes:
        raise UsageError("--response-bytes differs from --request-bytes: an echo answers "
                         "what it was sent; pass --no-echo for another kind of server")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'sidecar[plot]'")
    modes = tuple(Mode) if args.mode == "all" else (Mode(args.mode),)
    return Plan(
        host=address.host, port=address.port, server_name=args.server_name or address.host,
        modes=modes, concurrency=args.concurrency, duration=args.duration,
        requests=args.requests, payload=request_payload(args.request_bytes),
        response_bytes=response_bytes, echo=not args.no_echo, expect_id=args.expect_id,
        metrics_url=args.metrics, timeout=args.timeout, as_json=args.json, plot=args.plot,
        progress=args.progress or sys.stderr.isatty())


def client_context(args: argparse.Namespace) -> ssl.SSLContext:
    versions = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
    if args.tls_min > args.tls_max:
        raise UsageError(f"--tls-min {args.tls_min} is above --tls-max {args.tls_max}")
    if bool(args.cert) != bool(args.key):
        raise UsageError("--cert and --key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = versions[args.tls_min]
    ctx.maximum_version = versions[args.tls_max]
    # SVIDs need not carry a DNS name: --expect-id checks the SPIFFE ID instead.
    ctx.check_hostname = False
    try:
        if args.bundle:
            ctx.load_verify_locations(cafile=args.bundle)
        else:
            ctx.verify_mode = ssl.CERT_NONE
        if args.cert:
            ctx.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load --cert/--key/--bundle: {exc}") from None
    return ctx


def main(argv: Sequence[str]) -> int:
    """`sidecar bench ARGS`: 0 when some request succeeded, 1 when none did, 2 on usage."""
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse's own exit: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        plan = make_plan(args)
        ctx = client_context(args)
    except UsageError as exc:
        print(f"sidecar bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.bundle:
        print("sidecar bench: no --bundle: the server's certificate is not verified",
              file=sys.stderr)
    results: list[ModeResult] = []
    for mode in plan.modes:
        result, interrupted = run_mode(plan, ctx, mode, sys.stderr)
        results.append(result)
        if interrupted:
            print("sidecar bench: interrupted; results so far:", file=sys.stderr)
            break
    if plan.as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(table(results))
        note = cost_note(results)
        if note:
            print(note)
    report_errors(results, sys.stderr)
    if plan.plot:
        try:
            plot(results, plan.plot)
        except OSError as exc:
            print(f"sidecar bench: cannot write {plan.plot}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if sum(r.requests for r in results) == 0:
        print(f"sidecar bench: no request to {plan.target} succeeded", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
