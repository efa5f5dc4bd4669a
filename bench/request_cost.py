"""What does one request on a kept-alive connection cost the sidecar, against HAProxy?

Run (from the repo root; needs haproxy, and valgrind + callgrind_control for the
instruction counts, strace for the syscall counts):

    PYTHONPATH=. python bench/request_cost.py [--round-trips 2000] [--latency-round-trips 10000]
                                              [--repeats 3] [--modes instructions,latency,syscalls]

The path is the one compare_haproxy.py measures per MiB, with the same PKI, the same echo
backend and the same proxy configurations (imported from it): a plaintext client ->
outbound proxy -> mTLS -> inbound proxy -> echo app, on ONE connection that is open and
warmed up before anything is counted. The work is N round trips of 64 bytes: the client
sends 64 bytes, waits for the 64 to come back, sends the next.

- instructions: both proxy processes of a pair run under
  `valgrind --tool=callgrind --instr-atstart=no`; instrumentation is switched on before
  the warm-up, `callgrind_control -d` marks the start, N round trips run, a second dump
  holds exactly their cost. Both processes are added and divided by N.
- latency: the pairs run natively, both at once. Each repetition times N round trips
  straight to the echo app (direct), through the HAProxy pair and through the sidecar
  pair, in blocks of 500 taking turns (who goes first rotates), so that a change in the
  shared machine's load falls on all three alike; the added latency of a pair is its p50
  (p99) minus the direct p50 (p99) of the same repetition. The table gives the median
  over the repetitions.
  Meanwhile the CPU time of both processes of each pair (user + system, from
  /proc/PID/task/*/schedstat) is summed over that pair's blocks: CPU per round trip
  natively, kernel included (noisy, like every wall-clock figure here).
- syscalls: the pairs run natively; `strace -c -f -p PID` is attached to each proxy
  process for N round trips (strace slows them; the counts are exact). Per round trip,
  both processes added. A second's sweep timer and its epoll wake-up fall in the window
  too, a handful of calls against thousands.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import compare_haproxy as ch
from compare_haproxy import REQUEST, _num, _ratio

WARM_ROUND_TRIPS = 200
LATENCY_BLOCK = 500  # round trips in a row to one target, before the next has its turn
GOAL_INSTRUCTIONS = 2.0  # max sidecar / haproxy instructions per round trip (issue 21)
GOAL_LATENCY = 1.2  # max sidecar / haproxy added p50 and p99


class Client:
    """One plaintext connection; round trips of REQUEST, each timed."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=ch.IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(len(REQUEST))
        self.view = memoryview(self.buf)

    def round_trips(self, n: int) -> list[int]:
        """n round trips; their durations in nanoseconds."""
        sock, view, size = self.sock, self.view, len(REQUEST)
        clock = time.perf_counter_ns
        out = [0] * n
        for i in range(n):
            t0 = clock()
            sock.sendall(REQUEST)
            got = 0
            while got < size:
                k = sock.recv_into(view[got:])
                if not k:
                    raise RuntimeError(f"the connection closed after {i} round trips")
                got += k
            out[i] = clock() - t0
            if self.buf != REQUEST:
                raise RuntimeError("the echo came back different")
        return out

    def close(self) -> None:
        self.sock.close()


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of pid so far, user + system, in nanoseconds (the
    scheduler's own count: /proc/PID/task/TID/schedstat, not 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass  # a thread that ended meanwhile
    return total


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in microseconds."""
    k = max(0, min(len(sorted_ns) - 1, round(q * len(sorted_ns) + 0.5) - 1))
    return sorted_ns[k] / 1000


def start_pair(target: str, p: ch.Pki, d: Path, echo_port: int, *, callgrind: bool,
               args: argparse.Namespace) -> ch.Pair:
    d.mkdir()
    if target == "sidecar":
        return ch.sidecar_pair(p, d, echo_port, callgrind=callgrind, loop=args.loop,
                               ktls="off", session_store="auto")
    return ch.haproxy_pair(p, d, echo_port, callgrind=callgrind, tickets=True)


def measure_instructions(target: str, args: argparse.Namespace, p: ch.Pki, work: Path,
                         echo_port: int, dumps: dict[str, Path]) -> dict[str, Any]:
    n = args.round_trips
    ch.log(f"{target}, instructions: starting the pair under callgrind")
    with start_pair(target, p, work / f"{target}-instructions", echo_port, callgrind=True,
                    args=args) as pair:
        for proc in pair.procs:
            proc.instrument()
        client = Client(pair.plain_port)
        client.round_trips(WARM_ROUND_TRIPS)
        ch.log(f"{target}, instructions: {n} round trips")
        cost: dict[str, float] = {}
        with ch.measured([pair.outbound, pair.inbound], cost, dumps, "request"):
            client.round_trips(n)
        client.close()
        pair.check_alive()
    out = {"per_round_trip": sum(cost.values()) / n, "round_trips": n,
           "outbound": cost[pair.outbound.name] / n, "inbound": cost[pair.inbound.name] / n}
    if target == "sidecar":
        timers = sum(inclusive(dumps[f"{proc.name}-request"], _TIMERS)
                     for proc in (pair.outbound, pair.inbound))
        out["timers"] = timers / n
    return out


# libuv runs the loop's timers here: in the sidecar, the loop-lag probe (100 a second)
# and the one-second sweep (run/lifecycle.py). Their cost goes with the seconds, not with
# the requests, and under callgrind a round trip takes many times longer than natively
# (2000 of them: ~4 s against ~0.3 s), so within a measured window the timers weigh
# that many times more than they do natively.
_TIMERS = "uv__run_timers"


def inclusive(dump: Path, function: str) -> int:
    """The inclusive Ir of a function in a callgrind dump (0 if it never ran)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.rstrip().endswith(function) or f":{function} " in line:
            return int(line.split()[0].replace(",", ""))
    return 0


def measure_latency(targets: list[str], args: argparse.Namespace, p: ch.Pki, work: Path,
                    echo_port: int) -> dict[str, Any]:
    n = args.latency_round_trips
    pairs: dict[str, ch.Pair] = {}
    clients: dict[str, Client] = {}
    reps: list[dict[str, dict[str, float]]] = []
    try:
        for target in targets:
            ch.log(f"{target}, latency: starting the pair")
            pairs[target] = start_pair(target, p, work / f"{target}-latency", echo_port,
                                       callgrind=False, args=args)
        clients["direct"] = Client(echo_port)
        for target, pair in pairs.items():
            clients[target] = Client(pair.plain_port)
        for c in clients.values():
            c.round_trips(WARM_ROUND_TRIPS)
        order = ["direct", *targets]
        blocks = max(1, n // LATENCY_BLOCK)
        for rep in range(args.repeats):
            ch.log(f"latency, repetition {rep + 1}/{args.repeats}: {n} round trips each,"
                   f" {', '.join(order)} in turn, {blocks} blocks")
            # Blocks in turn, who goes first rotating: a change in the machine's load
            # (it is shared) falls on all of them alike.
            samples: dict[str, list[int]] = {who: [] for who in order}
            cpu = dict.fromkeys(targets, 0)
            for b in range(blocks):
                for who in order[b % len(order):] + order[:b % len(order)]:
                    procs = [pairs[who].outbound, pairs[who].inbound] if who in pairs else []
                    before = sum(cpu_ns(proc.pid) for proc in procs)
                    samples[who] += clients[who].round_trips(n // blocks)
                    if procs:
                        cpu[who] += sum(cpu_ns(proc.pid) for proc in procs) - before
            row: dict[str, dict[str, float]] = {}
            for who, times in samples.items():
                times.sort()
                row[who] = {"p50": percentile(times, 0.50), "p99": percentile(times, 0.99)}
            for target in targets:
                for q in ("p50", "p99"):
                    row[target][f"added_{q}"] = row[target][q] - row["direct"][q]
                row[target]["cpu"] = cpu[target] / len(samples[target]) / 1000
            reps.append(row)
        for pair in pairs.values():
            pair.check_alive()
    finally:
        for c in clients.values():
            c.close()
        for pair in pairs.values():
            pair.stop()
    out: dict[str, Any] = {"round_trips": n, "repetitions": reps}
    for who in ["direct", *targets]:
        keys = ("p50", "p99") + (("added_p50", "added_p99", "cpu") if who != "direct" else ())
        out[who] = {k: statistics.median(r[who][k] for r in reps) for k in keys}
    return out


def measure_syscalls(targets: list[str], args: argparse.Namespace, p: ch.Pki, work: Path,
                     echo_port: int) -> dict[str, Any]:
    n = args.round_trips
    out: dict[str, Any] = {}
    for target in targets:
        ch.log(f"{target}, syscalls: starting the pair")
        with start_pair(target, p, work / f"{target}-syscalls", echo_port, callgrind=False,
                        args=args) as pair:
            client = Client(pair.plain_port)
            client.round_trips(WARM_ROUND_TRIPS)
            tracers = {role: ch.Strace(proc.pid, work / f"{proc.name}.strace")
                       for role, proc in (("outbound", pair.outbound), ("inbound", pair.inbound))}
            ch.log(f"{target}, syscalls: {n} round trips under strace")
            client.round_trips(n)
            res: dict[str, Any] = {role: {k: v / n for k, v in tracer.stop().items()}
                                   for role, tracer in tracers.items()}
            res["per_round_trip"] = sum(sum(res[r].values()) for r in ("outbound", "inbound"))
            out[target] = res
            client.close()
    return out


def table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    def verdict(r: float | None, goal: float) -> str:
        return "" if r is None else ("ok" if r <= goal else "OVER")

    lines = [
        f"64-byte round trips on one kept-alive connection: plaintext client -> outbound ->"
        f" mTLS -> inbound -> echo; sidecar (python {meta['python']}, --loop {meta['loop']},"
        f" kTLS off) vs HAProxy {meta['haproxy']} (nbthread 1)",
        f"{meta['openssl']}",
        "",
        f"{'':36}{'sidecar':>10}{'haproxy':>10}{'ratio':>8}{'goal':>7}",
    ]
    ins = results.get("instructions", {})
    if ins:
        lines.append(f"instructions per round trip, thousands (callgrind,"
                     f" {ins.get('sidecar', ins.get('haproxy', {})).get('round_trips')} round"
                     " trips; both processes)")
        for key, title in (("per_round_trip", "outbound + inbound"),
                           ("outbound", "  outbound process"),
                           ("inbound", "  inbound process")):
            s = ins.get("sidecar", {}).get(key)
            h = ins.get("haproxy", {}).get(key)
            s, h = (None if s is None else s / 1e3), (None if h is None else h / 1e3)
            r = _ratio(s, h)
            goal = f"<={GOAL_INSTRUCTIONS:.1f}" if key == "per_round_trip" else ""
            v = verdict(r, GOAL_INSTRUCTIONS) if key == "per_round_trip" else ""
            lines.append(f"  {title:34}{_num(s, '10.1f')}{_num(h, '10.1f')}{_num(r, '8.2f')}"
                         f"{goal:>7} {v}")
        timers = ins.get("sidecar", {}).get("timers")
        if timers is not None:
            s = ins["sidecar"]["per_round_trip"] / 1e3
            h = ins.get("haproxy", {}).get("per_round_trip")
            h = None if h is None else h / 1e3
            r = _ratio(s - timers / 1e3, h)
            lines.append(f"  {'  of which loop timers (per second,':34}{timers / 1e3:10.1f}")
            lines.append(f"  {'  not per request; inflated here)':34}")
            lines.append(f"  {'without the timers':34}{s - timers / 1e3:10.1f}{_num(h, '10.1f')}"
                         f"{_num(r, '8.2f')}")
    lat = results.get("latency", {})
    if lat:
        lines.append(f"latency per round trip, microseconds (no valgrind; median of"
                     f" {len(lat['repetitions'])} alternated repetitions of"
                     f" {lat['round_trips']} round trips)")
        for q in ("p50", "p99"):
            s = lat.get("sidecar", {}).get(f"added_{q}")
            h = lat.get("haproxy", {}).get(f"added_{q}")
            r = _ratio(s, h)
            lines.append(f"  {'added ' + q:34}{_num(s, '10.1f')}{_num(h, '10.1f')}"
                         f"{_num(r, '8.2f')}{'<=' + format(GOAL_LATENCY, '.1f'):>7}"
                         f" {verdict(r, GOAL_LATENCY)}")
        for q in ("p50", "p99"):
            s = lat.get("sidecar", {}).get(q)
            h = lat.get("haproxy", {}).get(q)
            lines.append(f"  {'through the pair ' + q:34}{_num(s, '10.1f')}{_num(h, '10.1f')}")
        s = lat.get("sidecar", {}).get("cpu")
        h = lat.get("haproxy", {}).get("cpu")
        lines.append(f"  {'CPU per round trip, both processes':34}{_num(s, '10.1f')}"
                     f"{_num(h, '10.1f')}{_num(_ratio(s, h), '8.2f')}   (schedstat, user+sys)")
        d = lat["direct"]
        lines.append(f"  {'direct to the echo app p50 / p99':34}"
                     f"{d['p50']:10.1f}{d['p99']:10.1f}")
        for i, rep in enumerate(lat["repetitions"]):
            cells = "  ".join(
                f"{who} {rep[who].get('added_p50', rep[who]['p50']):.1f}"
                f"/{rep[who].get('added_p99', rep[who]['p99']):.1f}" for who in rep)
            lines.append(f"    repetition {i + 1} (added p50/p99; direct: p50/p99): {cells}")
    sc = results.get("syscalls", {})
    if sc:
        lines.append("syscalls per round trip (strace -c, both processes)")
        s, h = sc.get("sidecar", {}), sc.get("haproxy", {})
        sp, hp = s.get("per_round_trip"), h.get("per_round_trip")
        lines.append(f"  {'outbound + inbound':34}{_num(sp, '10.2f')}{_num(hp, '10.2f')}"
                     f"{_num(_ratio(sp, hp), '8.2f')}")
        for role in ("outbound", "inbound"):
            for who, res in (("sidecar", s), ("haproxy", h)):
                calls = res.get(role, {})
                top = ", ".join(f"{k} {v:.2f}" for k, v in calls.items() if v >= 0.01)
                lines.append(f"  {role} {who}: {top}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--round-trips", type=int, default=2000,
                    help="round trips counted by callgrind and strace (default 2000)")
    ap.add_argument("--latency-round-trips", type=int, default=10000,
                    help="round trips timed per repetition and target (default 10000)")
    ap.add_argument("--repeats", type=int, default=3, help="latency repetitions (default 3)")
    ap.add_argument("--targets", default="haproxy,sidecar",
                    help="comma-separated: haproxy,sidecar")
    ap.add_argument("--modes", default="instructions,latency,syscalls",
                    help="comma-separated: instructions, latency, syscalls")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                    help="the sidecar's event loop (default uvloop)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="work in this directory and keep it (configs, logs, callgrind dumps)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    if (not set(targets) <= {"haproxy", "sidecar"}
            or not set(modes) <= {"instructions", "latency", "syscalls"}):
        ap.error("unknown target or mode")
    needed = ["haproxy"] * ("haproxy" in targets)
    needed += ["valgrind", "callgrind_control"] * ("instructions" in modes)
    needed += ["strace"] * ("syscalls" in modes)
    if ch.missing_tools("request_cost", needed):
        return 1
    results: dict[str, Any] = {}
    dumps: dict[str, Path] = {}
    started = time.monotonic()
    with ch.work_dir(args.keep, "request") as work, ch.serving() as echo_port:
        meta: dict[str, Any] = {
            "python": platform.python_version(), "loop": args.loop,
            "openssl": ssl.OPENSSL_VERSION, "haproxy": ch.haproxy_version(),
            "work_dir": str(work),
        }
        p = ch.make_pki(work / "pki")
        if "instructions" in modes:
            results["instructions"] = {
                t: measure_instructions(t, args, p, work, echo_port, dumps) for t in targets}
        if "latency" in modes:
            results["latency"] = measure_latency(targets, args, p, work, echo_port)
        if "syscalls" in modes:
            results["syscalls"] = measure_syscalls(targets, args, p, work, echo_port)
    meta["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        out: dict[str, Any] = {"meta": meta, "results": results}
        if args.keep:
            out["callgrind_dumps"] = {k: str(v) for k, v in dumps.items()}
        print(json.dumps(out, indent=2))
    else:
        print(table(results, meta))
        print(f"({meta['seconds']} s)")
        if args.keep and dumps:
            print("callgrind dumps (callgrind_annotate --inclusive=yes FILE; divide by N):")
            for k, v in dumps.items():
                print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
