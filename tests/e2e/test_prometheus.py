"""A real Prometheus scrapes a real sidecar (issue 20, items 4 and 5).

Debian's `prometheus` package (2.42, with `promtool`) runs here with a generated config:
it scrapes the sidecar's admin port every second, loads examples/prometheus/alerts.yaml,
keeps its storage in tmp_path and serves its API on a free loopback port. After some
traffic (full and resumed handshakes, an allowed and a denied caller, a handshake that
fails) the test asks the HTTP API for series, and runs every query of the Grafana
dashboard (examples/grafana/sidecar.json): each must return data. Single process and
`workers: 2`. `promtool check metrics` judges /metrics, and `promtool test rules` the
alert rules' unit tests.

Without the binaries the tests are skipped, unless CI is set (.ci/run installs them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    BATCH,
    FRONTEND,
    IO_TIMEOUT,
    PAYMENTS,
    REPO,
    EchoApp,
    Pki,
    Sidecar,
    TlsClient,
    recv_all,
    wait_for,
    write_svid_dir,
)
from .test_live_changes import admin_get

pytestmark = pytest.mark.timeout(120)

EXAMPLES = REPO / "examples"
SCRAPE_EVERY = "1s"
PROMETHEUS_START = 30.0  # seconds for Prometheus to answer /-/ready on a loaded machine
SCRAPED = 30.0  # seconds for a target to be up, or a value to show in a query


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs Debian's prometheus "
                        "package (apt-get install prometheus)")
        pytest.skip(f"{name} not installed (apt-get install prometheus); CI runs this")
    return found


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}",
                                    timeout=IO_TIMEOUT) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]  # type: ignore[no-any-return]

    def value(self, promql: str) -> float:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else math.nan

    def target_up(self) -> bool:
        targets = self.api("targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)


def _free_port() -> int:
    # Prometheus cannot be told port 0 and say which it took: take one the kernel just
    # gave out. Another process could grab it first; the start is retried then.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_prometheus(tmp_path: Path, admin_port: int) -> Prometheus:
    binary = _binary("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": SCRAPE_EVERY, "evaluation_interval": SCRAPE_EVERY},
        "rule_files": [str(EXAMPLES / "prometheus" / "alerts.yaml")],
        "scrape_configs": [{"job_name": "sidecar",
                            "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}]}],
    }))
    log = tmp_path / "prometheus.log"
    for _ in range(3):
        port = _free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT)
        prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
        if _until_ready(prom):
            return prom
        _stop(prom)
    pytest.fail(f"prometheus did not start; its log:\n{log.read_text()[-3000:]}")


def _until_ready(prom: Prometheus) -> bool:
    def ready() -> bool:
        if prom.proc.poll() is not None:
            return True
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_for(ready, PROMETHEUS_START, "prometheus to be ready")
    return prom.proc.poll() is None


def _stop(prom: Prometheus) -> None:
    prom.proc.terminate()
    try:
        prom.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        prom.proc.kill()
        prom.proc.wait(timeout=5)


@pytest.fixture(params=[1, 2], ids=["single", "workers2"])
def scraped(request: pytest.FixtureRequest, tmp_path: Path, ca: Pki,
            echo_app: Callable[..., EchoApp]) -> Iterator[tuple[Sidecar, Prometheus]]:
    """A sidecar (one process, or `workers: 2`) and a Prometheus scraping it."""
    _binary("prometheus")
    app = echo_app()
    (tmp_path / "policy.yaml").write_text(json.dumps({"default": "deny", "rules": [
        {"name": "frontend", "action": "allow", "from": [FRONTEND]}]}))
    config = {
        "identity": write_svid_dir(tmp_path / "svid", ca.svid(PAYMENTS), ca.bundle),
        "inbound": [{"name": "in", "listen": "127.0.0.1:0", "forward_to": app.address}],
        "policy": str(tmp_path / "policy.yaml"), "workers": request.param,
        "admin": {"listen": "127.0.0.1:0"}, "drain_timeout": "5s",
        "log": {"level": "info", "format": "json"}}
    path = tmp_path / "sidecar.yaml"
    path.write_text(json.dumps(config))
    sc = Sidecar("scraped", path, "uvloop")
    sc.start()
    prom = _start_prometheus(tmp_path, sc.port("admin"))
    try:
        yield sc, prom
    finally:
        _stop(prom)
        assert sc.stop() == 0


def _call(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
          ) -> ssl.SSLSession | None:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw, \
            ctx.wrap_socket(raw, session=session) as s:
        s.sendall(b"x" * 1000)
        assert recv_all(s, 1000) == b"x" * 1000
        return s.session


def _traffic(sc: Sidecar, ca: Pki, client: TlsClient) -> int:
    """Full and resumed handshakes of an allowed caller, a denied caller, a caller with no
    certificate; the number of successful handshakes."""
    port = sc.port("in")
    ctx = client.context(ca.svid(FRONTEND))
    for _ in range(5):
        _call(port, ctx)
    session = _call(port, ctx)
    for _ in range(10):
        session = _call(port, ctx, session) or session
    denied = client.exchange(port, client.context(ca.svid(BATCH)))
    assert denied.handshake_error is None
    no_cert = client.exchange(port, client.context(None))
    assert no_cert.received == b""
    sc.wait_connections(18)
    return 17


def test_prometheus_scrapes_the_sidecar_and_every_dashboard_query_has_data(
    scraped: tuple[Sidecar, Prometheus], ca: Pki, tls_client: TlsClient
) -> None:
    sc, prom = scraped
    wait_for(prom.target_up, SCRAPED, "the sidecar's target to be up in prometheus")
    ok = _traffic(sc, ca, tls_client)
    wait_for(lambda: prom.value('sum(sidecar_handshakes_total{result="ok"})') >= ok,
             SCRAPED, f"prometheus to see {ok} handshakes")
    assert prom.value('sum(sidecar_handshakes_total{result="ok",resumed="true"})') >= 5
    assert prom.value('sum(sidecar_authz_decisions_total{decision="deny"})') == 1
    assert prom.value('sidecar_handshake_errors_total{reason="no_client_cert"}') == 1
    # Present at 0 before anything happened: every reason of the listener.
    assert prom.value('count(sidecar_handshake_errors_total{listener="in"})') >= 18
    assert prom.value("sidecar_build_info") == 1
    assert prom.value("process_cpu_seconds_total") > 0
    assert prom.value("process_resident_memory_bytes") > 10_000_000
    assert prom.value('sum(sidecar_upstream_connect_duration_seconds_count)') >= 16
    for title, expr in _dashboard_queries():
        result = prom.query(expr)
        values = [float(r["value"][1]) for r in result]
        assert any(math.isfinite(v) for v in values), f"panel {title!r}: {expr} -> {result}"
    rules = prom.api("rules")["groups"]
    assert len(rules[0]["rules"]) == 7 and all(r["health"] == "ok" for r in rules[0]["rules"])


def _dashboard_queries() -> list[tuple[str, str]]:
    """Every panel query of the shipped dashboard, with Grafana's variables filled in as
    Grafana would for "all instances" and a 1 s scrape interval (4 scrapes, rounded up)."""
    board = json.loads((EXAMPLES / "grafana" / "sidecar.json").read_text())
    queries = [(p["title"], t["expr"].replace("$instance", ".*")
                .replace("$__rate_interval", "1m"))
               for p in board["panels"] for t in p["targets"]]
    assert len(queries) >= 9
    return queries


def test_the_dashboard_json_is_what_its_generator_writes() -> None:
    run = subprocess.run([sys.executable, "-c", "import generate; print(generate.render(), "
                          "end='')"], cwd=EXAMPLES / "grafana", capture_output=True,
                         text=True, timeout=30, check=True)
    assert run.stdout == (EXAMPLES / "grafana" / "sidecar.json").read_text(), \
        "run python examples/grafana/generate.py"
    titles = {p["title"] for p in json.loads(run.stdout)["panels"]}
    assert {"Handshakes: full vs resumed", "Handshake CPU per handshake", "Resumption ratio",
            "Handshake errors by reason", "Authorization decisions", "Expiry countdown",
            "Connections", "Bytes", "Event-loop lag"} <= titles


@pytest.mark.parametrize("workers", [1, 2])
def test_promtool_check_metrics_passes_on_the_exposition(
    workers: int, tmp_path: Path, ca: Pki, echo_app: Callable[..., EchoApp],
    tls_client: TlsClient
) -> None:
    promtool = _binary("promtool")
    app = echo_app()
    (tmp_path / "policy.yaml").write_text(json.dumps({"default": "deny", "rules": [
        {"name": "frontend", "action": "allow", "from": [FRONTEND]}]}))
    path = tmp_path / "sidecar.yaml"
    path.write_text(json.dumps({
        "identity": write_svid_dir(tmp_path / "svid", ca.svid(PAYMENTS), ca.bundle),
        "inbound": [{"name": "in", "listen": "127.0.0.1:0", "forward_to": app.address}],
        "policy": str(tmp_path / "policy.yaml"), "workers": workers,
        "admin": {"listen": "127.0.0.1:0"}, "drain_timeout": "5s",
        "log": {"level": "info", "format": "json"}}))
    sc = Sidecar("checked", path, "uvloop")
    sc.start()
    try:
        _traffic(sc, ca, tls_client)
        status, body = admin_get(sc, "/metrics")
    finally:
        assert sc.stop() == 0
    assert status == 200 and "sidecar_handshakes_total" in body
    run = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0 and not run.stdout.strip() and not run.stderr.strip(), \
        run.stdout + run.stderr


def test_the_alert_rules_pass_their_unit_tests() -> None:
    promtool = _binary("promtool")
    rules = EXAMPLES / "prometheus"
    check = subprocess.run([promtool, "check", "rules", "alerts.yaml"], cwd=rules,
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=rules,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout
