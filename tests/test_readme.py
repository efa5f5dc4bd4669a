"""What the docs say about metrics is what the code counts (issue 16, item 7).

The failure-reason reference moved from README.md to docs/failure-reasons.md (issue 20).
"""

from __future__ import annotations

from pathlib import Path

from sidecar.observe import metrics

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
REASONS = (REPO / "docs" / "failure-reasons.md").read_text()


def _reason_section(reason: str) -> str:
    return REASONS.split(f"## `{reason}`\n", 1)[1].split("\n## ", 1)[0]


def test_upstream_unavailable_is_said_to_count_where_it_counts() -> None:
    section = _reason_section("upstream_unavailable")
    # The proxy counts a failed dial in upstream_errors (proxy/inbound.py, outbound.py).
    name = metrics.upstream_errors._name + "_total"  # prometheus_client drops the suffix
    assert name == "sidecar_upstream_errors_total"
    assert f"`{name}`" in section, section
    for text in (README, REASONS):
        assert "Every failure is counted in `sidecar_handshake_errors_total" not in text
