"""How connections end, through real sidecar processes: only a clean end is an end.

    client --plaintext--> A (outbound) ==mTLS==> B (inbound) --> app

A process killed mid-transfer (kill -9) leaves its TCP streams ended without close_notify,
or reset. The side that remains must learn it as a reset (ECONNRESET), never as the end
of a complete stream: a read-until-EOF protocol would take a truncated body for a whole
one. Likewise a reset by one app reaches the other as a reset, and a clean end as a FIN
with every byte (test_data_path.py holds that one).
"""

from __future__ import annotations

import secrets
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from .conftest import (
    FRONTEND,
    IO_TIMEOUT,
    PAYMENTS,
    EchoApp,
    Sidecar,
    SidecarFactory,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

MIB = 1024 * 1024
CUT = ("truncated", "peer_reset")  # how a sidecar logs a TLS peer that vanished


@dataclass
class Ending:
    """How one accepted connection ended, as the app saw it."""

    received: int = 0
    end: str | None = None  # "eof" | "reset" | "timeout"
    done: threading.Event = field(default_factory=threading.Event)


class App:
    """A TCP server in a thread. `mode="sink"` reads until the end and records how the
    stream ended; `mode="source"` writes random bytes until the connection fails."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(IO_TIMEOUT)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.ending = Ending()
        self.sent = 0
        self.thread = threading.Thread(target=self._serve, name=f"app-{mode}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(IO_TIMEOUT)
            if self.mode == "sink":
                self._sink(conn)
            else:
                self._source(conn)

    def _sink(self, conn: socket.socket) -> None:
        ending = self.ending
        try:
            while data := conn.recv(65536):
                ending.received += len(data)
            ending.end = "eof"
        except ConnectionResetError:
            ending.end = "reset"
        except TimeoutError:
            ending.end = "timeout"
        finally:
            ending.done.set()

    def _source(self, conn: socket.socket) -> None:
        chunk = secrets.token_bytes(64 * 1024)
        try:
            for _ in range(100_000):  # bounded: ~6 GiB, far past any test's cut
                conn.sendall(chunk)
                self.sent += len(chunk)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()
        self.thread.join(IO_TIMEOUT)


@pytest.fixture
def apps() -> Iterator[Callable[[str], App]]:
    made: list[App] = []

    def start(mode: str) -> App:
        made.append(App(mode))
        return made[-1]

    yield start
    for app in made:
        app.close()


def start_pair(sidecar: SidecarFactory, app_address: str) -> tuple[Sidecar, Sidecar]:
    b = sidecar("b", spiffe_id=PAYMENTS, inbound=[{"name": "in", "forward_to": app_address}])
    a = sidecar("a", spiffe_id=FRONTEND,
                outbound=[{"name": "out", "connect_to": f"127.0.0.1:{b.port('in')}",
                           "expect_ids": [PAYMENTS]}])
    return a, b


def kill9(factory: SidecarFactory, sc: Sidecar) -> None:
    """SIGKILL: the kernel ends its sockets, nobody sends close_notify."""
    proc = sc._proc
    assert proc is not None
    proc.kill()
    proc.wait(IO_TIMEOUT)
    factory.started.remove(sc)  # its exit code is ours, not a failed drain


def read_until_cut(sock: socket.socket) -> tuple[bytes, str]:
    """Read until the stream ends: (what was read, "eof" | "reset")."""
    chunks = []
    try:
        while data := sock.recv(262144):
            chunks.append(data)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    return b"".join(chunks), "eof"


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_server_killed_mid_response_reaches_the_client_as_a_reset(
        sidecar: SidecarFactory, apps: Callable[[str], App]) -> None:
    app = apps("source")
    a, b = start_pair(sidecar, app.address)
    with socket.create_connection(("127.0.0.1", a.port("out")), timeout=IO_TIMEOUT) as sock:
        got = 0
        while got < MIB:  # the response is flowing
            data = sock.recv(65536)
            assert data, "the response ended before the server was killed"
            got += len(data)
        kill9(sidecar, b)
        more, end = read_until_cut(sock)
    assert end == "reset", f"a clean EOF after {got + len(more)} bytes of an endless response"
    line = a.connection(listener="out")
    assert line["close"] in CUT, line


def test_a_caller_killed_mid_upload_reaches_the_app_as_a_reset(
        sidecar: SidecarFactory, apps: Callable[[str], App]) -> None:
    app = apps("sink")
    a, b = start_pair(sidecar, app.address)
    with socket.create_connection(("127.0.0.1", a.port("out")), timeout=IO_TIMEOUT) as sock:
        sock.sendall(secrets.token_bytes(2 * MIB))
        wait_for(lambda: app.ending.received >= MIB, IO_TIMEOUT, "the upload to reach the app")
        kill9(sidecar, a)
        assert app.ending.done.wait(IO_TIMEOUT), "the app never saw the upload end"
    assert app.ending.end == "reset", (
        f"the app read {app.ending.received} bytes and then {app.ending.end}")
    line = b.connection(listener="in")
    assert line["close"] in CUT, line


def test_an_app_reset_reaches_the_other_app_as_a_reset(
        sidecar: SidecarFactory, apps: Callable[[str], App]) -> None:
    app = apps("sink")
    a, b = start_pair(sidecar, app.address)
    sock = socket.create_connection(("127.0.0.1", a.port("out")), timeout=IO_TIMEOUT)
    sock.sendall(b"x" * 1000)
    wait_for(lambda: app.ending.received == 1000, IO_TIMEOUT, "the bytes to reach the app")
    reset(sock)
    assert app.ending.done.wait(IO_TIMEOUT), "the app never saw the stream end"
    assert app.ending.end == "reset", app.ending
    assert a.connection(listener="out")["close"] == "app_reset"
    # B saw a reset, not a close_notify: the caller's app did not end its stream.
    assert b.connection(listener="in")["close"] == "peer_reset"


def test_half_close_works_without_the_openssl_reach(
        sidecar: SidecarFactory, echo_app: Callable[..., EchoApp],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback mode (SIDECAR_NO_OPENSSL_REACH=1, as a future CPython or a
    free-threaded build would run): a half-close crosses both sidecars as close_notify,
    and the answer still comes back in full."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command (a finite-field hello)")
    monkeypatch.setenv("SIDECAR_NO_OPENSSL_REACH", "1")
    app = echo_app(hold=True)  # answers only after the caller's end has come through
    b = sidecar("b", spiffe_id=PAYMENTS, inbound=[{"name": "in", "forward_to": app.address}])
    a = sidecar("a", spiffe_id=FRONTEND,
                outbound=[{"name": "out", "connect_to": f"127.0.0.1:{b.port('in')}",
                           "expect_ids": [PAYMENTS]}])
    for sc in (a, b):  # the switch took effect
        sc.wait_line(lambda ln: "cannot read OpenSSL" in str(ln.get("detail")),
                     what="the fallback to show in the kTLS detection")
    n, size = 20, 64 * 1024
    for i in range(n):
        payload = secrets.token_bytes(size)
        with socket.create_connection(("127.0.0.1", a.port("out")),
                                      timeout=IO_TIMEOUT) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got, end = read_until_cut(sock)
        assert (len(got), end) == (size, "eof"), f"connection {i}: {len(got)} bytes, then {end}"
        assert got == payload
    lines = a.wait_connections(n, listener="out")
    assert {ln["close"] for ln in lines} == {"closed"}, lines
    # Key exchange stays pinned (to one group there): a finite-field hello is refused.
    subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{b.port('in')}",
                    "-groups", "ffdhe2048", "-tls1_3"], input=b"", capture_output=True,
                   timeout=IO_TIMEOUT, check=False)
    refused = b.connection(close="handshake_failed")
    assert "key share" in (refused["detail"] or ""), refused
