"""`identity.workload_api` end to end: real `sidecar run` processes taking their identity
from real `sidecar pki agent` processes over unix sockets.

- A soak: both agents rotate every second while clients call through an outbound ->
  inbound pair: no failed handshake, no broken long-lived stream, every byte verified.
- Federation from the stream: a peer of a federated trust domain is accepted while the
  agent lists its bundle, and refused, full and resumed, once the agent drops it.
- Readiness: /readyz is 503 (saying why) until the first SVID and after it expires; a
  SIGTERM while waiting for the agent ends the process with 0.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar.tools import pki
from sidecar.tools.pki.agent_control import send

from .conftest import (
    FRONTEND,
    IO_TIMEOUT,
    PAYMENTS,
    REPO,
    START_TIMEOUT,
    TRUST_DOMAIN,
    EchoApp,
    Sidecar,
    wait_for,
)
from .test_live_changes import admin_get
from .test_rotation import STREAMS, soak

pytest.importorskip("grpc", reason="the Workload API needs the `spire` extra")

SOAK_SECONDS = float(os.environ.get("SIDECAR_SOAK_SECONDS", "30"))
OTHER_TD = "other.org"
OTHER_CALLER = f"spiffe://{OTHER_TD}/ns/partner/sa/caller"

pytestmark = pytest.mark.timeout(SOAK_SECONDS + 120)


class AgentProcess:
    """One `sidecar pki agent` process; its stdout lines are collected by a thread."""

    def __init__(self, tmp: Path, name: str, spiffe_id: str, *args: str) -> None:
        self.socket = tmp / f"{name}.sock"
        self.control = tmp / f"{name}.ctl"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "pki", "agent", "--dir", str(tmp / "ca"),
             "--socket", str(self.socket), "--spiffe-id", spiffe_id,
             "--control", str(self.control), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: any(ln.startswith("serving the Workload API") for ln in self.lines)
                 or self.proc.poll() is not None, START_TIMEOUT, f"agent {name} serving")
        assert self.proc.poll() is None, "\n".join(self.lines)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def serials(self) -> set[int]:
        return {int(ln.split("serial ")[1].split()[0], 16)
                for ln in self.lines if ln.startswith("rotation ")}

    def command(self, line: str) -> str:
        return send(self.control, line)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(IO_TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def processes() -> Iterator[list[Sidecar | AgentProcess]]:
    """Every sidecar and agent a test starts; stopped in reverse; sidecars must exit 0."""
    started: list[Sidecar | AgentProcess] = []
    yield started
    codes = [(p, p.stop()) for p in reversed(started)]
    bad = [(getattr(p, "name", "agent"), c) for p, c in codes if isinstance(p, Sidecar) and c]
    assert not bad, f"sidecars that did not exit 0 after SIGTERM: {bad}"


def _config(path: Path, body: dict[str, object]) -> Path:
    base: dict[str, object] = {"admin": {"listen": "127.0.0.1:0"}, "drain_timeout": "5s",
                               "log": {"level": "info", "format": "json"}}
    path.write_text(json.dumps({**base, **body}, indent=2))
    return path


def _policy(tmp: Path, *allowed: str) -> str:
    path = tmp / "policy.yaml"
    path.write_text(json.dumps({"default": "deny", "rules": [
        {"name": "callers", "action": "allow", "from": list(allowed)}]}))
    return str(path)


def test_soak_both_sides_on_agents_rotating_every_second(
    tmp_path: Path, echo_app: Callable[..., EchoApp], processes: list[Sidecar | AgentProcess],
) -> None:
    root, intermediate = pki.init_ca_dir(tmp_path / "ca", TRUST_DOMAIN)
    agent_b = AgentProcess(tmp_path, "b", PAYMENTS, "--every", "1s")
    processes.append(agent_b)
    agent_a = AgentProcess(tmp_path, "a", FRONTEND, "--every", "1s")
    processes.append(agent_a)
    app = echo_app()
    b = Sidecar("b", _config(tmp_path / "b.yaml", {
        "identity": {"workload_api": f"unix://{agent_b.socket}"},
        "inbound": [{"name": "in", "listen": "127.0.0.1:0", "forward_to": app.address}],
        "policy": _policy(tmp_path, FRONTEND)}), "uvloop")
    processes.append(b)
    b.start()
    a = Sidecar("a", _config(tmp_path / "a.yaml", {
        "identity": {"workload_api": f"unix://{agent_a.socket}"},
        "outbound": [{"name": "out", "listen": "127.0.0.1:0",
                      "connect_to": f"127.0.0.1:{b.port('in')}", "expect_ids": [PAYMENTS]}],
    }), "uvloop")
    processes.append(a)
    a.start()
    # The prober calls B directly as the frontend, with an SVID of the same CA.
    probe_dir = tmp_path / "probe"
    pki.write_svid(probe_dir, pki.issue_svid(intermediate, FRONTEND), [root.cert])
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=str(probe_dir / "bundle.pem"))
    client.load_cert_chain(str(probe_dir / "svid.pem"), str(probe_dir / "svid_key.pem"))

    # Rotations before the soak (while the sidecars started) are never probed: the check
    # of what B served counts those made while the prober ran.
    before_soak = agent_b.serials()
    counts = soak(a.port("out"), b.port("in"), client, SOAK_SECONDS)
    rotated_b = agent_b.serials()
    during_soak = rotated_b - before_soak
    swapped = {name: sum(1 for ln in sc.lines if ln.get("msg") == "identity reloaded")
               for name, sc in (("a", a), ("b", b))}
    errors = [ln for sc in (a, b) for ln in sc.lines
              if ln.get("msg") == "connection" and ln.get("reason")]
    summary = (f"{SOAK_SECONDS:.0f}s: agent rotations a={len(agent_a.serials())} "
               f"b={len(rotated_b)}; swaps {swapped}; served by b "
               f"{len(counts.served & rotated_b)}; short connections ok "
               f"{counts.connections_ok}, failed {len(counts.connections_failed)}; stream MiB "
               f"{counts.stream_bytes / 2**20:.1f} over {STREAMS} streams, broken "
               f"{len(counts.stream_failures)}; handshake errors {len(errors)}; probe "
               f"failures {len(counts.probe_failures)}")
    print(summary)
    assert not counts.connections_failed, summary + f"\n{counts.connections_failed[:5]}"
    assert not counts.stream_failures, summary + f"\n{counts.stream_failures}"
    assert not counts.probe_failures, summary + f"\n{counts.probe_failures[:5]}"
    assert not errors, summary + f"\n{errors[:3]}"
    assert counts.connections_ok >= SOAK_SECONDS * 5, summary
    assert len(rotated_b) >= SOAK_SECONDS * 0.8, summary
    assert min(swapped.values()) >= SOAK_SECONDS * 0.7, summary
    # Every rotation B's agent made during the soak is served, bar the last, which may
    # follow the probe.
    assert len(during_soak) >= SOAK_SECONDS * 0.7, summary
    assert len(during_soak - counts.served) <= 2, summary


def _other_client(tmp: Path, root_pem: Path) -> ssl.SSLContext:
    """A caller of another trust domain (other.org), with its own CA, trusting ours."""
    other_root, other_int = pki.init_ca_dir(tmp / "ca-other", OTHER_TD)
    d = tmp / "other-svid"
    pki.write_svid(d, pki.issue_svid(other_int, OTHER_CALLER), [other_root.cert])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(root_pem))
    ctx.load_cert_chain(str(d / "svid.pem"), str(d / "svid_key.pem"))
    return ctx


def _call(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None,
          ) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """(echo of a payload or b"" when refused, the session for next time, resumed?)"""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw, \
            ctx.wrap_socket(raw, session=session) as s:
        back = b""
        try:
            s.sendall(b"ping")
            # No half-close: SSLSocket.shutdown drops TLS and would read raw records.
            while len(back) < 4 and (data := s.recv(4 - len(back))):
                back += data
        except (OSError, ssl.SSLError):
            back = b""
        return back, s.session, s.session_reused


def test_federated_bundle_is_trusted_while_the_agent_lists_it(
    tmp_path: Path, echo_app: Callable[..., EchoApp], processes: list[Sidecar | AgentProcess],
) -> None:
    root, _ = pki.init_ca_dir(tmp_path / "ca", TRUST_DOMAIN)
    root_pem = tmp_path / "our-root.pem"
    root_pem.write_bytes(root.cert.public_bytes(serialization.Encoding.PEM))
    client = _other_client(tmp_path, root_pem)
    agent = AgentProcess(tmp_path, "b", PAYMENTS, "--federate",
                         f"{OTHER_TD}={tmp_path / 'ca-other'}")
    processes.append(agent)
    app = echo_app()
    b = Sidecar("b", _config(tmp_path / "b.yaml", {
        "identity": {"workload_api": f"unix://{agent.socket}"},
        "inbound": [{"name": "in", "listen": "127.0.0.1:0", "forward_to": app.address}],
        "policy": _policy(tmp_path, OTHER_CALLER)}), "uvloop")
    processes.append(b)
    b.start()
    port = b.port("in")
    back, session, _ = _call(port, client)
    assert back == b"ping", b.tail()
    back, session, resumed = _call(port, client, session)
    assert back == b"ping" and resumed, "a federated peer resumes while trusted"
    assert session is not None

    assert agent.command(f"unfederate {OTHER_TD}").startswith("ok")
    b.wait_line(lambda ln: ln.get("msg") == "identity reloaded"
                and ln.get("trust_changed") is True)
    back, _, resumed = _call(port, client, session)
    assert back == b"" and not resumed, "a resumed session outlived its trust"
    back, _, _ = _call(port, client)
    assert back == b"", "a full handshake with a dropped bundle succeeded"
    # Both calls since the unfederate were refused: wait for both lines (the last one is
    # written as its connection ends, which the client may see first).
    b.wait_line(lambda _: len([ln for ln in b.connections() if ln.get("reason")]) >= 2,
                what="the two refusals' connection lines")
    refused = [ln for ln in b.connections() if ln.get("reason")]
    assert refused and refused[-1]["reason"] == "unknown_ca", refused[-1:]
    _, body = admin_get(b, "/status")
    assert OTHER_TD not in json.loads(body)["bundles"]


def test_readyz_waits_for_the_first_svid_and_sigterm_ends_the_wait(
    tmp_path: Path, processes: list[Sidecar | AgentProcess],
) -> None:
    pki.init_ca_dir(tmp_path / "ca", TRUST_DOMAIN)
    sock = tmp_path / "b.sock"
    sc = Sidecar("b", _config(tmp_path / "b.yaml", {
        "identity": {"workload_api": f"unix://{sock}"},
        "outbound": [{"name": "out", "listen": "127.0.0.1:0",
                      "connect_to": "127.0.0.1:9", "expect_ids": [PAYMENTS]}]}), "uvloop")
    processes.append(sc)
    sc.start(wait_ready=False)
    sc.wait_line(lambda ln: ln.get("msg") == "Workload API stream: socket_missing; is the "
                 "SPIRE agent running, and its socket mounted here?")
    code, body = admin_get(sc, "/readyz")
    assert code == 503 and f"{sock} does not exist" in body, body
    code, body = admin_get(sc, "/status")
    status = json.loads(body)
    assert status["spiffe_id"] is None and status["listeners"] == []
    assert status["identity_source"]["last_failure"]["reason"] == "socket_missing"
    agent = AgentProcess(tmp_path, "b", FRONTEND)
    processes.append(agent)
    sc.wait_line(lambda ln: ln.get("msg") == "ready")
    code, body = admin_get(sc, "/readyz")
    assert code == 200, body
    agent.command("refuse")  # the entry deleted: the identity in force stays until expiry
    sc.wait_line(lambda ln: ln.get("reason") == "permission_denied")
    assert admin_get(sc, "/readyz")[0] == 200


def test_sigterm_while_waiting_for_the_agent_exits_0(tmp_path: Path) -> None:
    sc = Sidecar("b", _config(tmp_path / "b.yaml", {
        "identity": {"workload_api": f"unix://{tmp_path / 'none.sock'}"},
        "outbound": [{"name": "out", "listen": "127.0.0.1:0",
                      "connect_to": "127.0.0.1:9", "expect_ids": [PAYMENTS]}]}), "uvloop")
    sc.start(wait_ready=False)
    sc.wait_line(lambda ln: ln.get("msg") == "waiting for an identity from the Workload API")
    assert sc.stop() == 0, sc.tail()


def test_readyz_503_once_the_svid_expires(
    tmp_path: Path, processes: list[Sidecar | AgentProcess],
) -> None:
    pki.init_ca_dir(tmp_path / "ca", TRUST_DOMAIN)
    # One SVID that lives 3 s, never rotated within the test.
    agent = AgentProcess(tmp_path, "b", PAYMENTS, "--ttl", "3s", "--every", "1h")
    processes.append(agent)
    sc = Sidecar("b", _config(tmp_path / "b.yaml", {
        "identity": {"workload_api": f"unix://{agent.socket}"},
        "outbound": [{"name": "out", "listen": "127.0.0.1:0",
                      "connect_to": "127.0.0.1:9", "expect_ids": [PAYMENTS]}]}), "uvloop")
    processes.append(sc)
    sc.start()
    wait_for(lambda: admin_get(sc, "/readyz")[0] == 503, 15.0, "readyz 503 after expiry")
    assert "expired" in admin_get(sc, "/readyz")[1]
