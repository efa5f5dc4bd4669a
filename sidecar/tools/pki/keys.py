"""Key material: the key types the dev PKI generates, the hash each one signs with, and the
PEM forms of keys and certificate lists."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

type PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    ED25519 = "ed25519"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"


class KeyFormat(StrEnum):
    PKCS8 = "pkcs8"
    # OpenSSL's "traditional" form: SEC1 (`EC PRIVATE KEY`) for EC, PKCS#1 for RSA.
    SEC1 = "sec1"


def new_key(kind: KeyType = KeyType.EC_P256) -> PrivateKey:
    match kind:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.ED25519:
            return ed25519.Ed25519PrivateKey.generate()
        case KeyType.RSA_2048:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case KeyType.RSA_3072:
            return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def key_pem(key: PrivateKey, fmt: KeyFormat | str = KeyFormat.PKCS8) -> bytes:
    match KeyFormat(fmt):
        case KeyFormat.PKCS8:
            form = serialization.PrivateFormat.PKCS8
        case KeyFormat.SEC1:
            if isinstance(key, ed25519.Ed25519PrivateKey):
                raise ValueError("Ed25519 keys have no SEC1/traditional form; use pkcs8")
            form = serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def certs_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # Ed25519 hashes internally; cryptography requires None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()  # match the hash strength to the curve (RFC 5480 4)
    return hashes.SHA256()
