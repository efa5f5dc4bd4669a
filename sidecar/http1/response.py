"""An app's response head: where its body ends, and the head the caller receives.

The app is ours (it sits behind the sidecar), but its responses are still parsed for
their framing, since the next request may only go out once a response has ended:

- no body: a response to HEAD, a 204 or a 304 (and every 1xx, which llhttp ends itself);
- `Transfer-Encoding: chunked`, as the last and only coding; any other coding is refused
  (502), since where the body ends could not be told;
- `Content-Length`;
- neither: the body runs until the app closes, and so the caller's connection closes
  after it (`Connection: close`).

The caller receives the app's status line as HTTP/1.1 and its fields minus the
hop-by-hop ones (Connection, Keep-Alive, Proxy-Connection): whether the caller's
connection stays open is the sidecar's to say, not the app's. A 101 keeps its Connection
and Upgrade fields: it answers a WebSocket upgrade.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.http1.request import Framing

_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
_OWS = b" \t"
_CRLF = b"\r\n"
_CLOSE = b"Connection: close\r\n"
_STATUS = {code: b"HTTP/1.1 %d " % code for code in range(100, 600)}


@dataclass(slots=True)  # not frozen: one is made per message, and frozen fields cost
class ResponseHead:
    status: int
    forwarded: bytes  # the head as the caller receives it, CRLF-terminated
    framing: Framing
    app_closes: bool  # the app closes its connection after this response
    closes: bool  # the caller's connection closes after this response


def examine(status: int, reason: bytes, fields: list[tuple[bytes, bytes]], *, head: bool,
            close: bool) -> ResponseHead | str:
    """A final or interim response head, or why it is refused (a str, answered 502).
    `head`: it answers a HEAD request; `close`: the caller's connection closes after it
    whatever the app says. Never raises."""
    first = _STATUS.get(status)
    if first is None:
        return f"the app answered with status {status}"
    parts = [first, reason, _CRLF]
    codings = 0
    coding = b""
    length = -1
    app_closes = False
    tunnel = status == 101
    for name, value in fields:
        lower = name.lower()
        if lower in _HOP:
            if lower == b"connection" and b"close" in value.lower():
                app_closes = True
            if not tunnel:
                continue
        elif lower == b"transfer-encoding":
            codings += 1
            coding = value.strip(_OWS).lower()
        elif lower == b"content-length":
            length = int(value.strip(_OWS))  # llhttp let only digits through, once
        parts += (name, b": ", value, _CRLF)
    if status < 200 or head or status in (204, 304):
        framing = Framing.NONE
    elif codings:
        if codings > 1 or coding != b"chunked":
            return "the app's response has a Transfer-Encoding other than chunked"
        framing = Framing.CHUNKED
    elif length >= 0:
        framing = Framing.LENGTH
    else:
        framing = Framing.CLOSE
    closes = close or framing is Framing.CLOSE
    if closes and status >= 200:
        parts.append(_CLOSE)
    parts.append(_CRLF)
    return ResponseHead(status, b"".join(parts), framing, app_closes, closes)
