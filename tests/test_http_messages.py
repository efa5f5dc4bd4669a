"""Request and response heads as an http listener judges and forwards them
(sidecar/http1/request.py, response.py, answers.py, xfcc.py). Pure: parsed values in,
decisions out; the bytes themselves are llhttp's, tested end to end elsewhere."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.http1 import answers, request, response, xfcc
from sidecar.http1.request import Framing, RequestHead

XFCC = b"x-forwarded-client-cert: By=spiffe://e.org/b;Hash=00;URI=spiffe://e.org/a\r\n"
HOST = (b"Host", b"payments")

Fields = list[tuple[bytes, bytes]]


def _examine(method: str, target: bytes, version: str, fields: Fields | None,
             upgrade: bool) -> RequestHead | str:
    return request.examine(method, target, version,
                           request.lines([HOST] if fields is None else fields), upgrade, XFCC)


def ok(method: str = "GET", target: bytes = b"/", version: str = "1.1",
       fields: Fields | None = None, upgrade: bool = False) -> RequestHead:
    head = _examine(method, target, version, fields, upgrade)
    assert isinstance(head, RequestHead), head
    return head


def refused(method: str = "GET", target: bytes = b"/", version: str = "1.1",
            fields: Fields | None = None, upgrade: bool = False) -> str:
    head = _examine(method, target, version, fields, upgrade)
    assert isinstance(head, str), head
    return head


# --- what the app receives ---------------------------------------------------------------


def test_the_app_receives_the_normalized_path_the_query_as_sent_and_our_xfcc() -> None:
    head = ok(target=b"/api/%2e%2e/admin?x=%2e%2e&y", fields=[HOST, (b"Accept", b"*/*")])
    assert head.path == "/admin"
    assert head.forwarded == (b"GET /admin?x=%2e%2e&y HTTP/1.1\r\nHost: payments\r\n"
                              b"Accept: */*\r\n" + XFCC + b"\r\n")


@pytest.mark.parametrize("name", [b"X-Forwarded-Client-Cert", b"x-forwarded-client-cert",
                                  b"X-FORWARDED-CLIENT-CERT"])
def test_a_callers_xfcc_never_reaches_the_app(name: bytes) -> None:
    head = ok(fields=[HOST, (name, b"By=x;URI=spiffe://e.org/admin"), (name, b"URI=y")])
    assert head.forwarded.lower().count(b"x-forwarded-client-cert") == 1
    assert b"admin" not in head.forwarded
    assert XFCC in head.forwarded


def test_hop_by_hop_fields_and_those_connection_names_are_dropped() -> None:
    head = ok(fields=[HOST, (b"Connection", b"keep-alive, X-Secret"), (b"Keep-Alive", b"t=5"),
                      (b"X-Secret", b"1"), (b"TE", b"trailers"), (b"X-Kept", b"2"),
                      (b"Proxy-Connection", b"x"), (b"Upgrade", b"websocket")])
    assert head.forwarded == (b"GET / HTTP/1.1\r\nHost: payments\r\nX-Kept: 2\r\n" + XFCC
                              + b"\r\n")
    assert head.keep_alive


def test_close_is_kept_for_the_app_and_ends_the_connection() -> None:
    head = ok(fields=[HOST, (b"Connection", b"close")])
    assert not head.keep_alive
    assert b"Connection: close\r\n" in head.forwarded


def test_http10_closes_after_its_response_and_may_omit_host() -> None:
    head = ok(version="1.0", fields=[])
    assert not head.keep_alive and head.http10
    assert head.forwarded.startswith(b"GET / HTTP/1.0\r\nConnection: close\r\n")


@pytest.mark.parametrize(("fields", "framing", "length"), [
    ([HOST], Framing.NONE, 0),
    ([HOST, (b"Content-Length", b"0")], Framing.NONE, 0),
    ([HOST, (b"Content-Length", b"12")], Framing.LENGTH, 12),
    ([HOST, (b"Content-Length", b"12 ")], Framing.LENGTH, 12),  # llhttp keeps trailing OWS
    ([HOST, (b"Transfer-Encoding", b"chunked")], Framing.CHUNKED, 0),
    ([HOST, (b"Transfer-Encoding", b"Chunked")], Framing.CHUNKED, 0),
])
def test_framing(fields: Fields, framing: Framing, length: int) -> None:
    head = ok("POST", fields=fields)
    assert (head.framing, head.length) == (framing, length)
    assert head.has_body is (framing is not Framing.NONE)


def test_a_websocket_upgrade_keeps_its_fields() -> None:
    head = ok(target=b"/ws", fields=[HOST, (b"Connection", b"Upgrade"),
                                     (b"Upgrade", b"websocket"),
                                     (b"Sec-WebSocket-Key", b"k")], upgrade=True)
    assert head.upgrade
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in head.forwarded
    assert b"Sec-WebSocket-Key: k\r\n" in head.forwarded


# --- what is refused (each answered 400 by the session) ----------------------------------


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"fields": [HOST, (b"Transfer-Encoding", b"gzip, chunked")]}, "other than chunked"),
    ({"fields": [HOST, (b"Transfer-Encoding", b"chunked, identity")]}, "other than chunked"),
    ({"fields": [HOST, (b"Transfer-Encoding", b"chunked"),
                 (b"Transfer-Encoding", b"chunked")]}, "other than chunked"),
    ({"fields": [HOST, (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")]},
     "both Content-Length and Transfer-Encoding"),
    ({"fields": [HOST, (b"Content-Length", b"3"), (b"Content-Length", b"3")]},
     "more than one Content-Length"),
    ({"version": "1.0", "fields": [(b"Transfer-Encoding", b"chunked")]}, "HTTP/1.0"),
    ({"fields": []}, "no Host"),
    ({"fields": [HOST, HOST]}, "more than one Host"),
    ({"version": "2.0"}, "HTTP/2.0 is not spoken here"),
    ({"version": "0.9"}, "HTTP/0.9 is not spoken here"),
    ({"target": b"http://evil/admin"}, "origin-form"),
    ({"target": b"*", "method": "OPTIONS"}, "asterisk"),
    ({"target": b"evil:443", "method": "CONNECT"}, "CONNECT"),
    ({"target": b"/a?b#c"}, "fragment"),
    ({"target": b"/a%2Fb"}, "encoded slash"),
    ({"fields": [HOST, (b"Connection", b"content-length")]}, "Connection field names"),
    ({"fields": [HOST, (b"Connection", b"Host")]}, "Connection field names"),
    ({"target": b"/ws", "upgrade": True,
      "fields": [HOST, (b"Connection", b"upgrade"), (b"Upgrade", b"h2c")]}, "WebSocket"),
    ({"target": b"/ws", "upgrade": True, "method": "POST",
      "fields": [HOST, (b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]}, "GET"),
    ({"target": b"/ws", "upgrade": True,
      "fields": [HOST, (b"Connection", b"upgrade"), (b"Upgrade", b"websocket"),
                 (b"Content-Length", b"4")]}, "must not have a body"),
])
def test_refused_heads_say_why(kwargs: dict[str, object], why: str) -> None:
    assert why in refused(**kwargs)  # type: ignore[arg-type]


def test_the_head_limits() -> None:
    fields = request.lines([HOST] + [(b"X-%d" % i, b"v") for i in range(100)])
    assert "more than 100 header fields" in str(
        request.examine("GET", b"/", "1.1", fields, False, XFCC, max_fields=100))
    assert isinstance(request.examine("GET", b"/", "1.1", fields[:400], False, XFCC,
                                      max_fields=100), RequestHead)
    big = request.lines([HOST, (b"X-Big", b"a" * 2048)])
    assert "larger than 2048 bytes" in str(
        request.examine("GET", b"/", "1.1", big, False, XFCC, max_bytes=2048))
    assert isinstance(request.examine("GET", b"/", "1.1", big, False, XFCC, max_bytes=4096),
                      RequestHead)


@pytest.mark.parametrize("target", [b"/" + b"a" * 69, b"/a/../" + b"a" * 64])
def test_the_head_limit_counts_the_line_the_caller_sent_to_the_byte(target: bytes) -> None:
    """The method, the target as sent, 11 bytes and the field lines: at most max_bytes,
    whether the examiner judges the field lines or has kept them from the last request."""
    fields = request.lines([HOST])  # 16 bytes: "Host: payments" CRLF
    assert len(b"GET") + len(target) + 11 + 16 == 100
    examiner = request.Examiner(XFCC, max_bytes=100)
    assert isinstance(examiner.examine("GET", target, "1.1", fields, False), RequestHead)
    assert examiner.examine("GET", target + b"a", "1.1", fields, False) == \
        "the request head is larger than 100 bytes"
    assert isinstance(request.examine("GET", target, "1.1", fields, False, XFCC,
                                      max_bytes=100), RequestHead)
    assert isinstance(request.examine("GET", target + b"a", "1.1", fields, False, XFCC,
                                      max_bytes=100), str)


# --- responses ---------------------------------------------------------------------------


def resp(head: bytes, *, status: int = 200, head_request: bool = False, close: bool = False,
         keep_alive: bool = True) -> response.ResponseHead:
    out = response.examine(status, head, head_request=head_request, close=close,
                           keep_alive=keep_alive)
    assert isinstance(out, response.ResponseHead), out
    return out


def test_a_plain_response_goes_as_the_app_wrote_it() -> None:
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\n")
    assert r.forwarded is None and r.framing is Framing.LENGTH and not r.closes


@pytest.mark.parametrize(("head", "kwargs", "framing"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", {}, Framing.CHUNKED),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", {"head_request": True}, Framing.NONE),
    (b"HTTP/1.1 204 No Content\r\n\r\n", {"status": 204}, Framing.NONE),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", {"status": 304},
     Framing.NONE),
    (b"HTTP/1.1 200 OK\r\n\r\n", {"keep_alive": False}, Framing.CLOSE),
])
def test_response_framing(head: bytes, kwargs: dict[str, object], framing: Framing) -> None:
    assert resp(head, **kwargs).framing is framing  # type: ignore[arg-type]


def test_a_close_delimited_response_closes_the_callers_connection() -> None:
    # llhttp: a response whose body runs until the close does not keep the connection.
    r = resp(b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\n", keep_alive=False)
    assert r.framing is Framing.CLOSE and r.closes and r.app_closes
    assert r.forwarded is None  # the caller reads it until the close, as the app wrote it


def test_hop_by_hop_fields_of_the_app_are_dropped() -> None:
    r = resp(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
             b"Content-Length: 0\r\n\r\n")
    assert r.forwarded == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert not r.closes


def test_when_the_app_closes_so_does_the_callers_connection() -> None:
    r = resp(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
             keep_alive=False)
    assert r.app_closes and r.closes
    assert r.forwarded == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def test_a_draining_sidecar_says_connection_close() -> None:
    r = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", close=True)
    assert r.closes
    assert r.forwarded == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("coding", [b"gzip", b"chunked, gzip", b"gzip, chunked"])
def test_a_response_coding_other_than_chunked_is_refused(coding: bytes) -> None:
    out = response.examine(200, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding
                           + b"\r\n\r\n", head_request=False, close=False, keep_alive=True)
    assert out == "the app's response has a Transfer-Encoding other than chunked"


def test_head_end() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nbody"
    first = response.head_end(data)
    assert data[:first] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert data[first:response.head_end(data, first)] == b"HTTP/1.1 200 OK\r\n\r\n"
    assert response.head_end(b"HTTP/1.1 200 OK\r\n") == -1


# --- the sidecar's own answers, and XFCC -------------------------------------------------


@pytest.mark.parametrize(("answer", "status"), [
    (answers.Answer.INVALID, 400), (answers.Answer.DENIED, 403),
    (answers.Answer.TIMEOUT, 408), (answers.Answer.UPSTREAM_UNAVAILABLE, 502)])
def test_answers_are_complete_responses_that_name_themselves(answer: answers.Answer,
                                                             status: int) -> None:
    data = answers.build(answer, "why", close=True)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"\r\nx-sidecar-answer: " + answer.value.encode() in head
    assert b"\r\nconnection: close" in head
    assert body == b"why\n"
    assert b"content-length: %d" % len(body) in head


def test_the_denial_names_nothing_of_the_policy() -> None:
    assert answers.DENIED_OPEN.endswith(b"\r\n\r\nforbidden by the sidecar's policy\n")
    assert b"connection" not in answers.DENIED_OPEN.lower()
    assert b"connection: close" in answers.DENIED_CLOSE


def test_xfcc_is_envoys_format() -> None:
    leaf = b"\x30\x82certificate"
    line = xfcc.field("spiffe://e.org/ns/default/sa/payments", leaf,
                      "spiffe://e.org/ns/web/sa/frontend")
    name, _, value = line.decode().rstrip("\r\n").partition(": ")
    assert name == "x-forwarded-client-cert"
    assert value == ("By=spiffe://e.org/ns/default/sa/payments;"
                     f"Hash={hashlib.sha256(leaf).hexdigest()};"
                     "URI=spiffe://e.org/ns/web/sa/frontend")
    assert xfcc.parse(value)["URI"] == "spiffe://e.org/ns/web/sa/frontend"


# --- one connection's examiner: the last field lines kept -----------------------------


def test_an_examiner_judges_each_request_as_examine_does_whatever_it_kept() -> None:
    """request.Examiner keeps the last request's field lines with what they said: each
    request in turn, on one examiner, gets what examine says of it alone."""
    chunked = [HOST, (b"Transfer-Encoding", b"chunked")]
    ws = [HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    requests = [
        ("GET", b"/a", "1.1", [HOST], False),
        ("GET", b"/b/../c?q=1", "1.1", [HOST], False),  # the same fields, another line
        ("POST", b"/c", "1.1", [HOST], False),
        ("GET", b"/c", "1.0", [HOST], False),  # another version: Connection: close
        ("GET", b"/c", "1.1", [HOST, HOST], False),  # refused by its fields
        ("GET", b"/d", "1.1", [HOST, HOST], False),  # the same again: refused again
        ("GET", b"/%2F", "1.1", [HOST], False),  # refused by its line
        ("GET", b"/e", "1.1", [HOST, (b"Content-Length", b"3")], False),
        ("PUT", b"/e", "1.1", chunked, False),
        ("GET", b"/ws", "1.1", ws, True),
        ("POST", b"/ws", "1.1", ws, True),  # the same fields, refused for its method
        ("GET", b"/" + b"x" * 300, "1.1", [HOST], False),  # too large with kept fields
        ("GET", b"/a", "1.1", [HOST], False),
    ]
    examiner = request.Examiner(XFCC, max_bytes=300)
    for method, target, version, fields, upgrade in requests:
        got = examiner.examine(method, target, version, request.lines(fields), upgrade)
        assert got == request.examine(method, target, version, request.lines(fields),
                                      upgrade, XFCC, max_bytes=300), (method, target)
    assert isinstance(examiner.examine("GET", b"/" + b"x" * 300, "1.1",
                                       request.lines([HOST]), False), str)


# --- the usual target, judged without _target ------------------------------------------

# Targets a quick judgement could misjudge: dot and empty segments, escapes, a query with
# what the path may not hold, a fragment, bytes outside the path characters, other forms.
TRICKY_TARGETS = st.lists(st.sampled_from(
    [b"a", b".", b"..", b"/", b"//", b"%2e", b"%2f", b"%41", b"%", b";", b"\\", b"#", b"?",
     b" ", b"\xc3\xa9", b"*", b":", b"=", b"&"]), max_size=10).map(b"".join)


@given(TRICKY_TARGETS, st.sampled_from([b"/", b"", b"*", b"http://h/"]),
       st.sampled_from(["GET", "CONNECT"]))
@example(b"a?b", b"/", "GET")
@example(b"a?b#c", b"/", "GET")
@example(b"a?x=/../y//z%zz", b"/", "GET")
@example(b"a/./b", b"/", "GET")
@example(b"a./b", b"/", "GET")
@example(b"", b"/", "GET")
@example(b"", b"*", "GET")
@example(b"h:443", b"", "CONNECT")
def test_an_examiners_judgement_of_a_target_is_the_full_ones(target: bytes, start: bytes,
                                                             method: str) -> None:
    """Examiner.examine judges the usual target (a normal path, a query without `#`)
    itself, and every other by request._target: both must say the same."""
    target = start + target
    full = request._target(method, target)
    got = request.Examiner(XFCC).examine(method, target, "1.1", request.lines([HOST]), False)
    if isinstance(full, str):
        assert got == full
    else:
        path, line = full
        assert isinstance(got, RequestHead), got
        assert got.path == path.decode("ascii")
        assert got.forwarded == (method.encode() + b" " + line + b" HTTP/1.1\r\n"
                                 b"Host: payments\r\n" + XFCC + b"\r\n")
