"""The command line: the parser, and the checked Plan and client SSLContext it yields."""

from __future__ import annotations

import argparse
import importlib.util
import ssl
import sys

from sidecar import spiffe
from sidecar.config import parse_address, parse_duration
from sidecar.loadgen.plan import Mode, Plan, request_payload
from sidecar.tls import contexts


class UsageError(Exception):
    pass


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be longer than 0")
    return seconds


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar bench",
        description="Handshake and resumption load generator against any mTLS server.")
    p.add_argument("--target", required=True, help="HOST:PORT of the mTLS server")
    p.add_argument("--cert", help="client SVID: leaf followed by intermediates (PEM)")
    p.add_argument("--key", help="the client SVID's private key (PEM)")
    p.add_argument("--bundle", help="trust anchors for the server; without: not verified")
    p.add_argument("--expect-id", help="the server's SPIFFE ID (or spiffe://TD/*)")
    p.add_argument("--server-name", help="SNI (default: the target's host)")
    p.add_argument("--mode", choices=[*Mode, "all"], default="all",
                   help="full, resume, reuse, or all three one after the other (default)")
    p.add_argument("--concurrency", type=_positive, default=8, help="workers (default 8)")
    p.add_argument("--duration", type=_duration, default=10.0,
                   help="per mode (default 10s)")
    p.add_argument("--requests", type=_positive, help="stop a mode after N requests")
    p.add_argument("--request-bytes", type=_positive, default=64,
                   help="bytes per request (default 64)")
    p.add_argument("--response-bytes", type=_positive,
                   help="bytes to read back (default: --request-bytes)")
    p.add_argument("--no-echo", action="store_true",
                   help="the target does not echo: read until --response-bytes or close")
    p.add_argument("--metrics", help="the target sidecar's /metrics URL, for server CPU")
    p.add_argument("--timeout", type=_duration, default=5.0,
                   help="per connect, handshake and response (default 5s)")
    p.add_argument("--tls-min", choices=["1.2", "1.3"], default="1.3")
    p.add_argument("--tls-max", choices=["1.2", "1.3"], default="1.3")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the modes")
    p.add_argument("--progress", action="store_true",
                   help="progress line on stderr even when it is not a terminal")
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    try:
        address = parse_address(args.target)
    except ValueError as exc:
        raise UsageError(f"--target: {exc}") from None
    expect_id = None
    if args.expect_id is not None:
        try:
            expect_id = spiffe.SpiffePattern.parse(args.expect_id, prefixes=False)
        except ValueError as exc:
            raise UsageError(f"--expect-id: {exc}") from None
    response_bytes = args.response_bytes or args.request_bytes
    if not args.no_echo and response_bytes != args.request_bytes:
        raise UsageError("--response-bytes differs from --request-bytes: an echo answers "
                         "what it was sent; pass --no-echo for another kind of server")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'sidecar[plot]'")
    modes = tuple(Mode) if args.mode == "all" else (Mode(args.mode),)
    return Plan(
        host=address.host, port=address.port, server_name=args.server_name or address.host,
        modes=modes, concurrency=args.concurrency, duration=args.duration,
        requests=args.requests, payload=request_payload(args.request_bytes),
        response_bytes=response_bytes, echo=not args.no_echo, expect_id=expect_id,
        metrics_url=args.metrics, timeout=args.timeout, as_json=args.json, plot=args.plot,
        progress=args.progress or sys.stderr.isatty())


def client_context(args: argparse.Namespace) -> ssl.SSLContext:
    versions = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
    if args.tls_min > args.tls_max:
        raise UsageError(f"--tls-min {args.tls_min} is above --tls-max {args.tls_max}")
    if bool(args.cert) != bool(args.key):
        raise UsageError("--cert and --key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = versions[args.tls_min]
    ctx.maximum_version = versions[args.tls_max]
    contexts.pin_handshake(ctx, contexts.GROUPS, args.tls_min)  # what a sidecar offers
    # SVIDs need not carry a DNS name: --expect-id checks the SPIFFE ID instead.
    ctx.check_hostname = False
    try:
        if args.bundle:
            ctx.load_verify_locations(cafile=args.bundle)
        else:
            ctx.verify_mode = ssl.CERT_NONE
        if args.cert:
            ctx.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load --cert/--key/--bundle: {exc}") from None
    return ctx
