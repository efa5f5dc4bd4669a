"""Memory per idle proxied mTLS connection: the sidecar, HAProxy and a floor (issue 11, item 1).

Run (from the repo root; needs haproxy):

    PYTHONPATH=. python bench/memory_idle.py                       # N = 9000, table
    PYTHONPATH=. python bench/memory_idle.py --connections 2000 --checkpoints 500
    PYTHONPATH=. python bench/memory_idle.py --json --keep bench/out

Options: `--connections N` (9000) connections held at the end, `--checkpoints 2000`
(comma-separated counts measured on the way up; the slope between a checkpoint and N is
the marginal cost, free of one-off growth), `--clients K` (4 client processes, each
holding N/K), `--targets sidecar,haproxy,floor`, `--loop uvloop|asyncio` (the sidecar's),
`--settle S` (2 s of quiet before each RSS reading), `--profile N2` (2000; 0 = skip: see
below), `--top K` (10 allocation sites listed), `--keep DIR`, `--json`. Takes ~2.5 min at
the defaults.

What is measured, the same way for both proxies and the floor, in one run:

- certificates: the PKI of compare_haproxy.py (root -> intermediate -> ECDSA P-256 SVIDs,
  client `.../sa/frontend`, server `.../sa/payments`); TLS 1.3 only, client cert required;
- the app: one echo process per target (asyncio, a separate process, so that its memory
  and descriptors are not the proxy's);
- the client: K processes of this script (`--worker hold`), stdlib `ssl` on blocking
  sockets; each connection does a full handshake with the client certificate, one
  64-byte round trip, and is then held open, idle;
- the proxy: the sidecar as users run it (`python -m sidecar run -c CFG --loop uvloop`,
  `limits: {max_connections: N+500, max_pending_handshakes: 1024}`, JSON log to a file),
  or HAProxy 2.6 `nbthread 1` (`maxconn N+500`, `bind ... ssl crt ... ca-file ... verify
  required`, `option tcplog`);
- the floor: the least any Python process using the stdlib `ssl` module on OpenSSL can
  hold per idle mTLS server connection, a reference row next to the two proxies. A bare
  process of this script (`--worker floor`): the sidecar's server SSLContext
  (`sidecar.tls.contexts.build` from the same PKI files: the same TLS settings, released
  buffers, memory session store), a blocking listening socket (backlog 1024) and one
  accept loop; each connection gets a blocking handshake, the same 64-byte echo, then
  `openssl.drop_peer_chains` (as the sidecar does once the peer is authenticated), and the
  SSLSocket is kept in a list. No event loop, no app-side socket, no per-connection state
  besides the SSLSocket. The first connection (the warm-up) is closed after its echo.

Per connection = (VmRSS holding N - VmRSS once the listener is ready and one warm-up
connection has been made and closed) / N, from /proc/PID/status, in KiB. The same deltas
of /proc/PID/smaps_rollup (Anonymous, Private_Dirty) and the count of open descriptors
(/proc/PID/fd, which must grow by 2 per connection for a proxy, by 1 for the floor) are
shown as cross-checks.

Memory is the resident size of the proxy (or floor) process only: socket buffers in the
kernel are not in RSS, for any target.

Where the sidecar's memory goes (`--profile N2`): a third run of the sidecar holds N2
connections with two counters on (a wrapper around `python -m sidecar run`, profiling
only): tracemalloc for Python's allocators (objects, uvloop's handles), and OpenSSL's own
allocator replaced through `CRYPTO_set_mem_functions` by a few C functions (compiled with
gcc into the work directory) that keep the live bytes and blocks per OpenSSL source line.
Printed: KiB per connection that OpenSSL keeps, that Python keeps, and the rest of the
RSS growth (malloc headers and rounding, fragmentation), OpenSSL's part by kind (the SSL
object, the peer's parsed certificate chain, cipher contexts, keys) and the largest
allocation sites on both sides. Without a C compiler only the Python split is shown.

The open-file limit here is 20,000 (soft = hard, cannot be raised) and a proxied
connection holds two descriptors, so N stops near 9,900; the script says so when N does
not fit.

Other bench scripts (leak.py, storm.py, backpressure.py) import the helpers here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import compare_haproxy as ch

ROOT = Path(__file__).resolve().parents[1]
KIB = 1024
REQUEST = ch.REQUEST  # 64 bytes
GOAL_KIB = 20.0
FLOOR_BACKLOG = 1024
FLOOR_IDLE_EXIT = 3600.0  # seconds without a new connection after which the floor exits
FLOOR_ABOUT = ("floor: a bare Python process holding only the TLS server sockets (stdlib ssl,"
               " chains dropped), no event loop, no app-side socket")
# Descriptors a held connection costs each target: a proxy holds both sides.
FDS_PER_CONN = {"sidecar": 2, "haproxy": 2, "floor": 1}

log = ch.log


# --- reading a process from the outside -------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of pid in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup, every 'kB' field, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1])
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def http_get(port: int, path: str, timeout: float = 10.0) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def metric_values(text: str, name: str) -> dict[str, float]:
    """Every sample of one metric from Prometheus text: {label-string: value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in "{ "):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out


# --- the sidecar -------------------------------------------------------------------------

# Runs `sidecar run` (profiling only) with two counters on, and a thread that answers
# snapshot requests: a file NAME.req in the directory given as the first argument becomes
# NAME.snap (a tracemalloc dump) and NAME.ssl.tsv (OpenSSL's live allocations by source
# line), and NAME.req is renamed NAME.done.
# - tracemalloc sees what Python's allocators hand out (objects, uvloop's handles);
# - OpenSSL's allocator is replaced, before anything has loaded libcrypto, through
#   CRYPTO_set_mem_functions with the C functions of MEMTRACK_C (compiled with gcc into
#   the work directory; the second argument, "-" when there is no compiler), which keep
#   live bytes and blocks per OpenSSL source line. (Python callbacks through ctypes cannot
#   do it: OpenSSL frees while _ssl has an exception set, and the callback then fails.)
PROFILE_WRAPPER = r"""
import ctypes, os, runpy, sys, threading, time, tracemalloc
where = sys.argv.pop(1)
lib = sys.argv.pop(1)
mt = None
if lib != "-":
    mt = ctypes.CDLL(lib)
    crypto = ctypes.CDLL("libcrypto.so.3")
    crypto.CRYPTO_set_mem_functions.argtypes = [ctypes.c_void_p] * 3
    fns = [ctypes.cast(getattr(mt, n), ctypes.c_void_p) for n in
           ("mt_malloc", "mt_realloc", "mt_free")]
    if not crypto.CRYPTO_set_mem_functions(*fns):
        sys.exit("profile wrapper: OpenSSL allocated before CRYPTO_set_mem_functions")
tracemalloc.start(1)
def serve():
    while True:
        for name in sorted(os.listdir(where)):
            if name.endswith(".req"):
                stem = os.path.join(where, name[:-4])
                tracemalloc.take_snapshot().dump(stem + ".snap")
                if mt is not None:
                    mt.mt_dump((stem + ".ssl.tsv").encode())
                os.rename(stem + ".req", stem + ".done")
        time.sleep(0.1)
threading.Thread(target=serve, daemon=True).start()
runpy.run_module("sidecar", run_name="__main__", alter_sys=True)
"""

MEMTRACK_C = r"""
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <stdint.h>

#define NSITES 8192
struct site { const char *file; int line; long bytes; long blocks; };
static struct site sites[NSITES];
static volatile int lock;

static struct site *site_for(const char *file, int line) {
    uintptr_t h = ((uintptr_t)file >> 3) * 31u + (unsigned)line;
    for (unsigned i = 0; i < NSITES; i++) {
        struct site *s = &sites[(h + i) % NSITES];
        if (s->file == file && s->line == line) return s;
        if (s->file == NULL && s->line == 0) {
            while (__atomic_exchange_n(&lock, 1, __ATOMIC_ACQUIRE)) {}
            if (s->file == NULL && s->line == 0) {
                s->file = file ? file : "?";
                s->line = line ? line : -1;
            }
            __atomic_store_n(&lock, 0, __ATOMIC_RELEASE);
            if (s->file == (file ? file : "?") && s->line == (line ? line : -1)) return s;
        }
    }
    return &sites[0];
}

struct hdr { size_t size; struct site *site; };

static void account(struct site *s, long bytes, long blocks) {
    __atomic_add_fetch(&s->bytes, bytes, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->blocks, blocks, __ATOMIC_RELAXED);
}

void *mt_malloc(size_t n, const char *file, int line) {
    struct hdr *h = malloc(n + sizeof(struct hdr));
    if (!h) return NULL;
    h->size = n; h->site = site_for(file, line);
    account(h->site, (long)n, 1);
    return h + 1;
}

void mt_free(void *p, const char *file, int line) {
    (void)file; (void)line;
    if (!p) return;
    struct hdr *h = (struct hdr *)p - 1;
    account(h->site, -(long)h->size, -1);
    free(h);
}

void *mt_realloc(void *p, size_t n, const char *file, int line) {
    if (!p) return mt_malloc(n, file, line);
    if (n == 0) { mt_free(p, file, line); return NULL; }
    struct hdr *h = (struct hdr *)p - 1;
    struct site *old = h->site; size_t oldn = h->size;
    struct hdr *q = realloc(h, n + sizeof(struct hdr));
    if (!q) return NULL;
    account(old, -(long)oldn, -1);
    q->size = n; q->site = site_for(file, line);
    account(q->site, (long)n, 1);
    return q + 1;
}

int mt_dump(const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    for (unsigned i = 0; i < NSITES; i++)
        if (sites[i].file)
            fprintf(f, "%s:%d\t%ld\t%ld\n", sites[i].file, sites[i].line,
                    __atomic_load_n(&sites[i].bytes, __ATOMIC_RELAXED),
                    __atomic_load_n(&sites[i].blocks, __ATOMIC_RELAXED));
    return fclose(f);
}
"""


def build_memtrack(work: Path) -> str:
    """Compile MEMTRACK_C; its path, or "-" when there is no C compiler."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return "-"
    src, lib = work / "memtrack.c", work / "memtrack.so"
    src.write_text(MEMTRACK_C)
    run = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        log(f"cannot build the OpenSSL allocation counter: {run.stderr.strip()[:300]}")
        return "-"
    return str(lib)


@dataclass
class Sidecar:
    proc: ch.Proc
    tls_port: int
    admin_port: int
    snap_dir: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(http_get(self.admin_port, "/status"))
        return body

    def metrics(self) -> str:
        return http_get(self.admin_port, "/metrics")

    def log_records(self) -> Iterator[dict[str, Any]]:
        with self.proc.log_path.open(errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue

    def snapshot(self, name: str, timeout: float = 120.0) -> Path:
        """A tracemalloc snapshot (only when started with tracemalloc=True)."""
        assert self.snap_dir is not None, "started without tracemalloc"
        (self.snap_dir / f"{name}.req").touch()
        deadline = time.monotonic() + timeout
        while not (self.snap_dir / f"{name}.done").exists():
            self.proc.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("tracemalloc snapshot did not come")
            time.sleep(0.1)
        return self.snap_dir / f"{name}.snap"

    def stop(self) -> None:
        self.proc.stop()


def start_sidecar(
    p: ch.Pki, work: Path, app_port: int, *, name: str = "sidecar",
    allow: tuple[str, ...] = (ch.CLIENT_ID,), limits: dict[str, Any] | None = None,
    loop: str = "uvloop", tracemalloc: bool = False, log_level: str = "info",
) -> Sidecar:
    """An inbound sidecar (mTLS on tls_port -> 127.0.0.1:app_port), ready to serve."""
    tls_port, admin_port = ch.free_port(), ch.free_port()
    rules = "".join(f"  - name: allowed{i}\n    action: allow\n    from: [\"{sid}\"]\n"
                    for i, sid in enumerate(allow))
    (work / f"{name}-policy.yaml").write_text(
        f"mode: enforce\ndefault: deny\nrules:\n{rules}")
    lim = "".join(f"  {k}: {v}\n" for k, v in (limits or {}).items())
    cfg = work / f"{name}.yaml"
    cfg.write_text(
        f"identity:\n  cert: {p.server_dir}/svid.pem\n  key: {p.server_dir}/svid_key.pem\n"
        f"  bundle: {p.server_dir}/bundle.pem\n"
        f"inbound:\n  - name: app\n    listen: 127.0.0.1:{tls_port}\n"
        f"    forward_to: 127.0.0.1:{app_port}\n"
        f"policy: {name}-policy.yaml\n"
        f"tls:\n  ktls: off\n"
        f"workers: 1\n"
        f"admin:\n  listen: 127.0.0.1:{admin_port}\n"
        + (f"limits:\n{lim}" if lim else "")
        + f"log:\n  level: {log_level}\n  format: json\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    snap_dir = None
    if tracemalloc:
        snap_dir = work / f"{name}-snapshots"
        snap_dir.mkdir()
        argv = [sys.executable, "-c", PROFILE_WRAPPER, str(snap_dir), build_memtrack(work)]
    else:
        argv = [sys.executable, "-m", "sidecar"]
    argv += ["run", "-c", str(cfg), "--loop", loop]
    proc = ch.Proc(name, argv, work, callgrind=False, env=env)
    sc = Sidecar(proc, tls_port, admin_port, snap_dir)
    try:
        ch.wait_until(f"{name} ready", lambda: ch._says_ready(proc), [proc])
    except BaseException:
        proc.stop()
        raise
    return sc


def in_workdir[T](name: str, keep: Path | None, body: Callable[[Path], T]) -> T:
    """`body(work)` in compare_haproxy.work_dir: under `keep` and kept, or a temporary one
    removed afterwards. On a failure the sidecar logs' events are printed first."""
    with ch.work_dir(keep, name) as work:
        try:
            return body(work)
        except BaseException:
            print_events(work)
            raise


def print_events(work: Path, last: int = 40) -> None:
    """After a failure: the sidecar logs' lines other than access lines (start, signals,
    errors, drain), which the tail of a busy log no longer shows."""
    for path in sorted(work.rglob("*.log")):
        events = [line[:400] for line in path.read_text(errors="replace").splitlines()
                  if '"logger":"sidecar.access"' not in line]
        print(f"--- {path.name}: the last {last} lines that are not access lines",
              *events[-last:], sep="\n", file=sys.stderr)


# --- HAProxy -----------------------------------------------------------------------------


def start_haproxy(p: ch.Pki, work: Path, app_port: int, *, maxconn: int,
                  name: str = "haproxy") -> tuple[ch.Proc, int]:
    """An inbound HAProxy (nbthread 1, compare_haproxy.py's settings, maxconn raised)."""
    tls_port = ch.free_port()
    head = ch.HAPROXY_GLOBAL
    if "maxconn 4096" not in head or "timeout client 5m" not in head:
        raise RuntimeError("compare_haproxy.HAPROXY_GLOBAL changed: update start_haproxy")
    head = (head.replace("maxconn 4096", f"maxconn {maxconn}")
            .replace("timeout client 5m", "timeout client 30m")
            .replace("timeout server 5m", "timeout server 30m"))
    cfg = work / f"{name}.cfg"
    cfg.write_text(
        head + f"frontend inbound\n  bind 127.0.0.1:{tls_port} ssl crt {p.server_pem}"
        f" ca-file {p.bundle} verify required\n  maxconn {maxconn}\n"
        f"  default_backend app\nbackend app\n  server app 127.0.0.1:{app_port}\n")
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    proc = ch.Proc(name, [haproxy, "-db", "-f", str(cfg)], work, callgrind=False)
    ch.wait_until("haproxy listening", lambda: ch.port_open(tls_port), [proc])
    return proc, tls_port


# --- worker processes --------------------------------------------------------------------


class Worker:
    """A child process of a bench script (`SCRIPT --worker KIND ...`) that takes one
    command per line on stdin and answers one line per command on stdout."""

    def __init__(self, script: str, args: list[str], work: Path, name: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self._err = (work / f"{name}.err").open("wb")
        self.err_path = work / f"{name}.err"
        if env is None:
            env = dict(os.environ)
            env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
        self.popen = subprocess.Popen(
            [sys.executable, script, "--worker", *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1, cwd=work,
            env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def expect(self, prefix: str, timeout: float, watch: Sequence[ch.Proc] = ()) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                for p in watch:
                    p.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no '{prefix}' in {timeout} s") from None
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.popen.wait()}):\n"
                                   + self.err_path.read_text(errors="replace")[-2000:])
            if line.startswith(prefix):
                return line

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                self.send("exit")
                self.popen.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.popen.kill()
                self.popen.wait()
        self._err.close()


def client_context(cert_dir: Path, bundle: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SVIDs carry a SPIFFE ID, not a DNS name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(bundle)
    ctx.load_cert_chain(cert_dir / "svid.pem", cert_dir / "svid_key.pem")
    return ctx


def worker_echo(argv: list[str]) -> int:
    """An asyncio echo app: `echo`; prints `ready PORT`, runs until stdin
    closes or says exit."""
    import asyncio

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: Any = transport

        def data_received(self, data: bytes) -> None:
            self.t.write(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        await loop.run_in_executor(None, _wait_exit)

    _run_asyncio(main())
    return 0


def _wait_exit() -> None:
    for line in sys.stdin:
        if line.strip() == "exit":
            return


def _run_asyncio(coro: Any) -> None:
    import asyncio
    try:
        import uvloop
        asyncio.run(coro, loop_factory=uvloop.new_event_loop)
    except ImportError:
        asyncio.run(coro)


def worker_hold(argv: list[str]) -> int:
    """`hold PORT CERT_DIR BUNDLE`: on `hold K`, open connections (full mTLS handshake,
    one 64-byte round trip) until K are held; answer `held K failed F`."""
    port, cert_dir, bundle = int(argv[0]), Path(argv[1]), Path(argv[2])
    ctx = client_context(cert_dir, bundle)
    held: list[ssl.SSLSocket] = []
    failed = 0
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "exit":
            break
        want = int(cmd[1])
        tries = 0
        while len(held) < want and tries < 3 * want + 10:
            tries += 1
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=60)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = ctx.wrap_socket(raw)
                tls.sendall(REQUEST)
                _recv_exactly(tls, len(REQUEST), "closed before the echo")
                held.append(tls)
            except OSError as exc:
                failed += 1
                if failed <= 5:
                    print(f"connection failed: {exc!r}", file=sys.stderr, flush=True)
        print(f"held {len(held)} failed {failed}", flush=True)
    for s in held:
        s.close()
    return 0


def _recv_exactly(tls: ssl.SSLSocket, size: int, early_end: str) -> bytes:
    got = b""
    while len(got) < size:
        part = tls.recv(size - len(got))
        if not part:
            raise ConnectionError(early_end)
        got += part
    return got


def worker_floor(argv: list[str]) -> int:
    """`floor CERT_DIR BUNDLE MOST`: the floor (see the docstring). Prints `ready PORT`,
    then accepts at most MOST connections on a blocking socket, one at a time: blocking
    handshake, one 64-byte echo, the peer's chains dropped, the SSLSocket kept. The first
    (the warm-up) is closed after its echo. Runs until killed, or FLOOR_IDLE_EXIT seconds
    without a new connection (an orphan ends)."""
    from sidecar.config import TlsConfig
    from sidecar.identity import load_identity
    from sidecar.tls import contexts, openssl

    cert_dir, bundle, most = Path(argv[0]), Path(argv[1]), int(argv[2])
    identity = load_identity(cert_dir / "svid.pem", cert_dir / "svid_key.pem", bundle, {}, ())
    # The sidecar's settings as this bench runs it: one process, so sessions in memory.
    ctx = contexts.build(identity, session_cache_size=TlsConfig().session_cache_size).server
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(FLOOR_BACKLOG)
    listener.settimeout(FLOOR_IDLE_EXIT)
    print(f"ready {listener.getsockname()[1]}", flush=True)
    held: list[ssl.SSLSocket] = []
    failed = 0
    for i in range(most):
        try:
            raw, _ = listener.accept()
        except TimeoutError:
            print(f"floor: no connection in {FLOOR_IDLE_EXIT:.0f} s, exiting", flush=True)
            return 0
        tls: ssl.SSLSocket | None = None
        try:
            raw.settimeout(60)  # a stalled client must not stop the loop for good
            tls = ctx.wrap_socket(raw, server_side=True)
            ptr = openssl.ssl_pointer(tls)
            if ptr is None:
                print("floor: openssl.ssl_pointer cannot read the SSL object",
                      file=sys.stderr, flush=True)
                return 1
            openssl.drop_peer_chains(ptr)
            tls.sendall(_recv_exactly(tls, len(REQUEST), "closed before the request"))
            if i == 0:  # the warm-up: close_notify both ways, as the proxies answer it
                try:
                    tls.unwrap()
                except (OSError, ValueError):
                    pass
                tls.close()
                continue
            held.append(tls)
        except OSError as exc:
            failed += 1
            if failed <= 5:
                print(f"floor: connection failed: {exc!r}", file=sys.stderr, flush=True)
            (tls or raw).close()
    listener.close()
    print(f"floor: {most} connections accepted ({len(held)} held, {failed} failed); "
          "holding them until killed", flush=True)
    time.sleep(FLOOR_IDLE_EXIT)
    return 0


WORKERS = {"echo": worker_echo, "hold": worker_hold, "floor": worker_floor}


def start_echo(script: str, work: Path, name: str = "echo") -> tuple[Worker, int]:
    w = Worker(script, ["echo"], work, name)
    port = int(w.expect("ready", 30).split()[1])
    return w, port


def start_floor(p: ch.Pki, work: Path, *, most: int,
                name: str = "floor") -> tuple[ch.Proc, int]:
    """The floor process (`--worker floor`, the server's PKI files), listening; its port."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    argv = [sys.executable, __file__, "--worker", "floor", str(p.server_dir),
            str(p.server_dir / "bundle.pem"), str(most)]
    proc = ch.Proc(name, argv, work, callgrind=False, env=env)
    # The port comes in the log ("ready PORT"): no probe connection, which would count.
    try:
        ch.wait_until(f"{name} ready", lambda: _floor_port(proc) is not None, [proc])
    except BaseException:
        proc.stop()
        raise
    port = _floor_port(proc)
    assert port is not None
    return proc, port


def _floor_port(proc: ch.Proc) -> int | None:
    for line in proc.log_text().splitlines():
        if line.startswith("ready "):
            return int(line.split()[1])
    return None


def shares(total: int, k: int) -> list[int]:
    return [total // k + (i < total % k) for i in range(k)]


# --- the measurement ---------------------------------------------------------------------


@dataclass
class Sample:
    held: int
    rss_kib: int
    smaps: dict[str, int]
    fds: int
    failed: int = 0
    active: int | None = None  # the sidecar's own count (/status)


@dataclass
class TargetResult:
    target: str
    base: Sample
    points: list[Sample] = field(default_factory=list)
    traced: dict[str, Any] = field(default_factory=dict)

    def per_conn(self, s: Sample, key: str = "rss") -> float:
        a = s.rss_kib if key == "rss" else s.smaps.get(key, 0)
        b = self.base.rss_kib if key == "rss" else self.base.smaps.get(key, 0)
        return (a - b) / s.held

    def marginal(self, key: str = "rss") -> float | None:
        if len(self.points) < 2:
            return None
        lo, hi = self.points[0], self.points[-1]
        a = (hi.rss_kib - lo.rss_kib) if key == "rss" else hi.smaps.get(key, 0) - lo.smaps.get(
            key, 0)
        return a / (hi.held - lo.held)


def sample(pid: int, held: int, failed: int = 0, active: int | None = None) -> Sample:
    return Sample(held, rss_kib(pid), smaps_rollup(pid), fd_count(pid), failed, active)


def hold_and_measure(target: str, pid: int, tls_port: int, p: ch.Pki, work: Path,
                     args: argparse.Namespace, counts: list[int], watch: list[ch.Proc],
                     sidecar: Sidecar | None = None) -> TargetResult:
    # One warm-up connection, made and closed, before the baseline.
    r = ch.one_connection(ch.client_context(p), tls_port, None)
    del r
    time.sleep(args.settle)
    base = sample(pid, 0)
    res = TargetResult(target, base)
    log(f"{target}: baseline RSS {base.rss_kib} KiB, {base.fds} fds")
    clients = [Worker(__file__, ["hold", str(tls_port), str(p.client_dir), str(p.bundle)],
                      work, f"{target}-client{i}") for i in range(args.clients)]
    try:
        for n in counts:
            t0 = time.monotonic()
            for w, share in zip(clients, shares(n, args.clients), strict=True):
                w.send(f"hold {share}")
            held = failed = 0
            for w in clients:
                ans = w.expect("held", args.timeout, watch).split()
                held += int(ans[1])
                failed = int(ans[3]) + failed
            log(f"{target}: {held} held ({failed} failed) in {time.monotonic() - t0:.1f} s")
            time.sleep(args.settle)
            active = sidecar.status()["connections"]["active"] if sidecar else None
            s = sample(pid, held, failed, active)
            res.points.append(s)
            log(f"{target}: RSS {s.rss_kib} KiB, {s.fds} fds"
                + (f", sidecar says {active} active" if active is not None else "")
                + f": {res.per_conn(s):.1f} KiB per connection")
            if held != n:
                log(f"WARNING: {target}: wanted {n} held, got {held}")
    finally:
        for w in clients:
            w.stop()
    return res


def run_sidecar(args: argparse.Namespace, p: ch.Pki, work: Path, counts: list[int],
                *, tracemalloc: bool = False) -> TargetResult:
    name = "sidecar-traced" if tracemalloc else "sidecar"
    d = work / name
    d.mkdir()
    echo, echo_port = start_echo(__file__, d)
    sc = None
    try:
        most = max(counts) + 500
        limits = {"max_connections": most, "max_pending_handshakes": min(1024, most),
                  "idle_timeout": "30m"}
        sc = start_sidecar(p, d, echo_port, name=name, limits=limits, loop=args.loop,
                           tracemalloc=tracemalloc)
        log(f"{name}: pid {sc.pid}, listening on {sc.tls_port}")
        if not tracemalloc:
            return hold_and_measure(name, sc.pid, sc.tls_port, p, d, args, counts, [sc.proc],
                                    sc)
        return traced_run(sc, p, d, args, counts[-1])
    finally:
        if sc is not None:
            sc.stop()
        echo.stop()


def traced_run(sc: Sidecar, p: ch.Pki, work: Path, args: argparse.Namespace,
               n: int) -> TargetResult:
    """Hold n under tracemalloc; split the growth into Python's allocations and the rest."""
    import tracemalloc

    ch.one_connection(ch.client_context(p), sc.tls_port, None)
    time.sleep(args.settle)
    snap0 = sc.snapshot("base")
    base = sample(sc.pid, 0)
    res = TargetResult("sidecar-traced", base)
    clients = [Worker(__file__, ["hold", str(sc.tls_port), str(p.client_dir), str(p.bundle)],
                      work, f"traced-client{i}") for i in range(args.clients)]
    try:
        for w, share in zip(clients, shares(n, args.clients), strict=True):
            w.send(f"hold {share}")
        held = sum(int(w.expect("held", args.timeout, [sc.proc]).split()[1]) for w in clients)
        time.sleep(args.settle)
        snap1 = sc.snapshot("held")
        res.points.append(sample(sc.pid, held))
    finally:
        for w in clients:
            w.stop()
    # The profile wrapper's own table (code in "<string>") is not the sidecar's memory.
    keep = [tracemalloc.Filter(False, "<string>")]
    s0 = tracemalloc.Snapshot.load(str(snap0)).filter_traces(keep)
    s1 = tracemalloc.Snapshot.load(str(snap1)).filter_traces(keep)
    grown = sum(st.size_diff for st in s1.compare_to(s0, "filename"))
    top = s1.compare_to(s0, "lineno")[:args.top]
    t0, t1 = _ssl_table(snap0), _ssl_table(snap1)
    sites = {k: (t1.get(k, [0, 0])[0] - t0.get(k, [0, 0])[0],
                 t1.get(k, [0, 0])[1] - t0.get(k, [0, 0])[1]) for k in set(t0) | set(t1)}
    groups: dict[str, list[int]] = {}
    for k, (nbytes, blocks) in sites.items():
        g = groups.setdefault(_openssl_group(k), [0, 0])
        g[0] += nbytes
        g[1] += blocks
    ssl_bytes = sum(v[0] for v in sites.values())
    ssl_blocks = sum(v[1] for v in sites.values())
    res.traced = {
        "held": held,
        "python_kib_per_conn": grown / KIB / held,
        "top": [{"where": f"{_short(str(st.traceback[0].filename))}:{st.traceback[0].lineno}",
                 "kib_per_conn": st.size_diff / KIB / held,
                 "blocks_per_conn": st.count_diff / held} for st in top],
        "openssl_counted": bool(t1),
        "openssl_kib_per_conn": ssl_bytes / KIB / held,
        "openssl_blocks_per_conn": ssl_blocks / held,
        "openssl_groups": sorted(
            ({"group": g, "kib_per_conn": v[0] / KIB / held, "blocks_per_conn": v[1] / held}
             for g, v in groups.items()), key=lambda e: -e["kib_per_conn"]),
        "openssl_top": [
            {"where": k.removeprefix("../"), "kib_per_conn": v[0] / KIB / held,
             "blocks_per_conn": v[1] / held}
            for k, v in sorted(sites.items(), key=lambda kv: -kv[1][0])[:args.top]],
    }
    return res


def _ssl_table(snap: Path) -> dict[str, list[int]]:
    path = snap.with_suffix(".ssl.tsv")
    out: dict[str, list[int]] = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            site, nbytes, blocks = line.rsplit("\t", 2)
            out[site] = [int(nbytes), int(blocks)]
    return out


# OpenSSL source file -> what its allocations are, for the breakdown.
_OPENSSL_GROUPS = (
    (("crypto/asn1/", "crypto/x509/", "crypto/x509v3/", "crypto/objects/",
      "crypto/buffer/", "crypto/stack/"), "certificates: parsed X509 / ASN.1 (peer chain)"),
    (("ssl/record/",), "record layer: buffers and record state"),
    (("crypto/evp/", "crypto/modes/", "crypto/aes/", "crypto/chacha/", "crypto/sha/",
      "crypto/hmac/", "providers/"), "cipher and digest contexts (EVP, providers)"),
    (("crypto/bn/", "crypto/ec/"), "EC keys and bignums"),
    (("ssl/ssl_sess.c",), "SSL_SESSION"),
    (("ssl/",), "SSL object, handshake state (ssl/ other)"),
)


def _openssl_group(site: str) -> str:
    path = site.removeprefix("../")
    for prefixes, name in _OPENSSL_GROUPS:
        if path.startswith(prefixes):
            return name
    return "other: " + path.rsplit(":", 1)[0]


def _short(path: str) -> str:
    if str(ROOT) + "/" in path:
        return path.split(str(ROOT) + "/", 1)[1]
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker == "/lib/python3" else rest
    return path


def run_haproxy(args: argparse.Namespace, p: ch.Pki, work: Path,
                counts: list[int]) -> TargetResult:
    d = work / "haproxy"
    d.mkdir()
    echo, echo_port = start_echo(__file__, d)
    proc = None
    try:
        proc, port = start_haproxy(p, d, echo_port, maxconn=max(counts) + 500)
        log(f"haproxy: pid {proc.pid}, listening on {port}")
        return hold_and_measure("haproxy", proc.pid, port, p, d, args, counts, [proc])
    finally:
        if proc is not None:
            proc.stop()
        echo.stop()


def run_floor(args: argparse.Namespace, p: ch.Pki, work: Path,
              counts: list[int]) -> TargetResult:
    d = work / "floor"
    d.mkdir()
    proc = None
    try:
        # Attempts it accepts: the warm-up, N, and room for failures (as maxconn N+500).
        proc, port = start_floor(p, d, most=max(counts) + 500)
        log(f"floor: pid {proc.pid}, listening on {port}")
        return hold_and_measure("floor", proc.pid, port, p, d, args, counts, [proc])
    finally:
        if proc is not None:
            proc.stop()


# --- report -----------------------------------------------------------------------------


def report(results: dict[str, TargetResult], meta: dict[str, Any]) -> str:
    sc, hp, fl = results.get("sidecar"), results.get("haproxy"), results.get("floor")
    lines = [
        f"memory per idle proxied mTLS connection: sidecar (python {meta['python']}, "
        f"--loop {meta['loop']}) vs HAProxy {meta['haproxy']} (nbthread 1), and a floor",
        f"{meta['openssl']}; TLS 1.3, ECDSA P-256 SVIDs, client cert required; "
        f"client: {meta['clients']} processes, blocking stdlib ssl; app: asyncio echo process",
        FLOOR_ABOUT,
        "RSS growth per connection, KiB (VmRSS holding N - VmRSS after warm-up) / N;"
        " ratio = sidecar / haproxy",
        f"{'':28}{'sidecar':>10}{'haproxy':>10}{'floor':>10}{'ratio':>8}",
    ]

    def row(title: str, s: float | None, h: float | None, f: float | None,
            extra: str = "") -> None:
        r = s / h if s is not None and h is not None and abs(h) >= 1 else None
        lines.append(f"  {title:26}{ch._num(s, '10.1f')}{ch._num(h, '10.1f')}"
                     f"{ch._num(f, '10.1f')}{ch._num(r, '8.2f')}{extra}")

    def at(r: TargetResult | None, i: int, key: str = "rss") -> float | None:
        return r.per_conn(r.points[i], key) if r and len(r.points) > i else None

    present = [r for r in (sc, hp, fl) if r]
    npts = max((len(r.points) for r in present), default=0)
    for i in range(npts):
        held = [r.points[i].held for r in present if len(r.points) > i]
        s, h = at(sc, i), at(hp, i)
        extra = ""
        if i == npts - 1 and s is not None:
            ok = s <= GOAL_KIB and (h is None or s < h)
            extra = f"   goal <= {GOAL_KIB:.0f} KiB and < haproxy: {'ok' if ok else 'OVER'}"
        row(f"N = {'/'.join(str(x) for x in sorted(set(held)))}", s, h, at(fl, i), extra)
    if npts >= 2:
        lo, hi = present[0].points[0].held, present[0].points[-1].held
        row(f"marginal, {lo} -> {hi}", *(r.marginal() if r else None for r in (sc, hp, fl)))
    lines.append("smaps_rollup growth per connection at the largest N, KiB")
    for key in ("Anonymous", "Private_Dirty", "Private_Clean", "Shared_Clean"):
        row(key, *(at(r, -1, key) for r in (sc, hp, fl)))
    lines.append("cross-checks at the largest N")
    for r in present:
        last = r.points[-1]
        want = FDS_PER_CONN.get(r.target, 2)
        got = (last.fds - r.base.fds) / last.held
        off = "" if abs(got - want) < 0.05 else ": OFF"
        lines.append(
            f"  {r.target:9} held {last.held}, failed {last.failed}, descriptors "
            f"+{got:.2f} per connection ({want} expected{off}), baseline RSS "
            f"{r.base.rss_kib} KiB, at N {last.rss_kib} KiB"
            + (f", /status active {last.active}" if last.active is not None else ""))
    tr = results.get("sidecar-traced")
    if tr and tr.traced:
        t = tr.traced
        held = t["held"]
        py, ossl = t["python_kib_per_conn"], t["openssl_kib_per_conn"]
        lines.append(f"where the sidecar's growth goes, KiB per connection (profile run, {held}"
                     " held: tracemalloc + OpenSSL's allocator counted)")
        if sc:
            near = min(sc.points, key=lambda s: abs(s.held - held))
            total = sc.per_conn(near)
            lines.append(f"  {'RSS growth without profiling, N=' + str(near.held):50}"
                         f"{total:7.1f}")
        else:
            total = None
        if not t["openssl_counted"]:
            lines.append("  (OpenSSL's allocations not counted: no C compiler)")
            ossl = 0.0
        lines.append(f"  {'OpenSSL keeps (live bytes it asked malloc for)':50}{ossl:7.1f}"
                     f"   in {t['openssl_blocks_per_conn']:.0f} blocks")
        lines.append(f"  {'Python keeps (objects, uvloop handles)':50}{py:7.1f}")
        if total is not None:
            lines.append(f"  {'the rest: malloc headers, rounding, fragments':50}"
                         f"{total - ossl - py:7.1f}   (glibc adds 8-16 B a block)")
            over = t["openssl_blocks_per_conn"] * 12 / KIB
            lines.append(f"  OpenSSL's share of the RSS growth: {ossl / total:.0%}"
                         f" ({ossl:.1f} of {total:.1f} KiB; ~{(ossl + over) / total:.0%}"
                         " with its blocks' malloc headers)")
        lines.append("  OpenSSL's, by kind (KiB, blocks per connection):")
        for e in t["openssl_groups"]:
            if abs(e["kib_per_conn"]) >= 0.05:
                lines.append(f"    {e['kib_per_conn']:7.2f} {e['blocks_per_conn']:6.1f}  "
                             f"{e['group']}")
        lines.append("  OpenSSL's largest sites (KiB, blocks per connection):")
        for e in t["openssl_top"]:
            lines.append(f"    {e['kib_per_conn']:7.2f} {e['blocks_per_conn']:6.1f}  {e['where']}")
        lines.append("  Python's largest sites (KiB, blocks per connection):")
        for e in t["top"]:
            lines.append(f"    {e['kib_per_conn']:7.2f} {e['blocks_per_conn']:6.1f}  {e['where']}")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return WORKERS[sys.argv[2]](sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=9000,
                    help="connections held at the end, per proxy (9000)")
    ap.add_argument("--checkpoints", default="2000",
                    help="comma-separated smaller counts measured on the way up (2000)")
    ap.add_argument("--clients", type=int, default=4, help="client processes (4)")
    ap.add_argument("--targets", default="sidecar,haproxy,floor")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds of quiet before each reading (2)")
    ap.add_argument("--profile", type=int, default=2000,
                    help="connections for the tracemalloc run of the sidecar (2000; 0 = skip)")
    ap.add_argument("--top", type=int, default=10, help="allocation sites to list (10)")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds allowed to open the connections of one step (900)")
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory, keep it")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    if not set(targets) <= {"sidecar", "haproxy", "floor"}:
        ap.error("unknown target")
    counts = sorted({int(c) for c in args.checkpoints.split(",") if c.strip()
                     if 0 < int(c) < args.connections} | {args.connections})
    limit = fd_limit()
    need = max((FDS_PER_CONN[t] for t in targets), default=1) * args.connections + 100
    if need > limit:
        print(f"memory_idle: {args.connections} connections need ~{need} descriptors"
              f" in the proxy; the open-file limit here is {limit}", file=sys.stderr)
        return 2
    if "haproxy" in targets and not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()):
        print("memory_idle: haproxy is not installed", file=sys.stderr)
        return 1
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    hv = subprocess.run([haproxy, "-v"], capture_output=True, text=True).stdout.split()
    meta = {"python": sys.version.split()[0], "loop": args.loop, "openssl": ssl.OPENSSL_VERSION,
            "haproxy": hv[2] if len(hv) > 2 else "?", "clients": args.clients,
            "counts": counts, "fd_limit": limit, "floor": FLOOR_ABOUT}
    started = time.monotonic()
    results: dict[str, TargetResult] = {}

    def measure(work: Path) -> None:
        meta["work_dir"] = str(work)
        p = ch.make_pki(work / "pki")
        if "sidecar" in targets:
            results["sidecar"] = run_sidecar(args, p, work, counts)
        if "haproxy" in targets:
            results["haproxy"] = run_haproxy(args, p, work, counts)
        if "floor" in targets:
            results["floor"] = run_floor(args, p, work, counts)
        if "sidecar" in targets and args.profile:
            results["sidecar-traced"] = run_sidecar(args, p, work, [args.profile],
                                                    tracemalloc=True)

    in_workdir("memory", args.keep, measure)
    meta["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        out = {"meta": meta, "results": {
            k: {"base": vars(v.base), "points": [vars(s) for s in v.points],
                "per_conn_kib": [v.per_conn(s) for s in v.points],
                "marginal_kib": v.marginal(), "traced": v.traced}
            for k, v in results.items()}}
        print(json.dumps(out, indent=2))
    else:
        print(report(results, meta))
        print(f"({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
