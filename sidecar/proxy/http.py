"""An http listener's connection: HTTP/1.1 parsed both ways, the policy asked per request.

After the handshake and authentication (inbound.py), the connection is a `Session`: the
caller's bytes go through an llhttp request parser (httptools), the app's through a
response parser, and the decisions are sidecar/http1's. The app is dialed at the first
allowed request, so a caller that is only ever denied never reaches it.

One exchange at a time. Requests are answered in order: a request goes to the app only
once the response before it has been relayed whole, so pipelined requests wait, parsed,
in `queue` (and the caller is not read while one waits). Within an exchange both
directions stream: the request body goes to the app as it arrives (Content-Length bytes
as they are, chunked re-chunked: llhttp hands over decoded data), and the response comes
back the same way, `Expect: 100-continue` and other 1xx included, so neither body is
ever held whole. A request is decided when its head is complete: allowed, its head goes
to the app with the normalized path and our `x-forwarded-client-cert`; denied, the
caller gets a 403 and the connection stays open, unless the request has a body (we would
have to read and drop it), asked for an upgrade (llhttp reads nothing after one) or the
caller asked to close. A malformed request gets a 400 and the connection closes after it
(the parser cannot find the next request in what follows). After a 101 to a WebSocket
upgrade the connection is handed over to the byte pump (pump.Duplex), as a tcp
listener's is.

Callbacks, not a coroutine, as in pump.py: a held keep-alive connection costs no task,
and a request costs a few loop callbacks. Parser callbacks only append to `_out_app` /
`_out_peer`; each event handler writes what gathered in one call per side at its end
(`_flush`), so a small request is one write to the app and a small response one TLS
record to the caller. What a side cannot take stays in `_pend_app` / `_pend_peer`, and
the side that feeds it is not read until it drains: at most about one read (64 KiB) is
ever held per direction.

Every request gets one access-log line (msg "request") and is counted in
`sidecar_http_requests_total`, `sidecar_http_request_duration_seconds` and the policy's
`sidecar_authz_decisions_total` (batched: metrics.RequestTally); the connection keeps
its own line.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httptools

from sidecar.config import InboundListener
from sidecar.endpoint import RESET, WANT_READ, WANT_WRITE, Endpoint, Send, TcpEndpoint
from sidecar.http1 import answers, request, response, xfcc
from sidecar.http1.answers import Answer
from sidecar.http1.request import Framing, RequestHead
from sidecar.http1.response import ResponseHead
from sidecar.observe import logs, metrics
from sidecar.outcomes import NO_DECISION, Close, DecisionKind, Direction
from sidecar.policy import Decision, Policy, RequestRules
from sidecar.proxy.connection import Record
from sidecar.proxy.listener import dial
from sidecar.proxy.pump import CHUNK, ROUNDS_PER_TURN, Duplex, _unsent
from sidecar.proxy.runtime import Runtime
from sidecar.reasons import Reason
from sidecar.spiffe import SpiffeId
from sidecar.tls.engine import _READ_ROOM, TlsEndpoint

_buffer = memoryview(bytearray(CHUNK))  # one read at a time, shared by every session

# After our last answer, how long and how much of what the caller still sends is read
# and dropped before the close, so that a close with unread bytes does not become a
# reset that destroys the answer before the caller reads it (Apache's lingering close).
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024
_CHUNK_END = b"0\r\n\r\n"
# A head up to this size is kept after its exchange, to be compared with the next
# (`_last_key`, `_last_resp_key`): a held connection keeps at most about this much more.
KEPT_HEAD_BYTES = request.KEPT_FIELDS_BYTES
# A TLS read shorter than this stopped because OpenSSL wanted the socket (engine.py reads
# records until it does, or until less than a record's room is left in the buffer).
_FULL_READ = CHUNK - _READ_ROOM
_CRLF = b"\r\n"
_HEAD_END = b"\r\n\r\n"
# Registered for: app read, app write, caller read, caller write (Session._reg).
_STEADY = [True, False, True, False]
_METHODS: dict[bytes, str] = {}  # llhttp's method names as str, made once each
# Requests sent again on a new connection when the app closed its kept-alive one as
# they went out (and they had no body): RFC 9110 9.2.2's idempotent methods.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class _Stop(Exception):
    """Raised in a parser callback to stop the parser; what stopped it is already set."""


class Exchange:
    """One request and, once forwarded, its response."""

    # No __slots__: one is made per request, and CPython 3.13 makes an instance with a
    # dict of inline values faster than one with slots (~500 instructions less), its
    # attributes as fast to read.

    def __init__(self, started: float) -> None:
        self.started = started
        self.raw = 0  # bytes read while the head was incomplete (a backstop, see _read_peer)
        self.head: RequestHead | None = None
        self.refusal: str | None = None  # why the sidecar answers 400
        self.body: list[bytes] | None = None  # body pieces parsed before it is forwarded
        self.complete = False  # the whole request has been parsed
        self.forwarding = False  # its head went to the app; its body follows as it comes
        self.answered = False  # the exchange is over: nothing more of it goes anywhere
        self.decision: Decision | None = None
        self.status = 0
        self.body_in = 0
        self.body_out = 0


class _Flow:
    """One direction's byte count, as the tracker reads it (`to_app.moved`)."""

    __slots__ = ("moved",)

    def __init__(self) -> None:
        self.moved = 0


CloseCallback = Callable[[Any, Close, BaseException | None], None]


class Session:
    __slots__ = (
        "_access",
        "_app_broken",
        "_app_recv",
        "_app_requests",
        "_app_reused",
        "_app_send",
        "_counter",
        "_dialing",
        "_done",
        "_examiner",
        "_fields",
        "_head_timeout",
        "_in",
        "_interim",
        "_labels",
        "_last_head",
        "_last_key",
        "_last_resp",
        "_last_resp_key",
        "_linger_left",
        "_linger_timer",
        "_loop",
        "_max_head",
        "_no_more",
        "_on_close",
        "_out_app",
        "_out_peer",
        "_peer_eof",
        "_peer_paused",
        "_peer_read",
        "_peer_rwait",
        "_peer_send",
        "_peer_wwait",
        "_pend_app",
        "_pend_peer",
        "_policy",
        "_reg",
        "_request_parser",
        "_resp",
        "_resp_buf",
        "_resp_done",
        "_resp_start",
        "_response_parser",
        "_rt",
        "_rules",
        "_shutting",
        "_tunnel",
        "_up_peer",
        "_upgrade",
        "_url",
        "_winding_down",
        "app",
        "closed",
        "forward_to",
        "from_app",
        "idle_since",
        "last_moved",
        "last_queued",
        "listener",
        "peer",
        "peer_id",
        "peer_text",
        "queue",
        "rec",
        "started",
        "to_app",
        "xfcc",
    )

    def __init__(self, rt: Runtime, cfg: InboundListener, rec: Record, peer: Endpoint,
                 peer_id: SpiffeId, xfcc: bytes, on_close: CloseCallback) -> None:
        self._rt = rt
        self._loop = rt.loop
        self.rec = rec
        self.listener = cfg.name
        self.forward_to = cfg.forward_to
        self.peer = peer
        # A TLS caller reads without a second, failing read after each record (engine.py).
        self._peer_read: Callable[[memoryview], int] = getattr(peer, "read_some", None) \
            or peer.read_into
        self._peer_send: Send = peer.calls()[1] or peer.write
        # The app's C-level read and write, set when it is dialled. A read is the
        # socket's recv: its bytes are what the caller is sent (a read into the shared
        # buffer would need a copy, ~2k instructions more).
        self._app_recv: Callable[[int], bytes] = _no_app
        self._app_send: Send = _no_app
        self.peer_id = peer_id
        self.peer_text = str(peer_id)
        self.xfcc = xfcc
        self._on_close = on_close
        self._access = logs.RequestLog({"id": rec.id, "listener": self.listener,
                                        "peer_id": self.peer_text})
        self._counter = metrics.RequestCounter(self.listener)
        self.app: TcpEndpoint | None = None
        self._policy: Policy | None = None
        self._rules: RequestRules | None = None
        self._labels: dict[str, str] = {}  # rule -> its label in the metrics, this policy
        limits = rt.limits
        self._max_head = limits.max_request_head_bytes
        self._examiner = request.Examiner(xfcc, self._max_head, limits.max_request_headers)
        self._head_timeout = limits.request_head_timeout
        self._request_parser = httptools.HttpRequestParser(self)
        # The last request's head and what it was made of: a caller on a kept-alive
        # connection often sends the very same head again, and examine is a pure function
        # of these (and of this connection's XFCC and limits).
        self._last_key: tuple[bytes, str, bool, bytes, list[bytes]] | None = None
        self._last_head: RequestHead | None = None
        # The same for the app's last response head (and the state it was judged in).
        self._last_resp_key: tuple[bytes, int, bool, bool, bool] | None = None
        self._last_resp: ResponseHead | None = None
        self._response_parser: httptools.HttpResponseParser | None = None
        self.queue: deque[Exchange] = deque()  # [0]: the exchange in progress
        self._in: Exchange | None = None  # the request being parsed
        self._url = b""  # its target, and its field lines as request.examine takes them
        self._fields: list[bytes] | None = None  # (name, ": ", value, CRLF, ...)
        self._out_app: list[bytes] = []
        self._out_peer: list[bytes] = []
        self._pend_app: memoryview | bytes | None = None
        self._pend_peer: memoryview | bytes | None = None
        self._peer_rwait = WANT_READ  # what the last peer read waits for
        self._peer_wwait = 0  # what the pending peer write waits for (0: nothing)
        self._app_requests = 0  # requests sent on the app connection in use
        self._app_reused = False  # the exchange in progress went out on a used one
        self._peer_eof = False
        self._peer_paused = False  # reading the caller stopped for a reason of ours
        self._no_more = False  # read no further request (close requested, parser dead)
        self._winding_down = False  # drain or lifetime: close at the next boundary
        self._shutting = False  # our close_notify is out or going: lingering
        self._done = False  # the connection has ended (closed or handed over)
        self._dialing = False
        self._tunnel = False  # a 101 went out: hand over to the pump once flushed
        self._up_peer = b""  # bytes of the caller after its upgrade request
        self._upgrade: tuple[str, str] | None = None  # the upgrade request's method, path
        self._app_broken: str | None = None
        self._resp: ResponseHead | None = None
        self._resp_buf: bytes | None = None  # the response's head, while incomplete
        self._resp_start = 0  # where in it the final response's head begins (after 1xx)
        self._resp_done = False  # the response to the exchange in progress has ended
        self._interim = False
        self._linger_left = 0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._reg = [False, False, False, False]  # app read, app write, peer read, peer write
        self.closed = False
        self.to_app, self.from_app = _Flow(), _Flow()
        self.started = self._loop.time()
        self.idle_since = self.started
        self.last_moved = 0
        self.last_queued = 0

    # -- what the tracker asks -----------------------------------------------------------

    @property
    def moved(self) -> int:
        return self.to_app.moved + self.from_app.moved

    def queued(self) -> int:
        app = _unsent(self.app.fd) if self.app is not None else 0
        return app + _unsent(self.peer.fd)

    def finish(self, client_is_peer: bool) -> None:
        """Close at the next request boundary (drain, max_connection_lifetime): now if no
        exchange is under way, else after its response (which says `Connection: close`)."""
        self._winding_down = True
        if not self.queue and self._in is None and not self._done:
            self._no_more = True
            self._close_gracefully()
            self._flush()
            self._update()

    def abort(self, how: Close, exc: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = self._done = True
        self._unregister_all()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        for r in self.queue:
            if not r.answered:
                self._log(r, aborted=True)
        self.queue.clear()
        if self.app is not None:
            self.app.reset()
        if how is Close.CLOSED:
            self.peer.close()
        else:
            self.peer.reset()
        self._on_close(self, how, exc)

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        # The handshake's last read may have brought the first request already: OpenSSL
        # holds it, and the socket will not say readable for it.
        self._read_peer()
        self._flush()
        self._update()

    # -- the caller's side ---------------------------------------------------------------

    def _read_peer(self) -> None:
        rounds = 0
        read = self._peer_read
        while True:
            if self._done:
                return
            if self._shutting:
                self._linger_read()
                return
            # (_reading_peer_paused, written out: this runs for every read)
            if self._pend_app is not None or self._dialing or len(self.queue) > 1 or \
                    self._no_more:
                self._peer_paused = True
                return
            n = read(_buffer)
            if n < 0:
                if n in (WANT_READ, WANT_WRITE):
                    self._peer_rwait = n
                    return
                self._peer_cut(n)
                return
            if n == 0:
                self._peer_ended()
                return
            self.to_app.moved += n
            try:
                self._request_parser.feed_data(_buffer[:n])
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                self._request_stopped(exc, n)
            pending = self._in
            if pending is not None and pending.head is None and pending.refusal is None:
                # A head still incomplete: its fields so far are llhttp's to hold, so
                # bound the raw bytes too (with a read of slack, as a read may hold the
                # end of the request before it), and the time since its first byte.
                pending.raw += n
                if pending.raw > self._max_head + CHUNK:
                    self._refuse_incoming(f"the request head is larger than "
                                          f"{self._max_head} bytes")
                elif time.monotonic() - pending.started > self._head_timeout:
                    self._refuse_incoming(f"the request head took longer than "
                                          f"{self._head_timeout:g}s", timeout=True)
            if n < _FULL_READ:
                # The engine read until OpenSSL wanted the socket: nothing is left behind,
                # and a further read would only raise SSLWantReadError (~10k instructions).
                # (The caller flushes what this read produced.)
                self._peer_rwait = WANT_READ
                return
            self._flush()  # before reading more: at most one read's worth is ever held
            rounds += 1
            if rounds == ROUNDS_PER_TURN:
                self._peer_paused = True
                self._loop.call_soon(self._resume_peer)
                return

    def _reading_peer_paused(self) -> bool:
        """Reading the caller waits: the app has not taken the last read yet, it is being
        dialed, a second request waits behind the current one (pipelining: at most one
        read's worth is parsed ahead), or no further request will be read."""
        return self._pend_app is not None or self._dialing or len(self.queue) > 1 or \
            self._no_more

    def _resume_peer(self) -> None:
        if not self._done:
            self._read_peer()
            self._flush()
            self._update()

    def _request_stopped(self, exc: Exception, n: int) -> None:
        """The request parser stopped in the read of `n` bytes (in `_buffer`)."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            self._up_peer = bytes(_buffer[exc.args[0]:n])
            self._no_more = True  # the rest of this connection is the tunnel's, or nothing
        elif isinstance(exc, httptools.HttpParserCallbackError):
            if not isinstance(exc.__context__, _Stop):
                raise exc  # a bug in a callback, not the caller's fault
            self._parser_stopped()
        elif not self._no_more:  # (after a request that closes, nobody reads the rest)
            self._refuse_incoming(f"malformed request: {exc}")

    def _refuse_incoming(self, why: str, *, timeout: bool = False) -> None:
        """The request being parsed is refused (400, or 408); nothing after it is read."""
        r = self._in
        if r is None:
            r = self._in = Exchange(time.monotonic())
        if r.forwarding:
            # Its head went to the app already: the app must not take half a request.
            self._in = None
            self._no_more = True
            if r.status:
                self._broken("the caller's request body is malformed: " + why)
                return
            r.refusal = why
            self._drop_app(reset=True)  # the app must not take half a request for a whole
            self._answer_now(r, Answer.INVALID, why)
            return
        r.refusal = why
        if timeout:
            r.status = 408  # (a head still incomplete: never the forwarding case above)
        self._in = None
        self._no_more = True
        if r not in self.queue:
            self.queue.append(r)
        if self.queue[0] is r:
            self._start(r)

    def _parser_stopped(self) -> None:
        r = self._in
        if r is not None and r.refusal is not None:
            self._refuse_incoming(r.refusal)

    # llhttp's callbacks for the request parser (httptools looks them up by name).

    def on_message_begin(self) -> None:
        self._in = Exchange(time.monotonic())
        # The head's parts, on the session rather than the exchange: a callback per field
        # reads one attribute less.
        self._url = b""
        self._fields = []

    # The head's size and field count are checked once it is complete (request.examine);
    # until then what llhttp hands over is bounded by the raw bytes read (_read_peer).

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self._fields
        if fields is not None:
            fields += (name, b": ", value, _CRLF)  # as request.examine takes them
        # else: a trailer field, not forwarded (the chunked body ends without them)

    def on_headers_complete(self) -> None:
        r = self._in
        assert r is not None
        parser = self._request_parser
        raw_method = parser.get_method()
        fields = self._fields
        assert fields is not None  # (a list since the message began)
        self._fields = None  # what follows the head (trailers) is not forwarded
        key = (raw_method, parser.get_http_version(), parser.should_upgrade(), self._url,
               fields)
        if key == self._last_key:
            r.head = self._last_head
        else:
            method = _METHODS.get(raw_method)
            if method is None:
                method = _METHODS.setdefault(raw_method, raw_method.decode("ascii"))
            head = self._examiner.examine(method, key[3], key[1], key[4], key[2])
            if isinstance(head, str):
                r.refusal = head
                raise _Stop
            r.head = head
            # Bounded by what is kept: the forwarded head, and the caller's field lines
            # with those the app never receives (a forged XFCC, hop-by-hop fields).
            if len(key[3]) + len(head.forwarded) <= KEPT_HEAD_BYTES and \
                    self._examiner.fields_bytes <= KEPT_HEAD_BYTES:
                self._last_head, self._last_key = head, key
        self.queue.append(r)
        if len(self.queue) == 1:
            self._start(r)

    def on_body(self, data: bytes) -> None:
        r = self._in
        assert r is not None
        r.body_in += len(data)
        if r.answered:
            return
        if r.forwarding:
            assert r.head is not None
            if r.head.framing is Framing.CHUNKED:
                self._out_app += (b"%x\r\n" % len(data), data, _CRLF)
            else:
                self._out_app.append(data)
        elif r.body is None:
            r.body = [data]
        else:
            r.body.append(data)

    def on_message_complete(self) -> None:
        r = self._in
        assert r is not None
        self._in = None
        r.complete = True
        if r.forwarding and not r.answered:
            assert r.head is not None
            if r.head.framing is Framing.CHUNKED:
                self._out_app.append(_CHUNK_END)
        if r.head is not None and not r.head.keep_alive:
            self._no_more = True

    # -- one exchange --------------------------------------------------------------------

    def _start(self, r: Exchange) -> None:
        """The request at the head of the queue: answer it, or send it to the app."""
        if r.refusal is not None:
            if r.status == 408:
                self._answer_now(r, Answer.TIMEOUT, r.refusal)
            else:
                self._answer_now(r, Answer.INVALID, r.refusal)
            return
        head = r.head
        assert head is not None
        policy = self._rt.policy
        if policy is not self._policy:  # first request, or the policy was reloaded
            self._policy = policy
            self._rules = policy.for_peer(self.peer_id, self.listener)
            self._labels = {}
        assert self._rules is not None
        decision = r.decision = self._rules.decide(head.method, head.path)
        if decision.kind is DecisionKind.DENY:
            # (An upgrade request is the last llhttp reads: nothing after it would be.)
            close = head.has_body or not head.keep_alive or head.upgrade or \
                self._winding_down
            r.status = 403
            r.answered = True
            self._out_peer.append(answers.DENIED_CLOSE if close else answers.DENIED_OPEN)
            self._log(r)
            self.queue.popleft()
            if close:
                self._no_more = True
                self._close_gracefully()
            elif self.queue:
                self._start(self.queue[0])
            return
        if self.app is None:
            self._dialing = True
            self._rt.spawn(self._dial(r), self.rec)
            return
        self._forward(r)

    async def _dial(self, r: Exchange) -> None:
        try:
            sock = await dial(self.forward_to, self._rt.limits.connect_timeout,
                              metrics.series(Direction.INBOUND, self.listener).dial)
        except (OSError, TimeoutError) as exc:
            self._dialing = False
            if self._done:
                return
            metrics.upstream_errors.labels(Direction.INBOUND, self.listener).inc()
            self.rec.reason = Reason.UPSTREAM_UNAVAILABLE
            self.rec.detail = f"cannot reach the app at {self.forward_to}: {exc or 'timed out'}"
            self._answer_now(r, Answer.UPSTREAM_UNAVAILABLE, "the app cannot be reached")
            self._flush()
            self._update()
            return
        self._dialing = False
        if self._done or r.answered:
            # Answered while it was dialed (its body turned out malformed in the read that
            # brought its head): the app must not get a request the caller saw refused.
            sock.close()
            return
        self.app = app = TcpEndpoint(sock)
        self._app_recv = sock.recv
        self._app_send = app.calls()[1] or app.write
        self._app_requests = 0
        self._forward(r)
        self._flush()
        self._update()

    def _forward(self, r: Exchange) -> None:
        head = r.head
        assert head is not None
        r.forwarding = True
        self._app_reused = self._app_requests > 0
        self._app_requests += 1
        out = self._out_app
        out.append(head.forwarded)
        if r.body:
            chunked = head.framing is Framing.CHUNKED
            for piece in r.body:
                if chunked:
                    out += (b"%x\r\n" % len(piece), piece, _CRLF)
                else:
                    out.append(piece)
        r.body = None
        if r.complete and head.framing is Framing.CHUNKED:
            out.append(_CHUNK_END)
        if self._response_parser is None:
            self._response_parser = self._new_response_parser()
        self._resp_buf = b""
        self._resp_start = 0
        self._resp_done = False

    def _answer_now(self, r: Exchange, answer: Answer, why: str) -> None:
        """Answer the exchange at the head of the queue ourselves, and close after it."""
        r.status = answers.status_of(answer)
        r.refusal = r.refusal or why
        r.answered = True
        self._out_peer.append(answers.build(answer, why, close=True))
        self._log(r)
        if self.queue and self.queue[0] is r:
            self.queue.popleft()
        self._no_more = True
        self._close_gracefully()

    def _exchange_over(self, r: Exchange) -> None:
        """The response to the exchange at the head of the queue has been relayed whole."""
        r.answered = True
        self._log(r)
        self.queue.popleft()
        resp = self._resp
        self._resp = None
        if resp is not None and (resp.app_closes or resp.framing is Framing.CLOSE):
            self._drop_app()
        if not r.complete:
            # The app answered before the request was in: the rest of it cannot be told
            # from a next request, so the connection ends here (the app's too, reset: it
            # must not take the part it got for a whole request).
            self._no_more = True
            self._drop_app(reset=True)
        if (resp is not None and resp.closes) or not r.complete:
            self._no_more = True
            self._close_gracefully()
        elif self.queue:
            self._start(self.queue[0])
        elif self._no_more or self._winding_down:
            self._no_more = True
            self._close_gracefully()

    # -- the app's side ------------------------------------------------------------------

    def _new_response_parser(self) -> httptools.HttpResponseParser:
        # Callbacks by name, bound straight to ours; none per field: the head is read
        # from the bytes themselves once llhttp has validated it (response.py).
        return httptools.HttpResponseParser(SimpleNamespace(
            on_message_begin=self._r_begin, on_headers_complete=self._r_headers_complete,
            on_message_complete=self._r_complete))

    def _read_app(self) -> None:
        app = self.app
        if app is None or self._done:
            return
        rounds = 0
        recv = self._app_recv
        while self._pend_peer is None and not self._tunnel:
            try:
                data = recv(CHUNK)
            except OSError as exc:
                code = app.read_code(exc)  # a want or a reset, or raises again
                if code != WANT_READ:
                    self._app_ended(reset=code == RESET)
                return
            n = len(data)
            if n == 0:
                self._app_ended(reset=False)
                return
            self.from_app.moved += n
            if not self.queue or not self.queue[0].forwarding:
                # Nothing was asked of it: whatever this is, the connection cannot be
                # trusted to frame the next response; the next request dials again.
                self._drop_app()
                return
            self._feed_response(data)
            if self._app_broken is not None:
                self._broken(self._app_broken)
                return
            if self.app is None or self._done or n < CHUNK:
                return  # a short read drained the socket; readiness says when more comes
            self._flush()
            rounds += 1
            if rounds == ROUNDS_PER_TURN:
                self._loop.call_soon(self._resume_app)
                return

    def _resume_app(self) -> None:
        if not self._done:
            self._read_app()
            self._flush()
            self._update()

    def _feed_response(self, data: bytes) -> None:
        """Parse a read of the app's; its bytes go to the caller as they are, in order with
        anything the parser's callbacks add (a next request's 403), or held while the
        response's head is incomplete (`_resp_buf`: it may have to be rebuilt)."""
        parser = self._response_parser
        assert parser is not None
        out = self._out_peer
        mark = len(out)
        r = self.queue[0]
        sent_before = r.status
        n = len(data)
        buf = self._resp_buf
        if buf is None:
            out.append(data)  # a body: as it came
            r.body_out += n
        else:
            # A head spanning reads is rare: joined as it comes, the first read kept as is.
            self._resp_buf = buf = data if not buf else buf + data
            if len(buf) > self._max_head + CHUNK:
                self._app_broken = "the app's response head is over limits.max_request_head_bytes"
                return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if not self._tunnel:
                self._app_broken = "the app switched protocols unasked"
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Stop):
                raise
        except httptools.HttpParserError as exc:
            # After a response that closes the app's connection (dropped by now), llhttp
            # refuses whatever followed: nobody reads it.
            if self.app is not None and self._app_broken is None:
                self._app_broken = (
                    "the app's 101 lacks its Connection: upgrade" if self._tunnel else
                    f"the app's response is malformed: {exc}")
        if self._app_broken is not None:
            del out[mark:]  # none of this read reaches the caller
            r.status = sent_before

    def _r_begin(self) -> None:
        if self._resp_done:
            self._app_broken = "the app sent a second response to one request"
            raise _Stop

    def _r_headers_complete(self) -> None:
        r = self.queue[0]
        head = r.head
        parser = self._response_parser
        buf = self._resp_buf
        assert head is not None and parser is not None and buf is not None
        status = parser.get_status_code()
        start = self._resp_start
        at = buf.find(_HEAD_END, start)  # (response.head_end, written out)
        end = -1 if at < 0 else at + 4
        if status < 200:
            if status == 101:
                if not head.upgrade:
                    self._app_broken = "the app switched protocols unasked"
                    raise _Stop
                r.status = 101
                self._out_peer.append(buf[start:])  # the 101 and the tunnel's start
                self._resp_buf = None
                self._tunnel = True
                self._exchange_upgraded(r)
                return
            self._out_peer.append(buf[start:end])  # 100 Continue and the like
            self._resp_start = end
            self._interim = True
            return
        key = (buf[start:end] if start or end != len(buf) else buf, status,
               head.method == "HEAD", self._winding_down, parser.should_keep_alive())
        if key == self._last_resp_key:
            resp = self._last_resp
            assert resp is not None
        else:
            found = response.examine(status, key[0], head_request=key[2], close=key[3],
                                     keep_alive=key[4])
            if isinstance(found, str):
                self._app_broken = found
                raise _Stop
            resp = found
            if len(key[0]) <= KEPT_HEAD_BYTES:
                self._last_resp, self._last_resp_key = found, key
        r.status = status
        self._resp = resp
        self._resp_buf = None
        if resp.forwarded is None:
            self._out_peer.append(buf if not start else buf[start:])
        else:
            self._out_peer += (resp.forwarded, buf[end:])
        r.body_out += len(buf) - end
        if head.method == "HEAD":
            # llhttp would wait for the Content-Length it announces: the response ends
            # here, and the next one needs a parser that has not seen this one.
            if len(buf) > end:
                self._app_broken = "the app answered HEAD with a body"
                raise _Stop
            self._response_parser = self._new_response_parser()
            self._resp_done = True
            self._exchange_over(r)

    def _r_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._tunnel or self._resp_done:
            return
        self._resp_done = True
        self._exchange_over(self.queue[0])

    def _app_ended(self, *, reset: bool) -> None:
        """The app closed (or reset) its connection."""
        r = self.queue[0] if self.queue else None
        resp = self._resp
        if r is not None and r.forwarding and resp is not None and not self._resp_done \
                and resp.framing is Framing.CLOSE and not reset:
            self._resp_done = True
            self._exchange_over(r)  # its body ran until the close
            self._drop_app()
            return
        if r is None or not r.forwarding or self._tunnel:
            # Between exchanges: the app closed an idle keep-alive connection. The next
            # request dials again.
            self._drop_app()
            return
        if r.status:
            self._broken("the app reset the connection in the middle of its response"
                         if reset else
                         "the app closed the connection in the middle of its response")
            return
        reused = self._app_reused
        self._drop_app()
        head = r.head
        assert head is not None
        if reused and r.complete and not head.has_body and head.method in _IDEMPOTENT:
            # The app closed a kept-alive connection as the request went out on it: send
            # it again on a new one, as nginx does for requests that may be repeated.
            r.forwarding = False
            self._dialing = True
            self._rt.spawn(self._dial(r), self.rec)
            return
        self.rec.detail = "the app closed the connection before its response"
        self._answer_now(r, Answer.UPSTREAM_UNAVAILABLE,
                         "the app closed the connection before its response")

    def _drop_app(self, *, reset: bool = False) -> None:
        app = self.app
        if app is None:
            return
        for i in (0, 1):
            if self._reg[i]:
                self._unregister(i)
        self.app = None
        self._app_reused = False
        self._pend_app = None
        self._out_app.clear()
        self._response_parser = None
        self._resp = None
        self._resp_buf = None
        if reset:
            app.reset()
        else:
            app.close()

    def _broken(self, why: str) -> None:
        """Something went wrong past the point where an answer could still be given."""
        r = self.queue[0] if self.queue else None
        if r is not None and not r.status:
            self._drop_app(reset=True)
            self._answer_now(r, Answer.UPSTREAM_UNAVAILABLE, "the app's response is invalid")
            self.rec.detail = why
            return
        self.rec.detail = why
        self.abort(Close.ERROR)

    # -- a WebSocket: hand over to the pump ----------------------------------------------

    def _exchange_upgraded(self, r: Exchange) -> None:
        assert r.head is not None
        self._upgrade = (r.head.method, r.head.path)
        r.answered = True
        self._log(r)
        self.queue.popleft()
        if self._up_peer:
            self._out_app.append(self._up_peer)
            self._up_peer = b""

    def _hand_over(self) -> None:
        """Both sides flushed after a 101: the byte pump takes the connection."""
        assert self.app is not None
        self._done = True
        self._unregister_all()
        tracker = self._rt.tracker
        duplex = Duplex(self._loop, self.app, self.peer, tracker.closed)
        duplex.to_app.moved = self.to_app.moved
        duplex.from_app.moved = self.from_app.moved
        rec = tracker.live.pop(self)
        rec.request = self._upgrade
        tracker.attach(rec, duplex)
        self.closed = True
        duplex.start()

    # -- closing -------------------------------------------------------------------------

    def _close_gracefully(self) -> None:
        """Once our last bytes are out: close_notify, read and drop what the caller still
        sends for a while, then close. Until then `_flush` keeps writing."""
        self._shutting = True

    def _shutdown_peer(self) -> None:
        rc = self.peer.shutdown_write()
        if rc < 0:
            self._peer_wwait = rc
            return
        self._peer_wwait = 0
        self._drop_app()
        if self._peer_eof:
            self._end()  # the caller has closed already: nothing to wait for
            return
        self._linger_left = LINGER_BYTES
        self._linger_timer = self._loop.call_later(LINGER_SECONDS, self._end)
        self._peer_rwait = WANT_READ
        self._linger_read()

    def _linger_read(self) -> None:
        if self._linger_timer is None:
            return  # our answer is not out yet: reading waits
        while self._linger_left > 0:
            n = self.peer.read_into(_buffer)
            if n in (WANT_READ, WANT_WRITE):
                self._peer_rwait = n
                return
            if n <= 0:
                break
            self._linger_left -= n
        self._end()

    def _end(self) -> None:
        if self._done:
            return
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self.abort(Close.CLOSED)

    def _peer_ended(self) -> None:
        """The caller ended its stream (close_notify)."""
        r = self._in
        if r is not None or (self.queue and not self.queue[0].complete):
            self.rec.detail = "the caller closed in the middle of a request"
            self.abort(Close.CLOSED)
            return
        self._no_more = True
        self._peer_eof = True
        if not self.queue:
            self._close_gracefully()
        # else: the response in progress is relayed, then the connection closes

    def _peer_cut(self, code: int) -> None:
        self.abort(Close.PEER_RESET if code == RESET else Close.TRUNCATED)

    # -- writing -------------------------------------------------------------------------
    # Each side: `_pend_*` is the write in flight, retried as the very same bytes (a TLS
    # write that wanted a retry must be: with kTLS OpenSSL resumes from the buffer it was
    # first given), and `_out_*` what gathered behind it. `_peer_wwait` says what the
    # caller's write waits for (WANT_READ / WANT_WRITE), 0 when nothing.

    def _flush(self) -> None:
        """Write what the handlers gathered, one call per side, and take the steps that
        wait for everything to be out (a tunnel's hand-over, a close)."""
        if self._done:
            return
        # (_write_app and _write_peer, written out: this runs twice a request)
        app = self.app
        if app is not None and (self._out_app or self._pend_app is not None):
            try:
                self._pend_app, _ = _write(app, self._app_send, self._pend_app,
                                           self._out_app)
            except OSError as exc:
                self._app_write_failed(exc)
                if self._done:
                    return  # it ended the connection (the caller's side closed with it)
        if (self._out_peer or self._pend_peer is not None) and not self._peer_wwait:
            try:
                self._pend_peer, self._peer_wwait = _write(self.peer, self._peer_send,
                                                           self._pend_peer, self._out_peer)
            except OSError as exc:
                self._peer_write_failed(exc)
        if self._done or self._pend_peer is not None or self._out_peer:
            return
        if self._tunnel:
            if self.app is not None and self._pend_app is None and not self._out_app:
                self._hand_over()
            return
        if self._shutting and self._linger_timer is None:
            self._shutdown_peer()

    def _app_write_failed(self, exc: BaseException) -> None:
        r = self.queue[0] if self.queue else None
        self._drop_app()
        if r is not None and not r.status:
            self.rec.detail = f"writing to the app failed: {exc}"
            self._answer_now(r, Answer.UPSTREAM_UNAVAILABLE,
                             "the app closed the connection before its response")
        else:
            self.rec.detail = f"writing to the app failed: {exc}"
            self.abort(Close.APP_RESET)

    def _write_peer(self) -> None:
        try:
            self._pend_peer, self._peer_wwait = _write(self.peer, self._peer_send,
                                                       self._pend_peer, self._out_peer)
        except OSError as exc:
            self._peer_write_failed(exc)

    def _peer_write_failed(self, exc: BaseException) -> None:
        self.rec.detail = f"writing to the caller failed: {exc}"
        self.abort(Close.PEER_RESET if isinstance(exc, ConnectionError) else Close.ERROR)

    # -- the loop's callbacks and registrations -------------------------------------------

    def _on_peer_readable(self) -> None:
        if self._peer_wwait == WANT_READ:
            self._peer_wwait = 0
            self._write_peer()
        if self._peer_rwait == WANT_READ:
            self._read_peer()
        self._flush()
        self._update()

    def _on_peer_writable(self) -> None:
        if self._peer_wwait == WANT_WRITE:
            self._peer_wwait = 0
            self._write_peer()
        if self._peer_rwait == WANT_WRITE:
            self._peer_rwait = WANT_READ
            self._read_peer()
        self._flush()
        self._update()

    def _on_app_readable(self) -> None:
        self._read_app()
        self._flush()
        self._update()

    def _on_app_writable(self) -> None:
        self._flush()
        self._update()

    def _update(self) -> None:
        """Register for what the session now waits on."""
        if self._done:
            return
        # The usual state after an event: both sides read, neither written, and already
        # registered so. It is the state _register_for would leave as it is (a test goes
        # through every state to show it), checked in half its bytecode.
        if self._reg == _STEADY and self._peer_rwait == WANT_READ and \
                not self._peer_wwait and self._pend_app is None and \
                self._pend_peer is None and self.app is not None and \
                not (self._shutting or self._peer_paused or self._no_more or self._tunnel):
            return
        self._register_for()

    def _register_for(self) -> None:
        """_update, whatever the state."""
        if self._shutting:
            reading = self._linger_timer is not None  # once our answer is out
        elif not self._peer_paused:
            reading = not self._no_more
        elif self._reading_peer_paused():
            reading = False
        else:
            self._peer_paused = False
            self._loop.call_soon(self._resume_peer)  # OpenSSL may hold what comes next
            reading = not self._no_more
        reg = self._reg
        if self.app is not None:
            want = self._pend_peer is None and not self._tunnel
            if want != reg[0]:
                self._set(0, want)
            want = self._pend_app is not None
            if want != reg[1]:
                self._set(1, want)
        elif reg[0] or reg[1]:
            self._unregister(0)
            self._unregister(1)
        wwait = self._peer_wwait
        rwait = self._peer_rwait if reading else 0
        want = rwait == WANT_READ or wwait == WANT_READ
        if want != reg[2]:
            self._set(2, want)
        want = rwait == WANT_WRITE or wwait == WANT_WRITE
        if want != reg[3]:
            self._set(3, want)

    def _set(self, i: int, on: bool) -> None:
        if on:
            self._register(i)
        else:
            self._unregister(i)

    def _register(self, i: int) -> None:
        loop = self._loop
        if i == 0:
            assert self.app is not None
            loop.add_reader(self.app.fd, self._on_app_readable)
        elif i == 1:
            assert self.app is not None
            loop.add_writer(self.app.fd, self._on_app_writable)
        elif i == 2:
            loop.add_reader(self.peer.fd, self._on_peer_readable)
        else:
            loop.add_writer(self.peer.fd, self._on_peer_writable)
        self._reg[i] = True

    def _unregister(self, i: int) -> None:
        loop = self._loop
        if i < 2:
            if self.app is not None:
                (loop.remove_reader if i == 0 else loop.remove_writer)(self.app.fd)
        elif i == 2:
            loop.remove_reader(self.peer.fd)
        else:
            loop.remove_writer(self.peer.fd)
        self._reg[i] = False

    def _unregister_all(self) -> None:
        for i in range(4):
            if self._reg[i]:
                self._unregister(i)

    # -- what is logged and counted -------------------------------------------------------

    def _log(self, r: Exchange, *, aborted: bool = False) -> None:
        seconds = time.monotonic() - r.started
        head = r.head
        decision = r.decision
        status = r.status
        if head is None or decision is None or not status or aborted or \
                r.refusal is not None:
            self._log_unusual(r, seconds, aborted=aborted)
            return
        label = decision.kind
        rule = decision.rule
        self._access.write(head.method, head.path, status, label, rule, r.body_in,
                           r.body_out, seconds)
        # _rule_label's lookup, inline (a call is ~600 instructions); labels are never "".
        self._counter.add(label, self._labels.get(rule) or self._rule_label(rule), status,
                          seconds)

    def _log_unusual(self, r: Exchange, seconds: float, *, aborted: bool) -> None:
        """_log for a request refused, answered by the sidecar or cut short."""
        head = r.head
        decision = r.decision
        label = decision.kind if decision is not None else NO_DECISION
        extra: dict[str, Any] | None = None
        if r.refusal is not None or aborted:
            extra = {"detail": r.refusal} if r.refusal is not None else {}
            if aborted:
                extra["aborted"] = True
        self._access.write(head.method if head is not None else None,
                           head.path if head is not None else None, r.status or None,
                           label, decision.rule if decision is not None else None,
                           r.body_in, r.body_out, seconds, extra)
        if aborted or not r.status:
            return
        self._counter.add(label, self._rule_label(decision.rule) if decision is not None
                          else None, r.status, seconds)

    def _rule_label(self, rule: str) -> str:
        label = self._labels.get(rule)
        if label is None:
            assert self._policy is not None
            label = self._labels[rule] = metrics.rule_label(self._policy, rule)
        return label


def _write(ep: Endpoint, send: Send, pending: memoryview | bytes | None,
           out: list[bytes]) -> tuple[memoryview | bytes | None, int]:
    """Write `pending`, then what gathered in `out` (joined: one call); what is still
    pending afterwards and what it waits for (0: nothing is, WANT_READ / WANT_WRITE).
    `send` is `ep`'s C-level write where it has one (Endpoint.calls: a Python frame less
    per write), else `ep.write`. A write that wanted a retry is kept as these very bytes
    (TLS must be given them again); a part taken (TCP) leaves the rest. Raises OSError
    when the socket failed."""
    while True:
        data = pending
        if data is None:
            if not out:
                return None, 0
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
        try:
            n = send(data)
        except OSError as exc:
            n = ep.write_code(exc)  # a want, or raises again
        if n == len(data):
            pending = None
        elif n < 0:
            return data, n
        else:
            return memoryview(data)[n:], WANT_WRITE


def _no_app(data: Any) -> Any:
    raise AssertionError("written to the app before it was dialled")  # not reached


def serve(rt: Runtime, cfg: InboundListener, rec: Record, ep: TlsEndpoint,
          peer: SpiffeId) -> None:
    """Take over an authenticated inbound connection of an http listener."""
    leaf = ep.peer_leaf() or b""
    field = xfcc.field(str(rt.contexts.identity.spiffe_id), leaf, str(peer))
    session = Session(rt, cfg, rec, ep, peer, field, rt.tracker.closed)
    rt.tracker.attach(rec, session)
    session.start()


def wind_down(rt: Runtime) -> None:
    """Drain: every http session closes at its next request boundary (an idle one now),
    its last response saying `Connection: close`."""
    for live in list(rt.tracker.live):
        if isinstance(live, Session):
            live.finish(client_is_peer=True)
