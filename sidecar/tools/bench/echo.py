"""`sidecar bench echo`: a target to bench against, so nothing else is needed.

Plain TCP by default: the app behind a sidecar's inbound (bench -> inbound -> echo), where
the sidecar does the TLS. With --cert and --key it speaks TLS itself (mTLS with --bundle:
a client certificate is required and verified), to bench a handshake with no proxy in
between. It echoes every byte back until the client closes, which is what `sidecar bench`
checks by default.

With --metrics-listen it serves its own /metrics with `process_cpu_seconds_total`
(prometheus_client's process collector), so `--target-metrics` can read the echo's CPU
too. It prints where it listens on stdout, one line each (port 0 picks a free port), and
runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
from collections.abc import Sequence

from sidecar.config import parse_address

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
READ_SIZE = 65536  # one read's bytes: a TLS record holds 16 KiB, a loopback read more


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar bench echo",
        description="An echo server to bench against: plain TCP (behind a sidecar's "
        "inbound) or, with --cert and --key, TLS itself.")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="HOST:PORT to listen on (default 127.0.0.1:0, a free port)")
    p.add_argument("--cert", help="serve TLS with this certificate chain (PEM)")
    p.add_argument("--key", help="the certificate's private key (PEM)")
    p.add_argument("--bundle", help="require client certificates issued under these")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve /metrics (process_cpu_seconds_total) here")
    return p


def server_context(cert: str, key: str, bundle: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if bundle:
        ctx.load_verify_locations(cafile=bundle)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass  # a client that went away or failed its handshake: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def serve(host: str, port: int, ctx: ssl.SSLContext | None,
                metrics: tuple[str, int] | None) -> None:
    server = await asyncio.start_server(_echo, host, port, ssl=ctx, backlog=1024)
    bound = server.sockets[0].getsockname()
    print(f"echo listening on {bound[0]}:{bound[1]} ({'tls' if ctx else 'tcp'})", flush=True)
    if metrics is not None:
        print(f"metrics on {_serve_metrics(*metrics)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def _serve_metrics(host: str, port: int) -> str:
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    http, _ = start_http_server(port, addr=host, registry=registry)
    return f"http://{host}:{http.server_port}/metrics"


def main(argv: Sequence[str]) -> int:
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        address = parse_address(args.listen, listen=True)
        metrics = (parse_address(args.metrics_listen, listen=True)
                   if args.metrics_listen else None)
    except ValueError as exc:
        print(f"sidecar bench echo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if bool(args.cert) != bool(args.key) or (args.bundle and not args.cert):
        print("sidecar bench echo: --cert and --key go together, and --bundle needs them",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        ctx = server_context(args.cert, args.key, args.bundle) if args.cert else None
    except (OSError, ssl.SSLError) as exc:
        print(f"sidecar bench echo: cannot load --cert/--key/--bundle: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        asyncio.run(serve(address.host, address.port, ctx,
                          None if metrics is None else (metrics.host, metrics.port)))
    except OSError as exc:
        print(f"sidecar bench echo: cannot listen: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
