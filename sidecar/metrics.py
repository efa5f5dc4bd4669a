"""Every metric the proxy exports, named exactly as SPEC.md's table. One home per name.

Peer SPIFFE IDs never become label values (cardinality): they go to the access log.
The objects live in their own registry so that an embedding process's default registry
is left alone.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.outcomes import DecisionKind, Direction, KtlsState

REGISTRY = CollectorRegistry(auto_describe=True)
# workers > 1: each worker writes its values to files the supervisor sums (workers.py).
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

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
loop_lag = Histogram(
    "sidecar_event_loop_lag_seconds", "How late the event loop ran a 10 ms timer: the time "
    "every connection of this process waited on something else", buckets=(
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0), registry=REGISTRY)
loop_lag_max = Gauge(
    "sidecar_event_loop_lag_max_seconds", "The longest event-loop stall seen since start",
    registry=REGISTRY, multiprocess_mode="max")
worker_restarts = Counter(
    "sidecar_worker_restarts_total", "Workers that died and were replaced",
    registry=REGISTRY)


class Series:
    """The children of one (direction, listener), looked up once.

    `.labels()` takes a lock and builds a key on every call; nine calls a connection showed
    up under callgrind, so each listener's children are found once and kept.
    """

    __slots__ = ("active", "bytes_from_app", "bytes_to_app", "connections", "cpu",
                 "duration", "ok")

    def __init__(self, direction: Direction, listener: str) -> None:
        self.connections = connections.labels(direction, listener)
        self.active = connections_active.labels(direction, listener)
        self.bytes_to_app = bytes_moved.labels(direction, listener, "to_app")
        self.bytes_from_app = bytes_moved.labels(direction, listener, "from_app")
        # Indexed by resumed (False, True).
        self.ok = (handshakes.labels(direction, listener, "ok", "false"),
                   handshakes.labels(direction, listener, "ok", "true"))
        self.duration = (handshake_duration.labels(direction, listener, "false"),
                         handshake_duration.labels(direction, listener, "true"))
        self.cpu = (handshake_cpu.labels(direction, listener, "false"),
                    handshake_cpu.labels(direction, listener, "true"))


_series: dict[tuple[Direction, str], Series] = {}


def series(direction: Direction, listener: str) -> Series:
    found = _series.get((direction, listener))
    if found is None:
        found = _series[(direction, listener)] = Series(direction, listener)
    return found


_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def _inc(metric: Counter, *labels: str) -> None:
    """`metric.labels(*labels).inc()`, with the child looked up once per label set."""
    child = _children.get((metric, labels))
    if child is None:
        if len(_children) > 10_000:  # rule names come from a reloadable file: bound it
            _children.clear()
        child = _children[(metric, labels)] = metric.labels(*labels)
    child.inc()


def count_decision(listener: str, decision: DecisionKind, rule: str) -> None:
    _inc(authz_decisions, listener, decision, rule)


def count_ktls(direction: Direction, path: str, state: KtlsState) -> None:
    _inc(ktls_connections, direction, path, state)
