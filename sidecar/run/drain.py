"""Drain: the first stop signal ends serving and lets live connections finish until
`drain_timeout`; then what is left is closed. A second stop signal ends the drain at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from sidecar.observe import logs
from sidecar.outcomes import Close
from sidecar.proxy.connection import Tracker

# How long the handlers of the connections closed at the end get to finish their last step.
HANDLERS_GRACE = 1.0


class Drain:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.draining = False
        self.stopped = asyncio.Event()  # the first stop: serving ends
        self._done = asyncio.Event()  # every connection finished, or the second stop came

    def stop(self) -> bool:
        """Begin the drain (True), or end it at once (the second call: False)."""
        if self.draining:
            logs.event(logging.WARNING, "second stop signal: closing every connection now")
            self._done.set()
            return False
        self.draining = True
        self.stopped.set()
        return True

    def on_empty(self) -> None:
        """The tracker's last connection finished."""
        if self.draining:
            self._done.set()

    async def finish(self, tracker: Tracker, handlers: Collection[asyncio.Task[None]]) -> None:
        """Wait for the live connections (up to the timeout, or the second stop), then
        close what is left and give its handlers a moment to finish."""
        logs.event(logging.INFO, "draining", active=tracker.active, timeout_s=self.timeout)
        if tracker.active:
            try:
                async with asyncio.timeout(self.timeout):
                    await self._done.wait()
            except TimeoutError:
                logs.event(logging.WARNING, "drain timeout: closing what is left",
                           active=tracker.active)
        tracker.abort_all(Close.DRAIN)
        if handlers:
            await asyncio.wait(list(handlers), timeout=HANDLERS_GRACE)
        logs.event(logging.INFO, "stopped")
