"""The small pieces of a serving process's life around the proxy: the stop and reload
signals, a repeating tick (the sweeper), and the loop-lag probe."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from sidecar.observe import metrics

# The loop-lag probe's period: 100 cheap callbacks a second.
LAG_TICK = 0.01
SIGNALS = (("SIGTERM", signal.SIGTERM), ("SIGINT", signal.SIGINT), ("SIGHUP", signal.SIGHUP))


def install_signals(loop: asyncio.AbstractEventLoop, on_signal: Callable[[str], None]) -> None:
    """SIGTERM, SIGINT and SIGHUP call `on_signal` with their name, on the loop."""
    try:
        for name, sig in SIGNALS:
            loop.add_signal_handler(sig, on_signal, name)
    except (NotImplementedError, RuntimeError):
        pass  # not the main thread (tests embedding the server): stop() is called directly


class Tick:
    """`fn` every `period` seconds on the loop, until cancelled. The next call is set up
    before this one runs: an error in one call must not end the ticks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float,
                 fn: Callable[[], None]) -> None:
        self._loop, self._period, self._fn = loop, period, fn
        self._handle = loop.call_later(period, self._run)

    def _run(self) -> None:
        self._handle = self._loop.call_later(self._period, self._run)
        self._fn()

    def cancel(self) -> None:
        self._handle.cancel()


class LagProbe:
    """How late a 10 ms timer fires (metrics.loop_lag): a blocked loop delays every
    connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = LAG_TICK) -> None:
        self._loop, self._tick = loop, tick
        self.worst = 0.0
        self._handle = loop.call_later(tick, self._fire, loop.time() + tick)

    def _fire(self, due: float) -> None:
        now = self._loop.time()
        late = max(0.0, now - due)
        metrics.loop_lag.observe(late)
        if late > self.worst:
            self.worst = late
            metrics.loop_lag_max.set(late)
        self._handle = self._loop.call_later(self._tick, self._fire, now + self._tick)

    def cancel(self) -> None:
        self._handle.cancel()
