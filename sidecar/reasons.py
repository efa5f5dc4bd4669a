"""Every failure reason the proxy reports, with its explanation and likely fix.

One home for the words: the metric label, the access log, `check`, `inspect` and
`diagnose` all take them from here, so an on-call engineer reads the same sentence in
every place.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    CERT_EXPIRED = "cert_expired"
    CERT_NOT_YET_VALID = "cert_not_yet_valid"
    UNKNOWN_CA = "unknown_ca"
    MISSING_INTERMEDIATE = "missing_intermediate"
    BAD_SIGNATURE = "bad_signature"
    REVOKED = "revoked"
    CHAIN_TOO_LONG = "chain_too_long"
    MESSAGE_TOO_LARGE = "message_too_large"
    NO_CLIENT_CERT = "no_client_cert"
    INVALID_SVID = "invalid_svid"
    SPIFFE_ID_MISMATCH = "spiffe_id_mismatch"
    PROTOCOL_VERSION = "protocol_version"
    NO_SHARED_CIPHER = "no_shared_cipher"
    NO_APPLICATION_PROTOCOL = "no_application_protocol"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    PEER_CLOSED = "peer_closed"
    NOT_TLS = "not_tls"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    BAD_CERTIFICATE = "bad_certificate"
    OTHER = "other"

    @property
    def explanation(self) -> str:
        return _EXPLANATIONS[self][0]

    @property
    def fix(self) -> str:
        return _EXPLANATIONS[self][1]

    def words(self, *, by_peer: bool) -> tuple[str, str]:
        """(explanation, fix) from the seat that saw the failure: the default words judge
        the peer; `by_peer` (its alert refused us) turns them round to say what of ours it
        refused, so a client reading `diagnose` is not told to fix the server."""
        if by_peer and self in _REFUSED_US:
            return _REFUSED_US[self]
        return _EXPLANATIONS[self]


_EXPLANATIONS: dict[Reason, tuple[str, str]] = {
    Reason.CERT_EXPIRED: (
        "the peer's certificate (or a CA in its chain) is past its notAfter",
        "check that the peer's SVID issuer (spiffe-helper, SPIRE agent, cert-manager) is "
        "still rotating; if the gap is small, check the clocks",
    ),
    Reason.CERT_NOT_YET_VALID: (
        "the peer's certificate is not valid yet (its notBefore is in the future)",
        "the clocks of the two hosts probably differ: check NTP on both",
    ),
    Reason.UNKNOWN_CA: (
        "the peer's chain does not lead to any CA in the trust bundle for its trust domain",
        "make both sides trust the same CA: compare bundle.pem on both (the trust stores "
        "differ), or add a federated bundle for the peer's trust domain",
    ),
    Reason.MISSING_INTERMEDIATE: (
        "the peer sent its leaf without the intermediate CA that signed it",
        "the peer's svid.pem must hold the leaf followed by its intermediates",
    ),
    Reason.BAD_SIGNATURE: (
        "a signature does not verify: in the peer's chain, or its handshake signature "
        "(CertificateVerify: it holds the certificate but not its key)",
        "the certificate was altered or signed by a different key than its issuer's, or the "
        "peer's key file does not match its certificate: reissue it, check svid_key.pem",
    ),
    Reason.REVOKED: (
        "the peer's certificate is listed in a CRL we load",
        "issue the peer a new SVID; the revoked one must not come back",
    ),
    Reason.CHAIN_TOO_LONG: (
        "the peer's chain holds more than 8 intermediate CAs (our verify depth), far more "
        "than any SPIFFE chain needs",
        "a SPIFFE chain is the leaf and 1-3 intermediates: the peer's svid.pem holds "
        "extra certificates, or the peer is making us build long chains on purpose",
    ),
    Reason.MESSAGE_TOO_LARGE: (
        "a handshake message from the peer is larger than we read: past the hello, its "
        "certificate chain (over 16 KiB: dozens of certificates, a huge SAN or extension)",
        "a SPIFFE chain is 2-6 KiB: check the peer's svid.pem with `sidecar inspect`; "
        "many of these at once are a peer trying to make us parse large chains",
    ),
    Reason.NO_CLIENT_CERT: (
        "the client sent no certificate, and this listener requires mutual TLS",
        "configure the client with its SVID (cert and key); plain TLS clients are refused",
    ),
    Reason.INVALID_SVID: (
        "the certificate breaks an X.509-SVID rule (URI SAN count, CA flag, key usage, "
        "SPIFFE ID syntax)",
        "reissue it as an X.509-SVID: exactly one spiffe:// URI SAN, cA=false, "
        "digitalSignature key usage",
    ),
    Reason.SPIFFE_ID_MISMATCH: (
        "the server is authenticated but is not the SPIFFE ID this route expects",
        "check connect_to points at the right service, or widen expect_ids",
    ),
    Reason.PROTOCOL_VERSION: (
        "the two sides share no TLS version (this side allows TLS 1.3 only unless configured)",
        "upgrade the peer to TLS 1.3, or set tls.min_version: \"1.2\" on this side",
    ),
    Reason.NO_SHARED_CIPHER: (
        "the two sides share no cipher suite, signature algorithm or key-exchange group",
        "allow an AEAD/ECDHE suite on the peer",
    ),
    Reason.NO_APPLICATION_PROTOCOL: (
        "the client offered only application protocols (ALPN) the listener does not speak: "
        "an http listener speaks HTTP/1.1, and the client offered h2 alone, or others",
        "let the client offer http/1.1 too (most do; gRPC and h2-only clients cannot use "
        "an http listener yet: give them a tcp listener), or offer no ALPN at all",
    ),
    Reason.HANDSHAKE_TIMEOUT: (
        "the handshake did not finish within limits.handshake_timeout",
        "the peer is slow, stalled or not speaking TLS; check the network path",
    ),
    Reason.PEER_CLOSED: (
        "the peer closed the connection during the handshake",
        "the peer probably rejected our certificate or does not trust our CA: see its logs",
    ),
    Reason.NOT_TLS: (
        "the peer did not speak TLS (plaintext, HTTP, or random bytes)",
        "point a TLS client at this port, or plaintext clients at the outbound listener",
    ),
    Reason.UPSTREAM_UNAVAILABLE: (
        "the connection to the app or the remote could not be opened",
        "check that the app listens on forward_to, or the remote on connect_to",
    ),
    Reason.BAD_CERTIFICATE: (
        "the peer refused our certificate with the alert bad_certificate or "
        "certificate_unknown, which do not say why (Go sends it for any client certificate "
        "it cannot verify, OpenSSL for one not valid yet or unreadable)",
        "read the peer's log for why; check that the peer trusts our trust domain's CA, "
        "that our svid.pem holds our intermediates after the leaf, and that our SVID is "
        "valid now (`sidecar inspect`)",
    ),
    Reason.OTHER: (
        "the handshake failed for a reason not classified above",
        "the log line's detail carries OpenSSL's own words; `sidecar diagnose HOST:PORT` "
        "from this host shows each step of the handshake",
    ),
}

# The same failures told by the refused side: the peer's alert named a fault of ours.
_REFUSED_US: dict[Reason, tuple[str, str]] = {
    Reason.CERT_EXPIRED: (
        "the peer refused our certificate as expired (or not valid yet: an alert has no "
        "word for that), by its clock",
        "check that our SVID is being rotated (`sidecar inspect` shows its validity); if "
        "it is valid, check the peer's clock",
    ),
    Reason.CERT_NOT_YET_VALID: (
        "our certificate is not valid yet (its notBefore is ahead of the clock), so the "
        "peer refused it",
        "the clocks of the two hosts probably differ: check NTP on both",
    ),
    Reason.MISSING_INTERMEDIATE: (
        "we sent our leaf without the intermediate CA that signed it, so the peer could "
        "not build our chain",
        "our svid.pem must hold the leaf followed by its intermediates",
    ),
    Reason.UNKNOWN_CA: (
        "the peer refused our certificate: our chain does not lead to a CA it trusts",
        "give the peer our trust domain's CA (the CA in our bundle.pem) in its trust store, "
        "or a federated bundle for our trust domain",
    ),
    Reason.BAD_SIGNATURE: (
        "the peer refused our handshake signature or a signature in our chain",
        "our key file may not match our certificate, or the certificate was altered: "
        "check svid_key.pem against svid.pem (`sidecar inspect`), reissue if needed",
    ),
    Reason.REVOKED: (
        "the peer refused our certificate as revoked by a CRL it loads",
        "get a new SVID for this workload; the revoked one must not be used again",
    ),
    Reason.INVALID_SVID: (
        "the peer refused our certificate as not a valid X.509-SVID or not one it "
        "supports (URI SAN count, CA flag, key usage, extensions)",
        "check our SVID with `sidecar inspect` and have it reissued as an X.509-SVID: "
        "exactly one spiffe:// URI SAN, cA=false, digitalSignature key usage",
    ),
    Reason.NO_CLIENT_CERT: (
        "the server requires a client certificate and we sent none",
        "give this client its SVID (cert and key)",
    ),
    Reason.PROTOCOL_VERSION: (
        "the peer refused the TLS versions we offered (a sidecar accepts TLS 1.3 only "
        "unless configured)",
        "if this side offered TLS 1.2 only, offer TLS 1.3 from this side; if it offered "
        "TLS 1.3 only (a sidecar's default), the peer speaks TLS 1.2 only: upgrade it, or "
        "allow TLS 1.2 here (tls.min_version: \"1.2\"; `sidecar diagnose --tls-min 1.2`)",
    ),
    Reason.NO_SHARED_CIPHER: (
        "the peer found no cipher suite, signature algorithm or group it accepts in what "
        "we offered",
        "offer an AEAD/ECDHE suite and an ECDSA or RSA-PSS signature from this side",
    ),
    Reason.NO_APPLICATION_PROTOCOL: (
        "the server speaks none of the application protocols (ALPN) we offered (an http "
        "listener speaks HTTP/1.1 only)",
        "offer http/1.1 too, or no ALPN at all, or use a tcp listener for h2 and gRPC",
    ),
}
