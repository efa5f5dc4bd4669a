"""SSLContexts built from one identity snapshot: the TLS choices of SPEC.md, in one place.

A context is never changed after it serves a connection. A new SVID or bundle builds new
contexts (a trust store can be added to but never shrunk, and a new server context also
means new ticket keys, so tickets issued under the old trust stop resuming).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sidecar.identity import Identity
from sidecar.modes import SessionStore, TlsVersion
from sidecar.tls import engine, openssl, peerchain

# TLS 1.2 (only when configured): forward-secret AEAD suites, nothing else.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# One ticket per full handshake: a sidecar's client keeps one session per upstream, and
# each ticket costs the server an encryption (OpenSSL's default is two).
TICKETS_PER_HANDSHAKE = 1
# Intermediates a peer's chain may hold: SPIRE's nested and upstream-CA setups use 1-3;
# anything much longer is a peer making us do work (a 100-certificate chain verified).
MAX_CHAIN_DEPTH = 8
# Bytes a peer's Certificate message may hold: a SPIFFE chain of leaf + 3 intermediates is
# 2-6 KiB (ECDSA to RSA-4096); 16 KiB leaves room, and refuses a 50-certificate padding.
MAX_CHAIN_BYTES = 16 * 1024
# Key exchange (SPEC `tls.groups`). OpenSSL's default list also holds ffdhe2048..ffdhe8192:
# a ClientHello whose one key share is ffdhe8192 cost the server 137 ms of CPU before any
# authentication (X25519: 0.2 ms, P-384: 2.2 ms; bench/hello_cost.py), so a handful of
# replayed hellos a second stalls the event loop. Only these groups are ever offered.
GROUPS = ("X25519", "P-256", "P-384")
# Signature algorithms for handshake signatures, both ways (ours and the peer's
# CertificateVerify), in order of preference: no SHA-1 or SHA-224, no DSA. TLS 1.3 signs
# with RSA-PSS only (RFC 8446 4.2.3), so rsa_pkcs1 is listed only when TLS 1.2 is allowed,
# where peers without PSS need it; OpenSSL refuses it in a TLS 1.3 CertificateVerify.
SIGALGS_TLS13 = (
    "ed25519:ecdsa_secp256r1_sha256:ecdsa_secp384r1_sha384:ecdsa_secp521r1_sha512:"
    "rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pss_rsae_sha512:"
    "rsa_pss_pss_sha256:rsa_pss_pss_sha384:rsa_pss_pss_sha512"
)
SIGALGS_TLS12 = SIGALGS_TLS13 + ":rsa_pkcs1_sha256:rsa_pkcs1_sha384:rsa_pkcs1_sha512"


@dataclass(frozen=True, slots=True)
class Contexts:
    server: ssl.SSLContext
    client: ssl.SSLContext
    identity: Identity
    # Where the server keeps resumable sessions: MEMORY or TICKETS; None: not at all.
    session_store: SessionStore | None = SessionStore.TICKETS


def present(contexts: Contexts, identity: Identity) -> Contexts:
    """A new SVID under the same trust: the live contexts present it from now on.

    `load_cert_chain` on a live context changes what new handshakes present and keeps its
    ticket keys, so peers keep resuming across an SVID rotation (hourly or faster with
    SPIRE); handshakes already under way keep the certificate they started with.
    """
    pem = identity.chain_pem + identity.key_pem
    for ctx in (contexts.server, contexts.client):
        with _in_memory_file(pem) as path:
            ctx.load_cert_chain(path)
    return Contexts(contexts.server, contexts.client, identity, contexts.session_store)


def follow(
    contexts: Contexts, identity: Identity, build: Callable[[Identity], Contexts]
) -> Contexts:
    """The contexts for a reloaded identity: the live ones presenting it under the same
    trust (`present`), else new ones from `build`, retiring the old server context.

    New trust means new contexts, so tickets issued under the old trust stop resuming; the
    retired server context's session cache is flushed too, since live connections keep
    that context alive for a while and a cached session must not resume past its trust.
    """
    if identity.trust_version == contexts.identity.trust_version:
        return present(contexts, identity)
    fresh = build(identity)
    openssl.flush_sessions(contexts.server)
    return fresh


def ticket_keys(secret: bytes, epoch: int, trust_version: str) -> bytes:
    """The session ticket keys for one rotation period and one trust.

    Derived, not random: every worker of a sidecar derives the same keys from the secret
    they share (so a ticket from one worker resumes on another), rotation happens at the
    same epoch boundary everywhere without any message between them, and a trust change
    (bundle or CRL) changes the keys, so tickets made under the old trust never resume.
    """
    info = f"sidecar ticket keys|{epoch}|{trust_version}".encode()
    return hmac.digest(secret, info + b"|a", "sha256") + hmac.digest(
        secret, info + b"|b", "sha256") + hmac.digest(secret, info + b"|c", "sha256")[:16]


def build(
    identity: Identity,
    *,
    min_version: TlsVersion = TlsVersion.TLS_1_3,
    session_resumption: bool = True,
    ktls: bool = False,
    ticket_keys: bytes | None = None,
    session_cache_size: int | None = None,
    groups: tuple[str, ...] = GROUPS,
    http1: bool = False,
) -> Contexts:
    """`session_cache_size` set: keep sessions in memory (falls back to tickets when the
    cache cannot be set up); else stateless tickets under `ticket_keys`. `http1`: some
    inbound listener speaks HTTP/1.1, and its connections agree on ALPN http/1.1
    (openssl.offer_http1; the other listeners' see no ALPN).

    Raises PinError when the handshake parameters cannot be pinned (see `unpinnable`)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _offer(server, min_version, TlsVersion.TLS_1_3, groups)
    _with_identity(server, identity, ktls)
    if not openssl.available():
        server.sni_callback = engine.remember_server_name  # the PROXY header's SNI
    if http1:
        openssl.offer_http1(server)
    store = None
    if session_resumption:
        server.num_tickets = TICKETS_PER_HANDSHAKE
        if session_cache_size is not None and openssl.server_session_cache(
                server, session_cache_size):
            server.options |= ssl.OP_NO_TICKET  # in TLS 1.3: stateful tickets
            # A peer that hangs up without close_notify is a fatal error to OpenSSL, and a
            # fatal error evicts the session. The engine reads both ends as an end already.
            server.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
            store = SessionStore.MEMORY
        else:
            if ticket_keys is not None:
                openssl.set_ticket_keys(server, ticket_keys)
            store = SessionStore.TICKETS
    else:
        server.num_tickets = 0
        server.options |= ssl.OP_NO_TICKET
    client_ctx = _with_identity(client(min_version, groups=groups), identity, ktls)
    return Contexts(server, client_ctx, identity, store)


class PinError(RuntimeError):
    """The handshake parameters cannot be pinned on this Python: no context is built."""


def unpinnable() -> str | None:
    """Why the groups cannot be pinned here, or None when they can.

    The pin is a defence against a CPU DoS before authentication, so where it cannot be
    applied the sidecar refuses to start rather than serve OpenSSL's defaults. Python's
    ssl sets one curve at most (`set_ecdh_curve`), never a list; the pin needs
    openssl.py's reach into the context, which a free-threaded build does not give.
    """
    if openssl.available() or hasattr(ssl.SSLContext, "set_ecdh_curve"):
        return None  # without the reach: the one-group pin of _pin_one_group
    return (
        "cannot pin tls.groups: sidecar's direct OpenSSL access (sidecar/tls/openssl.py) "
        "does not work on this Python build, and without it OpenSSL would accept "
        "finite-field key exchange (a CPU DoS before authentication); run on a standard "
        "(GIL) CPython 3.13 build"
    )


def _pin_one_group(ctx: ssl.SSLContext, groups: tuple[str, ...]) -> bool:
    """Without the reach (SIDECAR_NO_OPENSSL_REACH=1, a free-threaded build): Python's
    own set_ecdh_curve, which on OpenSSL 3 sets the context's group list to that single
    group, pins key exchange to the first of `groups`. Finite-field groups stay refused
    (seen here: ffdhe2048 and P-256 hellos fail with NO_SUITABLE_KEY_SHARE, X25519
    connects); the price is that every peer must offer that one group. Signature
    algorithms keep OpenSSL's defaults (its security level already refuses SHA-1)."""
    try:
        ctx.set_ecdh_curve(_CURVE_NAMES.get(groups[0], groups[0]))
    except (ValueError, ssl.SSLError):
        return False
    return True


# tls.groups names -> the short names set_ecdh_curve looks up.
_CURVE_NAMES = {"P-256": "prime256v1", "P-384": "secp384r1", "P-521": "secp521r1"}


def pin_handshake(ctx: ssl.SSLContext, groups: tuple[str, ...],
                  min_version: TlsVersion) -> bool:
    """Pin the key-exchange groups and signature algorithms of a context, client or server;
    False when they could not all be set.

    """
    if not openssl.available():
        return _pin_one_group(ctx, groups)
    return openssl.set_groups(ctx, ":".join(groups)) and openssl.set_sigalgs(
        ctx, SIGALGS_TLS12 if min_version == TlsVersion.TLS_1_2 else SIGALGS_TLS13)


def client(
    min_version: TlsVersion = TlsVersion.TLS_1_3, max_version: TlsVersion = TlsVersion.TLS_1_3,
    groups: tuple[str, ...] = GROUPS,
) -> ssl.SSLContext:
    """A client context offering what the sidecar's outbound side offers: the versions,
    the TLS 1.2 suites, the key-exchange groups, the signature algorithms and options.
    No certificate and no trust yet: the caller loads them.

    The outbound (`build`), `sidecar diagnose` and `sidecar bench` all start from here, so
    a tool offers exactly what the sidecar offers (diagnose once left out the TLS 1.2
    suites, and could report ok where the sidecar fails). `max_version` "1.2" plays an old
    peer. Raises PinError when the handshake parameters cannot be pinned."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _offer(ctx, min_version, max_version, groups)
    # SVIDs need not carry a DNS name: the caller checks the server's SPIFFE ID instead.
    ctx.check_hostname = False
    return ctx


def _offer(
    ctx: ssl.SSLContext, min_version: TlsVersion, max_version: TlsVersion,
    groups: tuple[str, ...],
) -> None:
    """What a context offers in a handshake, client or server, from SPEC's `tls` keys."""
    low = TlsVersion.TLS_1_2 if TlsVersion.TLS_1_2 in (min_version, max_version) \
        else TlsVersion.TLS_1_3
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_2 if low is TlsVersion.TLS_1_2
                           else ssl.TLSVersion.TLSv1_3)
    if max_version is TlsVersion.TLS_1_2:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if low is TlsVersion.TLS_1_2:
        ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if not pin_handshake(ctx, groups, low):
        raise PinError(unpinnable() or f"OpenSSL refused the groups {list(groups)} or the "
                       "signature algorithms it was given")


def _with_identity(ctx: ssl.SSLContext, identity: Identity, ktls: bool) -> ssl.SSLContext:
    """The sidecar's own side: its SVID, its trust, kTLS, and the reach's tuning."""
    if ktls:
        ctx.options |= ssl.OP_ENABLE_KTLS
    present_and_trust(ctx, identity)
    peerchain.install(ctx)
    openssl.release_buffers(ctx)
    openssl.read_ahead(ctx)
    openssl.bound_peer_chain(ctx, MAX_CHAIN_DEPTH, MAX_CHAIN_BYTES)
    return ctx


def present_and_trust(ctx: ssl.SSLContext, identity: Identity) -> None:
    """An identity's SVID and trust into a context: what it presents, the anchors of every
    bundle and its CRLs. The sidecar's contexts and `sidecar diagnose` (which installs
    its own handshake hooks) load an identity this one way."""
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Every trust domain's anchors go into OpenSSL's one store so that it can verify any
    # peer; authn.py then insists the chain ended in the bundle of the peer's own trust
    # domain, so federated bundles are never merged in effect.
    ctx.load_verify_locations(cadata=identity.all_cas_pem().decode("ascii"))
    if identity.crls_pem:
        # cadata takes certificates only; a file path takes CRLs too.
        with _in_memory_file(identity.crls_pem) as path:
            ctx.load_verify_locations(cafile=path)
        # Hard fail: a revoked peer, or one whose CA has no CRL here, is refused.
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    with _in_memory_file(identity.chain_pem + identity.key_pem) as path:
        ctx.load_cert_chain(path)


@contextlib.contextmanager
def _in_memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open whose bytes never touch a disk (the key is among them)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sidecar-svid", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="sidecar-svid-") as f:  # 0600 by default
        f.write(data)
        f.flush()
        yield f.name
