"""The request path as the policy judges it and the app receives it.

One normalized path serves both: the sidecar decides on it and forwards it in place of
the caller's (as Envoy does with `normalize_path`), so a rule and the app's router can
never read two different paths out of one request. Normalizing (RFC 3986 6.2.2):

- percent-encoded unreserved characters are decoded (`%7E` -> `~`, `%2e` -> `.`), and
  the hex digits of every other escape are written uppercase (`%3a` -> `%3A`);
- dot segments are removed after that decoding (RFC 3986 5.2.4), so `/api/../admin` and
  `/api/%2e%2e/admin` are both `/admin`; `..` above the root stays at the root;
- empty segments are merged (`//admin` is `/admin`), as nginx does by default: many
  routers merge them, and a rule on `/admin/*` must not be passed by `//admin/x`.

Refused (400), because an app may read them as something the policy did not judge:

- an encoded slash or backslash (`%2F`, `%5C`): some routers decode them into
  separators, others do not; an encoded NUL (`%00`);
- a literal backslash (Windows-style servers treat it as `/`), a `#` (a fragment is
  never sent), bytes outside RFC 3986's path characters (llhttp refuses most first);
- a `.` or `..` segment carrying parameters (`/..;/admin`): Tomcat and others strip
  `;...` from a segment and then resolve the `..`;
- a `%` not followed by two hex digits.

The query (after `?`) is forwarded as the caller sent it and is not judged.
"""

from __future__ import annotations

import re

# A path that is already normal: segments of path characters without `%`, none empty
# (but the last, for a trailing slash) and none `.` or `..`. Most paths are; for them
# normalizing is this one match.
_NORMAL = re.compile(
    rb"/(?:(?!\.\.?[/;])[A-Za-z0-9._~!$&'()*+,;=:@-]+/)*"
    rb"(?:(?!\.\.?(?:;|\Z))[A-Za-z0-9._~!$&'()*+,;=:@-]+)?"
)
# Every byte a path may hold before decoding: RFC 3986 pchar, `/`, and `%` escapes.
_PATH_BYTES = re.compile(rb"[A-Za-z0-9._~!$&'()*+,;=:@/%-]*")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# The path characters but `%`: what a normal path is made of.
_PLAIN = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/"
# A path's shape (`is_normal`): each byte but those of _PLAIN made 0x80, each `.` a `/`.
# (A table, not translate's `delete` argument: that one builds its table on every call.)
SHAPE = bytes(0x2F if b == 0x2E else b if b in _PLAIN else 0x80 for b in range(256))
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Escapes that are refused rather than kept: each decodes to a byte some apps take for
# a separator or an end.
_REFUSED_ESCAPES = {0x2F: "an encoded slash (%2F)", 0x5C: "an encoded backslash (%5C)",
                    0x00: "an encoded NUL (%00)"}


def is_normal(path: bytes) -> bool:
    """Whether `normalize` returns `path` as it is, by a quick test that most paths pass:
    it starts with `/` and its shape (SHAPE) is ASCII without `//`, so it is made of path
    characters but `%` (no escape), and no segment is empty or starts or ends with a dot.
    Stricter than normal (`/a..b`, `/.well-known`: the long way, out as they went in), for
    three C-level calls. request.py inlines it on its usual path."""
    # (find, not `in`: CPython's bytes.__contains__ first tries the needle as an int, and
    # raises and clears a TypeError doing so, ~3k instructions each.)
    shape = path.translate(SHAPE)
    return shape.isascii() and shape.find(b"//") < 0 and path.startswith(b"/")


def normalize(path: bytes) -> bytes | str:
    """The normalized form of an origin-form path (no query, starting with `/`), or why
    it is refused (a str). Never raises."""
    if is_normal(path):
        return path
    return _normalize_fully(path)


def _normalize_fully(path: bytes) -> bytes | str:
    """`normalize` without its quick test: what that test must agree with."""
    if _NORMAL.fullmatch(path) is not None:
        return path
    if _PATH_BYTES.fullmatch(path) is None:
        return _odd_byte(path)
    if path.find(b"%") >= 0:
        decoded = _decode(path)
        if isinstance(decoded, str):
            return decoded
        path = decoded
    return _resolve(path)


def _odd_byte(path: bytes) -> str:
    for byte in path:
        if _PATH_BYTES.fullmatch(bytes((byte,))) is None:
            if byte == 0x5C:
                return "the path holds a backslash"
            if byte == 0x23:
                return "the request target holds a fragment (#)"
            return f"the path holds a byte that must be percent-encoded (0x{byte:02x})"
    return "the path holds a byte that must be percent-encoded"  # not reached


def _decode(path: bytes) -> bytes | str:
    """Decode unreserved escapes and uppercase the others; a str when one is refused."""
    parts = path.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            return "the path holds a % that is not followed by two hex digits"
        value = int(part[:2], 16)
        refused = _REFUSED_ESCAPES.get(value)
        if refused is not None:
            return f"the path holds {refused}"
        if value in _UNRESERVED:
            out.append(bytes((value,)))
        else:
            out.append(b"%" + part[:2].upper())
        out.append(part[2:])
    return b"".join(out)


def _resolve(path: bytes) -> bytes | str:
    """Remove dot segments (RFC 3986 5.2.4) and merge empty ones."""
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    trailing = False
    for segment in segments:
        trailing = False
        if segment == b"..":
            if out:
                out.pop()
            trailing = True
        elif segment == b"." or not segment:
            trailing = True
        else:
            head = segment.split(b";", 1)[0]
            if head in (b".", b".."):
                return "the path holds a dot segment with parameters (like /..;/)"
            out.append(segment)
    if not out:
        return b"/"
    return b"/" + b"/".join(out) + (b"/" if trailing else b"")
