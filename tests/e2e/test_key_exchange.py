"""A replayed ClientHello must not buy CPU on the sidecar's loop (issue 16, item 1).

One real sidecar; a ClientHello captured once from the stdlib client with its key-exchange
groups set, replayed over fresh TCP connections, as an attacker would. The sidecar's loop
thread CPU (/proc/PID/schedstat, ns) is read around a batch of ffdhe8192-only hellos and
around a batch of X25519 ones in the same test: a loaded machine slows both alike. With
OpenSSL's default groups each ffdhe8192 hello cost ~137 ms; pinned, it is refused with a
handshake_failure alert before any key exchange.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.tls import openssl

from .conftest import LINE_TIMEOUT, EchoApp, Pki, Sidecar, SidecarFactory, addr
from .test_hostile import loop_pid

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

BATCH = 20
ALERT, HANDSHAKE = 21, 22  # TLS record content types
FATAL, HANDSHAKE_FAILURE = 2, 40  # alert level, description
# Each batch also pays accepting, logging and closing 20 connections (~1-2 ms each);
# the ffdhe8192 batch may cost what the X25519 one did, not ~2.7 s more.
SLACK = 2.0


@pytest.fixture(scope="module")
def sidecar(ca: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    app = EchoApp().start()
    factory = SidecarFactory(tmp_path_factory.mktemp("kx"), ca)
    try:
        yield factory("kx", inbound=[{"name": "in", "forward_to": app.address}])
    finally:
        problems = factory.stop_all()
        app.close()
    assert not problems, "\n".join(problems)


def client_hello(groups: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    assert openssl.set_groups(ctx, groups), groups
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname="payments")
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def replay(port: int, hello: bytes) -> tuple[str, bytes]:
    """Send `hello`, read the first record header and two bytes of the answer, hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=LINE_TIMEOUT) as s:
        local = addr(s)
        s.sendall(hello)
        got = b""
        while len(got) < 7 and (more := s.recv(7 - len(got))):
            got += more
        return local, got


def loop_cpu(pid: int) -> float:
    """Seconds the sidecar's loop thread has run on a CPU."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def batch_cpu(sc: Sidecar, pid: int, hello: bytes) -> tuple[float, list[bytes]]:
    """Loop CPU for BATCH replays of `hello`, each logged before the reading ends."""
    before = loop_cpu(pid)
    seen = [replay(sc.port("in"), hello) for _ in range(BATCH)]
    for local, _ in seen:
        sc.connection(peer_addr=local)
    return loop_cpu(pid) - before, [answer for _, answer in seen]


def test_a_finite_field_hello_is_refused_and_costs_no_more_than_x25519(
        sidecar: Sidecar) -> None:
    pid = loop_pid(sidecar)
    batch_cpu(sidecar, pid, client_hello("X25519"))  # warm: first-use costs stay out
    x25519, answers = batch_cpu(sidecar, pid, client_hello("X25519"))
    assert all(a[0] == HANDSHAKE for a in answers), answers[:3]
    ffdhe, answers = batch_cpu(sidecar, pid, client_hello("ffdhe8192"))
    assert ffdhe <= SLACK * x25519, (
        f"{BATCH} ffdhe8192 hellos cost the loop {ffdhe * 1000:.0f} ms, "
        f"{BATCH} X25519 ones {x25519 * 1000:.0f} ms")
    assert all(a[0] == ALERT and a[5:7] == bytes([FATAL, HANDSHAKE_FAILURE]) for a in answers), \
        answers[:3]
