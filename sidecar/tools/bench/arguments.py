"""The command line: the parser, and the checked Plan and client SSLContext it yields."""

from __future__ import annotations

import argparse
import importlib.util
import ssl
import sys

from sidecar import spiffe
from sidecar.config import parse_address, parse_duration
from sidecar.modes import TlsVersion
from sidecar.tls import contexts
from sidecar.tools.bench.plan import ConnectionMode, Plan, request_payload


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


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = 0.0
    if not rate > 0 or rate == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected requests per second above 0")
    return rate


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
    p.add_argument("--mode", choices=[*ConnectionMode, "all"], default="all",
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
    p.add_argument("--target-metrics", "--metrics", dest="metrics", metavar="URL",
                   help="the target's /metrics URL: server CPU per handshake (a sidecar's "
                   "handshake counters) and per request (process_cpu_seconds_total)")
    p.add_argument("--target-pid", type=_positive, metavar="PID", action="append",
                   default=[],
                   help="a local target's process: server CPU per request from /proc, for "
                   "a target that exports no process_cpu_seconds_total; repeat it to sum "
                   "several (an outbound and an inbound sidecar)")
    p.add_argument("--plain", action="store_true",
                   help="plain TCP, to a sidecar's outbound listener: the outbound makes "
                   "the handshakes, full or resumed as its tls.session_resumption says")
    p.add_argument("--resumed-target", metavar="HOST:PORT",
                   help="with --plain: an outbound listener whose sidecar resumes, for "
                   "resume mode and the sweep's resumed points; --target is then one whose "
                   "sidecar does not (tls.session_resumption: false)")
    p.add_argument("--sweep", action="store_true",
                   help="requests per connection 1, 10, 100, 1000, each with full and with "
                   "resumed handshakes; --duration and --requests apply to each point; "
                   "prints the break-even point")
    p.add_argument("--per-connection", type=_positive, default=1, metavar="N",
                   help="requests per connection in full and resume modes (default 1)")
    p.add_argument("--rate", type=_rate, metavar="PER_S",
                   help="open loop: this many requests per second over all workers, each "
                   "latency counted from when the request was due (coordinated omission "
                   "corrected; needs the `bench` extra); default: closed loop")
    p.add_argument("--timeout", type=_duration, default=5.0,
                   help="per connect, handshake and response (default 5s)")
    p.add_argument("--tls-min", choices=["1.2", "1.3"], default="1.3",
                   help="offer at least this TLS version (default 1.3)")
    p.add_argument("--tls-max", choices=["1.2", "1.3"], default="1.3",
                   help="offer at most this TLS version (default 1.3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="FILE.png",
                   help="chart of the modes, or of the sweep with --sweep")
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
    if args.rate is not None and importlib.util.find_spec("hdrh") is None:
        raise UsageError("--rate needs hdrhistogram: pip install 'sidecar[bench]'")
    resumed_target = None
    if args.resumed_target is not None:
        if not args.plain:
            raise UsageError("--resumed-target goes with --plain: without it, the bench "
                             "resumes its own sessions")
        try:
            resumed = parse_address(args.resumed_target)
        except ValueError as exc:
            raise UsageError(f"--resumed-target: {exc}") from None
        resumed_target = (resumed.host, resumed.port)
    if args.plain and resumed_target is None and args.mode == ConnectionMode.RESUME:
        raise UsageError("--plain: the client makes no handshake to resume; give "
                         "--resumed-target, an outbound listener whose sidecar resumes")
    if args.sweep and args.mode != "all":
        raise UsageError("--sweep runs full and resume modes itself: leave out --mode")
    modes = tuple(ConnectionMode) if args.mode == "all" else (ConnectionMode(args.mode),)
    if args.plain and resumed_target is None:
        modes = tuple(m for m in modes if m is not ConnectionMode.RESUME)
    return Plan(
        host=address.host, port=address.port, server_name=args.server_name or address.host,
        modes=modes, concurrency=args.concurrency, duration=args.duration,
        requests=args.requests, payload=request_payload(args.request_bytes),
        response_bytes=response_bytes, echo=not args.no_echo, expect_id=expect_id,
        metrics_url=args.metrics, target_pids=tuple(args.target_pid), timeout=args.timeout,
        as_json=args.json, plot=args.plot, progress=args.progress or sys.stderr.isatty(),
        per_connection=args.per_connection, rate=args.rate, sweep=args.sweep, plain=args.plain,
        resumed_target=resumed_target)


def client_context(args: argparse.Namespace) -> ssl.SSLContext:
    if args.tls_min > args.tls_max:
        raise UsageError(f"--tls-min {args.tls_min} is above --tls-max {args.tls_max}")
    if bool(args.cert) != bool(args.key):
        raise UsageError("--cert and --key go together")
    try:
        # what a sidecar offers
        ctx = contexts.client(TlsVersion(args.tls_min), TlsVersion(args.tls_max))
    except contexts.PinError as exc:
        raise UsageError(str(exc)) from None
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
