"""The bar chart for --plot (matplotlib, an optional dependency, imported only here)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from sidecar.loadgen.summary import ModeResult


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
