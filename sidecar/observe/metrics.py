"""Every metric the proxy exports, named exactly as SPEC.md's table. One home per name.

Peer SPIFFE IDs never become label values (cardinality): they go to the access log.
The objects live in their own registry so that an embedding process's default registry
is left alone.
"""

from __future__ import annotations

import bisect
import math
import os
import platform
import ssl
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidecar import __version__
from sidecar.modes import KtlsMode
from sidecar.outcomes import DecisionKind, Direction, KtlsState
from sidecar.policy import DEFAULT_RULE, INVALID_PEER_RULE, NO_POLICY_RULE
from sidecar.reasons import Reason

if TYPE_CHECKING:
    from sidecar.config import Config
    from sidecar.policy import Policy

# A `_created` twin of every counter and histogram doubles the series for a value
# Prometheus never reads (it sees resets itself). The switch is process-wide.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)


# workers > 1: each worker writes its values to files the supervisor sums (workers.py).
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Tally:
    """A counter or gauge child's changes, added up in a plain number and handed to the
    child when the registry is read. A `.inc()` of prometheus_client takes a lock and
    reads the amount's type (~6,500 instructions under callgrind); a connection made
    about ten, so the per-connection ones go through here. With workers the children
    write to files the supervisor reads, so there every change goes through at once."""

    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n = 0.0
        _tallies.append(self)

    def inc(self, amount: float = 1.0) -> None:
        self.n += amount

    def dec(self, amount: float = 1.0) -> None:
        self.n -= amount

    def flush(self) -> None:
        if self.n:
            n, self.n = self.n, 0.0
            self.child.inc(n)  # a Gauge child takes a negative amount too


_tallies: list[Tally] = []


def flush() -> None:
    """Hand every tally's changes to its child: before the registry is read."""
    for t in _tallies:
        t.flush()


def _tally(child: Any) -> Any:
    return child if MULTIPROCESS else Tally(child)


class _Flusher:
    """Registered first, so that a read of the registry sees every count held back: the
    connection tallies and the per-request counts (`requests`, below). Yields nothing of
    its own."""

    def describe(self) -> Iterable[Metric]:
        return ()  # no family of its own (and no collect() at registration)

    def collect(self) -> Iterable[Metric]:
        flush_held()  # first: it counts into tallies (`_child`) that flush() hands on
        flush()
        return ()


REGISTRY.register(_Flusher())
if not MULTIPROCESS:  # workers: the supervisor sums the processes (ProcessTotals, below)
    ProcessCollector(registry=REGISTRY)

# Handshakes of mTLS proxies on loopback take 1-5 ms; across a network, tens of ms;
# a stalled peer runs to handshake_timeout (10 s by default).
_HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                      1.0, 2.5, 5.0, 10.0)

handshakes = Counter(
    "sidecar_handshakes_total", "TLS handshakes, by outcome and resumption",
    ["direction", "listener", "result", "resumed"], registry=REGISTRY)
handshake_errors = Counter(
    "sidecar_handshake_errors_total", "Failed handshakes (and authentications), by reason",
    ["direction", "listener", "reason"], registry=REGISTRY)
handshake_duration = Histogram(
    "sidecar_handshake_duration_seconds", "Wall time from accept (or connect) to a finished "
    "handshake", ["direction", "listener", "resumed"], buckets=_HANDSHAKE_BUCKETS,
    registry=REGISTRY)
handshake_cpu = Counter(
    "sidecar_handshake_cpu_seconds_total", "CPU time this process spent inside TLS "
    "handshake steps", ["direction", "listener", "resumed"], registry=REGISTRY)
# multiprocess_mode applies only with workers > 1 (workers.py): how the supervisor folds
# the workers' values into one.
connections_active = Gauge(
    "sidecar_connections_active", "Open connections", ["direction", "listener"],
    registry=REGISTRY, multiprocess_mode="livesum")
connections = Counter(
    "sidecar_connections_total", "Accepted connections", ["direction", "listener"],
    registry=REGISTRY)
connections_rejected = Counter(
    "sidecar_connections_rejected_total", "Connections closed before a handshake because a "
    "limit was reached", ["direction", "listener", "limit"], registry=REGISTRY)
bytes_moved = Counter(
    "sidecar_bytes_total", "Plaintext bytes proxied", ["direction", "listener", "flow"],
    registry=REGISTRY)
listener_paused = Gauge(
    "sidecar_listener_paused", "1 while a listener does not accept, by why: "
    "max_connections (new peers wait in the kernel's backlog) or descriptors (out of file "
    "descriptors; retried every 0.1 s)", ["direction", "listener", "reason"],
    registry=REGISTRY, multiprocess_mode="livesum")
listener_backlog = Gauge(
    "sidecar_listener_backlog", "Connections waiting in a paused listener's accept queue "
    "(sampled every second while paused; 0 while accepting)", ["direction", "listener"],
    registry=REGISTRY, multiprocess_mode="livesum")
upstream_errors = Counter(
    "sidecar_upstream_errors_total", "Failed dials of the app (inbound) or the remote "
    "(outbound)", ["direction", "listener"], registry=REGISTRY)
authz_decisions = Counter(
    "sidecar_authz_decisions_total", "Authorization decisions",
    ["listener", "decision", "rule"], registry=REGISTRY)
svid_expiry = Gauge(
    "sidecar_svid_expiry_timestamp_seconds", "notAfter of the SVID in use (Unix time)",
    ["spiffe_id"], registry=REGISTRY, multiprocess_mode="livemax")
bundle_expiry = Gauge(
    "sidecar_bundle_expiry_timestamp_seconds", "Earliest notAfter of a trust bundle's CAs",
    ["trust_domain"], registry=REGISTRY, multiprocess_mode="livemin")
reloads = Counter(
    "sidecar_reloads_total", "Reloads of identity, bundles, policy and CRLs",
    ["kind", "result"], registry=REGISTRY)
ktls_connections = Counter(
    "sidecar_ktls_connections_total", "Connections by kTLS state per path",
    ["direction", "path", "state"], registry=REGISTRY)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
loop_lag = Histogram(
    "sidecar_event_loop_lag_seconds", "How late the event loop ran a 10 ms timer: the time "
    "every connection of this process waited on something else", buckets=_LAG_BUCKETS,
    registry=REGISTRY)
loop_lag_max = Gauge(
    "sidecar_event_loop_lag_max_seconds", "The longest event-loop stall seen since start",
    registry=REGISTRY, multiprocess_mode="max")
worker_restarts = Counter(
    "sidecar_worker_restarts_total", "Workers that died and were replaced",
    registry=REGISTRY)
# Dialing the app is a loopback connect (tens of microseconds); a remote across a network
# takes a round trip or more; a dead one runs to limits.connect_timeout (5 s by default).
upstream_connect_duration = Histogram(
    "sidecar_upstream_connect_duration_seconds", "Time to dial the app (inbound) or the "
    "remote (outbound), name resolution included; successful dials only",
    ["direction", "listener"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                        0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY)
# identity.workload_api: the stream to the agent (sources/workload_api.py).
workload_api_stream_state = Gauge(
    "sidecar_workload_api_stream_state", "1 for the state the Workload API stream is in "
    "(connecting, streaming, backoff, stopped), 0 for the others", ["state"],
    registry=REGISTRY, multiprocess_mode="liveall")
workload_api_updates = Counter(
    "sidecar_workload_api_updates_total", "Responses of the Workload API agent, by what "
    "became of them: applied (a new SVID, bundle or CRL in force), unchanged, rejected "
    "(failed the checks; the identity in force stays)", ["result"], registry=REGISTRY)
workload_api_stream_failures = Counter(
    "sidecar_workload_api_stream_failures_total", "Streams to the Workload API agent that "
    "ended or could not begin, by reason", ["reason"], registry=REGISTRY)
workload_api_last_update = Gauge(
    "sidecar_workload_api_last_update_timestamp_seconds", "When the agent last sent a "
    "valid response (Unix time)", ["address"], registry=REGISTRY,
    multiprocess_mode="liveall")
workload_api_update_age = Gauge(
    "sidecar_workload_api_seconds_since_update", "Seconds since the agent last sent a "
    "valid response (NaN before the first)", ["address"], registry=REGISTRY,
    multiprocess_mode="liveall")
# http listeners: one request through the sidecar is a loopback round trip to the app
# (~0.1-1 ms) plus whatever the app takes.
_REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)
http_requests = Counter(
    "sidecar_http_requests_total", "Requests on http listeners, by the policy's decision "
    "(none: refused as malformed before the policy) and the status code the caller got",
    ["listener", "decision", "code"], registry=REGISTRY)
http_request_duration = Histogram(
    "sidecar_http_request_duration_seconds", "Time from a request's first byte to the end "
    "of its response, on http listeners", ["listener"], buckets=_REQUEST_BUCKETS,
    registry=REGISTRY)
build_info = Gauge(
    "sidecar_build_info", "Always 1; the labels say what runs", ["version", "python", "openssl"],
    registry=REGISTRY, multiprocess_mode="max")
build_info.labels(__version__, platform.python_version(), ssl.OPENSSL_VERSION).set(1)


class Series:
    """The children of one (direction, listener), looked up once.

    `.labels()` takes a lock and builds a key on every call; nine calls a connection showed
    up under callgrind, so each listener's children are found once and kept, the counters
    and the gauge behind a Tally.
    """

    __slots__ = ("active", "bytes_from_app", "bytes_to_app", "connections", "cpu",
                 "dial", "duration", "ok")

    def __init__(self, direction: Direction, listener: str) -> None:
        self.connections = _tally(connections.labels(direction, listener))
        self.active = _tally(connections_active.labels(direction, listener))
        self.bytes_to_app = _tally(bytes_moved.labels(direction, listener, "to_app"))
        self.bytes_from_app = _tally(bytes_moved.labels(direction, listener, "from_app"))
        # Indexed by resumed (False, True).
        self.ok = (_tally(handshakes.labels(direction, listener, "ok", "false")),
                   _tally(handshakes.labels(direction, listener, "ok", "true")))
        self.duration = (handshake_duration.labels(direction, listener, "false"),
                         handshake_duration.labels(direction, listener, "true"))
        self.cpu = (_tally(handshake_cpu.labels(direction, listener, "false")),
                    _tally(handshake_cpu.labels(direction, listener, "true")))
        self.dial = upstream_connect_duration.labels(direction, listener)


_series: dict[tuple[Direction, str], Series] = {}


def series(direction: Direction, listener: str) -> Series:
    found = _series.get((direction, listener))
    if found is None:
        found = _series[(direction, listener)] = Series(direction, listener)
    return found


_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def _inc(metric: Counter, *labels: str, amount: float = 1.0) -> None:
    """`metric.labels(*labels).inc(amount)`, through `_child`."""
    _child(metric, labels).inc(amount)


def _child(metric: Counter, labels: tuple[str, ...]) -> Any:
    """`metric.labels(*labels)` behind a Tally, looked up once per label set. The one
    table for every count by label set: the connection path (`_inc`) and the request
    path (RequestTally.flush) may count the same series (an http listener's WebSocket
    recheck and its requests both count authz decisions)."""
    child = _children.get((metric, labels))
    if child is None:
        if len(_children) > 10_000:  # rule names come from a reloadable file: bound it
            flush()
            gone = {id(t) for t in _children.values()}
            _tallies[:] = [t for t in _tallies if id(t) not in gone]
            _children.clear()
        child = _children[(metric, labels)] = _tally(metric.labels(*labels))
    return child


def count_failure(direction: Direction, listener: str, reason: Reason, *, resumed: bool,
                  cpu_seconds: float) -> None:
    """A failed handshake (or authentication): its count, its reason, its CPU."""
    r = "true" if resumed else "false"
    _inc(handshakes, direction, listener, "error", r)
    _inc(handshake_errors, direction, listener, reason.value)
    _inc(handshake_cpu, direction, listener, r, amount=cpu_seconds)


# The `rule` label of sidecar_authz_decisions_total names at most this many rules: the
# first ones of the policy file, in file order (put the rules worth watching first). The
# rest count as OTHER_RULE, so a 10,000-rule policy adds at most this many series per
# listener and decision. The policy's own fallbacks (default, no_policy, invalid_peer_id)
# always keep their names.
NAMED_RULES = 50
OTHER_RULE = "other"
_FALLBACK_RULES = frozenset((DEFAULT_RULE, NO_POLICY_RULE, INVALID_PEER_RULE))
_named: tuple[str, frozenset[str]] = ("", frozenset())  # (policy version, labels kept)


def rule_label(policy: Policy, rule: str) -> str:
    """The `rule` label a decision by `rule` under `policy` is counted with."""
    global _named
    if _named[0] != policy.version:
        _named = (policy.version, _FALLBACK_RULES | {policy.default_rule}
                  | set(policy.rule_names[:NAMED_RULES]))
    return rule if rule in _named[1] else OTHER_RULE


def count_decision(policy: Policy, listener: str, decision: DecisionKind, rule: str) -> None:
    """Count a decision `policy` made; its `rule` label bounded by that policy (not by a
    process-wide one: the demo and tests run several sidecars in one process)."""
    _inc(authz_decisions, listener, decision, rule_label(policy, rule))


class RequestTally:
    """Per-request counts, added to their families once a second (the sweeper) and before
    every scrape, rather than once per request: a Counter.inc or a Histogram.observe
    takes a lock and a few thousand instructions, and an http listener makes three per
    request (the decision, the request, its duration).

    A request is one `cell.append(seconds)`: a cell per label set holds the durations of
    its requests since the last flush, and the flush counts them (len) and sorts each
    listener's durations into the histogram's buckets. Bucketing there, a sort and a
    bisect per bucket for all of them, costs less than a bisect and two additions in
    Python per request did (~2k instructions less per request under callgrind). The
    cells stay from one flush to the next (emptied in place), so that a connection keeps
    the cell it counts into (RequestCounter) instead of finding it per request. Between
    flushes a cell holds at most about a second of requests (the sweeper flushes every
    second while there are connections; `add` folds a cell that still grows past
    _MAX_PENDING)."""

    __slots__ = ("_counts", "generation")

    def __init__(self) -> None:
        # (listener, decision, rule label or None, status code) -> [the duration in
        # seconds of each request since the last flush]
        self._counts: dict[tuple[str, str, str | None, int], list[float]] = {}
        # Bumped when the cells are dropped (too many label sets, after a flush): a
        # cell kept from before then counts nowhere, so a keeper must look it up again.
        self.generation = 0

    def cell(self, listener: str, decision: str, rule: str | None, code: int) -> list[float]:
        """Where one request of these labels is counted (`cell.append(seconds)`), until
        `generation` changes. `rule` is the decision's `rule` label, None when no policy
        decision was made (a malformed request)."""
        key = (listener, decision, rule, code)
        found = self._counts.get(key)
        if found is None:
            found = self._counts[key] = []
        return found

    def add(self, listener: str, decision: str, rule: str | None, code: int,
            seconds: float) -> None:
        """One request (see `cell`)."""
        self.cell(listener, decision, rule, code).append(seconds)

    def flush(self) -> None:
        counts = self._counts
        durations: dict[str, list[float]] = {}  # listener -> what its cells held
        for (listener, decision, rule, code), found in counts.items():
            if found:
                n = len(found)
                if rule is not None:
                    _child(authz_decisions, (listener, decision, rule)).inc(n)
                _child(http_requests, (listener, decision, _CODES.get(code) or str(code))).inc(n)
                taken = durations.get(listener)
                if taken is None:
                    durations[listener] = found[:]
                else:
                    taken += found
                found.clear()  # in place: the list is kept by its counters
        if len(counts) > _MAX_REQUEST_CELLS:  # rule names come from a reloadable file
            self._counts = {}
            self.generation += 1
        for listener, taken in durations.items():
            _observe_many(http_request_duration.labels(listener), bucketed(taken))


_MAX_REQUEST_CELLS = 10_000
# A cell folded at once when it holds this many (nothing flushed it for a while: a
# process without the sweeper, such as a test or an embedding): bounds its memory.
_MAX_PENDING = 100_000


def bucketed(durations: list[float],
             bounds: tuple[float, ...] = _REQUEST_BUCKETS) -> list[float]:
    """`durations` (sorted here, in place) as a histogram of `bounds` counts them: how
    many fall in each bucket (at most its bound, above the one before; the last is +Inf),
    then their sum (math.fsum: the sum correctly rounded, whatever their order)."""
    durations.sort()
    out: list[float] = []
    below = 0  # how many are at most the previous bound
    for bound in bounds:
        upto = bisect.bisect_right(durations, bound, below)
        out.append(upto - below)
        below = upto
    out.append(len(durations) - below)
    out.append(math.fsum(durations))
    return out


class RequestCounter:
    """One http connection's counting: the cell of its last request's labels kept, since
    the requests on one connection mostly repeat them."""

    __slots__ = ("_cell", "_code", "_decision", "_generation", "_listener", "_rule")

    def __init__(self, listener: str) -> None:
        self._listener = listener
        self._decision = ""
        self._rule: str | None = None
        self._code = 0
        self._generation = -1
        self._cell: list[float] = []

    def add(self, decision: str, rule: str | None, code: int, seconds: float) -> None:
        """One request (as RequestTally.add for this connection's listener)."""
        if decision is not self._decision or rule is not self._rule or code != self._code \
                or self._generation != requests.generation:
            self._decision, self._rule, self._code = decision, rule, code
            self._generation = requests.generation
            self._cell = requests.cell(self._listener, decision, rule, code)
        cell = self._cell
        cell.append(seconds)
        if len(cell) > _MAX_PENDING:
            requests.flush()


class HeldSamples:
    """Observations of a histogram without labels (`samples.append(value)`), added to it
    at the next flush (`flush_held`: each sweep, and before every scrape; the loop-lag
    probe's also when it stops, as it may outlast the sweeper) rather than one
    observe() each: the loop-lag probe takes a hundred samples a second while there is
    work, and an observe() was ~10k instructions (a lock per bucket and sum)."""

    __slots__ = ("_bounds", "_histogram", "samples")

    def __init__(self, histogram: Histogram, bounds: tuple[float, ...]) -> None:
        self._histogram = histogram
        self._bounds = bounds
        self.samples: list[float] = []  # emptied in place: a keeper appends to it

    def flush(self) -> None:
        if self.samples:
            taken = self.samples[:]
            self.samples.clear()
            _observe_many(self._histogram, bucketed(taken, self._bounds))


# A flush is due by this many (nothing flushed for a while, e.g. a process without the
# sweeper): bounds what is held. A worker's samples reach a scrape only through its
# files (the supervisor serves /metrics, and cannot ask a worker to flush first): there
# each sample is written as it is taken, as observe() did.
MAX_HELD_SAMPLES = 1 if MULTIPROCESS else 1000


def flush_held() -> None:
    """Hand the held per-request counts and samples to their families: what the sweep
    and the drain do each second (a worker's reach the supervisor's files only so), and
    every scrape."""
    requests.flush()
    loop_lags.flush()


def _observe_many(child: Histogram, sums: list[float]) -> None:
    """What one observe() per request would have added, in one call per bucket: the
    histogram keeps a count per bucket and a sum (prometheus_client's own layout, which
    tests/test_metrics.py checks against observe())."""
    buckets = child._buckets
    for i, n in enumerate(sums[:-1]):
        if n:
            buckets[i].inc(n)
    child._sum.inc(sums[-1])


_CODES = {code: str(code) for code in range(100, 600)}
requests = RequestTally()
loop_lags = HeldSamples(loop_lag, _LAG_BUCKETS)  # LagProbe's


def count_ktls(direction: Direction, path: str, state: KtlsState) -> None:
    _inc(ktls_connections, direction, path, state)


# Label values known before any traffic, so that every series a dashboard or an alert
# reads exists at 0 from the start: `rate()` of a series that appears with its first
# error misses that error, and an absent series reads as "no data", not as 0.
RESUMED = ("false", "true")
RESULTS = ("ok", "error")
LIMITS = ("max_connections", "max_pending_handshakes")  # proxy/connection.py evicts by these
PAUSES = ("max_connections", "descriptors")  # proxy/listener.py pauses for these
RELOAD_KINDS = ("svid", "bundle", "crl", "policy")
KTLS_PATHS = ("tx", "rx")
KTLS_STATES = tuple(KtlsState)


def declare(config: Config, current_policy: Callable[[], Policy]) -> None:
    """At start: every label set of the configured listeners at 0, and the policy the
    `rule` label is bounded by (read at each decision: it changes on a reload)."""
    listeners = [*((Direction.INBOUND, lst.name) for lst in config.inbound),
                 *((Direction.OUTBOUND, lst.name) for lst in config.outbound)]
    for direction, name in listeners:
        series(direction, name)
        for result in RESULTS:
            for resumed in RESUMED:
                handshakes.labels(direction, name, result, resumed)
        for reason in Reason:
            handshake_errors.labels(direction, name, reason.value)
        for limit in LIMITS:
            connections_rejected.labels(direction, name, limit)
        for pause in PAUSES:
            listener_paused.labels(direction, name, pause)
        listener_backlog.labels(direction, name)
        upstream_errors.labels(direction, name)
    for _, name in (lst for lst in listeners if lst[0] is Direction.INBOUND):
        for decision in DecisionKind:
            authz_decisions.labels(name, decision, current_policy().default_rule)
    for kind in RELOAD_KINDS:
        for result in RESULTS:
            reloads.labels(kind, result)
    if config.tls.ktls is not KtlsMode.OFF:
        for direction in {d for d, _ in listeners}:
            for path in KTLS_PATHS:
                for state in KTLS_STATES:
                    ktls_connections.labels(direction, path, state)


class ProcessTotals:
    """`process_*` for `workers: N`, on the supervisor's /metrics: the supervisor and its
    workers as one, as a pod's CPU and memory limits count them.

    prometheus_client's multiprocess mode has no process metrics (each worker's would be
    its own series, with pids that change on every restart), so this sums them:
    `process_cpu_seconds_total` is the supervisor's CPU plus every worker's, the dead ones'
    included (the kernel adds a reaped child's CPU to its parent's `children` times), so
    it never goes down when a worker is replaced; memory and open descriptors are those of
    the live processes; the start time and the descriptor limit are the supervisor's.
    """

    _SUMMED = ("process_cpu_seconds", "process_resident_memory_bytes",
               "process_virtual_memory_bytes", "process_open_fds")

    def __init__(self, worker_pids: Callable[[], Iterable[int]]) -> None:
        self._worker_pids = worker_pids
        self._own = ProcessCollector(registry=None)

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, float] = {}
        for pid in self._worker_pids():
            for family in ProcessCollector(pid=_constant(pid), registry=None).collect():
                if family.name in self._SUMMED:
                    totals[family.name] = totals.get(family.name, 0.0) + \
                        family.samples[0].value
        times = os.times()
        reaped = times.children_user + times.children_system
        for family in self._own.collect():
            value = family.samples[0].value + totals.get(family.name, 0.0)
            if family.name == "process_cpu_seconds":
                yield CounterMetricFamily("process_cpu_seconds", family.documentation +
                                          " (supervisor and workers)", value=value + reaped)
            else:
                yield GaugeMetricFamily(family.name, family.documentation + (
                    " (supervisor and workers)" if family.name in self._SUMMED else
                    " (supervisor)"), value=value)


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid
