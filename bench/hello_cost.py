"""What one unauthenticated ClientHello costs the sidecar, and good clients during a flood
of the dearest one it accepts (issue 16, item 1).

Run (from the repo root):

    PYTHONPATH=. python bench/hello_cost.py                          # ~40 s
    PYTHONPATH=. python bench/hello_cost.py --sidecar-root /work/main  # another checkout's sidecar
    PYTHONPATH=. python bench/hello_cost.py --rounds 80 --flood-seconds 20 --json

Options: `--rounds N` (40 replays of each hello), `--flooders K` (8 connections in flight),
`--flood-seconds T` (10 s; as long again of good clients alone before it), `--good-rate R`
(20 handshakes a second), `--loop`, `--keep DIR`, `--json`, `--sidecar-root DIR` (the
checkout whose `sidecar` runs; this one by default: the hellos are crafted with this
checkout's `sidecar.tls.openssl.set_groups` either way).

One inbound sidecar (`python -m sidecar run`, the certificates of compare_haproxy.py, an
ECDSA P-256 SVID) in front of an echo app. Each ClientHello is captured once from the
stdlib client with its key-exchange groups set (a memory BIO), then replayed over fresh
TCP connections from loopback, as an attacker replays it: send it, read the answer's first
record header, hang up. Nothing here authenticates.

1. Cost per hello: for each offer, `--rounds` replays one after another; the figure is the
   sidecar loop thread's CPU (/proc/PID/schedstat, ns) over the batch, divided by the
   batch, read once the sidecar logged every connection. It includes accepting, logging
   and closing a connection (~1 ms of Python), which every hello pays. Offers: each group
   OpenSSL 3.0 knows, and offers whose first key share is refused (HelloRetryRequest).
2. Flood: `--flooders` threads replay the dearest hello the sidecar answered with a
   ServerHello (not an alert), as fast as it answers, for `--flood-seconds`, while a good
   client (storm.py's: full mTLS handshake, a 64-byte echo, close_notify) connects
   `--good-rate` times a second. Reported: its p50/p99 before and during the flood, the
   flood's rate, and /healthz latency during it.

Timing on these machines is noisy (see bench/README.md): read the ratio to X25519 and
the before/during p99 of one run, not absolute milliseconds across runs.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import compare_haproxy as ch
import memory_idle as mi
import storm

from sidecar.tls import openssl

log = ch.log

OFFERS = (
    "X25519", "P-256", "P-384", "P-521", "X448",
    "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192",
    "ffdhe8192:X25519", "P-521:P-256", "X448:P-384",  # first key share refused: a retry
)
HANDSHAKE, ALERT = 22, 21
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def client_hello(groups: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if not openssl.set_groups(ctx, groups):
        raise SystemExit(f"cannot offer {groups}: openssl.set_groups refused it")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname="payments")
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def replay(port: int, hello: bytes) -> bytes:
    """Send `hello`; the first 43 bytes of the answer (a record header and, for a
    ServerHello, its random), or what came before the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(hello)
        got = b""
        while len(got) < 43:
            more = s.recv(43 - len(got))
            if not more:
                break
            got += more
        return got


def outcome(answer: bytes) -> str:
    if answer[:1] == bytes([ALERT]) and len(answer) >= 7:
        return f"refused (alert {answer[6]})"
    if answer[:1] == bytes([HANDSHAKE]) and answer[5:6] == b"\x02":
        return "retry (HelloRetryRequest)" if answer[11:43] == HRR_RANDOM else "accepted"
    return f"other: {answer[:8].hex()}"


def loop_cpu(pid: int) -> float:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def connection_lines(sc: mi.Sidecar) -> int:
    return sum(1 for r in sc.log_records() if r.get("msg") == "connection")


def wait_logged(sc: mi.Sidecar, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while connection_lines(sc) < count:
        sc.proc.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sidecar logged {connection_lines(sc)} of {count} lines")
        time.sleep(0.05)


@dataclass
class Cost:
    offer: str
    outcome: str
    ms: float  # loop CPU per hello


def cost_per_hello(sc: mi.Sidecar, pid: int, offer: str, rounds: int) -> Cost:
    hello = client_hello(offer)
    before_lines = connection_lines(sc)
    before = loop_cpu(pid)
    answers = [replay(sc.tls_port, hello) for _ in range(rounds)]
    wait_logged(sc, before_lines + rounds)
    ms = (loop_cpu(pid) - before) / rounds * 1000
    return Cost(offer, outcome(answers[0]), ms)


@dataclass
class Flood:
    hello: bytes
    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    errors: int = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                replay(self.port, self.hello)
                self.sent += 1  # threads may race here: a rate estimate is all it is
            except OSError:
                self.errors += 1


def healthz_ms(port: int) -> float:
    t0 = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
        r.read()
    return (time.monotonic() - t0) * 1000


def good_phase(good: mi.Worker, seconds: float, sc: mi.Sidecar) -> tuple[list[float], int,
                                                                          list[float]]:
    """Good clients for `seconds`: their latencies (ms), failures, /healthz latencies."""
    good.send("start")
    good.expect("started", 30)
    health: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        health.append(healthz_ms(sc.admin_port))
        time.sleep(0.25)
    good.send("stop")
    rows = json.loads(good.expect("results", 120, [sc.proc]).split(" ", 1)[1])
    ok = [r[1] * 1000 for r in rows if r[1] is not None]
    return ok, sum(1 for r in rows if r[1] is None), health


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    p = ch.make_pki(work / "pki")
    echo, echo_port = mi.start_echo(mi.__file__, work)
    sc: mi.Sidecar | None = None
    goods: list[mi.Worker] = []
    try:
        own_root = mi.ROOT
        if args.sidecar_root:
            mi.ROOT = Path(args.sidecar_root).resolve()  # only the sidecar runs that code
        try:
            sc = mi.start_sidecar(p, work, echo_port, loop=args.loop)
        finally:
            mi.ROOT = own_root
        status = sc.status()
        pid = int(status["workers"][0]["pid"]) if status.get("workers") else sc.pid
        log(f"sidecar: pid {pid}, listening on {sc.tls_port}")
        cost_per_hello(sc, pid, "X25519", 5)  # warm-up: first-use costs stay out
        costs = []
        for offer in OFFERS:
            c = cost_per_hello(sc, pid, offer, args.rounds)
            log(f"{offer:18s} {c.ms:8.2f} ms  {c.outcome}")
            costs.append(c)
        accepted = [c for c in costs if c.outcome in ("accepted", "retry (HelloRetryRequest)")]
        dearest = max(accepted, key=lambda c: c.ms)
        x25519 = next(c for c in costs if c.offer == "X25519")

        def good_worker(name: str) -> mi.Worker:
            w = mi.Worker(storm.__file__, ["good", str(sc.tls_port), str(p.client_dir),
                                           str(p.bundle), str(args.good_rate)], work, name)
            goods.append(w)
            return w

        log(f"good clients alone for {args.flood_seconds} s")
        quiet, quiet_failed, quiet_health = good_phase(good_worker("good-alone"),
                                                       args.flood_seconds, sc)
        log(f"flood of {dearest.offer} hellos ({args.flooders} in flight) "
            f"for {args.flood_seconds} s, good clients meanwhile")
        flood = Flood(client_hello(dearest.offer), sc.tls_port)
        threads = [threading.Thread(target=flood.run, daemon=True)
                   for _ in range(args.flooders)]
        cpu0, t0 = loop_cpu(pid), time.monotonic()
        for t in threads:
            t.start()
        try:
            loud, loud_failed, loud_health = good_phase(good_worker("good-flood"),
                                                        args.flood_seconds, sc)
        finally:
            flood.stop.set()
            for t in threads:
                t.join(60)
        elapsed = time.monotonic() - t0
        loop_share = (loop_cpu(pid) - cpu0) / elapsed
        sc.proc.check_alive()
    finally:
        for w in goods:
            w.stop()
        if sc is not None:
            sc.stop()
        echo.stop()
    return {
        "costs": [c.__dict__ for c in costs],
        "dearest": dearest.__dict__,
        "x25519_ms": x25519.ms,
        "ratio": dearest.ms / x25519.ms,
        "flood": {"offer": dearest.offer, "hellos_per_s": flood.sent / elapsed,
                  "errors": flood.errors, "loop_cpu_share": loop_share},
        "good": {
            "alone": summary(quiet, quiet_failed, quiet_health),
            "flood": summary(loud, loud_failed, loud_health),
        },
    }


def summary(ms: list[float], failed: int, health: list[float]) -> dict[str, Any]:
    return {"n": len(ms), "failed": failed, "p50_ms": storm.pct(ms, 0.5),
            "p99_ms": storm.pct(ms, 0.99), "max_ms": max(ms, default=None),
            "healthz_max_ms": max(health, default=None)}


def report(r: dict[str, Any]) -> str:
    lines = ["loop CPU per unauthenticated ClientHello (ms, incl. ~accept/log/close):"]
    for c in r["costs"]:
        lines.append(f"  {c['offer']:18s} {c['ms']:8.2f}  {c['outcome']}")
    d = r["dearest"]
    lines.append(f"dearest accepted: {d['offer']} {d['ms']:.2f} ms = "
                 f"{r['ratio']:.1f}x X25519 ({r['x25519_ms']:.2f} ms)")
    f = r["flood"]
    lines.append(f"flood of {f['offer']}: {f['hellos_per_s']:.0f} hellos/s answered, "
                 f"sidecar loop busy {f['loop_cpu_share'] * 100:.0f}% of a core")
    for phase, g in r["good"].items():
        lines.append(
            f"good clients {phase:5s}: n={g['n']} failed={g['failed']} "
            f"p50={_ms(g['p50_ms'])} p99={_ms(g['p99_ms'])} max={_ms(g['max_ms'])} ms; "
            f"/healthz max {_ms(g['healthz_max_ms'])} ms")
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--flooders", type=int, default=8)
    ap.add_argument("--flood-seconds", type=float, default=10.0)
    ap.add_argument("--good-rate", type=float, default=20.0)
    ap.add_argument("--loop", default="uvloop")
    ap.add_argument("--sidecar-root", type=Path)
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = mi.in_workdir("hello-cost", args.keep, lambda work: run(args, work))
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
