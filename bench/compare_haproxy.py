"""What does a connection, and a MiB, cost our sidecar compared with HAProxy?

Run (from the repo root; needs haproxy, valgrind and callgrind_control on PATH):

    PYTHONPATH=. python bench/compare_haproxy.py [--connections 200] [--mib 32] [--json]

One run, same certificates, same client, same backend for both proxies:

- a dev PKI from `sidecar.tools.pki` (root -> intermediate -> ECDSA P-256 SVIDs): the client
  (frontend), the inbound side (payments), the outbound side (frontend again);
- one echo backend (a threaded Python process, never under valgrind);
- one client (this process, the stdlib `ssl` module on blocking sockets, never under
  valgrind).

Three measurements, each on the inbound side unless said otherwise:

- full: TCP connect, full TLS 1.3 handshake with a client certificate, a 64-byte request
  echoed back, close_notify both ways, close; one connection at a time;
- resumed: the same, each connection resuming the session (ticket) the previous one got;
  the client checks `session_reused` and the table prints how many did resume;
- MiB: plaintext client -> outbound proxy -> mTLS -> inbound proxy -> echo -> back, on one
  connection that is already established and warmed up; the instructions of BOTH proxy
  processes are added and divided by the MiB the client sent (every MiB crosses each
  proxy once each way).

Each is measured twice:

1. instructions (primary): every proxy process runs under
   `valgrind --tool=callgrind --instr-atstart=no`; instrumentation is switched on before a
   warm-up, a `callgrind_control -d` after the warm-up marks the start (a dump resets the
   counters; `-z` would leave a few % of stale cost in the next dump's totals), the
   measured work runs, and a second `callgrind_control -d` holds exactly its cost;
2. CPU seconds (noisy): the same processes without valgrind, utime+stime from
   /proc/PID/stat before and after, with `--native-scale` times the work (the clock tick
   is 10 ms).

The sidecar runs as users run it: `python -m sidecar run -c CFG --loop uvloop`, default
allocator (pymalloc, no PYTHONMALLOC), JSON access log on stderr (to a file). HAProxy
runs `nbthread 1` in two processes (inbound and outbound, mirroring the two sidecars),
`option tcplog` to a file, TLS 1.3 only, `verify required` with the same bundle. HAProxy
does less than the sidecar per connection: no SPIFFE-ID policy inbound, no expected-ID
check outbound; it sends OpenSSL's default of 2 session tickets per full handshake where
the sidecar sends 1.

Resumption: the sidecar (one process: `tls.session_store: auto` is `memory`) keeps
sessions in OpenSSL's in-process cache and resumes without decoding anything; HAProxy
resumes from stateless tickets by default, and OpenSSL 3.0 decodes the whole session
from each, client certificate and its public key included (~3 M instructions).
`--sidecar-session-store tickets` measures the sidecar that way too;
`--haproxy-tickets off` measures HAProxy's own session cache (`no-tls-tickets`), which
stores sessions serialized in shared memory and so decodes them as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sidecar.tools import pki

ROOT = Path(__file__).resolve().parents[1]
TRUST_DOMAIN = "example.org"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/web/sa/frontend"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/payments"
REQUEST = bytes(range(64))  # the small request the echo backend sends back
CHUNK = 64 * 1024  # client write size in the MiB test
MIB = 1024 * 1024
WARM_CONNECTIONS = 10
WARM_MIB = 2
IO_TIMEOUT = 120.0  # seconds; a callgrind'ed Python is ~50x slower than native
START_TIMEOUT = 180.0

# Figures in issue 3, measured on this kind of machine before any code existed.
REFERENCE = {
    "haproxy": {"full": 12.2, "resumed": 5.9, "mib": 8.8},
    "prototype": {"full": 12.5, "resumed": 6.3, "mib": 22.0},
}
GOALS = {"full": 1.0, "resumed": 1.0, "mib": 1.5}  # max sidecar/haproxy instruction ratio

# A PROXY v2 header (--sidecar-proxy-protocol) is read and dropped first: it starts with
# \r, which no client here starts with, and says its length in bytes 15-16.
ECHO_SERVER = r"""
import socket, sys, threading
def skip_proxy_header(c):
    head = c.recv(65536)
    if not head.startswith(b"\r"):
        return head
    while len(head) < 16:
        head += c.recv(65536)
    end = 16 + int.from_bytes(head[14:16], "big")
    while len(head) < end:
        head += c.recv(65536)
    return head[end:]
def serve(c):
    buf = bytearray(65536)
    mv = memoryview(buf)
    try:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sendall(skip_proxy_header(c))
        while True:
            n = c.recv_into(buf)
            if not n:
                break
            c.sendall(mv[:n])
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        c.close()
s = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- a run's surroundings, shared by the bench scripts ----------------------------------


def missing_tools(script: str, tools: list[str]) -> bool:
    """Say which of `tools` are not installed (on PATH or in /usr/sbin); True if any."""
    missing = [t for t in tools if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        print(f"{script}: not installed: {', '.join(missing)}", file=sys.stderr)
    return bool(missing)


def haproxy_bin() -> str:
    return shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_version() -> str:
    """The installed HAProxy's version ("2.6.12"), "?" when there is none."""
    haproxy = haproxy_bin()
    if not Path(haproxy).exists():
        return "?"
    hv = subprocess.run([haproxy, "-v"], capture_output=True, text=True).stdout.split()
    return hv[2] if len(hv) > 2 else "?"


@contextmanager
def work_dir(keep: Path | None, name: str) -> Iterator[Path]:
    """A fresh directory for one run: in `keep`, and kept; or a temporary one, removed."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix=f"{name}-", dir=keep))
        return
    work = Path(tempfile.mkdtemp(prefix=f"sidecar-{name}-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def serving(script: str = ECHO_SERVER) -> Iterator[int]:
    """A backend process, never under valgrind (`script PORT`, printing "ready" once it
    listens): its port, for the block."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", script, str(port)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the backend did not start")
        yield port
    finally:
        proc.terminate()
        proc.wait()


def sidecar_env(root: Path = ROOT) -> dict[str, str]:
    """This environment with `root` first on PYTHONPATH: the checkout whose sidecar runs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    return env


# --- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path
    bundle: Path  # the root: trust anchor of the one trust domain
    client_dir: Path  # spiffe-helper layout: svid.pem (leaf + intermediate), svid_key.pem
    server_dir: Path
    client_pem: Path  # cert chain + key in one file, as HAProxy's `crt` wants
    server_pem: Path


def make_pki(d: Path) -> Pki:
    _, intermediate = pki.init_ca_dir(d / "ca", TRUST_DOMAIN)
    anchor = [intermediate.trust_anchor]
    out: dict[str, tuple[Path, Path]] = {}
    for name, spiffe_id in (("client", CLIENT_ID), ("server", SERVER_ID)):
        svid = pki.issue_svid(intermediate, spiffe_id)
        pki.write_svid(d / name, svid, anchor)
        combined = d / f"{name}.pem"
        combined.write_bytes(svid.chain_pem() + svid.key_pem())
        combined.chmod(0o600)
        out[name] = (d / name, combined)
    return Pki(d, d / "server" / "bundle.pem", out["client"][0], out["server"][0],
               out["client"][1], out["server"][1])


# --- processes -------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, from /proc (10 ms ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Proc:
    """A proxy process, optionally under callgrind, that can be marked and measured."""

    def __init__(self, name: str, argv: list[str], work: Path, *, callgrind: bool,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.callgrind = callgrind
        self.work = work
        # Not in `work`: the sidecar watches the directory of its policy file, and every
        # access-log line written there would wake its file watcher (3 syscalls and a
        # thread switch a connection that no deployment pays).
        (work / "logs").mkdir(exist_ok=True)
        self.log_path = work / "logs" / f"{name}.log"
        self.cg_prefix = work / f"cg-{name}"
        self.dumps = 0
        if callgrind:
            argv = ["valgrind", "--tool=callgrind", "-q", "--instr-atstart=no",
                    f"--callgrind-out-file={self.cg_prefix}.%p", *argv]
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, env=env, cwd=work,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n"
                               + self.log_text()[-3000:])

    def instrument(self) -> None:
        if self.callgrind:
            callgrind_control(self.pid, "-i", "on", name=self.name)

    def dump(self) -> Path:
        """Write the cost since the last dump to a new file (and reset the counters)."""
        self.dumps += 1
        return callgrind_dump(self.cg_prefix, self.pid, self.dumps, name=self.name)

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=60 if self.callgrind else 15)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()


def callgrind_control(pid: int, *args: str, name: str = "") -> None:
    """`callgrind_control ARGS PID` on a process running under callgrind."""
    run = subprocess.run(["callgrind_control", *args, str(pid)],
                         capture_output=True, text=True, timeout=IO_TIMEOUT)
    if run.returncode != 0 or "Error" in run.stdout + run.stderr:
        raise RuntimeError(f"callgrind_control {' '.join(args)} {name or pid}: "
                           f"{run.stdout}{run.stderr}")


def callgrind_dump(prefix: Path, pid: int, number: int, *, name: str = "") -> Path:
    """Dump `pid`'s cost since its last dump (the `number`th dump, with
    `--callgrind-out-file=PREFIX.%p`): the file, once written whole."""
    callgrind_control(pid, "-d", name=name)
    path = Path(f"{prefix}.{pid}.{number}")
    deadline = time.monotonic() + 60
    while not (path.exists() and "\ntotals:" in path.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"callgrind dump {path} did not appear")
        time.sleep(0.05)
    return path


def instructions(dump: Path) -> int:
    """Ir of one callgrind dump (its `summary:`, which equals `totals:` after a dump)."""
    m = re.search(r"^summary:\s*(\d+)", dump.read_text(errors="replace"), re.M)
    if m is None:
        raise RuntimeError(f"no summary line in {dump}")
    return int(m.group(1))


class Strace:
    """`strace -f -c` on every thread of a running process, until stop()."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-p", str(pid)],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
        assert self.tracer.stderr is not None
        # "Process PID attached with N threads": every thread is traced from here on.
        while "attached" not in (line := self.tracer.stderr.readline()):
            if not line:
                raise RuntimeError(f"strace did not attach to {pid}")

    def stop(self) -> dict[str, int]:
        """Calls by syscall name, the most frequent first."""
        self.tracer.send_signal(signal.SIGINT)
        self.tracer.wait(30)
        counts: dict[str, int] = {}
        for line in self.out.read_text().splitlines():
            parts = line.split()
            # % time, seconds, usecs/call, calls, [errors,] syscall
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                counts[parts[-1]] = int(parts[3])
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def wait_until(what: str, ok: Callable[[], bool], procs: list[Proc]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ok():
        for p in procs:
            p.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --- the two proxies -------------------------------------------------------------------


@dataclass
class Pair:
    """An inbound proxy (mTLS -> echo) and an outbound one (plaintext -> mTLS -> inbound)."""

    inbound: Proc
    outbound_proc: Proc | None  # None: started with outbound=False
    tls_port: int  # the inbound proxy's mTLS listener
    plain_port: int  # the outbound proxy's plaintext listener

    @property
    def outbound(self) -> Proc:
        assert self.outbound_proc is not None, "started without its outbound proxy"
        return self.outbound_proc

    @property
    def procs(self) -> list[Proc]:
        """The processes started: inbound, then outbound."""
        return [self.inbound] + ([self.outbound_proc] if self.outbound_proc else [])

    def check_alive(self) -> None:
        for proc in self.procs:
            proc.check_alive()

    def stop(self) -> None:
        if self.outbound_proc is not None:
            self.outbound_proc.stop()
        self.inbound.stop()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sidecar_pair(p: Pki, work: Path, echo_port: int, *, callgrind: bool, loop: str,
                 ktls: str, session_store: str, proxy_protocol: bool = False,
                 outbound: bool = True, root: Path = ROOT) -> Pair:
    """`root`: the checkout whose sidecar runs (another one compares before and after)."""
    tls_port, plain_port = free_port(), free_port()
    (work / "policy.yaml").write_text(
        f"mode: enforce\ndefault: deny\nrules:\n"
        f"  - name: frontend\n    action: allow\n    from: [\"{CLIENT_ID}\"]\n")
    common = (f"tls:\n  ktls: {ktls}\n  session_store: {session_store}\n"
              "admin:\n  listen: 127.0.0.1:{admin_port}\n"
              "limits:\n  handshake_timeout: 60s\n"  # a callgrind'ed first handshake is slow
              "log:\n  level: info\n  format: json\n")
    (work / "inbound.yaml").write_text(
        f"identity:\n  cert: {p.server_dir}/svid.pem\n  key: {p.server_dir}/svid_key.pem\n"
        f"  bundle: {p.server_dir}/bundle.pem\n"
        f"inbound:\n  - name: app\n    listen: 127.0.0.1:{tls_port}\n"
        f"    forward_to: 127.0.0.1:{echo_port}\n"
        f"    proxy_protocol: {'true' if proxy_protocol else 'false'}\n"
        f"policy: policy.yaml\n{common.format(admin_port=free_port())}")
    (work / "outbound.yaml").write_text(
        f"identity:\n  cert: {p.client_dir}/svid.pem\n  key: {p.client_dir}/svid_key.pem\n"
        f"  bundle: {p.client_dir}/bundle.pem\n"
        f"outbound:\n  - name: payments\n    listen: 127.0.0.1:{plain_port}\n"
        f"    connect_to: 127.0.0.1:{tls_port}\n    expect_ids: [\"{SERVER_ID}\"]\n"
        f"{common.format(admin_port=free_port())}")
    env = sidecar_env(root)
    procs: list[Proc] = []
    for role in ("inbound", "outbound")[:2 if outbound else 1]:
        argv = [sys.executable, "-m", "sidecar", "run", "-c", str(work / f"{role}.yaml"),
                "--loop", loop]
        procs.append(Proc(f"sidecar-{role}", argv, work, callgrind=callgrind, env=env))
    for proc in procs:
        wait_until(f"{proc.name} ready", partial(_says_ready, proc), procs)
    return Pair(procs[0], procs[1] if outbound else None, tls_port, plain_port)


HAPROXY_GLOBAL = """\
global
  nbthread 1
  maxconn 4096
  log stdout format raw daemon
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode tcp
  log global
  option tcplog
  timeout connect 5s
  timeout client 5m
  timeout server 5m
"""


def _says_ready(proc: Proc) -> bool:
    return '"msg":"ready"' in proc.log_text()


def haproxy_pair(p: Pki, work: Path, echo_port: int, *, callgrind: bool,
                 tickets: bool, outbound: bool = True) -> Pair:
    tls_port, plain_port = free_port(), free_port()
    # no-tls-tickets: HAProxy keeps sessions in its own (shared-memory) cache instead.
    no_tickets = "" if tickets else " no-tls-tickets"
    (work / "haproxy-inbound.cfg").write_text(
        HAPROXY_GLOBAL
        + f"frontend inbound\n  bind 127.0.0.1:{tls_port} ssl crt {p.server_pem}"
        f" ca-file {p.bundle} verify required{no_tickets}\n  default_backend app\n"
        f"backend app\n  server app 127.0.0.1:{echo_port}\n")
    (work / "haproxy-outbound.cfg").write_text(
        HAPROXY_GLOBAL
        + f"frontend outbound\n  bind 127.0.0.1:{plain_port}\n  default_backend remote\n"
        f"backend remote\n  server payments 127.0.0.1:{tls_port} ssl crt {p.client_pem}"
        f" ca-file {p.bundle} verify required\n")
    haproxy = haproxy_bin()
    procs = [Proc(f"haproxy-{role}", [haproxy, "-db", "-f", str(work / f"haproxy-{role}.cfg")],
                  work, callgrind=callgrind)
             for role in ("inbound", "outbound")[:2 if outbound else 1]]
    wait_until("haproxy listening",
               lambda: port_open(tls_port) and (not outbound or port_open(plain_port)), procs)
    return Pair(procs[0], procs[1] if outbound else None, tls_port, plain_port)


# --- the client ------------------------------------------------------------------------


def client_context(p: Pki, chain: Path | None = None) -> ssl.SSLContext:
    """The client's context; `chain`: the certificates it presents instead of its SVID's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SVIDs carry a SPIFFE ID, not a DNS name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(p.bundle)
    ctx.load_cert_chain(chain or p.client_dir / "svid.pem", p.client_dir / "svid_key.pem")
    return ctx


def echo_once(sock: socket.socket) -> bytes:
    """Send REQUEST and read as many bytes back, fewer if the peer closes first."""
    sock.sendall(REQUEST)
    got = b""
    while len(got) < len(REQUEST):
        part = sock.recv(len(REQUEST) - len(got))
        if not part:
            break
        got += part
    return got


@dataclass
class ConnResult:
    reused: bool
    session: ssl.SSLSession | None
    cipher: str


def one_connection(ctx: ssl.SSLContext, port: int,
                   session: ssl.SSLSession | None) -> ConnResult:
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = ctx.wrap_socket(raw, session=session)
    try:
        got = echo_once(tls)
        if len(got) < len(REQUEST):
            raise RuntimeError(f"connection closed after {len(got)} bytes of the echo")
        if got != REQUEST:
            raise RuntimeError("the echo came back different")
        # In TLS 1.3 the ticket comes after the handshake: it has arrived by the response.
        result = ConnResult(bool(tls.session_reused), tls.session, (tls.cipher() or ("?",))[0])
        try:
            tls.unwrap()  # close_notify, and wait for the proxy's
        except (OSError, ValueError):
            pass  # a proxy that closes without close_notify: still a finished connection
        return result
    finally:
        tls.close()


@dataclass
class ConnStats:
    count: int = 0
    reused: int = 0
    ciphers: set[str] = field(default_factory=set)


def drive_connections(ctx: ssl.SSLContext, port: int, n: int, *, resume: bool,
                      state: dict[str, ssl.SSLSession | None]) -> ConnStats:
    """n sequential connections; with resume, each offers the newest session we hold."""
    stats = ConnStats()
    for _ in range(n):
        offer = state.get("session") if resume else None
        r = one_connection(ctx, port, offer)
        stats.count += 1
        stats.reused += r.reused
        stats.ciphers.add(r.cipher)
        if resume and r.session is not None and r.session.has_ticket:
            state["session"] = r.session
    return stats


class EchoStream:
    """One plaintext connection through the pair; send n bytes and wait for all of them."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.payload = memoryview(os.urandom(CHUNK))
        self.sent = self.received = 0
        self.crc_sent = self.crc_received = 0
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        buf = bytearray(256 * 1024)
        try:
            while True:
                n = self.sock.recv_into(buf)
                if not n:
                    break
                crc = zlib.crc32(memoryview(buf)[:n], self.crc_received)
                with self.cond:
                    self.received += n
                    self.crc_received = crc
                    self.cond.notify_all()
        except BaseException as exc:
            self.error = exc
        with self.cond:
            self.cond.notify_all()

    def send(self, nbytes: int) -> None:
        left = nbytes
        while left:
            part = self.payload[:min(left, CHUNK)]
            self.sock.sendall(part)
            self.crc_sent = zlib.crc32(part, self.crc_sent)
            self.sent += len(part)
            left -= len(part)
        with self.cond:
            ok = self.cond.wait_for(lambda: self.received >= self.sent or self.error
                                    or not self.reader.is_alive(), timeout=IO_TIMEOUT * 10)
        if self.error or not ok or self.received != self.sent:
            raise RuntimeError(f"echo stream: sent {self.sent}, got {self.received} back"
                               f" ({self.error or 'timed out / closed'})")
        if self.crc_received != self.crc_sent:
            raise RuntimeError("echo stream: the bytes came back different")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.reader.join(IO_TIMEOUT)
        self.sock.close()


# --- measuring -------------------------------------------------------------------------


@contextmanager
def measured(procs: list[Proc], out: dict[str, float], dumps: dict[str, Path],
             label: str) -> Iterator[None]:
    """Measure the work in the block on every proc: Ir (callgrind) or CPU seconds."""
    if procs[0].callgrind:
        for p in procs:
            p.dump()  # the mark: everything before it is in an earlier file
        yield
        for p in procs:
            path = p.dump()
            out[p.name] = instructions(path)
            kept = p.work / f"{p.name}-{label}.callgrind"
            shutil.copyfile(path, kept)
            dumps[f"{p.name}-{label}"] = kept
    else:
        before = {p.name: p.cpu() for p in procs}
        yield
        for p in procs:
            out[p.name] = p.cpu() - before[p.name]


def run_target(target: str, mode: str, args: argparse.Namespace, p: Pki, work: Path,
               echo_port: int, results: dict[str, Any], dumps: dict[str, Path]) -> None:
    callgrind = mode == "instructions"
    scale = 1 if callgrind else args.native_scale
    n, mib = args.connections * scale, args.mib * scale
    d = work / f"{target}-{mode}"
    d.mkdir()
    log(f"{target}, {mode}: starting the two proxies" + (" under callgrind" if callgrind else ""))
    if target == "sidecar":
        pair = sidecar_pair(p, d, echo_port, callgrind=callgrind, loop=args.loop,
                            ktls=args.sidecar_ktls, session_store=args.sidecar_session_store,
                            proxy_protocol=args.sidecar_proxy_protocol)
    else:
        pair = haproxy_pair(p, d, echo_port, callgrind=callgrind,
                            tickets=args.haproxy_tickets == "on")
    ctx = client_context(p)
    res: dict[str, Any] = results.setdefault(target, {}).setdefault(mode, {})
    res["unit"] = "instructions" if callgrind else "cpu_seconds"
    with pair:
        for proc in pair.procs:
            proc.instrument()
        # Full handshakes on the inbound proxy.
        drive_connections(ctx, pair.tls_port, WARM_CONNECTIONS, resume=False, state={})
        log(f"{target}, {mode}: {n} full mTLS connections")
        cost: dict[str, float] = {}
        with measured([pair.inbound], cost, dumps, "full"):
            full = drive_connections(ctx, pair.tls_port, n, resume=False, state={})
        res["full"] = {"per_connection": cost[pair.inbound.name] / n, "connections": n,
                       "reused": full.reused, "ciphers": sorted(full.ciphers)}
        # Resumed handshakes: warm up (the first one is full), then measure.
        state: dict[str, ssl.SSLSession | None] = {}
        drive_connections(ctx, pair.tls_port, WARM_CONNECTIONS, resume=True, state=state)
        log(f"{target}, {mode}: {n} resumed connections")
        cost = {}
        with measured([pair.inbound], cost, dumps, "resumed"):
            resumed = drive_connections(ctx, pair.tls_port, n, resume=True, state=state)
        res["resumed"] = {"per_connection": cost[pair.inbound.name] / n, "connections": n,
                          "reused": resumed.reused, "ciphers": sorted(resumed.ciphers)}
        # Bulk: one established, warmed-up connection through outbound -> inbound.
        log(f"{target}, {mode}: {mib} MiB echoed through outbound -> inbound")
        stream = EchoStream(pair.plain_port)
        stream.send(WARM_MIB * MIB)
        cost = {}
        with measured([pair.outbound, pair.inbound], cost, dumps, "mib"):
            stream.send(mib * MIB)
        stream.close()
        res["mib"] = {"per_mib": sum(cost.values()) / mib, "mib": mib,
                      "outbound_per_mib": cost[pair.outbound.name] / mib,
                      "inbound_per_mib": cost[pair.inbound.name] / mib}
        pair.check_alive()


# --- report ----------------------------------------------------------------------------


def _num(v: float | None, fmt: str) -> str:
    """`v` in `fmt` ("10.2f", "12,.0f": the width first), or "-" in that width."""
    width = int(fmt.split(".")[0].rstrip(","))
    return "-".rjust(width) if v is None else format(v, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    def get(target: str, mode: str, kind: str, key: str) -> float | None:
        v = results.get(target, {}).get(mode, {}).get(kind, {}).get(key)
        return None if v is None else float(v)

    lines = [
        f"sidecar (python {meta['python']}, --loop {meta['loop']}, kTLS {meta['sidecar_ktls']},"
        f" session_store {meta['sidecar_session_store']}"
        f"{', proxy_protocol' if meta['sidecar_proxy_protocol'] else ''})"
        f" vs HAProxy {meta['haproxy']}"
        f" (nbthread 1, two processes: inbound + outbound, tls tickets {meta['haproxy_tickets']})",
        f"{meta['openssl']}; TLS 1.3 {meta['cipher']}; ECDSA P-256 SVIDs, root + intermediate;"
        f" client: stdlib ssl, one connection at a time; backend: one echo process",
        "",
        f"{'':34}{'sidecar':>10}{'haproxy':>10}{'ratio':>8}{'goal':>7}"
        f"   issue 3: haproxy / prototype",
        "instructions, millions (callgrind; the primary figures)",
    ]
    rows = (("full", "per full mTLS connection", "per_connection"),
            ("resumed", "per resumed connection", "per_connection"),
            ("mib", "per MiB echoed (out + in)", "per_mib"))
    for kind, title, key in rows:
        s = get("sidecar", "instructions", kind, key)
        h = get("haproxy", "instructions", kind, key)
        s, h = (None if s is None else s / 1e6), (None if h is None else h / 1e6)
        r = _ratio(s, h)
        verdict = "" if r is None else ("ok" if r <= GOALS[kind] else "OVER")
        ref = f"{REFERENCE['haproxy'][kind]} / {REFERENCE['prototype'][kind]}"
        lines.append(f"  {title:32}{_num(s, '10.2f')}{_num(h, '10.2f')}{_num(r, '8.2f')}"
                     f"{'<=' + format(GOALS[kind], '.1f'):>7} {verdict:4}  {ref}")
        if kind == "mib":
            for part in ("outbound", "inbound"):
                ps = get("sidecar", "instructions", kind, f"{part}_per_mib")
                ph = get("haproxy", "instructions", kind, f"{part}_per_mib")
                ps, ph = (None if ps is None else ps / 1e6), (None if ph is None else ph / 1e6)
                lines.append(f"    {part + ' process':30}{_num(ps, '10.2f')}{_num(ph, '10.2f')}"
                             f"{_num(_ratio(ps, ph), '8.2f')}")
    lines.append(f"CPU milliseconds, utime+stime, no valgrind, x{meta['native_scale']} the work"
                 " (NOISY: moves 2x between runs)")
    for kind, title, key in rows:
        s = get("sidecar", "cpu", kind, key)
        h = get("haproxy", "cpu", kind, key)
        s, h = (None if s is None else s * 1e3), (None if h is None else h * 1e3)
        lines.append(f"  {title:32}{_num(s, '10.3f')}{_num(h, '10.3f')}"
                     f"{_num(_ratio(s, h), '8.2f')}")
    lines.append("session resumption seen by the client (session_reused / connections)")
    for kind in ("full", "resumed"):
        cells = []
        for target in ("sidecar", "haproxy"):
            for mode in ("instructions", "cpu"):
                r = results.get(target, {}).get(mode, {}).get(kind)
                if r:
                    cells.append(f"{target} {mode}: {r['reused']}/{r['connections']}")
        lines.append(f"  {kind + ' run':32}" + ", ".join(cells))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=200,
                    help="connections per handshake test (default 200)")
    ap.add_argument("--mib", type=int, default=32, help="MiB echoed through the pair (32)")
    ap.add_argument("--native-scale", type=int, default=5,
                    help="the CPU-seconds runs do this many times the work (default 5)")
    ap.add_argument("--targets", default="haproxy,sidecar",
                    help="comma-separated: haproxy,sidecar")
    ap.add_argument("--modes", default="instructions,cpu",
                    help="comma-separated: instructions (callgrind), cpu (no valgrind)")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                    help="the sidecar's event loop (default uvloop)")
    ap.add_argument("--sidecar-ktls", choices=["off", "auto"], default="off",
                    help="the sidecar's tls.ktls (default off: HAProxy 2.6 has no kTLS)")
    ap.add_argument("--sidecar-session-store", choices=["auto", "memory", "tickets"],
                    default="auto", help="the sidecar's tls.session_store (default auto: "
                    "memory, one process)")
    ap.add_argument("--sidecar-proxy-protocol", action="store_true",
                    help="the inbound sidecar sends the echo backend a PROXY v2 header "
                    "(inbound[].proxy_protocol), which it drops")
    ap.add_argument("--haproxy-tickets", choices=["on", "off"], default="on",
                    help="off: HAProxy's no-tls-tickets, its own session cache (default on)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="work in this directory and keep it (configs, logs, callgrind dumps)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    if not set(targets) <= {"haproxy", "sidecar"} or not set(modes) <= {"instructions", "cpu"}:
        ap.error("unknown target or mode")
    needed = ["haproxy"] * ("haproxy" in targets)
    needed += ["valgrind", "callgrind_control"] * ("instructions" in modes)
    if missing_tools("compare_haproxy", needed):
        return 1

    results: dict[str, Any] = {}
    dumps: dict[str, Path] = {}
    started = time.monotonic()
    with work_dir(args.keep, "bench") as work, serving() as echo_port:
        meta: dict[str, Any] = {
            "python": platform.python_version(), "loop": args.loop,
            "sidecar_ktls": args.sidecar_ktls, "openssl": ssl.OPENSSL_VERSION,
            "sidecar_session_store": args.sidecar_session_store,
            "sidecar_proxy_protocol": args.sidecar_proxy_protocol,
            "haproxy_tickets": args.haproxy_tickets,
            "haproxy": haproxy_version(), "native_scale": args.native_scale,
            "connections": args.connections, "mib": args.mib, "work_dir": str(work),
            "pymalloc": os.environ.get("PYTHONMALLOC", "default"),
        }
        p = make_pki(work / "pki")
        for mode in modes:
            for target in targets:
                run_target(target, mode, args, p, work, echo_port, results, dumps)
    ciphers = {c for t in results.values() for m in t.values() for k in ("full", "resumed")
               for c in m.get(k, {}).get("ciphers", [])}
    meta["cipher"] = ",".join(sorted(ciphers)) or "?"
    meta["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        out = {"meta": meta, "results": results, "reference_issue_3_millions": REFERENCE,
               "goals_max_ratio": GOALS}
        if args.keep:
            out["callgrind_dumps"] = {k: str(v) for k, v in dumps.items()}
        print(json.dumps(out, indent=2, default=sorted))
    else:
        print(table(results, meta))
        print(f"({meta['seconds']} s)")
        if args.keep and dumps:
            print("callgrind dumps (callgrind_annotate --inclusive=yes FILE):")
            for k, v in dumps.items():
                print(f"  {k}: {v}")
    for target in results.values():
        for m in target.values():
            if m.get("full", {}).get("reused"):
                print("WARNING: a 'full' connection resumed", file=sys.stderr)
            r = m.get("resumed")
            if r and r["reused"] != r["connections"]:
                print(f"WARNING: only {r['reused']}/{r['connections']} connections resumed",
                      file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
