"""Log lines: a peer's strings cannot make them long.

A peer controls some fields (its SPIFFE ID, names in its chain, error words quoting its
certificate). Every line goes through logs.access() or logs.event(); both formats are
written to a real stream here and read back.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.observe import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream for logs.setup(); the logging state before it comes back afterwards."""
    root = logging.getLogger("sidecar")
    saved = (root.handlers[:], root.level, root.propagate)
    saved_direct = logs._direct
    yield io.StringIO()
    root.handlers[:], root.level, root.propagate = saved
    logs.direct(saved_direct)  # and the test's duplicate descriptor closed


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


@pytest.fixture(params=["stringio", "file"])
def sink(request: pytest.FixtureRequest, stream: io.StringIO,
         tmp_path: Path) -> Iterator[tuple[Any, Callable[[], str]]]:
    """A stream for logs.setup() and how to read what was written: a StringIO (lines
    written through it) or a real file (lines written to its descriptor, beside it)."""
    if request.param == "stringio":
        yield stream, stream.getvalue
        return
    path = tmp_path / "log"
    with open(path, "w", encoding="utf-8") as f:
        yield f, lambda: (f.flush(), path.read_text())[1]


# Each field changes in turn (and paths change with the rest standing still, as when a
# client walks a tree), then the first again; numbers past the tables of small ones.
_CALLS = [("GET", "/a", 200, "allow", "frontend", 0, 4, 0.000123),
          ("GET", "/a", 200, "allow", "frontend", 0, 4, 0.000123),  # all the same
          ("GET", "/b", 200, "allow", "frontend", 0, 4, 0.25),
          ("GET", "/c/d", 200, "allow", "frontend", 0, 4, 0.25),
          ("GET", "/b", 404, "allow", "frontend", 3, 12_345, 1.5),
          ("POST", "/b", 404, "allow", "frontend", 3, 0, 0.0),
          ("POST", "/e", 404, "allow", "frontend", 999, 1000, 0.9995),
          ("POST", "/b", 403, "deny", "no-admin", 3, 0, 0.002),
          ("PUT", "/b", 403, "deny", "no-admin", 3, 0, 0.002),
          ("POST", "/b", 403, "deny", None, 3, 0, 0.002),
          ("POST", "/b", None, "none", None, 0, 0, 0.002),
          ("GET", "/f", 200, "allow", "frontend", 0, 4, 0.0000004),
          ("GET", "/h", 200, "allow", "frontend", 1_000_000, 4, 12.3456789),
          ("GET", "/a", 200, "allow", "frontend", 0, 4, 0.000123)]  # the first again


def test_request_lines_are_the_json_encoders_bytes_whatever_changes_between_them(
    sink: tuple[Any, Callable[[], str]],
) -> None:
    """RequestLog formats a line from parts it keeps between requests: each line is what
    the general encoder writes for the same fields, as each field changes in turn."""
    out, read = sink
    logs.setup("info", "json", out)
    assert (logs._fd >= 0) == (not isinstance(out, io.StringIO))  # both ways tested
    conn = {"id": 7, "listener": "api", "peer_id": "spiffe://example.org/a"}
    rl = logs.RequestLog(conn)
    for call in _CALLS:
        rl.write(*call)
    lines = read().splitlines()
    assert len(lines) == len(_CALLS)
    for line, (method, path, status, decision, rule, n_in, n_out, seconds) in zip(
            lines, _CALLS, strict=True):
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


def test_lines_written_beside_the_stream_keep_their_order_with_the_handlers(
    stream: io.StringIO, tmp_path: Path,
) -> None:
    """Request and connection lines go to the file's descriptor, the handler's lines
    through the stream (block-buffered here: a file, not a terminal): they must come out
    in the order they were written, the connection line after its requests."""
    path = tmp_path / "log"
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"msg":"before setup"}\n')  # left in the stream's buffer
        logs.setup("info", "json", f)
        assert logs._fd >= 0
        rl = logs.RequestLog({"id": 1})
        rl.write("GET", "/1", 200, "allow", "r", 0, 4, 0.001)
        logs.event(logging.INFO, "between")
        rl.write("GET", "/2", 200, "allow", "r", 0, 4, 0.001)
        logs.access({"id": 1}, failed=False)
        rl = logs.RequestLog({"id": 2})
        rl.write("GET", "/3", 200, "allow", "r", 0, 4, 0.001)
        logs.access({"id": 2}, failed=True)
        rl.write("GET", "/4", 200, "allow", "r", 0, 4, 0.001)  # after a connection line
    got = [(d.get("msg"), d.get("path") or d.get("id"))
           for d in map(json.loads, path.read_text().splitlines())]
    assert got == [("before setup", None), ("request", "/1"), ("between", None),
                   ("request", "/2"), ("connection", 1), ("request", "/3"),
                   ("connection", 2), ("request", "/4")]


def test_a_stream_in_an_encoding_other_than_asciis_is_written_through(
    stream: io.StringIO, tmp_path: Path,
) -> None:
    path = tmp_path / "log"
    with open(path, "w", encoding="utf-16") as f:
        logs.setup("info", "json", f)
        assert logs._fd == -1
        logs.RequestLog({"id": 1}).write("GET", "/1", 200, "allow", "r", 0, 4, 0.001)
        logs.access({"id": 1}, failed=False)
    first, second = map(json.loads, path.read_text(encoding="utf-16").splitlines())
    assert (first["path"], second["msg"]) == ("/1", "connection")


def test_lines_never_reach_a_file_that_took_a_closed_streams_descriptor_number(
    stream: io.StringIO, tmp_path: Path,
) -> None:
    with open(tmp_path / "first", "w", encoding="utf-8") as first:
        logs.setup("info", "json", first)
        number = first.fileno()
    with open(tmp_path / "second", "w", encoding="utf-8") as second:
        assert second.fileno() == number  # the lowest free number, taken again
        logs.RequestLog({"id": 1}).write("GET", "/1", 200, "allow", "r", 0, 4, 0.001)
    assert (tmp_path / "second").read_text() == ""
    assert json.loads((tmp_path / "first").read_text())["path"] == "/1"


def test_a_connection_line_and_a_request_line_of_one_moment_carry_one_timestamp(
        stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both kinds of line take their milliseconds one way: at this moment the old
    connection-line clock (int(t * 1000)) said .534 and the request line .533, so a
    connection line could read later than the request line written after it."""
    logs.setup("info", "json", stream)
    monkeypatch.setattr(logs.time, "time", lambda: 1796660927.534)
    logs.RequestLog({"id": 1}).write("GET", "/1", 200, "allow", "r", 0, 4, 0.001)
    logs.access({"id": 1}, failed=False)
    request, connection = (json.loads(line) for line in stream.getvalue().splitlines())
    assert request["ts"] == connection["ts"] == "2026-12-07T16:28:47.533Z"
