"""`sidecar bench` against real servers on 127.0.0.1: an in-test mTLS echo server (threads
and stdlib ssl, exporting its own handshake counters under the SPEC's metric names),
`openssl s_server`, a refused port and a plaintext server. Certificates come from
`sidecar.tools.pki`; nothing is mocked. Every server a test starts is stopped by its fixture.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server
from told_port import start_listening

from sidecar.tools import pki
from sidecar.tools.bench import command as bench

pytestmark = pytest.mark.timeout(30)

TRUST_DOMAIN = "example.org"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/payments"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/web/sa/frontend"
IO_TIMEOUT = 5.0  # any one socket operation of a test server
RUN = ["--duration", "500ms", "--concurrency", "2", "--timeout", "3s"]


@dataclass(frozen=True)
class Files:
    server: pki.LayoutFiles
    server_dir: Path
    client_dir: Path

    def path(self, side: str, name: str) -> str:
        return str((self.server_dir if side == "server" else self.client_dir) / name)

    @property
    def client_args(self) -> list[str]:
        c = pki.Layout.SPIFFE_HELPER.files
        return ["--cert", self.path("client", c.cert), "--key", self.path("client", c.key),
                "--bundle", self.path("client", c.bundle)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = pki.new_root(TRUST_DOMAIN)
    inter = pki.new_intermediate(root)
    base = tmp_path_factory.mktemp("bench")
    server = pki.write_svid(base / "server", pki.issue_svid(inter, SERVER_ID), [root.cert])
    pki.write_svid(base / "client", pki.issue_svid(inter, CLIENT_ID), [root.cert])
    return Files(server, base / "server", base / "client")


# --- an mTLS echo server ---------------------------------------------------------------


class EchoServer:
    """Echoes what each mTLS client sends; counts handshakes and their CPU as a sidecar
    does, in its own registry, served on its own /metrics."""

    def __init__(self, files: Files, delay: float = 0.0) -> None:
        f = files.server
        self.delay = delay  # before each answer: a slow app
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(files.path("server", f.cert), files.path("server", f.key))
        self.ctx.load_verify_locations(files.path("server", f.bundle))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.registry = CollectorRegistry()
        self.handshakes = Counter("sidecar_handshakes_total", "handshakes",
                                  ["direction", "listener", "result", "resumed"],
                                  registry=self.registry)
        self.cpu = Counter("sidecar_handshake_cpu_seconds_total", "handshake CPU",
                           ["direction", "listener", "resumed"], registry=self.registry)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # how often the accept loop looks at _stop
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http: Any = None

    def start(self) -> None:
        self._spawn(self._accept_loop)

    def metrics_url(self) -> str:
        self._http, _ = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        return f"http://127.0.0.1:{self._http.server_port}/metrics"

    def stop(self) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(IO_TIMEOUT)
        self._listener.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._spawn(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(IO_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with self.ctx.wrap_socket(raw, server_side=True,
                                      do_handshake_on_connect=False) as tls:
                cpu = time.thread_time()
                tls.do_handshake()
                cpu = time.thread_time() - cpu
                resumed = "true" if tls.session_reused else "false"
                self.handshakes.labels("inbound", "echo", "ok", resumed).inc()
                self.cpu.labels("inbound", "echo", resumed).inc(cpu)
                while data := tls.recv(65536):
                    if self.delay:
                        self._stop.wait(self.delay)
                    tls.sendall(data)
        except OSError:
            pass  # a client the handshake refused, or one that went away: bench counts it
        finally:
            raw.close()


@pytest.fixture
def echo(files: Files) -> Iterator[EchoServer]:
    server = EchoServer(files)
    server.start()
    yield server
    server.stop()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """bench.main with --json: (exit code, parsed stdout or None, stderr)."""
    code = bench.main([*args, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, (json.loads(out) if out.strip() else None), err


# --- modes against the echo server -----------------------------------------------------


def test_full_mode_never_resumes(echo: EchoServer, files: Files,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, _ = run(capsys, "--target", f"127.0.0.1:{echo.port}", *files.client_args,
                        "--expect-id", SERVER_ID, "--mode", "full",
                        "--metrics", echo.metrics_url(), *RUN)
    assert code == 0
    [row] = rows
    assert row["mode"] == "full" and row["errors"] == 0 and row["requests"] > 10
    assert row["resumed"] == 0 and row["resumption_ratio"] == 0
    assert row["connections"] == row["handshakes"] == row["requests"]
    assert row["client_cpu_per_full_handshake_ms"] > 0
    assert row["latency_p50_ms"] <= row["latency_p90_ms"] <= row["latency_p99_ms"]
    # The target's own counters agree with what the bench did.
    assert row["server_handshakes"] == row["handshakes"]
    assert row["server_cpu_per_full_handshake_ms"] > 0
    assert row["server_cpu_per_resumed_handshake_ms"] is None


def test_resume_mode_resumes_every_counted_handshake(
        echo: EchoServer, files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, _ = run(capsys, "--target", f"127.0.0.1:{echo.port}", *files.client_args,
                        "--mode", "resume", "--metrics", echo.metrics_url(), *RUN)
    assert code == 0
    [row] = rows
    assert row["errors"] == 0 and row["handshakes"] > 10
    # Each worker's first, full handshake is made before the clock and the counters.
    assert row["resumed"] == row["handshakes"] and row["resumption_ratio"] == 1
    assert row["server_handshakes"] == row["handshakes"]
    assert row["server_cpu_per_resumed_handshake_ms"] > 0


def test_reuse_mode_handshakes_once_per_worker(
        echo: EchoServer, files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, _ = run(capsys, "--target", f"127.0.0.1:{echo.port}", *files.client_args,
                        "--mode", "reuse", "--request-bytes", "1000", *RUN)
    assert code == 0
    [row] = rows
    assert row["handshakes"] == row["connections"] == 2
    assert row["requests"] > row["handshakes"] * 10 and row["errors"] == 0
    assert row["server_cpu_per_handshake_ms"] is None  # no --metrics


def test_all_modes_and_a_request_cap(echo: EchoServer, files: Files,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, _ = run(capsys, "--target", f"127.0.0.1:{echo.port}", *files.client_args,
                        "--requests", "7", *RUN)
    assert code == 0
    assert [r["mode"] for r in rows] == ["full", "resume", "reuse"]
    assert [r["requests"] for r in rows] == [7, 7, 7]


def test_no_echo_reads_what_comes_back(echo: EchoServer, files: Files,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # 10 of the 64 echoed bytes are enough; the rest is dropped with the connection.
    code, rows, _ = run(capsys, "--target", f"127.0.0.1:{echo.port}", *files.client_args,
                        "--mode", "resume", "--no-echo", "--response-bytes", "10", *RUN)
    assert code == 0
    assert rows[0]["errors"] == 0 and rows[0]["requests"] > 10


def test_tls12_resumes_too(echo: EchoServer, files: Files,
                           capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, _ = run(capsys, "--target", f"127.0.0.1:{echo.port}", *files.client_args,
                        "--mode", "resume", "--tls-min", "1.2", "--tls-max", "1.2", *RUN)
    assert code == 0
    assert rows[0]["errors"] == 0 and rows[0]["resumption_ratio"] > 0.8


def test_table_output_and_plot(echo: EchoServer, files: Files, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    code = bench.main(["--target", f"127.0.0.1:{echo.port}", *files.client_args,
                       "--requests", "5", "--plot", str(png), *RUN])
    out, err = capsys.readouterr()
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["mode", "conn/s", "hs/s", "req/s"]
    assert [line.split()[0] for line in lines] == ["full", "resume", "reuse"]
    assert png.read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib_says_what_to_install(
        files: Files, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code = bench.main(["--target", "127.0.0.1:1", "--plot", str(tmp_path / "x.png")])
    assert code == 2
    assert "pip install 'sidecar[plot]'" in capsys.readouterr().err


# --- failures: one clear line per kind, never a traceback ------------------------------


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port kept bound and never listening while the test runs: connecting is refused,
    and no other process can take it and answer (as it could a port bound and closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_refused_port_fails_fast_and_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    with refused_port() as port:
        code, rows, err = run(capsys, "--target", f"127.0.0.1:{port}", "--mode", "full",
                              "--duration", "30s")
    assert code == 1
    # Stopped once nothing could succeed (20 refusals: milliseconds), far before its
    # duration; the margin is for a loaded machine, not for the bench.
    assert time.monotonic() - started < 10
    assert rows[0]["requests"] == 0 and rows[0]["errors"] >= bench.MAX_FUTILE_ATTEMPTS
    [kind] = rows[0]["error_kinds"]
    assert kind["kind"] == "connect_refused"
    assert "refused the connection" in err and "no request" in err


def test_wrong_server_id_counts_as_an_error(echo: EchoServer, files: Files,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, err = run(capsys, "--target", f"127.0.0.1:{echo.port}", *files.client_args,
                          "--expect-id", f"spiffe://{TRUST_DOMAIN}/ns/other/sa/x",
                          "--mode", "full", *RUN)
    assert code == 1
    assert rows[0]["error_kinds"][0]["kind"] == "spiffe_id_mismatch"
    assert f"the server is {SERVER_ID}" in err


@pytest.fixture
def not_tls() -> Iterator[int]:
    """A plaintext server that answers anything with an HTTP error and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(IO_TIMEOUT)
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(IO_TIMEOUT)
    listener.close()


def test_plaintext_target_is_named_not_tls(not_tls: int, files: Files,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, err = run(capsys, "--target", f"127.0.0.1:{not_tls}", *files.client_args,
                          "--mode", "full", *RUN)
    assert code == 1
    assert rows[0]["error_kinds"][0]["kind"] == "not_tls"
    assert "did not speak TLS" in err


# --- openssl s_server with client auth -------------------------------------------------


@pytest.fixture
def s_server(files: Files) -> Iterator[int]:
    """`openssl s_server -rev`, requiring and verifying a client certificate."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH: cannot start s_server")
    f = files.server
    proc, port = start_listening(lambda port: [
        openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-quiet", "-rev",
        "-cert", files.path("server", f.cert), "-cert_chain", files.path("server", f.cert),
        "-key", files.path("server", f.key), "-CAfile", files.path("server", f.bundle),
        "-Verify", "1", "-verify_return_error"], "openssl s_server",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("mode", ["full", "resume"])
def test_openssl_s_server(s_server: int, files: Files, mode: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    # s_server serves one connection at a time; the palindromic request survives -rev.
    code, rows, err = run(capsys, "--target", f"127.0.0.1:{s_server}", *files.client_args,
                          "--expect-id", SERVER_ID, "--mode", mode,
                          "--duration", "500ms", "--concurrency", "1")
    assert code == 0, err
    [row] = rows
    assert row["errors"] == 0 and row["requests"] > 5
    if mode == "full":
        assert row["resumption_ratio"] == 0
    else:
        assert row["resumption_ratio"] > 0.8


def test_openssl_s_server_refuses_a_client_without_certificate(
        s_server: int, files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = files.path("client", pki.Layout.SPIFFE_HELPER.files.bundle)
    code, rows, err = run(capsys, "--target", f"127.0.0.1:{s_server}", "--bundle", bundle,
                          "--mode", "full", "--duration", "2s", "--concurrency", "1")
    assert code == 1
    assert rows[0]["error_kinds"][0]["kind"] == "no_client_cert"
    assert "the server refused us" in err


# --- the target's metrics, and the pure parts ------------------------------------------

# From a real `sidecar run`'s /metrics after a bench run, with an outbound and a failed
# handshake added in the same format (long numbers shortened): only inbound, successful
# handshakes count.
SAMPLE = """\
# HELP sidecar_handshakes_total TLS handshakes, by outcome and resumption
# TYPE sidecar_handshakes_total counter
sidecar_handshakes_total{direction="inbound",listener="app",result="ok",resumed="false"} 572.0
sidecar_handshakes_total{direction="inbound",listener="app",result="ok",resumed="true"} 1482.0
sidecar_handshakes_total{direction="inbound",listener="app",result="error",resumed="false"} 3.0
sidecar_handshakes_total{direction="outbound",listener="pay",result="ok",resumed="false"} 9.0
# HELP sidecar_handshakes_created TLS handshakes, by outcome and resumption
# TYPE sidecar_handshakes_created gauge
sidecar_handshakes_created{direction="inbound",listener="app",result="ok",resumed="false"} 1.79e+09
# HELP sidecar_handshake_cpu_seconds_total CPU time this process spent inside TLS handshake steps
# TYPE sidecar_handshake_cpu_seconds_total counter
sidecar_handshake_cpu_seconds_total{direction="inbound",listener="app",resumed="false"} 0.74594153
sidecar_handshake_cpu_seconds_total{direction="inbound",listener="app",resumed="true"} 1.14730256
sidecar_handshake_cpu_seconds_total{direction="outbound",listener="pay",resumed="false"} 5.0
# HELP sidecar_connections_total Accepted connections
# TYPE sidecar_connections_total counter
sidecar_connections_total{direction="inbound",listener="app"} 2054.0
"""


def test_handshake_cost_reads_inbound_ok_handshakes_only() -> None:
    cost = bench.handshake_cost(SAMPLE)
    assert (cost.ok_full, cost.ok_resumed) == (572, 1482)
    assert cost.cpu_full == pytest.approx(0.74594153)
    assert cost.cpu_resumed == pytest.approx(1.14730256)
    delta = cost - bench.handshake_cost(SAMPLE.replace("572.0", "500.0"))
    assert delta.handshakes == 72 and delta.cpu_full == 0


def test_summarize_splits_server_cpu_by_resumption() -> None:
    server = bench.HandshakeCost(ok_full=10, ok_resumed=90, cpu_full=0.02, cpu_resumed=0.045)
    row = bench.summarize(bench.ConnectionMode.RESUME, [bench.Tally()], 1.0, server)
    assert row.server_cpu_per_full_handshake_ms == pytest.approx(2.0)
    assert row.server_cpu_per_resumed_handshake_ms == pytest.approx(0.5)
    assert row.server_cpu_per_handshake_ms == pytest.approx(0.65)
    assert row.resumption_ratio is None and row.latency_p50_ms is None


def test_scrape_of_nothing_says_why() -> None:
    with refused_port() as port:
        why = bench.scrape(f"http://127.0.0.1:{port}/metrics", 2.0)
    assert isinstance(why, str) and why.startswith("cannot read")


@pytest.mark.parametrize("size", [1, 2, 3, 64, 65, 1000])
def test_request_is_a_palindromic_line(size: int) -> None:
    payload = bench.request_payload(size)
    assert len(payload) == size and payload.endswith(b"\n")
    assert payload[:-1] == payload[:-1][::-1]  # what `openssl s_server -rev` sends back


def test_percentiles_are_nearest_rank() -> None:
    ordered = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert bench.percentile_ms(ordered, 50) == 50
    assert bench.percentile_ms(ordered, 99) == 99
    assert bench.percentile_ms([0.005], 90) == 5
    assert bench.percentile_ms([], 50) is None


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--target", "127.0.0.1:1", "--response-bytes", "10"]) == 2
    assert "--no-echo" in capsys.readouterr().err
    assert bench.main(["--target", "nowhere"]) == 2
    assert bench.main(["--target", "127.0.0.1:1", "--cert", "x.pem"]) == 2
    assert bench.main(["--target", "127.0.0.1:1", "--duration", "10"]) == 2


# --- the built-in echo target (`sidecar bench echo`), as a real subprocess --------------


@dataclass(frozen=True)
class BuiltinEcho:
    port: int
    metrics_url: str
    pid: int


@contextlib.contextmanager
def builtin_echo(*args: str) -> Iterator[BuiltinEcho]:
    """`sidecar bench echo ARGS --metrics-listen 127.0.0.1:0`, stopped by SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "bench", "echo", "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        listening, metrics = proc.stdout.readline(), proc.stdout.readline()
        if not metrics.startswith("metrics on "):
            proc.kill()
            pytest.fail(f"bench echo did not start: {listening}{metrics}"
                        f"{proc.communicate(timeout=IO_TIMEOUT)[1]}")
        port = int(listening.split()[3].rsplit(":", 1)[1])
        yield BuiltinEcho(port, metrics.removeprefix("metrics on ").strip(), proc.pid)
    finally:
        proc.terminate()
        try:
            code = proc.wait(IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(IO_TIMEOUT)
            raise
    assert code == 0  # SIGTERM is its ordinary way to stop


def test_builtin_echo_plain_tcp_echoes_and_exports_process_cpu() -> None:
    with builtin_echo() as target:
        with socket.create_connection(("127.0.0.1", target.port), timeout=IO_TIMEOUT) as s:
            s.sendall(b"hello, echo\n")
            got = b""
            while len(got) < 12:
                chunk = s.recv(64)
                assert chunk
                got += chunk
        assert got == b"hello, echo\n"
        cost = bench.scrape(target.metrics_url, IO_TIMEOUT)
        assert isinstance(cost, bench.HandshakeCost)
        assert cost.process_cpu is not None and cost.process_cpu > 0


def test_builtin_echo_tls_requires_a_client_certificate(
        files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    f = files.server
    with builtin_echo("--cert", files.path("server", f.cert), "--key",
                      files.path("server", f.key), "--bundle",
                      files.path("server", f.bundle)) as target:
        code, rows, _ = run(capsys, "--target", f"127.0.0.1:{target.port}",
                            *files.client_args, "--expect-id", SERVER_ID, "--mode", "reuse",
                            *RUN)
        assert code == 0 and rows[0]["errors"] == 0 and rows[0]["requests"] > 10
        bundle = files.path("client", pki.Layout.SPIFFE_HELPER.files.bundle)
        code, rows, _ = run(capsys, "--target", f"127.0.0.1:{target.port}", "--bundle",
                            bundle, "--mode", "full", *RUN)
        assert code == 1 and rows[0]["requests"] == 0


def test_builtin_echo_usage_errors() -> None:
    assert bench.main(["echo", "--cert", "x.pem"]) == 2
    assert bench.main(["echo", "--listen", "nowhere"]) == 2


# --- the sweep: requests per connection against CPU per request -------------------------


def by_point(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["mode"], r["per_connection"]): r for r in rows}


@pytest.mark.timeout(120)  # 8 points of up to 2 s each, on a machine that may be loaded
def test_sweep_against_the_builtin_echo(files: Files, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    f = files.server
    png = tmp_path / "sweep.png"
    with builtin_echo("--cert", files.path("server", f.cert), "--key",
                      files.path("server", f.key), "--bundle",
                      files.path("server", f.bundle)) as target:
        code, out, err = run(capsys, "--target", f"127.0.0.1:{target.port}",
                             *files.client_args, "--sweep", "--requests", "1000",
                             "--duration", "2s", "--concurrency", "1", "--timeout", "3s",
                             "--target-metrics", target.metrics_url, "--plot", str(png))
    assert code == 0, err
    points = by_point(out["points"])
    assert sorted(points) == sorted((m, n) for m in ("full", "resume")
                                    for n in (1, 10, 100, 1000))
    for (mode, n), row in points.items():
        assert row["errors"] == 0 and row["requests"] > 0, (mode, n)
        assert row["resumption_ratio"] == (0 if mode == "full" else 1), (mode, n)
        assert row["connections"] == -(-row["requests"] // n), (mode, n)
        assert row["latency_p50_ms"] <= row["latency_p99_ms"] <= row["latency_p999_ms"]
    for mode in ("full", "resume"):
        one, thousand = points[mode, 1], points[mode, 1000]
        # A handshake per request costs far more than one per thousand, on both sides.
        assert thousand["server_cpu_per_request_ms"] * 3 < one["server_cpu_per_request_ms"]
        assert thousand["client_cpu_per_request_ms"] * 3 < one["client_cpu_per_request_ms"]
        assert thousand["requests_per_s"] > one["requests_per_s"]
    found = {b["mode"]: b for b in out["break_even"]}
    assert set(found) == {"full", "resume"}
    for b in found.values():
        assert b["side"] == "server" and b["setup_ms"] > b["request_ms"] > 0
        assert 1 < b["per_connection"] < 10_000
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.timeout(60)
def test_sweep_table_names_the_break_even(files: Files,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with builtin_echo("--cert", files.path("server", files.server.cert), "--key",
                      files.path("server", files.server.key)) as target:
        code = bench.main(["--target", f"127.0.0.1:{target.port}", *files.client_args,
                           "--sweep", "--requests", "100", "--duration", "300ms",
                           "--concurrency", "1", "--target-pid", str(target.pid)])
    out, err = capsys.readouterr()
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["mode", "req/conn", "req/s"]
    assert [tuple(line.split()[:2]) for line in rows[:8]] == [
        (m, str(n)) for n in (1, 10, 100, 1000) for m in ("full", "resume")]
    assert "break-even at" in out and "server CPU" in out  # from /proc, by --target-pid


def test_fit_and_break_even_from_the_sweeps_ends() -> None:
    assert bench.fit([(1, 2.05), (10, 0.25), (1000, 0.052)]) == pytest.approx((2.0, 0.05))
    assert bench.fit([(10, 1.0), (10, 2.0)]) is None
    rows = [bench.summarize(bench.ConnectionMode.FULL, [bench.Tally()], 1.0, None, per_connection=n)
            for n in (1, 1000)]
    assert bench.break_even(rows) == []  # no requests, no figures: nothing to say
    point = bench.BreakEven("full", "server", setup_ms=2.0, request_ms=0.05)
    assert point.per_connection == pytest.approx(40)


def test_process_cpu_is_read_from_the_targets_metrics() -> None:
    # As prometheus_client's process collector writes it.
    text = SAMPLE + ("# HELP process_cpu_seconds_total Total user and system CPU time\n"
                     "# TYPE process_cpu_seconds_total counter\n"
                     "process_cpu_seconds_total 12.5\n")
    assert bench.handshake_cost(text).process_cpu == 12.5
    assert bench.handshake_cost(SAMPLE).process_cpu is None
    later = bench.handshake_cost(text.replace("12.5", "14.0"))
    assert (later - bench.handshake_cost(text)).process_cpu == pytest.approx(1.5)
    assert (later - bench.handshake_cost(SAMPLE)).process_cpu is None


# --- open loop: a fixed arrival rate, latencies from when each request was due ----------


def test_open_loop_keeps_its_rate(echo: EchoServer, files: Files,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, err = run(capsys, "--target", f"127.0.0.1:{echo.port}", *files.client_args,
                          "--mode", "reuse", "--rate", "200", "--duration", "1s",
                          "--concurrency", "2", "--timeout", "3s")
    assert code == 0, err
    [row] = rows
    assert row["target_rate"] == 200 and row["errors"] == 0
    # 200 arrivals are due within the second; none early, none beyond the deadline.
    assert 180 <= row["requests"] <= 200
    assert 170 <= row["requests_per_s"] <= 210
    assert row["latency_p50_ms"] is not None and row["latency_p999_ms"] is not None


def test_open_loop_counts_latency_from_when_a_request_was_due(
        files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    # A server that takes 20 ms per answer, asked 100 times a second by one worker: in a
    # closed loop every latency would read ~20 ms; the users behind an open loop's
    # arrivals queue up, and their wait counts (coordinated omission, corrected).
    server = EchoServer(files, delay=0.02)
    server.start()
    try:
        code, rows, err = run(capsys, "--target", f"127.0.0.1:{server.port}",
                              *files.client_args, "--mode", "reuse", "--rate", "100",
                              "--duration", "1s", "--concurrency", "1", "--timeout", "3s")
    finally:
        server.stop()
    assert code == 0, err
    [row] = rows
    assert row["requests"] <= 55  # at most one answer per 20 ms
    assert row["latency_p50_ms"] > 100 and row["latency_p99_ms"] > 300


def test_open_loop_without_hdrhistogram_says_what_to_install(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hdrh" else real(name, *a))
    assert bench.main(["--target", "127.0.0.1:1", "--rate", "10"]) == 2
    assert "pip install 'sidecar[bench]'" in capsys.readouterr().err
    assert bench.main(["--target", "127.0.0.1:1", "--rate", "0"]) == 2


def test_plain_sweep_to_a_plain_echo(capsys: pytest.CaptureFixture[str]) -> None:
    # --plain stands for an app talking to its sidecar's outbound listener; the built-in
    # plain echo stands in for the outbound here (no TLS on either side).
    with builtin_echo() as target:
        code, out, err = run(capsys, "--target", f"127.0.0.1:{target.port}", "--plain",
                             "--sweep", "--requests", "200", "--duration", "300ms",
                             "--concurrency", "1", "--target-pid", str(target.pid))
    assert code == 0, err
    rows = out["points"]
    assert [(r["mode"], r["per_connection"]) for r in rows] == [
        ("plain", n) for n in (1, 10, 100, 1000)]
    assert all(r["handshakes"] == 0 and r["errors"] == 0 for r in rows)
    assert rows[-1]["connections"] == 1 and rows[0]["connections"] == rows[0]["requests"]
    assert bench.main(["--target", "127.0.0.1:1", "--plain", "--mode", "resume"]) == 2


def test_plain_with_a_resumed_target_runs_resume_mode_there(
        capsys: pytest.CaptureFixture[str]) -> None:
    # Two outbound listeners in real use (resumption off and on); two echoes here.
    with builtin_echo() as full, builtin_echo() as resumed:
        code, rows, err = run(capsys, "--target", f"127.0.0.1:{full.port}", "--plain",
                              "--resumed-target", f"127.0.0.1:{resumed.port}",
                              "--requests", "20", "--concurrency", "1", "--duration", "2s",
                              "--target-pid", str(resumed.pid))
    assert code == 0, err
    assert [(r["mode"], r["requests"]) for r in rows] == [
        ("full", 20), ("resume", 20), ("reuse", 20)]
    assert bench.main(["--target", "127.0.0.1:1", "--resumed-target", "127.0.0.1:2"]) == 2
    assert "goes with --plain" in capsys.readouterr().err
