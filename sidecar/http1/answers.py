"""The responses the sidecar writes itself, instead of the app.

Each names what happened and nothing of the policy (no rule name, no SPIFFE ID: the
access log has those), and carries `x-sidecar-answer` with one word, so a client, and
`sidecar diagnose --http`, can tell a response of the sidecar from one of the app:

- 400 `invalid`: the request was malformed or of a shape the sidecar refuses (the body
  says which); the connection closes;
- 403 `denied`: the policy denied the request; the connection stays open unless the
  request had a body (which would have to be read and thrown away) or the caller asked
  to close;
- 408 `timeout`: the request head took longer than `limits.request_head_timeout`;
- 502 `upstream_unavailable`: the app could not be reached, or closed or broke the
  connection before its response; the connection closes.
"""

from __future__ import annotations

from enum import StrEnum

HEADER = "x-sidecar-answer"


class Answer(StrEnum):
    """The word in `x-sidecar-answer`."""

    INVALID = "invalid"
    DENIED = "denied"
    TIMEOUT = "timeout"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"


_STATUS = {Answer.INVALID: (400, "Bad Request"), Answer.DENIED: (403, "Forbidden"),
           Answer.TIMEOUT: (408, "Request Timeout"),
           Answer.UPSTREAM_UNAVAILABLE: (502, "Bad Gateway")}


def status_of(answer: Answer) -> int:
    return _STATUS[answer][0]


def build(answer: Answer, text: str, *, close: bool) -> bytes:
    """A complete response: status line, fields, and `text` as a one-line body."""
    code, phrase = _STATUS[answer]
    body = (text + "\n").encode("ascii", "replace")
    return (f"HTTP/1.1 {code} {phrase}\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\n{HEADER}: {answer}\r\n"
            + ("connection: close\r\n" if close else "") + "\r\n").encode("ascii") + body


DENIED_TEXT = "forbidden by the sidecar's policy"
# The answers a busy listener sends over and over, built once.
DENIED_OPEN = build(Answer.DENIED, DENIED_TEXT, close=False)
DENIED_CLOSE = build(Answer.DENIED, DENIED_TEXT, close=True)
