"""TLS endpoints over a socketpair, for tests that handshake in this process.

Shared by test_authn, test_classify and test_tls_engine. tests/ is not a package: pytest
puts it on sys.path (as it does for tests/conftest.py), so they `from tls_pairs import ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.tls.engine import TlsEndpoint
from sidecar.tools import pki
from sidecar.tools.pki import Svid


class Closable(Protocol):
    def close(self) -> None: ...


@contextlib.contextmanager
def closed_on_exit[T: Closable]() -> Iterator[list[T]]:
    """A list to hold what a test opens; each item is closed at the end of the block."""
    held: list[T] = []
    try:
        yield held
    finally:
        for item in held:
            item.close()


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair, non-blocking: the engine requires that of the sockets it gets."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def endpoints(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              session: ssl.SSLSession | None = None) -> tuple[TlsEndpoint, TlsEndpoint]:
    """(server, client) TlsEndpoints over one socket_pair, not yet handshaken."""
    a, b = socket_pair()
    return TlsEndpoint.server(server_ctx, a), TlsEndpoint.client(client_ctx, b, None,
                                                                 session=session)


async def handshake_both(server: TlsEndpoint, client: TlsEndpoint
                         ) -> tuple[BaseException | None, BaseException | None]:
    """Both handshakes at once: (server's exception, client's exception), None for success."""
    s, c = await asyncio.gather(server.handshake(), client.handshake(), return_exceptions=True)
    return s, c


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A TCP connection over loopback, both ends non-blocking as endpoints require."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    near.setblocking(False)
    far.setblocking(False)
    return near, far


async def ready(fd: int, *, write: bool = False) -> None:
    """Wait until `fd` is readable (writable with write=True)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    add, remove = ((loop.add_writer, loop.remove_writer) if write
                   else (loop.add_reader, loop.remove_reader))
    add(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(fd)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def present(ctx: ssl.SSLContext, svid: Svid, tmp_path: Path) -> None:
    """Have `ctx` present `svid` as it is, bad or not: chain and key through a file."""
    path = tmp_path / f"svid-{secrets.token_hex(4)}.pem"
    path.write_bytes(svid.chain_pem() + svid.key_pem())
    ctx.load_cert_chain(path)


def client_context(
    svid: Svid | None, anchors: list[x509.Certificate], tmp_path: Path, *,
    max_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A plain client trusting `anchors`, presenting `svid` as it is (bad ones included: no
    load_identity checks), or no certificate at all; no hostname check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if max_version is not None:
        ctx.maximum_version = max_version
    ctx.load_verify_locations(cadata=pki.certs_pem(anchors).decode("ascii"))
    if svid is not None:
        present(ctx, svid, tmp_path)
    return ctx


def forge_certificate_verify(sock: socket.socket, svid: Svid) -> None:
    """Run a TLS 1.3 client on blocking `sock` that presents `svid`'s valid chain but signs
    its CertificateVerify with another key: a peer that holds a certificate, not its key.
    The stdlib refuses a key that does not match; tlslite-ng signs with whatever it is
    given. Returns when the server has refused it (or, wrongly, let it in)."""
    from tlslite.api import HandshakeSettings, TLSConnection, X509CertChain, parsePEMKey

    chain = X509CertChain()
    chain.parsePemList(svid.chain_pem().decode("ascii"))
    stolen = parsePEMKey(pki.key_pem(pki.new_key()).decode("ascii"), private=True,
                         implementations=["python"])
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    settings.certificate_compression_send = []  # OpenSSL 3.0 reads no compressed chain
    conn = TLSConnection(sock)
    try:
        # Our side of a TLS 1.3 handshake ends before the server reads the signature.
        conn.handshakeClientCert(chain, stolen, settings=settings)
        conn.write(b"must not reach the app")
        conn.read()
    except Exception:  # tlslite's alert or a socket error: refused
        pass
