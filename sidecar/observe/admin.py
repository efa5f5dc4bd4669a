"""The admin endpoint: /metrics, /healthz, /readyz, /status. It observes, never steers.

HTTP here is the smallest useful subset: one GET per connection, answered and closed.
Probes and Prometheus need nothing more, and a request is bounded in size and time so a
stuck client cannot hold the admin port. It binds loopback unless configured otherwise.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from sidecar.observe import metrics
from sidecar.times import json_default

MAX_REQUEST = 8192  # bytes of request line + headers; probes send ~100
REQUEST_TIMEOUT = 5.0  # seconds to send them


@dataclass(frozen=True, slots=True)
class Probe:
    """What the server tells the admin endpoint, read at request time."""

    ready: Callable[[], str | None]  # None when ready, else why not
    status: Callable[[], dict[str, Any]]
    registry: Collector = metrics.REGISTRY  # workers: the supervisor's, summing them
    on_request: Callable[[], None] = lambda: None  # the loop-lag probe measures a moment


async def start(host: str, port: int, probe: Probe) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        probe.on_request()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = answer(head, probe)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            writer.close()
            return
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode() + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST)


def answer(head: bytes, probe: Probe) -> tuple[str, str, bytes]:
    """(status line, content type, body) for one request head. Pure but for the probe."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "400 Bad Request", "text/plain", b"bad request\n"
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", "text/plain", b"GET only\n"
    match target:
        case "/metrics":
            # OpenMetrics for a client that asks for it (Prometheus does, first), the
            # classic text format for every other.
            encode, ctype = choose_encoder(_header(head, b"accept"))
            return "200 OK", ctype, encode(probe.registry)
        case "/healthz":
            # Answering at all proves the loop turns: this handler runs on it.
            return "200 OK", "text/plain", b"ok\n"
        case "/readyz":
            why = probe.ready()
            if why is None:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", f"not ready: {why}\n".encode()
        case "/status":
            body = json.dumps(probe.status(), indent=2, default=json_default).encode() + b"\n"
            return "200 OK", "application/json", body
    return "404 Not Found", "text/plain", b"try /metrics /healthz /readyz /status\n"


def _header(head: bytes, name: bytes) -> str:
    """The value of header `name` (lower case) in a request head, or ""."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""
