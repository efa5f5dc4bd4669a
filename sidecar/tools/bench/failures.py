"""Every way one request fails, as a kind (a Reason or a Trouble) and one plain line."""

from __future__ import annotations

import ssl
from enum import StrEnum

from cryptography import x509

from sidecar import svid
from sidecar.reasons import Reason
from sidecar.spiffe import SpiffePattern
from sidecar.tls.classify import classify


class Trouble(StrEnum):
    """Failures of a request that are not handshake reasons (those come from Reason)."""

    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECT_FAILED = "connect_failed"
    CLOSED_BEFORE_RESPONSE = "closed_before_response"
    SHORT_RESPONSE = "short_response"
    RESPONSE_TIMEOUT = "response_timeout"
    CONNECTION_RESET = "connection_reset"
    ECHO_MISMATCH = "echo_mismatch"
    OTHER = "other"


class RequestError(Exception):
    """One failed request: `kind` is a Reason or Trouble value, `detail` one plain line."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def connect_error(exc: OSError, target: str, timeout: float) -> RequestError:
    if isinstance(exc, ConnectionRefusedError):
        return RequestError(Trouble.CONNECT_REFUSED,
                            f"{target} refused the connection: nothing listens there")
    if isinstance(exc, TimeoutError):
        return RequestError(Trouble.CONNECT_TIMEOUT,
                            f"no answer from {target} within {timeout:g}s: the host is down "
                            "or a firewall drops the packets")
    hint = ""
    if exc.errno == 99:  # EADDRNOTAVAIL: every local port is in TIME_WAIT
        hint = " (out of local ports: lower --concurrency or --duration)"
    return RequestError(Trouble.CONNECT_FAILED,
                        f"cannot connect to {target}: {exc.strerror or exc}{hint}")


# Reasons whose explanation says more than OpenSSL's words ("wrong version number").
_SELF_EXPLAINED = frozenset({Reason.NOT_TLS, Reason.PEER_CLOSED, Reason.HANDSHAKE_TIMEOUT,
                             Reason.PROTOCOL_VERSION, Reason.NO_SHARED_CIPHER})


def handshake_error(exc: BaseException) -> RequestError:
    failure = classify(exc)
    reason = failure.reason
    explanation, fix = reason.words(by_peer=failure.by_peer)
    if failure.by_peer:
        return RequestError(reason, f"the server refused us: {failure.detail}; {fix}")
    words = explanation if reason in _SELF_EXPLAINED else failure.detail
    return RequestError(reason, f"handshake failed: {words}; {fix}")


def response_error(exc: BaseException, timeout: float) -> RequestError:
    """A failure after the handshake; in TLS 1.3 that is where a rejected client
    certificate shows up, since the client finishes before the server has judged it."""
    if isinstance(exc, TimeoutError):
        return RequestError(Trouble.RESPONSE_TIMEOUT,
                            f"no complete response within {timeout:g}s: the target must "
                            "answer each request (an echo app, `openssl s_server -rev`)")
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
        failure = classify(exc)
        who = "the server refused us after the handshake" if failure.by_peer else "TLS error"
        return RequestError(failure.reason, f"{who}: {failure.detail}")
    if isinstance(exc, ConnectionError | ssl.SSLEOFError):
        return RequestError(Trouble.CONNECTION_RESET,
                            "the server reset the connection: it may have refused our "
                            "certificate (see its logs)")
    return RequestError(Trouble.OTHER, f"{type(exc).__name__}: {exc}")


def peer_id_error(der: bytes | None, expect: SpiffePattern) -> RequestError | None:
    """None when the server's leaf is an SVID whose SPIFFE ID matches `expect`."""
    if der is None:
        return RequestError(Reason.INVALID_SVID, "the server presented no certificate")
    try:
        found = svid.spiffe_id_of(x509.load_der_x509_certificate(der))
    except (svid.SvidError, ValueError) as exc:
        return RequestError(Reason.INVALID_SVID,
                            f"the server's certificate is not an X.509-SVID: {exc}")
    if not expect.matches(found):
        return RequestError(Reason.SPIFFE_ID_MISMATCH,
                            f"the server is {found}, expected {expect}")
    return None
