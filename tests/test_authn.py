"""Authentication on chains that OpenSSL really verified, and the outbound expected-ID match.

The chains come from real mTLS handshakes over a socketpair between contexts built by
`sidecar.tls.contexts` (our side) and plain ssl contexts presenting whatever SVID a test
needs (the peer). OpenSSL trusts every anchor we hold, ours and the federated ones, so
these are exactly the chains `Authenticator.full` sees in production.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.x509.oid import NameOID
from tls_pairs import (
    client_context,
    closed_on_exit,
    der,
    endpoints,
    handshake_both,
    present,
    ready,
)

from sidecar.authn import Authenticator, AuthnError, Peer
from sidecar.endpoint import WANT_READ, WANT_WRITE
from sidecar.identity import Identity, load_identity
from sidecar.reasons import Reason
from sidecar.spiffe import SpiffeId
from sidecar.tls import contexts, peerchain
from sidecar.tls.contexts import Contexts
from sidecar.tls.engine import TlsEndpoint
from sidecar.tools import pki
from sidecar.tools.pki import CA, Svid

pytestmark = pytest.mark.timeout(30)

TD = "example.org"
OTHER_TD = "other.org"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/server"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
HANDSHAKE_BUDGET = 5.0


@pytest.fixture(scope="module")
def ours() -> tuple[CA, CA]:
    root = pki.new_root(TD)
    return root, pki.new_intermediate(root)


@pytest.fixture(scope="module")
def theirs() -> tuple[CA, CA]:
    """The federated trust domain's CAs."""
    root = pki.new_root(OTHER_TD)
    return root, pki.new_intermediate(root)


@pytest.fixture(scope="module")
def identity(ours: tuple[CA, CA], theirs: tuple[CA, CA],
             tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """Our server: SVID of example.org, federated with other.org."""
    d = tmp_path_factory.mktemp("server")
    files = pki.write_svid(d, pki.issue_svid(ours[1], SERVER_ID), [ours[0].cert])
    (d / "other.pem").write_bytes(pki.certs_pem([theirs[0].cert]))
    return load_identity(d / files.cert, d / files.key, d / files.bundle,
                         {OTHER_TD: d / "other.pem"})


@pytest.fixture
def server(identity: Identity) -> Contexts:
    return contexts.build(identity)


def chain_of(svid: Svid, ca: CA) -> list[bytes]:
    """A verified chain as OpenSSL hands it over: leaf, intermediates, root."""
    return [der(svid.cert), *(der(c) for c in svid.intermediates), der(ca.trust_anchor)]


class Client:
    """A client presenting `svid`, trusting our root; keeps its last session."""

    def __init__(self, svid: Svid, ours: CA, tmp_path: Path) -> None:
        self.svid = svid
        self.ctx = client_context(svid, [ours.cert], tmp_path)
        self.session: ssl.SSLSession | None = None


@pytest.fixture
def held() -> Iterator[list[TlsEndpoint]]:
    with closed_on_exit() as opened:
        yield opened


async def connect(server_ctx: ssl.SSLContext, peer: Client, held: list[TlsEndpoint]
                  ) -> TlsEndpoint:
    """Handshake; returns our (server) end, open. The peer keeps its session ticket."""
    srv, cli = endpoints(server_ctx, peer.ctx, peer.session)
    held += [srv, cli]
    async with asyncio.timeout(HANDSHAKE_BUDGET):
        s, c = await handshake_both(srv, cli)
        assert s is None and c is None, (s, c)  # OpenSSL let the peer in
        # The ticket arrives after the handshake; then let the peer read to the end.
        srv.write(b"!")
        buf = memoryview(bytearray(64 * 1024))
        while cli.read_into(buf) in (WANT_READ, WANT_WRITE):
            await ready(cli.fd)
    peer.session = cli.new_session()
    return srv


async def full_chain(server_ctx: ssl.SSLContext, peer: Client, held: list[TlsEndpoint]
                     ) -> list[bytes]:
    srv = await connect(server_ctx, peer, held)
    assert not srv.resumed()
    chain = srv.verified_chain()
    assert chain and chain[0] == der(peer.svid.cert)
    return chain


def refused(authn: Authenticator, chain: list[bytes], identity: Identity) -> AuthnError:
    with pytest.raises(AuthnError) as caught:
        authn.full(chain, identity)
    assert caught.value.detail
    return caught.value


# --- full handshakes ----------------------------------------------------------------------


async def test_good_peer(server: Contexts, identity: Identity, ours: tuple[CA, CA],
                         tmp_path: Path, held: list[TlsEndpoint]) -> None:
    peer = Client(pki.issue_svid(ours[1], CLIENT_ID), ours[0], tmp_path)
    chain = await full_chain(server.server, peer, held)
    assert chain == chain_of(peer.svid, ours[1])
    authn = Authenticator()
    peer = authn.full(chain, identity)
    assert (peer.spiffe_id, peer.trust_domain) == (SpiffeId.parse(CLIENT_ID), TD)
    # Intermediates seen in verified chains become known (for missing_intermediate).
    assert ours[1].cert.subject in authn.known_intermediates


async def test_good_federated_peer(server: Contexts, identity: Identity, ours: tuple[CA, CA],
                                   theirs: tuple[CA, CA], tmp_path: Path,
                                   held: list[TlsEndpoint]) -> None:
    peer_id = f"spiffe://{OTHER_TD}/ns/billing/sa/api"
    peer = Client(pki.issue_svid(theirs[1], peer_id), ours[0], tmp_path)
    chain = await full_chain(server.server, peer, held)
    assert chain[-1] == der(theirs[0].cert)
    peer = Authenticator().full(chain, identity)
    assert (peer.spiffe_id, peer.trust_domain) == (SpiffeId.parse(peer_id), OTHER_TD)


async def test_federated_ca_cannot_vouch_for_our_trust_domain(
    server: Contexts, identity: Identity, ours: tuple[CA, CA], theirs: tuple[CA, CA],
    tmp_path: Path, held: list[TlsEndpoint],
) -> None:
    # other.org's CA issues an SVID claiming example.org: OpenSSL accepts the chain (it
    # holds every anchor), authentication must not.
    peer = Client(pki.issue_svid(theirs[1], f"spiffe://{TD}/ns/default/sa/admin"), ours[0],
                 tmp_path)
    chain = await full_chain(server.server, peer, held)
    assert chain[-1] == der(theirs[0].cert)
    assert refused(Authenticator(), chain, identity).reason is Reason.UNKNOWN_CA


async def test_trust_domain_without_a_bundle(
    server: Contexts, identity: Identity, ours: tuple[CA, CA], tmp_path: Path,
    held: list[TlsEndpoint],
) -> None:
    # Our own CA signed an SVID of a trust domain we hold no bundle for.
    peer = Client(pki.issue_svid(ours[1], "spiffe://third.org/ns/x/sa/y"), ours[0], tmp_path)
    chain = await full_chain(server.server, peer, held)
    error = refused(Authenticator(), chain, identity)
    assert error.reason is Reason.UNKNOWN_CA
    assert "third.org" in error.detail


def test_trust_domain_without_a_bundle_built_chain(identity: Identity) -> None:
    root = pki.new_root("third.org")
    inter = pki.new_intermediate(root)
    svid = pki.issue_svid(inter, "spiffe://third.org/ns/x/sa/y")
    assert refused(Authenticator(), chain_of(svid, inter), identity).reason is Reason.UNKNOWN_CA


def test_trust_domain_is_matched_by_bundle_not_by_name(identity: Identity,
                                                        theirs: tuple[CA, CA]) -> None:
    # A root that only calls itself other.org is not other.org's bundle.
    impostor = pki.new_intermediate(pki.new_root(OTHER_TD))
    svid = pki.issue_svid(impostor, f"spiffe://{OTHER_TD}/ns/x/sa/y")
    assert refused(Authenticator(), chain_of(svid, impostor), identity).reason is \
        Reason.UNKNOWN_CA


@pytest.mark.parametrize(
    "override",
    [
        {"extra_uris": [f"spiffe://{TD}/second"]},
        {"uris": ()},
        {"uris": ["https://example.org/web"]},
        {"uris": [f"spiffe://{TD}"]},
    ],
    ids=["two-uris", "no-uri", "https-uri", "no-path"],
)
async def test_invalid_svid_leaf(server: Contexts, identity: Identity, ours: tuple[CA, CA],
                                 tmp_path: Path, held: list[TlsEndpoint],
                                 override: dict[str, object]) -> None:
    svid = pki.issue_svid(ours[1], CLIENT_ID, **override)  # type: ignore[arg-type]
    peer = Client(svid, ours[0], tmp_path)
    chain = await full_chain(server.server, peer, held)
    assert refused(Authenticator(), chain, identity).reason is Reason.INVALID_SVID


def test_invalid_svid_leaf_rules_openssl_may_not_check(identity: Identity,
                                                        ours: tuple[CA, CA]) -> None:
    for override in ({"is_ca": True}, {"include_key_usage": False},
                     {"key_usage": pki.make_key_usage(digital_signature=True,
                                                      key_cert_sign=True)}):
        svid = pki.issue_svid(ours[1], CLIENT_ID, **override)  # type: ignore[arg-type]
        error = refused(Authenticator(), chain_of(svid, ours[1]), identity)
        assert error.reason is Reason.INVALID_SVID, override


def test_no_chain_and_garbage(identity: Identity) -> None:
    assert refused(Authenticator(), [], identity).reason is Reason.NO_CLIENT_CERT
    assert refused(Authenticator(), [b"not a certificate"], identity).reason is \
        Reason.INVALID_SVID


# --- resumed handshakes ----------------------------------------------------------------------


async def test_resumed_uses_the_cache(server: Contexts, identity: Identity,
                                      ours: tuple[CA, CA], tmp_path: Path,
                                      held: list[TlsEndpoint]) -> None:
    peer = Client(pki.issue_svid(ours[1], CLIENT_ID), ours[0], tmp_path)
    authn = Authenticator()
    first = authn.full(await full_chain(server.server, peer, held), identity)

    srv = await connect(server.server, peer, held)
    assert srv.resumed()
    assert srv.verified_chain() == []
    leaf = srv.peer_leaf()
    assert leaf == der(peer.svid.cert)
    again = authn.resumed(leaf, identity)
    assert again is first  # the remembered answer, not a second parse
    assert authn.resumed(leaf, identity) is first


def test_resumed_without_a_leaf(ours: tuple[CA, CA], identity: Identity) -> None:
    with pytest.raises(AuthnError) as caught:
        Authenticator().resumed(None, identity)
    assert caught.value.reason is Reason.NO_CLIENT_CERT


def test_resumed_leaf_breaking_svid_rules(ours: tuple[CA, CA], identity: Identity) -> None:
    svid = pki.issue_svid(ours[1], CLIENT_ID, extra_uris=[f"spiffe://{TD}/second"])
    with pytest.raises(AuthnError) as caught:
        Authenticator().resumed(der(svid.cert), identity)
    assert caught.value.reason is Reason.INVALID_SVID


def test_a_resumed_leaf_from_a_known_intermediate_is_accepted_without_a_cache(
    ours: tuple[CA, CA], identity: Identity
) -> None:
    """Another worker made the session: this process knows the issuer, not the leaf."""
    authn = Authenticator()
    authn.learn(identity)  # our own chain's intermediate belongs to our trust domain
    leaf = der(pki.issue_svid(ours[1], CLIENT_ID).cert)
    assert authn.resumed(leaf, identity).spiffe_id == SpiffeId.parse(CLIENT_ID)


def test_a_resumed_leaf_whose_issuer_name_is_copied_is_refused(
    ours: tuple[CA, CA], identity: Identity
) -> None:
    """A CA that names itself like our intermediate does not get its leaves in."""
    authn = Authenticator()
    authn.learn(identity)
    cn = ours[1].cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    impostor = pki.new_intermediate(pki.new_root(TD), name=str(cn))
    assert impostor.cert.subject == ours[1].cert.subject
    leaf = der(pki.issue_svid(impostor, CLIENT_ID).cert)
    with pytest.raises(AuthnError) as caught:
        authn.resumed(leaf, identity)
    assert caught.value.reason is Reason.UNKNOWN_CA


@pytest.mark.parametrize("case", ["federated-ca-claims-our-domain", "domain-without-bundle"])
async def test_refused_peer_is_not_let_in_by_resuming(
    server: Contexts, identity: Identity, ours: tuple[CA, CA], theirs: tuple[CA, CA],
    tmp_path: Path, held: list[TlsEndpoint], case: str,
) -> None:
    if case == "federated-ca-claims-our-domain":
        svid = pki.issue_svid(theirs[1], f"spiffe://{TD}/ns/default/sa/admin")
    else:
        svid = pki.issue_svid(ours[1], "spiffe://third.org/ns/x/sa/y")
    peer = Client(svid, ours[0], tmp_path)
    authn = Authenticator()
    assert refused(authn, await full_chain(server.server, peer, held), identity).reason is \
        Reason.UNKNOWN_CA
    assert peer.session is not None

    srv = await connect(server.server, peer, held)
    # OpenSSL resumed it: only our re-check of the resumed leaf stands between the peer
    # and the app (a full handshake here would prove nothing about resumption).
    assert srv.resumed()
    assert srv.verified_chain() == []
    with pytest.raises(AuthnError) as caught:
        authn.resumed(srv.peer_leaf(), identity)
    assert caught.value.reason is Reason.UNKNOWN_CA


def test_a_resumed_peer_whose_certificate_expired_since_is_refused(
    ours: tuple[CA, CA], identity: Identity
) -> None:
    """Tickets outlive short SVIDs and OpenSSL does not re-verify on resumption."""
    import time as _time


    authn = Authenticator()
    leaf = der(pki.issue_svid(ours[1], CLIENT_ID).cert)
    authn._cache(leaf, Peer(SpiffeId.parse(CLIENT_ID), 0.0, _time.time() - 1))
    with pytest.raises(AuthnError) as caught:
        authn.resumed(leaf, identity)
    assert caught.value.reason is Reason.CERT_EXPIRED


# --- what a resumption relies on (issue 15) -------------------------------------------------


def _identity(d: Path, svid: Svid, bundle: list[CA], federated: CA | None) -> Identity:
    d.mkdir(parents=True, exist_ok=True)
    files = pki.write_svid(d, svid, [ca.cert for ca in bundle])
    fed = {}
    if federated is not None:
        (d / "other.pem").write_bytes(pki.certs_pem([federated.cert]))
        fed = {OTHER_TD: d / "other.pem"}
    return load_identity(d / files.cert, d / files.key, d / files.bundle, fed)


async def test_an_svid_reload_keeps_what_verified_chains_taught(
    server: Contexts, identity: Identity, ours: tuple[CA, CA], theirs: tuple[CA, CA],
    tmp_path: Path, held: list[TlsEndpoint],
) -> None:
    """SPIRE with several servers: the peer's leaf comes from another intermediate of our
    root. After we reload our own SVID, its resumed sessions must still be let in."""
    sibling = pki.new_intermediate(ours[0], name="spire-server-2")
    peer = Client(pki.issue_svid(sibling, CLIENT_ID), ours[0], tmp_path)
    authn = Authenticator()
    authn.learn(identity)
    authn.full(await full_chain(server.server, peer, held), identity)

    reloaded = _identity(tmp_path / "reloaded", pki.issue_svid(ours[1], SERVER_ID),
                         [ours[0]], theirs[0])
    assert reloaded.trust_version == identity.trust_version
    authn.learn(reloaded)
    srv = await connect(server.server, peer, held)
    assert srv.resumed()
    assert authn.resumed(srv.peer_leaf(), reloaded).spiffe_id == SpiffeId.parse(CLIENT_ID)
    # Another leaf of that intermediate (a session another worker made): the issuer is known.
    other = der(pki.issue_svid(sibling, f"spiffe://{TD}/ns/default/sa/other").cert)
    assert authn.resumed(other, reloaded).trust_domain == TD

    # A new trust forgets it all: whether the sibling still belongs is for a full handshake.
    extra = pki.new_root(TD)
    new_trust = _identity(tmp_path / "new-trust", pki.issue_svid(ours[1], SERVER_ID),
                          [ours[0], extra], theirs[0])
    authn.learn(new_trust)
    with pytest.raises(AuthnError) as caught:
        authn.resumed(other, new_trust)
    assert caught.value.reason is Reason.UNKNOWN_CA


def test_without_federation_an_unknown_issuer_does_not_refuse_a_resumption(
    ours: tuple[CA, CA], tmp_path: Path,
) -> None:
    """Another worker verified the chain: with one bundle, it ended in the right one."""
    alone = _identity(tmp_path / "alone", pki.issue_svid(ours[1], SERVER_ID), [ours[0]], None)
    authn = Authenticator()
    authn.learn(alone)
    sibling = pki.new_intermediate(ours[0], name="spire-server-3")
    leaf = der(pki.issue_svid(sibling, CLIENT_ID).cert)
    assert authn.resumed(leaf, alone).spiffe_id == SpiffeId.parse(CLIENT_ID)


@pytest.mark.parametrize("path", ["same-leaf", "known-issuer"])
def test_a_resumed_leaf_under_an_expired_intermediate_is_refused(
    ours: tuple[CA, CA], identity: Identity, path: str,
) -> None:
    """OpenSSL refuses it in a full handshake; a resumption must check the whole chain."""
    now = datetime.now(UTC)
    expired = pki.new_intermediate(ours[0], name="expired", now=now - timedelta(hours=2),
                                   ttl=timedelta(hours=1))
    leaf = pki.issue_svid(expired, CLIENT_ID, not_after=now + timedelta(hours=1))
    authn = Authenticator()
    authn.full(chain_of(leaf, ours[0]), identity)  # as verified while it was valid
    resumed = leaf if path == "same-leaf" else pki.issue_svid(
        expired, f"spiffe://{TD}/ns/default/sa/other", not_after=now + timedelta(hours=1))
    with pytest.raises(AuthnError) as caught:
        authn.resumed(der(resumed.cert), identity)
    assert caught.value.reason is Reason.CERT_EXPIRED


def test_a_peer_carries_the_validity_of_its_whole_chain(
    ours: tuple[CA, CA], identity: Identity,
) -> None:
    now = datetime.now(UTC)
    short = pki.new_intermediate(ours[0], name="short", ttl=timedelta(minutes=5))
    leaf = pki.issue_svid(short, CLIENT_ID, not_after=now + timedelta(hours=1))
    peer = Authenticator().full(chain_of(leaf, ours[0]), identity)
    assert peer.not_after == short.cert.not_valid_after_utc.timestamp()


async def test_a_server_session_ends_with_the_client_certificate_it_proved(
    server: Contexts, ours: tuple[CA, CA], tmp_path: Path, held: list[TlsEndpoint],
) -> None:
    """Refuse the PSK, not the peer: once the client's certificate has expired its old
    session no longer resumes, and the client (rotated meanwhile) makes a full handshake
    instead of being refused on resumption."""
    first = pki.issue_svid(ours[1], CLIENT_ID, ttl=timedelta(seconds=3))
    peer = Client(first, ours[0], tmp_path)
    await full_chain(server.server, peer, held)
    assert (await connect(server.server, peer, held)).resumed()
    present(peer.ctx, pki.issue_svid(ours[1], CLIENT_ID), tmp_path)  # its SVID rotated
    expiry = first.cert.not_valid_after_utc.timestamp()
    async with asyncio.timeout(10):
        while time.time() <= expiry:  # the clock itself is the condition
            await asyncio.sleep(0.05)
    srv = await connect(server.server, peer, held)
    assert not srv.resumed()
    assert srv.verified_chain()[0] != der(first.cert)


def test_remaining_life() -> None:
    now = datetime.now(UTC)
    root = pki.new_root(TD)
    leaf = pki.issue_svid(root, CLIENT_ID, not_after=now + timedelta(seconds=100))
    certs = [der(leaf.cert), der(root.cert)]
    assert peerchain.remaining_life(certs, now.timestamp()) in (99, 100)
    assert peerchain.remaining_life(certs, now.timestamp() + 1000) == 0
    assert peerchain.remaining_life([], now.timestamp()) is None
    assert peerchain.remaining_life([b"junk"], now.timestamp()) is None
