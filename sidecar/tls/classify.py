"""Handshake failures -> SPEC.md reasons. Pure: exceptions and certificates in, Reason out.

OpenSSL reports a failure in one of three shapes, and each needs its own reading:
- our own verification of the peer's chain failed: `SSLCertVerificationError` with an
  X509_V_ERR code (x509_vfy.h);
- the peer sent an alert (it refused us, or we share nothing): the library reason names
  the alert, e.g. `TLSV1_ALERT_UNKNOWN_CA`;
- the bytes were not TLS, or the peer went away: record-layer reasons, EOF, reset.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Collection
from dataclasses import dataclass

from cryptography import x509

from sidecar.reasons import Reason
from sidecar.spiffe import SpiffeId, quoted

# X509_V_ERR_* codes from OpenSSL's x509_vfy.h; stable across 1.1 and 3.x.
_VERIFY_CODES: dict[int, Reason] = {
    2: Reason.UNKNOWN_CA,  # unable to get issuer certificate
    4: Reason.BAD_SIGNATURE,  # unable to decrypt certificate signature
    6: Reason.BAD_SIGNATURE,  # unable to decode issuer public key
    7: Reason.BAD_SIGNATURE,  # certificate signature failure
    9: Reason.CERT_NOT_YET_VALID,
    10: Reason.CERT_EXPIRED,
    18: Reason.UNKNOWN_CA,  # self-signed leaf
    19: Reason.UNKNOWN_CA,  # self-signed certificate in chain
    20: Reason.UNKNOWN_CA,  # unable to get local issuer certificate
    21: Reason.UNKNOWN_CA,  # unable to verify the first certificate
    22: Reason.CHAIN_TOO_LONG,  # deeper than the verify depth (contexts.MAX_CHAIN_DEPTH)
    23: Reason.REVOKED,
    24: Reason.INVALID_SVID,  # invalid CA certificate in the chain
    26: Reason.INVALID_SVID,  # unsupported certificate purpose
    79: Reason.INVALID_SVID,  # CA cert does not include key usage extension
}
_MISSING_ISSUER_CODES = frozenset({2, 20, 21})

# Library reasons (the text in brackets of an SSLError) -> SPEC reasons.
_LIBRARY_REASONS: dict[str, Reason] = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": Reason.NO_CLIENT_CERT,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": Reason.NO_CLIENT_CERT,
    "UNSUPPORTED_PROTOCOL": Reason.PROTOCOL_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": Reason.PROTOCOL_VERSION,
    "NO_PROTOCOLS_AVAILABLE": Reason.PROTOCOL_VERSION,
    "VERSION_TOO_LOW": Reason.PROTOCOL_VERSION,
    "VERSION_TOO_HIGH": Reason.PROTOCOL_VERSION,
    "WRONG_SSL_VERSION": Reason.PROTOCOL_VERSION,
    "NO_SHARED_CIPHER": Reason.NO_SHARED_CIPHER,
    "NO_CIPHERS_AVAILABLE": Reason.NO_SHARED_CIPHER,
    "NO_SUITABLE_SIGNATURE_ALGORITHM": Reason.NO_SHARED_CIPHER,
    "NO_SHARED_SIGNATURE_ALGORITHMS": Reason.NO_SHARED_CIPHER,
    "NO_SUITABLE_KEY_SHARE": Reason.NO_SHARED_CIPHER,
    "SSLV3_ALERT_HANDSHAKE_FAILURE": Reason.NO_SHARED_CIPHER,
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": Reason.NO_SHARED_CIPHER,
    # Our http listener refused the client's ALPN list (openssl.offer_http1), or, from
    # the client's seat, the server refused ours with the alert.
    "NO_APPLICATION_PROTOCOL": Reason.NO_APPLICATION_PROTOCOL,
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": Reason.NO_APPLICATION_PROTOCOL,
    "TLSV1_ALERT_UNKNOWN_CA": Reason.UNKNOWN_CA,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": Reason.CERT_EXPIRED,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": Reason.REVOKED,
    "TLSV1_ALERT_DECRYPT_ERROR": Reason.BAD_SIGNATURE,
    # The peer's CertificateVerify does not verify with its certificate's key: it holds
    # a certificate, not the key (TLS 1.2 and 1.3 alike).
    "BAD_SIGNATURE": Reason.BAD_SIGNATURE,
    # A handshake message past what we read: once the hello is in, the peer's Certificate
    # (contexts.MAX_CHAIN_BYTES), so a chain-size attack has a name of its own.
    "EXCESSIVE_MESSAGE_SIZE": Reason.MESSAGE_TOO_LARGE,
    # Neither says what was wrong: Go sends bad_certificate for every client certificate
    # it cannot verify, OpenSSL certificate_unknown for what it has no alert for.
    "SSLV3_ALERT_BAD_CERTIFICATE": Reason.BAD_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": Reason.BAD_CERTIFICATE,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": Reason.INVALID_SVID,
    "UNEXPECTED_EOF_WHILE_READING": Reason.PEER_CLOSED,
    "WRONG_VERSION_NUMBER": Reason.NOT_TLS,
    "HTTP_REQUEST": Reason.NOT_TLS,
    "HTTPS_PROXY_REQUEST": Reason.NOT_TLS,
    "UNKNOWN_PROTOCOL": Reason.NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": Reason.NOT_TLS,
    "RECORD_LENGTH_MISMATCH": Reason.NOT_TLS,
    "UNEXPECTED_RECORD": Reason.NOT_TLS,
    "UNEXPECTED_MESSAGE": Reason.OTHER,
    "RENEGOTIATION_ATTEMPT": Reason.OTHER,
    "NO_RENEGOTIATION": Reason.OTHER,
}

# Where a reason's own name says too little.
_WORDS = {
    "UNSUPPORTED_PROTOCOL": "unsupported protocol: the peer speaks only TLS versions this "
                            "side does not accept (TLS 1.3 only unless tls.min_version: "
                            "\"1.2\")",
    "NO_APPLICATION_PROTOCOL": "the client's ALPN offer lacks http/1.1 (h2 alone?), and "
                               "this http listener speaks HTTP/1.1 only",
}

# Which of those reasons the peer reported about us (an alert it sent), as opposed to a
# judgement of ours: the words in the log must say whose certificate was refused.
_PEER_SAYS = frozenset(
    name for name in _LIBRARY_REASONS
    if "_ALERT_" in name and name != "SSLV3_ALERT_HANDSHAKE_FAILURE"
)


@dataclass(frozen=True, slots=True)
class Failure:
    reason: Reason
    detail: str  # plain words for the log, `diagnose` and the user
    by_peer: bool = False  # the peer refused us (its alert) rather than we the peer


def classify(
    exc: BaseException,
    *,
    presented: list[bytes] | None = None,
    known_intermediates: Collection[x509.Name] = (),
    trusted_names: Collection[x509.Name] = (),
    trust_domains: Collection[str] = (),
) -> Failure:
    """Classify an exception raised while handshaking. `trusted_names`: the subjects of
    our bundle CAs, so a CA that copies one's name is not called "not in our bundle";
    `trust_domains`: those we hold a bundle for, so a peer from another one is told so."""
    if isinstance(exc, TimeoutError):
        return Failure(Reason.HANDSHAKE_TIMEOUT, "the handshake did not finish in time")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verification(exc, presented, known_intermediates, trusted_names,
                             trust_domains)
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return Failure(Reason.PEER_CLOSED, "the peer closed the connection mid-handshake")
    if isinstance(exc, ssl.SSLError):
        name = getattr(exc, "reason", None) or _name_in(str(exc))
        reason = _LIBRARY_REASONS.get(name, Reason.OTHER)
        by_peer = name in _PEER_SAYS
        words = _WORDS.get(name) or (name.lower().replace("_", " ") if name else str(exc))
        detail = f"the peer sent the alert '{words}'" if by_peer else words
        return Failure(reason, detail, by_peer=by_peer)
    if isinstance(exc, ConnectionError | EOFError):
        return Failure(Reason.PEER_CLOSED, f"the peer closed the connection ({exc})")
    if isinstance(exc, OSError):
        return Failure(Reason.PEER_CLOSED, f"socket error during the handshake: {exc}")
    return Failure(Reason.OTHER, f"{type(exc).__name__}: {exc}")


def _name_in(message: str) -> str:
    """The library reason of an SSLError whose code Python's table lacks (it then leaves
    `reason` None): "[SSL] tlsv1 alert no application protocol (_ssl.c:1020)" ->
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL"."""
    words = message.partition("] ")[2].rpartition(" (")[0]
    return words.upper().replace(" ", "_") if words else ""


def _verification(
    exc: ssl.SSLCertVerificationError,
    presented: list[bytes] | None,
    known_intermediates: Collection[x509.Name],
    trusted_names: Collection[x509.Name],
    trust_domains: Collection[str],
) -> Failure:
    code = exc.verify_code
    reason = _VERIFY_CODES.get(code, Reason.OTHER)
    detail = str(exc.verify_message)
    if code in _MISSING_ISSUER_CODES and presented:
        reason, detail = _missing_issuer(presented, known_intermediates, trusted_names)
        if reason is Reason.UNKNOWN_CA and trust_domains:
            detail += _foreign_domain(presented[0], trust_domains)
    return Failure(reason, detail)


def _foreign_domain(leaf_der: bytes, trust_domains: Collection[str]) -> str:
    """When the peer's SPIFFE ID names a trust domain we hold no bundle for, that is the
    likelier cause than a CA missing from a bundle we have: say so (only on a refusal)."""
    try:
        sans = x509.load_der_x509_certificate(leaf_der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        domain = SpiffeId.parse(next(u for u in uris if u.startswith("spiffe://")))
    except (ValueError, x509.ExtensionNotFound, StopIteration):
        return ""  # no SPIFFE ID to go by: authentication says more if it gets that far
    name = domain.trust_domain.name
    if name in trust_domains:
        return ""
    return (f"; its SPIFFE ID is in trust domain {quoted(name)}, for which we hold no "
            "bundle (add it under identity.federated_bundles to accept it)")


# A refused peer usually comes back with the same chain: its last certificate's issuer, as
# a name and as words, is read once. Bounded: a peer chooses what it presents.
_ISSUERS: dict[bytes, tuple[x509.Name, str]] = {}
_ISSUERS_KEPT = 256


def _issuer_of(der: bytes) -> tuple[x509.Name, str]:
    """The issuer of a DER certificate, and its RFC 4514 string; ValueError if unparsable."""
    found = _ISSUERS.get(der)
    if found is None:
        name = x509.load_der_x509_certificate(der).issuer
        if len(_ISSUERS) >= _ISSUERS_KEPT:
            _ISSUERS.clear()
        found = _ISSUERS[der] = (name, name.rfc4514_string())
    return found


def skew_note(presented: list[bytes] | None, hint: float, now: float | None = None) -> str:
    """When the peer's leaf is outside its validity by less than `hint` seconds, the
    likeliest cause is two clocks that differ: say so, and by how much."""
    if not presented or hint <= 0:
        return ""
    try:
        leaf = x509.load_der_x509_certificate(presented[0])
    except ValueError:
        return ""
    at = now if now is not None else time.time()
    early = leaf.not_valid_before_utc.timestamp() - at
    late = at - leaf.not_valid_after_utc.timestamp()
    if 0 < early <= hint:
        return (f"; off by only {_seconds(early)}: check the clocks (the two hosts' clocks "
                "probably differ)")
    if 0 < late <= hint:
        # Just expired: a clock ahead of the issuer's looks the same as an issuer that
        # stopped rotating one lifetime ago, and only the second is fixed by NTP.
        return (f"; expired only {_seconds(late)} ago: the issuer may have stopped rotating "
                "it, or the two hosts' clocks differ; check both")
    return ""


def _seconds(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _missing_issuer(
    presented: list[bytes], known_intermediates: Collection[x509.Name],
    trusted_names: Collection[x509.Name] = (),
) -> tuple[Reason, str]:
    """A chain that ends before a trust anchor: is a known intermediate left out?"""
    try:
        issuer_name, issuer = _issuer_of(presented[-1])
    except ValueError:
        return Reason.UNKNOWN_CA, "the peer's certificate could not be parsed"
    if issuer_name in known_intermediates:
        return (
            Reason.MISSING_INTERMEDIATE,
            f"the peer sent {len(presented)} certificate(s) ending at one issued by "
            f"{quoted(issuer)}, a known intermediate it did not send",
        )
    if issuer_name in trusted_names:
        # OpenSSL looked the issuer up by name and key identifier and found none: a CA of
        # that name is trusted, but not the one that signed this (a rogue copy of its name).
        return (
            Reason.UNKNOWN_CA,
            f"a CA named '{issuer}' is trusted, but the peer's certificate was not signed "
            "by it (different key): a different CA that copies a trusted one's name",
        )
    return (
        Reason.UNKNOWN_CA,
        f"the peer's chain ends at {quoted(issuer)}, which is not in our trust bundle",
    )
