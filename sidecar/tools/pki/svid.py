"""Issuing X.509-SVIDs from a `CA`: valid by default, with a keyword for every SVID rule a
test may want to break. Nothing here checks those rules; that is `spiffe.py`'s job."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.tools.pki.ca import (
    CA,
    CLOCK_SKEW_BACKDATE,
    aki_for,
    make_key_usage,
    new_serial,
    uri_sans,
    utcnow,
)
from sidecar.tools.pki.keys import (
    KeyFormat,
    KeyType,
    PrivateKey,
    certs_pem,
    hash_for,
    key_pem,
    new_key,
)

# An hour, as SPIRE's default X509-SVID TTL: short enough that rotation is exercised.
DEFAULT_SVID_TTL = timedelta(hours=1)

# Leaves carry O=SPIFFE rather than an empty subject: an empty subject forces the SAN
# extension to be critical (RFC 5280 4.2.1.6), and some tools print empty subjects badly.
SVID_SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])


@dataclass(frozen=True, slots=True)
class Svid:
    cert: x509.Certificate
    key: PrivateKey
    intermediates: tuple[x509.Certificate, ...] = ()

    def chain_pem(self) -> bytes:
        """Leaf then intermediates: what `svid.pem` holds."""
        return certs_pem((self.cert, *self.intermediates))

    def key_pem(self, format: KeyFormat | str = KeyFormat.PKCS8) -> bytes:
        return key_pem(self.key, format)

    @property
    def spiffe_id(self) -> str:
        """The first spiffe:// URI SAN, or "" when there is none (a deliberately bad SVID)."""
        uris = uri_sans(self.cert)
        return next((u for u in uris if u.lower().startswith("spiffe://")), "")

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc


_EKU_NAMES: dict[str, x509.ObjectIdentifier] = {
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
}


def _eku(names: Sequence[str | x509.ObjectIdentifier]) -> x509.ExtendedKeyUsage:
    oids: list[x509.ObjectIdentifier] = []
    for n in names:
        if isinstance(n, x509.ObjectIdentifier):
            oids.append(n)
        elif n in _EKU_NAMES:
            oids.append(_EKU_NAMES[n])
        else:
            raise ValueError(f"unknown EKU {n!r}: use 'server', 'client' or an ObjectIdentifier")
    return x509.ExtendedKeyUsage(oids)


def _leaf_key_usage(key: PrivateKey) -> x509.KeyUsage:
    # RSA key exchange (TLS 1.2 RSA kx) needs keyEncipherment; ECDHE suites never do.
    return make_key_usage(
        digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey)
    )


def issue_svid(
    ca: CA,
    spiffe_id: str,
    *,
    ttl: timedelta = DEFAULT_SVID_TTL,
    dns: Sequence[str] = (),
    key_type: KeyType = KeyType.EC_P256,
    key: PrivateKey | None = None,
    now: datetime | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    extra_uris: Sequence[str] = (),
    uris: Sequence[str] | None = None,
    is_ca: bool = False,
    key_usage: x509.KeyUsage | None = None,
    include_key_usage: bool = True,
    eku: Sequence[str | x509.ObjectIdentifier] | None = ("server", "client"),
    include_intermediates: bool = True,
    issuer_key: PrivateKey | None = None,
) -> Svid:
    """Issue an X.509-SVID from `ca`; the defaults make a valid one.

    Overrides, each for a deliberately bad SVID: `not_before`/`not_after` (absolute times;
    without `not_after`, notAfter is now+ttl capped at the CA's notAfter), `uris` (replaces
    every URI SAN, so `()` means none), `extra_uris` (adds to the SPIFFE ID), `is_ca`,
    `key_usage`/`include_key_usage`, `eku` (None: no EKU extension), `include_intermediates`
    (False: the leaf alone), `issuer_key` (sign with another key while naming `ca` as the
    issuer: a bad signature), `key` (reuse a key, e.g. a cert that no longer matches).
    """
    now = now or utcnow()
    key = key or new_key(key_type)
    signer = issuer_key or ca.key
    nb = not_before if not_before is not None else now - CLOCK_SKEW_BACKDATE
    na = not_after if not_after is not None else min(now + ttl, ca.cert.not_valid_after_utc)
    uri_list = tuple(uris) if uris is not None else (spiffe_id, *extra_uris)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uri_list]
    names += [x509.DNSName(d) for d in dns]

    builder = (
        x509.CertificateBuilder()
        .subject_name(SVID_SUBJECT)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(aki_for(ca.cert), critical=False)
    )
    if include_key_usage:
        builder = builder.add_extension(
            key_usage if key_usage is not None else _leaf_key_usage(key), critical=True
        )
    if eku is not None:
        builder = builder.add_extension(_eku(eku), critical=False)
    if names:  # an empty SAN extension is invalid (RFC 5280): leave it out instead
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signer, hash_for(signer))
    return Svid(cert=cert, key=key, intermediates=ca.intermediates if include_intermediates else ())
