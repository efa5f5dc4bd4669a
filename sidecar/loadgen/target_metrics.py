"""The target sidecar's inbound handshake counters, read from its /metrics."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from sidecar import metrics


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
