"""sidecar/tls/openssl.py against real TLS connections in this process."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from sidecar.tls import openssl
from sidecar.tools import pki

pytestmark = pytest.mark.skipif(not openssl.available(), reason="needs the OpenSSL reach")


@pytest.mark.parametrize("seconds", [-5, 0, 1, 3600])
def test_capping_a_session_never_fails_the_handshake(tmp_path: Path, seconds: int) -> None:
    """A cap of 0 once made OpenSSL fail the handshake with an internal error: a client
    whose certificate expires this very second must get a verdict, not an internal error."""
    root = pki.new_root("example.org")
    svid = pki.issue_svid(root, "spiffe://example.org/a")
    chain = tmp_path / "svid.pem"
    chain.write_bytes(svid.chain_pem() + svid.key_pem())
    anchors = pki.certs_pem([root.cert]).decode("ascii")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(chain)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cadata=anchors)
    capped: list[bool] = []

    def on_message(conn: ssl.SSLSocket, direction: str, _v: object, _c: object,
                   msg_type: object, _d: bytes) -> None:
        if direction == "read" and msg_type == ssl._TLSMessageType.CERTIFICATE:
            capped.append(openssl.cap_session_lifetime(conn, seconds))

    server._msg_callback = on_message  # type: ignore[attr-defined]
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cadata=anchors)
    client.load_cert_chain(chain)
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: list[BaseException | bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
                outcome.append(tls.recv(2))
        except (OSError, ssl.SSLError) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        with client.wrap_socket(raw) as tls:
            assert tls.recv(2) == b"ok"
            tls.sendall(b"hi")
    finally:
        thread.join(10)
        listener.close()
    assert capped == [True]
    assert outcome == [b"hi"]
