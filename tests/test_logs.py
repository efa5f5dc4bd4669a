"""Log lines: a peer's strings cannot make them long.

A peer controls some fields (its SPIFFE ID, names in its chain, error words quoting its
certificate). Every line goes through logs.access() or logs.event(); both formats are
written to a real stream here and read back.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from sidecar.observe import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream for logs.setup(); the logging state before it comes back afterwards."""
    root = logging.getLogger("sidecar")
    saved = (root.handlers[:], root.level, root.propagate, logs._direct)
    yield io.StringIO()
    root.handlers[:], root.level, root.propagate, logs._direct = saved


def test_a_400_san_detail_and_a_long_peer_id_are_cut_in_the_access_line(
    stream: io.StringIO,
) -> None:
    logs.setup("info", "json", stream)
    detail = "the certificate has 400 URI SANs (" + ", ".join(
        repr(f"spiffe://example.org/ns/web/sa/s{i:03d}") for i in range(400)) + ")"
    peer_id = "spiffe://example.org/" + "a" * 10_000
    logs.access({"peer_id": peer_id, "detail": detail, "bytes_to_app": 0}, failed=True)
    line = stream.getvalue()
    assert len(line) < logs.MAX_FIELD_CHARS + logs.MAX_DETAIL_CHARS + 512, len(line)
    fields = json.loads(line)
    assert fields["detail"].startswith(detail[: logs.MAX_DETAIL_CHARS])
    assert fields["detail"].endswith(f"... ({len(detail)} chars)")
    assert fields["peer_id"].endswith(f"... ({len(peer_id)} chars)")
    assert fields["bytes_to_app"] == 0


def test_a_valid_spiffe_id_of_2048_bytes_is_never_cut(stream: io.StringIO) -> None:
    logs.setup("info", "json", stream)
    longest = "spiffe://example.org/" + "a" * (2048 - len("spiffe://example.org/"))
    logs.access({"peer_id": longest, "detail": None}, failed=False)
    assert json.loads(stream.getvalue())["peer_id"] == longest


def test_text_format_and_events_are_bounded_too(stream: io.StringIO) -> None:
    logs.setup("info", "text", stream)
    logs.access({"detail": "x" * 100_000}, failed=True)
    logs.event(logging.WARNING, "something", sni="s" * 100_000)
    first, second = stream.getvalue().splitlines()
    assert len(first) < logs.MAX_DETAIL_CHARS + 200
    assert len(second) < logs.MAX_FIELD_CHARS + 200


def test_short_fields_pass_as_they_are() -> None:
    fields = {"detail": "unknown ca", "peer_id": "spiffe://example.org/x", "n": 3}
    assert logs.bounded(fields) is fields


def test_request_lines_are_the_json_encoders_bytes_whatever_changes_between_them(
    stream: io.StringIO,
) -> None:
    """RequestLog formats a line from parts it keeps between requests: each line is what
    the general encoder writes for the same fields, as each field changes in turn."""
    logs.setup("info", "json", stream)
    conn = {"id": 7, "listener": "api", "peer_id": "spiffe://example.org/a"}
    rl = logs.RequestLog(conn)
    calls = [("GET", "/a", 200, "allow", "frontend", 0, 4, 0.000123),
             ("GET", "/a", 200, "allow", "frontend", 0, 4, 0.000123),  # all the same
             ("GET", "/b", 200, "allow", "frontend", 0, 4, 0.25),
             ("GET", "/b", 404, "allow", "frontend", 3, 12_345, 1.5),
             ("POST", "/b", 404, "allow", "frontend", 3, 0, 0.0),
             ("POST", "/b", 403, "deny", "no-admin", 3, 0, 0.002),
             ("POST", "/b", 403, "deny", None, 3, 0, 0.002),
             ("POST", "/b", None, "none", None, 0, 0, 0.002),
             ("GET", "/a", 200, "allow", "frontend", 0, 4, 0.000123)]  # the first again
    for call in calls:
        rl.write(*call)
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(calls)
    for line, (method, path, status, decision, rule, n_in, n_out, seconds) in zip(
            lines, calls, strict=True):
        fields = json.loads(line)
        expected = {"ts": fields["ts"], "level": "info", "logger": "sidecar.access",
                    "msg": "request", **conn, "method": method, "path": path,
                    "status": status, "decision": decision, "rule": rule, "bytes_in": n_in,
                    "bytes_out": n_out, "duration_ms": 0}
        # The duration is the nearest whole microsecond, written with three decimals: the
        # value the general path writes (round(seconds * 1000, 3)); 0.000123 s once came
        # out 0.122 (a truncated 122.99999 us).
        us = round(seconds * 1_000_000)
        assert line == json.dumps(expected, separators=(",", ":"))[:-2] + \
            f"{us // 1000}.{us % 1000:03d}}}"
        assert fields["duration_ms"] == round(seconds * 1000, 3), line
