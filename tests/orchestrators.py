"""Real pieces for the tests of the proxy's orchestrators (handshake, connection, listener,
inbound, outbound), built in this process: identities from `sidecar.tools.pki` written to files
and loaded by `load_identity`, contexts from `tls.contexts`, a `Runtime` with its `Tracker`,
and TLS peers over real TCP on loopback.

Every way these tests build a sidecar object goes through here, so that a refactor of
how the objects are made (issue 17) is adapted in one place.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tls_pairs import closed_on_exit

from sidecar.authn import Peer
from sidecar.config.schema import Address, InboundListener, Limits, OutboundListener
from sidecar.endpoint import RESET, TRUNCATED, WANT_READ, WANT_WRITE
from sidecar.identity import Identity, load_identity
from sidecar.observe import metrics
from sidecar.outcomes import Direction
from sidecar.policy import Policy
from sidecar.policy.model import DENY_ALL
from sidecar.policy.reader import parse_policy
from sidecar.proxy.connection import Record, Tracker
from sidecar.proxy.handshake import secure
from sidecar.proxy.runtime import Runtime
from sidecar.spiffe import SpiffePattern
from sidecar.tls import contexts
from sidecar.tls.engine import TlsEndpoint
from sidecar.tools import pki
from sidecar.tools.pki import CA

TD = "example.org"
OTHER_TD = "other.org"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/payments"
CLIENT_ID = f"spiffe://{TD}/ns/web/sa/frontend"
BUDGET = 5.0  # seconds any one wait below may take before the test fails
_POLL = 0.005
_names = itertools.count(1)


def fresh_name(prefix: str) -> str:
    """A listener name no other test used: its metric series start at zero."""
    return f"{prefix}-{next(_names)}"


# --- identities -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Trust:
    """Two trust domains' CAs: ours and a federated one."""

    root: CA
    issuer: CA
    other_root: CA
    other_issuer: CA

    @classmethod
    def new(cls) -> Trust:
        root, other = pki.new_root(TD), pki.new_root(OTHER_TD)
        return cls(root, pki.new_intermediate(root), other, pki.new_intermediate(other))


def identity(d: Path, svid: pki.Svid, root: CA, federated: dict[str, CA] | None = None
             ) -> Identity:
    """`svid` with its bundle (and federated bundles) written to `d`, loaded as `run` does."""
    d.mkdir(parents=True, exist_ok=True)
    files = pki.write_svid(d, svid, [root.cert])
    paths = {}
    for td, ca in (federated or {}).items():
        paths[td] = d / f"{td}.pem"
        paths[td].write_bytes(pki.certs_pem([ca.cert]))
    return load_identity(d / files.cert, d / files.key, d / files.bundle, paths)


def client_ctx(ident: Identity) -> ssl.SSLContext:
    """What a peer sidecar offers: our own client context for its identity."""
    return contexts.build(ident).client


def allowing(spiffe_id: str, listener: str) -> Policy:
    return parse_policy(textwrap.dedent(f"""\
        rules:
          - name: let-in
            action: allow
            from: ["{spiffe_id}"]
            to: {{listeners: ["{listener}"]}}
        """), "test-policy.yaml")


# --- the runtime ------------------------------------------------------------------------------


def runtime(ident: Identity, *, policy: Policy = DENY_ALL, limits: Limits | None = None
            ) -> Runtime:
    """A Runtime as `run` assembles it, on the running loop; authn knows our own chain."""
    loop = asyncio.get_running_loop()
    limits = limits or Limits()
    tracker = Tracker(loop, max_connections=limits.max_connections,
                      max_pending_handshakes=limits.max_pending_handshakes,
                      idle_timeout=limits.idle_timeout,
                      max_lifetime=limits.max_connection_lifetime)
    rt = Runtime(loop, contexts.build(ident), policy, limits, tracker)
    rt.authn.learn(ident)
    return rt


def records_of(rt: Runtime) -> list[Record]:
    """The records of the connections `rt` opens from now on, in order. An acceptor opens
    its record inside; the tracker keeps none once a connection ends, so the test keeps
    them by wrapping `open` (the tracker's own method still does all the work)."""
    records: list[Record] = []
    opened = rt.tracker.open

    def open_and_keep(direction: str, listener: str, peer_addr: str) -> Record:
        rec = opened(direction, listener, peer_addr)
        records.append(rec)
        return rec

    rt.tracker.open = open_and_keep  # type: ignore[method-assign]
    return records


def inbound_cfg(name: str, forward_to: int, *, host: str = "127.0.0.1",
                proxy_protocol: bool = False) -> InboundListener:
    """An inbound listener on `host` (an ephemeral port) forwarding to 127.0.0.1:forward_to."""
    return InboundListener(name, Address(host, 0), Address("127.0.0.1", forward_to),
                           proxy_protocol=proxy_protocol)


def outbound_cfg(name: str, connect_to: int, expect: tuple[str, ...]) -> OutboundListener:
    return OutboundListener(name, Address("127.0.0.1", 0), Address("127.0.0.1", connect_to),
                            "", tuple(SpiffePattern.parse(e, prefixes=False) for e in expect))


def sample(name: str, **labels: str) -> float:
    """A metric's value (0 for a series never written)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def handshakes(direction: str, listener: str, result: str, resumed: bool) -> float:
    return sample("sidecar_handshakes_total", direction=direction, listener=listener,
                  result=result, resumed="true" if resumed else "false")


def handshake_errors(direction: str, listener: str, reason: str) -> float:
    return sample("sidecar_handshake_errors_total", direction=direction, listener=listener,
                  reason=reason)


# --- waiting ----------------------------------------------------------------------------------


async def until(cond: Callable[[], object], what: str, budget: float = BUDGET) -> None:
    """Wait for `cond()` to hold, looking every few milliseconds, at most `budget` s."""
    try:
        async with asyncio.timeout(budget):
            while not cond():
                await asyncio.sleep(_POLL)
    except TimeoutError:
        raise AssertionError(f"waited {budget:g}s for {what}") from None


# --- sockets and TLS peers --------------------------------------------------------------------


Held = list[Any]  # what a test opened: sockets and endpoints, closed when it ends


async def holding(body: Callable[[Held], Awaitable[None]]) -> None:
    """Run `body` with a list for what it opens; each item is closed when it returns,
    while the loop still runs."""
    held: Held
    with closed_on_exit() as held:
        await body(held)


def tcp(held: Held, *, rcvbuf: int | None = None,
        sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A TCP connection over loopback (near, far), both non-blocking; `rcvbuf` sizes
    near's receive buffer and `sndbuf` far's send buffer (set before connecting)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        if sndbuf is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        near = socket.socket()
        held.append(near)
        if rcvbuf is not None:
            near.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        near.connect(listener.getsockname())
        far, _ = listener.accept()
        held.append(far)
    near.setblocking(False)
    far.setblocking(False)
    return near, far


async def read_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, want: int = 1 << 20
                   ) -> bytes:
    """What `sock` receives until its end of stream (or `want` bytes)."""
    got = b""
    while len(got) < want and (data := await loop.sock_recv(sock, 65536)):
        got += data
    return got


class Truncated(EOFError):
    """The TLS peer's stream ended without close_notify."""


async def tls_read(ep: TlsEndpoint) -> bytes:
    """One read from a TLS endpoint: the bytes, b"" at a close_notify; raises Truncated at
    a bare end, ConnectionResetError at a reset, the TLS error (an alert) otherwise."""
    buf = memoryview(bytearray(64 * 1024))
    while True:
        n = ep.read_into(buf)
        if n >= 0:
            return bytes(buf[:n])
        if n == TRUNCATED:
            raise Truncated("the stream ended without close_notify")
        if n == RESET:
            raise ConnectionResetError("the peer reset the connection")
        await _ready(ep.fd, write=n == WANT_WRITE)


async def tls_write(ep: TlsEndpoint, data: bytes) -> None:
    while data:
        n = ep.write(data)
        if n in (WANT_READ, WANT_WRITE):
            await _ready(ep.fd, write=n == WANT_WRITE)
            continue
        data = data[n:]


async def _ready(fd: int, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    add, remove = ((loop.add_writer, loop.remove_writer) if write
                   else (loop.add_reader, loop.remove_reader))
    def fire() -> None:
        if not fut.done():
            fut.set_result(None)

    add(fd, fire)
    try:
        await fut
    finally:
        remove(fd)


async def peer_says(ep: TlsEndpoint) -> BaseException | bytes:
    """A TLS peer's handshake and first read: the bytes, or the error that ended it (a
    TLS 1.3 client learns of its refusal only when it reads)."""
    try:
        await ep.handshake()
        return await tls_read(ep)
    except (OSError, ValueError, EOFError) as exc:
        return exc


@dataclass(slots=True)
class Accepted:
    """Our server side of one TCP connection, in `handshake.secure`."""

    rec: Record
    ep: TlsEndpoint
    task: asyncio.Task[Peer | None]


def accept(rt: Runtime, far: socket.socket, listener: str) -> Accepted:
    """Start `secure` on our end of a connection, as an inbound accept does."""
    rec = rt.tracker.open(Direction.INBOUND, listener, "test")
    ep = TlsEndpoint.server(rt.contexts.server, far)
    task = rt.loop.create_task(secure(rt, rec, ep, rt.contexts.identity))
    return Accepted(rec, ep, task)


def tls_peer(held: Held, near: socket.socket, ctx: ssl.SSLContext,
             session: ssl.SSLSession | None = None, server_name: str | None = None
             ) -> TlsEndpoint:
    ep = TlsEndpoint.client(ctx, near, server_name, session)
    held.append(ep)
    return ep
