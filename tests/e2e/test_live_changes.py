"""What a running sidecar does when its files change or it is told to stop (issues 4-6):
bad identity files keep the old SVID, a removed CA ends trust and resumption, a CRL
revokes, policy switches (audit, invalid, recheck), metrics that add up, /readyz, drain.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from sidecar.tools import pki

from .conftest import (
    BATCH,
    FRONTEND,
    IO_TIMEOUT,
    PAYMENTS,
    REPO,
    EchoApp,
    Pki,
    Sidecar,
    SidecarFactory,
    TlsClient,
    recv_all,
    wait_for,
    write_svid_dir,
)

pytestmark = pytest.mark.timeout(90)
RELOAD_WAIT = 10.0  # a reload shows within ~2 s (debounce + retries); generous for CI


# --- helpers -----------------------------------------------------------------------------


def metric(sc: Sidecar, name: str, **labels: str) -> float:
    """One sample of the sidecar's /metrics (0 when absent)."""
    body = admin_get(sc, "/metrics")[1]
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def admin_get(sc: Sidecar, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{sc.port('admin')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def served_serial(port: int, ctx: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw, \
            ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


class Node:
    """A sidecar whose identity dir and policy file the test rewrites."""

    def __init__(self, sc: Sidecar, svid_dir: Path, policy: Path | None) -> None:
        self.sc, self.svid_dir, self.policy = sc, svid_dir, policy


@pytest.fixture
def node(tmp_path: Path, ca: Pki, echo_app: Callable[..., EchoApp]) -> Iterator[
        Callable[..., Node]]:
    made: list[Sidecar] = []

    def make(name: str = "b", *, svid: pki.Svid | None = None,
             bundle: list[x509.Certificate] | None = None, policy: dict[str, Any] | None = None,
             outbound: list[dict[str, Any]] | None = None, crl: Path | None = None,
             ) -> Node:
        d = tmp_path / name
        d.mkdir()
        svid_dir = d / "svid"
        config: dict[str, Any] = {
            "identity": write_svid_dir(svid_dir, svid or ca.svid(PAYMENTS),
                                       bundle if bundle is not None else ca.bundle),
            "admin": {"listen": "127.0.0.1:0"}, "drain_timeout": "5s",
            "log": {"level": "info", "format": "json"}}
        if crl is not None:
            config["identity"]["crl"] = str(crl)
        policy_path = None
        if outbound is None:
            app = echo_app()
            policy_path = d / "policy.yaml"
            policy_path.write_text(json.dumps(policy or {
                "default": "deny",
                "rules": [{"name": "frontend", "action": "allow", "from": [FRONTEND]}]}))
            config["inbound"] = [{"name": "in", "listen": "127.0.0.1:0",
                                  "forward_to": app.address}]
            config["policy"] = str(policy_path)
        else:
            config["outbound"] = outbound
        path = d / "sidecar.yaml"
        path.write_text(json.dumps(config, indent=2))
        sc = Sidecar(name, path, "uvloop")
        made.append(sc)
        sc.start()
        return Node(sc, svid_dir, policy_path)

    yield make
    codes = [sc.stop() for sc in reversed(made)]
    assert all(c == 0 for c in codes), codes


# --- identity: bad files keep the old SVID (issue 4) ------------------------------------


def _truncated(d: Path, ca: Pki) -> None:
    text = (d / "svid.pem").read_bytes()
    (d / "svid.pem").write_bytes(text[: len(text) // 2])


def _wrong_key(d: Path, ca: Pki) -> None:
    (d / "svid_key.pem").write_bytes(ca.issue(PAYMENTS).key_pem())


def _expired(d: Path, ca: Pki) -> None:
    old = ca.issue(PAYMENTS, not_before=datetime.now(UTC) - timedelta(hours=2),
                   not_after=datetime.now(UTC) - timedelta(hours=1))
    pki.write_svid(d, old, ca.bundle)


def _unknown_ca(d: Path, ca: Pki) -> None:
    pki.write_svid(d, pki.issue_svid(ca.foreign_intermediate, PAYMENTS), ca.bundle)


def _missing(d: Path, ca: Pki) -> None:
    (d / "svid.pem").unlink()


def _empty(d: Path, ca: Pki) -> None:
    (d / "svid.pem").write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncated, _wrong_key, _expired, _unknown_ca, _missing,
                                    _empty], ids=lambda f: f.__name__.strip("_"))
def test_a_bad_identity_file_keeps_the_old_svid_and_is_counted(
    node: Callable[..., Node], ca: Pki, tls_client: TlsClient,
    damage: Callable[[Path, Pki], None],
) -> None:
    b = node()
    client = tls_client.context(ca.svid(FRONTEND))
    before = served_serial(b.sc.port("in"), client)
    errors = metric(b.sc, "sidecar_reloads_total", kind="svid", result="error")
    damage(b.svid_dir, ca)
    wait_for(lambda: metric(b.sc, "sidecar_reloads_total", kind="svid", result="error")
             > errors, RELOAD_WAIT, "the failed reload to be counted")
    line = b.sc.wait_line(lambda ln: "reload failed" in str(ln.get("msg")))
    assert "svid.pem" in json.dumps(line["problems"]), line
    assert served_serial(b.sc.port("in"), client) == before
    assert admin_get(b.sc, "/readyz")[0] == 200


# --- bundle rotation: a removed CA ends trust and resumption (issue 4) -------------------


def test_removing_a_ca_refuses_its_peers_and_their_old_tickets(
    node: Callable[..., Node], ca: Pki, tls_client: TlsClient
) -> None:
    # B runs on the new CA and trusts both while peers migrate.
    b = node(svid=pki.issue_svid(ca.foreign_intermediate, PAYMENTS),
             bundle=[ca.root.cert, ca.foreign_root.cert])
    old_peer = tls_client.context(ca.svid(FRONTEND), trust=[ca.foreign_root.cert])
    port = b.sc.port("in")
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw, \
            old_peer.wrap_socket(raw) as s:
        s.sendall(b"hi")
        assert s.recv(2) == b"hi"
        session = s.session
        assert session is not None and session.has_ticket
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw, \
            old_peer.wrap_socket(raw, session=session) as s:
        assert s.session_reused  # resumption works while the old CA is trusted
        s.sendall(b"hi")
        assert s.recv(2) == b"hi"
    # The old CA leaves the bundle.
    (b.svid_dir / "bundle.pem").write_bytes(pki.certs_pem([ca.foreign_root.cert]))
    b.sc.wait_line(lambda ln: ln.get("msg") == "identity reloaded"
                   and ln.get("trust_changed") is True, RELOAD_WAIT)
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    try:
        s = old_peer.wrap_socket(raw, session=session)
        assert not s.session_reused, "a ticket from before the bundle change resumed"
        s.sendall(b"hi")
        got = recv_all(s, 2)
    except (ssl.SSLError, OSError):
        got = b""
    finally:
        raw.close()
    assert got == b""
    line = b.sc.wait_line(lambda ln: ln.get("msg") == "connection" and ln.get("reason"))
    assert line["reason"] == "unknown_ca" and line["resumed"] is not True, line


def test_a_revoked_peer_is_refused_with_revoked(
    node: Callable[..., Node], ca: Pki, tls_client: TlsClient, tmp_path: Path
) -> None:
    bad = ca.issue(FRONTEND)
    crl = tmp_path / "intermediate.crl"
    pki.write_crl(crl, pki.issue_crl(ca.intermediate, [bad.serial]))
    b = node(crl=crl)
    out = tls_client.exchange(b.sc.port("in"), tls_client.context(bad))
    assert out.received == b""
    assert b.sc.connection(peer_addr=out.local)["reason"] == "revoked"
    good = tls_client.exchange(b.sc.port("in"), tls_client.context(ca.svid(FRONTEND)))
    assert good.received == b"ping"


# --- policy: audit, invalid, recheck (issue 5) --------------------------------------------


def test_switching_to_audit_lets_a_denied_caller_through_within_2s(
    node: Callable[..., Node], ca: Pki, tls_client: TlsClient
) -> None:
    b = node()
    batch = tls_client.context(ca.svid(BATCH))
    assert tls_client.exchange(b.sc.port("in"), batch).received == b""
    assert b.policy is not None
    b.policy.write_text(json.dumps({"mode": "audit", "default": "deny", "rules": [
        {"name": "frontend", "action": "allow", "from": [FRONTEND]}]}))
    written = time.monotonic()
    b.sc.wait_line(lambda ln: ln.get("msg") == "policy reloaded", RELOAD_WAIT)
    assert time.monotonic() - written < 2.0 + 0.5  # 2 s goal; the log line itself lags
    out = tls_client.exchange(b.sc.port("in"), batch)
    assert out.received == b"ping"
    assert b.sc.connection(peer_addr=out.local)["decision"] == "audit_deny"
    assert metric(b.sc, "sidecar_authz_decisions_total", decision="audit_deny",
                  rule="default") == 1


def test_an_invalid_policy_keeps_the_previous_one(
    node: Callable[..., Node], ca: Pki, tls_client: TlsClient
) -> None:
    b = node()
    assert b.policy is not None
    b.policy.write_text("default: allow\nrules: [{name: x, action: allow, from: [nope]}]\n")
    wait_for(lambda: metric(b.sc, "sidecar_reloads_total", kind="policy", result="error") >= 1,
             RELOAD_WAIT, "the policy error to be counted")
    assert tls_client.exchange(b.sc.port("in"), tls_client.context(ca.svid(BATCH))).received \
        == b""
    good = tls_client.exchange(b.sc.port("in"), tls_client.context(ca.svid(FRONTEND)))
    assert good.received == b"ping"


def test_a_policy_change_closes_live_connections_it_now_denies(
    node: Callable[..., Node], ca: Pki, tls_client: TlsClient
) -> None:
    b = node()
    ctx = tls_client.context(ca.svid(FRONTEND))
    raw = socket.create_connection(("127.0.0.1", b.sc.port("in")), timeout=IO_TIMEOUT)
    with ctx.wrap_socket(raw) as s:
        s.sendall(b"hello")
        assert recv_all(s, 5) == b"hello"
        assert b.policy is not None
        b.policy.write_text(json.dumps({"default": "deny", "rules": []}))
        line = b.sc.wait_line(lambda ln: ln.get("msg") == "connection"
                              and ln.get("close") == "policy_recheck", RELOAD_WAIT)
        assert line["peer_id"] == FRONTEND and line["decision"] == "deny", line
        assert recv_all(s) == b""  # the stream ended


# --- observability: metrics add up, resumption both ways, readyz (issue 6) ------------


def test_handshake_metrics_count_what_happened(
    node: Callable[..., Node], ca: Pki
) -> None:
    b = node()
    a = node("a", svid=ca.svid(FRONTEND), outbound=[{
        "name": "out", "listen": "127.0.0.1:0",
        "connect_to": f"127.0.0.1:{b.sc.port('in')}", "expect_ids": [PAYMENTS]}])
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", a.sc.port("out")),
                                      timeout=IO_TIMEOUT) as s:
            s.sendall(b"x" * 100)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"x" * 100
    a.sc.wait_connections(5)
    for line in b.sc.wait_connections(5):  # the access line carries the handshake's CPU
        assert line["handshake_cpu_ms"] > 0, line
    for sc, direction, listener in ((a.sc, "outbound", "out"), (b.sc, "inbound", "in")):
        full = metric(sc, "sidecar_handshakes_total", direction=direction, listener=listener,
                      result="ok", resumed="false")
        resumed = metric(sc, "sidecar_handshakes_total", direction=direction,
                         listener=listener, result="ok", resumed="true")
        assert (full, resumed) == (1, 4), (sc.name, full, resumed)
        assert metric(sc, "sidecar_connections_total", direction=direction,
                      listener=listener) == 5
        assert metric(sc, "sidecar_bytes_total", direction=direction, listener=listener,
                      flow="to_app") == 500
        for r in ("true", "false"):
            assert metric(sc, "sidecar_handshake_cpu_seconds_total", direction=direction,
                          listener=listener, resumed=r) > 0
        assert metric(sc, "sidecar_handshake_duration_seconds_count", direction=direction,
                      listener=listener, resumed="true") == 4
    assert metric(b.sc, "sidecar_authz_decisions_total", listener="in", decision="allow",
                  rule="frontend") == 5
    # Every connection is counted once per kTLS path, in the state this host allows.
    status = json.loads(admin_get(b.sc, "/status")[1])
    states = ("enabled", "failed") if status["ktls"]["available"] else ("unavailable",)
    for path in ("tx", "rx"):
        assert sum(metric(b.sc, "sidecar_ktls_connections_total", direction="inbound",
                          path=path, state=s) for s in states) == 5
    assert metric(b.sc, "sidecar_svid_expiry_timestamp_seconds", spiffe_id=PAYMENTS) == \
        ca.svid(PAYMENTS).not_after.timestamp()
    status = json.loads(admin_get(b.sc, "/status")[1])
    assert status["spiffe_id"] == PAYMENTS and status["listeners"][0]["name"] == "in"


def test_readyz_turns_503_when_the_svid_expires(
    node: Callable[..., Node], ca: Pki
) -> None:
    # Long enough that a start-up on a loaded machine still sees it valid first.
    short = ca.issue(PAYMENTS, not_after=datetime.now(UTC) + timedelta(seconds=8))
    b = node(svid=short)
    assert admin_get(b.sc, "/readyz")[0] == 200
    wait_for(lambda: admin_get(b.sc, "/readyz")[0] == 503, 30, "/readyz to turn 503")
    assert "expired" in admin_get(b.sc, "/readyz")[1]


def test_sigterm_drains_live_connections_and_exits_0(
    node: Callable[..., Node], ca: Pki, tls_client: TlsClient
) -> None:
    b = node()
    ctx = tls_client.context(ca.svid(FRONTEND))
    port = b.sc.port("in")
    conns = []
    for _ in range(50):
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        s = ctx.wrap_socket(raw)
        s.sendall(b"first")
        assert recv_all(s, 5) == b"first"
        conns.append(s)
    assert b.sc._proc is not None
    b.sc._proc.send_signal(signal.SIGTERM)
    b.sc.wait_line(lambda ln: ln.get("msg") == "draining")
    code, body = admin_get(b.sc, "/readyz")
    assert code == 503 and "draining" in body
    with pytest.raises(OSError):  # the listener is closed: new connections are refused
        socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT).close()
    # Every live connection still works mid-drain, then ends on its own.
    for s in conns:
        s.sendall(b"second")
    for s in conns:
        assert recv_all(s, 6) == b"second"
        s.close()
    wait_for(lambda: not b.sc.alive, 10, "the sidecar to exit after its connections ended")
    assert b.sc.stop() == 0
    closes = [ln.get("close") for ln in b.sc.connections()]
    assert "drain" not in closes  # none was cut: they ended before drain_timeout


def test_a_second_sigterm_ends_the_drain_at_once(
    node: Callable[..., Node], ca: Pki, tls_client: TlsClient
) -> None:
    b = node()
    s = tls_client.context(ca.svid(FRONTEND)).wrap_socket(
        socket.create_connection(("127.0.0.1", b.sc.port("in")), timeout=IO_TIMEOUT))
    s.sendall(b"x")
    assert recv_all(s, 1) == b"x"
    assert b.sc._proc is not None
    b.sc._proc.send_signal(signal.SIGTERM)
    b.sc.wait_line(lambda ln: ln.get("msg") == "draining")
    started = time.monotonic()
    b.sc._proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not b.sc.alive, 4, "the sidecar to exit on the second SIGTERM")
    assert time.monotonic() - started < 4  # well before drain_timeout (5 s)
    assert recv_all(s) == b""
    s.close()
    threading.Event().wait(0)  # nothing else to wait on


def test_a_max_connections_the_fd_limit_cannot_hold_is_warned_about(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp]
) -> None:
    b = sidecar("b", inbound=[{"name": "in", "forward_to": echo_app().address}],
                limits={"max_connections": 5_000_000, "max_pending_handshakes": 1024})
    line = b.wait_line(lambda ln: "open files" in str(ln.get("msg")))
    assert line["level"] == "warning" and line["connections_that_fit"] < 5_000_000, line


# --- files that block: a FIFO at an identity path (issue 15, item 6) --------------------


def _fifo_in_place_of(path: Path) -> None:
    """What a misconfigured mount or a stray `mkfifo` leaves: a pipe nobody writes to."""
    path.unlink()
    os.mkfifo(path)


def test_a_fifo_at_the_cert_path_stops_check_and_start_with_a_clear_message(
    tmp_path: Path, ca: Pki
) -> None:
    identity = write_svid_dir(tmp_path / "svid", ca.svid(PAYMENTS), ca.bundle)
    _fifo_in_place_of(Path(identity["cert"]))
    config = tmp_path / "sidecar.yaml"
    config.write_text(json.dumps({
        "identity": identity, "admin": {"listen": "127.0.0.1:0"},
        "outbound": [{"name": "out", "listen": "127.0.0.1:0", "connect_to": "127.0.0.1:1",
                      "expect_ids": [PAYMENTS]}],
        "log": {"level": "info", "format": "json"}}))
    for command in ("check", "run"):
        proc = subprocess.run([sys.executable, "-m", "sidecar", command, "-c", str(config)],
                              capture_output=True, timeout=30, cwd=tmp_path, env=_env())
        said = (proc.stdout + proc.stderr).decode()
        assert proc.returncode != 0, said
        assert "svid.pem" in said and "FIFO" in said and "not a regular file" in said, said


def test_a_fifo_swapped_in_at_runtime_is_counted_and_a_later_rotation_applies(
    node: Callable[..., Node], ca: Pki, tls_client: TlsClient
) -> None:
    b = node()
    client = tls_client.context(ca.svid(FRONTEND))
    errors = metric(b.sc, "sidecar_reloads_total", kind="svid", result="error")
    _fifo_in_place_of(b.svid_dir / "svid.pem")
    b.sc.wait_line(lambda ln: "reload failed" in str(ln.get("msg"))
                   and "FIFO" in json.dumps(ln.get("problems")), RELOAD_WAIT,
                   "the reload failure naming the FIFO")
    assert metric(b.sc, "sidecar_reloads_total", kind="svid", result="error") > errors
    # The FIFO held nothing: the next rotation is loaded and served.
    (b.svid_dir / "svid.pem").unlink()
    new = ca.svid(PAYMENTS)
    pki.write_svid(b.svid_dir, new, ca.bundle)
    wait_for(lambda: served_serial(b.sc.port("in"), client) == new.cert.serial_number,
             RELOAD_WAIT, "the rotation after the FIFO to be served")


def test_sigterm_exits_promptly_after_a_fifo_was_swapped_in(
    node: Callable[..., Node], ca: Pki
) -> None:
    b = node()
    _fifo_in_place_of(b.svid_dir / "svid.pem")
    assert b.sc._proc is not None
    b.sc._proc.send_signal(signal.SIGHUP)  # a reload of the FIFO, now, whatever the watch does
    b.sc.wait_line(lambda ln: "reload failed" in str(ln.get("msg")), RELOAD_WAIT,
                   "the reload of the FIFO to fail")
    b.sc._proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not b.sc.alive, 8, "the sidecar to exit after SIGTERM")
    assert b.sc.stop() == 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("SIDECAR_CONFIG", None)
    return env


# --- reloads counted by what changed (issue 15, item 7d) --------------------------------


def test_a_bundle_change_is_counted_as_bundle_not_svid(
    node: Callable[..., Node], ca: Pki
) -> None:
    b = node()
    svid_ok = metric(b.sc, "sidecar_reloads_total", kind="svid", result="ok")
    (b.svid_dir / "bundle.pem").write_bytes(pki.certs_pem([*ca.bundle, ca.foreign_root.cert]))
    wait_for(lambda: metric(b.sc, "sidecar_reloads_total", kind="bundle", result="ok") == 1,
             RELOAD_WAIT, "the bundle change to be counted as kind=bundle")
    (b.svid_dir / "bundle.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")
    wait_for(lambda: metric(b.sc, "sidecar_reloads_total", kind="bundle", result="error") == 1,
             RELOAD_WAIT, "the broken bundle to be counted as kind=bundle")
    assert metric(b.sc, "sidecar_reloads_total", kind="svid", result="ok") == svid_ok
    assert metric(b.sc, "sidecar_reloads_total", kind="svid", result="error") == 0
