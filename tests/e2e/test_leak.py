"""Memory per outbound connection stays flat over many connections.

CPython 3.13.0's `SSLSocket.session` getter leaks a copy of the session on every call
(gh-116810, ~6 KiB with a certificate); an outbound that asked on every connection grew
by that much per connection, resumption on or off. The sidecar's resident memory is read
from /proc, before and after a run of connections through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import FRONTEND, PAYMENTS, EchoApp, Sidecar, SidecarFactory

pytestmark = pytest.mark.e2e

WARM_UP = 200  # first connections: caches, arenas and metrics settle
MEASURED = 1000
CONCURRENCY = 16
MAX_GROWTH_PER_CONNECTION = 1024  # bytes; the leak was ~6,200


def rss(sc: Sidecar) -> int:
    """Resident memory of the sidecar process, in bytes (VmRSS)."""
    proc = sc._proc
    assert proc is not None
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


async def connections(port: int, count: int) -> None:
    """`count` echo round trips through the outbound, CONCURRENCY at a time."""
    todo = iter(range(count))

    async def worker() -> None:
        for _ in todo:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"ping")
                writer.write_eof()
                assert await reader.read() == b"ping"
            finally:
                writer.close()
                await writer.wait_closed()

    async with asyncio.timeout(120):
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("resumption", [True, False])
async def test_outbound_memory_per_connection_is_flat(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp], resumption: bool
) -> None:
    app = echo_app()
    tls = {"session_resumption": resumption}
    b = sidecar("b", spiffe_id=PAYMENTS, tls=tls,
                inbound=[{"name": "in", "forward_to": app.address}])
    a = sidecar("a", spiffe_id=FRONTEND, tls=tls,
                outbound=[{"name": "out", "connect_to": f"127.0.0.1:{b.port('in')}",
                           "expect_ids": [PAYMENTS]}])
    port = a.port("out")

    await connections(port, WARM_UP)
    a.wait_connections(WARM_UP, listener="out")
    before = rss(a)
    await connections(port, MEASURED)
    lines = a.wait_connections(WARM_UP + MEASURED, listener="out")
    growth = (rss(a) - before) / MEASURED

    assert [ln for ln in lines if ln["close"] != "closed"] == []
    if resumption:
        assert sum(1 for ln in lines if ln["resumed"]) > len(lines) * 0.9
    assert growth < MAX_GROWTH_PER_CONNECTION, (
        f"the outbound grew {growth:.0f} bytes per connection over {MEASURED} connections")
