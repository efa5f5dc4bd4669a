"""`sidecar diagnose HOST:PORT`: connect as our outbound side would, and say what happened.

Each step is reported as it happens (TCP, TLS, the server's chain and SPIFFE ID, whether
it asked for and accepted our certificate, whether a second connection resumes), and the
outcome is one of SPEC.md's reasons with its explanation and likely fix (reasons.py).

Two TLS 1.3 facts shape it. The server judges our certificate after our side of the
handshake is complete, so a refusal only shows when we read: the tool reads once and
waits for either an alert, an end of stream, or a session ticket (a server sends tickets
only after it accepted us). And whether the server asked for a certificate is a
CertificateRequest message we see through the handshake hook (peerchain.py).
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
from typing import Any

from cryptography import x509

from sidecar import svid
from sidecar.authn import matches_expected
from sidecar.reasons import Reason
from sidecar.tls import contexts
from sidecar.tls.classify import Failure, classify, skew_note
from sidecar.tls.peerchain import ATTRIBUTE as PRESENTED

CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0
# How long to wait for the server's verdict on our certificate after the handshake: a
# ticket or an alert comes within one round trip; an idle server sends nothing.
VERDICT_WAIT = 1.5
# Outcomes that mean "the server would not take our certificate" from the client's seat.
_REFUSED_US = frozenset({str(r) for r in (Reason.PEER_CLOSED, Reason.OTHER, Reason.UNKNOWN_CA,
                                          Reason.CERT_EXPIRED, Reason.BAD_SIGNATURE,
                                          Reason.INVALID_SVID)})
_CLIENT_HELLO = 1  # TLS handshake message types
_CERTIFICATE_REQUEST = 13


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
    resumed_second: bool | None = None
    steps: list[Step] = field(default_factory=list)

    def step(self, name: str, ok: bool, detail: str, started: float | None = None) -> None:
        ms = round((time.perf_counter() - started) * 1000, 2) if started else None
        self.steps.append(Step(name, ok, detail, ms))

    def fail(self, reason: Reason, detail: str) -> Outcome:
        self.ok, self.reason = False, str(reason)
        self.explanation, self.fix = reason.explanation, reason.fix
        self.step("outcome", False, f"{reason}: {detail}")
        return self


def _context(args: argparse.Namespace) -> ssl.SSLContext:
    """What the sidecar's outbound side offers (tls/contexts.py), from plain files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_2 if args.tls_min == "1.2"
                           else ssl.TLSVersion.TLSv1_3)
    if args.tls_max == "1.2":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    contexts.pin_handshake(ctx, contexts.GROUPS,
                           "1.2" if ctx.minimum_version == ssl.TLSVersion.TLSv1_2 else "1.3")
    ctx.check_hostname = False  # SVIDs are checked by SPIFFE ID, not DNS name
    if args.bundle:
        ctx.load_verify_locations(cafile=args.bundle)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    seen: set[int] = set()

    def hook(conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any,
             data: bytes) -> None:
        if direction == "read" and content_type == 22:
            seen.add(int(msg_type))
            if msg_type == 11:
                from sidecar.tls.peerchain import parse_certificate_message

                conn.__dict__[PRESENTED] = parse_certificate_message(
                    data, tls13=version == ssl.TLSVersion.TLSv1_3)

    ctx._msg_callback = hook  # type: ignore[attr-defined]
    ctx.__dict__["seen_messages"] = seen
    return ctx


def _known_intermediates(cert_path: str | None) -> list[x509.Name]:
    if not cert_path:
        return []
    try:
        with open(cert_path, "rb") as f:
            certs = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError):
        return []
    return [c.subject for c in certs[1:]]


def _own_certificate(args: argparse.Namespace) -> tuple[Reason, str] | None:
    """What is wrong with the certificate we are about to present, if anything.

    A server tells a refused client little (TLS 1.3: an alert, or a hang-up after the
    handshake), but our own files can be read: when the server refuses us and our own
    certificate is broken, that is the reason to report.
    """
    if not args.cert:
        return None
    from datetime import UTC, datetime, timedelta

    from sidecar import inspect

    try:
        with open(args.cert, "rb") as f:
            contents = inspect.read_pem(f.read())
        bundle = None
        if args.bundle:
            with open(args.bundle, "rb") as f:
                bundle = inspect.BundleFile(args.bundle, inspect.read_pem(f.read()).certs)
    except OSError:
        return None
    report = inspect.examine(args.cert, contents, now=datetime.now(UTC),
                             skew=timedelta(seconds=args.clock_skew_hint), bundle=bundle)
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
        out.reason = "usage"
        return out
    try:
        ctx = _context(args)
    except (OSError, ssl.SSLError) as exc:
        out.step("load files", False, f"cannot load --cert/--key/--bundle: {exc}")
        out.reason = "usage"
        return out
    own = _own_certificate(args)
    if own is not None:
        out.step("our certificate", False, f"{own[0]}: {own[1]}")
    session = _attempt(args, ctx, host, port, out, first=True)
    if not out.ok and own is not None and out.reason in _REFUSED_US:
        # The server refused us, and our own certificate says why.
        reason, detail = own
        out.steps.pop()  # the generic outcome line
        out.fail(reason, f"the server refused our certificate: {detail}")
    if session is None or not out.ok:
        return out
    _attempt(args, ctx, host, port, out, first=False, session=session)
    return out


def _attempt(
    args: argparse.Namespace, ctx: ssl.SSLContext, host: str, port: int, out: Outcome,
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
    sock = ctx.wrap_socket(raw, server_hostname=args.server_name or host,
                           do_handshake_on_connect=False, session=session)
    seen: set[int] = ctx.__dict__["seen_messages"]
    seen.clear()
    with sock:
        offered = {("1.3", "1.3"): "TLS 1.3", ("1.2", "1.3"): "TLS 1.2 and 1.3"}.get(
            (args.tls_min, args.tls_max), "TLS 1.2 only")
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:
            f = classify(exc, presented=sock.__dict__.get(PRESENTED),
                         known_intermediates=_known_intermediates(args.cert))
            if isinstance(exc, TimeoutError | socket.timeout):
                f = Failure(Reason.HANDSHAKE_TIMEOUT, "the server did not answer in time")
            elif _CLIENT_HELLO in seen or (f.reason is Reason.OTHER
                                           and "unexpected message" in f.detail):
                # A ClientHello where a ServerHello belongs: our own bytes came back.
                f = Failure(Reason.NOT_TLS, "the server answered with something other than "
                            "a TLS ServerHello (our own bytes echoed back?): not a TLS server")
            note = skew_note(sock.__dict__.get(PRESENTED), args.clock_skew_hint)
            out.step("tls handshake" + label, False, f"offered {offered}: {f.detail}{note}",
                     started)
            if first:
                who = "the server refused us: " if f.by_peer else ""
                out.fail(f.reason, who + f.detail + note)
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
        if not _check_server(sock, args, out):
            return None
        return _verdict(sock, args, out)


def _check_server(sock: ssl.SSLSocket, args: argparse.Namespace, out: Outcome) -> bool:
    der = sock.getpeercert(binary_form=True)
    chain = sock.get_verified_chain() if args.bundle else []
    if der is None:
        out.fail(Reason.OTHER, "the server presented no certificate")
        return False
    leaf = x509.load_der_x509_certificate(der)
    shown = " <- ".join(x509.load_der_x509_certificate(c).subject.rfc4514_string() or "(empty)"
                        for c in chain) if chain else leaf.subject.rfc4514_string()
    trust = "verified against --bundle" if args.bundle else "NOT verified (no --bundle given)"
    out.step("server chain", True, f"{shown}; {trust}")
    try:
        sid = str(svid.spiffe_id_of(leaf))
    except svid.SvidError as exc:
        out.fail(Reason.INVALID_SVID, "; ".join(p.message for p in exc.problems))
        return False
    out.peer_spiffe_id = sid
    if args.expect_id and not matches_expected(sid, args.expect_id):
        out.step("server identity", False, f"{sid}, expected {', '.join(args.expect_id)}")
        out.fail(Reason.SPIFFE_ID_MISMATCH,
                 f"the server is {sid}, expected {', '.join(args.expect_id)}")
        return False
    out.step("server identity", True, sid + (" (matches --expect-id)" if args.expect_id else ""))
    return True


def _verdict(sock: ssl.SSLSocket, args: argparse.Namespace, out: Outcome) -> ssl.SSLSession | None:
    """Read once: a ticket means the server accepted us; an alert or EOF means it did not."""
    asked = out.server_asked_for_cert
    sock.settimeout(VERDICT_WAIT)
    deadline = time.monotonic() + VERDICT_WAIT
    try:
        while time.monotonic() < deadline:
            if sock.session is not None and sock.session.has_ticket:
                break
            if sock.recv(1) == b"":
                out.step("client certificate", False, "the server closed the connection "
                         "right after the handshake")
                out.fail(Reason.PEER_CLOSED, "the server hung up right after the handshake: "
                         "it refused our certificate, or its policy denies our SPIFFE ID "
                         "(its access log says which)")
                return None
    except TimeoutError:
        pass  # nothing in time: no alert either, the server is waiting for a request
    except ssl.SSLError as exc:
        f = classify(exc)
        if not args.cert:
            out.step("client certificate", False, f"we sent none: {f.detail}")
            out.fail(f.reason, "the server requires a client certificate: pass --cert and "
                     "--key")
            return None
        out.step("client certificate", False, f"the server refused it: {f.detail}")
        out.fail(f.reason, f"the server refused our certificate: {f.detail}")
        return None
    if not asked:
        note = "the server did not ask for a client certificate: this is not mutual TLS"
        out.step("client certificate", False, note)
        out.fail(Reason.NO_CLIENT_CERT, note)
        return None
    if not args.cert:
        out.fail(Reason.NO_CLIENT_CERT, "the server asks for a client certificate; pass "
                 "--cert and --key")
        return None
    out.step("client certificate", True, "the server asked for it and accepted it")
    out.ok = True
    session = sock.session
    return session if session is not None and session.has_ticket else None


def main(argv: Sequence[str]) -> int:
    from sidecar.config import parse_duration

    p = argparse.ArgumentParser(prog="sidecar diagnose",
                                description="Connect as a client and explain the outcome.")
    p.add_argument("target", metavar="HOST:PORT")
    p.add_argument("--cert"), p.add_argument("--key"), p.add_argument("--bundle")
    p.add_argument("--expect-id", action="append", default=[],
                   help="the SPIFFE ID the server must have (repeatable; spiffe://TD/* too)")
    p.add_argument("--server-name", help="SNI (default: the host)")
    p.add_argument("--tls-min", choices=["1.2", "1.3"], default="1.3")
    p.add_argument("--tls-max", choices=["1.2", "1.3"], default="1.3",
                   help="offer at most this version (to play an old peer)")
    p.add_argument("--clock-skew-hint", type=parse_duration, default=300.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = run(args)
    if out.reason == "usage":
        print(f"sidecar diagnose: {out.steps[-1].detail}", file=sys.stderr)
        return 2
    if out.ok and out.resumed_second is False:
        out.step("resumption", False, "a second connection did not resume (the server "
                 "issues no tickets, or refuses them)")
    elif out.ok:
        out.step("resumption", True, "a second connection resumed the session")
    if args.json:
        print(json.dumps(asdict(out), indent=2))
    else:
        for s in out.steps:
            ms = f" ({s.ms} ms)" if s.ms is not None else ""
            print(f"{'ok ' if s.ok else 'FAIL'} {s.step}: {s.detail}{ms}")
        if out.ok:
            print(f"\nOK: mutual TLS works with {out.peer_spiffe_id} ({out.tls_version}).")
        else:
            print(f"\n{out.reason}: {out.explanation}.\nLikely fix: {out.fix}.")
    return 0 if out.ok else 1
