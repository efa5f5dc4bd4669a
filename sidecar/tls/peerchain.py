"""What certificates did the peer present? Seen even when verification fails.

Python's ssl has no verify callback, and a failed verification only says "unable to get
local issuer certificate" both for a foreign CA and for a missing intermediate. Telling
them apart needs the chain the peer sent, which OpenSSL never hands back after a failure.
A handshake-message hook (openssl.set_message_callback: a private debugging hook of
CPython's ssl, present from 3.8 to 3.13) sees the decrypted Certificate handshake message
first, so we parse the DER list out of it.

The hook is copied into each connection and would then fire on every record; the engine
detaches it after the handshake (openssl.stop_message_callback). Where the hook is gone,
`install` returns False and classification falls back to `unknown_ca`.

A server also caps the session being made at the first notAfter of the client's chain,
here, before OpenSSL seals the session into a ticket: a session must not outlive what it
proved, and Python has no other hook between verification and the ticket. A resumption
past that time is then declined by OpenSSL itself (the PSK is refused, not the peer: a
full handshake follows), and the ticket's lifetime tells the client not to offer it. The
anchor is not among the certificates a peer sends; a root expires with a bundle change.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

from cryptography import x509

from sidecar.tls import openssl

_HANDSHAKE = 22  # TLS content type
_CERTIFICATE = 11  # handshake message type
MAX_KEPT = 10  # a 50-certificate chain must not cost us 50 DER copies per connection
ATTRIBUTE = "peer_certificates"


_TLS13 = 0x0304


def install(ctx: ssl.SSLContext) -> bool:
    """Watch the handshake messages of this context's connections (openssl.py sets the
    hook); False where the hook is gone."""
    return openssl.set_message_callback(ctx, _on_message)


def _on_message(
    conn: Any, direction: str, version: int, content_type: int, msg_type: int, data: bytes
) -> None:
    if content_type != _HANDSHAKE or msg_type != _CERTIFICATE or direction != "read":
        return
    tls13 = version == _TLS13
    certs = parse_certificate_message(data, tls13=tls13)
    try:
        setattr(conn, ATTRIBUTE, certs)
    except AttributeError:
        pass  # an owner without a __dict__: classification falls back
    # The connection's owner: the engine's endpoint (it says its pointer), or an
    # ssl.SSLSocket of code that wraps the usual way.
    ptr = (openssl.ssl_pointer(conn) if isinstance(conn, ssl.SSLSocket)
           else getattr(conn, "ssl_pointer", None))
    if ptr is None:
        return
    if conn.server_side:
        left = remaining_life(certs, time.time())
        if left is not None:
            openssl.cap_session_life(ptr, left)
    # The peer's chain was all this hook is for: the rest of the handshake (a dozen
    # messages and record headers, each a call into Python) goes without it.
    openssl.stop_message_callback(ptr)


def remaining_life(certs: list[bytes], now: float) -> int | None:
    """Whole seconds from `now` to the first notAfter of `certs` (0 if passed), or None
    when there is none or one cannot be read (verification will say why)."""
    try:
        first = min(_not_after(c) for c in certs)
    except ValueError:
        return None
    return max(int(first - now), 0)


# notAfter by certificate: a peer presents the same chain on every handshake, and parsing
# it is most of this hook's cost. Bounded, as peers choose what they present.
_NOT_AFTER: dict[bytes, float] = {}
_NOT_AFTER_KEPT = 1024


def _not_after(der: bytes) -> float:
    t = _NOT_AFTER.get(der)
    if t is None:
        t = x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
        if len(_NOT_AFTER) >= _NOT_AFTER_KEPT:
            _NOT_AFTER.clear()
        _NOT_AFTER[der] = t
    return t


def parse_certificate_message(data: bytes, *, tls13: bool) -> list[bytes]:
    """DER certificates of a Certificate handshake message (with its 4-byte header).

    TLS 1.3 (RFC 8446 4.4.2): context<0..255>, then entries of cert<1..2^24-1> and
    extensions<0..2^16-1>. TLS 1.2 (RFC 5246 7.4.2): entries of cert only. A malformed
    message yields the certificates parsed before the damage.
    """
    pos = 4
    if tls13:
        if len(data) < pos + 1:
            return []
        pos += 1 + data[pos]
    if len(data) < pos + 3:
        return []
    end = min(len(data), pos + 3 + int.from_bytes(data[pos : pos + 3]))
    pos += 3
    certs: list[bytes] = []
    while pos + 3 <= end and len(certs) < MAX_KEPT:
        size = int.from_bytes(data[pos : pos + 3])
        pos += 3
        if size == 0 or pos + size > end:
            break
        certs.append(data[pos : pos + size])
        pos += size
        if tls13:
            if pos + 2 > end:
                break
            pos += 2 + int.from_bytes(data[pos : pos + 2])
    return certs
