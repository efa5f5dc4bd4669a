"""Run INSIDE a virtme-ng guest whose kernel has the `tls` module: real kTLS, end to end.

    client --plaintext--> outbound sidecar ==mTLS (kTLS)==> inbound sidecar --> echo app

Started by `tests/vm/run_in_vm.py` as `modprobe tls; PYTHON tests/vm/ktls_guest.py ...`,
with PYTHON the interpreter of the host's venv (the guest sees the host's root file system
read-only, so the venv, this repo and the pyenv Python under it are all there; /tmp is an
overlay whose writes go to guest RAM). It also runs on any machine for a dry run with
`--ktls auto` or `off` (where the kernel has no `tls` module, `on` refuses to start, and
this script says so).

Modes (each prints exactly ONE JSON line on stdout; progress goes to stderr):

- `transfer`: one pair of sidecars with `tls.ktls` as asked (default `on`); N MiB each
  way (default 100) with sha256 checked at the app and back at the client;
  `/proc/net/tls_stat` before and after; both sidecars' `sidecar_ktls_connections_total`
  from /metrics, their `/status` kTLS section and access-log lines.
- `bench`: a `ktls: off` pair and a `ktls: on` pair side by side, the same transfer
  alternating between them for `--rounds`; MB/s each way for each, sidecar CPU per MiB,
  and the ratio on/off. Under software emulation only the ratio means something.

Every step has its own timeout, a watchdog bounds the whole run (`--deadline`), and every
process and thread this script starts is stopped before it exits, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRUST_DOMAIN = "example.org"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/web/sa/frontend"  # the outbound sidecar
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/payments"  # the inbound sidecar

# Timeouts per step. Under qemu software emulation (TCG) a Python start with cryptography,
# uvloop and the kTLS loopback probe takes several seconds; NOTES.md measured ~12 MB/s per
# direction for one TLS socket pair, so a transfer gets a floor plus a per-MiB allowance.
START_TIMEOUT = 120.0  # one sidecar to log "ready"
STOP_TIMEOUT = 30.0  # one sidecar to exit after SIGTERM (drain_timeout is 5s)
HTTP_TIMEOUT = 20.0  # one admin request
LINE_TIMEOUT = 30.0  # an access-log line after the connection closed
IO_TIMEOUT = 60.0  # one socket operation in the client or the echo app: a stall
TRANSFER_FLOOR = 60.0
TRANSFER_PER_MIB = 4.0
CHUNK = 256 * 1024
MIB = 1024 * 1024


class StepError(Exception):
    """A step failed or timed out; the message says which and why."""


def log(msg: str) -> None:
    print(f"[ktls_guest {time.monotonic():9.2f}] {msg}", file=sys.stderr, flush=True)


# --- kernel facts ----------------------------------------------------------------------


def tls_stat() -> dict[str, int]:
    """/proc/net/tls_stat as {counter: value}; {} when the tls module is not loaded."""
    try:
        text = Path("/proc/net/tls_stat").read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def available_ulps() -> list[str]:
    try:
        return Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().split()
    except OSError:
        return []


def kernel_aead_drivers() -> dict[str, str]:
    """The driver the kernel crypto API picks (highest priority) for the AEADs kTLS uses:
    under emulation its speed against OpenSSL's shapes the on/off ratio."""
    best: dict[str, tuple[int, str]] = {}
    try:
        blocks = Path("/proc/crypto").read_text().split("\n\n")
    except OSError:
        return {}
    for block in blocks:
        entry = dict((k.strip(), v.strip()) for k, _, v in
                     (ln.partition(":") for ln in block.splitlines()))
        name = entry.get("name", "")
        if name in ("gcm(aes)", "rfc7539(chacha20,poly1305)"):
            prio = int(entry.get("priority", "0") or 0)
            if name not in best or prio > best[name][0]:
                best[name] = (prio, entry.get("driver", "?"))
    return {name: driver for name, (_, driver) in best.items()}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- a sidecar process -----------------------------------------------------------------


@dataclass
class SidecarProc:
    name: str
    config_path: Path
    loop: str
    lines: list[dict[str, Any]] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    returncode: int | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _eof: bool = False
    _reader: threading.Thread | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH"))
                                            if p)
        for var in ("SIDECAR_CONFIG", "SIDECAR_LOOP"):
            env.pop(var, None)
        cmd = [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path),
               "--loop", self.loop]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      env=env, cwd=self.config_path.parent)
        self._reader = threading.Thread(target=self._read, name=f"log-{self.name}",
                                        daemon=True)
        self._reader.start()
        ready = self.wait_line(lambda ln: ln.get("msg") == "ready", START_TIMEOUT,
                               "its 'ready' line")
        for ln in self.lines[: self.lines.index(ready)]:
            if ln.get("msg") == "listening":
                self.ports[ln["listener"]] = int(str(ln["address"]).rpartition(":")[2])
        if "admin" not in self.ports:
            raise StepError(f"sidecar {self.name}: no 'listening' line for the admin "
                            f"endpoint before 'ready'; lines:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for raw in self._proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                line = json.loads(text)
                if not isinstance(line, dict):
                    raise ValueError
            except ValueError:
                line = {"raw": text}
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_line(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
                  what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if pred(line):
                        return line
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    code = self._proc.poll() if self._proc else None
                    why = (f"the process exited ({code})" if self._eof
                           else f"timed out after {timeout:.0f}s")
                    raise StepError(f"sidecar {self.name}: {why} waiting for {what}; "
                                    f"last lines:\n{self.tail()}")
                self._cond.wait(min(left, 1.0))

    def tail(self, n: int = 25) -> str:
        with self._cond:
            shown = self.lines[-n:]
        return "\n".join(str(ln.get("raw") or json.dumps(ln)) for ln in shown)

    def get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.ports['admin']}{path}"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
            body: bytes = resp.read()
            return body

    def ktls_metrics(self) -> tuple[dict[str, dict[str, float]], list[str]]:
        """sidecar_ktls_connections_total as {path: {state: value}} (summed over the
        direction label), and the raw sample lines."""
        text = self.get("/metrics").decode()
        nested: dict[str, dict[str, float]] = {}
        raw: list[str] = []
        for line in text.splitlines():
            if not line.startswith("sidecar_ktls_connections_total{"):
                continue
            raw.append(line)
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.partition("}")[0]))
            value = float(line.rpartition(" ")[2])
            per_path = nested.setdefault(labels.get("path", "?"), {})
            state = labels.get("state", "?")
            per_path[state] = per_path.get(state, 0.0) + value
        return nested, raw

    def problems(self) -> list[str]:
        """Warnings, errors and non-JSON lines (tracebacks) this sidecar logged."""
        with self._cond:
            lines = list(self.lines)
        out = []
        for ln in lines:
            if "raw" in ln or ln.get("level") in ("warning", "error", "critical"):
                out.append(str(ln.get("raw") or json.dumps(ln)))
        return out[:40]

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def stop(self) -> int:
        if self._proc is None:
            return 0
        if self.returncode is None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(STOP_TIMEOUT)
                self.returncode = self._proc.returncode
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(STOP_TIMEOUT)
                with self._cond:
                    self.lines.append({"raw": f"<killed: no exit {STOP_TIMEOUT:.0f}s after "
                                              "SIGTERM>"})
                self.returncode = -9
            if self._reader is not None:
                self._reader.join(STOP_TIMEOUT)
        return self.returncode


# --- the echo app ----------------------------------------------------------------------


@dataclass
class Received:
    count: int = 0
    sha256: str = ""
    error: str | None = None


class EchoApp:
    """Echoes each connection until EOF, then half-closes; hashes what it received."""

    def __init__(self, verify: bool) -> None:
        self.verify = verify
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.received: list[Received] = []
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, name="echo-accept",
                                          daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(IO_TIMEOUT)
            rec = Received()
            with self._lock:
                self._conns.append(conn)
                self.received.append(rec)
            t = threading.Thread(target=self._echo, args=(conn, rec), name="echo",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _echo(self, conn: socket.socket, rec: Received) -> None:
        h = hashlib.sha256()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            while n := conn.recv_into(buf):
                if self.verify:
                    h.update(view[:n])
                rec.count += n
                conn.sendall(view[:n])
            rec.sha256 = h.hexdigest() if self.verify else ""  # before the client sees EOF
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)


# --- the client ------------------------------------------------------------------------


@dataclass
class Transfer:
    sent: int = 0
    received: int = 0
    sha_sent: str = ""
    sha_received: str = ""
    seconds: float = 0.0
    eof: bool = False
    error: str | None = None


def transfer(port: int, nbytes: int, verify: bool, timeout: float,
             midway: Callable[[], None] | None = None) -> Transfer:
    """Send `nbytes` of random data through the outbound listener while reading the echo;
    half-close; read to EOF. Each socket operation is bounded by IO_TIMEOUT and the whole
    exchange by `timeout`. `midway`, if given, runs in the sender once half the bytes are
    sent (the connection is then open and idle until it returns)."""
    out = Transfer()
    deadline = time.monotonic() + timeout
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    errors: list[str] = []
    hooks = [midway] if midway is not None else []

    def send() -> None:
        h = hashlib.sha256()
        try:
            left = nbytes
            while left > 0:
                if hooks and left <= nbytes // 2:
                    try:
                        hooks.pop()()
                    except Exception as exc:  # reported, and the transfer goes on
                        errors.append(f"midway: {type(exc).__name__}: {exc}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sending took more than {timeout:.0f}s")
                chunk = os.urandom(min(CHUNK, left))
                if verify:
                    h.update(chunk)
                sock.sendall(chunk)
                out.sent += len(chunk)
                left -= len(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(f"send: {type(exc).__name__}: {exc}")
        out.sha_sent = h.hexdigest() if verify else ""

    start = time.monotonic()
    sender = threading.Thread(target=send, name="client-send", daemon=True)
    sender.start()
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the echo took more than {timeout:.0f}s "
                                   f"({out.received} of {nbytes} bytes back)")
            n = sock.recv_into(buf)
            if not n:
                out.eof = True
                break
            if verify:
                h.update(view[:n])
            out.received += n
    except OSError as exc:
        errors.append(f"recv: {type(exc).__name__}: {exc}")
    finally:
        out.seconds = time.monotonic() - start
        if not out.eof:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # unblocks the sender
        sender.join(max(1.0, deadline - time.monotonic()))
        sock.close()
    if sender.is_alive():
        errors.append("the sender thread is stuck")
    out.sha_received = h.hexdigest() if verify else ""
    out.error = "; ".join(errors) or None
    return out


# --- a pair of sidecars ----------------------------------------------------------------


class Pair:
    """PKI, echo app, inbound and outbound sidecar; `close()` stops them all."""

    def __init__(self, workdir: Path, ktls: str, loop: str, verify: bool) -> None:
        self.workdir = workdir
        self.ktls = ktls
        self.sidecars: list[SidecarProc] = []
        self.echo: EchoApp | None = None
        self._verify = verify
        self._loop = loop
        self._svids: dict[str, Any] = {}
        self._bundle: list[Any] = []
        self._inter: Any = None
        self.svid_dirs: dict[str, Path] = {}
        self.extra: list[SidecarProc] = []  # scenario sidecars, apart from the pair's
        LIVE.append(self)

    def _config(self, name: str, svid: str | None = None, tls: dict[str, Any] | None = None,
                **listeners: Any) -> Path:
        from sidecar.tools import pki

        d = self.workdir / f"{name}-ktls-{self.ktls}"
        d.mkdir(parents=True)
        self.svid_dirs[name] = d / "svid"
        files = pki.write_svid(d / "svid", self._svids[svid or name], self._bundle)
        cfg: dict[str, Any] = {
            "identity": {"cert": str(d / "svid" / files.cert),
                         "key": str(d / "svid" / files.key),
                         "bundle": str(d / "svid" / files.bundle)},
            "admin": {"listen": "127.0.0.1:0"},
            "log": {"level": "info", "format": "json"},
            "drain_timeout": "5s",
            "tls": {"ktls": self.ktls, **(tls or {})},
            **listeners,
        }
        if "inbound" in listeners:
            policy = d / "policy.yaml"
            policy.write_text(json.dumps({
                "mode": "enforce", "default": "deny",
                "rules": [{"name": "frontend", "action": "allow", "from": [CLIENT_ID]}]}))
            cfg["policy"] = str(policy)
        path = d / "sidecar.yaml"
        path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        return path

    def start(self) -> None:
        from sidecar.tools import pki

        root = pki.new_root(TRUST_DOMAIN)
        inter = pki.new_intermediate(root)
        self._inter = inter
        self._svids = {"inbound": pki.issue_svid(inter, SERVER_ID),
                       "outbound": pki.issue_svid(inter, CLIENT_ID)}
        self._bundle = [root.cert]
        self.echo = EchoApp(self._verify)
        inbound = SidecarProc("inbound", self._config("inbound", inbound=[{
            "name": "in", "listen": "127.0.0.1:0",
            "forward_to": f"127.0.0.1:{self.echo.port}"}]), self._loop)
        self.sidecars.append(inbound)
        inbound.start()
        outbound = SidecarProc("outbound", self._config("outbound", outbound=[{
            "name": "out", "listen": "127.0.0.1:0",
            "connect_to": f"127.0.0.1:{inbound.ports['in']}",
            "expect_ids": [SERVER_ID]}]), self._loop)
        self.sidecars.append(outbound)
        outbound.start()

    @property
    def inbound(self) -> SidecarProc:
        return self.sidecars[0]

    @property
    def outbound(self) -> SidecarProc:
        return self.sidecars[1]

    def start_inbound12(self) -> SidecarProc:
        """Another inbound sidecar in front of the same echo app, TLS 1.2 allowed (OpenSSL
        3.0 offloads RX for TLS 1.2 only)."""
        assert self.echo is not None
        sc = SidecarProc("inbound12", self._config(
            "inbound12", svid="inbound", tls={"min_version": "1.2"}, inbound=[{
                "name": "in12", "listen": "127.0.0.1:0",
                "forward_to": f"127.0.0.1:{self.echo.port}"}]), self._loop)
        self.extra.append(sc)
        sc.start()
        return sc

    def client_files(self) -> tuple[Path, Path, Path]:
        """The outbound identity's SVID as files a plain ssl client can load: cert chain,
        key, bundle."""
        from sidecar.tools import pki

        files = pki.write_svid(self.workdir / "client12", self._svids["outbound"],
                               self._bundle)
        d = self.workdir / "client12"
        return d / files.cert, d / files.key, d / files.bundle

    def rotate(self, name: str) -> Any:
        """A new SVID for the same ID from the same intermediate, written over `name`'s files
        in place the way spiffe-helper does; returns it."""
        from sidecar.tools import pki

        spiffe_id = self._svids[name].spiffe_id
        svid = pki.issue_svid(self._inter, spiffe_id)
        pki.write_svid(self.svid_dirs[name], svid, self._bundle)
        return svid

    def close(self) -> dict[str, int]:
        codes = {sc.name: sc.stop() for sc in reversed(self.extra)}
        codes.update({sc.name: sc.stop() for sc in reversed(self.sidecars)})
        if self.echo is not None:
            self.echo.close()
        return codes

    def kill(self) -> None:
        """The watchdog's way: no drain, no waiting."""
        for sc in self.sidecars + self.extra:
            sc.kill()


LIVE: list[Pair] = []  # every pair this run made, for the watchdog
TEMP_DIRS: list[Path] = []  # and the temp dir it removes


@contextlib.contextmanager
def pair(workdir: Path, ktls: str, loop: str, verify: bool) -> Iterator[Pair]:
    p = Pair(workdir, ktls, loop, verify)
    try:
        p.start()
        yield p
    finally:
        p.close()


def run_transfer(p: Pair, mib: float, verify: bool, timeout: float | None,
                 midway: Callable[[], None] | None = None) -> dict[str, Any]:
    nbytes = int(mib * MIB)
    limit = timeout or TRANSFER_FLOOR + TRANSFER_PER_MIB * mib
    cpu0 = {sc.name: cpu_seconds(sc.pid) for sc in p.sidecars}
    assert p.echo is not None
    first = len(p.echo.received)  # this transfer's connection at the app
    before = tls_stat()
    t = transfer(p.outbound.ports["out"], nbytes, verify, limit, midway)
    after = tls_stat()
    cpu = {sc.name: round(cpu_seconds(sc.pid) - cpu0[sc.name], 3) for sc in p.sidecars}
    app = (p.echo.received[first] if len(p.echo.received) > first
           else Received(error="no connection"))
    counts_ok = t.sent == nbytes == app.count == t.received and t.eof
    hashes_ok = counts_ok and (not verify or t.sha_sent == app.sha256 == t.sha_received)
    return {
        "bytes": {"client_sent": t.sent, "app_received": app.count,
                  "client_received": t.received, "expected": nbytes},
        "sha256": ({"client_sent": t.sha_sent, "app_received": app.sha256,
                    "client_received": t.sha_received} if verify else None),
        "verified": "sha256" if verify else "length",
        "hashes_ok": hashes_ok,
        "eof": t.eof,
        "error": t.error or app.error,
        "seconds": round(t.seconds, 3),
        # both directions run at once: each moves nbytes in `seconds`
        "mb_per_s_each_way": round(nbytes / 1e6 / t.seconds, 3) if t.seconds else None,
        "sidecar_cpu_s": cpu,
        "tls_stat_delta_transfer": delta(before, after),  # the sidecars were up already
    }


def access_line(sc: SidecarProc) -> dict[str, Any]:
    keys = ("direction", "tls_version", "cipher", "resumed", "decision", "reason",
            "bytes_to_app", "bytes_from_app", "close", "ktls_tx", "ktls_rx", "detail")
    line = sc.wait_line(lambda ln: ln.get("msg") == "connection", LINE_TIMEOUT,
                        "the access-log line of the transfer")
    return {k: line[k] for k in keys if k in line}


def access_lines(sc: SidecarProc, n: int, what: str) -> list[dict[str, Any]]:
    """The first `n` access-log lines of `sc` (waiting for them), trimmed like
    `access_line`."""
    keys = ("direction", "tls_version", "cipher", "resumed", "decision", "reason",
            "bytes_to_app", "bytes_from_app", "close", "ktls_tx", "ktls_rx", "detail")

    def enough(_: dict[str, Any]) -> bool:
        return sum(1 for ln in sc.lines if ln.get("msg") == "connection") >= n

    sc.wait_line(enough, LINE_TIMEOUT, what)
    with sc._cond:
        lines = [ln for ln in sc.lines if ln.get("msg") == "connection"][:n]
    return [{k: ln[k] for k in keys if k in ln} for ln in lines]


def ktls_samples(sc: SidecarProc) -> dict[str, float]:
    """sidecar_ktls_connections_total as {"direction/path/state": value}."""
    out: dict[str, float] = {}
    for line in sc.ktls_metrics()[1]:
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.partition("}")[0]))
        key = f"{labels.get('direction')}/{labels.get('path')}/{labels.get('state')}"
        out[key] = out.get(key, 0.0) + float(line.rpartition(" ")[2])
    return out


# --- scenarios beyond the main transfer (issue 7: RX offload, resumption, rotation) -----


def tls12_client_transfer(port: int, nbytes: int, cert: Path, key: Path, ca: Path,
                          timeout: float) -> dict[str, Any]:
    """A TLS 1.2-only client with OP_ENABLE_KTLS and a client SVID, straight to an inbound
    listener: `nbytes` each way (non-blocking, interleaved), sha256 of both, then
    close_notify with unwrap(), which waits for the sidecar's close_notify in turn."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_ENABLE_KTLS
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    out: dict[str, Any] = {"sent": 0, "received": 0, "error": None, "unwrap": None}
    deadline = time.monotonic() + timeout
    data = os.urandom(nbytes)
    view = memoryview(data)
    hr = hashlib.sha256()
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    t0 = time.monotonic()
    try:
        s = ctx.wrap_socket(raw)
        out["version"], out["cipher"] = s.version(), (s.cipher() or ("?",))[0]
        try:
            ulp = s.getsockopt(socket.IPPROTO_TCP, 31, 16)  # TCP_ULP
            out["client_ulp"] = ulp.rstrip(b"\0").decode()
        except OSError as exc:
            out["client_ulp"] = f"{type(exc).__name__}: {exc}"
        s.setblocking(False)
        sent = received = 0
        while received < nbytes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"took more than {timeout:.0f}s ({sent} sent, "
                                   f"{received} back)")
            _r, w, _ = select.select([s], [s] if sent < nbytes else [], [], 1.0)
            if sent < nbytes and w:
                try:
                    sent += s.send(view[sent:sent + CHUNK])
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
            while True:  # drain what OpenSSL holds, not only what select saw
                try:
                    chunk = s.recv(CHUNK)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                if not chunk:
                    raise EOFError(f"EOF after {received} of {nbytes} bytes back")
                hr.update(chunk)
                received += len(chunk)
        out["sent"], out["received"] = sent, received
        s.settimeout(IO_TIMEOUT)
        try:
            s.unwrap().close()
            out["unwrap"] = "ok"
        except (OSError, ssl.SSLError) as exc:
            out["unwrap"] = f"{type(exc).__name__}: {exc}"
            raw.close()
    except (OSError, ssl.SSLError, EOFError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        raw.close()
    out["seconds"] = round(time.monotonic() - t0, 3)
    out["sha_sent"] = hashlib.sha256(data).hexdigest()
    out["sha_received"] = hr.hexdigest()
    return out


def served_serial(p: Pair, port: int) -> str:
    """The serial (hex) of the certificate a listener presents to a full handshake."""
    from cryptography import x509

    cert, key, ca = p.client_files()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    with (socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw,
          ctx.wrap_socket(raw) as s):
        der = s.getpeercert(binary_form=True)
        with contextlib.suppress(OSError, ssl.SSLError):
            s.unwrap()
    return f"{x509.load_der_x509_certificate(der).serial_number:x}" if der else ""


def scenario_rx_tls12(p: Pair, mib: float) -> dict[str, Any]:
    """RX offload and the RX splice path: TLS 1.2 into an inbound sidecar with kTLS on,
    then the client's close_notify, a non-data record on the sidecar's kTLS RX socket."""
    t0 = time.monotonic()
    sc = p.start_inbound12()
    assert p.echo is not None
    nbytes = int(mib * MIB)
    cert, key, ca = p.client_files()
    first = len(p.echo.received)
    before = tls_stat()
    c = tls12_client_transfer(sc.ports["in12"], nbytes, cert, key, ca,
                              TRANSFER_FLOOR + TRANSFER_PER_MIB * mib)
    after = tls_stat()
    app = (p.echo.received[first] if len(p.echo.received) > first
           else Received(error="no connection"))
    conn = access_lines(sc, 1, "the access-log line of the TLS 1.2 connection")[0]
    samples = ktls_samples(sc)
    hashes_ok = (c["sent"] == c["received"] == app.count == nbytes
                 and c["sha_sent"] == app.sha256 == c["sha_received"])
    return {"mib": mib, "client": {k: v for k, v in c.items() if not k.startswith("sha")},
            "sha256": {"client_sent": c["sha_sent"], "app_received": app.sha256,
                       "client_received": c["sha_received"]},
            "app": {"count": app.count, "error": app.error},
            "hashes_ok": hashes_ok, "tls_stat_delta": delta(before, after),
            "ktls_metrics": samples, "connection": conn, "problems": sc.problems(),
            "seconds": round(time.monotonic() - t0, 3)}


def scenario_resumption(p: Pair, mib: float, verify: bool, n_before: int) -> dict[str, Any]:
    """A second connection through the kTLS pair: resumed, intact, TX offloaded."""
    res = run_transfer(p, mib, verify, None)
    n = n_before + 1
    return {"mib": mib, "hashes_ok": res["hashes_ok"], "bytes": res["bytes"],
            "error": res["error"], "seconds": res["seconds"],
            "tls_stat_delta": res["tls_stat_delta_transfer"],
            "outbound": access_lines(p.outbound, n, "the resumed connection's line")[-1],
            "inbound": access_lines(p.inbound, n, "the resumed connection's line")[-1]}


def scenario_rotation(p: Pair, mib: float, verify: bool, n_before: int) -> dict[str, Any]:
    """The inbound sidecar's SVID rewritten in place (spiffe-helper) halfway through a
    transfer through the kTLS pair; then a new connection."""
    rotated: dict[str, Any] = {}

    def rotate() -> None:
        t = time.monotonic()
        svid = p.rotate("inbound")
        serial = f"{svid.serial:x}"
        rotated["serial"] = serial
        line = p.inbound.wait_line(
            lambda ln: ln.get("msg") == "identity reloaded" and ln.get("serial") == serial,
            45.0, "its 'identity reloaded' line after the rotation")
        rotated["reload_line"] = {k: line.get(k) for k in ("msg", "serial", "trust_changed")}
        rotated["reload_s"] = round(time.monotonic() - t, 3)
        log(f"rotation: identity reloaded in {rotated['reload_s']}s")

    during = run_transfer(p, mib, verify, None, midway=rotate)
    after = run_transfer(p, mib, verify, None)
    # The pair's next connection resumes (the ticket keys survive a reload), so it never
    # sees a certificate: ask the inbound listener directly which one it serves now.
    served = served_serial(p, p.inbound.ports["in"])
    n = n_before + 2
    out_lines = access_lines(p.outbound, n, "the rotation connections' lines")
    in_lines = access_lines(p.inbound, n, "the rotation connections' lines")
    pick = ("hashes_ok", "bytes", "sha256", "error", "seconds")  # sha256: which way broke
    return {"mib": mib, **rotated, "served_serial_after": served,
            "during": {**{k: during[k] for k in pick},
                       "tls_stat_delta": during["tls_stat_delta_transfer"],
                       "outbound": out_lines[-2], "inbound": in_lines[-2]},
            "after": {**{k: after[k] for k in pick},
                      "tls_stat_delta": after["tls_stat_delta_transfer"],
                      "outbound": out_lines[-1], "inbound": in_lines[-1]}}


def run_scenarios(p: Pair, mib: float, verify: bool) -> dict[str, Any]:
    """Each scenario on its own: one failing still lets the others run and report."""
    out: dict[str, Any] = {}
    n = 1  # connections through the pair so far: the main transfer
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("rx_tls12", lambda: scenario_rx_tls12(p, mib)),
        ("resumption", lambda: scenario_resumption(p, mib, verify, n)),
        ("rotation", lambda: scenario_rotation(p, mib, verify, n)),
    ]
    for name, step in steps:
        t = time.monotonic()
        log(f"scenario {name}")
        try:
            out[name] = step()
        except Exception as exc:  # reported in the JSON
            import traceback

            out[name] = {"scenario_error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-3000:]}
        out[name]["scenario_s"] = round(time.monotonic() - t, 3)
        log(f"scenario {name} done in {out[name]['scenario_s']}s")
        if name != "rx_tls12":
            n = sum(1 for ln in p.outbound.lines if ln.get("msg") == "connection")
    return out


# --- modes -----------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    return {"kernel": platform.release(), "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION, "tcp_available_ulp": available_ulps(),
            "tls_module_loaded": Path("/proc/net/tls_stat").exists(),
            "kernel_aead_drivers": kernel_aead_drivers()}


def mode_transfer(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    result: dict[str, Any] = {"mode": "transfer", "mib": args.mib, "ktls": args.ktls,
                              "loop": args.loop, **environment()}
    before_all = tls_stat()
    with pair(workdir, args.ktls, args.loop, verify=not args.no_verify) as p:
        t_started = time.monotonic()
        log(f"sidecars ready in {t_started - t0:.1f}s; moving {args.mib} MiB each way")
        result.update(run_transfer(p, args.mib, not args.no_verify, args.transfer_timeout))
        log(f"transfer done in {result['seconds']}s, hashes_ok={result['hashes_ok']}")
        sidecars: dict[str, Any] = {}
        for sc in p.sidecars:
            metrics, raw = sc.ktls_metrics()
            status = json.loads(sc.get("/status")).get("ktls")
            sidecars[sc.name] = {"ktls_metrics": metrics, "ktls_metrics_raw": raw,
                                 "ktls_status": status, "connection": access_line(sc)}
        result["sidecars"] = sidecars
        if args.scenarios:
            result["scenarios"] = run_scenarios(p, args.scenario_mib, not args.no_verify)
    for sc in p.sidecars:
        sidecars[sc.name]["exit_code"] = sc.returncode
        sidecars[sc.name]["problems"] = sc.problems()
    for sc in p.extra:
        result["scenarios"]["rx_tls12"]["exit_code"] = sc.returncode
        result["scenarios"]["rx_tls12"]["problems"] = sc.problems()
    after_all = tls_stat()
    # The whole run also counts each sidecar's start-up detection probe (a loopback kTLS
    # handshake, TX on both of its ends); the transfer delta above counts only the pair.
    result["tls_stat_before"] = before_all
    result["tls_stat_after"] = after_all
    result["tls_stat_delta_run"] = delta(before_all, after_all)
    result["elapsed_s"] = {"start": round(t_started - t0, 3),
                           "transfer": result["seconds"],
                           "total": round(time.monotonic() - t0, 3)}
    result["ok"] = result["hashes_ok"] and all(
        s["exit_code"] == 0 for s in sidecars.values())
    return result


def mode_bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Both pairs (`ktls: off` and `on`) up at once; transfers alternate between them,
    the order flipping every round, so that a slow drift of the host's load (these
    machines are shared) hits both alike; the ratio is the median of per-round ratios."""
    t0 = time.monotonic()
    verify = args.verify_bench
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    ratios: list[float] = []
    pairs: dict[str, Pair] = {}
    with contextlib.ExitStack() as stack:
        for mode in ("off", "on"):
            pairs[mode] = stack.enter_context(pair(workdir, mode, args.loop, verify))
            run_transfer(pairs[mode], args.warmup_mib, verify, None)  # warm caches
        log(f"both pairs ready in {time.monotonic() - t0:.1f}s")
        for r in range(args.rounds):
            speed: dict[str, float] = {}
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                res = run_transfer(pairs[mode], args.mib, verify, args.transfer_timeout)
                log(f"round {r} ktls={mode}: {res['mb_per_s_each_way']} MB/s each way, "
                    f"sidecar CPU {res['sidecar_cpu_s']}, ok={res['hashes_ok']}")
                runs[mode].append(res)
                speed[mode] = res["mb_per_s_each_way"] or 0.0
            if speed["off"]:
                ratios.append(speed["on"] / speed["off"])
        ktls_metrics = {mode: {sc.name: sc.ktls_metrics()[0] for sc in p.sidecars}
                        for mode, p in pairs.items()}
    exit_codes = {mode: {sc.name: sc.returncode for sc in p.sidecars}
                  for mode, p in pairs.items()}
    problems = {mode: {sc.name: sc.problems() for sc in p.sidecars}
                for mode, p in pairs.items()}

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        speeds = [x["mb_per_s_each_way"] or 0.0 for x in rs]
        cpu = [sum(x["sidecar_cpu_s"].values()) for x in rs]
        return {"mb_per_s_each_way": round(statistics.median(speeds), 3),
                "all_mb_per_s": speeds,
                # every MiB crosses each of the two sidecars once each way
                "sidecar_cpu_s_per_mib": round(statistics.median(cpu) / (2 * args.mib), 4),
                "hashes_ok": all(x["hashes_ok"] for x in rs),
                "tx_offloaded_per_transfer": [x["tls_stat_delta_transfer"].get("TlsTxSw", 0)
                                              for x in rs]}

    off, on = summary(runs["off"]), summary(runs["on"])
    return {
        "mode": "bench", "mib": args.mib, "rounds": args.rounds, "loop": args.loop,
        "verified": "sha256" if verify else "length", **environment(),
        "off": off, "on": on,
        "ratio_on_off": round(statistics.median(ratios), 3) if ratios else None,
        "round_ratios": [round(x, 3) for x in ratios],
        "cpu_ratio_on_off": round(on["sidecar_cpu_s_per_mib"] / off["sidecar_cpu_s_per_mib"],
                                  3) if off["sidecar_cpu_s_per_mib"] else None,
        "ktls_metrics": ktls_metrics, "exit_codes": exit_codes, "problems": problems,
        "runs": runs,
        "elapsed_s": round(time.monotonic() - t0, 3),
        "ok": off["hashes_ok"] and on["hashes_ok"] and all(
            code == 0 for codes in exit_codes.values() for code in codes.values()),
    }


# --- main ------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for name in ("transfer", "bench"):
        sp = sub.add_parser(name)
        sp.add_argument("--mib", type=float, default=100.0 if name == "transfer" else 8.0,
                        help="MiB each way (transfer: 100; bench: 8 per transfer)")
        sp.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
        sp.add_argument("--transfer-timeout", type=float, default=None,
                        help=f"seconds for one transfer (default {TRANSFER_FLOOR:.0f} + "
                             f"{TRANSFER_PER_MIB:.0f} per MiB)")
        sp.add_argument("--deadline", type=float, default=1800.0,
                        help="seconds for the whole run, then everything is stopped")
        sp.add_argument("--workdir", type=Path, default=None,
                        help="where to write PKI and configs (default: a new temp dir)")
        if name == "transfer":
            sp.add_argument("--ktls", choices=["on", "auto", "off"], default="on")
            sp.add_argument("--no-verify", action="store_true",
                            help="check byte counts only, no sha256")
            sp.add_argument("--scenarios", action="store_true",
                            help="after the transfer: TLS 1.2 RX offload into an inbound "
                                 "sidecar, a resumed connection, an SVID rotation")
            sp.add_argument("--scenario-mib", type=float, default=8.0,
                            help="MiB each way in each scenario (default 8)")
        else:
            sp.add_argument("--rounds", type=int, default=6,
                            help="transfers per mode, alternating between the pairs")
            sp.add_argument("--warmup-mib", type=float, default=1.0)
            sp.add_argument("--verify-bench", action="store_true",
                            help="sha256 in the bench too (the client's hashing then "
                                 "competes with the sidecars for the 2 CPUs)")
    return p.parse_args(argv)


def raise_fd_limit(want: int = 65536) -> int:
    """The guest's init leaves RLIMIT_NOFILE at 4096, below what the default
    `limits.max_connections` (10,000, two descriptors each) needs, and the sidecar warns
    about it at start. Root in the guest may raise it; the sidecars inherit it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t0 = time.monotonic()
    fd_limit = raise_fd_limit()
    def emit(result: dict[str, Any]) -> None:
        print(json.dumps(result, default=str), flush=True)

    def watchdog() -> None:
        # The last resort: the run as a whole took too long. Kill what we started, say so.
        for p in LIVE:
            p.kill()
        emit({"mode": args.mode, "ok": False,
              "error": f"deadline: the whole run took more than {args.deadline:g}s"})
        for d in TEMP_DIRS:
            shutil.rmtree(d, ignore_errors=True)
        os._exit(3)

    timer = threading.Timer(args.deadline, watchdog)
    timer.daemon = True
    timer.start()

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        with contextlib.ExitStack() as stack:
            if args.workdir is None:
                workdir = Path(stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="ktls-vm-")))
                TEMP_DIRS.append(workdir)
            else:
                workdir = args.workdir
                workdir.mkdir(parents=True, exist_ok=True)
            log(f"mode={args.mode} workdir={workdir} python={sys.executable} "
                f"ulps={available_ulps()} fd_limit={fd_limit}")
            if args.mode == "transfer":
                result = mode_transfer(args, workdir)
            else:
                result = mode_bench(args, workdir)
    except (StepError, OSError, KeyboardInterrupt) as exc:
        result = {"mode": args.mode, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                  **environment()}
    finally:
        timer.cancel()
    result["guest_seconds"] = round(time.monotonic() - t0, 3)
    emit(result)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
