"""kTLS: can the kernel take over record encryption here, and did it on a connection?

Three things must line up: Python exposes `ssl.OP_ENABLE_KTLS` (3.12+), OpenSSL is 3.0+
and built with kTLS, and the kernel has the `tls` ULP (the `tls` module). Only a real
connection proves the middle one, so detection ends with a loopback handshake with the
option on, and asks OpenSSL whether the send side went to the kernel.

With TLS 1.3, OpenSSL 3.0 offloads only the send side; receive offload came later
(NOTES.md). So TX and RX are reported apart, per connection.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from sidecar.tls import openssl

TCP_ULP = getattr(socket, "TCP_ULP", 31)  # linux/tcp.h; Python's socket lacks it before 3.12
_AVAILABLE_ULP = Path("/proc/sys/net/ipv4/tcp_available_ulp")


@dataclass(frozen=True, slots=True)
class Support:
    available: bool
    why: str  # what is missing, or what was proven

    def as_dict(self) -> dict[str, object]:
        return {"available": self.available, "detail": self.why}


def detect() -> Support:
    if not hasattr(ssl, "OP_ENABLE_KTLS"):
        return Support(False, f"Python {sys.version.split()[0]} has no ssl.OP_ENABLE_KTLS "
                              "(needs 3.12+)")
    if ssl.OPENSSL_VERSION_INFO < (3, 0):
        return Support(False, f"{ssl.OPENSSL_VERSION} is too old for kTLS (needs 3.0+)")
    if not openssl.available():
        return Support(False, "cannot read OpenSSL's per-connection kTLS state here")
    kernel = _kernel_ulp()
    if kernel is not None:
        return Support(False, kernel)
    return _handshake_probe()


def _kernel_ulp() -> str | None:
    """None when the kernel accepts the `tls` ULP on a TCP socket, else why not."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        client = stack.enter_context(socket.create_connection(server.getsockname()))
        stack.enter_context(server.accept()[0])
        try:
            client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        except OSError as exc:
            listed = _AVAILABLE_ULP.read_text().strip() if _AVAILABLE_ULP.exists() else "?"
            if exc.errno == errno.ENOENT:
                return (f"the kernel has no `tls` module (modprobe tls); available ULPs: "
                        f"{listed or 'none'}")
            return f"the kernel refused the tls ULP: {exc.strerror}"
    return None


def _handshake_probe() -> Support:
    """A loopback TLS 1.3 connection with kTLS asked for: did OpenSSL hand TX over?"""
    from sidecar.tls.contexts import _in_memory_file

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _in_memory_file(_probe_certificate()) as path:
        server_ctx.load_cert_chain(path)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Only the offload is probed: who answered on our own loopback socket is known.
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    for ctx in (server_ctx, client_ctx):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.options |= ssl.OP_ENABLE_KTLS
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.settimeout(5)
        client = socket.create_connection(lsock.getsockname(), timeout=5)
        raw, _ = lsock.accept()
        raw.settimeout(5)
        try:
            s = server_ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            c = client_ctx.wrap_socket(client, server_hostname="probe",
                                       do_handshake_on_connect=False)
            import threading

            t = threading.Thread(target=s.do_handshake)
            t.start()
            c.do_handshake()
            t.join(5)
            ptr = openssl.ssl_pointer(c)
            tx, _rx = openssl.ktls_state(ptr) if ptr else (False, False)
            s.close()
            c.close()
        except (OSError, ssl.SSLError) as exc:
            return Support(False, f"a loopback kTLS handshake failed: {exc}")
        finally:
            raw.close()
            client.close()
    if not tx:
        return Support(False, f"{ssl.OPENSSL_VERSION} did not offload a TLS 1.3 connection "
                              "(built without kTLS?)")
    return Support(True, f"kernel tls ULP and {ssl.OPENSSL_VERSION}: TX offload proven on "
                         "loopback (TLS 1.3 RX offload needs a newer OpenSSL)")


def _probe_certificate() -> bytes:
    """A throwaway self-signed P-256 certificate and its key (PEM), for the probe's
    server: made here, so that tls/ needs no certificate authority to detect kTLS."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ktls-probe.invalid")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(minutes=10))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
