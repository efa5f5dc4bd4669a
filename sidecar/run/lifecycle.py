"""The small pieces of a serving process's life around the proxy: the stop and reload
signals, a repeating tick (the sweeper), and the loop-lag probe.

Neither timer runs in an idle process: the sweeper ticks while there are connections to
sweep, the probe while there is work whose wait it would measure. A process with no
traffic then sleeps in epoll until something arrives (issue 21: at most one wake-up a
second with no traffic).
"""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import Callable

from sidecar.observe import metrics

# The loop-lag probe's period: 100 cheap callbacks a second, while it runs.
LAG_TICK = 0.01
SIGNALS = (("SIGTERM", signal.SIGTERM), ("SIGINT", signal.SIGINT), ("SIGHUP", signal.SIGHUP))


def install_signals(loop: asyncio.AbstractEventLoop, on_signal: Callable[[str], None]) -> None:
    """SIGTERM, SIGINT and SIGHUP call `on_signal` with their name, on the loop."""
    try:
        for name, sig in SIGNALS:
            loop.add_signal_handler(sig, on_signal, name)
    except (NotImplementedError, RuntimeError):
        pass  # not the main thread (tests embedding the server): stop() is called directly


def _always() -> bool:
    return True


class Tick:
    """`fn` every `period` seconds on the loop while `busy()` (asked after each call);
    then no timer at all until `wake()`; until cancelled. The next call is set up before
    this one runs: an error in one call must not end the ticks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float,
                 fn: Callable[[], None], busy: Callable[[], bool] = _always) -> None:
        self._loop, self._period, self._fn, self._busy = loop, period, fn, busy
        self._handle: asyncio.TimerHandle | None = None
        self._cancelled = False
        self.wake()

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def wake(self) -> None:
        """Tick `period` seconds from now, unless a tick is already due. Cheap: called
        for every accepted connection."""
        if self._handle is None and not self._cancelled:
            self._handle = self._loop.call_later(self._period, self._run)

    def _run(self) -> None:
        self._handle = self._loop.call_later(self._period, self._run)
        try:
            self._fn()
        finally:
            if not self._busy() and self._handle is not None:
                self._handle.cancel()
                self._handle = None

    def cancel(self) -> None:
        self._cancelled = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class LagProbe:
    """How late a 10 ms timer fires (metrics.loop_lag): a blocked loop delays every
    connection. It measures while there is work: `wake(ticks)` keeps it ticking for at
    least that many more ticks (the server wakes it on each accepted connection, on each
    sweep that saw bytes move or handshakes pending, and for two ticks on an admin
    request); with nothing to measure it arms no timer, so an idle loop stays asleep."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = LAG_TICK) -> None:
        self._loop, self._tick = loop, tick
        self.worst = 0.0
        self.samples = 0
        self._left = 0  # ticks still to take
        self._handle: asyncio.TimerHandle | None = None
        self._cancelled = False
        self._held = metrics.loop_lags.samples

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def ticks_for(self, seconds: float) -> int:
        return math.ceil(seconds / self._tick)

    def wake(self, ticks: int) -> None:
        if ticks > self._left:
            self._left = ticks
        if self._handle is None and not self._cancelled:
            self._handle = self._loop.call_later(self._tick, self._fire,
                                                 self._loop.time() + self._tick)

    def _fire(self, due: float) -> None:
        now = self._loop.time()
        late = max(0.0, now - due)
        self.samples += 1
        held = self._held
        held.append(late)  # into metrics.loop_lag at the next flush
        if len(held) >= metrics.MAX_HELD_SAMPLES:
            metrics.loop_lags.flush()
        if late > self.worst:
            self.worst = late
            metrics.loop_lag_max.set(late)
        self._left -= 1
        if self._left > 0:
            self._handle = self._loop.call_later(self._tick, self._fire, now + self._tick)
        else:
            self._handle = None
            # Its last samples go to the histogram now: the sweeper may have stopped
            # before the probe did (it lingers), and a worker's reach the supervisor's
            # files only by a flush.
            metrics.loop_lags.flush()

    def cancel(self) -> None:
        self._cancelled = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
