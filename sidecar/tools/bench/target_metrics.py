"""The target's counters: a sidecar's inbound handshake counters and any process's
`process_cpu_seconds_total`, read from its /metrics, or a local process's CPU from /proc.

Server CPU per request needs the whole process's CPU, not the handshake counter: reusing
a connection costs no handshake but still costs the records' crypto and the pump."""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from sidecar.observe import metrics


@dataclass(frozen=True, slots=True)
class HandshakeCost:
    """The target's inbound handshake counters at one moment (or a difference of two)."""

    ok_full: float = 0.0
    ok_resumed: float = 0.0
    cpu_full: float = 0.0
    cpu_resumed: float = 0.0
    # process_cpu_seconds_total (summed when it comes per worker); None when not exported.
    process_cpu: float | None = None

    def __sub__(self, other: HandshakeCost) -> HandshakeCost:
        process = (None if self.process_cpu is None or other.process_cpu is None
                   else self.process_cpu - other.process_cpu)
        return HandshakeCost(self.ok_full - other.ok_full,
                             self.ok_resumed - other.ok_resumed,
                             self.cpu_full - other.cpu_full,
                             self.cpu_resumed - other.cpu_resumed, process)

    @property
    def handshakes(self) -> int:
        return round(self.ok_full + self.ok_resumed)


# prometheus_client's ProcessCollector sample, the name every Prometheus exporter uses;
# not a sidecar metric, so it has no home in metrics.py.
PROCESS_CPU_SAMPLE = "process_cpu_seconds_total"


def _family(collector: Any) -> str:
    # The names live in metrics.py only; a counter's family name lacks the `_total`.
    return str(collector.describe()[0].name)


def handshake_cost(text: str) -> HandshakeCost:
    """Sum the inbound handshake counters and the process CPU of a Prometheus text
    exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {_family(metrics.handshakes): "ok", _family(metrics.handshake_cpu): "cpu"}
    sums = {f"{w}_{r}": 0.0 for w in ("ok", "cpu") for r in ("full", "resumed")}
    process: float | None = None
    for family in text_string_to_metric_families(text):
        # Matched by sample name: an exposition without TYPE lines names the family so.
        cpu = [s.value for s in family.samples if s.name == PROCESS_CPU_SAMPLE]
        if cpu:
            process = (process or 0.0) + sum(cpu)
            continue
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
                         sums["cpu_full"], sums["cpu_resumed"], process)


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


def pid_cpu(pid: int) -> float | str:
    """A local process's user + system CPU seconds (and its waited-for children's), from
    /proc/PID/stat, or one line saying why not: for a target that exports no process CPU."""
    path = f"/proc/{pid}/stat"
    try:
        with open(path, encoding="ascii") as f:
            stat = f.read()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    # Fields after the command name, which may hold spaces and ends at the last ')':
    # utime, stime, cutime, cstime are the 14th to 17th fields of the line.
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")
