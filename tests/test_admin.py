"""The admin endpoint: each path, bad requests, and a real server on a real socket."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.observe import admin, metrics

pytestmark = pytest.mark.timeout(10)


def probe(ready: str | None = None) -> admin.Probe:
    return admin.Probe(ready=lambda: ready, status=lambda: {"spiffe_id": "spiffe://td/x"})


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def test_metrics_carry_every_spec_family() -> None:
    status, ctype, body = admin.answer(get("/metrics"), probe())
    assert status == "200 OK" and ctype.startswith("text/plain")
    text = body.decode()
    for name in ("sidecar_handshakes_total", "sidecar_handshake_errors_total",
                 "sidecar_handshake_duration_seconds", "sidecar_handshake_cpu_seconds_total",
                 "sidecar_connections_active", "sidecar_connections_total",
                 "sidecar_bytes_total", "sidecar_authz_decisions_total",
                 "sidecar_svid_expiry_timestamp_seconds",
                 "sidecar_bundle_expiry_timestamp_seconds", "sidecar_reloads_total",
                 "sidecar_ktls_connections_total", "sidecar_worker_restarts_total"):
        assert f"# TYPE {name}" in text or f"# TYPE {name.removesuffix('_total')}" in text, name


def test_healthz_answers_ok() -> None:
    assert admin.answer(get("/healthz"), probe())[0] == "200 OK"


def test_readyz_is_503_with_the_reason_when_not_ready() -> None:
    status, _, body = admin.answer(get("/readyz"), probe("draining"))
    assert status.startswith("503") and b"draining" in body
    assert admin.answer(get("/readyz"), probe(None))[0] == "200 OK"


def test_status_is_json() -> None:
    status, ctype, body = admin.answer(get("/status"), probe())
    assert status == "200 OK" and ctype == "application/json"
    assert json.loads(body)["spiffe_id"] == "spiffe://td/x"


@pytest.mark.parametrize(("head", "code"), [
    (b"garbage\r\n\r\n", "400"),
    (get("/metrics", "POST"), "405"),
    (get("/nope"), "404"),
    (b"GET /metrics\r\n\r\n", "400"),
])
def test_bad_requests_get_a_clear_status(head: bytes, code: str) -> None:
    assert admin.answer(head, probe())[0].startswith(code)


async def test_a_real_server_answers_on_loopback() -> None:
    metrics.reloads.labels("svid", "ok").inc()
    server = await admin.start("127.0.0.1", 0, probe())
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/metrics"))
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b'sidecar_reloads_total{kind="svid",result="ok"}' in response
    finally:
        server.close()
        await server.wait_closed()


async def test_a_client_that_sends_nothing_is_dropped_and_others_still_served() -> None:
    server = await admin.start("127.0.0.1", 0, probe())
    port = server.sockets[0].getsockname()[1]
    try:
        _silent = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/healthz"))
        assert (await asyncio.wait_for(reader.read(), 5)).endswith(b"ok\n")
        writer.close()
        _silent[1].close()
    finally:
        server.close()
        await server.wait_closed()
