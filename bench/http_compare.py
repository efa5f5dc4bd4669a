"""What does a request on a kept-alive connection cost the sidecar's http listener,
against HAProxy 2.6 in `mode http` doing the same, and what latency does it add?

Run (from the repo root; needs haproxy, valgrind and callgrind_control on PATH):

    PYTHONPATH=. python bench/http_compare.py [--requests 2000] [--latency-requests 5000]

One run, same certificates, same client, same backend for both proxies (compare_haproxy.py
sets them up the same way):

- the backend: a small threaded HTTP/1.1 server (never under valgrind) answering every
  request `200 OK` with a 4-byte body saying whether an `x-forwarded-client-cert` field
  arrived (`xfcc`) or not (`none`), so the client checks every request got one;
- the client: this process, one TLS 1.3 connection with a client certificate, kept alive,
  one small GET at a time (`GET /api/items/42`, Host, User-Agent, Accept), each response
  read whole before the next request; two workloads (`--workloads`): `same`, that GET
  repeated, and `vary`, a new item in the path of every request (`/api/items/0`, `1`,
  ...), since the sidecar reuses its checks of a connection's last head when the next is
  identical;
- the sidecar: `sidecar run` with one inbound `protocol: http` listener, a policy that
  allows the client (a connection-level rule and a path rule: both kinds are asked),
  JSON access log to a file (one line per request), identity files not watched (the
  bench changes none);
- HAProxy: `nbthread 1`, `mode http`, `option httplog` to a file (one line per request),
  `verify required` with the same bundle, `alpn http/1.1`, `http-request del-header` of any
  x-forwarded-client-cert the caller sent, then `http-request set-header` of one built
  from ssl_c_* fetches: `Hash` from `ssl_c_der,sha2(256),hex,lower`. HAProxy 2.6 has no
  fetch for a certificate's URI SAN, so its `URI=` carries `ssl_c_s_dn` instead: the same
  field shape, one more fetch. HAProxy does less per request: no per-request policy, no
  path normalization.

Measured:

1. instructions per request (primary): the proxy under `valgrind --tool=callgrind
   --instr-atstart=no`; instrumentation on, a warm-up, a dump marks the start, the
   measured requests, a second dump holds exactly their cost (as compare_haproxy.py);
2. latency (noisy): without valgrind, the client's round trip per request straight to
   the backend (plaintext, kept alive), through the sidecar, and through HAProxy, in the
   same run, interleaved in rounds so that a noisy moment hits all three alike; the
   added latency is each proxy's percentile minus the direct one's.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compare_haproxy import (
    CLIENT_ID,
    IO_TIMEOUT,
    SERVER_ID,
    Pki,
    Proc,
    _says_ready,
    client_context,
    free_port,
    haproxy_bin,
    haproxy_version,
    instructions,
    log,
    make_pki,
    measured,
    missing_tools,
    port_open,
    serving,
    sidecar_env,
    wait_until,
    work_dir,
)

REQUEST = (b"GET /api/items/42 HTTP/1.1\r\nHost: payments.internal\r\n"
           b"User-Agent: bench/1\r\nAccept: */*\r\n\r\n")
# The `vary` workload: the same head with a new item on every request. The sidecar keeps
# a connection's last request head and reuses its checks when the next is identical (a
# poller, a health check); this shows the cost when it is not.
VARYING = (b"GET /api/items/%d HTTP/1.1\r\nHost: payments.internal\r\n"
           b"User-Agent: bench/1\r\nAccept: */*\r\n\r\n")
WORKLOADS = {"same": "the same GET every time", "vary": "a new path on every request"}
WARM_REQUESTS = 200
GOAL = 1.5  # max sidecar/haproxy instructions per request (issue 19)

BACKEND = r"""
import socket, sys, threading
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    try:
        while True:
            data = c.recv(65536)
            if not data:
                break
            buf += data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head, buf = buf[:end].lower(), buf[end + 4:]
                body = b"xfcc" if b"\r\nx-forwarded-client-cert:" in head else b"none"
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                          b"Content-Length: 4\r\n\r\n" + body)
    except OSError:
        pass
    finally:
        c.close()
s = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=1024)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


# --- the proxies ------------------------------------------------------------------------


def sidecar_proc(p: Pki, work: Path, backend: int, *, callgrind: bool,
                 loop: str) -> tuple[Proc, int]:
    port = free_port()
    (work / "policy.yaml").write_text(
        "mode: enforce\ndefault: deny\nrules:\n"
        "  - name: no-admin\n    action: deny\n    from: [\"spiffe://example.org/*\"]\n"
        "    to: {paths: [\"/admin/*\"]}\n"
        f"  - name: frontend\n    action: allow\n    from: [\"{CLIENT_ID}\"]\n")
    (work / "sidecar.yaml").write_text(
        f"identity:\n  cert: {p.server_dir}/svid.pem\n  key: {p.server_dir}/svid_key.pem\n"
        f"  bundle: {p.server_dir}/bundle.pem\n"
        # No file watching: the bench changes no file, and the watcher's thread and
        # wake-ups are time-driven work that callgrind's slowdown would pin on requests.
        "  watch: false\n  reload_interval: 0\n"
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:{port}\n"
        f"    forward_to: 127.0.0.1:{backend}\n    protocol: http\n"
        f"policy: policy.yaml\ntls:\n  ktls: off\n"
        f"admin:\n  listen: 127.0.0.1:{free_port()}\n"
        "limits:\n  handshake_timeout: 60s\n  idle_timeout: 1h\n"
        "log:\n  level: info\n  format: json\n")
    proc = Proc("sidecar-http", [sys.executable, "-m", "sidecar", "run", "-c",
                                 str(work / "sidecar.yaml"), "--loop", loop],
                work, callgrind=callgrind, env=sidecar_env())
    wait_until("the sidecar ready", lambda: _says_ready(proc), [proc])
    return proc, port


def haproxy_proc(p: Pki, work: Path, backend: int, *, callgrind: bool) -> tuple[Proc, int]:
    port = free_port()
    (work / "haproxy.cfg").write_text(
        "global\n  nbthread 1\n  maxconn 4096\n  log stdout format raw daemon\n"
        "  ssl-default-bind-options ssl-min-ver TLSv1.3\n"
        "defaults\n  mode http\n  log global\n  option httplog\n  option http-keep-alive\n"
        "  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
        "  timeout http-keep-alive 1h\n"
        f"frontend inbound\n  bind 127.0.0.1:{port} ssl crt {p.server_pem} ca-file {p.bundle}"
        " verify required alpn http/1.1\n"
        "  http-request del-header x-forwarded-client-cert\n"
        f"  http-request set-header x-forwarded-client-cert \"By={SERVER_ID};"
        "Hash=%[ssl_c_der,sha2(256),hex,lower];URI=%[ssl_c_s_dn]\"\n"
        "  default_backend app\n"
        f"backend app\n  server app 127.0.0.1:{backend}\n")
    proc = Proc("haproxy-http", [haproxy_bin(), "-db", "-f", str(work / "haproxy.cfg")], work,
                callgrind=callgrind)
    wait_until("haproxy listening", lambda: port_open(port), [proc])
    return proc, port


# --- the client -------------------------------------------------------------------------


def http_client_context(p: Pki) -> ssl.SSLContext:
    ctx = client_context(p)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class KeptAlive:
    """One connection; `one()` sends a request and reads its response whole."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None, *, vary: bool = False) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = ctx.wrap_socket(raw) if ctx is not None else raw
        self.buf = b""
        self.vary = vary
        self.sent = 0

    def one(self, expect: bytes) -> float:
        request = VARYING % self.sent if self.vary else REQUEST
        self.sent += 1
        started = time.perf_counter()
        self.sock.sendall(request)
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = self.buf[:end]
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(self.buf) >= end + 4 + length:
                    break
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("the connection closed in the middle of a response")
            self.buf += data
        elapsed = time.perf_counter() - started
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response: {head[:80]!r}")
        body = self.buf[end + 4:end + 4 + length]
        self.buf = self.buf[end + 4 + length:]
        if body != expect:
            raise RuntimeError(f"the backend saw {body!r}, expected {expect!r}")
        return elapsed

    def close(self) -> None:
        self.sock.close()


# --- measuring --------------------------------------------------------------------------


@dataclass
class Cost:
    per_request: float  # instructions per request, as measured
    idle_per_request: float  # what the same wall time costs the process with no request


def per_request_instructions(name: str, args: argparse.Namespace, p: Pki, work: Path,
                             backend: int, dumps: dict[str, Path], workload: str = "same"
                             ) -> Cost:
    d = work / f"{name}-{workload}-callgrind"
    d.mkdir()
    if name == "sidecar":
        proc, port = sidecar_proc(p, d, backend, callgrind=True, loop=args.loop)
    else:
        proc, port = haproxy_proc(p, d, backend, callgrind=True)
    try:
        proc.instrument()
        conn = KeptAlive(port, http_client_context(p), vary=workload == "vary")
        for _ in range(WARM_REQUESTS):
            conn.one(b"xfcc")
        log(f"{name}: {args.requests} requests under callgrind ({WORKLOADS[workload]})")
        cost: dict[str, float] = {}
        with measured([proc], cost, dumps, "requests"):
            started = time.monotonic()
            for _ in range(args.requests):
                conn.one(b"xfcc")
            elapsed = time.monotonic() - started
        # The same wall time with nothing to do: timers that run whatever the traffic (the
        # sidecar's 10 ms loop-lag probe, its 1 s sweeper) fire ~50x more often per
        # request under callgrind's slowdown than natively, so they are measured apart.
        log(f"{name}: {elapsed:.1f} s idle under callgrind")
        time.sleep(elapsed)
        idle = instructions(proc.dump())
        conn.close()
        proc.check_alive()
        return Cost(cost[proc.name] / args.requests, idle / args.requests)
    finally:
        proc.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float


def latencies(args: argparse.Namespace, p: Pki, work: Path, backend: int) -> dict[str, Latency]:
    d = work / "latency"
    d.mkdir()
    sidecar, sidecar_port = sidecar_proc(p, d, backend, callgrind=False, loop=args.loop)
    haproxy, haproxy_port = haproxy_proc(p, d, backend, callgrind=False)
    try:
        ctx = http_client_context(p)
        conns = {"direct": (KeptAlive(backend, None), b"none"),
                 "sidecar": (KeptAlive(sidecar_port, ctx), b"xfcc"),
                 "haproxy": (KeptAlive(haproxy_port, ctx), b"xfcc")}
        samples: dict[str, list[float]] = {k: [] for k in conns}
        for conn, expect in conns.values():
            for _ in range(WARM_REQUESTS):
                conn.one(expect)
        log(f"latency: {args.latency_requests} requests each, direct / sidecar / haproxy "
            "interleaved")
        rounds = 50
        for _ in range(rounds):
            for name, (conn, expect) in conns.items():
                for _ in range(args.latency_requests // rounds):
                    samples[name].append(conn.one(expect))
        for conn, _ in conns.values():
            conn.close()
        return {k: Latency(percentile(v, 0.5) * 1e3, percentile(v, 0.99) * 1e3)
                for k, v in samples.items()}
    finally:
        sidecar.stop()
        haproxy.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000,
                    help="requests measured under callgrind, per proxy (default 2000)")
    ap.add_argument("--latency-requests", type=int, default=5000,
                    help="requests per path for the latency percentiles (default 5000)")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--skip", default="", help="comma-separated: instructions,latency")
    ap.add_argument("--workloads", default="same,vary",
                    help="instruction workloads, comma-separated: same (one GET repeated), "
                    "vary (a new path on every request); default both")
    ap.add_argument("--keep", type=Path, default=None,
                    help="work in this directory and keep it (configs, logs, dumps)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    needed = ["haproxy"] + (["valgrind", "callgrind_control"] if "instructions" not in skip
                            else [])
    if missing_tools("http_compare", needed):
        return 1
    results: dict[str, Any] = {}
    dumps: dict[str, Path] = {}
    started = time.monotonic()
    with work_dir(args.keep, "http") as work, serving(BACKEND) as backend_port:
        p = make_pki(work / "pki")
        if "instructions" not in skip:
            for workload in filter(None, args.workloads.split(",")):
                for name in ("haproxy", "sidecar"):
                    results[f"{name}_instructions_{workload}"] = vars(
                        per_request_instructions(name, args, p, work, backend_port, dumps,
                                                 workload))
        if "latency" not in skip:
            results["latency"] = {k: vars(v) for k, v in
                                  latencies(args, p, work, backend_port).items()}
    meta = {"python": platform.python_version(), "loop": args.loop, "openssl": ssl.OPENSSL_VERSION,
            "haproxy": haproxy_version(), "requests": args.requests,
            "latency_requests": args.latency_requests,
            "seconds": round(time.monotonic() - started, 1)}
    if args.json:
        print(json.dumps({"meta": meta, "results": results,
                          "dumps": {k: str(v) for k, v in dumps.items()}}, indent=2))
        return 0
    print(f"sidecar http listener (python {meta['python']}, --loop {args.loop}) vs HAProxy "
          f"{meta['haproxy']} mode http (nbthread 1); {meta['openssl']}")
    print("one kept-alive TLS 1.3 connection, small GET, 200 OK with a 4-byte body, "
          "XFCC added, one access-log line per request")
    for workload, words in WORKLOADS.items():
        sc = results.get(f"sidecar_instructions_{workload}")
        hc = results.get(f"haproxy_instructions_{workload}")
        if not (sc and hc):
            continue
        print(f"instructions per request, thousands (callgrind, {args.requests} requests, "
              f"{words}):")
        print(f"  {'':30}{'sidecar':>10}{'haproxy':>10}{'ratio':>8}")
        rows = (("as measured", "per_request"), ("idle over the same time", "idle_per_request"))
        for title, key in rows:
            s, h = sc[key], hc[key]
            print(f"  {title:30}{s / 1e3:10.1f}{h / 1e3:10.1f}{s / h if h else 0:8.2f}")
        s = sc["per_request"] - sc["idle_per_request"]
        h = hc["per_request"] - hc["idle_per_request"]
        ratio = s / h
        print(f"  {'the requests alone':30}{s / 1e3:10.1f}{h / 1e3:10.1f}{ratio:8.2f}"
              f"  (goal <= {GOAL}: {'ok' if ratio <= GOAL else 'OVER'})")
    lat = results.get("latency")
    if lat:
        d = lat["direct"]
        print(f"latency per request, ms ({args.latency_requests} each; noisy):")
        for name in ("direct", "sidecar", "haproxy"):
            v = lat[name]
            added = "" if name == "direct" else (
                f"   added: p50 {v['p50_ms'] - d['p50_ms']:+.3f}, "
                f"p99 {v['p99_ms'] - d['p99_ms']:+.3f}")
            print(f"  {name:8} p50 {v['p50_ms']:.3f}  p99 {v['p99_ms']:.3f}{added}")
    print(f"({meta['seconds']} s)")
    if dumps and args.keep:
        for k, v in dumps.items():
            print(f"  callgrind dump {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
