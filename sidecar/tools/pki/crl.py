"""Certificate revocation lists: issuing one from a `CA`, its PEM form, and writing it."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.tools.pki.ca import CA, CLOCK_SKEW_BACKDATE, aki_for, utcnow
from sidecar.tools.pki.keys import hash_for
from sidecar.tools.pki.writes import write_atomic


def issue_crl(
    ca: CA,
    revoked_serials: Iterable[int],
    *,
    next_update: timedelta = timedelta(hours=1),
    now: datetime | None = None,
    number: int | None = None,
) -> x509.CertificateRevocationList:
    """A CRL from `ca` listing `revoked_serials`.

    `number` (the CRLNumber, RFC 5280 5.2.3, which must grow) defaults to the Unix time, so
    CRLs issued later by the same CA always carry larger numbers.
    """
    now = now or utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW_BACKDATE)  # same clock-skew reason as certificates
        .next_update(now + next_update)
        .add_extension(aki_for(ca.cert), critical=False)
        .add_extension(x509.CRLNumber(int(now.timestamp()) if number is None else number), False)
    )
    for serial in revoked_serials:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - CLOCK_SKEW_BACKDATE)
            .build()
        )
        builder = builder.add_revoked_certificate(revoked)
    return builder.sign(ca.key, hash_for(ca.key))


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    write_atomic(path, crl_pem(crl), 0o644)
