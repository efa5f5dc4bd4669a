"""lifecycle.py: the sweeper's tick outlives an error, and the lag probe sees a stall."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.run import lifecycle

pytestmark = pytest.mark.timeout(10)


async def test_a_tick_that_fails_keeps_ticking() -> None:
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    twice = asyncio.Event()
    errors: list[object] = []
    loop.set_exception_handler(lambda _, ctx: errors.append(ctx.get("exception")))

    def fn() -> None:
        calls.append(loop.time())
        if len(calls) == 2:
            twice.set()
        if len(calls) == 1:
            raise RuntimeError("one bad sweep")

    tick = lifecycle.Tick(loop, 0.01, fn)
    try:
        async with asyncio.timeout(5):
            await twice.wait()
    finally:
        tick.cancel()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)


async def test_the_lag_probe_sees_a_blocked_loop() -> None:
    loop = asyncio.get_running_loop()
    probe = lifecycle.LagProbe(loop, tick=0.001)
    try:
        await asyncio.sleep(0.005)
        time.sleep(0.1)  # the stall being measured, not a synchronisation
        deadline = loop.time() + 5
        while probe.worst < 0.05 and loop.time() < deadline:
            await asyncio.sleep(0.01)
    finally:
        probe.cancel()
    assert probe.worst >= 0.05
