"""Handshake failures -> reasons: classify() over exceptions from real handshakes.

Each exception comes from a real handshake over a socketpair (or a real timeout), never
from a hand-made SSLError, so a change in what OpenSSL raises shows up here. The parser of
Certificate messages is tested on hand-built messages, good, cut short and malformed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from tls_pairs import (
    client_context,
    closed_on_exit,
    der,
    endpoints,
    forge_certificate_verify,
    handshake_both,
    present,
    ready,
    socket_pair,
    tcp_pair,
)

from sidecar.endpoint import WANT_READ, WANT_WRITE
from sidecar.identity import Identity, load_identity
from sidecar.reasons import Reason
from sidecar.tls import contexts, peerchain
from sidecar.tls.classify import Failure, classify
from sidecar.tls.engine import TlsEndpoint
from sidecar.tls.peerchain import MAX_KEPT, parse_certificate_message
from sidecar.tools import pki
from sidecar.tools.pki import CA

pytestmark = pytest.mark.timeout(30)

TD = "example.org"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/server"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
HANDSHAKE_BUDGET = 5.0  # a failing handshake that hangs fails the test instead

type Outcome = BaseException | None


@pytest.fixture(scope="module")
def cas() -> tuple[CA, CA]:
    root = pki.new_root(TD)
    return root, pki.new_intermediate(root)


@pytest.fixture(scope="module")
def server_identity(cas: tuple[CA, CA], tmp_path_factory: pytest.TempPathFactory) -> Identity:
    d = tmp_path_factory.mktemp("server")
    files = pki.write_svid(d, pki.issue_svid(cas[1], SERVER_ID), [cas[0].cert])
    return load_identity(d / files.cert, d / files.key, d / files.bundle)


@pytest.fixture
def server_ctx(server_identity: Identity) -> ssl.SSLContext:
    return contexts.build(server_identity).server


@pytest.fixture
def sockets() -> Iterator[list[socket.socket | TlsEndpoint]]:
    with closed_on_exit() as held:
        yield held


async def _first_read(ep: TlsEndpoint) -> Outcome:
    """In TLS 1.3 a refused client learns it on its first read, from the server's alert."""
    buf = memoryview(bytearray(64 * 1024))
    while True:
        try:
            n = ep.read_into(buf)
        except (OSError, ssl.SSLError) as exc:
            return exc
        if n not in (WANT_READ, WANT_WRITE):
            return None
        await ready(ep.fd)


async def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, held: list[socket.socket | TlsEndpoint]
) -> tuple[Outcome, Outcome]:
    """(server's exception, client's exception, from the handshake or its first read)."""
    srv, cli = endpoints(server_ctx, client_ctx)
    held += [srv, cli]
    async with asyncio.timeout(HANDSHAKE_BUDGET):
        s, c = await handshake_both(srv, cli)
        srv.close()  # any alert is out; a client that was let in then reads the end
        if c is None:
            c = await _first_read(cli)
    assert s is None or isinstance(s, OSError), s
    assert c is None or isinstance(c, OSError), c
    return s, c


def _now() -> datetime:
    return datetime.now(UTC)


# --- our judgement of the client's certificate, and what the client hears ------------------


@pytest.mark.parametrize(
    ("make", "ours", "theirs"),
    [
        pytest.param(
            lambda inter: pki.issue_svid(inter, CLIENT_ID, not_before=_now() - timedelta(hours=2),
                                         not_after=_now() - timedelta(hours=1)),
            Reason.CERT_EXPIRED, Reason.CERT_EXPIRED, id="expired"),
        pytest.param(
            lambda inter: pki.issue_svid(inter, CLIENT_ID,
                                         not_before=_now() + timedelta(hours=1)),
            Reason.CERT_NOT_YET_VALID, Reason.BAD_CERTIFICATE, id="not-yet-valid"),
        pytest.param(
            lambda inter: pki.issue_svid(inter, CLIENT_ID, issuer_key=pki.new_key()),
            Reason.BAD_SIGNATURE, Reason.BAD_SIGNATURE, id="bad-signature"),
        pytest.param(
            lambda inter: pki.issue_svid(pki.new_intermediate(pki.new_root(TD)), CLIENT_ID),
            Reason.UNKNOWN_CA, Reason.UNKNOWN_CA, id="foreign-ca"),
    ],
)
async def test_refused_client_certificate(
    server_ctx: ssl.SSLContext, cas: tuple[CA, CA], tmp_path: Path,
    sockets: list[socket.socket | TlsEndpoint], make: object, ours: Reason,
    theirs: Reason | None,
) -> None:
    svid = make(cas[1])  # type: ignore[operator]
    s, c = await handshake(server_ctx, client_context(svid, [cas[0].cert], tmp_path), sockets)
    assert isinstance(s, ssl.SSLCertVerificationError), s
    failure = classify(s)
    assert failure.reason is ours
    assert failure.by_peer is False  # our judgement of the peer, not its of us
    assert failure.detail
    # The client hears an alert: it is the one refused.
    assert c is not None
    heard = classify(c)
    assert heard.by_peer is True
    if theirs is not None:
        assert heard.reason is theirs


async def test_revoked_by_a_loaded_crl(
    server_ctx: ssl.SSLContext, cas: tuple[CA, CA], tmp_path: Path,
    sockets: list[socket.socket | TlsEndpoint],
) -> None:
    root, inter = cas
    svid = pki.issue_svid(inter, CLIENT_ID)
    crl_file = tmp_path / "crl.pem"
    pki.write_crl(crl_file, pki.issue_crl(inter, [svid.serial]))
    server_ctx.load_verify_locations(cafile=crl_file)
    server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    s, c = await handshake(server_ctx, client_context(svid, [root.cert], tmp_path), sockets)
    assert isinstance(s, ssl.SSLCertVerificationError), s
    assert classify(s).reason is Reason.REVOKED
    assert c is not None
    assert classify(c) == Failure(Reason.REVOKED, classify(c).detail, by_peer=True)


async def test_a_crl_that_revokes_someone_else_lets_the_client_in(
    server_ctx: ssl.SSLContext, cas: tuple[CA, CA], tmp_path: Path,
    sockets: list[socket.socket | TlsEndpoint],
) -> None:
    root, inter = cas
    crl_file = tmp_path / "crl.pem"
    pki.write_crl(crl_file, pki.issue_crl(inter, [pki.new_serial()]))
    server_ctx.load_verify_locations(cafile=crl_file)
    server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ok = pki.issue_svid(inter, CLIENT_ID)
    client = client_context(ok, [root.cert], tmp_path)
    assert await handshake(server_ctx, client, sockets) == (None, None)


async def test_no_client_certificate(
    server_ctx: ssl.SSLContext, cas: tuple[CA, CA], tmp_path: Path,
    sockets: list[socket.socket | TlsEndpoint],
) -> None:
    s, c = await handshake(server_ctx, client_context(None, [cas[0].cert], tmp_path), sockets)
    assert s is not None and classify(s).reason is Reason.NO_CLIENT_CERT
    assert classify(s).by_peer is False
    assert c is not None and classify(c).reason is Reason.NO_CLIENT_CERT
    assert classify(c).by_peer is True


async def test_tls12_client_against_tls13_server_on_both_sides(
    server_ctx: ssl.SSLContext, cas: tuple[CA, CA], tmp_path: Path,
    sockets: list[socket.socket | TlsEndpoint],
) -> None:
    svid = pki.issue_svid(cas[1], CLIENT_ID)
    client = client_context(svid, [cas[0].cert], tmp_path, max_version=ssl.TLSVersion.TLSv1_2)
    s, c = await handshake(server_ctx, client, sockets)
    assert s is not None and classify(s).reason is Reason.PROTOCOL_VERSION
    assert c is not None and classify(c).reason is Reason.PROTOCOL_VERSION
    assert classify(c).by_peer is True


async def test_server_from_a_foreign_ca_refused_by_the_client(
    cas: tuple[CA, CA], tmp_path: Path, sockets: list[socket.socket | TlsEndpoint],
) -> None:
    # The other way round: we are the client and the server's chain is not ours.
    foreign = pki.new_intermediate(pki.new_root(TD))
    bad_server = pki.issue_svid(foreign, SERVER_ID)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    present(server, bad_server, tmp_path)
    client = client_context(pki.issue_svid(cas[1], CLIENT_ID), [cas[0].cert], tmp_path)
    assert peerchain.install(client)
    s, c = await handshake(server, client, sockets)
    assert isinstance(c, ssl.SSLCertVerificationError), c
    assert classify(c).reason is Reason.UNKNOWN_CA
    assert s is not None and classify(s).reason is Reason.UNKNOWN_CA
    assert classify(s).by_peer is True


# --- a stolen certificate, and chains past the bounds of contexts.py --------------------------


async def test_forged_certificate_verify_is_bad_signature(
    server_ctx: ssl.SSLContext, cas: tuple[CA, CA], sockets: list[socket.socket | TlsEndpoint],
) -> None:
    a, b = socket_pair()
    sockets.append(b)
    srv = TlsEndpoint.server(server_ctx, a)
    sockets.append(srv)
    b.settimeout(HANDSHAKE_BUDGET)
    client = asyncio.create_task(asyncio.to_thread(
        forge_certificate_verify, b, pki.issue_svid(cas[1], CLIENT_ID)))
    with pytest.raises(ssl.SSLError) as caught:
        async with asyncio.timeout(HANDSHAKE_BUDGET):
            await srv.handshake()
    srv.close()
    await client
    failure = classify(caught.value)
    assert failure.reason is Reason.BAD_SIGNATURE, caught.value
    assert failure.by_peer is False


def _chain_below(top: CA, n: int) -> CA:
    for _ in range(n):
        top = pki.new_intermediate(top, path_length=None)
    return top


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda root: pki.issue_svid(_chain_below(root, 49), CLIENT_ID),
                     Reason.MESSAGE_TOO_LARGE, id="50-certificates"),
        pytest.param(lambda root: pki.issue_svid(_chain_below(root, 10), CLIENT_ID),
                     Reason.CHAIN_TOO_LONG, id="deeper-than-the-verify-depth"),
        pytest.param(lambda root: pki.issue_svid(_chain_below(root, 1), CLIENT_ID,
                                                 uris=(CLIENT_ID + "/" + "a" * 16384,)),
                     Reason.MESSAGE_TOO_LARGE, id="16k-san"),
    ],
)
async def test_chains_past_our_bounds_have_a_name(
    server_ctx: ssl.SSLContext, cas: tuple[CA, CA], tmp_path: Path,
    sockets: list[socket.socket | TlsEndpoint], make: object, reason: Reason,
) -> None:
    svid = make(cas[0])  # type: ignore[operator]
    s, _ = await handshake(server_ctx, client_context(svid, [cas[0].cert], tmp_path), sockets)
    assert s is not None
    assert classify(s).reason is reason, s


# --- not TLS, too slow, gone ------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n",
        b"CONNECT example.org:443 HTTP/1.1\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2p1\r\n",
        bytes(range(256)) * 2,
        b"\x00" * 64,
    ],
    ids=["http", "http-proxy", "ssh", "binary", "zeros"],
)
async def test_garbage_is_not_tls(server_ctx: ssl.SSLContext, garbage: bytes,
                                  sockets: list[socket.socket | TlsEndpoint]) -> None:
    a, b = socket_pair()
    sockets.append(b)
    srv = TlsEndpoint.server(server_ctx, a)
    sockets.append(srv)
    b.sendall(garbage)
    with pytest.raises(ssl.SSLError) as caught:
        async with asyncio.timeout(HANDSHAKE_BUDGET):
            await srv.handshake()
    assert classify(caught.value).reason is Reason.NOT_TLS


async def test_timeout(server_ctx: ssl.SSLContext,
                       sockets: list[socket.socket | TlsEndpoint]) -> None:
    a, b = socket_pair()
    sockets.append(b)  # connected, and silent
    srv = TlsEndpoint.server(server_ctx, a)
    sockets.append(srv)
    with pytest.raises(TimeoutError) as caught:
        async with asyncio.timeout(0.05):
            await srv.handshake()
    assert classify(caught.value).reason is Reason.HANDSHAKE_TIMEOUT


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("when", ["before-hello", "after-hello"])
async def test_eof_mid_handshake(server_ctx: ssl.SSLContext, cas: tuple[CA, CA], kind: str,
                                 when: str, sockets: list[socket.socket | TlsEndpoint]) -> None:
    a, b = socket_pair() if kind == "unix" else tcp_pair()
    srv = TlsEndpoint.server(server_ctx, a)
    sockets.append(srv)
    if when == "after-hello":
        hello = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        hello.load_verify_locations(cadata=pki.certs_pem([cas[0].cert]).decode("ascii"))
        cli = TlsEndpoint.client(hello, b, "server")
        with pytest.raises(ssl.SSLWantReadError):
            cli.step()  # the ClientHello is out, the answer not read
        cli.close()
    else:
        b.close()
    with pytest.raises(OSError) as caught:
        async with asyncio.timeout(HANDSHAKE_BUDGET):
            await srv.handshake()
    assert classify(caught.value).reason is Reason.PEER_CLOSED


def test_unknown_exception_is_other() -> None:
    failure = classify(RuntimeError("boom"))
    assert failure.reason is Reason.OTHER
    assert "boom" in failure.detail


# --- missing intermediate versus unknown CA, from the presented chain -------------------------


async def _unverified_leaf_only(
    server_ctx: ssl.SSLContext, cas: tuple[CA, CA], tmp_path: Path,
    sockets: list[socket.socket | TlsEndpoint],
) -> tuple[ssl.SSLCertVerificationError, list[bytes]]:
    root, inter = cas
    svid = pki.issue_svid(inter, CLIENT_ID, include_intermediates=False)
    srv, cli = endpoints(server_ctx, client_context(svid, [root.cert], tmp_path))
    sockets += [srv, cli]
    async with asyncio.timeout(HANDSHAKE_BUDGET):
        s, _ = await handshake_both(srv, cli)
    assert isinstance(s, ssl.SSLCertVerificationError), s
    presented = srv.presented_chain()
    assert presented is not None
    return s, presented


async def test_missing_intermediate_needs_a_known_intermediate(
    server_ctx: ssl.SSLContext, cas: tuple[CA, CA], tmp_path: Path,
    sockets: list[socket.socket | TlsEndpoint],
) -> None:
    exc, presented = await _unverified_leaf_only(server_ctx, cas, tmp_path, sockets)
    known = [cas[1].cert.subject]
    assert classify(exc, presented=presented, known_intermediates=known).reason is \
        Reason.MISSING_INTERMEDIATE
    # Without the hook's evidence, or without knowing the issuer, it can only be unknown_ca.
    assert classify(exc).reason is Reason.UNKNOWN_CA
    assert classify(exc, presented=None, known_intermediates=known).reason is Reason.UNKNOWN_CA
    assert classify(exc, presented=presented).reason is Reason.UNKNOWN_CA
    other = pki.new_intermediate(pki.new_root(TD)).cert.subject
    assert classify(exc, presented=presented, known_intermediates=[other]).reason is \
        Reason.UNKNOWN_CA
    # A presented list that does not parse must not raise out of classify().
    assert classify(exc, presented=[b"not DER"], known_intermediates=known).reason is \
        Reason.UNKNOWN_CA


# --- parse_certificate_message ---------------------------------------------------------------


def _u(n: int, size: int) -> bytes:
    return n.to_bytes(size, "big")


def tls12_message(certs: list[bytes]) -> bytes:
    body = b"".join(_u(len(c), 3) + c for c in certs)
    body = _u(len(body), 3) + body
    return b"\x0b" + _u(len(body), 3) + body


def tls13_message(certs: list[bytes], *, context: bytes = b"",
                  extensions: list[bytes] | None = None) -> bytes:
    exts = extensions or [b""] * len(certs)
    body = b"".join(_u(len(c), 3) + c + _u(len(e), 2) + e for c, e in zip(certs, exts,
                                                                             strict=True))
    body = _u(len(context), 1) + context + _u(len(body), 3) + body
    return b"\x0b" + _u(len(body), 3) + body


def _real_chain(cas: tuple[CA, CA]) -> list[bytes]:
    svid = pki.issue_svid(cas[1], CLIENT_ID)
    return [der(svid.cert), der(cas[1].cert)]


def test_parse_tls12_message(cas: tuple[CA, CA]) -> None:
    chain = _real_chain(cas)
    assert parse_certificate_message(tls12_message(chain), tls13=False) == chain
    assert x509.load_der_x509_certificate(chain[0])  # whole DER, nothing shifted


def test_parse_tls13_message_with_context_and_extensions(cas: tuple[CA, CA]) -> None:
    chain = _real_chain(cas)
    msg = tls13_message(chain, context=b"\x01\x02\x03",
                        extensions=[b"\x00\x05\x00\x01\x00", b""])  # an OCSP-ish extension
    assert parse_certificate_message(msg, tls13=True) == chain


def test_parse_empty_list() -> None:
    assert parse_certificate_message(tls12_message([]), tls13=False) == []
    assert parse_certificate_message(tls13_message([]), tls13=True) == []
    assert parse_certificate_message(b"", tls13=True) == []
    assert parse_certificate_message(b"", tls13=False) == []


@pytest.mark.parametrize("tls13", [False, True])
def test_parse_truncated_message_keeps_only_whole_certificates(tls13: bool) -> None:
    certs = [b"A" * 40, b"B" * 70, b"C" * 5]
    msg = tls13_message(certs) if tls13 else tls12_message(certs)
    for cut in range(len(msg) + 1):
        got = parse_certificate_message(msg[:cut], tls13=tls13)
        assert got == certs[: len(got)], cut  # a prefix, never a partial certificate
    assert parse_certificate_message(msg, tls13=tls13) == certs


@pytest.mark.parametrize("tls13", [False, True])
def test_parse_malformed_lengths(tls13: bool) -> None:
    certs = [b"A" * 40, b"B" * 70]
    msg = bytearray(tls13_message(certs) if tls13 else tls12_message(certs))
    start = 4 + (1 if tls13 else 0)  # the 3-byte list length
    # A list length that claims less than the entries: only what fits in it.
    short = bytearray(msg)
    short[start : start + 3] = _u(3 + 40 + (2 if tls13 else 0), 3)
    assert parse_certificate_message(bytes(short), tls13=tls13) == certs[:1]
    # A list length that ends inside the second certificate: that one is not whole.
    inside = bytearray(msg)
    inside[start : start + 3] = _u(3 + 40 + (2 if tls13 else 0) + 3 + 35, 3)
    assert parse_certificate_message(bytes(inside), tls13=tls13) == certs[:1]
    # A certificate length that claims more than there is: nothing from there on.
    long = bytearray(msg)
    second = start + 3 + 3 + 40 + (2 if tls13 else 0)
    long[second : second + 3] = _u(10_000, 3)
    assert parse_certificate_message(bytes(long), tls13=tls13) == certs[:1]
    # A zero-length certificate is not a certificate.
    zero = tls13_message([b"", b"A"]) if tls13 else tls12_message([b"", b"A"])
    assert parse_certificate_message(zero, tls13=tls13) == []


def test_parse_tls13_context_longer_than_message() -> None:
    msg = b"\x0b\x00\x00\x05" + b"\xff" + b"\x00" * 4
    assert parse_certificate_message(msg, tls13=True) == []


@pytest.mark.parametrize("tls13", [False, True])
def test_parse_keeps_at_most_max_kept(tls13: bool) -> None:
    certs = [bytes([i]) * (i + 1) for i in range(MAX_KEPT * 5)]
    msg = tls13_message(certs) if tls13 else tls12_message(certs)
    assert parse_certificate_message(msg, tls13=tls13) == certs[:MAX_KEPT]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_parse_random_bytes_never_raises(data: bytes, tls13: bool) -> None:
    got = parse_certificate_message(data, tls13=tls13)
    assert isinstance(got, list)
    assert len(got) <= MAX_KEPT
    assert all(isinstance(c, bytes) and c and c in data for c in got)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=60), max_size=MAX_KEPT + 3),
    st.binary(max_size=8),
    st.data(),
)
def test_parse_round_trip(certs: list[bytes], context: bytes, data: st.DataObject) -> None:
    exts = [data.draw(st.binary(max_size=12)) for _ in certs]
    assert parse_certificate_message(tls13_message(certs, context=context, extensions=exts),
                                     tls13=True) == certs[:MAX_KEPT]
    assert parse_certificate_message(tls12_message(certs), tls13=False) == certs[:MAX_KEPT]


async def test_a_peer_from_a_trust_domain_we_hold_no_bundle_for_is_told_so(
    server_ctx: ssl.SSLContext, cas: tuple[CA, CA], tmp_path: Path,
    sockets: list[socket.socket | TlsEndpoint],
) -> None:
    exc, presented = await _unverified_leaf_only(server_ctx, cas, tmp_path, sockets)
    td = CLIENT_ID.split("/")[2]
    failure = classify(exc, presented=presented, trust_domains={"other.org"})
    assert failure.reason is Reason.UNKNOWN_CA
    assert f"trust domain '{td}', for which we hold no bundle" in failure.detail, failure
    assert "identity.federated_bundles" in failure.detail
    # A trust domain we do hold a bundle for: the CA is what is missing, not the bundle.
    assert "hold no bundle" not in classify(exc, presented=presented,
                                            trust_domains={td}).detail
    assert "hold no bundle" not in classify(exc, presented=[b"not DER"],
                                            trust_domains={"other.org"}).detail
