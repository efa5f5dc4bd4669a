"""The TLS engine: a non-blocking SSLSocket per connection, driven by a real event loop.

Every test runs on the stdlib selector loop and on uvloop (the `run` fixture), over a real
socketpair, with contexts built by `sidecar.tls.contexts` from dev-PKI SVIDs loaded
through `load_identity`, exactly as the proxy builds them.
"""

from __future__ import annotations

import _ssl
import asyncio
import gc
import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from tls_pairs import (
    client_context,
    closed_on_exit,
    der,
    endpoints,
    handshake_both,
    ready,
    socket_pair,
)

from sidecar.authn import Authenticator
from sidecar.endpoint import DONE, TRUNCATED, WANT_READ, WANT_WRITE
from sidecar.identity import Identity, load_identity
from sidecar.reasons import Reason
from sidecar.tls import contexts, openssl, peerchain
from sidecar.tls.classify import classify
from sidecar.tls.contexts import Contexts
from sidecar.tls.engine import TlsEndpoint
from sidecar.tools import pki
from sidecar.tools.pki import CA, Svid

pytestmark = pytest.mark.timeout(30)

TD = "example.org"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/server"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
TIMEOUT = 10.0  # per test body, on top of pytest-timeout: a hang fails, never stalls
CHUNK = 64 * 1024

type Run = Callable[..., Any]

# `run` (tests/conftest.py): runs a coroutine on the stdlib loop and on uvloop, bounded.


# --- PKI and contexts ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cas() -> tuple[CA, CA]:
    root = pki.new_root(TD)
    return root, pki.new_intermediate(root)


def _identity(directory: Path, svid: Svid, anchors: list[x509.Certificate]) -> Identity:
    files = pki.write_svid(directory, svid, anchors)
    return load_identity(directory / files.cert, directory / files.key, directory / files.bundle)


@pytest.fixture(scope="module")
def server_identity(cas: tuple[CA, CA], tmp_path_factory: pytest.TempPathFactory) -> Identity:
    svid = pki.issue_svid(cas[1], SERVER_ID)
    return _identity(tmp_path_factory.mktemp("server"), svid, [cas[0].cert])


@pytest.fixture(scope="module")
def client_identity(cas: tuple[CA, CA], tmp_path_factory: pytest.TempPathFactory) -> Identity:
    svid = pki.issue_svid(cas[1], CLIENT_ID)
    return _identity(tmp_path_factory.mktemp("client"), svid, [cas[0].cert])


@pytest.fixture
def server(server_identity: Identity) -> Contexts:
    return contexts.build(server_identity)


@pytest.fixture
def client(client_identity: Identity) -> Contexts:
    return contexts.build(client_identity)


def uri_of(leaf_der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(leaf_der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


# --- driving endpoints from a test --------------------------------------------------------


async def wait_for(code: int, fd: int) -> None:
    assert code in (WANT_READ, WANT_WRITE), code
    await ready(fd, write=code == WANT_WRITE)


async def read_some(ep: TlsEndpoint, buf: memoryview) -> int:
    """The next read_into result that is not a wish: bytes, 0 at the end, or a cut."""
    while True:
        n = ep.read_into(buf)
        if n not in (WANT_READ, WANT_WRITE):
            return n
        await wait_for(n, ep.fd)


async def read_exactly(ep: TlsEndpoint, size: int) -> bytes:
    buf = memoryview(bytearray(CHUNK))
    got = bytearray()
    while len(got) < size:
        n = await read_some(ep, buf)
        assert n > 0, f"EOF after {len(got)} of {size} bytes"
        got += buf[:n]
    return bytes(got)


async def read_to_end(ep: TlsEndpoint) -> bytes:
    buf = memoryview(bytearray(CHUNK))
    got = bytearray()
    while (n := await read_some(ep, buf)) > 0:
        got += buf[:n]
    return bytes(got)


async def write_all(ep: TlsEndpoint, data: bytes,
                    on_want: Callable[[], None] = lambda: None) -> int:
    """Write in CHUNK pieces, retrying a wish with the very same bytes; returns the wishes."""
    view = memoryview(data)
    wishes = 0
    for start in range(0, len(view), CHUNK):
        piece = view[start : start + CHUNK]
        while piece:
            n = ep.write(piece)
            if n < 0:
                wishes += 1
                on_want()
                await wait_for(n, ep.fd)
                continue
            piece = piece[n:]
    return wishes


async def shutdown(ep: TlsEndpoint) -> None:
    while (rc := ep.shutdown_write()) != DONE:
        await wait_for(rc, ep.fd)


class Pair:
    """A server and a client TlsEndpoint over one socketpair, closed by the test's end."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                 session: ssl.SSLSession | None = None) -> None:
        self.server, self.client = endpoints(server_ctx, client_ctx, session)

    async def handshake(self) -> tuple[BaseException | None, BaseException | None]:
        return await handshake_both(self.server, self.client)

    def close(self) -> None:
        self.server.close()
        self.client.close()


@pytest.fixture
def pairs() -> Iterator[Callable[..., Pair]]:
    with closed_on_exit() as made:

        def make(*args: Any, **kwargs: Any) -> Pair:
            made.append(Pair(*args, **kwargs))
            return made[-1]

        yield make


async def connected(p: Pair) -> Pair:
    s, c = await p.handshake()
    assert s is None and c is None, (s, c)
    return p


# --- handshake ----------------------------------------------------------------------------


def test_mutual_handshake(run: Run, pairs: Callable[..., Pair], server: Contexts,
                          client: Contexts, cas: tuple[CA, CA]) -> None:
    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        for ep in (p.server, p.client):
            assert ep.version() == "TLSv1.3"
            assert ep.cipher()
            assert ep.cpu_seconds > 0
            assert ep.resumed() is False
        # Each side verified the other's SVID up to the root it trusts.
        root, inter = cas
        for ep, peer_id in ((p.server, CLIENT_ID), (p.client, SERVER_ID)):
            chain = ep.verified_chain()
            assert len(chain) == 3
            assert uri_of(chain[0]) == [peer_id]
            assert chain[1:] == [der(inter.cert), der(root.cert)]
            assert ep.peer_leaf() == chain[0]

    run(body())


def test_cpu_seconds_cover_only_the_handshake(run: Run, pairs: Callable[..., Pair],
                                             server: Contexts, client: Contexts) -> None:
    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        spent = p.server.cpu_seconds
        await asyncio.gather(write_all(p.client, os.urandom(256 * 1024)),
                             read_exactly(p.server, 256 * 1024))
        assert p.server.cpu_seconds == spent

    run(body())


def test_session_resumes_on_second_connection(run: Run, pairs: Callable[..., Pair],
                                              server: Contexts, client: Contexts) -> None:
    async def body() -> None:
        first = await connected(pairs(server.server, client.client))
        # TLS 1.3 tickets come after the handshake: read something first.
        await write_all(first.server, b"hi")
        assert await read_exactly(first.client, 2) == b"hi"
        session = first.client.new_session()
        assert session is not None and session.has_ticket
        leaf = first.server.peer_leaf()

        second = await connected(pairs(server.server, client.client, session))
        assert second.client.resumed() is True
        assert second.server.resumed() is True
        assert second.server.verified_chain() == []  # resumed: no chain, only the leaf
        assert second.server.peer_leaf() == leaf

    run(body())


@pytest.mark.parametrize("store", ["tickets", "memory"])
def test_dropping_the_peer_chains_keeps_the_connection_whole(
    run: Run, pairs: Callable[..., Pair], server_identity: Identity, client: Contexts,
    store: str,
) -> None:
    srv = contexts.build(server_identity,
                         session_cache_size=8 if store == "memory" else None)

    async def body() -> None:
        first = pairs(srv.server, client.client)
        session = await ticketed(first)
        leaf = first.server.peer_leaf()
        assert len(first.server.verified_chain()) == 3  # leaf, intermediate, root
        first.server.drop_peer_chains()
        first.client.drop_peer_chains()
        assert first.server.verified_chain() == [] and first.client.verified_chain() == []
        assert first.server.peer_leaf() == leaf and first.server.version() == "TLSv1.3"
        data = os.urandom(200_000)
        await asyncio.gather(write_all(first.client, data), write_all(first.server, data))
        got = await asyncio.gather(read_exactly(first.server, len(data)),
                                   read_exactly(first.client, len(data)))
        assert got == [data, data]
        await shutdown(first.server)
        assert await read_to_end(first.client) == b""

        again = await connected(pairs(srv.server, client.client, session))
        assert again.server.resumed() and again.server.peer_leaf() == leaf
        # Nothing to drop on a resumption (secure() skips it): no verified chain, and the
        # session came from a ticket or from a cache entry already emptied.
        assert again.server.verified_chain() == []
        ptr = again.server.ssl_pointer
        assert ptr is not None
        chain = openssl._lib.SSL_get_peer_cert_chain(ptr)
        assert not chain or openssl._lib.OPENSSL_sk_num(chain) == 0
        again.server.drop_peer_chains()  # and harmless all the same
        await write_all(again.client, b"ok")
        assert await read_exactly(again.server, 2) == b"ok"

    run(body())


# --- the memory session store ------------------------------------------------------------


@pytest.fixture
def memory(server_identity: Identity) -> Contexts:
    built = contexts.build(server_identity, session_cache_size=4)
    assert built.session_store == "memory"
    return built


async def ticketed(p: Pair) -> ssl.SSLSession:
    """Handshake, then a round trip so that the TLS 1.3 ticket has arrived."""
    await connected(p)
    await write_all(p.server, b"hi")
    assert await read_exactly(p.client, 2) == b"hi"
    session = p.client.new_session()
    assert session is not None and session.has_ticket
    return session


def test_memory_store_resumes_from_the_cache(run: Run, pairs: Callable[..., Pair],
                                             memory: Contexts, client: Contexts) -> None:
    async def body() -> None:
        first = pairs(memory.server, client.client)
        session = await ticketed(first)
        assert memory.server.session_stats()["number"] == 1
        await shutdown(first.server)  # a clean end keeps the session in any case
        first.close()

        for _ in range(2):  # the ticket is an ID, not single-use
            again = await connected(pairs(memory.server, client.client, session))
            assert again.server.resumed() and again.client.resumed()
        stats = memory.server.session_stats()
        assert stats["hits"] == 2 and stats["number"] == 1, stats

    run(body())


def test_memory_store_keeps_an_authenticated_session_after_an_unclean_end(
    run: Run, pairs: Callable[..., Pair], memory: Contexts, client: Contexts
) -> None:
    """An idle timeout or a reset ends a connection without our close_notify, and OpenSSL
    drops such a session when the connection is freed; not one we authenticated."""
    async def body() -> None:
        first = Pair(memory.server, client.client)  # not kept alive by the fixture
        session = await ticketed(first)
        first.server.keep_session = True
        first.close()  # no close_notify
        del first
        gc.collect()  # SSL_free, where OpenSSL would drop it

        again = await connected(pairs(memory.server, client.client, session))
        assert again.server.resumed()

    run(body())


def test_memory_store_survives_a_peer_hanging_up_without_close_notify(
    run: Run, pairs: Callable[..., Pair], memory: Contexts, client: Contexts
) -> None:
    """To OpenSSL that is a fatal error, and fatal errors evict the session."""
    async def body() -> None:
        first = pairs(memory.server, client.client)
        session = await ticketed(first)
        first.client.close()  # no close_notify
        buf = memoryview(bytearray(CHUNK))
        assert await read_some(first.server, buf) == TRUNCATED  # never a clean end
        assert memory.server.session_stats()["number"] == 1
        again = await connected(pairs(memory.server, client.client, session))
        assert again.server.resumed()

    run(body())


def test_memory_store_forgets_a_refused_peers_session(
    run: Run, pairs: Callable[..., Pair], memory: Contexts, client: Contexts
) -> None:
    async def body() -> None:
        first = pairs(memory.server, client.client)
        session = await ticketed(first)
        first.server.forget_session()  # what secure() does when authentication fails
        assert memory.server.session_stats()["number"] == 0
        again = await connected(pairs(memory.server, client.client, session))
        assert not again.server.resumed()

    run(body())


def test_flushing_the_memory_store_ends_resumption(run: Run, pairs: Callable[..., Pair],
                                                   memory: Contexts, client: Contexts) -> None:
    async def body() -> None:
        first = pairs(memory.server, client.client)
        session = await ticketed(first)
        await shutdown(first.server)
        openssl.flush_sessions(memory.server)
        assert memory.server.session_stats()["number"] == 0
        again = await connected(pairs(memory.server, client.client, session))
        assert not again.server.resumed() and not again.client.resumed()

    run(body())


def test_the_memory_store_keeps_at_most_its_size(run: Run, pairs: Callable[..., Pair],
                                                 memory: Contexts, client: Contexts) -> None:
    async def body() -> None:
        sessions = []
        for _ in range(6):  # the fixture's cache holds 4
            p = pairs(memory.server, client.client)
            sessions.append(await ticketed(p))
            await shutdown(p.server)
        stats = memory.server.session_stats()
        assert stats["number"] <= 4 and stats["cache_full"] >= 2, stats
        oldest = await connected(pairs(memory.server, client.client, sessions[0]))
        newest = await connected(pairs(memory.server, client.client, sessions[-1]))
        assert not oldest.server.resumed()  # evicted first
        assert newest.server.resumed()

    run(body())


def test_stateless_tickets_are_kept_by_the_client_only(
    run: Run, pairs: Callable[..., Pair], server: Contexts, client: Contexts
) -> None:
    async def body() -> None:
        assert server.session_store == "tickets"
        first = pairs(server.server, client.client)
        session = await ticketed(first)
        first.close()  # an unclean end does not matter: the server kept nothing
        assert server.server.session_stats()["number"] == 0
        again = await connected(pairs(server.server, client.client, session))
        assert again.server.resumed()

    run(body())


def test_handshake_timeout_leaves_no_registration(run: Run, server: Contexts) -> None:
    async def body() -> None:
        a, b = socket_pair()
        ep = TlsEndpoint.server(server.server, a)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await ep.handshake()  # the client never speaks
            # Nothing left registered: removing says there was nothing to remove (the stdlib
            # loop answers True/False; uvloop always None, so there this cannot tell).
            loop = asyncio.get_running_loop()
            assert not loop.remove_reader(ep.fd)
            assert not loop.remove_writer(ep.fd)
        finally:
            ep.close()
            b.close()

    run(body())


# --- reading and writing ------------------------------------------------------------------


def test_read_into_wants_read_then_data_then_zero_at_close_notify(
    run: Run, pairs: Callable[..., Pair], server: Contexts, client: Contexts
) -> None:
    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        buf = memoryview(bytearray(CHUNK))
        assert p.server.read_into(buf) == WANT_READ
        await write_all(p.client, b"ping")
        await ready(p.server.fd)
        n = await read_some(p.server, buf)
        assert bytes(buf[:n]) == b"ping"
        assert p.server.read_into(buf) == WANT_READ
        await shutdown(p.client)
        assert await read_some(p.server, buf) == 0
        assert p.server.read_into(buf) == 0  # and stays at the end

    run(body())


def test_read_into_a_small_buffer_is_not_end_of_stream(
    run: Run, pairs: Callable[..., Pair], server: Contexts, client: Contexts
) -> None:
    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        await write_all(p.client, b"x" * 100)
        await ready(p.server.fd)
        small = memoryview(bytearray(4096))
        n = await read_some(p.server, small)
        assert n == 100, "0 means end of stream, but the peer is still there"

    run(body())


def test_read_into_says_drained_after_a_short_record(
    run: Run, pairs: Callable[..., Pair], server: Contexts, client: Contexts
) -> None:
    """A short record with nothing behind it: the caller is told to wait for the socket
    rather than read again (which would only find nothing, at the price of an exception)."""
    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        buf = memoryview(bytearray(CHUNK))
        await write_all(p.client, b"ping")
        await ready(p.server.fd)
        assert p.server.read_into(buf) == 4
        assert p.server.drained
        assert p.server.read_into(buf) == WANT_READ  # it was right: nothing more

    run(body())


def test_read_into_takes_every_record_read_ahead_brought(
    run: Run, pairs: Callable[..., Pair], server: Contexts, client: Contexts
) -> None:
    """Two short records already in the socket: OpenSSL's read-ahead takes both off it in
    one read(), so the socket no longer shows them. read_into must hand over both before
    it calls the source drained: waiting for the socket then would strand the second."""
    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        buf = memoryview(bytearray(CHUNK))
        await write_all(p.client, b"first ")
        await write_all(p.client, b"second")  # a socketpair: both are queued on return
        got = await read_some(p.server, buf)
        assert bytes(buf[:got]) == b"first second"
        assert p.server.drained

    run(body())


def test_write_one_mebibyte_through_want_write(run: Run, pairs: Callable[..., Pair],
                                              server: Contexts, client: Contexts) -> None:
    data = os.urandom(1024 * 1024)

    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        blocked = asyncio.Event()

        async def reader() -> bytes:
            await blocked.wait()  # only once the writer has hit a full socket buffer
            return await read_to_end(p.server)

        async def writer() -> int:
            wishes = await write_all(p.client, data, on_want=blocked.set)
            blocked.set()
            await shutdown(p.client)
            return wishes

        got, wishes = await asyncio.gather(reader(), writer())
        assert wishes > 0, "the test never filled the socket buffer"
        assert len(got) == len(data)
        assert got == data  # nothing lost, nothing sent twice by the retries

    run(body())


def test_send_raises_what_write_returns(run: Run, pairs: Callable[..., Pair],
                                       server: Contexts, client: Contexts) -> None:
    """The pump's C-level write (calls) raises where write returns a wish; write_code gives
    that wish, and raises a failure. A TLS read has no such call: it asks OpenSSL more."""
    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        recv, send = p.client.calls()
        assert recv is None and send is not None
        data = memoryview(os.urandom(CHUNK))
        with pytest.raises(ssl.SSLWantWriteError) as full:  # nobody reads: buffers fill
            while True:
                send(data)
        assert p.client.write_code(full.value) == WANT_WRITE
        assert p.client.write_code(ssl.SSLWantReadError()) == WANT_READ
        with pytest.raises(ssl.SSLZeroReturnError):
            p.client.write_code(ssl.SSLZeroReturnError())

    run(body())


# --- half-close -----------------------------------------------------------------------------


def test_shutdown_write_is_a_half_close(run: Run, pairs: Callable[..., Pair],
                                        server: Contexts, client: Contexts) -> None:
    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        a, b = p.server, p.client
        # B's bytes reach A's socket before A says it is done: unwrap() would lose them.
        await write_all(b, b"sent before the close_notify")
        await ready(a.fd)
        await shutdown(a)
        assert await read_exactly(a, 28) == b"sent before the close_notify"
        assert await read_to_end(b) == b""  # B sees A's end...
        await write_all(b, b"and after it")  # ...and still talks to A
        assert await read_exactly(a, 12) == b"and after it"
        await shutdown(b)
        assert await read_to_end(a) == b""

    run(body())


def test_shutdown_write_sends_close_notify_not_a_tcp_fin(
    run: Run, pairs: Callable[..., Pair], server: Contexts, client: Contexts
) -> None:
    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        assert p.server.shutdown_write() == DONE
        assert p.server.shutdown_write() == DONE  # once is enough; again is harmless
        buf = memoryview(bytearray(100))
        while (n := p.client.read_into(buf)) == WANT_READ:
            await ready(p.client.fd)
        assert n == 0, n  # 0: close_notify; a bare TCP FIN would read as TRUNCATED

    run(body())


def test_openssl_layout_is_trusted_here(run: Run, pairs: Callable[..., Pair],
                                        server: Contexts, client: Contexts) -> None:
    assert openssl.available() is True

    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        ptrs = {p.server.ssl_pointer, p.client.ssl_pointer}
        assert None not in ptrs
        assert len(ptrs) == 2

    run(body())


# --- the chain the peer presented -----------------------------------------------------------


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_missing_intermediate_is_seen_in_the_presented_chain(
    run: Run, pairs: Callable[..., Pair], server_identity: Identity, cas: tuple[CA, CA],
    tmp_path: Path, version: str
) -> None:
    root, inter = cas
    leaf_only = pki.issue_svid(inter, CLIENT_ID, include_intermediates=False)
    server_ctx = contexts.build(server_identity, min_version=version).server
    client_ctx = client_context(leaf_only, [root.cert], tmp_path,
                                max_version=ssl.TLSVersion.TLSv1_2 if version == "1.2" else None)
    authn = Authenticator()
    authn.learn(server_identity)  # our own intermediate is a known one

    async def body() -> None:
        p = pairs(server_ctx, client_ctx)
        exc, _ = await p.handshake()
        assert isinstance(exc, ssl.SSLCertVerificationError), exc
        assert p.server.presented_chain() == [der(leaf_only.cert)]
        failure = classify(exc, presented=p.server.presented_chain(),
                           known_intermediates=authn.known_intermediates)
        assert failure.reason is Reason.MISSING_INTERMEDIATE

    run(body())


def test_foreign_ca_is_seen_in_the_presented_chain(
    run: Run, pairs: Callable[..., Pair], server: Contexts, server_identity: Identity,
    cas: tuple[CA, CA], tmp_path: Path
) -> None:
    foreign = pki.new_intermediate(pki.new_root(TD))
    svid = pki.issue_svid(foreign, CLIENT_ID)
    client_ctx = client_context(svid, [cas[0].cert], tmp_path)
    authn = Authenticator()
    authn.learn(server_identity)

    async def body() -> None:
        p = pairs(server.server, client_ctx)
        exc, _ = await p.handshake()
        assert isinstance(exc, ssl.SSLCertVerificationError), exc
        assert p.server.presented_chain() == [der(svid.cert), der(foreign.cert)]
        failure = classify(exc, presented=p.server.presented_chain(),
                           known_intermediates=authn.known_intermediates)
        assert failure.reason is Reason.UNKNOWN_CA

    run(body())


def test_presented_chain_is_dropped_after_a_good_handshake(
    run: Run, pairs: Callable[..., Pair], server: Contexts, client: Contexts
) -> None:
    # Count the debugging hook's calls: after the handshake it must be detached, not
    # called on every record for the connection's whole life. The hook is the C-level
    # attribute peerchain.install sets; wrap what it set in a counter.
    hook_attr = _ssl._SSLContext.__dict__["_msg_callback"]
    calls: list[tuple[Any, ...]] = []
    for ctx in (server.server, client.client):
        hook = hook_attr.__get__(ctx)
        assert hook is not None

        def counting(*args: Any, hook: Any = hook) -> None:
            calls.append(args[1:5])
            hook(*args)

        hook_attr.__set__(ctx, counting)

    async def body() -> None:
        p = await connected(pairs(server.server, client.client))
        for ep in (p.server, p.client):
            assert ep.presented_chain() is None
            assert getattr(ep, peerchain.ATTRIBUTE) is None
        seen = len(calls)
        assert seen > 0  # the hook did run during the handshake
        await asyncio.gather(write_all(p.client, os.urandom(256 * 1024)),
                             read_exactly(p.server, 256 * 1024))
        assert len(calls) == seen

    run(body())
