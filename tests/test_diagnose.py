"""`sidecar diagnose` says only what the client's seat saw (issue 16, item 5).

Each server here is a real TLS server on 127.0.0.1 in a thread, built from the dev PKI,
playing one way a server can end a connection after the handshake: holding it open,
hanging up after sending a ticket (what a sidecar does on a policy denial), hanging up
with no ticket, or issuing no tickets at all.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar.tls.classify import skew_note
from sidecar.tools import diagnose, pki

pytestmark = pytest.mark.timeout(60)
TD = "example.org"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/payments"
CLIENT_ID = f"spiffe://{TD}/ns/web/sa/frontend"
IO_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def cas() -> tuple[pki.CA, pki.CA]:
    root = pki.new_root(TD)
    return root, pki.new_intermediate(root)


def files(d: Path, svid: pki.Svid, root: pki.CA) -> dict[str, str]:
    written = pki.write_svid(d, svid, [root.cert])
    return {"cert": str(d / written.cert), "key": str(d / written.key),
            "bundle": str(d / written.bundle)}


# What the server does once its handshake is done; it gets the TLS socket.
Behaviour = Callable[[ssl.SSLSocket], None]


def hold(conn: ssl.SSLSocket) -> None:
    """Keep the connection until the client goes, as a server waiting for a request does."""
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass


def close_notify(conn: ssl.SSLSocket) -> None:
    """Hang up cleanly, as a sidecar does when its policy denies the caller."""
    try:
        conn.unwrap()
    except OSError:
        pass  # the client hung up first: its half of the shutdown never comes


def drop(conn: ssl.SSLSocket) -> None:
    """Hang up with no close_notify, as a sidecar does when its app cannot be reached."""
    conn.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def tls_server(cas: tuple[pki.CA, pki.CA], tmp_path: Path
               ) -> Iterator[Callable[..., int]]:
    """start(behaviour, tickets, svid=None) -> port: a mutual-TLS server presenting `svid`
    (default: a good one), stopped by the fixture."""
    root, inter = cas
    stops: list[tuple[threading.Event, threading.Thread, socket.socket]] = []

    def start(behaviour: Behaviour, tickets: int, svid: pki.Svid | None = None) -> int:
        f = files(tmp_path / f"srv{len(stops)}", svid or pki.issue_svid(inter, SERVER_ID),
                  root)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(f["cert"], f["key"])
        ctx.load_verify_locations(f["bundle"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.num_tickets = tickets
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    raw, _ = listener.accept()
                except TimeoutError:
                    continue
                raw.settimeout(IO_TIMEOUT)
                try:
                    with ctx.wrap_socket(raw, server_side=True) as conn:
                        behaviour(conn)
                except OSError:
                    raw.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        stops.append((stop, thread, listener))
        return int(listener.getsockname()[1])

    yield start
    for stop, thread, listener in stops:
        stop.set()
        thread.join(IO_TIMEOUT)
        listener.close()


def diagnose_cli(port: int, client: dict[str, str], capsys: pytest.CaptureFixture[str],
                 *extra: str) -> tuple[int, dict[str, object], str]:
    """(exit code, --json output, text output) of two runs against the same server."""
    argv = [f"127.0.0.1:{port}", "--cert", client["cert"], "--key", client["key"], *extra]
    code = diagnose.main([*argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert diagnose.main(argv) == code
    return code, out, capsys.readouterr().out


@pytest.fixture
def client(cas: tuple[pki.CA, pki.CA], tmp_path: Path) -> dict[str, str]:
    root, inter = cas
    return files(tmp_path / "client", pki.issue_svid(inter, CLIENT_ID), root)


def test_a_server_without_tickets_is_not_said_to_resume(
    tls_server: Callable[..., int], client: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = tls_server(hold, 0)
    code, out, text = diagnose_cli(port, client, capsys, "--bundle", client["bundle"])
    assert code == 0 and out["ok"], out
    assert out["resumed_second"] is None and out["resumption"] == "no_ticket"
    assert "resumed the session" not in text
    assert "not tried: the server sent no session ticket" in text
    assert text.rstrip().splitlines()[-1].startswith("OK: mutual TLS works with")


def test_a_server_that_resumes_says_so(
    tls_server: Callable[..., int], client: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = tls_server(hold, 2)
    code, out, text = diagnose_cli(port, client, capsys, "--bundle", client["bundle"])
    assert code == 0 and out["resumed_second"] is True and out["resumption"] == "resumed"
    assert "a second connection resumed the session" in text


def test_a_hang_up_after_a_ticket_is_not_blamed_on_our_certificate(
    tls_server: Callable[..., int], client: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A ticket, then close_notify: what a sidecar does on a policy denial."""
    port = tls_server(close_notify, 2)
    code, out, text = diagnose_cli(port, client, capsys, "--bundle", client["bundle"])
    assert code == 1 and out["reason"] == "peer_closed", out
    words = json.dumps(out)
    assert "accepted our certificate at the handshake" in words
    assert "with a close_notify" in words
    assert "policy" in str(out["explanation"]) and "app" in str(out["explanation"])
    assert "probably rejected our certificate" not in text


def test_a_hang_up_without_a_ticket_names_every_cause(
    tls_server: Callable[..., int], client: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = tls_server(drop, 0)
    code, out, text = diagnose_cli(port, client, capsys, "--bundle", client["bundle"])
    assert code == 1 and out["reason"] == "peer_closed", out
    explanation = str(out["explanation"])
    assert "refused our certificate" in explanation and "policy" in explanation
    assert "without a close_notify" in json.dumps(out)
    assert "no session ticket" in json.dumps(out)
    assert "probably rejected our certificate" not in text


def test_without_a_bundle_the_last_line_says_the_server_was_not_verified(
    tls_server: Callable[..., int], client: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = tls_server(hold, 2)
    code, out, text = diagnose_cli(port, client, capsys)
    assert code == 0 and out["ok"] and out["server_verified"] is False, out
    last = text.rstrip().splitlines()[-1]
    assert not last.startswith("OK") and "not verified" in last and "--bundle" in last


def test_a_just_expired_certificate_names_the_issuer_and_the_clocks(
    cas: tuple[pki.CA, pki.CA],
) -> None:
    _, inter = cas
    now = datetime.now(UTC)
    leaf = pki.issue_svid(inter, CLIENT_ID, not_before=now - timedelta(hours=1),
                          not_after=now - timedelta(minutes=1)).cert
    note = skew_note([leaf.public_bytes(serialization.Encoding.DER)], 300.0)
    assert "stopped rotating" in note and "clocks" in note
    early = pki.issue_svid(inter, CLIENT_ID, not_before=now + timedelta(minutes=1),
                           not_after=now + timedelta(hours=1)).cert
    note = skew_note([early.public_bytes(serialization.Encoding.DER)], 300.0)
    assert "clocks" in note and "rotating" not in note


def test_a_ca_copying_a_trusted_name_is_not_called_absent(
    tls_server: Callable[..., int], client: dict[str, str],
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    """The server's certificate comes from a rogue root named like our trusted one."""
    trusted = pki.new_root(TD, name="example.org root CA")
    rogue = pki.new_root(TD, name="example.org root CA")
    bundle = tmp_path / "trusted.pem"
    bundle.write_bytes(pki.certs_pem([trusted.cert]))
    port = tls_server(hold, 2, pki.issue_svid(rogue, SERVER_ID))
    code = diagnose.main([f"127.0.0.1:{port}", "--cert", client["cert"], "--key",
                          client["key"], "--bundle", str(bundle), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["reason"] == "unknown_ca", out
    words = json.dumps(out)
    assert "not in our trust bundle" not in words
    assert "a CA named 'CN=example.org root CA,O=SPIFFE' is trusted" in words
    assert "different key" in words


def test_inspect_names_a_ca_copying_a_trusted_name(tmp_path: Path) -> None:
    from sidecar.tools.inspect import command as inspect

    trusted = pki.new_root(TD, name="example.org root CA")
    rogue = pki.new_root(TD, name="example.org root CA")
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pki.issue_svid(rogue, CLIENT_ID).chain_pem())
    bundle = tmp_path / "trusted.pem"
    bundle.write_bytes(pki.certs_pem([trusted.cert]))
    contents = inspect.read_pem(leaf.read_bytes())
    report = inspect.examine(str(leaf), contents, now=datetime.now(UTC),
                             bundle=inspect.BundleFile(str(bundle),
                                                       inspect.read_pem(bundle.read_bytes()).certs))
    messages = [f.message for f in report.findings]
    assert any("a CA named 'CN=example.org root CA,O=SPIFFE' is trusted" in m
               and "different key" in m for m in messages), messages


@pytest.mark.parametrize(("entry", "says"), [
    ("spiffe://example.org/a//b", "empty segment"),
    ("spiffe://example.org/ns/*", "a wildcard must be the whole path"),
])
def test_an_expect_id_no_server_could_match_is_refused_before_connecting(
        entry: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The rules of a route's expect_ids (spiffe.SpiffePattern), not a silent mismatch."""
    with pytest.raises(SystemExit) as caught:
        diagnose.main(["127.0.0.1:9", "--expect-id", entry])
    assert caught.value.code == 2
    assert says in capsys.readouterr().err


def test_http_shows_what_a_server_that_speaks_first_sent_from_its_first_byte(
    tls_server: Callable[..., int], client: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--http against a tcp listener whose app speaks first: the verdict's one-byte read
    takes that first byte, and the step must still show what came, whole."""
    def greet(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"SSH-2.0-speaks-first\r\n")
        conn.recv(4096)  # the request
        close_notify(conn)

    port = tls_server(greet, 2)
    code, out, text = diagnose_cli(port, client, capsys, "--bundle", client["bundle"],
                                   "--http", "/x")
    assert code == 1 and out["reason"] == "not_http", out
    assert "no HTTP response ('SSH-2.0-speaks-first')" in text, text
