"""Each rotation boundary turns the session keys exactly once, and never before the wall
clock has passed it: a timer that fired a little early once "rotated" to the period's own
keys (logged, and nothing changed), and a session from before two logged rotations still
resumed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import uvloop

from sidecar.modes import SessionStore
from sidecar.tls import contexts as tls_contexts
from sidecar.tls.resumption import Resumption

PERIOD = 0.01
ROTATIONS = 50  # boundaries checked: about as many as the former 0.6 s window held
DEADLINE = 20.0  # seconds for them: ~0.5 s unloaded, far more when the loop is starved
seen: list[tuple[float, int]] = []


class Recorded(Resumption):
    """The real schedule; its rotation records when it ran and which epoch it turned to."""

    def rotate(self, contexts: tls_contexts.Contexts) -> None:
        seen.append((time.time(), self.epoch()))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("new_loop", [uvloop.new_event_loop, asyncio.new_event_loop],
                         ids=["uvloop", "asyncio"])
def test_each_boundary_rotates_once_and_not_early(
        new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    seen.clear()
    r = Recorded(SessionStore.TICKETS, PERIOD, 0, b"s" * 32)

    started: list[int] = []

    async def main() -> None:
        started.append(r.epoch())
        stop = asyncio.Event()
        task = asyncio.ensure_future(r.rotate_at_boundaries(
            lambda: None, stop))  # type: ignore[arg-type, return-value]
        # Wait for the rotations themselves, not a fixed 0.6 s: a starved loop (a loaded
        # 2-core machine) ran fewer than the 20 boundaries asked in 0.6 s though none was wrong.
        deadline = time.monotonic() + DEADLINE
        while len(seen) < ROTATIONS and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(PERIOD)
        stop.set()
        await task

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    epochs = [e for _, e in seen]
    assert len(epochs) >= ROTATIONS, f"{len(epochs)} rotations in {DEADLINE} s: {seen}"
    assert len(set(epochs)) == len(epochs), f"an epoch was rotated to twice: {epochs}"
    # Not early: the first rotation turns to the epoch after the one the schedule began
    # in (a timer firing before the boundary turned to that same epoch), and each to a
    # later one than the last.
    assert epochs[0] > started[0], (started, seen)
    assert epochs == sorted(epochs), seen
    assert all(at >= epoch * PERIOD for at, epoch in seen), seen
