"""The results as text: the table, the cost sentence, JSON, and the error lines (pure but
for `report_errors`, which prints them)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import TextIO

from sidecar.tools.bench.plan import ConnectionMode
from sidecar.tools.bench.summary import ModeResult

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
    ("srv CPU/req ms", "server_cpu_per_request_ms", 15, ".4f"),
    ("resumed", "resumption_ratio", 8, ".2f"),
    ("errors", "errors", 7, ""),
)

# --sweep: one row per (mode, requests per connection), the CPU per request.
_SWEEP_COLUMNS = (
    ("mode", "mode", 6, ""),
    ("req/conn", "per_connection", 9, ""),
    ("req/s", "requests_per_s", 9, ".1f"),
    ("p50 ms", "latency_p50_ms", 8, ".2f"),
    ("p99 ms", "latency_p99_ms", 8, ".2f"),
    ("cli CPU/req ms", "client_cpu_per_request_ms", 15, ".4f"),
    ("srv CPU/req ms", "server_cpu_per_request_ms", 15, ".4f"),
    ("resumed", "resumption_ratio", 8, ".2f"),
    ("errors", "errors", 7, ""),
)


def table(results: Iterable[ModeResult], *, sweep: bool = False) -> str:
    columns = _SWEEP_COLUMNS if sweep else _COLUMNS
    lines = [" ".join(name.ljust(w) if key == "mode" else name.rjust(w)
                      for name, key, w, _ in columns)]
    for r in results:
        cells = []
        for _, key, w, fmt in columns:
            value = getattr(r, key)
            text = "-" if value is None else format(value, fmt)
            cells.append(text.ljust(w) if key == "mode" else text.rjust(w))
        lines.append(" ".join(cells))
    return "\n".join(line.rstrip() for line in lines)


def cost_note(results: Sequence[ModeResult]) -> str | None:
    """The one sentence the bench exists for: full vs resumed server CPU."""
    full = next((r.server_cpu_per_full_handshake_ms for r in results
                 if r.mode == ConnectionMode.FULL and r.server_cpu_per_full_handshake_ms), None)
    resumed = next((r.server_cpu_per_resumed_handshake_ms for r in results
                    if r.mode == ConnectionMode.RESUME
                    and r.server_cpu_per_resumed_handshake_ms), None)
    if full is None or resumed is None:
        return None
    return (f"server CPU per handshake: full {full:.3f} ms, resumed {resumed:.3f} ms "
            f"({full / resumed:.1f}x less when resumed)")


def json_text(results: Sequence[ModeResult],
              break_even: Sequence[dict[str, object]] | None = None) -> str:
    """What --json prints: one object per mode, every ModeResult field; with --sweep, an
    object of the points and the break-even points."""
    rows = [asdict(r) for r in results]
    if break_even is None:
        return json.dumps(rows, indent=2)
    return json.dumps({"points": rows, "break_even": list(break_even)}, indent=2)


def report_errors(results: Sequence[ModeResult], err: TextIO) -> None:
    for r in results:
        for e in r.error_kinds:
            print(f"{r.mode}: {e.count} x {e.kind}: {e.detail}", file=err)
