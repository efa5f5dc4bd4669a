"""`inbound[].proxy_protocol: true` through a real `sidecar run`, read by readers nobody
here wrote:

    caller --mTLS--> B (inbound, proxy_protocol) --PROXY v2 + bytes--> reader --> echo

- HAProxy, `bind ... accept-proxy` in mode tcp: it refuses a connection whose first bytes
  are not a well-formed header, checks every TLV's length, and logs what it took from
  the header: the source (%ci/%cp), the destination (%fi/%fp), fc_pp_authority and
  fc_pp_unique_id (HAProxy 2.6, Debian 12's, has no fetch for other TLVs: those are
  read by the parser below).
- The `proxy-protocol` package from PyPI, in an echo app that reads the header with its
  asyncio reader and echoes what follows: the echo is the payload exactly only if the
  header came first and once.

HAProxy missing: skipped, unless CI is set (.ci/run installs Debian's haproxy package).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from loop_app import LoopApp
from proxyprotocol.reader import ProxyProtocolReader
from proxyprotocol.result import ProxyResult
from proxyprotocol.v2 import ProxyProtocolV2

from .conftest import (
    BATCH,
    FRONTEND,
    IO_TIMEOUT,
    LINE_TIMEOUT,
    PAYMENTS,
    EchoApp,
    Sidecar,
    SidecarFactory,
    TlsClient,
    plain_roundtrip,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SNI = "payments.default.svc"
HAPROXY_STOP = 10.0


# --- a caller ----------------------------------------------------------------------------


@dataclass
class Call:
    local: tuple[str, int]  # the caller's address and port, as B saw them
    echoed: bytes

    @property
    def peer_addr(self) -> str:
        """As B's access log writes it."""
        host, port = self.local
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def call(host: str, port: int, ctx: ssl.SSLContext, payload: bytes,
         sni: str | None = None) -> Call:
    """mTLS to B: send `payload`, read as many bytes back (or to the end)."""
    raw = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    local = raw.getsockname()[:2]
    got = b""
    with ctx.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(payload)
        with contextlib.suppress(OSError):  # a refused caller reads an end or an alert
            while len(got) < len(payload) and (data := tls.recv(65536)):
                got += data
    return Call((local[0], local[1]), got)


def b_with(sidecar: SidecarFactory, forward_to: str, *, listen: str = "127.0.0.1:0",
           proxy_protocol: bool = True) -> Sidecar:
    return sidecar("b", inbound=[{"name": "in", "listen": listen, "forward_to": forward_to,
                                  "proxy_protocol": proxy_protocol}])


# --- HAProxy with accept-proxy -------------------------------------------------------------

LOG_FORMAT = ("pp rcvd=%[fc_rcvd_proxy] src=%ci sport=%cp dst=%fi dport=%fp "
              "authority=%[fc_pp_authority] unique_id=%[fc_pp_unique_id] bytes_in=%U")


@dataclass
class HAProxy:
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def lines(self) -> list[dict[str, str]]:
        """The connections HAProxy logged, each as its key=value fields."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("pp "):
                out.append(dict(f.split("=", 1) for f in line.split()[1:]))
        return out

    def line_for(self, sport: int) -> dict[str, str]:
        def logged() -> bool:
            return any(ln["sport"] == str(sport) for ln in self.lines())
        wait_for(logged, LINE_TIMEOUT, f"HAProxy's log line of source port {sport}; its log:\n"
                 f"{self.log.read_text(errors='replace')[-2000:]}")
        return next(ln for ln in self.lines() if ln["sport"] == str(sport))


def _haproxy_binary() -> str:
    found = shutil.which("haproxy")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed; .ci/run installs Debian's haproxy package")
        pytest.skip("haproxy not installed (apt-get install haproxy); CI runs this")
    return found


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[str], HAProxy]]:
    """Factory: an HAProxy taking PROXY v2 on an ephemeral port (a socket this test
    binds and hands over, so no port can be taken in between) and forwarding to
    `backend`; logs one line per connection. Stopped when the test ends."""
    binary = _haproxy_binary()
    started: list[HAProxy] = []

    def start(backend: str) -> HAProxy:
        n = len(started)
        listener = socket.create_server(("127.0.0.1", 0))
        config = tmp_path / f"haproxy-{n}.cfg"
        config.write_text(f"""\
global
    log stdout format raw local0 info
    nbthread 1
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend from_sidecar
    bind fd@{listener.fileno()} accept-proxy
    log-format "{LOG_FORMAT}"
    default_backend app
backend app
    server echo {backend}
""")
        log = tmp_path / f"haproxy-{n}.log"
        with log.open("wb") as out, listener:
            proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    pass_fds=[listener.fileno()])
            ha = HAProxy(listener.getsockname()[1], log, proc)
        started.append(ha)
        if proc.poll() is not None:
            pytest.fail(f"haproxy exited at once:\n{log.read_text()}")
        return ha

    yield start
    for ha in started:
        ha.proc.terminate()
        try:
            ha.proc.wait(HAPROXY_STOP)
        except subprocess.TimeoutExpired:
            ha.proc.kill()
            ha.proc.wait(HAPROXY_STOP)


def test_haproxy_takes_the_callers_address_and_the_sni_from_the_header(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp],
    haproxy: Callable[[str], HAProxy], tls_client: TlsClient,
) -> None:
    ha = haproxy(echo_app().address)
    b = b_with(sidecar, ha.address)
    payload = secrets.token_bytes(4096)

    got = call("127.0.0.1", b.port("in"), tls_client.context(tls_client.ca.svid(FRONTEND)),
               payload, sni=SNI)

    assert got.echoed == payload  # HAProxy accepted the header and passed the bytes on
    seen = ha.line_for(got.local[1])
    line = b.connection(peer_addr=got.peer_addr)
    assert seen == {
        "rcvd": "1", "src": "127.0.0.1", "sport": str(got.local[1]),
        "dst": "127.0.0.1", "dport": str(b.port("in")),
        "authority": SNI, "unique_id": line["id"], "bytes_in": str(len(payload)),
    }
    assert line["bytes_to_app"] == len(payload)  # the peer's bytes; the header is ours


def test_haproxy_reads_an_ipv6_caller_without_sni(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp],
    haproxy: Callable[[str], HAProxy], tls_client: TlsClient,
) -> None:
    ha = haproxy(echo_app().address)
    b = b_with(sidecar, ha.address, listen="[::1]:0")

    got = call("::1", b.port("in"), tls_client.context(tls_client.ca.svid(FRONTEND)), b"six")

    assert got.echoed == b"six"
    seen = ha.line_for(got.local[1])
    assert (seen["src"], seen["dst"], seen["dport"]) == ("::1", "::1", str(b.port("in")))
    assert seen["authority"] == "-"  # HAProxy's word for a fetch with nothing to return
    assert seen["unique_id"] == b.connection(peer_addr=got.peer_addr)["id"]


# --- the proxy-protocol package from PyPI ------------------------------------------------------


@dataclass
class Received:
    header: ProxyResult | None  # None: the app did not look for one
    first: bytes  # the first bytes after the header (or of the stream)


@dataclass
class ProxyEchoApp(LoopApp):
    """An asyncio echo app in a thread that first reads a PROXY header with the PyPI
    package's reader (`header=True`), then echoes what follows; records both."""

    header: bool = True
    received: list[Received] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._prepare("proxy-echo-app")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            result = (await ProxyProtocolReader(ProxyProtocolV2()).read(reader)
                      if self.header else None)
            first = await reader.read(65536)
            with self._lock:
                self.received.append(Received(result, first))
            while first:
                writer.write(first)
                await writer.drain()
                first = await reader.read(65536)
        except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError):
            pass  # a bad header or a cut: the caller sees no echo
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


@pytest.fixture
def proxy_echo_app() -> Iterator[Callable[..., ProxyEchoApp]]:
    apps: list[ProxyEchoApp] = []

    def start(**kwargs: bool) -> ProxyEchoApp:
        app = ProxyEchoApp(**kwargs)
        apps.append(app)
        return app.start()

    yield start
    for app in apps:
        app.close()


def test_the_pypi_parser_reads_the_header_then_exactly_the_callers_bytes(
    sidecar: SidecarFactory, proxy_echo_app: Callable[..., ProxyEchoApp],
    tls_client: TlsClient,
) -> None:
    app = proxy_echo_app()
    b = b_with(sidecar, app.address)
    payload = secrets.token_bytes(1000)

    got = call("127.0.0.1", b.port("in"), tls_client.context(tls_client.ca.svid(FRONTEND)),
               payload, sni=SNI)

    assert got.echoed == payload  # the header came first, once: nothing else was echoed
    line = b.connection(peer_addr=got.peer_addr)
    [received] = app.received
    assert received.first == payload[:len(received.first)]
    header = received.header
    assert header is not None
    assert header.source == (ipaddress.IPv4Address("127.0.0.1"), got.local[1])
    assert header.dest == (ipaddress.IPv4Address("127.0.0.1"), b.port("in"))
    tlv = header.tlv
    assert tlv[0xE0] == FRONTEND.encode()
    assert tlv.authority == SNI
    assert tlv.alpn is None  # the inbound listener negotiates no ALPN
    assert tlv.unique_id == line["id"].encode()
    ssl_tlv = tlv.ssl
    assert (ssl_tlv.has_ssl, ssl_tlv.has_cert_conn, ssl_tlv.has_cert_sess, ssl_tlv.verify) == (
        True, True, True, 0)
    assert (ssl_tlv.version, ssl_tlv.cipher) == (line["tls_version"], line["cipher"])
    assert ssl_tlv.cn is None


def test_through_a_callers_sidecar_the_app_learns_its_spiffe_id_and_server_name(
    sidecar: SidecarFactory, proxy_echo_app: Callable[..., ProxyEchoApp],
) -> None:
    # The mesh's own path: plaintext -> A (outbound, FRONTEND) ==mTLS==> B -> the app.
    app = proxy_echo_app()
    b = b_with(sidecar, app.address)
    a = sidecar("a", spiffe_id=FRONTEND, outbound=[{
        "name": "out", "connect_to": f"127.0.0.1:{b.port('in')}", "server_name": SNI,
        "expect_ids": [PAYMENTS]}])
    payload = secrets.token_bytes(2000)

    r = plain_roundtrip(a.port("out"), payload)

    assert r.received == payload
    [line] = b.wait_connections(1, listener="in")
    [received] = app.received
    header = received.header
    assert header is not None
    host, _, port = line["peer_addr"].rpartition(":")
    assert header.source == (ipaddress.ip_address(host), int(port))  # A's socket
    assert header.tlv[0xE0] == FRONTEND.encode()
    assert header.tlv.authority == SNI  # A's outbound[].server_name
    assert header.tlv.unique_id == line["id"].encode()


def test_without_proxy_protocol_the_app_reads_the_callers_bytes_first(
    sidecar: SidecarFactory, proxy_echo_app: Callable[..., ProxyEchoApp],
    tls_client: TlsClient,
) -> None:
    app = proxy_echo_app(header=False)
    b = b_with(sidecar, app.address, proxy_protocol=False)
    payload = b"GET / HTTP/1.1\r\n\r\n"

    got = call("127.0.0.1", b.port("in"), tls_client.context(tls_client.ca.svid(FRONTEND)),
               payload, sni=SNI)

    assert got.echoed == payload
    [received] = app.received
    assert received.first == payload[:len(received.first)]


def test_a_denied_caller_never_reaches_the_app(
    sidecar: SidecarFactory, proxy_echo_app: Callable[..., ProxyEchoApp],
    tls_client: TlsClient,
) -> None:
    app = proxy_echo_app()
    b = b_with(sidecar, app.address)

    denied = call("127.0.0.1", b.port("in"), tls_client.context(tls_client.ca.svid(BATCH)),
                  b"let me in")
    assert b.connection(peer_addr=denied.peer_addr)["close"] == "denied"
    allowed = call("127.0.0.1", b.port("in"), tls_client.context(tls_client.ca.svid(FRONTEND)),
                   b"after")

    assert (denied.echoed, allowed.echoed) == (b"", b"after")
    b.connection(peer_addr=allowed.peer_addr)
    # The app heard of one connection, the allowed one, which came after the denied one.
    [received] = app.received
    assert received.header is not None and received.header.source[1] == allowed.local[1]
