"""An app's response head: where its body ends, and the head the caller receives.

The app is ours (it sits behind the sidecar), but its responses are still parsed (by
llhttp) for their framing, since the next request may only go out once a response has
ended:

- no body: a response to HEAD, a 204 or a 304 (and every 1xx, which llhttp ends itself);
- `Transfer-Encoding: chunked`, as the last and only coding; any other coding is refused
  (502), since where the body ends could not be told;
- `Content-Length`;
- neither: the body runs until the app closes, and so the caller's connection closes
  after it.

A response goes to the caller as the app wrote it, head and body, without re-encoding:
llhttp has validated the head (its grammar is strict), and only when the head must change
is it rebuilt from its own lines: when it holds hop-by-hop fields (Connection,
Keep-Alive, Proxy-Connection: whether the caller's connection stays open is the
sidecar's to say, not the app's), or when the sidecar closes the caller's connection
after it and says so (`Connection: close`). A 101 keeps its Connection and Upgrade
fields: it answers a WebSocket upgrade.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.http1.request import Framing

_CRLF = b"\r\n"
_END = b"\r\n\r\n"
_CLOSE = b"Connection: close\r\n"
# In the lowercased head, each field line after a "\n".
_CODING = re.compile(rb"\ntransfer-encoding:[ \t]*([^\r]*?)[ \t]*\r")


@dataclass(slots=True)  # not frozen: one is made per response, and frozen fields cost
class ResponseHead:
    status: int
    forwarded: bytes | None  # the head rebuilt, or None: forward the app's bytes as they are
    framing: Framing
    app_closes: bool  # the app closes its connection after this response
    closes: bool  # the caller's connection closes after this response


def examine(status: int, head: bytes, *, head_request: bool, close: bool,
            keep_alive: bool) -> ResponseHead | str:
    """A final response's head, as the app sent it (status line to the blank line), or
    why it is refused (a str: the caller gets a 502). `head_request`: it answers a HEAD;
    `close`: the caller's connection closes after it whatever the app says; `keep_alive`:
    llhttp's view of the app's connection. Never raises."""
    low = head.lower()
    if head_request or status in (204, 304):
        framing = Framing.NONE
    elif low.find(b"\ntransfer-encoding:") >= 0:  # find, not `in`: see path.py
        found = _CODING.findall(low)
        if found != [b"chunked"]:
            return "the app's response has a Transfer-Encoding other than chunked"
        framing = Framing.CHUNKED
    elif low.find(b"\ncontent-length:") >= 0:
        framing = Framing.LENGTH
    else:
        framing = Framing.CLOSE
    app_closes = not keep_alive  # llhttp's: HTTP/1.0, or a Connection: close
    # The caller's connection ends with the app's: the caller reads that from the app's
    # own head (its Connection: close, or HTTP/1.0).
    closes = close or framing is Framing.CLOSE or app_closes
    forwarded = None
    if (closes and not app_closes) or low.find(b"\nconnection:") >= 0 or \
            low.find(b"\nkeep-alive:") >= 0 or low.find(b"\nproxy-connection:") >= 0:
        forwarded = _rebuilt(head, low, closes)
    return ResponseHead(status, forwarded, framing, app_closes, closes)


def _rebuilt(head: bytes, low: bytes, closes: bool) -> bytes:
    """The head without hop-by-hop fields, and with `Connection: close` when the
    caller's connection closes after it. Lines are split as llhttp validated them."""
    lines = head.split(_CRLF)
    lowered = low.split(_CRLF)
    kept = [lines[0]]
    for line, lower in zip(lines[1:], lowered[1:], strict=True):
        if lower and not lower.startswith((b"connection:", b"keep-alive:",
                                           b"proxy-connection:")):
            kept.append(line)
    if closes:
        kept.append(_CLOSE[:-2])
    return _CRLF.join(kept) + _END


def head_end(data: bytes | bytearray, start: int = 0) -> int:
    """Where the head that begins at `start` ends (just past its blank line), or -1."""
    at = data.find(_END, start)
    return -1 if at < 0 else at + 4
