"""Explain every failure (issue 10): each failure built on purpose is named with the same
reason by `sidecar diagnose --json` (the client's seat), by the inbound sidecar's access
log and metric (the server's seat), and explained by `sidecar inspect` (the file)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from told_port import start_listening

from sidecar.reasons import Reason
from sidecar.tools import pki

from .conftest import (
    BATCH,
    FRONTEND,
    PAYMENTS,
    REPO,
    Pki,
    Sidecar,
    SidecarFactory,
    echo_app,  # noqa: F401  (fixture)
)
from .test_live_changes import metric

pytestmark = pytest.mark.timeout(120)
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def sidecar_cli(*args: str, timeout: float = 30) -> tuple[int, Any]:
    run = subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True,
                         text=True, timeout=timeout, env=ENV)
    try:
        return run.returncode, json.loads(run.stdout)
    except ValueError:
        return run.returncode, run.stdout + run.stderr


def write(d: Path, svid: pki.Svid, ca: Pki) -> dict[str, str]:
    files = pki.write_svid(d, svid, ca.bundle)
    return {"cert": str(d / files.cert), "key": str(d / files.key),
            "bundle": str(d / files.bundle)}


@pytest.fixture
def server(sidecar: SidecarFactory, echo_app) -> Sidecar:  # type: ignore[no-untyped-def]  # noqa: F811
    return sidecar("b", inbound=[{"name": "in", "forward_to": echo_app().address}])


def now() -> datetime:
    return datetime.now(UTC)


# Each case: how to build the client's SVID, and the reason all three tools must give.
# Made when the case runs, not at import: a certificate valid "in two minutes" must still
# be in its future when the handshake happens, however late in the suite that is.
CASES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "expired": (lambda: {"not_before": now() - timedelta(hours=2),
                         "not_after": now() - timedelta(hours=1)}, "cert_expired"),
    "not_yet_valid_by_2_min": (lambda: {"not_before": now() + timedelta(minutes=2),
                                        "not_after": now() + timedelta(hours=1)},
                               "cert_not_yet_valid"),
    "missing_intermediate": (lambda: {"include_intermediates": False},
                             "missing_intermediate"),
    "no_uri_san": (lambda: {"uris": ()}, "invalid_svid"),
    "two_uri_sans": (lambda: {"extra_uris": (FRONTEND + "-twin",)}, "invalid_svid"),
    "ca_leaf": (lambda: {"is_ca": True}, "invalid_svid"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_client_certificate_is_named_alike_everywhere(
    case: str, server: Sidecar, ca: Pki, tmp_path: Path
) -> None:
    overrides, reason = CASES[case]
    files = write(tmp_path / case, ca.issue(FRONTEND, **overrides()), ca)
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{server.port('in')}", "--cert",
                            files["cert"], "--key", files["key"], "--bundle", files["bundle"],
                            "--json")
    assert code == 1 and out["reason"] == reason, out
    # Told from the client's seat: the fault is in our own certificate, not the server's.
    assert (out["explanation"], out["fix"]) == Reason(reason).words(by_peer=True), out
    line = server.wait_line(lambda ln: ln.get("msg") == "connection" and ln.get("reason"))
    assert line["reason"] == reason, line
    assert metric(server, "sidecar_handshake_errors_total", reason=reason) >= 1
    code, report = sidecar_cli("inspect", files["cert"], "--bundle", files["bundle"], "--json")
    assert code == 1 and reason in report[0]["problems"], report
    if case == "not_yet_valid_by_2_min":
        assert "clock" in json.dumps(out).lower() and "clock" in line["detail"].lower()


def test_unknown_ca(server: Sidecar, ca: Pki, tmp_path: Path) -> None:
    foreign = pki.issue_svid(ca.foreign_intermediate, FRONTEND)
    files = write(tmp_path / "foreign", foreign, ca)  # bundle: the real root
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{server.port('in')}", "--cert",
                            files["cert"], "--key", files["key"], "--bundle", files["bundle"],
                            "--json")
    assert code == 1 and out["reason"] == "unknown_ca", out
    assert server.wait_line(lambda ln: ln.get("reason"))["reason"] == "unknown_ca"
    code, report = sidecar_cli("inspect", files["cert"], "--bundle", files["bundle"], "--json")
    assert "unknown_ca" in report[0]["problems"]


def test_wrong_spiffe_id(server: Sidecar, ca: Pki, tmp_path: Path) -> None:
    files = write(tmp_path / "good", ca.svid(FRONTEND), ca)
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{server.port('in')}", "--cert",
                            files["cert"], "--key", files["key"], "--bundle", files["bundle"],
                            "--expect-id", "spiffe://example.org/ns/default/sa/billing",
                            "--json")
    assert code == 1 and out["reason"] == "spiffe_id_mismatch", out
    assert out["peer_spiffe_id"] == PAYMENTS


def test_no_client_certificate(server: Sidecar, ca: Pki, tmp_path: Path) -> None:
    files = write(tmp_path / "good", ca.svid(FRONTEND), ca)
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{server.port('in')}", "--bundle",
                            files["bundle"], "--json")
    assert code == 1 and out["reason"] == "no_client_cert", out
    assert server.wait_line(lambda ln: ln.get("reason"))["reason"] == "no_client_cert"


def test_a_tls12_only_peer(server: Sidecar, ca: Pki, tmp_path: Path) -> None:
    files = write(tmp_path / "good", ca.svid(FRONTEND), ca)
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{server.port('in')}", "--cert",
                            files["cert"], "--key", files["key"], "--bundle", files["bundle"],
                            "--tls-max", "1.2", "--json")
    assert code == 1 and out["reason"] == "protocol_version", out
    # The client's seat: told to offer 1.3 itself, not to "upgrade the peer".
    assert out["fix"] == Reason.PROTOCOL_VERSION.words(by_peer=True)[1], out
    assert "offer TLS 1.3 from this side" in out["fix"], out
    assert server.wait_line(lambda ln: ln.get("reason"))["reason"] == "protocol_version"


def test_revoked(sidecar: SidecarFactory, echo_app, ca: Pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    bad = ca.issue(FRONTEND)
    crl = tmp_path / "intermediate.crl"
    pki.write_crl(crl, pki.issue_crl(ca.intermediate, [bad.serial]))
    b = sidecar("b", inbound=[{"name": "in", "forward_to": echo_app().address}])
    config = json.loads(b.config_path.read_text())
    b.stop()
    config["identity"]["crl"] = str(crl)
    b.config_path.write_text(json.dumps(config))
    b2 = Sidecar("b2", b.config_path, "uvloop")
    sidecar.started.append(b2)
    b2.start()
    files = write(tmp_path / "bad", bad, ca)
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{b2.port('in')}", "--cert", files["cert"],
                            "--key", files["key"], "--bundle", files["bundle"], "--json")
    assert code == 1 and out["reason"] == "revoked", out
    assert b2.wait_line(lambda ln: ln.get("reason"))["reason"] == "revoked"


def test_a_working_peer_is_ok_and_resumes(server: Sidecar, ca: Pki, tmp_path: Path) -> None:
    files = write(tmp_path / "good", ca.svid(FRONTEND), ca)
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{server.port('in')}", "--cert",
                            files["cert"], "--key", files["key"], "--bundle", files["bundle"],
                            "--expect-id", PAYMENTS, "--json")
    assert code == 0 and out["ok"] and out["reason"] is None, out
    assert out["tls_version"] == "TLSv1.3" and out["resumed_second"] is True
    assert out["server_asked_for_cert"] is True


def test_a_policy_denial_is_not_blamed_on_our_certificate(server: Sidecar, ca: Pki,
                                                         tmp_path: Path) -> None:
    files = write(tmp_path / "batch", ca.svid(BATCH), ca)  # valid, not allowed by policy
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{server.port('in')}", "--cert",
                            files["cert"], "--key", files["key"], "--bundle", files["bundle"],
                            "--json")
    assert code == 1 and out["reason"] == "peer_closed", out
    assert "accepted our certificate at the handshake" in json.dumps(out)
    assert "policy" in out["explanation"] and "rejected our certificate" not in out["fix"]
    assert server.wait_line(lambda ln: ln.get("decision") == "deny")


@pytest.fixture
def plain_echo() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(5)
    srv.close()


def test_a_plain_tcp_echo_is_not_tls(plain_echo: int) -> None:
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{plain_echo}", "--json")
    assert code == 1 and out["reason"] == "not_tls", out


@pytest.fixture
def s_server(ca: Pki, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[int]:
    if not any(os.access(os.path.join(d, "openssl"), os.X_OK)
               for d in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("openssl CLI not installed")
    files = write(tmp_path / "srv", ca.svid(PAYMENTS), ca)
    verify = ["-Verify", "1"] if request.param else []
    # -naccept 4: the probe that it listens is one of them.
    proc, port = start_listening(lambda port: [
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", files["cert"],
        "-cert_chain", files["cert"], "-key", files["key"], "-CAfile", files["bundle"],
        "-naccept", "4", *verify], "openssl s_server", stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.kill()
        proc.wait(5)


@pytest.mark.parametrize("s_server", [True], indirect=True)
def test_openssl_s_server_with_verify(s_server: int, ca: Pki, tmp_path: Path) -> None:
    files = write(tmp_path / "c", ca.svid(FRONTEND), ca)
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{s_server}", "--cert", files["cert"],
                            "--key", files["key"], "--bundle", files["bundle"], "--json")
    assert code == 0 and out["ok"], out


@pytest.mark.parametrize("s_server", [False], indirect=True)
def test_openssl_s_server_without_verify_is_not_mutual(s_server: int, ca: Pki,
                                                        tmp_path: Path) -> None:
    files = write(tmp_path / "c", ca.svid(FRONTEND), ca)
    code, out = sidecar_cli("diagnose", f"127.0.0.1:{s_server}", "--cert", files["cert"],
                            "--key", files["key"], "--bundle", files["bundle"], "--json")
    assert code == 1 and out["reason"] == "no_client_cert", out
    assert out["server_asked_for_cert"] is False
