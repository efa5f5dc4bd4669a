"""The PROXY protocol v2 header an inbound listener with `proxy_protocol: true` sends the
app before any byte of the peer: built here from plain values; inbound.py gathers them
and writes the bytes.

Source: HAProxy's proxy-protocol.txt, section 2.2 (the binary format). The header tells
the app what it cannot see on its own socket, whose other end is the sidecar:

- the command PROXY, TCP over IPv4 or IPv6 (0x11 / 0x21): the peer's address and port as
  the source, our listener's local address and port as the destination. A dual-stack
  listener sees IPv4 peers as IPv4-mapped IPv6 addresses (::ffff:a.b.c.d): those go out
  as the IPv4 addresses they are, as a plain IPv4 listener would have seen them.
- TLVs, in this order:
  - PP2_TYPE_AUTHORITY (0x02): the SNI the caller sent, when it sent one;
  - PP2_TYPE_ALPN (0x01): the protocol the TLS handshake negotiated, when it did;
  - PP2_TYPE_UNIQUE_ID (0x05): our connection id, the `id` of the access-log line;
  - PP2_TYPE_SSL (0x20): `client` = PP2_CLIENT_SSL, plus PP2_CLIENT_CERT_CONN when the peer
    sent its certificate on this connection (a full handshake) and PP2_CLIENT_CERT_SESS
    (it did on this session, always: the sidecar requires one); `verify` = 0 (verified:
    the app only ever hears of authenticated peers). Sub-TLVs: SSL_VERSION ("TLSv1.3"),
    SSL_CIPHER, SSL_SIG_ALG and SSL_KEY_ALG of the certificate we presented (what the
    spec describes: "the certificate presented by the frontend"; named like its
    examples, "SHA256" and "RSA2048" / "EC256"), and SSL_CN only when the peer's
    certificate has a Common Name (SVIDs need none);
  - SPIFFE_ID (0xE0, the first of the range the spec leaves to applications): the
    peer's SPIFFE ID, UTF-8, exactly as the policy judged it. The number is part of the
    product's interface (docs/configuration.md) and does not change.

Not sent, on purpose:
- PP2_TYPE_CRC32C (optional in the spec): the header crosses one local hop, already under
  TCP's checksum, and Python has no CRC32c of its own (zlib's CRC-32 is another
  polynomial), so each connection would pay for a table-driven loop over every byte.
- The peer's certificate (ghostunnel's `tls-full`): the SPIFFE ID is the identity that
  was authenticated and authorized; a certificate would add 0.5-2 KiB to every header,
  and readers bound the header (nginx: 4 KiB).
- PP2_TYPE_NETNS, PP2_TYPE_NOOP: nothing to say with them.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_VERSION_2_PROXY = 0x21  # high nibble: version 2; low nibble: PROXY (not LOCAL)
_TCP_OVER_IPV4 = 0x11  # AF_INET << 4 | STREAM
_TCP_OVER_IPV6 = 0x21  # AF_INET6 << 4 | STREAM
_FIXED = struct.Struct("!12sBBH")  # signature, version and command, family, length
_TLV = struct.Struct("!BH")  # type, length of the value
_SSL_PREFIX = struct.Struct("!BI")  # client bits, verify
MAX_LENGTH = 0xFFFF  # what follows the first 16 bytes: a 16-bit field
MAX_UNIQUE_ID = 128  # bytes, the spec's bound


class Tlv(IntEnum):
    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    UNIQUE_ID = 0x05
    SSL = 0x20
    SSL_VERSION = 0x21
    SSL_CN = 0x22
    SSL_CIPHER = 0x23
    SSL_SIG_ALG = 0x24
    SSL_KEY_ALG = 0x25
    SPIFFE_ID = 0xE0  # ours: the first custom type (PP2_TYPE_MIN_CUSTOM); stable


class Client(IntFlag):
    """The `client` bits of PP2_TYPE_SSL."""

    SSL = 0x01
    CERT_CONN = 0x02
    CERT_SESS = 0x04


# TlsFacts and Origin are made for every connection: plain slotted classes, since a frozen
# dataclass's __init__ sets each field through object.__setattr__ (~25k instructions for
# the two, measured with callgrind). Nothing changes them after they are made.
@dataclass(slots=True)
class TlsFacts:
    """What the TLS connection to the peer was."""

    version: str  # "TLSv1.3"
    cipher: str | None
    resumed: bool  # no certificate crossed this connection: it came with the session
    common_name: str | None = None  # of the peer's certificate
    sig_alg: str | None = None  # of our own certificate: see own_algorithms
    key_alg: str | None = None


@dataclass(slots=True)
class Origin:
    """Who connected, to what, as which identity: everything the header says."""

    source: tuple[str, int]  # the peer's IP address (a literal) and port
    destination: tuple[str, int]  # our listener's local IP address and port
    spiffe_id: str
    tls: TlsFacts
    authority: str | None = None  # the SNI the caller sent
    alpn: bytes | None = None  # the protocol the handshake negotiated
    unique_id: str | None = None  # our connection id


def encode(origin: Origin) -> bytes:
    """The whole header: 16 fixed bytes, the addresses, the TLVs. ValueError when the
    addresses are not one IP family or a value does not fit the format."""
    family, addresses = _addresses(origin.source, origin.destination)
    parts = [addresses]
    if origin.authority:
        parts.append(_tlv(Tlv.AUTHORITY, origin.authority.encode()))
    if origin.alpn:
        parts.append(_tlv(Tlv.ALPN, origin.alpn))
    if origin.unique_id:
        unique = origin.unique_id.encode()
        if len(unique) > MAX_UNIQUE_ID:
            raise ValueError(f"a unique ID holds at most {MAX_UNIQUE_ID} bytes, "
                             f"not {len(unique)}")
        parts.append(_tlv(Tlv.UNIQUE_ID, unique))
    parts.append(_tlv(Tlv.SSL, _ssl(origin.tls)))
    parts.append(_tlv(Tlv.SPIFFE_ID, origin.spiffe_id.encode()))
    body = b"".join(parts)
    if len(body) > MAX_LENGTH:
        raise ValueError(f"the header would be {len(body)} bytes after its first 16; "
                         f"the format holds at most {MAX_LENGTH}")
    return _FIXED.pack(SIGNATURE, _VERSION_2_PROXY, family, len(body)) + body


def _addresses(source: tuple[str, int], destination: tuple[str, int]) -> tuple[int, bytes]:
    src, dst = _ip(source[0]), _ip(destination[0])
    if isinstance(src, ipaddress.IPv6Address) and isinstance(dst, ipaddress.IPv6Address):
        src4, dst4 = src.ipv4_mapped, dst.ipv4_mapped
        if src4 is not None and dst4 is not None:
            src, dst = src4, dst4
    if src.version != dst.version:
        raise ValueError(f"source {source[0]} and destination {destination[0]} are not "
                         "of one IP family")
    family = _TCP_OVER_IPV4 if src.version == 4 else _TCP_OVER_IPV6
    return family, src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])


# A connection's addresses repeat (our listener's always, a peer's host often): parsed
# once each, not ~2 us a connection.
@functools.lru_cache(maxsize=256)
def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host)


# Plain ints: an IntFlag's `|` is a Python-level call.
_SESSION_CERT = int(Client.SSL | Client.CERT_SESS)
_CONNECTION_CERT = int(Client.SSL | Client.CERT_SESS | Client.CERT_CONN)


def _ssl(tls: TlsFacts) -> bytes:
    client = _SESSION_CERT if tls.resumed else _CONNECTION_CERT
    parts = [_SSL_PREFIX.pack(client, 0), _tlv(Tlv.SSL_VERSION, tls.version.encode())]
    if tls.cipher:
        parts.append(_tlv(Tlv.SSL_CIPHER, tls.cipher.encode()))
    if tls.sig_alg:
        parts.append(_tlv(Tlv.SSL_SIG_ALG, tls.sig_alg.encode()))
    if tls.key_alg:
        parts.append(_tlv(Tlv.SSL_KEY_ALG, tls.key_alg.encode()))
    if tls.common_name:
        parts.append(_tlv(Tlv.SSL_CN, tls.common_name.encode()))
    return b"".join(parts)


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > MAX_LENGTH:
        raise ValueError(f"TLV 0x{kind:02X} would hold {len(value)} bytes; "
                         f"at most {MAX_LENGTH} fit")
    return _TLV.pack(kind, len(value)) + value


# --- facts of certificates, as the SSL sub-TLVs name them -----------------------------------


# A peer's leaf comes back on each of its connections, and an SVID usually has no Common
# Name: parsing it once saves ~5 us of every connection. Bounded: 256 leaves of ~0.6 KiB.
@functools.lru_cache(maxsize=256)
def common_name_of(der: bytes) -> str | None:
    """The Common Name of a DER certificate's subject, or None."""
    return common_name(x509.load_der_x509_certificate(der))


def common_name(cert: x509.Certificate) -> str | None:
    """The subject's Common Name (OID 2.5.4.3), the first if there are several."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def own_algorithms(cert: x509.Certificate) -> tuple[str | None, str | None]:
    """(SSL_SIG_ALG, SSL_KEY_ALG) of a certificate, in the spec's style: the signature's
    hash ("SHA256"; "ED25519" for an EdDSA signature, which has none) and the key's type
    and size ("EC256", "RSA2048")."""
    try:
        hashed = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        hashed = None
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key_alg: str | None = f"RSA{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key_alg = f"EC{key.curve.key_size}"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key_alg = "ED25519"
    elif isinstance(key, ed448.Ed448PublicKey):
        key_alg = "ED448"
    else:
        key_alg = None
    if hashed is not None:
        sig_alg: str | None = hashed.name.upper()
    elif key_alg in ("ED25519", "ED448"):
        sig_alg = key_alg
    else:
        sig_alg = None
    return sig_alg, key_alg
