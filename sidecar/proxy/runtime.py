"""The state every connection handler shares: the current snapshots and the limits.

Snapshots (TLS contexts built from one identity, one compiled policy) are replaced whole
by a reload; a handler reads the reference once when its connection starts and keeps
that snapshot for the connection's life.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from sidecar.authn import Authenticator
from sidecar.config import Limits
from sidecar.observe import logs
from sidecar.outcomes import Close, KtlsState
from sidecar.policy import Policy
from sidecar.proxy.connection import Record, Tracker
from sidecar.tls.contexts import Contexts
from sidecar.tls.resumption import ClientSession


@dataclass(slots=True)
class Runtime:
    loop: asyncio.AbstractEventLoop
    contexts: Contexts
    policy: Policy
    limits: Limits
    tracker: Tracker
    session_resumption: bool = True
    # kTLS: ENABLED (asked of OpenSSL on every connection, each counted enabled or
    # failed), UNAVAILABLE (auto, but this host cannot), or None (configured off: not
    # counted).
    ktls: KtlsState | None = None
    clock_skew_hint: float = 300.0
    authn: Authenticator = field(default_factory=Authenticator)
    # Outbound session cache: the session each outbound listener offers next.
    sessions: dict[str, ClientSession] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None], rec: Record) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, rec))

    def _done(self, task: asyncio.Task[None], rec: Record) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a peer's fault: say so loudly rather than lose the connection quietly.
            logs.log.error("internal error in a connection handler", exc_info=task.exception())
            if not rec.finished:
                rec.close = Close.INTERNAL_ERROR
                self.tracker.finish(rec)
