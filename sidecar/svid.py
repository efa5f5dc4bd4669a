"""The X.509-SVID rules, as pure functions over a parsed certificate.

Source: the X.509-SVID spec (spiffe/spiffe `standards/X509-SVID.md`). Nothing here
touches a socket, a file or `ssl`: chain validation belongs to OpenSSL in the handshake;
this module answers "is this verified leaf a well-formed SVID, and whose is it?", and
"may this certificate sign SVIDs?".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.spiffe import SpiffeId, SpiffeIdError, quoted


class SvidRule(StrEnum):
    """One X.509-SVID rule; the values are stable names for logs, `inspect --json` and tests."""

    MALFORMED_EXTENSIONS = "malformed_extensions"
    URI_SAN_COUNT = "uri_san_count"
    URI_SAN_SCHEME = "uri_san_scheme"
    INVALID_SPIFFE_ID = "invalid_spiffe_id"
    SPIFFE_ID_WITHOUT_PATH = "spiffe_id_without_path"
    LEAF_IS_CA = "leaf_is_ca"
    KEY_USAGE_MISSING = "key_usage_missing"
    KEY_USAGE_NOT_CRITICAL = "key_usage_not_critical"
    NO_DIGITAL_SIGNATURE = "no_digital_signature"
    KEY_CERT_SIGN_ON_LEAF = "key_cert_sign_on_leaf"
    CRL_SIGN_ON_LEAF = "crl_sign_on_leaf"
    EKU_MISSING_SERVER_OR_CLIENT_AUTH = "eku_missing_server_or_client_auth"
    CA_FLAG_MISSING = "ca_flag_missing"
    CA_KEY_CERT_SIGN_MISSING = "ca_key_cert_sign_missing"


@dataclass(frozen=True, slots=True)
class SvidProblem:
    rule: SvidRule
    message: str  # what is wrong and what to do

    def __str__(self) -> str:
        return self.message


class SvidError(ValueError):
    """A certificate breaks X.509-SVID rules; `problems` lists every one."""

    def __init__(self, problems: list[SvidProblem]) -> None:
        self.problems: tuple[SvidProblem, ...] = tuple(problems)
        super().__init__("; ".join(p.message for p in self.problems))


@dataclass(frozen=True, slots=True)
class _Extensions:
    """The extensions the SVID rules look at, gathered in one pass."""

    uris: tuple[str, ...]
    is_ca: bool  # basicConstraints cA; absent means False (RFC 5280 4.2.1.9)
    key_usage: x509.KeyUsage | None
    key_usage_critical: bool
    eku: x509.ExtendedKeyUsage | None


def _gather(cert: x509.Certificate) -> _Extensions | SvidProblem:
    try:
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as error:
        return SvidProblem(
            SvidRule.MALFORMED_EXTENSIONS,
            f"the certificate's extensions cannot be parsed ({error}); reissue it",
        )
    uris: tuple[str, ...] = ()
    is_ca = False
    key_usage: x509.KeyUsage | None = None
    key_usage_critical = False
    eku: x509.ExtendedKeyUsage | None = None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            uris = tuple(value.get_values_for_type(x509.UniformResourceIdentifier))
        elif isinstance(value, x509.BasicConstraints):
            is_ca = value.ca
        elif isinstance(value, x509.KeyUsage):
            key_usage, key_usage_critical = value, ext.critical
        elif isinstance(value, x509.ExtendedKeyUsage):
            eku = value
    return _Extensions(uris, is_ca, key_usage, key_usage_critical, eku)


def _leaf_id(uris: tuple[str, ...]) -> SpiffeId | SvidProblem:
    if len(uris) != 1:
        listed = f" ({', '.join(quoted(u) for u in uris)})" if uris else ""
        return SvidProblem(
            SvidRule.URI_SAN_COUNT,
            f"the certificate has {len(uris)} URI SANs{listed}; an X.509-SVID carries exactly "
            "one, its SPIFFE ID: reissue it with a single spiffe:// URI SAN",
        )
    uri = uris[0]
    scheme = uri.partition(":")[0]
    if scheme.lower() != "spiffe":
        return SvidProblem(
            SvidRule.URI_SAN_SCHEME,
            f"the URI SAN {quoted(uri)} is not a spiffe:// URI; an X.509-SVID's only URI SAN "
            "is its SPIFFE ID: reissue it with one",
        )
    try:
        spiffe_id = SpiffeId.parse(uri)
    except SpiffeIdError as error:
        return SvidProblem(
            SvidRule.INVALID_SPIFFE_ID,
            f"the URI SAN {error}; reissue the certificate with a valid SPIFFE ID",
        )
    if not spiffe_id.path:
        return SvidProblem(
            SvidRule.SPIFFE_ID_WITHOUT_PATH,
            f"the SPIFFE ID {quoted(uri)} names the trust domain itself; a leaf SVID's ID "
            "must have a path (X.509-SVID 5.2), e.g. spiffe://example.org/ns/default/sa/app",
        )
    return spiffe_id


def _leaf_usage_problems(ext: _Extensions) -> list[SvidProblem]:
    problems: list[SvidProblem] = []
    if ext.is_ca:
        problems.append(
            SvidProblem(
                SvidRule.LEAF_IS_CA,
                "the certificate is a CA (basicConstraints cA=true); a CA certificate must not "
                "be used to authenticate: present a leaf SVID (cA=false) issued by that CA",
            )
        )
    usage = ext.key_usage
    if usage is None:
        problems.append(
            SvidProblem(
                SvidRule.KEY_USAGE_MISSING,
                "the certificate has no keyUsage extension; an X.509-SVID must have one, "
                "critical, with digitalSignature: reissue it",
            )
        )
        return problems
    if not ext.key_usage_critical:
        problems.append(
            SvidProblem(
                SvidRule.KEY_USAGE_NOT_CRITICAL,
                "the keyUsage extension is not marked critical; the X.509-SVID spec requires "
                "it: reissue the certificate",
            )
        )
    if not usage.digital_signature:
        problems.append(
            SvidProblem(
                SvidRule.NO_DIGITAL_SIGNATURE,
                "keyUsage lacks digitalSignature, which a TLS leaf needs to sign the handshake: "
                "reissue the certificate with it",
            )
        )
    if usage.key_cert_sign:
        problems.append(
            SvidProblem(
                SvidRule.KEY_CERT_SIGN_ON_LEAF,
                "keyUsage has keyCertSign, which only CA certificates may have: reissue the "
                "leaf without it",
            )
        )
    if usage.crl_sign:
        problems.append(
            SvidProblem(
                SvidRule.CRL_SIGN_ON_LEAF,
                "keyUsage has cRLSign, which only CA certificates may have: reissue the leaf "
                "without it",
            )
        )
    return problems


def _eku_problem(eku: x509.ExtendedKeyUsage | None) -> SvidProblem | None:
    # The spec makes the extension optional but, when present, requires both purposes:
    # a sidecar's SVID is a server certificate inbound and a client certificate outbound.
    if eku is None:
        return None
    missing = [
        name
        for oid, name in (
            (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
        )
        if oid not in eku
    ]
    if not missing:
        return None
    return SvidProblem(
        SvidRule.EKU_MISSING_SERVER_OR_CLIENT_AUTH,
        f"extendedKeyUsage lacks {' and '.join(missing)}; an X.509-SVID with this extension "
        "must have both serverAuth and clientAuth: reissue it with both (or without the "
        "extension)",
    )


def _examine_leaf(cert: x509.Certificate) -> tuple[SpiffeId | None, list[SvidProblem]]:
    ext = _gather(cert)
    if isinstance(ext, SvidProblem):
        return None, [ext]
    found = _leaf_id(ext.uris)
    problems = [found] if isinstance(found, SvidProblem) else []
    problems += _leaf_usage_problems(ext)
    eku_problem = _eku_problem(ext.eku)
    if eku_problem is not None:
        problems.append(eku_problem)
    return (found if isinstance(found, SpiffeId) else None), problems


def svid_problems(cert: x509.Certificate) -> list[SvidProblem]:
    """Every X.509-SVID leaf rule `cert` breaks; empty when it is a valid leaf SVID."""
    return _examine_leaf(cert)[1]


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of a verified peer leaf; raise `SvidError` if it breaks any SVID rule.

    Authentication calls this on every full handshake, so it reads the extensions once.
    """
    spiffe_id, problems = _examine_leaf(cert)
    if problems or spiffe_id is None:
        raise SvidError(problems)
    return spiffe_id


def ca_problems(cert: x509.Certificate) -> list[SvidProblem]:
    """Every rule a trust-bundle or intermediate CA certificate breaks (cA, keyCertSign)."""
    ext = _gather(cert)
    if isinstance(ext, SvidProblem):
        return [ext]
    problems: list[SvidProblem] = []
    if not ext.is_ca:
        problems.append(
            SvidProblem(
                SvidRule.CA_FLAG_MISSING,
                "the certificate is not a CA (basicConstraints cA is not true), so it cannot "
                "anchor or sign SVIDs: put only CA certificates in a bundle",
            )
        )
    if ext.key_usage is None or not ext.key_usage.key_cert_sign:
        problems.append(
            SvidProblem(
                SvidRule.CA_KEY_CERT_SIGN_MISSING,
                "the CA certificate's keyUsage lacks keyCertSign, so it may not sign "
                "certificates: reissue the CA with keyCertSign",
            )
        )
    return problems
