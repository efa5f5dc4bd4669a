"""Issue 21's table: what one connection costs the sidecar and HAProxy, like for like.

Run (from the repo root; needs haproxy, valgrind, callgrind_control and strace on PATH):

    PYTHONPATH=. python bench/handshake_table.py [--connections 200] [--repeats 3] [--json]

Every row, for the sidecar and HAProxy in the same run, for both session stores:

- memory: the sidecar with `tls.session_store: memory`, HAProxy with `no-tls-tickets`
  (its own session cache): both keep sessions in memory, the ticket is only an ID;
- tickets: the sidecar with `tls.session_store: tickets`, HAProxy by default: both
  resume from stateless tickets, which carry the whole session.

The rows, each on the inbound proxy alone (mTLS in, a plaintext echo backend behind it;
the client is this process, stdlib `ssl` on blocking sockets, one connection at a time):

- full: TCP connect, full TLS 1.3 handshake with a client certificate, a 64-byte request
  echoed back, close_notify both ways, close;
- resumed: the same, each connection resuming the newest session the client holds;
- refused: the client presents its leaf without the intermediate, so the proxy cannot
  build its chain and refuses it with an alert; the client reads the alert and closes;
- syscalls per full / resumed connection: `strace -f -c -p PID` over the connections,
  all the proxy's threads; epoll_ctl shown apart;
- Nagle: resumed connections per second from a client that leaves Nagle on (no
  TCP_NODELAY: Python's and Java's default), and the median time from its handshake's end
  to the echo. A server that sends nothing after the client's Finished makes such a
  client's request wait for a delayed ACK (~40 ms on Linux).

Measured as compare_haproxy.py measures (its docstring says how), with these choices:

- instructions: callgrind, `--instr-atstart=no`, a dump before and after each phase; one
  run per store and proxy (callgrind's counts repeat to within 1%);
- CPU time: the process's CPU clock (clock_getcpuclockid: user + system of every thread,
  in nanoseconds, not the 10 ms ticks of /proc/PID/stat), before and after each phase,
  without valgrind; `--repeats` runs (3) alternating the proxies, fresh processes each,
  and the median of each row;
- syscalls: a separate native run under strace (which slows it: its CPU is not counted).

`--sidecar-root DIR` runs the sidecar of another checkout (a "before" table).

Why the CPU-time ratios exceed the instruction ratios (measured for issue 21): the extra
time is user time (system time, page faults and wake-ups are at par, rows below), and
not all instructions cost alike. Python's run at a fraction of OpenSSL's speed: callgrind
with cache and branch simulation counts, per 1,000 instructions, ~29 L1i misses and ~34
mispredicted branches in libpython against ~4 and ~7 in libcrypto; and its footprint
evicts OpenSSL's: with a 1 MiB last level (this machine's L2), libcrypto misses it ~3x as
often in the sidecar as in HAProxy for the same instructions (perf: +18% libcrypto time).
The interpreter's build (header line) adds to it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import signal
import socket
import ssl
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compare_haproxy import (
    IO_TIMEOUT,
    REQUEST,
    ROOT,
    Pair,
    Pki,
    Strace,
    _num,
    client_context,
    echo_once,
    haproxy_pair,
    haproxy_version,
    instructions,
    log,
    make_pki,
    serving,
    sidecar_pair,
    work_dir,
)
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

STORES = ("memory", "tickets")
TARGETS = ("sidecar", "haproxy")
PHASES = ("full", "resumed", "refused")
WARM = 10
IDLE_SECONDS = 10.0
TITLES = {"full": "per full mTLS connection", "resumed": "per resumed connection",
          "refused": "per refused handshake"}


# --- the client ------------------------------------------------------------------------


@dataclass
class Outcome:
    reused: bool
    refused: bool
    session: ssl.SSLSession | None
    echo_seconds: float  # from the handshake's end to the whole echo back


def connect(ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None, *,
            nodelay: bool = True) -> Outcome:
    """One connection: handshake, 64 bytes echoed, close_notify both ways. A refusal
    (the server's alert on our first read, or the connection cut) is an outcome, not an
    error."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    if nodelay:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        tls = ctx.wrap_socket(raw, session=session)
    except (ssl.SSLError, OSError):
        raw.close()
        return Outcome(False, True, None, 0.0)
    try:
        done = time.perf_counter()
        try:
            got = echo_once(tls)
        except (ssl.SSLError, OSError):
            return Outcome(False, True, None, 0.0)
        if got != REQUEST:
            return Outcome(False, True, None, 0.0)
        echo = time.perf_counter() - done
        out = Outcome(bool(tls.session_reused), False, tls.session, echo)
        try:
            tls.unwrap()
        except (OSError, ValueError):
            pass
        return out
    finally:
        tls.close()


@dataclass
class Clients:
    good: ssl.SSLContext
    leaf_only: ssl.SSLContext  # presents the leaf without its intermediate


def clients(p: Pki, work: Path) -> Clients:
    chain = x509.load_pem_x509_certificates((p.client_dir / "svid.pem").read_bytes())
    leaf = work / "client-leaf-only.pem"
    leaf.write_bytes(chain[0].public_bytes(Encoding.PEM))
    return Clients(client_context(p), client_context(p, leaf))


class Driver:
    """Drives one phase's connections and checks that each went as the phase says."""

    def __init__(self, c: Clients, port: int) -> None:
        self.c = c
        self.port = port
        self.session: ssl.SSLSession | None = None

    def run(self, phase: str, n: int, *, nodelay: bool = True) -> list[Outcome]:
        out = []
        for _ in range(n):
            if phase == "refused":
                o = connect(self.c.leaf_only, self.port, None, nodelay=nodelay)
            else:
                o = connect(self.c.good, self.port,
                            self.session if phase == "resumed" else None, nodelay=nodelay)
                if o.session is not None and o.session.has_ticket:
                    self.session = o.session
            out.append(o)
        return out

    def prime(self) -> None:
        """A session to resume: the first resumed connection must not be a full one."""
        self.run("full", 1)


def check(phase: str, outcomes: list[Outcome]) -> dict[str, int]:
    refused = sum(o.refused for o in outcomes)
    reused = sum(o.reused for o in outcomes)
    expect_refused = len(outcomes) if phase == "refused" else 0
    if refused != expect_refused:
        raise RuntimeError(f"{phase}: {refused}/{len(outcomes)} connections were refused")
    if phase == "resumed" and reused != len(outcomes):
        log(f"WARNING: {phase}: only {reused}/{len(outcomes)} resumed")
    if phase == "full" and reused:
        raise RuntimeError(f"full: {reused} connections resumed")
    return {"connections": len(outcomes), "reused": reused, "refused": refused}


# --- processes ------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def cpu_clock(pid: int) -> Callable[[], float]:
    """The CPU-time clock of a whole process (every thread, user + system), in seconds."""
    cid = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(cid)) != 0:
        raise OSError(ctypes.get_errno(), f"clock_getcpuclockid({pid})")
    return lambda: time.clock_gettime(cid.value)


@dataclass(frozen=True)
class Counters:
    """What /proc says of a whole process (every thread, living and ended): CPU split
    into user and system (10 ms ticks), minor page faults, context switches (summed over
    the living threads), and how many threads it runs."""

    user: float
    system: float
    minflt: int
    voluntary: int
    involuntary: int
    threads: int

    def __sub__(self, o: Counters) -> Counters:
        return Counters(self.user - o.user, self.system - o.system, self.minflt - o.minflt,
                        self.voluntary - o.voluntary, self.involuntary - o.involuntary,
                        self.threads)


_TICK = os.sysconf("SC_CLK_TCK")


def counters(pid: int) -> Counters:
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    # fields from the state on (proc(5) numbering minus 3): 7 minflt, 11 utime, 12 stime,
    # 17 num_threads
    vol = inv = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # ended between the listing and the read
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                inv += int(line.split()[1])
    return Counters(int(f[11]) / _TICK, int(f[12]) / _TICK, int(f[7]), vol, inv, int(f[17]))


def start(target: str, store: str, p: Pki, work: Path, echo_port: int, *, callgrind: bool,
          args: argparse.Namespace) -> Pair:
    work.mkdir(parents=True)
    if target == "sidecar":
        return sidecar_pair(p, work, echo_port, callgrind=callgrind, loop=args.loop,
                            ktls="off", session_store=store, outbound=False,
                            root=args.sidecar_root)
    return haproxy_pair(p, work, echo_port, callgrind=callgrind,
                        tickets=store == "tickets", outbound=False)


def measure_instructions(target: str, store: str, p: Pki, c: Clients, work: Path,
                         echo_port: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with start(target, store, p, work, echo_port, callgrind=True, args=args) as pair:
        proc = pair.inbound
        proc.instrument()
        d = Driver(c, pair.tls_port)
        for phase in PHASES:
            n = args.connections if phase != "refused" else args.refused
            d.run(phase, WARM)
            log(f"{target} ({store}), instructions: {n} {phase}")
            proc.dump()
            started = time.monotonic()
            seen = check(phase, d.run(phase, n))
            seconds = time.monotonic() - started
            out[phase] = {"per_connection": instructions(proc.dump()) / n, "seconds": seconds,
                          **seen}
        # What the process does with no connection at all (timers, watchers), per second:
        # under callgrind a connection takes ~50x longer, and this runs meanwhile.
        proc.dump()
        time.sleep(IDLE_SECONDS)
        out["idle_per_second"] = instructions(proc.dump()) / IDLE_SECONDS
        proc.check_alive()
    return out


def measure_cpu(target: str, store: str, p: Pki, c: Clients, work: Path,
                echo_port: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with start(target, store, p, work, echo_port, callgrind=False, args=args) as pair:
        clock = cpu_clock(pair.inbound.pid)
        d = Driver(c, pair.tls_port)
        for phase in PHASES:
            n = args.cpu_connections if phase != "refused" else args.refused * 5
            d.run(phase, WARM)
            was = counters(pair.inbound.pid)
            before = clock()
            seen = check(phase, d.run(phase, n))
            cpu = clock() - before
            delta = counters(pair.inbound.pid) - was
            out[phase] = {"per_connection": cpu / n, "user": delta.user / n,
                          "system": delta.system / n, "minflt": delta.minflt / n,
                          "voluntary": delta.voluntary / n,
                          "involuntary": delta.involuntary / n, "threads": delta.threads,
                          **seen}
        pair.check_alive()
    return out


def measure_syscalls(target: str, store: str, p: Pki, c: Clients, work: Path,
                     echo_port: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with start(target, store, p, work, echo_port, callgrind=False, args=args) as pair:
        d = Driver(c, pair.tls_port)
        n = args.connections
        for phase in PHASES:
            d.run(phase, WARM)
            tracer = Strace(pair.inbound.pid, work / f"strace-{phase}.txt")
            try:
                check(phase, d.run(phase, n))
            finally:
                counts = tracer.stop()
            out[phase] = {"total": sum(counts.values()) / n,
                          "by_name": {k: v / n for k, v in counts.items()}}
        pair.check_alive()
    return out


def measure_nagle(target: str, store: str, p: Pki, c: Clients, work: Path,
                  echo_port: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with start(target, store, p, work, echo_port, callgrind=False, args=args) as pair:
        d = Driver(c, pair.tls_port)
        d.prime()
        d.run("resumed", WARM, nodelay=False)
        for phase in ("resumed", "full"):
            started = time.perf_counter()
            outcomes = d.run(phase, args.nagle, nodelay=False)
            elapsed = time.perf_counter() - started
            seen = check(phase, outcomes)
            out[phase] = {"per_second": len(outcomes) / elapsed,
                          "echo_ms_median": statistics.median(
                              o.echo_seconds for o in outcomes) * 1000, **seen}
        pair.check_alive()
    return out


# --- the table ---------------------------------------------------------------------------


def table(r: dict[str, Any], meta: dict[str, Any]) -> str:
    def get(kind: str, store: str, target: str, *path: str) -> float | None:
        v: Any = r.get(kind, {}).get(store, {}).get(target)
        for key in path:
            if not isinstance(v, dict):
                return None
            v = v.get(key)
        return None if v is None else float(v)

    head = f"{'':34}" + "".join(f"{s + ' store':^28}" for s in STORES)
    sub = f"{'':34}" + f"{'sidecar':>9}{'haproxy':>9}{'ratio':>7}   " * len(STORES)
    lines = [
        f"sidecar ({meta['sidecar_root']}, python {meta['python']} {meta['python_build']},"
        f" --loop {meta['loop']})"
        f" vs HAProxy {meta['haproxy']} (nbthread 1); {meta['openssl']}; TLS 1.3,"
        " ECDSA P-256, root + intermediate; inbound proxy only; one connection at a time",
        "memory store: sidecar tls.session_store memory, haproxy no-tls-tickets;"
        " tickets store: sidecar tickets, haproxy default (stateless tickets)",
        "", head, sub]

    def row(title: str, values: Callable[[str, str], float | None], fmt: str,
            ratio_too: bool = True) -> str:
        cells = ""
        for store in STORES:
            s, h = values(store, "sidecar"), values(store, "haproxy")
            ratio = s / h if s is not None and h and ratio_too else None
            cells += _num(s, fmt) + _num(h, fmt) + _num(ratio, "7.2f") + "   "
        return f"  {title:32}{cells}"

    lines.append(f"instructions, millions (callgrind, {meta['connections']} connections,"
                 f" {meta['refused']} refused)")
    for phase in PHASES:
        lines.append(row(TITLES[phase], lambda st, t, ph=phase: _scaled(
            get("instructions", st, t, ph, "per_connection"), 1e-6), "9.2f"))
    lines.append(row("idle, per second (background)", lambda st, t: _scaled(
        get("instructions", st, t, "idle_per_second"), 1e-6), "9.3f", ratio_too=False))
    for phase in PHASES:
        lines.append(row(f"  background in {phase}", lambda st, t, ph=phase: _background(
            r, st, t, ph), "9.3f", ratio_too=False))
    lines.append(f"CPU milliseconds (process CPU clock, median of {meta['repeats']}"
                 f" alternated runs of {meta['cpu_connections']} connections)")
    for phase in PHASES:
        lines.append(row(TITLES[phase], lambda st, t, ph=phase: _scaled(
            _median(r, st, t, ph), 1e3), "9.3f"))
    lines.append("the same runs, per connection, from /proc/PID/stat and task/*/status"
                 " (CPU in 10 ms ticks)")
    for key, title, scale, fmt in (("user", "user ms", 1e3, "9.3f"),
                                   ("system", "system ms", 1e3, "9.3f"),
                                   ("minflt", "minor page faults", 1.0, "9.2f"),
                                   ("voluntary", "voluntary switches", 1.0, "9.2f"),
                                   ("involuntary", "involuntary switches", 1.0, "9.3f")):
        for phase in PHASES:
            lines.append(row(f"{phase}: {title}", lambda st, t, ph=phase, k=key, m=scale:
                             _scaled(_median(r, st, t, ph, k), m), fmt))
    lines.append(f"syscalls per connection (strace -f -c, {meta['connections']} connections)")
    for phase in PHASES:
        lines.append(row(f"{phase}: all", lambda st, t, ph=phase: get(
            "syscalls", st, t, ph, "total"), "9.1f"))
        lines.append(row(f"{phase}: epoll_ctl", lambda st, t, ph=phase: get(
            "syscalls", st, t, ph, "by_name", "epoll_ctl"), "9.1f"))
    lines.append(f"client without TCP_NODELAY (Nagle on), {meta['nagle']} connections")
    for phase in ("resumed", "full"):
        lines.append(row(f"{phase}: connections/s", lambda st, t, ph=phase: get(
            "nagle", st, t, ph, "per_second"), "9.0f"))
        lines.append(row(f"{phase}: ms to the echo (median)", lambda st, t, ph=phase: get(
            "nagle", st, t, ph, "echo_ms_median"), "9.2f"))
    return "\n".join(lines)


def _background(r: dict[str, Any], store: str, target: str, phase: str) -> float | None:
    """Millions of the idle rate's instructions inside one connection of `phase` under
    callgrind (where a connection takes ~50x its native time): part of the row above."""
    m = r.get("instructions", {}).get(store, {}).get(target, {})
    idle, ph = m.get("idle_per_second"), m.get(phase, {})
    if idle is None or "seconds" not in ph:
        return None
    return float(idle * ph["seconds"] / ph["connections"] / 1e6)


def python_build() -> str:
    """How the interpreter running the sidecar was built: a build without PGO and LTO
    (pyenv's default) runs Python code ~20-25% slower than one with them (python:3.13-slim,
    what the product's image runs; distribution packages), and the CPU-time rows carry
    that, while the instruction rows barely do."""
    args = str(sysconfig.get_config_var("CONFIG_ARGS") or "")
    pgo = "--enable-optimizations" in args
    lto = "--with-lto" in args
    return "(PGO+LTO)" if pgo and lto else "(PGO)" if pgo else "(LTO)" if lto else \
        "(no PGO/LTO)"


def _scaled(v: float | None, k: float) -> float | None:
    return None if v is None else v * k


def _median(r: dict[str, Any], store: str, target: str, phase: str,
            key: str = "per_connection") -> float | None:
    runs = r.get("cpu", {}).get(store, {}).get(target, [])
    values = [run[phase][key] for run in runs if key in run.get(phase, {})]
    return statistics.median(values) if values else None


def syscall_detail(r: dict[str, Any]) -> str:
    lines = ["syscalls per connection, by name (the ten most frequent)"]
    for store, targets in r.get("syscalls", {}).items():
        for target, phases in targets.items():
            for phase, v in phases.items():
                top = ", ".join(f"{k} {n:.1f}" for k, n in list(v["by_name"].items())[:10])
                lines.append(f"  {store:8}{target:9}{phase:8}{v['total']:6.1f}: {top}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=200,
                    help="connections per phase under callgrind and strace (200)")
    ap.add_argument("--cpu-connections", type=int, default=1000,
                    help="connections per phase in a CPU-time run (1000)")
    ap.add_argument("--refused", type=int, default=100,
                    help="refused handshakes under callgrind (100; x5 in a CPU run)")
    ap.add_argument("--nagle", type=int, default=100,
                    help="connections of the client without TCP_NODELAY (100)")
    ap.add_argument("--repeats", type=int, default=3, help="CPU-time runs per proxy (3)")
    ap.add_argument("--kinds", default="instructions,cpu,syscalls,nagle",
                    help="comma-separated: instructions,cpu,syscalls,nagle")
    ap.add_argument("--stores", default=",".join(STORES), help="memory,tickets")
    ap.add_argument("--targets", default=",".join(TARGETS), help="sidecar,haproxy")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--sidecar-root", type=Path, default=ROOT,
                    help="the checkout whose sidecar runs (default: this one)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="work in this directory and keep it (configs, logs, dumps)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args()
    # A SIGTERM (a timeout) must still stop the proxies: the finally blocks do.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.sidecar_root = args.sidecar_root.resolve()
    kinds = [k for k in args.kinds.split(",") if k]
    stores = [s for s in args.stores.split(",") if s]
    targets = [t for t in args.targets.split(",") if t]
    if (not set(kinds) <= {"instructions", "cpu", "syscalls", "nagle"}
            or not set(stores) <= set(STORES) or not set(targets) <= set(TARGETS)):
        ap.error("unknown kind, store or target")
    results: dict[str, Any] = {}
    started = time.monotonic()
    runs = 0
    with work_dir(args.keep, "table") as work, serving() as echo_port:
        meta = {"python": platform.python_version(), "python_build": python_build(),
                "loop": args.loop,
                "openssl": ssl.OPENSSL_VERSION, "haproxy": haproxy_version(),
                "sidecar_root": str(args.sidecar_root), "connections": args.connections,
                "cpu_connections": args.cpu_connections, "refused": args.refused,
                "nagle": args.nagle, "repeats": args.repeats, "work_dir": str(work)}
        p = make_pki(work / "pki")
        c = clients(p, work)

        def one(kind: str, store: str, target: str, fn: Any) -> Any:
            nonlocal runs
            runs += 1
            log(f"{kind}, {store} store: {target}")
            return fn(target, store, p, c, work / f"{runs}-{kind}-{store}-{target}",
                      echo_port, args)

        for store in stores:
            for kind, fn in (("instructions", measure_instructions),
                             ("syscalls", measure_syscalls), ("nagle", measure_nagle)):
                if kind in kinds:
                    for target in targets:
                        results.setdefault(kind, {}).setdefault(store, {})[target] = one(
                            kind, store, target, fn)
            if "cpu" in kinds:
                for i in range(args.repeats):
                    # Alternate which proxy goes first, so neither always meets the
                    # machine in the same state.
                    for target in (targets if i % 2 == 0 else targets[::-1]):
                        results.setdefault("cpu", {}).setdefault(store, {}).setdefault(
                            target, []).append(one("cpu", store, target, measure_cpu))
    meta["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
    else:
        print(table(results, meta))
        if "syscalls" in results:
            print(syscall_detail(results))
        print(f"({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
