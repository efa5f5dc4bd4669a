"""End-to-end fixtures: a dev PKI, real `sidecar run` processes, an echo app, TLS clients.

Nothing here is mocked: certificates come from `sidecar.tools.pki`, the sidecars are real
processes started with `python -m sidecar run`, every socket is a real one on 127.0.0.1
(or a real unix socket file), and the test-side TLS is the stdlib `ssl` module.

Synchronisation is always on a condition, never a sleep: a sidecar's stderr is read by a
background thread into a list of parsed JSON lines, and tests wait for the line they
expect (`Sidecar.connection(...)`) with a timeout. Every process and server a test starts
is stopped by the fixture that started it; a sidecar must exit 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from loop_app import LoopApp

from sidecar.tools import pki

REPO = Path(__file__).resolve().parents[2]

TRUST_DOMAIN = "example.org"
FRONTEND = f"spiffe://{TRUST_DOMAIN}/ns/web/sa/frontend"  # allowed by the default policy
PAYMENTS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/payments"  # the inbound sidecar (B)
BATCH = f"spiffe://{TRUST_DOMAIN}/ns/batch/sa/report-job"  # valid, but not allowed
BILLING = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/billing"  # nobody runs as this one

LOOPS = ("uvloop", "asyncio")

START_TIMEOUT = 20.0  # a sidecar process to log "ready"
STOP_TIMEOUT = 15.0  # a sidecar process to exit after SIGTERM
LINE_TIMEOUT = 10.0  # an expected log line to appear
IO_TIMEOUT = 10.0  # any one socket operation of a test client
DRAIN_TIMEOUT = "5s"  # the sidecars' drain_timeout: bounds teardown if a test leaks a conn


# --- PKI -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A root + intermediate for example.org, and an unrelated (foreign) root + intermediate
    for the same trust domain name, so that only the trust store tells them apart."""

    root: pki.CA
    intermediate: pki.CA
    foreign_root: pki.CA
    foreign_intermediate: pki.CA
    _cache: dict[str, pki.Svid] = field(default_factory=dict)

    @property
    def bundle(self) -> list[x509.Certificate]:
        return [self.root.cert]

    def svid(self, spiffe_id: str) -> pki.Svid:
        """A good SVID from the intermediate, issued once per session per ID."""
        if spiffe_id not in self._cache:
            self._cache[spiffe_id] = pki.issue_svid(self.intermediate, spiffe_id)
        return self._cache[spiffe_id]

    def issue(self, spiffe_id: str, **overrides: Any) -> pki.Svid:
        """A fresh SVID from the intermediate, with `pki.issue_svid` override keywords."""
        return pki.issue_svid(self.intermediate, spiffe_id, **overrides)


@pytest.fixture(scope="session")
def ca() -> Pki:
    root = pki.new_root(TRUST_DOMAIN)
    foreign = pki.new_root(TRUST_DOMAIN)
    return Pki(
        root=root,
        intermediate=pki.new_intermediate(root),
        foreign_root=foreign,
        foreign_intermediate=pki.new_intermediate(foreign),
    )


def write_svid_dir(
    directory: Path, svid: pki.Svid, bundle: Sequence[x509.Certificate]
) -> dict[str, str]:
    """spiffe-helper's three files in `directory`; returns the config's `identity` paths."""
    files = pki.write_svid(directory, svid, list(bundle))
    return {
        "cert": str(directory / files.cert),
        "key": str(directory / files.key),
        "bundle": str(directory / files.bundle),
    }


# --- waiting on a condition ------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    """Poll `predicate` until true; fail after `timeout` seconds. For state without a
    Condition of its own (a counter in another thread); waits on an Event, not a sleep."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        tick.wait(min(0.01, left))


# --- sidecar processes -----------------------------------------------------------------

Line = dict[str, Any]


class Sidecar:
    """One `sidecar run` process, its bound ports and its collected stderr lines."""

    def __init__(self, name: str, config_path: Path, loop: str) -> None:
        self.name = name
        self.config_path = config_path
        self.loop = loop
        self.lines: list[Line] = []
        self.ports: dict[str, int] = {}
        self.returncode: int | None = None
        self._cond = threading.Condition()
        self._eof = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------------------

    def start(self, *, wait_ready: bool = True) -> None:
        """Start and wait for "ready"; `wait_ready=False`: only for the admin endpoint
        (a Workload API sidecar serves it while it waits for its first SVID)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.pop("SIDECAR_LOOP", None)
        env.pop("SIDECAR_CONFIG", None)
        cmd = [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path),
               "--loop", self.loop]
        stdout = (self.config_path.parent / f"{self.name}.stdout").open("wb")
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                env=env, cwd=self.config_path.parent)
        finally:
            stdout.close()
        self._reader = threading.Thread(target=self._read, name=f"stderr-{self.name}",
                                        daemon=True)
        self._reader.start()
        if not wait_ready:
            admin = self.wait_line(lambda ln: ln.get("msg") == "listening"
                                   and ln.get("listener") == "admin", START_TIMEOUT,
                                   "the admin endpoint")
            self.ports["admin"] = int(admin["address"].rpartition(":")[2])
            return
        # With workers, each worker logs its own "ready" (tagged "worker"); the process is
        # ready when the supervisor says so, untagged.
        ready = self.wait_line(lambda ln: ln.get("msg") == "ready" and "worker" not in ln,
                               START_TIMEOUT, "the 'ready' line")
        for ln in self.lines[: self.lines.index(ready)]:
            if ln.get("msg") == "listening":
                self.ports[ln["listener"]] = int(ln["address"].rpartition(":")[2])

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
            line["_t"] = time.monotonic()  # when the test saw it, for timing assertions
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def stop(self) -> int:
        """SIGTERM, wait for the drain; SIGKILL (and report) if it hangs. Returns the code."""
        if self._proc is None:
            return 0
        if self.returncode is not None:
            return self.returncode
        proc = self._proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
            self.lines.append({"raw": f"<killed: no exit {STOP_TIMEOUT}s after SIGTERM>"})
            self.returncode = -9
        else:
            self.returncode = proc.returncode
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT)
        return self.returncode

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    # -- log lines ------------------------------------------------------------------------

    def tail(self, n: int = 40) -> str:
        with self._cond:
            shown = self.lines[-n:]
        return "\n".join(
            ln.get("raw") or json.dumps({k: v for k, v in ln.items() if k != "_t"})
            for ln in shown)

    def wait_line(self, predicate: Callable[[Line], bool], timeout: float = LINE_TIMEOUT,
                  what: str = "a log line") -> Line:
        """The first collected line satisfying `predicate`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "the process exited" if self._eof else f"timed out after {timeout}s"
                    pytest.fail(f"sidecar {self.name}: {why} waiting for {what}; "
                                f"last lines:\n{self.tail()}")
                self._cond.wait(left)

    def connection(self, timeout: float = LINE_TIMEOUT, **fields: Any) -> Line:
        """The access-log line (msg "connection") whose fields equal `fields`."""
        def match(line: Line) -> bool:
            return line.get("msg") == "connection" and all(
                k in line and line[k] == v for k, v in fields.items())
        return self.wait_line(match, timeout, f"a connection line with {fields}")

    def connections(self, **fields: Any) -> list[Line]:
        with self._cond:
            return [ln for ln in self.lines if ln.get("msg") == "connection" and all(
                k in ln and ln[k] == v for k, v in fields.items())]

    def wait_connections(self, count: int, timeout: float = LINE_TIMEOUT,
                         **fields: Any) -> list[Line]:
        """Wait until at least `count` access-log lines match `fields`; return them all."""
        def enough(_: Line) -> bool:
            return len(self.connections(**fields)) >= count
        self.wait_line(enough, timeout, f"{count} connection lines with {fields}")
        return self.connections(**fields)

    def port(self, listener: str) -> int:
        return self.ports[listener]


@dataclass
class SidecarFactory:
    """Writes a config (identity, listeners, policy, limits) and starts a sidecar."""

    directory: Path
    ca: Pki
    started: list[Sidecar] = field(default_factory=list)

    def __call__(
        self,
        name: str,
        *,
        spiffe_id: str | None = None,
        svid: pki.Svid | None = None,
        inbound: Sequence[dict[str, Any]] = (),
        outbound: Sequence[dict[str, Any]] = (),
        allow: Sequence[str] = (FRONTEND,),
        loop: str = "uvloop",
        limits: dict[str, Any] | None = None,
        tls: dict[str, Any] | None = None,
    ) -> Sidecar:
        d = self.directory / name
        d.mkdir(parents=True)
        if svid is None:
            svid = self.ca.svid(spiffe_id or PAYMENTS)
        config: dict[str, Any] = {
            "identity": write_svid_dir(d / "svid", svid, self.ca.bundle),
            "drain_timeout": DRAIN_TIMEOUT,
            "admin": {"listen": "127.0.0.1:0"},  # tests run sidecars side by side
            "log": {"level": "info", "format": "json"},
        }
        if inbound:
            config["inbound"] = [{"listen": "127.0.0.1:0", **lst} for lst in inbound]
            policy = d / "policy.yaml"
            policy.write_text(json.dumps({
                "mode": "enforce",
                "default": "deny",
                "rules": [{"name": "allowed-callers", "action": "allow", "from": list(allow)}],
            }))
            config["policy"] = str(policy)
        if outbound:
            config["outbound"] = [{"listen": "127.0.0.1:0", **lst} for lst in outbound]
        if limits:
            config["limits"] = limits
        if tls:
            config["tls"] = tls
        path = d / "sidecar.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        sc = Sidecar(name, path, loop)
        self.started.append(sc)
        sc.start()
        return sc

    def stop_all(self) -> list[str]:
        problems = []
        for sc in reversed(self.started):
            rc = sc.stop()
            if rc != 0:
                problems.append(f"sidecar {sc.name} exited {rc} after SIGTERM; last lines:\n"
                                f"{sc.tail()}")
        return problems


@pytest.fixture
def sidecar(tmp_path: Path, ca: Pki) -> Iterator[SidecarFactory]:
    """Factory: `sidecar("b", inbound=[...])` starts one; all are stopped (SIGTERM, must
    exit 0) when the test ends."""
    factory = SidecarFactory(tmp_path / "sidecars", ca)
    try:
        yield factory
    finally:
        problems = factory.stop_all()
    assert not problems, "\n".join(problems)


# --- the echo app ----------------------------------------------------------------------


class EchoApp(LoopApp):
    """An asyncio echo server in a thread: echoes until EOF, then shuts its write side
    (half-close) and closes. Counts accepted connections and bytes received.

    `hold=True`: echo nothing until EOF, then everything at once; a client only gets its
    echo if its half-close crossed both sidecars while its read side stayed open.
    """

    def __init__(self, *, unix_path: str | None = None, sock: socket.socket | None = None,
                 hold: bool = False):
        self.unix_path = unix_path
        self.hold = hold
        self._sock = sock
        self.port = 0
        self.accepted = 0
        self.bytes_received = 0
        self.finished = 0  # connections that reached EOF and were closed cleanly
        self._prepare("echo-app")

    @property
    def address(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"127.0.0.1:{self.port}"

    async def _listen(self) -> asyncio.Server:
        if self.unix_path:
            return await asyncio.start_unix_server(self._handle, path=self.unix_path)
        if self._sock is not None:
            return await asyncio.start_server(self._handle, sock=self._sock)
        return await super()._listen()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.accepted += 1
        held: list[bytes] = []
        try:
            while data := await reader.read(65536):
                with self._lock:
                    self.bytes_received += len(data)
                if self.hold:
                    held.append(data)
                    continue
                writer.write(data)
                await writer.drain()
            writer.write(b"".join(held))
            writer.write_eof()  # half-close: the echo is complete
            await writer.drain()
            with self._lock:
                self.finished += 1
        except (ConnectionError, OSError):
            pass  # the peer went away; the test sees it from its side
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

@pytest.fixture
def echo_app() -> Iterator[Callable[..., EchoApp]]:
    """Factory: `echo_app()` (TCP, ephemeral port), `echo_app(unix_path=...)`, or
    `echo_app(sock=bound_socket)`; every app is closed when the test ends."""
    apps: list[EchoApp] = []

    def start(**kwargs: Any) -> EchoApp:
        app = EchoApp(**kwargs)
        apps.append(app)
        return app.start()

    yield start
    for app in apps:
        app.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for unix socket files (108-byte sun_path)."""
    with tempfile.TemporaryDirectory(prefix="sc-") as d:
        yield Path(d)


# --- clients ---------------------------------------------------------------------------


def addr(sock: socket.socket) -> str:
    """The local address of a client socket as the sidecar logs its peer: host:port."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def recv_all(sock: socket.socket, limit: int | None = None) -> bytes:
    """Read until EOF (or `limit` bytes); a reset counts as EOF for what was read."""
    chunks: list[bytes] = []
    got = 0
    while limit is None or got < limit:
        try:
            data = sock.recv(65536 if limit is None else min(65536, limit - got))
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            break
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


@dataclass
class PlainResult:
    local: str  # the client's address as the sidecar logs it
    received: bytes
    eof: bool  # the stream ended with a clean EOF (not a reset)


def plain_roundtrip(port: int, payload: bytes, *, timeout: float = IO_TIMEOUT) -> PlainResult:
    """Plaintext to an outbound listener: send `payload` (in a thread, while reading),
    shut the write side, read the echo until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        local = addr(sock)
        errors: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send, name="plain-sender", daemon=True)
        sender.start()
        chunks: list[bytes] = []
        eof = False
        try:
            while data := sock.recv(262144):
                chunks.append(data)
            eof = True
        except ConnectionResetError:
            pass
        sender.join(timeout)
        assert not sender.is_alive(), "the sender thread is stuck"
    return PlainResult(local, b"".join(chunks), eof)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class TlsOutcome:
    local: str  # the client's address as the sidecar logs it (peer_addr)
    handshake_error: BaseException | None = None
    error: BaseException | None = None  # after the handshake: an alert, a reset
    received: bytes = b""
    version: str | None = None


class TlsClient:
    """Direct mTLS to an inbound listener with any certificate (or none)."""

    def __init__(self, directory: Path, ca: Pki) -> None:
        self.directory = directory
        self.ca = ca

    def context(
        self,
        svid: pki.Svid | None = None,
        *,
        chain: Sequence[x509.Certificate] | None = None,
        trust: Sequence[x509.Certificate] | None = None,
        max_version: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        """A client context presenting `svid` (leaf + `chain`, default its intermediates),
        trusting `trust` (default our root) for the server."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # SVIDs carry no DNS name; this is a test client
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(
            cadata=pki.certs_pem(trust if trust is not None else self.ca.bundle).decode())
        if max_version is not None:
            ctx.maximum_version = max_version
        if svid is not None:
            certs = [svid.cert, *(svid.intermediates if chain is None else chain)]
            path = self.directory / f"client-{secrets.token_hex(6)}.pem"
            path.write_bytes(pki.certs_pem(certs) + svid.key_pem())
            ctx.load_cert_chain(path)
        return ctx

    def exchange(self, port: int, ctx: ssl.SSLContext, payload: bytes = b"ping",
                 *, timeout: float = IO_TIMEOUT) -> TlsOutcome:
        """Handshake, send `payload`, read up to its length back (or until EOF/alert)."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        out = TlsOutcome(addr(raw))
        try:
            tls = ctx.wrap_socket(raw, server_hostname=None)
        except (OSError, ssl.SSLError) as exc:
            out.handshake_error = exc
            raw.close()
            return out
        with tls:
            out.version = tls.version()
            chunks: list[bytes] = []
            got = 0
            try:
                tls.sendall(payload)
                while got < max(len(payload), 1):
                    data = tls.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
                    got += len(data)
            except (OSError, ssl.SSLError) as exc:
                out.error = exc
            out.received = b"".join(chunks)
        return out


@pytest.fixture
def tls_client(tmp_path: Path, ca: Pki) -> TlsClient:
    d = tmp_path / "clients"
    d.mkdir()
    return TlsClient(d, ca)


def assert_good_client(b: Sidecar, client: TlsClient, listener: str = "in") -> None:
    """An allowed SVID, straight to B's inbound listener: the echo comes back, and B logs
    the connection as allowed with no failure reason."""
    payload = secrets.token_bytes(4096)
    out = client.exchange(b.port(listener), client.context(client.ca.svid(FRONTEND)), payload)
    assert out.handshake_error is None, out.handshake_error
    assert out.error is None, out.error
    assert out.received == payload
    line = b.connection(peer_addr=out.local)
    assert line["reason"] is None, line
    assert line["decision"] == "allow", line
    assert line["peer_id"] == FRONTEND, line
    assert line["bytes_to_app"] == len(payload), line
