"""Describing one certificate: what a person wants to read about it, computed once (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar import spiffe


@dataclass(frozen=True, slots=True)
class KeyInfo:
    type: str  # "EC", "RSA", "Ed25519", ...
    bits: int | None
    description: str  # "EC P-256", "RSA 2048", "Ed25519"


@dataclass(frozen=True, slots=True)
class CertView:
    """What a person wants to read about one certificate, computed once."""

    subject: str
    issuer: str
    serial: str  # hex: 128-bit serials do not survive a JSON number
    not_before: datetime
    not_after: datetime
    spiffe_id: str | None  # the single URI SAN, when it is a valid SPIFFE ID
    sans: Mapping[str, tuple[str, ...]]  # uri, dns, ip, email
    key: KeyInfo
    key_usage: tuple[str, ...] | None  # None: no keyUsage extension
    key_usage_critical: bool
    eku: tuple[str, ...] | None  # None: no extendedKeyUsage extension
    is_ca: bool
    path_length: int | None
    can_sign: bool  # cA=true and keyCertSign
    self_issued: bool
    trust_domain: str | None


_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_KU_BITS = (
    ("digital_signature", "digitalSignature"), ("content_commitment", "contentCommitment"),
    ("key_encipherment", "keyEncipherment"), ("data_encipherment", "dataEncipherment"),
    ("key_agreement", "keyAgreement"), ("key_cert_sign", "keyCertSign"),
    ("crl_sign", "cRLSign"),
)
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def key_info(cert: x509.Certificate) -> KeyInfo:
    try:
        pub = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return KeyInfo("unknown", None, "a key type this tool cannot read")
    if isinstance(pub, ec.EllipticCurvePublicKey):
        curve = _CURVES.get(pub.curve.name, pub.curve.name)
        return KeyInfo("EC", pub.curve.key_size, f"EC {curve}")
    if isinstance(pub, rsa.RSAPublicKey):
        return KeyInfo("RSA", pub.key_size, f"RSA {pub.key_size}")
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return KeyInfo("Ed25519", 256, "Ed25519")
    if isinstance(pub, ed448.Ed448PublicKey):
        return KeyInfo("Ed448", 456, "Ed448")
    if isinstance(pub, dsa.DSAPublicKey):
        return KeyInfo("DSA", pub.key_size, f"DSA {pub.key_size}")
    return KeyInfo(type(pub).__name__, None, type(pub).__name__)


def _usage_names(ku: x509.KeyUsage) -> tuple[str, ...]:
    names = [name for attr, name in _KU_BITS if getattr(ku, attr)]
    if ku.key_agreement:  # the two below raise unless keyAgreement is set
        names += [n for n, on in (("encipherOnly", ku.encipher_only),
                                  ("decipherOnly", ku.decipher_only)) if on]
    return tuple(names)


def describe(cert: x509.Certificate) -> CertView:
    sans: dict[str, tuple[str, ...]] = {"uri": (), "dns": (), "ip": (), "email": ()}
    usage: tuple[str, ...] | None = None
    usage_critical = can_sign = is_ca = False
    eku: tuple[str, ...] | None = None
    path_length: int | None = None
    try:
        extensions = list(cert.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        extensions = []  # svid_problems reports malformed_extensions
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            sans = {
                "uri": tuple(value.get_values_for_type(x509.UniformResourceIdentifier)),
                "dns": tuple(value.get_values_for_type(x509.DNSName)),
                "ip": tuple(str(ip) for ip in value.get_values_for_type(x509.IPAddress)),
                "email": tuple(value.get_values_for_type(x509.RFC822Name)),
            }
        elif isinstance(value, x509.KeyUsage):
            usage, usage_critical = _usage_names(value), ext.critical
            can_sign = value.key_cert_sign
        elif isinstance(value, x509.ExtendedKeyUsage):
            eku = tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in value)
        elif isinstance(value, x509.BasicConstraints):
            is_ca, path_length = value.ca, value.path_length
    spiffe_id: spiffe.SpiffeId | None = None
    if len(sans["uri"]) == 1:
        try:
            spiffe_id = spiffe.SpiffeId.parse(sans["uri"][0])
        except spiffe.SpiffeIdError:
            pass  # svid_problems names the broken rule
    return CertView(
        subject=cert.subject.rfc4514_string() or "(empty)",
        issuer=cert.issuer.rfc4514_string() or "(empty)",
        serial=f"{cert.serial_number:#x}",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        spiffe_id=str(spiffe_id) if spiffe_id else None,
        sans=sans,
        key=key_info(cert),
        key_usage=usage,
        key_usage_critical=usage_critical,
        eku=eku,
        is_ca=is_ca,
        path_length=path_length,
        can_sign=is_ca and can_sign,
        self_issued=cert.subject == cert.issuer,
        trust_domain=spiffe_id.trust_domain.name if spiffe_id else None,
    )
