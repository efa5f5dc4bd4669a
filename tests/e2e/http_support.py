"""What the http listener's end-to-end tests share: a sidecar with a policy of the test's
own, the HTTP app behind it (tests/http_app.py), and a TLS client that speaks raw HTTP/1.1
and reads responses by their framing."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from http_app import HttpApp
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    DRAIN_TIMEOUT,
    FRONTEND,
    IO_TIMEOUT,
    PAYMENTS,
    Line,
    Pki,
    Sidecar,
    TlsClient,
    write_svid_dir,
)

__all__ = ["FRONTEND", "PAYMENTS", "Client", "Response", "module_app_and_sidecar",
           "start_sidecar"]


def start_sidecar(directory: Path, ca: Pki, forward_to: str, policy: dict[str, Any], *,
                  limits: dict[str, Any] | None = None, name: str = "b",
                  loop: str = "uvloop") -> Sidecar:
    """`sidecar run` with one inbound http listener `api` in front of `forward_to`."""
    d = directory / name
    d.mkdir(parents=True)
    (d / "policy.yaml").write_text(json.dumps(policy))
    config: dict[str, Any] = {
        "identity": write_svid_dir(d / "svid", ca.svid(PAYMENTS), ca.bundle),
        "drain_timeout": DRAIN_TIMEOUT,
        "admin": {"listen": "127.0.0.1:0"},
        "log": {"level": "info", "format": "json"},
        "inbound": [{"name": "api", "listen": "127.0.0.1:0", "forward_to": forward_to,
                     "protocol": "http"}],
        "policy": str(d / "policy.yaml"),
    }
    if limits:
        config["limits"] = limits
    path = d / "sidecar.yaml"
    path.write_text(json.dumps(config, indent=2))
    sc = Sidecar(name, path, loop)
    sc.start()
    return sc


def module_app_and_sidecar(policy: dict[str, Any], *,
                           limits: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The fixtures `app` (an HttpApp) and `sc` (a sidecar in front of it, with `policy`
    and `limits`), each started once for the test module that assigns them:
    `app, sc = module_app_and_sidecar(POLICY)`."""

    @pytest.fixture(scope="module")
    def app() -> Iterator[HttpApp]:
        a = HttpApp().start()
        yield a
        a.close()

    @pytest.fixture(scope="module")
    def sc(tmp_path_factory: pytest.TempPathFactory, ca: Pki,
           app: HttpApp) -> Iterator[Sidecar]:
        s = start_sidecar(tmp_path_factory.mktemp("http"), ca, app.address, policy,
                          limits=limits)
        yield s
        assert s.stop() == 0, s.tail()

    return app, sc


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Client:
    """One mTLS connection to the http listener, as `client` (an SVID) or with `ctx`."""

    port: int
    ctx: ssl.SSLContext
    sock: ssl.SSLSocket = field(init=False)
    local: str = field(init=False)  # the client's address, as the sidecar logs it
    buf: bytes = b""

    def __post_init__(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
        host, port = raw.getsockname()[:2]
        self.local = f"{host}:{port}"
        self.sock = self.ctx.wrap_socket(raw, server_hostname=None)

    @classmethod
    def to(cls, sc: Sidecar, tls: TlsClient, spiffe_id: str = FRONTEND,
           alpn: list[str] | None = None) -> Client:
        ctx = tls.context(tls.ca.svid(spiffe_id))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return cls(sc.port("api"), ctx)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def get(self, target: str, *, headers: dict[str, str] | None = None,
            method: str = "GET", body: bytes | None = None) -> Response:
        self.send(request(method, target, headers=headers, body=body))
        return self.response(head=method == "HEAD")

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):
            data = b""
        self.buf += data
        return bool(data)

    def response(self, *, head: bool = False) -> Response:
        """The next response, read by its framing (1xx responses are returned too)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a whole response head: {self.buf!r}")
        raw_head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        version, status, reason = [*lines[0].split(" ", 2), ""][:3]
        assert version == "HTTP/1.1", lines[0]
        fields = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        code = int(status)
        names = {k.lower(): v for k, v in fields}
        if head or code in (204, 304) or code < 200:
            body = b""
        elif "transfer-encoding" in names:
            body = self._chunked()
        elif "content-length" in names:
            body = self._exactly(int(names["content-length"]))
        else:
            while self._fill():
                pass
            body, self.buf = self.buf, b""
        return Response(code, reason, fields, body, raw_head + b"\r\n\r\n")

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"closed after {len(self.buf)} of {n} body bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed in a chunked body")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():
                    pass  # trailers, then the blank line
                return b"".join(parts)
            parts.append(self._exactly(size))
            assert self._line() == b""

    def closed(self) -> bool:
        """Has the sidecar ended the connection (after whatever it sent)?"""
        while self._fill():
            pass
        return True

    def close(self) -> None:
        """A clean end: close_notify, then the socket."""
        try:
            self.sock.unwrap()
        except (OSError, ValueError):
            pass  # the sidecar ended it first
        self.sock.close()


def x509_der() -> Encoding:
    return Encoding.DER


def request(method: str, target: str, *, headers: dict[str, str] | None = None,
            body: bytes | None = None, host: str = "payments") -> bytes:
    fields = {"Host": host, **(headers or {})}
    if body is not None and "Transfer-Encoding" not in fields:
        fields.setdefault("Content-Length", str(len(body)))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in
                                                       fields.items()) + "\r\n"
    return head.encode("latin-1") + (body or b"")


def chunked(body: bytes, size: int = 1000) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                   for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


def request_lines(sc: Sidecar, **fields: Any) -> list[Line]:
    with sc._cond:
        return [ln for ln in sc.lines if ln.get("msg") == "request"
                and all(ln.get(k) == v for k, v in fields.items())]


def request_line(sc: Sidecar, **fields: Any) -> Line:
    """Wait for the access-log line (msg "request") whose fields equal `fields`."""
    def match(line: Line) -> bool:
        return line.get("msg") == "request" and all(line.get(k) == v
                                                    for k, v in fields.items())
    return sc.wait_line(match, what=f"a request line with {fields}")


def metric(sc: Sidecar, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{sc.port('admin')}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as r:
            body = r.read().decode()
    except urllib.error.HTTPError as e:
        body = e.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += float(s.value)
    return total


def leaf_hash(ca: Pki, spiffe_id: str) -> str:
    return hashlib.sha256(ca.svid(spiffe_id).cert.public_bytes(x509_der())).hexdigest()


def wait_count(get: Callable[[], float], want: float) -> None:
    from .conftest import wait_for

    wait_for(lambda: get() >= want, 10, f"a count of {want}")

