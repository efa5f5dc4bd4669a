"""Instructions per full mTLS connection with `workers: 1` and `workers: 2`, under callgrind.

`workers: N` can give N times the full-handshake rate only if a second worker adds no work
per connection (no shared lock, no cross-worker chatter, no per-worker cost that grows with
N) and the kernel spreads the connections evenly. CPU time cannot show the first on a
machine whose cores the load generator shares (processes time-sliced on the same cores
slow each other through the caches); instruction counts can, since they do not move with
the noise. So each sidecar runs under `valgrind --tool=callgrind --trace-children=yes
--instr-atstart=no`; instrumentation is switched on in the supervisor and every worker,
a warm-up runs, a `callgrind_control -d` of each process marks the start, the measured
connections run, and a second dump of each holds exactly their cost (as compare_haproxy.py
does for one process). Both configurations use stateless tickets (the memory store is
per process, so with workers it would change what a connection costs) and the same
client, certificates and echo backend.

    PYTHONPATH=. python bench/workers_instructions.py [--connections 200] [--keep DIR]

Prints, for each N: the instructions per connection summed over the supervisor and the
workers; the same without the timers that fired (the event-loop lag probe, every 10 ms
while there is work, and the once-a-second sweep, in which a worker also reports its state
to the supervisor): those cost per second, not per connection, and callgrind's slowdown
stretches the seconds ~50x; the timers' instructions per (callgrind) second; the
supervisor's part; and each worker's share of the workers' instructions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from compare_haproxy import (
    CLIENT_ID,
    IO_TIMEOUT,
    Pki,
    Proc,
    callgrind_control,
    callgrind_dump,
    client_context,
    drive_connections,
    free_port,
    instructions,
    make_pki,
    missing_tools,
    serving,
    sidecar_env,
    work_dir,
)


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _timers(dump: Path) -> int:
    """Instructions spent in fired timers (uvloop's TimerHandle._run, inclusive): the lag
    probe and the once-a-second sweep, which cost per second of wall time, not per
    connection, so callgrind's ~50x slowdown inflates them per connection."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100",
                          str(dump)], capture_output=True, text=True, timeout=IO_TIMEOUT)
    for line in out.stdout.splitlines():
        if "TimerHandle__run " in line:
            return int(line.split()[0].replace(",", ""))
    return 0


def _ready(proc: Proc) -> bool:
    proc.check_alive()
    for raw in proc.log_text().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue  # valgrind's or a library's words
        if line.get("msg") == "ready" and "worker" not in line:
            return True
    return False


def measure(workers: int, work: Path, p: Pki, echo_port: int, connections: int,
            warmup: int) -> Result:
    port = free_port()
    (work / "policy.yaml").write_text(
        f"default: deny\nrules:\n  - name: client\n    action: allow\n"
        f"    from: [\"{CLIENT_ID}\"]\n")
    config = work / f"workers{workers}.yaml"
    server = p.server_dir
    config.write_text(
        f"identity:\n  cert: {server}/svid.pem\n  key: {server}/svid_key.pem\n"
        f"  bundle: {server}/bundle.pem\n  watch: false\n"
        f"inbound:\n  - name: app\n    listen: 127.0.0.1:{port}\n"
        f"    forward_to: 127.0.0.1:{echo_port}\n"
        f"policy: policy.yaml\nworkers: {workers}\n"
        "tls:\n  session_store: tickets\n"
        f"admin:\n  listen: 127.0.0.1:{free_port()}\n"
        "limits:\n  handshake_timeout: 60s\n"  # a callgrind'ed first handshake is slow
        "log:\n  level: info\n  format: json\n")
    prefix = work / f"cg-w{workers}"
    argv = ["valgrind", "--tool=callgrind", "-q", "--trace-children=yes",
            "--instr-atstart=no", f"--callgrind-out-file={prefix}.%p",
            sys.executable, "-m", "sidecar", "run", "-c", str(config)]
    proc = Proc(f"sidecar-w{workers}", argv, work, callgrind=False, env=sidecar_env())
    try:
        deadline = time.monotonic() + 600
        while not _ready(proc):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers: {workers} not ready:\n{proc.log_text()[-3000:]}")
            time.sleep(0.5)
        workers_pids = _children(proc.pid) if workers > 1 else []
        pids = [proc.pid, *workers_pids]
        for pid in pids:
            callgrind_control(pid, "-i", "on")
        ctx = client_context(p)
        drive_connections(ctx, port, warmup, resume=False, state={})
        for pid in pids:
            callgrind_dump(prefix, pid, 1)
        started = time.monotonic()
        stats = drive_connections(ctx, port, connections, resume=False, state={})
        wall = time.monotonic() - started
        assert stats.count == connections and stats.reused == 0, stats
        dumps = {pid: callgrind_dump(prefix, pid, 2) for pid in pids}
    finally:
        proc.stop()
    cost = {pid: instructions(d) for pid, d in dumps.items()}
    timers = sum(_timers(d) for d in dumps.values())
    of_workers = [cost[pid] for pid in workers_pids] or [cost[proc.pid]]
    return Result(sum(cost.values()) / connections, timers / connections, timers / wall,
                  cost[proc.pid] / connections if workers > 1 else 0.0,
                  [c / sum(of_workers) for c in of_workers])


@dataclass(frozen=True)
class Result:
    per_connection: float  # instructions, supervisor and workers summed
    timers_per_connection: float  # of which in fired timers (per second, not per connection)
    timers_per_second: float  # those timers' instructions per second of (callgrind) wall time
    supervisor_per_connection: float
    shares: list[float]  # each worker's part of the workers' instructions

    @property
    def without_timers(self) -> float:
        return self.per_connection - self.timers_per_connection


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--keep", type=Path, help="keep the work directory (configs, dumps)")
    args = ap.parse_args()
    if missing_tools(__file__, ["valgrind", "callgrind_control"]):
        sys.exit(1)
    with work_dir(args.keep, "workers-instructions") as work, serving() as echo:
        p = make_pki(work / "pki")
        results = {n: measure(n, work, p, echo, args.connections, args.warmup) for n in (1, 2)}
    print(f"instructions per full mTLS connection ({args.connections} sequential "
          "connections, tickets, callgrind; supervisor and workers summed)")
    print("               all        without fired timers   timers/s (callgrind time)   "
          "supervisor   workers' shares")
    for n, r in results.items():
        spread = ", ".join(f"{s:.0%}" for s in r.shares)
        print(f"  workers: {n}  {r.per_connection / 1e6:6.3f} M   "
              f"{r.without_timers / 1e6:6.3f} M               "
              f"{r.timers_per_second / 1e6:6.2f} M                      "
              f"{r.supervisor_per_connection / 1e3:6.1f} k     {spread}")
    one, two = results[1], results[2]
    print(f"  ratio 2/1    {two.per_connection / one.per_connection:6.3f}     "
          f"{two.without_timers / one.without_timers:6.3f}  (1.000: a second worker adds "
          "no work per connection)")


if __name__ == "__main__":
    main()
