"""Writes sidecar.json, the Grafana dashboard of the sidecar's metrics (docs/metrics.md).

    python examples/grafana/generate.py      # rewrites sidecar.json next to this file

The panels are data here and the JSON is derived, so a query is written once and a test
(tests/e2e/test_prometheus.py) runs every one of them against a real Prometheus scraping
a real sidecar. Import sidecar.json in Grafana (Dashboards > New > Import) and pick your
Prometheus data source; `instance` narrows it to some sidecars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Grafana replaces these; tests/e2e/test_prometheus.py does too, with fixed values.
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str
    description: str
    kind: str = "timeseries"


def _ok(resumed: str = "") -> str:
    more = f',resumed="{resumed}"' if resumed else ""
    return f'sidecar_handshakes_total{{{SEL},result="ok"{more}}}'


PANELS = (
    Panel("Handshakes: full vs resumed", (
        (f"sum by (direction, resumed) (rate({_ok()}[{RATE}]))",
         "{{direction}} resumed={{resumed}}"),), "ops",
        "Successful TLS handshakes per second; a resumed one skips the certificate "
        "exchange and its signatures."),
    Panel("Handshake CPU per handshake", (
        (f"sum by (direction, resumed) (rate(sidecar_handshake_cpu_seconds_total{{{SEL}}}"
         f"[{RATE}])) / sum by (direction, resumed) (rate({_ok()}[{RATE}]))",
         "{{direction}} resumed={{resumed}}"),), "s",
        "CPU the sidecar spent in handshake steps, per successful handshake."),
    Panel("Resumption ratio", (
        (f'sum by (direction) (rate({_ok("true")}[{RATE}])) / '
         f"sum by (direction) (rate({_ok()}[{RATE}]))", "{{direction}}"),), "percentunit",
        "Share of handshakes that resumed a session. Sessions end at each ticket "
        "rotation and with every bundle or CRL change."),
    Panel("Handshake errors by reason", (
        (f"sum by (direction, reason) (rate(sidecar_handshake_errors_total{{{SEL}}}[{RATE}]))",
         "{{direction}} {{reason}}"),), "ops",
        "Failed handshakes and authentications per second; docs/failure-reasons.md "
        "explains each reason and its fix."),
    Panel("Authorization decisions", (
        (f"sum by (listener, decision, rule) (rate(sidecar_authz_decisions_total{{{SEL}}}"
         f"[{RATE}]))", "{{listener}} {{decision}} ({{rule}})"),), "ops",
        "Policy decisions per second by the rule that decided (the first 50 rules of the "
        "policy by name, later ones as `other`)."),
    Panel("Expiry countdown", (
        (f"min by (spiffe_id) (sidecar_svid_expiry_timestamp_seconds{{{SEL}}}) - time()",
         "SVID {{spiffe_id}}"),
        (f"min by (trust_domain) (sidecar_bundle_expiry_timestamp_seconds{{{SEL}}}) - time()",
         "bundle {{trust_domain}}")), "s",
        "Time left before the SVID in use, and the earliest CA of each trust bundle, "
        "expire. An SVID normally rotates at half its lifetime.", "stat"),
    Panel("Connections", (
        (f"sum by (direction, listener) (sidecar_connections_active{{{SEL}}})",
         "open {{direction}} {{listener}}"),
        (f"sum by (direction, listener) (rate(sidecar_connections_total{{{SEL}}}[{RATE}]))",
         "new/s {{direction}} {{listener}}")), "short",
        "Open connections, and new ones per second. Reuse shows as bytes flowing with "
        "few new connections."),
    Panel("Bytes", (
        (f"sum by (direction, listener, flow) (rate(sidecar_bytes_total{{{SEL}}}[{RATE}]))",
         "{{direction}} {{listener}} {{flow}}"),), "Bps",
        "Plaintext bytes proxied per second, both ways."),
    Panel("Event-loop lag", (
        (f"histogram_quantile(0.99, sum by (instance, le) "
         f"(rate(sidecar_event_loop_lag_seconds_bucket{{{SEL}}}[{RATE}])))", "p99 {{instance}}"),
        (f"max by (instance) (sidecar_event_loop_lag_max_seconds{{{SEL}}})",
         "max since start {{instance}}")), "s",
        "How late the loop runs a 10 ms timer: every connection of the process waits "
        "that long. A p99 above 50 ms: CPU-bound, or something blocks."),
    Panel("Upstream connect time", (
        (f"histogram_quantile(0.99, sum by (direction, listener, le) "
         f"(rate(sidecar_upstream_connect_duration_seconds_bucket{{{SEL}}}[{RATE}])))",
         "p99 {{direction}} {{listener}}"),), "s",
        "Time to dial the app (inbound) or the remote (outbound), successful dials."),
    Panel("Process CPU", (
        (f"sum by (instance) (rate(process_cpu_seconds_total{{{SEL}}}[{RATE}]))",
         "{{instance}}"),), "percentunit",
        "CPU of the sidecar (with workers: the supervisor and every worker)."),
    Panel("Process memory", (
        (f"sum by (instance) (process_resident_memory_bytes{{{SEL}}})", "{{instance}}"),),
        "bytes", "Resident memory (with workers: summed)."),
)


def dashboard() -> dict[str, object]:
    panels = []
    for i, p in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "type": p.kind,
            "title": p.title,
            "description": p.description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
            if p.kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for j, (expr, legend) in enumerate(p.queries)],
        })
    return {
        "title": "sidecar",
        "uid": "sidecar-mtls",
        "tags": ["sidecar", "mtls", "spiffe"],
        "schemaVersion": 39,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "label": "Prometheus"},
            {"name": "instance", "type": "query", "label": "instance",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(sidecar_build_info, instance)",
                       "refId": "instance"},
             "includeAll": True, "multi": True, "allValue": ".*",
             "current": {"text": "All", "value": "$__all"}, "refresh": 2},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    (HERE / "sidecar.json").write_text(render())
