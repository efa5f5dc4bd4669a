"""Limits under a storm of stalled handshakes, and good clients meanwhile (issue 11, item 3).

Run (from the repo root):

    PYTHONPATH=. python bench/storm.py                          # ~45 s
    PYTHONPATH=. python bench/storm.py --max-connections 256    # the listener-pause case
    PYTHONPATH=. python bench/storm.py --storm 4000 --storm-seconds 30 --json

Options: `--storm S` (2000 stalled sockets held at once), `--slow-share F` (0.5: the share
that sends one byte of a ClientHello a second; the rest never send a byte),
`--reconnect-delay D` (0 s: a stalled socket the sidecar closes is reopened at once, so
the flood keeps its size), `--handshake-timeout` (2s), `--max-pending` (256),
`--max-connections` (1024), `--good-rate R` (20 connections a second in all),
`--good-clients K` (2 processes), `--before B` (10 s), `--storm-seconds T` (20 s),
`--after A` (5 s), `--loop`, `--keep DIR`, `--json`.

One inbound sidecar (`python -m sidecar run --loop uvloop`, the certificates of
compare_haproxy.py, `limits: {handshake_timeout, max_pending_handshakes, max_connections}`
from the flags) in front of an asyncio echo app (a separate process):

- good clients (`--worker good`, from 127.0.0.2): paced full mTLS handshakes with the
  allowed SVID, a 64-byte round trip, close_notify; latency = connect to echo received;
  any failure (reset, EOF during the handshake, timeout after 10 s) is counted;
- the storm (`--worker storm`, one asyncio process, from 127.0.0.3): S sockets connect
  and stall; when the sidecar closes one, it reconnects (after D);
- phases: B s of good clients alone, T s of storm, A s after it.

Reported: good clients' p50/p99/max latency and failures per phase; the most open
connections and pending handshakes the sidecar reported (/status, polled every 0.2 s)
against the limits; how the stalled peers were closed, from the sidecar's access log
(`reason: handshake_timeout`: the timeout proper, or `evicted: max_pending_handshakes`)
and its metrics (`sidecar_connections_rejected_total`, `sidecar_handshake_errors_total`);
how long the storm's sockets lived before the sidecar closed them; and /healthz latency
during the storm (the event loop's responsiveness).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import compare_haproxy as ch
import memory_idle as mi

GOOD_SOURCE = "127.0.0.2"
STORM_SOURCE = "127.0.0.3"
log = ch.log


# --- good clients ------------------------------------------------------------------------


def worker_good(argv: list[str]) -> int:
    """`good PORT CERT_DIR BUNDLE RATE`: on `start`, paced connections until `stop`; then
    answer `results [[t_start, latency_or_null, error_or_null], ...]`."""
    port, cert_dir, bundle, rate = int(argv[0]), Path(argv[1]), Path(argv[2]), float(argv[3])
    ctx = mi.client_context(cert_dir, bundle)
    stop = threading.Event()
    out: list[tuple[float, float | None, str | None]] = []

    def one() -> None:
        t0 = time.monotonic()
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                           source_address=(GOOD_SOURCE, 0))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = ctx.wrap_socket(raw)
            try:
                if ch.echo_once(tls) != ch.REQUEST:
                    raise ConnectionError("EOF before the echo")
                latency = time.monotonic() - t0
                try:
                    tls.unwrap()
                except (OSError, ValueError):
                    pass
            finally:
                tls.close()
            out.append((t0, latency, None))
        except (OSError, ValueError) as exc:
            out.append((t0, None, f"{type(exc).__name__}: {exc}"[:120]))

    def loop() -> None:
        nxt = time.monotonic()
        while not stop.is_set():
            one()
            nxt += 1.0 / rate
            delay = nxt - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            else:
                nxt = time.monotonic()  # behind: do not burst to catch up

    th: threading.Thread | None = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "start":
            th = threading.Thread(target=loop, daemon=True)
            th.start()
            print("started", flush=True)
        elif cmd == "stop":
            stop.set()
            if th is not None:
                th.join(30)
            print("results " + json.dumps(out), flush=True)
        elif cmd == "exit":
            break
    return 0


# --- the storm ---------------------------------------------------------------------------


def client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client, to drip one byte at a time."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def worker_storm(argv: list[str]) -> int:
    """`storm PORT SILENT SLOW RECONNECT_DELAY`: on `start`, hold SILENT + SLOW stalled
    sockets (reopening those the sidecar closes) until `stop`; answer `stormed {json}`."""
    port, silent, slow, delay = int(argv[0]), int(argv[1]), int(argv[2]), float(argv[3])
    hello = client_hello()
    stats: dict[str, Any] = {"connects": 0, "connect_failures": 0, "closed_by_sidecar": 0,
                             "lifetimes": [], "bytes_dripped": 0, "open": 0, "max_open": 0}

    async def one(slowly: bool, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.bind((STORM_SOURCE, 0))
                async with asyncio.timeout(10):
                    await loop.sock_connect(sock, ("127.0.0.1", port))
            except (OSError, TimeoutError):
                stats["connect_failures"] += 1
                sock.close()
                await asyncio.sleep(0.1)
                continue
            stats["connects"] += 1
            stats["open"] += 1
            stats["max_open"] = max(stats["max_open"], stats["open"])
            t0 = time.monotonic()
            closed = False
            try:
                if slowly:
                    for i in range(len(hello)):
                        await loop.sock_sendall(sock, hello[i:i + 1])
                        stats["bytes_dripped"] += 1
                        try:
                            async with asyncio.timeout(1.0):
                                if not await loop.sock_recv(sock, 4096):
                                    closed = True
                                    break
                        except TimeoutError:
                            pass
                else:
                    while await loop.sock_recv(sock, 4096):
                        pass
                    closed = True
            except (ConnectionError, OSError):
                closed = True
            finally:
                stats["open"] -= 1
                sock.close()
            if closed:
                stats["closed_by_sidecar"] += 1
                stats["lifetimes"].append(round(time.monotonic() - t0, 3))
            if delay:
                await asyncio.sleep(delay)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "start":
            return
        tasks = [asyncio.create_task(one(i < slow, stop)) for i in range(silent + slow)]
        print("started", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # stop
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        print("stormed " + json.dumps(stats), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # exit

    mi._run_asyncio(main())
    return 0


mi.WORKERS["good"] = worker_good
mi.WORKERS["storm"] = worker_storm


# --- watching the sidecar ----------------------------------------------------------------


class Monitor:
    """Polls /status, /healthz, RSS and descriptors every `every` s in a thread."""

    def __init__(self, sc: mi.Sidecar, every: float = 0.2) -> None:
        self.sc, self.every = sc, every
        self.rows: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            row: dict[str, Any] = {"t": t}
            try:
                conns = self.sc.status()["connections"]
                row["active"] = conns.get("active")
                row["pending"] = conns.get("pending_handshakes")
                t1 = time.monotonic()
                mi.http_get(self.sc.admin_port, "/healthz")
                row["healthz_s"] = time.monotonic() - t1
                row["rss_kib"] = mi.rss_kib(self.sc.pid)
                row["fds"] = mi.fd_count(self.sc.pid)
            except (OSError, ValueError, KeyError) as exc:
                row["error"] = repr(exc)
            self.rows.append(row)
            self._stop.wait(max(0.0, self.every - (time.monotonic() - t)))

    def stop(self) -> None:
        self._stop.set()
        self._th.join(10)

    def between(self, a: float, b: float) -> list[dict[str, Any]]:
        return [r for r in self.rows if a <= r["t"] < b]


# --- the run -----------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    p = ch.make_pki(work / "pki")
    echo, echo_port = mi.start_echo(mi.__file__, work)
    sc = mon = None
    goods: list[mi.Worker] = []
    storm: mi.Worker | None = None
    try:
        limits = {"handshake_timeout": args.handshake_timeout,
                  "max_pending_handshakes": args.max_pending,
                  "max_connections": args.max_connections}
        sc = mi.start_sidecar(p, work, echo_port, limits=limits, loop=args.loop)
        log(f"sidecar: pid {sc.pid}, listening on {sc.tls_port}, limits {limits}")
        base_fds = mi.fd_count(sc.pid)
        rate = args.good_rate / args.good_clients
        goods = [mi.Worker(__file__, ["good", str(sc.tls_port), str(p.client_dir),
                                      str(p.bundle), str(rate)], work, f"good{i}")
                 for i in range(args.good_clients)]
        slow = round(args.storm * args.slow_share)
        storm = mi.Worker(__file__, ["storm", str(sc.tls_port), str(args.storm - slow),
                                     str(slow), str(args.reconnect_delay)], work, "storm")
        mon = Monitor(sc)
        t_begin = time.monotonic()
        for w in goods:
            w.send("start")
        for w in goods:
            w.expect("started", 30)
        log(f"good clients alone for {args.before} s")
        time.sleep(args.before)
        t_storm = time.monotonic()
        storm.send("start")
        storm.expect("started", 60, [sc.proc])
        log(f"storm of {args.storm} stalled sockets ({slow} slow) for {args.storm_seconds} s")
        time.sleep(args.storm_seconds)
        storm.send("stop")
        storm_stats = json.loads(storm.expect("stormed", 120, [sc.proc]).split(" ", 1)[1])
        t_after = time.monotonic()
        log(f"storm stopped; good clients alone for {args.after} s")
        time.sleep(args.after)
        good_rows: list[list[Any]] = []
        for w in goods:
            w.send("stop")
        for w in goods:
            good_rows += json.loads(w.expect("results", 120).split(" ", 1)[1])
        t_end = time.monotonic()
        # Let the last stalled handshakes time out before reading the counters.
        time.sleep(float(args.handshake_timeout.rstrip("s")) + 1.5)
        mon.stop()
        sc.proc.check_alive()
        metrics = sc.metrics()
        status_end = sc.status()["connections"]
    finally:
        if mon is not None:
            mon.stop()
        for w in goods:
            w.stop()
        if storm is not None:
            storm.stop()
        if sc is not None:
            sc.stop()
        echo.stop()

    phases = {"before": (t_begin, t_storm), "during": (t_storm, t_after),
              "after": (t_after, t_end)}
    good: dict[str, Any] = {}
    for name, (a, b) in phases.items():
        rows = [r for r in good_rows if a <= r[0] < b]
        lat = [r[1] * 1000 for r in rows if r[1] is not None]
        errs: dict[str, int] = {}
        for r in rows:
            if r[2] is not None:
                errs[r[2]] = errs.get(r[2], 0) + 1
        good[name] = {"count": len(rows), "ok": len(lat), "failed": len(rows) - len(lat),
                      "p50_ms": pct(lat, 0.50), "p99_ms": pct(lat, 0.99),
                      "max_ms": max(lat) if lat else None,
                      "mean_ms": statistics.fmean(lat) if lat else None, "errors": errs}
    # The sidecar's access log: who was closed, why.
    closes: dict[str, dict[str, int]] = {}
    for rec in sc.log_records():
        if rec.get("logger") != "sidecar.access":
            continue
        who = {GOOD_SOURCE: "good", STORM_SOURCE: "storm"}.get(
            str(rec.get("peer_addr", "")).rsplit(":", 1)[0], "other")
        reason = rec.get("reason") or rec.get("close") or "?"
        if reason == "handshake_timeout":
            detail = str(rec.get("detail") or "")
            reason += " (evicted)" if detail.startswith("evicted") else " (timeout)"
        bucket = closes.setdefault(who, {})
        bucket[reason] = bucket.get(reason, 0) + 1
    during = mon.between(t_storm, t_after + 2)
    every = mon.rows
    lifetimes = storm_stats.pop("lifetimes")
    return {
        "limits": limits, "storm_size": args.storm, "slow": slow,
        "seconds": {"before": args.before, "storm": args.storm_seconds, "after": args.after},
        "good": good, "storm": storm_stats,
        "storm_lifetime_s": {"p50": pct(lifetimes, 0.5), "p99": pct(lifetimes, 0.99),
                             "max": max(lifetimes) if lifetimes else None,
                             "closed": len(lifetimes)},
        "max_active": max((r.get("active") or 0 for r in every), default=None),
        "max_pending": max((r.get("pending") or 0 for r in every), default=None),
        "max_fds": max((r.get("fds") or 0 for r in every), default=None),
        "base_fds": base_fds,
        "rss_kib": {"before": next((r["rss_kib"] for r in every if "rss_kib" in r), None),
                    "max": max((r.get("rss_kib") or 0 for r in every), default=None),
                    "end": next((r["rss_kib"] for r in reversed(every) if "rss_kib" in r),
                                None)},
        "healthz_ms_during": {
            "p50": pct([r["healthz_s"] * 1000 for r in during if "healthz_s" in r], 0.5),
            "p99": pct([r["healthz_s"] * 1000 for r in during if "healthz_s" in r], 0.99),
            "max": max((r["healthz_s"] * 1000 for r in during if "healthz_s" in r),
                       default=None)},
        "monitor_errors": sum(1 for r in every if "error" in r),
        # (seconds since the storm began, RSS KiB), every 2 s: a plateau or a climb.
        "rss_series": [(round(r["t"] - t_storm, 1), r["rss_kib"]) for r in every[::10]
                       if "rss_kib" in r],
        "closes_from_access_log": closes,
        "rejected": mi.metric_values(metrics, "sidecar_connections_rejected_total"),
        "handshake_errors": mi.metric_values(metrics, "sidecar_handshake_errors_total"),
        "handshakes": mi.metric_values(metrics, "sidecar_handshakes_total"),
        "status_at_end": status_end,
    }


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def report(r: dict[str, Any]) -> str:
    lim = r["limits"]
    s = r["storm"]
    lines = [
        f"storm: {r['storm_size']} stalled sockets ({r['slow']} dripping a ClientHello at "
        f"1 byte/s, the rest silent), reopened when closed, for {r['seconds']['storm']} s; "
        f"limits {lim}",
        "good clients (full mTLS handshake + 64-byte echo + close_notify), latency in ms:",
        f"  {'phase':8}{'conns':>7}{'failed':>8}{'p50':>9}{'p99':>9}{'max':>9}",
    ]
    for name in ("before", "during", "after"):
        g = r["good"][name]
        lines.append(f"  {name:8}{g['count']:>7}{g['failed']:>8}{ch._num(g['p50_ms'], '9.1f')}"
                     f"{ch._num(g['p99_ms'], '9.1f')}{ch._num(g['max_ms'], '9.1f')}")
        for e, n in sorted(g["errors"].items(), key=lambda kv: -kv[1])[:5]:
            lines.append(f"            {n} x {e}")
    ok_active = r["max_active"] is not None and r["max_active"] <= lim["max_connections"]
    ok_pending = r["max_pending"] is not None and r["max_pending"] <= lim["max_pending_handshakes"]
    lines += [
        "limits (the most the sidecar reported, /status every 0.2 s):",
        f"  open connections   {r['max_active']:>6} / max_connections "
        f"{lim['max_connections']}: {'held' if ok_active else 'EXCEEDED'}",
        f"  pending handshakes {r['max_pending']:>6} / max_pending_handshakes "
        f"{lim['max_pending_handshakes']}: {'held' if ok_pending else 'EXCEEDED'}",
        f"  descriptors        {r['max_fds']:>6} (at start {r['base_fds']})",
        f"  RSS KiB: before {r['rss_kib']['before']}, max {r['rss_kib']['max']}, "
        f"end {r['rss_kib']['end']}",
        "  RSS KiB every 2 s (s from the storm's start): "
        + ", ".join(f"{t:.0f}:{v // 1024}M" for t, v in r["rss_series"]),
        f"  /healthz during the storm, ms: p50 {_f(r['healthz_ms_during']['p50'], '.1f')}"
        f", p99 {_f(r['healthz_ms_during']['p99'], '.1f')}, max "
        f"{_f(r['healthz_ms_during']['max'], '.1f')}"
        + (f"  ({r['monitor_errors']} polls failed)" if r["monitor_errors"] else ""),
        f"the storm: {s['connects']} connects ({s['connects'] / r['seconds']['storm']:.0f}/s),"
        f" {s['connect_failures']} connect failures, {s['closed_by_sidecar']} closed by the "
        f"sidecar, at most {s['max_open']} open at once",
        f"  lifetime of a stalled socket until the sidecar closed it, s: p50 "
        f"{_f(r['storm_lifetime_s']['p50'], '.2f')}, p99 "
        f"{_f(r['storm_lifetime_s']['p99'], '.2f')}, max "
        f"{_f(r['storm_lifetime_s']['max'], '.2f')}",
        "closes in the sidecar's access log, by source:",
    ]
    for who, reasons in sorted(r["closes_from_access_log"].items()):
        lines.append(f"  {who:6} " + ", ".join(f"{k} {v}" for k, v in
                                                sorted(reasons.items(), key=lambda kv: -kv[1])))
    lines.append("metrics:")
    for name in ("rejected", "handshake_errors"):
        for k, v in sorted(r[name].items()):
            lines.append(f"  {name}{k} {v:.0f}")
    lines.append(f"  /status at the end: {r['status_at_end']}")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return mi.WORKERS[sys.argv[2]](sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storm", type=int, default=2000, help="stalled sockets at once (2000)")
    ap.add_argument("--slow-share", type=float, default=0.5)
    ap.add_argument("--reconnect-delay", type=float, default=0.0)
    ap.add_argument("--handshake-timeout", default="2s")
    ap.add_argument("--max-pending", type=int, default=256)
    ap.add_argument("--max-connections", type=int, default=1024)
    ap.add_argument("--good-rate", type=float, default=20.0,
                    help="good connections a second, all good clients together (20)")
    ap.add_argument("--good-clients", type=int, default=2)
    ap.add_argument("--before", type=float, default=10.0)
    ap.add_argument("--storm-seconds", type=float, default=20.0)
    ap.add_argument("--after", type=float, default=5.0)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.handshake_timeout.endswith("s") or args.handshake_timeout.endswith("ms"):
        ap.error("--handshake-timeout: give seconds, like 2s")
    if args.storm + 100 > mi.fd_limit():
        ap.error(f"--storm {args.storm} does not fit the open-file limit {mi.fd_limit()}")
    r = mi.in_workdir("storm", args.keep, lambda work: run(args, work))
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
