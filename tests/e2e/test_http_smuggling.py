"""Request-smuggling shapes against an http listener (issue 19, point 2): each is answered
400 by the sidecar, the connection is closed after it, and the app never sees the request,
nor the request smuggled behind it.

Each shape is its own test (one parametrized case each). The request is sent whole in one
write, followed by an innocent-looking second request (`GET /smuggled`): a proxy that
framed the first one differently from its app would pass that second one along.
"""

from __future__ import annotations

import time

import pytest
from http_app import HttpApp

from .conftest import FRONTEND, Sidecar, TlsClient
from .http_support import Client, metric, module_app_and_sidecar, request_line

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

HEAD_LIMIT = 4096
FIELDS_LIMIT = 20
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: payments\r\n\r\n"
H = b"Host: payments\r\n"


def post(fields: bytes, body: bytes = b"", target: bytes = b"/shape") -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\n" + H + fields + b"\r\n" + body


SHAPES: dict[str, bytes] = {
    # Content-Length and Transfer-Encoding together, either order.
    "cl-then-te": post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "te-then-cl": post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"0\r\n\r\n"),
    # Content-Length twice, alike or not, or not a number.
    "duplicate-cl-same": post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"),
    "duplicate-cl-different": post(b"Content-Length: 3\r\nContent-Length: 5\r\n", b"abcde"),
    "cl-list": post(b"Content-Length: 3, 3\r\n", b"abc"),
    "cl-plus": post(b"Content-Length: +3\r\n", b"abc"),
    "cl-negative": post(b"Content-Length: -3\r\n", b"abc"),
    "cl-hex": post(b"Content-Length: 0x3\r\n", b"abc"),
    "cl-letters": post(b"Content-Length: three\r\n", b"abc"),
    "cl-inner-space": post(b"Content-Length: 1 2\r\n", b"abc"),
    "cl-overflow": post(b"Content-Length: 99999999999999999999999\r\n", b"abc"),
    # Transfer-Encoding other than a single `chunked`.
    "te-gzip-chunked": post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
    "te-chunked-gzip": post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"),
    "te-xchunked": post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"),
    "te-identity": post(b"Transfer-Encoding: identity\r\n", b"abc"),
    "te-twice": post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                     b"0\r\n\r\n"),
    "te-in-http10": b"POST /shape HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"),
    # obs-fold: a field line continued on the next.
    "obs-fold-space": post(b"X-A: b\r\n c\r\nContent-Length: 0\r\n"),
    "obs-fold-tab": post(b"X-A: b\r\n\tc\r\nContent-Length: 0\r\n"),
    "obs-fold-te": post(b"X-A: b\r\n Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    # Bare CR, bare LF.
    "bare-cr-in-value": post(b"X-A: b\rc\r\n"),
    "bare-cr-line-end": post(b"X-A: b\rContent-Length: 3\r\n", b"abc"),
    "bare-lf-line-ends": b"GET /shape HTTP/1.1\nHost: payments\n\n",
    "bare-lf-in-head": post(b"X-A: b\nContent-Length: 0\r\n"),
    # Field names that are not tokens; values with control bytes.
    "space-before-colon": post(b"Content-Length : 3\r\n", b"abc"),
    "name-with-parenthesis": post(b"Ho(st: a\r\n"),
    "name-with-slash": post(b"X/Y: a\r\n"),
    "empty-name": post(b": a\r\n"),
    "line-without-colon": post(b"Content-Length 3\r\n", b"abc"),
    "nul-in-value": post(b"X-A: a\x00b\r\n"),
    "control-in-value": post(b"X-A: a\x01b\r\n"),
    # Oversize heads: one huge field, too many fields, a huge request line.
    "oversize-field": post(b"X-Big: " + b"a" * (HEAD_LIMIT + 10) + b"\r\n"),
    "too-many-fields": post(b"".join(b"X-%d: v\r\n" % i for i in range(FIELDS_LIMIT + 1))),
    "oversize-request-line": b"GET /" + b"a" * (HEAD_LIMIT + 10) + b" HTTP/1.1\r\n" + H
                             + b"\r\n",
    # Chunked bodies that are not chunked.
    "chunk-size-not-hex": post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunk-size-with-space": post(b"Transfer-Encoding: chunked\r\n",
                                  b"3 \r\nabc\r\n0\r\n\r\n"),
    "chunk-lf-only": post(b"Transfer-Encoding: chunked\r\n", b"3\nabc\n0\n\n"),
    # Targets other than origin-form, versions other than 1.0 and 1.1.
    "absolute-form": b"GET http://payments/shape HTTP/1.1\r\n" + H + b"\r\n",
    "asterisk-form": b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n",
    "connect": b"CONNECT payments:443 HTTP/1.1\r\n" + H + b"\r\n",
    "fragment": b"GET /shape#x HTTP/1.1\r\n" + H + b"\r\n",
    "http-2.0-line": b"GET /shape HTTP/2.0\r\n" + H + b"\r\n",
    "http-0.9-line": b"GET /shape\r\n\r\n",
    "http-1.2-line": b"GET /shape HTTP/1.2\r\n" + H + b"\r\n",
    "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "unknown-method": b"FOO /shape HTTP/1.1\r\n" + H + b"\r\n",
    # Host: none, or two.
    "no-host": b"GET /shape HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET /shape HTTP/1.1\r\n" + H + H + b"\r\n",
    # A Connection field that would drop the framing as hop-by-hop.
    "connection-names-cl": post(b"Connection: Content-Length\r\nContent-Length: 3\r\n", b"abc"),
    # Paths the app might read as something else than the policy did.
    "encoded-slash": b"GET /api%2F..%2Fadmin HTTP/1.1\r\n" + H + b"\r\n",
    "encoded-backslash": b"GET /api%5C..%5Cadmin HTTP/1.1\r\n" + H + b"\r\n",
    "backslash": b"GET /api\\..\\admin HTTP/1.1\r\n" + H + b"\r\n",
    "encoded-nul": b"GET /a%00b HTTP/1.1\r\n" + H + b"\r\n",
    "dot-segment-with-parameters": b"GET /public/..;/admin HTTP/1.1\r\n" + H + b"\r\n",
    # Upgrades other than WebSocket: h2c would carry requests the policy never sees.
    "h2c-upgrade": b"GET /shape HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\n"
                   b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
}


app, sc = module_app_and_sidecar(
    {"default": "deny", "rules": [{"name": "frontend", "action": "allow", "from": [FRONTEND]}]},
    limits={"max_request_head_bytes": HEAD_LIMIT, "max_request_headers": FIELDS_LIMIT,
            "request_head_timeout": "2s"})



@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_a_smuggling_shape_is_answered_400_and_closed(shape: str, sc: Sidecar, app: HttpApp,
                                                      tls_client: TlsClient) -> None:
    before, received = len(app.requests()), app.received
    c = Client.to(sc, tls_client)
    c.send(SHAPES[shape] + SMUGGLED)
    r = c.response()
    assert r.status == 400, (shape, r)
    assert r.header("x-sidecar-answer") == ["invalid"]
    assert r.header("connection") == ["close"]
    assert r.body.strip(), "the body names the problem"
    assert c.closed()
    assert len(app.requests()) == before, [s.target for s in app.requests()[before:]]
    # The connection's line is written once the sidecar has ended it: whatever it was
    # ever going to send the app is out by then, and the app read not a byte of it.
    line = sc.connection(peer_addr=c.local)
    assert app.received == received, "the app read bytes of a refused request"
    requests = [ln for ln in sc.lines if ln.get("msg") == "request" and ln["id"] == line["id"]]
    # A chunked body is found malformed only as it streams: its head was decided (and
    # allowed, and the app dialed) before the body's first bytes were parsed.
    decided = "allow" if shape.startswith("chunk-") else "none"
    assert [(ln["status"], ln["decision"]) for ln in requests] == [(400, decided)]


def test_a_valid_request_before_a_bad_one_is_answered_and_the_bad_one_is_not_forwarded(
        sc: Sidecar, app: HttpApp, tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    c.send(b"GET /first HTTP/1.1\r\n" + H + b"\r\n" + SHAPES["cl-then-te"] + SMUGGLED)
    assert c.response().json()["target"] == "/first"
    assert c.response().status == 400
    assert c.closed()
    assert not [s for s in app.requests() if s.target in ("/shape", "/smuggled")]


def test_a_slow_head_is_answered_408(sc: Sidecar, app: HttpApp, tls_client: TlsClient) -> None:
    """The head's deadline (limits.request_head_timeout, 2 s here) is checked as its bytes
    arrive: a trickle gets 408 at its first byte past it."""
    c = Client.to(sc, tls_client)
    c.send(b"GET /slow HTTP/1.1\r\n")
    time.sleep(2.5)  # the slow caller's own pace: the behaviour under test, not a wait
    c.send(b"X-A: b\r\n")
    r = c.response()
    assert r.status == 408 and r.header("x-sidecar-answer") == ["timeout"]
    assert c.closed()
    assert request_line(sc, status=408)["decision"] == "none"


def test_refusals_are_counted(sc: Sidecar, tls_client: TlsClient) -> None:
    before = metric(sc, "sidecar_http_requests_total", listener="api", decision="none",
                    code="400")
    c = Client.to(sc, tls_client)
    c.send(SHAPES["te-then-cl"])
    assert c.response().status == 400
    c.closed()
    assert metric(sc, "sidecar_http_requests_total", listener="api", decision="none",
                  code="400") == before + 1
