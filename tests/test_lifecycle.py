"""lifecycle.py: the sweeper's tick outlives an error and sleeps while there is nothing to
sweep; the lag probe sees a stall, and takes only the ticks it was woken for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from sidecar.run import lifecycle

pytestmark = pytest.mark.timeout(10)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


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


async def test_a_tick_with_nothing_to_do_arms_no_timer_until_woken() -> None:
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    busy = [False]
    tick = lifecycle.Tick(loop, 0.005, lambda: calls.append(loop.time()),
                          busy=lambda: busy[0])
    try:
        await until(lambda: not tick.armed)
        assert len(calls) == 1  # the one tick it was armed for, then asleep
        busy[0] = True
        tick.wake()
        tick.wake()  # a second wake while one is due adds nothing
        await until(lambda: len(calls) >= 4)
        assert tick.armed
        busy[0] = False
        await until(lambda: not tick.armed)
        settled = len(calls)
        await asyncio.sleep(0.05)  # ten periods: none may run
        assert len(calls) == settled
    finally:
        tick.cancel()
    tick.wake()
    assert not tick.armed  # cancelled stays cancelled


async def test_the_lag_probe_sees_a_blocked_loop() -> None:
    loop = asyncio.get_running_loop()
    probe = lifecycle.LagProbe(loop, tick=0.001)
    probe.wake(10_000)
    try:
        await asyncio.sleep(0.005)
        time.sleep(0.1)  # the stall being measured, not a synchronisation
        deadline = loop.time() + 5
        while probe.worst < 0.05 and loop.time() < deadline:
            await asyncio.sleep(0.01)
    finally:
        probe.cancel()
    assert probe.worst >= 0.05


async def test_the_lag_probe_takes_the_ticks_it_was_woken_for_then_sleeps() -> None:
    loop = asyncio.get_running_loop()
    probe = lifecycle.LagProbe(loop, tick=0.001)
    try:
        assert not probe.armed  # no work yet: no timer
        probe.wake(3)
        probe.wake(2)  # fewer than already due: nothing added
        await until(lambda: not probe.armed)
        assert probe.samples == 3
        probe.wake(2)
        probe.wake(5)  # more: the longer of the two
        await until(lambda: not probe.armed)
        assert probe.samples == 3 + 5
        await asyncio.sleep(0.02)  # twenty ticks: none may run
        assert probe.samples == 8
    finally:
        probe.cancel()
    probe.wake(5)
    assert not probe.armed


def test_the_lag_probe_lingers_whole_ticks() -> None:
    loop = asyncio.new_event_loop()
    try:
        probe = lifecycle.LagProbe(loop, tick=0.01)
        assert probe.ticks_for(1.5) == 150
        assert probe.ticks_for(0.015) == 2
    finally:
        loop.close()
