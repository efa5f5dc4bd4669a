"""Full-handshake rate with `workers: 1` and `workers: 2`, measured in the same run.

Starts an echo app and two inbound sidecars on loopback (one with one worker, one with
two), then runs `sidecar bench --mode full` against each, alternating for a few rounds so
both see the same background load, and prints the median handshakes/s of each and their
ratio. On a 2-core machine the load generator shares the cores with the proxy, so the
ratio says how much a second worker gains when the client is also competing for CPU.

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


def _rate(port: int, client: dict[str, str], seconds: float, concurrency: int) -> float:
    run = subprocess.run(
        [sys.executable, "-m", "sidecar", "bench", "--target", f"127.0.0.1:{port}",
         "--cert", client["cert"], "--key", client["key"], "--bundle", client["bundle"],
         "--mode", "full", "--duration", f"{seconds}s", "--concurrency", str(concurrency),
         "--json"], capture_output=True, text=True, env=ENV, timeout=seconds + 60)
    result = json.loads(run.stdout)[0]
    return float(result["handshakes_per_s"])


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
        try:
            for r in range(args.rounds):
                for n in (1, 2) if r % 2 == 0 else (2, 1):
                    rates[n].append(_rate(procs[n][1], files["client"], args.seconds,
                                          args.concurrency))
                    print(f"round {r + 1}: workers {n}: {rates[n][-1]:.0f} handshakes/s",
                          file=sys.stderr)
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


if __name__ == "__main__":
    main()
