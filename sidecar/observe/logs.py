"""Logging: one JSON (or key=value text) line per event, one access-log line per connection.

Private keys never reach a log: nothing here formats key material, and the identity
snapshot keeps its key out of its repr.

A peer controls some of what a line holds (its SPIFFE ID, names in its chain, error words
that quote its certificate): every string field is cut at a bound here, in the one place
all lines pass, so no certificate can make a line long (a 400-URI-SAN one once wrote
15.7 KB per connection).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import time
from typing import Any

# A valid SPIFFE ID (at most 2048 bytes) is never cut; a detail line is a sentence or two,
# and quotes of peer values in it are already short (spiffe.quoted).
MAX_FIELD_CHARS = 2048
MAX_DETAIL_CHARS = 512

ACCESS = logging.getLogger("sidecar.access")
log = logging.getLogger("sidecar")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(static)
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
        line = f"{ts} {record.levelname.lower():7} {record.getMessage()}"
        if static:
            line += " " + " ".join(f"{k}={v}" for k, v in static.items())
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items() if v is not None)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if (" " in s or not s) else s


def setup(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    direct(out if fmt == "json" else None)
    root = logging.getLogger("sidecar")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


_direct: Any = None  # the stream of the JSON handler setup() installed, for access()
_fd = -1  # a descriptor of its file, when lines may be written to it directly (direct())
static: dict[str, Any] = {}  # fields on every line, e.g. {"worker": 1} in a worker process
_ASCII = "".join(map(chr, range(32, 127))) + "\n"


def direct(stream: Any) -> None:
    """Write this module's own lines (`_emit`) to `stream` (None: through logging), with
    one os.write each to a descriptor of its file where that keeps the bytes and their
    order, else through the stream. A line through stderr's line-buffered TextIOWrapper
    was ~2k instructions (the text layer, the buffered layer, the flush), a tenth of an
    http request's logging.

    The order holds: the logging handler's lines go through the stream, but
    StreamHandler flushes it after each record, so it never holds a line when one is
    written beside it; and every line this module writes itself goes through `_emit`.
    The descriptor is a duplicate: the same open file (one offset, so writes through
    either stay in order), and never another file that reused the number after the
    stream was closed. The lines are ASCII (JSON with non-ASCII escaped, the request
    fields plain: see RequestLog), so their UTF-8 is what any ASCII-compatible encoding
    writes; a stream in another encoding, or without a descriptor (a StringIO), is
    written through."""
    global _direct, _fd
    if _fd >= 0:
        os.close(_fd)
    _direct, _fd = stream, -1
    try:
        fd = stream.fileno()
        encoding = stream.encoding
        if _ASCII.encode(encoding) != _ASCII.encode():
            return
    except (AttributeError, OSError, ValueError, LookupError):  # also UnsupportedOperation
        return
    stream.flush()  # anything written before now goes first
    _fd = os.dup(fd)


def _emit(line: str) -> None:
    """One line this module formatted (ending in a newline), to setup()'s stream."""
    if _fd < 0:
        _direct.write(line)
        return
    data = line.encode()
    done = os.write(_fd, data)
    if done < len(data):
        _emit_rest(data, done)


def _emit_rest(data: bytes, done: int) -> None:
    """What a short write left (a pipe that was nearly full, a signal)."""
    while done < len(data):
        done += os.write(_fd, data[done:])


def access(fields: dict[str, Any], *, failed: bool, msg: str = "connection") -> None:
    """One access-log line: `msg` "connection" for a connection, "request" for a request
    on an http listener. In the usual JSON setup the line is built and written here:
    a LogRecord, a Formatter and datetime.isoformat per connection were a tenth of the
    Python time of a resumed connection. Anything else (text format, an extra handler
    such as the demo's) goes through logging."""
    level = logging.WARNING if failed else logging.INFO
    if not ACCESS.isEnabledFor(level):
        return
    fields = bounded(fields)
    if _direct is not None and len(log.handlers) == 1:
        line = {"ts": _now(),
                "level": "warning" if failed else "info", "logger": ACCESS.name,
                "msg": msg, **static, **fields}
        _emit(_ENCODER.encode(line) + "\n")
        return
    ACCESS.log(level, msg, extra={"fields": fields})


class RequestLog:
    """The access-log lines (msg "request") of one http connection's requests.

    A request line is written for every request, so in the usual JSON setup it is
    formatted here from parts: the connection's fields are encoded once, the timestamp
    once a second, and the per-request values need no escaping: a method is one of
    llhttp's names, a path is normalized to RFC 3986 path characters (http1/path.py), a
    rule name is a plain token (policy/reader.py), and the rest are numbers. A line with
    free text (`detail`) goes through `access`, as does every line in any other setup.
    json.dumps of the whole line was a tenth of a request's instructions."""

    __slots__ = ("_after", "_after_key", "_before", "_enabled", "_encoded", "_fields",
                 "_method")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields
        self._encoded = ""  # '"id":...,' made at the first line (after `static` is set)
        self._enabled = ACCESS.isEnabledFor(logging.INFO)  # levels are set once, at start
        # The line around the path, each part kept while what it holds stays the same
        # (a path is new on every request of many clients; the rest mostly repeats on a
        # connection): from "level" to the path's opening quote, for `_method`; from
        # the path's closing quote to "bytes_in", for `_after_key`.
        self._method: str | None = None
        self._before = ""
        self._after_key: tuple[int | None, str, str | None] | None = None
        self._after = ""

    def write(self, method: str | None, path: str | None, status: int | None,
              decision: str, rule: str | None, bytes_in: int, bytes_out: int,
              seconds: float, extra: dict[str, Any] | None = None) -> None:
        if _direct is None or extra or len(log.handlers) != 1 or method is None:
            fields = {**self._fields, "method": method, "path": path, "status": status,
                      "decision": decision, "rule": rule, "bytes_in": bytes_in,
                      "bytes_out": bytes_out, "duration_ms": round(seconds * 1000, 3)}
            if extra:
                fields.update(extra)
            access(fields, failed=False, msg="request")
            return
        if not self._enabled:
            return
        if method != self._method:
            self._method = method
            self._before = self._make_before(method)
        after = (status, decision, rule)
        if after != self._after_key:
            self._after_key = after
            rule_text = "null" if rule is None else f'"{rule}"'
            status_text = "null" if status is None else status
            self._after = (f'","status":{status_text},"decision":"{decision}",'
                           f'"rule":{rule_text},"bytes_in":')
        # Milliseconds with three decimals from whole microseconds, without a float.
        # round(), without the builtin's lookup of __round__ (~700 instructions); and
        # float constants throughout: a float times an int is not the interpreter's
        # fast path (~600 instructions each), and gives the same value.
        us = (seconds * 1e6).__round__()
        # The timestamp as _now() makes it, inline: this runs for every request.
        now = time.time()
        if not _line_second <= now < _line_end:
            _turn(now)
        # Numbers below 1000 from a table: formatting an int is ~600 instructions (and
        # these are never negative: byte counts, a duration on a monotonic clock).
        ms = us // 1000
        line = (f'{_line_start}{_MS_TS[int((now - _line_second) * 1000.0)]}{self._before}'
                f'{path}{self._after}{_DECIMAL[bytes_in] if bytes_in < 1000 else bytes_in}'
                f',"bytes_out":{_DECIMAL[bytes_out] if bytes_out < 1000 else bytes_out}'
                f',"duration_ms":{_DECIMAL[ms] if ms < 1000 else ms}{_MS_END[us % 1000]}')
        # _emit, inline (a call is ~700 instructions).
        if _fd < 0:
            _direct.write(line)
        else:
            data = line.encode()
            done = os.write(_fd, data)
            if done < len(data):
                _emit_rest(data, done)

    def _make_before(self, method: str) -> str:
        encoded = self._encoded
        if not encoded:
            both = {**static, **bounded(self._fields)}
            encoded = self._encoded = json.dumps(both, separators=(",", ":"))[1:-1] + ","
        return (f'"level":"info","logger":"sidecar.access","msg":"request",'
                f'{encoded}"method":"{method}","path":"')


# The second every line's timestamp is in, formatted once a second (_turn); its
# milliseconds are taken from a float within the second (no large integers), one way for
# every kind of line, so lines written one after the other never go back in time.
_line_second = -2.0  # the second, as a float
_line_end = -1.0  # and the next one
_line_text = ""  # the time to the second
_line_start = ""  # '{"ts":"' and _line_text: a request line's first piece
# A request line's pieces around the milliseconds: one piece each instead of three.
_MS_TS = [f'.{i:03d}Z",' for i in range(1000)]
_MS_END = [f".{i:03d}}}\n" for i in range(1000)]
_DECIMAL = [str(i) for i in range(1000)]  # str(i), for the small numbers of a line


def _turn(now: float) -> None:
    """The second of `now` becomes the one timestamps are written in."""
    global _line_second, _line_end, _line_text, _line_start
    second = int(now)
    _line_second = float(second)
    _line_end = _line_second + 1.0
    _line_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    _line_start = '{"ts":"' + _line_text


def _now() -> str:
    """The access log's timestamp (a connection line's; a request line's is made alike
    in RequestLog.write)."""
    now = time.time()
    if not _line_second <= now < _line_end:
        _turn(now)
    return _line_text + _MS_TS[int((now - _line_second) * 1000.0)][:-2]


# json.dumps with options builds an encoder per call; one, kept, does the same work.
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))


def event(level: int, msg: str, **fields: Any) -> None:
    log.log(level, msg, extra={"fields": bounded(fields)})


def bounded(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` with every string cut to its bound (the same dict when none is over)."""
    over = [k for k, v in fields.items() if type(v) is str and len(v) > _bound(k)]
    if not over:
        return fields
    out = dict(fields)
    for k in over:
        out[k] = cut(out[k], _bound(k))
    return out


def cut(value: str, limit: int) -> str:
    """`value`, or its first `limit` characters and how long it was."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value)} chars)"


def _bound(key: str) -> int:
    return MAX_DETAIL_CHARS if key == "detail" else MAX_FIELD_CHARS
