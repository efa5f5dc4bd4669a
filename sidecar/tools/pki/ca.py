"""Root and intermediate CAs, and what every certificate a CA signs shares (the backdated
start, a random serial, the issuer's key identifier, the key-usage bits).

Chains. A `CA` carries `chain`: the intermediates *above* it, nearest first, never the
root. A root and an intermediate signed by the root both have `chain == ()`; an
intermediate under that one has `chain == (parent,)`. `CA.intermediates` is what a
certificate issued by the CA sends after itself (the CA and its chain; nothing for a root),
so `Svid.chain_pem()` is always leaf, then intermediates, never the root: a root sent on
the wire is at best ignored and at worst trusted by a careless peer.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from sidecar.tools.pki.keys import KeyType, PrivateKey, hash_for, new_key

# Every certificate starts this far in the past: hosts' clocks differ, and a certificate
# that is "not yet valid" on a peer whose clock lags by a few seconds fails the handshake.
# SPIRE backdates by 10 s; 5 min also covers a VM that just resumed from suspend.
CLOCK_SKEW_BACKDATE = timedelta(minutes=5)

DEFAULT_ROOT_TTL = timedelta(days=365)
DEFAULT_INTERMEDIATE_TTL = timedelta(days=90)

# RFC 5280 caps a commonName at 64 characters; cryptography enforces it.
_MAX_COMMON_NAME = 64


def new_serial() -> int:
    """A random positive 128-bit serial (RFC 5280 allows 20 octets; CAB BR want 64+ bits)."""
    return secrets.randbits(127) | (1 << 127)


def make_key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """A KeyUsage with only the named bits, for tests that need an unusual one."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True, slots=True)
class CA:
    """A CA certificate with its key.

    `chain`: the intermediates above this CA, nearest first, excluding the root (so `()` for
    a root and for an intermediate signed by the root). `root`: the root it chains to, or
    None when this CA is the root.
    """

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()
    root: x509.Certificate | None = None

    @property
    def is_root(self) -> bool:
        return self.root is None

    @property
    def trust_anchor(self) -> x509.Certificate:
        """The root to put in a bundle for anything this CA issues."""
        return self.cert if self.root is None else self.root

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """What a certificate issued by this CA sends after itself."""
        return () if self.is_root else (self.cert, *self.chain)

    @property
    def trust_domain(self) -> str:
        return trust_domain_of(self.cert)

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc


def trust_domain_of(cert: x509.Certificate) -> str:
    """The trust domain of the cert's spiffe:// URI SAN, lowercased; "" when it has none."""
    for uri in uri_sans(cert):
        parts = urlsplit(uri)
        if parts.scheme.lower() == "spiffe" and parts.hostname:
            return parts.hostname.lower()
    return ""


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


# --- issuing ---------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


def aki_for(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_name(trust_domain: str, role: str, name: str | None) -> x509.Name:
    if name is None:
        # A random tag keeps two dev CAs from ever sharing a subject: OpenSSL finds
        # issuers by subject name first, and a test with a "foreign" CA of the same trust
        # domain should fail as unknown_ca, not on a lookup that picked the wrong one.
        tag = secrets.token_hex(4)
        name = f"{trust_domain} {role} CA {tag}"
        if len(name) > _MAX_COMMON_NAME:
            name = f"{role} CA {tag}"
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )


def _check_trust_domain(trust_domain: str) -> None:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789.-_")
    if not trust_domain or len(trust_domain) > 255 or not set(trust_domain) <= allowed:
        raise ValueError(
            f"bad trust domain {trust_domain!r}: use lowercase letters, digits, '.', '-' and "
            "'_' only, without spiffe:// or a path (e.g. example.org)"
        )


def _sign_ca(
    *,
    subject: x509.Name,
    key: PrivateKey,
    issuer: CA | None,
    trust_domain: str,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None,
) -> x509.Certificate:
    issuer_name = subject if issuer is None else issuer.cert.subject
    signer = key if issuer is None else issuer.key
    ku = make_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        # SPIRE puts the trust domain ID on its CAs; load_ca_dir reads it back from here.
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    if issuer is not None:
        builder = builder.add_extension(aki_for(issuer.cert), critical=False)
    else:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        builder = builder.add_extension(aki, critical=False)
    return builder.sign(signer, hash_for(signer))


def new_root(
    trust_domain: str,
    *,
    key_type: KeyType = KeyType.EC_P256,
    ttl: timedelta = DEFAULT_ROOT_TTL,
    now: datetime | None = None,
    name: str | None = None,
) -> CA:
    _check_trust_domain(trust_domain)
    now = now or utcnow()
    key = new_key(key_type)
    cert = _sign_ca(
        subject=_ca_name(trust_domain, "root", name),
        key=key,
        issuer=None,
        trust_domain=trust_domain,
        not_before=now - CLOCK_SKEW_BACKDATE,
        not_after=now + ttl,
        path_length=None,
    )
    return CA(cert=cert, key=key)


def new_intermediate(
    parent: CA,
    *,
    key_type: KeyType = KeyType.EC_P256,
    ttl: timedelta = DEFAULT_INTERMEDIATE_TTL,
    now: datetime | None = None,
    name: str | None = None,
    path_length: int | None = 0,
) -> CA:
    """An intermediate under `parent`; its notAfter never outlives the parent's.

    pathLen 0 (the default) lets it sign only leaves; nest intermediates by giving the
    upper one `path_length=1` (or None for unlimited).
    """
    now = now or utcnow()
    td = parent.trust_domain
    key = new_key(key_type)
    cert = _sign_ca(
        subject=_ca_name(td, "intermediate", name),
        key=key,
        issuer=parent,
        trust_domain=td,
        not_before=now - CLOCK_SKEW_BACKDATE,
        not_after=min(now + ttl, parent.cert.not_valid_after_utc),
        path_length=path_length,
    )
    return CA(cert=cert, key=key, chain=parent.intermediates, root=parent.trust_anchor)
