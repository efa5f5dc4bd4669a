"""The chart for --plot (matplotlib, an optional dependency, imported only here).

Rates, CPU and latencies span decades between a handshake per request and a thousand
requests per connection, so their axes are logarithmic; CPU is per request, the figure
that compares reuse with handshaking (per handshake, reuse would look free or absurd).
The run's parameters are printed on the figure: a chart without them cannot be compared.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from typing import Any

from sidecar.tools.bench.plan import Plan
from sidecar.tools.bench.summary import ModeResult
from sidecar.tools.bench.sweep import BreakEven, cpu_points, fit, series

_COLOURS = {"full": "tab:red", "resume": "tab:blue", "reuse": "tab:green",
            "plain": "tab:purple"}
_LABELS = {"full": "full handshake", "resume": "resumed handshake", "reuse": "reuse",
           "plain": "plain, via an outbound"}


def parameters(plan: Plan) -> str:
    """Two lines with what the run was: enough to rerun it and compare."""
    loop = f"open loop {plan.rate:g}/s" if plan.rate else "closed loop"
    if plan.plain:
        loop += ", plain TCP to a sidecar's outbound"
        if plan.resumed_target:
            loop += f" (resumed: {plan.resumed_target[0]}:{plan.resumed_target[1]})"
    else:
        loop += ", mTLS"
    stop = f"{plan.duration:g}s" + (f" or {plan.requests} requests" if plan.requests else "")
    server = ("the /proc CPU of " + ", ".join(map(str, plan.target_pids)) if plan.target_pids
              else "--target-metrics" if plan.metrics_url else "not measured")
    return (f"target {plan.target}  ·  {plan.concurrency} workers, {loop}\n{stop} per "
            f"point  ·  {len(plan.payload)}-byte requests  ·  server CPU: {server}  ·  "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def plot(plan: Plan, results: Sequence[ModeResult], found: Sequence[BreakEven],
         path: str) -> None:
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")  # no display needed, and none may exist
    plt = importlib.import_module("matplotlib.pyplot")
    fig, axes = plt.subplots(1, 3, figsize=(15, 6.5))
    if plan.sweep:
        _sweep(axes, results, found)
        title = "sidecar bench --sweep: what a handshake costs against reusing a connection"
    else:
        _modes(axes, results)
        title = "sidecar bench: full handshakes, resumed handshakes, reused connections"
    fig.suptitle(title)
    fig.text(0.5, 0.01, parameters(plan), ha="center", fontsize=9, color="dimgray")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _sweep(axes: Any, results: Sequence[ModeResult], found: Sequence[BreakEven]) -> None:
    cpu, rate, latency = axes
    for mode in series(results):
        rows = [r for r in results if r.mode == mode and r.per_connection and r.requests]
        ns = [r.per_connection for r in rows]
        colour, label = _COLOURS[mode], _LABELS[mode]
        for side, style in (("server", "-o"), ("client", ":s")):
            shown = cpu_points(rows, side)
            if shown:
                cpu.plot(*zip(*shown, strict=True), style, color=colour,
                         label=f"{side}, {label}")
            if side == "server" and len(shown) >= 2:
                _fitted(cpu, shown, colour)
        rate.plot(ns, [r.requests_per_s for r in rows], "-o", color=colour, label=label)
        for p, style in (("50", "-o"), ("99", "--^")):
            latency.plot(ns, [getattr(r, f"latency_p{p}_ms") for r in rows], style,
                         color=colour, label=f"p{p}, {label}")
    for b in found:
        if b.side == "server" or not any(f.side == "server" for f in found):
            cpu.axvline(b.per_connection, color=_COLOURS[b.mode], alpha=0.5, lw=1.5,
                        ls="-.", label=f"break-even, {_LABELS[b.mode]}: "
                        f"{b.per_connection:.0f} req/conn")
    cpu.set_title("CPU per request (ms)")
    rate.set_title("requests/s")
    latency.set_title("latency (ms)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("requests per connection")
        ax.grid(True, which="both", alpha=0.3)
        _legend_below(ax)


def _fitted(ax: Any, points: Sequence[tuple[int, float]], colour: str) -> None:
    """The model setup/n + request through the points, dashed, for the eye."""
    costs = fit(points)
    if costs is None or costs[1] <= 0:
        return
    setup, request = costs
    ns = [1.0 * 10 ** (i / 10) for i in range(31)]
    ax.plot(ns, [setup / n + request for n in ns], "--", color=colour, alpha=0.5, lw=1,
            label="fit: setup/n + request")


def _modes(axes: Any, results: Sequence[ModeResult]) -> None:
    rate, cpu, latency = axes
    modes = [r.mode for r in results]
    xs = list(range(len(modes)))
    width = 0.38
    rate.bar([x - width / 2 for x in xs], [r.handshakes_per_s for r in results], width,
             label="handshakes/s")
    rate.bar([x + width / 2 for x in xs], [r.requests_per_s for r in results], width,
             label="requests/s")
    rate.set_title("rate (/s)")
    cpu.bar([x - width / 2 for x in xs], [r.client_cpu_per_request_ms or 0 for r in results],
            width, label="client")
    cpu.bar([x + width / 2 for x in xs], [r.server_cpu_per_request_ms or 0 for r in results],
            width, label="server (from --target-metrics)")
    cpu.set_title("CPU per request (ms)")
    latency.bar([x - width / 2 for x in xs], [r.latency_p50_ms or 0 for r in results], width,
                label="p50")
    latency.bar([x + width / 2 for x in xs], [r.latency_p99_ms or 0 for r in results], width,
                label="p99")
    latency.set_title("latency (ms)")
    for ax in axes:
        ax.set_xticks(xs, modes)
        ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        _legend_below(ax)


def _legend_below(ax: Any) -> None:
    """Under the axes: inside, it would hide the lines it names."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
