"""The HTTP app behind an http listener in the tests: it answers what it received.

An asyncio server in a thread of its own. Requests are parsed by h11, a parser that is
not the sidecar's (llhttp), so whatever the sidecar forwards is checked by a second,
strict reading. Every request it saw is kept in `seen` (method, target, headers, body
length and SHA-256), and the default answer is that record as JSON, so a test reads both
what the app received and what came back.

The target picks the answer's shape:

- `/chunked`: the record in three chunks; `/close`: with `Connection: close`, then the
  connection closes; `/delimited`: no Content-Length, no chunks, the body runs until the
  app closes; `/status/NNN`: that status (204 and 304 without a body);
- `/big?n=BYTES&framing=length|chunked|close`: a body of n bytes (a repeated pattern),
  sent in 64 KiB writes with the given framing;
- `/hang`: reads the request and never answers (until the connection closes);
- `/drop-second`: answers the first request of its connection, then closes the
  connection on the second without answering (a kept-alive connection closed under a
  request);
- a `Expect: 100-continue` request gets `100 Continue` before its body is read;
- a WebSocket upgrade (`Upgrade: websocket`) gets `101 Switching Protocols`, then the
  connection echoes raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
from loop_app import LoopApp

IO_TIMEOUT = 10.0
PATTERN = bytes(range(256)) * 256  # 64 KiB


def big_body(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]  # as received, names lowercased by h11
    body_len: int = 0
    body_sha256: str = ""
    http_version: str = "1.1"

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target": self.target, "headers": self.headers,
                "body_len": self.body_len, "body_sha256": self.body_sha256,
                "http_version": self.http_version}


@dataclass
class HttpApp(LoopApp):
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    received: int = 0  # bytes read from every connection, requests or not
    port: int = 0
    errors: list[str] = field(default_factory=list)  # what h11 refused of the sidecar's

    def __post_init__(self) -> None:
        self._prepare("http-app")

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    # -- one connection -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
        conn = h11.Connection(h11.SERVER)
        served = 0
        try:
            while True:
                request, body, upgrade = await self._read_request(conn, reader, writer)
                if request is None:
                    return
                served += 1
                if upgrade:
                    await self._tunnel(conn, reader, writer)
                    return
                if not await self._answer(conn, request, body, writer, served):
                    return
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            with self._lock:
                self.errors.append(str(exc))
        except (ConnectionError, OSError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> tuple[Seen | None, bytes, bool]:
        request: Seen | None = None
        body = hashlib.sha256()
        length = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                with self._lock:
                    self.received += len(data)
                conn.receive_data(data)
                continue
            if event is h11.PAUSED:  # an upgrade: the rest is the tunnel's
                return request, b"", True
            if isinstance(event, h11.ConnectionClosed):
                return None, b"", False
            if isinstance(event, h11.Request):
                request = Seen(event.method.decode(), event.target.decode("latin-1"),
                               [(k.decode(), v.decode("latin-1")) for k, v in event.headers],
                               http_version=event.http_version.decode())
                if request.header("expect") == ["100-continue"]:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
            elif isinstance(event, h11.Data):
                body.update(event.data)
                length += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                request.body_len, request.body_sha256 = length, body.hexdigest()
                with self._lock:
                    self.seen.append(request)
                upgrade = [v.lower() for v in request.header("upgrade")] == ["websocket"]
                return request, b"", upgrade

    async def _answer(self, conn: h11.Connection, request: Seen, _body: bytes,
                      writer: asyncio.StreamWriter, served: int) -> bool:
        """Write the answer; False when the connection ends after it."""
        url = urlsplit(request.target)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        record = json.dumps(request.as_dict()).encode()
        path = url.path
        if path == "/hang":
            await asyncio.sleep(3600)
        if path == "/drop-second" and served >= 2:
            return False
        if path == "/delimited":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + record)
            await writer.drain()
            return False
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            body = b"" if status in (204, 304) else record
            headers = [("Content-Type", "application/json")]
            if status not in (204, 304):
                headers.append(("Content-Length", str(len(body))))
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
            if body:
                writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return True
        if path == "/big":
            return await self._big(conn, writer, int(query["n"]), query.get("framing",
                                                                            "length"))
        headers = [("Content-Type", "application/json")]
        if path == "/close":
            headers.append(("Connection", "close"))
        if path != "/chunked":
            headers.append(("Content-Length", str(len(record))))
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        if request.method != "HEAD":
            if path == "/chunked":
                third = len(record) // 3 + 1
                for i in range(0, len(record), third):
                    writer.write(conn.send(h11.Data(data=record[i:i + third])))
            else:
                writer.write(conn.send(h11.Data(data=record)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return path != "/close"

    async def _big(self, conn: h11.Connection, writer: asyncio.StreamWriter, n: int,
                   framing: str) -> bool:
        body = big_body(n)
        if framing == "close":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            for i in range(0, n, 65536):
                writer.write(body[i:i + 65536])
                await writer.drain()
            return False
        headers = [("Content-Type", "application/octet-stream")]
        if framing == "length":
            headers.append(("Content-Length", str(n)))
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        for i in range(0, n, 65536):
            writer.write(conn.send(h11.Data(data=body[i:i + 65536])))
            await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return True

    async def _tunnel(self, conn: h11.Connection, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\n\r\n")
        leftover = conn.trailing_data[0]
        if leftover:
            writer.write(leftover)
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
