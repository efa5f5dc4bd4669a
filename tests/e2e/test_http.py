"""inbound[].protocol: http, end to end (issue 19, point 2): real `sidecar run` processes,
an HTTP app that answers what it received (tests/http_app.py), mTLS clients on 127.0.0.1.

One sidecar and one app serve the whole module (a sidecar start is seconds on this
machine); each test reads only the lines and requests of its own connections.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from http_app import HttpApp, big_body

from sidecar.http1 import xfcc

from .conftest import (
    BATCH,
    FRONTEND,
    IO_TIMEOUT,
    PAYMENTS,
    REPO,
    Pki,
    Sidecar,
    TlsClient,
    write_svid_dir,
)
from .http_support import (
    Client,
    chunked,
    leaf_hash,
    metric,
    module_app_and_sidecar,
    request,
    request_line,
    request_lines,
    start_sidecar,
    wait_count,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

OPS = "spiffe://example.org/ns/ops/sa/admin"
POLICY = {
    "mode": "enforce",
    "default": "deny",
    "rules": [
        {"name": "no-admin", "action": "deny", "from": ["spiffe://example.org/*"],
         "to": {"paths": ["/admin", "/admin/*"]}},
        {"name": "frontend", "action": "allow", "from": [FRONTEND]},
        {"name": "batch-reads", "action": "allow", "from": [BATCH],
         "to": {"methods": ["GET", "HEAD"], "paths": ["/reports/*"]}},
    ],
}

app, sc = module_app_and_sidecar(POLICY)



def seen_target(app: HttpApp, marker: str) -> list[str]:
    return [s.target for s in app.requests() if marker in s.target]


# --- a request, its XFCC, its lines -----------------------------------------------------


def test_an_allowed_request_reaches_the_app_with_our_xfcc(sc: Sidecar, app: HttpApp,
                                                          tls_client: TlsClient, ca: Pki) -> None:
    c = Client.to(sc, tls_client)
    r = c.get("/hello?x=1", headers={"X-Forwarded-Client-Cert": "By=spiffe://evil;URI=forged",
                                     "x-forwarded-client-cert": "URI=spiffe://example.org/admin"})
    assert r.status == 200
    got = r.json()
    assert got["target"] == "/hello?x=1"
    sent = [v for k, v in got["headers"] if k == "x-forwarded-client-cert"]
    assert len(sent) == 1, got["headers"]  # the caller's two are gone, ours is there
    assert xfcc.parse(sent[0]) == {"By": PAYMENTS, "Hash": leaf_hash(ca, FRONTEND),
                                   "URI": FRONTEND}
    line = request_line(sc, path="/hello", method="GET")
    assert line["status"] == 200 and line["decision"] == "allow"
    assert line["rule"] == "frontend" and line["peer_id"] == FRONTEND
    assert line["bytes_out"] == len(r.body) and line["bytes_in"] == 0
    assert line["duration_ms"] >= 0
    c.close()
    conn = sc.connection(peer_addr=c.local)
    assert conn["id"] == line["id"]  # the request line names its connection
    assert conn["close"] == "closed"


def test_the_path_is_judged_normalized_and_the_app_receives_that_path(
        sc: Sidecar, app: HttpApp, tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    for target in ("/api/../admin", "/api/%2e%2e/admin/users", "//admin", "/x/./../admin"):
        r = c.get(target)
        assert r.status == 403, (target, r)
        assert r.header("x-sidecar-answer") == ["denied"]
        assert b"policy" in r.body and b"no-admin" not in r.body  # names nothing secret
    r = c.get("/api/v1/../items/%7euser")
    assert r.status == 200
    assert r.json()["target"] == "/api/items/~user"
    assert not seen_target(app, "admin")
    line = request_line(sc, path="/admin/users")
    assert (line["status"], line["decision"], line["rule"]) == (403, "deny", "no-admin")
    c.close()


def test_rules_on_methods_and_paths(sc: Sidecar, app: HttpApp, tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client, BATCH)
    assert c.get("/reports/q1").status == 200
    assert c.get("/reports/q1", method="HEAD").status == 200
    assert c.get("/reports/q1", method="POST", body=b"").status == 403
    assert c.get("/other").status == 403  # default
    line = request_line(sc, path="/other", peer_id=BATCH)
    assert (line["decision"], line["rule"]) == ("deny", "default")
    c.close()


# --- denials keep the connection when they safely can ---------------------------------------


def test_a_denied_request_without_a_body_keeps_the_connection(sc: Sidecar, app: HttpApp,
                                                              tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    r = c.get("/admin/x")
    assert r.status == 403 and not r.header("connection")
    assert c.get("/after-403").status == 200  # the same connection
    c.close()


def test_a_denied_request_with_a_body_is_answered_and_closed(sc: Sidecar, app: HttpApp,
                                                             tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    c.send(request("POST", "/admin/upload", body=b"x" * 100_000))
    r = c.response()
    assert r.status == 403 and r.header("connection") == ["close"]
    assert c.closed()
    assert not seen_target(app, "/admin/upload")


def test_a_denied_peer_is_never_dialed(sc: Sidecar, app: HttpApp, tls_client: TlsClient) -> None:
    before = app.connections
    c = Client.to(sc, tls_client, OPS)
    for _ in range(3):
        assert c.get("/anything").status == 403
    c.close()
    sc.connection(peer_addr=c.local)
    assert app.connections == before


# --- bodies both ways, streamed ---------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_large_upload_arrives_whole(sc: Sidecar, app: HttpApp, tls_client: TlsClient,
                                      framing: str) -> None:
    body = big_body(3 * 1024 * 1024 + 17)
    c = Client.to(sc, tls_client)
    if framing == "length":
        data = request("PUT", f"/upload-{framing}", body=body)
    else:
        data = request("PUT", f"/upload-{framing}", headers={"Transfer-Encoding": "chunked"}) \
            + chunked(body, 70_000)
    # One thread: the app answers only once the whole body is in, so sending all of it
    # before reading cannot deadlock, and an SSLSocket (one OpenSSL SSL object) must not
    # be read and written from two threads at once (that made this test flaky).
    c.send(data)
    r = c.response()
    got = r.json()
    assert (got["body_len"], got["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert request_line(sc, path=f"/upload-{framing}")["bytes_in"] == len(body)
    c.close()


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_a_large_download_arrives_whole(sc: Sidecar, tls_client: TlsClient, framing: str) -> None:
    n = 4 * 1024 * 1024 + 3
    c = Client.to(sc, tls_client)
    r = c.get(f"/big?n={n}&framing={framing}")
    assert r.status == 200 and r.body == big_body(n)
    if framing == "close":  # the caller's connection ends with the body
        assert c.closed()
    else:
        assert c.get("/after-big").status == 200
    c.close()


def test_expect_100_continue(sc: Sidecar, tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    body = b"y" * 5000
    c.send(request("POST", "/continue", headers={"Expect": "100-continue",
                                                 "Content-Length": str(len(body))}))
    interim = c.response()
    assert interim.status == 100  # before a byte of the body was sent
    c.send(body)
    r = c.response()
    assert r.status == 200 and r.json()["body_len"] == len(body)
    c.close()


# --- keep-alive and pipelining ----------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(sc: Sidecar, app: HttpApp,
                                                  tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    c.send(request("GET", "/pipe/1") + request("POST", "/pipe/2", body=b"abc")
           + request("GET", "/admin/pipe/3") + request("HEAD", "/pipe/4")
           + request("GET", "/chunked?pipe=5"))
    first = c.response()
    assert first.json()["target"] == "/pipe/1"
    second = c.response()
    assert second.json()["target"] == "/pipe/2" and second.json()["body_len"] == 3
    assert c.response().status == 403  # denied in the middle: the stream stays in step
    head = c.response(head=True)
    assert head.status == 200 and head.body == b""
    last = c.response()
    assert last.json()["target"] == "/chunked?pipe=5"
    c.close()


def test_bodiless_responses_keep_the_stream_in_step(sc: Sidecar, tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    assert c.get("/status/204").status == 204
    assert c.get("/status/304").status == 304
    assert c.get("/bodiless", method="HEAD").status == 200
    assert c.get("/status/404").status == 404
    assert c.get("/after-bodiless").json()["target"] == "/after-bodiless"
    c.close()


def test_connection_close_from_the_caller_and_from_the_app(sc: Sidecar,
                                                           tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    r = c.get("/bye", headers={"Connection": "close"})
    assert r.status == 200 and c.closed()
    c = Client.to(sc, tls_client)
    r = c.get("/close")
    assert r.status == 200 and r.header("connection") == ["close"] and c.closed()


def test_a_kept_alive_app_connection_closed_under_a_get_is_retried(sc: Sidecar,
                                                                    tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    assert c.get("/drop-second").status == 200
    r = c.get("/drop-second")  # the app closes this one unanswered; a new one answers
    assert r.status == 200
    c.close()


# --- WebSocket -------------------------------------------------------------------------

WS = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_an_allowed_websocket_is_passed_through(sc: Sidecar, tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    r = c.get("/ws", headers=WS)
    assert r.status == 101 and r.header("upgrade") == ["websocket"]
    payload = big_body(200_000)
    # A piece at a time, each echoed whole before the next: one SSL object must not be
    # written by one thread while another reads it (OpenSSL's objects are not shared
    # between threads; a sender thread made this test fail now and then).
    got = b""
    for at in range(0, len(payload), 16384):
        c.send(payload[at:at + 16384])
        while len(got) < min(at + 16384, len(payload)):
            data = c.sock.recv(65536)
            assert data
            got += data
    assert got == payload
    assert request_line(sc, path="/ws")["status"] == 101
    c.close()


def test_a_denied_websocket_never_reaches_the_app(sc: Sidecar, app: HttpApp,
                                                  tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    r = c.get("/admin/ws", headers=WS)
    assert r.status == 403
    assert not seen_target(app, "/admin/ws")
    c.close()


def test_an_h2c_upgrade_is_refused(sc: Sidecar, app: HttpApp, tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    r = c.get("/h2c", headers={"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                               "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"})
    assert r.status == 400 and b"WebSocket" in r.body
    assert not seen_target(app, "/h2c")


# --- ALPN ------------------------------------------------------------------------------


def test_alpn_agrees_on_http11(sc: Sidecar, tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client, alpn=["h2", "http/1.1"])
    assert c.sock.selected_alpn_protocol() == "http/1.1"
    assert c.get("/alpn").status == 200
    c.close()


def test_an_h2_only_client_is_refused_with_a_reason(sc: Sidecar, tls_client: TlsClient) -> None:
    before = metric(sc, "sidecar_handshake_errors_total", listener="api",
                    reason="no_application_protocol")
    ctx = tls_client.context(tls_client.ca.svid(FRONTEND))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", sc.port("api")), timeout=IO_TIMEOUT)
    local = f"{raw.getsockname()[0]}:{raw.getsockname()[1]}"
    with pytest.raises(ssl.SSLError) as caught:
        ctx.wrap_socket(raw).close()
    raw.close()
    assert "alert no application protocol" in str(caught.value)
    line = sc.connection(peer_addr=local)
    assert line["reason"] == "no_application_protocol" and "h2" in line["detail"]
    wait_count(lambda: metric(sc, "sidecar_handshake_errors_total", listener="api",
                              reason="no_application_protocol"), before + 1)


# --- what is counted ----------------------------------------------------------------------


def test_requests_are_counted_by_decision_and_code(sc: Sidecar, tls_client: TlsClient) -> None:
    def count(decision: str, code: str) -> float:
        return metric(sc, "sidecar_http_requests_total", listener="api", decision=decision,
                      code=code)

    ok, denied = count("allow", "200"), count("deny", "403")
    durations = metric(sc, "sidecar_http_request_duration_seconds_count", listener="api")
    decisions = metric(sc, "sidecar_authz_decisions_total", listener="api",
                       decision="deny", rule="no-admin")
    c = Client.to(sc, tls_client)
    c.get("/counted")
    c.get("/admin/counted")
    c.close()
    assert count("allow", "200") == ok + 1  # a scrape adds what is pending
    assert count("deny", "403") == denied + 1
    assert metric(sc, "sidecar_http_request_duration_seconds_count",
                  listener="api") == durations + 2
    assert metric(sc, "sidecar_authz_decisions_total", listener="api", decision="deny",
                  rule="no-admin") == decisions + 1


def test_every_request_has_one_line(sc: Sidecar, tls_client: TlsClient) -> None:
    c = Client.to(sc, tls_client)
    for i in range(5):
        c.get(f"/lines/{i}")
    c.close()
    conn = sc.connection(peer_addr=c.local)
    lines = request_lines(sc, id=conn["id"])
    assert [ln["path"] for ln in lines] == [f"/lines/{i}" for i in range(5)]
    assert conn["decision"] is None  # decisions are per request, in the request lines
    assert conn["bytes_from_app"] > 0 and conn["bytes_to_app"] > 0


# --- the app is away --------------------------------------------------------------------


def test_an_unreachable_app_is_a_502(tmp_path: Path, ca: Pki, tls_client: TlsClient) -> None:
    # A port we keep bound and never listen on: connecting is refused, and no other
    # process can take it meanwhile (a port closed and handed on could be, and answer).
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        sc = start_sidecar(tmp_path, ca, f"127.0.0.1:{port}", POLICY)
        try:
            c = Client.to(sc, tls_client)
            r = c.get("/down")
            assert r.status == 502 and r.header("x-sidecar-answer") == ["upstream_unavailable"]
            assert c.closed()
            line = request_line(sc, path="/down")
            assert line["status"] == 502 and line["decision"] == "allow"
            assert sc.connection(peer_addr=c.local)["reason"] == "upstream_unavailable"
            # A denied request is answered without dialing.
            c = Client.to(sc, tls_client)
            assert c.get("/admin").status == 403
            c.close()
        finally:
            assert sc.stop() == 0


# --- audit mode ----------------------------------------------------------------------------


def test_audit_mode_forwards_what_it_would_deny(tmp_path: Path, ca: Pki, app: HttpApp,
                                                tls_client: TlsClient) -> None:
    sc = start_sidecar(tmp_path, ca, app.address, {**POLICY, "mode": "audit"})
    try:
        c = Client.to(sc, tls_client)
        r = c.get("/admin/audited")
        assert r.status == 200 and r.json()["target"] == "/admin/audited"
        line = request_line(sc, path="/admin/audited")
        assert (line["decision"], line["rule"]) == ("audit_deny", "no-admin")
        c.close()
    finally:
        assert sc.stop() == 0


def test_default_allow_is_honoured(tmp_path: Path, ca: Pki, app: HttpApp,
                                   tls_client: TlsClient) -> None:
    sc = start_sidecar(tmp_path, ca, app.address, {"default": "allow", "rules": []})
    try:
        c = Client.to(sc, tls_client, OPS)
        assert c.get("/by-default").status == 200
        assert request_line(sc, path="/by-default")["rule"] == "default"
        c.close()
    finally:
        assert sc.stop() == 0


def test_a_reloaded_policy_applies_to_the_next_request(tmp_path: Path, ca: Pki, app: HttpApp,
                                                       tls_client: TlsClient) -> None:
    sc = start_sidecar(tmp_path, ca, app.address, POLICY)
    try:
        c = Client.to(sc, tls_client)
        assert c.get("/reports/x").status == 200
        policy = {**POLICY, "rules": [*POLICY["rules"],  # type: ignore[list-item]
                                      {"name": "no-reports", "action": "deny",
                                       "from": [FRONTEND], "to": {"paths": ["/reports/*"]}}]}
        (sc.config_path.parent / "policy.yaml").write_text(json.dumps(policy))
        sc.wait_line(lambda ln: ln.get("msg") == "policy reloaded", what="the reload")
        assert c.get("/reports/x").status == 403  # the same connection, the new policy
        c.close()
    finally:
        assert sc.stop() == 0


# --- sidecar diagnose --http ------------------------------------------------------------


@pytest.mark.parametrize(("path", "status", "decision", "code", "reason"), [
    ("/admin/diagnosed", 403, "deny", 1, "http_denied"), ("/diagnosed", 200, "allow", 0, None)])
def test_diagnose_sends_one_request_and_shows_the_status_and_decision(
        sc: Sidecar, ca: Pki, tmp_path: Path, path: str, status: int, decision: str,
        code: int, reason: str | None) -> None:
    """A request the sidecar denied never reached the app: exit 1, as a denial on a tcp
    listener gives, with the reason named; the app's own answer (any status) is exit 0."""
    files = write_svid_dir(tmp_path / "frontend", ca.svid(FRONTEND), ca.bundle)
    run = subprocess.run(
        [sys.executable, "-m", "sidecar", "diagnose", f"127.0.0.1:{sc.port('api')}",
         "--cert", files["cert"], "--key", files["key"], "--bundle", files["bundle"],
         "--expect-id", PAYMENTS, "--http", path, "--json"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == code, run.stdout + run.stderr
    out = json.loads(run.stdout)
    assert (out["http_status"], out["http_decision"]) == (status, decision)
    assert out["reason"] == reason, out
    step = next(s for s in out["steps"] if s["step"] == "http request")
    assert f"GET {path}: {status}" in step["detail"]
    line = request_line(sc, path=path)
    assert line["decision"] == decision and line["peer_id"] == FRONTEND


# --- drain ----------------------------------------------------------------------------------


def test_a_drain_closes_an_idle_kept_alive_connection_at_once(
        tmp_path: Path, ca: Pki, app: HttpApp, tls_client: TlsClient) -> None:
    sc = start_sidecar(tmp_path, ca, app.address, POLICY)
    c = Client.to(sc, tls_client)
    assert c.get("/before-drain").status == 200
    started = time.monotonic()
    assert sc.stop() == 0  # drain_timeout is 5 s: an idle http connection must not hold it
    assert c.closed()
    assert time.monotonic() - started < 4
    assert sc.connection(peer_addr=c.local)["close"] == "closed"


def test_a_reload_that_denies_a_websockets_request_closes_it(
        tmp_path: Path, ca: Pki, app: HttpApp, tls_client: TlsClient) -> None:
    sc = start_sidecar(tmp_path, ca, app.address, POLICY)
    try:
        kept, cut = Client.to(sc, tls_client), Client.to(sc, tls_client)
        assert kept.get("/ws/kept", headers=WS).status == 101
        assert cut.get("/ws/cut", headers=WS).status == 101
        policy = {**POLICY, "rules": [{"name": "no-cut", "action": "deny",
                                       "from": [FRONTEND], "to": {"paths": ["/ws/cut"]}},
                                      *POLICY["rules"]]}  # type: ignore[list-item]
        (sc.config_path.parent / "policy.yaml").write_text(json.dumps(policy))
        line = sc.connection(peer_addr=cut.local)
        assert (line["close"], line["rule"]) == ("policy_recheck", "no-cut")
        kept.send(b"still here")
        assert kept.sock.recv(64) == b"still here"
        kept.close()
    finally:
        assert sc.stop() == 0
