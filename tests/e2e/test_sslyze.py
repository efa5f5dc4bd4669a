"""The inbound listener as a scanner sees it (issue 11, item 7): sslyze against a real
`sidecar run`, with a client certificate so that the scan gets past mTLS.

Any finding fails the test: a protocol other than TLS 1.3 accepted (SSL 2/3, TLS 1.0, 1.1,
1.2), compression, client-initiated renegotiation, 0-RTT early data accepted, Heartbleed
or CCS injection, or a scan command that could not run (an unscanned item is not a clean
one). sslyze drives its own OpenSSL builds (nassl, with a legacy 1.0.2 one for SSL 2/3 and
renegotiation), so the probes do not depend on what the stdlib `ssl` can still send.

Three things sslyze reports need care, each handled below:
- With credentials it never asks whether a client certificate is required (it reports
  DISABLED); a second, credential-less probe gets REQUIRED.
- On a TLS 1.3-only server it reports *secure* renegotiation as supported: its TLS 1.2
  probe is refused and it counts that as "TLS 1.3 has no renegotiation, so it is secure"
  (sslyze/plugins/session_renegotiation_plugin.py). That flag says nothing here; the TLS
  1.2 probe being refused and no client renegotiation succeeding do. (TLS compression
  likewise exists only up to 1.2: its probe is refused at the version.)
- Its 0-RTT probe stops at the client: our tickets carry max_early_data 0, so OpenSSL's
  client sends no early data at all. The last test sends early data anyway on a resumed
  session (nassl lets the client raise the limit) and checks none reaches the app.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.tools import pki

from .conftest import (
    FRONTEND,
    IO_TIMEOUT,
    PAYMENTS,
    EchoApp,
    Pki,
    Sidecar,
    SidecarFactory,
    addr,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

sslyze = pytest.importorskip(
    "sslyze", reason="sslyze is not installed: pip install pydantic && pip install --no-deps "
    "sslyze nassl tls-parser (it pins an older cryptography; .ci/run does this)")

SCAN_TIMEOUT_S = 5  # sslyze's per-connection network timeout (an int in its API)

# Every protocol that must be refused, by sslyze's scan command.
REFUSED_PROTOCOLS = {
    "SSL 2.0": sslyze.ScanCommand.SSL_2_0_CIPHER_SUITES,
    "SSL 3.0": sslyze.ScanCommand.SSL_3_0_CIPHER_SUITES,
    "TLS 1.0": sslyze.ScanCommand.TLS_1_0_CIPHER_SUITES,
    "TLS 1.1": sslyze.ScanCommand.TLS_1_1_CIPHER_SUITES,
    "TLS 1.2": sslyze.ScanCommand.TLS_1_2_CIPHER_SUITES,
}
COMMANDS = {
    *REFUSED_PROTOCOLS.values(),
    sslyze.ScanCommand.TLS_1_3_CIPHER_SUITES,
    sslyze.ScanCommand.TLS_COMPRESSION,
    sslyze.ScanCommand.SESSION_RENEGOTIATION,
    sslyze.ScanCommand.TLS_1_3_EARLY_DATA,
    sslyze.ScanCommand.HEARTBLEED,
    sslyze.ScanCommand.OPENSSL_CCS_INJECTION,
}


def _attr(command: Any) -> str:
    return str(command.value)  # AllScanCommandsAttempts has one attribute per command value


def scan(port: int, credentials: tuple[Path, Path] | None, commands: set[Any]) -> Any:
    """One sslyze scan of 127.0.0.1:port; returns the ServerScanResult."""
    location = sslyze.ServerNetworkLocation("127.0.0.1", port, ip_address="127.0.0.1")
    auth = None if credentials is None else sslyze.ClientAuthenticationCredentials(
        certificate_chain_path=credentials[0], key_path=credentials[1])
    network = sslyze.ServerNetworkConfiguration(
        tls_server_name_indication="payments.example.org",
        tls_client_auth_credentials=auth,
        network_timeout=SCAN_TIMEOUT_S,
        network_max_retries=1,
    )
    scanner = sslyze.Scanner()
    scanner.queue_scans([sslyze.ServerScanRequest(
        server_location=location, network_configuration=network, scan_commands=commands)])
    results = list(scanner.get_results())
    assert len(results) == 1, results
    return results[0]


def connected(result: Any) -> list[str]:
    if result.connectivity_status == sslyze.ServerConnectivityStatusEnum.COMPLETED:
        return []
    trace = "".join(result.connectivity_error_trace.format()) \
        if result.connectivity_error_trace else "?"
    return [f"sslyze could not connect: {trace}"]


def findings(result: Any) -> list[str]:
    """Every way the scanned listener falls short of SPEC's TLS choices, in words."""
    found = connected(result)
    if found:
        return found
    probe = result.connectivity_result
    if probe.highest_tls_version_supported != sslyze.TlsVersionEnum.TLS_1_3:
        found.append(f"highest version {probe.highest_tls_version_supported.name}, not TLS 1.3")
    if result.scan_status != sslyze.ServerScanStatusEnum.COMPLETED:
        return [*found, f"scan status {result.scan_status}"]
    attempts = result.scan_result
    done: dict[Any, Any] = {}
    for command in sorted(COMMANDS, key=_attr):
        attempt = getattr(attempts, _attr(command))
        if attempt.status != sslyze.ScanCommandAttemptStatusEnum.COMPLETED:
            trace = "".join(attempt.error_trace.format()) if attempt.error_trace else ""
            found.append(f"{_attr(command)} did not run ({attempt.status.name}, "
                         f"{attempt.error_reason}): {trace[-600:]}")
        else:
            done[command] = attempt.result
    for name, command in REFUSED_PROTOCOLS.items():
        if command in done and done[command].accepted_cipher_suites:
            suites = [s.cipher_suite.name for s in done[command].accepted_cipher_suites]
            found.append(f"{name} accepted: {suites}")
    tls13 = done.get(sslyze.ScanCommand.TLS_1_3_CIPHER_SUITES)
    if tls13 is not None and not tls13.accepted_cipher_suites:
        found.append("no TLS 1.3 cipher suite accepted: the scan did not reach the listener")
    compression = done.get(sslyze.ScanCommand.TLS_COMPRESSION)
    if compression is not None and compression.supports_compression:
        found.append("TLS compression accepted (CRIME)")
    reneg = done.get(sslyze.ScanCommand.SESSION_RENEGOTIATION)
    if reneg is not None and (reneg.is_vulnerable_to_client_renegotiation_dos
                              or reneg.client_renegotiations_success_count):
        found.append(f"client-initiated renegotiation accepted "
                     f"({reneg.client_renegotiations_success_count} times)")
    early = done.get(sslyze.ScanCommand.TLS_1_3_EARLY_DATA)
    if early is not None and early.supports_early_data:
        found.append("TLS 1.3 early data (0-RTT) accepted")
    bleed = done.get(sslyze.ScanCommand.HEARTBLEED)
    if bleed is not None and bleed.is_vulnerable_to_heartbleed:
        found.append("vulnerable to Heartbleed")
    ccs = done.get(sslyze.ScanCommand.OPENSSL_CCS_INJECTION)
    if ccs is not None and ccs.is_vulnerable_to_ccs_injection:
        found.append("vulnerable to the OpenSSL CCS injection")
    return found


@pytest.fixture
def b(sidecar: SidecarFactory, echo_app: Callable[..., EchoApp]) -> Sidecar:
    app = echo_app()
    return sidecar("b", spiffe_id=PAYMENTS, inbound=[{"name": "in", "forward_to": app.address}],
                   limits={"handshake_timeout": "5s"})


def client_files(svid: pki.Svid, directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "client.pem", directory / "client-key.pem"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    return cert, key


def test_sslyze_finds_nothing_on_the_inbound_listener(b: Sidecar, ca: Pki, tmp_path: Path) -> None:
    # Issued by the root, so the file holds the leaf alone, with an RSA key: sslyze's SSL 2.0
    # probe loads the client certificate into an SSLv2 context of OpenSSL 1.0.2, which
    # refuses a file with a chain in it ("invalid input"), and that probe would not run.
    svid = pki.issue_svid(ca.root, FRONTEND, key_type=pki.KeyType.RSA_2048)
    assert not svid.intermediates

    result = scan(b.port("in"), client_files(svid, tmp_path), COMMANDS)

    assert findings(result) == [], "\n".join(findings(result))
    # sslyze's 0-RTT probe sends an HTTP request and reads the echo to get a ticket, then
    # tries 0-RTT with it; its request reaching the app shows the first half really ran.
    # (Our tickets say max_early_data 0, so OpenSSL's client then sends no early data at
    # all: the last test forces it.)
    # Waited for: a line is written as its connection ends, which sslyze may see first.
    b.wait_line(lambda ln: ln.get("msg") == "connection" and ln.get("decision") == "allow"
                and bool(ln.get("bytes_to_app")),
                what="a scan connection that carried data to the app: did the early-data "
                "probe run?")


def test_sslyze_sees_the_client_certificate_required(b: Sidecar) -> None:
    """sslyze decides optional/required only when it has no credentials of its own (with
    them it reports DISABLED without asking), so this probe goes without."""
    result = scan(b.port("in"), None, set())
    assert connected(result) == [], connected(result)
    requirement = result.connectivity_result.client_auth_requirement
    assert requirement == sslyze.ClientAuthRequirementEnum.REQUIRED, requirement
    b.connection(reason="no_client_cert")  # waits: the line may follow the scan's end


def test_early_data_forced_on_a_resumed_session_never_reaches_the_app(
    b: Sidecar, ca: Pki, tmp_path: Path,
) -> None:
    """A client that sends 0-RTT data although the ticket allows none (nassl, sslyze's
    OpenSSL, lets us raise the session's max_early_data): the sidecar resumes the session,
    rejects the early data, and only the bytes sent after the handshake reach the app."""
    from nassl.ssl_client import (
        OpenSslEarlyDataStatusEnum,
        OpenSslVerifyEnum,
        OpenSslVersionEnum,
        SslClient,
    )

    cert, key = client_files(ca.svid(FRONTEND), tmp_path)

    def connect() -> tuple[SslClient, str]:
        sock = socket.create_connection(("127.0.0.1", b.port("in")), timeout=IO_TIMEOUT)
        return SslClient(underlying_socket=sock, ssl_version=OpenSslVersionEnum.TLSV1_3,
                         ssl_verify=OpenSslVerifyEnum.NONE, client_certificate_chain=cert,
                         client_key=key), addr(sock)

    first, _ = connect()
    try:
        first.do_handshake()
        first.write(b"ping")
        assert first.read(4) == b"ping"  # the ticket came before the echo
        session = first.get_session()
    finally:
        first.get_underlying_socket().close()
    assert session.get_max_early_data() == 0, "the sidecar's ticket offers 0-RTT"
    session.set_max_early_data(16384)

    second, local = connect()
    try:
        second.set_session(session)
        second.write_early_data(b"EARLY-REPLAYABLE")
        second.do_handshake()
        assert second.get_early_data_status() == OpenSslEarlyDataStatusEnum.REJECTED
        second.write(b"late")
        assert second.read(4) == b"late"
    finally:
        second.get_underlying_socket().close()
    line = b.connection(peer_addr=local)
    assert line["resumed"] is True, line
    assert line["bytes_to_app"] == len(b"late"), line
