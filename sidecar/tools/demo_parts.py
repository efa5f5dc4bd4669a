"""What `sidecar demo` listens and talks with: the sidecars' log events, plain calls
through a sidecar, and a GET of an admin endpoint. The story itself is in demo.py."""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from sidecar.observe import logs

STEP_TIMEOUT = 10.0  # seconds for any one wait; loopback answers in milliseconds


class Events(logging.Handler):
    """Collects the sidecars' log events (all in this process) so the demo can explain
    them: access-log lines, identities swapped in, and every other event."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []
        self.reloads: list[dict[str, Any]] = []  # "identity reloaded", in order, kept
        self.other: list[tuple[str, dict[str, Any]]] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if not fields:
            return
        if record.name == logs.ACCESS.name:
            self.lines.append(fields)
        elif record.getMessage() == "identity reloaded":
            self.reloads.append(fields)
        else:
            self.other.append((record.getMessage(), fields))
        self.changed.set()

    async def _until[T](self, found: Callable[[], T | None]) -> T:
        async with asyncio.timeout(STEP_TIMEOUT):
            while (value := found()) is None:
                self.changed.clear()
                await self.changed.wait()
        return value

    async def access(self, listener: str) -> dict[str, Any]:
        """The next access-log line of `listener`, taken off the list."""

        def take() -> dict[str, Any] | None:
            for line in self.lines:
                if line["listener"] == listener:
                    self.lines.remove(line)
                    return line
            return None

        return await self._until(take)

    async def wait(self, match: Callable[[str, dict[str, Any]], bool]) -> dict[str, Any]:
        """The fields of the first other event `match(message, fields)` accepts."""
        return await self._until(
            lambda: next((f for m, f in self.other if match(m, f)), None))


async def call(port: int, message: bytes) -> bytes:
    """Send a request and read the answer; b"" when the sidecar hung up instead."""
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(message)
            writer.write_eof()
            return await reader.read()
        except ConnectionError:
            return b""
        finally:
            writer.close()


def _get(url: str) -> tuple[str, str]:
    # No proxy: the admin endpoint is on loopback, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=STEP_TIMEOUT) as response:
            return f"{response.status} {response.reason}", response.read().decode().strip()
    except urllib.error.HTTPError as exc:
        with exc:
            return f"{exc.code} {exc.reason}", exc.read().decode().strip()


async def get(address: str, path: str) -> tuple[str, str]:
    """(status line, body) of GET `path` on an admin endpoint at `address` (host:port)."""
    return await asyncio.to_thread(_get, f"http://{address}{path}")
