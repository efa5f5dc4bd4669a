"""The workers' counts, and the one row per mode they add up to (pure)."""

from __future__ import annotations

import importlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.tools.bench.plan import ConnectionMode
from sidecar.tools.bench.target_metrics import HandshakeCost


@dataclass(slots=True)
class Tally:
    """One worker's counts. Only its worker writes it; the progress line reads it racily."""

    connections: int = 0
    handshakes: int = 0
    resumed: int = 0
    requests: int = 0
    cpu_full: float = 0.0
    cpu_resumed: float = 0.0
    cpu: float = 0.0  # the worker thread's whole CPU: handshakes, requests, Python
    latencies: list[float] = field(default_factory=list)
    # Open loop (--rate): latencies in µs in an HdrHistogram (hdrhistogram, the `bench`
    # extra) instead of the list: fixed memory at any rate, and what the field uses.
    histogram: Any = None
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


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
    latency_p999_ms: float | None
    client_cpu_per_handshake_ms: float | None
    client_cpu_per_full_handshake_ms: float | None
    client_cpu_per_resumed_handshake_ms: float | None
    server_cpu_per_handshake_ms: float | None
    server_cpu_per_full_handshake_ms: float | None
    server_cpu_per_resumed_handshake_ms: float | None
    server_handshakes: int | None
    resumption_ratio: float | None
    error_kinds: tuple[ErrorKind, ...]
    client_cpu_per_request_ms: float | None = None
    server_cpu_per_request_ms: float | None = None
    # Requests per connection (None: reuse mode's one connection per worker).
    per_connection: int | None = None
    # Open loop: the arrival rate asked for; latencies then count from when each request
    # was due, not from when a worker got to it (corrected for coordinated omission).
    target_rate: float | None = None


def percentile_ms(ordered: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of sorted seconds, in ms."""
    if not ordered:
        return None
    rank = max(math.ceil(p / 100 * len(ordered)), 1)
    return round(ordered[rank - 1] * 1000, 3)


# The HdrHistogram's range and precision: 1 µs to 10 minutes, 3 significant digits.
HISTOGRAM_RANGE_US = (1, 600_000_000)
HISTOGRAM_DIGITS = 3


def new_histogram() -> Any:
    """An empty HdrHistogram of latencies in µs (needs the `bench` extra)."""
    module = importlib.import_module("hdrh.histogram")
    return module.HdrHistogram(*HISTOGRAM_RANGE_US, HISTOGRAM_DIGITS)


def _histogram_ms(histogram: Any, p: float) -> float | None:
    if histogram is None or histogram.get_total_count() == 0:
        return None
    return round(float(histogram.get_value_at_percentile(p)) / 1000, 3)


def _per_ms(seconds: float, count: float) -> float | None:
    return round(seconds / count * 1000, 4) if count > 0 else None


def summarize(mode: ConnectionMode, tallies: Sequence[Tally], seconds: float,
              server: HandshakeCost | None, *, per_connection: int | None = None,
              rate: float | None = None, label: str | None = None) -> ModeResult:
    """Merge the workers' tallies (and the target's counter delta) into one row, named
    `label` or after its mode."""
    total = Tally()
    if rate is not None:
        total.histogram = new_histogram()
    for t in tallies:
        total.connections += t.connections
        total.handshakes += t.handshakes
        total.resumed += t.resumed
        total.requests += t.requests
        total.cpu_full += t.cpu_full
        total.cpu_resumed += t.cpu_resumed
        total.cpu += t.cpu
        total.latencies.extend(t.latencies)
        if total.histogram is not None and t.histogram is not None:
            total.histogram.add(t.histogram)
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
        mode=label or str(mode),
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
        **_latencies(total),
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
        client_cpu_per_request_ms=_per_ms(total.cpu, total.requests),
        server_cpu_per_request_ms=(None if server is None or server.process_cpu is None
                                   else _per_ms(server.process_cpu, total.requests)),
        per_connection=None if mode is ConnectionMode.REUSE else per_connection,
        target_rate=rate,
    )


def _latencies(total: Tally) -> dict[str, float | None]:
    points = {"latency_p50_ms": 50.0, "latency_p90_ms": 90.0, "latency_p99_ms": 99.0,
              "latency_p999_ms": 99.9}
    if total.histogram is not None:
        return {k: _histogram_ms(total.histogram, p) for k, p in points.items()}
    return {k: percentile_ms(total.latencies, p) for k, p in points.items()}
