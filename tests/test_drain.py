"""drain.py: a drain waits for the last connection, its timeout, or a second stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sidecar.proxy.connection import Tracker
from sidecar.run.drain import Drain

pytestmark = pytest.mark.timeout(10)


def tracker(drain: Drain) -> Tracker:
    t = Tracker(asyncio.get_running_loop(), max_connections=10, max_pending_handshakes=10,
                idle_timeout=60.0, max_lifetime=0.0)
    t.on_empty = drain.on_empty
    return t


async def waits_until(drain: Drain, t: Tracker, end: Callable[[], object]) -> None:
    """The drain waits while a connection lives, and finishes once `end` is called."""
    finishing = asyncio.create_task(drain.finish(t, ()))
    await asyncio.sleep(0)
    assert not finishing.done()
    end()
    async with asyncio.timeout(5):
        await finishing


async def test_the_drain_ends_when_the_last_connection_finishes() -> None:
    drain = Drain(timeout=30.0)
    t = tracker(drain)
    rec = t.open("inbound", "app", "127.0.0.1:1")
    assert drain.stop() and drain.draining and drain.stopped.is_set()
    await waits_until(drain, t, lambda: t.finish(rec))


async def test_a_second_stop_ends_the_drain_at_once() -> None:
    drain = Drain(timeout=30.0)
    t = tracker(drain)
    t.open("inbound", "app", "127.0.0.1:1")
    assert drain.stop()
    await waits_until(drain, t, lambda: drain.stop() and pytest.fail("not the second"))


async def test_the_timeout_ends_a_drain_that_a_connection_holds() -> None:
    drain = Drain(timeout=0.05)
    t = tracker(drain)
    t.open("inbound", "app", "127.0.0.1:1")
    drain.stop()
    async with asyncio.timeout(5):
        await drain.finish(t, ())
