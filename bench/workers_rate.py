"""Full-handshake rate with `workers: 1` and `workers: 2`, measured in the same run.

Starts an echo app and two inbound sidecars on loopback (one with one worker, one with
two), then runs `sidecar bench --mode full` against each, alternating for a few rounds so
both see the same background load, and prints the median handshakes/s of each and their
ratio. On a 2-core machine the load generator shares the cores with the proxy, so the
ratio says how much a second worker gains when the client is also competing for CPU.

What this machine can show of `workers: N` giving N times the rate on N free cores is its
two preconditions, measured around each round from /proc (user + system time of the
supervisor and every worker): the sidecar's CPU per handshake does not grow with a second
worker (no shared lock, no cross-worker work), and the kernel's SO_REUSEPORT spreads the
connections evenly (each worker's share of the CPU). The rate N free cores would give is
then N / (CPU per handshake); the script prints it as a projection, not as a measurement.

    PYTHONPATH=. python bench/workers_rate.py [--rounds 3] [--seconds 5] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from sidecar.tools import pki

TD = "example.org"
CLIENT = f"spiffe://{TD}/ns/web/sa/frontend"
SERVER = f"spiffe://{TD}/ns/default/sa/payments"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _echo_server() -> int:
    """An asyncio echo app in a thread; returns its port."""
    ready: list[int] = []
    started = threading.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass  # the bench client's connection ended abruptly: nothing to echo
        finally:
            w.close()

    async def serve() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.append(srv.sockets[0].getsockname()[1])
        started.set()
        await srv.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    started.wait(10)
    return ready[0]


def _sidecar(d: Path, name: str, workers: int, app_port: int, files: dict[str, str]
             ) -> tuple[subprocess.Popen[bytes], int]:
    (d / "policy.yaml").write_text(json.dumps({"default": "deny", "rules": [
        {"name": "client", "action": "allow", "from": [CLIENT]}]}))
    cfg = d / f"{name}.yaml"
    cfg.write_text(json.dumps({
        "identity": files, "workers": workers, "admin": {"listen": "127.0.0.1:0"},
        "inbound": [{"name": "in", "listen": "127.0.0.1:0",
                     "forward_to": f"127.0.0.1:{app_port}"}],
        "policy": str(d / "policy.yaml"), "log": {"level": "info", "format": "json"},
        "limits": {"max_connections": 4000}}))
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(cfg)],
                            stderr=subprocess.PIPE, env={**ENV})
    assert proc.stderr is not None
    port = 0
    for raw in proc.stderr:
        try:
            line = json.loads(raw)
        except ValueError:
            continue  # a library's warning, not one of our lines
        if line.get("msg") == "listening" and line.get("listener") == "in":
            port = int(line["address"].rpartition(":")[2])
        if line.get("msg") == "ready" and "worker" not in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    return proc, port


def _tree(pid: int) -> list[int]:
    """The process and its descendants (the supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def _cpu_by_pid(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each process in the tree."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in _tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        out[p] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def _rate(port: int, client: dict[str, str], seconds: float, concurrency: int
          ) -> tuple[float, int]:
    run = subprocess.run(
        [sys.executable, "-m", "sidecar", "bench", "--target", f"127.0.0.1:{port}",
         "--cert", client["cert"], "--key", client["key"], "--bundle", client["bundle"],
         "--mode", "full", "--duration", f"{seconds}s", "--concurrency", str(concurrency),
         "--json"], capture_output=True, text=True, env=ENV, timeout=seconds + 60)
    result = json.loads(run.stdout)[0]
    return float(result["handshakes_per_s"]), int(result["handshakes"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        root = pki.new_root(TD)
        inter = pki.new_intermediate(root)
        files = {}
        for who, sid in (("server", SERVER), ("client", CLIENT)):
            names = pki.write_svid(d / who, pki.issue_svid(inter, sid), [root.cert])
            files[who] = {"cert": str(d / who / names.cert), "key": str(d / who / names.key),
                          "bundle": str(d / who / names.bundle)}
        app = _echo_server()
        procs = {n: _sidecar(d, f"w{n}", n, app, files["server"]) for n in (1, 2)}
        rates: dict[int, list[float]] = {1: [], 2: []}
        cpu_ms: dict[int, list[float]] = {1: [], 2: []}
        shares: dict[int, list[float]] = {1: [], 2: []}
        supervisor_ms: dict[int, list[float]] = {1: [], 2: []}
        try:
            for r in range(args.rounds):
                for n in (1, 2) if r % 2 == 0 else (2, 1):
                    before = _cpu_by_pid(procs[n][0].pid)
                    rate, count = _rate(procs[n][1], files["client"], args.seconds,
                                        args.concurrency)
                    after = _cpu_by_pid(procs[n][0].pid)
                    used = {p: after[p] - before.get(p, 0.0) for p in after}
                    rates[n].append(rate)
                    cpu_ms[n].append(1000 * sum(used.values()) / count)
                    workers = sorted((v for p, v in used.items() if p != procs[n][0].pid),
                                     reverse=True)
                    shares[n].append(workers[0] / sum(workers) if n > 1 else 1.0)
                    supervisor_ms[n].append(1000 * used[procs[n][0].pid] / count)
                    print(f"round {r + 1}: workers {n}: {rate:.0f} handshakes/s, "
                          f"{cpu_ms[n][-1]:.2f} ms sidecar CPU per handshake (supervisor "
                          f"{supervisor_ms[n][-1]:.2f}), busiest "
                          f"worker {shares[n][-1]:.0%} of the workers' CPU", file=sys.stderr)
        finally:
            for proc, _ in procs.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"full mTLS handshakes/s, median of {args.rounds} alternating rounds "
          f"({args.seconds:.0f} s each, concurrency {args.concurrency}, {os.cpu_count()} CPUs "
          "shared with the load generator)")
    print(f"  workers: 1  {one:8.0f}   {rates[1]}")
    print(f"  workers: 2  {two:8.0f}   {rates[2]}")
    print(f"  ratio       {two / one:8.2f}")
    c1, c2 = statistics.median(cpu_ms[1]), statistics.median(cpu_ms[2])
    print("sidecar CPU per handshake (supervisor + workers, user + system), median:")
    print(f"  workers: 1  {c1:6.2f} ms")
    print(f"  workers: 2  {c2:6.2f} ms   ratio {c2 / c1:.2f} (1.00: a second worker adds no "
          "work per handshake)")
    print(f"  busiest of 2 workers: {statistics.median(shares[2]):.0%} of their CPU "
          "(50%: SO_REUSEPORT spreads the connections evenly)")
    print("projection, not measured here: with N free cores the sidecar alone could do "
          f"N x {1000 / c2:.0f} full handshakes/s (N / CPU per handshake with 2 workers)")


if __name__ == "__main__":
    main()
