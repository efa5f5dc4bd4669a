"""An asyncio server in a thread of its own: what the tests' apps behind a sidecar share
(the echo app, the http app, the PROXY v2 echo app). A subclass gives `_handle`, and
`_listen` when it does not listen on an ephemeral loopback TCP port."""

from __future__ import annotations

import asyncio
import threading
from typing import Self

IO_TIMEOUT = 10.0


class LoopApp:
    port: int = 0

    def _prepare(self, name: str) -> None:
        """Called once by the subclass's __init__ (or __post_init__)."""
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(IO_TIMEOUT)
        return self

    async def _start(self) -> None:
        self._server = await self._listen()
        bound = self._server.sockets[0].getsockname()
        if isinstance(bound, tuple):  # not a Unix socket
            self.port = bound[1]

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server.close_clients()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(IO_TIMEOUT)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(IO_TIMEOUT)
        self._loop.close()
