"""`sidecar diagnose HOST:PORT`: connect as our outbound side would, and say what happened.

Each step is reported as it happens (TCP, TLS, the server's chain and SPIFFE ID, whether
it asked for and accepted our certificate, whether a second connection resumes), and the
outcome is one of SPEC.md's reasons with its explanation and likely fix (reasons.py).

Two TLS 1.3 facts shape it. The server judges our certificate after our side of the
handshake is complete, so a refusal only shows when we read: the tool reads for a short
while (`VERDICT_WAIT`) and sees an alert, an end of stream, a session ticket, or nothing.
And whether the server asked for a certificate is a CertificateRequest message we see
through the handshake hook (peerchain.py).

What the client's seat can tell apart, and so all the tool claims:
- an alert with a reason: the server's TLS stack refused us, and the alert says why;
- a session ticket: the server's TLS stack accepted our certificate (a TLS 1.3 server
  sends tickets only once it has verified the client's Finished and certificate);
- a ticket, then the end of the stream: accepted at the handshake, then closed by the
  application above TLS. A sidecar does that on a policy denial, when it cannot reach its
  app, or when our SVID breaks a rule it checks after the handshake; only its log says
  which, so the tool names all three;
- the end of the stream with no ticket: any of the above, or a refusal with no alert.

Who we are when we dial (diagnose_seat.py): the --cert/--key/--bundle files, the identity
a SPIFFE Workload API agent hands out (--workload-api, --spiffe-id), or the one a sidecar
config names (-c). With an identity from an agent, the server's chain must also end in
the bundle of its own trust domain, as the outbound checks it (authn.py).
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from cryptography import x509

from sidecar import spiffe, svid
from sidecar.authn import Authenticator, AuthnError
from sidecar.http1.answers import HEADER as ANSWER_HEADER
from sidecar.http1.answers import Answer
from sidecar.modes import TlsVersion
from sidecar.outcomes import NO_DECISION, DecisionKind
from sidecar.reasons import Reason
from sidecar.tls import contexts, openssl
from sidecar.tls.classify import Failure, classify, skew_note
from sidecar.tls.peerchain import ATTRIBUTE as PRESENTED
from sidecar.tools import identity_source
from sidecar.tools.diagnose_seat import Seat, seat_of

CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0
# How long to wait for the server's verdict on our certificate after the handshake: a
# ticket or an alert comes within one round trip; an idle server sends nothing.
VERDICT_WAIT = 1.5
# Outcomes that mean "the server would not take our certificate" from the client's seat.
_REFUSED_US = frozenset({str(r) for r in (Reason.PEER_CLOSED, Reason.OTHER, Reason.UNKNOWN_CA,
                                          Reason.CERT_EXPIRED, Reason.BAD_SIGNATURE,
                                          Reason.INVALID_SVID, Reason.BAD_CERTIFICATE,
                                          Reason.REVOKED)})
_CLIENT_HELLO = 1  # TLS handshake message types
_CERTIFICATE_REQUEST = 13


class HttpVerdict(StrEnum):
    """Why `--http` failed once the handshake worked: the sidecar answered the request
    itself (the `x-sidecar-answer` words), or nothing HTTP came back."""

    DENIED = "http_denied"  # 403: the policy refused this request
    INVALID = "http_invalid"  # 400: the sidecar refused the request as malformed
    TIMEOUT = "http_timeout"  # 408: the request head was too slow
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"  # 502: allowed, but the app is not there
    NOT_HTTP = "not_http"  # no HTTP response at all: not an http listener?


# The sidecar's own answers, as a verdict with its words and fix.
_SIDECAR_ANSWERED: dict[str, tuple[HttpVerdict, str, str]] = {
    Answer.DENIED: (HttpVerdict.DENIED, "the sidecar's policy denies this request from our "
                    "SPIFFE ID", "read the sidecar's access log line for this request (it "
                    "names the deciding rule) and change the policy if it should pass"),
    Answer.INVALID: (HttpVerdict.INVALID, "the sidecar refused the request as malformed",
                     "the access log line says what was malformed"),
    Answer.TIMEOUT: (HttpVerdict.TIMEOUT, "the sidecar gave up waiting for the request "
                     "head", "a slow network path: check it, or raise limits.request_head_timeout"),
    Answer.UPSTREAM_UNAVAILABLE: (HttpVerdict.UPSTREAM_UNAVAILABLE,
                                  Reason.UPSTREAM_UNAVAILABLE.explanation,
                                  Reason.UPSTREAM_UNAVAILABLE.fix),
}


class Setup(StrEnum):
    """Why diagnose never dialled: not a handshake's reason (those are `Reason`s)."""

    USAGE = "usage"  # the command line cannot be followed (exit 2)
    NO_IDENTITY = "no_identity"  # the agent or the config gave no identity (exit 1)


@dataclass(slots=True)
class Step:
    step: str
    ok: bool
    detail: str
    ms: float | None = None


@dataclass(slots=True)
class Outcome:
    ok: bool = False
    reason: str | None = None
    explanation: str | None = None
    fix: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    peer_spiffe_id: str | None = None
    server_asked_for_cert: bool | None = None
    resumed_second: bool | None = None  # None: no second connection was made
    # resumed | not_resumed | no_ticket (none to resume) | second_failed | None (not got there)
    resumption: str | None = None
    server_verified: bool = False  # the server's chain was checked against our trust
    our_spiffe_id: str | None = None  # what we presented, when we did
    identity_source: str | None = None  # where it came from: files, an agent, a config
    we_refused: bool = False  # our check of the server's chain failed (not its of ours)
    # --http PATH: the status of the one request sent, and what decided it
    http_status: int | None = None
    http_decision: str | None = None
    steps: list[Step] = field(default_factory=list)

    def step(self, name: str, ok: bool, detail: str, started: float | None = None) -> None:
        ms = round((time.perf_counter() - started) * 1000, 2) if started else None
        self.steps.append(Step(name, ok, detail, ms))

    def fail(self, reason: Reason, detail: str, *, explanation: str | None = None,
             fix: str | None = None) -> Outcome:
        """Fail with `reason`; `explanation` and `fix` replace the reason's own words where
        the client's seat knows better (reasons.py speaks of the handshake)."""
        self.ok, self.reason = False, str(reason)
        self.explanation = explanation or reason.explanation
        self.fix = fix or reason.fix
        self.step("outcome", False, f"{reason}: {detail}")
        return self


def client_context(args: argparse.Namespace, seat: Seat | None = None) -> ssl.SSLContext:
    """What the sidecar's outbound side offers (tls/contexts.py), presenting and trusting
    what `seat` says (default: the --cert/--key/--bundle files)."""
    ctx = contexts.client(TlsVersion(args.tls_min), TlsVersion(args.tls_max))
    (seat if seat is not None else seat_of(args)).load(ctx)
    seen: set[int] = set()

    def hook(conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any,
             data: bytes) -> None:
        if direction == "read" and content_type == 22:
            seen.add(int(msg_type))
            if msg_type == 11:
                from sidecar.tls.peerchain import parse_certificate_message

                conn.__dict__[PRESENTED] = parse_certificate_message(
                    data, tls13=version == ssl.TLSVersion.TLSv1_3)

    openssl.set_message_callback(ctx, hook)
    ctx.__dict__["seen_messages"] = seen
    if args.http:
        ctx.set_alpn_protocols(["http/1.1"])  # as an HTTP/1.1 client would
    return ctx


def _own_certificate(seat: Seat, skew: float) -> tuple[Reason, str] | None:
    """What is wrong with the certificate we are about to present, if anything.

    A server tells a refused client little (TLS 1.3: an alert, or a hang-up after the
    handshake), but our own certificate can be read: when the server refuses us and our
    own certificate is broken, that is the reason to report.
    """
    if not seat.presents:
        return None
    from datetime import UTC, datetime, timedelta

    from sidecar.tools.inspect import command as inspect

    contents = seat.chain()
    if contents is None:
        return None
    report = inspect.examine(seat.source, contents, now=datetime.now(UTC),
                             skew=timedelta(seconds=skew), bundle=seat.own_bundle())
    for finding in report.findings:
        if finding.reason is not None:
            return finding.reason, finding.message
    return None


def run(args: argparse.Namespace) -> Outcome:
    out = Outcome()
    host, _, port_text = args.target.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        out.step("target", False, f"{args.target!r} is not HOST:PORT")
        out.reason = Setup.USAGE
        return out
    try:
        seat = seat_of(args)
    except identity_source.SourceError as exc:
        out.step("our identity", False, str(exc))
        out.reason = Setup.USAGE if exc.usage else Setup.NO_IDENTITY
        return out
    try:
        ctx = client_context(args, seat)
    except contexts.PinError as exc:
        out.step("client context", False, str(exc))
        out.reason = Setup.USAGE
        return out
    except (OSError, ssl.SSLError) as exc:
        out.step("load files", False, f"cannot load {seat.source}: {exc}")
        out.reason = Setup.USAGE
        return out
    _name_ourselves(seat, out)
    own = _own_certificate(seat, args.clock_skew_hint)
    if own is not None:
        out.step("our certificate", False, f"{own[0]}: {own[1]}")
    session = _attempt(args, seat, ctx, host, port, out, first=True)
    if not out.ok and own is not None and out.reason in _REFUSED_US and not out.we_refused:
        # The server refused us, and our own certificate says why.
        reason, detail = own
        out.steps.pop()  # the generic outcome line
        explanation, fix = reason.words(by_peer=True)
        out.fail(reason, f"the server refused our certificate: {detail}",
                 explanation=explanation, fix=fix)
    if not out.ok:
        return out
    if session is None:
        out.resumption = "no_ticket"
        out.step("resumption", False, "not tried: the server sent no session ticket to "
                 f"resume within {VERDICT_WAIT:g} s (session resumption off on the server?)")
        return out
    _attempt(args, seat, ctx, host, port, out, first=False, session=session)
    if out.resumed_second is None:
        out.resumption = "second_failed"
        out.step("resumption", False, "unknown: the second connection failed (see above)")
    elif out.resumed_second:
        out.resumption = "resumed"
        out.step("resumption", True, "a second connection resumed the session")
    else:
        out.resumption = "not_resumed"
        out.step("resumption", False, "a second connection offered the server's ticket "
                 "and was not resumed (the server refuses its own tickets?)")
    return out


def _name_ourselves(seat: Seat, out: Outcome) -> None:
    """Say who we are about to be, and from where: with an agent, what it handed out."""
    out.identity_source = seat.source or None
    if not seat.presents:
        return
    out.our_spiffe_id = seat.spiffe_id()
    if out.our_spiffe_id is None:
        return  # _own_certificate says what is wrong with it
    detail = f"{out.our_spiffe_id} from {seat.source}"
    if seat.identity is not None:
        from sidecar.times import rfc3339

        ident = seat.identity
        detail += (f"; serial {ident.serial:#x}, not after {rfc3339(ident.not_after)}; "
                   f"trusts {', '.join(sorted(ident.bundles))}")
    out.step("our identity", True, detail)


def _attempt(
    args: argparse.Namespace, seat: Seat, ctx: ssl.SSLContext, host: str, port: int,
    out: Outcome,
    *, first: bool, session: ssl.SSLSession | None = None,
) -> ssl.SSLSession | None:
    label = "" if first else " (second connection)"
    started = time.perf_counter()
    try:
        raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        out.step("tcp connect" + label, False, f"{host}:{port}: {exc}", started)
        if first:
            out.fail(Reason.UPSTREAM_UNAVAILABLE, f"cannot connect to {host}:{port}: {exc}")
        return None
    out.step("tcp connect" + label, True, f"connected to {host}:{port}", started)
    started = time.perf_counter()
    raw.settimeout(HANDSHAKE_TIMEOUT)
    # suppress_ragged_eofs off: a hang-up without close_notify reads as SSLEOFError, so
    # the tool can say which of the two the server did.
    sock = ctx.wrap_socket(raw, server_hostname=args.server_name or host,
                           do_handshake_on_connect=False, session=session,
                           suppress_ragged_eofs=False)
    seen: set[int] = ctx.__dict__["seen_messages"]
    seen.clear()
    with sock:
        offered = {("1.3", "1.3"): "TLS 1.3", ("1.2", "1.3"): "TLS 1.2 and 1.3"}.get(
            (args.tls_min, args.tls_max), "TLS 1.2 only")
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:
            f = classify(exc, presented=sock.__dict__.get(PRESENTED),
                         known_intermediates=seat.known_intermediates(),
                         trusted_names=seat.trusted_names())
            if isinstance(exc, TimeoutError | socket.timeout):
                f = Failure(Reason.HANDSHAKE_TIMEOUT, "the server did not answer in time")
            elif _CLIENT_HELLO in seen or (f.reason is Reason.OTHER
                                           and "unexpected message" in f.detail):
                # A ClientHello where a ServerHello belongs: our own bytes came back.
                f = Failure(Reason.NOT_TLS, "the server answered with something other than "
                            "a TLS ServerHello (our own bytes echoed back?): not a TLS server")
            out.we_refused = isinstance(exc, ssl.SSLCertVerificationError)
            note = skew_note(sock.__dict__.get(PRESENTED), args.clock_skew_hint)
            out.step("tls handshake" + label, False, f"offered {offered}: {f.detail}{note}",
                     started)
            if first:
                who = "the server refused us: " if f.by_peer else ""
                explanation, fix = f.reason.words(by_peer=f.by_peer)
                out.fail(f.reason, who + f.detail + note, explanation=explanation, fix=fix)
            return None
        out.tls_version, out.cipher = sock.version(), (sock.cipher() or ("",))[0]
        resumed = sock.session_reused
        out.step("tls handshake" + label, True,
                 f"offered {offered}; chose {out.tls_version} {out.cipher}"
                 + (", resumed" if resumed else ""), started)
        if not first:
            out.resumed_second = resumed
            return None
        out.server_asked_for_cert = _CERTIFICATE_REQUEST in seen
        if not _check_server(sock, args, seat, out):
            return None
        session, early = _verdict(sock, seat, out)
        if out.ok and args.http:
            _http(sock, args, host, out, early)
        return session


def _expected_id(text: str) -> spiffe.SpiffePattern:
    """--expect-id takes what a route's expect_ids take, refused by the same rules."""
    try:
        return spiffe.SpiffePattern.parse(text, prefixes=False)
    except spiffe.SpiffeIdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_server(sock: ssl.SSLSocket, args: argparse.Namespace, seat: Seat,
                  out: Outcome) -> bool:
    der = sock.getpeercert(binary_form=True)
    chain = sock.get_verified_chain() if seat.verifies else []
    if der is None:
        out.fail(Reason.OTHER, "the server presented no certificate")
        return False
    leaf = x509.load_der_x509_certificate(der)
    shown = " <- ".join(x509.load_der_x509_certificate(c).subject.rfc4514_string() or "(empty)"
                        for c in chain) if chain else leaf.subject.rfc4514_string()
    out.server_verified = seat.verifies
    trust = f"verified against {seat.trust_label}" if seat.verifies else \
        "NOT verified (no --bundle given)"
    if seat.identity is not None:
        # As the outbound: the chain must end in the bundle of the server's own trust
        # domain (a federated CA never vouches for another domain's IDs).
        try:
            Authenticator().full(chain, seat.identity)
        except AuthnError as exc:
            out.step("server chain", False, f"{shown}; {exc.detail}")
            out.fail(exc.reason, exc.detail)
            return False
    out.step("server chain", seat.verifies, f"{shown}; {trust}")
    try:
        sid = svid.spiffe_id_of(leaf)
    except svid.SvidError as exc:
        out.fail(Reason.INVALID_SVID, "; ".join(p.message for p in exc.problems))
        return False
    out.peer_spiffe_id = str(sid)
    if args.expect_id and not any(p.matches(sid) for p in args.expect_id):
        expected = ", ".join(map(str, args.expect_id))
        out.step("server identity", False, f"{sid}, expected {expected}")
        out.fail(Reason.SPIFFE_ID_MISMATCH, f"the server is {sid}, expected {expected}")
        return False
    out.step("server identity", True,
             f"{sid}" + (" (matches --expect-id)" if args.expect_id else ""))
    return True


def _verdict(sock: ssl.SSLSocket, seat: Seat, out: Outcome
             ) -> tuple[ssl.SSLSession | None, bytes]:
    """Read for VERDICT_WAIT: an alert, an end of stream, a ticket, or nothing (see the
    module docstring for what each tells, and what it cannot). Also returns the byte
    that read took from a server that speaks first, which `--http` must show."""
    asked = out.server_asked_for_cert
    # One read, bounded as a whole: Python's ssl keeps one deadline across the records it
    # takes in (a ticket does not end the read; data, an end or an alert does).
    sock.settimeout(VERDICT_WAIT)
    ended: str | None = None  # how the stream ended, when it did
    early = b""
    try:
        early = sock.recv(1)
        if early == b"":
            ended = "with a close_notify"
    except TimeoutError:
        pass  # nothing in time: no alert either, the server is waiting for a request
    except (ssl.SSLEOFError, ConnectionError):
        ended = "without a close_notify"
    except ssl.SSLError as exc:
        f = classify(exc)
        if not seat.presents:
            out.step("client certificate", False, f"we sent none: {f.detail}")
            out.fail(f.reason, "the server requires a client certificate: pass --cert and "
                     "--key")
            return None, early
        out.step("client certificate", False, f"the server refused it: {f.detail}")
        out.fail(f.reason, f"the server refused our certificate: {f.detail}")
        return None, early
    ticket = sock.session is not None and sock.session.has_ticket
    if ended is not None:
        _closed_after_handshake(out, ended, ticket=ticket)
        return None, early
    if not asked:
        note = "the server did not ask for a client certificate: this is not mutual TLS"
        out.step("client certificate", False, note)
        out.fail(Reason.NO_CLIENT_CERT, note)
        return None, early
    if not seat.presents:
        out.fail(Reason.NO_CLIENT_CERT, "the server asks for a client certificate; pass "
                 "--cert and --key")
        return None, early
    how = ("it sent a session ticket, which a TLS 1.3 server does only once it has verified "
           "the client" if ticket else
           f"no alert and no hang-up within {VERDICT_WAIT:g} s")
    out.step("client certificate", True, f"the server asked for it and accepted it ({how})")
    out.ok = True
    return (sock.session if ticket else None), early


# What the sidecar's own answers say in `x-sidecar-answer` (http1/answers.py), in words.
_ANSWERS: dict[str, str] = {
    Answer.DENIED: "denied by the sidecar's policy (its access log names the rule)",
    Answer.INVALID: "refused by the sidecar as a malformed request",
    Answer.TIMEOUT: "refused by the sidecar: the request head was too slow",
    Answer.UPSTREAM_UNAVAILABLE: "allowed by the policy, but the sidecar could not reach "
                                 "its app",
}
HTTP_LIMIT = 64 * 1024  # bytes of the response read, head first


def _http(sock: ssl.SSLSocket, args: argparse.Namespace, host: str, out: Outcome,
          early: bytes) -> None:
    """--http PATH: one GET through an http listener; its status and what decided it."""
    started = time.perf_counter()
    path = args.http if args.http.startswith("/") else "/" + args.http
    head = (f"GET {path} HTTP/1.1\r\nHost: {args.server_name or host}\r\n"
            "User-Agent: sidecar-diagnose\r\nAccept: */*\r\nConnection: close\r\n\r\n")

    def failed(detail: str, explanation: str) -> None:
        out.step("http request", False, f"GET {path}: {detail}", started)
        out.ok, out.reason, out.explanation = False, HttpVerdict.NOT_HTTP, explanation
        out.fix = "is this an http listener? (`inbound[].protocol: http`)"

    sock.settimeout(HANDSHAKE_TIMEOUT)
    data = early  # what a server that speaks first sent before the request
    try:
        sock.sendall(head.encode("latin-1"))
        while b"\r\n\r\n" not in data and len(data) < HTTP_LIMIT:
            part = sock.recv(HTTP_LIMIT)
            if not part:
                break
            data += part
    except (OSError, ssl.SSLError) as exc:
        failed(str(exc), f"the HTTP request failed: {exc}")
        return
    status_line, _, rest = data.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        shown = status_line[:80].decode("latin-1") or "nothing"
        failed(f"no HTTP response ({shown!r})", "the server did not answer with HTTP")
        return
    out.http_status = int(parts[1])
    fields = rest.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    answer = next((v.strip() for k, _, v in (f.partition(":") for f in fields)
                   if k.strip().lower() == ANSWER_HEADER), None)
    if answer is not None:
        out.http_decision = DecisionKind.DENY if answer == Answer.DENIED else \
            DecisionKind.ALLOW if answer == Answer.UPSTREAM_UNAVAILABLE else NO_DECISION
        said = _ANSWERS.get(answer, f"answered by the sidecar ({answer})")
    else:
        out.http_decision = DecisionKind.ALLOW
        said = ("allowed by the sidecar's policy (or let through by its audit mode); "
                "the app answered")
    out.step("http request", answer is None, f"GET {path}: {out.http_status}, {said}",
             started)
    if answer in _SIDECAR_ANSWERED:
        # The app never saw the request: that is a failure to call it, as a denial on a
        # tcp listener is (exit 1 in both modes, so scripts can rely on the code).
        verdict, explanation, fix = _SIDECAR_ANSWERED[answer]
        out.ok, out.reason, out.explanation, out.fix = False, verdict, explanation, fix


def _closed_after_handshake(out: Outcome, ended: str, *, ticket: bool) -> None:
    """The server hung up after the handshake, without an alert: say what that shows."""
    if ticket:
        seen = (f"the server accepted our certificate at the handshake (it sent a session "
                f"ticket), then closed the connection ({ended}, no alert)")
        causes = ("its policy denies our SPIFFE ID, it could not reach its app, or it "
                  "refused our SVID after the handshake")
    else:
        seen = (f"the server closed the connection right after the handshake ({ended}, "
                "no alert, no session ticket)")
        causes = ("it refused our certificate without saying why, its policy denies our "
                  "SPIFFE ID, or it could not reach its app")
    out.step("after the handshake", False, seen)
    out.fail(Reason.PEER_CLOSED, f"{seen}: {causes}",
             explanation=f"the server closed the connection after the handshake: {causes}",
             fix="read the server's log for this connection: it names the cause (a sidecar "
                 "logs decision=deny, reason=upstream_unavailable, or the SVID rule)")


def main(argv: Sequence[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    identity_source.check_exclusive(p, args, {"--cert": args.cert, "--key": args.key,
                                              "--bundle": args.bundle})
    out = run(args)
    if out.reason in (Setup.USAGE, Setup.NO_IDENTITY):
        print(f"sidecar diagnose: {out.steps[-1].detail}", file=sys.stderr)
        return 2 if out.reason == Setup.USAGE else 1
    if args.json:
        print(json.dumps(asdict(out), indent=2))
    else:
        for s in out.steps:
            ms = f" ({s.ms} ms)" if s.ms is not None else ""
            print(f"{'ok ' if s.ok else 'FAIL'} {s.step}: {s.detail}{ms}")
        print("\n" + verdict_line(out))
    # SPEC: exit 0 when a full mTLS round trip works, verified or not; the words say which.
    return 0 if out.ok else 1


def parser() -> argparse.ArgumentParser:
    from sidecar.config import parse_duration

    p = argparse.ArgumentParser(prog="sidecar diagnose",
                                description="Connect as a client and explain the outcome.")
    p.add_argument("target", metavar="HOST:PORT", help="the mTLS server to connect to")
    p.add_argument("--cert", help="our SVID: leaf followed by intermediates (PEM); "
                   "without: no client certificate, as a plain TLS client")
    p.add_argument("--key", help="the private key of --cert (PEM)")
    p.add_argument("--bundle", help="trust anchors to verify the server with; without: "
                   "the server is not verified and the verdict says UNVERIFIED")
    identity_source.add_arguments(p, "--cert/--key/--bundle")
    p.add_argument("--expect-id", action="append", default=[], type=_expected_id,
                   help="the SPIFFE ID the server must have (repeatable; spiffe://TD/* too)")
    p.add_argument("--server-name", help="SNI (default: the host)")
    p.add_argument("--tls-min", choices=["1.2", "1.3"], default="1.3",
                   help="offer at least this version (default 1.3)")
    p.add_argument("--tls-max", choices=["1.2", "1.3"], default="1.3",
                   help="offer at most this version (to play an old peer)")
    p.add_argument("--clock-skew-hint", type=parse_duration, default=300.0,
                   help="blame the clocks too when a certificate is outside its validity "
                   "by less than this (default 5m)")
    p.add_argument("--http", metavar="PATH",
                   help="then send one GET for PATH through an http listener and show the "
                   "status and the decision (offers ALPN http/1.1)")
    p.add_argument("--json", action="store_true",
                   help="print the outcome and every step as one JSON object")
    return p


def verdict_line(out: Outcome) -> str:
    """The last line a person reads: what worked, and what was not checked."""
    if not out.ok and out.http_status is not None:
        return (f"{out.reason}: mutual TLS works with {out.peer_spiffe_id} ({out.tls_version}), "
                f"but the sidecar answered HTTP {out.http_status} itself: {out.explanation}."
                f"\nLikely fix: {out.fix}.")
    if not out.ok:
        return f"{out.reason}: {out.explanation}.\nLikely fix: {out.fix}."
    http = ""
    if out.http_status is not None:
        http = f" HTTP {out.http_status}, decision: {out.http_decision}."
    if not out.server_verified:
        return (f"UNVERIFIED: the mutual TLS round trip works, but the server was not "
                f"verified (no --bundle): anyone could have answered as "
                f"{out.peer_spiffe_id} ({out.tls_version}). Pass --bundle to verify it."
                + http)
    return f"OK: mutual TLS works with {out.peer_spiffe_id} ({out.tls_version})." + http
