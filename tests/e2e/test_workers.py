"""`workers: 2` (issue 9): one port, two processes, one admin endpoint that sums them."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import (
    FRONTEND,
    IO_TIMEOUT,
    PAYMENTS,
    EchoApp,
    Pki,
    Sidecar,
    TlsClient,
    recv_all,
    wait_for,
    write_svid_dir,
)
from .test_idle import wait_quiet
from .test_live_changes import admin_get, metric

pytestmark = pytest.mark.timeout(90)


def _two_workers(tmp_path: Path, ca: Pki, inbound: dict[str, object], drain: str) -> Sidecar:
    """A started sidecar with `workers: 2`, one inbound listener, a policy allowing
    FRONTEND."""
    (tmp_path / "policy.yaml").write_text(json.dumps({"default": "deny", "rules": [
        {"name": "frontend", "action": "allow", "from": [FRONTEND]}]}))
    config = {
        "identity": write_svid_dir(tmp_path / "svid", ca.svid(PAYMENTS), ca.bundle),
        "inbound": [{"listen": "127.0.0.1:0", **inbound}],
        "policy": str(tmp_path / "policy.yaml"), "workers": 2,
        "admin": {"listen": "127.0.0.1:0"}, "drain_timeout": drain,
        "log": {"level": "info", "format": "json"}}
    path = tmp_path / "sidecar.yaml"
    path.write_text(json.dumps(config))
    sc = Sidecar("w", path, "uvloop")
    sc.start()
    return sc


@pytest.fixture
def pair(tmp_path: Path, ca: Pki, echo_app: Callable[..., EchoApp]):  # type: ignore[no-untyped-def]
    sc = _two_workers(tmp_path, ca, {"name": "in", "forward_to": echo_app().address}, "5s")
    yield sc
    assert sc.stop() == 0


def _status(sc: Sidecar) -> dict:  # type: ignore[type-arg]
    return json.loads(admin_get(sc, "/status")[1])  # type: ignore[no-any-return]


def _call(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
          ) -> tuple[bool, ssl.SSLSession | None]:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw, \
            ctx.wrap_socket(raw, session=session) as s:
        s.sendall(b"hello")
        assert recv_all(s, 5) == b"hello"
        return s.session_reused, s.session


def test_two_workers_share_the_port_and_the_metrics_add_up(
    pair: Sidecar, ca: Pki, tls_client: TlsClient
) -> None:
    ctx = tls_client.context(ca.svid(FRONTEND))
    port = pair.port("in")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: _call(port, ctx), range(200)))
    lines = pair.wait_connections(200)
    spread = Counter(ln.get("worker") for ln in lines)
    assert set(spread) == {0, 1} and min(spread.values()) >= 20, spread
    assert metric(pair, "sidecar_connections_total", direction="inbound", listener="in") == 200
    assert metric(pair, "sidecar_handshakes_total", result="ok", resumed="false") == 200
    assert [w["ready"] for w in _status(pair)["workers"]] == [True, True]


def test_tickets_resume_on_either_worker(pair: Sidecar, ca: Pki, tls_client: TlsClient) -> None:
    ctx = tls_client.context(ca.svid(FRONTEND))
    _, session = _call(pair.port("in"), ctx)
    resumed = 0
    for _ in range(20):
        again, session = _call(pair.port("in"), ctx, session)
        resumed += again
    lines = pair.wait_connections(21)
    assert {ln.get("worker") for ln in lines} == {0, 1}  # both workers took some
    assert resumed == 20


def test_a_killed_worker_is_replaced_and_counted(
    pair: Sidecar, ca: Pki, tls_client: TlsClient
) -> None:
    ctx = tls_client.context(ca.svid(FRONTEND))
    victim = _status(pair)["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    # Once the supervisor has seen it die (its socket is closed then; connections already
    # queued on a dying SO_REUSEPORT socket are reset by the kernel, whoever the proxy is),
    # the port keeps serving: the other worker takes everything.
    wait_for(lambda: _status(pair)["workers"][0]["pid"] != victim
             or not _status(pair)["workers"][0]["ready"], 10, "the death to be noticed")
    for _ in range(20):
        _call(pair.port("in"), ctx)
    wait_for(lambda: _status(pair)["workers"][0]["ready"]
             and _status(pair)["workers"][0]["pid"] != victim, 20, "the worker to come back")
    assert _status(pair)["workers"][0]["restarts"] == 1
    assert metric(pair, "sidecar_worker_restarts_total") == 1
    assert admin_get(pair, "/readyz")[0] == 200


def test_a_policy_change_reaches_every_worker(
    pair: Sidecar, ca: Pki, tls_client: TlsClient, tmp_path: Path
) -> None:
    ctx = tls_client.context(ca.svid(FRONTEND))
    (tmp_path / "policy.yaml").write_text(json.dumps({"default": "deny", "rules": []}))
    wait_for(lambda: sum(1 for ln in pair.lines if ln.get("msg") == "policy reloaded") >= 2,
             15, "both workers to reload the policy")
    workers = {ln.get("worker") for ln in pair.lines if ln.get("msg") == "policy reloaded"}
    assert workers == {0, 1}
    refused = 0
    for _ in range(20):
        try:
            _call(pair.port("in"), ctx)
        except (AssertionError, OSError):
            refused += 1
    assert refused == 20
    denied = pair.wait_connections(20, decision="deny")
    assert {ln.get("worker") for ln in denied} == {0, 1}


def test_a_workers_loop_lag_samples_reach_the_supervisors_metrics_once_it_is_idle(
    pair: Sidecar, ca: Pki, tls_client: TlsClient
) -> None:
    """A worker holds its loop-lag samples until a flush: the sweeper flushes while there
    are connections, but the probe goes on measuring past the last sweep (LAG_LINGER). The
    samples of those last ticks must still reach the files the supervisor sums, with no
    more traffic: one connection wakes the probe for the whole linger, every tick of it
    counted."""
    from sidecar.run.lifecycle import LAG_TICK
    from sidecar.run.server import LAG_LINGER

    def count() -> float:
        return metric(pair, "sidecar_event_loop_lag_seconds_count")

    before = count()
    _call(pair.port("in"), tls_client.context(ca.svid(FRONTEND)))
    ticks = round(LAG_LINGER / LAG_TICK)
    wait_for(lambda: count() >= before + ticks, 15,
             f"the {ticks} loop-lag samples of one connection's linger in the sum")


def test_auto_counts_the_cpus_this_process_may_use() -> None:
    from sidecar.run.workers import usable_cpus

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_an_idle_worker_reports_a_reload_to_the_supervisor(pair: Sidecar, tmp_path: Path) -> None:
    """Issue 21: a worker with no connection sleeps (no sweep, no report every second), so
    a reload must wake it to tell the supervisor: /status shows the new policy with no
    traffic at all."""
    before = {w["policy"]["version"] for w in _status(pair)["workers"]}
    for w in _status(pair)["workers"]:
        wait_quiet(w["pid"], per_second=0)  # asleep: their one tick after start is past
    (tmp_path / "policy.yaml").write_text(json.dumps({"default": "deny", "rules": []}))
    wait_for(lambda: sum(1 for ln in pair.lines if ln.get("msg") == "policy reloaded") >= 2,
             15, "both workers to reload the policy")
    new = {ln["version"] for ln in pair.lines if ln.get("msg") == "policy reloaded"}
    assert len(new) == 1 and new != before, (new, before)
    wait_for(lambda: [w["policy"]["version"] for w in _status(pair)["workers"]]
             == [*new] * 2, 10, "both workers' reports of the new policy")
    reloads = [w["reloads"]["policy"] for w in _status(pair)["workers"]]
    assert [r["trigger"] for r in reloads] == ["file change"] * 2, reloads


@pytest.fixture
def http_pair(tmp_path: Path, ca: Pki):  # type: ignore[no-untyped-def]
    from http_app import HttpApp
    app = HttpApp().start()
    sc = _two_workers(tmp_path, ca, {"name": "api", "forward_to": app.address,
                                     "protocol": "http"}, "20s")
    yield sc
    assert sc.stop() == 0
    app.close()


def _requests(sc: Sidecar) -> float:
    return metric(sc, "sidecar_http_requests_total", listener="api", decision="allow",
                  code="200")


def test_a_workers_http_requests_reach_the_supervisors_metrics_even_in_a_drain(
    http_pair: Sidecar, ca: Pki, tls_client: TlsClient
) -> None:
    """A worker hands its per-request counts (metrics.RequestTally) to the files the
    supervisor sums: those of requests just before a drain too, while the drain lasts."""
    from .http_support import Client, request
    client = Client.to(http_pair, tls_client)
    for _ in range(3):
        assert client.get("/counted").status == 200
    # An exchange under way (half its body sent) keeps the worker draining.
    client.send(request("POST", "/counted", body=b"0123456789")[:-5])
    os.kill(http_pair.pid, signal.SIGTERM)
    wait_for(lambda: _status(http_pair)["draining"], 10, "the drain to start")
    wait_for(lambda: _requests(http_pair) == 3, 10, "the 3 requests in the supervisor's sum")
    client.send(b"56789")
    assert client.response().status == 200
    client.close()
