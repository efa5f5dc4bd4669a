"""Every handshake failure reason, as the sidecar logs it, from a real peer.

Most cases drive B's inbound listener directly with the stdlib ssl client and any
certificate, and find B's access-log line by the client's own address (`peer_addr`).
Every test ends with a good client getting through the same listener.
"""

from __future__ import annotations

import json
import secrets
import select
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from tls_pairs import forge_certificate_verify
from told_port import start_listening

from sidecar.tools import pki

from .conftest import (
    BILLING,
    FRONTEND,
    IO_TIMEOUT,
    LINE_TIMEOUT,
    PAYMENTS,
    EchoApp,
    Pki,
    Sidecar,
    SidecarFactory,
    TlsClient,
    addr,
    assert_good_client,
    plain_roundtrip,
    recv_all,
    wait_for,
)
from .test_live_changes import metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

@pytest.fixture
def app(echo_app: Callable[..., EchoApp]) -> EchoApp:
    return echo_app()


@pytest.fixture
def b(sidecar: SidecarFactory, app: EchoApp) -> Sidecar:
    """The inbound sidecar under test, in front of a running echo app."""
    return sidecar("b", spiffe_id=PAYMENTS, inbound=[{"name": "in", "forward_to": app.address}])


def reason_for(b: Sidecar, local: str) -> dict[str, object]:
    """B's access-log line for the connection from `local`; it must be a handshake failure."""
    line = b.connection(peer_addr=local)
    assert line["decision"] is None, f"a failed handshake reached authorization: {line}"
    assert line["bytes_to_app"] == 0, line
    return line


def refused(b: Sidecar, client: TlsClient, ctx: ssl.SSLContext) -> dict[str, object]:
    """Connect to B with `ctx`: no byte reaches the app, and B logs a failure reason."""
    out = client.exchange(b.port("in"), ctx, b"must not reach the app")
    assert out.received == b"", "B echoed bytes for a refused client"
    return reason_for(b, out.local)


# --- certificate problems --------------------------------------------------------------


def test_no_client_cert(b: Sidecar, tls_client: TlsClient) -> None:
    line = refused(b, tls_client, tls_client.context(None))
    assert line["reason"] == "no_client_cert", line
    assert_good_client(b, tls_client)


def test_unknown_ca(b: Sidecar, tls_client: TlsClient, ca: Pki) -> None:
    # Same trust domain name, a different root: only the trust store tells them apart.
    foreign = pki.issue_svid(ca.foreign_intermediate, FRONTEND)
    line = refused(b, tls_client, tls_client.context(foreign))
    assert line["reason"] == "unknown_ca", line
    assert_good_client(b, tls_client)


def test_unknown_ca_leaf_straight_from_a_foreign_root(
    b: Sidecar, tls_client: TlsClient, ca: Pki
) -> None:
    foreign = pki.issue_svid(ca.foreign_root, FRONTEND)
    line = refused(b, tls_client, tls_client.context(foreign))
    assert line["reason"] == "unknown_ca", line
    assert_good_client(b, tls_client)


def test_cert_expired(b: Sidecar, tls_client: TlsClient, ca: Pki) -> None:
    now = datetime.now(UTC)
    expired = ca.issue(FRONTEND, not_before=now - timedelta(hours=2),
                       not_after=now - timedelta(hours=1))
    line = refused(b, tls_client, tls_client.context(expired))
    assert line["reason"] == "cert_expired", line
    assert_good_client(b, tls_client)


def test_cert_not_yet_valid(b: Sidecar, tls_client: TlsClient, ca: Pki) -> None:
    early = ca.issue(FRONTEND, not_before=datetime.now(UTC) + timedelta(minutes=2))
    line = refused(b, tls_client, tls_client.context(early))
    assert line["reason"] == "cert_not_yet_valid", line
    assert_good_client(b, tls_client)


def test_cert_not_yet_valid_by_a_little_says_check_the_clocks(
    b: Sidecar, tls_client: TlsClient, ca: Pki
) -> None:
    early = ca.issue(FRONTEND, not_before=datetime.now(UTC) + timedelta(minutes=2))
    line = refused(b, tls_client, tls_client.context(early))
    assert line["reason"] == "cert_not_yet_valid", line
    assert "clock" in str(line["detail"]).lower(), line


def test_cert_not_yet_valid_by_far_does_not_blame_the_clocks(
    b: Sidecar, tls_client: TlsClient, ca: Pki
) -> None:
    early = ca.issue(FRONTEND, not_before=datetime.now(UTC) + timedelta(hours=2),
                     not_after=datetime.now(UTC) + timedelta(hours=3))
    line = refused(b, tls_client, tls_client.context(early))
    assert line["reason"] == "cert_not_yet_valid", line
    assert "clock" not in str(line["detail"]).lower(), line


def test_missing_intermediate(b: Sidecar, tls_client: TlsClient, ca: Pki) -> None:
    # B's own SVID comes from the same intermediate, so B knows it; the client leaves it out.
    leaf_only = ca.issue(FRONTEND, include_intermediates=False)
    line = refused(b, tls_client, tls_client.context(leaf_only))
    assert line["reason"] == "missing_intermediate", line
    assert_good_client(b, tls_client)


def test_bad_signature(b: Sidecar, tls_client: TlsClient, ca: Pki) -> None:
    forged = ca.issue(FRONTEND, issuer_key=pki.new_key())
    line = refused(b, tls_client, tls_client.context(forged))
    assert line["reason"] == "bad_signature", line
    assert_good_client(b, tls_client)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"uris": ()}, id="no-uri-san"),
        pytest.param({"extra_uris": ("spiffe://example.org/ns/web/sa/other",)},
                     id="two-uri-sans"),
        pytest.param({"is_ca": True}, id="ca-leaf"),
        pytest.param({"key_usage": pki.make_key_usage(key_encipherment=True)},
                     id="no-digital-signature"),
    ],
)
def test_invalid_svid(
    b: Sidecar, tls_client: TlsClient, ca: Pki, overrides: dict[str, object]
) -> None:
    bad = ca.issue(FRONTEND, **overrides)
    line = refused(b, tls_client, tls_client.context(bad))
    assert line["reason"] == "invalid_svid", line
    assert_good_client(b, tls_client)


# --- outbound: the server is not who the route expects ---------------------------------


def test_spiffe_id_mismatch(sidecar: SidecarFactory, b: Sidecar, app: EchoApp,
                            tls_client: TlsClient) -> None:
    target = f"127.0.0.1:{b.port('in')}"
    a = sidecar("a", spiffe_id=FRONTEND, outbound=[
        {"name": "wrong", "connect_to": target, "expect_ids": [BILLING]},
        {"name": "right", "connect_to": target, "expect_ids": [PAYMENTS]},
    ])

    r = plain_roundtrip(a.port("wrong"), b"card number 4111")

    assert r.received == b""
    line = a.connection(peer_addr=r.local)
    assert line["reason"] == "spiffe_id_mismatch", line
    assert line["peer_id"] == PAYMENTS, line
    assert line["bytes_from_app"] == 0, line
    assert app.bytes_received == 0, "the client's bytes reached a server the route does not expect"
    good = plain_roundtrip(a.port("right"), b"hello")
    assert good.received == b"hello"
    assert a.connection(peer_addr=good.local)["reason"] is None
    assert_good_client(b, tls_client)


# --- not TLS, stalled, wrong version ---------------------------------------------------


def raw_send(port: int, data: bytes) -> tuple[str, bytes]:
    """Send `data` on a plain TCP connection; return our address and whatever came back
    before the sidecar closed it."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        local = addr(sock)
        sock.sendall(data)
        return local, recv_all(sock)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(bytes(range(256)) * 4, id="binary"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh-banner"),
    ],
)
def test_not_tls_garbage(b: Sidecar, tls_client: TlsClient, app: EchoApp, garbage: bytes) -> None:
    local, _ = raw_send(b.port("in"), garbage)
    line = reason_for(b, local)
    assert line["reason"] == "not_tls", line
    assert app.accepted == 0
    assert_good_client(b, tls_client)


def test_not_tls_http_request(b: Sidecar, tls_client: TlsClient, app: EchoApp) -> None:
    local, _ = raw_send(b.port("in"), b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
    line = reason_for(b, local)
    assert line["reason"] == "not_tls", line
    assert app.accepted == 0
    assert_good_client(b, tls_client)


def client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client, from a memory BIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and len(hello) > 100
    return hello


def test_handshake_timeout(sidecar: SidecarFactory, app: EchoApp, tls_client: TlsClient) -> None:
    b = sidecar("b", spiffe_id=PAYMENTS, inbound=[{"name": "in", "forward_to": app.address}],
                limits={"handshake_timeout": "1s"})
    hello = client_hello()
    with socket.create_connection(("127.0.0.1", b.port("in")), timeout=IO_TIMEOUT) as sock:
        local = addr(sock)
        sock.sendall(hello[: len(hello) // 2])  # half a ClientHello, then silence
        started = time.monotonic()
        line = reason_for(b, local)
        took = line["_t"] - started
        assert line["reason"] == "handshake_timeout", line
        assert 0.9 <= took <= 3.0, f"B gave up after {took:.2f}s, expected about 1s"
        assert recv_all(sock) == b"", "B sent bytes to a client that never finished its hello"
    assert_good_client(b, tls_client)


def test_peer_closed_mid_handshake(b: Sidecar, tls_client: TlsClient) -> None:
    with socket.create_connection(("127.0.0.1", b.port("in")), timeout=IO_TIMEOUT) as sock:
        local = addr(sock)
        sock.sendall(client_hello())
        sock.shutdown(socket.SHUT_WR)  # a whole ClientHello, then hang up
        recv_all(sock)  # B's ServerHello flight, then its close
    line = reason_for(b, local)
    assert line["reason"] == "peer_closed", line
    assert_good_client(b, tls_client)


def test_protocol_version(b: Sidecar, tls_client: TlsClient) -> None:
    ctx = tls_client.context(tls_client.ca.svid(FRONTEND), max_version=ssl.TLSVersion.TLSv1_2)
    line = refused(b, tls_client, ctx)
    assert line["reason"] == "protocol_version", line
    assert_good_client(b, tls_client)


# --- the app is down -------------------------------------------------------------------


def test_upstream_unavailable(sidecar: SidecarFactory, echo_app: Callable[..., EchoApp],
                              tls_client: TlsClient) -> None:
    # A port we own, bound but not listening: connecting to it is refused, and no other
    # process can take it before the app comes up on it.
    reserved = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        b = sidecar("b", spiffe_id=PAYMENTS,
                    inbound=[{"name": "in", "forward_to": f"127.0.0.1:{port}"}])

        out = tls_client.exchange(b.port("in"), tls_client.context(tls_client.ca.svid(FRONTEND)),
                                  secrets.token_bytes(64))
        assert out.handshake_error is None, out.handshake_error
        assert out.received == b""
        line = b.connection(peer_addr=out.local)
        assert line["reason"] == "upstream_unavailable", line
        assert line["decision"] == "allow", line  # authorized; only the app was missing
    except BaseException:
        reserved.close()
        raise
    echo_app(sock=reserved)  # the app comes up on that port; it owns the socket now
    assert_good_client(b, tls_client)


# --- a peer that holds a certificate but not its key; chains past our bounds ------------


def test_forged_certificate_verify_is_bad_signature(b: Sidecar, tls_client: TlsClient,
                                                    ca: Pki, app: EchoApp) -> None:
    with socket.create_connection(("127.0.0.1", b.port("in")), timeout=IO_TIMEOUT) as sock:
        local = addr(sock)
        forge_certificate_verify(sock, ca.svid(FRONTEND))
    line = reason_for(b, local)
    assert line["reason"] == "bad_signature", line
    assert app.bytes_received == 0
    assert_good_client(b, tls_client)


def chain_of(top: pki.CA, intermediates: int) -> pki.CA:
    ca = top
    for _ in range(intermediates):
        ca = pki.new_intermediate(ca, path_length=None)
    return ca


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        # 50 certificates: ~38 KiB, past the 16 KiB we read of a peer's chain.
        pytest.param(lambda ca: pki.issue_svid(chain_of(ca.root, 49), FRONTEND),
                     "message_too_large", id="chain-of-50"),
        # 10 intermediates: 8 KiB, under the byte bound, deeper than the verify depth.
        pytest.param(lambda ca: pki.issue_svid(chain_of(ca.root, 10), FRONTEND),
                     "chain_too_long", id="deeper-than-verify-depth"),
        pytest.param(lambda ca: pki.issue_svid(chain_of(ca.foreign_root, 10), FRONTEND),
                     "chain_too_long", id="deeper-than-verify-depth-foreign"),
        pytest.param(lambda ca: ca.issue(FRONTEND, uris=(FRONTEND + "/" + "a" * 16384,)),
                     "message_too_large", id="16k-uri-san"),
    ],
)
def test_oversized_chains_have_a_reason_of_their_own(
    b: Sidecar, tls_client: TlsClient, ca: Pki, make: Callable[[Pki], pki.Svid], reason: str,
) -> None:
    line = refused(b, tls_client, tls_client.context(make(ca)))
    assert line["reason"] == reason, line
    # ... so that a chain-size attack shows in /metrics under its name.
    assert metric(b, "sidecar_handshake_errors_total", reason=reason) >= 1
    assert_good_client(b, tls_client)


def test_a_certificate_with_400_uri_sans_writes_a_short_line(
    b: Sidecar, tls_client: TlsClient, ca: Pki,
) -> None:
    sans = tuple(f"spiffe://example.org/ns/web/sa/s{i:03d}" for i in range(400))
    line = refused(b, tls_client, tls_client.context(ca.issue(FRONTEND, extra_uris=sans)))
    assert line["reason"] == "invalid_svid", line
    written = len(json.dumps(line))
    assert written < 2048, f"a {written}-byte log line for one refused peer"
    assert "chars)" in str(line["detail"]), line  # cut, and says how long it was
    assert_good_client(b, tls_client)


# --- outbound TLS 1.3: the server refuses our certificate after our handshake ended ----


def assert_refused_by_server(a: Sidecar, listener: str, reason: str = "unknown_ca"
                             ) -> dict[str, object]:
    r = plain_roundtrip(a.port(listener), b"card number 4111")
    assert r.received == b""
    line = a.connection(peer_addr=r.local)
    assert line["close"] == "handshake_failed", line
    assert line["reason"] == reason, line
    assert "refus" in str(line["detail"]) or "alert" in str(line["detail"]), line
    assert metric(a, "sidecar_handshakes_total", direction="outbound", listener=listener,
                  result="ok") == 0
    assert metric(a, "sidecar_handshakes_total", direction="outbound", listener=listener,
                  result="error") == 1
    assert metric(a, "sidecar_handshake_errors_total", direction="outbound",
                  listener=listener, reason=reason) == 1
    return line


@dataclass(frozen=True)
class TrustsBoth(Pki):
    """Issues from `intermediate` and trusts both roots."""

    @property
    def bundle(self) -> list[x509.Certificate]:
        return [self.root.cert, self.foreign_root.cert]


def test_outbound_refused_by_our_own_inbound(b: Sidecar, app: EchoApp, ca: Pki,
                                             tmp_path: Path) -> None:
    # A's SVID comes from the foreign CA, which B does not trust; A trusts both roots.
    other = TrustsBoth(ca.foreign_root, ca.foreign_intermediate, ca.root, ca.intermediate)
    factory = SidecarFactory(tmp_path / "foreign", other)
    try:
        a = factory("a", spiffe_id=FRONTEND, outbound=[
            {"name": "out", "connect_to": f"127.0.0.1:{b.port('in')}",
             "expect_ids": [PAYMENTS]}])
        assert_refused_by_server(a, "out")
    finally:
        problems = factory.stop_all()
    assert not problems, "\n".join(problems)
    assert app.bytes_received == 0


@pytest.fixture
def s_server(tmp_path: Path, ca: Pki) -> Iterator[int]:
    """`openssl s_server` as PAYMENTS, trusting only the foreign root: it refuses our
    clients' certificates, after their side of a TLS 1.3 handshake has ended."""
    yield from _s_server(tmp_path, ca, ca.foreign_root.cert)


@pytest.fixture
def s_server_wanting_a_host_name(tmp_path: Path, ca: Pki) -> Iterator[int]:
    """`openssl s_server` trusting our root but checking the client certificate for a DNS
    name an SVID does not carry: OpenSSL refuses it with bad_certificate (as Go does for
    any client certificate it cannot verify)."""
    yield from _s_server(tmp_path, ca, ca.root.cert, "-verify_hostname", "web.example")


def _s_server(tmp_path: Path, ca: Pki, trusted: x509.Certificate, *extra: str
              ) -> Iterator[int]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH: cannot start s_server")
    d = tmp_path / "s_server"
    d.mkdir()
    (d / "cert.pem").write_bytes(ca.svid(PAYMENTS).chain_pem())
    (d / "key.pem").write_bytes(ca.svid(PAYMENTS).key_pem())
    (d / "ca.pem").write_bytes(pki.certs_pem([trusted]))
    proc, port = start_listening(lambda port: [
        openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-quiet", "-tls1_3",
        "-cert", str(d / "cert.pem"), "-cert_chain", str(d / "cert.pem"),
        "-key", str(d / "key.pem"), "-CAfile", str(d / "ca.pem"),
        "-Verify", "1", "-verify_return_error", *extra], "openssl s_server",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_outbound_refused_by_openssl_s_server(sidecar: SidecarFactory, s_server: int) -> None:
    a = sidecar("a", spiffe_id=FRONTEND, outbound=[
        {"name": "out", "connect_to": f"127.0.0.1:{s_server}", "expect_ids": [PAYMENTS]}])
    assert_refused_by_server(a, "out")


def test_bad_certificate_from_a_server_that_does_not_say_why(
        sidecar: SidecarFactory, s_server_wanting_a_host_name: int) -> None:
    a = sidecar("a", spiffe_id=FRONTEND, outbound=[
        {"name": "out", "connect_to": f"127.0.0.1:{s_server_wanting_a_host_name}",
         "expect_ids": [PAYMENTS]}])
    line = assert_refused_by_server(a, "out", "bad_certificate")
    assert "bad certificate" in str(line["detail"]), line


def test_outbound_accepted_counts_ok_once(sidecar: SidecarFactory, b: Sidecar) -> None:
    a = sidecar("a", spiffe_id=FRONTEND, outbound=[
        {"name": "out", "connect_to": f"127.0.0.1:{b.port('in')}", "expect_ids": [PAYMENTS]}])
    r = plain_roundtrip(a.port("out"), b"hello")
    assert r.received == b"hello"
    assert a.connection(peer_addr=r.local)["reason"] is None
    wait_for(lambda: metric(a, "sidecar_handshakes_total", direction="outbound",
                            result="ok") == 1, LINE_TIMEOUT, "the ok count")
    assert metric(a, "sidecar_handshakes_total", direction="outbound", result="error") == 0


# --- a refused client whose flight spans segments reads the alert, not a reset ---------


def tls_records(data: bytes) -> list[bytes]:
    """Whole TLS records of `data` (5-byte header + body each)."""
    out = []
    while data:
        size = 5 + int.from_bytes(data[3:5])
        out.append(data[:size])
        data = data[size:]
    return out


def test_refused_client_flight_in_segments_reads_the_alert(
    b: Sidecar, tls_client: TlsClient, ca: Pki,
) -> None:
    """A TLS 1.3 client from a CA B does not trust sends its second flight (Certificate,
    CertificateVerify, Finished) one record per segment, the rest only once B has
    answered the first. B must send its alert, then FIN, and read the rest rather than
    reset the connection: the client's sends succeed, and it reads the alert, then EOF."""
    ctx = tls_client.context(pki.issue_svid(ca.foreign_intermediate, FRONTEND))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with socket.create_connection(("127.0.0.1", b.port("in")), timeout=IO_TIMEOUT) as sock:
        local = addr(sock)
        for _ in range(20):  # ClientHello out; ServerHello .. Finished in, a few reads
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "B closed before its ServerHello flight"
                incoming.write(data)
        else:
            pytest.fail("the client's handshake did not finish in 20 reads")
        first, *rest = tls_records(outgoing.read())
        if first[0] == 20:  # a middlebox-compatibility ChangeCipherSpec goes with it
            first += rest.pop(0)
        assert rest, "the client's flight was one record: nothing to send after"
        sock.sendall(first)  # the Certificate: B refuses it and answers
        readable, _, _ = select.select([sock], [], [], IO_TIMEOUT)
        assert readable, "B did not answer the refused certificate"
        for record in rest:  # CertificateVerify, Finished: they reach a refusing B
            sock.sendall(record)
        answer = b""
        while more := sock.recv(65536):  # a reset raises ConnectionResetError here
            answer += more
    incoming.write(answer)
    with pytest.raises(ssl.SSLError) as heard:
        obj.read(1)
    assert heard.value.reason == "TLSV1_ALERT_UNKNOWN_CA", heard.value
    assert reason_for(b, local)["reason"] == "unknown_ca"
    assert_good_client(b, tls_client)


def test_a_refused_client_that_stays_open_lingers_briefly_outside_the_pending_slots(
    sidecar: SidecarFactory, app: EchoApp, tls_client: TlsClient, ca: Pki,
) -> None:
    """A refused client that never closes holds its socket for the linger (1 s) only, and
    not in a pending-handshake slot: with one slot, a good client gets through meanwhile
    and nobody is evicted."""
    b = sidecar("b", spiffe_id=PAYMENTS, inbound=[{"name": "in", "forward_to": app.address}],
                limits={"max_pending_handshakes": 1})
    ctx = tls_client.context(pki.issue_svid(ca.foreign_intermediate, FRONTEND))
    raw = socket.create_connection(("127.0.0.1", b.port("in")), timeout=IO_TIMEOUT)
    local = addr(raw)
    with ctx.wrap_socket(raw) as tls:
        with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
            tls.recv(1)  # B has refused us and lingers; we stay open
        heard = time.monotonic()
        assert_good_client(b, tls_client)
        line = reason_for(b, local)
        assert line["reason"] == "unknown_ca", line
        took = line["_t"] - heard
        assert took <= 1.0 + 2.0, f"B held a refused client's socket for {took:.2f} s"
    assert metric(b, "sidecar_connections_rejected_total",
                  limit="max_pending_handshakes") == 0
