"""What the README says about metrics is what the code counts (issue 16, item 7)."""

from __future__ import annotations

from pathlib import Path

from sidecar import metrics

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _reason_row(reason: str) -> str:
    return next(line for line in README.splitlines() if line.startswith(f"| `{reason}` |"))


def test_upstream_unavailable_is_said_to_count_where_it_counts() -> None:
    row = _reason_row("upstream_unavailable")
    # The proxy counts a failed dial in upstream_errors (proxy/inbound.py, outbound.py).
    name = metrics.upstream_errors._name + "_total"  # prometheus_client drops the suffix
    assert name == "sidecar_upstream_errors_total"
    assert f"`{name}`" in row, row
    assert "Every failure is counted in `sidecar_handshake_errors_total" not in README
