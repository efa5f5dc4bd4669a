"""Backpressure: the sidecar's memory while one side is fast and the other slow (issue 11,
item 4).

Run (from the repo root):

    PYTHONPATH=. python bench/backpressure.py                   # 2 x 60 s
    PYTHONPATH=. python bench/backpressure.py --seconds 20 --streams 16 --json

Options: `--seconds T` (60 per direction), `--streams K` (4 connections at once),
`--read-rate B` (1024 bytes a second per stream for the slow side), `--directions
to_app,from_app`, `--loop`, `--keep DIR`, `--json`.

For each direction, a fresh inbound sidecar (`python -m sidecar run --loop uvloop`, the
certificates of compare_haproxy.py, default limits) between a peer (`--worker peer`: K
mTLS connections with the allowed client SVID, stdlib `ssl`, blocking, a thread each) and
an app (`--worker app`, a separate process, plain TCP, a thread per connection):

- to_app: the peer pushes 64 KiB writes as fast as it can; the app reads B bytes a second;
- from_app: the app pushes 64 KiB writes as fast as it can; the peer reads B bytes a
  second.

The sidecar's VmRSS is read every second for T seconds once all K connections are up.
Printed per direction: RSS at the first second, min, max, last, and the growth after a
5 s warm-up (goal: flat, taken here as under 1 MiB), a sample every 10 s, and how many
bytes the fast side got rid of versus the slow side read (the difference sits in socket
buffers: the kernel's, not the sidecar's RSS, plus at most one pending chunk per flow in
the sidecar).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

import compare_haproxy as ch
import memory_idle as mi

CHUNK = 64 * 1024
WARMUP = 5
FLAT_KIB = 1024
log = ch.log


def _pusher(sock: socket.socket | ssl.SSLSocket, counter: list[int], i: int) -> None:
    data = os.urandom(CHUNK)
    try:
        while True:
            sock.sendall(data)
            counter[i] += len(data)
    except OSError:
        pass


def _reader(sock: socket.socket | ssl.SSLSocket, counter: list[int], i: int,
            rate: int) -> None:
    try:
        nxt = time.monotonic()
        while True:
            got = sock.recv(rate)
            if not got:
                return
            counter[i] += len(got)
            nxt += len(got) / rate
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    except OSError:
        pass


def _serve_commands(counter: list[int]) -> None:
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            print("stats " + json.dumps(counter), flush=True)
        elif cmd == "exit":
            return


def worker_app(argv: list[str]) -> int:
    """`app MODE RATE STREAMS` (MODE push|read): listen, serve up to STREAMS connections;
    print `ready PORT`; answer `stats [bytes per connection]`."""
    mode, rate, streams = argv[0], int(argv[1]), int(argv[2])
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)
    counter = [0] * streams
    conns: list[socket.socket] = []

    def accept() -> None:
        for i in range(streams):
            c, _ = srv.accept()
            conns.append(c)
            target = _pusher if mode == "push" else _reader
            extra = () if mode == "push" else (rate,)
            threading.Thread(target=target, args=(c, counter, i, *extra), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(f"ready {srv.getsockname()[1]}", flush=True)
    _serve_commands(counter)
    return 0


def worker_peer(argv: list[str]) -> int:
    """`peer PORT CERT_DIR BUNDLE MODE RATE STREAMS`: open STREAMS mTLS connections, push or
    read slowly on each; print `up`; answer `stats [bytes per connection]`."""
    port, cert_dir, bundle = int(argv[0]), Path(argv[1]), Path(argv[2])
    mode, rate, streams = argv[3], int(argv[4]), int(argv[5])
    ctx = mi.client_context(cert_dir, bundle)
    counter = [0] * streams
    socks = []
    for i in range(streams):
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        tls = ctx.wrap_socket(raw)
        tls.settimeout(None)
        socks.append(tls)
        target = _pusher if mode == "push" else _reader
        extra = () if mode == "push" else (rate,)
        threading.Thread(target=target, args=(tls, counter, i, *extra), daemon=True).start()
    print("up", flush=True)
    _serve_commands(counter)
    return 0


mi.WORKERS["app"] = worker_app
mi.WORKERS["peer"] = worker_peer


def one_direction(direction: str, args: argparse.Namespace, p: ch.Pki,
                  work: Path) -> dict[str, Any]:
    d = work / direction
    d.mkdir()
    app_mode, peer_mode = ("read", "push") if direction == "to_app" else ("push", "read")
    app = mi.Worker(__file__, ["app", app_mode, str(args.read_rate), str(args.streams)], d,
                    "app")
    sc = peer = None
    try:
        app_port = int(app.expect("ready", 30).split()[1])
        sc = mi.start_sidecar(p, d, app_port, loop=args.loop)
        base = mi.rss_kib(sc.pid)
        log(f"{direction}: sidecar pid {sc.pid}, RSS {base} KiB at start; {args.streams} "
            f"streams, the {'peer' if peer_mode == 'push' else 'app'} pushes, the "
            f"{'app' if app_mode == 'read' else 'peer'} reads {args.read_rate} B/s")
        peer = mi.Worker(__file__, ["peer", str(sc.tls_port), str(p.client_dir),
                                    str(p.bundle), peer_mode, str(args.read_rate),
                                    str(args.streams)], d, "peer")
        peer.expect("up", 60, [sc.proc])
        series: list[tuple[float, int]] = []
        t0 = time.monotonic()
        for k in range(1, int(args.seconds) + 1):
            time.sleep(max(0.0, t0 + k - time.monotonic()))
            sc.proc.check_alive()
            series.append((round(time.monotonic() - t0, 1), mi.rss_kib(sc.pid)))
        fds = mi.fd_count(sc.pid)
        status = sc.status()["connections"]
        metrics = sc.metrics()
        app.send("stats")
        app_bytes = json.loads(app.expect("stats", 30).split(" ", 1)[1])
        peer.send("stats")
        peer_bytes = json.loads(peer.expect("stats", 30).split(" ", 1)[1])
    finally:
        # Both ends first, so that the sidecar's drain has nothing left to wait for.
        app.stop()
        if peer is not None:
            peer.stop()
        if sc is not None:
            t_stop = time.monotonic()
            sc.stop()
            log(f"{direction}: the sidecar stopped {time.monotonic() - t_stop:.1f} s after "
                "SIGTERM")
    values = [v for _, v in series]
    after = [v for t, v in series if t >= WARMUP] or values
    pushed, read = (peer_bytes, app_bytes) if peer_mode == "push" else (app_bytes, peer_bytes)
    return {
        "direction": direction, "streams": args.streams, "seconds": args.seconds,
        "rss_start_kib": base, "rss_first_kib": values[0], "rss_min_kib": min(values),
        "rss_max_kib": max(values), "rss_last_kib": values[-1],
        "growth_after_warmup_kib": after[-1] - after[0],
        "spread_after_warmup_kib": max(after) - min(after),
        "series": series, "fds": fds, "status": status,
        "pushed_bytes": sum(pushed), "read_bytes": sum(read),
        "bytes_metric": mi.metric_values(metrics, "sidecar_bytes_total"),
    }


def report(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        flat = (r["growth_after_warmup_kib"] <= FLAT_KIB
                and r["spread_after_warmup_kib"] <= FLAT_KIB)
        who = ("peer pushes, app reads" if r["direction"] == "to_app"
               else "app pushes, peer reads")
        lines += [
            f"{r['direction']}: {who} 1 KiB/s, {r['streams']} streams, {r['seconds']:.0f} s",
            f"  sidecar RSS KiB: at start {r['rss_start_kib']}, 1st second {r['rss_first_kib']},"
            f" min {r['rss_min_kib']}, max {r['rss_max_kib']}, last {r['rss_last_kib']}",
            f"  after the {WARMUP} s warm-up: growth {r['growth_after_warmup_kib']:+d} KiB, "
            f"spread {r['spread_after_warmup_kib']} KiB: "
            + ("flat" if flat else "NOT FLAT"),
            "  every 10 s: " + ", ".join(f"{t:.0f}s {v}" for t, v in r["series"]
                                         if round(t) % 10 == 0),
            f"  bytes: the fast side got rid of {r['pushed_bytes']}, the slow side read "
            f"{r['read_bytes']}; sidecar descriptors {r['fds']}, /status {r['status']}",
        ]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return mi.WORKERS[sys.argv[2]](sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="per direction (60)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--read-rate", type=int, default=1024, help="slow side, B/s (1024)")
    ap.add_argument("--directions", default="to_app,from_app")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    directions = [d for d in args.directions.split(",") if d]
    if not set(directions) <= {"to_app", "from_app"}:
        ap.error("--directions: to_app and/or from_app")
    def both(work: Path) -> list[dict[str, Any]]:
        p = ch.make_pki(work / "pki")
        return [one_direction(d, args, p, work) for d in directions]

    results = mi.in_workdir("backpressure", args.keep, both)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
