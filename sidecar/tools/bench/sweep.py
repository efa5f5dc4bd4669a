"""`--sweep`: requests per connection against CPU per request, and the break-even point.

A connection's cost is modelled as a setup (TCP connect + handshake, H) plus a cost per
request (r), so CPU per request at n requests per connection is H/n + r. The sweep's
ends give H and r, for full and for resumed handshakes (see `fit`); n* = H/r is the
break-even point, the requests per connection at which the setup costs as much CPU as all
the requests on it. Below n*, handshakes dominate and keeping connections open (or
resuming) pays most; far above it, they hardly matter.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TextIO

from sidecar.tools.bench.plan import SWEEP_PER_CONNECTION, ConnectionMode, Plan
from sidecar.tools.bench.summary import ModeResult

SWEEP_MODES = (ConnectionMode.FULL, ConnectionMode.RESUME)

RunMode = Callable[[Plan, ssl.SSLContext, ConnectionMode, TextIO], tuple[ModeResult, bool]]


@dataclass(frozen=True, slots=True)
class BreakEven:
    """One handshake kind's fitted costs, in ms of CPU, and n* = setup / request."""

    mode: str
    side: str  # "server" or "client": whose CPU
    setup_ms: float
    request_ms: float

    @property
    def per_connection(self) -> float:
        return self.setup_ms / self.request_ms


def run_sweep(plan: Plan, ctx: ssl.SSLContext, err: TextIO,
              run_mode: RunMode) -> tuple[list[ModeResult], bool]:
    """Every point of the sweep, in order; the flag says it was interrupted."""
    results: list[ModeResult] = []
    for per_connection in SWEEP_PER_CONNECTION:
        # --plain runs resume only to a --resumed-target (make_plan leaves it out else).
        for mode in [m for m in SWEEP_MODES if m in plan.modes]:
            result, interrupted = run_mode(replace(plan, per_connection=per_connection),
                                           ctx, mode, err)
            results.append(result)
            if interrupted:
                return results, True
    return results, False


def fit(points: Sequence[tuple[int, float]]) -> tuple[float, float] | None:
    """(setup, request) of cost = setup / n + request through the points at the fewest and
    the most requests per connection, or None without two distinct n. The two ends, not a
    least-squares line: each end pins one of the two costs (n = 1 is nearly all setup,
    n = 1000 nearly all requests), and the points between check the model on the plot."""
    if len({n for n, _ in points}) < 2:
        return None
    (low, at_low), (high, at_high) = min(points), max(points)
    setup = (at_low - at_high) / (1 / low - 1 / high)
    return setup, at_high - setup / high


def cpu_points(rows: Sequence[ModeResult], side: str) -> list[tuple[int, float]]:
    """(requests per connection, CPU per request in ms) of the rows that have both."""
    points: list[tuple[int, float]] = []
    for r in rows:
        cost = r.server_cpu_per_request_ms if side == "server" else r.client_cpu_per_request_ms
        if r.per_connection and cost:
            points.append((r.per_connection, cost))
    return points


def series(results: Sequence[ModeResult]) -> list[str]:
    """The sweep's series, in order: full and resume, or plain (--plain)."""
    return list(dict.fromkeys(r.mode for r in results if r.per_connection))


def break_even(results: Sequence[ModeResult]) -> list[BreakEven]:
    """The break-even point of each handshake kind, from the server's CPU where the run
    read it, else the client's; none for a kind whose fit is not positive (noise)."""
    found: list[BreakEven] = []
    for mode in series(results):
        rows = [r for r in results if r.mode == mode and r.per_connection and r.requests]
        for side in ("server", "client"):
            costs = fit(cpu_points(rows, side))
            if costs is None:
                continue
            setup, request = costs
            if setup > 0 and request > 0:
                found.append(BreakEven(mode, side, round(setup, 4), round(request, 4)))
            break  # the server's figures when there are any
    return found


def break_even_text(found: Sequence[BreakEven]) -> str | None:
    if not found:
        return None
    words = {"full": "a full handshake", "resume": "a resumed handshake",
             "plain": "a connection through the outbound (its handshake)"}
    return "\n".join(
        f"{b.side} CPU: {words[b.mode]} and its connection cost {b.setup_ms:.3f} ms, a "
        f"request {b.request_ms:.4f} ms: break-even at {b.per_connection:.0f} requests per "
        f"connection (below, the handshake is most of the cost)"
        for b in found)
