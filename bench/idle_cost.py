"""What an idle sidecar costs against an idle HAProxy (issue 21, item 5): wake-ups per
second, instructions per second and resident memory at start.

Run (from the repo root; needs haproxy, and valgrind + callgrind_control for the
instruction counts):

    PYTHONPATH=. python bench/idle_cost.py                  # table
    PYTHONPATH=. python bench/idle_cost.py --seconds 20 --hold 0,10 --json

One run, both proxies, the same files:

- identity: a dev CA and two SVIDs made by the `sidecar pki init` and `sidecar pki issue`
  commands (`.../sa/payments` for the inbound side, `.../sa/frontend` for the outbound
  side and the test client); HAProxy gets the same certificate and key in one file;
- the sidecar: `python -m sidecar run -c CFG --loop uvloop` with one inbound listener
  (mTLS -> an echo app) and one outbound listener (plaintext -> mTLS to that inbound
  listener), a policy allowing the frontend, and the admin endpoint on a free port; every
  other key at its default (file watching on, `reload_interval: 5m`, `workers: 1`, kTLS
  `auto`, JSON log at info, here to a file);
- HAProxy 2.6, one process, `nbthread 1` (bench/compare_haproxy.py's global section): a
  TLS frontend (`verify required`, the same bundle) to the echo app, and a plaintext
  frontend to a TLS server line pointing at its own TLS frontend;
- readiness is read without a connection: the sidecar's "ready" log line, HAProxy's
  listening sockets in /proc/net/tcp.

For each `--hold` count (0: no connection at all), that many mTLS connections are opened
through the inbound listener (full handshake, one 64-byte echo) and then held open with
no traffic; after `--settle` seconds a window of `--seconds` is measured:

- wake-ups: the voluntary context switches of every thread of the process (from
  /proc/PID/task/*/status), summed. A thread switches voluntarily each time it blocks
  (epoll_wait, a futex, a sleep), and it blocks again after each wake-up, so in an idle
  process each one is one wake-up: a timer firing, an event read, a thread polling.
  Involuntary switches (preemption) are shown apart; they are not wake-ups. Threads
  that start and end inside the window are not seen (none do here: the table says how
  many threads there were before and after). `perf stat -e context-switches` over the
  same window (every thread; voluntary and involuntary) is shown as a cross-check when
  perf works here;
- CPU: utime + stime of the process over the window, from /proc/PID/stat (10 ms ticks);
- instructions per second: a second start of each proxy under
  `valgrind --tool=callgrind --instr-atstart=no`, the same steps, instrumentation on at
  the start of the window (a dump marks it) and a dump at its end. User-space only; no
  hardware counters on this VM. Timers fire by the clock, so an idle loop's rate of
  wake-ups is the same under valgrind; each costs what it costs;
- RSS at start: VmRSS (with RssAnon and RssFile) right after "ready" / listening, before
  any connection.

Then, for the sidecar only: where its RSS at start goes (the largest mappings in
/proc/PID/smaps) and the floor: the RSS of a bare interpreter of the same Python after
importing, one after the other, what `sidecar run` cannot do without (`ssl`, `asyncio`,
`uvloop`, `cryptography`'s X.509, `yaml`, `prometheus_client`), then the whole run path.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import compare_haproxy as ch
from compare_haproxy import CLIENT_ID, SERVER_ID, log

KIB = 1024

# What `sidecar run` cannot do without, in the order the floor adds them.
FLOOR_STEPS: list[tuple[str, str]] = [
    ("python (site, the venv)", ""),
    ("+ ssl", "import ssl"),
    ("+ asyncio", "import asyncio"),
    ("+ uvloop", "import uvloop"),
    ("+ cryptography X.509, keys", "from cryptography import x509\n"
     "from cryptography.hazmat.primitives import serialization\n"
     "from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa"),
    ("+ yaml", "import yaml"),
    ("+ prometheus_client", "import prometheus_client"),
    ("+ the run path (cli, run.server)", "import sidecar.cli, sidecar.run.server"),
]
FLOOR_SCRIPT = r"""
import sys
def rss():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1])
    return out
steps = __STEPS__
for name, code in steps:
    exec(code)
    print(name, *rss().values(), len(sys.modules), sep="\t", flush=True)
"""


# --- the PKI, with the CLI -------------------------------------------------------------


def sidecar_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", *args]


def env_with_repo() -> dict[str, str]:
    env = ch.sidecar_env()
    env.pop("SIDECAR_CONFIG", None)
    env.pop("SIDECAR_LOOP", None)
    return env


def make_pki(d: Path) -> ch.Pki:
    """`sidecar pki init` + `sidecar pki issue` twice; HAProxy's chain+key files."""
    env = env_with_repo()
    subprocess.run(sidecar_cmd("pki", "init", "--dir", str(d / "ca"), "--trust-domain",
                               ch.TRUST_DOMAIN), check=True, env=env, capture_output=True)
    for name, spiffe_id in (("server", SERVER_ID), ("client", CLIENT_ID)):
        subprocess.run(sidecar_cmd("pki", "issue", "--dir", str(d / "ca"), "--spiffe-id",
                                   spiffe_id, "--out", str(d / name), "--ttl", "24h"),
                       check=True, env=env, capture_output=True)
        combined = d / f"{name}.pem"
        combined.write_bytes((d / name / "svid.pem").read_bytes()
                             + (d / name / "svid_key.pem").read_bytes())
        combined.chmod(0o600)
    return ch.Pki(d, d / "server" / "bundle.pem", d / "client", d / "server",
                  d / "client.pem", d / "server.pem")


# --- reading a process from the outside ------------------------------------------------


@dataclass
class Threads:
    """Per-thread context switches of one process at one moment."""

    at: float
    by_tid: dict[int, tuple[str, int, int]]  # tid -> (name, voluntary, involuntary)
    cpu: float  # utime + stime of the whole process, seconds


def read_threads(pid: int) -> Threads:
    by_tid: dict[int, tuple[str, int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            # The main thread and Python's threads share a name: tell the main one apart.
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:
            continue  # ended between the listing and the read
        vol = int(re.search(r"^voluntary_ctxt_switches:\s*(\d+)", status, re.M)[1])  # type: ignore[index]
        inv = int(re.search(r"^nonvoluntary_ctxt_switches:\s*(\d+)", status, re.M)[1])  # type: ignore[index]
        by_tid[int(task.name)] = (name, vol, inv)
    return Threads(time.monotonic(), by_tid, ch.proc_cpu_seconds(pid))


@dataclass
class Window:
    seconds: float
    wakeups: int  # voluntary switches, every thread
    involuntary: int
    cpu_ms: float
    threads_before: int
    threads_after: int
    per_thread: dict[str, float]  # thread name -> wake-ups per second (names summed)
    perf_switches: int | None = None

    @property
    def per_second(self) -> float:
        return self.wakeups / self.seconds


def diff(a: Threads, b: Threads) -> Window:
    per: dict[str, int] = {}
    vol = inv = 0
    for tid, (name, v1, i1) in b.by_tid.items():
        _, v0, i0 = a.by_tid.get(tid, (name, 0, 0))
        vol += v1 - v0
        inv += i1 - i0
        per[name] = per.get(name, 0) + v1 - v0
    secs = b.at - a.at
    return Window(secs, vol, inv, (b.cpu - a.cpu) * 1000, len(a.by_tid), len(b.by_tid),
                  {k: v / secs for k, v in sorted(per.items(), key=lambda kv: -kv[1])})


def memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1])
    return out


def largest_mappings(pid: int, top: int) -> list[tuple[str, int, int]]:
    """(mapping, Rss KiB, Anonymous KiB) summed per file name ([heap], [anon]...)."""
    rss: dict[str, list[int]] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split(None, 5)
            name = parts[5].strip().rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
            rss.setdefault(name, [0, 0])
        elif line.startswith("Rss:"):
            rss[name][0] += int(line.split()[1])
        elif line.startswith("Anonymous:"):
            rss[name][1] += int(line.split()[1])
    ranked = sorted(rss.items(), key=lambda kv: -kv[1][0])[:top]
    return [(n, v[0], v[1]) for n, v in ranked]


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? Read from /proc, without connecting."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def perf_works() -> bool:
    if not shutil.which("perf"):
        return False
    run = subprocess.run(["perf", "stat", "-x,", "-e", "context-switches", "true"],
                         capture_output=True, text=True)
    return run.returncode == 0 and "context-switches" in run.stderr


def measure_window(pid: int, seconds: float, use_perf: bool) -> Window:
    """The window: /proc before and after; perf over the same span when it works."""
    perf = None
    if use_perf:
        perf = subprocess.Popen(
            ["perf", "stat", "-x,", "-e", "context-switches", "-p", str(pid), "--",
             "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
    before = read_threads(pid)
    threading.Event().wait(seconds)  # the measuring window itself
    after = read_threads(pid)
    w = diff(before, after)
    if perf is not None:
        _, err = perf.communicate(timeout=seconds + 30)
        for line in err.splitlines():
            parts = line.split(",")
            # "<not counted>": no thread was scheduled in the whole window, so none
            # switched (perf counts a task's switches while it is on a CPU).
            if len(parts) > 2 and parts[2] == "context-switches" and (
                    parts[0].isdigit() or parts[0] == "<not counted>"):
                w.perf_switches = int(parts[0]) if parts[0].isdigit() else 0
    return w


# --- the two proxies -------------------------------------------------------------------


def sidecar_config(p: ch.Pki, work: Path, app_port: int) -> tuple[Path, int]:
    tls_port, plain_port, admin_port = ch.free_port(), ch.free_port(), ch.free_port()
    # In a directory of its own, as in a pod: the sidecar watches the policy's directory,
    # and the log and callgrind's dumps are written into `work`.
    (work / "policy").mkdir()
    (work / "policy" / "policy.yaml").write_text(
        "mode: enforce\ndefault: deny\nrules:\n"
        f"  - name: frontend\n    action: allow\n    from: [\"{CLIENT_ID}\"]\n")
    cfg = work / "sidecar.yaml"
    cfg.write_text(
        f"identity:\n  cert: {p.server_dir}/svid.pem\n  key: {p.server_dir}/svid_key.pem\n"
        f"  bundle: {p.server_dir}/bundle.pem\n"
        f"inbound:\n  - name: app\n    listen: 127.0.0.1:{tls_port}\n"
        f"    forward_to: 127.0.0.1:{app_port}\n"
        f"outbound:\n  - name: payments\n    listen: 127.0.0.1:{plain_port}\n"
        f"    connect_to: 127.0.0.1:{tls_port}\n    expect_ids: [\"{SERVER_ID}\"]\n"
        f"policy: policy/policy.yaml\n"
        f"admin:\n  listen: 127.0.0.1:{admin_port}\n")
    return cfg, tls_port


def start_sidecar(p: ch.Pki, work: Path, app_port: int, *, callgrind: bool,
                  loop: str) -> tuple[ch.Proc, int]:
    cfg, tls_port = sidecar_config(p, work, app_port)
    name = "sidecar-callgrind" if callgrind else "sidecar"
    proc = ch.Proc(name, sidecar_cmd("run", "-c", str(cfg), "--loop", loop), work,
                   callgrind=callgrind, env=env_with_repo())
    try:
        ch.wait_until(f"{name} ready", lambda: ch._says_ready(proc), [proc])
    except BaseException:
        proc.stop()
        raise
    return proc, tls_port


def start_haproxy(p: ch.Pki, work: Path, app_port: int, *,
                  callgrind: bool) -> tuple[ch.Proc, int]:
    tls_port, plain_port = ch.free_port(), ch.free_port()
    cfg = work / "haproxy.cfg"
    cfg.write_text(
        ch.HAPROXY_GLOBAL
        + f"frontend inbound\n  bind 127.0.0.1:{tls_port} ssl crt {p.server_pem}"
        f" ca-file {p.bundle} verify required\n  default_backend app\n"
        f"backend app\n  server app 127.0.0.1:{app_port}\n"
        f"frontend outbound\n  bind 127.0.0.1:{plain_port}\n  default_backend remote\n"
        f"backend remote\n  server payments 127.0.0.1:{tls_port} ssl crt {p.client_pem}"
        f" ca-file {p.bundle} verify required\n")
    name = "haproxy-callgrind" if callgrind else "haproxy"
    proc = ch.Proc(name, [ch.haproxy_bin(), "-db", "-f", str(cfg)], work, callgrind=callgrind)
    try:
        ch.wait_until(f"{name} listening",
                      lambda: listening(tls_port) and listening(plain_port), [proc])
    except BaseException:
        proc.stop()
        raise
    return proc, tls_port


def hold(ctx: ssl.SSLContext, port: int, n: int) -> list[ssl.SSLSocket]:
    """n connections: full handshake, one echo each, then left open and quiet."""
    held = []
    for _ in range(n):
        raw = socket.create_connection(("127.0.0.1", port), timeout=ch.IO_TIMEOUT)
        tls = ctx.wrap_socket(raw)
        if ch.echo_once(tls) != ch.REQUEST:
            raise RuntimeError("a held connection was closed before its echo")
        held.append(tls)
    return held


# --- one target, both runs -------------------------------------------------------------


@dataclass
class Result:
    target: str
    memory_at_start: dict[str, int] = field(default_factory=dict)
    mappings: list[tuple[str, int, int]] = field(default_factory=list)
    windows: dict[int, Window] = field(default_factory=dict)  # held -> window
    instructions: dict[int, float] = field(default_factory=dict)  # held -> Ir per second


def run_target(target: str, args: argparse.Namespace, p: ch.Pki, work: Path,
               app_port: int, use_perf: bool) -> Result:
    res = Result(target)
    ctx = ch.client_context(p)
    for callgrind in ([False, True] if args.instructions else [False]):
        d = work / f"{target}{'-callgrind' if callgrind else ''}"
        d.mkdir()
        if target == "sidecar":
            proc, tls_port = start_sidecar(p, d, app_port, callgrind=callgrind,
                                           loop=args.loop)
        else:
            proc, tls_port = start_haproxy(p, d, app_port, callgrind=callgrind)
        held: list[ssl.SSLSocket] = []
        try:
            if not callgrind:
                res.memory_at_start = memory(proc.pid)
                if target == "sidecar":
                    res.mappings = largest_mappings(proc.pid, args.top)
            log(f"{proc.name}: pid {proc.pid}, RSS {memory(proc.pid)['VmRSS']} KiB")
            for n in args.hold:
                held += hold(ctx, tls_port, n - len(held))
                threading.Event().wait(args.settle)  # let the last connection's work end
                proc.check_alive()
                if callgrind:
                    proc.instrument()
                    proc.dump()  # the mark: everything before is in an earlier file
                    t0 = time.monotonic()
                    threading.Event().wait(args.seconds)
                    path = proc.dump()
                    res.instructions[n] = ch.instructions(path) / (time.monotonic() - t0)
                    log(f"{proc.name}, {n} held: {res.instructions[n]:,.0f} instructions/s")
                else:
                    w = measure_window(proc.pid, args.seconds, use_perf)
                    res.windows[n] = w
                    log(f"{proc.name}, {n} held: {w.per_second:.2f} wake-ups/s "
                        f"{dict(list(w.per_thread.items())[:4])}")
                proc.check_alive()
        finally:
            for s in held:
                s.close()
            proc.stop()
    return res


def floor(top_steps: list[tuple[str, str]]) -> list[tuple[str, int, int, int, int]]:
    """(step, VmRSS, RssAnon, RssFile, modules) of one fresh interpreter, cumulative."""
    script = FLOOR_SCRIPT.replace("__STEPS__", repr(top_steps))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env_with_repo(), check=True)
    out = []
    for line in run.stdout.splitlines():
        name, rss, anon, file, mods = line.split("\t")
        out.append((name, int(rss), int(anon), int(file), int(mods)))
    return out


# --- report ----------------------------------------------------------------------------


def report(results: dict[str, Result], floor_rows: list[tuple[str, int, int, int, int]],
           meta: dict[str, Any]) -> str:
    sc, hp = results.get("sidecar"), results.get("haproxy")
    lines = [
        f"idle cost: sidecar (python {meta['python']}, --loop {meta['loop']}, default config"
        f" + 1 inbound, 1 outbound) vs HAProxy {meta['haproxy']} (nbthread 1), one run",
        f"window {meta['seconds']:g} s with no traffic, {meta['settle']:g} s after the last "
        "connection; wake-ups = voluntary context switches of every thread",
        f"{'':40}{'sidecar':>12}{'haproxy':>12}",
    ]

    def row(title: str, s: float | None, h: float | None, fmt: str) -> None:
        lines.append(f"  {title:38}{ch._num(s, '12' + fmt)}{ch._num(h, '12' + fmt)}")

    for n in meta["hold"]:
        what = "no connection" if n == 0 else f"{n} idle connection(s) held"
        lines.append(f"{what}:")
        sw = sc.windows.get(n) if sc else None
        hw = hp.windows.get(n) if hp else None

        def rate(w: Window | None, value: float | None) -> float | None:
            return None if w is None or value is None else value / w.seconds

        row("wake-ups per second", rate(sw, sw and sw.wakeups), rate(hw, hw and hw.wakeups),
            ".2f")
        row("involuntary switches per second", rate(sw, sw and sw.involuntary),
            rate(hw, hw and hw.involuntary), ".2f")
        if meta["perf"]:
            row("perf context-switches per second", rate(sw, sw and sw.perf_switches),
                rate(hw, hw and hw.perf_switches), ".2f")
        row("CPU ms per second (10 ms ticks)", rate(sw, sw and sw.cpu_ms),
            rate(hw, hw and hw.cpu_ms), ".2f")
        row("instructions per second (callgrind)", sc.instructions.get(n) if sc else None,
            hp.instructions.get(n) if hp else None, ",.0f")
        for r, w in (("sidecar", sw), ("haproxy", hw)):
            if w is not None:
                busy = ", ".join(f"{k} {v:.2f}" for k, v in w.per_thread.items() if v)
                lines.append(f"    {r} threads {w.threads_before} -> {w.threads_after};"
                             f" wake-ups/s by thread: {busy or 'none'}")
    lines.append("RSS at start (after ready / listening, before any connection), MiB:")
    for key in ("VmRSS", "RssAnon", "RssFile"):
        row(key, sc.memory_at_start[key] / KIB if sc else None,
            hp.memory_at_start[key] / KIB if hp else None, ".1f")
    if sc and sc.mappings:
        lines.append("the sidecar's RSS at start by mapping, MiB (rss, of which anonymous):")
        for name, rss, anon in sc.mappings:
            lines.append(f"    {rss / KIB:7.1f} {anon / KIB:7.1f}  {name}")
    if floor_rows:
        lines.append("the floor: one interpreter importing, step by step, MiB "
                     "(VmRSS, step, anon, file, modules):")
        prev = 0
        for name, rss, anon, file, mods in floor_rows:
            lines.append(f"    {name:36}{rss / KIB:7.1f} {'+' if prev else ' '}"
                         f"{(rss - prev) / KIB:5.1f} {anon / KIB:7.1f} {file / KIB:7.1f}"
                         f" {mods:5}")
            prev = rss
        if sc and sc.memory_at_start:
            rss = sc.memory_at_start["VmRSS"]
            lines.append(f"    {'the running sidecar, at ready':36}{rss / KIB:7.1f} "
                         f"+{(rss - prev) / KIB:5.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="the measuring window, seconds (10)")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds after ready / the last connection before a window (3)")
    ap.add_argument("--hold", default="0",
                    help="comma-separated counts of idle connections held, one window each "
                         "(0: none)")
    ap.add_argument("--targets", default="sidecar,haproxy")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--no-instructions", dest="instructions", action="store_false",
                    help="skip the callgrind runs")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the import floor")
    ap.add_argument("--top", type=int, default=12, help="mappings listed (12)")
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory, keep it")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.hold = sorted({int(x) for x in args.hold.split(",") if x.strip()})
    targets = [t for t in args.targets.split(",") if t]
    if not set(targets) <= {"sidecar", "haproxy"}:
        ap.error("unknown target")
    if args.instructions and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("idle_cost: valgrind is not installed: pass --no-instructions", file=sys.stderr)
        return 1
    if "haproxy" in targets and ch.missing_tools("idle_cost", ["haproxy"]):
        return 1
    use_perf = perf_works()
    meta = {"python": sys.version.split()[0], "loop": args.loop,
            "haproxy": ch.haproxy_version(), "seconds": args.seconds,
            "settle": args.settle, "hold": args.hold, "perf": use_perf}
    results: dict[str, Result] = {}
    floor_rows: list[tuple[str, int, int, int, int]] = []
    with ch.work_dir(args.keep, "idle") as work:
        p = make_pki(work / "pki")
        with ch.serving() as app_port:
            for t in targets:
                results[t] = run_target(t, args, p, work, app_port, use_perf)
        if args.floor:
            floor_rows = floor(FLOOR_STEPS)
    if args.json:
        print(json.dumps({"meta": meta, "floor": floor_rows, "results": {
            k: {"memory_at_start_kib": r.memory_at_start, "mappings": r.mappings,
                "instructions_per_s": r.instructions,
                "windows": {n: {**vars(w), "wakeups_per_s": w.per_second}
                            for n, w in r.windows.items()}}
            for k, r in results.items()}}, indent=2))
    else:
        print(report(results, floor_rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
