"""`proxy/proxy_header`: the PROXY v2 header's bytes, read back by a parser nobody here
wrote (the `proxy-protocol` package from PyPI), and once laid out by hand from the spec
(HAProxy's proxy-protocol.txt, section 2.2)."""

from __future__ import annotations

import ipaddress
import struct
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from proxyprotocol.result import ProxyResult, ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.tlv import ProxyProtocolTLV
from proxyprotocol.v2 import ProxyProtocolV2

from sidecar.proxy import proxy_header
from sidecar.proxy.proxy_header import Origin, TlsFacts, Tlv

SPIFFE_ID = "spiffe://example.org/ns/web/sa/frontend"
TLS13 = TlsFacts(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", resumed=False,
                 sig_alg="SHA256", key_alg="EC256")


def origin(**changes: object) -> Origin:
    fields: dict[str, object] = {
        "source": ("192.0.2.7", 51234), "destination": ("10.1.2.3", 8443),
        "spiffe_id": SPIFFE_ID, "tls": TLS13, "unique_id": "1f2e-3d",
    }
    fields.update(changes)
    return Origin(**fields)  # type: ignore[arg-type]


def parse(header: bytes) -> ProxyResult:
    """The third-party parser's reading; also that its TLVs span the whole declared
    length (it slices a short TLV silently, so the framing is checked here)."""
    result = ProxyProtocolV2().unpack(header)
    declared = struct.unpack_from("!H", header, 14)[0]
    addresses = 12 if isinstance(result, ProxyResultIPv4) else 36
    assert ProxyProtocolTLV(header[16 + addresses:]).size == declared - addresses
    assert len(header) == 16 + declared
    return result


def test_a_minimal_ipv4_header_is_the_bytes_the_spec_lays_out() -> None:
    tls = TlsFacts(version="TLSv1.3", cipher=None, resumed=True)
    got = proxy_header.encode(Origin(("127.0.0.1", 0x1234), ("127.0.0.2", 0x5678),
                                     "spiffe://a/b", tls))
    ssl_value = bytes([0x05]) + bytes(4) + bytes([0x21, 0, 7]) + b"TLSv1.3"
    tlvs = (bytes([0x20, 0, len(ssl_value)]) + ssl_value
            + bytes([0xE0, 0, 12]) + b"spiffe://a/b")
    assert got == (
        b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # the signature
        + bytes([0x21, 0x11])  # version 2, PROXY; TCP over IPv4
        + struct.pack("!H", 12 + len(tlvs))
        + bytes([127, 0, 0, 1, 127, 0, 0, 2, 0x12, 0x34, 0x56, 0x78])
        + tlvs)


def test_ipv4_addresses_and_ports() -> None:
    result = parse(proxy_header.encode(origin()))
    assert isinstance(result, ProxyResultIPv4)
    assert result.source == (ipaddress.IPv4Address("192.0.2.7"), 51234)
    assert result.dest == (ipaddress.IPv4Address("10.1.2.3"), 8443)
    assert result.proxied


def test_ipv6_addresses_and_ports() -> None:
    header = proxy_header.encode(origin(source=("2001:db8::7", 40000),
                                        destination=("::1", 8443)))
    assert header[13] == 0x21  # TCP over IPv6
    result = parse(header)
    assert isinstance(result, ProxyResultIPv6)
    assert result.source == (ipaddress.IPv6Address("2001:db8::7"), 40000)
    assert result.dest == (ipaddress.IPv6Address("::1"), 8443)


def test_ipv4_mapped_addresses_of_a_dual_stack_listener_go_out_as_ipv4() -> None:
    header = proxy_header.encode(origin(source=("::ffff:192.0.2.7", 1),
                                        destination=("::ffff:10.1.2.3", 2)))
    assert header[13] == 0x11
    result = parse(header)
    assert result.source == (ipaddress.IPv4Address("192.0.2.7"), 1)


def test_a_link_local_peer_keeps_its_address_without_the_scope() -> None:
    result = parse(proxy_header.encode(origin(source=("fe80::1%eth0", 1),
                                              destination=("fe80::2%eth0", 2))))
    assert result.source == (ipaddress.IPv6Address("fe80::1"), 1)


def test_addresses_of_two_families_are_refused() -> None:
    with pytest.raises(ValueError, match="not of one IP family"):
        proxy_header.encode(origin(source=("192.0.2.7", 1), destination=("::1", 2)))


def test_the_spiffe_id_is_tlv_0xe0_exactly() -> None:
    result = parse(proxy_header.encode(origin()))
    assert Tlv.SPIFFE_ID == 0xE0
    assert result.tlv[0xE0] == SPIFFE_ID.encode()


def test_ssl_tlv_of_a_full_handshake() -> None:
    ssl = parse(proxy_header.encode(origin())).tlv.ssl
    assert (ssl.has_ssl, ssl.has_cert_conn, ssl.has_cert_sess) == (True, True, True)
    assert ssl.verify == 0 and ssl.verified
    assert (ssl.version, ssl.cipher, ssl.sig_alg, ssl.key_alg) == (
        "TLSv1.3", "TLS_AES_256_GCM_SHA384", "SHA256", "EC256")
    assert ssl.cn is None  # an SVID needs no Common Name; none is made up


def test_ssl_tlv_of_a_resumed_session_says_the_certificate_came_with_the_session() -> None:
    tls = TlsFacts(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", resumed=True)
    ssl = parse(proxy_header.encode(origin(tls=tls))).tlv.ssl
    assert (ssl.has_ssl, ssl.has_cert_conn, ssl.has_cert_sess) == (True, False, True)
    assert ssl.verified


def test_a_common_name_is_sent_when_the_certificate_has_one() -> None:
    tls = TlsFacts(version="TLSv1.3", cipher=None, resumed=False, common_name="frontend é")
    assert parse(proxy_header.encode(origin(tls=tls))).tlv.ssl.cn == "frontend é"


def test_sni_and_alpn_are_sent_when_present() -> None:
    tlv = parse(proxy_header.encode(origin(authority="payments.default.svc",
                                           alpn=b"h2"))).tlv
    assert tlv.authority == "payments.default.svc"
    assert tlv.alpn == b"h2"


def test_sni_and_alpn_are_absent_when_the_handshake_had_none() -> None:
    tlv = parse(proxy_header.encode(origin())).tlv
    assert Tlv.AUTHORITY not in tlv and Tlv.ALPN not in tlv
    assert tlv.authority is None and tlv.alpn is None


def test_the_unique_id_is_our_connection_id() -> None:
    assert parse(proxy_header.encode(origin())).tlv.unique_id == b"1f2e-3d"
    assert Tlv.UNIQUE_ID not in parse(proxy_header.encode(origin(unique_id=None))).tlv


def test_a_unique_id_over_128_bytes_is_refused() -> None:
    proxy_header.encode(origin(unique_id="x" * 128))
    with pytest.raises(ValueError, match="at most 128 bytes"):
        proxy_header.encode(origin(unique_id="x" * 129))


def test_no_checksum_tlv_is_sent() -> None:
    assert Tlv.CRC32C not in parse(proxy_header.encode(origin())).tlv


def test_a_header_past_the_16_bit_length_is_refused() -> None:
    with pytest.raises(ValueError, match="at most 65535"):
        proxy_header.encode(origin(spiffe_id="spiffe://a/" + "b" * 70000))


_v4 = st.ip_addresses(v=4).map(str)
_v6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
_port = st.integers(0, 65535)
_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)


@given(family=st.sampled_from([4, 6]), data=st.data(), sni=st.none() | _text,
       alpn=st.none() | st.binary(min_size=1, max_size=255), spiffe_id=_text,
       resumed=st.booleans(), cn=st.none() | _text)
def test_any_origin_reads_back_as_it_was_sent(
    family: int, data: st.DataObject, sni: str | None, alpn: bytes | None, spiffe_id: str,
    resumed: bool, cn: str | None,
) -> None:
    addr = _v4 if family == 4 else _v6
    src, dst = (data.draw(addr), data.draw(_port)), (data.draw(addr), data.draw(_port))
    tls = TlsFacts(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", resumed=resumed,
                   common_name=cn)
    result = parse(proxy_header.encode(Origin(src, dst, spiffe_id, tls, authority=sni,
                                              alpn=alpn, unique_id="7-1")))
    assert (str(result.source[0]), result.source[1]) == (
        str(ipaddress.ip_address(src[0])), src[1])
    assert (str(result.dest[0]), result.dest[1]) == (str(ipaddress.ip_address(dst[0])), dst[1])
    assert result.tlv.get(0xE0, b"") == spiffe_id.encode()
    assert result.tlv.authority == (sni or None)
    assert result.tlv.alpn == alpn
    assert result.tlv.ssl.has_cert_conn is not resumed
    assert result.tlv.ssl.cn == (cn or None)


# --- what the SSL sub-TLVs say of certificates -------------------------------------------


def _self_signed(key: object, name: x509.Name, algorithm: hashes.HashAlgorithm | None
                 ) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key())  # type: ignore[attr-defined]
               .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(1)))
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


NO_CN = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])


@pytest.mark.parametrize(("key", "algorithm", "expected"), [
    (ec.generate_private_key(ec.SECP256R1()), hashes.SHA256(), ("SHA256", "EC256")),
    (ec.generate_private_key(ec.SECP384R1()), hashes.SHA384(), ("SHA384", "EC384")),
    (rsa.generate_private_key(65537, 2048), hashes.SHA256(), ("SHA256", "RSA2048")),
    (ed25519.Ed25519PrivateKey.generate(), None, ("ED25519", "ED25519")),
], ids=["p256", "p384", "rsa2048", "ed25519"])
def test_own_algorithms_are_named_as_the_spec_examples(
    key: object, algorithm: hashes.HashAlgorithm | None, expected: tuple[str, str],
) -> None:
    assert proxy_header.own_algorithms(_self_signed(key, NO_CN, algorithm)) == expected


def test_common_name_is_read_from_the_subject() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    named = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "frontend")])
    assert proxy_header.common_name(_self_signed(key, named, hashes.SHA256())) == "frontend"
    assert proxy_header.common_name(_self_signed(key, NO_CN, hashes.SHA256())) is None


def test_common_name_of_der_reads_each_certificate_not_a_cached_neighbour() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ders = [_self_signed(key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
                         hashes.SHA256()).public_bytes(Encoding.DER) for name in ("a", "b")]
    no_cn = _self_signed(key, NO_CN, hashes.SHA256()).public_bytes(Encoding.DER)
    for _ in range(2):  # the second round comes from the cache
        assert [proxy_header.common_name_of(d) for d in (*ders, no_cn)] == ["a", "b", None]
