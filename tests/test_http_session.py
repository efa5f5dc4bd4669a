"""An http listener's session (sidecar/proxy/http.py) against apps that misbehave in ways
a well-behaved HTTP app (tests/http_app.py) never does: real sockets on 127.0.0.1, the
caller on a plain socket pair (the session takes any endpoint; TLS is the e2e tests'),
the app a raw server sending the bytes each test gives it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from sidecar.config import Address, InboundListener, Limits
from sidecar.endpoint import TcpEndpoint
from sidecar.outcomes import Close, Direction
from sidecar.policy import Policy, parse_policy
from sidecar.proxy.connection import Tracker
from sidecar.proxy.http import H2_PREFACE_REFUSAL, KEPT_HEAD_BYTES, Session
from sidecar.proxy.runtime import Runtime
from sidecar.spiffe import SpiffeId

pytestmark = pytest.mark.timeout(30)

POLICY = parse_policy("""
default: deny
rules:
  - {name: all, action: allow, from: ["spiffe://example.org/*"]}
""", "policy.yaml")
XFCC = b"x-forwarded-client-cert: By=spiffe://example.org/b;Hash=00;URI=spiffe://example.org/a\r\n"
GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"

App = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Rig:
    caller: socket.socket
    session: Session
    tracker: Tracker
    closed: asyncio.Event

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.caller, data)

    async def read_until_closed(self) -> bytes:
        loop = asyncio.get_running_loop()
        out = b""
        while data := await loop.sock_recv(self.caller, 65536):
            out += data
        return out

    async def read_response(self) -> bytes:
        loop = asyncio.get_running_loop()
        out = b""
        while b"\r\n\r\n" not in out:
            data = await loop.sock_recv(self.caller, 65536)
            assert data, out
            out += data
        head = out.split(b"\r\n\r\n")[0].lower()
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(out) < len(head) + 4 + length:
            out += await loop.sock_recv(self.caller, 65536)
        return out


@asynccontextmanager
async def rig(app: App, limits: Limits | None = None,
              policy: Policy = POLICY) -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tracker = Tracker(loop, max_connections=10, max_pending_handshakes=10, idle_timeout=300,
                      max_lifetime=0)
    closed = asyncio.Event()
    tracker.on_empty = closed.set
    rt = Runtime(loop, None, policy, limits or Limits(), tracker)  # type: ignore[arg-type]
    cfg = InboundListener("api", Address("127.0.0.1", 0), Address("127.0.0.1", port))
    ours, caller = socket.socketpair()
    ours.setblocking(False)
    caller.setblocking(False)
    rec = tracker.open(Direction.INBOUND, "api", "caller")
    session = Session(rt, cfg, rec, TcpEndpoint(ours), SpiffeId.parse(
        "spiffe://example.org/a"), XFCC, tracker.closed)
    tracker.attach(rec, session)
    session.start()
    try:
        yield Rig(caller, session, tracker, closed)
    finally:
        if not session.closed:
            session.abort(Close.SHUTDOWN)
        caller.close()
        server.close()
        server.close_clients()


def answering(*responses: bytes, then_close: bool = False) -> App:
    """An app that reads each request head and answers with the next of `responses`."""
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for data in responses:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            writer.write(data)
            await writer.drain()
        if then_close:
            writer.close()
            return
        await reader.read()  # until the sidecar closes
        writer.close()
    return app


async def test_a_malformed_response_is_a_502_and_nothing_of_it_reaches_the_caller() -> None:
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    async with rig(answering(bad)) as r:
        await r.send(GET)
        got = await r.read_until_closed()
        assert got.startswith(b"HTTP/1.1 502 ") and b"x-sidecar-answer: upstream_unavailable" in got
        assert b"Transfer-Encoding" not in got


async def test_a_body_for_head_is_a_502() -> None:
    async with rig(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as r:
        await r.send(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await r.read_until_closed()).startswith(b"HTTP/1.1 502 ")


async def test_an_app_response_head_over_the_limit_is_a_502() -> None:
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 0\r\n\r\n"
    async with rig(answering(big), Limits(max_request_head_bytes=4096)) as r:
        await r.send(GET)
        assert (await r.read_until_closed()).startswith(b"HTTP/1.1 502 ")


async def test_a_close_delimited_response_ends_with_the_apps_close() -> None:
    async with rig(answering(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", then_close=True)) as r:
        await r.send(GET)
        assert await r.read_until_closed() == b"HTTP/1.1 200 OK\r\n\r\nuntil the end"


async def test_an_early_answer_to_an_unfinished_request_ends_the_connection() -> None:
    async with rig(answering(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")) as r:
        await r.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\nfirst bytes")
        got = await r.read_until_closed()
        assert got.startswith(b"HTTP/1.1 413 Too Large\r\n")


async def test_bytes_from_an_idle_app_drop_its_connection_not_the_callers() -> None:
    connections = 0
    answered = asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if connections == 1:
            await answered.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")  # unasked
            await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    async with rig(app) as r:
        await r.send(GET)
        first = await r.read_response()
        assert first.endswith(b"ok")
        answered.set()
        await asyncio.wait_for(_until(lambda: r.session.app is None), 5)
        await r.send(GET)
        second = await r.read_response()
        assert second.endswith(b"ok") and b"extra" not in first + second
        assert connections == 2


async def _until(condition: Callable[[], bool]) -> None:
    """Wait, a loop turn at a time, until `condition` holds (state of the session's own,
    with no event to wait on)."""
    while not condition():
        await asyncio.sleep(0.001)


async def test_a_second_response_in_one_read_breaks_the_connection() -> None:
    """An app that writes past its response in the same read: where its response ended
    cannot be told, so nothing of that read is relayed and the connection is cut."""
    two = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
           b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")
    async with rig(answering(two)) as r:
        await r.send(GET)
        assert b"extra" not in await r.read_until_closed()
        await asyncio.wait_for(r.closed.wait(), 5)


async def test_a_lifetime_end_closes_an_idle_connection_now() -> None:
    async with rig(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as r:
        await r.send(GET)
        assert (await r.read_response()).endswith(b"ok")
        r.session.finish(client_is_peer=True)
        assert await r.read_until_closed() == b""
        await asyncio.wait_for(r.closed.wait(), 5)


async def test_a_lifetime_end_in_a_request_says_connection_close_on_its_response() -> None:
    release, arrived = asyncio.Event(), asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()
        writer.close()

    async with rig(app) as r:
        await r.send(GET)
        await asyncio.wait_for(arrived.wait(), 5)  # the request is at the app
        r.session.finish(client_is_peer=True)
        release.set()
        got = await r.read_until_closed()
        assert got == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def test_a_request_refused_while_the_app_is_dialed_never_reaches_it() -> None:
    """A chunked POST whose body is malformed in the read that brought its head: the head
    was allowed and the app is being dialed when the 400 goes out. The connection that
    dial makes must carry nothing: the caller was told the request was refused."""
    got: list[bytes] = []
    ended = asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                got.append(data)
        except ConnectionError:
            pass
        finally:
            ended.set()
            writer.close()

    async with rig(app) as r:
        await r.send(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        assert (await r.read_until_closed()).startswith(b"HTTP/1.1 400 ")
        r.caller.close()  # the session's lingering read ends: it closes the app's side too
        await asyncio.wait_for(ended.wait(), 5)
    assert got == []


def recording(responses: list[bytes], heads: list[bytes]) -> App:
    """An app that keeps each request head it reads (in `heads`) and answers it with the
    next of `responses`, bodiless requests only."""
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for data in responses:
            try:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()
    return app


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_a_head_sent_again_is_forwarded_again_and_a_changed_one_judged_anew() -> None:
    """A head the same as the last one is not examined again (http.py keeps the last):
    one that differs in any field or in its line is."""
    heads: list[bytes] = []
    async with rig(recording([OK] * 5, heads)) as r:
        for data in (b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n",
                     b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n",
                     b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 2\r\n\r\n",
                     b"GET /y/../z HTTP/1.1\r\nHost: a\r\nX-A: 2\r\n\r\n"):
            await r.send(data)
            assert (await r.read_response()).endswith(b"ok")
        await r.send(b"GET /y/../z HTTP/1.1\r\nHost: a\r\nX-A: 2\r\nConnection: close\r\n\r\n")
        assert (await r.read_until_closed()).endswith(b"ok")
    assert heads == [b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n" + XFCC + b"\r\n"] * 2 + [
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 2\r\n" + XFCC + b"\r\n",
        b"GET /z HTTP/1.1\r\nHost: a\r\nX-A: 2\r\n" + XFCC + b"\r\n",
        b"GET /z HTTP/1.1\r\nHost: a\r\nX-A: 2\r\nConnection: close\r\n" + XFCC + b"\r\n"]


async def test_a_refused_head_after_an_allowed_one_is_refused() -> None:
    heads: list[bytes] = []
    async with rig(recording([OK] * 2, heads)) as r:
        await r.send(GET)
        assert (await r.read_response()).endswith(b"ok")
        await r.send(b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        assert (await r.read_until_closed()).startswith(b"HTTP/1.1 400 ")
    assert len(heads) == 1


async def test_a_response_head_sent_again_is_relayed_again_and_a_changed_one_judged_anew(
) -> None:
    """The same for the app's response heads: the third here closes the connection."""
    close = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    heads: list[bytes] = []
    async with rig(recording([OK, OK, close], heads)) as r:
        for _ in range(2):
            await r.send(GET)
            assert await r.read_response() == OK
        await r.send(GET)
        assert await r.read_until_closed() == close
        await asyncio.wait_for(r.closed.wait(), 5)


async def test_a_large_head_is_not_kept_after_its_exchange() -> None:
    """A held connection keeps its last heads only up to KEPT_HEAD_BYTES (memory)."""
    big = (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * KEPT_HEAD_BYTES
           + b"\r\nContent-Length: 2\r\n\r\nok")
    heads: list[bytes] = []
    async with rig(recording([OK, big], heads)) as r:
        await r.send(GET)
        assert await r.read_response() == OK
        assert r.session._last_key is not None and r.session._last_resp_key is not None
        await r.send(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * KEPT_HEAD_BYTES
                     + b"\r\n\r\n")
        assert await r.read_response() == big
        assert r.session._last_key[3] == b"/x" and r.session._last_key[4] == [
            b"Host", b": ", b"a", b"\r\n"]  # still the first request's
        assert r.session._last_resp_key[0] == OK[:-2]


@pytest.mark.parametrize("dropped", [
    b"X-Forwarded-Client-Cert: " + b"f" * (2 * KEPT_HEAD_BYTES),  # forged: ours replaces it
    b"Keep-Alive: " + b"k" * (2 * KEPT_HEAD_BYTES),  # hop-by-hop
    b"Connection: x-big\r\nX-Big: " + b"b" * (2 * KEPT_HEAD_BYTES),  # named by Connection
])
async def test_a_large_head_whose_large_fields_are_not_forwarded_is_not_kept(
        dropped: bytes) -> None:
    """The bound holds for what the session keeps to compare (the caller's field lines),
    not only for what it forwards: fields the app never receives count too."""
    heads: list[bytes] = []
    async with rig(recording([OK, OK], heads)) as r:
        await r.send(GET)
        assert await r.read_response() == OK
        await r.send(b"GET /x HTTP/1.1\r\nHost: a\r\n" + dropped + b"\r\n\r\n")
        assert await r.read_response() == OK
        assert len(heads[1]) < KEPT_HEAD_BYTES  # forwarded without them
        key = r.session._last_key
        assert key is not None
        assert sum(map(len, key[4])) <= KEPT_HEAD_BYTES  # still the first request's


class _Registrations:
    """An event loop's registration calls, in order (the only part of a loop _update
    uses), so that two ways of updating can be compared call for call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def add_reader(self, fd: int, _cb: object) -> None:
        self.calls.append(("add_reader", fd))

    def add_writer(self, fd: int, _cb: object) -> None:
        self.calls.append(("add_writer", fd))

    def remove_reader(self, fd: int) -> None:
        self.calls.append(("remove_reader", fd))

    def remove_writer(self, fd: int) -> None:
        self.calls.append(("remove_writer", fd))

    def call_soon(self, cb: object) -> None:
        self.calls.append(("call_soon", 0))


def _session_in(state: tuple[object, ...]) -> tuple[Session, _Registrations]:
    (shutting, linger, paused, no_more, pend_app, pend_peer, tunnel, has_app, held, rwait,
     wwait, reg) = state
    s = object.__new__(Session)
    loop = _Registrations()
    s._loop = loop  # type: ignore[assignment]
    s._done = False
    s._shutting = bool(shutting)
    s._linger_timer = object() if linger else None  # type: ignore[assignment]
    s._peer_paused = bool(paused)
    s._no_more = bool(no_more)
    s._pend_app = b"x" if pend_app else None
    s._pend_peer = b"x" if pend_peer else None
    s._tunnel = bool(tunnel)
    s.app = SimpleNamespace(fd=5) if has_app else None  # type: ignore[assignment]
    s.peer = SimpleNamespace(fd=6)  # type: ignore[assignment]
    s._dialing = held == "dialing"
    s.queue = deque([object(), object()] if held == "queued" else [])  # type: ignore[list-item]
    s._peer_rwait = rwait  # type: ignore[assignment]
    s._peer_wwait = wwait  # type: ignore[assignment]
    s._reg = list(reg)  # type: ignore[arg-type]
    return s, loop


def test_the_steady_state_shortcut_of_update_changes_nothing_the_full_update_would() -> None:
    """_update returns early in the usual state; in every state (each input _update reads,
    every registration), it must register exactly as _register_for does."""
    from sidecar.endpoint import WANT_READ, WANT_WRITE

    flags = (False, True)
    states = itertools.product(
        flags, flags, flags, flags, flags, flags, flags, flags, ("none", "dialing", "queued"),
        (0, WANT_READ, WANT_WRITE), (0, WANT_READ, WANT_WRITE),
        itertools.product(flags, flags, flags, flags))
    compared = quiet = 0
    for state in states:
        short, short_loop = _session_in(state)
        full, full_loop = _session_in(state)
        short._update()
        full._register_for()
        assert (short_loop.calls, short._reg, short._peer_paused) == \
            (full_loop.calls, full._reg, full._peer_paused), state
        compared += 1
        quiet += not full_loop.calls
    assert compared == 2 ** 8 * 3 * 3 * 3 * 16
    assert quiet  # some states need no change: the ones the shortcut is for among them


ONLY_OK = parse_policy("""
default: deny
rules:
  - {name: ok, action: allow, from: ["spiffe://example.org/*"], to: {paths: ["/ok"]}}
""", "policy.yaml")


async def test_a_denied_websocket_upgrade_is_answered_and_the_connection_closed() -> None:
    """llhttp reads nothing after an upgrade request, so a denied one cannot leave the
    connection open: its 403 says close, and the connection ends (a next request sent on
    it would otherwise wait, unread, until the idle timeout)."""
    heads: list[bytes] = []
    async with rig(recording([OK], heads), policy=ONLY_OK) as r:
        await r.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\n")
        got = await asyncio.wait_for(r.read_until_closed(), 5)
        assert got.startswith(b"HTTP/1.1 403 ") and b"connection: close\r\n" in got
        await asyncio.wait_for(r.closed.wait(), 5)
    assert heads == []


def _cut_after(data: bytes, *, reset: bool) -> App:
    """An app that reads a request head, writes `data` (a response begun, not ended),
    then resets its connection (or closes it)."""
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(data)
        await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
    return app


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "closed"])
async def test_an_app_cut_in_the_middle_of_its_response_is_said_as_it_happened(
        reset: bool) -> None:
    """The caller's connection ends (it has half a response), and the connection's log
    says whether the app reset its connection or closed it."""
    begun = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart"
    async with rig(_cut_after(begun, reset=reset)) as r:
        await r.send(GET)
        got = await r.read_until_closed()
        assert got == begun
        await asyncio.wait_for(r.closed.wait(), 5)
        word = "reset" if reset else "closed"
        assert r.session.rec.detail == \
            f"the app {word} the connection in the middle of its response"


async def test_a_request_pipelined_behind_an_http10_one_is_not_served() -> None:
    """An HTTP/1.0 request without keep-alive ends its connection after its response
    (docs/configuration.md): a second request sent in the same read behind it is neither
    forwarded nor answered, as after a `Connection: close` one, also when the app closes
    its connection after the response as the `Connection: close` sent to it asks (llhttp
    itself stops reading only after a request that says close, so the session must)."""
    heads: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(OK)
            await writer.drain()
        writer.close()

    async with rig(app) as r:
        await r.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                     b"GET /b HTTP/1.0\r\n\r\n")
        got = await asyncio.wait_for(r.read_until_closed(), 5)
        await asyncio.wait_for(r.closed.wait(), 5)
    assert got.count(b"HTTP/1.1 200 ") == 1, got
    assert [h.split(b"\r\n")[0] for h in heads] == [b"GET /a HTTP/1.0"]


async def test_an_http2_preface_is_refused_saying_so() -> None:
    """A client speaking h2 with prior knowledge and no ALPN (curl --http2-prior-knowledge
    over a plain TCP hop, gRPC without TLS ALPN) gets a 400 that says HTTP/2 is not spoken
    here, not llhttp's internal "Pause on PRI/Upgrade"."""
    heads: list[bytes] = []
    async with rig(recording([OK], heads)) as r:
        await r.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        got = await asyncio.wait_for(r.read_until_closed(), 5)
        await asyncio.wait_for(r.closed.wait(), 5)
    assert got.startswith(b"HTTP/1.1 400 "), got
    assert H2_PREFACE_REFUSAL.encode() in got and b"Pause" not in got
    assert heads == []
