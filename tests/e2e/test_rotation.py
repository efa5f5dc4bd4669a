"""Rotation without a dropped connection (issue 4): a soak per on-disk layout.

While `sidecar pki rotate` re-issues the inbound sidecar's SVID every second, in the way
each layout writes it (spiffe-helper in place, csi by rename, Kubernetes by `..data`
swap), new connections keep arriving through an outbound sidecar, long-lived streams keep
moving data, and a prober watches which certificate the inbound side serves. Every
handshake must succeed, every byte must come back, and every rotation must be served.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from sidecar.tools import pki

from .conftest import (
    FRONTEND,
    IO_TIMEOUT,
    PAYMENTS,
    REPO,
    TRUST_DOMAIN,
    EchoApp,
    Sidecar,
    recv_all,
)

SOAK_SECONDS = float(os.environ.get("SIDECAR_SOAK_SECONDS", "30"))
STREAMS = 3  # long-lived connections moving data for the whole soak
STREAM_CHUNK = 16 * 1024

pytestmark = pytest.mark.timeout(SOAK_SECONDS + 90)


def _config(path: Path, body: dict[str, object]) -> Path:
    base: dict[str, object] = {"admin": {"listen": "127.0.0.1:0"}, "drain_timeout": "5s",
                               "log": {"level": "info", "format": "json"}}
    path.write_text(json.dumps({**base, **body}, indent=2))
    return path


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections_ok = 0
        self.connections_failed: list[str] = []
        self.stream_bytes = 0
        self.stream_failures: list[str] = []
        self.served: set[int] = set()
        self.probe_failures: list[str] = []


def _short_connections(port: int, stop: threading.Event, counts: Counts) -> None:
    while not stop.is_set():
        payload = secrets.token_bytes(1024)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                back = recv_all(s)
        except OSError as exc:
            back = f"error: {exc}".encode()
        with counts.lock:
            if back == payload:
                counts.connections_ok += 1
            else:
                counts.connections_failed.append(back[:80].decode("latin-1"))
        stop.wait(0.02)  # a steady rate (~40/s), not a flood


def _stream(port: int, stop: threading.Event, counts: Counts) -> None:
    sent = hashlib.sha256()
    got = hashlib.sha256()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
            while not stop.is_set():
                chunk = secrets.token_bytes(STREAM_CHUNK)
                s.sendall(chunk)
                sent.update(chunk)
                back = b""
                while len(back) < len(chunk):
                    data = s.recv(len(chunk) - len(back))
                    if not data:
                        raise ConnectionError("the stream was cut")
                    back += data
                got.update(back)
                with counts.lock:
                    counts.stream_bytes += len(chunk)
            s.shutdown(socket.SHUT_WR)
            if recv_all(s) != b"" or sent.digest() != got.digest():
                raise ConnectionError("echoed bytes differ")
    except OSError as exc:
        with counts.lock:
            counts.stream_failures.append(str(exc))


def _probe(port: int, client: ssl.SSLContext, stop: threading.Event, counts: Counts) -> None:
    """Which certificate does the inbound side serve right now?"""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw, \
                    client.wrap_socket(raw) as s:
                der = s.getpeercert(binary_form=True)
                assert der is not None
                serial = x509.load_der_x509_certificate(der).serial_number
            with counts.lock:
                counts.served.add(serial)
        except (OSError, AssertionError) as exc:
            with counts.lock:
                counts.probe_failures.append(str(exc))
        stop.wait(0.2)


def soak(out_port: int, in_port: int, client: ssl.SSLContext, seconds: float,
         on_time_up: Callable[[], None] = lambda: None) -> Counts:
    """Short connections and long streams through the outbound listener at `out_port`, and
    the prober straight at the inbound one at `in_port`, for `seconds`; `on_time_up` runs
    then, before the clients stop (also when the wait is cut short)."""
    counts = Counts()
    stop = threading.Event()
    threads = [threading.Thread(target=_short_connections, args=(out_port, stop, counts)),
               threading.Thread(target=_probe, args=(in_port, client, stop, counts)),
               *(threading.Thread(target=_stream, args=(out_port, stop, counts))
                 for _ in range(STREAMS))]
    for t in threads:
        t.start()
    try:
        stop.wait(seconds)
    finally:
        on_time_up()
        stop.set()
        for t in threads:
            t.join(IO_TIMEOUT * 2)
    return counts


@pytest.fixture
def started() -> Iterator[list[Sidecar]]:
    """Sidecars this test starts; each is stopped (and must exit 0) even if it fails."""
    procs: list[Sidecar] = []
    yield procs
    codes = [sc.stop() for sc in reversed(procs)]
    assert codes == [0] * len(procs), f"exit codes after SIGTERM: {codes}"


@pytest.mark.parametrize("layout", [pki.Layout.SPIFFE_HELPER, pki.Layout.CSI, pki.Layout.K8S])
def test_soak_rotation_every_second(
    tmp_path: Path, echo_app: Callable[..., EchoApp], started: list[Sidecar],
    layout: pki.Layout,
) -> None:
    ca_dir = tmp_path / "ca"
    root, intermediate = pki.init_ca_dir(ca_dir, TRUST_DOMAIN)
    b_dir = tmp_path / "b-svid"
    pki.write_svid(b_dir, pki.issue_svid(intermediate, PAYMENTS), [root.cert], layout)
    a_dir = tmp_path / "a-svid"
    frontend = pki.issue_svid(intermediate, FRONTEND)
    pki.write_svid(a_dir, frontend, [root.cert])
    (tmp_path / "policy.yaml").write_text(json.dumps({
        "default": "deny", "rules": [{"name": "frontend", "action": "allow",
                                      "from": [FRONTEND]}]}))
    app = echo_app()
    names = layout.files
    b = Sidecar("b", _config(tmp_path / "b.yaml", {
        "identity": {"cert": str(b_dir / names.cert), "key": str(b_dir / names.key),
                     "bundle": str(b_dir / names.bundle)},
        "inbound": [{"name": "in", "listen": "127.0.0.1:0", "forward_to": app.address}],
        "policy": str(tmp_path / "policy.yaml")}), "uvloop")
    started.append(b)
    b.start()
    a = Sidecar("a", _config(tmp_path / "a.yaml", {
        "identity": {"cert": str(a_dir / "svid.pem"), "key": str(a_dir / "svid_key.pem"),
                     "bundle": str(a_dir / "bundle.pem")},
        "outbound": [{"name": "out", "listen": "127.0.0.1:0",
                      "connect_to": f"127.0.0.1:{b.port('in')}", "expect_ids": [PAYMENTS]}],
    }), "uvloop")
    started.append(a)
    a.start()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=str(a_dir / "bundle.pem"))
    client.load_cert_chain(str(a_dir / "svid.pem"), str(a_dir / "svid_key.pem"))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rotator = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "pki", "rotate", "--dir", str(ca_dir),
         "--spiffe-id", PAYMENTS, "--out", str(b_dir), "--every", "1s",
         "--layout", str(layout)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    outputs: list[str] = []

    def end_rotation() -> None:
        rotator.terminate()
        outputs.append(rotator.communicate(timeout=IO_TIMEOUT)[0])

    counts = soak(a.port("out"), b.port("in"), client, SOAK_SECONDS, on_time_up=end_rotation)
    rotated_out = outputs[0]
    rotated = {int(line.split("serial ")[1].split()[0], 16)
               for line in rotated_out.splitlines() if "serial " in line}
    errors_b = [ln for ln in b.lines if ln.get("msg") == "connection" and ln.get("reason")]
    errors_a = [ln for ln in a.lines if ln.get("msg") == "connection" and ln.get("reason")]
    reload_failures = [ln for ln in b.lines if "reload failed" in str(ln.get("msg"))]
    summary = (f"[{layout}] {SOAK_SECONDS:.0f}s: rotations written {len(rotated)}, served "
               f"{len(counts.served & rotated)}; short connections ok {counts.connections_ok}"
               f", failed {len(counts.connections_failed)}; stream MiB "
               f"{counts.stream_bytes / 2**20:.1f} over {STREAMS} streams, broken "
               f"{len(counts.stream_failures)}; handshake errors a={len(errors_a)} "
               f"b={len(errors_b)}; probe failures {len(counts.probe_failures)}; reload "
               f"failures {len(reload_failures)}")
    print(summary)
    assert not counts.connections_failed, summary + f"\n{counts.connections_failed[:5]}"
    assert not counts.stream_failures, summary + f"\n{counts.stream_failures}"
    assert not counts.probe_failures, summary + f"\n{counts.probe_failures[:5]}"
    assert not errors_a and not errors_b, summary + f"\n{(errors_a + errors_b)[:3]}"
    assert not reload_failures, summary + f"\n{reload_failures[:3]}"
    assert counts.connections_ok >= SOAK_SECONDS * 5, summary
    assert len(rotated) >= SOAK_SECONDS * 0.8, summary
    # Every rotation written is served, but the last one may land after the final probe.
    assert len(rotated - counts.served) <= 1, summary
