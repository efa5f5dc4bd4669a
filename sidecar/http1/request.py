"""A request head, as llhttp reported it: how its body is framed, whether its connection
stays open, what the app receives, and why a head is refused.

llhttp has already refused most malformed heads (invalid field names, bare CR, obs-fold,
a field name with whitespace before its colon, Content-Length with Transfer-Encoding,
a repeated or invalid Content-Length, an invalid chunk size, an unknown method). The
checks here cover what it tolerates and a proxy must not pass on:

- any Transfer-Encoding other than exactly `chunked` (`gzip, chunked` included: the app
  might decode it differently), Transfer-Encoding in HTTP/1.0, Transfer-Encoding twice;
- HTTP versions other than 1.0 and 1.1 (llhttp reads `HTTP/2.0` and HTTP/0.9 lines);
- request targets other than origin-form (`/path?query`): absolute-form, `*`, CONNECT's
  authority-form, a fragment;
- an HTTP/1.1 request without exactly one Host, an HTTP/1.0 one with several;
- a Connection field naming Host, Content-Length or Transfer-Encoding (a proxy would drop
  them as hop-by-hop and desynchronize the app);
- an Upgrade other than `websocket` (an `h2c` upgrade would carry requests the policy
  never sees), or an upgrade request with a body.

What the app receives: the request line with the normalized path (path.py), the
caller's fields minus the hop-by-hop ones (Connection, Keep-Alive, Proxy-Connection,
TE, Upgrade, and any field the caller's Connection names) and minus every
`x-forwarded-client-cert` the caller sent, then ours. The body keeps its framing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

from sidecar.http1.path import SHAPE, normalize


class Framing(IntEnum):
    """How a message's body ends."""

    NONE = 0  # no body
    LENGTH = 1  # Content-Length bytes
    CHUNKED = 2  # chunked transfer coding
    CLOSE = 3  # responses only: the body runs until the app closes


# Not frozen (one is made per message, and frozen fields cost) and without slots: CPython
# 3.13 specializes making an instance of a class without __slots__ (about 1k instructions
# less a request, measured under callgrind).
@dataclass
class RequestHead:
    method: str
    path: str  # normalized: what the policy judges and the app receives
    forwarded: bytes  # the head as the app receives it, XFCC included, CRLF-terminated
    framing: Framing
    length: int  # with LENGTH
    keep_alive: bool  # the caller lets the connection carry another request
    upgrade: bool  # a WebSocket upgrade: after a 101 the connection is a tunnel
    http10: bool

    @property
    def has_body(self) -> bool:
        return self.framing is Framing.CHUNKED or self.length > 0


# What each special field is, by its lowercase name; every other field is forwarded.
_HOST, _LENGTH, _CODING, _CONNECTION, _UPGRADE, _DROP = range(6)
_SPECIAL = {
    b"host": _HOST, b"content-length": _LENGTH, b"transfer-encoding": _CODING,
    b"connection": _CONNECTION, b"upgrade": _UPGRADE,
    # Hop-by-hop (RFC 9110 7.6.1), or ours alone to set:
    b"keep-alive": _DROP, b"proxy-connection": _DROP, b"te": _DROP,
    b"x-forwarded-client-cert": _DROP,
}
# Fields a Connection token must not name: dropping them would change the framing or
# the target the app reads.
_FRAMING_FIELDS = frozenset({b"host", b"content-length", b"transfer-encoding"})
_VERSIONS = {"1.1": b" HTTP/1.1\r\n", "1.0": b" HTTP/1.0\r\n"}
_CRLF = b"\r\n"
_COLON = b": "
_OWS = b" \t"
# The special fields' names in the lowercased field block (each line after a "\n").
_SPECIAL_NAMES = re.compile(
    rb"\n(content-length|transfer-encoding|connection|upgrade|keep-alive|proxy-connection|"
    rb"te|x-forwarded-client-cert):")
# A method (one of llhttp's names: a few dozen) and the space after it, encoded once.
_METHOD_BYTES: dict[str, bytes] = {}
_LENGTH_VALUE = re.compile(rb"\ncontent-length:[ \t]*([0-9]+)")


def lines(fields: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Fields as `examine` takes them: name, `: `, value, CRLF, one after the other."""
    return [part for name, value in fields for part in (name, _COLON, value, _CRLF)]


def examine(method: str, target: bytes, version: str, parts: list[bytes], upgrade: bool,
            xfcc: bytes, max_bytes: int = 64 * 1024,
            max_fields: int = 100) -> RequestHead | str:
    """The request to forward, or why it is refused (a str, answered 400). `parts`: the
    fields as `lines` lays them out (the parser's callback appends them so, and one join
    makes the block of field lines); `upgrade` is llhttp's view (Connection: upgrade with
    an Upgrade field); `xfcc` our whole field line; `max_bytes` and `max_fields` bound the
    head (the request line and the fields, each as `name: value` CRLF). Never raises."""
    return Examiner(xfcc, max_bytes, max_fields).examine(method, target, version, parts,
                                                         upgrade)


@dataclass(slots=True)
class _Fields:
    """What a head's field lines say, whatever its request line."""

    forwarded: bytes  # the fields the app receives, ours and the blank line included
    framing: Framing
    length: int
    keep_alive: bool
    upgrade: bool


# Field lines up to this size are kept after their request (Examiner): a held connection
# keeps at most about this much more.
KEPT_FIELDS_BYTES = 4096


class Examiner:
    """`examine` for one connection: its XFCC and limits, and the field lines of its last
    request kept with what they said, since a caller's requests on one connection mostly
    carry the same fields (the request line changes; it is judged every time)."""

    __slots__ = ("_fields", "_fields_key", "_max_bytes", "_max_fields", "_xfcc", "fields_bytes")

    def __init__(self, xfcc: bytes, max_bytes: int = 64 * 1024, max_fields: int = 100) -> None:
        self._xfcc = xfcc
        self._max_bytes = max_bytes
        self._max_fields = max_fields
        self._fields_key: tuple[str, str, bool, list[bytes]] | None = None
        self._fields: _Kept | None = None
        # The size of the last head's field lines as the caller sent them (those the app
        # never receives included): what a caller keeping `parts` keeps.
        self.fields_bytes = 0

    def examine(self, method: str, target: bytes, version: str, parts: list[bytes],
                upgrade: bool) -> RequestHead | str:
        """As the module's `examine`. `parts` is kept (to be compared with the next
        request's): it must not change afterwards."""
        key = (method, version, upgrade, parts)
        if key == self._fields_key:  # the last request's: its count and version were fine
            kept = self._fields
            assert kept is not None
        else:
            if len(parts) > 4 * self._max_fields:
                return f"the request has more than {self._max_fields} header fields"
            line_end = _VERSIONS.get(version)
            if line_end is None:  # (kept only with a version spoken here)
                return f"HTTP/{version} is not spoken here: only HTTP/1.1 and HTTP/1.0"
            kept = _kept(method, line_end, parts, version == "1.0", upgrade, self._xfcc,
                         self._max_bytes)
            if kept.size <= KEPT_FIELDS_BYTES:
                self._fields, self._fields_key = kept, key
        # The usual target, judged here rather than by _target, whose answer it gives
        # (tests/test_http_messages.py holds the two to agree): path.is_normal, inlined,
        # and a query without `#`; forwarded as it came. (A call costs as much as the test.)
        query = target.find(b"?")
        path = target if query < 0 else target[:query]
        shape = path.translate(SHAPE)
        if shape.isascii() and shape.find(b"//") < 0 and path.startswith(b"/") and (
                query < 0 or target.find(b"#", query) < 0):
            line = target
        else:
            judged = _target(method, target)
            if isinstance(judged, str):
                return judged
            path, line = judged
        self.fields_bytes = kept.size
        if len(target) > kept.room:
            return f"the request head is larger than {self._max_bytes} bytes"
        fields = kept.fields
        if isinstance(fields, str):
            return fields
        # (decode(): the path is ASCII, and the default codec is the cheaper call)
        return RequestHead(method, path.decode(), kept.start + line + kept.end,
                           fields.framing, fields.length, fields.keep_alive, fields.upgrade,
                           kept.http10)


@dataclass(slots=True)
class _Kept:
    """A head's request line but its target, and its field lines: what `Examiner` keeps."""

    size: int  # the field lines' size as the caller sent them
    fields: _Fields | str  # what they say, or why they are refused
    start: bytes  # the method and a space
    end: bytes  # the line's version and CRLF, and `fields.forwarded` (b"" if refused)
    http10: bool
    room: int  # the longest target that keeps the head within the examiner's max_bytes


def _kept(method: str, line_end: bytes, parts: list[bytes], http10: bool, upgrade: bool,
          xfcc: bytes, max_bytes: int) -> _Kept:
    size, fields = _fields(method, parts, http10, upgrade, xfcc)
    start = _METHOD_BYTES.get(method)
    if start is None:
        start = _METHOD_BYTES[method] = method.encode("ascii") + b" "
    return _Kept(size, fields, start,
                 line_end + fields.forwarded if isinstance(fields, _Fields) else b"", http10,
                 # The head's bound: method, target, 11 bytes and the field lines.
                 max_bytes - len(method) - 11 - size)


def _target(method: str, target: bytes) -> tuple[bytes, bytes] | str:
    """The normalized path and the target the app receives (that path and the query as
    the caller sent it), or why the target is refused."""
    if not target.startswith(b"/"):
        if method == "CONNECT":
            return "CONNECT is not forwarded: this is not a forward proxy"
        if target == b"*":
            return "the asterisk-form target (*) is not forwarded"
        return "only origin-form request targets (/path?query) are forwarded"
    raw_path, question, query = target.partition(b"?")
    if query.find(b"#") >= 0:  # (not `in`: see path.py)
        return "the request target holds a fragment (#)"
    path = normalize(raw_path)
    if isinstance(path, str):
        return path
    return path, path + question + query


def _fields(method: str, parts: list[bytes], http10: bool, upgrade: bool,
            xfcc: bytes) -> tuple[int, _Fields | str]:
    """The field lines' size (for the head's bound) and what they say, or why they are
    refused."""
    # The field lines, joined in C: most requests are decided by searching this block
    # once, and forwarded with it as it is.
    block = b"".join(parts)
    low = b"\n" + block.lower()
    special = _SPECIAL_NAMES.findall(low)
    if upgrade or (special and special != [b"content-length"]):
        return len(block), _examine_fields(
            method, list(zip(parts[::4], parts[2::4], strict=True)), upgrade, xfcc, http10)
    hosts = low.count(b"\nhost:")
    if hosts != 1 and (hosts or not http10):
        return len(block), "no Host field" if not hosts else "more than one Host field"
    length = 0
    if special:
        found = _LENGTH_VALUE.search(low)
        if found is None:  # not reached: llhttp let only digits through
            return len(block), "an invalid Content-Length"
        length = int(found.group(1))
    out = [block, b"Connection: close\r\n", xfcc, _CRLF] if http10 else [block, xfcc, _CRLF]
    return len(block), _Fields(b"".join(out), Framing.LENGTH if length else Framing.NONE,
                               length, not http10, False)


def _examine_fields(method: str, fields: list[tuple[bytes, bytes]], upgrade: bool,
                    xfcc: bytes, http10: bool) -> _Fields | str:
    """_fields, field by field: for heads with framing or hop-by-hop fields besides a
    Content-Length (chunked bodies, Connection, Upgrade, a forged XFCC, ...)."""
    parts: list[bytes] = []
    hosts = lengths = codings = 0
    length = 0
    coding = b""
    tokens: list[bytes] = []
    upgrade_to = b""
    named = False  # the Connection field names fields besides close/keep-alive/upgrade
    for name, value in fields:
        kind = _SPECIAL.get(name.lower())
        if kind is None:
            parts += (name, b": ", value, _CRLF)
            continue
        if kind == _HOST:
            hosts += 1
            parts += (name, b": ", value, _CRLF)
        elif kind == _LENGTH:
            lengths += 1
            length = int(value.strip(_OWS))  # llhttp let only digits through
            parts += (name, b": ", value, _CRLF)
        elif kind == _CODING:
            codings += 1
            coding = value.strip(_OWS).lower()
            parts += (name, b": ", value, _CRLF)
        elif kind == _CONNECTION:
            for token in value.lower().split(b","):
                token = token.strip(_OWS)
                if token and token not in (b"close", b"keep-alive", b"upgrade"):
                    named = True
                tokens.append(token)
        elif kind == _UPGRADE:
            upgrade_to = value.strip(_OWS)
    refusal = _framing_refusal(http10, hosts, lengths, codings, coding, length)
    if refusal is not None:
        return refusal
    framing = Framing.CHUNKED if codings else Framing.LENGTH if length else Framing.NONE
    if named:
        dropped = {t for t in tokens if t not in (b"close", b"keep-alive", b"upgrade")}
        if dropped & _FRAMING_FIELDS:
            return "the Connection field names Host, Content-Length or Transfer-Encoding"
        parts = _without(parts, dropped)
    if upgrade:
        if upgrade_to.lower() != b"websocket":
            return "only WebSocket upgrades are passed through"
        if framing is not Framing.NONE:
            return "an upgrade request must not have a body"
        if method != "GET":
            return "a WebSocket upgrade is a GET"
        parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade_to, _CRLF)
    keep_alive = not http10 and b"close" not in tokens
    if not keep_alive and not upgrade:
        parts.append(b"Connection: close\r\n")
    parts += (xfcc, _CRLF)
    return _Fields(b"".join(parts), framing, length, keep_alive, upgrade)


def _framing_refusal(http10: bool, hosts: int, lengths: int, codings: int, coding: bytes,
                     length: int) -> str | None:
    if hosts != 1 and (hosts or not http10):
        return "no Host field" if not hosts else "more than one Host field"
    if codings:
        if http10:
            return "Transfer-Encoding in an HTTP/1.0 request"
        if codings > 1 or coding != b"chunked":
            return "a Transfer-Encoding other than chunked"
        if lengths:
            return "both Content-Length and Transfer-Encoding"
    if lengths > 1:
        return "more than one Content-Length"
    return None


def _without(parts: list[bytes], dropped: set[bytes]) -> list[bytes]:
    """The forwarded field parts minus the fields `dropped` names (a field is four parts:
    name, ": ", value, CRLF)."""
    out: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i].lower() not in dropped:
            out += parts[i:i + 4]
    return out
